#include "blockdev/disk_slot.h"

#include <cassert>
#include <cerrno>
#include <cstdlib>
#include <shared_mutex>
#include <string>

namespace siterep::blockdev {

namespace {

Status Offline(const char* what, uint64_t offset) {
  return Status::Error(
      EIO, std::string(what) + " at offset " + std::to_string(offset) + ": the disk is offline");
}

// The gate's pthread calls fail only on misuse (a lock not held, a deadlock); the gate is
// private and used in scopes only, so that is a bug here.
void CheckLockCall(int rc) {
  if (rc != 0) std::abort();
}

}  // namespace

std::string_view SlotModeName(SlotMode mode) {
  switch (mode) {
    case SlotMode::kOffline:
      return "offline";
    case SlotMode::kReadWrite:
      return "read-write";
    case SlotMode::kReadOnly:
      return "read-only";
    case SlotMode::kHold:
      return "hold";
    case SlotMode::kPaused:
      return "paused";
  }
  return "unknown";
}

DiskSlot::Gate::Gate() {
  pthread_rwlockattr_t attr;
  CheckLockCall(pthread_rwlockattr_init(&attr));
  CheckLockCall(pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP));
  CheckLockCall(pthread_rwlock_init(&rw_, &attr));
  pthread_rwlockattr_destroy(&attr);
}

DiskSlot::Gate::~Gate() { pthread_rwlock_destroy(&rw_); }
void DiskSlot::Gate::lock() { CheckLockCall(pthread_rwlock_wrlock(&rw_)); }
void DiskSlot::Gate::unlock() { CheckLockCall(pthread_rwlock_unlock(&rw_)); }
void DiskSlot::Gate::lock_shared() { CheckLockCall(pthread_rwlock_rdlock(&rw_)); }
void DiskSlot::Gate::unlock_shared() { CheckLockCall(pthread_rwlock_unlock(&rw_)); }

DiskSlot::DiskSlot(uint64_t size) : size_(size) {}

Result<size_t> DiskSlot::Read(uint64_t offset, std::span<std::byte> buf) {
  size_t done = 0;
  Status s = Run("read", offset, /*change=*/false, [&](DiskBackend* inner) {
    Result<size_t> r = inner->Read(offset, buf);
    if (!r.ok()) return r.status();
    done = *r;
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return done;
}

Status DiskSlot::Write(uint64_t offset, std::span<const std::byte> data) {
  return Run("write", offset, /*change=*/true,
             [&](DiskBackend* inner) { return inner->Write(offset, data); });
}

Status DiskSlot::Discard(uint64_t offset, uint64_t length) {
  return Run("discard", offset, /*change=*/true,
             [&](DiskBackend* inner) { return inner->Discard(offset, length); });
}

Status DiskSlot::Flush() {
  return Run("flush", 0, /*change=*/false, [&](DiskBackend* inner) { return inner->Flush(); });
}

Status DiskSlot::Run(const char* what, uint64_t offset, bool change,
                     FunctionRef<Status(DiskBackend*)> apply) {
  for (;;) {
    uint64_t seen;
    {
      std::shared_lock lock(gate_);
      if (inner_ == nullptr || mode_ == SlotMode::kOffline) return Offline(what, offset);
      const bool waits = mode_ == SlotMode::kPaused || (change && mode_ == SlotMode::kHold);
      if (!waits) {
        if (change && mode_ == SlotMode::kReadOnly) {
          return Status::Error(EROFS, std::string(what) + " at offset " + std::to_string(offset) +
                                          ": the disk is read-only (fenced)");
        }
        return apply(inner_);
      }
      seen = generation_;
    }
    // Wait outside the gate, so that Set is not kept out by waiting requests.
    std::unique_lock lock(hold_mu_);
    hold_cv_.wait(lock, [&] { return generation_ != seen; });
  }
}

void DiskSlot::Update(FunctionRef<void()> change) {
  {
    std::unique_lock lock(gate_);  // waits for the requests in flight
    change();
    std::lock_guard hold(hold_mu_);
    ++generation_;
  }
  hold_cv_.notify_all();
}

void DiskSlot::Set(DiskBackend* inner, SlotMode mode) {
  assert(inner == nullptr || inner->Size() == size_);
  Update([&] {
    inner_ = inner;
    mode_ = mode;
  });
}

void DiskSlot::SetMode(SlotMode mode) {
  Update([&] { mode_ = mode; });
}

SlotMode DiskSlot::mode() const {
  std::shared_lock lock(gate_);
  return mode_;
}

DiskBackend* DiskSlot::inner() const {
  std::shared_lock lock(gate_);
  return inner_;
}

}  // namespace siterep::blockdev
