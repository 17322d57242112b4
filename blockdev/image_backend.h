// ImageBackend: a live disk backed by a raw image file, with an optional tracker.
//
// Reads go straight to the image (pread). Writes and discards go through the disk's
// tracker::WriteObserver when there is one (tracking = "log"), which records the change
// and then lets this backend pwrite / punch the image; without one (tracking = "off")
// they go straight to the image. Flush asks the observer (which syncs log and image) or
// fdatasyncs the image. Thread-safe.
#pragma once

#include <atomic>
#include <cstdint>

#include "blockdev/backend.h"
#include "tracker/write_observer.h"

namespace siterep::blockdev {

class ImageBackend : public DiskBackend {
 public:
  // image_fd: borrowed, O_RDWR, must outlive this backend. observer: borrowed or null.
  ImageBackend(int image_fd, uint64_t size, tracker::WriteObserver* observer);

  uint64_t Size() const override { return size_; }
  Result<size_t> Read(uint64_t offset, std::span<std::byte> buf) override;
  Status Write(uint64_t offset, std::span<const std::byte> data) override;
  Status Discard(uint64_t offset, uint64_t length) override;
  Status Flush() override;

  // While read-only, writes and discards fail with EROFS (fencing; later issues).
  void SetReadOnly(bool read_only) { read_only_.store(read_only, std::memory_order_release); }

 private:
  const int fd_;
  const uint64_t size_;
  tracker::WriteObserver* const observer_;
  std::atomic<bool> read_only_{false};
};

}  // namespace siterep::blockdev
