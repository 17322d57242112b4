// The applier: cycles from a real tracker applied to the replica images, the checks before
// applying, and crash safety (failpoints, a real abort, restarts).
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "applier/applier_test_util.h"
#include "applier/replica.h"
#include "applier/segment_check.h"
#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/log_reader.h"
#include "tracker/test_util.h"

namespace siterep::applier {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::Bytes;
using testing::PrimaryVm;
using testing::ReadBytes;
using testing::ReadView;

// Flips a payload byte of the first write record that is not the segment's first record;
// returns that record's seq (0 if there is none).
uint64_t FlipPayloadByte(const fs::path& path) {
  Result<tracker::SegmentReader> reader = tracker::SegmentReader::Open(path);
  EXPECT_TRUE(reader.ok());
  if (!reader.ok()) return 0;
  tracker::ParsedRecord rec;
  for (int i = 0;; ++i) {
    const uint64_t at = reader->offset();
    Result<tracker::ReadStatus> st = reader->Next(&rec);
    if (!st.ok() || *st != tracker::ReadStatus::kRecord) return 0;
    if (i == 0 || rec.header.kind != tracker::RecordKind::kWrite) continue;
    UniqueFd fd = tracker::testing::OpenRw(path);
    std::byte b;
    const off_t where = static_cast<off_t>(at + tracker::kHeaderSize + rec.header.length / 2);
    EXPECT_EQ(::pread(fd.get(), &b, 1, where), 1);
    b ^= std::byte{0x10};
    EXPECT_EQ(::pwrite(fd.get(), &b, 1, where), 1);
    return rec.header.seq;
  }
}

class ApplyTest : public ::testing::Test {
 protected:
  void SetUp() override { failpoint::DisarmAll(); }
  void TearDown() override { failpoint::DisarmAll(); }

  fs::path dir() const { return tmp_.path() / "replicas" / "vm1"; }

  PrimaryVm& MakePrimary(std::vector<testing::PrimaryDisk> disks = {{"os", 4 << 20},
                                                                    {"data", (2 << 20) + 1000}}) {
    primary_ = std::make_unique<PrimaryVm>(tmp_.path(), std::move(disks));
    primary_->SeedReplica(dir());
    return *primary_;
  }

  std::unique_ptr<Replica> Create(const ReplicaDefinition& def) {
    return testing::CreateReplica(dir(), def);
  }
  std::unique_ptr<Replica> Reopen(std::unique_ptr<Replica>& old) {
    return testing::ReopenReplica(dir(), old);
  }

  std::vector<Bytes> ReplicaImages(const Replica& r) const {
    std::vector<Bytes> out;
    for (size_t i = 0; i < r.Definition().disks.size(); ++i)
      out.push_back(ReadBytes(r.ImagePath(i)));
    return out;
  }

  void ExpectImages(const Replica& r, const std::vector<Bytes>& expected, const std::string& what) {
    const std::vector<Bytes> images = ReplicaImages(r);
    ASSERT_EQ(images.size(), expected.size());
    for (size_t i = 0; i < images.size(); ++i) {
      EXPECT_SAME_BYTES(images[i], expected[i], what + ", disk " + std::to_string(i));
    }
  }

  // Every point the replica lists reads as the primary did at that cycle's cut.
  void ExpectPoints(Replica& r, const std::map<uint64_t, std::vector<Bytes>>& snapshots,
                    const std::string& what) {
    for (const RecoveryPoint& p : r.Points()) {
      Result<std::unique_ptr<PointView>> view = r.OpenView(p.id);
      ASSERT_TRUE(view.ok()) << what << ": " << view.status().ToString();
      ASSERT_TRUE(snapshots.count(p.id)) << p.id;
      for (size_t d = 0; d < (*view)->disk_count(); ++d) {
        EXPECT_SAME_BYTES(ReadView(**view, d), snapshots.at(p.id)[d],
                          what + ": point " + std::to_string(p.id) + " disk " + std::to_string(d));
      }
    }
  }

