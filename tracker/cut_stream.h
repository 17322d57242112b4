// How a cut's segment is made when it is sent (segment_source.h): CutStream reads one
// disk's share of a cut, the frozen blocks as they were at the cut, and lays them out as
// the records of log_format.h:
//   - the frozen blocks in disk order, in runs of consecutive blocks within one
//     kMaxRecordPayload-aligned stretch of the disk (the last block may be short);
//   - a run that reads as all zeros at the cut becomes a discard record without payload,
//     any other run a write record with the run's content;
//   - then the cut record.
// The number of records (and so the cut's last seq) depends only on the frozen set
// (CutRecordCount), so it is fixed at the cut; the byte count is fixed once the content
// is read. Reading again gives the same bytes as long as the cut's copy-on-write holds.
// FileSegmentStream reads a segment file that an older version wrote.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "tracker/frozen_set.h"
#include "tracker/segment_source.h"
#include "tracker/snapshot.h"

namespace siterep::tracker {

class RangeLocks;

// Largest payload of one write record; longer runs of changed blocks become several.
inline constexpr uint64_t kMaxRecordPayload = 1u << 20;

// One disk's share of a cut that has not been released.
struct FrozenCut : CutInfo {
  // One bit per 4 KiB block, shared with the copy-on-write.
  std::shared_ptr<const std::vector<uint64_t>> frozen;
  uint64_t frozen_blocks = 0;
  // The content at the cut of frozen blocks changed since; null when no block is frozen.
  std::shared_ptr<DiskSnapshot> cow;
};

// "<log dir>/<20 digits>.cut" and ".cow": a cut's frozen set and its copy-on-write.
std::filesystem::path CutPath(const std::filesystem::path& log_dir, uint64_t segment);
std::filesystem::path CowPath(const std::filesystem::path& log_dir, uint64_t segment);
// The copy-on-write of a cut of the frozen set: 4 KiB blocks, only those, persistent,
// counted against the disk's budget (null: none).
SnapshotOptions CutCowOptions(std::shared_ptr<const std::vector<uint64_t>> frozen,
                              std::shared_ptr<CowBudget> budget);

// Records of a cut of the frozen set words on a disk of disk_size bytes: one per run (as
// above) and the cut record.
uint64_t CutRecordCount(const std::vector<uint64_t>& words, uint64_t disk_size);
// Bytes of such a cut's segment when no run reads as zeros.
uint64_t CutBytesAtMost(const std::vector<uint64_t>& words, uint64_t disk_size);

// The cut files ("<n>.cut", frozen_set.h) of a log folder, each reopened with its
// copy-on-write ("<n>.cow", snapshot.h) against the image: what a restart of DiskLog and
// `siterep-log` read.
struct CutFiles {
  std::filesystem::path log_dir;
  std::string disk_name;  // for messages
  uint64_t disk_size = 0;
  int image_fd = -1;  // borrowed
  // The disk's id: a cut file of another disk is refused (EINVAL). 0: any, but one.
  uint32_t disk_id = 0;
  // Cuts numbered up to here were released (state.json); their files are left-overs of a
  // release cut short, deleted when remove_released, else skipped.
  uint64_t released_segment = 0;
  bool remove_released = false;
  // When set, each cut must go on from these (EBADMSG otherwise), and they move along.
  std::optional<uint64_t> last_seq;
  uint64_t last_cycle = 0;
  std::shared_ptr<CowBudget> cow_budget;  // the reopened copy-on-writes count against it
};
// In segment order. EBADMSG for a damaged cut file or a copy-on-write that cannot be
// reopened (the blocks it held are lost); "*.cut.tmp" files are not looked at.
Result<std::vector<std::shared_ptr<FrozenCut>>> OpenCutFiles(CutFiles in);

class CutStream final : public SegmentStream {
 public:
  // ranges: the disk's range locks; each run is read with its range locked, as changes
  // hold it while they save to the copy-on-write and apply. on_damage (may be empty) is
  // called with the EBADMSG Status of a copy-on-write block that fails its CRC32C, before
  // Next returns it.
  CutStream(std::shared_ptr<const FrozenCut> cut, uint64_t disk_size, RangeLocks* ranges,
            std::function<void(const Status&)> on_damage = {});
  Result<std::span<const std::byte>> Next(size_t max) override;
  bool done() const override { return ended_ && pos_ == buf_.size(); }

 private:
  // Appends the next record to buf_.
  Status MakeRecord();

  const std::shared_ptr<const FrozenCut> cut_;
  const uint64_t disk_size_;
  RangeLocks* const ranges_;
  const std::function<void(const Status&)> on_damage_;
  uint64_t next_block_ = 0;  // where the search for the next run starts
  uint64_t seq_;             // of the last record made
  bool ended_ = false;       // the cut record is made
  std::vector<std::byte> buf_;
  size_t pos_ = 0;  // bytes of buf_ already returned
};

// The rest of stream's bytes, read max at a time.
Result<std::vector<std::byte>> ReadSegment(SegmentStream& stream, size_t max = 1u << 20);
// Writes the rest of stream to path as a segment file: "<path>.tmp", fdatasync, rename.
Status WriteSegmentFile(SegmentStream& stream, const std::filesystem::path& path);

class FileSegmentStream final : public SegmentStream {
 public:
  static Result<std::unique_ptr<FileSegmentStream>> Open(const std::filesystem::path& path);
  Result<std::span<const std::byte>> Next(size_t max) override;
  bool done() const override { return offset_ == size_; }

 private:
  FileSegmentStream(std::filesystem::path path, UniqueFd fd, uint64_t size)
      : path_(std::move(path)), fd_(std::move(fd)), size_(size) {}
  const std::filesystem::path path_;
  UniqueFd fd_;
  const uint64_t size_;
  uint64_t offset_ = 0;
  std::vector<std::byte> buf_;
};

}  // namespace siterep::tracker
