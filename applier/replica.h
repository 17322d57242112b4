// Replica: one replicated VM on the secondary site. It keeps the segments the receiver
// hands it (SegmentSink), applies committed cycles to the replica images in order and
// whole, keeps recovery points (undo journal) and opens point-in-time views.
//
// Callers: control/ creates or opens one Replica per replica VM and wires it to the
// receiver (shipper/, through SegmentSink), to blockdev (PointView) and to status.
// Threads: the receiver calls WriteSegment/CommitCycle from its connection thread (at
// most one at a time; they are serialised anyway); the applier thread (Start) applies;
// Position, Points, Definition, OpenView, ExportPoint may be called from any thread.
// Consistency groups: control/ sets an apply gate (SetApplyGate) that the applying thread
// asks before each cycle, and reads CommittedCuts of the group's replicas to answer it.
//
// On disk, in `dir` (= <state_dir>/replicas/<vm>/):
//   replica.json                 the ReplicaDefinition (replica_state.h); present = the
//                                replica exists
//   lock                         flock'ed while a Replica has the folder open
//   position.json                received and applied position (replica_state.h)
//   <disk>.img                   the replica images (sparse when created here). May be
//                                symlinks to images elsewhere (Adopt of a demoted
//                                primary's own images): the applier opens them through the
//                                link and never replaces, renames or unlinks them; every
//                                other file above and below stays in dir itself.
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
// Failover (roles). Adopt makes dir a fresh replica over images already there (a site that
// was primary becomes the replica of the new primary), in sync or not. MaterializePoint
// turns the images into one recovery point for good, before the replica site's images
// become the primary's; DropState then removes the replica's state and keeps the images.
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
//   applier.adopt_after_remove      Adopt: old state removed, nothing new written
//   applier.adopt_before_definition Adopt: position.json written, replica.json not yet
//   applier.materialize_mid         after each block MaterializePoint wrote back (@skip)
//   applier.materialize_before_position  images written back and synced, not recorded
//   applier.materialize_before_drop  point recorded, received stream dropped, undo
//                                   journal not yet emptied
//   applier.drop_state_mid          DropState: replica.json removed, the rest not yet
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "applier/point_store.h"
#include "applier/point_view.h"
#include "applier/replica_state.h"
#include "applier/segment_check.h"
#include "applier/segment_sink.h"
#include "common/status.h"
#include "common/unique_fd.h"
#include "tracker/vm_tracker.h"

namespace siterep::applier {

// Bytes a sync of plan needs on the replica's file system beyond what it holds: per disk,
// what the plan may write (bytes_total) past the image's allocated bytes (allocated[i]);
// with undo (a sync that keeps the applied point readable, starting now) also room in the
// undo journal for every block the plan may overwrite (kUndoBlockSize and a record header
// each), since the journal saves a block before the sync overwrites it.
uint64_t SyncSpaceNeeded(const SyncPlan& plan, std::span<const uint64_t> allocated, bool undo);

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

  // Makes dir a fresh replica of def over images that are there already: <dir>/<disk>.img
  // must exist for every disk with exactly its size (a regular file or a symlink to one;
  // a symlink is kept as it is). Whatever replica state dir held is discarded
  // (replica.json, position.json, received/, undo/, temp files; replica.json first, and
  // the new one is written last, so until Adopt returns Ok, Open finds no replica and
  // Adopt again with the same arguments starts over: a crash at any moment is safe).
  // The position is fresh at def.epoch: nothing received, applied cycle 0, so a primary
  // whose new change log starts at cycle 1 can ship to it.
  //   in_sync_cut_unix_nanos set: the images ARE the primary's disks as of its cycle 0
  //     (a planned failover). Points() lists one latest point, id 0, with that cut time
  //     (a retained point too when def.recovery_points > 0); views of it work;
  //     Position().applied_cut_unix_nanos is that time. A later sync is staged.
  //   unset: the images are not a consistent copy. Points() is empty and views are
  //     refused (ENOENT) until a sync (sync_id >= 1, written directly) ends.
  // Refuses: an invalid def (EINVAL), a missing dir or image (ENOENT), an image that is not
  // a regular file (EINVAL) or not of its disk's size (EINVAL), dir open by a Replica
  // (EBUSY); nothing is changed then. The applier thread is not started.
  static Result<std::unique_ptr<Replica>> Adopt(const std::filesystem::path& dir,
                                                const ReplicaDefinition& def,
                                                std::optional<int64_t> in_sync_cut_unix_nanos);

