// Recovery at Open: torn tails, redo, interrupted seals and cuts, damaged logs, and a
// "kill -9" taken while writes are in flight.
#include "tracker/recovery.h"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

#include "common/file_util.h"
#include "tracker/dirty_bitmap.h"
#include "tracker/disk_state.h"
#include "tracker/log_reader.h"
#include "tracker/tracker_fixture.h"

namespace siterep::tracker {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::AppendBytes;
using testing::EncodeRecord;
using testing::Pattern;
using testing::ReadLog;
using testing::Rec;
using testing::WriteVia;

constexpr uint64_t kBlock = 4096;

class RecoveryTest : public testing::TrackerFixture {
 protected:
  // What kill -9 leaves behind is what is in the page cache: copy every image, then every
  // log (the log is written ahead of the image, so a copy taken after the image holds at
  // least every change that reached the image copy).
  void CopyForCrash() {
    for (DiskFiles& d : disks_)
      fs::copy_file(d.image, Crashed(d.image), fs::copy_options::overwrite_existing);
    for (DiskFiles& d : disks_) {
      fs::remove_all(Crashed(d.log_dir));
      testing::CopyTree(d.log_dir, Crashed(d.log_dir));
    }
  }
  // Closes the tracker, then puts the crash copies in place of the files.
  void RestoreCrash(std::unique_ptr<VmTracker>& tracker) {
    tracker.reset();
    for (DiskFiles& d : disks_) {
      d.fd.Reset();
      fs::rename(Crashed(d.image), d.image);
      fs::remove_all(d.log_dir);
      fs::rename(Crashed(d.log_dir), d.log_dir);
      d.fd = testing::OpenRw(d.image);
    }
  }
  void Crash(std::unique_ptr<VmTracker>& tracker) {
    CopyForCrash();
    RestoreCrash(tracker);
  }
  static fs::path Crashed(const fs::path& p) {
    fs::path c = p;
    c += ".crash";
    return c;
  }
  fs::path LastSegment(size_t disk) {
    Result<std::vector<SegmentFile>> segs = ListSegments(disks_[disk].log_dir);
    EXPECT_TRUE(segs.ok() && !segs->empty());
    return segs->back().path;
  }
  void WriteBlocks(VmTracker& tracker, size_t disk, uint64_t first, uint64_t count) {
    for (uint64_t b = first; b < first + count; ++b) {
      ASSERT_TRUE(
          WriteVia(tracker.observer(disk), disks_[disk].fd.get(), b * kBlock, Pattern(kBlock, b))
              .ok());
    }
  }
  // A torn tail appended to the open segment is dropped at Open, and numbering goes on.
  void ExpectTailDropped(std::span<const std::byte> tail) {
    AddDisk("a", 1 << 20);
    auto tracker = Open(Options());
    ASSERT_TRUE(tracker);
    WriteBlocks(*tracker, 0, 0, 3);
    Crash(tracker);
    const fs::path open_segment = LastSegment(0);
    const uint64_t good_size = fs::file_size(open_segment);
    AppendBytes(open_segment, tail);

    tracker = Open(Options());
    ASSERT_TRUE(tracker);
    EXPECT_EQ(fs::file_size(open_segment), good_size);
    EXPECT_EQ(tracker->Stats().disks[0].last_seq, 3u);
    EXPECT_EQ(tracker->Stats().disks[0].tracking, DiskTracking::kLog);
    WriteBlocks(*tracker, 0, 10, 1);
    ASSERT_TRUE(tracker->Close().ok());
    std::vector<Rec> recs = ReadLog(disks_[0].log_dir);
    ASSERT_EQ(recs.size(), 5u);
    EXPECT_EQ(recs[3].header.seq, 4u);
    EXPECT_EQ(recs[3].header.offset, 10 * kBlock);
    ExpectReplayEqualsImage(0);
  }
};

TEST_F(RecoveryTest, GarbageAfterTheLastRecordIsDropped) { ExpectTailDropped(Pattern(1000, 42)); }

TEST_F(RecoveryTest, AHalfWrittenRecordIsDropped) {
  const RecordHeader h{RecordKind::kWrite, DiskIdFor("vm1", "a"), 3, 4, 20 * kBlock, kBlock};
  const std::vector<std::byte> rec = EncodeRecord(h, Pattern(kBlock, 9));
  ExpectTailDropped(std::span(rec).first(rec.size() / 2));
}

TEST_F(RecoveryTest, ARecordWithABadCrcIsDroppedAndNotRedone) {
  const RecordHeader h{RecordKind::kWrite, DiskIdFor("vm1", "a"), 3, 4, 20 * kBlock, kBlock};
  std::vector<std::byte> rec = EncodeRecord(h, Pattern(kBlock, 9));
  rec[kHeaderSize + 100] ^= std::byte{1};
  ExpectTailDropped(rec);
  // Block 20 was not redone from the bad record: the image still has its old contents.
  const std::vector<std::byte> image = testing::ReadWhole(disks_[0].image);
  const std::vector<std::byte> pre = testing::ReadWhole(disks_[0].pre_image);
  EXPECT_EQ(std::memcmp(image.data() + 20 * kBlock, pre.data() + 20 * kBlock, kBlock), 0);
}

TEST_F(RecoveryTest, ARecordAfterTheLastCutThatMissedTheImageIsRedone) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 2);
  ASSERT_EQ(*tracker->Cut(), 1u);
  // Killed between the log write and the image write: the apply never happens.
  const std::vector<std::byte> lost = Pattern(kBlock, 77);
  ASSERT_TRUE(tracker->observer(0).Write(5 * kBlock, lost, [] { return Status::Ok(); }).ok());
  Crash(tracker);
  std::vector<std::byte> image = testing::ReadWhole(disks_[0].image);
  ASSERT_NE(std::memcmp(image.data() + 5 * kBlock, lost.data(), kBlock), 0);

  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  image = testing::ReadWhole(disks_[0].image);
  EXPECT_EQ(std::memcmp(image.data() + 5 * kBlock, lost.data(), kBlock), 0);
  ASSERT_TRUE(tracker->Close().ok());
  ExpectReplayEqualsImage(0);
}

