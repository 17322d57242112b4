// IoRing: a small io_uring with the two operations the change log needs: write a gather
// list completely, and fdatasync several files at once.
//
// One ring per thread, never shared: appenders (FUSE threads), cutters and group-commit
// leaders each use their own thread's ring through IoRing::ForThisThread(), created on the
// thread's first use; the sealer thread owns one made with Create(). The kernel's support
// for the opcodes is probed once per process. Both calls block until their completions
// are in, handling every completion fully: a negative result is an error Status with
// context, -EINTR and -EAGAIN are resubmitted, a short write is resubmitted for the rest.
#pragma once

#include <liburing.h>
#include <sys/uio.h>

#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "common/status.h"

namespace siterep::tracker {

class IoRing {
 public:
  // Creates a ring and checks that the kernel supports IORING_OP_WRITEV and
  // IORING_OP_FSYNC; fails with a message naming what is missing.
  static Result<std::unique_ptr<IoRing>> Create(std::string_view owner);
  // The calling thread's ring, created on first use (and destroyed at thread exit).
  static Result<IoRing*> ForThisThread();
  ~IoRing();
  IoRing(const IoRing&) = delete;
  IoRing& operator=(const IoRing&) = delete;

  // Writes every byte of iov at offset of fd (what names the file for errors). iov is
  // consumed: its entries are advanced past what was written.
  Status WriteAll(int fd, std::span<iovec> iov, uint64_t offset, std::string_view what);

  // fdatasync of every fd concurrently; results[i] is the outcome for fds[i].
  // whats[i] names the file for errors.
  void DataSync(std::span<const int> fds, std::span<const std::string_view> whats,
                std::span<Status> results);

 private:
  IoRing() = default;
  io_uring_sqe* GetSqe();
  // Waits for one completion; returns its user_data and result.
  Status WaitOne(uint64_t* user_data, int* res);

  io_uring ring_{};
  bool initialized_ = false;
  uint64_t next_tag_ = 0;  // user_data of the last request submitted
};

}  // namespace siterep::tracker
