#include "tracker/vm_tracker.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fstream>
#include <latch>
#include <map>
#include <mutex>
#include <random>
#include <span>
#include <thread>

#include "common/failpoint.h"
#include "common/file_util.h"
#include "common/time_util.h"
#include "tracker/dirty_bitmap.h"
#include "tracker/disk_log.h"
#include "tracker/disk_state.h"
#include "tracker/log_reader.h"
#include "tracker/prefix_check.h"
#include "tracker/tracker_fixture.h"

namespace siterep::tracker {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::DiscardVia;
using testing::Pattern;
using testing::ReadLog;
using testing::Rec;
using testing::WriteVia;

constexpr uint64_t kBlock = 4096;

class VmTrackerTest : public testing::TrackerFixture {};

TEST_F(VmTrackerTest, ConcurrentWritesAndDiscardsReplayToTheImage) {
  AddDisk("os", 8 << 20);
  AddDisk("data", 4 << 20);
  auto tracker = Open(Options(5ms));  // the cycle timer cuts while the threads write
  ASSERT_TRUE(tracker);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < 150; ++i) {
        const size_t d = rng() % 2;
        const uint64_t size = disks_[d].size;
        WriteObserver& obs = tracker->observer(d);
        if (rng() % 8 == 0) {
          const uint64_t length = (1 + rng() % 16) * kBlock;
          const uint64_t offset = (rng() % (size / kBlock - 16)) * kBlock;
          ASSERT_TRUE(DiscardVia(obs, disks_[d].fd.get(), offset, length).ok());
        } else {
          const size_t length = 1 + rng() % (128 << 10);  // unaligned sizes and offsets
          const uint64_t offset = rng() % (size - length);
          const std::vector<std::byte> data = Pattern(length, rng());
          ASSERT_TRUE(WriteVia(obs, disks_[d].fd.get(), offset, data).ok());
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_TRUE(tracker->Close().ok());
  EXPECT_GT(tracker->Stats().last_cycle, 1u);
  ExpectReplayEqualsImage(*tracker, 0);
  ExpectReplayEqualsImage(*tracker, 1);
}

// Overlapping writes race for the same blocks; after every round the image must equal the
// replay of the log, i.e. the writes reached the image in log order.
TEST_F(VmTrackerTest, OverlappingConcurrentWritesAreShippedAsTheImageAtTheCut) {
  AddDisk("os", 64 << 10);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  constexpr int kThreads = 6;
  for (int round = 0; round < 30 && !HasFailure(); ++round) {
    std::latch start(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(round * 100 + t);
        start.arrive_and_wait();
        for (int i = 0; i < 10; ++i) {
          // Three blocks, written by everyone, with ranges that overlap partially.
          const uint64_t offset = (rng() % 3) * kBlock + rng() % 512;
          const std::vector<std::byte> data = Pattern(kBlock + rng() % kBlock, rng());
          ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), offset, data).ok());
        }
      });
    }
    for (auto& t : threads) t.join();
    // The cycles replay to the image as it was at the last cut (now).
    ASSERT_TRUE(tracker->Cut().ok());
    ExpectReplayEqualsImage(*tracker, 0);
  }
  ASSERT_TRUE(tracker->Close().ok());
}

TEST_F(VmTrackerTest, WritesLargerThanARecordAreSplit) {
  AddDisk("os", 4 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const std::vector<std::byte> data = Pattern((5 << 20) / 2, 1);
  ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), 100, data).ok());
  ASSERT_TRUE(tracker->Close().ok());
  std::vector<Rec> recs = RecordsOf(*tracker, 0);
  // Whole 4 KiB blocks: [0, 2.5 MiB + 100) rounded up, as 1 MiB + 1 MiB + the rest, then
  // the cut of Close.
  ASSERT_EQ(recs.size(), 4u);
  EXPECT_EQ(recs[0].header.offset, 0u);
  EXPECT_EQ(recs[0].header.length, 1u << 20);
  EXPECT_EQ(recs[1].header.offset, 1u << 20);
  EXPECT_EQ(recs[2].header.length, (1u << 19) + kBlock);
  EXPECT_EQ(recs[3].header.kind, RecordKind::kCut);
  ExpectReplayEqualsImage(*tracker, 0);
}

TEST_F(VmTrackerTest, RecordsCarryDiskIdEpochAndContiguousSequenceNumbers) {
  AddDisk("os", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  for (int i = 0; i < 5; ++i) {  // blocks 0, 2, 4, 6, 8: one record each
    ASSERT_TRUE(
        WriteVia(tracker->observer(0), disks_[0].fd.get(), 2 * i * kBlock, Pattern(10, i)).ok());
  }
  ASSERT_TRUE(tracker->Cut().ok());
  EXPECT_EQ(tracker->Stats().disks[0].last_seq, 6u);
  ASSERT_TRUE(tracker->Close().ok());
  std::vector<Rec> recs = RecordsOf(*tracker, 0);
  ASSERT_EQ(recs.size(), 6u);
  for (size_t i = 0; i < recs.size(); ++i) {
    EXPECT_EQ(recs[i].header.seq, i + 1);
    EXPECT_EQ(recs[i].header.disk_id, DiskIdFor("vm1", "os"));
    EXPECT_EQ(recs[i].header.epoch, 3u);
  }
}

// Threads write a counter to disk A, and once that returned, to disk B, while cuts run;
// each thread has blocks of its own, so the writes to a block are in counter order. A cut
// is one instant across both disks, so at every cut each block of A holds a counter at
// least as new as the same block of B.
TEST_F(VmTrackerTest, CutsAreOneInstantAcrossDisks) {
  AddDisk("a", 1 << 20);
  AddDisk("b", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  std::atomic<uint64_t> counter{0};
  std::atomic<bool> stop{false};
  // Writers keep pace with the cutter (100 writes per cut at most; sealing speed varies
  // with the machine's load), so that cuts fall among the writes.
  std::atomic<uint64_t> cuts{0};
  std::atomic<bool> cutter_done{false};
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      std::vector<std::byte> block(kBlock);
      for (;;) {
        const uint64_t c = ++counter;
        if (c > 3000) break;
        while (c > (cuts + 1) * 100 && !cutter_done) std::this_thread::sleep_for(50us);
        std::memcpy(block.data(), &c, sizeof(c));
        const uint64_t offset = ((c % 64) * 4 + t) * kBlock;
        ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), offset, block).ok());
        ASSERT_TRUE(WriteVia(tracker->observer(1), disks_[1].fd.get(), offset, block).ok());
      }
    });
  }
  std::thread cutter([&] {
    struct Done {
      std::atomic<bool>& done;
      ~Done() { done = true; }
    } done{cutter_done};
    while (!stop) {
      ASSERT_TRUE(tracker->Cut().ok());
      ++cuts;
      std::this_thread::sleep_for(200us);
    }
  });
  for (auto& t : writers) t.join();
  stop = true;
  cutter.join();
  ASSERT_TRUE(tracker->Close().ok());

  // Each disk's blocks as of every cut: (cycle, cut time) and the 256 counters.
  struct AtCut {
    uint64_t cycle;
    int64_t nanos;
    std::vector<uint64_t> counters;
  };
  auto states_of = [&](size_t disk) {
    std::vector<AtCut> out;
    std::vector<uint64_t> blocks(256, 0);
    for (const Rec& r : RecordsOf(*tracker, disk)) {
      if (r.header.kind == RecordKind::kCut) {
        const CutPayload cut = DecodeCutPayload(std::span(r.payload).first<kCutPayloadSize>());
        out.push_back(AtCut{cut.cycle, cut.unix_nanos, blocks});
      } else if (r.header.kind == RecordKind::kWrite) {
        for (uint64_t k = 0; k < r.header.length / kBlock; ++k) {
          uint64_t c;
          std::memcpy(&c, r.payload.data() + k * kBlock, sizeof(c));
          blocks.at(r.header.offset / kBlock + k) = c;
        }
      }
    }
    return out;
  };
  const std::vector<AtCut> a = states_of(0);
  const std::vector<AtCut> b = states_of(1);
  ASSERT_EQ(a.size(), b.size()) << "every cut is in both logs";
  EXPECT_GT(a.size(), 5u) << "the test needs cuts during the writes";
  int violations = 0;
  for (size_t k = 0; k < a.size(); ++k) {
    EXPECT_EQ(a[k].cycle, b[k].cycle);
    EXPECT_EQ(a[k].nanos, b[k].nanos);
    for (size_t blk = 0; blk < 256; ++blk) {
      if (a[k].counters[blk] < b[k].counters[blk]) ++violations;
    }
  }
  EXPECT_EQ(violations, 0);
  // Close cut the last writes: the last state holds the highest counter of each block.
  EXPECT_EQ(*std::max_element(a.back().counters.begin(), a.back().counters.end()), 3000u);
  ExpectReplayEqualsImage(*tracker, 0);
  ExpectReplayEqualsImage(*tracker, 1);
}