// Where the record of the write at block `block` starts in a segment, and its size.
std::pair<uint64_t, uint64_t> FindRecordOf(const fs::path& segment, uint64_t block) {
  Result<SegmentReader> reader = SegmentReader::Open(segment);
  EXPECT_TRUE(reader.ok());
  for (;;) {
    ParsedRecord rec;
    Result<ReadStatus> st = reader->Next(&rec);
    if (!st.ok() || *st != ReadStatus::kRecord) break;
    if (rec.header.kind == RecordKind::kWrite && rec.header.offset == block * kBlock) {
      return {reader->offset() - rec.size, rec.size};
    }
  }
  ADD_FAILURE() << "no record of block " << block << " in " << segment;
  return {0, 0};
}

void ZeroBytes(const fs::path& path, uint64_t offset, uint64_t length) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(offset));
  const std::vector<char> zeros(length, 0);
  f.write(zeros.data(), static_cast<std::streamsize>(length));
}

TEST_F(RecoveryTest, RedoWorksThroughAnODirectImageDescriptor) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const std::vector<std::byte> lost = Pattern(1000, 78);  // unaligned offset and length
  ASSERT_TRUE(tracker->observer(0).Write(12345, lost, [] { return Status::Ok(); }).ok());
  Crash(tracker);
  disks_[0].fd.Reset(::open(disks_[0].image.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC));
  if (!disks_[0].fd.valid()) GTEST_SKIP() << "no O_DIRECT on this file system";

  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const std::vector<std::byte> image = testing::ReadWhole(disks_[0].image);
  EXPECT_EQ(std::memcmp(image.data() + 12345, lost.data(), lost.size()), 0);
}

TEST_F(RecoveryTest, ASegmentEndingInACutIsSealedAtOpen) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 2);
  ASSERT_EQ(*tracker->Cut(), 1u);
  WriteBlocks(*tracker, 0, 2, 2);
  ASSERT_EQ(*tracker->Cut(), 2u);
  Crash(tracker);
  // Killed after the cut record was written but before the next segment was created.
  const fs::path empty_next = LastSegment(0);
  ASSERT_EQ(fs::file_size(empty_next), 0u);
  fs::remove(empty_next);

  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  std::vector<SealedSegment> sealed = tracker->SealedSegments();
  ASSERT_EQ(sealed.size(), 2u);
  EXPECT_EQ(sealed[1].cycle, 2u);
  EXPECT_EQ(sealed[1].first_seq, 4u);
  EXPECT_EQ(sealed[1].last_seq, 6u);
  EXPECT_TRUE(fs::exists(empty_next)) << "the next segment is created again";
  EXPECT_EQ(tracker->Stats().disks[0].unshipped_bytes, sealed[0].bytes + sealed[1].bytes);
  WriteBlocks(*tracker, 0, 4, 1);
  EXPECT_EQ(*tracker->Cut(), 3u);
}

