// Tests of VmTracker's copy-on-write point-in-time snapshot (tracker/snapshot.h and the
// snapshot section of vm_tracker.h): content as of the cut under concurrent writes, the
// copied watermark, data ranges, the snapshot file's life, the cut's numbers, and the
// return of a bitmap-mode disk to the log with its resync state.
#include "tracker/snapshot.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <sys/resource.h>

#include <atomic>
#include <csignal>
#include <latch>
#include <ostream>
#include <random>
#include <thread>

#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/dirty_bitmap.h"
#include "tracker/disk_state.h"
#include "tracker/log_reader.h"
#include "tracker/replay.h"
#include "tracker/tracker_fixture.h"

namespace siterep::tracker {

void PrintTo(const ByteRange& r, std::ostream* os) {
  *os << "[" << r.offset << ", +" << r.length << ")";
}

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::DiscardVia;
using testing::Pattern;
using testing::ReadWhole;
using testing::WriteVia;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kBlock = 4096;                    // a dirty-bitmap block
constexpr uint64_t kSnapBlock = kSnapshotBlockSize;  // 64 KiB

std::vector<std::byte> Slice(const std::vector<std::byte>& v, uint64_t offset, uint64_t length) {
  return std::vector<std::byte>(v.begin() + static_cast<ptrdiff_t>(offset),
                                v.begin() + static_cast<ptrdiff_t>(offset + length));
}

// The first offset where a and b differ, or their size when equal (gtest would print
// megabytes otherwise).
size_t FirstDiff(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return i;
  }
  return a.size();
}

void Punch(int fd, uint64_t offset, uint64_t length) {
  ASSERT_EQ(::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                        static_cast<off_t>(length)),
            0)
      << std::strerror(errno);
}

class SnapshotTest : public testing::TrackerFixture {
 protected:
  std::vector<std::byte> ReadSnap(VmTracker& t, size_t disk, uint64_t offset, uint64_t length) {
    std::vector<std::byte> out(length);
    Status s = t.ReadSnapshot(disk, offset, out);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return out;
  }
  std::vector<std::byte> ReadSnapWhole(VmTracker& t, size_t disk) {
    return ReadSnap(t, disk, 0, disks_[disk].size);
  }
  Status Write(VmTracker& t, size_t disk, uint64_t offset, uint64_t length, uint64_t seed) {
    return WriteVia(t.observer(disk), disks_[disk].fd.get(), offset, Pattern(length, seed));
  }
  std::optional<DiskState> State(size_t disk) {
    Result<std::optional<DiskState>> st = LoadDiskState(disks_[disk].log_dir);
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    return st.ok() ? *st : std::nullopt;
  }
  // A change to a block frozen in an unreleased cut whose save to the copy-on-write fails:
  // the disk falls back to the bitmap with the cut's blocks and the map's.
  void FailCow(VmTracker& t, size_t disk, uint64_t offset) {
    ASSERT_TRUE(failpoint::Arm("tracker.cow_save=error*1").ok());
    ASSERT_TRUE(Write(t, disk, offset, kBlock, 7777).ok());
    ASSERT_EQ(t.Stats().disks[disk].tracking, DiskTracking::kBitmap);
  }
  // Disk 0 ("a", 4 MiB) falls back to the bitmap with every block dirty: every block is
  // written and cut in cycle 1, and a save to its copy-on-write fails; then blocks
  // 200-215 and 1000 are written. Disk 1 ("b") logs.
  void MakeBitmapDisk(VmTracker& t) {
    for (uint64_t b = 0; b < disks_[0].size / kBlock; b += 16) {
      ASSERT_TRUE(Write(t, 0, b * kBlock, 16 * kBlock, b).ok());
    }
    ASSERT_EQ(*t.Cut(), 1u);
    FailCow(t, 0, 0);
    for (uint64_t b = 200; b < 216; ++b) ASSERT_TRUE(Write(t, 0, b * kBlock, kBlock, b).ok());
    ASSERT_TRUE(Write(t, 0, 1000 * kBlock, kBlock, 1000).ok());
    ASSERT_TRUE(Write(t, 1, 0, kBlock, 1).ok());
    ASSERT_EQ(t.Stats().disks[0].tracking, DiskTracking::kBitmap);
    ASSERT_EQ(t.Stats().disks[0].dirty_bytes, disks_[0].size);
  }
  SealedSegment SealedOf(VmTracker& t, const std::string& disk, uint64_t cycle) {
    for (const SealedSegment& s : t.SealedSegments()) {
      if (s.disk == disk && s.cycle == cycle) return s;
    }
    ADD_FAILURE() << "no sealed segment of disk " << disk << " in cycle " << cycle;
    return SealedSegment{};
  }
};

// --------------------------------------------------------------------------------------
// Content

