// Recovery at Open: unreleased cuts reopened, cuts not renamed, cycles not on every disk,
// damaged cut files, an older version's files, and a "kill -9" taken while writes are in
// flight.
#include "tracker/recovery.h"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

#include "common/crc32c.h"
#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/activity_log.h"
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
  // What kill -9 leaves behind is what is in the page cache, at one instant. Copied file by
  // file while writes go on, the order makes it so: every image, then the bits of every
  // copy-on-write file, then every log folder. A change marks the map and saves the cut's
  // content (data, then bit) before it changes the image, so the map copied after the
  // image holds every change that reached the image copy; a saved bit in the copy names a
  // block whose data was written before the bit, so before the folder copy; and a block
  // saved after the bits were copied was still the cut's in the image copy.
  void CopyForCrash() {
    for (DiskFiles& d : disks_)
      fs::copy_file(d.image, Crashed(d.image), fs::copy_options::overwrite_existing);
    std::vector<std::pair<fs::path, std::vector<char>>> bits;
    for (DiskFiles& d : disks_) {
      for (const auto& e : fs::directory_iterator(d.log_dir)) {
        if (e.path().extension() != ".cow") continue;
        const uint64_t at = (d.size + 4095) / 4096 * 4096;
        std::ifstream in(e.path(), std::ios::binary);
        in.seekg(static_cast<std::streamoff>(at));
        std::vector<char> tail(fs::file_size(e.path()) - at);
        in.read(tail.data(), static_cast<std::streamsize>(tail.size()));
        bits.emplace_back(Crashed(d.log_dir) / e.path().filename(), std::move(tail));
      }
    }
    for (DiskFiles& d : disks_) {
      fs::remove_all(Crashed(d.log_dir));
      testing::CopyTree(d.log_dir, Crashed(d.log_dir));
    }
    for (const auto& [path, tail] : bits) {
      std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(static_cast<std::streamoff>(fs::file_size(path) - tail.size()));
      f.write(tail.data(), static_cast<std::streamsize>(tail.size()));
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
  // The files of disk's log folder with that extension.
  std::vector<fs::path> FilesOf(size_t disk, std::string_view extension) {
    std::vector<fs::path> out;
    for (const auto& e : fs::directory_iterator(disks_[disk].log_dir)) {
      if (e.path().extension() == extension) out.push_back(e.path());
    }
    std::sort(out.begin(), out.end());
    return out;
  }
  void WriteBlocks(VmTracker& tracker, size_t disk, uint64_t first, uint64_t count) {
    for (uint64_t b = first; b < first + count; ++b) {
      ASSERT_TRUE(
          WriteVia(tracker.observer(disk), disks_[disk].fd.get(), b * kBlock, Pattern(kBlock, b))
              .ok());
    }
  }
};

// A damaged cut file cannot say which blocks its cycle holds, nor give them to the shipper:
// every block is dirty (a resync), named in status.
TEST_F(RecoveryTest, ADamagedCutFileMakesEveryBlockDirty) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 2);
  ASSERT_EQ(*tracker->Cut(), 1u);
  const std::vector<std::byte> lost = Pattern(kBlock, 5);
  ASSERT_TRUE(tracker->observer(0).Write(9 * kBlock, lost, [] { return Status::Ok(); }).ok());
  Crash(tracker);
  const fs::path first = CutPath(disks_[0].log_dir, 1);
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
  EXPECT_NE(stats.resync_reason.find("damaged"), std::string::npos) << stats.resync_reason;
  EXPECT_EQ(stats.dirty_bytes, disks_[0].size);
  EXPECT_TRUE(FilesOf(0, ".cut").empty());
  EXPECT_TRUE(FilesOf(0, ".cow").empty());
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
      << "blocks 0 and 1 from the cut it dropped, block 7 from the map";
  EXPECT_TRUE(FilesOf(0, ".cut").empty());
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

// kill -9 while four threads write to two disks, cycle 1 unreleased (its blocks saved
// to the copy-on-write as they are overwritten): after recovery, replaying every cycle
// shipped from then on (cycle 1 read from the reopened copy-on-write) onto the pre-image
// still gives the image, byte for byte.
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
  ExpectReplayEqualsImage(*tracker, 0);
  ExpectReplayEqualsImage(*tracker, 1);
}

