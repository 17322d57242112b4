// Replica::ChangedSince: the 64 KiB blocks that may differ between a recovery point and
// everything the replica received (applied cycles through the undo journal, committed
// cycles not applied yet through their segments, an interrupted apply), for reverse
// replication after an unplanned failover. The cycles are made by hand with known writes
// and discards, so the expected answer is the widened union of their ranges.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <set>

#include "applier/applier_test_util.h"
#include "applier/replica.h"
#include "common/failpoint.h"
#include "tracker/log_format.h"
#include "tracker/test_util.h"

namespace siterep::applier {
namespace {

namespace fs = std::filesystem;
using testing::Bytes;
using testing::ReadBytes;
using tracker::ByteRange;
using tracker::kSnapshotBlockSize;
using tracker::testing::Pattern;
using Ranges = std::vector<std::vector<ByteRange>>;

constexpr int64_t kMs = 1000000;
constexpr int64_t kBase = 1700000000000 * kMs;
constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kEpoch = 3;
constexpr size_t kOs = 0;
constexpr size_t kData = 1;
// Not a multiple of 64 KiB: the last range of "data" ends at its size.
constexpr uint64_t kDataSize = kMiB + 20 * kKiB;

struct Change {
  size_t disk = 0;
  bool discard = false;
  uint64_t offset = 0;
  uint64_t length = 0;
};
Change W(size_t disk, uint64_t offset, uint64_t length) { return {disk, false, offset, length}; }
Change D(size_t disk, uint64_t offset, uint64_t length) { return {disk, true, offset, length}; }

std::vector<uint64_t> Ids(const std::vector<RecoveryPoint>& points) {
  std::vector<uint64_t> ids;
  for (const RecoveryPoint& p : points) ids.push_back(p.id);
  return ids;
}

std::string Show(const Ranges& r) {
  std::string out;
  for (size_t i = 0; i < r.size(); ++i) {
    out += "disk " + std::to_string(i) + ":";
    for (const ByteRange& b : r[i]) {
      out += " [" + std::to_string(b.offset) + ", +" + std::to_string(b.length) + ")";
    }
    out += "\n";
  }
  return out;
}

class ChangedSinceTest : public ::testing::Test {
 protected:
  void SetUp() override { failpoint::DisarmAll(); }
  void TearDown() override { failpoint::DisarmAll(); }

  fs::path dir() const { return tmp_.path() / "replicas" / "vm1"; }

  ReplicaDefinition Def(int recovery_points, int64_t interval_ms) const {
    ReplicaDefinition def;
    def.vm = "vm1";
    def.primary_site = "east";
    def.epoch = kEpoch;
    def.disks = {DiskDefinition{"os", 11, 2 * kMiB}, DiskDefinition{"data", 12, kDataSize}};
    def.recovery_points = recovery_points;
    def.recovery_point_interval_ms = interval_ms;
    def.frequency_ms = 1000;
    return def;
  }

  // The images start as zeros (Create makes them sparse); cycle 0 is that state.
  void Reset(int recovery_points, int64_t interval_ms) {
    def_ = Def(recovery_points, interval_ms);
    model_.clear();
    for (const DiskDefinition& d : def_.disks) model_.emplace_back(d.size);
    snaps_.clear();
    changes_.clear();
    snaps_[0] = model_;
    next_cycle_ = 1;
    next_seq_.assign(def_.disks.size(), 1);
    next_segment_.assign(def_.disks.size(), 1);
  }

  std::unique_ptr<Replica> Make(int recovery_points, int64_t interval_ms) {
    Reset(recovery_points, interval_ms);
    return testing::CreateReplica(dir(), def_);
  }

  static int64_t CutOf(uint64_t cycle) { return kBase + static_cast<int64_t>(cycle) * kMs; }