  // Changes, a cut, a snapshot of the primary at the cut, and the cycle shipped.
  uint64_t Cycle(Replica& r, std::mt19937_64& rng, std::map<uint64_t, std::vector<Bytes>>* snaps,
                 int changes = 20) {
    primary_->RandomChanges(rng, changes);
    const uint64_t cycle = primary_->Cut();
    if (snaps != nullptr) (*snaps)[cycle] = primary_->Snapshot();
    Status s = primary_->Ship(r, cycle);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return cycle;
  }

  testing::TempDir tmp_;
  std::unique_ptr<PrimaryVm> primary_;
};

// A cycle holds each changed 4 KiB block of a disk once: a disk written all over between
// two cuts (a long pause) gives a segment as large as the disk plus a record header per
// block, which the replica must accept; the old fixed 1 GiB limit refused it forever.
TEST(SegmentLimitTest, ADiskWrittenAllOverFitsInOneSegment) {
  EXPECT_EQ(MaxSegmentBytes(64 << 20), uint64_t{1} << 30);  // small disks: the old limit
  const uint64_t disk = uint64_t{4} << 30;
  const uint64_t every_block = disk + (disk / 4096) * tracker::kHeaderSize;
  const uint64_t with_cut = every_block + tracker::kHeaderSize + tracker::kCutPayloadSize;
  EXPECT_GE(MaxSegmentBytes(disk), with_cut);
  EXPECT_LT(MaxSegmentBytes(disk), with_cut + 4096);
}

TEST_F(ApplyTest, ManyCyclesOfRandomChangesMatchThePrimaryAfterEachCycle) {
  PrimaryVm& primary = MakePrimary();
  auto replica = Create(primary.Definition());
  ASSERT_TRUE(replica);
  std::mt19937_64 rng(1);
  for (uint64_t c = 1; c <= 30 && !HasFailure(); ++c) {
    primary.RandomChanges(rng, 20);
    ASSERT_EQ(primary.Cut(), c);
    // Small chunks sometimes, as a slow link would deliver them.
    ASSERT_TRUE(primary.Ship(*replica, c, std::nullopt, c % 3 == 0 ? 4096 : 64 << 10).ok());
    ReplicaPosition pos = replica->Position();
    EXPECT_EQ(pos.received_cycle, c);
    EXPECT_EQ(pos.applied_cycle, c - 1);
    EXPECT_GT(pos.pending_bytes, 0u);
    ASSERT_TRUE(replica->ApplyPending().ok());
    pos = replica->Position();
    EXPECT_EQ(pos.applied_cycle, c);
    EXPECT_GT(pos.applied_cut_unix_nanos, 0);
    EXPECT_EQ(pos.pending_bytes, 0u);
    EXPECT_EQ(pos.apply_error, "");
    ExpectImages(*replica, primary.Snapshot(), "after cycle " + std::to_string(c));
  }
  EXPECT_TRUE(testing::ListDir(dir() / "received" / "os").empty()) << "applied segments go";
  EXPECT_TRUE(testing::ListDir(dir() / "received" / "data").empty());
  EXPECT_EQ(testing::ListDir(dir() / "undo"), std::vector<std::string>{}) << "no points, no undo";
}

TEST_F(ApplyTest, TheApplierThreadAppliesCyclesAsTheyAreCommitted) {
  PrimaryVm& primary = MakePrimary();
  auto replica = Create(primary.Definition());
  ASSERT_TRUE(replica);
  ASSERT_TRUE(replica->Start().ok());
  ASSERT_TRUE(replica->Start().ok());  // idempotent
  std::mt19937_64 rng(2);
  uint64_t last = 0;
  for (int i = 0; i < 12; ++i) last = Cycle(*replica, rng, nullptr);
  for (int i = 0; i < 1000 && replica->Position().applied_cycle < last; ++i)
    std::this_thread::sleep_for(10ms);
  EXPECT_EQ(replica->Position().applied_cycle, last);
  replica->Stop();
  replica->Stop();
  ExpectImages(*replica, primary.Snapshot(), "after the thread applied");
}

TEST_F(ApplyTest, CommittedCyclesSurviveARestartAndUncommittedSegmentsAreDropped) {
  PrimaryVm& primary = MakePrimary();
  auto replica = Create(primary.Definition());
  ASSERT_TRUE(replica);
  std::mt19937_64 rng(3);
  for (int i = 0; i < 3; ++i) Cycle(*replica, rng, nullptr);
  // Cycle 4 arrives whole but is not committed before the restart.
  primary.RandomChanges(rng, 10);
  ASSERT_EQ(primary.Cut(), 4u);
  for (const tracker::SealedSegment& s : primary.Sealed(4)) {
    ASSERT_TRUE(testing::SendSegment(*replica, s.disk_id, s.number, primary.SegmentBytes(s)).ok());
  }
  replica = Reopen(replica);
  ASSERT_TRUE(replica);
  ReplicaPosition pos = replica->Position();
  EXPECT_EQ(pos.received_cycle, 3u);
  EXPECT_EQ(pos.applied_cycle, 0u);
  EXPECT_GT(pos.pending_bytes, 0u);
  EXPECT_EQ(testing::ListDir(dir() / "received" / "os").size(), 3u) << "cycle 4's segment is gone";
  // The primary sends cycle 4 again on the next connection.
  ASSERT_TRUE(primary.Ship(*replica, 4).ok());
  ASSERT_TRUE(replica->ApplyPending().ok());
  EXPECT_EQ(replica->Position().applied_cycle, 4u);
  ExpectImages(*replica, primary.Snapshot(), "after the restart");
}

TEST_F(ApplyTest, ACorruptedReceivedSegmentStopsTheApplyAndChangesNothing) {
  PrimaryVm& primary = MakePrimary();
  auto replica = Create(primary.Definition(0, 0));
  ASSERT_TRUE(replica);
  std::mt19937_64 rng(4);
  std::map<uint64_t, std::vector<Bytes>> snaps;
  Cycle(*replica, rng, &snaps);
  ASSERT_TRUE(replica->ApplyPending().ok());
  const uint64_t c2 = Cycle(*replica, rng, &snaps, 30);
  // A byte flips in the second disk's segment on the replica's disk after reception: the
  // first disk's segment is fine, yet nothing of the cycle may reach any image.
  std::vector<std::string> files = testing::ListDir(dir() / "received" / "data");
  ASSERT_EQ(files.size(), 1u);
  const uint64_t flipped_seq = FlipPayloadByte(dir() / "received" / "data" / files[0]);
  ASSERT_NE(flipped_seq, 0u);
  const std::vector<Bytes> before = ReplicaImages(*replica);
  const std::vector<RecoveryPoint> points_before = replica->Points();
  Status s = replica->ApplyPending();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EBADMSG) << s.ToString();
  const ReplicaPosition pos = replica->Position();
  EXPECT_EQ(pos.applied_cycle, 1u);
  EXPECT_NE(pos.apply_error.find("disk data"), std::string::npos) << pos.apply_error;
  EXPECT_NE(pos.apply_error.find("segment " + std::to_string(std::stoull(files[0]))),
            std::string::npos)
      << pos.apply_error;
  EXPECT_NE(pos.apply_error.find("record after seq " + std::to_string(flipped_seq - 1)),
            std::string::npos)
      << pos.apply_error;
  EXPECT_NE(pos.apply_error.find("CRC"), std::string::npos) << pos.apply_error;
  const std::vector<Bytes> after = ReplicaImages(*replica);
  for (size_t d = 0; d < before.size(); ++d)
    EXPECT_SAME_BYTES(after[d], before[d], "disk unchanged");
  ASSERT_EQ(replica->Points().size(), points_before.size());
  EXPECT_EQ(replica->Points().back().id, 1u);
  // The latest point stays readable (what a failover to it needs).
  ExpectPoints(*replica, snaps, "after the refused cycle");