// kill -9 with a cycle cut and not shipped, its blocks overwritten since: the cut reopens
// with its copy-on-write and reads as at the cut (what the shipper had sent of it is sent
// again the same); a cut file not renamed yet (".cut.tmp": the map still holds its bits)
// is deleted.
TEST_F(RecoveryTest, AnUnreleasedCutReadsTheSameAfterKill9) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 2);
  ASSERT_EQ(*tracker->Cut(), 1u);
  WriteBlocks(*tracker, 0, 5, 3);
  ASSERT_EQ(*tracker->Cut(), 2u);
  const std::vector<SealedSegment> before = tracker->SealedSegments();
  ASSERT_EQ(before.size(), 2u);
  auto read_all = [&](VmTracker& t, const SealedSegment& seg) {
    std::vector<std::byte> out;
    Result<std::unique_ptr<SegmentStream>> stream = t.OpenSegment(seg);
    EXPECT_TRUE(stream.ok()) << stream.status().ToString();
    if (!stream.ok()) return out;
    Result<std::vector<std::byte>> bytes = ReadSegment(**stream, 5000);
    EXPECT_TRUE(bytes.ok()) << bytes.status().ToString();
    return bytes.ok() ? std::move(*bytes) : out;
  };
  const std::vector<std::byte> cycle2 = read_all(*tracker, before[1]);
  EXPECT_EQ(cycle2.size(), before[1].bytes);
  // Overwritten after the cut: the copy-on-write keeps the cut's content.
  for (uint64_t b = 5; b < 8; ++b) {
    ASSERT_TRUE(
        WriteVia(tracker->observer(0), disks_[0].fd.get(), b * kBlock, Pattern(kBlock, 100 + b))
            .ok());
  }
  EXPECT_EQ(read_all(*tracker, before[1]), cycle2);
  Crash(tracker);
  const fs::path tmp = CutPath(disks_[0].log_dir, 3).string() + ".tmp";
  { std::ofstream(tmp) << "half a cut file"; }

  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_EQ(tracker->Stats().last_cycle, 2u);
  const std::vector<SealedSegment> after = tracker->SealedSegments();
  ASSERT_EQ(after.size(), 2u);
  EXPECT_EQ(after[1].number, before[1].number);
  EXPECT_EQ(after[1].first_seq, before[1].first_seq);
  EXPECT_EQ(after[1].last_seq, before[1].last_seq);
  EXPECT_EQ(read_all(*tracker, after[1]), cycle2) << "the same bytes as before the kill";
  EXPECT_EQ(tracker->Stats().disks[0].cow_bytes, 3 * kBlock);
  ASSERT_EQ(*tracker->Cut(), 3u);
  ASSERT_TRUE(tracker->Close().ok());
  std::vector<uint64_t> offsets;
  for (const Rec& r : RecordsOf(*tracker, 0)) {
    if (r.header.kind == RecordKind::kWrite) offsets.push_back(r.header.offset / kBlock);
  }
  EXPECT_EQ(offsets, (std::vector<uint64_t>{0, 5, 5})) << "cycle 1: 0-1, 2: 5-7, 3: 5-7";
  ExpectReplayEqualsImage(*tracker, 0);
}

