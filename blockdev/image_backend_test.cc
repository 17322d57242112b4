#include "blockdev/image_backend.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "blockdev/test_util.h"
#include "common/unique_fd.h"

namespace siterep::blockdev {
namespace {

using testing::Range;
using testing::TempDir;

constexpr uint64_t kSize = 1 << 20;

// Records the changes it is told about and calls apply (unless told to fail first).
class TestObserver : public tracker::WriteObserver {
 public:
  Status Write(uint64_t offset, std::span<const std::byte> data,
               FunctionRef<Status()> apply) override {
    {
      std::lock_guard lock(mu_);
      writes.push_back(Range{offset, data.size()});
      if (fail_code != 0) return Status::Error(fail_code, "observer refused");
    }
    Status s = apply();
    std::lock_guard lock(mu_);
    ++applies;
    return s;
  }
  Status Discard(uint64_t offset, uint64_t length, FunctionRef<Status()> apply) override {
    {
      std::lock_guard lock(mu_);
      discards.push_back(Range{offset, length});
    }
    Status s = apply();
    std::lock_guard lock(mu_);
    ++applies;
    return s;
  }
  Status Flush() override {
    std::lock_guard lock(mu_);
    ++flushes;
    return Status::Ok();
  }

  std::mutex mu_;
  std::vector<Range> writes;
  std::vector<Range> discards;
  int applies = 0;
  int flushes = 0;
  int fail_code = 0;
};

class ImageBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = (dir_.path() / "disk.img").string();
    fd_ = UniqueFd(::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    ASSERT_TRUE(fd_.valid());
    ASSERT_EQ(::ftruncate(fd_.get(), kSize), 0);
  }

  std::vector<std::byte> ImageBytes(uint64_t offset, size_t length) {
    std::vector<std::byte> out(length);
    EXPECT_EQ(::pread(fd_.get(), out.data(), length, static_cast<off_t>(offset)),
              static_cast<ssize_t>(length));
    return out;
  }

  static std::vector<std::byte> Pattern(size_t length, int seed) {
    std::vector<std::byte> out(length);
    for (size_t i = 0; i < length; ++i) out[i] = static_cast<std::byte>(i * 31 + seed);
    return out;
  }

  TempDir dir_;
  std::string path_;
  UniqueFd fd_;
};

TEST_F(ImageBackendTest, WritesGoThroughTheObserverOnce) {
  TestObserver observer;
  ImageBackend backend(fd_.get(), kSize, &observer);
  const auto data = Pattern(8192, 1);
  ASSERT_TRUE(backend.Write(4096, data).ok());
  EXPECT_EQ(observer.writes, (std::vector<Range>{{4096, 8192}}));
  EXPECT_EQ(observer.applies, 1);
  EXPECT_EQ(ImageBytes(4096, 8192), data);

  std::vector<std::byte> back(8192);
  auto got = backend.Read(4096, back);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 8192u);
  EXPECT_EQ(back, data);
}

TEST_F(ImageBackendTest, ObserverRefusalLeavesTheImageAlone) {
  TestObserver observer;
  observer.fail_code = EIO;
  ImageBackend backend(fd_.get(), kSize, &observer);
  Status s = backend.Write(0, Pattern(4096, 2));
  EXPECT_EQ(s.code(), EIO);
  EXPECT_EQ(observer.applies, 0);
  EXPECT_EQ(ImageBytes(0, 4096), std::vector<std::byte>(4096));
}