TEST_F(SnapshotTest, HoldsTheImageAtTheCutWhileThreadsWriteOn) {
  AddDisk("os", 8 * kMiB);
  AddDisk("data", 3 * kMiB + 5000);   // a short last block
  auto tracker = Open(Options(5ms));  // the cycle timer cuts meanwhile
  ASSERT_TRUE(tracker);
  const std::vector<std::byte> at_cut[2] = {ReadWhole(disks_[0].image), ReadWhole(disks_[1].image)};
  Result<SnapshotInfo> info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  ASSERT_TRUE(tracker->snapshot_active());

  constexpr int kThreads = 6;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> changes{0};
  std::latch started(kThreads + 1);
  std::vector<std::thread> writers;
  for (int t = 0; t < kThreads; ++t) {
    writers.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      started.arrive_and_wait();
      while (!stop) {
        const size_t d = rng() % 2;
        const uint64_t size = disks_[d].size;
        if (rng() % 8 == 0) {
          const uint64_t length = (1 + rng() % 32) * kBlock;
          const uint64_t offset = rng() % (size - length);
          ASSERT_TRUE(DiscardVia(tracker->observer(d), disks_[d].fd.get(), offset, length).ok());
        } else {
          const uint64_t length = 1 + rng() % (192 * kKiB);
          const uint64_t offset = rng() % (size - length + 1);
          ASSERT_TRUE(Write(*tracker, d, offset, length, rng()).ok());
        }
        ++changes;
      }
    });
  }
  started.arrive_and_wait();
  // Read while they write: random lengths, unaligned, front to back, then the same again.
  std::mt19937_64 rng(99);
  for (int pass = 0; pass < 3 && !HasFailure(); ++pass) {
    for (size_t d = 0; d < 2; ++d) {
      std::vector<std::byte> got(disks_[d].size);
      for (uint64_t at = 0; at < got.size();) {
        const uint64_t length = std::min<uint64_t>(got.size() - at, 1 + rng() % (700 * kKiB));
        Status s = tracker->ReadSnapshot(d, at, std::span(got).subspan(at, length));
        ASSERT_TRUE(s.ok()) << s.ToString();
        at += length;
      }
      EXPECT_EQ(FirstDiff(got, at_cut[d]), got.size()) << "disk " << d << ", pass " << pass;
    }
  }
  for (int i = 0; i < 20000 && changes < 2000; ++i) std::this_thread::sleep_for(1ms);
  stop = true;
  for (auto& w : writers) w.join();

  // Everything the writers did is in the images now, and the snapshot still reads the cut.
  for (size_t d = 0; d < 2; ++d) {
    ASSERT_NE(FirstDiff(ReadWhole(disks_[d].image), at_cut[d]), at_cut[d].size())
        << "the test needs changes after the cut";
    EXPECT_EQ(FirstDiff(ReadSnapWhole(*tracker, d), at_cut[d]), at_cut[d].size()) << d;
    EXPECT_GT(tracker->Stats().disks[d].snapshot_bytes, 0u);
    EXPECT_LE(tracker->Stats().disks[d].snapshot_bytes, disks_[d].size);
  }
  // The short last block: its 5000 bytes and nothing more.
  const uint64_t tail = 3 * kMiB;
  EXPECT_EQ(ReadSnap(*tracker, 1, tail, 5000), Slice(at_cut[1], tail, 5000));
  ASSERT_TRUE(tracker->EndSnapshot(true).ok());
}

// Writers run across the cut: the cut orders them, so the snapshot must equal the log
// replayed onto the pre-image through the snapshot's cycle, on both disks.
TEST_F(SnapshotTest, TheSnapshotIsTheCutOfTheLogEvenWithWritesInFlight) {
  AddDisk("os", 4 * kMiB);
  AddDisk("data", 2 * kMiB);
  auto tracker = Open(Options(3ms));
  ASSERT_TRUE(tracker);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> changes{0};
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      while (!stop) {
        const size_t d = rng() % 2;
        const uint64_t size = disks_[d].size;
        if (rng() % 6 == 0) {
          const uint64_t length = (1 + rng() % 16) * kBlock;
          const uint64_t offset = (rng() % ((size - length) / kBlock)) * kBlock;
          ASSERT_TRUE(DiscardVia(tracker->observer(d), disks_[d].fd.get(), offset, length).ok());
        } else {
          const uint64_t length = 1 + rng() % (96 * kKiB);
          ASSERT_TRUE(Write(*tracker, d, rng() % (size - length), length, rng()).ok());
        }
        ++changes;
      }
    });
  }
  for (int i = 0; i < 20000 && changes < 300; ++i) std::this_thread::sleep_for(1ms);
  Result<SnapshotInfo> info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const uint64_t at_start = changes;
  for (int i = 0; i < 20000 && changes < at_start + 1500; ++i) std::this_thread::sleep_for(1ms);
  std::vector<std::byte> snap[2];
  for (size_t d = 0; d < 2; ++d) snap[d] = ReadSnapWhole(*tracker, d);  // still writing
  stop = true;
  for (auto& w : writers) w.join();
  ASSERT_TRUE(tracker->Close().ok());
  EXPECT_FALSE(tracker->snapshot_active()) << "Close ends the snapshot";

  for (size_t d = 0; d < 2; ++d) {
    const fs::path expected = tmp_.path() / (disks_[d].name + ".at-cut");
    fs::copy_file(disks_[d].pre_image, expected);
    ReplayOptions o;
    o.through_cycle = info->cycle;
    Result<ReplayResult> r = ReplayLogToFile(LogOf(*tracker, d), expected, o);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->last_cycle, info->cycle);
    EXPECT_EQ(r->last_seq, info->disks[d].last_seq);
    const std::vector<std::byte> want = ReadWhole(expected);
    EXPECT_EQ(FirstDiff(snap[d], want), want.size()) << disks_[d].name;
    EXPECT_NE(FirstDiff(ReadWhole(disks_[d].image), want), want.size())
        << "the test needs changes after the cut";
  }
}

