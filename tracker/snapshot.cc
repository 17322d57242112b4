#include "tracker/snapshot.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "common/block_hash.h"
#include "common/crc32c.h"
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

// The longest run of blocks one save copies.
constexpr uint64_t kMaxRun = uint64_t{1} << 20;
static_assert(kMaxRun >= kSnapshotBlockSize);

// The calling thread's buffer for a run of saved blocks (made at its first save).
std::byte* RunBuffer() {
  thread_local std::unique_ptr<std::byte[]> buffer;
  if (!buffer) buffer = std::make_unique<std::byte[]>(kMaxRun);
  return buffer.get();
}

// The offset of the first hole at or after offset in fd (size: none, or cannot tell).
uint64_t NextHole(int fd, uint64_t offset, uint64_t size) {
  const off_t h = ::lseek(fd, static_cast<off_t>(offset), SEEK_HOLE);
  return h >= 0 ? static_cast<uint64_t>(h) : size;
}

// The offset of the first data at or after offset in fd (kNoData: none), or offset itself
// when the file system cannot tell (then everything counts as data).
// CRC32C of a block of zeros of length bytes (at most kSnapshotBlockSize).
uint32_t ZeroCrc(uint64_t length) {
  static const std::vector<std::byte> zeros(kSnapshotBlockSize);
  return Crc32c(zeros.data(), length);
}

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
      only_(std::move(options.only)),
      persistent_(options.persistent),
      budget_(std::move(options.budget)) {}

DiskSnapshot::~DiskSnapshot() {
  if (mapped_ != nullptr) ::munmap(mapped_, mapped_length());
  // No save runs any more (the owner drops a snapshot only when no change can reach it).
  if (budget_) budget_->used.fetch_sub(saved_bytes(), std::memory_order_relaxed);
}

namespace {

Status CheckBlockSize(const std::string& disk_name, uint64_t block_size) {
  if (block_size == 0 || (block_size & (block_size - 1)) != 0 || block_size > kSnapshotBlockSize) {
    return Status::Invalid("snapshot of disk " + disk_name + ": block size " +
                           std::to_string(block_size) +
                           " is not a power of two <= " + std::to_string(kSnapshotBlockSize));
  }
  return Status::Ok();
}

}  // namespace

Status DiskSnapshot::Attach(int image_fd, bool reopen) {
  // An own descriptor of the image: lseek(SEEK_DATA) moves the file position, which must
  // not be the borrowed descriptor's; and O_DIRECT would refuse unaligned buffers.
  SR_ASSIGN_OR_RETURN(image_fd_,
                      OpenFile("/proc/self/fd/" + std::to_string(image_fd), O_RDONLY | O_CLOEXEC));
  const uint64_t words = word_count();
  data_ = std::make_unique<uint64_t[]>(words);  // zeroed
  if (!persistent_) {
    saved_owned_ = std::make_unique<uint64_t[]>(words);
    saved_ = saved_owned_.get();
    return Status::Ok();
  }
  const uint64_t file_size = bits_offset() + mapped_length();
  if (reopen) {
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) return Status::FromErrno(errno, "stat " + path_.string());
    if (static_cast<uint64_t>(st.st_size) != file_size) {
      return Status::Corrupt("copy-on-write file " + path_.string() + " is " +
                             std::to_string(st.st_size) + " bytes, not the " +
                             std::to_string(file_size) + " of its disk");
    }
  }
  void* m = ::mmap(nullptr, mapped_length(), PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(),
                   static_cast<off_t>(bits_offset()));
  if (m == MAP_FAILED) return Status::FromErrno(errno, "map the bits of " + path_.string());
  mapped_ = m;
  saved_ = static_cast<uint64_t*>(m);
  crcs_ = reinterpret_cast<uint32_t*>(static_cast<std::byte*>(m) + (crc_offset() - bits_offset()));
  // Which saved blocks hold data is not kept: a saved block counts as data, and its bytes.
  uint64_t saved = 0;
  for (uint64_t w = 0; w < words; ++w) {
    data_[w] = saved_[w];
    saved += static_cast<uint64_t>(__builtin_popcountll(saved_[w]));
  }
  saved_bytes_.store(saved * block_size_, std::memory_order_relaxed);
  if (budget_) budget_->used.fetch_add(saved * block_size_, std::memory_order_relaxed);
  return Status::Ok();
}

