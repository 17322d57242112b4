// DiskBackend: what the FUSE file system serves as one disk file. blockdev knows only
// this interface; control/ builds the backends (a live image with its tracker, and in
// later issues a point-in-time view or a test-failover overlay) and hands them over.
//
// Called from many FUSE threads at once; implementations are thread-safe. Ranges are
// checked by the caller: offset + length <= Size().
#pragma once

#include <cstdint>
#include <span>

#include "common/status.h"

namespace siterep::blockdev {

class DiskBackend {
 public:
  virtual ~DiskBackend() = default;

  // Size in bytes; fixed for the life of the backend.
  virtual uint64_t Size() const = 0;
  // Fills buf from offset; returns bytes read (buf.size() unless at the end).
  virtual Result<size_t> Read(uint64_t offset, std::span<std::byte> buf) = 0;
  // EROFS when the backend refuses writes (fenced, read-only view).
  virtual Status Write(uint64_t offset, std::span<const std::byte> data) = 0;
  // Deallocates [offset, offset + length); later reads return zeros.
  virtual Status Discard(uint64_t offset, uint64_t length) = 0;
  // Returns when every write and discard completed before the call is durable.
  virtual Status Flush() = 0;
};

}  // namespace siterep::blockdev
