#include "tracker/vm_tracker.h"

#include <gtest/gtest.h>
#include <sys/resource.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <csignal>
#include <cstring>
#include <latch>
#include <map>
#include <random>
#include <thread>

#include "common/file_util.h"
#include "common/time_util.h"
#include "tracker/dirty_bitmap.h"
#include "tracker/disk_state.h"
#include "tracker/log_reader.h"
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
  ExpectReplayEqualsImage(0);
  ExpectReplayEqualsImage(1);
}

// Overlapping writes race for the same blocks; after every round the image must equal the
// replay of the log, i.e. the writes reached the image in log order.
TEST_F(VmTrackerTest, OverlappingConcurrentWritesReachTheImageInLogOrder) {
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
    ExpectReplayEqualsImage(0);
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
  std::vector<Rec> recs = ReadLog(disks_[0].log_dir);
  ASSERT_EQ(recs.size(), 4u);  // 1 MiB + 1 MiB + 0.5 MiB, then the cut of Close
  EXPECT_EQ(recs[0].header.length, 1u << 20);
  EXPECT_EQ(recs[1].header.offset, 100u + (1 << 20));
  EXPECT_EQ(recs[2].header.length, (1u << 19));
  EXPECT_EQ(recs[3].header.kind, RecordKind::kCut);
  ExpectReplayEqualsImage(0);
}

TEST_F(VmTrackerTest, RecordsCarryDiskIdEpochAndContiguousSequenceNumbers) {
  AddDisk("os", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(
        WriteVia(tracker->observer(0), disks_[0].fd.get(), i * kBlock, Pattern(10, i)).ok());
  }
  ASSERT_TRUE(tracker->Cut().ok());
  EXPECT_EQ(tracker->Stats().disks[0].last_seq, 6u);
  ASSERT_TRUE(tracker->Close().ok());
  std::vector<Rec> recs = ReadLog(disks_[0].log_dir);
  ASSERT_EQ(recs.size(), 6u);
  for (size_t i = 0; i < recs.size(); ++i) {
    EXPECT_EQ(recs[i].header.seq, i + 1);
    EXPECT_EQ(recs[i].header.disk_id, DiskIdFor("vm1", "os"));
    EXPECT_EQ(recs[i].header.epoch, 3u);
  }
}

// Threads write a counter to disk A, and once that returned, to disk B, while cuts run.
// A cut is one instant across both disks, so if B's write is in cycle k, A's must be in
// cycle k or earlier.
TEST_F(VmTrackerTest, CutsAreOneInstantAcrossDisks) {
  AddDisk("a", 1 << 20);
  AddDisk("b", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  std::atomic<uint64_t> counter{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&] {
      std::vector<std::byte> block(kBlock);
      for (;;) {
        const uint64_t c = ++counter;
        if (c > 3000) break;
        std::memcpy(block.data(), &c, sizeof(c));
        const uint64_t offset = (c % 256) * kBlock;
        ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), offset, block).ok());
        ASSERT_TRUE(WriteVia(tracker->observer(1), disks_[1].fd.get(), offset, block).ok());
      }
    });
  }
  std::thread cutter([&] {
    while (!stop) {
      ASSERT_TRUE(tracker->Cut().ok());
      std::this_thread::sleep_for(200us);
    }
  });
  for (auto& t : writers) t.join();
  stop = true;
  cutter.join();
  ASSERT_TRUE(tracker->Close().ok());

  struct Cycles {
    std::map<uint64_t, uint64_t> of_counter;  // counter -> cycle of its write
    std::vector<std::pair<uint64_t, int64_t>> cuts;
  };
  auto cycles_of = [](const fs::path& dir) {
    Cycles out;
    std::vector<uint64_t> open;
    for (const Rec& r : ReadLog(dir)) {
      if (r.header.kind == RecordKind::kCut) {
        const CutPayload cut = DecodeCutPayload(std::span(r.payload).first<kCutPayloadSize>());
        out.cuts.emplace_back(cut.cycle, cut.unix_nanos);
        for (uint64_t c : open) out.of_counter[c] = cut.cycle;
        open.clear();
      } else {
        uint64_t c;
        std::memcpy(&c, r.payload.data(), sizeof(c));
        open.push_back(c);
      }
    }
    EXPECT_TRUE(open.empty()) << "Close leaves no record after the last cut";
    return out;
  };
  const Cycles a = cycles_of(disks_[0].log_dir);
  const Cycles b = cycles_of(disks_[1].log_dir);
  EXPECT_EQ(a.cuts, b.cuts) << "every cut is in both logs, with the same cycle and time";
  EXPECT_GT(a.cuts.size(), 5u) << "the test needs cuts during the writes";
  ASSERT_EQ(a.of_counter.size(), 3000u);
  ASSERT_EQ(b.of_counter.size(), 3000u);
  int violations = 0;
  for (const auto& [c, cycle_b] : b.of_counter) {
    if (a.of_counter.at(c) > cycle_b) ++violations;
  }
  EXPECT_EQ(violations, 0);
  ExpectReplayEqualsImage(0);
  ExpectReplayEqualsImage(1);
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
  EXPECT_EQ(sealed[0].bytes, fs::file_size(sealed[0].path));
  EXPECT_EQ(sealed[1].bytes, kHeaderSize + kCutPayloadSize);
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

