#include "tracker/snapshot.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "common/block_hash.h"
#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/locks.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

// A block never straddles two range-lock chunks, so locking a change's range orders every
// block it touches, including the parts of the block outside the change.
static_assert((uint64_t{1} << RangeLocks::kChunkShift) % kSnapshotBlockSize == 0);

namespace {

constexpr uint64_t kNoData = std::numeric_limits<uint64_t>::max();

// The calling thread's block buffer for saves (a FUSE thread saves one block at a time;
// every snapshot's blocks are at most kSnapshotBlockSize).
std::byte* BlockBuffer() {
  thread_local std::unique_ptr<std::byte[]> buffer;
  if (!buffer) buffer = std::make_unique<std::byte[]>(kSnapshotBlockSize);
  return buffer.get();
}

// The offset of the first data at or after offset in fd (kNoData: none), or offset itself
// when the file system cannot tell (then everything counts as data).
uint64_t NextData(int fd, uint64_t offset) {
  const off_t d = ::lseek(fd, static_cast<off_t>(offset), SEEK_DATA);
  if (d >= 0) return static_cast<uint64_t>(d);
  return errno == ENXIO ? kNoData : offset;
}

}  // namespace

fs::path SnapshotPathFor(const fs::path& log_dir) {
  fs::path p = log_dir.lexically_normal();
  if (!p.has_filename()) p = p.parent_path();  // "<image>.srlog/"
  if (p.extension() == ".srlog") return p.replace_extension(".srsnap");
  p += ".srsnap";
  return p;
}

