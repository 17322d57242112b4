// The two locks that order guest changes in VmTracker.
//
// CutLock: the VM-wide reader/writer lock. Every change holds it shared from "take a
// sequence number" until its apply returns; Cut() holds it exclusively while it writes
// the cut record to every disk, and so does the last step of a disk's fall back to the
// bitmap (no change in flight, so no record is half written). It prefers the cutter:
// once Cut() waits, new changes wait behind it, so a steady stream of overlapping guest
// writes cannot starve the cycle timer (glibc's default rwlock, behind std::shared_mutex,
// prefers readers). Not recursive.
//
// RangeLocks: per disk, serialise changes whose byte ranges overlap, so that overlapping
// changes reach the image in the same order as their records reach the log, while
// disjoint changes run in parallel. A fixed table of mutexes, one per 1 MiB chunk modulo
// the table size; a range locks its chunks' slots in ascending slot order (so two ranges
// never wait on each other in a cycle). Lock order: CutLock, then RangeLocks.
#pragma once

#include <pthread.h>

#include <array>
#include <cstdint>
#include <mutex>

namespace siterep::tracker {

class CutLock {
 public:
  CutLock() {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&lock_, &attr);
    pthread_rwlockattr_destroy(&attr);
  }
  ~CutLock() { pthread_rwlock_destroy(&lock_); }
  CutLock(const CutLock&) = delete;
  CutLock& operator=(const CutLock&) = delete;

  // Lockable and SharedLockable, for std::unique_lock and std::shared_lock.
  void lock() { pthread_rwlock_wrlock(&lock_); }
  void unlock() { pthread_rwlock_unlock(&lock_); }
  void lock_shared() { pthread_rwlock_rdlock(&lock_); }
  void unlock_shared() { pthread_rwlock_unlock(&lock_); }

 private:
  pthread_rwlock_t lock_;
};

class RangeLocks {
 public:
  static constexpr unsigned kChunkShift = 20;  // 1 MiB chunks
  static constexpr size_t kSlots = 256;

  // Holds the slots of one range; unlocks on destruction.
  class Guard {
   public:
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    ~Guard() {
      // Two runs of slots: [lo1, hi1) and [lo2, hi2), each locked ascending.
      for (size_t i = hi2_; i > lo2_; --i) owner_->slots_[i - 1].unlock();
      for (size_t i = hi1_; i > lo1_; --i) owner_->slots_[i - 1].unlock();
    }

   private:
    friend class RangeLocks;
    Guard(RangeLocks* owner, size_t lo1, size_t hi1, size_t lo2, size_t hi2)
        : owner_(owner), lo1_(lo1), hi1_(hi1), lo2_(lo2), hi2_(hi2) {
      for (size_t i = lo1_; i < hi1_; ++i) owner_->slots_[i].lock();
      for (size_t i = lo2_; i < hi2_; ++i) owner_->slots_[i].lock();
    }
    RangeLocks* owner_;
    size_t lo1_, hi1_, lo2_, hi2_;
  };

  // Locks every chunk that [offset, offset + length) touches (a zero-length range locks
  // the chunk at offset).
  [[nodiscard]] Guard Lock(uint64_t offset, uint64_t length) {
    const uint64_t first = offset >> kChunkShift;
    const uint64_t last = (offset + (length == 0 ? 0 : length - 1)) >> kChunkShift;
    if (last - first + 1 >= kSlots) return Guard(this, 0, kSlots, 0, 0);
    const size_t lo = static_cast<size_t>(first % kSlots);
    const size_t hi = static_cast<size_t>(last % kSlots);
    if (lo <= hi) return Guard(this, lo, hi + 1, 0, 0);
    // The range wraps around the table: [0, hi] then [lo, kSlots), still ascending.
    return Guard(this, 0, hi + 1, lo, kSlots);
  }

 private:
  std::array<std::mutex, kSlots> slots_;
};

}  // namespace siterep::tracker
