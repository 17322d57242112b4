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
};

struct CycleInfo {
  uint64_t cycle = 0;
  int64_t cut_unix_nanos = 0;           // when the primary cut it
  int64_t first_change_unix_nanos = 0;  // first change of the cycle (0: no change)
};

// Where the replica stands. received_cycle: every segment through this cycle is durable
// on the replica (what the receiver acknowledges). applied_cycle: the replica images are
// this cycle's recovery point. apply_error: non-empty once the apply stopped on a bad
// record (the replica stays at applied_cycle; health Critical).
struct ReplicaPosition {
  uint64_t epoch = 0;
  uint64_t received_cycle = 0;
  uint64_t applied_cycle = 0;
  int64_t applied_cut_unix_nanos = 0;
  uint64_t pending_bytes = 0;  // received, not yet applied
  std::string apply_error;
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
};

}  // namespace siterep::applier