std::vector<ByteRange> ToBlockRanges(std::vector<ByteRange> ranges, uint64_t size) {
  for (ByteRange& r : ranges) {
    if (r.offset >= size || r.length == 0) {
      r.length = 0;
      continue;
    }
    const uint64_t end = r.offset + std::min(r.length, size - r.offset);
    const uint64_t start = r.offset / kSnapshotBlockSize * kSnapshotBlockSize;
    const uint64_t stop =
        std::min(size, (end + kSnapshotBlockSize - 1) / kSnapshotBlockSize * kSnapshotBlockSize);
    r = ByteRange{start, stop - start};
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const ByteRange& a, const ByteRange& b) { return a.offset < b.offset; });
  std::vector<ByteRange> out;
  for (const ByteRange& r : ranges) {
    if (r.length == 0) continue;
    if (!out.empty() && out.back().offset + out.back().length >= r.offset) {
      const uint64_t end = std::max(out.back().offset + out.back().length, r.offset + r.length);
      out.back().length = end - out.back().offset;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

Status RemoveLeftoverSnapshot(const fs::path& path) {
  if (::unlink(path.c_str()) == 0) {
    spdlog::info("deleted the snapshot file {} left over by an earlier run", path.string());
    return Status::Ok();
  }
  if (errno == ENOENT) return Status::Ok();
  return Status::FromErrno(errno, "delete the leftover snapshot file " + path.string());
}

DiskSnapshot::DiskSnapshot(std::string disk_name, uint64_t size, fs::path path,
                           SnapshotOptions options)
    : disk_name_(std::move(disk_name)),
      size_(size),
      path_(std::move(path)),
      block_size_(options.block_size),
      only_(std::move(options.only)) {}

DiskSnapshot::~DiskSnapshot() = default;

Result<std::unique_ptr<DiskSnapshot>> DiskSnapshot::Create(std::string disk_name, int image_fd,
                                                           uint64_t size, fs::path path,
                                                           SnapshotOptions options) {
  if (options.block_size == 0 || (options.block_size & (options.block_size - 1)) != 0 ||
      options.block_size > kSnapshotBlockSize) {
    return Status::Invalid("snapshot of disk " + disk_name + ": block size " +
                           std::to_string(options.block_size) +
                           " is not a power of two <= " + std::to_string(kSnapshotBlockSize));
  }
  std::unique_ptr<DiskSnapshot> snap(
      new DiskSnapshot(std::move(disk_name), size, std::move(path), std::move(options)));
  // An own descriptor of the image: lseek(SEEK_DATA) moves the file position, which must
  // not be the borrowed descriptor's; and O_DIRECT would refuse unaligned buffers.
  SR_ASSIGN_OR_RETURN(snap->image_fd_,
                      OpenFile("/proc/self/fd/" + std::to_string(image_fd), O_RDONLY | O_CLOEXEC));
  SR_ASSIGN_OR_RETURN(snap->fd_,
                      OpenFile(snap->path_, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (::ftruncate(snap->fd_.get(), static_cast<off_t>(size)) != 0) {
    Status s = Status::FromErrno(errno, "size the snapshot file " + snap->path_.string());
    (void)snap->Remove();
    return s;
  }
  const uint64_t words = (snap->block_count() + 63) / 64;
  snap->saved_ = std::make_unique<std::atomic<uint64_t>[]>(words);  // zeroed (C++20)
  snap->data_ = std::make_unique<std::atomic<uint64_t>[]>(words);
  if (snap->only_) snap->read_ = std::make_unique<std::atomic<uint64_t>[]>(words);
  return snap;
}

uint64_t DiskSnapshot::BlockLength(uint64_t block) const {
  return std::min(block_size_, size_ - block * block_size_);
}

void DiskSnapshot::SetBit(std::atomic<uint64_t>* bits, uint64_t block) {
  bits[block / 64].fetch_or(uint64_t{1} << (block % 64));
}

bool DiskSnapshot::TestBit(const std::atomic<uint64_t>* bits, uint64_t block) {
  return (bits[block / 64].load() >> (block % 64)) & 1;
}

void DiskSnapshot::SaveBefore(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= size_ || failed_.load(std::memory_order_acquire)) return;
  const uint64_t end = offset + std::min(length, size_ - offset);
  const uint64_t watermark = copied_below_.load(std::memory_order_acquire);
  // [query, hole_until) is a hole of the image, from the last SEEK_DATA at query; a big
  // discard of a sparse region so costs one lseek per extent, not one read per block.
  uint64_t hole_until = 0;
  for (uint64_t b = offset / block_size_; b * block_size_ < end; ++b) {
    const uint64_t start = b * block_size_;
    const uint64_t block_end = start + BlockLength(b);
    if (block_end <= watermark || !Protected(b) || TestBit(saved_.get(), b)) continue;
    if (block_end > hole_until) hole_until = NextData(image_fd_.get(), start);
    if (block_end <= hole_until) {
      SetBit(saved_.get(), b);  // a hole at the cut: reads as zeros, nothing to copy
      continue;
    }
    Status s = Save(b);
    if (!s.ok()) {
      Fail(std::move(s));
      return;
    }
  }
}

bool DiskSnapshot::Protected(uint64_t block) const {
  if (!only_) return true;
  const std::vector<uint64_t>& only = *only_;
  if (block / 64 >= only.size() || ((only[block / 64] >> (block % 64)) & 1) == 0) return false;
  return !TestBit(read_.get(), block);
}

void DiskSnapshot::MarkRead(uint64_t offset, uint64_t length) {
  if (!read_ || length == 0 || offset >= size_) return;
  const uint64_t end = offset + std::min(length, size_ - offset);
  for (uint64_t b = offset / block_size_; b * block_size_ < end; ++b) SetBit(read_.get(), b);
}

Status DiskSnapshot::Save(uint64_t block) {
  const uint64_t offset = block * block_size_;
  const size_t length = static_cast<size_t>(BlockLength(block));
  std::byte* buf = BlockBuffer();
  SR_RETURN_IF_ERROR(PReadAll(image_fd_.get(), buf, length, offset, "image of disk " + disk_name_));
  if (!IsAllZero(std::span<const std::byte>(buf, length))) {
    SR_RETURN_IF_ERROR(PWriteAll(fd_.get(), buf, length, offset, path_.string()));
    SetBit(data_.get(), block);
    saved_bytes_.fetch_add(length, std::memory_order_relaxed);
  }
  // The snapshot file is sparse: an all-zero block reads as zeros without being written.
  SetBit(saved_.get(), block);
  return Status::Ok();
}

void DiskSnapshot::Fail(Status status) {
  {
    std::lock_guard lk(status_mu_);
    if (!status_.ok()) return;
    status_ = status.WithContext("snapshot of disk " + disk_name_ + " failed");
  }
  failed_.store(true, std::memory_order_release);
  spdlog::error("disk {}: the snapshot can no longer be read (the guest goes on): {}", disk_name_,
                status.ToString());
}

Status DiskSnapshot::status() const {
  if (failed_.load(std::memory_order_acquire)) {
    std::lock_guard lk(status_mu_);
    return status_;
  }
  if (ended_.load(std::memory_order_acquire)) {
    return Status::Error(ECANCELED, "the snapshot of disk " + disk_name_ + " has ended");
  }
  return Status::Ok();
}

Status DiskSnapshot::Read(uint64_t offset, std::span<std::byte> out) {
  SR_RETURN_IF_ERROR(status());
  const uint64_t end = offset + out.size();
  uint64_t at = offset;
  while (at < end) {
    // A run of blocks with the same source: the snapshot file or the image.
    const uint64_t first = at / block_size_;
    const bool from_file = TestBit(saved_.get(), first);
    uint64_t run_end = std::min(end, (first + 1) * block_size_);
    while (run_end < end && TestBit(saved_.get(), run_end / block_size_) == from_file) {
      run_end = std::min(end, run_end + block_size_);
    }
    std::byte* dst = out.data() + (at - offset);
    if (from_file) {
      SR_RETURN_IF_ERROR(PReadAll(fd_.get(), dst, run_end - at, at, path_.string()));
    } else {
      SR_RETURN_IF_ERROR(
          PReadAll(image_fd_.get(), dst, run_end - at, at, "image of disk " + disk_name_));
    }
    at = run_end;
  }
  // The sync's copy has read this piece, not the rest (not the cycle builder's reads).
  if (!only_) failpoint::Check("tracker.snapshot_mid");
  // A save that failed meanwhile may have let a change through unsaved.
  return status();
}

Result<std::vector<ByteRange>> DiskSnapshot::DataRanges(uint64_t from, uint64_t to) {
  SR_RETURN_IF_ERROR(status());
  to = std::min(to, size_);
  std::vector<ByteRange> ranges;
  if (from >= to) return ranges;
  auto add = [&](uint64_t start, uint64_t stop) {
    start = start / block_size_ * block_size_;
    stop = std::min(size_, (stop + block_size_ - 1) / block_size_ * block_size_);
    if (!ranges.empty() && ranges.back().offset + ranges.back().length >= start) {
      const uint64_t back_end = ranges.back().offset + ranges.back().length;
      ranges.back().length = std::max(back_end, stop) - ranges.back().offset;
    } else {
      ranges.push_back(ByteRange{start, stop - start});
    }
  };
  // The image first: a block that was data at the cut and is punched later was saved
  // (and its bit set) before the punch, so the bitset read after this scan has it.
  uint64_t at = from;
  while (at < to) {
    const off_t d = ::lseek(image_fd_.get(), static_cast<off_t>(at), SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) break;
      return Status::FromErrno(errno, "SEEK_DATA in the image of disk " + disk_name_ +
                                          " at offset " + std::to_string(at));
    }
    if (static_cast<uint64_t>(d) >= to) break;
    const off_t h = ::lseek(image_fd_.get(), d, SEEK_HOLE);
    if (h < 0) {
      return Status::FromErrno(errno, "SEEK_HOLE in the image of disk " + disk_name_ +
                                          " at offset " + std::to_string(d));
    }
    const uint64_t stop = std::min<uint64_t>(static_cast<uint64_t>(h), to);
    add(static_cast<uint64_t>(d), stop);
    at = stop;
  }
  const size_t image_ranges = ranges.size();
  for (uint64_t b = from / block_size_; b * block_size_ < to;) {
    if (b % 64 == 0 && data_[b / 64].load() == 0) {
      b += 64;  // a whole word of blocks with nothing saved
      continue;
    }
    if (TestBit(data_.get(), b)) {
      ranges.push_back(ByteRange{b * block_size_, BlockLength(b)});
    }
    ++b;
  }
  // Both lists are sorted; merge them, then coalesce.
  std::inplace_merge(ranges.begin(), ranges.begin() + static_cast<ptrdiff_t>(image_ranges),
                     ranges.end(),
                     [](const ByteRange& a, const ByteRange& b) { return a.offset < b.offset; });
  std::vector<ByteRange> merged;
  for (const ByteRange& r : ranges) {
    const uint64_t start = std::max(r.offset, from);
    const uint64_t stop = std::min(r.offset + r.length, to);
    if (start >= stop) continue;
    if (!merged.empty() && merged.back().offset + merged.back().length >= start) {
      const uint64_t back_end = merged.back().offset + merged.back().length;
      merged.back().length = std::max(back_end, stop) - merged.back().offset;
    } else {
      merged.push_back(ByteRange{start, stop - start});
    }
  }
  SR_RETURN_IF_ERROR(status());
  return merged;
}

void DiskSnapshot::Copied(uint64_t offset) {
  uint64_t old = copied_below_.load(std::memory_order_relaxed);
  while (offset > old &&
         !copied_below_.compare_exchange_weak(old, offset, std::memory_order_release)) {
  }
}

Status DiskSnapshot::Remove() {
  // The descriptors stay open until the object goes: a reader that raced End may still
  // be reading through them (it then fails on ended_, and must not read a reused fd).
  if (::unlink(path_.c_str()) != 0 && errno != ENOENT) {
    return Status::FromErrno(errno, "delete the snapshot file " + path_.string());
  }
  return Status::Ok();
}

}  // namespace siterep::tracker