  // The error is kept across a restart, and the apply stays stopped.
  replica = Reopen(replica);
  ASSERT_TRUE(replica);
  EXPECT_EQ(replica->Position().apply_error, pos.apply_error);
  EXPECT_EQ(replica->ApplyPending().code(), EBADMSG);
  // Clearing it tries again (and fails again: the data is still bad).
  ASSERT_TRUE(replica->ClearApplyError().ok());
  EXPECT_EQ(replica->Position().apply_error, "");
  EXPECT_EQ(replica->ApplyPending().code(), EBADMSG);
  EXPECT_EQ(replica->Position().applied_cycle, 1u);
  EXPECT_EQ(c2, 2u);
}

// A record that passes its CRC but breaks the rules (a file edited on the replica, or a
// bug): the applier checks bounds, epoch and disk id again.
TEST_F(ApplyTest, ARewrittenSegmentWithAValidCrcButBadRangeIsRefusedAtApply) {
  PrimaryVm& primary = MakePrimary({{"os", 1 << 20}});
  auto replica = Create(primary.Definition());
  ASSERT_TRUE(replica);
  std::mt19937_64 rng(5);
  Cycle(*replica, rng, nullptr, 5);
  const std::vector<std::string> files = testing::ListDir(dir() / "received" / "os");
  ASSERT_EQ(files.size(), 1u);
  const fs::path path = dir() / "received" / "os" / files[0];
  // Same seq range and cut, one write moved past the end of the disk.
  std::vector<tracker::testing::Rec> recs;
  {
    Result<tracker::SegmentReader> reader = tracker::SegmentReader::Open(path);
    ASSERT_TRUE(reader.ok());
    tracker::ParsedRecord rec;
    while (*reader->Next(&rec) == tracker::ReadStatus::kRecord) {
      recs.push_back({rec.header, Bytes(rec.payload.begin(), rec.payload.end()), 0});
    }
  }
  ASSERT_GE(recs.size(), 2u);
  Bytes rewritten;
  for (size_t i = 0; i < recs.size(); ++i) {
    tracker::RecordHeader h = recs[i].header;
    if (i == 0) h.offset = (1 << 20) - 1, h.kind = tracker::RecordKind::kDiscard, h.length = 2;
    const Bytes rec = tracker::testing::EncodeRecord(h, h.kind == tracker::RecordKind::kDiscard
                                                            ? std::span<const std::byte>()
                                                            : recs[i].payload);
    rewritten.insert(rewritten.end(), rec.begin(), rec.end());
  }
  ASSERT_TRUE(
      WriteFileAtomic(
          path, std::string_view(reinterpret_cast<const char*>(rewritten.data()), rewritten.size()))
          .ok());
  const Bytes before = ReadBytes(replica->ImagePath(0));
  Status s = replica->ApplyPending();
  EXPECT_EQ(s.code(), EBADMSG) << s.ToString();
  EXPECT_NE(s.message().find("beyond the end of the disk"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("seq " + std::to_string(recs[0].header.seq)), std::string::npos);
  EXPECT_SAME_BYTES(ReadBytes(replica->ImagePath(0)), before, "image unchanged");
  EXPECT_EQ(replica->Position().applied_cycle, 0u);
}

// An error half-way through writing a cycle (as a crash would leave it), then the replica
// object goes without any cleanup and is opened again: the re-apply must give exactly the
// cycle, and the points must still read right - the undo journal must not save the blocks
// the first attempt already overwrote (that would capture new data as old).
TEST_F(ApplyTest, AnApplyInterruptedMidCycleIsRedoneExactlyAfterReopen) {
  PrimaryVm& primary = MakePrimary();
  auto replica = Create(primary.Definition(3, 0));
  ASSERT_TRUE(replica);
  std::mt19937_64 rng(6);
  std::map<uint64_t, std::vector<Bytes>> snaps;
  for (int i = 0; i < 5; ++i) {
    Cycle(*replica, rng, &snaps);
    ASSERT_TRUE(replica->ApplyPending().ok());
  }
  const uint64_t c = Cycle(*replica, rng, &snaps, 40);
  ASSERT_TRUE(failpoint::Arm("applier.mid_apply=error@5*1").ok());
  Status s = replica->ApplyPending();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("applier.mid_apply"), std::string::npos) << s.ToString();
  EXPECT_NE(replica->Position().apply_error, "") << "a retryable error is shown too";
  // Half a cycle in the images: neither the old nor the new point.
  const std::vector<Bytes> half = ReplicaImages(*replica);
  EXPECT_TRUE(testing::FirstDiff(half[0], snaps[c][0]) != -1 ||
              testing::FirstDiff(half[1], snaps[c][1]) != -1);
  EXPECT_NE(testing::FirstDiff(half[0], snaps[c - 1][0]), -1);
  // Every point, the latest (c - 1) too, still reads right: the undo file of the newest
  // point holds every block of the cycle that was overwritten.
  ExpectPoints(*replica, snaps, "with half a cycle in the images");

  replica = Reopen(replica);
  ASSERT_TRUE(replica);
  ExpectPoints(*replica, snaps, "after the restart, before the re-apply");
  ASSERT_TRUE(replica->ApplyPending().ok());
  EXPECT_EQ(replica->Position().applied_cycle, c);
  ExpectImages(*replica, snaps[c], "re-applied cycle");
  ExpectPoints(*replica, snaps, "after the re-apply");
  // And it goes on normally.
  for (int i = 0; i < 3; ++i) {
    Cycle(*replica, rng, &snaps);
    ASSERT_TRUE(replica->ApplyPending().ok());
  }
  ExpectImages(*replica, primary.Snapshot(), "three cycles later");
  ExpectPoints(*replica, snaps, "three cycles later");
}

