#include "blockdev/overlay_backend.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <bitset>
#include <cerrno>
#include <cstring>

#include "common/file_util.h"

namespace siterep::blockdev {

namespace fs = std::filesystem;

namespace {

// Largest piece read or written at once by Discard and CopyWrittenTo.
constexpr size_t kRunBytes = 1 << 20;

const std::vector<std::byte>& Zeros() {
  static const std::vector<std::byte> zeros(kRunBytes);
  return zeros;
}

Status DataSync(int fd, const std::string& what) {
  while (::fdatasync(fd) != 0) {
    if (errno != EINTR) return Status::FromErrno(errno, "fdatasync " + what);
  }
  return Status::Ok();
}

// Creates the overlay file whole: a temporary file of size bytes renamed into place, so a
// crash never leaves an overlay of another size behind.
Result<UniqueFd> CreateOverlay(const fs::path& path, uint64_t size) {
  fs::path tmp = path;
  tmp += ".new";
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(tmp, O_RDWR | O_CREAT | O_TRUNC, 0600));
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
    return Status::FromErrno(
        errno, "set the size of overlay " + tmp.string() + " to " + std::to_string(size));
  }
  if (::fsync(fd.get()) != 0) return Status::FromErrno(errno, "fsync " + tmp.string());
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + tmp.string() + " to " + path.string());
  }
  SR_RETURN_IF_ERROR(SyncDir(path.parent_path().empty() ? fs::path(".") : path.parent_path()));
  return fd;
}

// Holds the stripes marked in a set, taken in ascending order (the lock order).
class StripeGuard {
 public:
  template <size_t N>
  StripeGuard(std::array<std::mutex, N>& stripes, const std::bitset<N>& which) {
    for (size_t i = 0; i < N; ++i) {
      if (!which[i]) continue;
      stripes[i].lock();
      held_.push_back(&stripes[i]);
    }
  }
  ~StripeGuard() {
    for (auto it = held_.rbegin(); it != held_.rend(); ++it) (*it)->unlock();
  }
  StripeGuard(const StripeGuard&) = delete;
  StripeGuard& operator=(const StripeGuard&) = delete;

 private:
  std::vector<std::mutex*> held_;
};

}  // namespace

Result<std::unique_ptr<OverlayBackend>> OverlayBackend::Open(const fs::path& overlay_file,
                                                             uint64_t size, BaseReader base) {
  if (!base) return Status::Invalid("overlay " + overlay_file.string() + ": no base reader");
  bool created = false;
  UniqueFd fd(::open(overlay_file.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno != ENOENT) return Status::FromErrno(errno, "open overlay " + overlay_file.string());
    SR_ASSIGN_OR_RETURN(fd, CreateOverlay(overlay_file, size));
    created = true;
  }
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return Status::Error(EBUSY,
                           "overlay " + overlay_file.string() + " is in use by another backend");
    }
    return Status::FromErrno(errno, "lock overlay " + overlay_file.string());
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    return Status::FromErrno(errno, "stat overlay " + overlay_file.string());
  }
  if (!S_ISREG(st.st_mode)) {
    return Status::Invalid("overlay " + overlay_file.string() + " is not a regular file");
  }
  if (static_cast<uint64_t>(st.st_size) != size) {
    return Status::Invalid("overlay " + overlay_file.string() + " is " +
                           std::to_string(st.st_size) + " bytes but the disk is " +
                           std::to_string(size) +
                           ": it belongs to another disk (delete it to start over)");
  }
  const uint64_t block_size = std::max<uint64_t>(4096, static_cast<uint64_t>(st.st_blksize));
  if (!std::has_single_bit(block_size)) {
    return Status::Invalid("overlay " + overlay_file.string() + ": the file system's block size " +
                           std::to_string(block_size) + " is not a power of two");
  }
  std::unique_ptr<OverlayBackend> backend(
      new OverlayBackend(overlay_file, std::move(fd), size, block_size, std::move(base)));
  SR_RETURN_IF_ERROR(backend->LoadWrittenMap());
  if (created && backend->written_blocks_.load() > 0) {
    // A file system that reports a new sparse file as data would make every block look
    // written (all zeros) after a restart.
    std::error_code ignored;
    fs::remove(overlay_file, ignored);
    return Status::Error(EOPNOTSUPP, "the file system of overlay " + overlay_file.string() +
                                         " does not report holes (SEEK_DATA); put overlays on "
                                         "ext4, xfs, btrfs or tmpfs");
  }
  return backend;
}

OverlayBackend::OverlayBackend(fs::path path, UniqueFd fd, uint64_t size, uint64_t block_size,
                               BaseReader base)
    : path_(std::move(path)),
      name_("overlay " + path_.string()),
      fd_(std::move(fd)),
      size_(size),
      block_size_(block_size),
      blocks_((size + block_size - 1) / block_size),
      base_(std::move(base)),
      words_((blocks_ + 63) / 64) {}

