#include "tracker/dirty_bitmap.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "tracker/test_util.h"

namespace siterep::tracker {
namespace {

using testing::TempDir;
constexpr uint64_t kBlock = DirtyBitmap::kBlockSize;

std::vector<uint64_t> DirtyBlocks(const DirtyBitmap& b) {
  std::vector<uint64_t> out;
  for (uint64_t i = 0; i < b.block_count(); ++i) {
    if (b.IsDirty(i)) out.push_back(i);
  }
  return out;
}

TEST(DirtyBitmapTest, MarksExactlyTheBlocksARangeTouches) {
  TempDir tmp;
  auto bitmap = DirtyBitmap::Open(tmp.path() / "b", 1000 * kBlock);
  ASSERT_TRUE(bitmap.ok()) << bitmap.status().ToString();
  DirtyBitmap& b = **bitmap;
  EXPECT_EQ(b.block_count(), 1000u);
  EXPECT_EQ(b.dirty_blocks(), 0u);

  b.MarkRange(kBlock - 1, 2);             // straddles blocks 0 and 1
  b.MarkRange(10 * kBlock, kBlock);       // exactly block 10
  b.MarkRange(60 * kBlock, 10 * kBlock);  // 60..69, across a 64-bit word boundary
  b.MarkRange(10 * kBlock + 5, 1);        // already dirty: not counted twice
  b.MarkRange(5 * kBlock, 0);             // empty: nothing
  std::vector<uint64_t> want = {0, 1, 10};
  for (uint64_t i = 60; i < 70; ++i) want.push_back(i);
  EXPECT_EQ(DirtyBlocks(b), want);
  EXPECT_EQ(b.dirty_blocks(), want.size());
}

TEST(DirtyBitmapTest, ClipsToTheDiskAndHandlesAPartialLastBlock) {
  auto b = DirtyBitmap::InMemory(10 * kBlock + 100);
  EXPECT_EQ(b->block_count(), 11u);
  b->MarkRange(10 * kBlock + 50, 1 << 20);  // runs past the end
  b->MarkRange(20 * kBlock, 10);            // wholly past the end
  EXPECT_EQ(DirtyBlocks(*b), std::vector<uint64_t>{10});
  b->MarkAll();
  EXPECT_EQ(b->dirty_blocks(), 11u);
  EXPECT_FALSE(b->persistent());
  EXPECT_TRUE(b->Flush().ok());
}

TEST(DirtyBitmapTest, BitsSurviveReopen) {
  TempDir tmp;
  const auto path = tmp.path() / "dirty.bitmap";
  const uint64_t size = 300 * kBlock;
  {
    auto b = DirtyBitmap::Open(path, size);
    ASSERT_TRUE(b.ok());
    (*b)->MarkRange(7 * kBlock, 3 * kBlock);
    (*b)->MarkRange(299 * kBlock, 1);
    ASSERT_TRUE((*b)->Flush().ok());
  }
  EXPECT_EQ(std::filesystem::file_size(path), DirtyBitmap::kFileHeaderSize + 5 * 8);
  auto b = DirtyBitmap::Open(path, size);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(DirtyBlocks(**b), (std::vector<uint64_t>{7, 8, 9, 299}));
  EXPECT_EQ((*b)->dirty_blocks(), 4u);
}

TEST(DirtyBitmapTest, RefusesABitmapOfAnotherDiskSize) {
  TempDir tmp;
  const auto path = tmp.path() / "dirty.bitmap";
  ASSERT_TRUE(DirtyBitmap::Open(path, 64 * kBlock).ok());
  auto other = DirtyBitmap::Open(path, 128 * kBlock);
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), EINVAL);
}

TEST(DirtyBitmapTest, RefusesAFileThatIsNotABitmap) {
  TempDir tmp;
  const auto path = tmp.path() / "dirty.bitmap";
  testing::MakeImage(path, 4096, 1);
  auto b = DirtyBitmap::Open(path, 64 * kBlock);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), EBADMSG);
}

TEST(DirtyBitmapTest, AnEmptyFileLeftByACrashIsStartedClean) {
  TempDir tmp;
  const auto path = tmp.path() / "dirty.bitmap";
  testing::MakeImage(path, 0, 1);
  auto b = DirtyBitmap::Open(path, 64 * kBlock);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ((*b)->dirty_blocks(), 0u);
}

TEST(DirtyBitmapTest, TheFileIsAllocatedBeforeItIsMapped) {
  TempDir tmp;
  const auto path = tmp.path() / "dirty.bitmap";
  const uint64_t size = 1ull << 30;  // 32 KiB of bits
  auto b = DirtyBitmap::Open(path, size);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  // No hole left for a store through the mapping to fill (that would need a free block).
  EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512,
            DirtyBitmap::kFileHeaderSize + size / kBlock / 8);
}

// A file system without room for the bits (here: a file size limit, which fails the
// allocation with EFBIG as a full one fails it with ENOSPC): an error, and no bitmap file
// left behind that a restart would take for the record of what changed.
TEST(DirtyBitmapTest, NoRoomForTheBitsIsAnErrorAndLeavesNoFile) {
  TempDir tmp;
  const auto path = tmp.path() / "dirty.bitmap";
  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  struct sigaction ignore {};
  struct sigaction saved {};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGXFSZ, &ignore, &saved), 0);
  struct rlimit small = old;
  small.rlim_cur = 4096;  // room for the header, not for 32 KiB of bits
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  auto b = DirtyBitmap::Open(path, 1ull << 30);
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::sigaction(SIGXFSZ, &saved, nullptr);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), EFBIG) << b.status().ToString();
  EXPECT_FALSE(std::filesystem::exists(path));
  // With room, the same call makes a whole bitmap.
  auto again = DirtyBitmap::Open(path, 1ull << 30);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  (*again)->MarkRange(1ull << 29, 1);
  EXPECT_EQ((*again)->dirty_blocks(), 1u);
}

}  // namespace
}  // namespace siterep::tracker