// Readers and first writes race for the same blocks: a read must never see a block half
// way between "not saved" and "changed" (ReadSnapshot holds the blocks' range locks).
TEST_F(SnapshotTest, ReadsAreOrderedAgainstTheSavesOfFirstWrites) {
  constexpr uint64_t kSize = 64 * kMiB;
  AddDisk("a", kSize);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const std::vector<std::byte> at_cut = ReadWhole(disks_[0].image);
  ASSERT_TRUE(tracker->StartSnapshot().ok());
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {  // first writes, all over the disk
      std::mt19937_64 rng(t);
      while (!stop) {
        ASSERT_TRUE(Write(*tracker, 0, (rng() % (kSize / kBlock)) * kBlock, kBlock, rng()).ok());
      }
    });
  }
  std::atomic<uint64_t> mismatches{0};
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {  // whole chunks, where many blocks are not saved yet
      std::mt19937_64 rng(10 + t);
      std::vector<std::byte> got(kMiB);
      while (!stop) {
        const uint64_t at = (rng() % (kSize / kMiB)) * kMiB;
        ASSERT_TRUE(tracker->ReadSnapshot(0, at, got).ok());
        if (FirstDiff(got, Slice(at_cut, at, kMiB)) != kMiB) ++mismatches;
      }
    });
  }
  for (int i = 0; i < 300 && tracker->Stats().disks[0].snapshot_bytes < kSize - 4 * kMiB; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  stop = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches, 0u);
  EXPECT_EQ(FirstDiff(ReadSnapWhole(*tracker, 0), at_cut), at_cut.size());
}

TEST_F(SnapshotTest, AReadWaitsForAChangeInFlightOnItsBlocks) {
  AddDisk("a", 4 * kMiB);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const std::vector<std::byte> at_cut = ReadWhole(disks_[0].image);
  ASSERT_TRUE(tracker->StartSnapshot().ok());
  std::latch applying(1);
  std::atomic<bool> release{false};
  const std::vector<std::byte> data = Pattern(kBlock, 1);
  std::thread writer([&] {
    Status s = tracker->observer(0).Write(kMiB + 100, data, [&]() -> Status {
      applying.count_down();
      while (!release) std::this_thread::sleep_for(1ms);
      return PWriteAll(disks_[0].fd.get(), data.data(), data.size(), kMiB + 100, "image");
    });
    EXPECT_TRUE(s.ok()) << s.ToString();
  });
  applying.wait();
  // Another chunk reads at once; the chunk of the change in flight waits for its apply.
  EXPECT_EQ(ReadSnap(*tracker, 0, 2 * kMiB, kSnapBlock), Slice(at_cut, 2 * kMiB, kSnapBlock));
  std::atomic<bool> read_done{false};
  std::vector<std::byte> got(2 * kSnapBlock);
  std::thread reader([&] {
    EXPECT_TRUE(tracker->ReadSnapshot(0, kMiB - kSnapBlock, got).ok());
    read_done = true;
  });
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(read_done) << "the read must wait for the change's range lock";
  release = true;
  writer.join();
  reader.join();
  EXPECT_EQ(got, Slice(at_cut, kMiB - kSnapBlock, 2 * kSnapBlock));
}

TEST_F(SnapshotTest, BlocksBelowTheCopiedWatermarkAreNotSaved) {
  AddDisk("a", 4 * kMiB);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const std::vector<std::byte> at_cut = ReadWhole(disks_[0].image);
  ASSERT_TRUE(tracker->StartSnapshot().ok());
  tracker->SnapshotCopied(0, kMiB + 100);           // the block at 1 MiB is only partly copied
  ASSERT_TRUE(Write(*tracker, 0, 0, 100, 1).ok());  // block 0: copied
  ASSERT_TRUE(Write(*tracker, 0, kMiB - 10, 20, 2).ok());         // blocks 15 and 16
  ASSERT_TRUE(Write(*tracker, 0, 2 * kMiB + 7, kBlock, 3).ok());  // block 32
  EXPECT_EQ(tracker->Stats().disks[0].snapshot_bytes, 2 * kSnapBlock) << "blocks 16 and 32";
  tracker->SnapshotCopied(0, 0);                            // never lowers it
  ASSERT_TRUE(Write(*tracker, 0, kSnapBlock, 10, 4).ok());  // block 1: copied
  EXPECT_EQ(tracker->Stats().disks[0].snapshot_bytes, 2 * kSnapBlock);
  // Above the watermark the snapshot holds the cut; below it the replica does, and the
  // snapshot reads the image as it is now.
  EXPECT_EQ(ReadSnap(*tracker, 0, kMiB, 3 * kMiB), Slice(at_cut, kMiB, 3 * kMiB));
  EXPECT_EQ(ReadSnap(*tracker, 0, 0, 100), Pattern(100, 1));
  ASSERT_TRUE(tracker->EndSnapshot(true).ok());
  EXPECT_EQ(tracker->Stats().disks[0].snapshot_bytes, 0u);
}

