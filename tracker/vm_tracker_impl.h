// VmTracker::Impl: the tracker's state and its internal steps, shared by vm_tracker.cc
// (open, changes, cuts, close, the SegmentSource) and vm_tracker_snapshot.cc (the
// point-in-time snapshot). Private to tracker/; see vm_tracker.h for the contract.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include "tracker/disk_log.h"
#include "tracker/locks.h"
#include "tracker/snapshot.h"
#include "tracker/vm_tracker.h"

namespace siterep::tracker {

class VmTracker::Impl {
 public:
  explicit Impl(VmTrackerOptions options) : options_(std::move(options)) {}
  ~Impl() {
    StopCutter();
    // Stop the sealers while everything they may call back into is still alive.
    disks_.clear();
  }

  Status Open();
  WriteObserver& observer(size_t i) { return disks_.at(i)->observer; }
  Result<uint64_t> Cut(bool closing);
  // VmTracker::CutTogether, once the trackers are known to be non-null.
  static Result<std::vector<uint64_t>> CutTogether(std::span<Impl* const> group);
  VmStats Stats() const;
  Status Close();
  std::vector<SealedSegment> SealedSegments() const;
  Status ReleaseThrough(uint64_t cycle);
  Result<std::unique_ptr<SegmentStream>> OpenSegment(const SealedSegment& seg);
  void SetSealedCallback(std::function<void(uint64_t)> callback) {
    std::lock_guard lk(callback_mu_);
    callback_ = std::move(callback);
  }

  Result<SnapshotInfo> StartSnapshot();
  bool snapshot_active() const {
    std::lock_guard lk(snapshot_mu_);
    return snapshot_ != nullptr;
  }
  Status ReadSnapshot(size_t index, uint64_t offset, std::span<std::byte> out);
  Result<std::vector<ByteRange>> SnapshotDataRanges(size_t index, uint64_t from, uint64_t to);
  void SnapshotCopied(size_t index, uint64_t offset);
  Status EndSnapshot(bool completed);

 private:
  // What blockdev holds for one disk: forwards to the tracker with the disk's index.
  class DiskObserver final : public WriteObserver {
   public:
    DiskObserver(Impl* impl, size_t index) : impl_(impl), index_(index) {}
    Status Write(uint64_t offset, std::span<const std::byte> data,
                 FunctionRef<Status()> apply) override {
      return impl_->Change(index_, RecordKind::kWrite, offset, data.size(), apply);
    }
    Status Discard(uint64_t offset, uint64_t length, FunctionRef<Status()> apply) override {
      return impl_->Change(index_, RecordKind::kDiscard, offset, length, apply);
    }
    Status Flush() override { return impl_->FlushDisk(index_); }

   private:
    Impl* const impl_;
    const size_t index_;
  };

  struct Disk {
    Disk(Impl* impl, size_t index, TrackedDisk config)
        : config(std::move(config)), observer(impl, index) {}
    const TrackedDisk config;
    std::unique_ptr<DiskLog> log;
    RangeLocks ranges;
    DiskObserver observer;
    // The active snapshot's copy-on-write for this disk, or null. Set and cleared only
    // with cut_lock_ exclusive, so a change (which holds it shared) reads it without more
    // synchronisation, and the object outlives every change that uses it.
    std::shared_ptr<DiskSnapshot> snapshot;
  };

  // An active snapshot: one DiskSnapshot per disk (options order), and whether the
  // snapshot resyncs each disk (SnapshotDisk::resync).
  struct VmSnapshot {
    std::vector<std::shared_ptr<DiskSnapshot>> disks;
    // Filled by StartSnapshot before it lets go of snapshot_ctl_mu_; read by EndSnapshot.
    std::vector<bool> resync;
  };

  // A cut, from WriteCutsLocked to FinishCut. tickets[i] is null for a disk that did not
  // take the cut (bitmap mode, or it fell back meanwhile).
  struct CutWrite {
    uint64_t cycle = 0;
    int64_t nanos = 0;
    int64_t first_change = 0;  // the cycle's first change (0: none)
    std::vector<std::unique_ptr<DiskLog::CutTicket>> tickets;
    bool any = false;  // some disk logged it
  };

  // Whether CutLocked cuts a VM without a change since its last cut.
  enum class CutWhen {
    kIfChanged,  // Cut(): an idle VM keeps its last cycle
    kAlways,     // CutTogether: every member of the group gets the group's cycle
  };

