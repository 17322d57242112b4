// SegmentChecker (applier/segment_check.h) against ScanSegment: the replica checks a
// segment as its chunks arrive instead of reading the file back, so for any segment, good
// or damaged, and any way of cutting it into chunks, the checker must reach ScanSegment's
// verdict: the same summary, or the same refusal word for word.
#include "applier/segment_check.h"

#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <random>

#include "applier/applier_test_util.h"
#include "common/testing/temp_dir.h"
#include "tracker/test_util.h"

namespace siterep::applier {
namespace {

namespace fs = std::filesystem;
using testing::Bytes;
using testing::SegmentBuilder;
using tracker::testing::Pattern;

constexpr uint32_t kDisk = 0x5eed;
constexpr uint64_t kDiskSize = 8 << 20;

SegmentRules Rules() {
  SegmentRules r;
  r.disk_id = kDisk;
  r.disk_size = kDiskSize;
  r.min_epoch = 2;
  r.first_seq = 10;
  return r;
}

// A good segment: writes of several sizes (one of 1 MiB, larger than most chunks), a
// discard, the cut of cycle 4.
Bytes GoodSegment() {
  SegmentBuilder b(kDisk, 2, 10);
  b.Write(0, Pattern(4096, 1));
  b.Write(1 << 20, Pattern(1 << 20, 2));
  b.Discard(3 << 20, 65536);
  b.Write(5 << 20, Pattern(12288, 3));
  b.Write(7 << 20, Pattern(100, 4));
  b.Cut(4);
  return b.bytes();
}

std::string Verdict(const Result<SegmentSummary>& r) {
  if (!r.ok()) return "refused: " + r.status().ToString();
  return "records " + std::to_string(r->records) + ", bytes " + std::to_string(r->bytes) +
         ", seq " + std::to_string(r->first_seq) + ".." + std::to_string(r->last_seq) + ", cycle " +
         std::to_string(r->cut.cycle) + " at " + std::to_string(r->cut.unix_nanos);
}

class SegmentCheckTest : public ::testing::Test {
 protected:
  // ScanSegment of bytes written to a file.
  std::string Scanned(const Bytes& bytes, const SegmentRules& rules) {
    const fs::path path = tmp_.path() / "seg.part";
    std::ofstream(path, std::ios::binary | std::ios::trunc)
        .write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
    return Verdict(ScanSegment(path, rules));
  }
  // SegmentChecker fed bytes in pieces of random sizes (1 to max_piece bytes).
  std::string Checked(const Bytes& bytes, const SegmentRules& rules, size_t max_piece) {
    SegmentChecker check(tmp_.path() / "seg.part", rules);
    std::uniform_int_distribution<size_t> piece(1, max_piece);
    size_t at = 0;
    while (at < bytes.size()) {
      const size_t n = std::min(piece(rng_), bytes.size() - at);
      Status s = check.Feed(std::span(bytes).subspan(at, n));
      at += n;
      if (!s.ok()) {
        // The first refusal stays.
        EXPECT_EQ(check.Feed(std::span(bytes).first(0)).ToString(), s.ToString());
        break;
      }
    }
    return Verdict(check.Finish());
  }
  void ExpectSameVerdict(const Bytes& bytes, const SegmentRules& rules, const std::string& what) {
    const std::string want = Scanned(bytes, rules);
    for (size_t max_piece :
         {size_t{1}, size_t{7}, size_t{48}, size_t{4096}, size_t{65536}, size_t{1} << 21}) {
      EXPECT_EQ(Checked(bytes, rules, max_piece), want) << what << ", pieces up to " << max_piece;
    }
  }