TEST_F(RecoveryTest, ACutThatReachedOnlySomeDisksIsCompleted) {
  AddDisk("a", 1 << 20);
  AddDisk("b", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 2);
  WriteBlocks(*tracker, 1, 0, 3);
  // b's log as it was before the cut: as if killed before b's writer wrote its cut record.
  const fs::path b_before = tmp_.path() / "b_before";
  testing::CopyTree(disks_[1].log_dir, b_before);
  ASSERT_EQ(*tracker->Cut(), 1u);
  tracker.reset();
  fs::remove_all(disks_[1].log_dir);
  fs::rename(b_before, disks_[1].log_dir);

  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  std::vector<SealedSegment> sealed = tracker->SealedSegments();
  ASSERT_EQ(sealed.size(), 2u);
  EXPECT_EQ(sealed[0].disk, "a");
  EXPECT_EQ(sealed[1].disk, "b");
  EXPECT_EQ(sealed[1].cycle, 1u);
  EXPECT_EQ(sealed[1].last_seq, 4u) << "b's three writes, then the completed cut";
  ASSERT_TRUE(tracker->Close().ok());
  std::vector<Rec> a = ReadLog(disks_[0].log_dir);
  std::vector<Rec> b = ReadLog(disks_[1].log_dir);
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 4u);
  EXPECT_EQ(a[2].payload, b[3].payload) << "the same cycle and time in both logs";
  ExpectReplayEqualsImage(1);
}

TEST_F(RecoveryTest, ADamagedSealedSegmentMakesEveryBlockDirty) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 2);
  ASSERT_EQ(*tracker->Cut(), 1u);
  const std::vector<std::byte> lost = Pattern(kBlock, 5);
  ASSERT_TRUE(tracker->observer(0).Write(9 * kBlock, lost, [] { return Status::Ok(); }).ok());
  Crash(tracker);
  const fs::path first = SegmentPath(disks_[0].log_dir, 1);
  {
    std::fstream f(first, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(first) - 1));
    f.put('\x55');
  }
  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const DiskStats stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kBitmap);
  EXPECT_TRUE(stats.resync_required);
  EXPECT_NE(stats.resync_reason.find("unreadable"), std::string::npos) << stats.resync_reason;
  EXPECT_EQ(stats.dirty_bytes, disks_[0].size);
  EXPECT_TRUE(ListSegments(disks_[0].log_dir)->empty());
  // The open segment's records were still redone before the log was dropped.
  const std::vector<std::byte> image = testing::ReadWhole(disks_[0].image);
  EXPECT_EQ(std::memcmp(image.data() + 9 * kBlock, lost.data(), kBlock), 0);
}

TEST_F(RecoveryTest, AFallBackInterruptedByACrashIsFinishedAtOpen) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 2);
  ASSERT_EQ(*tracker->Cut(), 1u);
  WriteBlocks(*tracker, 0, 7, 1);
  Crash(tracker);
  // Killed right after the fall back created its (still clean) bitmap file.
  ASSERT_TRUE(DirtyBitmap::Open(disks_[0].log_dir / kBitmapFileName, disks_[0].size).ok());

  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const DiskStats stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kBitmap);
  EXPECT_TRUE(stats.resync_required);
  EXPECT_EQ(stats.dirty_bytes, 3 * kBlock) << "blocks 0, 1 and 7, from the log it dropped";
  EXPECT_TRUE(ListSegments(disks_[0].log_dir)->empty());
  tracker.reset();
  Result<std::optional<DiskState>> state = LoadDiskState(disks_[0].log_dir);
  ASSERT_TRUE(state.ok() && state->has_value());
  EXPECT_EQ((*state)->tracking, DiskTracking::kBitmap);
  EXPECT_EQ((*state)->last_cycle, 1u) << "numbering floors survive the dropped log";
  EXPECT_EQ((*state)->last_seq, 4u);
}

TEST_F(RecoveryTest, TheLogOfAnotherDiskIsRefused) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 1);
  tracker.reset();
  VmTrackerOptions o = Options();
  o.disks[0].name = "b";  // a's log folder, configured for another disk
  Result<std::unique_ptr<VmTracker>> t = VmTracker::Open(o);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), EINVAL);
  EXPECT_NE(t.status().message().find("another disk"), std::string::npos) << t.status().message();
}

// kill -9 while four threads write to two disks: after recovery, replaying each whole log
// onto its pre-image still gives the image, byte for byte.
TEST_F(RecoveryTest, KilledDuringWritesThenRecoveredImageEqualsReplay) {
  AddDisk("a", 4 << 20);
  AddDisk("b", 4 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 4);
  WriteBlocks(*tracker, 1, 0, 4);
  ASSERT_EQ(*tracker->Cut(), 1u);
  std::atomic<bool> stop{false};
  std::atomic<int> writes{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      while (!stop) {
        const size_t d = rng() % 2;
        const size_t length = 1 + rng() % (64 << 10);
        const uint64_t offset = rng() % (disks_[d].size - length);
        ASSERT_TRUE(
            WriteVia(tracker->observer(d), disks_[d].fd.get(), offset, Pattern(length, rng()))
                .ok());
        ++writes;
      }
    });
  }
  while (writes < 200) std::this_thread::sleep_for(1ms);
  CopyForCrash();  // in flight: some records are in the log copy but not in the image copy
  stop = true;
  for (auto& t : threads) t.join();
  RestoreCrash(tracker);

  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  ASSERT_TRUE(tracker->Close().ok());
  ExpectReplayEqualsImage(0);
  ExpectReplayEqualsImage(1);
}

