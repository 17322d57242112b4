// DiskLog: everything the tracker does inside one disk. VmTracker owns one per disk and
// does the VM-wide ordering (CutLock, RangeLocks, cycles); DiskLog does the rest.
//
// Changed-block tracking with per-cycle copy-on-write. Nothing of a guest's data is
// written twice on its write path:
//  - Marking: a change (a FUSE thread, holding the VM lock shared and its range locked)
//    sets the bits of the 4 KiB blocks it touches in the changed-block map of the open
//    cycle, "<log dir>/changed.map" (DirtyBitmap, memory-mapped: a bit set before the
//    image write survives kill -9 in the page cache; Flush msyncs it). No system call
//    and no hand-off per write.
//  - Cuts: WriteCut is called with the VM lock exclusive (no change in flight, so the
//    image holds exactly the cut's content). It moves the map's bits into the frozen set
//    of the cut, writes that set to "<log dir>/frozen.map" (for a restart after kill -9),
//    and attaches a copy-on-write snapshot of the frozen blocks (snapshot.h, 4 KiB blocks,
//    "<log dir>/cycle.cow"): from then on, a change to a frozen block the builder has not
//    read yet saves the block's content at the cut first (under its range lock).
//  - Building: the builder thread reads the frozen blocks in runs (each under its range
//    lock: from the copy-on-write file where saved, else from the image) and writes the
//    cycle's segment in the record format of log_format.h (a write record per run of at
//    most kMaxRecordPayload bytes, a discard record for a run that reads as zeros, then
//    the cut record) to "<n>.seg.tmp", fdatasyncs it and renames it "<n>.seg". The
//    segment is durable then, but not offered to the shipper: VmTracker publishes the
//    cycle once every disk of the VM built its part (Publish), or rolls it back
//    (RollBack: the frozen bits go back into the map, the file is deleted), so a cycle
//    is always on every disk or on none. Overwrites within a cycle coalesce: a cycle
//    holds each changed block once, with its content at the cut.
//  - Group commit (Flush): the first caller that finds no sync in flight becomes the
//    leader and msyncs the map and fdatasyncs the image; callers that arrive meanwhile
//    are covered by the next generation, which starts after their call.
//  - Restart: "*.tmp" files are unfinished builds and are deleted; a frozen set whose
//    cycle has no published segment goes back into the map (VmTracker rolls back a
//    cycle that not every disk finished first). The map then holds every block changed
//    since the last published cycle, and the next cut ships them with their content at
//    that cut: the replica moves from its last cycle to a later whole-cycle point, and
//    no acknowledged write is lost.
//  - The fall back to the dirty bitmap (a sealed segment the shipper found damaged, an
//    unreadable log at open) happens in two steps, as before: (1) SegmentDamaged sets
//    mode_ to kSwitching and creates the bitmap; changes meanwhile mark it. (2)
//    FinishFallback, with the VM lock exclusive, marks the blocks of every unshipped
//    segment, of the map and of the frozen set, persists state.json as bitmap mode and
//    deletes the segments. The guest never sees an error. A failed build never falls
//    back: its blocks go back into the map and the next cycle carries them.
//  - Snapshots (disk_log_resync.cc): at the cut of VmTracker::StartSnapshot, a disk in
//    bitmap mode returns to the log (ReturnToLog) with its dirty blocks as what it must
//    resync.
//
// Thread-safety: every public method may be called from any thread, with the preconditions
// stated on each. Lock order: VmTracker's locks (the builder takes a disk's RangeLocks,
// holding none of DiskLog's), then release_mu_, then bitmap_mu_, then state_mu_, then mu_.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "tracker/dirty_bitmap.h"
#include "tracker/disk_state.h"
#include "tracker/log_format.h"
#include "tracker/segment_source.h"
#include "tracker/vm_tracker.h"