// --------------------------------------------------------------------------------------
// Data ranges

TEST_F(SnapshotTest, DataRangesSkipHolesAndKeepWhatWasDataAtTheCut) {
  AddDisk("a", 4 * kMiB);
  Punch(disks_[0].fd.get(), kMiB + kBlock, 2 * kMiB - 2 * kBlock);  // hole: [1M+4K, 3M-4K)
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const std::vector<std::byte> at_cut = ReadWhole(disks_[0].image);
  ASSERT_TRUE(tracker->StartSnapshot().ok());

  Result<std::vector<ByteRange>> ranges = tracker->SnapshotDataRanges(0, 0, 4 * kMiB);
  ASSERT_TRUE(ranges.ok()) << ranges.status().ToString();
  const std::vector<ByteRange> at_start = {{0, kMiB + kSnapBlock},
                                           {3 * kMiB - kSnapBlock, kMiB + kSnapBlock}};
  EXPECT_EQ(*ranges, at_start) << "widened to 64 KiB";

  // Discard everything: the data blocks are saved first (the holes cost no copy), so they
  // still count as data; a write into the hole is data now (it reads as zeros).
  ASSERT_TRUE(DiscardVia(tracker->observer(0), disks_[0].fd.get(), 0, 4 * kMiB).ok());
  EXPECT_EQ(tracker->Stats().disks[0].snapshot_bytes, 34 * kSnapBlock);
  ASSERT_TRUE(Write(*tracker, 0, 2 * kMiB + 100, 10, 5).ok());
  ranges = tracker->SnapshotDataRanges(0, 0, 4 * kMiB);
  ASSERT_TRUE(ranges.ok()) << ranges.status().ToString();
  const std::vector<ByteRange> after = {
      {0, kMiB + kSnapBlock}, {2 * kMiB, kSnapBlock}, {3 * kMiB - kSnapBlock, kMiB + kSnapBlock}};
  EXPECT_EQ(*ranges, after);
  EXPECT_EQ(FirstDiff(ReadSnapWhole(*tracker, 0), at_cut), at_cut.size());
  EXPECT_EQ(ReadSnap(*tracker, 0, 2 * kMiB, kSnapBlock), std::vector<std::byte>(kSnapBlock));

  // Clipped to [from, to).
  ranges = tracker->SnapshotDataRanges(0, 100, 2 * kMiB + 10);
  ASSERT_TRUE(ranges.ok());
  const std::vector<ByteRange> clipped = {{100, kMiB + kSnapBlock - 100}, {2 * kMiB, 10}};
  EXPECT_EQ(*ranges, clipped);
  ranges = tracker->SnapshotDataRanges(0, 2 * kMiB + kSnapBlock, 3 * kMiB - kSnapBlock);
  ASSERT_TRUE(ranges.ok());
  EXPECT_TRUE(ranges->empty());
  EXPECT_EQ(tracker->SnapshotDataRanges(0, 10, 5).status().code(), EINVAL);
  EXPECT_EQ(tracker->SnapshotDataRanges(0, 0, 4 * kMiB + 1).status().code(), EINVAL);
}

TEST_F(SnapshotTest, DataRangesEndAtTheDiskSize) {
  AddDisk("a", kMiB + 3000);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  ASSERT_TRUE(tracker->StartSnapshot().ok());
  Result<std::vector<ByteRange>> ranges = tracker->SnapshotDataRanges(0, 0, kMiB + 3000);
  ASSERT_TRUE(ranges.ok()) << ranges.status().ToString();
  EXPECT_EQ(*ranges, (std::vector<ByteRange>{{0, kMiB + 3000}}));
}

// --------------------------------------------------------------------------------------
// Life of a snapshot