// Without recovery points no undo covers the latest point while a cycle is half written:
// it cannot be viewed until the cycle is applied, also after a restart.
TEST_F(ApplyTest, WithoutPointsTheLatestCannotBeViewedWhileTheImagesArePartial) {
  PrimaryVm& primary = MakePrimary();
  auto replica = Create(primary.Definition(0, 0));
  ASSERT_TRUE(replica);
  std::mt19937_64 rng(10);
  std::map<uint64_t, std::vector<Bytes>> snaps;
  Cycle(*replica, rng, &snaps);
  ASSERT_TRUE(replica->ApplyPending().ok());
  const uint64_t c = Cycle(*replica, rng, &snaps, 30);
  ASSERT_TRUE(failpoint::Arm("applier.mid_apply=error@3*1").ok());
  EXPECT_FALSE(replica->ApplyPending().ok());
  Result<std::unique_ptr<PointView>> view = replica->OpenView(kLatestPoint);
  EXPECT_EQ(view.status().code(), EBUSY) << view.status().ToString();
  EXPECT_EQ(replica->Points().size(), 1u) << "the applied cycle is still the latest point";
  replica = Reopen(replica);
  ASSERT_TRUE(replica);
  EXPECT_EQ(replica->OpenView(kLatestPoint).status().code(), EBUSY) << "still partial";
  ASSERT_TRUE(replica->ApplyPending().ok());
  view = replica->OpenView(kLatestPoint);
  ASSERT_TRUE(view.ok()) << view.status().ToString();
  EXPECT_EQ((*view)->point().id, c);
  EXPECT_SAME_BYTES(ReadView(**view, 0), snaps[c][0], "latest");
}