  // Removes every file a Replica keeps in dir - replica.json (first, synced: its presence
  // means "a replica exists here"), position.json, received/, undo/, temp files (*.tmp),
  // then the lock file - and keeps the images <disk>.img (files or symlinks, and their
  // targets) untouched. The folder is fsync'd at the end. For a replica that is not open
  // (EBUSY if a Replica holds dir); a missing dir or a dir with no state is Ok
  // (idempotent). Used when a replica site is promoted and its images become the
  // primary's.
  static Status DropState(const std::filesystem::path& dir);

  ~Replica() override;  // Stop()s
  Replica(const Replica&) = delete;
  Replica& operator=(const Replica&) = delete;

  // Takes a definition from the primary for an open replica (what Create does for an
  // existing one): same VM and disks, epoch not older; stores epoch and settings.
  Status UpdateDefinition(const ReplicaDefinition& def);
  ReplicaDefinition Definition() const;
  const std::filesystem::path& dir() const { return dir_; }
  // <dir>/<disk>.img of the disk_index-th disk of the definition: the path the replica
  // opens, which is the symlink itself when the image is one (not its target).
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

  // --- Consistency groups. The VMs of a group (ReplicaDefinition::consistency_group) are
  // cut by their primary at the same instants; a member's images must never run past a
  // group instant another member has not received, so that one instant stays reachable
  // for all by applying pending cycles. control/ decides that across the replicas; these
  // are its hooks.

  // Returns whether the committed cycle `next` may be applied now.
  using ApplyGate = std::function<bool(const CycleInfo& next)>;
  // Sets the apply gate (null: none, every cycle goes through; the default), replacing the
  // previous one; a held cycle is asked about again at once. The gate is asked before each
  // committed cycle is applied - by the applier thread, by ApplyPending and by the applies
  // BeginSync makes before a sync - with that cycle's CycleInfo. true: the cycle is
  // applied. false: it is held, and so are the ones after it: the applier thread asks
  // again at least every 100 ms and at once on Wake(); ApplyPending returns Ok having
  // applied the cycles before it; BeginSync lets the sync replace it and the ones after.
  // Not asked about a cycle whose apply was interrupted (position.json's applying_cycle,
  // after an error or a crash): the images hold part of it already, and only finishing it
  // makes them a point again; the gate let it through when it started.
  //
  // Locks: the gate runs on the applying thread (the applier thread, the caller of
  // ApplyPending, the receiver's thread in BeginSync) holding this replica's apply lock
  // (apply_mu_; in BeginSync also its receive lock, recv_mu_), never mu_, persist_mu_ or a
  // PointStore lock. So it may call CommittedCuts, CycleAtCut, ApplyHeld, Position,
  // Definition, Points, Wake and SetApplyGate of this replica and of any other (each takes
  // a mu_ briefly). It must not call, or wait for a thread that is calling, what takes this
  // replica's apply or receive lock: ApplyPending, Stop (joins the applier thread),
  // BeginSync and the other SegmentSink calls, MaterializePoint, ChangedSince. It should
  // answer quickly: a sync or failover of this replica waits for it.
  void SetApplyGate(ApplyGate gate);
  // Makes the applier thread ask the gate about a held cycle again now (e.g. another
  // member of the group committed a cycle). Cheap; any thread; a no-op when nothing is held.
  void Wake();
  // True while the next committed cycle is held: a gate is set, its last answer about that
  // cycle was false, and the cycle is still the next (not applied, not replaced by a sync).
  // Also Position().apply_held.
  bool ApplyHeld() const;
  // Cut times (unix nanos) of the replica's latest point, then of every committed cycle not
  // yet applied, oldest first: every instant the images are at or can reach by applying.
  // The latest point is the applied cycle when it is one (as Points() lists it: not before
  // the first cycle of images that are no point, nor during a direct sync; also while an
  // interrupted apply is unfinished). During a sync no cycle is pending; during a
  // MaterializePoint the list is empty. Memory only (takes mu_ briefly).
  std::vector<int64_t> CommittedCuts() const;
  // The cycle of CommittedCuts() whose cut time is exactly cut_unix_nanos: the latest point
  // or a committed cycle not yet applied. nullopt if none. Memory only.
  std::optional<uint64_t> CycleAtCut(int64_t cut_unix_nanos) const;