namespace siterep::tracker {

class RangeLocks;
class DiskSnapshot;

// Files in the log folder besides the segments (see above).
inline constexpr std::string_view kMapFileName = "changed.map";
inline constexpr std::string_view kFrozenFileName = "frozen.map";
inline constexpr std::string_view kCowFileName = "cycle.cow";

// Largest payload of one write record; longer runs of changed blocks become several.
inline constexpr uint64_t kMaxRecordPayload = 1u << 20;

enum class LogOutcome {
  kLogged,    // the change's blocks are marked in the open cycle's map
  kBitmap,    // the disk tracks with the bitmap (or is switching); its blocks are marked
  kShutdown,  // the log is stopped
};

class DiskLog {
 public:
  struct Options {
    std::string name;
    uint32_t disk_id = 0;
    uint64_t epoch = 0;
    int image_fd = -1;  // borrowed
    uint64_t size = 0;
    std::filesystem::path log_dir;
    std::filesystem::path archive_dir;  // released segments are moved here; empty: deleted
    // The disk's range locks (borrowed; outlive the DiskLog): the builder reads each run
    // of frozen blocks with its range locked, as changes hold it while they save and apply.
    RangeLocks* ranges = nullptr;
  };

  // A cut frozen by WriteCut, until its segment is built (or dropped).
  struct CutTicket {
    enum class State { kBuilding, kBuilt, kDropped };
    uint64_t cycle = 0;
    int64_t unix_nanos = 0;
    int64_t first_change_unix_nanos = 0;
    State state = State::kBuilding;  // guarded by mu_
    // Set by Publish (the segment's last seq and number) or RollBack (the disk's last seq
    // and segment number, which the next cycle goes on from).
    uint64_t seq = 0;
    uint64_t segment = 0;
  };

  // What ReturnToLog did.
  struct ResyncStart {
    // Back in log mode. False: persisting the state failed, so the disk stays in bitmap
    // mode (still resync required); all_dirty and dirty are right either way.
    bool logging = false;
    uint64_t last_seq = 0;      // the disk's last seq at the cut
    uint64_t last_segment = 0;  // the disk's last segment number at the cut
    bool all_dirty = false;     // every block of the bitmap was dirty (dirty is empty)
    // The bitmap's dirty blocks as kSnapshotBlockSize-aligned, sorted, merged ranges.
    std::vector<ByteRange> dirty;
  };

  // Opens the log folder (created if missing; locked against a second tracker), lists its
  // segments (each must end in a cut record; a damaged one falls back to the bitmap),
  // deletes unfinished builds, opens the map and merges a leftover frozen set into it
  // (unless its cycle is published), or reopens the bitmap; starts the builder thread.
  static Result<std::unique_ptr<DiskLog>> Open(Options options);
  ~DiskLog();  // Stop()s if needed
  DiskLog(const DiskLog&) = delete;
  DiskLog& operator=(const DiskLog&) = delete;

  // Before a change of [offset, offset + length) is applied: marks its blocks in the map
  // (log mode) or the bitmap, and saves the cut's content of frozen blocks the builder
  // has not read yet. The caller holds the VM lock shared and the range locked, and
  // applies the change only after this returns kLogged or kBitmap; then, with no lock
  // held, it calls FinishFallback (VM lock exclusive) if fallback_pending().
  LogOutcome BeforeChange(uint64_t offset, uint64_t length);

  // The sealed, unreleased segment `segment` cannot be read back (why): start the fall
  // back to the bitmap with every block marked, since what the damaged records changed is
  // unknown. No-op when that segment is not sealed and unreleased (released or dropped
  // since) or the disk is not logging. Any thread, holding none of the VmTracker's locks;
  // the caller then runs FinishFallback with the VM lock exclusive.
  void SegmentDamaged(uint64_t segment, const std::string& why);

  // A fall back was started and FinishFallback has not run yet.
  bool fallback_pending() const { return fallback_pending_.load(std::memory_order_acquire); }
  // Second step of the fall back (see above). The caller holds the VM lock exclusively.
  // No-op when none is pending.
  void FinishFallback();