  // The next cycle made of changes (one segment per disk, ending in its cut), received
  // and committed; applied too if apply. Returns its number.
  uint64_t Ship(Replica& r, const std::vector<Change>& changes, bool apply = true) {
    const uint64_t cycle = next_cycle_++;
    std::vector<testing::SegmentBuilder> builders;
    for (size_t i = 0; i < def_.disks.size(); ++i) {
      builders.emplace_back(def_.disks[i].disk_id, kEpoch, next_seq_[i]);
    }
    for (const Change& c : changes) {
      Bytes& image = model_[c.disk];
      if (c.discard) {
        builders[c.disk].Discard(c.offset, c.length);
        std::fill(image.begin() + c.offset, image.begin() + c.offset + c.length, std::byte{0});
      } else {
        const Bytes data = Pattern(c.length, cycle * 1000 + c.offset);
        builders[c.disk].Write(c.offset, data);
        std::copy(data.begin(), data.end(), image.begin() + c.offset);
      }
    }
    for (size_t i = 0; i < def_.disks.size(); ++i) {
      builders[i].Cut(cycle, CutOf(cycle));
      next_seq_[i] = builders[i].next_seq();
      Status s =
          testing::SendSegment(r, def_.disks[i].disk_id, next_segment_[i]++, builders[i].bytes());
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
    Status s = r.CommitCycle(CycleInfo{cycle, CutOf(cycle), CutOf(cycle) - 1});
    EXPECT_TRUE(s.ok()) << s.ToString();
    snaps_[cycle] = model_;
    changes_[cycle] = changes;
    if (apply) {
      s = r.ApplyPending();
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
    return cycle;
  }

  // The 64 KiB blocks the changes of cycles (after, through] touch, per disk, as merged
  // ranges clipped to the disk: computed from a set of block numbers.
  Ranges Expected(uint64_t after, uint64_t through) const {
    std::vector<std::set<uint64_t>> blocks(def_.disks.size());
    for (const auto& [cycle, changes] : changes_) {
      if (cycle <= after || cycle > through) continue;
      for (const Change& c : changes) {
        for (uint64_t b = c.offset / kSnapshotBlockSize;
             b * kSnapshotBlockSize < c.offset + c.length; ++b) {
          blocks[c.disk].insert(b);
        }
      }
    }
    Ranges out(def_.disks.size());
    for (size_t i = 0; i < blocks.size(); ++i) {
      for (uint64_t b : blocks[i]) {
        const uint64_t from = b * kSnapshotBlockSize;
        const uint64_t to = std::min(def_.disks[i].size, from + kSnapshotBlockSize);
        if (!out[i].empty() && out[i].back().offset + out[i].back().length == from) {
          out[i].back().length += to - from;
        } else {
          out[i].push_back(ByteRange{from, to - from});
        }
      }
    }
    return out;
  }

  static Ranges Nothing() { return Ranges(2); }

  static void ExpectChanged(const Replica& r, uint64_t point, const Ranges& want,
                            const std::string& what) {
    Result<Ranges> got = r.ChangedSince(point);
    ASSERT_TRUE(got.ok()) << what << ": " << got.status().ToString();
    EXPECT_EQ(*got, want) << what << ": since point " << point << "\ngot:\n"
                          << Show(*got) << "want:\n"
                          << Show(want);
  }

  void ExpectImages(const Replica& r, uint64_t cycle, const std::string& what) const {
    for (size_t i = 0; i < def_.disks.size(); ++i) {
      EXPECT_SAME_BYTES(ReadBytes(r.ImagePath(i)), snaps_.at(cycle)[i],
                        what + ": image " + def_.disks[i].name);
    }
  }

  fs::path SegmentFile(size_t disk, uint64_t number) const {
    char name[40];
    std::snprintf(name, sizeof(name), "%020llu.seg", static_cast<unsigned long long>(number));
    return dir() / "received" / def_.disks[disk].name / name;
  }

  testing::TempDir tmp_;
  ReplicaDefinition def_;
  std::vector<Bytes> model_;                      // the primary's disks as shipped so far
  std::map<uint64_t, std::vector<Bytes>> snaps_;  // cycle -> the disks at its cut
  std::map<uint64_t, std::vector<Change>> changes_;
  uint64_t next_cycle_ = 1;
  std::vector<uint64_t> next_seq_;
  std::vector<uint64_t> next_segment_;
};

// Four applied cycles, every one a retained point: since each point, exactly the widened
// writes and discards of the cycles after it (unaligned ranges, one across a 64 KiB line,
// one in the last, short block of a disk). Then two cycles committed but not applied (a
// discard of blocks that were never written among them): they count for every point,
// the latest too, also after a restart. MaterializePoint of an older point still works,
// and afterwards nothing differs any more.
TEST_F(ChangedSinceTest, SinceEachPointTheWidenedChangesOfTheCyclesAfterIt) {
  std::unique_ptr<Replica> r = Make(5, 0);
  ASSERT_TRUE(r);
  Ship(*r, {W(kOs, 0, 512 * kKiB), W(kData, 0, 256 * kKiB)});
  Ship(*r, {W(kOs, 100000, 5000), W(kData, kMiB + 4096, 100)});
  Ship(*r, {D(kOs, 200000, 70000), W(kOs, kMiB - 10, 20), D(kData, 0, 4096)});
  Ship(*r, {W(kData, 300 * kKiB, 1)});
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{1, 2, 3, 4}));