TEST_F(VmTrackerTest, CutSealsSegmentsAndSkipsWhenNothingChanged) {
  AddDisk("a", 1 << 20);
  AddDisk("b", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  std::vector<uint64_t> sealed_cycles;
  std::mutex mu;
  tracker->SetSealedCallback([&](uint64_t cycle) {
    std::lock_guard lk(mu);
    sealed_cycles.push_back(cycle);
  });
  Result<uint64_t> none = tracker->Cut();
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, 0u) << "no change: no cut";

  ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), 0, Pattern(100, 1)).ok());
  Result<uint64_t> first = tracker->Cut();
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, 1u);
  EXPECT_EQ(*tracker->Cut(), 1u) << "nothing since cycle 1";

  std::vector<SealedSegment> sealed = tracker->SealedSegments();
  ASSERT_EQ(sealed.size(), 2u) << "the cut seals every disk, even one without changes";
  EXPECT_EQ(sealed[0].disk, "a");
  EXPECT_EQ(sealed[1].disk, "b");
  EXPECT_EQ(sealed[0].cycle, 1u);
  EXPECT_EQ(sealed[0].first_seq, 1u);
  EXPECT_EQ(sealed[0].last_seq, 2u);
  EXPECT_EQ(sealed[1].first_seq, 1u);
  EXPECT_EQ(sealed[1].last_seq, 1u);
  EXPECT_EQ(sealed[0].bytes, 2 * kHeaderSize + kBlock + kCutPayloadSize);
  EXPECT_EQ(sealed[1].bytes, kHeaderSize + kCutPayloadSize);
  EXPECT_TRUE(fs::exists(CutPath(disks_[0].log_dir, 1)));
  EXPECT_TRUE(fs::exists(CowPath(disks_[0].log_dir, 1)));
  EXPECT_TRUE(fs::exists(CutPath(disks_[1].log_dir, 1)));
  EXPECT_FALSE(fs::exists(CowPath(disks_[1].log_dir, 1))) << "nothing frozen: no copy-on-write";
  const VmStats stats = tracker->Stats();
  EXPECT_EQ(stats.last_cycle, 1u);
  EXPECT_GT(stats.last_cut_unix_nanos, 0);
  EXPECT_EQ(stats.disks[0].last_cut_unix_nanos, stats.last_cut_unix_nanos);
  std::lock_guard lk(mu);
  EXPECT_EQ(sealed_cycles, std::vector<uint64_t>{1});
}

TEST_F(VmTrackerTest, TheCycleTimerCutsOnlyWhenSomethingChanged) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options(20ms));
  ASSERT_TRUE(tracker);
  std::atomic<uint64_t> sealed{0};
  tracker->SetSealedCallback([&](uint64_t cycle) { sealed = cycle; });
  ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), 0, Pattern(100, 1)).ok());
  for (int i = 0; i < 200 && sealed == 0; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(sealed, 1u);
  std::this_thread::sleep_for(150ms);
  EXPECT_EQ(tracker->Stats().last_cycle, 1u) << "idle cycles are not cut";
}

TEST_F(VmTrackerTest, ManyConcurrentFlushesShareSyncs) {
  AddDisk("a", 4 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  constexpr int kThreads = 16;
  constexpr int kRounds = 20;
  std::barrier round(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kRounds; ++i) {
        const uint64_t block = t * kRounds + i;
        Status s = WriteVia(tracker->observer(0), disks_[0].fd.get(), block * kBlock,
                            Pattern(kBlock, block));
        EXPECT_TRUE(s.ok()) << s.ToString();
        round.arrive_and_wait();  // then all flush at once
        s = tracker->observer(0).Flush();
        EXPECT_TRUE(s.ok()) << s.ToString();
      }
    });
  }
  for (auto& t : threads) t.join();
  const uint64_t syncs = tracker->Stats().disks[0].flush_syncs;
  EXPECT_GT(syncs, 0u);
  EXPECT_LT(syncs, static_cast<uint64_t>(kThreads * kRounds) / 2);
  std::printf("%d Flush calls, %llu syncs\n", kThreads * kRounds,
              static_cast<unsigned long long>(syncs));
}

