// Tests of reading logs (SegmentReader, LogScanner) and of replay.
#include "tracker/log_reader.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstring>
#include <fstream>

#include "tracker/replay.h"
#include "tracker/test_util.h"

namespace siterep::tracker {
namespace {

namespace fs = std::filesystem;
using testing::AppendBytes;
using testing::EncodeRecord;
using testing::Pattern;
using testing::TempDir;

constexpr uint32_t kDisk = 77;

// Builds log folders by hand.
class LogBuilder {
 public:
  explicit LogBuilder(fs::path dir) : dir_(std::move(dir)) { fs::create_directories(dir_); }

  void StartSegment(uint64_t number) {
    current_ = SegmentPath(dir_, number);
    std::ofstream(current_).flush();
  }
  void Write(uint64_t offset, std::span<const std::byte> data) {
    RecordHeader h{RecordKind::kWrite, kDisk, 1, ++seq_, offset, data.size()};
    AppendBytes(current_, EncodeRecord(h, data));
  }
  void Discard(uint64_t offset, uint64_t length) {
    RecordHeader h{RecordKind::kDiscard, kDisk, 1, ++seq_, offset, length};
    AppendBytes(current_, EncodeRecord(h, {}));
  }
  void Cut(uint64_t cycle) {
    RecordHeader h{RecordKind::kCut, kDisk, 1, ++seq_, 0, kCutPayloadSize};
    std::byte payload[kCutPayloadSize];
    EncodeCutPayload(CutPayload{cycle, 1000 + static_cast<int64_t>(cycle)}, payload);
    AppendBytes(current_, EncodeRecord(h, payload));
  }
  void Raw(std::span<const std::byte> bytes) { AppendBytes(current_, bytes); }
  const fs::path& current() const { return current_; }
  uint64_t seq() const { return seq_; }
  void set_seq(uint64_t seq) { seq_ = seq; }

