// DiskLog: everything the tracker does inside one disk. VmTracker owns one per disk and
// does the VM-wide ordering (CutLock, RangeLocks, cycles); DiskLog does the rest:
//
//  - the record queue: appenders (FUSE threads, holding the VM lock shared and their
//    range locked) take a sequence number, encode their record outside the mutex and wait
//    until the writer reports it in the segment file;
//  - the writer thread, the only user of the disk's io_uring and open segment file: it
//    writes the ready prefix of the queue with one gather write (records point at the
//    callers' buffers, which stay valid because every caller waits; while one batch is in
//    flight the next one gathers in the queue), switches to a new segment after a cut
//    record, and runs group-commit syncs (fdatasync of segment and image, shared by every
//    Flush that asked before it began; they wait for pending seals);
//  - the sealer thread (with its own io_uring): makes each finished segment durable
//    (fdatasync, close, fsync the folder) and only then publishes it as sealed, off the
//    guest's write path;
//  - the sealed segment list and its release;
//  - the fall back to the dirty bitmap (budget exceeded, log I/O error, image write error,
//    unreadable log at open): done by the writer thread (or Open), never seen by the guest.
//
// Thread-safety: every public method may be called from any thread, with the preconditions
// stated on each. Lock order: VmTracker's locks, then release_mu_, then state_mu_, then
// mu_. The writer thread never takes a VmTracker lock, so appenders that hold one may wait
// for it.
#pragma once