TEST_F(VmTrackerTest, ReleaseThroughDeletesSegmentsAndLowersUnshippedBytes) {
  AddDisk("a", 1 << 20);
  AddDisk("b", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  auto write = [&](size_t d, uint64_t seed) {
    ASSERT_TRUE(
        WriteVia(tracker->observer(d), disks_[d].fd.get(), seed * kBlock, Pattern(kBlock, seed))
            .ok());
  };
  write(0, 1);
  write(1, 2);
  ASSERT_EQ(*tracker->Cut(), 1u);
  write(0, 3);
  ASSERT_EQ(*tracker->Cut(), 2u);
  write(1, 4);  // stays in b's open segment

  std::vector<SealedSegment> sealed = tracker->SealedSegments();
  ASSERT_EQ(sealed.size(), 4u);
  EXPECT_EQ(sealed[0].cycle, 1u);
  EXPECT_EQ(sealed[1].cycle, 1u);
  EXPECT_EQ(sealed[2].cycle, 2u);
  EXPECT_EQ(sealed[3].cycle, 2u);
  const uint64_t unshipped_a = tracker->Stats().disks[0].unshipped_bytes;
  const uint64_t unshipped_b = tracker->Stats().disks[1].unshipped_bytes;
  EXPECT_EQ(unshipped_a, sealed[0].bytes + sealed[2].bytes);
  EXPECT_EQ(unshipped_b, sealed[1].bytes + sealed[3].bytes + kBlock);

  ASSERT_TRUE(tracker->ReleaseThrough(1).ok());
  EXPECT_FALSE(fs::exists(CutPath(disks_[0].log_dir, sealed[0].number)));
  EXPECT_FALSE(fs::exists(CutPath(disks_[1].log_dir, sealed[1].number)));
  EXPECT_TRUE(fs::exists(CutPath(disks_[0].log_dir, sealed[2].number)));
  EXPECT_EQ(tracker->Stats().disks[0].unshipped_bytes, unshipped_a - sealed[0].bytes);
  EXPECT_EQ(tracker->Stats().disks[1].unshipped_bytes, unshipped_b - sealed[1].bytes);
  ASSERT_EQ(tracker->SealedSegments().size(), 2u);

  ASSERT_TRUE(tracker->ReleaseThrough(2).ok());
  EXPECT_TRUE(tracker->SealedSegments().empty());
  EXPECT_EQ(tracker->Stats().disks[0].unshipped_bytes, 0u);
  EXPECT_EQ(tracker->Stats().disks[1].unshipped_bytes, kBlock);
  ASSERT_TRUE(tracker->Close().ok());  // cuts cycle 3
  ASSERT_TRUE(tracker->ReleaseThrough(3).ok());
  const uint64_t last_seq_a = tracker->Stats().disks[0].last_seq;
  tracker.reset();

  // Nothing is left that carries the numbers but state.json: they still go on.
  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  EXPECT_EQ(tracker->Stats().last_cycle, 3u);
  write(0, 5);
  EXPECT_EQ(*tracker->Cut(), 4u);
  ASSERT_TRUE(tracker->Close().ok());
  const std::vector<SealedSegment> left = tracker->SealedSegments();
  ASSERT_FALSE(left.empty());
  EXPECT_EQ(left.front().first_seq, last_seq_a + 1);
  std::vector<Rec> recs = RecordsOf(*tracker, 0);
  ASSERT_FALSE(recs.empty());
  EXPECT_EQ(recs.back().header.seq, left.front().last_seq);
}

// cow_limit bounds what a disk's copy-on-writes hold together: released cuts give their
// bytes back, a restart counts the reopened ones, and the save that would pass the bound
// fails as a save without space does (the disk falls back to a resync of its cuts' blocks
// and the map's, with a reason naming cow_limit); the guest never sees it.
TEST_F(VmTrackerTest, TheCopyOnWriteLimitBoundsWhatADiskHolds) {
  AddDisk("a", 1 << 20);
  VmTrackerOptions o = Options();
  o.cow_limit = 4 * kBlock;
  auto tracker = Open(o);
  ASSERT_TRUE(tracker);
  auto write = [&](uint64_t block, uint64_t count, uint64_t seed) {
    ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), block * kBlock,
                         Pattern(count * kBlock, seed))
                    .ok());
  };
  write(0, 8, 1);
  ASSERT_EQ(*tracker->Cut(), 1u);
  for (uint64_t b = 0; b < 3; ++b) write(b, 1, 100 + b);
  EXPECT_EQ(tracker->Stats().disks[0].cow_bytes, 3 * kBlock);

  // Released, cycle 1's copy-on-write gives its 3 blocks back (when the next cut drops it).
  ASSERT_TRUE(tracker->ReleaseThrough(1).ok());
  write(8, 8, 2);
  ASSERT_EQ(*tracker->Cut(), 2u);  // frozen: blocks 0-2 and 8-15
  for (uint64_t b = 8; b < 12; ++b) write(b, 1, 200 + b);
  DiskStats a = tracker->Stats().disks[0];
  EXPECT_EQ(a.tracking, DiskTracking::kLog) << a.resync_reason;
  EXPECT_EQ(a.cow_bytes, 4 * kBlock) << "exactly the limit";

  // A restart counts what the reopened copy-on-write holds.
  ASSERT_TRUE(tracker->Close().ok());
  tracker.reset();
  tracker = Open(o);
  ASSERT_TRUE(tracker);
  EXPECT_EQ(tracker->Stats().disks[0].cow_bytes, 4 * kBlock);
  write(12, 1, 212);  // one block more than the limit
  a = tracker->Stats().disks[0];
  EXPECT_EQ(a.tracking, DiskTracking::kBitmap);
  EXPECT_TRUE(a.resync_required);
  EXPECT_NE(a.resync_reason.find("cow_limit of 16384 bytes"), std::string::npos) << a.resync_reason;
  EXPECT_EQ(a.dirty_bytes, 11 * kBlock) << "cycle 2's blocks and the map's (8-12), no more";
}

// A save to a cut's copy-on-write that fails (here a failpoint; ENOSPC or EIO for real):
// the cut can no longer be read, so its disk drops the log for the bitmap with the cut's
// blocks and the map's, resync required with the reason; the guest's write succeeds and
// the other disk logs on.
TEST_F(VmTrackerTest, AFailedCopyOnWriteFallsBackToTheBitmap) {
  AddDisk("a", 1 << 20);
  AddDisk("b", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  for (uint64_t c = 1; c <= 2; ++c) {
    for (size_t d = 0; d < 2; ++d) {
      ASSERT_TRUE(WriteVia(tracker->observer(d), disks_[d].fd.get(), c * kBlock,
                           Pattern(kBlock, 10 * c + d))
                      .ok());
    }
    ASSERT_EQ(*tracker->Cut(), c);
  }
  std::vector<SealedSegment> sealed = tracker->SealedSegments();
  ASSERT_EQ(sealed.size(), 4u);
  ASSERT_TRUE(tracker->ReleaseThrough(1).ok());
  ASSERT_EQ(sealed[2].disk, "a");
  Result<std::unique_ptr<SegmentStream>> reader = tracker->OpenSegment(sealed[2]);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();

  ASSERT_TRUE(failpoint::Arm("tracker.cow_save=error*1").ok());
  ASSERT_TRUE(
      WriteVia(tracker->observer(0), disks_[0].fd.get(), 2 * kBlock, Pattern(kBlock, 99)).ok())
      << "the guest never sees the copy-on-write fail";
  DiskStats a = tracker->Stats().disks[0];
  EXPECT_EQ(a.tracking, DiskTracking::kBitmap);
  EXPECT_TRUE(a.resync_required);
  EXPECT_NE(a.resync_reason.find("failpoint tracker.cow_save"), std::string::npos)
      << a.resync_reason;
  EXPECT_EQ(a.dirty_bytes, kBlock) << "block 2: frozen in cycle 2, and written since";
  EXPECT_EQ(a.unshipped_bytes, 0u);
  for (const auto& e : fs::directory_iterator(disks_[0].log_dir)) {
    EXPECT_NE(e.path().extension(), ".cut") << e.path();
    EXPECT_NE(e.path().extension(), ".cow") << e.path();
  }
  // A reader of the dropped cut fails instead of returning content no longer protected.
  Status read;
  while (read.ok() && !(*reader)->done()) read = (*reader)->Next(1 << 20).status();
  EXPECT_FALSE(read.ok());
  EXPECT_NE(read.message().find("failpoint tracker.cow_save"), std::string::npos)
      << read.ToString();
  const DiskStats b = tracker->Stats().disks[1];
  EXPECT_EQ(b.tracking, DiskTracking::kLog);
  EXPECT_FALSE(b.resync_required);
  sealed = tracker->SealedSegments();
  ASSERT_EQ(sealed.size(), 1u);
  EXPECT_EQ(sealed[0].disk, "b");
  EXPECT_EQ(sealed[0].cycle, 2u);
  ASSERT_TRUE(tracker->Close().ok());
  tracker.reset();

  // The resync it needs survives a restart.
  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  a = tracker->Stats().disks[0];
  EXPECT_EQ(a.tracking, DiskTracking::kBitmap);
  EXPECT_TRUE(a.resync_required);
  EXPECT_NE(a.resync_reason.find("failpoint tracker.cow_save"), std::string::npos)
      << a.resync_reason;
  EXPECT_EQ(a.dirty_bytes, kBlock);
}

// A saved block of a cut damaged at rest (a byte of the copy-on-write file flipped, in the
// block or in its CRC32C): reading the cut for shipping finds it, names the block, and the
// disk falls back to the bitmap with the cut's blocks, so no wrong block is shipped.
TEST_F(VmTrackerTest, ADamagedCopyOnWriteBlockIsFoundWhenTheCutIsRead) {
  for (const bool in_crc : {false, true}) {
    SCOPED_TRACE(in_crc ? "a byte of its CRC32C" : "a byte of the block");
    disks_.clear();
    AddDisk(in_crc ? "c" : "b", 1 << 20);
    auto tracker = Open(Options());
    ASSERT_TRUE(tracker);
    for (uint64_t b = 0; b < 8; ++b) {
      ASSERT_TRUE(
          WriteVia(tracker->observer(0), disks_[0].fd.get(), b * kBlock, Pattern(kBlock, b)).ok());
    }
    ASSERT_EQ(*tracker->Cut(), 1u);
    // Block 5 is overwritten: its content at the cut goes to the copy-on-write.
    ASSERT_TRUE(
        WriteVia(tracker->observer(0), disks_[0].fd.get(), 5 * kBlock, Pattern(kBlock, 50)).ok());
    const SealedSegment seg = tracker->SealedSegments().at(0);
    const fs::path cow = CowPath(disks_[0].log_dir, seg.number);
    {
      // The CRCs follow the bits (one page: 4 words), each block's at 4 * block.
      const uint64_t at = in_crc ? (1 << 20) + 4096 + 4 * 5 + 1 : 5 * kBlock + 100;
      std::fstream f(cow, std::ios::in | std::ios::out | std::ios::binary);
      f.seekg(static_cast<std::streamoff>(at));
      const char old = static_cast<char>(f.get());
      f.seekp(static_cast<std::streamoff>(at));
      f.put(static_cast<char>(old ^ 0x21));
    }
    Result<std::unique_ptr<SegmentStream>> stream = tracker->OpenSegment(seg);
    ASSERT_TRUE(stream.ok()) << stream.status().ToString();
    Status read;
    while (read.ok() && !(*stream)->done()) read = (*stream)->Next(1 << 20).status();
    EXPECT_EQ(read.code(), EBADMSG) << read.ToString();
    EXPECT_NE(read.message().find("damaged copy-on-write block 5 of " + cow.string()),
              std::string::npos)
        << read.message();
    // The next change finishes the fall back.
    ASSERT_TRUE(
        WriteVia(tracker->observer(0), disks_[0].fd.get(), 20 * kBlock, Pattern(kBlock, 9)).ok());
    const DiskStats st = tracker->Stats().disks[0];
    EXPECT_EQ(st.tracking, DiskTracking::kBitmap);
    EXPECT_NE(st.resync_reason.find("damaged copy-on-write block 5"), std::string::npos)
        << st.resync_reason;
    EXPECT_EQ(st.dirty_bytes, 9 * kBlock) << "the cut's 8 blocks and block 20";
    EXPECT_TRUE(tracker->SealedSegments().empty());
    ASSERT_TRUE(tracker->Close().ok());
  }
}

// A failed image write returns its error to the guest; its blocks stay marked, so the next
// cycle ships whatever the image holds there (no resync needed).
TEST_F(VmTrackerTest, AFailedApplyReturnsTheErrorAndKeepsTheBlocksMarked) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const std::vector<std::byte> data = Pattern(kBlock, 1);
  Status s = tracker->observer(0).Write(3 * kBlock, data,
                                        [] { return Status::Error(EIO, "disk on fire"); });
  EXPECT_EQ(s.code(), EIO);
  const DiskStats stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kLog);
  EXPECT_FALSE(stats.resync_required);
  EXPECT_EQ(stats.unshipped_bytes, kBlock);
  ASSERT_EQ(*tracker->Cut(), 1u);
  ASSERT_TRUE(tracker->Close().ok());
  ExpectReplayEqualsImage(*tracker, 0);
}

