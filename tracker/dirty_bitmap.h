// DirtyBitmap: one bit per 4 KiB block of a disk. The tracker keeps two of them per disk:
// the changed-block map of the open cycle ("<log dir>/changed.map", see disk_log.h), and,
// after its change log was dropped, the blocks a resync must compare ("<log dir>/dirty.bitmap",
// bitmap tracking, "resync required"). The tracker sets bits from the FUSE threads
// (lock-free: a plain load, and std::atomic_ref fetch_or only when a bit is still clear).
//
// Persistent form: a file memory-mapped read-write with
// Boost.Interprocess (file_mapping + mapped_region), so a set bit survives kill -9 (it is
// in the shared page cache) and Flush() (msync) makes it survive power loss.
// File layout: a 64-byte header, then the bits as 64-bit little-endian words; bit b of
// word w is block 64 * w + b.
//   0  4  magic "SRBM"   4  4  version (1)   8  8  block size   16  8  disk size
//   24 40 zero
// Thread-safe: MarkRange, IsDirty and dirty_blocks from any thread; Flush from any thread.
#pragma once

#include <atomic>
#include <boost/interprocess/file_mapping.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"

namespace siterep::tracker {

inline constexpr std::string_view kBitmapFileName = "dirty.bitmap";

class DirtyBitmap {
 public:
  static constexpr uint64_t kBlockSize = 4096;
  static constexpr size_t kFileHeaderSize = 64;

  // Opens the bitmap file at path, creating it (all clean) if it is missing or was left
  // empty by a crash during creation. An existing file for another disk size or block size
  // is an error (EINVAL), not silently reused. Every block of the file is allocated before
  // it is mapped (a store into a hole of a mapping on a full file system is a SIGBUS);
  // when that fails (ENOSPC), the error is returned and a file this call created is
  // removed, so that no bitmap file claims to hold what changed.
  static Result<std::unique_ptr<DirtyBitmap>> Open(const std::filesystem::path& path,
                                                   uint64_t disk_size);
  // A bitmap in memory only, for when the file cannot be made (the log folder is full or
  // broken): tracking goes on, but does not survive a restart.
  static std::unique_ptr<DirtyBitmap> InMemory(uint64_t disk_size);

  ~DirtyBitmap();
  DirtyBitmap(const DirtyBitmap&) = delete;
  DirtyBitmap& operator=(const DirtyBitmap&) = delete;

  // Marks every block that [offset, offset + length) touches. Clipped to the disk.
  void MarkRange(uint64_t offset, uint64_t length);
  void MarkAll() { MarkRange(0, disk_size_); }
  bool IsDirty(uint64_t block) const;
  // Moves every set bit into *words (resized to word_count(); bit b of word w is block
  // 64 * w + b) and clears it here, word by word with an atomic exchange, so a bit set
  // concurrently is either taken or stays. Returns the number of blocks taken.
  uint64_t TakeAll(std::vector<uint64_t>* words);
  // Sets every bit that is set in words (as TakeAll returns them; shorter is fine).
  void MarkWords(std::span<const uint64_t> words);

  // Word w of the bits (blocks 64 * w to 64 * w + 63), for scans; w < word_count().
  uint64_t word(uint64_t w) const;
  uint64_t word_count() const { return WordCount(disk_size_); }

  uint64_t dirty_blocks() const { return dirty_blocks_.load(std::memory_order_relaxed); }
  uint64_t block_count() const { return blocks_; }
  uint64_t disk_size() const { return disk_size_; }
  bool persistent() const { return region_ != nullptr; }

  // Makes the set bits durable (msync). Ok and a no-op for an in-memory bitmap.
  Status Flush();

 private:
  DirtyBitmap(uint64_t disk_size, std::filesystem::path path);
  static uint64_t WordCount(uint64_t disk_size);
  void CountDirty();

  const uint64_t disk_size_;
  const uint64_t blocks_;
  const std::filesystem::path path_;
  std::unique_ptr<boost::interprocess::file_mapping> mapping_;
  std::unique_ptr<boost::interprocess::mapped_region> region_;
  std::vector<uint64_t> memory_;  // the words of an in-memory bitmap
  uint64_t* words_ = nullptr;     // the bit words (mapped or memory_)
  std::atomic<uint64_t> dirty_blocks_{0};
};

}  // namespace siterep::tracker
