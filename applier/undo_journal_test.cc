// The undo journal on its own: saving, the chain lookup, rebuilding the index at open,
// torn tails, merging a removed point, leftovers, damaged records.
#include "applier/undo_journal.h"

#include <gtest/gtest.h>

#include "applier/applier_test_util.h"
#include "tracker/test_util.h"

namespace siterep::applier {
namespace {

namespace fs = std::filesystem;
using testing::Bytes;
using tracker::testing::Pattern;

constexpr uint32_t kDiskA = 111;
constexpr uint32_t kDiskB = 222;

class UndoJournalTest : public ::testing::Test {
 protected:
  fs::path dir() const { return tmp_.path() / "undo"; }

  std::unique_ptr<UndoJournal> Open() {
    Result<std::unique_ptr<UndoJournal>> j = UndoJournal::Open(dir(), {kDiskA, kDiskB});
    EXPECT_TRUE(j.ok()) << j.status().ToString();
    return j.ok() ? std::move(*j) : nullptr;
  }

  static Bytes Block(uint64_t seed) { return Pattern(kUndoBlockSize, seed); }

  // ReadAsOf, expecting the block to be found with the given content (or not found).
  static void ExpectBlock(const UndoJournal& j, size_t point, size_t disk, uint64_t block,
                          const Bytes* expected) {
    Bytes out(kUndoBlockSize);
    Result<bool> found = j.ReadAsOf(point, disk, block, out);
    ASSERT_TRUE(found.ok()) << found.status().ToString();
    ASSERT_EQ(*found, expected != nullptr) << "point " << point << " block " << block;
    if (expected != nullptr) {
      EXPECT_EQ(out, *expected) << "point " << point << " block " << block;
    }
  }

