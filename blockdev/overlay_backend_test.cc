#include "blockdev/overlay_backend.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <bit>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "blockdev/test_util.h"
#include "common/unique_fd.h"

namespace siterep::tracker {
// For readable gtest failures.
void PrintTo(const ByteRange& range, std::ostream* os) {
  *os << "[" << range.offset << ", +" << range.length << ")";
}
}  // namespace siterep::tracker

namespace siterep::blockdev {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;
using tracker::ByteRange;

// 64 blocks of 4 KiB and a short last block (the overlay's block size is 4 KiB on the
// test machines; the tests read it from the backend all the same).
constexpr uint64_t kSize = 64 * 4096 + 1024;

std::vector<std::byte> Pattern(size_t length, uint32_t seed) {
  std::vector<std::byte> out(length);
  uint32_t x = seed * 2654435761u + 7;
  for (auto& b : out) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b = static_cast<std::byte>(x | 1);  // never zero: zeros in a result are not base data
  }
  return out;
}

// A read-only base in memory that counts its reads, can fail, and can be slow (to widen
// the window of a read-modify-write in the concurrency tests).
class Base {
 public:
  explicit Base(uint64_t size) : data_(Pattern(size, 99)) {}

  OverlayBackend::BaseReader Reader() {
    return [this](uint64_t offset, std::span<std::byte> out) -> Status {
      reads_.fetch_add(1);
      if (int code = fail_code_.load(); code != 0) return Status::Error(code, "injected");
      if (offset + out.size() > data_.size()) return Status::Invalid("base read past the end");
      if (slow_.load()) std::this_thread::sleep_for(std::chrono::microseconds(300));
      std::memcpy(out.data(), data_.data() + offset, out.size());
      return Status::Ok();
    };
  }
  const std::vector<std::byte>& data() const { return data_; }
  int reads() const { return reads_.load(); }
  void FailWith(int code) { fail_code_ = code; }
  void SetSlow(bool slow) { slow_ = slow; }

 private:
  const std::vector<std::byte> data_;
  std::atomic<int> reads_{0};
  std::atomic<int> fail_code_{0};
  std::atomic<bool> slow_{false};
};

class OverlayBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.path() / "disk.overlay";
    Reopen();
    bs_ = overlay_->block_size();
    model_ = base_.data();
  }

  void Reopen() {
    overlay_.reset();
    auto opened = OverlayBackend::Open(path_, kSize, base_.Reader());
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    overlay_ = std::move(opened).value();
  }

  std::vector<std::byte> ReadAll(OverlayBackend& overlay) {
    std::vector<std::byte> out(kSize);
    auto got = overlay.Read(0, out);
    EXPECT_TRUE(got.ok()) << got.status().ToString();
    if (got.ok()) {
      EXPECT_EQ(*got, kSize);
    }
    return out;
  }

  // Writes through the overlay and into model_.
  void Write(uint64_t offset, const std::vector<std::byte>& data) {
    ASSERT_TRUE(overlay_->Write(offset, data).ok()) << offset;
    std::memcpy(model_.data() + offset, data.data(), data.size());
  }

  // Whether the overlay file has data (is allocated) at offset.
  bool Allocated(uint64_t offset) {
    UniqueFd fd(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
    const off_t data = ::lseek(fd.get(), static_cast<off_t>(offset), SEEK_DATA);
    return data == static_cast<off_t>(offset);
  }

  TempDir dir_;
  fs::path path_;
  Base base_{kSize};
  std::unique_ptr<OverlayBackend> overlay_;
  uint64_t bs_ = 0;
  std::vector<std::byte> model_;  // what the disk should read as
};

TEST_F(OverlayBackendTest, NewOverlayReadsTheBase) {
  EXPECT_GE(bs_, 4096u);
  EXPECT_TRUE(std::has_single_bit(bs_));
  EXPECT_EQ(overlay_->Size(), kSize);
  EXPECT_EQ(fs::file_size(path_), kSize);
  EXPECT_FALSE(Allocated(0));
  EXPECT_FALSE(fs::exists(path_.string() + ".new"));
  EXPECT_EQ(ReadAll(*overlay_), base_.data());
  EXPECT_TRUE(overlay_->WrittenRanges().empty());
  EXPECT_EQ(overlay_->written_bytes(), 0u);

  // Past the end: short read.
  std::vector<std::byte> buf(4096);
  auto got = overlay_->Read(kSize - 100, buf);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 100u);
  got = overlay_->Read(kSize, buf);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 0u);
}