  // Freezes the blocks changed since the last cut as the cycle `cycle` (a disk without a
  // change gets a segment of the cut record alone) and hands it to the builder. The caller
  // holds the VM lock exclusively, and the previous ticket is no longer kBuilding.
  // Returns null when the disk is not logging (bitmap mode, stopped).
  std::unique_ptr<CutTicket> WriteCut(uint64_t cycle, int64_t unix_nanos,
                                      int64_t first_change_unix_nanos);
  // Waits until the segment of cut is built (true), or could not be (false: its blocks
  // are back in the map). Call without the VM lock.
  bool WaitBuilt(CutTicket& cut);
  // After every disk's WaitBuilt returned true: offers the built segment to the shipper
  // (SealedSegments) and forgets the frozen set. Returns whether it was published (false:
  // the disk fell back to the bitmap meanwhile).
  bool Publish(CutTicket& cut);
  // After some disk's WaitBuilt returned false: the cycle is given up on every disk; a
  // built segment is deleted and its frozen blocks go back into the map.
  void RollBack(CutTicket& cut);
  // Restart: the last published cycle is newer than the VM's (another disk did not finish
  // it before a kill -9): delete this disk's segments of cycles after vm_cycle and mark
  // their blocks in the map. Called from VmTracker::Open before any change.
  Status RollBackAfter(uint64_t vm_cycle);
  // A block was changed since the last cut (log mode).
  bool ChangedSinceCut() const;
  uint64_t last_cycle() const;
  int64_t last_cut_unix_nanos() const;
  int64_t last_cut_first_change_unix_nanos() const;
  // Sealed segments not released yet (what the cycle timer waits for).
  bool has_unreleased() const;

  // Group commit: returns when every change applied before the call is durable in the
  // image and its blocks in the map (or bitmap). The Status is the image's.
  Status Flush();
  // Stops the builder once the queued builds are done and syncs map and image.
  // Idempotent. The caller guarantees that no BeforeChange or WriteCut runs during or
  // after it (VmTracker refuses changes once closed).
  Status Stop();

  std::vector<SealedSegment> SealedSegments() const;
  // Deletes the sealed segments up to and including cycle.
  Status ReleaseThrough(uint64_t cycle);
  DiskStats Stats() const;

  // --- Snapshots (disk_log_resync.cc) ---
  bool tracking_with_bitmap() const;  // bitmap mode, and no fall back pending
  bool resync_required() const;
  // Takes a disk in bitmap mode back to the log at the cut of cycle: its dirty blocks are
  // returned and kept as what it must resync; the map starts empty (seq and segment
  // numbers go on); state.json says "log", resync required, "resynchronising"; then the
  // bitmap file is deleted (in that order, so a crash at any point leaves a state whose
  // next Open marks a superset). The caller holds the VM lock exclusively.
  ResyncStart ReturnToLog(uint64_t cycle);
  // The blocks that the writes and discards of the segments numbered up to and including
  // through touch (those not released yet), kSnapshotBlockSize-aligned, sorted, merged.
  // Any thread, no lock.
  Result<std::vector<ByteRange>> ChangedBlocksThrough(uint64_t through) const;
  // The snapshot that resynced this disk ended. completed: the disk is no longer resync
  // required (if it still logs: a fall back since then keeps it). Not completed: it stays
  // resync required, reason "resync interrupted", with every block to resync. Persists
  // state.json. No-op for a disk that is not a log-mode disk in resync.
  Status EndResync(bool completed);

 private:
  // kSwitching: a fall back is pending (step 1 done or under way, FinishFallback not yet).
  enum class Mode { kLog, kSwitching, kBitmap };

  // A cut on its way from WriteCut through the builder to Publish or RollBack.
  struct Build {
    CutTicket* cut = nullptr;
    // The frozen blocks, one bit per 4 KiB; shared with the copy-on-write snapshot.
    std::shared_ptr<const std::vector<uint64_t>> frozen;
    uint64_t frozen_blocks = 0;
    std::shared_ptr<DiskSnapshot> cow;  // copy-on-write of the frozen blocks (null: none)
    SealedSegment segment;              // filled by the builder
    std::filesystem::path tmp_path;     // the file being built
  };

  explicit DiskLog(Options options);
  Status Init();
  Status OpenLogMode(const DiskState& state);
  // Writes b's segment; fills b.segment. Never holds mu_ while reading or writing.
  Status BuildSegment(Build& b);
  // Marks [offset, offset + length) without the log: in the bitmap, or in pending_ranges_
  // and then EnsureBitmap. Unlocks lk (which holds mu_).
  void MarkWithoutLog(std::unique_lock<std::mutex>& lk, uint64_t offset, uint64_t length);
  // Step 1 of the fall back: mode_ kLog -> kSwitching, with the reason. mu_ must be held.
  void RequestFallbackLocked(std::string reason);
  // Creates (or opens) the bitmap if it does not exist yet, marking pending_ranges_.
  void EnsureBitmap();
  // Builder thread.
  void BuilderLoop();
  // Syncs the map (or bitmap) and the image; returns the image's status.
  Status SyncFiles(DirtyBitmap* map);