TEST_F(SnapshotTest, TheSnapshotFileLivesAsLongAsTheSnapshot) {
  AddDisk("a", kMiB);
  AddDisk("b", kMiB);
  const fs::path file_a = tmp_.path() / "a.img.srsnap";
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  EXPECT_FALSE(tracker->snapshot_active());
  std::vector<std::byte> buf(10);
  EXPECT_EQ(tracker->ReadSnapshot(0, 0, buf).code(), EINVAL) << "no snapshot";

  Result<SnapshotInfo> info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_TRUE(tracker->snapshot_active());
  EXPECT_EQ(info->disks[0].snapshot_path, file_a);
  EXPECT_TRUE(fs::exists(file_a));
  EXPECT_EQ(fs::file_size(file_a), kMiB) << "sparse, as long as the disk";
  EXPECT_TRUE(fs::exists(tmp_.path() / "b.img.srsnap"));
  EXPECT_EQ(tracker->StartSnapshot().status().code(), EBUSY);
  EXPECT_TRUE(fs::exists(file_a)) << "the refused start leaves the active one alone";
  EXPECT_EQ(tracker->ReadSnapshot(0, kMiB - 5, buf).code(), EINVAL) << "past the end";
  EXPECT_EQ(tracker->ReadSnapshot(2, 0, buf).code(), EINVAL) << "no such disk";
  EXPECT_TRUE(tracker->ReadSnapshot(0, kMiB - 10, buf).ok());

  ASSERT_TRUE(tracker->EndSnapshot(true).ok());
  EXPECT_FALSE(tracker->snapshot_active());
  EXPECT_FALSE(fs::exists(file_a));
  EXPECT_FALSE(fs::exists(tmp_.path() / "b.img.srsnap"));
  EXPECT_EQ(tracker->ReadSnapshot(0, 0, buf).code(), EINVAL);
  EXPECT_TRUE(tracker->EndSnapshot(false).ok()) << "no-op without a snapshot";

  ASSERT_TRUE(tracker->StartSnapshot().ok()) << "a new one after the end";
  EXPECT_TRUE(fs::exists(file_a));
  ASSERT_TRUE(tracker->Close().ok());
  EXPECT_FALSE(tracker->snapshot_active());
  EXPECT_FALSE(fs::exists(file_a)) << "Close ends it";
  EXPECT_EQ(tracker->StartSnapshot().status().code(), ESHUTDOWN);
  EXPECT_FALSE(fs::exists(file_a));
  tracker.reset();

  // A file left by a crash is deleted at Open.
  { UniqueFd fd(::open(file_a.c_str(), O_WRONLY | O_CREAT, 0644)); }
  ASSERT_TRUE(fs::exists(file_a));
  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  EXPECT_FALSE(fs::exists(file_a));
  EXPECT_FALSE(tracker->snapshot_active());
}

// The saved bits and CRCs of a persistent copy-on-write are stored through a shared
// mapping; a store into a hole of a file on a full file system is SIGBUS, which killed
// the daemon under the enospc fault class. So Create allocates them: no hole from the end
// of the disk's bytes (rounded to 4 KiB) to the end of the file, while the disk's bytes
// stay a hole.
TEST_F(SnapshotTest, APersistentSnapshotAllocatesWhatItMaps) {
  AddDisk("a", kMiB + 512);
  const fs::path path = tmp_.path() / "a.cow";
  Result<std::unique_ptr<DiskSnapshot>> snap =
      DiskSnapshot::Create("a", disks_[0].fd.get(), disks_[0].size, path,
                           SnapshotOptions{.block_size = kBlock, .persistent = true});
  ASSERT_TRUE(snap.ok()) << snap.status().ToString();
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  const off_t end = static_cast<off_t>(fs::file_size(path));
  const off_t tail = static_cast<off_t>((disks_[0].size + 4095) / 4096 * 4096);
  ASSERT_GT(end, tail);
  EXPECT_EQ(::lseek(fd.get(), tail, SEEK_DATA), tail) << "the bits start allocated";
  EXPECT_EQ(::lseek(fd.get(), tail, SEEK_HOLE), end) << "and no hole follows them";
  EXPECT_EQ(::lseek(fd.get(), 0, SEEK_DATA), tail) << "the disk's bytes stay sparse";
  EXPECT_TRUE((*snap)->Remove().ok());
}

TEST_F(SnapshotTest, AFailedSaveFailsTheSnapshotNotTheGuest) {
  AddDisk("a", 4 * kMiB);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  ASSERT_TRUE(tracker->StartSnapshot().ok());

  // The snapshot file may not grow past 1 MiB (EFBIG, as ENOSPC would be) while the block
  // at 2 MiB is saved; the apply lifts the limit to write the image.
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old;
  small.rlim_cur = kMiB;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const std::vector<std::byte> data = Pattern(kBlock, 7);
  Status s = tracker->observer(0).Write(2 * kMiB, data, [&]() -> Status {
    if (::setrlimit(RLIMIT_FSIZE, &old) != 0) return Status::FromErrno(errno, "setrlimit");
    return PWriteAll(disks_[0].fd.get(), data.data(), data.size(), 2 * kMiB, "image");
  });
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(ReadWhole(disks_[0].image).at(2 * kMiB), data[0]);

  std::vector<std::byte> buf(kSnapBlock);
  EXPECT_EQ(tracker->ReadSnapshot(0, 0, buf).code(), EFBIG) << "any block: the copy restarts";
  EXPECT_EQ(tracker->SnapshotDataRanges(0, 0, kMiB).status().code(), EFBIG);
  EXPECT_TRUE(Write(*tracker, 0, 0, kBlock, 8).ok()) << "the guest goes on";
  EXPECT_TRUE(tracker->snapshot_active());
  ASSERT_TRUE(tracker->EndSnapshot(false).ok());

  ASSERT_TRUE(tracker->StartSnapshot().ok());
  EXPECT_TRUE(tracker->ReadSnapshot(0, 0, buf).ok());
  EXPECT_EQ(buf, Slice(ReadWhole(disks_[0].image), 0, kSnapBlock));
}

