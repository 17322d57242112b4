// DiskSlot: the backend FuseFs exports for one disk for the life of the daemon. It
// forwards every request to the current inner backend, which control/ swaps on role
// changes (an overlay during an unplanned failover, the image backend after commit, none
// while the disk is offline) without the disk file leaving the mount, so a loop device or
// a qemu that has the file open keeps working.
//
// Modes:
//   kOffline (or no inner)  every request fails with EIO.
//   kReadWrite              everything is forwarded.
//   kReadOnly (fenced)      reads and Flush are forwarded; Write and Discard fail with
//                           EROFS without reaching the inner backend.
//   kHold                   reads and Flush are forwarded; Write and Discard wait (they do
//                           not fail) until the mode changes, then go on as the new mode
//                           says.
//   kPaused                 every request waits until the mode changes (the inner backend
//                           is being replaced by one built from it, e.g. a commit).
//
// Threads: requests from any number of threads; Set/SetMode/mode/inner from any thread
// but not from inside a request of this slot. A request holds the slot's gate shared
// while it uses the inner backend; Set and SetMode take it exclusively, so when they
// return no request uses the old inner backend or runs in the old mode (e.g. no write is
// still running after SetMode(kReadOnly)). The gate prefers Set: a steady stream of
// requests cannot starve it. Held writes wait outside the gate, so they block neither.
//
// Callers must know:
// - Held (and paused) requests are in flight: leave kHold/kPaused before
//   FuseFs::RemoveDisk (which waits for them), FuseFs::Stop or destroying the slot. Each
//   one occupies a FUSE worker:
//   with FuseOptions::max_threads writes held, reads wait too. Keep holds short.
// - The kernel may keep pages read through the old inner backend in a buffered open
//   (a loop device): after a Set to an inner with other contents, drop them with
//   FuseFs::DropCache.
#pragma once

#include <pthread.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string_view>

#include "blockdev/backend.h"
#include "common/function_ref.h"
#include "common/status.h"

namespace siterep::blockdev {

enum class SlotMode { kOffline, kReadWrite, kReadOnly, kHold, kPaused };
std::string_view SlotModeName(SlotMode mode);  // "offline" | "read-write" | ...

class DiskSlot : public DiskBackend {
 public:
  // Starts offline, without an inner backend.
  explicit DiskSlot(uint64_t size);
  DiskSlot(const DiskSlot&) = delete;
  DiskSlot& operator=(const DiskSlot&) = delete;

  uint64_t Size() const override { return size_; }
  Result<size_t> Read(uint64_t offset, std::span<std::byte> buf) override;
  Status Write(uint64_t offset, std::span<const std::byte> data) override;
  Status Discard(uint64_t offset, uint64_t length) override;
  Status Flush() override;

  // Swaps the inner backend (borrowed, may be null; its Size() must be this slot's) and
  // the mode. Returns when no request still uses the old inner backend: the caller may
  // destroy it then. Held writes go on as the new mode says.
  void Set(DiskBackend* inner, SlotMode mode);
  // Changes the mode and keeps the inner backend; waits for requests as Set does.
  void SetMode(SlotMode mode);
  SlotMode mode() const;
  DiskBackend* inner() const;

 private:
  // A reader/writer lock that prefers writers (std::shared_mutex on glibc prefers
  // readers, so overlapping requests could keep Set out forever). Not recursive.
  class Gate {
   public:
    Gate();
    ~Gate();
    Gate(const Gate&) = delete;
    Gate& operator=(const Gate&) = delete;
    void lock();
    void unlock();
    void lock_shared();
    void unlock_shared();

   private:
    pthread_rwlock_t rw_;
  };

  // apply(inner) once the mode lets the request through (change: a write or discard).
  Status Run(const char* what, uint64_t offset, bool change,
             FunctionRef<Status(DiskBackend*)> apply);
  // Runs change with the gate held exclusively (no request in flight), then wakes the
  // held writes.
  void Update(FunctionRef<void()> change);

  const uint64_t size_;

  // Lock order: gate_, then hold_mu_.
  mutable Gate gate_;  // shared by requests; exclusive by Update. Protects inner_ and mode_.
  DiskBackend* inner_ = nullptr;
  SlotMode mode_ = SlotMode::kOffline;

  // Protects nothing but the wait of held writes. generation_ changes with every Update
  // (under gate_ and hold_mu_), so a held write sees any change of mode.
  std::mutex hold_mu_;
  std::condition_variable hold_cv_;
  uint64_t generation_ = 0;
};

}  // namespace siterep::blockdev