  // Marks the blocks of every record of the unshipped log (all blocks if mark_all), of the
  // map and of a frozen set in bitmap, persists the bitmap state and deletes the segments
  // and the map. Never fails: problems are logged and tracking carries on with what it has.
  // mode_ must not be kLog.
  void DropLog(DirtyBitmap& bitmap, bool mark_all);
  std::unique_ptr<DirtyBitmap> OpenBitmap();
  Status PersistState();

  const Options opts_;
  UniqueFd lock_fd_;  // flock on "<log dir>/LOCK" while open
  std::thread builder_;

  // Serialises ReleaseThrough against itself and against DropLog's scan of the folder.
  std::mutex release_mu_;
  // Serialises the creation of the bitmap (EnsureBitmap, and FinishFallback's use of it).
  std::mutex bitmap_mu_;
  // Serialises writes of state.json.
  std::mutex state_mu_;

  // Mirrors mode_ == kSwitching, so the write path can check it without mu_.
  std::atomic<bool> fallback_pending_{false};
  // A change marked the map since the last cut.
  std::atomic<bool> changed_{false};
  // The open cycle's map (log mode); replaced only with the VM lock exclusive.
  std::unique_ptr<DirtyBitmap> map_;
  // The copy-on-write of the last cut (or null): replaced only by WriteCut, with the VM
  // lock exclusive, so a change (VM lock shared) uses it without a lock while cow_active_;
  // the builder clears cow_active_ once it has read every frozen block.
  std::shared_ptr<DiskSnapshot> cow_;
  std::atomic<bool> cow_active_{false};

  // Protects everything below.
  mutable std::mutex mu_;
  std::condition_variable done_cv_;  // builds and mode changes are waited for here
  std::condition_variable sync_cv_;  // Flush callers wait here for the leader's sync
  Mode mode_ = Mode::kLog;
  bool resync_required_ = false;
  std::string reason_;
  // Log mode and resync_required_: the blocks still to resync (resync_all_dirty_: every
  // block). A fall back marks them in the bitmap. Empty otherwise.
  std::vector<ByteRange> resync_dirty_;
  bool resync_all_dirty_ = false;
  // Set by a fall back (kSwitching or kBitmap); reset only by ReturnToLog, with the VM
  // lock exclusive and no Flush leader running (the only users that hold it without mu_).
  std::unique_ptr<DirtyBitmap> bitmap_;
  std::vector<ByteRange> pending_ranges_;  // kSwitching, before the bitmap exists
  std::condition_variable build_cv_;       // the builder waits for build_queued_
  // The one cut between WriteCut and Publish / RollBack (VmTracker cuts again only after
  // that). The builder works on it without mu_ while building_.
  std::unique_ptr<Build> build_;
  bool build_queued_ = false;  // build_ waits for the builder
  bool building_ = false;      // the builder works on build_
  bool builder_stop_ = false;
  uint64_t building_bytes_ = 0;  // frozen bytes of the cut being built
  uint64_t sealed_bytes_ = 0;
  std::deque<SealedSegment> sealed_;
  DiskState floors_;           // numbering floors: released and dropped segments
  uint64_t last_seq_ = 0;      // seq of the last record built
  uint64_t last_segment_ = 0;  // number of the last segment built (or dropped)
  uint64_t last_cycle_ = 0;
  int64_t last_cut_nanos_ = 0;
  int64_t last_cut_first_change_ = 0;
  bool sync_running_ = false;   // a Flush leader is syncing
  uint64_t syncs_started_ = 0;  // generations: a Flush waits for one started after it
  uint64_t syncs_completed_ = 0;
  uint64_t sync_error_generation_ = 0;  // the last generation whose image sync failed
  Status sync_error_;
  uint64_t syncs_done_ = 0;       // for DiskStats::flush_syncs
  uint64_t cycles_built_ = 0;     // for DiskStats
  uint64_t cow_saved_bytes_ = 0;  // copy-on-write bytes saved over all cycles (DiskStats)
  std::string build_error_;       // the last build's failure; cleared by a build that works
  bool stop_ = false;
};

}  // namespace siterep::tracker