// --------------------------------------------------------------------------------------
// The cut

TEST_F(SnapshotTest, TheCutNamesTheSealedSegmentAndTheUnreleasedBlocks) {
  AddDisk("a", 4 * kMiB);
  AddDisk("b", 2 * kMiB);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  ASSERT_TRUE(Write(*tracker, 0, 100, 10, 1).ok());
  ASSERT_EQ(*tracker->Cut(), 1u);
  ASSERT_TRUE(Write(*tracker, 0, kMiB + 5, 70000, 2).ok());  // blocks 16 and 17

  Result<SnapshotInfo> info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->cycle, 2u);
  EXPECT_EQ(tracker->Stats().last_cycle, 2u);
  EXPECT_EQ(info->cut_unix_nanos, tracker->Stats().last_cut_unix_nanos);
  ASSERT_EQ(info->disks.size(), 2u);
  auto sealed_of = [&](const std::string& disk, uint64_t cycle) {
    return SealedOf(*tracker, disk, cycle);
  };
  for (size_t d = 0; d < 2; ++d) {
    const SnapshotDisk& sd = info->disks[d];
    const SealedSegment seg = sealed_of(disks_[d].name, 2);
    EXPECT_EQ(sd.name, disks_[d].name);
    EXPECT_EQ(sd.disk_id, DiskIdFor("vm1", disks_[d].name));
    EXPECT_EQ(sd.size, disks_[d].size);
    EXPECT_EQ(sd.last_seq, seg.last_seq);
    EXPECT_EQ(sd.last_segment, seg.number);
    EXPECT_EQ(sd.last_seq, tracker->Stats().disks[d].last_seq);
    EXPECT_FALSE(sd.resync);
    EXPECT_FALSE(sd.all_dirty);
  }
  EXPECT_EQ(info->disks[0].dirty,
            (std::vector<ByteRange>{{0, kSnapBlock}, {kMiB, 2 * kSnapBlock}}));
  EXPECT_TRUE(info->disks[1].dirty.empty());
  ASSERT_TRUE(tracker->EndSnapshot(true).ok());

  // Released cycles are on the replica: their blocks are not listed. Nothing changed
  // since cycle 2, and the snapshot cuts anyway.
  ASSERT_TRUE(tracker->ReleaseThrough(2).ok());
  info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->cycle, 3u);
  EXPECT_TRUE(info->disks[0].dirty.empty());
  EXPECT_EQ(info->disks[0].last_seq, sealed_of("a", 3).last_seq);
  ASSERT_TRUE(tracker->EndSnapshot(true).ok());

  ASSERT_TRUE(Write(*tracker, 1, 2 * kMiB - 1, 1, 3).ok());
  ASSERT_TRUE(Write(*tracker, 0, 0, 10, 4).ok());
  info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->cycle, 4u);
  EXPECT_EQ(info->disks[0].dirty, (std::vector<ByteRange>{{0, kSnapBlock}}));
  EXPECT_EQ(info->disks[1].dirty, (std::vector<ByteRange>{{2 * kMiB - kSnapBlock, kSnapBlock}}));

  // The log goes on after the cut: the next segment, the next seq.
  ASSERT_TRUE(Write(*tracker, 0, 0, 10, 5).ok());
  ASSERT_EQ(*tracker->Cut(), 5u);
  const SealedSegment next = sealed_of("a", 5);
  EXPECT_EQ(next.first_seq, info->disks[0].last_seq + 1);
  EXPECT_EQ(next.number, info->disks[0].last_segment + 1);
  ASSERT_TRUE(tracker->EndSnapshot(true).ok());
}

// --------------------------------------------------------------------------------------
// Resync of a disk that tracked with the bitmap

