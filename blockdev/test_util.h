// Test helpers for blockdev: an in-memory DiskBackend that records its calls, a temporary
// directory that cleans up after itself (including mounts left under it), and a mounted
// FuseFs whose loop runs on a thread.
#pragma once

#include "common/testing/temp_dir.h"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "blockdev/backend.h"
#include "blockdev/fuse_fs.h"

namespace siterep::blockdev::testing {

struct Range {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const Range&) const = default;
};
// For readable gtest failures.
void PrintTo(const Range& range, std::ostream* os);

// An in-memory disk. Thread-safe. Records every Read, Write and Discard range and counts
// flushes; an error code can be injected for the next calls.
class MemBackend : public DiskBackend {
 public:
  explicit MemBackend(uint64_t size) : data_(size) {}

  uint64_t Size() const override { return data_.size(); }
  Result<size_t> Read(uint64_t offset, std::span<std::byte> buf) override;
  Status Write(uint64_t offset, std::span<const std::byte> data) override;
  Status Discard(uint64_t offset, uint64_t length) override;
  Status Flush() override;

  std::vector<Range> reads() const;
  std::vector<Range> writes() const;
  std::vector<Range> discards() const;
  int flushes() const;
  std::vector<std::byte> Contents(uint64_t offset, uint64_t length) const;
  void Fill(uint64_t offset, uint64_t length, std::byte value);
  void ClearLog();
  // Every later Write/Discard/Flush fails with code (0: succeed again).
  void FailWith(int code);

 private:
  mutable std::mutex mu_;  // protects everything below
  std::vector<std::byte> data_;
  std::vector<Range> reads_;
  std::vector<Range> writes_;
  std::vector<Range> discards_;
  int flushes_ = 0;
  int fail_code_ = 0;
};

// A common TempDir whose destructor first lazily unmounts anything still mounted under
// it (only mounts made by the test can be there), then removes it.
class TempDir {
 public:
  TempDir() = default;
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return dir_.path(); }

 private:
  siterep::testing::TempDir dir_;
};

// Mount points (from /proc/self/mountinfo) at or below dir.
std::vector<std::filesystem::path> MountsUnder(const std::filesystem::path& dir);

// A FuseFs mounted at mountpoint with its loop running on a thread.
class RunningFs {
 public:
  // Mounts; on failure status() says why and fs() is null.
  RunningFs(const std::filesystem::path& mountpoint, std::vector<ExportedDisk> disks,
            FuseOptions options = {});
  ~RunningFs();  // Destroys the FuseFs (Stop, unmount) and joins the loop thread.

  const Status& status() const { return status_; }
  FuseFs* fs() { return fs_.get(); }
  // Stops the loop and waits for Run() to return; returns Run()'s status.
  Status StopAndJoin();
  bool loop_done() const;

 private:
  Status status_;
  std::unique_ptr<FuseFs> fs_;
  std::thread loop_;
  mutable std::mutex mu_;
  std::optional<Status> run_status_;  // guarded by mu_
};

// A buffer aligned for O_DIRECT, filled with a pattern derived from seed.
struct AlignedBuffer {
  explicit AlignedBuffer(size_t size);
  ~AlignedBuffer();
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  void FillPattern(uint32_t seed);
  std::byte* data() { return data_; }
  size_t size() const { return size_; }
  std::vector<std::byte> ToVector() const { return {data_, data_ + size_}; }

 private:
  std::byte* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace siterep::blockdev::testing