  // Makes the images exactly recovery point point_id for good (a failover to that point):
  // point_id is a retained point or the latest point's id, from Points() (not
  // kLatestPoint: EINVAL; the caller must record which point it is making). The blocks
  // the undo files of point_id and of newer points hold are written back with their
  // content as of point_id, the images fdatasync'd, and only then is the replica recorded
  // at point_id: applied_cycle = received_cycle = point_id (its cut time), nothing
  // pending, received/ emptied, apply_error cleared; the undo journal is emptied, so
  // Points() lists only point_id (latest; retained too when recovery_points > 0). The
  // latest point with nothing to write back costs only that record (the images are not
  // touched). The segment continuity (per disk last seq) is kept only when point_id is
  // the received cycle; otherwise the replica takes segments again only after a sync.
  //
  // Needs: the applier stopped (Stop() called, or never started), no unfinished sync, no
  // open view (each EBUSY). ENOENT for an unknown point. EBUSY for the latest point when an
  // interrupted apply left the images between it and the next cycle and the journal
  // cannot give it back (recovery_points 0, or the latest point not retained): apply the
  // pending cycles first (ApplyPending) and materialize the new latest point, or choose an
  // older point. (Where the journal can, an interrupted apply is undone too.)
  //
  // Crash safety: from the first image write until it returns Ok, position.json records
  // that point_id is being materialized. Meanwhile (and after a restart, Open) the images
  // are neither the old point nor point_id: Points() is empty, views are refused (EBUSY),
  // nothing is applied or received, a sync is refused, MaterializePoint of another point
  // is refused (EBUSY). MaterializePoint(point_id) again - in this process after an error,
  // or after Open following a crash at any moment - writes back again from the journal,
  // which stays whole until the new position is recorded, and finishes. So a caller that
  // recorded "materializing P" before calling must, after a crash, Open and call
  // MaterializePoint(P) before anything reads the images; with that, the images are P.
  Status MaterializePoint(uint64_t point_id);