TEST_F(SnapshotTest, ABitmapDiskReturnsToTheLogAtTheCut) {
  AddDisk("a", 4 * kMiB);
  AddDisk("b", 4 * kMiB);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  MakeBitmapDisk(*tracker);
  const uint64_t last_seq = tracker->Stats().disks[0].last_seq;
  const std::vector<std::byte> at_cut = ReadWhole(disks_[0].image);

  Result<SnapshotInfo> info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const SnapshotDisk& a = info->disks[0];
  EXPECT_TRUE(a.resync);
  EXPECT_TRUE(a.all_dirty);
  EXPECT_TRUE(a.dirty.empty());
  EXPECT_EQ(a.last_seq, last_seq);
  EXPECT_EQ(a.last_segment, 1u) << "segment 1 held cycle 1, dropped by the fall back";
  EXPECT_FALSE(info->disks[1].resync);

  DiskStats stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kLog);
  EXPECT_TRUE(stats.resync_required);
  EXPECT_EQ(stats.resync_reason, "resynchronising");
  EXPECT_EQ(stats.dirty_bytes, 0u);
  std::optional<DiskState> state = State(0);
  ASSERT_TRUE(state);
  EXPECT_EQ(state->tracking, DiskTracking::kLog);
  EXPECT_TRUE(state->resync_required);
  EXPECT_EQ(state->reason, "resynchronising");
  EXPECT_EQ(state->last_seq, last_seq);
  EXPECT_FALSE(fs::exists(disks_[0].log_dir / kBitmapFileName));
  for (const auto& e : fs::directory_iterator(disks_[0].log_dir)) {
    EXPECT_NE(e.path().extension(), ".cut") << "its next cut is the next cycle's";
  }

  // It logs again, after the cut, numbers going on; the copy still reads the cut.
  ASSERT_TRUE(Write(*tracker, 0, 0, 3 * kBlock, 50).ok());
  ASSERT_EQ(*tracker->Cut(), info->cycle + 1);
  const SealedSegment next = SealedOf(*tracker, "a", info->cycle + 1);
  EXPECT_EQ(next.number, 2u);
  EXPECT_EQ(next.first_seq, last_seq + 1);
  for (const SealedSegment& s : tracker->SealedSegments()) {
    if (s.disk == "a") {
      EXPECT_EQ(s.number, 2u) << "the only sealed segment of a";
    }
  }
  EXPECT_EQ(FirstDiff(ReadSnapWhole(*tracker, 0), at_cut), at_cut.size());

  ASSERT_TRUE(tracker->EndSnapshot(true).ok());
  stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kLog);
  EXPECT_FALSE(stats.resync_required);
  EXPECT_EQ(stats.resync_reason, "");
  state = State(0);
  ASSERT_TRUE(state);
  EXPECT_FALSE(state->resync_required);
  ASSERT_TRUE(tracker->Close().ok());
  tracker.reset();

  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kLog);
  EXPECT_FALSE(stats.resync_required);
  EXPECT_EQ(stats.last_seq, last_seq + 2) << "a write and its cut since";
  info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(info->disks[0].resync);
  EXPECT_FALSE(info->disks[0].all_dirty);
}

TEST_F(SnapshotTest, AnInterruptedResyncLeavesTheDiskAllDirty) {
  AddDisk("a", 4 * kMiB);
  AddDisk("b", 4 * kMiB);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  MakeBitmapDisk(*tracker);
  ASSERT_TRUE(tracker->StartSnapshot().ok());

  // A crash now (a copy of the log folder, opened by a second tracker): the disk logs,
  // and the resync it was in has to start over with every block.
  const fs::path crashed = tmp_.path() / "crashed.srlog";
  testing::CopyTree(disks_[0].log_dir, crashed);
  fs::remove(crashed / "LOCK");
  {
    VmTrackerOptions o = Options();
    o.vm = "vm1";
    o.disks.resize(1);
    o.disks[0].log_dir = crashed;
    auto other = Open(o);
    ASSERT_TRUE(other);
    const DiskStats stats = other->Stats().disks[0];
    EXPECT_EQ(stats.tracking, DiskTracking::kLog);
    EXPECT_TRUE(stats.resync_required);
    EXPECT_EQ(stats.resync_reason, "resync interrupted");
    Result<SnapshotInfo> info = other->StartSnapshot();
    ASSERT_TRUE(info.ok());
    EXPECT_TRUE(info->disks[0].resync);
    EXPECT_TRUE(info->disks[0].all_dirty);
    ASSERT_TRUE(other->Close().ok());
  }

  ASSERT_TRUE(tracker->EndSnapshot(false).ok());
  DiskStats stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kLog);
  EXPECT_TRUE(stats.resync_required);
  EXPECT_EQ(stats.resync_reason, "resync interrupted");
  std::optional<DiskState> state = State(0);
  ASSERT_TRUE(state);
  EXPECT_TRUE(state->resync_required);
  EXPECT_EQ(state->reason, "resync interrupted");
  EXPECT_FALSE(tracker->Stats().disks[1].resync_required) << "b was not resynced";

  Result<SnapshotInfo> info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->disks[0].resync);
  EXPECT_TRUE(info->disks[0].all_dirty);
  EXPECT_TRUE(info->disks[0].dirty.empty());
  EXPECT_FALSE(info->disks[1].resync);
  ASSERT_TRUE(tracker->Close().ok());  // ends it, not completed
  tracker.reset();

  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  stats = tracker->Stats().disks[0];
  EXPECT_TRUE(stats.resync_required);
  EXPECT_EQ(stats.resync_reason, "resync interrupted");
  info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->disks[0].all_dirty);
  ASSERT_TRUE(tracker->EndSnapshot(true).ok());
  EXPECT_FALSE(tracker->Stats().disks[0].resync_required);
  ASSERT_TRUE(tracker->Close().ok());
  tracker.reset();
  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  EXPECT_FALSE(tracker->Stats().disks[0].resync_required);
}