// Appenders write their reserved ranges concurrently: after kill -9, an earlier range may
// be a hole (never or partly written, so never applied) while later records are complete
// (applied or not). Recovery keeps and redoes the later ones, drops the hole and
// renumbers, so the log still replays to the image.
class HoleTest : public RecoveryTest {
 protected:
  using Damage = std::function<void(const fs::path& segment, uint64_t at, uint64_t size)>;

  // Blocks 0-1, a cut, then blocks 2-6 in the open segment. The record of hole_block is
  // damaged by `damage` (given its offset and size) and was never applied; block 6's
  // record reached the log but not the image.
  void Run(uint64_t hole_block, const Damage& damage) {
    AddDisk("a", 1 << 20);
    auto tracker = Open(Options());
    ASSERT_TRUE(tracker);
    WriteBlocks(*tracker, 0, 0, 2);
    ASSERT_EQ(*tracker->Cut(), 1u);
    auto not_applied = [] { return Status::Ok(); };
    for (uint64_t b = 2; b <= 6; ++b) {
      if (b == hole_block || b == 6) {
        ASSERT_TRUE(tracker->observer(0).Write(b * kBlock, Pattern(kBlock, b), not_applied).ok());
      } else {
        WriteBlocks(*tracker, 0, b, 1);
      }
    }
    Crash(tracker);
    const fs::path open_segment = LastSegment(0);
    const uint64_t size_before = fs::file_size(open_segment);
    const auto [at, size] = FindRecordOf(open_segment, hole_block);
    damage(open_segment, at, size);

    tracker = Open(Options());
    ASSERT_TRUE(tracker);
    EXPECT_EQ(fs::file_size(open_segment), size_before - size) << "the hole is gone";
    EXPECT_EQ(tracker->Stats().disks[0].tracking, DiskTracking::kLog);
    EXPECT_EQ(tracker->Stats().disks[0].last_seq, 7u) << "cut 3, then 4 of 5 records";
    const std::vector<std::byte> image = testing::ReadWhole(disks_[0].image);
    const std::vector<std::byte> pre = testing::ReadWhole(disks_[0].pre_image);
    EXPECT_EQ(
        std::memcmp(image.data() + hole_block * kBlock, pre.data() + hole_block * kBlock, kBlock),
        0);
    EXPECT_EQ(std::memcmp(image.data() + 6 * kBlock, Pattern(kBlock, 6).data(), kBlock), 0)
        << "the record after the hole is redone";
    WriteBlocks(*tracker, 0, 9, 1);
    ASSERT_TRUE(tracker->Close().ok());
    std::vector<Rec> recs = ReadLog(disks_[0].log_dir);
    ASSERT_EQ(recs.size(), 9u);  // 2 + cut, 4 + 1 + cut
    std::vector<uint64_t> blocks;
    for (uint64_t b = 2; b <= 6; ++b) {
      if (b != hole_block) blocks.push_back(b);
    }
    blocks.push_back(9);
    for (size_t i = 0; i < blocks.size(); ++i) {
      EXPECT_EQ(recs[3 + i].header.seq, 4 + i);
      EXPECT_EQ(recs[3 + i].header.offset, blocks[i] * kBlock);
    }
    ExpectReplayEqualsImage(0);
  }
};

TEST_F(HoleTest, AZeroedHoleIsDroppedAndTheRecordsAfterItAreKept) {
  Run(3, [](const fs::path& seg, uint64_t at, uint64_t size) { ZeroBytes(seg, at, size); });
}

TEST_F(HoleTest, APartlyWrittenRecordIsDroppedAndTheRecordsAfterItAreKept) {
  Run(3, [](const fs::path& seg, uint64_t at, uint64_t size) {
    ZeroBytes(seg, at + kHeaderSize + 1000, size - kHeaderSize - 1000);
  });
}

TEST_F(HoleTest, AHoleAtTheStartOfTheOpenSegmentIsDropped) {
  Run(2, [](const fs::path& seg, uint64_t at, uint64_t size) {
    ASSERT_EQ(at, 0u);
    ZeroBytes(seg, at, size);
  });
}

}  // namespace
}  // namespace siterep::tracker
