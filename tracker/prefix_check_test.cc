#include "tracker/prefix_check.h"

#include <gtest/gtest.h>

#include "common/file_util.h"
#include "tracker/tracker_fixture.h"

namespace siterep::tracker {
namespace {

namespace fs = std::filesystem;
using testing::Pattern;
using testing::WriteVia;

constexpr uint64_t kBlock = 4096;

class PrefixCheckTest : public testing::TrackerFixture {
 protected:
  // Two disks, three cycles of writes (odd offsets and lengths too) and a discard.
  void MakeHistory() {
    AddDisk("a", 1 << 20);
    AddDisk("b", (1 << 20) + 512);  // a short last block
    auto tracker = Open(Options());
    ASSERT_TRUE(tracker);
    auto write = [&](size_t d, uint64_t off, size_t len, uint64_t seed) {
      ASSERT_TRUE(WriteVia(tracker->observer(d), disks_[d].fd.get(), off, Pattern(len, seed)).ok());
    };
    write(0, 0, kBlock, 1);
    write(1, 100, 5000, 2);
    ASSERT_EQ(*tracker->Cut(), 1u);
    write(0, 3 * kBlock + 7, 2 * kBlock, 3);
    write(1, (1 << 20) + 512 - 700, 700, 4);  // up to the end of the odd-sized disk
    ASSERT_EQ(*tracker->Cut(), 2u);
    write(0, 0, 512, 5);
    ASSERT_TRUE(testing::DiscardVia(tracker->observer(1), disks_[1].fd.get(), 0, 8 * kBlock).ok());
    ASSERT_TRUE(tracker->Close().ok());  // cuts cycle 3
    for (size_t i = 0; i < 2; ++i) logs_.push_back(LogOf(*tracker, i));
  }
  std::vector<fs::path> logs_;  // every disk's segments, as files

  // A replica of disk i: its pre-image with the log applied through `through` (0: none).
  fs::path ReplicaAt(size_t i, uint64_t through) {
    const DiskFiles& d = disks_[i];
    fs::path out = tmp_.path() / (d.name + ".replica." + std::to_string(through));
    fs::copy_file(d.pre_image, out, fs::copy_options::overwrite_existing);
    if (through > 0) {
      Result<ReplayResult> r = ReplayLogToFile(logs_[i], out, ReplayOptions{through});
      EXPECT_TRUE(r.ok()) << r.status().ToString();
    }
    return out;
  }

  Result<PrefixCheckResult> Check(const fs::path& ra, const fs::path& rb) {
    return CheckReplicaIsLogPrefix(
        {{"a", disks_[0].pre_image, logs_[0], ra}, {"b", disks_[1].pre_image, logs_[1], rb}},
        tmp_.path());
  }
};

TEST_F(PrefixCheckTest, AReplicaAtEveryCutIsFoundAtThatCycle) {
  MakeHistory();
  for (uint64_t c = 0; c <= 3; ++c) {
    Result<PrefixCheckResult> r = Check(ReplicaAt(0, c), ReplicaAt(1, c));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_TRUE(r->cycle.has_value()) << r->Summary();
    EXPECT_EQ(*r->cycle, c) << r->Summary();
    EXPECT_EQ(r->disks[0].last_cycle, 3u);
  }
  // The live images are the whole log.
  Result<PrefixCheckResult> r = Check(disks_[0].image, disks_[1].image);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->cycle, 3u) << r->Summary();
}

TEST_F(PrefixCheckTest, DisksAtDifferentCyclesAreNotConsistent) {
  MakeHistory();
  Result<PrefixCheckResult> r = Check(ReplicaAt(0, 1), ReplicaAt(1, 2));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r->cycle.has_value()) << r->Summary();
  EXPECT_NE(r->Summary().find("NOT consistent"), std::string::npos);
}

TEST_F(PrefixCheckTest, HalfACycleOrAFlippedByteIsNotAPrefix) {
  MakeHistory();
  // Disk a with cycle 2's first record applied by hand but not the rest of the VM's cycle:
  // at cycle 1 plus part of cycle 2 it equals no cut.
  fs::path a = ReplicaAt(0, 1);
  {
    UniqueFd fd = testing::OpenRw(a);
    const std::vector<std::byte> p = Pattern(kBlock, 3);
    ASSERT_TRUE(PWriteAll(fd.get(), p.data(), kBlock, 3 * kBlock + 7, "replica").ok());
  }
  Result<PrefixCheckResult> r = Check(a, ReplicaAt(1, 1));
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->cycle.has_value()) << r->Summary();
  EXPECT_TRUE(r->disks[0].matching_cycles.empty());

  fs::path b = ReplicaAt(1, 3);
  {
    UniqueFd fd = testing::OpenRw(b);
    const std::byte x{0x5a};
    ASSERT_TRUE(PWriteAll(fd.get(), &x, 1, 200 * kBlock + 3, "replica").ok());
  }
  r = Check(ReplicaAt(0, 3), b);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->cycle.has_value());
  EXPECT_EQ(r->disks[1].fewest_differing_blocks, 1u) << r->Summary();
}

TEST_F(PrefixCheckTest, ASizeMismatchOrMissingLogIsAnError) {
  MakeHistory();
  fs::path small = tmp_.path() / "small.img";
  fs::copy_file(disks_[0].pre_image, small);
  fs::resize_file(small, 4096);
  EXPECT_FALSE(Check(small, ReplicaAt(1, 1)).ok());
  Result<PrefixCheckResult> r = CheckReplicaIsLogPrefix(
      {{"a", disks_[0].pre_image, tmp_.path() / "nope", ReplicaAt(0, 1)}}, tmp_.path());
  EXPECT_FALSE(r.ok());
}

}  // namespace
}  // namespace siterep::tracker
