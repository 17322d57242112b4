#include "tracker/io_ring.h"

#include <limits.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <thread>
#include <vector>

namespace siterep::tracker {
namespace {

constexpr unsigned kRingEntries = 8;
// -EAGAIN and -EINTR are retried this many times in a row before giving up.
constexpr int kMaxRetries = 1000;

void BackOff(int attempt) {
  if (attempt > 10) std::this_thread::sleep_for(std::chrono::microseconds(100));
}

}  // namespace

// Checks once per process that the kernel supports every opcode we use.
static Status ProbeOpcodes() {
  static const Status probed = [] {
    io_uring_probe* probe = io_uring_get_probe();
    if (probe == nullptr) return Status::Error(ENOSYS, "the kernel cannot probe io_uring opcodes");
    const bool writev = io_uring_opcode_supported(probe, IORING_OP_WRITEV);
    const bool fsync = io_uring_opcode_supported(probe, IORING_OP_FSYNC);
    io_uring_free_probe(probe);
    if (!writev || !fsync) {
      return Status::Error(ENOSYS, std::string("the kernel's io_uring lacks ") +
                                       (!writev ? "IORING_OP_WRITEV" : "IORING_OP_FSYNC"));
    }
    return Status::Ok();
  }();
  return probed;
}

Result<std::unique_ptr<IoRing>> IoRing::Create(std::string_view owner) {
  Status probed = ProbeOpcodes();
  if (!probed.ok()) return probed.WithContext(std::string(owner));
  std::unique_ptr<IoRing> ring(new IoRing());
  int rc = io_uring_queue_init(kRingEntries, &ring->ring_, 0);
  if (rc < 0) return Status::FromErrno(-rc, std::string(owner) + ": io_uring_queue_init");
  ring->initialized_ = true;
  return ring;
}

Result<IoRing*> IoRing::ForThisThread() {
  thread_local std::unique_ptr<IoRing> ring;
  if (!ring) {
    SR_ASSIGN_OR_RETURN(ring, Create("change log ring of this thread"));
  }
  return ring.get();
}

IoRing::~IoRing() {
  if (initialized_) io_uring_queue_exit(&ring_);
}

io_uring_sqe* IoRing::GetSqe() {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) {
    // Only possible if the submission queue is full, which our few requests never fill;
    // submit what is queued and try again.
    io_uring_submit(&ring_);
    sqe = io_uring_get_sqe(&ring_);
  }
  return sqe;
}

Status IoRing::WaitOne(uint64_t* user_data, int* res) {
  io_uring_cqe* cqe = nullptr;
  int rc;
  do {
    rc = io_uring_wait_cqe(&ring_, &cqe);
  } while (rc == -EINTR);
  if (rc < 0) return Status::FromErrno(-rc, "io_uring_wait_cqe");
  *user_data = io_uring_cqe_get_data64(cqe);
  *res = cqe->res;
  io_uring_cqe_seen(&ring_, cqe);
  return Status::Ok();
}

Status IoRing::WriteAll(int fd, std::span<iovec> iov, uint64_t offset, std::string_view what) {
  size_t first = 0;  // first iovec with bytes left
  int retries = 0;
  while (first < iov.size()) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    io_uring_sqe* sqe = GetSqe();
    if (sqe == nullptr) return Status::Error(EBUSY, "io_uring submission queue full");
    const unsigned count = static_cast<unsigned>(std::min<size_t>(iov.size() - first, IOV_MAX));
    io_uring_prep_writev(sqe, fd, &iov[first], count, offset);
    const uint64_t want = ++next_tag_;
    io_uring_sqe_set_data64(sqe, want);
    // One system call submits and waits (a buffered write usually completes inline).
    int rc;
    do {
      rc = io_uring_submit_and_wait(&ring_, 1);
    } while (rc == -EINTR);
    if (rc < 0) return Status::FromErrno(-rc, "io_uring_submit (write " + std::string(what) + ")");
    uint64_t tag = 0;
    int res = 0;
    // Completions of an earlier call that gave up early are stale: skip them.
    while (tag != want) SR_RETURN_IF_ERROR(WaitOne(&tag, &res));
    if (res == -EINTR || res == -EAGAIN) {
      if (++retries > kMaxRetries) {
        return Status::FromErrno(-res, "write " + std::string(what) + " at offset " +
                                           std::to_string(offset) + " (gave up retrying)");
      }
      BackOff(retries);
      continue;
    }
    if (res < 0) {
      return Status::FromErrno(
          -res, "write " + std::string(what) + " at offset " + std::to_string(offset));
    }
    if (res == 0) {
      return Status::Error(EIO, "write " + std::string(what) + " at offset " +
                                    std::to_string(offset) + ": no progress");
    }
    retries = 0;
    // Advance past what was written; a short write resubmits the rest.
    size_t done = static_cast<size_t>(res);
    offset += done;
    while (done > 0 && first < iov.size()) {
      const size_t n = std::min(done, iov[first].iov_len);
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + n;
      iov[first].iov_len -= n;
      done -= n;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  return Status::Ok();
}

void IoRing::DataSync(std::span<const int> fds, std::span<const std::string_view> whats,
                      std::span<Status> results) {
  const uint64_t base = next_tag_ + 1;
  next_tag_ += fds.size();
  auto submit = [&](size_t i) -> bool {
    io_uring_sqe* sqe = GetSqe();
    if (sqe == nullptr) {
      results[i] = Status::Error(EBUSY, "io_uring submission queue full");
      return false;
    }
    io_uring_prep_fsync(sqe, fds[i], IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(sqe, base + i);
    return true;
  };
  size_t outstanding = 0;
  for (size_t i = 0; i < fds.size(); ++i) {
    results[i] = Status::Ok();
    if (submit(i)) ++outstanding;
  }
  std::vector<int> retries(fds.size(), 0);
  while (outstanding > 0) {
    int rc = io_uring_submit(&ring_);
    if (rc < 0) {
      // Nothing we queued can complete; report it against every file still waiting.
      for (size_t i = 0; i < fds.size(); ++i) {
        if (results[i].ok()) results[i] = Status::FromErrno(-rc, "io_uring_submit (fdatasync)");
      }
      return;
    }
    uint64_t tag;
    int res;
    Status s = WaitOne(&tag, &res);
    if (!s.ok()) {
      for (auto& r : results) {
        if (r.ok()) r = s;
      }
      return;
    }
    if (tag < base || tag - base >= fds.size()) continue;  // stale, from an earlier call
    --outstanding;
    const size_t i = static_cast<size_t>(tag - base);
    if ((res == -EINTR || res == -EAGAIN) && ++retries[i] <= kMaxRetries) {
      BackOff(retries[i]);
      if (submit(i)) ++outstanding;
      continue;
    }
    if (res < 0) results[i] = Status::FromErrno(-res, "fdatasync " + std::string(whats[i]));
  }
}

}  // namespace siterep::tracker
