// VmTracker: the change logs of all disks of one protected VM, and the cuts that split
// them into replication cycles. Owned by control/; blockdev sees only the per-disk
// WriteObserver; the shipper sees only the SegmentSource.
//
// Per disk: a log folder next to the image ("<image>.srlog/") with segment files in the
// format of tracker/log_format.h. Guest changes are write-ahead: the thread that serves a
// guest write reserves the next seq and byte range of the open segment, writes its record
// there itself (its own thread's io_uring; no hand-off to another thread) and only then
// changes the image, so after kill -9 the recovery scan can redo the records after the
// last cut into the image, and image and log agree. Concurrent appenders may complete out
// of order, so a crash can leave holes in the open segment: recovery keeps the complete
// records after a hole and drops the hole (recovery.h). Flush syncs log and image; flushes
// that arrive while a sync is in flight share the next one (group commit, leader/follower).
//
// Cuts: a VM-wide lock is held shared by every change from "take a sequence number"
// until apply returns, and exclusively by Cut() while it writes one cut record to every
// disk's log, so no change straddles a cut, every change before it is in the image, and
// every record before it is completely in the log. A cycle timer cuts every `cycle`; an
// open segment past segment_roll_bytes asks for an early cut. Each disk's segment is
// sealed (synced, closed) at its cut record by a sealer thread, off the write path.
//
// Log budget: when a disk's unshipped log passes log_budget bytes, or the log cannot be
// written (ENOSPC, EIO), or an apply fails, the disk falls back to a persistent dirty
// bitmap (dirty_bitmap.h): the change that hits it marks its blocks in the bitmap and is
// applied, and once no change is in flight (VM lock exclusive) the blocks of the unshipped
// log are marked, the log is dropped, the disk is marked "resync required" (persisted in
// "<log dir>/state.json"), and guest I/O carries on.
//
// Thread-safety: observer(i) may be called from any number of threads; Cut, Stats,
// Close and the SegmentSource methods from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "tracker/segment_source.h"
#include "tracker/write_observer.h"

namespace siterep::tracker {

enum class DiskTracking { kLog, kBitmap };
std::string_view DiskTrackingName(DiskTracking t);  // "log" | "bitmap"

struct TrackedDisk {
  std::string name;
  int image_fd = -1;              // borrowed, O_RDWR; must outlive the VmTracker
  uint64_t size = 0;              // bytes; the image is at least this long
  std::filesystem::path log_dir;  // "<image>.srlog"; created if missing
  uint64_t log_budget = 0;        // unshipped log bytes before the bitmap fallback
};

struct VmTrackerOptions {
  std::string vm;
  uint64_t epoch = 1;
  std::vector<TrackedDisk> disks;
  std::chrono::milliseconds cycle{1000};  // zero: no timer, cuts only through Cut()
  uint64_t segment_roll_bytes = 64ull << 20;
  // Where released segments go ("<archive_dir>/<disk>/<number>.seg"), for checkers and
  // debugging; empty: released segments are deleted. Must be on the logs' file system.
  std::filesystem::path archive_dir;
};

struct DiskStats {
  std::string name;
  DiskTracking tracking = DiskTracking::kLog;
  bool resync_required = false;
  std::string resync_reason;     // why, for status ("log budget exceeded", ...)
  uint64_t unshipped_bytes = 0;  // log bytes not yet released (sealed + open)
  uint64_t last_seq = 0;         // last sequence number written
  int64_t last_cut_unix_nanos = 0;
  uint64_t dirty_bytes = 0;  // bitmap mode: bytes marked dirty
  uint64_t flush_syncs = 0;  // group-commit syncs issued (each serves many Flush calls)
};

struct VmStats {
  uint64_t last_cycle = 0;
  int64_t last_cut_unix_nanos = 0;
  int64_t open_first_change_unix_nanos = 0;  // first change since the last cut (0: none)
  std::vector<DiskStats> disks;
};

class VmTracker : public SegmentSource {
 public:
  // Opens or creates the log of every disk and recovers it: scans the open segment, drops
  // holes and a torn tail (short record, bad CRC) but keeps complete records after a hole
  // (recovery.h), and redoes the records after the last cut into the image. Then starts the sealer
  // threads and the cycle timer.
  static Result<std::unique_ptr<VmTracker>> Open(VmTrackerOptions options);
  ~VmTracker() override;

  VmTracker(const VmTracker&) = delete;
  VmTracker& operator=(const VmTracker&) = delete;

  // The observer of disk i (index into options.disks); lives as long as the tracker.
  WriteObserver& observer(size_t disk_index);

  // Cuts every disk at one instant and seals the segments; returns the new cycle number.
  // A VM with no change since its last cut is not cut again: returns the last cycle.
  Result<uint64_t> Cut();

  VmStats Stats() const;

  // Stops the timer, cuts and seals what is open, syncs logs and images, stops the sealer
  // threads. Changes after Close are refused with ESHUTDOWN. Idempotent.
  Status Close();

  // SegmentSource
  std::vector<SealedSegment> SealedSegments() override;
  Status ReleaseThrough(uint64_t cycle) override;
  void SetSealedCallback(std::function<void(uint64_t cycle)> callback) override;

 private:
  class Impl;
  explicit VmTracker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace siterep::tracker