 private:
  fs::path dir_;
  fs::path current_;
  uint64_t seq_ = 0;
};

TEST(LogReaderTest, ListSegmentsSortsAndIgnoresOtherFiles) {
  TempDir tmp;
  LogBuilder log(tmp.path());
  log.StartSegment(10);
  log.StartSegment(2);
  std::ofstream(tmp.path() / "state.json") << "{}";
  std::ofstream(tmp.path() / "123.seg") << "";  // not 20 digits
  std::ofstream(tmp.path() / (SegmentFileName(3) + ".tmp")) << "";
  Result<std::vector<SegmentFile>> segs = ListSegments(tmp.path());
  ASSERT_TRUE(segs.ok()) << segs.status().ToString();
  ASSERT_EQ(segs->size(), 2u);
  EXPECT_EQ((*segs)[0].number, 2u);
  EXPECT_EQ((*segs)[1].number, 10u);
  EXPECT_EQ(SegmentFileName(2), "00000000000000000002.seg");
  EXPECT_EQ(ListSegments(tmp.path() / "missing").status().code(), ENOENT);
}

TEST(LogReaderTest, SegmentReaderReadsRecordsLargerThanItsBuffer) {
  TempDir tmp;
  LogBuilder log(tmp.path());
  log.StartSegment(1);
  const std::vector<std::byte> big = Pattern(3 << 20, 1);
  const std::vector<std::byte> small = Pattern(100, 2);
  for (int i = 0; i < 3; ++i) {
    log.Write(0, small);
    log.Write(4096, big);
  }
  Result<SegmentReader> reader = SegmentReader::Open(log.current());
  ASSERT_TRUE(reader.ok());
  for (int i = 0; i < 6; ++i) {
    ParsedRecord rec;
    Result<ReadStatus> st = reader->Next(&rec);
    ASSERT_TRUE(st.ok());
    ASSERT_EQ(*st, ReadStatus::kRecord) << i;
    const std::vector<std::byte>& want = (i % 2 == 0) ? small : big;
    ASSERT_EQ(rec.payload.size(), want.size());
    EXPECT_EQ(std::memcmp(rec.payload.data(), want.data(), want.size()), 0);
    EXPECT_EQ(rec.header.seq, static_cast<uint64_t>(i + 1));
  }
  ParsedRecord rec;
  EXPECT_EQ(*reader->Next(&rec), ReadStatus::kEnd);
  EXPECT_EQ(reader->offset(), reader->file_size());
}

TEST(LogReaderTest, ScannerReportsTornTailOfLastSegment) {
  TempDir tmp;
  LogBuilder log(tmp.path());
  log.StartSegment(1);
  log.Write(0, Pattern(4096, 1));
  log.Cut(1);
  log.StartSegment(2);
  log.Write(8192, Pattern(4096, 2));
  const uint64_t good_size = fs::file_size(log.current());
  // Half of the next record.
  RecordHeader h{RecordKind::kWrite, kDisk, 1, log.seq() + 1, 0, 4096};
  const std::vector<std::byte> next = EncodeRecord(h, Pattern(4096, 3));
  log.Raw(std::span(next).first(1000));

  Result<LogScanner> scanner = LogScanner::Open(tmp.path());
  ASSERT_TRUE(scanner.ok());
  ScannedRecord rec;
  int count = 0;
  for (;;) {
    Result<bool> more = scanner->Next(&rec);
    ASSERT_TRUE(more.ok()) << more.status().ToString();
    if (!*more) break;
    ++count;
  }
  EXPECT_EQ(count, 3);
  ASSERT_TRUE(scanner->torn_tail().has_value());
  EXPECT_EQ(scanner->torn_tail()->segment, 2u);
  EXPECT_EQ(scanner->torn_tail()->file_offset, good_size);
  EXPECT_EQ(scanner->torn_tail()->dropped_bytes, 1000u);
}

TEST(LogReaderTest, ScannerRejectsDamageInASealedSegment) {
  TempDir tmp;
  LogBuilder log(tmp.path());
  log.StartSegment(1);
  log.Write(0, Pattern(4096, 1));
  log.Cut(1);
  log.StartSegment(2);
  log.Write(0, Pattern(4096, 2));
  // Flip a payload byte of segment 1's first record.
  {
    std::fstream f(SegmentPath(tmp.path(), 1), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(kHeaderSize + 10);
    f.put('!');
  }
  Result<LogScanner> scanner = LogScanner::Open(tmp.path());
  ASSERT_TRUE(scanner.ok());
  ScannedRecord rec;
  Result<bool> more = scanner->Next(&rec);
  ASSERT_FALSE(more.ok());
  EXPECT_EQ(more.status().code(), EBADMSG);
  EXPECT_NE(more.status().message().find(SegmentFileName(1)), std::string::npos)
      << more.status().message();
  EXPECT_NE(more.status().message().find("offset 0"), std::string::npos);
}

// What the shipper checks before a segment leaves the primary: a flipped byte anywhere in
// the file (header or payload of any record) is damage, and so is a segment that is not
// exactly what the tracker sealed.
TEST(LogReaderTest, CheckSealedSegmentRefusesEveryFlippedByte) {
  TempDir tmp;
  LogBuilder log(tmp.path());
  log.StartSegment(4);
  log.set_seq(40);
  log.Write(8192, Pattern(300, 1));
  log.Discard(0, 4096);
  log.Cut(9);
  SealedSegment seg;
  seg.disk = "a";
  seg.disk_id = kDisk;
  seg.number = 4;
  seg.cycle = 9;
  seg.first_seq = 41;
  seg.last_seq = 43;
  const fs::path path = log.current();
  seg.bytes = fs::file_size(path);
  ASSERT_TRUE(CheckSealedSegment(seg, path).ok()) << CheckSealedSegment(seg, path).ToString();

  for (uint64_t at = 0; at < seg.bytes; ++at) {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(at));
    const char old = static_cast<char>(f.get());
    f.seekp(static_cast<std::streamoff>(at));
    f.put(static_cast<char>(old ^ 0x40));
    f.flush();
    Status s = CheckSealedSegment(seg, path);
    EXPECT_EQ(s.code(), EBADMSG) << "byte " << at << " flipped: " << s.ToString();
    EXPECT_NE(s.message().find(SegmentFileName(4)), std::string::npos) << s.message();
    f.seekp(static_cast<std::streamoff>(at));
    f.put(old);
  }
  ASSERT_TRUE(CheckSealedSegment(seg, path).ok());

  auto refused = [&](SealedSegment other, std::string_view why) {
    Status s = CheckSealedSegment(other, path);
    EXPECT_EQ(s.code(), EBADMSG) << s.ToString();
    EXPECT_NE(s.message().find(why), std::string::npos) << s.message();
  };
  SealedSegment other = seg;
  other.cycle = 8;
  refused(other, "cut of cycle 9 where cycle 8 was expected");
  other = seg;
  other.first_seq = 40;
  refused(other, "seq 41 where 40 was expected");
  other = seg;
  other.last_seq = 44;
  refused(other, "ends at seq 43 where 44 was expected");
  other = seg;
  other.disk_id = kDisk + 1;
  refused(other, "disk id");
  other = seg;
  other.bytes = seg.bytes - 1;
  refused(other, "bytes");
  log.Write(0, Pattern(10, 2));  // past the cut
  other = seg;
  other.bytes = fs::file_size(path);
  refused(other, "after the cut");
  EXPECT_EQ(CheckSealedSegment(other, tmp.path() / SegmentFileName(5)).code(), ENOENT);
}

// A hole (zeros where an append never finished) is tolerated only in the open segment, by
// recovery; in a sealed segment, even with valid records after it, it is damage.
TEST(LogReaderTest, ScannerRejectsAHoleInASealedSegment) {
  TempDir tmp;
  LogBuilder log(tmp.path());
  log.StartSegment(1);
  log.Write(0, Pattern(4096, 1));
  log.Raw(std::vector<std::byte>(kHeaderSize + 4096));  // the hole of seq 2
  log.set_seq(2);
  log.Write(8192, Pattern(4096, 3));
  log.Cut(1);
  log.StartSegment(2);
  log.Write(0, Pattern(4096, 5));
  Result<LogScanner> scanner = LogScanner::Open(tmp.path());
  ASSERT_TRUE(scanner.ok());
  ScannedRecord rec;
  Result<bool> more = scanner->Next(&rec);
  ASSERT_TRUE(more.ok() && *more);
  more = scanner->Next(&rec);
  ASSERT_FALSE(more.ok());
  EXPECT_EQ(more.status().code(), EBADMSG);
  EXPECT_NE(more.status().message().find(SegmentFileName(1)), std::string::npos)
      << more.status().message();
}

TEST(LogReaderTest, ScannerRejectsASequenceGapBetweenSegments) {
  TempDir tmp;
  LogBuilder log(tmp.path());
  log.StartSegment(1);
  log.Write(0, Pattern(512, 1));
  log.Cut(1);
  log.StartSegment(2);
  log.set_seq(log.seq() + 5);  // records 3..7 are missing
  log.Write(0, Pattern(512, 2));
  log.Cut(2);
  log.StartSegment(3);
  Result<LogScanner> scanner = LogScanner::Open(tmp.path());
  ASSERT_TRUE(scanner.ok());
  ScannedRecord rec;
  ASSERT_TRUE(*scanner->Next(&rec));
  ASSERT_TRUE(*scanner->Next(&rec));
  Result<bool> more = scanner->Next(&rec);
  ASSERT_FALSE(more.ok());
  EXPECT_NE(more.status().message().find("sequence"), std::string::npos);
}

class ReplayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    log_dir_ = tmp_.path() / "log";
    target_ = tmp_.path() / "target.img";
    testing::MakeImage(target_, kSize, 99);
  }
  static constexpr uint64_t kSize = 1 << 20;
  TempDir tmp_;
  fs::path log_dir_;
  fs::path target_;
};

