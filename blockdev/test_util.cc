#include "blockdev/test_util.h"

#include <stdlib.h>
#include <sys/mount.h>

#include <algorithm>
#include <cstring>

#include "blockdev/mountpoint.h"

namespace siterep::blockdev::testing {

namespace fs = std::filesystem;

void PrintTo(const Range& range, std::ostream* os) {
  *os << "[" << range.offset << ", +" << range.length << ")";
}

Result<size_t> MemBackend::Read(uint64_t offset, std::span<std::byte> buf) {
  std::lock_guard lock(mu_);
  if (offset >= data_.size()) return size_t{0};
  const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), data_.size() - offset));
  std::memcpy(buf.data(), data_.data() + offset, n);
  reads_.push_back(Range{offset, buf.size()});
  return n;
}

Status MemBackend::Write(uint64_t offset, std::span<const std::byte> data) {
  std::lock_guard lock(mu_);
  if (fail_code_ != 0) return Status::Error(fail_code_, "injected write error");
  if (offset + data.size() > data_.size()) return Status::Error(ENOSPC, "past the end");
  std::memcpy(data_.data() + offset, data.data(), data.size());
  writes_.push_back(Range{offset, data.size()});
  return Status::Ok();
}

Status MemBackend::Discard(uint64_t offset, uint64_t length) {
  std::lock_guard lock(mu_);
  if (fail_code_ != 0) return Status::Error(fail_code_, "injected discard error");
  if (offset + length > data_.size()) return Status::Invalid("past the end");
  std::fill_n(data_.begin() + static_cast<ptrdiff_t>(offset), length, std::byte{0});
  discards_.push_back(Range{offset, length});
  return Status::Ok();
}

Status MemBackend::Flush() {
  std::lock_guard lock(mu_);
  if (fail_code_ != 0) return Status::Error(fail_code_, "injected flush error");
  ++flushes_;
  return Status::Ok();
}

std::vector<Range> MemBackend::reads() const {
  std::lock_guard lock(mu_);
  return reads_;
}

std::vector<Range> MemBackend::writes() const {
  std::lock_guard lock(mu_);
  return writes_;
}

std::vector<Range> MemBackend::discards() const {
  std::lock_guard lock(mu_);
  return discards_;
}

int MemBackend::flushes() const {
  std::lock_guard lock(mu_);
  return flushes_;
}

std::vector<std::byte> MemBackend::Contents(uint64_t offset, uint64_t length) const {
  std::lock_guard lock(mu_);
  return {data_.begin() + static_cast<ptrdiff_t>(offset),
          data_.begin() + static_cast<ptrdiff_t>(offset + length)};
}

void MemBackend::Fill(uint64_t offset, uint64_t length, std::byte value) {
  std::lock_guard lock(mu_);
  std::fill_n(data_.begin() + static_cast<ptrdiff_t>(offset), length, value);
}

void MemBackend::ClearLog() {
  std::lock_guard lock(mu_);
  reads_.clear();
  writes_.clear();
  discards_.clear();
  flushes_ = 0;
}

void MemBackend::FailWith(int code) {
  std::lock_guard lock(mu_);
  fail_code_ = code;
}

std::vector<fs::path> MountsUnder(const fs::path& dir) {
  std::vector<fs::path> out;
  const std::string prefix = dir.string();
  for (const fs::path& mount_point : ListMountPoints()) {
    const std::string mp = mount_point.string();
    if (mp == prefix || mp.rfind(prefix + "/", 0) == 0) out.push_back(mount_point);
  }
  return out;
}

TempDir::~TempDir() {
  // Deepest first; a test that failed half-way may have left its mounts here.
  std::vector<fs::path> mounts = MountsUnder(path());
  std::sort(mounts.begin(), mounts.end(),
            [](const fs::path& a, const fs::path& b) { return a.string() > b.string(); });
  for (const fs::path& mp : mounts) ::umount2(mp.c_str(), MNT_DETACH);
}

RunningFs::RunningFs(const fs::path& mountpoint, std::vector<ExportedDisk> disks,
                     FuseOptions options) {
  auto mounted = FuseFs::Mount(mountpoint, std::move(disks), options);
  if (!mounted.ok()) {
    status_ = mounted.status();
    return;
  }
  fs_ = std::move(mounted).value();
  loop_ = std::thread([this] {
    Status s = fs_->Run();
    std::lock_guard lock(mu_);
    run_status_ = std::move(s);
  });
}

Status RunningFs::StopAndJoin() {
  if (fs_ != nullptr) fs_->Stop();
  if (loop_.joinable()) loop_.join();
  std::lock_guard lock(mu_);
  return run_status_.value_or(Status::Ok());
}

bool RunningFs::loop_done() const {
  std::lock_guard lock(mu_);
  return run_status_.has_value();
}

RunningFs::~RunningFs() {
  if (fs_ != nullptr) fs_->Stop();
  if (loop_.joinable()) loop_.join();
  fs_.reset();
}

AlignedBuffer::AlignedBuffer(size_t size) : size_(size) {
  void* p = nullptr;
  if (::posix_memalign(&p, 4096, std::max<size_t>(size, 1)) != 0) std::abort();
  data_ = static_cast<std::byte*>(p);
  std::memset(data_, 0, size_);
}

AlignedBuffer::~AlignedBuffer() { ::free(data_); }

void AlignedBuffer::FillPattern(uint32_t seed) {
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < size_; ++i) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    data_[i] = static_cast<std::byte>(x);
  }
}

}  // namespace siterep::blockdev::testing