  testing::TempDir tmp_;
};

TEST_F(UndoJournalTest, SavedBlocksAreFoundThroughTheChainAndAfterReopen) {
  const Bytes a1 = Block(1), a2 = Block(2), b1 = Block(3), zeros(kUndoBlockSize);
  {
    auto j = Open();
    ASSERT_TRUE(j);
    EXPECT_FALSE(j->NewestHas(0, 7));
    ASSERT_TRUE(j->AddPoint(10, 100, true).ok());
    ASSERT_TRUE(j->Save(0, 7, a1).ok());
    ASSERT_TRUE(j->Save(1, 7, b1).ok());
    ASSERT_TRUE(j->Save(0, 9, zeros).ok());
    EXPECT_TRUE(j->NewestHas(0, 7));
    ExpectBlock(*j, 0, 0, 7, &a1);  // still in the buffer
    ASSERT_TRUE(j->Sync().ok());
    ASSERT_TRUE(j->AddPoint(20, 200, false).ok());
    EXPECT_FALSE(j->NewestHas(0, 7));
    ASSERT_TRUE(j->Save(0, 7, a2).ok());
    ASSERT_TRUE(j->Save(0, 8, a2).ok());
    ASSERT_TRUE(j->Sync().ok());
    EXPECT_EQ(j->AddPoint(15, 0, true).code(), EINVAL) << "points only grow";
  }
  auto j = Open();
  ASSERT_TRUE(j);
  ASSERT_EQ(j->size(), 2u);
  EXPECT_EQ(j->point(0).cycle, 10u);
  EXPECT_TRUE(j->point(0).retained);
  EXPECT_EQ(j->point(1).cut_unix_nanos, 200);
  EXPECT_FALSE(j->point(1).retained);
  ExpectBlock(*j, 0, 0, 7, &a1);  // point 10's own record wins
  ExpectBlock(*j, 0, 0, 8, &a2);  // found in point 20's file
  ExpectBlock(*j, 0, 0, 9, &zeros);
  ExpectBlock(*j, 0, 1, 7, &b1);
  ExpectBlock(*j, 1, 0, 7, &a2);
  ExpectBlock(*j, 1, 1, 7, nullptr);  // not overwritten after 20: the image has it
  ExpectBlock(*j, 0, 0, 1, nullptr);
  EXPECT_EQ(j->bytes(), 4 * (kUndoHeaderSize + kUndoBlockSize) + kUndoHeaderSize)
      << "a block of zeros is stored as a header only";
}

TEST_F(UndoJournalTest, ATornTailIsTruncatedAtOpen) {
  {
    auto j = Open();
    ASSERT_TRUE(j->AddPoint(1, 1, true).ok());
    for (uint64_t b = 0; b < 5; ++b) ASSERT_TRUE(j->Save(0, b, Block(b)).ok());
    ASSERT_TRUE(j->Sync().ok());
  }
  const fs::path file = dir() / "00000000000000000001.undo";
  const uint64_t record = kUndoHeaderSize + kUndoBlockSize;
  ASSERT_EQ(fs::file_size(file), 5 * record);
  fs::resize_file(file, 5 * record - 10);
  tracker::testing::AppendBytes(file, Pattern(3, 9));
  auto j = Open();
  ASSERT_TRUE(j);
  EXPECT_EQ(fs::file_size(file), 4 * record);
  for (uint64_t b = 0; b < 4; ++b) {
    const Bytes expected = Block(b);
    ExpectBlock(*j, 0, 0, b, &expected);
  }
  ExpectBlock(*j, 0, 0, 4, nullptr);
  EXPECT_FALSE(j->NewestHas(0, 4)) << "so the next apply saves it again";
  // A record damaged in the middle of the file ends it there too.
  {
    UniqueFd fd = tracker::testing::OpenRw(file);
    const std::byte junk{0x5a};
    ASSERT_EQ(::pwrite(fd.get(), &junk, 1, record + 100), 1);
  }
  j.reset();
  j = Open();
  EXPECT_EQ(fs::file_size(file), record);
}

TEST_F(UndoJournalTest, RemovingAMiddlePointMovesItsBlocksIntoThePreviousOne) {
  const Bytes p1b1 = Block(11), p2b1 = Block(21), p2b2 = Block(22), p3b3 = Block(33);
  auto j = Open();
  ASSERT_TRUE(j->AddPoint(1, 1, true).ok());
  ASSERT_TRUE(j->Save(0, 1, p1b1).ok());
  ASSERT_TRUE(j->AddPoint(2, 2, false).ok());
  ASSERT_TRUE(j->Save(0, 1, p2b1).ok());
  ASSERT_TRUE(j->Save(0, 2, p2b2).ok());
  ASSERT_TRUE(j->Save(1, 2, Bytes(kUndoBlockSize)).ok());
  ASSERT_TRUE(j->AddPoint(3, 3, true).ok());
  ASSERT_TRUE(j->Save(0, 3, p3b3).ok());
  ASSERT_TRUE(j->Sync().ok());
  ASSERT_TRUE(j->RemovePoint(1).ok());
  ASSERT_EQ(j->size(), 2u);
  EXPECT_FALSE(fs::exists(dir() / "00000000000000000002.undo"));
  const Bytes zeros(kUndoBlockSize);
  ExpectBlock(*j, 0, 0, 1, &p1b1);  // point 1 kept its own
  ExpectBlock(*j, 0, 0, 2, &p2b2);  // moved from point 2
  ExpectBlock(*j, 0, 1, 2, &zeros);
  ExpectBlock(*j, 0, 0, 3, &p3b3);
  // The same after a reopen; then dropping the oldest is a plain delete.
  j.reset();
  j = Open();
  ASSERT_EQ(j->size(), 2u);
  ExpectBlock(*j, 0, 0, 2, &p2b2);
  ASSERT_TRUE(j->RemovePoint(0).ok());
  EXPECT_FALSE(fs::exists(dir() / "00000000000000000001.undo"));
  ExpectBlock(*j, 0, 0, 3, &p3b3);
  ExpectBlock(*j, 0, 0, 2, nullptr);
  // Removing the newest point hands its blocks to the one before; with none left, none.
  ASSERT_TRUE(j->RemovePoint(0).ok());
  EXPECT_TRUE(j->empty());
  EXPECT_FALSE(j->NewestHas(0, 3));
}

TEST_F(UndoJournalTest, LeftoverFilesGoAndAMissingFileDropsItsAndOlderPoints) {
  {
    auto j = Open();
    ASSERT_TRUE(j->AddPoint(1, 1, true).ok());
    ASSERT_TRUE(j->AddPoint(2, 2, true).ok());
    ASSERT_TRUE(j->AddPoint(3, 3, true).ok());
  }
  tracker::testing::MakeImage(dir() / "00000000000000000009.undo", 10, 1);  // not listed
  fs::remove(dir() / "00000000000000000002.undo");
  auto j = Open();
  ASSERT_TRUE(j);
  ASSERT_EQ(j->size(), 1u) << "points 1 and 2 needed the missing file";
  EXPECT_EQ(j->point(0).cycle, 3u);
  EXPECT_FALSE(fs::exists(dir() / "00000000000000000009.undo"));
  EXPECT_FALSE(fs::exists(dir() / "00000000000000000001.undo"));
}

TEST_F(UndoJournalTest, ADamagedRecordIsAnErrorWhenRead) {
  auto j = Open();
  ASSERT_TRUE(j->AddPoint(1, 1, true).ok());
  ASSERT_TRUE(j->Save(0, 5, Block(5)).ok());
  ASSERT_TRUE(j->Sync().ok());
  {
    UniqueFd fd = tracker::testing::OpenRw(dir() / "00000000000000000001.undo");
    const std::byte junk{0x5a};
    ASSERT_EQ(::pwrite(fd.get(), &junk, 1, kUndoHeaderSize + 10), 1);
  }
  Bytes out(kUndoBlockSize);
  Result<bool> r = j->ReadAsOf(0, 0, 5, out);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), EBADMSG);
}

TEST_F(UndoJournalTest, ADamagedRecordInAPointBeingMergedDropsTheOlderPoints) {
  auto j = Open();
  ASSERT_TRUE(j->AddPoint(1, 1, true).ok());
  ASSERT_TRUE(j->Save(0, 1, Block(1)).ok());
  ASSERT_TRUE(j->AddPoint(2, 2, false).ok());
  ASSERT_TRUE(j->Save(0, 2, Block(2)).ok());
  ASSERT_TRUE(j->AddPoint(3, 3, true).ok());
  {
    UniqueFd fd = tracker::testing::OpenRw(dir() / "00000000000000000002.undo");
    const std::byte junk{0x5a};
    ASSERT_EQ(::pwrite(fd.get(), &junk, 1, kUndoHeaderSize + 10), 1);
  }
  ASSERT_TRUE(j->RemovePoint(1).ok());
  ASSERT_EQ(j->size(), 1u) << "point 1 could not be kept right without point 2's block";
  EXPECT_EQ(j->point(0).cycle, 3u);
  EXPECT_FALSE(fs::exists(dir() / "00000000000000000001.undo"));
  EXPECT_FALSE(fs::exists(dir() / "00000000000000000002.undo"));
  j.reset();
  j = Open();
  EXPECT_EQ(j->size(), 1u);
}

}  // namespace
}  // namespace siterep::applier