// An older version's frozen set ("frozen.map", version 1: a cut it had not published
// before it stopped) goes back into the map, and so into the next cycle.
TEST_F(RecoveryTest, AnOlderVersionsFrozenSetGoesIntoTheNextCycle) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  WriteBlocks(*tracker, 0, 0, 2);
  ASSERT_EQ(*tracker->Cut(), 1u);
  WriteBlocks(*tracker, 0, 40, 1);
  Crash(tracker);
  const fs::path log = disks_[0].log_dir;
  {
    // Block 40 left the map at the older version's cut and is in its frozen set alone.
    Result<std::unique_ptr<DirtyBitmap>> map = DirtyBitmap::Open(log / kMapFileName, 1 << 20);
    ASSERT_TRUE(map.ok());
    std::vector<uint64_t> all;
    (*map)->TakeAll(&all);
    ASSERT_TRUE((*map)->Flush().ok());
  }
  std::vector<uint64_t> words(4, 0);
  words[0] = uint64_t{1} << 40;
  {
    // Version 1: magic, version, cycle, disk size, word count, CRC32C of the words, zeros.
    std::vector<std::byte> file(64 + words.size() * 8);
    auto put = [&](size_t at, uint64_t v, size_t n) { std::memcpy(file.data() + at, &v, n); };
    put(0, 0x5a465253, 4);
    put(4, 1, 4);
    put(8, 2, 8);
    put(16, 1 << 20, 8);
    put(24, words.size(), 8);
    put(32, Crc32c(words.data(), words.size() * 8), 4);
    std::memcpy(file.data() + 64, words.data(), words.size() * 8);
    std::ofstream(log / kFrozenFileName, std::ios::binary)
        .write(reinterpret_cast<const char*>(file.data()),
               static_cast<std::streamsize>(file.size()));
  }
  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  EXPECT_FALSE(fs::exists(log / kFrozenFileName));
  EXPECT_EQ(tracker->Stats().last_cycle, 1u);
  ASSERT_EQ(*tracker->Cut(), 2u);
  ASSERT_TRUE(tracker->Close().ok());
  std::vector<uint64_t> offsets;
  for (const Rec& r : RecordsOf(*tracker, 0)) {
    if (r.header.kind == RecordKind::kWrite) offsets.push_back(r.header.offset / kBlock);
  }
  EXPECT_EQ(offsets, (std::vector<uint64_t>{0, 40})) << "cycle 1: 0-1, cycle 2: 40";
  ExpectReplayEqualsImage(*tracker, 0);
}

// A cut that fails on one disk (here the failpoint after its cut file; ENOSPC for real)
// gives the cycle up on every disk: the cut files of the other disk are deleted, both keep
// their blocks, and the next cut makes the cycle again under the same number.
TEST_F(RecoveryTest, ACutThatFailsOnOneDiskRollsTheCycleBackOnAll) {
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
  ExpectReplayEqualsImage(*tracker, 0);
  ExpectReplayEqualsImage(*tracker, 1);
}

// A cycle cut on one disk but not the other (kill -9 between two disks' WriteCut) is
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
  // Disk b loses its cut of cycle 2, as if killed before its WriteCut: its blocks of
  // cycle 2 are still in its map.
  const std::vector<fs::path> b_cuts = FilesOf(1, ".cut");
  ASSERT_EQ(b_cuts.size(), 2u);
  fs::remove(b_cuts.back());
  fs::remove(fs::path(b_cuts.back()).replace_extension(".cow"));
  {
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
  ExpectReplayEqualsImage(*tracker, 0);
  ExpectReplayEqualsImage(*tracker, 1);
}

// --- Host power loss (activity_log.h) ---

// The boot id the trackers see, for a test that reboots the host.
class BootId {
 public:
  explicit BootId(const std::string& id) { ::setenv("SITEREP_BOOT_ID", id.c_str(), 1); }
  ~BootId() { ::unsetenv("SITEREP_BOOT_ID"); }
};

// What a host power loss may leave of a disk whose writes were never flushed: the image
// blocks reached the disk, the map's bits did not. At the next start (another boot id) the
// tracker finds the marker of a run that did not stop, and compares the extents of its
// activity log (the second 64 MiB extent here, where the writes were), the map and the
// unshipped cuts with the replica: the disk needs a resync of that extent, not more.
TEST_F(RecoveryTest, AHostCrashComparesTheActivityLogsExtents) {
  constexpr uint64_t kExtent = uint64_t{1} << ActivityLog::kExtentShift;
  AddDisk("a", kExtent + (1 << 20));
  std::unique_ptr<VmTracker> tracker;
  {
    BootId boot("boot-1");
    tracker = Open(Options());
    ASSERT_TRUE(tracker);
    WriteBlocks(*tracker, 0, kExtent / kBlock + 3, 2);
    EXPECT_EQ(tracker->Stats().disks[0].activity_log_writes, 2u) << "empty at open, then 1 miss";
    Crash(tracker);
  }
  // The power loss: the map's bits never reached the disk.
  fs::remove(disks_[0].log_dir / kMapFileName);
  ASSERT_TRUE(DirtyBitmap::Open(disks_[0].log_dir / kMapFileName, disks_[0].size).ok());
  BootId boot("boot-2");
  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const DiskStats st = tracker->Stats().disks[0];
  EXPECT_EQ(st.tracking, DiskTracking::kBitmap);
  EXPECT_TRUE(st.resync_required);
  EXPECT_NE(st.resync_reason.find("unclean host stop"), std::string::npos) << st.resync_reason;
  EXPECT_NE(st.resync_reason.find("1 extents of the activity log"), std::string::npos)
      << st.resync_reason;
  EXPECT_EQ(st.dirty_bytes, uint64_t{1} << 20) << "the second extent (1 MiB long) only";
}