Status OverlayBackend::LoadWrittenMap() {
  uint64_t pos = 0;
  while (pos < size_) {
    const off_t data = ::lseek(fd_.get(), static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // no data from pos to the end
      return Status::FromErrno(errno,
                               "SEEK_DATA in " + name_ + " from offset " + std::to_string(pos));
    }
    const off_t hole = ::lseek(fd_.get(), data, SEEK_HOLE);
    if (hole < 0) {
      return Status::FromErrno(errno,
                               "SEEK_HOLE in " + name_ + " from offset " + std::to_string(data));
    }
    const uint64_t start = static_cast<uint64_t>(data);
    const uint64_t end = std::min(size_, static_cast<uint64_t>(hole));
    if (start >= end) break;  // the end of the file, or a file system gone wrong
    MarkWritten(start / block_size_, (end - 1) / block_size_);
    pos = end;
  }
  return Status::Ok();
}

bool OverlayBackend::IsWritten(uint64_t block) const {
  return (words_[block / 64].load(std::memory_order_acquire) >> (block % 64)) & 1;
}

void OverlayBackend::MarkWritten(uint64_t first, uint64_t last) {
  uint64_t added = 0;
  for (uint64_t word = first / 64; word <= last / 64; ++word) {
    const uint64_t lo = std::max(first, word * 64) % 64;
    const uint64_t hi = std::min(last, word * 64 + 63) % 64;
    const uint64_t mask = (~uint64_t{0} >> (63 - hi)) & (~uint64_t{0} << lo);
    const uint64_t old = words_[word].fetch_or(mask, std::memory_order_acq_rel);
    added += static_cast<uint64_t>(std::popcount(mask & ~old));
  }
  written_blocks_.fetch_add(added, std::memory_order_relaxed);
}

Status OverlayBackend::ReadBase(uint64_t offset, std::span<std::byte> out) const {
  Status status = base_(offset, out);
  if (status.ok()) return status;
  return status.WithContext("read the base of " + name_ + " at offset " + std::to_string(offset));
}

Status OverlayBackend::ReadOverlay(uint64_t offset, std::span<std::byte> out) const {
  return PReadAll(fd_.get(), out.data(), out.size(), offset, name_);
}

Status OverlayBackend::WriteOverlay(uint64_t offset, std::span<const std::byte> data) const {
  return PWriteAll(fd_.get(), data.data(), data.size(), offset, name_);
}

Result<size_t> OverlayBackend::Read(uint64_t offset, std::span<std::byte> buf) {
  if (offset >= size_) return size_t{0};
  const uint64_t end = offset + std::min<uint64_t>(buf.size(), size_ - offset);
  // Runs of blocks in the same state, each in one call.
  uint64_t pos = offset;
  while (pos < end) {
    const bool written = IsWritten(pos / block_size_);
    uint64_t next = pos / block_size_ + 1;
    while (BlockStart(next) < end && IsWritten(next) == written) ++next;
    const uint64_t run_end = std::min(end, BlockStart(next));
    const std::span<std::byte> piece = buf.subspan(pos - offset, run_end - pos);
    SR_RETURN_IF_ERROR(written ? ReadOverlay(pos, piece) : ReadBase(pos, piece));
    pos = run_end;
  }
  return static_cast<size_t>(end - offset);
}

Status OverlayBackend::Write(uint64_t offset, std::span<const std::byte> data) {
  if (offset > size_ || data.size() > size_ - offset) {
    return Status::Error(ENOSPC, "write of " + std::to_string(data.size()) + " bytes to " + name_ +
                                     " at offset " + std::to_string(offset) +
                                     " ends past the disk size " + std::to_string(size_));
  }
  if (data.empty()) return Status::Ok();
  return WriteRange(offset, data);
}

Status OverlayBackend::Discard(uint64_t offset, uint64_t length) {
  if (offset > size_ || length > size_ - offset) {
    return Status::Invalid("discard of " + std::to_string(length) + " bytes in " + name_ +
                           " at offset " + std::to_string(offset) + " ends past the disk size " +
                           std::to_string(size_));
  }
  const std::vector<std::byte>& zeros = Zeros();
  while (length > 0) {
    uint64_t n = std::min<uint64_t>(length, zeros.size());
    // Pieces end on block boundaries where they can: only the ends of the range are partial.
    const uint64_t cut = (offset + n) / block_size_ * block_size_;
    if (n < length && cut > offset) n = cut - offset;
    SR_RETURN_IF_ERROR(WriteRange(offset, std::span<const std::byte>(zeros.data(), n)));
    offset += n;
    length -= n;
  }
  return Status::Ok();
}