#include <array>
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
  kBitmap,    // the disk tracks with the bitmap; the change's blocks are marked
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
    // Called from the writer thread, at most once per segment, when the open segment
    // passes segment_roll_bytes. Must not block (VmTracker wakes its cutter thread).
    std::function<void()> request_cut;
  };

  // One record on its way to the segment file. Its owner (an appender, or Cut) keeps it
  // alive until its state is no longer kPending; the writer reads it until then.
  struct Entry {
    enum class State { kPending, kLogged, kBitmap };
    RecordKind kind = RecordKind::kWrite;
    uint64_t seq = 0;
    uint64_t offset = 0;  // write / discard: the disk range the record covers
    uint64_t length = 0;
    uint64_t cycle = 0;  // cut only
    int64_t unix_nanos = 0;
    std::array<std::byte, kHeaderSize + kCutPayloadSize> head{};  // header (+ cut payload)
    size_t head_size = kHeaderSize;
    std::span<const std::byte> payload;  // write data, borrowed from the caller
    bool ready = false;                  // encoded; guarded by mu_
    State state = State::kPending;       // guarded by mu_
    // Notified when state leaves kPending: one of the DiskLog's waiter slots (never freed
    // while the log lives, so it may be notified after the lock is released); null for
    // entries nobody waits on individually.
    std::condition_variable* waiter = nullptr;
    uint64_t size() const { return head_size + payload.size(); }
  };

  // Opens the log folder (created if missing; locked against a second tracker), recovers
  // it (recovery.h) or reopens the bitmap, and starts the writer thread.
  static Result<std::unique_ptr<DiskLog>> Open(Options options);
  ~DiskLog();  // Stop()s if needed
  DiskLog(const DiskLog&) = delete;
  DiskLog& operator=(const DiskLog&) = delete;

  // Records a change. The caller holds the VM lock shared and the range locked, and calls
  // apply only after this returns kLogged or kBitmap.
  LogOutcome AppendWrite(uint64_t offset, std::span<const std::byte> data);
  LogOutcome AppendDiscard(uint64_t offset, uint64_t length);
  // The apply of a logged change failed, so the image may not hold what the log says:
  // fall back to the bitmap (resync will reconcile). Same caller context as Append*.
  void ApplyFailed(const Status& status, uint64_t offset, uint64_t length);

  // Queues a cut record behind every change so far. The caller holds the VM lock
  // exclusively. Returns null when the disk is not logging (bitmap mode, stopped).
  std::unique_ptr<Entry> EnqueueCut(uint64_t cycle, int64_t unix_nanos);
  // Waits until the writer has sealed the segment at cut (true), or the disk fell back to
  // the bitmap instead (false). Call without the VM lock.
  bool WaitSealed(Entry& cut);
  // A write or discard was logged since the last cut.
  bool ChangedSinceCut() const;
  uint64_t last_cycle() const;
  int64_t last_cut_unix_nanos() const;

  // Group commit: returns when every record appended and every change applied before the
  // call are durable (log and image, or bitmap and image). The Status is the image's.
  Status Flush();
  // Stops the writer once the queue is empty and syncs log and image. Idempotent. The
  // caller guarantees no Append* after it (VmTracker refuses changes once closed).
  Status Stop();

  std::vector<SealedSegment> SealedSegments() const;
  // Deletes the sealed segments up to and including cycle.
  Status ReleaseThrough(uint64_t cycle);
  DiskStats Stats() const;

 private:
  enum class Mode { kLog, kSwitching, kBitmap };

  explicit DiskLog(Options options);
  Status Init();
  Status OpenLogMode(const DiskState& state);
  LogOutcome Append(std::span<Entry> entries, uint64_t offset, uint64_t length);
  void RequestFallbackLocked(std::string reason);
  // Sets e's final state and wakes its waiter. mu_ must be held.
  static void CompleteLocked(Entry* e, Entry::State state) {
    e->state = state;
    if (e->waiter != nullptr) e->waiter->notify_all();
  }

  // Writer thread.
  void WriterLoop();
  void WriteBatch(std::vector<Entry*>& batch, std::vector<iovec>& iov);
  void Seal(Entry* cut);
  // Sealer thread.
  void SealerLoop();
  void DoSync(uint64_t generation);
  void FallBack(const std::string& reason, std::span<Entry* const> unlogged);

  // Makes the bitmap, marks the blocks of the log (all blocks if mark_all) and of extra,
  // persists the bitmap state and deletes the segments. Never fails: problems are logged
  // and tracking carries on with what it has. mode_ must be kSwitching.
  struct Range {
    uint64_t offset;
    uint64_t length;
  };
  std::unique_ptr<DirtyBitmap> DropLog(bool mark_all, std::span<const Range> extra);
  Status PersistState();
  Status SyncNow();
  uint64_t UnshippedLocked() const {
    return sealed_bytes_ + sealing_bytes_ + open_bytes_ + queued_bytes_;
  }
  std::string SegmentName() const;

  const Options opts_;
  UniqueFd lock_fd_;  // flock on "<log dir>/LOCK" while open

  // Writer-thread state (touched by Init before the thread starts and after it is joined).
  std::unique_ptr<IoRing> ring_;
  UniqueFd seg_fd_;            // the open segment
  uint64_t write_offset_ = 0;  // its size
  std::thread writer_;

  // A segment handed from the writer to the sealer thread: complete (it ends in the cut
  // record), but not yet durable or published.
  struct PendingSeal {
    UniqueFd fd;
    SealedSegment segment;
    Entry* cut = nullptr;
  };
  std::unique_ptr<IoRing> sealer_ring_;  // used only by the sealer thread
  std::thread sealer_;

  // Serialises ReleaseThrough against itself and against DropLog's scan of the folder.
  std::mutex release_mu_;
  // Serialises writes of state.json.
  std::mutex state_mu_;

  // Protects everything below.
  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // the writer waits for work
  std::condition_variable done_cv_;  // Flush, cuts, seals and mode changes are waited for here
  // Appenders wait on the slot of their last record's seq, so that a batch wakes only its
  // own appenders (a few others may share a slot and wake spuriously).
  static constexpr size_t kWaiterSlots = 64;
  std::array<std::condition_variable, kWaiterSlots> waiter_slots_;
  std::vector<std::condition_variable*> to_wake_;  // writer thread only
  Mode mode_ = Mode::kLog;
  bool resync_required_ = false;
  std::string reason_;
  std::string fallback_request_;         // non-empty: the writer should fall back (why)
  std::unique_ptr<DirtyBitmap> bitmap_;  // set once, with mode_ = kBitmap; never reset
  std::deque<Entry*> queue_;             // in seq order; the writer takes the ready prefix
  uint64_t last_seq_ = 0;                // last seq given out
  uint64_t written_seq_ = 0;             // last seq in the segment file
  uint64_t last_cut_seq_ = 0;
  uint64_t queued_bytes_ = 0;  // of entries queued or being written
  uint64_t open_bytes_ = 0;    // written to the open segment
  uint64_t open_first_seq_ = 0;
  uint64_t open_number_ = 0;
  uint64_t sealed_bytes_ = 0;
  std::deque<SealedSegment> sealed_;
  std::condition_variable seal_cv_;  // the sealer waits for seals_
  std::deque<PendingSeal> seals_;    // from the writer to the sealer, in segment order
  bool sealing_ = false;             // the sealer holds one taken from seals_
  bool sealer_stop_ = false;
  uint64_t sealing_bytes_ = 0;  // of segments in seals_ or being sealed
  DiskState floors_;            // numbering floors: released and dropped segments
  uint64_t last_cycle_ = 0;
  int64_t last_cut_nanos_ = 0;
  bool roll_requested_ = false;
  bool sync_wanted_ = false;
  uint64_t syncs_started_ = 0;  // generations: a Flush waits for one started after it
  uint64_t syncs_completed_ = 0;
  uint64_t sync_error_generation_ = 0;  // the last generation whose image sync failed
  Status sync_error_;
  uint64_t syncs_done_ = 0;  // for DiskStats::flush_syncs
  bool stop_ = false;
  bool writer_running_ = false;
};

}  // namespace siterep::tracker