  const Ranges since1 = Expected(1, 4);
  ASSERT_EQ(since1[kOs],
            (std::vector<ByteRange>{
                {64 * kKiB, 64 * kKiB}, {192 * kKiB, 128 * kKiB}, {960 * kKiB, 128 * kKiB}}))
      << "the test's own expectation";
  ASSERT_EQ(since1[kData],
            (std::vector<ByteRange>{{0, 64 * kKiB}, {256 * kKiB, 64 * kKiB}, {kMiB, 20 * kKiB}}));
  ExpectChanged(*r, 1, since1, "applied");
  ExpectChanged(*r, 2, Expected(2, 4), "applied");
  ExpectChanged(*r, 3, Expected(3, 4), "applied");
  ExpectChanged(*r, 4, Nothing(), "the latest point, nothing pending");

  // Committed, not applied: a write of one whole block, a discard of never-written blocks
  // to the end of the disk, a write across a 64 KiB line.
  Ship(*r,
       {W(kOs, 1536 * kKiB, 64 * kKiB), D(kOs, 1900000, 2 * kMiB - 1900000),
        W(kData, 700 * kKiB, 3)},
       /*apply=*/false);
  Ship(*r, {W(kOs, 64 * kKiB - 1, 2)}, /*apply=*/false);
  ASSERT_EQ(r->Position().applied_cycle, 4u);
  ASSERT_GT(r->Position().pending_bytes, 0u);
  ExpectChanged(*r, 4, Expected(4, 6), "the latest point, two cycles pending");
  EXPECT_EQ(Expected(4, 6)[kOs].back(), (ByteRange{1792 * kKiB, 2 * kMiB - 1792 * kKiB}));
  ExpectChanged(*r, 1, Expected(1, 6), "applied and pending");
  ExpectChanged(*r, 3, Expected(3, 6), "applied and pending");

  r = testing::ReopenReplica(dir(), r);
  ASSERT_TRUE(r);
  ExpectChanged(*r, 1, Expected(1, 6), "after a restart");
  ExpectChanged(*r, 2, Expected(2, 6), "after a restart");
  ExpectChanged(*r, 4, Expected(4, 6), "after a restart");

