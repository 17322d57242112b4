// DiskLog: everything the tracker does inside one disk. VmTracker owns one per disk and
// does the VM-wide ordering (CutLock, RangeLocks, cycles); DiskLog does the rest.
//
//  - Appends without a hand-off: an appender (a FUSE thread, holding the VM lock shared
//    and its range locked) reserves, under mu_ for a few instructions, the next seq and
//    the byte range [off, off + size) at the end of the open segment; then, outside the
//    mutex, encodes its header and writes header + payload (a 2-entry iovec pointing at
//    the caller's buffer) at off through its own thread's io_uring (IoRing::ForThisThread)
//    and returns kLogged; the caller applies. So file order is seq order, and records are
//    contiguous, but a later range may be complete before an earlier one: the open
//    segment may hold holes while appenders are in flight (and after a kill -9, which
//    recovery.h handles).
//  - Cuts: WriteCut is called with the VM lock exclusive, so no appender is in flight and
//    every range reserved before the cut record is fully written when the cut record is
//    written (no hole ever precedes a cut). It writes the cut record the same way, then
//    switches to a new segment file; the old one goes to the sealer thread (with its own
//    ring), which makes it durable (fdatasync, close, fsync the folder) and only then
//    publishes it as sealed, off the guest's write path.
//  - Group commit (Flush): no thread of its own. The first caller that finds no sync in
//    flight becomes the leader: it takes the next sync generation, waits for pending seals
//    and fdatasyncs the open segment and the image through its ring; callers that arrive
//    meanwhile wait, and then are covered by the next generation, which started after
//    their call (their records were written before their apply, before the call).
//  - The fall back to the dirty bitmap (budget exceeded, log write or sync error, failed
//    apply, unreadable log at open, a sealed segment the shipper found damaged:
//    SegmentDamaged) happens in two steps, because an appender holds the VM lock shared
//    and must not wait for the others. (1) The appender that hits the cause
//    sets mode_ to kSwitching, creates the bitmap file at once (EnsureBitmap: its existence
//    tells the next Open to finish the fall back after a crash) and marks its own range,
//    then returns kBitmap so the caller still applies; appenders that arrive meanwhile
//    mark their range and skip the log. (2) FinishFallback, called by VmTracker with the
//    VM lock exclusive (no appender in flight, as for a cut), marks the blocks of every
//    record of the unshipped log (holes skipped), persists state.json as bitmap mode and
//    deletes the segments. The guest never sees an error.
//  - Snapshots (disk_log_resync.cc): at the cut of VmTracker::StartSnapshot, a disk in
//    bitmap mode returns to the log (ReturnToLog): a new segment right after the cut, seq
//    numbers going on, state.json "log" but still "resync required" (reason
//    "resynchronising") until EndResync(true). While a log-mode disk is resync required,
//    what it must resync is kept (resync_dirty_, or all); should it fall back to the
//    bitmap again, those blocks are marked there too, so nothing is lost.
//
// Thread-safety: every public method may be called from any thread, with the preconditions
// stated on each. Lock order: VmTracker's locks, then release_mu_, then bitmap_mu_, then
// state_mu_, then mu_. No DiskLog thread takes a VmTracker lock.
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
#include "tracker/io_ring.h"
#include "tracker/log_format.h"
#include "tracker/segment_source.h"
#include "tracker/vm_tracker.h"

namespace siterep::tracker {

// Largest payload of one write record; longer writes become several records.
inline constexpr uint64_t kMaxRecordPayload = 1u << 20;

enum class LogOutcome {
  kLogged,    // the change's records are in the segment file
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
    uint64_t log_budget = 0;          // 0: no budget
    uint64_t segment_roll_bytes = 0;  // 0: never ask for an early cut
    std::filesystem::path archive_dir;  // released segments are moved here; empty: deleted
    // Called from an appender, at most once per segment, when the open segment passes
    // segment_roll_bytes. Must not block (VmTracker wakes its cutter thread).
    std::function<void()> request_cut;
  };

  // A cut record written by WriteCut, until its segment is sealed (or dropped).
  struct CutTicket {
    enum class State { kSealing, kSealed, kDropped };
    uint64_t cycle = 0;
    int64_t unix_nanos = 0;
    int64_t first_change_unix_nanos = 0;
    uint64_t seq = 0;
    uint64_t segment = 0;           // number of the segment the cut record ends
    State state = State::kSealing;  // guarded by mu_
  };

  // What ReturnToLog did.
  struct ResyncStart {
    // Back in log mode. False: creating the segment failed, so the disk stays in bitmap
    // mode (still resync required); all_dirty and dirty are right either way.
    bool logging = false;
    uint64_t last_seq = 0;      // the disk's last seq at the cut
    uint64_t last_segment = 0;  // the disk's last segment number at the cut
    bool all_dirty = false;     // every block of the bitmap was dirty (dirty is empty)
    // The bitmap's dirty blocks as kSnapshotBlockSize-aligned, sorted, merged ranges.
    std::vector<ByteRange> dirty;
  };

