#include "blockdev/disk_slot.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "blockdev/test_util.h"

namespace siterep::blockdev {
namespace {

using namespace std::chrono_literals;
using testing::MemBackend;
using testing::Range;

constexpr uint64_t kSize = 1 << 20;

// A MemBackend whose writes, once armed, stop inside Write until released.
class BlockingBackend : public MemBackend {
 public:
  using MemBackend::MemBackend;

  Status Write(uint64_t offset, std::span<const std::byte> data) override {
    {
      std::unique_lock lock(mu_);
      if (armed_) {
        ++entered_;
        cv_.notify_all();
        cv_.wait(lock, [&] { return released_; });
      }
    }
    return MemBackend::Write(offset, data);
  }

  void Arm() {
    std::lock_guard lock(mu_);
    armed_ = true;
  }
  void WaitEntered() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return entered_ > 0; });
  }
  void Release() {
    std::lock_guard lock(mu_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;  // protects the members below
  std::condition_variable cv_;
  bool armed_ = false;
  bool released_ = false;
  int entered_ = 0;
};

// A MemBackend whose reads take a while, so that overlapping readers always hold the gate.
class SlowReadBackend : public MemBackend {
 public:
  using MemBackend::MemBackend;
  Result<size_t> Read(uint64_t offset, std::span<std::byte> buf) override {
    std::this_thread::sleep_for(5ms);
    return MemBackend::Read(offset, buf);
  }
};

std::vector<std::byte> Bytes(size_t n, uint8_t value) {
  return std::vector<std::byte>(n, std::byte{value});
}

template <typename T>
bool Blocked(const std::future<T>& f) {
  return f.wait_for(100ms) == std::future_status::timeout;
}

TEST(DiskSlotTest, StartsOfflineAndRefusesWithEio) {
  DiskSlot slot(kSize);
  EXPECT_EQ(slot.Size(), kSize);
  EXPECT_EQ(slot.mode(), SlotMode::kOffline);
  EXPECT_EQ(slot.inner(), nullptr);
  std::vector<std::byte> buf(4096);
  auto got = slot.Read(0, buf);
  EXPECT_EQ(got.status().code(), EIO);
  EXPECT_NE(got.status().message().find("offline"), std::string::npos) << got.status().message();
  EXPECT_EQ(slot.Write(0, buf).code(), EIO);
  EXPECT_EQ(slot.Discard(0, 4096).code(), EIO);
  EXPECT_EQ(slot.Flush().code(), EIO);

  // Offline with an inner backend: nothing reaches it.
  MemBackend inner(kSize);
  slot.Set(&inner, SlotMode::kOffline);
  EXPECT_EQ(slot.Read(0, buf).status().code(), EIO);
  EXPECT_EQ(slot.Write(0, buf).code(), EIO);
  EXPECT_EQ(slot.Flush().code(), EIO);
  EXPECT_TRUE(inner.reads().empty());
  EXPECT_TRUE(inner.writes().empty());
  EXPECT_EQ(inner.flushes(), 0);
}

TEST(DiskSlotTest, NullInnerGivesEioInEveryMode) {
  DiskSlot slot(kSize);
  std::vector<std::byte> buf(512);
  for (SlotMode mode : {SlotMode::kReadWrite, SlotMode::kReadOnly, SlotMode::kHold}) {
    SCOPED_TRACE(SlotModeName(mode));
    slot.Set(nullptr, mode);
    EXPECT_EQ(slot.mode(), mode);
    EXPECT_EQ(slot.Read(0, buf).status().code(), EIO);
    EXPECT_EQ(slot.Write(0, buf).code(), EIO);  // also in hold: nothing to wait for
    EXPECT_EQ(slot.Discard(0, 512).code(), EIO);
    EXPECT_EQ(slot.Flush().code(), EIO);
  }
}

TEST(DiskSlotTest, ReadWriteForwardsEverything) {
  DiskSlot slot(kSize);
  MemBackend inner(kSize);
  slot.Set(&inner, SlotMode::kReadWrite);
  EXPECT_EQ(slot.inner(), &inner);
  EXPECT_EQ(slot.mode(), SlotMode::kReadWrite);
  ASSERT_TRUE(slot.Write(8192, Bytes(4096, 7)).ok());
  EXPECT_EQ(inner.Contents(8192, 4096), Bytes(4096, 7));
  ASSERT_TRUE(slot.Discard(8192, 1024).ok());
  ASSERT_TRUE(slot.Flush().ok());
  std::vector<std::byte> buf(4096);
  auto got = slot.Read(8192, buf);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 4096u);
  EXPECT_EQ(std::vector<std::byte>(buf.begin(), buf.begin() + 1024), Bytes(1024, 0));
  EXPECT_EQ(buf[1024], std::byte{7});
  EXPECT_EQ(inner.writes(), (std::vector<Range>{{8192, 4096}}));
  EXPECT_EQ(inner.discards(), (std::vector<Range>{{8192, 1024}}));
  EXPECT_EQ(inner.reads(), (std::vector<Range>{{8192, 4096}}));
  EXPECT_EQ(inner.flushes(), 1);
  // Errors of the inner backend come through unchanged.
  inner.FailWith(ENOSPC);
  EXPECT_EQ(slot.Write(0, buf).code(), ENOSPC);
}

