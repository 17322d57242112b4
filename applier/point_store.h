// PointStore: the replica images plus the undo journal, i.e. everything recovery points
// are made of; the one place that writes the images. Owned (shared) by applier::Replica
// and by every PointView open on it, so a view stays readable even if the Replica goes.
//
// Threads: the applier writes a cycle through a Writer, which holds images_mu_
// exclusively from the first undo save to the images' fdatasync, so readers (views, one
// shared hold per Read) never see half a cycle. Pins, point changes and pruning also take
// it exclusively. Points() and reads take it shared.
//
// Points: the latest point is the cycle the images are at. Retained points (at most
// recovery_points, spaced recovery_point_interval_ms apart by cut time) and points pinned
// by open views are the undo journal's chain (undo_journal.h). A view of the latest
// point adds a chain point for it (not retained) so that it stays readable while the
// applier moves on; the point goes (its undo blocks merged into the previous point) when
// the last view of it closes. A retained point pruned while a view has it pinned leaves
// the list at once but stays in the chain until the view closes.
//
// Syncs (replica_sync.cc) rewrite the images in place, block ranges at a time, over many
// calls; the images count as partial until FinishSync. Staged (the replica has a latest
// point P): P becomes a chain point that the sync pins (not retained unless it was), and
// every block a sync write changes is saved into the newest point's undo file (P's) and
// synced before the image changes, so P - the latest point meanwhile - and every older
// point stay readable. Direct (no consistent point): there is no latest point until
// FinishSync; blocks are still saved if the chain has points (older retained points stay
// right), which it usually has not.
//
// Materializing a point P (Replica::MaterializePoint, at a failover) makes the images P
// for good: every block an undo file of P or a newer chain point holds is written back
// with its content as of P (ReadAsOf), the images are synced, and only after the replica
// recorded P as its applied cycle is the journal emptied. The write-back only reads the
// journal, so it can be run again from the start after a crash at any moment. While it is
// unfinished no point is listed or readable (the images are neither the old latest point
// nor P) and nothing else writes the images.
//
// The latest point is usually the applied cycle, which is never 0 (cycles start at 1);
// only images adopted in sync with a new primary (Replica::Adopt) have a latest point 0.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <vector>

#include "applier/segment_sink.h"
#include "applier/undo_journal.h"
#include "common/function_ref.h"
#include "common/status.h"
#include "common/unique_fd.h"
#include "tracker/log_format.h"

namespace siterep::applier {

struct RecoveryPoint {
  uint64_t id = 0;  // the cycle; stable while the point exists; the same for every disk
  int64_t cut_unix_nanos = 0;
  bool latest = false;
};

// For OpenView / ExportPoint: whatever point is the latest when the view opens.
inline constexpr uint64_t kLatestPoint = ~uint64_t{0};

// How a sync writes the images (see above); kNone: no sync is unfinished.
enum class SyncWrites { kNone, kDirect, kStaged };

// How new recovery points are taken and old ones dropped.
struct PointPolicy {
  int recovery_points = 0;
  int64_t interval_ms = 0;
};

// Where the images stand when a PointStore opens (from the replica's position.json).
struct ImagesState {
  uint64_t applied_cycle = 0;
  int64_t applied_cut_unix_nanos = 0;
  // applied_cycle 0 is a consistent point (images adopted in sync); else 0 is no point.
  bool cycle0_is_point = false;
  // An apply was interrupted: the images are between applied_cycle and the next cycle
  // (no view of the latest point until the next cycle is applied).
  bool partial = false;
  // An unfinished sync writes the images (the replica's position.json says how); kStaged
  // keeps applied_cycle's chain point, kDirect has no latest point.
  SyncWrites sync = SyncWrites::kNone;
  // An unfinished materialization of this point rewrites the images.
  std::optional<uint64_t> materializing;
};

// What materializing a point takes (PointStore::BeginMaterialize).
struct MaterializePlan {
  int64_t cut_unix_nanos = 0;  // the point's
  // The images must be written back (false: they are the point already).
  bool write_back = false;
};

class PointStore {
 public:
  // Opens the images <dir>/<disk>.img (which must exist with their disk's size; a symlink
  // is followed, never replaced) and the journal <dir>/undo/, the images standing as `at`
  // says. Removes chain points no view can pin any more, and chain points newer than the
  // applied cycle (left by a materialization that recorded its point but had not emptied
  // the journal yet; they hold no point's content). Neither while a materialization is
  // unfinished: it needs the journal as it is.
  static Result<std::shared_ptr<PointStore>> Open(const std::filesystem::path& dir,
                                                  std::vector<DiskDefinition> disks,
                                                  const ImagesState& at);