  Status s = r->MaterializePoint(2);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectImages(*r, 2, "point 2 materialized");
  EXPECT_EQ(Ids(r->Points()), std::vector<uint64_t>{2});
  EXPECT_EQ(r->Position().pending_bytes, 0u);
  ExpectChanged(*r, 2, Nothing(), "the journal and the received stream are gone");
  EXPECT_EQ(r->ChangedSince(1).status().code(), ENOENT);
}

// Applied discards count only where they changed something (blocks that held data): a
// discard of zeros is a no-op on the replica. Pending, the record's whole range counts.
TEST_F(ChangedSinceTest, AnAppliedDiscardCountsOnlyTheBlocksThatHeldData) {
  std::unique_ptr<Replica> r = Make(2, 0);
  ASSERT_TRUE(r);
  Ship(*r, {W(kOs, 0, 64 * kKiB)});
  Ship(*r, {D(kOs, 0, 256 * kKiB)}, /*apply=*/false);
  ExpectChanged(*r, 1, Expected(1, 2), "pending");
  EXPECT_EQ(Expected(1, 2)[kOs], (std::vector<ByteRange>{{0, 256 * kKiB}}));
  ASSERT_TRUE(r->ApplyPending().ok());
  ExpectChanged(*r, 1, Ranges{{{0, 64 * kKiB}}, {}}, "applied");
  ExpectChanged(*r, 2, Nothing(), "latest");
}

// Points kept in the chain by a view (not retained): the blocks of cycle 2 are in point
// 1's undo file, those of cycle 3 in point 2's; since 1 counts both. Point 2 is no
// recovery point (ENOENT). Closing the view merges the files: the same answer.
TEST_F(ChangedSinceTest, EveryNewerChainPointCountsAlsoAPointOnlyAViewKeeps) {
  std::unique_ptr<Replica> r = Make(2, 3600 * 1000);
  ASSERT_TRUE(r);
  Ship(*r, {W(kOs, 0, 256 * kKiB), W(kData, 0, kDataSize)});
  Ship(*r, {W(kOs, 10 * kKiB, 100), W(kData, 500 * kKiB, 10)});
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{1, 2})) << "2 is only the latest";
  Result<std::unique_ptr<PointView>> view = r->OpenView(kLatestPoint);
  ASSERT_TRUE(view.ok()) << view.status().ToString();
  Ship(*r, {W(kOs, 70 * kKiB, 5), D(kOs, 128 * kKiB, 4096), D(kData, kMiB + 16 * kKiB, 4096)});
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{1, 3}));
  ASSERT_EQ(testing::ListDir(dir() / "undo"),
            (std::vector<std::string>{"00000000000000000001.undo", "00000000000000000002.undo",
                                      "points.json"}));
  ExpectChanged(*r, 1, Expected(1, 3), "with the view open");
  Result<Ranges> two = r->ChangedSince(2);
  EXPECT_EQ(two.status().code(), ENOENT) << "only a view keeps 2";
  EXPECT_NE(two.status().message().find("no recovery point 2"), std::string::npos)
      << two.status().ToString();
  ExpectChanged(*r, 3, Nothing(), "latest");
  view->reset();
  ExpectChanged(*r, 1, Expected(1, 3), "after the view closed");

  Status s = r->MaterializePoint(1);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectImages(*r, 1, "point 1 materialized");
}

TEST_F(ChangedSinceTest, Refusals) {
  std::unique_ptr<Replica> r = Make(2, 0);
  ASSERT_TRUE(r);
  for (uint64_t c = 1; c <= 3; ++c) Ship(*r, {W(kOs, c * 4096, 10)});
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{2, 3}));
  Result<Ranges> got = r->ChangedSince(1);
  EXPECT_EQ(got.status().code(), ENOENT) << "pruned";
  EXPECT_NE(got.status().message().find("no recovery point 1 (points: 2, 3 (latest))"),
            std::string::npos)
      << got.status().ToString();
  EXPECT_EQ(r->ChangedSince(0).status().code(), ENOENT) << "no cycle 0 point";
  EXPECT_EQ(r->ChangedSince(99).status().code(), ENOENT);
  EXPECT_EQ(r->ChangedSince(kLatestPoint).status().code(), EINVAL);

  ASSERT_TRUE(r->Start().ok());
  got = r->ChangedSince(2);
  EXPECT_EQ(got.status().code(), EBUSY);
  EXPECT_NE(got.status().message().find("Stop()"), std::string::npos) << got.status().ToString();
  r->Stop();
  ExpectChanged(*r, 2, Expected(2, 3), "stopped again");
}