TEST_F(VmTrackerTest, AFullSegmentAsksForAnEarlyCut) {
  AddDisk("a", 4 << 20);
  VmTrackerOptions options = Options();  // no timer
  options.segment_roll_bytes = 64 << 10;
  auto tracker = Open(std::move(options));
  ASSERT_TRUE(tracker);
  std::atomic<uint64_t> sealed{0};
  tracker->SetSealedCallback([&](uint64_t cycle) { sealed = cycle; });
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(
        WriteVia(tracker->observer(0), disks_[0].fd.get(), i * kBlock, Pattern(kBlock, i)).ok());
  }
  for (int i = 0; i < 200 && sealed == 0; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_GE(sealed, 1u);
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
  EXPECT_EQ(unshipped_b, sealed[1].bytes + sealed[3].bytes + kHeaderSize + kBlock);

  ASSERT_TRUE(tracker->ReleaseThrough(1).ok());
  EXPECT_FALSE(fs::exists(sealed[0].path));
  EXPECT_FALSE(fs::exists(sealed[1].path));
  EXPECT_TRUE(fs::exists(sealed[2].path));
  EXPECT_EQ(tracker->Stats().disks[0].unshipped_bytes, unshipped_a - sealed[0].bytes);
  EXPECT_EQ(tracker->Stats().disks[1].unshipped_bytes, unshipped_b - sealed[1].bytes);
  ASSERT_EQ(tracker->SealedSegments().size(), 2u);

  ASSERT_TRUE(tracker->ReleaseThrough(2).ok());
  EXPECT_TRUE(tracker->SealedSegments().empty());
  EXPECT_EQ(tracker->Stats().disks[0].unshipped_bytes, 0u);
  EXPECT_EQ(tracker->Stats().disks[1].unshipped_bytes, kHeaderSize + kBlock);
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
  std::vector<Rec> recs = ReadLog(disks_[0].log_dir);
  ASSERT_FALSE(recs.empty());
  EXPECT_EQ(recs.front().header.seq, last_seq_a + 1);
}

TEST_F(VmTrackerTest, OverBudgetTheDiskFallsBackToTheBitmap) {
  AddDisk("a", 4 << 20, /*budget=*/64 << 10);
  AddDisk("b", 4 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  std::vector<std::byte> want = testing::ReadWhole(disks_[0].image);
  auto write = [&](uint64_t block, uint64_t seed) {
    const std::vector<std::byte> data = Pattern(kBlock, seed);
    std::memcpy(want.data() + block * kBlock, data.data(), data.size());
    return WriteVia(tracker->observer(0), disks_[0].fd.get(), block * kBlock, data);
  };
  for (uint64_t b = 0; b < 8; ++b) ASSERT_TRUE(write(b, b).ok());
  ASSERT_EQ(*tracker->Cut(), 1u);  // sealed, unshipped: its blocks must be marked too
  EXPECT_EQ(tracker->Stats().disks[0].tracking, DiskTracking::kLog);
  for (uint64_t b = 200; b < 216; ++b) ASSERT_TRUE(write(b, b).ok());  // past 64 KiB

  DiskStats stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kBitmap);
  EXPECT_TRUE(stats.resync_required);
  EXPECT_NE(stats.resync_reason.find("budget"), std::string::npos) << stats.resync_reason;
  EXPECT_EQ(stats.unshipped_bytes, 0u);
  EXPECT_EQ(stats.dirty_bytes, 24 * kBlock);
  EXPECT_TRUE(ListSegments(disks_[0].log_dir)->empty());
  for (const SealedSegment& s : tracker->SealedSegments()) EXPECT_NE(s.disk, "a");
  Result<std::optional<DiskState>> state = LoadDiskState(disks_[0].log_dir);
  ASSERT_TRUE(state.ok() && state->has_value());
  EXPECT_EQ((*state)->tracking, DiskTracking::kBitmap);
  EXPECT_TRUE((*state)->resync_required);

  // The guest carries on; the other disk still logs and cuts, this one does not.
  ASSERT_TRUE(write(500, 500).ok());
  ASSERT_TRUE(tracker->observer(0).Flush().ok());
  ASSERT_TRUE(WriteVia(tracker->observer(1), disks_[1].fd.get(), 0, Pattern(10, 1)).ok());
  EXPECT_EQ(*tracker->Cut(), 2u);
  for (const SealedSegment& s : tracker->SealedSegments()) EXPECT_EQ(s.disk, "b");
  ASSERT_TRUE(tracker->Close().ok());
  tracker.reset();
  EXPECT_EQ(testing::ReadWhole(disks_[0].image), want);

  // Bitmap mode survives a restart.
  tracker = Open(Options());
  ASSERT_TRUE(tracker);
  stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kBitmap);
  EXPECT_TRUE(stats.resync_required);
  EXPECT_NE(stats.resync_reason.find("budget"), std::string::npos);
  ASSERT_TRUE(write(600, 600).ok());
  ASSERT_TRUE(tracker->Close().ok());
  tracker.reset();
  EXPECT_TRUE(ListSegments(disks_[0].log_dir)->empty());

  auto bitmap = DirtyBitmap::Open(disks_[0].log_dir / kBitmapFileName, disks_[0].size);
  ASSERT_TRUE(bitmap.ok());
  std::vector<uint64_t> dirty;
  for (uint64_t b = 0; b < (*bitmap)->block_count(); ++b) {
    if ((*bitmap)->IsDirty(b)) dirty.push_back(b);
  }
  std::vector<uint64_t> expected;
  for (uint64_t b = 0; b < 8; ++b) expected.push_back(b);
  for (uint64_t b = 200; b < 216; ++b) expected.push_back(b);
  expected.push_back(500);
  expected.push_back(600);
  EXPECT_EQ(dirty, expected);
  EXPECT_EQ(testing::ReadWhole(disks_[0].image), want);
}