TEST_F(OverlayBackendTest, AlignedUnalignedAndStraddlingWrites) {
  Write(2 * bs_, Pattern(bs_, 1));                  // one whole block
  Write(5 * bs_ + 7, Pattern(100, 2));              // inside a block
  Write(8 * bs_ - 300, Pattern(2 * bs_ + 800, 3));  // partial, whole, partial
  Write(20 * bs_ + 512, Pattern(bs_ - 512, 4));     // to the end of a block
  Write(30 * bs_, Pattern(512, 5));                 // from the start of a block
  Write(5 * bs_ + 50, Pattern(200, 6));             // again into a written block
  Write(kSize - 1024, Pattern(1024, 7));            // the whole short last block
  EXPECT_EQ(ReadAll(*overlay_), model_);

  // Unaligned reads across written and unwritten blocks.
  std::vector<std::byte> buf(3 * bs_ + 77);
  const uint64_t at = 6 * bs_ + 13;
  auto got = overlay_->Read(at, buf);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(std::memcmp(buf.data(), model_.data() + at, buf.size()), 0);

  EXPECT_EQ(overlay_->WrittenRanges(), (std::vector<ByteRange>{{2 * bs_, bs_},
                                                               {5 * bs_, bs_},
                                                               {7 * bs_, 4 * bs_},
                                                               {20 * bs_, bs_},
                                                               {30 * bs_, bs_},
                                                               {64 * bs_, 1024}}));
  EXPECT_EQ(overlay_->written_bytes(), 8 * bs_ + 1024);
  // The blocks of the partial writes are allocated whole in the file.
  EXPECT_TRUE(Allocated(5 * bs_));
  EXPECT_TRUE(Allocated(7 * bs_));
  EXPECT_FALSE(Allocated(6 * bs_));
}

TEST_F(OverlayBackendTest, WritesPastTheEndAreRefused) {
  EXPECT_EQ(overlay_->Write(kSize - 10, Pattern(20, 1)).code(), ENOSPC);
  EXPECT_EQ(overlay_->Discard(kSize - 10, 20).code(), EINVAL);
  EXPECT_TRUE(overlay_->Write(kSize, {}).ok());
  EXPECT_TRUE(overlay_->WrittenRanges().empty());
}

TEST_F(OverlayBackendTest, DiscardReadsZerosOverTheBase) {
  Write(bs_, Pattern(bs_, 1));
  const uint64_t offset = bs_ + 100;
  const uint64_t length = 3 * bs_ - 50;  // partial (written), whole, whole, partial (unwritten)
  ASSERT_TRUE(overlay_->Discard(offset, length).ok());
  std::fill_n(model_.begin() + offset, length, std::byte{0});
  EXPECT_EQ(ReadAll(*overlay_), model_);
  EXPECT_EQ(overlay_->WrittenRanges(), (std::vector<ByteRange>{{bs_, 4 * bs_}}));
  // Zeros were written, not holes punched: the blocks stay the overlay's after a restart.
  EXPECT_TRUE(Allocated(2 * bs_));
  EXPECT_TRUE(Allocated(4 * bs_));

  // A discard longer than one piece, ending in the short last block.
  ASSERT_TRUE(overlay_->Discard(10 * bs_ + 1, kSize - 10 * bs_ - 1).ok());
  std::fill(model_.begin() + 10 * bs_ + 1, model_.end(), std::byte{0});
  EXPECT_EQ(ReadAll(*overlay_), model_);

  overlay_.reset();
  Reopen();
  EXPECT_EQ(ReadAll(*overlay_), model_);
  EXPECT_EQ(overlay_->WrittenRanges(),
            (std::vector<ByteRange>{{bs_, 4 * bs_}, {10 * bs_, kSize - 10 * bs_}}));
}

TEST_F(OverlayBackendTest, ReopenKeepsTheWrittenDataAndMap) {
  Write(0, Pattern(2 * bs_, 1));
  Write(9 * bs_ + 10, Pattern(10, 2));
  Write(40 * bs_ - 1, Pattern(2, 3));
  ASSERT_TRUE(overlay_->Flush().ok());
  const auto ranges = overlay_->WrittenRanges();
  const uint64_t bytes = overlay_->written_bytes();
  ASSERT_EQ(ranges.size(), 3u);

  overlay_.reset();
  Reopen();
  EXPECT_EQ(overlay_->WrittenRanges(), ranges);
  EXPECT_EQ(overlay_->written_bytes(), bytes);
  const int reads_before = base_.reads();
  EXPECT_EQ(ReadAll(*overlay_), model_);
  EXPECT_GT(base_.reads(), reads_before);  // unwritten blocks still come from the base

  // The map is used: a written block no longer reads the base.
  base_.FailWith(EIO);
  std::vector<std::byte> buf(2 * bs_);
  ASSERT_TRUE(overlay_->Read(0, buf).ok());
}

