#include "blockdev/image_backend.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "common/file_util.h"

namespace siterep::blockdev {

namespace {

constexpr size_t kZeroChunk = 1 << 20;

std::string At(uint64_t offset) { return "image at offset " + std::to_string(offset); }

// Writes zeros over [offset, offset + length): the fallback for an image file system
// without hole punching, so that a discard still reads back as zeros.
Status WriteZeros(int fd, uint64_t offset, uint64_t length) {
  static const std::byte* const kZeros = new std::byte[kZeroChunk]();  // never freed
  while (length > 0) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(length, kZeroChunk));
    SR_RETURN_IF_ERROR(PWriteAll(fd, kZeros, n, offset, "image (zeroing a discard)"));
    offset += n;
    length -= n;
  }
  return Status::Ok();
}

Status PunchHole(int fd, uint64_t offset, uint64_t length) {
  for (;;) {
    if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                    static_cast<off_t>(length)) == 0) {
      return Status::Ok();
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EOPNOTSUPP) return WriteZeros(fd, offset, length);
    return Status::FromErrno(err,
                             "punch hole of " + std::to_string(length) + " bytes in " + At(offset));
  }
}

// The calling thread's O_DIRECT bounce buffer, grown on demand (FUSE caps a request at
// 1 MiB, so a worker's buffer stays at most that; pages are touched only as used).
std::byte* AlignedBuffer(size_t size) {
  struct Deleter {
    void operator()(std::byte* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<std::byte, Deleter> buffer;
  thread_local size_t capacity = 0;
  if (capacity < size) {
    void* p = nullptr;
    if (::posix_memalign(&p, ImageBackend::kDirectAlign, size) != 0) return nullptr;
    buffer.reset(static_cast<std::byte*>(p));
    capacity = size;
  }
  return buffer.get();
}

}  // namespace

ImageBackend::ImageBackend(int image_fd, uint64_t size, tracker::WriteObserver* observer,
                           int direct_fd)
    : fd_(image_fd), direct_fd_(direct_fd), size_(size), observer_(observer) {}

Status ImageBackend::WriteImage(uint64_t offset, std::span<const std::byte> data) {
  if (!UseDirect(offset, data.size())) {
    return PWriteAll(fd_, data.data(), data.size(), offset, "image");
  }
  std::byte* aligned = AlignedBuffer(data.size());
  if (aligned == nullptr) return Status::Error(ENOMEM, "no buffer for a direct write");
  std::memcpy(aligned, data.data(), data.size());
  return PWriteAll(direct_fd_, aligned, data.size(), offset, "image (O_DIRECT)");
}

Result<size_t> ImageBackend::Read(uint64_t offset, std::span<std::byte> buf) {
  if (offset >= size_) return size_t{0};
  const size_t want = static_cast<size_t>(std::min<uint64_t>(buf.size(), size_ - offset));
  if (!UseDirect(offset, want)) return ReadImage(fd_, offset, buf.first(want));
  std::byte* aligned = AlignedBuffer(want);
  if (aligned == nullptr) return Status::Error(ENOMEM, "no buffer for a direct read");
  auto got = ReadImage(direct_fd_, offset, std::span<std::byte>(aligned, want));
  if (got.ok()) std::memcpy(buf.data(), aligned, *got);
  return got;
}

// Fills buf from the image at offset through fd; past the end of the file reads zeros.
Result<size_t> ImageBackend::ReadImage(int fd, uint64_t offset, std::span<std::byte> buf) {
  const size_t want = buf.size();
  size_t done = 0;
  while (done < want) {
    const ssize_t n =
        ::pread(fd, buf.data() + done, want - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read " + At(offset + done));
    }
    if (n == 0) {
      // The image file is shorter than the disk (a sparse image that was truncated):
      // the rest of the disk reads as zeros, as it would after the image is extended.
      std::fill(buf.begin() + static_cast<ptrdiff_t>(done),
                buf.begin() + static_cast<ptrdiff_t>(want), std::byte{0});
      done = want;
      break;
    }
    done += static_cast<size_t>(n);
  }
  return done;
}

Status ImageBackend::Write(uint64_t offset, std::span<const std::byte> data) {
  if (read_only_.load(std::memory_order_acquire)) {
    return Status::Error(EROFS, "write to " + At(offset) + ": the disk is read-only");
  }
  if (offset > size_ || data.size() > size_ - offset) {
    return Status::Error(ENOSPC, "write of " + std::to_string(data.size()) + " bytes to " +
                                     At(offset) + " ends past the disk size " +
                                     std::to_string(size_));
  }
  auto apply = [&]() -> Status { return WriteImage(offset, data); };
  if (observer_ == nullptr) return apply();
  return observer_->Write(offset, data, apply);
}

Status ImageBackend::Discard(uint64_t offset, uint64_t length) {
  if (read_only_.load(std::memory_order_acquire)) {
    return Status::Error(EROFS, "discard at " + At(offset) + ": the disk is read-only");
  }
  if (offset > size_ || length > size_ - offset) {
    return Status::Invalid("discard of " + std::to_string(length) + " bytes at " + At(offset) +
                           " ends past the disk size " + std::to_string(size_));
  }
  if (length == 0) return Status::Ok();
  auto apply = [&]() -> Status { return PunchHole(fd_, offset, length); };
  if (observer_ == nullptr) return apply();
  return observer_->Discard(offset, length, apply);
}

Status ImageBackend::Flush() {
  if (observer_ != nullptr) return observer_->Flush();
  while (::fdatasync(fd_) != 0) {
    if (errno != EINTR) return Status::FromErrno(errno, "fdatasync image");
  }
  return Status::Ok();
}

}  // namespace siterep::blockdev
