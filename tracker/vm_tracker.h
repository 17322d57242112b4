// VmTracker: the changed-block tracking of all disks of one protected VM, and the cuts
// that split it into replication cycles. Owned by control/; blockdev sees only the per-disk
// WriteObserver; the shipper sees only the SegmentSource.
//
// Per disk: a log folder next to the image ("<image>.srlog/", disk_log.h). A guest change
// marks its 4 KiB blocks in the disk's changed-block map (a mapped file: no system call, no
// hand-off to another thread) and then changes the image; nothing of its data is written
// twice on the guest's path. A cut freezes every disk's map at one instant and starts a
// copy-on-write of the frozen blocks until the cycle is released; the shipper reads them
// (their content at the cut) as the cycle's segments, in the record format of
// tracker/log_format.h, when it sends them. Nothing but the image, the map and the cut's
// small files is written at the primary. Flush syncs map and image (group commit,
// leader/follower).
//
// Cuts: a VM-wide lock is held shared by every change from marking until apply returns,
// and exclusively by Cut() while it freezes every disk's map, so no change straddles a cut
// and the image holds exactly the cut's content at that instant. A cycle is published
// (offered to the shipper) only once every disk made its cut, else it is rolled back
// on all of them: its blocks go into the next cycle. The cycle timer cuts every `cycle`,
// but only once the previous cycle has been released (pacing): a slow or cut link makes
// cycles longer, with overwrites coalesced, and the log never holds more than what the
// link owes. Cut times strictly increase within a VM. A consistency group of VMs is cut at
// one instant by CutTogether, which holds every member's VM lock at once and gives all
// members one cut time: the group's instants are the cut times that every member's log has.
//
// Restart after kill -9: the image (page cache) holds every acknowledged write, the map
// every block changed since the last cut, and the cut files and copy-on-write files every
// unreleased cycle, which reads as before; a cycle not cut on every disk is rolled back
// into the maps. No acknowledged write is lost and no resync is needed.
//
// Resync: only when what changed is no longer known (a copy-on-write that failed, so a
// cut cannot be read; an unreadable log at open), a disk falls back to a persistent dirty bitmap
// (dirty_bitmap.h) and is marked "resync required" (persisted in "<log dir>/state.json");
// guest I/O carries on.
//
// Thread-safety: observer(i) may be called from any number of threads; Cut, CutTogether,
// Stats, Close, the snapshot methods and the SegmentSource methods from any thread.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
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
};

struct VmTrackerOptions {
  std::string vm;
  uint64_t epoch = 1;
  std::vector<TrackedDisk> disks;
  std::chrono::milliseconds cycle{1000};  // zero: no timer, cuts only through Cut()
  // Where released segments go ("<archive_dir>/<disk>/<number>.seg"), for checkers and
  // debugging; empty: released segments are deleted. Must be on the logs' file system.
  std::filesystem::path archive_dir;
  // Bytes the copy-on-writes of each disk's unreleased cuts may hold (DiskLog::Options).
  uint64_t cow_limit = 0;
};

// A byte range of a disk.
struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const ByteRange&) const = default;
};

// Bytes in ranges (sorted, disjoint), in all of them or below position.
inline uint64_t RangeBytes(const std::vector<ByteRange>& ranges) {
  uint64_t n = 0;
  for (const ByteRange& r : ranges) n += r.length;
  return n;
}
inline uint64_t RangeBytesBelow(const std::vector<ByteRange>& ranges, uint64_t position) {
  uint64_t n = 0;
  for (const ByteRange& r : ranges) {
    if (r.offset >= position) break;
    n += std::min(r.length, position - r.offset);
  }
  return n;
}

// Granularity of the copy-on-write snapshot, of resync block sets and of sync hashes
// (the same as applier::kSyncBlockSize).
inline constexpr uint64_t kSnapshotBlockSize = 64 * 1024;

struct SnapshotDisk {
  std::string name;
  uint32_t disk_id = 0;
  uint64_t size = 0;
  uint64_t last_seq = 0;      // seq of the disk's last record (its cut record) at the cut
  uint64_t last_segment = 0;  // number of the segment that cut sealed (or the disk's last
                              // segment number, when it tracked with the bitmap)
  bool resync = false;        // the disk was "resync required" when the snapshot was taken
  bool all_dirty = false;     // ... and nothing narrower than the whole disk is known
  // For a resync: what may differ from the replica (which has every cycle the shipper
  // released): the bitmap's dirty blocks, plus the blocks of every record in this disk's
  // unreleased sealed segments up to the cut. kSnapshotBlockSize-aligned (the last range
  // may end at the disk's size), sorted, merged. Empty when all_dirty.
  std::vector<ByteRange> dirty;
  std::filesystem::path snapshot_path;  // "<image>.srsnap"
};

struct SnapshotInfo {
  uint64_t cycle = 0;  // the cut the snapshot is taken at
  int64_t cut_unix_nanos = 0;
  std::vector<SnapshotDisk> disks;  // in options.disks order
};

