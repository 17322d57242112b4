// The replica's small durable state files: replica.json (the ReplicaDefinition) and
// position.json (what was received and what was applied), with their JSON encodings.
//
// Used by applier::Replica only (replica.cc, replica_apply.cc); the functions here do no
// locking and hold no state. Both files are written with WriteFileAtomic (temp file,
// fsync, rename, fsync of the folder), so a crash leaves the old or the new version.
//
// position.json holds both sides of the replica in one file, written by whoever changes
// it (the receiver in CommitCycle, the applier after a cycle) under Replica's persist lock:
//   received_cycle   every segment through this cycle is durable (what may be acked)
//   disks[]          per disk: last committed segment number and last seq (continuity)
//   pending[]        committed cycles not yet applied, oldest first: their CycleInfo, the
//                    epoch they were received under, and per disk the segment's number,
//                    byte count and seq range (the applier checks them again)
//   applying_cycle   set before the applier first writes a cycle's blocks to the images and
//                    cleared with applied_cycle: after a crash it says that the images may
//                    hold part of that cycle (no view of the latest point until re-applied)
//   applied_cycle, applied_cut_unix_nanos, applied_first_change_unix_nanos
//   apply_error      a bad record stopped the apply (kept across restarts)
//   last_sync_id     the cycle of the last sync that ended (0: none); EndSync again with it
//                    is a no-op
//   cycle0_is_point  Replica::Adopt of images in sync with the primary's cycle 0: applied
//                    cycle 0 is a consistent point (otherwise applied_cycle 0 is no point)
//   materialize      only while a MaterializePoint is unfinished (replica.h): the point
//                    (and its cut time) the images are being rewritten into; nothing may
//                    read or apply to the images until MaterializePoint of it ends
//   sync             only while a sync is unfinished (replica_sync.cc): the plan (sync_id,
//                    kind, epoch, cut, per disk mode/last_seq/last_segment/bytes_total), how
//                    it writes (staged: the applied cycle stays readable through the undo
//                    journal; direct: no consistent point until it ends), and per disk the
//                    durable done_offset and written_until (an upper bound of every offset a
//                    sync, this one or an older unfinished one, has changed in the image)
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "applier/segment_sink.h"
#include "common/status.h"

namespace siterep::applier {

inline constexpr char kDefinitionFile[] = "replica.json";
inline constexpr char kPositionFile[] = "position.json";

// Checks what a definition must hold before a replica is made from it: a VM name, at least
// one disk, disk names usable as file names, unique names and ids, sizes > 0; a
// consistency group name, if any, usable as a file name (like the VM name).
Status ValidateDefinition(const ReplicaDefinition& def);

// consistency_group is written only when it is set, and read as "" when the key is absent
// (a replica.json from before groups).
std::string DefinitionToJson(const ReplicaDefinition& def);
// `where` names the file for error messages.
Result<ReplicaDefinition> DefinitionFromJson(const std::string& text, const std::string& where);

// Same VM and the same disks (name, id, size, in order)?
bool SameVmAndDisks(const ReplicaDefinition& a, const ReplicaDefinition& b);

struct DiskReceived {
  uint64_t last_segment = 0;  // number of the last committed segment (0: none yet)
  uint64_t last_seq = 0;      // seq of its last record
};

struct PendingSegment {
  uint64_t number = 0;
  uint64_t bytes = 0;
  uint64_t first_seq = 0;
  uint64_t last_seq = 0;
};

struct PendingCycle {
  CycleInfo info;
  uint64_t min_epoch = 0;                // the replica's epoch when it was received
  std::vector<PendingSegment> segments;  // one per disk, in definition order
};

struct SyncDiskState {
  SyncMode mode = SyncMode::kCopy;
  uint64_t last_seq = 0;      // from the plan: the primary's log as of the cut
  uint64_t last_segment = 0;  //
  uint64_t bytes_total = 0;   //
  // Below this offset the image equals the snapshot and is durable.
  uint64_t done_offset = 0;
  // No sync has changed the image at or above this offset. Recorded before a write passes
  // it (so it may run ahead of what was written; too high is safe, too low is not).
  uint64_t written_until = 0;
  // written_until of the unfinished syncs this one replaced (what BeginSync reports).
  uint64_t older_written_until = 0;
};

struct SyncState {
  uint64_t sync_id = 0;
  SyncKind kind = SyncKind::kInitial;
  uint64_t epoch = 0;
  int64_t cut_unix_nanos = 0;
  // Staged: the applied cycle (point) stays readable until the sync ends; direct: the
  // replica has no consistent point meanwhile.
  bool staged = false;
  uint64_t point = 0;                // staged: the applied cycle kept readable
  uint64_t bytes_written = 0;        // data bytes written by this sync (as of the last update)
  std::vector<SyncDiskState> disks;  // one per disk, in definition order
};

// An unfinished Replica::MaterializePoint.
struct MaterializeState {
  uint64_t point = 0;
  int64_t cut_unix_nanos = 0;
};

struct PositionState {
  uint64_t received_cycle = 0;
  uint64_t applying_cycle = 0;  // 0: the images are exactly applied_cycle
  uint64_t applied_cycle = 0;
  int64_t applied_cut_unix_nanos = 0;
  int64_t applied_first_change_unix_nanos = 0;
  std::string apply_error;
  std::vector<DiskReceived> disks;    // one per disk, in definition order
  std::vector<PendingCycle> pending;  // oldest first
  uint64_t last_sync_id = 0;
  std::optional<SyncState> sync;  // an unfinished sync
  // Applied cycle 0 is a consistent point (Adopt in sync); meaningless once it is not 0.
  bool cycle0_is_point = false;
  std::optional<MaterializeState> materialize;  // an unfinished MaterializePoint
};

// A fresh SyncState for plan: nothing done, nothing written.
SyncState SyncStateFor(const SyncPlan& plan);

// May plan be a sync of the replica defined by def? Its disks must be def's (ids, in
// order; bytes_total not above the disk's size), its epoch not older than def's (ESTALE),
// its sync_id not 0. Refusals name what is wrong.
Status CheckSyncPlan(const SyncPlan& plan, const ReplicaDefinition& def);

std::string PositionToJson(const PositionState& state, const ReplicaDefinition& def);
// Disks are matched by name; a disk of def missing from the file is an error.
Result<PositionState> PositionFromJson(const std::string& text, const ReplicaDefinition& def,
                                       const std::string& where);

Result<ReplicaDefinition> LoadDefinition(const std::filesystem::path& dir);
Status StoreDefinition(const std::filesystem::path& dir, const ReplicaDefinition& def);
Result<PositionState> LoadPosition(const std::filesystem::path& dir, const ReplicaDefinition& def);
Status StorePosition(const std::filesystem::path& dir, const PositionState& state,
                     const ReplicaDefinition& def);

}  // namespace siterep::applier
