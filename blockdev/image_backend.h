// ImageBackend: a live disk backed by a raw image file, with an optional tracker.
//
// Reads go straight to the image (pread). Writes and discards go through the disk's
// tracker::WriteObserver when there is one (tracking = "log"), which records the change
// and then lets this backend pwrite / punch the image; without one (tracking = "off")
// they go straight to the image. Flush asks the observer (which syncs log and image) or
// fdatasyncs the image. Thread-safe.
//
// With a direct_fd (the image opened again with O_DIRECT), requests aligned to
// kDirectAlign bypass the host page cache, as qemu's cache=none does: the guest has a
// cache of its own, a second copy in the host only costs memory and makes writeback
// stalls, and durability comes from Flush either way. The payload is copied through a
// per-thread aligned buffer (FUSE buffers are not aligned). Unaligned requests use the
// buffered fd; the kernel keeps the two coherent (a direct read or write first writes
// back and drops cached pages of its range).
#pragma once

#include <atomic>
#include <cstdint>

#include "blockdev/backend.h"
#include "tracker/write_observer.h"

namespace siterep::blockdev {

class ImageBackend : public DiskBackend {
 public:
  // Alignment (offset and length) for the O_DIRECT path; safe for 512e and 4Kn devices.
  static constexpr uint64_t kDirectAlign = 4096;

  // image_fd: borrowed, O_RDWR, must outlive this backend. observer: borrowed or null.
  // direct_fd: borrowed, the same image O_RDWR|O_DIRECT, or -1 for buffered I/O only.
  ImageBackend(int image_fd, uint64_t size, tracker::WriteObserver* observer,
               int direct_fd = -1);

  uint64_t Size() const override { return size_; }
  Result<size_t> Read(uint64_t offset, std::span<std::byte> buf) override;
  Status Write(uint64_t offset, std::span<const std::byte> data) override;
  Status Discard(uint64_t offset, uint64_t length) override;
  Status Flush() override;

  // While read-only, writes and discards fail with EROFS (fencing; later issues).
  void SetReadOnly(bool read_only) { read_only_.store(read_only, std::memory_order_release); }

 private:
  // The fd for a request at offset of length bytes.
  bool UseDirect(uint64_t offset, uint64_t length) const {
    return direct_fd_ >= 0 && (offset | length) % kDirectAlign == 0 && length > 0;
  }
  Status WriteImage(uint64_t offset, std::span<const std::byte> data);
  Result<size_t> ReadImage(int fd, uint64_t offset, std::span<std::byte> buf);

  const int fd_;
  const int direct_fd_;
  const uint64_t size_;
  tracker::WriteObserver* const observer_;
  std::atomic<bool> read_only_{false};
};

}  // namespace siterep::blockdev