TEST_F(ReplayTest, AppliesWritesAndDiscardsInOrder) {
  LogBuilder log(log_dir_);
  log.StartSegment(1);
  const std::vector<std::byte> a = Pattern(10000, 1);
  const std::vector<std::byte> b = Pattern(3000, 2);
  log.Write(100, a);
  log.Write(5000, b);  // overlaps a: b wins
  log.Discard(65536, 8192);
  log.Cut(1);

  std::vector<std::byte> want = testing::ReadWhole(target_);
  std::memcpy(want.data() + 100, a.data(), a.size());
  std::memcpy(want.data() + 5000, b.data(), b.size());
  std::memset(want.data() + 65536, 0, 8192);

  Result<ReplayResult> r = ReplayLogToFile(log_dir_, target_);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->writes, 2u);
  EXPECT_EQ(r->discards, 1u);
  EXPECT_EQ(r->cuts, 1u);
  EXPECT_EQ(r->last_cycle, 1u);
  EXPECT_FALSE(r->torn_tail.has_value());
  EXPECT_EQ(testing::ReadWhole(target_), want);
}

TEST_F(ReplayTest, StopsAtTheRequestedCycle) {
  LogBuilder log(log_dir_);
  log.StartSegment(1);
  const std::vector<std::byte> first = Pattern(4096, 1);
  log.Write(0, first);
  log.Cut(1);
  log.StartSegment(2);
  log.Write(0, Pattern(4096, 2));
  log.Cut(2);
  log.StartSegment(3);
  log.Write(0, Pattern(4096, 3));

  std::vector<std::byte> want = testing::ReadWhole(target_);
  std::memcpy(want.data(), first.data(), first.size());
  Result<ReplayResult> r = ReplayLogToFile(log_dir_, target_, ReplayOptions{1});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->last_cycle, 1u);
  EXPECT_EQ(r->records, 2u);
  EXPECT_EQ(testing::ReadWhole(target_), want);

  Result<ReplayResult> missing = ReplayLogToFile(log_dir_, target_, ReplayOptions{5});
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("cycle 5"), std::string::npos);
}

TEST_F(ReplayTest, RecordPastTheEndOfTheTargetStopsTheReplay) {
  LogBuilder log(log_dir_);
  log.StartSegment(1);
  log.Write(0, Pattern(10, 1));
  log.Write(kSize - 100, Pattern(4096, 2));
  log.Write(0, Pattern(10, 3));
  const std::vector<std::byte> before = testing::ReadWhole(target_);
  Result<ReplayResult> r = ReplayLogToFile(log_dir_, target_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), EBADMSG);
  EXPECT_NE(r.status().message().find("seq 2"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("beyond the end"), std::string::npos);
  // The record before was applied, the one after was not.
  const std::vector<std::byte> after = testing::ReadWhole(target_);
  const std::vector<std::byte> first = Pattern(10, 1);
  EXPECT_EQ(std::memcmp(after.data(), first.data(), 10), 0);
  EXPECT_EQ(std::memcmp(after.data() + kSize - 100, before.data() + kSize - 100, 100), 0);
}

}  // namespace
}  // namespace siterep::tracker