  // Opens the log folder (created if missing; locked against a second tracker), recovers
  // it (recovery.h) or reopens the bitmap (finishing a fall back a crash interrupted), and
  // starts the sealer thread.
  static Result<std::unique_ptr<DiskLog>> Open(Options options);
  ~DiskLog();  // Stop()s if needed
  DiskLog(const DiskLog&) = delete;
  DiskLog& operator=(const DiskLog&) = delete;

  // Records a change. The caller holds the VM lock shared and the range locked, and calls
  // apply only after this returns kLogged or kBitmap; then, with no lock held, it calls
  // FinishFallback (VM lock exclusive) if fallback_pending().
  LogOutcome AppendWrite(uint64_t offset, std::span<const std::byte> data);
  LogOutcome AppendDiscard(uint64_t offset, uint64_t length);
  // The apply of a logged change failed, so the image may not hold what the log says:
  // start the fall back to the bitmap (resync will reconcile). Same caller context as
  // Append*.
  void ApplyFailed(const Status& status, uint64_t offset, uint64_t length);

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

  // Writes a cut record behind every change so far and switches to a new segment; the old
  // one is sealed in the background. The caller holds the VM lock exclusively. Returns
  // null when the disk is not logging (bitmap mode, stopped, or the write failed: then it
  // has fallen back).
  std::unique_ptr<CutTicket> WriteCut(uint64_t cycle, int64_t unix_nanos,
                                      int64_t first_change_unix_nanos);
  // Waits until the segment ending at cut is sealed (true), or was dropped by a fall back
  // (false). Call without the VM lock.
  bool WaitSealed(CutTicket& cut);
  // A write or discard was logged since the last cut.
  bool ChangedSinceCut() const;
  uint64_t last_cycle() const;
  int64_t last_cut_unix_nanos() const;
  int64_t last_cut_first_change_unix_nanos() const;

  // Group commit: returns when every record appended and every change applied before the
  // call are durable (log and image, or bitmap and image). The Status is the image's. If
  // the log sync fails, a fall back is started (the caller finishes it, then flushes again).
  Status Flush();
  // Stops the sealer once the queued seals are done and syncs log and image. Idempotent.
  // The caller guarantees that no Append* or WriteCut runs during or after it (VmTracker
  // refuses changes once closed).
  Status Stop();

  std::vector<SealedSegment> SealedSegments() const;
  // Deletes the sealed segments up to and including cycle.
  Status ReleaseThrough(uint64_t cycle);
  DiskStats Stats() const;

  // --- Snapshots (disk_log_resync.cc) ---
  bool tracking_with_bitmap() const;  // bitmap mode, and no fall back pending
  bool resync_required() const;
  // Takes a disk in bitmap mode back to the log at the cut of cycle: its dirty blocks are
  // returned and kept as what it must resync; a new segment is opened (seq and segment
  // numbers go on); state.json says "log", resync required, "resynchronising"; then the
  // bitmap file is deleted (in that order, so a crash at any point leaves a state whose
  // next Open marks a superset). The caller holds the VM lock exclusively.
  ResyncStart ReturnToLog(uint64_t cycle);
  // The blocks that the writes and discards of the segments numbered up to and including
  // through touch (those not released yet), kSnapshotBlockSize-aligned, sorted, merged.
  // The segments must be complete (their cut records written). Any thread, no lock.
  Result<std::vector<ByteRange>> ChangedBlocksThrough(uint64_t through) const;
  // The snapshot that resynced this disk ended. completed: the disk is no longer resync
  // required (if it still logs: a fall back since then keeps it). Not completed: it stays
  // resync required, reason "resync interrupted", with every block to resync. Persists
  // state.json. No-op for a disk that is not a log-mode disk in resync.
  Status EndResync(bool completed);

 private:
  // kSwitching: a fall back is pending (step 1 done or under way, FinishFallback not yet).
  enum class Mode { kLog, kSwitching, kBitmap };

  // A segment file appenders write to. The fd and path are fixed for its life; it is
  // shared with a Flush leader or the sealer, which may still sync it after a cut or a
  // fall back has moved on.
  struct Segment {
    UniqueFd fd;
    uint64_t number = 0;
    std::string path;
  };
  struct Range {
    uint64_t offset;
    uint64_t length;
  };
  // One record on its way to the file: its header, and the payload it borrows.
  struct Record {
    RecordKind kind = RecordKind::kWrite;
    uint64_t seq = 0;
    uint64_t offset = 0;
    uint64_t length = 0;
    std::span<const std::byte> payload;
    std::byte head[kHeaderSize + kCutPayloadSize];
    size_t head_size = kHeaderSize;
    uint64_t size() const { return head_size + payload.size(); }
  };

