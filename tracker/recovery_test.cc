// Recovery at Open: unfinished builds, frozen cuts and cycles not on every disk, damaged
// logs, and a "kill -9" taken while writes are in flight.
#include "tracker/recovery.h"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/dirty_bitmap.h"
#include "tracker/disk_log.h"
#include "tracker/disk_state.h"
#include "tracker/frozen_set.h"
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
  // log folder (a change marks the map before the image, so a map copied after the image
  // holds at least every change that reached the image copy).
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
};

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
  EXPECT_FALSE(fs::exists(disks_[0].log_dir / kMapFileName));
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
  EXPECT_EQ(stats.dirty_bytes, 3 * kBlock)
      << "blocks 0 and 1 from the log it dropped, block 7 from the map";
  EXPECT_TRUE(ListSegments(disks_[0].log_dir)->empty());
  tracker.reset();
  Result<std::optional<DiskState>> state = LoadDiskState(disks_[0].log_dir);
  ASSERT_TRUE(state.ok() && state->has_value());
  EXPECT_EQ((*state)->tracking, DiskTracking::kBitmap);
  EXPECT_EQ((*state)->last_cycle, 1u) << "numbering floors survive the dropped log";
  EXPECT_EQ((*state)->last_seq, 2u);  // one record of blocks 0-1, then the cut
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

// kill -9 while a cycle is built: the frozen set is on disk (frozen.map) and the
// segment half written (".tmp"); at Open the unfinished file goes and the frozen blocks
// go back into the map, so the next cycle carries them with the blocks changed since.
TEST_F(RecoveryTest, AFrozenCutNotPublishedGoesIntoTheNextCycle) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 2);
  ASSERT_EQ(*tracker->Cut(), 1u);
  WriteBlocks(*tracker, 0, 5, 3);
  WriteBlocks(*tracker, 0, 40, 1);
  Crash(tracker);
  // What a kill during the build of cycle 2 leaves: block 40 frozen (it left the map at
  // the cut), blocks 5-7 written after it, and half a segment.
  const fs::path log = disks_[0].log_dir;
  {
    Result<std::unique_ptr<DirtyBitmap>> map = DirtyBitmap::Open(log / kMapFileName, 1 << 20);
    ASSERT_TRUE(map.ok());
    std::vector<uint64_t> all;
    (*map)->TakeAll(&all);
    (*map)->MarkRange(5 * kBlock, 3 * kBlock);
    ASSERT_TRUE((*map)->Flush().ok());
  }
  std::vector<uint64_t> frozen(4, 0);
  frozen[0] = uint64_t{1} << 40;
  ASSERT_TRUE(SaveFrozenSet(log / kFrozenFileName, 2, 1 << 20, frozen).ok());
  const fs::path tmp = SegmentPath(log, 2).string() + ".tmp";
  { std::ofstream(tmp) << "half a segment"; }

  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_FALSE(fs::exists(log / kFrozenFileName));
  EXPECT_EQ(tracker->Stats().last_cycle, 1u);
  EXPECT_EQ(tracker->Stats().disks[0].unshipped_bytes,
            tracker->SealedSegments()[0].bytes + 4 * kBlock);
  ASSERT_EQ(*tracker->Cut(), 2u);
  ASSERT_TRUE(tracker->Close().ok());
  std::vector<uint64_t> offsets;
  for (const Rec& r : ReadLog(log)) {
    if (r.header.kind == RecordKind::kWrite) offsets.push_back(r.header.offset / kBlock);
  }
  EXPECT_EQ(offsets, (std::vector<uint64_t>{0, 5, 40})) << "cycle 1: 0-1, cycle 2: 5-7 and 40";
  ExpectReplayEqualsImage(0);
}

// A build that fails on one disk (here the failpoint before its sync) gives the cycle up
// on every disk: the built segment of the other disk is deleted, both keep their blocks,
// and the next cut builds the cycle again under the same number.
TEST_F(RecoveryTest, ABuildThatFailsOnOneDiskRollsTheCycleBackOnAll) {
  AddDisk("a", 1 << 20);
  AddDisk("b", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 3, 1);
  WriteBlocks(*tracker, 1, 4, 1);
  ASSERT_TRUE(failpoint::Arm("tracker.before_seal=error*1").ok());
  Result<uint64_t> failed = tracker->Cut();
  EXPECT_EQ(failed.status().code(), EAGAIN) << failed.status().ToString();
  EXPECT_TRUE(tracker->SealedSegments().empty());
  EXPECT_EQ(tracker->Stats().last_cycle, 0u);
  EXPECT_EQ(tracker->Stats().disks[0].unshipped_bytes, kBlock);
  EXPECT_EQ(tracker->Stats().disks[1].unshipped_bytes, kBlock);
  EXPECT_NE(tracker->Stats().open_first_change_unix_nanos, 0);
  ASSERT_EQ(*tracker->Cut(), 1u);
  EXPECT_EQ(tracker->SealedSegments().size(), 2u);
  ASSERT_TRUE(tracker->Close().ok());
  ExpectReplayEqualsImage(0);
  ExpectReplayEqualsImage(1);
}

// A cycle published on one disk but not the other (kill -9 between two Publish calls) is
// rolled back at Open: both disks end at the cycle before, and the next cut covers it.
TEST_F(RecoveryTest, ACycleOnlySomeDisksPublishedIsRolledBack) {
  AddDisk("a", 1 << 20);
  AddDisk("b", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 2);
  WriteBlocks(*tracker, 1, 0, 2);
  ASSERT_EQ(*tracker->Cut(), 1u);
  WriteBlocks(*tracker, 0, 10, 2);
  WriteBlocks(*tracker, 1, 20, 2);
  ASSERT_EQ(*tracker->Cut(), 2u);
  CopyForCrash();
  RestoreCrash(tracker);
  // Disk b loses its segment of cycle 2, as if killed before its Publish; its blocks of
  // cycle 2 are in no map (the frozen set was deleted with the publish of a).
  const fs::path b_last = LastSegment(1);
  fs::remove(b_last);
  {
    // What b's map held at the kill: its blocks of cycle 2 were frozen (frozen.map).
    Result<std::unique_ptr<DirtyBitmap>> map =
        DirtyBitmap::Open(disks_[1].log_dir / "changed.map", 1 << 20);
    ASSERT_TRUE(map.ok());
    (*map)->MarkRange(20 * kBlock, 2 * kBlock);
    ASSERT_TRUE((*map)->Flush().ok());
  }
  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  EXPECT_EQ(tracker->Stats().last_cycle, 1u) << "cycle 2 is on disk a only: rolled back";
  EXPECT_EQ(tracker->SealedSegments().size(), 2u);  // cycle 1 of a and b
  ASSERT_EQ(*tracker->Cut(), 2u);
  const std::vector<SealedSegment> sealed = tracker->SealedSegments();
  ASSERT_EQ(sealed.size(), 4u);
  EXPECT_EQ(sealed[2].cycle, 2u);
  EXPECT_EQ(sealed[3].cycle, 2u);
  ASSERT_TRUE(tracker->Close().ok());
  ExpectReplayEqualsImage(0);
  ExpectReplayEqualsImage(1);
}

}  // namespace
}  // namespace siterep::tracker