  siterep::testing::TempDir tmp_;
  std::mt19937_64 rng_{20261208};
};

TEST_F(SegmentCheckTest, AGoodSegmentInAnyPiecesHasScanSegmentsSummary) {
  const Bytes good = GoodSegment();
  ASSERT_EQ(Scanned(good, Rules()).rfind("records 6,", 0), 0u) << Scanned(good, Rules());
  ExpectSameVerdict(good, Rules(), "good");
  SegmentRules any_start = Rules();
  any_start.first_seq.reset();
  any_start.last_seq = 15;
  any_start.cycle = 4;
  ExpectSameVerdict(good, any_start, "good, last seq and cycle given");
}

TEST_F(SegmentCheckTest, EveryDamageIsRefusedAsScanSegmentRefusesIt) {
  const Bytes good = GoodSegment();
  // A flipped byte anywhere: in a header (magic, kind, length, seq, CRC...), in a payload,
  // in the cut.
  std::uniform_int_distribution<size_t> where(0, good.size() - 1);
  for (int i = 0; i < 60; ++i) {
    Bytes bad = good;
    const size_t at = i < 48 ? static_cast<size_t>(i) : where(rng_);
    bad[at] ^= std::byte{0x20};
    ExpectSameVerdict(bad, Rules(), "byte " + std::to_string(at) + " flipped");
  }
  // Cut short anywhere, and a record after the cut.
  for (size_t len : {size_t{0}, size_t{20}, size_t{48}, size_t{4000}, size_t{4144},
                     good.size() - 30, good.size() - 1}) {
    ExpectSameVerdict(Bytes(good.begin(), good.begin() + static_cast<ptrdiff_t>(len)), Rules(),
                      "cut short at " + std::to_string(len));
  }
  Bytes extra = good;
  SegmentBuilder after(kDisk, 2, 16);
  after.Write(0, Pattern(10, 9));
  extra.insert(extra.end(), after.bytes().begin(), after.bytes().end());
  ExpectSameVerdict(extra, Rules(), "a record after the cut");
}

TEST_F(SegmentCheckTest, RuleBreachesAreRefusedAsScanSegmentRefusesThem) {
  const Bytes good = GoodSegment();
  const std::vector<std::pair<std::string, std::function<void(SegmentRules&)>>> breaches = {
      {"another disk", [](SegmentRules& r) { r.disk_id = kDisk + 1; }},
      {"an older epoch", [](SegmentRules& r) { r.min_epoch = 3; }},
      {"another first seq", [](SegmentRules& r) { r.first_seq = 11; }},
      {"another last seq", [](SegmentRules& r) { r.last_seq = 14; }},
      {"another cycle", [](SegmentRules& r) { r.cycle = 5; }},
      {"a write beyond the disk", [](SegmentRules& r) { r.disk_size = 6 << 20; }},
  };
  for (const auto& [what, breach] : breaches) {
    SegmentRules r = Rules();
    breach(r);
    ExpectSameVerdict(good, r, what);
  }
  SegmentBuilder gap(kDisk, 2, 10);
  gap.Write(0, Pattern(10, 1));
  gap.Raw(tracker::RecordHeader{.kind = tracker::RecordKind::kWrite,
                                .disk_id = kDisk,
                                .epoch = 2,
                                .seq = 12,
                                .offset = 0,
                                .length = 10},
          Pattern(10, 2));
  gap.Cut(4);
  ExpectSameVerdict(gap.bytes(), Rules(), "a skipped seq");
}

// A segment larger than MaxSegmentBytes is refused as soon as the pieces pass it, without
// waiting for the end.
TEST_F(SegmentCheckTest, ASegmentPastTheLimitIsRefusedAtThePieceThatPassesIt) {
  SegmentRules r = Rules();
  SegmentChecker check(tmp_.path() / "big.part", r);
  const uint64_t limit = MaxSegmentBytes(r.disk_size);
  SegmentBuilder b(kDisk, 2, 10);
  const Bytes one = Pattern(1 << 20, 5);
  uint64_t fed = 0;
  Status s;
  for (uint64_t seq = 0; s.ok() && fed <= limit; ++seq) {
    SegmentBuilder rec(kDisk, 2, 10 + seq);
    rec.Write(0, one);
    s = check.Feed(rec.bytes());
    fed += rec.bytes().size();
  }
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EBADMSG);
  EXPECT_NE(s.message().find("larger than the limit"), std::string::npos) << s.ToString();
  EXPECT_LE(fed - (one.size() + tracker::kHeaderSize), limit);
}

}  // namespace
}  // namespace siterep::applier
