// The crash-consistency checker (the project's own dm-log-writes check): is a replica
// exactly "the pre-image with a prefix of the primary's change log applied, cut at a
// cycle boundary", for all disks of a VM at the same cycle? Used by the siterep-check
// tool and by the fault tests after every fault (invariant 1 of DESIGN.md).
//
// Per disk it copies the pre-image to a work file next to nothing the caller owns (a
// temporary file in work_dir), compares it with the replica once in full, then replays
// the log record by record, re-comparing only the 4 KiB blocks each record touches, and
// notes every cut at which work file and replica are equal. The VM is consistent when
// some cycle is such a match on every disk (cycle 0: the pre-images themselves). Reads
// the replica: run it while the replica is quiet. Thread-compatible.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace siterep::tracker {

struct PrefixCheckDisk {
  std::string name;
  std::filesystem::path pre_image;  // the disk when its log began
  std::filesystem::path log_dir;    // the primary's log (or its archive) of this disk
  std::filesystem::path replica;    // the replica image to check
};

struct PrefixCheckDiskResult {
  std::string name;
  std::vector<uint64_t> matching_cycles;  // cuts at which the replica equals the replay
  uint64_t last_cycle = 0;                // last cut in the log
  uint64_t fewest_differing_blocks = 0;   // at the best cut, when none matched
  uint64_t fewest_at_cycle = 0;
};

struct PrefixCheckResult {
  // The newest cycle at which every disk matches; unset: the replica is not a prefix.
  std::optional<uint64_t> cycle;
  std::vector<PrefixCheckDiskResult> disks;
  std::string Summary() const;  // one line per disk and a verdict
};

// Errors (a missing file, a size mismatch, a damaged log) are a Status; an inconsistent
// replica is a result with no cycle.
Result<PrefixCheckResult> CheckReplicaIsLogPrefix(const std::vector<PrefixCheckDisk>& disks,
                                                  const std::filesystem::path& work_dir);

}  // namespace siterep::tracker
