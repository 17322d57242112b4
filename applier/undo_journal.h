// UndoJournal: the old contents of replica blocks, kept so that older recovery points stay
// readable after the applier has moved the images on (Hyper-V Replica's additional
// recovery points). Owned by PointStore (point_store.h), which serialises every call.
//
// The journal is a chain of points, oldest first, each a cycle the images once were at.
// Every point has an undo file holding, for each block overwritten after that point and
// before the next one in the chain, the block's content as of the point; only the newest
// point's file grows (Save), and only with blocks it does not hold yet. The content of a
// block as of point k is thus in the first file among points k, k+1, ..., newest that
// holds it, else in the current image (ReadAsOf).
//
// Removing a point from the chain (pruning, or a view's temporary point going away) keeps
// the older points right: the blocks of its file that the previous point lacks are copied
// into the previous point's file first (they were not overwritten between the two points,
// so they are the previous point's content too). The oldest point is simply deleted.
//
// On disk, in the folder `dir` (<replica>/undo/):
//   points.json                 the chain: [{cycle, cut_unix_nanos, retained}], oldest first
//   <20-digit cycle>.undo       a point's undo file: a sequence of records
// An undo record (integers little-endian):
//   offset size field
//   0      4    magic     kUndoMagic ("SRUN")
//   4      2    kind      1: data (kUndoBlockSize bytes follow), 2: zeros (nothing follows)
//   6      2    reserved  0
//   8      4    disk_id
//   12     4    crc       CRC32C of the header with this field zero, then the data
//   16     8    block     block number (byte offset / kUndoBlockSize)
//   24     8    reserved  0
// Open() rebuilds the in-memory index by scanning the files; a record that is short or
// fails its checks ends the file there (a torn tail of an append that was not synced) and
// the file is truncated to it. Undo files not listed in points.json are leftovers of an
// interrupted AddPoint/RemovePoint and are deleted. Creation order (file, then points.json)
// and removal order (points.json, then the file) make both safe against a crash.
//
// Not thread-safe: the caller serialises all calls (PointStore's lock).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"

namespace siterep::applier {

inline constexpr uint64_t kUndoBlockSize = 4096;
inline constexpr uint32_t kUndoMagic = 0x4E555253;  // "SRUN" on disk
inline constexpr size_t kUndoHeaderSize = 32;

struct UndoPoint {
  uint64_t cycle = 0;
  int64_t cut_unix_nanos = 0;
  // A recovery point (listed, counted against recovery_points). A point that is not
  // retained exists only while a PointView pins it.
  bool retained = false;
};

class UndoJournal {
 public:
  // Opens the journal in dir (created if missing). disk_ids: the replica's disks in
  // definition order; records name disks by id.
  static Result<std::unique_ptr<UndoJournal>> Open(const std::filesystem::path& dir,
                                                   std::vector<uint32_t> disk_ids);

  size_t size() const { return points_.size(); }
  bool empty() const { return points_.empty(); }
  const UndoPoint& point(size_t i) const { return points_[i]->meta; }
  std::optional<size_t> Find(uint64_t cycle) const;
  // Bytes in all undo files (including records not yet written out).
  uint64_t bytes() const;

  // Adds a newest point (cycle greater than the newest's) with an empty undo file. Writes
  // out and syncs the previous newest point's pending records first.
  Status AddPoint(uint64_t cycle, int64_t cut_unix_nanos, bool retained);
  Status SetRetained(size_t i, bool retained);
  // Removes point i, keeping every other point readable (see the header comment). If a
  // record of point i turns out damaged, the older points cannot be kept right: they are
  // dropped with it (logged as an error).
  Status RemovePoint(size_t i);

  // Removes every point after the n oldest (all of them for n = 0) with their files,
  // WITHOUT merging their blocks into older points: only right when the images are
  // point n - 1 or older again (a materialized point), so that what the removed files
  // held is no point's content any more. points.json first, then the files (a crash in
  // between leaves unlisted files, which Open deletes).
  Status KeepOldest(size_t n);

  // Every block of disk that the undo files of points i..newest hold, in increasing order:
  // the blocks that differ between point i and the images (the blocks to write back to
  // make the images point i).
  std::vector<uint64_t> BlocksFrom(size_t i, size_t disk) const;

  // Whether the newest point holds block (false when there are no points).
  bool NewestHas(size_t disk, uint64_t block) const;
  // Appends the content of block as of the newest point (kUndoBlockSize bytes) to the
  // newest point's undo file; records are buffered (Sync writes them). Requires a point,
  // and !NewestHas(disk, block).
  Status Save(size_t disk, uint64_t block, std::span<const std::byte> content);
  // Writes the buffered records and fdatasyncs the newest undo file. Once it returns Ok,
  // the blocks saved so far may be overwritten in the images.
  Status Sync();

  // Content of block as of point i: true with out (kUndoBlockSize bytes) filled when an
  // undo file among points i..newest holds it; false when the image holds it. A record
  // that fails its CRC is an EBADMSG error.
  Result<bool> ReadAsOf(size_t i, size_t disk, uint64_t block, std::span<std::byte> out) const;

 private:
  struct Point {
    UndoPoint meta;
    UniqueFd fd;
    uint64_t end = 0;  // bytes written to the file
    // Per disk: block -> (file offset << 1) | is_zeros.
    std::vector<std::unordered_map<uint64_t, uint64_t>> index;
  };

  UndoJournal(std::filesystem::path dir, std::vector<uint32_t> disk_ids)
      : dir_(std::move(dir)), disk_ids_(std::move(disk_ids)) {}
  std::filesystem::path PathOf(uint64_t cycle) const;
  Status LoadPoints();
  Status StorePoints() const;
  // Opens the file of p and rebuilds its index, truncating a torn tail.
  Status ScanFile(Point& p);
  Status RemoveUnlisted();
  std::optional<size_t> DiskIndex(uint32_t disk_id) const;
  // Drops points 0..i (a damaged record made them unreadable).
  Status DropThrough(size_t i, const Status& why);
  // Writes the buffered records of the newest point; on failure forgets them.
  Status Flush();
  // Reads the record at entry of point p into out (kUndoBlockSize bytes).
  Status ReadEntry(const Point& p, size_t disk, uint64_t block, uint64_t entry,
                   std::span<std::byte> out) const;

  const std::filesystem::path dir_;
  const std::vector<uint32_t> disk_ids_;
  std::vector<std::unique_ptr<Point>> points_;  // oldest first
  // Records of the newest point not yet written: they go at points_.back()->end.
  std::vector<std::byte> buffer_;
  std::vector<std::pair<size_t, uint64_t>> buffered_;  // (disk, block) of those records
};

}  // namespace siterep::applier