// A clean stop, or a kill -9 on the same boot (the page cache kept everything), needs no
// repair; a host crash with the activity log unreadable compares every block.
TEST_F(RecoveryTest, OnlyAHostCrashNeedsARepair) {
  AddDisk("a", 1 << 20);
  {
    BootId boot("boot-1");
    auto tracker = Open(Options());
    ASSERT_TRUE(tracker);
    WriteBlocks(*tracker, 0, 0, 2);
    ASSERT_TRUE(tracker->Close().ok());
  }
  {
    BootId boot("boot-2");  // clean stop, then a reboot
    auto tracker = Open(Options());
    ASSERT_TRUE(tracker);
    EXPECT_EQ(tracker->Stats().disks[0].tracking, DiskTracking::kLog);
    WriteBlocks(*tracker, 0, 4, 2);
    Crash(tracker);  // a kill -9
    tracker = Open(Options());
    ASSERT_TRUE(tracker);
    EXPECT_EQ(tracker->Stats().disks[0].tracking, DiskTracking::kLog) << "same boot";
    EXPECT_FALSE(tracker->Stats().disks[0].resync_required);
    Crash(tracker);
  }
  {
    std::fstream f(disks_[0].log_dir / kActivityLogFileName,
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(33);
    f.put('\x7f');  // a byte of its CRC32C: a torn activity log
  }
  BootId boot("boot-3");
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const DiskStats st = tracker->Stats().disks[0];
  EXPECT_EQ(st.tracking, DiskTracking::kBitmap);
  EXPECT_NE(st.resync_reason.find("activity log is unreadable"), std::string::npos)
      << st.resync_reason;
  EXPECT_EQ(st.dirty_bytes, disks_[0].size);
}

// The log keeps at most kSlots extents after a trim, the most recently used ones, and
// makes the map durable before any leaves.
TEST(ActivityLogTest, TrimKeepsTheRecentExtentsAfterSyncingTheMap) {
  testing::TempDir dir;
  constexpr uint64_t kExtent = uint64_t{1} << ActivityLog::kExtentShift;
  const uint64_t size = 100 * kExtent;
  int syncs = 0;
  Result<std::unique_ptr<ActivityLog>> log = ActivityLog::Start(dir.path(), size, [&] {
    ++syncs;
    return Status::Ok();
  });
  ASSERT_TRUE(log.ok()) << log.status().ToString();
  for (uint64_t e = 0; e < 80; ++e) (*log)->Touch(e * kExtent + 5, 10);
  (*log)->Touch(3 * kExtent, 2 * kExtent);  // extents 3 and 4 again: no new write
  EXPECT_EQ((*log)->writes(), 81u);
  EXPECT_TRUE((*log)->over());
  (*log)->Trim();
  EXPECT_EQ(syncs, 1);
  EXPECT_FALSE((*log)->over());
  Result<ActivityLog::Previous> prev = ActivityLog::ReadPrevious(dir.path(), size);
  ASSERT_TRUE(prev.ok());
  EXPECT_TRUE(prev->unclean) << "running, so not stopped cleanly";
  EXPECT_FALSE(prev->host_crashed) << "same boot";
  ASSERT_TRUE(prev->extents);
  EXPECT_EQ(prev->extents->size(), ActivityLog::kSlots);
  ASSERT_TRUE((*log)->MarkClean().ok());
  prev = ActivityLog::ReadPrevious(dir.path(), size);
  ASSERT_TRUE(prev.ok());
  EXPECT_FALSE(prev->unclean);
}

}  // namespace
}  // namespace siterep::tracker
