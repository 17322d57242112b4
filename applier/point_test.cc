// Recovery points and point-in-time views: retained points read as the primary was at
// their cut, pruning, pins, export, and reads while the applier goes on.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "applier/applier_test_util.h"
#include "applier/replica.h"
#include "tracker/test_util.h"

namespace siterep::applier {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::Bytes;
using testing::PrimaryVm;
using testing::ReadBytes;
using testing::ReadView;

constexpr int64_t kMs = 1000000;
constexpr int64_t kBase = 1700000000000 * kMs;  // cut times the tests control

class PointTest : public ::testing::Test {
 protected:
  fs::path dir() const { return tmp_.path() / "replicas" / "vm1"; }

  std::unique_ptr<Replica> Setup(int recovery_points, int64_t interval_ms) {
    primary_ = std::make_unique<PrimaryVm>(
        tmp_.path(), std::vector<testing::PrimaryDisk>{{"os", 2 << 20}, {"data", 1 << 20}});
    primary_->SeedReplica(dir());
    Result<std::unique_ptr<Replica>> r =
        Replica::Create(dir(), primary_->Definition(recovery_points, interval_ms));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(*r) : nullptr;
  }

  // One cycle of changes, cut at kBase + cut_ms, snapshotted, shipped and applied.
  uint64_t Cycle(Replica& r, int64_t cut_ms, bool apply = true) {
    primary_->RandomChanges(rng_, 15);
    const uint64_t cycle = primary_->Cut();
    snaps_[cycle] = primary_->Snapshot();
    Status s = primary_->Ship(r, cycle, kBase + cut_ms * kMs);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (apply) {
      s = r.ApplyPending();
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
    return cycle;
  }

  void ExpectView(const PointView& view, const std::string& what) {
    const std::vector<Bytes>& snap = snaps_.at(view.point().id);
    ASSERT_EQ(view.disk_count(), snap.size());
    for (size_t d = 0; d < snap.size(); ++d) {
      EXPECT_SAME_BYTES(
          ReadView(view, d), snap[d],
          what + ": point " + std::to_string(view.point().id) + " disk " + view.disk_name(d));
    }
  }

  void ExpectAllPoints(Replica& r, const std::string& what) {
    for (const RecoveryPoint& p : r.Points()) {
      Result<std::unique_ptr<PointView>> view = r.OpenView(p.id);
      ASSERT_TRUE(view.ok()) << what << ": " << view.status().ToString();
      ExpectView(**view, what);
    }
  }

  static std::vector<uint64_t> Ids(const std::vector<RecoveryPoint>& points) {
    std::vector<uint64_t> ids;
    for (const RecoveryPoint& p : points) ids.push_back(p.id);
    return ids;
  }

  std::vector<std::string> UndoFiles() const {
    std::vector<std::string> out;
    for (const std::string& f : testing::ListDir(dir() / "undo")) {
      if (f.ends_with(".undo")) out.push_back(f);
    }
    return out;
  }

  testing::TempDir tmp_;
  std::unique_ptr<PrimaryVm> primary_;
  std::mt19937_64 rng_{11};
  std::map<uint64_t, std::vector<Bytes>> snaps_;
};

std::string UndoName(uint64_t cycle) {
  char name[40];
  std::snprintf(name, sizeof(name), "%020llu.undo", static_cast<unsigned long long>(cycle));
  return name;
}

TEST_F(PointTest, RetainedPointsReadAsThePrimaryAtTheirCutAndTheOldestArePruned) {
  auto replica = Setup(3, 1000);
  ASSERT_TRUE(replica);
  // Cuts 400 ms apart, points at least 1000 ms apart: cycles 1, 4, 7, ... are retained.
  std::vector<uint64_t> retained;
  for (int c = 1; c <= 20 && !HasFailure(); ++c) {
    ASSERT_EQ(Cycle(*replica, c * 400), static_cast<uint64_t>(c));
    if ((c - 1) % 3 == 0) retained.push_back(c);
    if (retained.size() > 3) retained.erase(retained.begin());
    std::vector<uint64_t> expected = retained;
    if (expected.back() != static_cast<uint64_t>(c)) expected.push_back(c);
    const std::vector<RecoveryPoint> points = replica->Points();
    EXPECT_EQ(Ids(points), expected) << "after cycle " << c;
    EXPECT_TRUE(points.back().latest);
    EXPECT_EQ(points.back().cut_unix_nanos, kBase + c * 400 * kMs);
    ExpectAllPoints(*replica, "after cycle " + std::to_string(c));
  }
  EXPECT_EQ(Ids(replica->Points()), (std::vector<uint64_t>{13, 16, 19, 20}));
  EXPECT_EQ(UndoFiles(), (std::vector<std::string>{UndoName(13), UndoName(16), UndoName(19)}))
      << "the undo files of pruned points are deleted";
  EXPECT_GT(replica->undo_bytes(), 0u);

  // Export writes each disk as of the point.
  for (uint64_t id : {13, 16, 19, 20}) {
    for (size_t d = 0; d < 2; ++d) {
      const fs::path out = tmp_.path() / ("export-" + std::to_string(id) + "-" + std::to_string(d));
      ASSERT_TRUE(replica->ExportPoint(id, d, out).ok());
      EXPECT_SAME_BYTES(ReadBytes(out), snaps_[id][d], "export of point " + std::to_string(id));
    }
  }
  // Points and their reads survive a restart.
  replica.reset();
  Result<std::unique_ptr<Replica>> reopened = Replica::Open(dir());
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  EXPECT_EQ(Ids((*reopened)->Points()), (std::vector<uint64_t>{13, 16, 19, 20}));
  ExpectAllPoints(**reopened, "after a restart");
}

TEST_F(PointTest, APointIsTakenWhenTheIntervalHasPassedExactly) {
  auto replica = Setup(5, 1000);
  ASSERT_TRUE(replica);
  Cycle(*replica, 0);
  Cycle(*replica, 999);   // too early
  Cycle(*replica, 1000);  // exactly the interval after cycle 1
  Cycle(*replica, 1500);
  EXPECT_EQ(Ids(replica->Points()), (std::vector<uint64_t>{1, 3, 4}));
  EXPECT_FALSE(replica->Points()[1].latest);
  EXPECT_EQ(replica->Points()[1].cut_unix_nanos, kBase + 1000 * kMs);
}

TEST_F(PointTest, WithoutRecoveryPointsOnlyTheLatestExistsAndNoUndoIsWritten) {
  auto replica = Setup(0, 0);
  ASSERT_TRUE(replica);
  for (int c = 1; c <= 5; ++c) Cycle(*replica, c);
  const std::vector<RecoveryPoint> points = replica->Points();
  ASSERT_EQ(points.size(), 1u);
  EXPECT_EQ(points[0].id, 5u);
  EXPECT_TRUE(points[0].latest);
  EXPECT_TRUE(UndoFiles().empty());
  EXPECT_EQ(replica->undo_bytes(), 0u);
  ExpectAllPoints(*replica, "latest");
}

TEST_F(PointTest, AViewOfTheLatestPointKeepsReadingItWhileNewerCyclesApply) {
  auto replica = Setup(0, 0);
  ASSERT_TRUE(replica);
  for (int c = 1; c <= 3; ++c) Cycle(*replica, c);
  Result<std::unique_ptr<PointView>> view = replica->OpenView(kLatestPoint);
  ASSERT_TRUE(view.ok()) << view.status().ToString();
  EXPECT_EQ((*view)->point().id, 3u);
  for (int c = 4; c <= 7; ++c) Cycle(*replica, c);
  ExpectView(**view, "view of 3 after cycle 7");
  EXPECT_EQ(Ids(replica->Points()), std::vector<uint64_t>{7}) << "3 is no recovery point";
  EXPECT_EQ(replica->OpenView(3).status().code(), ENOENT) << "only the open view has it";
  EXPECT_EQ(UndoFiles(), std::vector<std::string>{UndoName(3)});
  view->reset();
  EXPECT_TRUE(UndoFiles().empty()) << "the view's undo goes with it";
  EXPECT_EQ(replica->undo_bytes(), 0u);
}

TEST_F(PointTest, AViewPinsARetainedPointThatIsPruned) {
  auto replica = Setup(2, 0);
  ASSERT_TRUE(replica);
  for (int c = 1; c <= 3; ++c) Cycle(*replica, c);
  EXPECT_EQ(Ids(replica->Points()), (std::vector<uint64_t>{2, 3}));
  Result<std::unique_ptr<PointView>> view = replica->OpenView(2);
  ASSERT_TRUE(view.ok());
  // A second view of the latest point, between the pinned one and newer points.
  Result<std::unique_ptr<PointView>> latest = replica->OpenView(kLatestPoint);
  ASSERT_TRUE(latest.ok());
  for (int c = 4; c <= 8; ++c) Cycle(*replica, c);
  EXPECT_EQ(Ids(replica->Points()), (std::vector<uint64_t>{7, 8}));
  ExpectView(**view, "pruned but pinned");
  ExpectView(**latest, "pinned latest");
  EXPECT_EQ(UndoFiles().size(), 4u);  // 2, 3 (pinned), 7, 8
  // Dropping the older pin first merges nothing (it is the oldest); dropping 3 then.
  view->reset();
  ExpectView(**latest, "pinned latest after the older view went");
  latest->reset();
  EXPECT_EQ(UndoFiles(), (std::vector<std::string>{UndoName(7), UndoName(8)}));
  ExpectAllPoints(*replica, "after the views");
}

TEST_F(PointTest, DroppingAPinBetweenPointsKeepsTheOlderPointRight) {
  auto replica = Setup(3, 2000);
  ASSERT_TRUE(replica);
  Cycle(*replica, 0);  // retained
  Cycle(*replica, 500);
  Result<std::unique_ptr<PointView>> pin = replica->OpenView(kLatestPoint);  // 2, not retained
  ASSERT_TRUE(pin.ok());
  for (int c = 3; c <= 6; ++c) Cycle(*replica, (c - 1) * 500);  // cycle 5 at 2000: retained
  EXPECT_EQ(Ids(replica->Points()), (std::vector<uint64_t>{1, 5, 6}));
  pin->reset();  // point 2's blocks move into point 1's undo file
  EXPECT_EQ(UndoFiles(), (std::vector<std::string>{UndoName(1), UndoName(5)}));
  ExpectAllPoints(*replica, "after the merge");
  replica.reset();
  Result<std::unique_ptr<Replica>> reopened = Replica::Open(dir());
  ASSERT_TRUE(reopened.ok());
  ExpectAllPoints(**reopened, "after the merge and a restart");
}

TEST_F(PointTest, AMissingPointIsENOENTAndOutOfRangeReadsAreRefused) {
  auto replica = Setup(2, 0);
  ASSERT_TRUE(replica);
  Cycle(*replica, 1);
  Result<std::unique_ptr<PointView>> none = replica->OpenView(99);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), ENOENT);
  EXPECT_NE(none.status().message().find("no recovery point 99"), std::string::npos)
      << none.status().ToString();
  EXPECT_EQ(replica->ExportPoint(99, 0, tmp_.path() / "x").code(), ENOENT);
  Result<std::unique_ptr<PointView>> view = replica->OpenView(1);
  ASSERT_TRUE(view.ok());
  Bytes buf(100);
  EXPECT_EQ((*view)->Read(0, (2 << 20) - 50, buf).code(), EINVAL);
  EXPECT_EQ((*view)->Read(5, 0, buf).code(), EINVAL);
  EXPECT_TRUE((*view)->Read(0, (2 << 20) - 100, buf).ok());
}

