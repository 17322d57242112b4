// WriteObserver: how blockdev tells the tracker about guest I/O on a live disk.
//
// blockdev's image backend calls one WriteObserver per disk from many FUSE threads at
// once. The observer orders each change against the others and against cuts, records it
// (write-ahead: the record reaches the log file before the image is touched), then calls
// apply, which changes the image. When apply returns, the change is part of the disk.
//
// Replication never fails the guest: when the log cannot be written (budget exceeded,
// ENOSPC, EIO on the log folder), the observer falls back to the dirty bitmap and still
// calls apply. The Status returned is apply's (or an error from the image itself).
#pragma once

#include <cstdint>
#include <span>

#include "common/function_ref.h"
#include "common/status.h"

namespace siterep::tracker {

class WriteObserver {
 public:
  virtual ~WriteObserver() = default;

  // A guest write of data at offset (offset + data.size() <= disk size, checked by the
  // caller). Calls apply exactly once, with the change's place in the order held, so that
  // overlapping changes reach the image in log order and no cut splits the change.
  virtual Status Write(uint64_t offset, std::span<const std::byte> data,
                       FunctionRef<Status()> apply) = 0;
  // A discard (punch hole) of [offset, offset + length). Same contract as Write.
  virtual Status Discard(uint64_t offset, uint64_t length, FunctionRef<Status()> apply) = 0;
  // Returns when the image and every record of a change applied before the call are
  // durable. Concurrent calls share syncs (group commit).
  virtual Status Flush() = 0;
};

}  // namespace siterep::tracker