TEST_F(OverlayBackendTest, FlushedWritesSurviveKill9) {
  overlay_.reset();
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto opened = OverlayBackend::Open(path_, kSize, base_.Reader());
    if (!opened.ok()) ::_exit(1);
    if (!(*opened)->Write(3 * bs_ + 5, Pattern(bs_, 1)).ok()) ::_exit(2);
    if (!(*opened)->Flush().ok()) ::_exit(3);
    ::raise(SIGKILL);
    ::_exit(4);
  }
  int wstatus = 0;
  ASSERT_EQ(::waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << wstatus;
  Reopen();
  const auto data = Pattern(bs_, 1);
  std::memcpy(model_.data() + 3 * bs_ + 5, data.data(), data.size());
  EXPECT_EQ(ReadAll(*overlay_), model_);
  EXPECT_EQ(overlay_->WrittenRanges(), (std::vector<ByteRange>{{3 * bs_, 2 * bs_}}));
}

TEST_F(OverlayBackendTest, CopyWrittenToMakesTheImage) {
  // The image starts as the base (the replica's image), as at commit.
  const fs::path image = dir_.path() / "disk.img";
  UniqueFd fd(::open(image.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(::pwrite(fd.get(), base_.data().data(), kSize, 0), static_cast<ssize_t>(kSize));

  Write(0, Pattern(bs_ + 3, 1));
  Write(12 * bs_, Pattern(40 * bs_, 2));
  Write(kSize - 2000, Pattern(2000, 3));  // reaches into the short last block
  ASSERT_TRUE(overlay_->Discard(30 * bs_, 2 * bs_).ok());
  std::fill_n(model_.begin() + 30 * bs_, 2 * bs_, std::byte{0});
  ASSERT_TRUE(overlay_->CopyWrittenTo(fd.get()).ok());

  std::vector<std::byte> copied(kSize);
  ASSERT_EQ(::pread(fd.get(), copied.data(), kSize, 0), static_cast<ssize_t>(kSize));
  EXPECT_EQ(copied, model_);
  EXPECT_EQ(copied, ReadAll(*overlay_));
  EXPECT_EQ(fs::file_size(image), kSize);

  UniqueFd read_only(::open(image.c_str(), O_RDONLY | O_CLOEXEC));
  EXPECT_EQ(overlay_->CopyWrittenTo(read_only.get()).code(), EBADF);
}

TEST_F(OverlayBackendTest, CopyWrittenToReadsInLargeRuns) {
  // A run longer than the 1 MiB copy buffer, on a disk of its own.
  const uint64_t size = 3 << 20;
  Base base(size);
  auto opened = OverlayBackend::Open(dir_.path() / "big.overlay", size, base.Reader());
  ASSERT_TRUE(opened.ok());
  OverlayBackend& overlay = **opened;
  const auto data = Pattern(size - 8192, 5);
  ASSERT_TRUE(overlay.Write(4096, data).ok());
  const fs::path image = dir_.path() / "big.img";
  UniqueFd fd(::open(image.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_EQ(::ftruncate(fd.get(), size), 0);
  ASSERT_TRUE(overlay.CopyWrittenTo(fd.get()).ok());
  std::vector<std::byte> copied(data.size());
  ASSERT_EQ(::pread(fd.get(), copied.data(), copied.size(), 4096),
            static_cast<ssize_t>(copied.size()));
  EXPECT_EQ(copied, data);
  char first[4096];
  ASSERT_EQ(::pread(fd.get(), first, sizeof(first), 0), 4096);
  EXPECT_EQ(first[0], 0);  // not written: not copied
}

TEST_F(OverlayBackendTest, SizeMismatchAndOtherMisuseAreRefused) {
  Write(0, Pattern(bs_, 1));
  overlay_.reset();
  auto other = OverlayBackend::Open(path_, kSize + 4096, base_.Reader());
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), EINVAL);
  EXPECT_NE(other.status().message().find("belongs to another disk"), std::string::npos)
      << other.status().message();
  EXPECT_EQ(fs::file_size(path_), kSize);  // untouched

  Reopen();
  auto twice = OverlayBackend::Open(path_, kSize, base_.Reader());
  EXPECT_EQ(twice.status().code(), EBUSY);

  auto no_folder =
      OverlayBackend::Open(dir_.path() / "missing" / "x.overlay", kSize, base_.Reader());
  EXPECT_EQ(no_folder.status().code(), ENOENT);
  auto no_base = OverlayBackend::Open(dir_.path() / "y.overlay", kSize, nullptr);
  EXPECT_EQ(no_base.status().code(), EINVAL);
  auto directory = OverlayBackend::Open(dir_.path(), kSize, base_.Reader());
  EXPECT_FALSE(directory.ok());
}

TEST_F(OverlayBackendTest, BaseErrorsPropagate) {
  Write(4 * bs_, Pattern(bs_, 1));
  base_.FailWith(EIO);
  std::vector<std::byte> buf(bs_);
  auto got = overlay_->Read(0, buf);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), EIO);
  EXPECT_NE(got.status().message().find("base"), std::string::npos) << got.status().message();
  // A read across a written and an unwritten block fails too.
  std::vector<std::byte> two(2 * bs_);
  EXPECT_EQ(overlay_->Read(4 * bs_, two).status().code(), EIO);
  // Written blocks need no base.
  EXPECT_TRUE(overlay_->Read(4 * bs_, buf).ok());
  EXPECT_TRUE(overlay_->Write(4 * bs_ + 1, Pattern(10, 2)).ok());
  // A partial write to an unwritten block needs its base: it fails and writes nothing.
  EXPECT_EQ(overlay_->Write(bs_ + 1, Pattern(10, 3)).code(), EIO);
  EXPECT_EQ(overlay_->Discard(bs_ + 1, 10).code(), EIO);
  EXPECT_EQ(overlay_->WrittenRanges(), (std::vector<ByteRange>{{4 * bs_, bs_}}));
  EXPECT_FALSE(Allocated(bs_));
  // Whole blocks need none.
  EXPECT_TRUE(overlay_->Write(8 * bs_, Pattern(bs_, 4)).ok());
  EXPECT_TRUE(overlay_->Discard(9 * bs_, bs_).ok());
}