TEST_F(VmTrackerTest, ChangesPastTheEndAreRefusedWithoutApplying) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  bool applied = false;
  const std::vector<std::byte> data = Pattern(100, 1);
  Status s = tracker->observer(0).Write((1 << 20) - 10, data, [&] {
    applied = true;
    return Status::Ok();
  });
  EXPECT_EQ(s.code(), EINVAL);
  s = tracker->observer(0).Discard(1 << 20, 1, [&] {
    applied = true;
    return Status::Ok();
  });
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_FALSE(applied);
  EXPECT_EQ(tracker->Stats().disks[0].last_seq, 0u);
}

TEST_F(VmTrackerTest, CloseSealsAndRefusesLaterChanges) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), 0, Pattern(100, 1)).ok());
  ASSERT_TRUE(tracker->Close().ok());
  EXPECT_EQ(tracker->Stats().last_cycle, 1u) << "Close cuts what is open";
  EXPECT_EQ(tracker->SealedSegments().size(), 1u);
  bool applied = false;
  const std::vector<std::byte> data = Pattern(100, 2);
  Status s = tracker->observer(0).Write(0, data, [&] {
    applied = true;
    return Status::Ok();
  });
  EXPECT_EQ(s.code(), ESHUTDOWN);
  EXPECT_FALSE(applied);
  EXPECT_EQ(tracker->Cut().status().code(), ESHUTDOWN);
  EXPECT_TRUE(tracker->Close().ok()) << "idempotent";
  EXPECT_TRUE(tracker->observer(0).Flush().ok());
}

TEST_F(VmTrackerTest, OpenRefusesBadOptions) {
  AddDisk("a", 1 << 20);
  VmTrackerOptions o = Options();
  o.disks.push_back(o.disks[0]);
  EXPECT_EQ(VmTracker::Open(o).status().code(), EINVAL) << "the same disk twice";
  o = Options();
  o.vm = "";
  EXPECT_EQ(VmTracker::Open(o).status().code(), EINVAL);
  o = Options();
  o.disks[0].size = 0;
  EXPECT_EQ(VmTracker::Open(o).status().code(), EINVAL);
}

TEST_F(VmTrackerTest, ALogFolderServesOneTrackerAtATime) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  Result<std::unique_ptr<VmTracker>> second = VmTracker::Open(Options());
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), EBUSY);
  EXPECT_NE(second.status().message().find("in use"), std::string::npos);
}

TEST_F(VmTrackerTest, SealedSegmentsCarryCutAndFirstChangeTimes) {
  AddDisk("a", 1 << 20);
  AddDisk("b", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  EXPECT_EQ(tracker->Stats().open_first_change_unix_nanos, 0);
  const int64_t before = NowUnixNanos();
  ASSERT_TRUE(WriteVia(tracker->observer(1), disks_[1].fd.get(), 0, Pattern(kBlock, 1)).ok());
  const int64_t first = tracker->Stats().open_first_change_unix_nanos;
  EXPECT_GE(first, before);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), 0, Pattern(kBlock, 2)).ok());
  EXPECT_EQ(tracker->Stats().open_first_change_unix_nanos, first);  // the first one stays
  ASSERT_EQ(*tracker->Cut(), 1u);
  EXPECT_EQ(tracker->Stats().open_first_change_unix_nanos, 0);

  std::vector<SealedSegment> sealed = tracker->SealedSegments();
  ASSERT_EQ(sealed.size(), 2u);
  for (const SealedSegment& s : sealed) {
    EXPECT_EQ(s.first_change_unix_nanos, first) << s.disk;  // VM-wide, in every disk
    EXPECT_GE(s.cut_unix_nanos, first);
    EXPECT_EQ(s.cut_unix_nanos, tracker->Stats().last_cut_unix_nanos);
  }
  ASSERT_TRUE(tracker->Close().ok());
  tracker.reset();

  // The times are in the cut records, so a reopened tracker lists the same.
  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  std::vector<SealedSegment> again = tracker->SealedSegments();
  ASSERT_EQ(again.size(), 2u);
  EXPECT_EQ(again[0].first_change_unix_nanos, first);
  EXPECT_EQ(again[0].cut_unix_nanos, sealed[0].cut_unix_nanos);
}

// A released segment goes to the archive as the shipper read it, also when its blocks
// were overwritten after the cut; without an archive nothing is written.
TEST_F(VmTrackerTest, ReleasedSegmentsGoToTheArchiveWhenOneIsSet) {
  AddDisk("a", 1 << 20);
  VmTrackerOptions o = Options();
  auto tracker = Open(o);
  ASSERT_TRUE(tracker);
  ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), 0, Pattern(kBlock, 1)).ok());
  ASSERT_EQ(*tracker->Cut(), 1u);
  std::vector<SealedSegment> sealed = tracker->SealedSegments();
  ASSERT_EQ(sealed.size(), 1u);
  std::string sent;
  {
    Result<std::unique_ptr<SegmentStream>> stream = tracker->OpenSegment(sealed[0]);
    ASSERT_TRUE(stream.ok()) << stream.status().ToString();
    Result<std::vector<std::byte>> b = ReadSegment(**stream, 100);
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    sent.assign(reinterpret_cast<const char*>(b->data()), b->size());
  }
  ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), 0, Pattern(kBlock, 2)).ok());
  ASSERT_TRUE(tracker->ReleaseThrough(1).ok());
  EXPECT_FALSE(fs::exists(CutPath(disks_[0].log_dir, sealed[0].number)));
  EXPECT_FALSE(fs::exists(CowPath(disks_[0].log_dir, sealed[0].number)));
  const fs::path archived = o.archive_dir / "a" / SegmentFileName(sealed[0].number);
  ASSERT_TRUE(fs::exists(archived));
  EXPECT_EQ(*ReadFile(archived), sent);
  ASSERT_TRUE(tracker->Close().ok());

  tracker.reset();
  o.archive_dir.clear();
  fs::remove_all(tmp_.path() / "archive");
  tracker = Open(o);
  ASSERT_TRUE(tracker);
  ASSERT_TRUE(tracker->ReleaseThrough(2).ok());  // Close's cut
  EXPECT_FALSE(fs::exists(tmp_.path() / "archive"));
  ASSERT_TRUE(tracker->Close().ok());
}

