// DiskLog: everything the tracker does inside one disk. VmTracker owns one per disk and
// does the VM-wide ordering (CutLock, RangeLocks, cycles); DiskLog does the rest.
//
// Changed-block tracking with per-cycle copy-on-write. Nothing of a guest's data is
// written twice, and nothing but the image and the map is written at the primary:
//  - Marking: a change (a FUSE thread, holding the VM lock shared and its range locked)
//    sets the bits of the 4 KiB blocks it touches in the changed-block map of the open
//    cycle, "<log dir>/changed.map" (DirtyBitmap, memory-mapped: a bit set before the
//    image write survives kill -9 in the page cache; Flush msyncs it). No system call
//    and no hand-off per write.
//  - Cuts: WriteCut is called with the VM lock exclusive (no change in flight, so the
//    image holds exactly the cut's content). It writes the map's bits with the numbers
//    the cut's records will carry to "<log dir>/<segment>.cut" (frozen_set.h), then
//    clears the map, and attaches a copy-on-write of the frozen blocks (snapshot.h, 4 KiB
//    blocks, persistent, "<log dir>/<segment>.cow"): from then on, the first change to a
//    frozen block saves the block's content at the cut (under its range lock), until the
//    cycle is released. VmTracker publishes the cut once every disk of the VM made its
//    own (Publish), or rolls it back on every disk (RollBack: the frozen bits go back into
//    the map), so a cycle is always on every disk or on none.
//  - Shipping: the cut is offered as a sealed segment at once; OpenSegment reads it
//    (cut_stream.h) from the copy-on-write where a block was saved, else from the image,
//    as the records of log_format.h. Overwrites within a cycle coalesce: a cycle holds
//    each changed block once, with its content at the cut. ReleaseThrough ends the
//    copy-on-write and deletes the cut's files (with an archive folder, the released
//    segment is written there first, read the same way).
//  - Group commit (Flush): the first caller that finds no sync in flight becomes the
//    leader and msyncs the map and fdatasyncs the image; callers that arrive meanwhile
//    are covered by the next generation, which starts after their call.
//  - Restart after kill -9: the page cache holds the image, the map, the cut files and
//    the copy-on-write files (data and bits), so every unreleased cut is reopened and
//    reads as before; "*.tmp" files (a cut file not renamed yet: its bits are still in
//    the map) are deleted, and VmTracker rolls back a cycle that not every disk had cut.
//    An older version's segment files ("<n>.seg") are shipped from their files, and its
//    "frozen.map" (a cut not published) goes back into the map.
//  - The fall back to the dirty bitmap (a copy-on-write that failed, so a cut can no
//    longer be read; a saved block that fails its CRC32C when read; an unreadable log at
//    open) happens in two steps: (1) mode_ becomes
//    kSwitching and the bitmap is created; changes meanwhile mark it. (2) FinishFallback,
//    with the VM lock exclusive, marks the blocks of every unreleased cut and segment
//    and of the map, persists state.json as bitmap mode and deletes the log's files.
//    The guest never sees an error.
//  - Snapshots (disk_log_resync.cc): at the cut of VmTracker::StartSnapshot, a disk in
//    bitmap mode returns to the log (ReturnToLog) with its dirty blocks as what it must
//    resync.
//
// Thread-safety: every public method may be called from any thread, with the preconditions
// stated on each. Lock order: VmTracker's locks (the reader of a cut takes a disk's RangeLocks,
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
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "tracker/cut_stream.h"
#include "tracker/dirty_bitmap.h"
#include "tracker/disk_state.h"
#include "tracker/log_format.h"
#include "tracker/segment_source.h"
#include "tracker/vm_tracker.h"

