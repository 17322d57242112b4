// SegmentSource: how the shipper takes sealed change-log segments from the tracker.
//
// One SegmentSource per protected VM. A segment is one disk's share of one cycle, in the
// record format of log_format.h, ending in the cycle's cut record. The tracker does not
// write segments out: a segment is read from the cut's frozen blocks when it is sent
// (OpenSegment), from the copy-on-write file where a block was overwritten since the cut,
// else from the image. Reading a segment again, until it is released, gives the same
// bytes. Segments are offered in log order. The shipper releases them once the peer has
// acknowledged them; the tracker then forgets the cut (and the next cut may follow).
// Thread-safe: may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
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
  // Bytes of the segment, at most: a run of frozen blocks that reads as zeros at the cut
  // ships as a discard record without its payload, which is only known when it is read.
  uint64_t bytes = 0;
  int64_t cut_unix_nanos = 0;           // time of the cut that ends it
  int64_t first_change_unix_nanos = 0;  // first change of the cycle in any disk of the VM
                                        // (0: the cycle holds no change)
};

// The bytes of one sealed segment, read front to back. Not thread-safe; one reader per
// sending thread.
class SegmentStream {
 public:
  virtual ~SegmentStream() = default;
  // The next at most max (> 0) bytes: a view valid until the next call; empty at the
  // end of the segment. A cut's records get their CRC32C as they are made from the
  // blocks, so the checksum covers them from the read on.
  // ECANCELED once the segment was released; other errors: the blocks cannot be read.
  virtual Result<std::span<const std::byte>> Next(size_t max) = 0;
  // Every byte of the segment has been returned.
  virtual bool done() const = 0;
};

class SegmentSource {
 public:
  virtual ~SegmentSource() = default;

  // Sealed, unreleased segments of every disk of the VM, ordered by cycle, then disk.
  virtual std::vector<SealedSegment> SealedSegments() = 0;
  // Opens segment seg (one that SealedSegments listed) for reading. ENOENT when it was
  // released since.
  virtual Result<std::unique_ptr<SegmentStream>> OpenSegment(const SealedSegment& seg) = 0;
  // The peer holds every segment of every disk up to and including cycle; they may go.
  virtual Status ReleaseThrough(uint64_t cycle) = 0;
  // Called (from a tracker thread; must not block) whenever a cycle is sealed.
  virtual void SetSealedCallback(std::function<void(uint64_t cycle)> callback) = 0;
};

}  // namespace siterep::tracker