// --- Consistency groups: CutTogether -----------------------------------------------------

class VmTrackerGroupTest : public testing::TrackerFixture {
 protected:
  // The options of VM vm with the fixture's disks at the given indices (no cycle timer: a
  // group is cut by CutTogether).
  VmTrackerOptions VmOptions(const std::string& vm, std::initializer_list<size_t> disks) const {
    VmTrackerOptions o;
    o.vm = vm;
    o.epoch = 3;
    o.cycle = std::chrono::milliseconds(0);
    for (size_t i : disks) {
      const DiskFiles& d = disks_[i];
      o.disks.push_back(TrackedDisk{d.name, d.fd.get(), d.size, d.log_dir});
    }
    return o;
  }

  // Writes data at offset to disk vm_disk of tracker, whose image is fixture disk d.
  static void Put(VmTracker& tracker, size_t vm_disk, const DiskFiles& d, uint64_t offset,
                  std::span<const std::byte> data) {
    Status s = WriteVia(tracker.observer(vm_disk), d.fd.get(), offset, data);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  static Result<std::vector<uint64_t>> CutTogether(std::initializer_list<VmTracker*> group) {
    return VmTracker::CutTogether(std::span<VmTracker* const>(group.begin(), group.size()));
  }

  // The sealed segments of tracker's cycle.
  static std::vector<SealedSegment> SegmentsOf(VmTracker& tracker, uint64_t cycle) {
    std::vector<SealedSegment> out;
    for (SealedSegment& s : tracker.SealedSegments()) {
      if (s.cycle == cycle) out.push_back(std::move(s));
    }
    return out;
  }

  // Per cut record of a log: cycle -> cut time; and per write, its tag -> its cycle.
  struct LogCycles {
    std::map<uint64_t, int64_t> cut_time;
    std::map<uint64_t, uint64_t> cycle_of_tag;
  };
  static LogCycles ReadCycles(const fs::path& log_dir) {
    LogCycles out;
    std::vector<uint64_t> open;
    for (const Rec& r : ReadLog(log_dir)) {
      if (r.header.kind == RecordKind::kCut) {
        const CutPayload cut = DecodeCutPayload(std::span(r.payload).first<kCutPayloadSize>());
        out.cut_time[cut.cycle] = cut.unix_nanos;
        for (uint64_t tag : open) out.cycle_of_tag[tag] = cut.cycle;
        open.clear();
      } else {
        // A record may cover several written blocks (adjacent blocks of one cycle); each
        // starts with its tag.
        for (uint64_t k = 0; k * kBlock < r.payload.size(); ++k) {
          uint64_t tag;
          std::memcpy(&tag, r.payload.data() + k * kBlock, sizeof(tag));
          open.push_back(tag);
        }
      }
    }
    EXPECT_TRUE(open.empty()) << log_dir << ": Close leaves no record after the last cut";
    return out;
  }
};

// Two, then three trackers (listed in another order): each group cut gives every member a
// cycle, sealed on every disk, with one cut time, later than every earlier one.
TEST_F(VmTrackerGroupTest, MembersOfAGroupCutGetOneCutTimeThatOnlyIncreases) {
  const DiskFiles& a0 = AddDisk("a0", 1 << 20);
  AddDisk("a1", 1 << 20);
  const DiskFiles& b0 = AddDisk("b0", 1 << 20);
  const DiskFiles& c0 = AddDisk("c0", 1 << 20);
  auto a = Open(VmOptions("vm-a", {0, 1}));
  auto b = Open(VmOptions("vm-b", {2}));
  auto c = Open(VmOptions("vm-c", {3}));
  ASSERT_TRUE(a && b && c);
  int64_t previous = 0;
  std::map<VmTracker*, uint64_t> last_cycle;
  for (int round = 0; round < 20 && !HasFailure(); ++round) {
    const bool three = round >= 10;
    // One member changes per round, the others are cut anyway.
    switch (round % 3) {
      case 0:
        Put(*a, 0, a0, round * kBlock, Pattern(kBlock, round));
        break;
      case 1:
        Put(*b, 0, b0, round * kBlock, Pattern(kBlock, round));
        break;
      default:
        if (three) {
          Put(*c, 0, c0, round * kBlock, Pattern(kBlock, round));
        } else {
          Put(*a, 0, a0, round * kBlock, Pattern(kBlock, round));
        }
    }
    std::vector<VmTracker*> group = {a.get(), b.get()};
    if (three) group = {c.get(), a.get(), b.get()};
    Result<std::vector<uint64_t>> cycles = VmTracker::CutTogether(group);
    ASSERT_TRUE(cycles.ok()) << cycles.status().ToString();
    ASSERT_EQ(cycles->size(), group.size());
    const int64_t time = group[0]->Stats().last_cut_unix_nanos;
    EXPECT_GT(time, previous) << "round " << round;
    previous = time;
    for (size_t i = 0; i < group.size(); ++i) {
      VmTracker& t = *group[i];
      EXPECT_EQ((*cycles)[i], last_cycle[&t] + 1) << "round " << round << " member " << i;
      last_cycle[&t] = (*cycles)[i];
      const VmStats stats = t.Stats();
      EXPECT_EQ(stats.last_cycle, (*cycles)[i]);
      EXPECT_EQ(stats.last_cut_unix_nanos, time) << "round " << round << " member " << i;
      const std::vector<SealedSegment> segs = SegmentsOf(t, (*cycles)[i]);
      ASSERT_EQ(segs.size(), stats.disks.size()) << "every disk is sealed at the cycle";
      for (const SealedSegment& s : segs) EXPECT_EQ(s.cut_unix_nanos, time) << s.disk;
    }
  }
  EXPECT_EQ(last_cycle[a.get()], 20u);
  EXPECT_EQ(last_cycle[c.get()], 10u);
  for (auto* t : {a.get(), b.get(), c.get()}) ASSERT_TRUE(t->Close().ok());
  VmTracker* of_disk[] = {a.get(), a.get(), b.get(), c.get()};
  for (size_t i = 0; i < disks_.size(); ++i) ExpectReplayEqualsImage(*of_disk[i], i);
}

// A member without a change gets the cycle too: a segment of one cut record per disk,
// with no first change; everything that reads segments takes such a cycle in its stride.
TEST_F(VmTrackerGroupTest, AnUnchangedMemberGetsACycleOfCutRecordsOnly) {
  const DiskFiles& a0 = AddDisk("a0", 1 << 20);
  const DiskFiles& b0 = AddDisk("b0", 1 << 20);
  auto a = Open(VmOptions("vm-a", {0}));
  auto b = Open(VmOptions("vm-b", {1}));
  ASSERT_TRUE(a && b);
  std::mutex mu;
  std::vector<uint64_t> b_sealed;
  b->SetSealedCallback([&](uint64_t cycle) {
    std::lock_guard lk(mu);
    b_sealed.push_back(cycle);
  });
  constexpr uint64_t kCutRecord = kHeaderSize + kCutPayloadSize;

  Put(*a, 0, a0, 0, Pattern(kBlock, 1));
  ASSERT_EQ(*CutTogether({a.get(), b.get()}), (std::vector<uint64_t>{1, 1}));
  std::vector<SealedSegment> sealed = b->SealedSegments();
  ASSERT_EQ(sealed.size(), 1u);
  EXPECT_EQ(sealed[0].cycle, 1u);
  EXPECT_EQ(sealed[0].first_seq, 1u);
  EXPECT_EQ(sealed[0].last_seq, 1u);
  EXPECT_EQ(sealed[0].bytes, kCutRecord);
  EXPECT_EQ(sealed[0].first_change_unix_nanos, 0) << "the cycle holds no change";
  EXPECT_EQ(sealed[0].cut_unix_nanos, a->Stats().last_cut_unix_nanos);
  EXPECT_GT(a->SealedSegments().at(0).first_change_unix_nanos, 0);
  VmStats stats = b->Stats();
  EXPECT_EQ(stats.last_cycle, 1u);
  EXPECT_EQ(stats.open_first_change_unix_nanos, 0);
  EXPECT_EQ(stats.disks[0].unshipped_bytes, kCutRecord);
  EXPECT_EQ(stats.disks[0].last_seq, 1u);
  EXPECT_EQ(stats.disks[0].last_cut_unix_nanos, stats.last_cut_unix_nanos);

  Put(*a, 0, a0, kBlock, Pattern(kBlock, 2));
  ASSERT_EQ(*CutTogether({b.get(), a.get()}), (std::vector<uint64_t>{2, 2}));
  Put(*b, 0, b0, 0, Pattern(kBlock, 3));
  ASSERT_EQ(*b->Cut(), 3u) << "a full segment may still cut a member alone";
  {
    std::lock_guard lk(mu);
    EXPECT_EQ(b_sealed, (std::vector<uint64_t>{1, 2, 3}));
  }

  // The reader: one sequence, two cycles of cuts alone.
  const fs::path b_log = LogOf(*b, 1);
  std::vector<Rec> recs = ReadLog(b_log);
  ASSERT_EQ(recs.size(), 4u);
  for (size_t i = 0; i < recs.size(); ++i) EXPECT_EQ(recs[i].header.seq, i + 1);
  EXPECT_EQ(recs[0].header.kind, RecordKind::kCut);
  EXPECT_EQ(recs[1].header.kind, RecordKind::kCut);
  EXPECT_EQ(recs[2].header.kind, RecordKind::kWrite);
  EXPECT_EQ(recs[0].segment + 1, recs[1].segment);

  // Replay through an empty cycle changes nothing; through the next one, everything.
  const fs::path copy = tmp_.path() / "b0.replica";
  fs::copy_file(b0.pre_image, copy);
  Result<ReplayResult> replayed = ReplayLogToFile(b_log, copy, ReplayOptions{2});
  ASSERT_TRUE(replayed.ok()) << replayed.status().ToString();
  EXPECT_EQ(replayed->cuts, 2u);
  EXPECT_EQ(replayed->writes, 0u);
  EXPECT_EQ(replayed->last_cycle, 2u);
  EXPECT_EQ(testing::ReadWhole(copy), testing::ReadWhole(b0.pre_image));

  // The prefix check finds a replica at the pre-image at the empty cycles too.
  Result<PrefixCheckResult> check =
      CheckReplicaIsLogPrefix({{"b0", b0.pre_image, b_log, copy}}, tmp_.path());
  ASSERT_TRUE(check.ok()) << check.status().ToString();
  EXPECT_EQ(check->disks[0].matching_cycles, (std::vector<uint64_t>{0, 1, 2}));
  EXPECT_EQ(check->cycle, std::optional<uint64_t>(2));
  replayed = ReplayLogToFile(b_log, copy, ReplayOptions{3});
  ASSERT_TRUE(replayed.ok()) << replayed.status().ToString();
  check = CheckReplicaIsLogPrefix({{"b0", b0.pre_image, b_log, copy}}, tmp_.path());
  ASSERT_TRUE(check.ok()) << check.status().ToString();
  EXPECT_EQ(check->cycle, std::optional<uint64_t>(3));

  // Release, and a restart: the recovered list holds the empty cycle as it was.
  ASSERT_TRUE(b->ReleaseThrough(1).ok());
  EXPECT_FALSE(fs::exists(CutPath(b0.log_dir, sealed[0].number)));
  EXPECT_EQ(b->Stats().disks[0].unshipped_bytes, kCutRecord + kCutRecord + kHeaderSize + kBlock);
  const std::vector<SealedSegment> before = b->SealedSegments();
  ASSERT_TRUE(a->Close().ok());
  ASSERT_TRUE(b->Close().ok());
  b.reset();
  b = Open(VmOptions("vm-b", {1}));
  ASSERT_TRUE(b);
  const std::vector<SealedSegment> after = b->SealedSegments();
  ASSERT_EQ(after.size(), 2u);
  ASSERT_EQ(before.size(), 2u);
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_EQ(after[i].cycle, before[i].cycle);
    EXPECT_EQ(after[i].first_seq, before[i].first_seq);
    EXPECT_EQ(after[i].last_seq, before[i].last_seq);
    EXPECT_EQ(after[i].bytes, before[i].bytes);
    EXPECT_EQ(after[i].cut_unix_nanos, before[i].cut_unix_nanos);
    EXPECT_EQ(after[i].first_change_unix_nanos, before[i].first_change_unix_nanos);
  }
  EXPECT_EQ(after[0].first_change_unix_nanos, 0);
  stats = b->Stats();
  EXPECT_EQ(stats.last_cycle, 3u);
  EXPECT_EQ(stats.open_first_change_unix_nanos, 0) << "nothing after the last cut";
  ASSERT_TRUE(b->ReleaseThrough(3).ok());
  EXPECT_TRUE(b->SealedSegments().empty());
  EXPECT_EQ(b->Stats().disks[0].unshipped_bytes, 0u);
  ExpectReplayEqualsImage(*a, 0);
}