namespace siterep::tracker {

class ActivityLog;
class RangeLocks;
class DiskSnapshot;

// Files in the log folder besides the cuts (see above).
inline constexpr std::string_view kMapFileName = "changed.map";
// An older version's frozen set of a cut that was not published (a restart merges it).
inline constexpr std::string_view kFrozenFileName = "frozen.map";

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
    // Released segments are written (a cut) or moved (an older version's file) here, as
    // "<number>.seg"; empty: they are forgotten.
    std::filesystem::path archive_dir;
    // The disk's range locks (borrowed; outlive the DiskLog): a cut's reader reads each
    // run of frozen blocks with its range locked, as changes hold it while they save and
    // apply.
    RangeLocks* ranges = nullptr;
    // Bytes the copy-on-writes of the unreleased cuts may hold together (cow_limit); 0:
    // no bound but the file system's space.
    uint64_t cow_limit = 0;
  };

  // A cut made by WriteCut, until Publish or RollBack.
  struct CutTicket {
    uint64_t cycle = 0;
    int64_t unix_nanos = 0;
    int64_t first_change_unix_nanos = 0;
    bool made = false;  // false: the cut could not be made; its blocks stay in the map
    // The cut's segment number and last seq (made), or the disk's last ones (not made,
    // and after RollBack), which the next cycle goes on from.
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

  // Opens the log folder (created if missing; locked against a second tracker), lists an
  // older version's segments (each must end in a cut record) and the unreleased cuts (a
  // damaged one, or one whose copy-on-write is lost, falls back to the bitmap), opens the
  // map and merges an older version's frozen set into it, or reopens the bitmap.
  static Result<std::unique_ptr<DiskLog>> Open(Options options);
  ~DiskLog();  // Stop()s if needed
  DiskLog(const DiskLog&) = delete;
  DiskLog& operator=(const DiskLog&) = delete;

  // Before a change of [offset, offset + length) is applied: marks its blocks in the map
  // (log mode) or the bitmap, and saves the cut's content of frozen blocks of unreleased
  // cuts. The caller holds the VM lock shared and the range locked, and applies the
  // change only after this returns kLogged or kBitmap; then, with no lock held, it calls
  // FinishFallback (VM lock exclusive) if fallback_pending() (a save failed).
  LogOutcome BeforeChange(uint64_t offset, uint64_t length);

  // A fall back was started and FinishFallback has not run yet.
  bool fallback_pending() const { return fallback_pending_.load(std::memory_order_acquire); }
  // Second step of the fall back (see above). The caller holds the VM lock exclusively.
  // No-op when none is pending.
  void FinishFallback();

  // Freezes the blocks changed since the last cut as the cycle `cycle` (a disk without a
  // change gets a segment of the cut record alone): writes the cut file and starts the
  // copy-on-write. The caller holds the VM lock exclusively, and has published or rolled
  // back the previous ticket. Returns null when the disk is not logging (bitmap mode,
  // stopped); a ticket that is not made when a file could not be written.
  std::unique_ptr<CutTicket> WriteCut(uint64_t cycle, int64_t unix_nanos,
                                      int64_t first_change_unix_nanos);
  // After every disk's WriteCut made its cut: offers it to the shipper (SealedSegments).
  // Returns whether it was published (false: the disk fell back to the bitmap meanwhile).
  bool Publish(CutTicket& cut);
  // After some disk's WriteCut failed: the cycle is given up on every disk; its frozen
  // blocks go back into the map and its files are deleted.
  void RollBack(CutTicket& cut);
  // Restart: the last cut is newer than the VM's (another disk did not cut it before a
  // kill -9): roll back this disk's cuts and segments of cycles after vm_cycle. Called
  // from VmTracker::Open before any change.
  Status RollBackAfter(uint64_t vm_cycle);
  // A block was changed since the last cut (log mode).
  bool ChangedSinceCut() const;
  uint64_t last_cycle() const;
  int64_t last_cut_unix_nanos() const;
  int64_t last_cut_first_change_unix_nanos() const;
  // Sealed segments not released yet (what the cycle timer waits for).
  bool has_unreleased() const;
  // Lets the activity log shrink (activity_log.h). The caller holds the VM lock
  // exclusively (WriteCut does it too).
  void TrimActivityLog();
  // The activity log holds more extents than Trim keeps. Any thread, no lock.
  bool activity_log_over() const;

  // Group commit: returns when every change applied before the call is durable in the
  // image and its blocks in the map (or bitmap). The Status is the image's.
  Status Flush();
  // Syncs map and image; unreleased cuts stay for the next Open. Idempotent. The caller
  // guarantees that no BeforeChange or WriteCut runs during or after it (VmTracker
  // refuses changes once closed).
  Status Stop();

  std::vector<SealedSegment> SealedSegments() const;
  // Opens the unreleased segment number for reading (ENOENT: released or dropped). An
  // older version's segment file is checked whole first; a damaged one (EBADMSG) starts
  // the fall back to the bitmap with every block marked (the caller then runs
  // FinishFallback with the VM lock exclusive). Any thread, holding none of the
  // VmTracker's locks.
  Result<std::unique_ptr<SegmentStream>> OpenSegment(uint64_t number);
  // Forgets the sealed segments up to and including cycle (see Options::archive_dir).
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
  // The blocks that the unreleased segments numbered up to and including through change,
  // kSnapshotBlockSize-aligned, sorted, merged. Any thread, no lock.
  Result<std::vector<ByteRange>> ChangedBlocksThrough(uint64_t through) const;
  // The snapshot that resynced this disk ended. completed: the disk is no longer resync
  // required (if it still logs: a fall back since then keeps it). Not completed: it stays
  // resync required, reason "resync interrupted", with every block to resync. Persists
  // state.json. No-op for a disk that is not a log-mode disk in resync.
  Status EndResync(bool completed);

 private:
  // kSwitching: a fall back is pending (step 1 done or under way, FinishFallback not yet).
  enum class Mode { kLog, kSwitching, kBitmap };

  // A sealed segment not released yet: a cut, or an older version's segment file.
  struct Unreleased {
    SealedSegment seg;
    std::shared_ptr<const FrozenCut> cut;  // null: a file
    std::filesystem::path path;            // the file (an older version's segment)
  };

  explicit DiskLog(Options options);
  Status Init();
  Status OpenLogMode(const DiskState& state);
  // Reopens the cut files of the folder into unreleased_ (after RecoverLog's segments).
  Status OpenCuts();
  SealedSegment SegmentOf(const FrozenCut& cut) const;
  // Deletes a cut's files, ending its copy-on-write first. Errors are logged.
  void RemoveCutFiles(const FrozenCut& cut);
  // Writes the released entry u to the archive folder.
  Status Archive(const Unreleased& u);
  // Marks [offset, offset + length) without the log: in the bitmap, or in pending_ranges_
  // and then EnsureBitmap. Unlocks lk (which holds mu_).
  void MarkWithoutLog(std::unique_lock<std::mutex>& lk, uint64_t offset, uint64_t length);
  // Step 1 of the fall back: mode_ kLog -> kSwitching, with the reason. mu_ must be held.
  void RequestFallbackLocked(std::string reason);
  // A copy-on-write failed (seen by BeforeChange) with why: start the fall back.
  void CowFailed(const Status& why);
  // A reader of a cut found a copy-on-write block damaged (why): start the fall back. The
  // next change, cut or OpenSegment finishes it.
  void CutDamaged(const Status& why);
  // Creates (or opens) the bitmap if it does not exist yet, marking pending_ranges_.
  void EnsureBitmap();
  // Syncs the map (or bitmap) and the image; returns the image's status (the map's, when
  // map_status is set, goes there; otherwise a failure is only logged).
  Status SyncFiles(DirtyBitmap* map, Status* map_status = nullptr);

  // Marks the blocks of every unreleased segment and cut (all blocks if mark_all), of the
  // map and of an older version's frozen set in bitmap, persists the bitmap state and
  // deletes the log's files. Never fails: problems are logged and tracking carries on
  // with what it has. mode_ must not be kLog.
  void DropLog(DirtyBitmap& bitmap, bool mark_all);
  std::unique_ptr<DirtyBitmap> OpenBitmap();
  // Every file of the log folder (errors are logged).
  std::vector<std::filesystem::path> LogFiles() const;
  Status PersistState();

  const Options opts_;
  UniqueFd lock_fd_;  // flock on "<log dir>/LOCK" while open
  // Set at open, before any change; its Touch is thread-safe.
  std::unique_ptr<ActivityLog> al_;

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
  // The copy-on-writes of the unreleased cuts: changed only with the VM lock exclusive
  // (WriteCut, Open, FinishFallback), so a change (VM lock shared) walks it without a
  // lock. A released cut's copy-on-write is ended (saves nothing) and leaves the list at
  // the next cut.
  std::vector<std::shared_ptr<DiskSnapshot>> cows_;
  // What the copy-on-writes of this disk hold, against opts_.cow_limit (null: no limit).
  const std::shared_ptr<CowBudget> cow_budget_;

  // Protects everything below.
  mutable std::mutex mu_;
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
  // The cut between WriteCut and Publish / RollBack.
  std::unique_ptr<Unreleased> pending_;
  std::deque<Unreleased> unreleased_;  // in log order
  uint64_t unreleased_bytes_ = 0;      // at most (SealedSegment::bytes)
  DiskState floors_;           // numbering floors: released and dropped segments
  uint64_t last_seq_ = 0;      // seq of the last record of the last cut
  uint64_t last_segment_ = 0;  // number of the last segment (or dropped)
  uint64_t last_cycle_ = 0;
  int64_t last_cut_nanos_ = 0;
  int64_t last_cut_first_change_ = 0;
  bool sync_running_ = false;   // a Flush leader is syncing
  uint64_t syncs_started_ = 0;  // generations: a Flush waits for one started after it
  uint64_t syncs_completed_ = 0;
  uint64_t sync_error_generation_ = 0;  // the last generation whose image sync failed
  Status sync_error_;
  uint64_t syncs_done_ = 0;          // for DiskStats::flush_syncs
  uint64_t cycles_cut_ = 0;          // for DiskStats
  uint64_t cow_released_bytes_ = 0;  // copy-on-write bytes of released cuts (DiskStats)
  std::string cut_error_;            // the last cut's failure; cleared by a cut that works
  bool stop_ = false;
};

}  // namespace siterep::tracker