// An apply cut short: the images hold part of cycle 4. Since the latest point (3): what
// cycle 4 may have written (all of it); since 2: cycles 3 and 4. Both materialize.
// Without recovery points the same answer; the latest point then cannot be materialized
// until the cycle is applied, after which nothing differs from the new latest point.
TEST_F(ChangedSinceTest, AnInterruptedApplyCountsAllTheCycleMayHaveWritten) {
  for (const uint64_t point : {3, 2}) {
    SCOPED_TRACE("point " + std::to_string(point));
    fs::remove_all(dir());
    std::unique_ptr<Replica> r = Make(3, 0);
    ASSERT_TRUE(r);
    Ship(*r, {W(kOs, 0, kMiB), W(kData, 0, 512 * kKiB)});
    Ship(*r, {W(kOs, 300 * kKiB, 4096)});
    Ship(*r, {W(kData, 5000, 5000), D(kOs, 600 * kKiB, 8192)});
    Ship(*r,
         {W(kOs, 10, 10), W(kOs, 900 * kKiB, 70 * kKiB), D(kData, 100 * kKiB, 200 * kKiB),
          W(kData, 800 * kKiB, 1), D(kOs, 1800 * kKiB, 64 * kKiB)},
         /*apply=*/false);
    ASSERT_TRUE(failpoint::Arm("applier.mid_apply=error@2*1").ok());
    ASSERT_EQ(r->ApplyPending().code(), EIO);
    ASSERT_NE(testing::FirstDiff(ReadBytes(r->ImagePath(kOs)), snaps_[3][kOs]), -1)
        << "part of cycle 4 is in the images";
    r = testing::ReopenReplica(dir(), r);
    ASSERT_TRUE(r);
    ExpectChanged(*r, 3, Expected(3, 4), "the latest point");
    ExpectChanged(*r, 2, Expected(2, 4), "an older point");
    Status s = r->MaterializePoint(point);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectImages(*r, point, "materialized");
  }

  fs::remove_all(dir());
  std::unique_ptr<Replica> r = Make(0, 0);
  ASSERT_TRUE(r);
  Ship(*r, {W(kOs, 0, kMiB)});
  Ship(*r, {W(kOs, 70 * kKiB, 100), W(kOs, 200 * kKiB, 100), W(kData, 0, 10)}, false);
  ASSERT_TRUE(failpoint::Arm("applier.mid_apply=error@1*1").ok());
  ASSERT_EQ(r->ApplyPending().code(), EIO);
  ASSERT_EQ(Ids(r->Points()), std::vector<uint64_t>{1});
  ExpectChanged(*r, 1, Expected(1, 2), "no journal: the pending cycle");
  EXPECT_EQ(r->MaterializePoint(1).code(), EBUSY);
  ASSERT_TRUE(r->ApplyPending().ok());
  ExpectChanged(*r, 2, Nothing(), "applied");
  ASSERT_TRUE(r->MaterializePoint(2).ok());
  ExpectImages(*r, 2, "point 2");
}