TEST_F(VmTrackerGroupTest, NothingChangedAnywhereCutsNothing) {
  const DiskFiles& a0 = AddDisk("a0", 1 << 20);
  AddDisk("b0", 1 << 20);
  auto a = Open(VmOptions("vm-a", {0}));
  auto b = Open(VmOptions("vm-b", {1}));
  ASSERT_TRUE(a && b);
  ASSERT_EQ(*CutTogether({a.get(), b.get()}), (std::vector<uint64_t>{0, 0}));
  EXPECT_TRUE(a->SealedSegments().empty());
  EXPECT_TRUE(b->SealedSegments().empty());
  EXPECT_EQ(a->Stats().last_cut_unix_nanos, 0);

  Put(*a, 0, a0, 0, Pattern(kBlock, 1));
  ASSERT_EQ(*CutTogether({a.get(), b.get()}), (std::vector<uint64_t>{1, 1}));
  const int64_t time = a->Stats().last_cut_unix_nanos;
  ASSERT_EQ(*CutTogether({b.get(), a.get()}), (std::vector<uint64_t>{1, 1}));
  EXPECT_EQ(a->SealedSegments().size(), 1u);
  EXPECT_EQ(b->SealedSegments().size(), 1u);
  EXPECT_EQ(a->Stats().last_cut_unix_nanos, time);
  EXPECT_EQ(b->Stats().last_cut_unix_nanos, time);
  EXPECT_EQ(*a->Cut(), 1u);
  EXPECT_TRUE(VmTracker::CutTogether({})->empty());
}

// A member cut alone (a segment roll) leaves the group without a common latest instant:
// the next group cut cuts every member again even though nothing changed, once.
TEST_F(VmTrackerGroupTest, AMemberCutAloneIsCutWithTheGroupAgain) {
  const DiskFiles& a0 = AddDisk("a0", 1 << 20);
  AddDisk("b0", 1 << 20);
  auto a = Open(VmOptions("vm-a", {0}));
  auto b = Open(VmOptions("vm-b", {1}));
  ASSERT_TRUE(a && b);
  Put(*a, 0, a0, 0, Pattern(kBlock, 1));
  ASSERT_EQ(*CutTogether({a.get(), b.get()}), (std::vector<uint64_t>{1, 1}));
  Put(*a, 0, a0, 0, Pattern(kBlock, 2));
  ASSERT_EQ(*a->Cut(), 2u);  // alone
  EXPECT_NE(a->Stats().last_cut_unix_nanos, b->Stats().last_cut_unix_nanos);
  ASSERT_EQ(*CutTogether({a.get(), b.get()}), (std::vector<uint64_t>{3, 2}));
  EXPECT_EQ(a->Stats().last_cut_unix_nanos, b->Stats().last_cut_unix_nanos);
  ASSERT_EQ(*CutTogether({a.get(), b.get()}), (std::vector<uint64_t>{3, 2}));  // aligned: idle
}