// Every failpoint of the apply: an error there, then a restart, re-apply, more cycles.
class ApplyFailpointTest : public ApplyTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(ApplyFailpointTest, AnErrorAtTheFailpointThenARestartEndsAtTheSamePoints) {
  PrimaryVm& primary = MakePrimary();
  auto replica = Create(primary.Definition(2, 0));
  ASSERT_TRUE(replica);
  std::mt19937_64 rng(7);
  std::map<uint64_t, std::vector<Bytes>> snaps;
  for (int i = 0; i < 3; ++i) {
    Cycle(*replica, rng, &snaps);
    ASSERT_TRUE(replica->ApplyPending().ok());
  }
  Cycle(*replica, rng, &snaps, 30);
  ASSERT_TRUE(failpoint::Arm(GetParam()).ok());
  EXPECT_FALSE(replica->ApplyPending().ok());
  failpoint::DisarmAll();
  replica = Reopen(replica);
  ASSERT_TRUE(replica);
  ASSERT_TRUE(replica->ApplyPending().ok());
  EXPECT_EQ(replica->Position().applied_cycle, 4u);
  ExpectImages(*replica, snaps[4], "cycle 4");
  ExpectPoints(*replica, snaps, "cycle 4");
  for (int i = 0; i < 2; ++i) {
    Cycle(*replica, rng, &snaps);
    ASSERT_TRUE(replica->ApplyPending().ok());
  }
  ExpectImages(*replica, snaps[6], "cycle 6");
  ExpectPoints(*replica, snaps, "cycle 6");
  std::vector<uint64_t> ids;
  for (const RecoveryPoint& p : replica->Points()) ids.push_back(p.id);
  EXPECT_EQ(ids, (std::vector<uint64_t>{5, 6}));
  EXPECT_TRUE(testing::ListDir(dir() / "received" / "os").empty());
}