// A committed segment that cannot be read right (a flipped byte: the apply stops with a
// bad record; or the file is gone) cannot tell what it changes: its disk counts whole.
// The other disk keeps its exact blocks. MaterializePoint drops the stream.
TEST_F(ChangedSinceTest, ABadOrMissingPendingSegmentCountsItsDiskWhole) {
  std::unique_ptr<Replica> r = Make(2, 0);
  ASSERT_TRUE(r);
  Ship(*r, {W(kOs, 0, 128 * kKiB)});
  Ship(*r, {W(kOs, 4096, 100), W(kData, 4096, 100)}, /*apply=*/false);
  Ship(*r, {W(kData, 200 * kKiB, 100)}, /*apply=*/false);
  const fs::path os_segment = SegmentFile(kOs, 2);
  ASSERT_TRUE(fs::exists(os_segment));
  {
    // A byte of the first record's payload (the write) flips.
    std::fstream f(os_segment, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(tracker::kHeaderSize + 10);
    char c = 0;
    f.get(c);
    f.seekp(tracker::kHeaderSize + 10);
    f.put(static_cast<char>(c ^ 0x40));
    ASSERT_TRUE(f.good());
  }
  const Ranges want{{{0, 2 * kMiB}}, Expected(1, 3)[kData]};
  ExpectChanged(*r, 1, want, "a bad record");
  EXPECT_EQ(r->ApplyPending().code(), EBADMSG);
  ExpectChanged(*r, 1, want, "after the apply stopped on it");
  fs::remove(SegmentFile(kData, 3));
  ExpectChanged(*r, 1, (Ranges{{{0, 2 * kMiB}}, {{0, kDataSize}}}), "a missing segment");

  Status s = r->MaterializePoint(1);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectImages(*r, 1, "point 1");
  ExpectChanged(*r, 1, Nothing(), "after");
}

// The failover-back case: a site adopted in sync holds point 0; what it received from the
// new primary since is the answer for point 0.
TEST_F(ChangedSinceTest, AdoptedInSyncPointZero) {
  Reset(2, 0);
  fs::create_directories(dir());
  for (const DiskDefinition& d : def_.disks) {
    const fs::path image = dir() / (d.name + ".img");
    { std::ofstream touch(image); }
    fs::resize_file(image, d.size);
  }
  Result<std::unique_ptr<Replica>> adopted = Replica::Adopt(dir(), def_, kBase);
  ASSERT_TRUE(adopted.ok()) << adopted.status().ToString();
  std::unique_ptr<Replica> r = std::move(*adopted);
  ExpectChanged(*r, 0, Nothing(), "nothing received");
  Ship(*r, {W(kOs, 3 * kMiB / 2, 10), W(kData, kDataSize - 1, 1)}, /*apply=*/false);
  ExpectChanged(*r, 0, Expected(0, 1), "cycle 1 pending");
  ASSERT_TRUE(r->ApplyPending().ok());
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{0, 1}));
  ExpectChanged(*r, 0, Expected(0, 1), "cycle 1 applied");
  ExpectChanged(*r, 1, Nothing(), "latest");
  ASSERT_TRUE(r->MaterializePoint(0).ok());
  ExpectImages(*r, 0, "point 0");
}

// A staged sync writes over the latest point; its writes are in the point's undo file
// and count like an applied cycle's.
TEST_F(ChangedSinceTest, AStagedSyncsWritesCount) {
  std::unique_ptr<Replica> r = Make(2, 0);
  ASSERT_TRUE(r);
  Ship(*r, {W(kOs, 0, 64 * kKiB)});
  Ship(*r, {W(kData, 0, 64 * kKiB)});
  SyncPlan plan;
  plan.sync_id = 10;
  plan.kind = SyncKind::kResync;
  plan.epoch = kEpoch;
  for (const DiskDefinition& d : def_.disks) {
    plan.disks.push_back(SyncDiskPlan{d.disk_id, SyncMode::kCompare, 1, 1, d.size});
  }
  Result<SyncResume> resume = r->BeginSync(plan);
  ASSERT_TRUE(resume.ok()) << resume.status().ToString();
  const Bytes data = Pattern(8192, 5);
  Result<uint64_t> done = r->WriteSyncData(11, kMiB + 60 * kKiB, data, 0, kMiB + 68 * kKiB);
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  done = r->WriteSyncData(12, 0, {}, 64 * kKiB, 64 * kKiB);  // zeros over data
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  const Ranges sync{{{kMiB, 128 * kKiB}}, {{0, 64 * kKiB}}};
  ExpectChanged(*r, 2, sync, "since the sync's point");
  Ranges want = Expected(1, 2);
  want[kOs] = sync[kOs];
  ExpectChanged(*r, 1, want, "since the older point");
}

}  // namespace
}  // namespace siterep::applier