// The cut time is past every member's last cut even when the clock is behind it (here:
// a log whose last cut is dated an hour ahead).
TEST_F(VmTrackerGroupTest, TheCutTimeIsPastEveryEarlierCutEvenWithTheClockBehind) {
  const DiskFiles& a0 = AddDisk("a0", 1 << 20);
  const DiskFiles& b0 = AddDisk("b0", 1 << 20);
  const int64_t ahead = NowUnixNanos() + int64_t{3600} * 1'000'000'000;
  {
    fs::create_directories(a0.log_dir);
    RecordHeader h;
    h.kind = RecordKind::kCut;
    h.disk_id = DiskIdFor("vm-a", "a0");
    h.epoch = 3;
    h.seq = 1;
    h.length = kCutPayloadSize;
    std::byte payload[kCutPayloadSize];
    EncodeCutPayload(CutPayload{1, ahead, 0}, payload);
    const std::vector<std::byte> rec = testing::EncodeRecord(h, payload);
    UniqueFd fd(::open(SegmentPath(a0.log_dir, 1).c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.valid());
    ASSERT_TRUE(PWriteAll(fd.get(), rec.data(), rec.size(), 0, "segment").ok());
  }
  auto a = Open(VmOptions("vm-a", {0}));
  auto b = Open(VmOptions("vm-b", {1}));
  ASSERT_TRUE(a && b);
  ASSERT_EQ(a->Stats().last_cut_unix_nanos, ahead);
  Put(*b, 0, b0, 0, Pattern(kBlock, 1));
  ASSERT_EQ(*CutTogether({b.get(), a.get()}), (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(a->Stats().last_cut_unix_nanos, ahead + 1);
  EXPECT_EQ(b->Stats().last_cut_unix_nanos, ahead + 1);
  EXPECT_EQ(SegmentsOf(*b, 1).at(0).cut_unix_nanos, ahead + 1);
  EXPECT_EQ(SegmentsOf(*a, 2).at(0).cut_unix_nanos, ahead + 1);
  // A VM cut alone goes on past it too, and the next group cut past that.
  Put(*a, 0, a0, 0, Pattern(kBlock, 2));
  ASSERT_EQ(*a->Cut(), 3u);
  EXPECT_EQ(a->Stats().last_cut_unix_nanos, ahead + 2);
  Put(*b, 0, b0, 0, Pattern(kBlock, 3));
  ASSERT_EQ(*CutTogether({a.get(), b.get()}), (std::vector<uint64_t>{4, 2}));
  EXPECT_EQ(b->Stats().last_cut_unix_nanos, ahead + 3);
  EXPECT_EQ(a->Stats().last_cut_unix_nanos, ahead + 3);
}

// Writers put a tag in VM a, then b, then c, each tag in a block of its own (so no later
// write hides it in a cycle), while a cutter cuts the three together (in changing orders). At every
// group instant each VM's log holds every write that had returned before CutTogether was called and
// none that began after it returned; and since the three writes of a tag are ordered, a group cut
// that holds a later one holds the earlier ones.
TEST_F(VmTrackerGroupTest, GroupCutsAreOneInstantAcrossVms) {
  AddDisk("a0", 16 << 20);
  AddDisk("b0", 16 << 20);
  AddDisk("c0", 16 << 20);
  std::vector<std::unique_ptr<VmTracker>> vms;
  vms.push_back(Open(VmOptions("vm-a", {0})));
  vms.push_back(Open(VmOptions("vm-b", {1})));
  vms.push_back(Open(VmOptions("vm-c", {2})));
  ASSERT_TRUE(vms[0] && vms[1] && vms[2]);
  constexpr uint64_t kWrites = 3000;
  constexpr int kWriters = 4;
  constexpr uint64_t kWritesPerRound = 100;  // writers keep pace with the cutter (sealing
                                             // speed varies), so cuts fall among the writes
  std::atomic<uint64_t> counter{0};
  std::atomic<uint64_t> rounds{0};
  std::atomic<bool> cutter_done{false};
  std::vector<std::atomic<int>> state(kWrites + 1);  // 0 not begun, 1 writing, 2 returned
  for (auto& s : state) s = 0;
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&] {
      std::vector<std::byte> block(kBlock);
      for (;;) {
        const uint64_t tag = ++counter;
        if (tag > kWrites) break;
        while (tag > (rounds + 1) * kWritesPerRound && !cutter_done) {
          std::this_thread::sleep_for(50us);
        }
        state[tag] = 1;
        std::memcpy(block.data(), &tag, sizeof(tag));
        for (size_t v = 0; v < vms.size(); ++v) {
          Status s = WriteVia(vms[v]->observer(0), disks_[v].fd.get(), tag * kBlock, block);
          ASSERT_TRUE(s.ok()) << s.ToString();
        }
        state[tag] = 2;
      }
    });
  }
  struct Instant {
    std::vector<uint64_t> cycles;    // per VM
    std::vector<uint64_t> returned;  // tags whose writes had returned before the call
    uint64_t began_after = 0;        // tags above this began after the call returned
  };
  std::vector<Instant> instants;
  std::atomic<bool> stop{false};
  std::thread cutter([&] {
    struct Done {
      std::atomic<bool>& done;
      ~Done() { done = true; }  // also when an assertion ends the loop: writers stop waiting
    } done{cutter_done};
    for (int round = 0; !stop; ++round) {
      Instant in;
      const uint64_t seen = std::min(counter.load(), kWrites);
      for (uint64_t t = 1; t <= seen; ++t) {
        if (state[t] == 2) in.returned.push_back(t);
      }
      // The members in a changing order; the result comes back in that order.
      std::vector<size_t> order = {0, 1, 2};
      std::rotate(order.begin(), order.begin() + round % 3, order.end());
      if (round % 2) std::swap(order[0], order[1]);
      std::vector<VmTracker*> group;
      for (size_t v : order) group.push_back(vms[v].get());
      Result<std::vector<uint64_t>> cycles = VmTracker::CutTogether(group);
      in.began_after = counter.load();
      ASSERT_TRUE(cycles.ok()) << cycles.status().ToString();
      in.cycles.assign(3, 0);
      for (size_t i = 0; i < order.size(); ++i) in.cycles[order[i]] = (*cycles)[i];
      instants.push_back(std::move(in));
      ++rounds;
      std::this_thread::sleep_for(200us);
    }
  });
  for (auto& t : writers) t.join();
  stop = true;
  cutter.join();
  for (auto& vm : vms) ASSERT_TRUE(vm->Close().ok());

  std::vector<LogCycles> logs;
  std::vector<std::vector<uint64_t>> cycle_of(vms.size());  // [vm][tag]
  for (size_t v = 0; v < vms.size(); ++v) {
    logs.push_back(ReadCycles(LogOf(*vms[v], v)));
    ASSERT_EQ(logs[v].cycle_of_tag.size(), kWrites) << "VM " << v;
    cycle_of[v].resize(kWrites + 1);
    for (const auto& [tag, cycle] : logs[v].cycle_of_tag) cycle_of[v].at(tag) = cycle;
  }
  size_t cut_instants = 0;
  int64_t previous_time = 0;
  std::vector<uint64_t> previous_cycles(3, 0);
  int violations = 0;
  for (const Instant& in : instants) {
    if (in.cycles != previous_cycles) {
      ++cut_instants;
      const int64_t time = logs[0].cut_time.at(in.cycles[0]);
      for (size_t v = 0; v < 3; ++v) {
        EXPECT_EQ(in.cycles[v], previous_cycles[v] + 1) << "VM " << v;
        EXPECT_EQ(logs[v].cut_time.at(in.cycles[v]), time)
            << "VM " << v << " at cycle " << in.cycles[v];
      }
      EXPECT_GT(time, previous_time);
      previous_time = time;
      previous_cycles = in.cycles;
    }
    auto in_cut = [&](size_t v, uint64_t tag) { return cycle_of[v][tag] <= in.cycles[v]; };
    for (uint64_t tag : in.returned) {
      for (size_t v = 0; v < 3; ++v) violations += in_cut(v, tag) ? 0 : 1;
    }
    for (uint64_t tag = in.began_after + 1; tag <= kWrites; ++tag) {
      for (size_t v = 0; v < 3; ++v) violations += in_cut(v, tag) ? 1 : 0;
    }
    for (uint64_t tag = 1; tag <= kWrites; ++tag) {
      if (in_cut(2, tag) && !in_cut(1, tag)) ++violations;
      if (in_cut(1, tag) && !in_cut(0, tag)) ++violations;
    }
  }
  EXPECT_EQ(violations, 0);
  EXPECT_GT(cut_instants, 5u) << "the test needs group cuts during the writes";
  std::printf("%zu group cuts, %zu of them cut\n", instants.size(), cut_instants);
  for (size_t v = 0; v < vms.size(); ++v) ExpectReplayEqualsImage(*vms[v], v);
}