TEST_F(ImageBackendTest, ImageErrorsComeBackThroughTheObserver) {
  UniqueFd read_only(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
  TestObserver observer;
  ImageBackend backend(read_only.get(), kSize, &observer);
  Status s = backend.Write(0, Pattern(4096, 2));
  EXPECT_EQ(s.code(), EBADF);
  EXPECT_NE(s.message().find("offset 0"), std::string::npos) << s.message();
  EXPECT_EQ(observer.applies, 1);
}

TEST_F(ImageBackendTest, DiscardPunchesThroughTheObserver) {
  TestObserver observer;
  ImageBackend backend(fd_.get(), kSize, &observer);
  ASSERT_TRUE(backend.Write(0, Pattern(65536, 3)).ok());
  ASSERT_TRUE(backend.Discard(8192, 16384).ok());
  EXPECT_EQ(observer.discards, (std::vector<Range>{{8192, 16384}}));
  EXPECT_EQ(observer.applies, 2);
  EXPECT_EQ(ImageBytes(8192, 16384), std::vector<std::byte>(16384));
  const auto data = Pattern(65536, 3);
  EXPECT_EQ(ImageBytes(0, 8192), std::vector<std::byte>(data.begin(), data.begin() + 8192));
  EXPECT_EQ(ImageBytes(24576, 4096),
            std::vector<std::byte>(data.begin() + 24576, data.begin() + 28672));
  struct stat st {};
  ASSERT_EQ(::fstat(fd_.get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kSize);  // KEEP_SIZE
}

TEST_F(ImageBackendTest, FlushAsksTheObserver) {
  TestObserver observer;
  ImageBackend backend(fd_.get(), kSize, &observer);
  ASSERT_TRUE(backend.Flush().ok());
  ASSERT_TRUE(backend.Flush().ok());
  EXPECT_EQ(observer.flushes, 2);
}

TEST_F(ImageBackendTest, WithoutObserverStraightToTheImage) {
  ImageBackend backend(fd_.get(), kSize, nullptr);
  const auto data = Pattern(12345, 4);
  ASSERT_TRUE(backend.Write(100000, data).ok());
  EXPECT_EQ(ImageBytes(100000, data.size()), data);
  ASSERT_TRUE(backend.Discard(0, kSize).ok());
  EXPECT_EQ(ImageBytes(100000, data.size()), std::vector<std::byte>(data.size()));
  EXPECT_TRUE(backend.Flush().ok());  // fdatasync
}

// Pages of the image in [offset, offset + length) that are in the host page cache.
size_t ResidentPages(int fd, uint64_t offset, size_t length) {
  void* map = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (map == MAP_FAILED) return SIZE_MAX;
  std::vector<unsigned char> vec(length / 4096);
  size_t resident = SIZE_MAX;
  if (::mincore(map, length, vec.data()) == 0) {
    resident = 0;
    for (unsigned char v : vec) resident += v & 1;
  }
  ::munmap(map, length);
  return resident;
}

TEST_F(ImageBackendTest, AlignedRequestsBypassThePageCache) {
  UniqueFd direct(::open(path_.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC));
  if (!direct.valid()) GTEST_SKIP() << "no O_DIRECT on " << path_;
  ImageBackend backend(fd_.get(), kSize, nullptr, direct.get());
  const auto data = Pattern(65536, 9);
  ASSERT_TRUE(backend.Write(262144, data).ok());
  EXPECT_EQ(ResidentPages(fd_.get(), 262144, 65536), 0u);

  // The same through the buffered path fills the page cache: the check above can fail.
  ImageBackend buffered(fd_.get(), kSize, nullptr);
  ASSERT_TRUE(buffered.Write(524288, data).ok());
  EXPECT_EQ(ResidentPages(fd_.get(), 524288, 65536), 16u);
}

TEST_F(ImageBackendTest, DirectAndBufferedPathsStayCoherent) {
  UniqueFd direct(::open(path_.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC));
  if (!direct.valid()) GTEST_SKIP() << "no O_DIRECT on " << path_;
  TestObserver observer;
  ImageBackend backend(fd_.get(), kSize, &observer, direct.get());
  const auto aligned = Pattern(8192, 2);
  const auto odd = Pattern(100, 3);
  ASSERT_TRUE(backend.Write(4096, aligned).ok());  // direct
  ASSERT_TRUE(backend.Write(5000, odd).ok());      // buffered, inside the same pages
  auto expect = aligned;
  std::copy(odd.begin(), odd.end(), expect.begin() + (5000 - 4096));
  std::vector<std::byte> back(8192);
  auto got = backend.Read(4096, back);  // direct read sees the buffered write
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(back, expect);
  ASSERT_TRUE(backend.Write(4096, aligned).ok());  // direct write replaces cached pages
  EXPECT_EQ(ImageBytes(4096, 8192), aligned);     // buffered read of the image file
  EXPECT_EQ(observer.applies, 3);
}

TEST_F(ImageBackendTest, ReadOnlyRefusesWithErofs) {
  TestObserver observer;
  ImageBackend backend(fd_.get(), kSize, &observer);
  backend.SetReadOnly(true);
  EXPECT_EQ(backend.Write(0, Pattern(4096, 5)).code(), EROFS);
  EXPECT_EQ(backend.Discard(0, 4096).code(), EROFS);
  EXPECT_TRUE(observer.writes.empty());
  EXPECT_TRUE(observer.discards.empty());
  std::vector<std::byte> buf(4096);
  EXPECT_TRUE(backend.Read(0, buf).ok());  // reads still work
  backend.SetReadOnly(false);
  EXPECT_TRUE(backend.Write(0, Pattern(4096, 5)).ok());
}

TEST_F(ImageBackendTest, RangesAreChecked) {
  ImageBackend backend(fd_.get(), kSize, nullptr);
  EXPECT_EQ(backend.Write(kSize - 4096, Pattern(8192, 6)).code(), ENOSPC);
  EXPECT_EQ(backend.Discard(kSize, 4096).code(), EINVAL);
  std::vector<std::byte> buf(8192);
  auto got = backend.Read(kSize - 4096, buf);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 4096u);
  got = backend.Read(kSize, buf);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 0u);
}

TEST_F(ImageBackendTest, ShortImageReadsAsZeros) {
  ASSERT_EQ(::ftruncate(fd_.get(), kSize / 2), 0);
  ImageBackend backend(fd_.get(), kSize, nullptr);
  std::vector<std::byte> buf(8192, std::byte{0x55});
  auto got = backend.Read(kSize / 2 - 4096, buf);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 8192u);
  EXPECT_EQ(buf, std::vector<std::byte>(8192));
}

}  // namespace
}  // namespace siterep::blockdev