TEST(DiskSlotTest, ReadOnlyRefusesChangesWithoutReachingInner) {
  DiskSlot slot(kSize);
  MemBackend inner(kSize);
  inner.Fill(0, 4096, std::byte{3});
  slot.Set(&inner, SlotMode::kReadOnly);
  Status write = slot.Write(0, Bytes(4096, 9));
  EXPECT_EQ(write.code(), EROFS);
  EXPECT_NE(write.message().find("read-only"), std::string::npos) << write.message();
  EXPECT_EQ(slot.Discard(0, 4096).code(), EROFS);
  EXPECT_TRUE(inner.writes().empty());
  EXPECT_TRUE(inner.discards().empty());
  EXPECT_EQ(inner.Contents(0, 4096), Bytes(4096, 3));
  std::vector<std::byte> buf(4096);
  ASSERT_TRUE(slot.Read(0, buf).ok());
  EXPECT_EQ(buf, Bytes(4096, 3));
  EXPECT_TRUE(slot.Flush().ok());
  EXPECT_EQ(inner.flushes(), 1);

  slot.SetMode(SlotMode::kReadWrite);  // unfenced, same inner
  EXPECT_EQ(slot.inner(), &inner);
  EXPECT_TRUE(slot.Write(0, Bytes(4096, 9)).ok());
  EXPECT_EQ(inner.Contents(0, 4096), Bytes(4096, 9));
}

TEST(DiskSlotTest, SetWaitsForARequestInFlight) {
  DiskSlot slot(kSize);
  auto old_inner = std::make_unique<BlockingBackend>(kSize);
  MemBackend new_inner(kSize);
  slot.Set(old_inner.get(), SlotMode::kReadWrite);
  old_inner->Arm();
  auto write = std::async(std::launch::async, [&] { return slot.Write(0, Bytes(512, 1)); });
  old_inner->WaitEntered();

  std::atomic<bool> set_returned{false};
  auto set = std::async(std::launch::async, [&] {
    slot.Set(&new_inner, SlotMode::kReadWrite);
    set_returned = true;
  });
  EXPECT_TRUE(Blocked(set));
  EXPECT_FALSE(set_returned.load());

  old_inner->Release();
  EXPECT_TRUE(write.get().ok());
  set.get();
  EXPECT_EQ(old_inner->writes(), (std::vector<Range>{{0, 512}}));
  old_inner.reset();  // Set returned: the old inner backend may go
  EXPECT_TRUE(slot.Write(4096, Bytes(512, 2)).ok());
  EXPECT_EQ(new_inner.writes(), (std::vector<Range>{{4096, 512}}));
}

TEST(DiskSlotTest, FencingWaitsForAWriteInFlight) {
  // After SetMode(kReadOnly) returns no write is running on the inner backend.
  DiskSlot slot(kSize);
  BlockingBackend inner(kSize);
  slot.Set(&inner, SlotMode::kReadWrite);
  inner.Arm();
  auto write = std::async(std::launch::async, [&] { return slot.Write(0, Bytes(512, 1)); });
  inner.WaitEntered();
  auto fence = std::async(std::launch::async, [&] { slot.SetMode(SlotMode::kReadOnly); });
  EXPECT_TRUE(Blocked(fence));
  inner.Release();
  fence.get();
  EXPECT_TRUE(write.get().ok());
  EXPECT_EQ(inner.writes().size(), 1u);
  EXPECT_EQ(slot.Write(0, Bytes(512, 1)).code(), EROFS);
}

