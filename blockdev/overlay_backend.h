// OverlayBackend: a writable disk made of a read-only base (a replica's recovery point)
// and a sparse scratch file that takes every change. Used for a test failover (the
// scratch is deleted at the end) and for an unplanned failover before commit (writes
// must survive a daemon crash once flushed; commit copies them into a real image).
//
// The overlay file is exactly Size() bytes and keeps each block at its own offset. A
// block is "written" iff it is allocated in the file, so the written-block map is kept
// in memory only and rebuilt with SEEK_DATA/SEEK_HOLE at Open: after a crash it holds
// every block whose write was flushed (and maybe some written since the last flush). A
// written block holds its whole content; a block is never deallocated again (a discard
// writes zeros: a hole would show the base again). One backend at a time per file (flock).
//
// Block size: max(4096, st_blksize of the overlay file), a power of two. Writes of whole
// blocks go straight to the file; a partial block that is not written yet is
// read-modify-written (the rest from the base) under a striped lock, which whole-block
// writes of unwritten blocks take too, so neither can lose the other's data. A partial
// write to a written block needs no lock (nothing outside the request is rewritten).
//
// Thread-safe: Read/Write/Discard/Flush from any number of threads; WrittenRanges,
// written_bytes and CopyWrittenTo from any thread (they see the writes completed before
// the call; commit holds guest writes while it copies).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "blockdev/backend.h"
#include "common/status.h"
#include "common/unique_fd.h"
#include "tracker/vm_tracker.h"

namespace siterep::blockdev {

class OverlayBackend : public DiskBackend {
 public:
  // Fills out with the base from offset; the range lies within the disk. Called from
  // many threads at once; must be thread-safe and outlive the backend.
  using BaseReader = std::function<Status(uint64_t offset, std::span<std::byte> out)>;

  // Opens overlay_file, or creates it (sparse, size bytes; its folder must exist) if
  // missing. An existing file of another size is refused (EINVAL), one that another
  // backend has open too (EBUSY), and a file system that does not report holes
  // (EOPNOTSUPP: every block would look written). The caller deletes the file when done.
  static Result<std::unique_ptr<OverlayBackend>> Open(const std::filesystem::path& overlay_file,
                                                      uint64_t size, BaseReader base);

  uint64_t Size() const override { return size_; }
  Result<size_t> Read(uint64_t offset, std::span<std::byte> buf) override;
  Status Write(uint64_t offset, std::span<const std::byte> data) override;
  // Makes the range read as zeros by writing zeros into the overlay.
  Status Discard(uint64_t offset, uint64_t length) override;
  // fdatasync of the overlay file.
  Status Flush() override;

  // The written blocks as sorted, merged, disjoint ranges (the last clipped to Size()).
  std::vector<tracker::ByteRange> WrittenRanges() const;
  // Bytes in WrittenRanges().
  uint64_t written_bytes() const;
  uint64_t block_size() const { return block_size_; }

  // Copies every written block to fd (borrowed, open for writing) at the same offset,
  // then fdatasyncs fd: fd then holds the overlay's view where its base did.
  Status CopyWrittenTo(int fd);

 private:
  static constexpr size_t kStripes = 256;

  OverlayBackend(std::filesystem::path path, UniqueFd fd, uint64_t size, uint64_t block_size,
                 BaseReader base);
  Status LoadWrittenMap();

  uint64_t BlockStart(uint64_t block) const { return block * block_size_; }
  uint64_t BlockEnd(uint64_t block) const { return std::min(size_, (block + 1) * block_size_); }
  bool IsWritten(uint64_t block) const;
  // Marks blocks [first, last] written; counts the ones that were not.
  void MarkWritten(uint64_t first, uint64_t last);

  // Writes data at offset (inside the disk, not empty): the body of Write and Discard.
  Status WriteRange(uint64_t offset, std::span<const std::byte> data);
  // Writes part (inside block, not all of it). Caller holds the block's stripe if the
  // block was unwritten when it looked.
  Status WritePartial(uint64_t block, uint64_t offset, std::span<const std::byte> part);
  Status ReadBase(uint64_t offset, std::span<std::byte> out) const;
  Status ReadOverlay(uint64_t offset, std::span<std::byte> out) const;
  Status WriteOverlay(uint64_t offset, std::span<const std::byte> data) const;

  const std::filesystem::path path_;
  const std::string name_;  // "overlay <path>", for messages
  const UniqueFd fd_;
  const uint64_t size_;
  const uint64_t block_size_;
  const uint64_t blocks_;
  const BaseReader base_;

  // Bit b of words_[b / 64]: block b is written. Bits are only ever set, each after the
  // block's whole content is in the file (release), so a reader that sees a bit (acquire)
  // reads a complete block.
  std::vector<std::atomic<uint64_t>> words_;
  std::atomic<uint64_t> written_blocks_{0};

  // Stripe (block % kStripes) of a block that is not written yet: held across its
  // read-modify-write or whole-block write. Several are taken in ascending order; nothing
  // else is locked while they are held.
  std::array<std::mutex, kStripes> stripes_;
};

}  // namespace siterep::blockdev