// Group cuts listing the trackers in opposite orders, and a VM's own cuts, all at once
// with writers on both VMs: nothing deadlocks, and each VM's cut times only increase.
TEST_F(VmTrackerGroupTest, ConcurrentGroupCutsInAnyOrderDoNotDeadlock) {
  const DiskFiles& a0 = AddDisk("a0", 1 << 20);
  const DiskFiles& b0 = AddDisk("b0", 1 << 20);
  auto a = Open(VmOptions("vm-a", {0}));
  auto b = Open(VmOptions("vm-b", {1}));
  ASSERT_TRUE(a && b);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> writes{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < 2; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(w);
      while (!stop) {
        const uint64_t offset = (rng() % 256) * kBlock;
        Put(*a, 0, a0, offset, Pattern(kBlock, rng()));
        Put(*b, 0, b0, offset, Pattern(kBlock, rng()));
        ++writes;
      }
    });
  }
  // Each cutter waits for a write after its last cut before the next (a cut is quicker
  // than a write, and cuts are preferred by the VM lock), so that writes and cuts
  // interleave.
  auto paced = [&](int) {
    thread_local uint64_t seen = 0;
    while (writes <= seen && !stop) std::this_thread::sleep_for(20us);
    seen = writes;
  };
  std::vector<std::thread> cutters;
  cutters.emplace_back([&] {
    for (int i = 0; i < 150; ++i) {
      paced(i);
      ASSERT_TRUE(CutTogether({a.get(), b.get()}).ok());
    }
  });
  cutters.emplace_back([&] {
    for (int i = 0; i < 150; ++i) {
      paced(i);
      ASSERT_TRUE(CutTogether({b.get(), a.get()}).ok());
    }
  });
  cutters.emplace_back([&] {
    for (int i = 0; i < 150; ++i) {
      paced(i);
      ASSERT_TRUE(a->Cut().ok());
    }
  });
  for (auto& t : cutters) t.join();
  stop = true;
  for (auto& t : threads) t.join();
  ASSERT_TRUE(a->Close().ok());
  ASSERT_TRUE(b->Close().ok());
  for (size_t v = 0; v < 2; ++v) {
    int64_t previous = 0;
    uint64_t cuts = 0;
    VmTracker& t = v == 0 ? *a : *b;
    for (const Rec& r : RecordsOf(t, v)) {
      if (r.header.kind != RecordKind::kCut) continue;
      const CutPayload cut = DecodeCutPayload(std::span(r.payload).first<kCutPayloadSize>());
      EXPECT_GT(cut.unix_nanos, previous) << "VM " << v << " cycle " << cut.cycle;
      previous = cut.unix_nanos;
      ++cuts;
    }
    EXPECT_GT(cuts, 10u);
    ExpectReplayEqualsImage(t, v);
  }
}

TEST_F(VmTrackerGroupTest, AClosedMemberFailsTheWholeCut) {
  const DiskFiles& a0 = AddDisk("a0", 1 << 20);
  AddDisk("b0", 1 << 20);
  auto a = Open(VmOptions("vm-a", {0}));
  auto b = Open(VmOptions("vm-b", {1}));
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(b->Close().ok());
  Put(*a, 0, a0, 0, Pattern(kBlock, 1));
  Result<std::vector<uint64_t>> cycles = CutTogether({a.get(), b.get()});
  EXPECT_EQ(cycles.status().code(), ESHUTDOWN);
  EXPECT_NE(cycles.status().message().find("vm-b"), std::string::npos) << cycles.status().message();
  EXPECT_EQ(CutTogether({b.get(), a.get()}).status().code(), ESHUTDOWN);
  EXPECT_EQ(a->Stats().last_cycle, 0u) << "nothing was cut";
  EXPECT_TRUE(a->SealedSegments().empty());
  EXPECT_NE(a->Stats().open_first_change_unix_nanos, 0);
  EXPECT_EQ(*a->Cut(), 1u);
}

TEST_F(VmTrackerGroupTest, ARepeatedOrNullMemberIsRefused) {
  const DiskFiles& a0 = AddDisk("a0", 1 << 20);
  AddDisk("b0", 1 << 20);
  auto a = Open(VmOptions("vm-a", {0}));
  auto b = Open(VmOptions("vm-b", {1}));
  ASSERT_TRUE(a && b);
  Put(*a, 0, a0, 0, Pattern(kBlock, 1));
  EXPECT_EQ(CutTogether({a.get(), a.get()}).status().code(), EINVAL);
  EXPECT_EQ(CutTogether({a.get(), b.get(), a.get()}).status().code(), EINVAL);
  EXPECT_EQ(CutTogether({a.get(), nullptr}).status().code(), EINVAL);
  EXPECT_EQ(a->Stats().last_cycle, 0u) << "nothing was cut";
  EXPECT_EQ(b->Stats().last_cycle, 0u);
  ASSERT_EQ(*CutTogether({a.get()}), std::vector<uint64_t>{1}) << "a group of one is a Cut";
}

// A member whose only disk tracks with the bitmap has nothing to cut: it keeps its cycle,
// and the others are cut.
TEST_F(VmTrackerGroupTest, AMemberWithoutALoggingDiskGetsNoCycle) {
  const DiskFiles& a0 = AddDisk("a0", 1 << 20);
  const DiskFiles& b0 = AddDisk("b0", 1 << 20);
  auto a = Open(VmOptions("vm-a", {0}));
  auto b = Open(VmOptions("vm-b", {1}));
  ASSERT_TRUE(a && b);
  for (uint64_t i = 0; i < 8; ++i) Put(*b, 0, b0, i * kBlock, Pattern(kBlock, i));
  ASSERT_EQ(*b->Cut(), 1u);
  ASSERT_TRUE(failpoint::Arm("tracker.cow_save=error*1").ok());
  Put(*b, 0, b0, 0, Pattern(kBlock, 9));  // frozen in cycle 1: its save fails
  ASSERT_EQ(b->Stats().disks[0].tracking, DiskTracking::kBitmap);
  Put(*b, 0, b0, 20 * kBlock, Pattern(kBlock, 20));
  Put(*a, 0, a0, 0, Pattern(kBlock, 1));
  ASSERT_EQ(*CutTogether({a.get(), b.get()}), (std::vector<uint64_t>{1, 1}));
  EXPECT_TRUE(b->SealedSegments().empty());
  EXPECT_EQ(a->SealedSegments().size(), 1u);
}

}  // namespace
}  // namespace siterep::tracker