  // The blocks of each disk (in definition order) that may differ between recovery point
  // point_id and everything this replica received: the blocks of every cycle applied after
  // the point (the undo journal's saved blocks of the point and every newer chain point),
  // the blocks of committed cycles received but not yet applied (their segments' records,
  // writes and discards), and, if an apply was interrupted, what that apply may have
  // written. kSnapshotBlockSize-aligned (tracker/vm_tracker.h ByteRange, 64 KiB; the last
  // range may end at the disk's size), sorted, merged. ENOENT for an unknown point; for the
  // latest point only the received-but-unapplied part. Call with the applier stopped (or
  // never started).
  //
  // Details (replica_changed.cc):
  //  - point_id is a retained point or the latest point, from Points(): ENOENT otherwise
  //    (also for a point only a view keeps), EINVAL for kLatestPoint (name it by its id).
  //  - Applied cycles count through the undo journal, which saves a block before its first
  //    overwrite: a write's covering blocks always, a discard's only where they held data
  //    (a discard of blocks that already read as zeros changed nothing and is not listed);
  //    writes and discards of a staged or direct sync are in the journal the same way.
  //    Committed, unapplied cycles count with their records' whole ranges (discards too).
  //    Segments being received or received but not committed are not included: the
  //    primary still holds those cycles (they were never acknowledged, received_cycle).
  //  - A committed segment that is missing or fails the applier's checks (a bad record
  //    stopped the apply) cannot tell what it changes: that disk is reported whole
  //    ([0, size)) and a warning logged. Other read errors are returned.
  //  - The latest point includes what an interrupted apply may have written (the
  //    interrupted cycle is still pending; its records' ranges cover it).
  //  - Needs the applier stopped: EBUSY while the thread runs. Receiving is held off
  //    while it runs (it takes the receive lock), so the answer is one consistent state.
  //  - While MaterializePoint(M) is unfinished only ChangedSince(M) is answered (EBUSY for
  //    others), and it gives what it gave before the materialization began. Once
  //    MaterializePoint(point_id) has returned Ok the journal and the received stream are
  //    gone: the answer is empty from then on, so record it BEFORE materializing.
  Result<std::vector<std::vector<tracker::ByteRange>>> ChangedSince(uint64_t point_id) const;

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
  // record) or else the last retryable error, "" once a cycle applies again; apply_held is
  // ApplyHeld().
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
  // A segment being received: its records are checked as its chunks arrive, and the
  // kernel is asked to start writing each kWritebackStep bytes back as soon as they are
  // in, so the fdatasync at its end finds little left to write.
  static constexpr uint64_t kWritebackStep = uint64_t{8} << 20;
  struct Incoming {
    uint64_t number = 0;
    uint64_t written = 0;
    UniqueFd fd;
    SegmentChecker check;
    uint64_t epoch = 0;         // the replica's epoch when the segment started
    uint64_t written_back = 0;  // bytes handed to sync_file_range
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
  // Takes the folder's flock (dir/lock, created if missing); EBUSY when a Replica has it.
  static Result<UniqueFd> LockDir(const std::filesystem::path& dir);
  static Result<std::unique_ptr<Replica>> OpenLocked(const std::filesystem::path& dir,
                                                     UniqueFd lock_fd);
  // replica_role.cc: refuses (error Status) while a materialization is unfinished; what is
  // the refused operation, for the message. Needs mu_.
  Status RefuseWhileMaterializingLocked(const std::string& what) const;
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
  enum class ApplyStep {
    kApplied,  // the oldest committed cycle was applied
    kNone,     // nothing to apply (no committed cycle, or a sync is unfinished)
    kHeld,     // the apply gate holds the oldest committed cycle
  };
  void ApplierLoop();
  // Asks the gate about the oldest committed cycle, then applies it. Needs apply_mu_.
  Result<ApplyStep> ApplyNext();
  // Needs mu_.
  bool ApplyHeldLocked() const;
  // Is the applied cycle a recovery point (see CommittedCuts)? Needs mu_.
  bool AppliedIsPointLocked() const;
  Status ApplyCycle(const PendingCycle& cycle, const ReplicaDefinition& def);
  Status CheckCycle(const PendingCycle& cycle, const ReplicaDefinition& def) const;
  Status WriteCycle(const PendingCycle& cycle, const ReplicaDefinition& def);
  void DeleteSegments(const PendingCycle& cycle, const ReplicaDefinition& def);

  // replica_sync.cc. All need recv_mu_.
  // Applies the committed cycles older than sync_id (apply_mu_ held too); a failure is
  // logged and returned, the caller drops what is left.
  Status ApplyBeforeSync(uint64_t sync_id);
  // Refuses ENOSPC when the folder's file system cannot take plan's data (SyncSpaceNeeded;
  // undo: a staged sync starting now).
  Status CheckSyncSpace(const SyncPlan& plan, bool undo) const;
  // Forgets the received stream: segments being received, uncommitted and committed ones.
  void DropReceived();
  // Records the disk's in-memory progress (after syncing its image) when it is due.
  Status NoteSyncProgress(size_t disk);

  const std::filesystem::path dir_;
  const UniqueFd lock_fd_;  // holds the flock on dir_/lock
  const std::shared_ptr<PointStore> store_;

  // Lock order: apply_mu_, recv_mu_, persist_mu_, mu_, then PointStore's lock. mu_ is
  // never held across I/O.
  // mutable: ChangedSince (const) holds them to see one consistent state.
  mutable std::mutex apply_mu_;  // one apply at a time (the thread or ApplyPending)
  mutable std::mutex recv_mu_;   // serialises the SegmentSink calls; protects incoming_
  std::mutex persist_mu_;        // serialises writes of position.json and replica.json
  // protects def_, state_, staged_, transient_error_, stop_, gate_, held_cycle_, wakes_
  mutable std::mutex mu_;
  // applier wake-up: a commit, Stop, ClearApplyError, Wake, SetApplyGate
  std::condition_variable cv_;
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
  // The apply gate (shared: ApplyNext calls its copy without mu_ while SetApplyGate may
  // replace it); the cycle it last held (0: none; cycles start at 1); the number of Wake()s
  // and gate changes, so that one coming while the gate is asked is not lost.
  std::shared_ptr<const ApplyGate> gate_;
  uint64_t held_cycle_ = 0;
  uint64_t wakes_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace siterep::applier
