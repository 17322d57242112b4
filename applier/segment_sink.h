// SegmentSink: how the receiver (shipper/) hands a replica the change-log segments it
// receives from the primary, and learns what it may acknowledge.
//
// One SegmentSink per replica VM, owned by applier/ (applier::Replica implements it).
// The receiver calls it from its connection thread; at most one connection feeds a sink
// at a time (the receiver refuses a second one for the same VM). Position() may be
// called from any thread.
//
// The stream a sink sees, per connection, after the handshake:
//   WriteSegment(disk, n, 0, ...), WriteSegment(disk, n, off, ...), ..., last = true
//   ... the segment of every disk of the VM for cycle C ...
//   CommitCycle(C)
//   ... cycle C+1 ...
// Segments are the files the primary's tracker sealed (tracker/log_format.h): a plain
// sequence of records, ending in the cut record of their cycle. A transfer interrupted by
// a disconnect is simply sent again from offset 0 on the next connection.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace siterep::applier {

// A disk of a replicated VM, as the primary defines it.
struct DiskDefinition {
  std::string name;
  uint32_t disk_id = 0;  // tracker::DiskIdFor(vm, name)
  uint64_t size = 0;     // bytes
};

// What the primary sends when replication of a VM starts; enough to create the replica.
struct ReplicaDefinition {
  std::string vm;
  std::string primary_site;
  uint64_t epoch = 1;
  std::vector<DiskDefinition> disks;
  int recovery_points = 0;                       // additional points kept
  int64_t recovery_point_interval_ms = 3600000;  // spacing of the additional points
  int64_t frequency_ms = 300000;                 // the primary's cycle (for RPO budgets)
  // The consistency group the VM belongs to ("" = none); the same name rules as vm. Its
  // members are cut by their primary at the same instants; control/ keeps the replicas of
  // a group at a common point through Replica::SetApplyGate (replica.h).
  std::string consistency_group;
};

struct CycleInfo {
  uint64_t cycle = 0;
  int64_t cut_unix_nanos = 0;           // when the primary cut it
  int64_t first_change_unix_nanos = 0;  // first change of the cycle (0: no change)
};

// Where the replica stands. received_cycle: every segment through this cycle is durable
// on the replica (what the receiver acknowledges). applied_cycle: the replica images are
// this cycle's recovery point. apply_error: non-empty once the apply stopped on a bad
// record (the replica stays at applied_cycle; health Critical). apply_held: the next
// committed cycle is held by the replica's apply gate (a consistency group waits for
// another member; not an error).
struct ReplicaPosition {
  uint64_t epoch = 0;
  uint64_t received_cycle = 0;
  uint64_t applied_cycle = 0;
  int64_t applied_cut_unix_nanos = 0;
  uint64_t pending_bytes = 0;  // received, not yet applied
  std::string apply_error;
  bool apply_held = false;
};

// --- Sync: initial copy, seeded enable, resync -------------------------------------------
//
// A sync brings the replica images to the primary's disks as of one cut (cycle
// sync_id): the primary's tracker took a copy-on-write snapshot at that cut (tracker/
// snapshot.h) and the shipper streams it, disk after disk, in increasing offsets. Delta
// replication (segments of cycles > sync_id) resumes once the sync has ended.
//
// The stream a sink sees (one connection; a reconnect starts again at BeginSync, and the
// sink tells where each disk stands so that nothing already durable is sent again):
//   BeginSync(plan) -> per disk: done_offset (same sync_id) / written_until (older one)
//   for each disk, in increasing offsets:
//     SyncHashes(disk, offset, count)            (compare mode: the primary asks first)
//     WriteSyncData(disk, offset, data | zeros, done_to)
//   EndSync(sync_id, cut)                        -> the images are cycle sync_id
//
// Hashes: XXH3-64 of each kSyncBlockSize block (the last block of a disk: of its bytes
// within the disk). Both sides hash the same way (common/block_hash.h).

inline constexpr uint64_t kSyncBlockSize = 64 * 1024;

enum class SyncKind { kInitial, kSeeded, kResync };
std::string_view SyncKindName(SyncKind kind);  // "initial" | "seeded" | "resync"

enum class SyncMode {
  kCopy,     // send every block that is not zero; zero ranges go as zero extents
  kCompare,  // hash-compare every block of the listed ranges; send only the ones that differ
};

struct SyncDiskPlan {
  uint32_t disk_id = 0;
  SyncMode mode = SyncMode::kCopy;
  // The primary's log of this disk as of the cut: seq of its last record and number of its
  // last segment, so the segments of the next cycles continue where the sync left off.
  uint64_t last_seq = 0;
  uint64_t last_segment = 0;
  uint64_t bytes_total = 0;  // bytes the primary will scan (for progress and space checks)
};