  Status Validate() const;
  // The steps of a cut. Cut, CutTogether and StartSnapshot run them with cut_mu_ held and
  // cut_lock_ exclusive (no change in flight), then FinishCut without cut_lock_.
  //
  // Finishes the pending fall backs (no change is in flight), so those disks get no cut.
  void FinishFallbacksLocked();
  // FinishFallbacksLocked, then whether a logging disk has a change since its last cut.
  bool ChangedSinceCutLocked();
  // The time for the next cut: now, or last_cut_nanos_ + 1 if the clock is not past it.
  int64_t NextCutNanosLocked() const;
  // Takes the next cycle number (not committed to last_cycle_: the caller does that) and
  // writes its cut record, at nanos (> last_cut_nanos_), to every logging disk.
  CutWrite WriteCutsLocked(int64_t nanos);
  // Cut and CutTogether: if when is kAlways or ChangedSinceCutLocked(), WriteCutsLocked
  // at nanos; if some disk logged the cut, commits its cycle and time (last_cycle_,
  // last_cut_nanos_) and returns it for FinishCut. Otherwise nothing is cut: nullopt.
  std::optional<CutWrite> CutLocked(CutWhen when, int64_t nanos);
  // What FinishCut does when some disk could not make its cut.
  enum class OnFailedCut {
    kReuseCycle,  // Cut, CutTogether: the cycle is given up, its number is used again
    kKeepCycle,   // StartSnapshot: the snapshot holds the cycle; the next is cycle + 1
  };
  // With cut_mu_ held, without cut_lock_: when every disk made its cut, publishes them
  // all and runs the sealed callback; when a disk could not, rolls the cycle back on
  // every disk (its blocks go into the next cycle). Returns, per disk, whether its
  // segment was published.
  std::vector<bool> FinishCut(CutWrite& cut, OnFailedCut on_failure);
  // Some disk's segments are sealed and not released yet: the cycle timer waits.
  bool HasUnreleased() const;
  // The active snapshot, after checking that [offset, offset + length) is inside disk
  // index (EINVAL otherwise, or without a snapshot).
  Result<std::shared_ptr<VmSnapshot>> SnapshotFor(size_t index, uint64_t offset, uint64_t length,
                                                  std::string_view what) const;
  Status Change(size_t index, RecordKind kind, uint64_t offset, uint64_t length,
                FunctionRef<Status()> apply);
  Status FlushDisk(size_t index);
  // Runs the second step of a pending bitmap fall back of disk i. Takes the VM lock
  // exclusively, so the caller holds none of the VmTracker's locks.
  void FinishFallback(size_t index);
  // Open: a cycle published on some disks but not all (a kill -9 between their Publish
  // calls) is rolled back on those, so that every disk holds the same cycles.
  Status RollBackUnfinishedCycle();
  void RequestCut();
  // While cuts are paced: lets the disks' activity logs shrink (takes cut_lock_
  // exclusively, only when one has grown past its bound).
  void TrimActivityLogs();
  void CutterLoop();
  void StopCutter();

  const VmTrackerOptions options_;
  std::vector<std::unique_ptr<Disk>> disks_;  // fixed after Open

  // Serialises Close. Lock order: close_mu_, snapshot_ctl_mu_, cut_mu_, cut_lock_, then a
  // disk's locks (its RangeLocks, then DiskLog's). Across trackers (CutTogether only): the
  // cut_mu_ of each member, then the cut_lock_ of each, each in address order; no other
  // path holds locks of two trackers.
  std::mutex close_mu_;
  bool close_done_ = false;  // guarded by close_mu_
  // Serialises StartSnapshot and EndSnapshot (and what they read of snapshot_: a snapshot
  // is published and withdrawn only with it held). Held while StartSnapshot cuts.
  std::mutex snapshot_ctl_mu_;
  // Protects snapshot_ (the pointer, not the object); a leaf. The readers of a snapshot
  // (ReadSnapshot, ...) copy the pointer and drop the lock; the object stays alive for
  // them, and DiskSnapshot::End makes them fail once EndSnapshot has run.
  mutable std::mutex snapshot_mu_;
  std::shared_ptr<VmSnapshot> snapshot_;
  // Serialises cuts, so cycle numbers are given out in the order cut records are queued
  // and sealed callbacks fire in cycle order (the callback runs with it held, so it must
  // not call Cut, CutTogether, Close, StartSnapshot or EndSnapshot). CutTogether holds the
  // cut_mu_ of several trackers, taken in address order, before any of their cut_lock_.
  std::mutex cut_mu_;
  // Shared by every change from its sequence number until its apply returns; exclusive
  // while Cut queues one cut record per disk (CutTogether: of several trackers at once,
  // taken in address order).
  CutLock cut_lock_;
  bool closed_ = false;                  // written with cut_lock_ exclusive, read with it shared
  std::atomic<uint64_t> last_cycle_{0};  // written with cut_mu_ held
  // Written with cut_mu_ held; only increases (NextCutNanosLocked, CutTogether).
  std::atomic<int64_t> last_cut_nanos_{0};
  // Wall-clock time of the first change since the last cut (0: none). Set by the first
  // change with cut_lock_ shared, taken and reset by Cut with it exclusive.
  std::atomic<int64_t> open_first_change_{0};

  std::mutex callback_mu_;  // protects callback_; a leaf
  std::function<void(uint64_t)> callback_;

  // The cutter thread: cuts every options_.cycle, but only once the previous cycle has been
  // released (shipped): a slow or cut link gives longer cycles, never more of them
  // (ReleaseThrough wakes it). cutter_mu_ protects the two flags; never held while cutting.
  std::mutex cutter_mu_;
  std::condition_variable cutter_cv_;
  bool cutter_stop_ = false;
  bool cut_requested_ = false;
  std::thread cutter_;
};

}  // namespace siterep::tracker