Status OverlayBackend::WriteRange(uint64_t offset, std::span<const std::byte> data) {
  const uint64_t end = offset + data.size();
  const uint64_t first = offset / block_size_;
  const uint64_t last = (end - 1) / block_size_;

  // Blocks seen written stay written, and nothing outside this request is rewritten in
  // them, so they need no lock. Every other block may be in another request's
  // read-modify-write: take its stripe (a written-to-be block is marked only after its
  // whole content is in the file, so a block seen written has no such request left).
  std::bitset<kStripes> needed;
  for (uint64_t b = first; b <= last; ++b) {
    if (!IsWritten(b)) needed.set(b % kStripes);
  }
  StripeGuard guard(stripes_, needed);

  uint64_t pos = offset;
  const uint64_t head_end = std::min(end, BlockEnd(first));
  if (offset != BlockStart(first) || head_end != BlockEnd(first)) {
    SR_RETURN_IF_ERROR(WritePartial(first, offset, data.first(head_end - offset)));
    pos = head_end;
    if (pos == end) return Status::Ok();
  }
  // pos is at a block start; whole blocks up to whole_end, then maybe a partial tail.
  const uint64_t whole_end = end == BlockEnd(last) ? end : BlockStart(last);
  if (whole_end > pos) {
    SR_RETURN_IF_ERROR(WriteOverlay(pos, data.subspan(pos - offset, whole_end - pos)));
    MarkWritten(pos / block_size_, (whole_end - 1) / block_size_);
  }
  if (whole_end < end) {
    SR_RETURN_IF_ERROR(WritePartial(last, whole_end, data.subspan(whole_end - offset)));
  }
  return Status::Ok();
}

Status OverlayBackend::WritePartial(uint64_t block, uint64_t offset,
                                    std::span<const std::byte> part) {
  if (IsWritten(block)) return WriteOverlay(offset, part);
  // Read-modify-write: the block is allocated whole, with the base around the part.
  const uint64_t start = BlockStart(block);
  const size_t length = static_cast<size_t>(BlockEnd(block) - start);
  std::unique_ptr<std::byte[]> buffer(new std::byte[length]);
  const std::span<std::byte> content(buffer.get(), length);
  SR_RETURN_IF_ERROR(ReadBase(start, content));
  std::memcpy(buffer.get() + (offset - start), part.data(), part.size());
  SR_RETURN_IF_ERROR(WriteOverlay(start, content));
  MarkWritten(block, block);
  return Status::Ok();
}

Status OverlayBackend::Flush() { return DataSync(fd_.get(), name_); }

std::vector<tracker::ByteRange> OverlayBackend::WrittenRanges() const {
  std::vector<tracker::ByteRange> out;
  uint64_t b = 0;
  while (b < blocks_) {
    const uint64_t word = words_[b / 64].load(std::memory_order_acquire) >> (b % 64);
    if (word == 0) {
      b = (b / 64 + 1) * 64;
      continue;
    }
    const uint64_t start = b + static_cast<uint64_t>(std::countr_zero(word));
    uint64_t stop = start;  // one past the run's last block
    while (stop < blocks_) {
      const unsigned bit = stop % 64;
      const unsigned ones = static_cast<unsigned>(
          std::countr_one(words_[stop / 64].load(std::memory_order_acquire) >> bit));
      stop += ones;
      if (ones < 64 - bit) break;  // the run ends inside this word
    }
    stop = std::min(stop, blocks_);
    out.push_back({BlockStart(start), BlockEnd(stop - 1) - BlockStart(start)});
    b = stop;
  }
  return out;
}

uint64_t OverlayBackend::written_bytes() const {
  uint64_t bytes = written_blocks_.load(std::memory_order_relaxed) * block_size_;
  if (blocks_ > 0 && IsWritten(blocks_ - 1)) bytes -= blocks_ * block_size_ - size_;
  return bytes;
}

Status OverlayBackend::CopyWrittenTo(int fd) {
  std::unique_ptr<std::byte[]> buffer(new std::byte[kRunBytes]);
  for (const tracker::ByteRange& range : WrittenRanges()) {
    for (uint64_t done = 0; done < range.length;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kRunBytes, range.length - done));
      const uint64_t at = range.offset + done;
      SR_RETURN_IF_ERROR(ReadOverlay(at, std::span<std::byte>(buffer.get(), n)));
      SR_RETURN_IF_ERROR(PWriteAll(fd, buffer.get(), n, at, "the copy of " + name_));
      done += n;
    }
  }
  return DataSync(fd, "the copy of " + name_);
}

}  // namespace siterep::blockdev
