// Replica: one replicated VM on the secondary site. It keeps the segments the receiver
// hands it (SegmentSink), applies committed cycles to the replica images in order and
// whole, keeps recovery points (undo journal) and opens point-in-time views.
//
// Callers: control/ creates or opens one Replica per replica VM and wires it to the
// receiver (shipper/, through SegmentSink), to blockdev (PointView) and to status.
// Threads: the receiver calls WriteSegment/CommitCycle from its connection thread (at
// most one at a time; they are serialised anyway); the applier thread (Start) applies;
// Position, Points, Definition, OpenView, ExportPoint may be called from any thread.
//
// On disk, in `dir` (= <state_dir>/replicas/<vm>/):
//   replica.json                 the ReplicaDefinition (replica_state.h); present = the
//                                replica exists
//   lock                         flock'ed while a Replica has the folder open
//   position.json                received and applied position (replica_state.h)
//   <disk>.img                   the replica images (sparse when created here)
//   received/<disk>/<20-digit segment number>.seg
//                                segments received durably: written as .seg.part, checked
//                                when the last chunk arrives, fdatasync'd, renamed, folder
//                                fsync'd. Deleted once their cycle is applied; at Open,
//                                files no committed cycle needs (an uncommitted cycle: the
//                                primary sends it again) are deleted.
//   undo/points.json, undo/<20-digit cycle>.undo
//                                the undo journal of the recovery points (undo_journal.h)
//
// Applying cycle C (replica_apply.cc): every record of every disk's segment is checked
// again (CRC, disk id, bounds, epoch, seq range, cut of C); a bad record stops the apply
// with a persistent apply_error and nothing of C is written. Then applying_cycle = C is
// recorded, the blocks C overwrites are saved in the undo journal and synced, the
// records are written to the images, the images fdatasync'd, applied_cycle = C recorded
// (with its cut time), the point policy run, and the segments deleted. A crash at any
// moment leaves images that re-applying from applied_cycle turns into C exactly, and undo
// files that already hold every block C overwrote (the journal never saves a block twice,
// so a re-apply cannot capture C's data as old).
//
// Syncs (replica_sync.cc; the calls are described in segment_sink.h): BeginSync applies
// the committed cycles older than the plan, drops what is left of the received stream and
// records the sync in position.json; from then on until EndSync nothing is applied and no
// segment is taken. The images are written in place, "staged" when the replica has a
// latest point P (P stays readable: the old blocks go into P's undo file first, see
// point_store.h) or "direct" when it has none (no point until EndSync). Progress (done
// offsets) is recorded every 64 MiB or second, after the image's fdatasync; EndSync makes
// the images cycle sync_id in one position update. A restart keeps the sync; BeginSync
// with the same sync_id resumes it.
//
// Failpoints (common/failpoint.h; "error" makes the apply fail there, "abort" crashes):
//   applier.before_apply     after the checks, before anything is written
//   applier.after_undo       undo saved and synced, images untouched
//   applier.mid_apply        after each record written to an image (use @skip)
//   applier.before_position  images synced, applied position not yet recorded
//   applier.before_point     applied position recorded, point policy not yet run
//   applier.before_delete    point policy run, applied segments not yet deleted
//   applier.sync_mid_write   a sync's block written to the image, progress not yet noted
//   applier.sync_before_end  EndSync: images synced, the sync's end not yet recorded
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "applier/point_store.h"
#include "applier/point_view.h"
#include "applier/replica_state.h"
#include "applier/segment_sink.h"
#include "common/status.h"
#include "common/unique_fd.h"

namespace siterep::applier {

class Replica : public SegmentSink {
 public:
  // Creates the replica in dir, or opens the one there. Missing images are created sparse
  // with their disk's size; an existing image of exactly that size is kept (a seed copy),
  // any other size is refused. A replica already in dir must have the same VM and disks
  // (EEXIST otherwise); its epoch must not be newer than def.epoch (EPERM "epoch N is
  // older than the replica's M"); a newer def.epoch and the other settings are stored.
  static Result<std::unique_ptr<Replica>> Create(const std::filesystem::path& dir,
                                                 const ReplicaDefinition& def);
  // Opens the replica in dir after a restart. The applier thread is not started.
  static Result<std::unique_ptr<Replica>> Open(const std::filesystem::path& dir);
  ~Replica() override;  // Stop()s
  Replica(const Replica&) = delete;
  Replica& operator=(const Replica&) = delete;

  // Takes a definition from the primary for an open replica (what Create does for an
  // existing one): same VM and disks, epoch not older; stores epoch and settings.
  Status UpdateDefinition(const ReplicaDefinition& def);
  ReplicaDefinition Definition() const;
  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path ImagePath(size_t disk_index) const;

  // Starts the applier thread: it applies committed cycles as they arrive. After an
  // error other than a bad record it tries again with a growing delay (up to 30 s).
  // Idempotent; fails only if the thread cannot be made.
  Status Start();
  // Stops the applier thread after the cycle it is applying. Idempotent.
  void Stop();
  // Applies every committed cycle now, on the caller's thread; the first error stops it
  // and is returned. Fails at once while a persistent apply_error is set.
  Status ApplyPending();
  // Forgets a persistent apply_error (after the operator dealt with it, e.g. a resync),
  // so the apply is tried again.
  Status ClearApplyError();

  std::vector<RecoveryPoint> Points() const;
  // A view of point_id (a cycle from Points(), or kLatestPoint). ENOENT: no such point.
  Result<std::unique_ptr<PointView>> OpenView(uint64_t point_id);
  // Writes disk disk_index as of point_id to out_file (sparse where zero).
  Status ExportPoint(uint64_t point_id, size_t disk_index, const std::filesystem::path& out_file);
  // Bytes held by the undo journal.
  uint64_t undo_bytes() const { return store_->undo_bytes(); }

