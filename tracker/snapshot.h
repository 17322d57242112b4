// DiskSnapshot: the copy-on-write point-in-time view of one disk. Two users:
//  - VmTracker's StartSnapshot (initial replication, resync): 64 KiB blocks, every block
//    of the disk protected until the copy's watermark (Copied) passes it;
//  - each unreleased cut of DiskLog: 4 KiB blocks, only the blocks of the frozen cut
//    (SnapshotOptions::only) are protected, until the cycle is released; persistent, so a
//    restart after kill -9 reopens it (Reopen) and reads the cut as before.
// The owner does all the ordering; this class does the per-disk mechanics.
//
// The snapshot file "<image>.srsnap" is sparse and as long as the disk: a saved block sits
// at its own offset. Before a guest change touches a kSnapshotBlockSize block that the
// copy has not passed yet (SnapshotCopied's watermark), SaveBefore copies the block's
// current content (the content at the cut, as it is the first change since) from the
// image into the file and sets the block's bit in an in-memory bitset. Reads take a
// block from the file when its bit is set, else from the image. Not crash-safe by
// design (the sync's snapshot: scratch space, deleted at the end and at the next Open),
// unless SnapshotOptions::persistent: then the bits live in the file too, after the
// disk's bytes, memory-mapped, with a CRC32C of every saved block after them; a bit is set
// only after its block's write returned, so after a kill -9 (the page cache keeps both)
// every set bit names a saved block and every clear one a block the image still holds at
// the cut. Not across power loss. The mapped part is allocated at Create (posix_fallocate),
// so a full file system fails Create instead of raising SIGBUS at a store into a hole.
// Read checks every saved block against its CRC32C (EBADMSG naming the block and the
// file: the file was damaged at rest).
//
// Persistent file layout: [0, size) the saved blocks at their own offsets (sparse);
// at bits_offset() (size rounded up to 4 KiB) the saved bits, one uint64 per 64 blocks;
// at crc_offset() (page-aligned after them) one uint32 CRC32C per block.
//
// Threads and locks: VmTracker's range locks (1 MiB chunks, so every block lies in one
// chunk) order everything per block. SaveBefore runs with the range of the change locked,
// before the change is applied; Read runs with the range it reads locked. So a block's
// bit is set, and its image content changed, only while its chunk is locked, and a reader
// of the block sees either "not saved, image unchanged" or "saved". The bit words are
// shared by blocks of different chunks, hence atomic; the watermark, the byte counter and
// the failure flag are atomics too. DataRanges and the accessors need no lock.
//
// Failure: a save that cannot be done (ENOSPC on the snapshot file, a read error on the
// image) never fails the guest's change: the snapshot is marked failed, saving stops,
// and Read and DataRanges return the first error from then on (the copy restarts with a
// new snapshot).
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "tracker/vm_tracker.h"

namespace siterep::tracker {

// "<image>.srsnap" for a disk whose log folder is "<image>.srlog" (any other log folder
// name: "<log dir>.srsnap", next to it).
std::filesystem::path SnapshotPathFor(const std::filesystem::path& log_dir);

// Widens every range to whole kSnapshotBlockSize blocks (the last block may end at size),
// drops what lies at or beyond size, sorts and merges (adjacent ranges too).
std::vector<ByteRange> ToBlockRanges(std::vector<ByteRange> ranges, uint64_t size);

// Deletes a snapshot file left over by an earlier run (a crash or kill -9 during a
// snapshot). Ok when there is none.
Status RemoveLeftoverSnapshot(const std::filesystem::path& path);

// A bound on the bytes that the copy-on-writes of one disk's unreleased cuts hold
// together (the VM's cow_limit), shared by them: a save that would pass it fails as a
// save without space does (the disk falls back to a resync of its cuts' blocks and the
// map's; the guest never sees it). A snapshot counts what it saved until it is destroyed.
struct CowBudget {
  uint64_t limit = 0;  // bytes, > 0 (an unbounded disk has no budget)
  std::atomic<uint64_t> used{0};
};

struct SnapshotOptions {
  uint64_t block_size = kSnapshotBlockSize;  // a power of two, at most kSnapshotBlockSize
  // When set: one bit per block (bit b of word w is block 64 * w + b); only blocks whose
  // bit is set are ever saved.
  std::shared_ptr<const std::vector<uint64_t>> only;
  // The saved bits are kept in the file (see above), for Reopen.
  bool persistent = false;
  std::shared_ptr<CowBudget> budget;  // null: no bound
};

class DiskSnapshot {
 public:
  // Creates (or truncates) the snapshot file at path, sparse, size bytes long, and opens
  // the image again read-only through /proc/self/fd/<image_fd>: SEEK_DATA moves the file
  // position, which is not ours to move, and an O_DIRECT descriptor would refuse the
  // unaligned reads. No block is saved yet: the caller attaches the snapshot at the cut.
  static Result<std::unique_ptr<DiskSnapshot>> Create(std::string disk_name, int image_fd,
                                                      uint64_t size, std::filesystem::path path,
                                                      SnapshotOptions options = {});
  // Opens a persistent snapshot file that Create made in an earlier run, with the blocks
  // it had saved (options as given to Create). EBADMSG when the file is not of that size.
  static Result<std::unique_ptr<DiskSnapshot>> Reopen(std::string disk_name, int image_fd,
                                                      uint64_t size, std::filesystem::path path,
                                                      SnapshotOptions options);
  ~DiskSnapshot();  // closes the descriptors; Remove() deletes the file
  DiskSnapshot(const DiskSnapshot&) = delete;
  DiskSnapshot& operator=(const DiskSnapshot&) = delete;