// A log write error (here EFBIG from RLIMIT_FSIZE, after a short write) is not the
// guest's problem: the disk falls back to the bitmap and every write still succeeds.
TEST_F(VmTrackerTest, ALogWriteErrorFallsBackToTheBitmap) {
  AddDisk("a", 64 << 10);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  std::vector<std::byte> want = testing::ReadWhole(disks_[0].image);

  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old;
  small.rlim_cur = 100 << 10;  // the log may not grow past 100 KiB
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  for (uint64_t i = 0; i < 30; ++i) {
    const uint64_t block = i % 16;
    const std::vector<std::byte> data = Pattern(kBlock, i);
    std::memcpy(want.data() + block * kBlock, data.data(), data.size());
    Status s = WriteVia(tracker->observer(0), disks_[0].fd.get(), block * kBlock, data);
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
  ASSERT_TRUE(tracker->observer(0).Flush().ok());
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
  std::signal(SIGXFSZ, old_handler);

  const DiskStats stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kBitmap);
  EXPECT_NE(stats.resync_reason.find("log write failed"), std::string::npos) << stats.resync_reason;
  EXPECT_EQ(stats.dirty_bytes, 16 * kBlock);
  EXPECT_TRUE(ListSegments(disks_[0].log_dir)->empty());
  EXPECT_EQ(testing::ReadWhole(disks_[0].image), want);
}

TEST_F(VmTrackerTest, AFailedApplyFallsBackToTheBitmapAndReturnsTheError) {
  AddDisk("a", 1 << 20);
  auto tracker = Open(Options());
  ASSERT_TRUE(tracker);
  const std::vector<std::byte> data = Pattern(kBlock, 1);
  Status s = tracker->observer(0).Write(3 * kBlock, data,
                                        [] { return Status::Error(EIO, "disk on fire"); });
  EXPECT_EQ(s.code(), EIO);
  const DiskStats stats = tracker->Stats().disks[0];
  EXPECT_EQ(stats.tracking, DiskTracking::kBitmap);
  EXPECT_NE(stats.resync_reason.find("image write failed"), std::string::npos)
      << stats.resync_reason;
  EXPECT_EQ(stats.dirty_bytes, kBlock);
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

TEST_F(VmTrackerTest, ReleasedSegmentsGoToTheArchiveWhenOneIsSet) {
  AddDisk("a", 1 << 20);
  VmTrackerOptions o = Options();
  o.archive_dir = tmp_.path() / "archive";
  auto tracker = Open(o);
  ASSERT_TRUE(tracker);
  ASSERT_TRUE(WriteVia(tracker->observer(0), disks_[0].fd.get(), 0, Pattern(kBlock, 1)).ok());
  ASSERT_EQ(*tracker->Cut(), 1u);
  std::vector<SealedSegment> sealed = tracker->SealedSegments();
  ASSERT_EQ(sealed.size(), 1u);
  const std::string before = *ReadFile(sealed[0].path);
  ASSERT_TRUE(tracker->ReleaseThrough(1).ok());
  EXPECT_FALSE(fs::exists(sealed[0].path));
  const fs::path archived = o.archive_dir / "a" / sealed[0].path.filename();
  ASSERT_TRUE(fs::exists(archived));
  EXPECT_EQ(*ReadFile(archived), before);
  ASSERT_TRUE(tracker->Close().ok());
}

}  // namespace
}  // namespace siterep::tracker