TEST_F(SnapshotTest, AWhollyDirtyBitmapIsAllDirty) {
  AddDisk("a", 256 * kKiB);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  for (uint64_t b = 0; b < 64; ++b) ASSERT_TRUE(Write(*tracker, 0, b * kBlock, kBlock, b).ok());
  ASSERT_EQ(*tracker->Cut(), 1u);
  FailCow(*tracker, 0, 0);
  Result<SnapshotInfo> info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->disks[0].resync);
  EXPECT_TRUE(info->disks[0].all_dirty);
  EXPECT_TRUE(info->disks[0].dirty.empty());
}

// The copy-on-write does not care how the disk tracks: a fall back in the middle of a
// snapshot leaves the snapshot intact.
TEST_F(SnapshotTest, AFallBackDuringASnapshotKeepsTheSnapshot) {
  AddDisk("a", 4 * kMiB);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  ASSERT_TRUE(Write(*tracker, 0, 0, kBlock, 1).ok());  // frozen in the snapshot's cut
  const std::vector<std::byte> at_cut = ReadWhole(disks_[0].image);
  Result<SnapshotInfo> info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(info->disks[0].resync);
  FailCow(*tracker, 0, 0);
  for (uint64_t i = 0; i < 40; ++i) {
    // 96 KiB apart: 40 different 64 KiB blocks.
    ASSERT_TRUE(Write(*tracker, 0, i * 96 * kKiB + 1000, 2 * kBlock, i).ok());
  }
  EXPECT_EQ(tracker->Stats().disks[0].tracking, DiskTracking::kBitmap);
  EXPECT_EQ(tracker->Stats().disks[0].snapshot_bytes, 40 * kSnapBlock);
  EXPECT_EQ(FirstDiff(ReadSnapWhole(*tracker, 0), at_cut), at_cut.size());
  ASSERT_TRUE(tracker->EndSnapshot(true).ok());
  EXPECT_TRUE(tracker->Stats().disks[0].resync_required) << "the fall back after the cut stays";
}

// A disk being resynced falls back again: its bitmap has every block, so an unfinished
// resync loses nothing, and the next snapshot resyncs every block.
TEST_F(SnapshotTest, AFallBackDuringAResyncKeepsWhatItHadToSend) {
  AddDisk("a", 4 * kMiB);
  AddDisk("b", 4 * kMiB);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  MakeBitmapDisk(*tracker);
  Result<SnapshotInfo> info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok());
  ASSERT_TRUE(info->disks[0].all_dirty);
  for (uint64_t b = 500; b < 532; ++b) ASSERT_TRUE(Write(*tracker, 0, b * kBlock, kBlock, b).ok());
  ASSERT_EQ(*tracker->Cut(), info->cycle + 1);
  FailCow(*tracker, 0, 500 * kBlock);
  DiskStats stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kBitmap);
  EXPECT_NE(stats.resync_reason.find("failpoint tracker.cow_save"), std::string::npos)
      << stats.resync_reason;
  EXPECT_EQ(stats.dirty_bytes, disks_[0].size) << "the resync's blocks and the log's";
  ASSERT_TRUE(tracker->EndSnapshot(true).ok());
  EXPECT_TRUE(tracker->Stats().disks[0].resync_required);

  info = tracker->StartSnapshot();
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->disks[0].resync);
  EXPECT_TRUE(info->disks[0].all_dirty);
}

// --------------------------------------------------------------------------------------
// Helpers

TEST(SnapshotHelpers, ToBlockRangesWidensSortsMergesAndClips) {
  const uint64_t size = 10 * kSnapBlock + 100;
  EXPECT_EQ(ToBlockRanges({{3 * kSnapBlock + 5, 1},
                           {kSnapBlock - 1, 2},
                           {7 * kSnapBlock, kSnapBlock},
                           {6 * kSnapBlock, 10},
                           {10 * kSnapBlock + 50, 1000},
                           {size, 10},
                           {5, 0}},
                          size),
            (std::vector<ByteRange>{{0, 2 * kSnapBlock},
                                    {3 * kSnapBlock, kSnapBlock},
                                    {6 * kSnapBlock, 2 * kSnapBlock},
                                    {10 * kSnapBlock, 100}}));
  EXPECT_TRUE(ToBlockRanges({}, size).empty());
}

TEST(SnapshotHelpers, TheSnapshotFileSitsNextToTheImage) {
  EXPECT_EQ(SnapshotPathFor("/var/lib/images/web01-os.img.srlog"),
            fs::path("/var/lib/images/web01-os.img.srsnap"));
  EXPECT_EQ(SnapshotPathFor("/var/lib/images/web01-os.img.srlog/"),
            fs::path("/var/lib/images/web01-os.img.srsnap"));
  EXPECT_EQ(SnapshotPathFor("/logs/os"), fs::path("/logs/os.srsnap"));
}

}  // namespace
}  // namespace siterep::tracker