struct SyncPlan {
  uint64_t sync_id = 0;  // the cycle of the snapshot's cut
  SyncKind kind = SyncKind::kInitial;
  int64_t cut_unix_nanos = 0;
  uint64_t epoch = 0;
  std::vector<SyncDiskPlan> disks;  // one per disk of the definition, in its order
};

// Where one disk of the replica stands when a sync (re)starts.
struct SyncDiskResume {
  uint32_t disk_id = 0;
  // Same sync_id as the unfinished sync the replica holds: everything below this offset
  // is durable and equal to the snapshot; the primary continues from here. Else 0.
  uint64_t done_offset = 0;
  // An unfinished sync with another sync_id wrote blocks below this offset: a kCopy plan
  // must compare (not skip, not trust zeros) below it. 0 when the images were not touched.
  uint64_t written_until = 0;
};

struct SyncResume {
  std::vector<SyncDiskResume> disks;  // in definition order
};

// The replica's view of a sync in progress, for status.
struct SyncStatus {
  bool active = false;
  uint64_t sync_id = 0;
  SyncKind kind = SyncKind::kInitial;
  uint64_t bytes_done = 0;   // sum of the disks' durable done offsets
  uint64_t bytes_total = 0;  // sum of the disk sizes
  uint64_t bytes_written = 0;  // data bytes written into the images by this sync
};

class SegmentSink {
 public:
  virtual ~SegmentSink() = default;

  // Stores data at [offset, offset + size) of segment `number` of the disk with disk_id.
  // Chunks of a segment come in order; offset 0 starts the segment afresh (dropping a
  // partial copy left by an interrupted transfer). On last == true the segment is
  // complete: the sink checks every record in it (CRC, disk id, offset + length within
  // the disk, epoch not older than the replica's, seq continuing the previous segment,
  // ending in a cut) and makes it durable. Any refusal is an error Status naming what was
  // wrong; the receiver then drops the connection and the segment is not kept.
  virtual Status WriteSegment(uint32_t disk_id, uint64_t number, uint64_t offset,
                              std::span<const std::byte> data, bool last) = 0;

  // Every disk's segment for cycle.cycle has been written (last == true): checks that
  // each disk's newest segment ends in this cycle's cut, then makes the received position
  // durable. Only after this returns Ok may the receiver acknowledge the cycle.
  virtual Status CommitCycle(const CycleInfo& cycle) = 0;

  virtual ReplicaPosition Position() const = 0;

  // --- Sync (see above). Called from the receiver's connection thread, like the rest.

  // Starts or resumes the sync of plan. Commits every received cycle older than the plan
  // first where it can (a failure to apply drops them: the sync replaces them). Refuses
  // (error Status) a plan for other disks, an older epoch, or a replica without room for
  // the data (ENOSPC). While a sync is unfinished the replica has no consistent latest
  // point other than the one it had before the sync started (if any), which stays readable.
  virtual Result<SyncResume> BeginSync(const SyncPlan& plan) = 0;
  // XXH3-64 of count blocks of kSyncBlockSize from offset (block-aligned) of the disk, as
  // the replica image holds them now. count <= kMaxHashBlocks.
  virtual Result<std::vector<uint64_t>> SyncHashes(uint32_t disk_id, uint64_t offset,
                                                   uint32_t count) = 0;
  // Writes data at offset (data non-empty), or zeros over [offset, offset + zero_length)
  // (data empty; a hole is punched where the image has data), then records that the disk
  // equals the snapshot below done_to (>= offset + length; a compare range with nothing
  // to send arrives as zero_length 0). Returns the disk's durable done offset: the sink
  // syncs the image and persists its progress now and then (every 64 MiB or 1 s), so the
  // result may lag done_to.
  virtual Result<uint64_t> WriteSyncData(uint32_t disk_id, uint64_t offset,
                                         std::span<const std::byte> data, uint64_t zero_length,
                                         uint64_t done_to) = 0;
  // Every disk is done: syncs the images and makes them cycle sync_id (applied and
  // received; segment continuity from the plan's last_seq/last_segment). Idempotent for
  // the same sync_id.
  virtual Status EndSync(uint64_t sync_id, int64_t cut_unix_nanos) = 0;
  virtual SyncStatus Sync() const = 0;
};

inline constexpr uint32_t kMaxHashBlocks = 256;  // 16 MiB per hash request

}  // namespace siterep::applier