  explicit DiskLog(Options options);
  Status Init();
  Status OpenLogMode(const DiskState& state);
  LogOutcome Append(std::span<Record> records, uint64_t offset, uint64_t length);
  // Encodes r's header (this disk's id and epoch, r's kind, seq, offset, length and the
  // CRC over header and payload) into r.head.
  void EncodeHead(Record& r, std::span<const std::byte> payload) const;
  // Writes the records (consecutive, starting at file offset at) into seg.
  Status WriteRecords(const Segment& seg, std::span<Record> records, uint64_t at);
  // Step 1 of the fall back: mode_ kLog -> kSwitching, with the reason. mu_ must be held.
  void RequestFallbackLocked(std::string reason);
  // Marks [offset, offset + length) without the log: in the bitmap, or in pending_ranges_
  // and then EnsureBitmap. Unlocks lk (which holds mu_).
  void MarkWithoutLog(std::unique_lock<std::mutex>& lk, uint64_t offset, uint64_t length);
  // Creates (or opens) the bitmap if it does not exist yet, marking pending_ranges_.
  void EnsureBitmap();
  // Sealer thread.
  void SealerLoop();
  // Syncs what the mode needs (segment, bitmap, image); returns the image's status and
  // sets *log_failed when the segment's sync failed.
  Status SyncFiles(const Segment* seg, DirtyBitmap* bitmap, bool* log_failed);

  // Marks the blocks of every record of the log (all blocks if mark_all) in bitmap,
  // persists the bitmap state and deletes the segments. Never fails: problems are logged
  // and tracking carries on with what it has. mode_ must not be kLog.
  void DropLog(DirtyBitmap& bitmap, bool mark_all);
  std::unique_ptr<DirtyBitmap> OpenBitmap();
  Status PersistState();
  uint64_t UnshippedLocked() const { return sealed_bytes_ + sealing_bytes_ + open_bytes_; }

  const Options opts_;
  UniqueFd lock_fd_;  // flock on "<log dir>/LOCK" while open

  // A segment handed from WriteCut to the sealer thread: complete (it ends in the cut
  // record), but not yet durable or published.
  struct PendingSeal {
    std::shared_ptr<Segment> seg;
    SealedSegment segment;
    CutTicket* cut = nullptr;
  };
  std::unique_ptr<IoRing> sealer_ring_;  // used only by the sealer thread
  std::thread sealer_;

  // Serialises ReleaseThrough against itself and against DropLog's scan of the folder.
  std::mutex release_mu_;
  // Serialises the creation of the bitmap (EnsureBitmap, and FinishFallback's use of it).
  std::mutex bitmap_mu_;
  // Serialises writes of state.json.
  std::mutex state_mu_;

  // Mirrors mode_ == kSwitching, so the write path can check it without mu_.
  std::atomic<bool> fallback_pending_{false};

  // Protects everything below.
  mutable std::mutex mu_;
  std::condition_variable done_cv_;  // seals and mode changes are waited for here
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
  std::vector<Range> pending_ranges_;    // kSwitching, before the bitmap exists
  // The open segment; replaced only with the VM lock exclusive (WriteCut, FinishFallback),
  // so an appender may use the one it reserved in after unlocking mu_. Null in bitmap mode.
  std::shared_ptr<Segment> seg_;
  uint64_t open_bytes_ = 0;  // reserved in the open segment: the next record goes there
  uint64_t open_first_seq_ = 0;
  uint64_t last_seq_ = 0;  // last seq given out
  uint64_t last_cut_seq_ = 0;
  uint64_t sealed_bytes_ = 0;
  std::deque<SealedSegment> sealed_;
  std::condition_variable seal_cv_;  // the sealer waits for seals_
  std::deque<PendingSeal> seals_;    // from WriteCut to the sealer, in segment order
  bool sealing_ = false;             // the sealer holds one taken from seals_
  bool sealer_stop_ = false;
  uint64_t sealing_bytes_ = 0;  // of segments in seals_ or being sealed
  DiskState floors_;            // numbering floors: released and dropped segments
  uint64_t last_segment_ = 0;   // number of the open segment (or the last one, in bitmap mode)
  uint64_t last_cycle_ = 0;
  int64_t last_cut_nanos_ = 0;
  int64_t last_cut_first_change_ = 0;
  bool roll_requested_ = false;
  bool sync_running_ = false;   // a Flush leader is syncing
  uint64_t syncs_started_ = 0;  // generations: a Flush waits for one started after it
  uint64_t syncs_completed_ = 0;
  uint64_t sync_error_generation_ = 0;  // the last generation whose image sync failed
  Status sync_error_;
  uint64_t syncs_done_ = 0;  // for DiskStats::flush_syncs
  bool stop_ = false;
};

}  // namespace siterep::tracker