TEST_F(OverlayBackendTest, ConcurrentPartialWritesToOneBlockAllSurvive) {
  // Each thread writes its own sector of every block at the same moment; with a slow base
  // the read-modify-writes overlap, and without the stripe locks all but one sector of
  // each block would be lost.
  constexpr int kThreads = 8;
  constexpr uint64_t kBlocks = 24;
  base_.SetSlow(true);
  std::barrier sync(kThreads);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t b = 0; b < kBlocks; ++b) {
        sync.arrive_and_wait();
        const auto data = Pattern(512, static_cast<uint32_t>(b * 100 + t));
        if (!overlay_->Write(b * bs_ + t * 512, data).ok()) failures++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  for (uint64_t b = 0; b < kBlocks; ++b) {
    for (int t = 0; t < kThreads; ++t) {
      const auto data = Pattern(512, static_cast<uint32_t>(b * 100 + t));
      std::memcpy(model_.data() + b * bs_ + t * 512, data.data(), 512);
    }
  }
  EXPECT_EQ(ReadAll(*overlay_), model_);
}

TEST_F(OverlayBackendTest, WholeBlockWriteIsNotLostToAConcurrentPartialWrite) {
  // Per block, one thread writes the whole block while another writes its first sector.
  // Either order is fine: all of A, or A with B's sector. Base data in the block means
  // the partial write's read-modify-write undid the whole-block write.
  constexpr uint64_t kBlocks = 24;
  base_.SetSlow(true);
  std::barrier sync(2);
  std::atomic<int> failures{0};
  auto whole = [&](uint64_t b) { return Pattern(bs_, static_cast<uint32_t>(1000 + b)); };
  auto sector = [&](uint64_t b) { return Pattern(512, static_cast<uint32_t>(2000 + b)); };
  std::thread partial_writer([&] {
    for (uint64_t b = 0; b < kBlocks; ++b) {
      sync.arrive_and_wait();
      if (!overlay_->Write(b * bs_, sector(b)).ok()) failures++;
    }
  });
  std::thread whole_writer([&] {
    for (uint64_t b = 0; b < kBlocks; ++b) {
      sync.arrive_and_wait();
      std::this_thread::sleep_for(std::chrono::microseconds(50));  // into the base read
      if (!overlay_->Write(b * bs_, whole(b)).ok()) failures++;
    }
  });
  partial_writer.join();
  whole_writer.join();
  EXPECT_EQ(failures.load(), 0);
  std::vector<std::byte> block(bs_);
  for (uint64_t b = 0; b < kBlocks; ++b) {
    ASSERT_TRUE(overlay_->Read(b * bs_, block).ok());
    std::vector<std::byte> a_then_b = whole(b);
    const auto s = sector(b);
    std::copy(s.begin(), s.end(), a_then_b.begin());
    EXPECT_TRUE(block == whole(b) || block == a_then_b) << "block " << b;
  }
}

}  // namespace
}  // namespace siterep::blockdev