  // <dir>/<disk>.img: the path the replica opens (a symlink stays a symlink).
  static std::filesystem::path ImagePath(const std::filesystem::path& dir, const std::string& disk);

  size_t disk_count() const { return disks_.size(); }
  const DiskDefinition& disk(size_t i) const { return disks_[i].def; }

  // Writes one cycle: Save what the cycle will overwrite (every record, before any image
  // write), SyncUndo, then WriteRecord each record, SyncImages, Finish. Until Finish the
  // images count as partial. One Writer at a time (the applier).
  class Writer {
   public:
    Writer(Writer&&) = default;
    // Saves into the newest point's undo file the blocks (4 KiB, whole covering blocks)
    // that the record changes and that the point does not hold yet. A discard does not
    // save blocks that read as zeros (it does not change them). No-op without points.
    Status Save(size_t disk, const tracker::RecordHeader& header);
    Status SyncUndo();
    Status WriteRecord(size_t disk, const tracker::RecordHeader& header,
                       std::span<const std::byte> payload);
    Status SyncImages();
    // The images are now exactly cycle.
    void Finish(uint64_t cycle, int64_t cut_unix_nanos);

   private:
    friend class PointStore;
    Writer(PointStore* store, std::unique_lock<std::shared_mutex> lock)
        : store_(store), lock_(std::move(lock)) {}
    PointStore* store_;
    std::unique_lock<std::shared_mutex> lock_;
  };
  Writer BeginCycle();

  // After cycle was applied and recorded: makes it a retained point if the policy says so,
  // then drops retained points beyond policy.recovery_points. Idempotent (also run at
  // Open for the applied cycle, in case a crash came between the two).
  Status AfterApplied(uint64_t cycle, int64_t cut_unix_nanos, const PointPolicy& policy);
  // Drops retained points beyond recovery_points (oldest first).
  Status Prune(int recovery_points);

  // Retained points, oldest first, then the latest (marked latest; it may be retained).
  // None while a materialization is unfinished.
  std::vector<RecoveryPoint> Points() const;
  uint64_t undo_bytes() const;

  // Keeps point_id (or kLatestPoint) readable until Unpin. ENOENT when there is no such
  // point; EBUSY for the latest point while the images are partial, and for every point
  // while a materialization is unfinished.
  Result<RecoveryPoint> Pin(uint64_t point_id);
  void Unpin(uint64_t cycle);

  // Per disk (in order), the blocks (kUndoBlockSize units, increasing) that the undo files
  // of point_id and of every newer chain point hold: every block the images have had
  // overwritten since they were point_id (by applied cycles, an interrupted apply, sync
  // writes), i.e. what differs between point_id and the images. A discard saves only the
  // blocks that held data, so blocks that read as zeros before and after are not among
  // them. Empty for the latest point unless it is a chain point whose file holds blocks
  // (an interrupted apply or a staged sync wrote over it). point_id: a retained point or
  // the latest point (ENOENT otherwise); while a materialization is unfinished only the
  // point being materialized (EBUSY for others), whose journal is still whole.
  Result<std::vector<std::vector<uint64_t>>> UndoBlocksSince(uint64_t point_id) const;

  // Reads [offset, offset + out.size()) of disk as of the pinned point cycle.
  Status Read(uint64_t cycle, size_t disk, uint64_t offset, std::span<std::byte> out) const;

  // --- Syncs (see the header comment). One sync at a time, from one thread (the replica's
  // receiver); no Writer meanwhile.

  // Could a sync starting now be staged: there is a latest point, and the images are
  // exactly it or the newest chain point is it (its undo file then holds what an
  // interrupted apply overwrote)?
  bool CanStage() const;
  // Starts writing the images for a sync in mode (kDirect or kStaged; kStaged needs
  // CanStage). Idempotent while a sync of the same mode is unfinished (after Open with
  // that mode, or a BeginSync); EINVAL for the other mode.
  Status BeginSync(SyncWrites mode);
  // Undoes a BeginSync before any sync write (the replica could not record the sync).
  void CancelSync();
  // Writes data at offset of disk, saving first the blocks it changes (see above).
  Status SyncWrite(size_t disk, uint64_t offset, std::span<const std::byte> data);
  // Whether [offset, offset + length) of the image may hold data (is not all holes).
  Result<bool> HoldsData(size_t disk, uint64_t offset, uint64_t length) const;
  // Zeros [offset, offset + length) of disk: nothing when the range is holes already,
  // else blocks holding data are saved and the range is punched out. Returns whether the
  // image changed.
  Result<bool> SyncZero(size_t disk, uint64_t offset, uint64_t length);
  // fdatasync of one image / all images.
  Status SyncImage(size_t disk) const;
  Status SyncImages() const;
  // [offset, offset + out.size()) of the image as it is now (within the disk). Asks the
  // kernel to read the next readahead bytes meanwhile (a sync's comparison reads on).
  Status ReadImage(size_t disk, uint64_t offset, std::span<std::byte> out,
                   uint64_t readahead = 0) const;
  // The images are now exactly cycle (synced, recorded by the replica): ends the sync
  // (its point goes unless retained or viewed), then runs AfterApplied. The store is at
  // cycle even when the point policy fails.
  Status FinishSync(uint64_t cycle, int64_t cut_unix_nanos, const PointPolicy& policy);