INSTANTIATE_TEST_SUITE_P(
    Points, ApplyFailpointTest,
    ::testing::Values("applier.before_apply=error*1", "applier.after_undo=error*1",
                      "applier.mid_apply=error*1", "applier.mid_apply=error@7*1",
                      "applier.before_position=error*1", "applier.before_point=error*1",
                      "applier.before_delete=error*1"));

// A real crash: the apply aborts in a forked child (its writes stay in the files), then
// the parent opens the replica again.
TEST_F(ApplyTest, AnAbortMidApplyIsRecoveredByReopening) {
  GTEST_FLAG_SET(death_test_style, "fast");
  PrimaryVm& primary = MakePrimary();
  auto replica = Create(primary.Definition(2, 0));
  ASSERT_TRUE(replica);
  std::mt19937_64 rng(8);
  std::map<uint64_t, std::vector<Bytes>> snaps;
  for (int i = 0; i < 3; ++i) {
    Cycle(*replica, rng, &snaps);
    ASSERT_TRUE(replica->ApplyPending().ok());
  }
  const uint64_t c = Cycle(*replica, rng, &snaps, 30);
  EXPECT_DEATH(
      {
        (void)failpoint::Arm("applier.mid_apply=abort@4");
        (void)replica->ApplyPending();
      },
      "");
  EXPECT_NE(testing::FirstDiff(ReplicaImages(*replica)[0], snaps[c][0]), -1)
      << "the child wrote part of the cycle";
  replica = Reopen(replica);
  ASSERT_TRUE(replica);
  ASSERT_TRUE(replica->ApplyPending().ok());
  ExpectImages(*replica, snaps[c], "after the crash");
  ExpectPoints(*replica, snaps, "after the crash");
}

// The undo file's last append torn by a crash (before the images were written): the
// torn records are dropped at open and saved again by the re-apply.
TEST_F(ApplyTest, ATornUndoTailIsCutAndTheBlocksSavedAgain) {
  PrimaryVm& primary = MakePrimary();
  auto replica = Create(primary.Definition(3, 0));
  ASSERT_TRUE(replica);
  std::mt19937_64 rng(9);
  std::map<uint64_t, std::vector<Bytes>> snaps;
  for (int i = 0; i < 3; ++i) {
    Cycle(*replica, rng, &snaps);
    ASSERT_TRUE(replica->ApplyPending().ok());
  }
  Cycle(*replica, rng, &snaps, 30);
  ASSERT_TRUE(failpoint::Arm("applier.after_undo=error*1").ok());
  EXPECT_FALSE(replica->ApplyPending().ok());
  replica.reset();
  char name[40];
  std::snprintf(name, sizeof(name), "%020d.undo", 3);
  const fs::path undo = dir() / "undo" / name;
  const uint64_t size = fs::file_size(undo);
  ASSERT_GT(size, 3 * (kUndoHeaderSize + kUndoBlockSize)) << "cycle 4 saved blocks into point 3";
  fs::resize_file(undo, size - 1000);
  tracker::testing::AppendBytes(undo, tracker::testing::Pattern(77, 1));
  Result<std::unique_ptr<Replica>> r = Replica::Open(dir());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  replica = std::move(*r);
  EXPECT_LT(fs::file_size(undo), size - 1000) << "the torn tail is cut";
  ASSERT_TRUE(replica->ApplyPending().ok());
  ExpectImages(*replica, snaps[4], "cycle 4");
  ExpectPoints(*replica, snaps, "cycle 4");
  EXPECT_EQ(replica->Points().size(), 3u);
}

}  // namespace
}  // namespace siterep::applier