struct DiskStats {
  std::string name;
  DiskTracking tracking = DiskTracking::kLog;
  bool resync_required = false;
  std::string resync_reason;  // why, for status ("log budget exceeded", ...)
  // Not yet released: sealed segments' bytes, plus the changed blocks of the cut being
  // built and of the open cycle (4 KiB each).
  uint64_t unshipped_bytes = 0;
  uint64_t last_seq = 0;  // last sequence number written
  int64_t last_cut_unix_nanos = 0;
  uint64_t dirty_bytes = 0;      // bitmap mode: bytes marked dirty
  uint64_t flush_syncs = 0;      // group-commit syncs issued (each serves many Flush calls)
  uint64_t snapshot_bytes = 0;   // bytes saved in the disk's snapshot file (0: none)
  uint64_t cycles_cut = 0;       // cycles cut since the tracker opened
  uint64_t cow_bytes = 0;        // copy-on-write bytes saved for the unreleased cuts
  uint64_t cow_bytes_total = 0;  // ... and for the cuts released since the tracker opened
  std::string cut_error;         // why the last cut failed (empty: it did not)
  uint64_t activity_log_writes = 0;  // activity log writes (misses) since the tracker opened
  std::string activity_log_error;    // why the activity log could not be written (empty: ok)
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
  // The cut time is now, or 1 ns past the VM's last cut time if the clock is not past it.
  Result<uint64_t> Cut();

  // Cuts the VMs of a consistency group at one instant. Called by control/ for a group,
  // whose trackers it opens with cycle = 0 (so only a full segment, through RequestCut,
  // still cuts a VM alone); from any thread. trackers: distinct, non-null, in any order;
  // they are borrowed for the call.
  //
  // Takes every tracker's cut serialisation, then every tracker's VM lock exclusively,
  // each in address order (so concurrent calls listing the same trackers in other orders,
  // and Cut() of one of them, cannot deadlock): at that instant no change is in flight in
  // any disk of any of the VMs. If no logging disk of any tracker changed since its last
  // cut and all trackers' last cuts have one time, nothing is cut and each tracker's last
  // cycle is returned (last cuts that differ - a member cut alone since - are cut together
  // again, so an idle group ends on a common instant). Otherwise every tracker
  // is cut, also one whose disks did not change (its cycle holds only cut records, with
  // first_change_unix_nanos 0), and all cuts carry one cut time, taken once under the
  // locks and greater than every earlier cut time of every tracker (previous maximum + 1 if
  // the clock is not past it), so replicas recognise a group instant by its identical cut
  // time across VMs. Then the VM locks are let go and each tracker's cut is sealed and its
  // sealed callback run as Cut() does, on the caller's thread, while the cut serialisation
  // of group members not yet sealed is still held: a sealed callback must not cut any
  // tracker of the group. A tracker none of whose disks logs (every one in bitmap mode)
  // gets no cycle.
  //
  // Returns the cycle of each tracker (the new one, or its last if it was not cut), in
  // the order of trackers; an empty span gives an empty vector. Errors, before anything is
  // cut: EINVAL for a null or repeated tracker, ESHUTDOWN if one of them is closed.
  static Result<std::vector<uint64_t>> CutTogether(std::span<VmTracker* const> trackers);

  VmStats Stats() const;

  // --- Point-in-time snapshot (initial replication, resync) -----------------------------
  //
  // StartSnapshot cuts every disk at one instant (always: a new cycle even without a
  // change) and from then on, before a guest write or discard changes a
  // kSnapshotBlockSize block of a disk that SnapshotCopied has not passed, the block's
  // content as of the cut is saved into the disk's snapshot file "<image>.srsnap" (sparse,
  // each block at its own offset), under the range lock that orders the change, so the
  // copy always reads the cut's content. Changes go on being logged as usual (they are the
  // cycles after the cut). A disk that tracked with the bitmap returns to the log at the
  // cut; its dirty blocks are in the result and its state stays "resync required" (reason
  // "resynchronising") until EndSnapshot(true). The snapshot is not crash-safe by design:
  // a leftover snapshot file is deleted at Open, and the caller starts a new snapshot.
  // EBUSY while a snapshot is active; ESHUTDOWN after Close.
  Result<SnapshotInfo> StartSnapshot();
  bool snapshot_active() const;
  // Reads [offset, offset + out.size()) of disk as of the snapshot's cut, while the guest
  // writes on. EINVAL without a snapshot or out of range.
  Status ReadSnapshot(size_t disk, uint64_t offset, std::span<std::byte> out);
  // The ranges of [from, to) that may hold data as of the cut: the image's data extents
  // (SEEK_DATA / SEEK_HOLE) plus the blocks saved in the snapshot file, widened to
  // kSnapshotBlockSize, sorted, merged, clipped to [from, to). Everything else reads as
  // zeros as of the cut.
  Result<std::vector<ByteRange>> SnapshotDataRanges(size_t disk, uint64_t from, uint64_t to);
  // The replica holds disk's content below offset durably: changes there need no save.
  void SnapshotCopied(size_t disk, uint64_t offset);
  // Deletes the snapshot files. completed: the replica holds the snapshot, so the disks
  // the snapshot resynced are no longer "resync required" (state persisted). Not
  // completed: they stay "resync required" (reason "resync interrupted"), and the next
  // StartSnapshot returns them all_dirty. No-op without a snapshot.
  Status EndSnapshot(bool completed);

  // Stops the timer, cuts and seals what is open, ends an active snapshot (not completed),
  // syncs logs and images, stops the sealer threads. Changes after Close are refused with
  // ESHUTDOWN. Idempotent.
  Status Close();

  // SegmentSource
  std::vector<SealedSegment> SealedSegments() override;
  Status ReleaseThrough(uint64_t cycle) override;
  void SetSealedCallback(std::function<void(uint64_t cycle)> callback) override;
  Result<std::unique_ptr<SegmentStream>> OpenSegment(const SealedSegment& seg) override;

 private:
  class Impl;
  explicit VmTracker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace siterep::tracker