  // --- Materializing a point (see the header comment). One at a time, from one thread (the
  // replica's, holding its apply and receive locks); no Writer and no sync meanwhile.

  // Starts making the images point_id: from here on no point is listed or can be pinned.
  // resume: the replica recorded this materialization already (an earlier attempt failed
  // or crashed): the images must be written back again, whatever they hold now.
  // Otherwise refuses ENOENT (point_id is neither the latest point nor a retained one),
  // EBUSY (a sync is unfinished, views are open, or the images are between cycles and the
  // journal cannot give the latest point back: apply the interrupted cycle first). Also
  // EBUSY while another point is being materialized.
  Result<MaterializePlan> BeginMaterialize(uint64_t point_id, bool resume);
  // Undoes a BeginMaterialize (not resumed) before the images were touched.
  void CancelMaterialize();
  // Writes back into the images, for every block an undo file of point_id or a newer chain
  // point holds, its content as of point_id (from the first such file), then fdatasyncs
  // the images. after_block runs after each block written; an error from it stops the
  // write-back (a test's failpoint). Reads the journal only: running it again gives the
  // same images. ENOENT when point_id is not in the journal.
  Status WriteBackPoint(uint64_t point_id, FunctionRef<Status()> after_block);
  // The images are point_id, synced and recorded by the replica: makes it the latest point,
  // empties the journal, ends the materialization, then runs AfterApplied (point_id may
  // become a retained point again). On an error before the end, the materialization stays
  // open: BeginMaterialize(point_id, false) then finds the images are point_id.
  Status FinishMaterialize(uint64_t point_id, int64_t cut_unix_nanos, const PointPolicy& policy);

 private:
  struct Disk {
    DiskDefinition def;
    std::filesystem::path path;
    UniqueFd fd;
  };

  PointStore() = default;
  // The block's content in the image (zeros past its end).
  Status ReadImageBlock(size_t disk, uint64_t block, std::span<std::byte> out) const;
  // Saves block unless the newest point holds it; skip_zeros: not if it reads as zeros.
  Status SaveBlock(size_t disk, uint64_t block, bool skip_zeros, std::span<std::byte> scratch);
  // Saves the blocks [offset, offset + length) covers (a write), or only those that hold
  // data (a discard or zeroing: skips holes and blocks reading as zeros). No-op without
  // points. Needs mu_ exclusive.
  Status SaveRange(size_t disk, uint64_t offset, uint64_t length, bool data_only);
  // SaveRange, then the undo synced if anything was saved. Needs mu_ exclusive.
  Status SaveRangeDurably(size_t disk, uint64_t offset, uint64_t length, bool data_only);
  Result<bool> HoldsDataLocked(size_t disk, uint64_t offset, uint64_t length) const;
  // Removes chain points that are neither retained nor pinned. Needs mu_ exclusive.
  Status CollectLocked();
  Status PruneLocked(int recovery_points);
  std::string PointList() const;

  std::vector<Disk> disks_;
  // Protects the images' contents, journal_, latest_*, images_partial_ and pins_.
  // Exclusive: the applier's Writer, pins, point changes. Shared: reads, Points().
  // Taken after Replica's locks (Replica never holds its mu_ while taking it).
  mutable std::shared_mutex mu_;
  std::unique_ptr<UndoJournal> journal_;
  // The latest point: the cycle the images are at, when has_latest_ (not during a direct
  // sync, nor before the first cycle of a replica whose images are not a point).
  uint64_t latest_cycle_ = 0;
  int64_t latest_cut_unix_nanos_ = 0;
  bool has_latest_ = false;
  bool images_partial_ = false;
  // An unfinished materialization of this point: nothing listed, nothing pinned.
  std::optional<uint64_t> materializing_;
  std::map<uint64_t, int> pins_;  // cycle -> open views
  // An unfinished sync. kStaged: latest_cycle_ is its point, kept in the chain (pinned by
  // the sync). kDirect: latest_cycle_ is 0.
  SyncWrites sync_ = SyncWrites::kNone;
  uint64_t pre_sync_latest_cycle_ = 0;  // for CancelSync
  bool pre_sync_has_latest_ = false;    //
  bool pre_sync_partial_ = false;       //
};

}  // namespace siterep::applier