Result<std::unique_ptr<DiskSnapshot>> DiskSnapshot::Create(std::string disk_name, int image_fd,
                                                           uint64_t size, fs::path path,
                                                           SnapshotOptions options) {
  SR_RETURN_IF_ERROR(CheckBlockSize(disk_name, options.block_size));
  std::unique_ptr<DiskSnapshot> snap(
      new DiskSnapshot(std::move(disk_name), size, std::move(path), std::move(options)));
  SR_ASSIGN_OR_RETURN(snap->fd_,
                      OpenFile(snap->path_, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  const uint64_t file_size = snap->persistent_ ? snap->bits_offset() + snap->mapped_length() : size;
  Status made;
  int err = 0;
  if (::ftruncate(snap->fd_.get(), static_cast<off_t>(file_size)) != 0) {
    made = Status::FromErrno(errno, "size the snapshot file " + snap->path_.string());
  } else if (snap->persistent_ &&
             (err = ::posix_fallocate(snap->fd_.get(), static_cast<off_t>(snap->bits_offset()),
                                      static_cast<off_t>(snap->mapped_length()))) != 0) {
    // The bits and CRCs are written through a shared mapping: a page of a hole that finds
    // the file system full would be SIGBUS, not an error. So they get their blocks now,
    // where ENOSPC is a Status (the cut is not made and its blocks stay in the map).
    made = Status::FromErrno(err, "allocate the bits of " + snap->path_.string());
  } else {
    made = snap->Attach(image_fd, /*reopen=*/false);
  }
  if (!made.ok()) {
    (void)snap->Remove();
    return made;
  }
  return snap;
}

Result<std::unique_ptr<DiskSnapshot>> DiskSnapshot::Reopen(std::string disk_name, int image_fd,
                                                           uint64_t size, fs::path path,
                                                           SnapshotOptions options) {
  SR_RETURN_IF_ERROR(CheckBlockSize(disk_name, options.block_size));
  options.persistent = true;
  std::unique_ptr<DiskSnapshot> snap(
      new DiskSnapshot(std::move(disk_name), size, std::move(path), std::move(options)));
  SR_ASSIGN_OR_RETURN(snap->fd_, OpenFile(snap->path_, O_RDWR | O_CLOEXEC));
  SR_RETURN_IF_ERROR(snap->Attach(image_fd, /*reopen=*/true));
  return snap;
}

uint64_t DiskSnapshot::BlockLength(uint64_t block) const {
  return std::min(block_size_, size_ - block * block_size_);
}

void DiskSnapshot::SetBit(uint64_t* bits, uint64_t block) {
  std::atomic_ref<uint64_t>(bits[block / 64]).fetch_or(uint64_t{1} << (block % 64));
}

bool DiskSnapshot::TestBit(const uint64_t* bits, uint64_t block) {
  return (std::atomic_ref<uint64_t>(const_cast<uint64_t&>(bits[block / 64])).load() >>
          (block % 64)) &
         1;
}

void DiskSnapshot::SaveBefore(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= size_ || failed_.load(std::memory_order_acquire) ||
      ended_.load(std::memory_order_acquire)) {
    return;
  }
  const uint64_t end = offset + std::min(length, size_ - offset);
  const uint64_t watermark = copied_below_.load(std::memory_order_acquire);
  // What the image holds, from the last SEEK_DATA / SEEK_HOLE: [.., hole_until) is a hole,
  // [.., data_until) data. A big discard of a sparse region so costs one lseek per extent,
  // and a big write over data two lseeks, not one per block.
  uint64_t hole_until = 0;
  uint64_t data_until = 0;
  // The blocks to copy go in runs: one read and one write per run of adjacent blocks.
  uint64_t run_first = 0;
  uint64_t run_count = 0;
  auto flush = [&]() {
    if (run_count == 0) return true;
    Status s = SaveRun(run_first, run_count);
    run_count = 0;
    if (s.ok()) return true;
    Fail(std::move(s));
    return false;
  };
  for (uint64_t b = offset / block_size_; b * block_size_ < end; ++b) {
    const uint64_t start = b * block_size_;
    const uint64_t block_end = start + BlockLength(b);
    if (block_end <= watermark || !Protected(b) || TestBit(saved_, b)) {
      if (!flush()) return;
      continue;
    }
    if (block_end > hole_until && block_end > data_until) {
      const uint64_t d = NextData(image_fd_.get(), start);
      if (d > start) {
        hole_until = d;
      } else {
        data_until = NextHole(image_fd_.get(), start, size_);
      }
    }
    if (block_end <= hole_until) {
      if (!flush()) return;
      // A hole at the cut: reads as zeros, nothing to copy.
      if (crcs_ != nullptr) {
        std::atomic_ref<uint32_t>(crcs_[b]).store(ZeroCrc(BlockLength(b)),
                                                  std::memory_order_relaxed);
      }
      SetBit(saved_, b);
      continue;
    }
    if (run_count > 0 && (b != run_first + run_count || (run_count + 1) * block_size_ > kMaxRun)) {
      if (!flush()) return;
    }
    if (run_count == 0) run_first = b;
    ++run_count;
  }
  (void)flush();
}

bool DiskSnapshot::Protected(uint64_t block) const {
  if (!only_) return true;
  const std::vector<uint64_t>& only = *only_;
  return block / 64 < only.size() && ((only[block / 64] >> (block % 64)) & 1) != 0;
}

Status DiskSnapshot::SaveRun(uint64_t first, uint64_t count) {
  if (only_ && failpoint::Check("tracker.cow_save") == failpoint::Action::kError) {
    return Status::Error(EIO, "failpoint tracker.cow_save");
  }
  const uint64_t offset = first * block_size_;
  uint64_t length = 0;
  for (uint64_t b = first; b < first + count; ++b) length += BlockLength(b);
  std::byte* buf = RunBuffer();
  SR_RETURN_IF_ERROR(PReadAll(image_fd_.get(), buf, length, offset, "image of disk " + disk_name_));
  uint64_t data_bytes = 0;
  for (uint64_t b = first, at = 0; b < first + count; at += BlockLength(b), ++b) {
    const std::span<const std::byte> block(buf + at, BlockLength(b));
    if (crcs_ != nullptr) {
      std::atomic_ref<uint32_t>(crcs_[b]).store(Crc32c(block), std::memory_order_relaxed);
    }
    if (!IsAllZero(block)) {
      SetBit(data_.get(), b);
      data_bytes += block.size();
    }
  }
  // The bytes are counted against the disk's budget before they are written, and given
  // back if the write fails; the destructor gives back what was saved.
  if (budget_ && data_bytes > 0) {
    const uint64_t before = budget_->used.fetch_add(data_bytes, std::memory_order_relaxed);
    if (before + data_bytes > budget_->limit) {
      budget_->used.fetch_sub(data_bytes, std::memory_order_relaxed);
      return Status::Error(ENOSPC, "the copy-on-write of disk " + disk_name_ +
                                       " would pass its cow_limit of " +
                                       std::to_string(budget_->limit) + " bytes");
    }
  }
  // The snapshot file is sparse: an all-zero run reads as zeros without being written.
  if (data_bytes > 0) {
    Status written = PWriteAll(fd_.get(), buf, length, offset, path_.string());
    if (!written.ok()) {
      if (budget_) budget_->used.fetch_sub(data_bytes, std::memory_order_relaxed);
      return written;
    }
  }
  saved_bytes_.fetch_add(data_bytes, std::memory_order_relaxed);
  // The bits only after the write: persistent, a set bit must name a saved block.
  for (uint64_t b = first; b < first + count; ++b) SetBit(saved_, b);
  return Status::Ok();
}

void DiskSnapshot::Fail(Status status) {
  {
    std::lock_guard lk(status_mu_);
    if (!status_.ok()) return;
    status_ = status.WithContext(std::string(only_ ? "copy-on-write of a cut" : "snapshot") +
                                 " of disk " + disk_name_ + " failed");
  }
  failed_.store(true, std::memory_order_release);
  spdlog::error("disk {}: the {} can no longer be read (the guest goes on): {}", disk_name_,
                only_ ? "copy-on-write of a cut" : "snapshot", status.ToString());
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
    const bool from_file = TestBit(saved_, first);
    uint64_t run_end = std::min(end, (first + 1) * block_size_);
    while (run_end < end && TestBit(saved_, run_end / block_size_) == from_file) {
      run_end = std::min(end, run_end + block_size_);
    }
    std::byte* dst = out.data() + (at - offset);
    if (from_file) {
      SR_RETURN_IF_ERROR(PReadAll(fd_.get(), dst, run_end - at, at, path_.string()));
      if (crcs_ != nullptr) {
        SR_RETURN_IF_ERROR(CheckSaved(at, std::span<const std::byte>(dst, run_end - at)));
      }
    } else {
      SR_RETURN_IF_ERROR(
          PReadAll(image_fd_.get(), dst, run_end - at, at, "image of disk " + disk_name_));
    }
    at = run_end;
  }
  // The sync's copy has read this piece, not the rest (not a cut's reads).
  if (!only_) failpoint::Check("tracker.snapshot_mid");
  // A save that failed meanwhile may have let a change through unsaved.
  return status();
}

Status DiskSnapshot::CheckSaved(uint64_t offset, std::span<const std::byte> data) const {
  // Whole blocks only: a partial block cannot be checked (the cut's readers read whole
  // 4 KiB blocks).
  const uint64_t end = offset + data.size();
  for (uint64_t b = (offset + block_size_ - 1) / block_size_; b < block_count(); ++b) {
    const uint64_t length = BlockLength(b);
    if (b * block_size_ + length > end) break;
    const uint64_t at = b * block_size_ - offset;
    const uint32_t want =
        std::atomic_ref<uint32_t>(const_cast<uint32_t&>(crcs_[b])).load(std::memory_order_relaxed);
    if (Crc32c(data.data() + at, length) != want) {
      return Status::Corrupt("damaged copy-on-write block " + std::to_string(b) + " of " +
                             path_.string() + " (CRC32C mismatch)");
    }
  }
  return Status::Ok();
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
    if (b % 64 == 0 && std::atomic_ref<uint64_t>(data_[b / 64]).load() == 0) {
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