  // Saves every block of [offset, offset + length) that is inside the disk, not below the
  // watermark and not saved yet. The caller holds the range locked and has not applied
  // its change. Never fails (see Failure above).
  void SaveBefore(uint64_t offset, uint64_t length);

  // Reads [offset, offset + out.size()) as of the cut; within the disk. The caller holds
  // the range locked. Returns the snapshot's failure, if any, or ECANCELED once ended.
  Status Read(uint64_t offset, std::span<std::byte> out);

  // See VmTracker::SnapshotDataRanges. from <= to <= size. No lock needed: the image's
  // extents are read before the bitset, and a block that held data at the cut is saved
  // before a change can punch it.
  Result<std::vector<ByteRange>> DataRanges(uint64_t from, uint64_t to);

  // Raises the watermark: blocks that end at or below offset are not saved any more.
  void Copied(uint64_t offset);

  // Marks the snapshot ended: nothing is saved and Read fails from now on (a reader that
  // raced EndSnapshot must not return image content that is no longer protected).
  void End() { ended_.store(true, std::memory_order_release); }
  // Deletes the snapshot file (its descriptor stays open until destruction). Call after
  // End and once no SaveBefore can run.
  Status Remove();

  // Bytes of saved blocks that are not all zeros (all-zero runs are saved without a write).
  uint64_t saved_bytes() const { return saved_bytes_.load(std::memory_order_relaxed); }
  uint64_t copied_below() const { return copied_below_.load(std::memory_order_relaxed); }
  const std::filesystem::path& path() const { return path_; }
  // Ok, or why the snapshot can no longer be read.
  Status status() const;
  // A save failed (status() says why).
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  bool ended() const { return ended_.load(std::memory_order_acquire); }

 private:
  DiskSnapshot(std::string disk_name, uint64_t size, std::filesystem::path path,
               SnapshotOptions options);
  uint64_t block_count() const { return (size_ + block_size_ - 1) / block_size_; }
  bool Protected(uint64_t block) const;
  uint64_t BlockLength(uint64_t block) const;
  // Opens the image's own descriptor and allocates (or, persistent, maps) the bits.
  Status Attach(int image_fd, bool reopen);
  uint64_t word_count() const { return (block_count() + 63) / 64; }
  // Where the saved bits and the CRCs start in a persistent file (see the layout above).
  uint64_t bits_offset() const { return (size_ + 4095) / 4096 * 4096; }
  uint64_t crc_offset() const {
    return (bits_offset() + word_count() * sizeof(uint64_t) + 4095) / 4096 * 4096;
  }
  // Bytes mapped from bits_offset(): the bits and the CRCs.
  uint64_t mapped_length() const {
    return crc_offset() - bits_offset() + block_count() * sizeof(uint32_t);
  }
  // Checks the saved blocks of [offset, offset + length) read into data (persistent).
  Status CheckSaved(uint64_t offset, std::span<const std::byte> data) const;
  // Copies the blocks [first, first + count) (adjacent, at most 1 MiB together) from the
  // image into the file with one read and one write, then sets their bits.
  Status SaveRun(uint64_t first, uint64_t count);
  void Fail(Status status);
  static void SetBit(uint64_t* bits, uint64_t block);
  static bool TestBit(const uint64_t* bits, uint64_t block);

  const std::string disk_name_;
  const uint64_t size_;
  const std::filesystem::path path_;
  const uint64_t block_size_;
  const std::shared_ptr<const std::vector<uint64_t>> only_;  // see SnapshotOptions
  const bool persistent_;
  const std::shared_ptr<CowBudget> budget_;  // see SnapshotOptions
  UniqueFd image_fd_;  // the image, O_RDONLY, our own descriptor
  UniqueFd fd_;        // the snapshot file, O_RDWR

  // Bit b of word w is block 64 * w + b, read and set through std::atomic_ref. saved_:
  // the block's cut content is in the file (or, for an all-zero block, is known to be
  // zeros); in memory, or mapped from the file (persistent_, mapped_ bytes long).
  // data_: a saved block that is not all zeros (only those count as data in DataRanges).
  std::unique_ptr<uint64_t[]> saved_owned_;
  void* mapped_ = nullptr;
  uint64_t* saved_ = nullptr;
  uint32_t* crcs_ = nullptr;  // persistent: the CRC32C of each saved block
  std::unique_ptr<uint64_t[]> data_;
  std::atomic<uint64_t> copied_below_{0};
  std::atomic<uint64_t> saved_bytes_{0};
  std::atomic<bool> failed_{false};
  std::atomic<bool> ended_{false};
  mutable std::mutex status_mu_;  // protects status_; a leaf
  Status status_;
};

}  // namespace siterep::tracker