TEST(DiskSlotTest, HeldWritesWaitAndThenGoOnAsTheNewModeSays) {
  DiskSlot slot(kSize);
  MemBackend inner(kSize);
  slot.Set(&inner, SlotMode::kHold);

  // Read-write afterwards: the held write reaches the inner backend.
  auto write = std::async(std::launch::async, [&] { return slot.Write(0, Bytes(512, 5)); });
  EXPECT_TRUE(Blocked(write));
  EXPECT_TRUE(inner.writes().empty());
  // Reads and flushes are not held.
  std::vector<std::byte> buf(512);
  EXPECT_TRUE(slot.Read(0, buf).ok());
  EXPECT_TRUE(slot.Flush().ok());
  slot.SetMode(SlotMode::kHold);  // still held
  EXPECT_TRUE(Blocked(write));
  slot.SetMode(SlotMode::kReadWrite);
  EXPECT_TRUE(write.get().ok());
  EXPECT_EQ(inner.Contents(0, 512), Bytes(512, 5));

  // Read-only afterwards: the held change fails with EROFS and never reaches it.
  slot.SetMode(SlotMode::kHold);
  auto discard = std::async(std::launch::async, [&] { return slot.Discard(0, 512); });
  auto write2 = std::async(std::launch::async, [&] { return slot.Write(0, Bytes(512, 6)); });
  EXPECT_TRUE(Blocked(discard));
  EXPECT_TRUE(Blocked(write2));
  slot.SetMode(SlotMode::kReadOnly);
  EXPECT_EQ(discard.get().code(), EROFS);
  EXPECT_EQ(write2.get().code(), EROFS);
  EXPECT_TRUE(inner.discards().empty());
  EXPECT_EQ(inner.writes().size(), 1u);

  // Offline afterwards: EIO.
  slot.SetMode(SlotMode::kHold);
  auto write3 = std::async(std::launch::async, [&] { return slot.Write(0, Bytes(512, 7)); });
  EXPECT_TRUE(Blocked(write3));
  slot.SetMode(SlotMode::kOffline);
  EXPECT_EQ(write3.get().code(), EIO);
}

TEST(DiskSlotTest, PausedRequestsAllWaitForTheNewInnerBackend) {
  DiskSlot slot(kSize);
  MemBackend old_inner(kSize), new_inner(kSize);
  slot.Set(&old_inner, SlotMode::kReadWrite);
  slot.SetMode(SlotMode::kPaused);
  std::vector<std::byte> buf(512);
  auto read = std::async(std::launch::async, [&] { return slot.Read(0, buf); });
  auto flush = std::async(std::launch::async, [&] { return slot.Flush(); });
  auto write = std::async(std::launch::async, [&] { return slot.Write(0, Bytes(512, 9)); });
  EXPECT_TRUE(Blocked(read));
  EXPECT_TRUE(Blocked(flush));
  EXPECT_TRUE(Blocked(write));
  slot.Set(&new_inner, SlotMode::kReadWrite);
  EXPECT_TRUE(read.get().ok());
  EXPECT_TRUE(flush.get().ok());
  EXPECT_TRUE(write.get().ok());
  EXPECT_TRUE(old_inner.writes().empty());
  EXPECT_EQ(new_inner.Contents(0, 512), Bytes(512, 9));
}

TEST(DiskSlotTest, SetWhileWritesAreHeldSwapsTheInnerBackend) {
  // The commit of an unplanned failover: hold, swap the overlay for the image, go on.
  DiskSlot slot(kSize);
  MemBackend overlay(kSize);
  MemBackend image(kSize);
  slot.Set(&overlay, SlotMode::kHold);
  std::vector<std::future<Status>> writes;
  for (int i = 0; i < 4; ++i) {
    writes.push_back(std::async(std::launch::async, [&, i] {
      return slot.Write(static_cast<uint64_t>(i) * 4096, Bytes(4096, static_cast<uint8_t>(i + 1)));
    }));
  }
  for (auto& w : writes) EXPECT_TRUE(Blocked(w));

  auto set = std::async(std::launch::async, [&] { slot.Set(&image, SlotMode::kHold); });
  EXPECT_EQ(set.wait_for(2s), std::future_status::ready);  // held writes do not block Set
  for (auto& w : writes) EXPECT_TRUE(Blocked(w));
  slot.SetMode(SlotMode::kReadWrite);
  for (auto& w : writes) EXPECT_TRUE(w.get().ok());
  EXPECT_TRUE(overlay.writes().empty());
  EXPECT_EQ(image.writes().size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(image.Contents(static_cast<uint64_t>(i) * 4096, 4096),
              Bytes(4096, static_cast<uint8_t>(i + 1)));
  }
}

TEST(DiskSlotTest, OverlappingRequestsDoNotStarveSet) {
  // Readers that always overlap (each holds the gate for 5 ms) would keep a
  // reader-preferring lock shared forever.
  DiskSlot slot(kSize);
  SlowReadBackend slow(kSize);
  MemBackend other(kSize);
  slot.Set(&slow, SlotMode::kReadWrite);
  std::atomic<bool> stop{false};
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&] {
      std::vector<std::byte> buf(512);
      while (!stop.load()) (void)slot.Read(0, buf);
    });
  }
  std::this_thread::sleep_for(50ms);
  auto set = std::async(std::launch::async, [&] { slot.Set(&other, SlotMode::kReadWrite); });
  const bool done = set.wait_for(2s) == std::future_status::ready;
  stop = true;
  for (auto& th : readers) th.join();
  set.get();
  EXPECT_TRUE(done) << "Set waited for more than 2 s behind overlapping readers";
}

}  // namespace
}  // namespace siterep::blockdev
