// IoRing: the io_uring of one change-log writer thread, with the two operations the
// writer needs: write a gather list completely, and fdatasync several files at once.
//
// One owner: created before the writer thread starts, then used only by that thread
// (a ring is never shared between threads). Both calls block until their completions
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