TEST_F(PointTest, UnalignedReadsThroughAViewMatch) {
  auto replica = Setup(2, 0);
  ASSERT_TRUE(replica);
  Cycle(*replica, 1);
  Result<std::unique_ptr<PointView>> view = replica->OpenView(1);
  ASSERT_TRUE(view.ok());
  for (int c = 2; c <= 3; ++c) Cycle(*replica, c);
  std::mt19937_64 rng(5);
  for (int i = 0; i < 200; ++i) {
    const uint64_t length = 1 + rng() % 20000;
    const uint64_t offset = rng() % ((1 << 20) - length);
    Bytes buf(length);
    ASSERT_TRUE((*view)->Read(1, offset, buf).ok());
    const Bytes& snap = snaps_[1][1];
    ASSERT_TRUE(std::equal(buf.begin(), buf.end(), snap.begin() + offset))
        << offset << "+" << length;
  }
}

// Views opened and read while the applier thread applies: each sees its point whole. Only
// cycle 1 is retained, so most views pin a latest point that the applier then moves past
// (and closing them merges that point's undo into point 1's).
TEST_F(PointTest, ViewsOpenedWhileTheApplierRunsSeeWholeCycles) {
  auto replica = Setup(1, 1000);
  ASSERT_TRUE(replica);
  for (int c = 1; c <= 2; ++c) Cycle(*replica, c);
  // Snapshots for all cycles first, so the reader can check any point it gets.
  std::vector<uint64_t> cycles;
  for (int c = 3; c <= 14; ++c) {
    primary_->RandomChanges(rng_, 15);
    cycles.push_back(primary_->Cut());
    snaps_[cycles.back()] = primary_->Snapshot();
  }
  std::atomic<bool> done{false};
  std::atomic<int> views{0};
  std::thread reader([&] {
    while (!done) {
      Result<std::unique_ptr<PointView>> view = replica->OpenView(kLatestPoint);
      if (!view.ok()) {
        ADD_FAILURE() << view.status().ToString();
        return;
      }
      const std::vector<Bytes>& snap = snaps_.at((*view)->point().id);
      for (size_t d = 0; d < 2; ++d) {
        if (testing::FirstDiff(ReadView(**view, d), snap[d]) != -1) {
          ADD_FAILURE() << "view of point " << (*view)->point().id << " disk " << d;
          return;
        }
      }
      ++views;
    }
  });
  ASSERT_TRUE(replica->Start().ok());
  for (uint64_t c : cycles) ASSERT_TRUE(primary_->Ship(*replica, c, kBase + c * kMs).ok());
  for (int i = 0; i < 1000 && replica->Position().applied_cycle < cycles.back(); ++i) {
    std::this_thread::sleep_for(10ms);
  }
  std::this_thread::sleep_for(50ms);
  done = true;
  reader.join();
  replica->Stop();
  EXPECT_EQ(replica->Position().applied_cycle, cycles.back());
  EXPECT_GT(views.load(), 1);
  ExpectAllPoints(*replica, "at the end");
}

}  // namespace
}  // namespace siterep::applier