  // SegmentSink
  Status WriteSegment(uint32_t disk_id, uint64_t number, uint64_t offset,
                      std::span<const std::byte> data, bool last) override;
  Status CommitCycle(const CycleInfo& cycle) override;
  // pending_bytes counts the committed segments not yet applied (not a segment still
  // arriving or received but uncommitted); apply_error is the persistent one (a bad
  // record) or else the last retryable error, "" once a cycle applies again.
  ReplicaPosition Position() const override;

  // Syncs (replica_sync.cc). BeginSync refuses a sync_id older than the applied cycle
  // (EINVAL); the sync_id of the applied cycle, with no sync unfinished, is a sync that
  // has ended already: every disk is reported done. EndSync is a no-op for the last sync
  // that ended and for the applied cycle (while no sync is unfinished).
  Result<SyncResume> BeginSync(const SyncPlan& plan) override;
  Result<std::vector<uint64_t>> SyncHashes(uint32_t disk_id, uint64_t offset,
                                           uint32_t count) override;
  Result<uint64_t> WriteSyncData(uint32_t disk_id, uint64_t offset, std::span<const std::byte> data,
                                 uint64_t zero_length, uint64_t done_to) override;
  Status EndSync(uint64_t sync_id, int64_t cut_unix_nanos) override;
  SyncStatus Sync() const override;

 private:
  // A segment being received (receiver thread only, under recv_mu_).
  struct Incoming {
    uint64_t number = 0;
    uint64_t written = 0;
    UniqueFd fd;
  };
  // A segment received whole but not yet committed.
  struct Staged {
    uint64_t number = 0;
    uint64_t bytes = 0;
    uint64_t first_seq = 0;
    uint64_t last_seq = 0;
    uint64_t cycle = 0;  // of its cut
    int64_t cut_unix_nanos = 0;
    int64_t first_change_unix_nanos = 0;
    uint64_t min_epoch = 0;  // the epoch rule it was checked against
  };

  Replica(std::filesystem::path dir, UniqueFd lock_fd, ReplicaDefinition def, PositionState state,
          std::shared_ptr<PointStore> store);
  static Result<std::unique_ptr<Replica>> OpenLocked(const std::filesystem::path& dir,
                                                     UniqueFd lock_fd);
  std::filesystem::path ReceivedDir(size_t disk_index) const;
  std::filesystem::path PartPath(size_t disk_index, uint64_t number) const;
  std::optional<size_t> DiskIndex(uint32_t disk_id) const;
  // Deletes received files no committed, unapplied cycle refers to.
  Status CleanReceived();
  // Writes position.json from state_ changed by `change`, then installs it in memory.
  // Takes persist_mu_ then mu_; `change` runs under mu_ and must not block.
  Status UpdatePosition(const std::function<void(PositionState&)>& change);
  Status WriteSegmentLocked(size_t disk, uint64_t number, uint64_t offset,
                            std::span<const std::byte> data, bool last);
  Status FinishSegment(size_t disk, Incoming& in);
  void DropIncoming(size_t disk);

  // replica_apply.cc
  void ApplierLoop();
  // Applies the oldest committed cycle; false when there is none. Needs apply_mu_.
  Result<bool> ApplyNext();
  Status ApplyCycle(const PendingCycle& cycle, const ReplicaDefinition& def);
  Status CheckCycle(const PendingCycle& cycle, const ReplicaDefinition& def) const;
  Status WriteCycle(const PendingCycle& cycle, const ReplicaDefinition& def);
  void DeleteSegments(const PendingCycle& cycle, const ReplicaDefinition& def);

  // replica_sync.cc. All need recv_mu_.
  // Applies the committed cycles older than sync_id (apply_mu_ held too); a failure is
  // logged and returned, the caller drops what is left.
  Status ApplyBeforeSync(uint64_t sync_id);
  // Refuses ENOSPC when the folder's file system cannot take plan's data.
  Status CheckSyncSpace(const SyncPlan& plan) const;
  // Forgets the received stream: segments being received, uncommitted and committed ones.
  void DropReceived();
  // Records the disk's in-memory progress (after syncing its image) when it is due.
  Status NoteSyncProgress(size_t disk);

  const std::filesystem::path dir_;
  const UniqueFd lock_fd_;  // holds the flock on dir_/lock
  const std::shared_ptr<PointStore> store_;

  // Lock order: apply_mu_, recv_mu_, persist_mu_, mu_, then PointStore's lock. mu_ is
  // never held across I/O.
  std::mutex apply_mu_;         // one apply at a time (the thread or ApplyPending)
  std::mutex recv_mu_;          // serialises the SegmentSink calls; protects incoming_
  std::mutex persist_mu_;       // serialises writes of position.json and replica.json
  mutable std::mutex mu_;       // protects def_, state_, staged_, transient_error_, stop_
  std::condition_variable cv_;  // applier wake-up: a commit, Stop, ClearApplyError
  ReplicaDefinition def_;
  PositionState state_;                            // as in position.json
  std::vector<std::optional<Incoming>> incoming_;  // per disk
  std::vector<std::optional<Staged>> staged_;      // per disk
  std::string transient_error_;  // last apply error that is worth retrying ("" if none)
  // The unfinished sync's progress not yet recorded in state_.sync (per disk: the done_to
  // the sender reported) and the data bytes written; under mu_ for Sync(), written under
  // recv_mu_ too.
  std::vector<uint64_t> sync_done_to_;
  uint64_t sync_bytes_written_ = 0;
  // Under recv_mu_: when the sync's progress was last recorded; the SyncHashes buffer.
  std::chrono::steady_clock::time_point sync_noted_at_;
  std::vector<std::byte> hash_buffer_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace siterep::applier
