// SegmentSource: how the shipper takes sealed change-log segments from the tracker.
//
// One SegmentSource per protected VM. A segment is sealed when its last record is a cut
// (a full segment asks for an early cut, so every segment holds one disk's share of one
// cycle); sealed segments are durable and never change. They are offered in log order. The shipper releases segments once
// the peer has acknowledged them; the tracker then deletes them and lowers the VM's
// unshipped byte count (which the log budget is measured against).
// Thread-safe: may be called from any thread.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "common/status.h"

namespace siterep::tracker {

struct SealedSegment {
  std::string disk;           // disk name within the VM
  uint32_t disk_id = 0;
  uint64_t number = 0;        // segment number within the disk's log
  uint64_t cycle = 0;         // cycle number of the cut that ends it
  uint64_t first_seq = 0;
  uint64_t last_seq = 0;
  uint64_t bytes = 0;
  int64_t cut_unix_nanos = 0;           // time of the cut that ends it
  int64_t first_change_unix_nanos = 0;  // first change of the cycle in any disk of the VM
                                        // (0: the cycle holds no change)
  std::filesystem::path path;
};

class SegmentSource {
 public:
  virtual ~SegmentSource() = default;

  // Sealed, unreleased segments of every disk of the VM, ordered by cycle, then disk.
  virtual std::vector<SealedSegment> SealedSegments() = 0;
  // The peer holds every segment of every disk up to and including cycle; they may go.
  virtual Status ReleaseThrough(uint64_t cycle) = 0;
  // Called (from a tracker thread; must not block) whenever a cycle is sealed.
  virtual void SetSealedCallback(std::function<void(uint64_t cycle)> callback) = 0;
  // The shipper found segment seg damaged (CheckSealedSegment's Status why) and did not
  // send it: its disk leaves the log for the dirty bitmap with every block marked (what
  // the damaged records changed is unknown), "resync required" with the reason. Ignored
  // when seg is no longer one of the disk's sealed segments (released or dropped since).
  virtual void SegmentDamaged(const SealedSegment& seg, const Status& why) = 0;
};

}  // namespace siterep::tracker
