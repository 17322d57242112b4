// Failover roles on the replica side: Adopt (a fresh replica over images already there,
// symlinked ones too, in sync or not), MaterializePoint (the images become one recovery
// point, also after an interrupted apply and after a crash at any moment of it) and
// DropState (the state goes, the images stay).
#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "applier/applier_test_util.h"
#include "applier/replica.h"
#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/log_format.h"
#include "tracker/test_util.h"

namespace siterep::applier {
namespace {

namespace fs = std::filesystem;
using testing::Bytes;
using testing::ListDir;
using testing::PrimaryVm;
using testing::ReadBytes;
using testing::ReadView;
using tracker::testing::Pattern;

constexpr int64_t kMs = 1000000;
constexpr int64_t kBase = 1700000000000 * kMs;  // cut times the tests control
constexpr uint64_t kMiB = 1 << 20;

std::vector<uint64_t> Ids(const std::vector<RecoveryPoint>& points) {
  std::vector<uint64_t> ids;
  for (const RecoveryPoint& p : points) ids.push_back(p.id);
  return ids;
}

std::string UndoName(uint64_t cycle) {
  char name[40];
  std::snprintf(name, sizeof(name), "%020llu.undo", static_cast<unsigned long long>(cycle));
  return name;
}

bool Contains(const Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

void Touch(const fs::path& path, const std::string& text = "x") { std::ofstream(path) << text; }

class RoleTest : public ::testing::Test {
 protected:
  void SetUp() override { failpoint::DisarmAll(); }
  void TearDown() override { failpoint::DisarmAll(); }

  fs::path dir() const { return tmp_.path() / "replicas" / "vm1"; }

  // A new primary VM (patterned images, brand-new change log) in tmp/<name>.
  std::unique_ptr<PrimaryVm> NewPrimary(const std::string& name) {
    fs::create_directories(tmp_.path() / name);
    return std::make_unique<PrimaryVm>(
        tmp_.path() / name, std::vector<testing::PrimaryDisk>{{"os", 2 * kMiB}, {"data", kMiB}});
  }

  // A replica in replica_dir created from a seed copy of primary_'s images; nullptr (and a
  // test failure) if that fails.
  std::unique_ptr<Replica> CreateSeeded(const fs::path& replica_dir, int recovery_points,
                                        int64_t interval_ms) {
    primary_->SeedReplica(replica_dir);
    return testing::CreateReplica(replica_dir, primary_->Definition(recovery_points, interval_ms));
  }

  // One cycle of primary_'s changes, cut at kBase + cycle ms, snapshotted, shipped to r and
  // (if apply) applied.
  uint64_t Cycle(Replica& r, bool apply = true) {
    primary_->RandomChanges(rng_, 15);
    const uint64_t cycle = primary_->Cut();
    snaps_[cycle] = primary_->Snapshot();
    Status s = primary_->Ship(r, cycle, CutOf(cycle));
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (apply) {
      s = r.ApplyPending();
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
    return cycle;
  }
  static int64_t CutOf(uint64_t cycle) { return kBase + static_cast<int64_t>(cycle) * kMs; }

  // A received segment cut short (a .part file in received/): the first 5000 bytes of a
  // write record of 8 KiB (a chunk of junk would be refused as it arrives).
  void PartialSegment(Replica& r) {
    tracker::RecordHeader h;
    h.disk_id = primary_->disk_id(0);
    h.epoch = r.Definition().epoch;
    h.seq = 1;
    h.length = 8192;
    const Bytes payload = Pattern(h.length, 77);
    Bytes chunk(tracker::kHeaderSize);
    tracker::EncodeHeader(h, payload, std::span<std::byte, tracker::kHeaderSize>(chunk));
    chunk.insert(chunk.end(), payload.begin(), payload.begin() + 5000 - tracker::kHeaderSize);
    ASSERT_TRUE(r.WriteSegment(primary_->disk_id(0), 999, 0, chunk, /*last=*/false).ok());
  }

  static std::vector<Bytes> Images(const Replica& r, size_t disks = 2) {
    std::vector<Bytes> out;
    for (size_t i = 0; i < disks; ++i) out.push_back(ReadBytes(r.ImagePath(i)));
    return out;
  }

  static void ExpectImages(const Replica& r, const std::vector<Bytes>& want,
                           const std::string& what) {
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_SAME_BYTES(ReadBytes(r.ImagePath(i)), want[i], what + ": image " + std::to_string(i));
    }
  }

  static void ExpectView(Replica& r, uint64_t id, const std::vector<Bytes>& want,
                         const std::string& what) {
    Result<std::unique_ptr<PointView>> view = r.OpenView(id);
    ASSERT_TRUE(view.ok()) << what << ": " << view.status().ToString();
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_SAME_BYTES(ReadView(**view, i), want[i],
                        what + ": view of " + std::to_string(id) + " disk " + std::to_string(i));
    }
  }

  static std::vector<std::string> UndoFiles(const fs::path& replica_dir) {
    std::vector<std::string> out;
    for (const std::string& f : ListDir(replica_dir / "undo")) {
      if (f.ends_with(".undo")) out.push_back(f);
    }
    return out;
  }

  static size_t ReceivedFiles(const fs::path& replica_dir) {
    return ListDir(replica_dir / "received" / "os").size() +
           ListDir(replica_dir / "received" / "data").size();
  }

  testing::TempDir tmp_;
  std::unique_ptr<PrimaryVm> primary_;
  std::mt19937_64 rng_{31};
  std::map<uint64_t, std::vector<Bytes>> snaps_;
};

// =======================================================================================
// Adopt

// A planned failover: the demoted site's own images (symlinked into the replica folder)
// equal the new primary's disks as of its cycle 0. The replica holds point 0 and takes
// the new primary's cycles from 1 on without a sync; the images stay symlinks, and the
// lock and state files go into the replica folder, not next to the images.
TEST_F(RoleTest, AdoptInSyncOverSymlinkedImagesHoldsPointZeroAndTakesCyclesFromOne) {
  primary_ = NewPrimary("east");
  const fs::path images = tmp_.path() / "west-images";
  primary_->SeedReplica(images);  // the demoted primary's images, equal at cycle 0
  const std::vector<Bytes> at0 = primary_->Snapshot();
  fs::create_directories(dir());
  for (const std::string name : {"os", "data"}) {
    fs::create_symlink(images / (name + ".img"), dir() / (name + ".img"));
  }
  const ReplicaDefinition def = primary_->Definition(2, 0);
  Result<std::unique_ptr<Replica>> adopted = Replica::Adopt(dir(), def, kBase);
  ASSERT_TRUE(adopted.ok()) << adopted.status().ToString();
  std::unique_ptr<Replica> r = std::move(*adopted);

  std::vector<RecoveryPoint> points = r->Points();
  ASSERT_EQ(points.size(), 1u);
  EXPECT_EQ(points[0].id, 0u);
  EXPECT_EQ(points[0].cut_unix_nanos, kBase);
  EXPECT_TRUE(points[0].latest);
  ReplicaPosition pos = r->Position();
  EXPECT_EQ(pos.epoch, def.epoch);
  EXPECT_EQ(pos.received_cycle, 0u);
  EXPECT_EQ(pos.applied_cycle, 0u);
  EXPECT_EQ(pos.applied_cut_unix_nanos, kBase);
  EXPECT_EQ(pos.pending_bytes, 0u);
  ExpectView(*r, kLatestPoint, at0, "point 0 after Adopt");
  EXPECT_EQ(r->ImagePath(0), dir() / "os.img") << "the link, not its target";

  // The new primary's brand-new log starts at cycle 1.
  snaps_[0] = at0;
  for (uint64_t c = 1; c <= 3; ++c) {
    ASSERT_EQ(Cycle(*r), c);
    if (c == 1) {
      EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{0, 1})) << "0 is a retained point";
      ExpectView(*r, 0, at0, "point 0 after cycle 1");
    }
  }
  EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{2, 3}));
  ExpectView(*r, 2, snaps_[2], "point 2");
  for (size_t i = 0; i < 2; ++i) {
    const std::string name = i == 0 ? "os.img" : "data.img";
    EXPECT_TRUE(fs::is_symlink(dir() / name)) << name << " is still a symlink";
    EXPECT_SAME_BYTES(ReadBytes(images / name), snaps_[3][i], "the symlink's target " + name);
  }
  EXPECT_EQ(ListDir(images), (std::vector<std::string>{"data.img", "os.img"}))
      << "nothing of the replica goes next to the images";
  EXPECT_EQ(ListDir(dir()), (std::vector<std::string>{"data.img", "lock", "os.img", "position.json",
                                                      "received", "replica.json", "undo"}));

  r = testing::ReopenReplica(dir(), r);
  ASSERT_TRUE(r);
  EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{2, 3}));
  ExpectView(*r, 2, snaps_[2], "point 2 after a restart");
}

// The point 0 of images adopted in sync survives a restart, and materializing it is the
// cheap case.
TEST_F(RoleTest, AdoptInSyncWithoutRecoveryPointsThenMaterializePointZero) {
  primary_ = NewPrimary("east");
  primary_->SeedReplica(dir());
  const std::vector<Bytes> at0 = primary_->Snapshot();
  Result<std::unique_ptr<Replica>> adopted =
      Replica::Adopt(dir(), primary_->Definition(0, 0), kBase + 5);
  ASSERT_TRUE(adopted.ok()) << adopted.status().ToString();
  std::unique_ptr<Replica> r = std::move(*adopted);
  r = testing::ReopenReplica(dir(), r);
  ASSERT_TRUE(r);
  ASSERT_EQ(Ids(r->Points()), std::vector<uint64_t>{0});
  EXPECT_EQ(r->Points()[0].cut_unix_nanos, kBase + 5);
  EXPECT_TRUE(UndoFiles(dir()).empty());
  ExpectView(*r, 0, at0, "point 0 after a restart");
  EXPECT_EQ(r->MaterializePoint(1).code(), ENOENT);
  Status s = r->MaterializePoint(0);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(Ids(r->Points()), std::vector<uint64_t>{0});
  ExpectImages(*r, at0, "point 0 materialized");
  EXPECT_EQ(r->Position().applied_cut_unix_nanos, kBase + 5);
}

// A site that was a replica before (points, a pending cycle, a segment cut short, a temp
// file) is adopted again, not in sync: all of it goes, the images stay as they are, there
// is no point, and a direct sync with sync_id 1 gives the first point; the segments after
// it continue from the plan.
TEST_F(RoleTest, AdoptDiscardsOldReplicaStateAndADirectSyncMakesTheFirstPoint) {
  primary_ = NewPrimary("old-primary");
  std::unique_ptr<Replica> r = CreateSeeded(dir(), 3, 0);
  ASSERT_TRUE(r);
  for (int c = 0; c < 3; ++c) Cycle(*r);
  Cycle(*r, /*apply=*/false);
  PartialSegment(*r);
  ASSERT_FALSE(UndoFiles(dir()).empty());
  ASSERT_GT(r->Position().pending_bytes, 0u);
  const std::vector<Bytes> before = Images(*r);
  r.reset();
  Touch(dir() / "position.json.tmp");

  ReplicaDefinition def = primary_->Definition(1, 0);
  def.epoch = 7;
  def.primary_site = "west";
  Result<std::unique_ptr<Replica>> adopted = Replica::Adopt(dir(), def, std::nullopt);
  ASSERT_TRUE(adopted.ok()) << adopted.status().ToString();
  r = std::move(*adopted);
  EXPECT_TRUE(r->Points().empty());
  EXPECT_EQ(r->OpenView(kLatestPoint).status().code(), ENOENT);
  EXPECT_EQ(r->OpenView(3).status().code(), ENOENT);
  const ReplicaPosition pos = r->Position();
  EXPECT_EQ(pos.epoch, 7u);
  EXPECT_EQ(pos.received_cycle, 0u);
  EXPECT_EQ(pos.applied_cycle, 0u);
  EXPECT_EQ(pos.applied_cut_unix_nanos, 0);
  EXPECT_EQ(pos.pending_bytes, 0u);
  EXPECT_EQ(r->Definition().primary_site, "west");
  EXPECT_TRUE(UndoFiles(dir()).empty());
  EXPECT_EQ(ReceivedFiles(dir()), 0u);
  EXPECT_FALSE(fs::exists(dir() / "position.json.tmp"));
  ExpectImages(*r, before, "the adopted images are untouched");

  // The new primary sends an initial copy: written directly, no point meanwhile.
  const std::vector<Bytes> src = {Pattern(2 * kMiB, 5), Pattern(kMiB, 6)};
  SyncPlan plan;
  plan.sync_id = 1;
  plan.kind = SyncKind::kInitial;
  plan.cut_unix_nanos = kBase + 1;
  plan.epoch = 7;
  for (size_t i = 0; i < 2; ++i) {
    plan.disks.push_back(
        SyncDiskPlan{def.disks[i].disk_id, SyncMode::kCopy, 500 + i, 50 + i, def.disks[i].size});
  }
  Result<SyncResume> resume = r->BeginSync(plan);
  ASSERT_TRUE(resume.ok()) << resume.status().ToString();
  EXPECT_TRUE(r->Points().empty()) << "direct: no point until it ends";
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(resume->disks[i].done_offset, 0u);
    for (uint64_t at = 0; at < src[i].size(); at += kMiB) {
      Result<uint64_t> done =
          r->WriteSyncData(def.disks[i].disk_id, at,
                           std::span<const std::byte>(src[i].data() + at, kMiB), 0, at + kMiB);
      ASSERT_TRUE(done.ok()) << done.status().ToString();
    }
  }
  ASSERT_TRUE(r->EndSync(1, 0).ok());
  EXPECT_EQ(Ids(r->Points()), std::vector<uint64_t>{1});
  ExpectImages(*r, src, "after the sync");
  ExpectView(*r, kLatestPoint, src, "point 1");

  // Cycle 2 continues the log where the plan's cut left it.
  std::vector<Bytes> want = src;
  for (size_t i = 0; i < 2; ++i) {
    const Bytes data = Pattern(9000, 40 + i);
    std::copy(data.begin(), data.end(), want[i].begin() + 4096);
    testing::SegmentBuilder b(def.disks[i].disk_id, 7, 500 + i + 1);
    b.Write(4096, data).Cut(2, kBase + 2);
    ASSERT_TRUE(testing::SendSegment(*r, def.disks[i].disk_id, 50 + i + 1, b.bytes()).ok());
  }
  ASSERT_TRUE(r->CommitCycle(CycleInfo{2, kBase + 2, 0}).ok());
  ASSERT_TRUE(r->ApplyPending().ok());
  EXPECT_EQ(r->Position().applied_cycle, 2u);
  ExpectImages(*r, want, "after cycle 2");
}

TEST_F(RoleTest, AdoptRefusalsChangeNothing) {
  primary_ = NewPrimary("east");
  std::unique_ptr<Replica> r = CreateSeeded(dir(), 2, 0);
  ASSERT_TRUE(r);
  Cycle(*r);
  const ReplicaDefinition def = primary_->Definition(2, 0);
  const auto digest = testing::TreeDigest(dir());

  Result<std::unique_ptr<Replica>> refused = Replica::Adopt(dir(), def, kBase);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), EBUSY) << "another Replica has the folder open";
  EXPECT_TRUE(Contains(refused.status(), "already open")) << refused.status().ToString();
  r.reset();

  ReplicaDefinition no_disks = def;
  no_disks.disks.clear();
  EXPECT_EQ(Replica::Adopt(dir(), no_disks, kBase).status().code(), EINVAL);
  ReplicaDefinition epoch0 = def;
  epoch0.epoch = 0;
  EXPECT_EQ(Replica::Adopt(dir(), epoch0, kBase).status().code(), EINVAL);

  ReplicaDefinition extra = def;
  extra.disks.push_back(DiskDefinition{"extra", 4242, kMiB});
  refused = Replica::Adopt(dir(), extra, kBase);
  EXPECT_EQ(refused.status().code(), ENOENT);
  EXPECT_TRUE(Contains(refused.status(), "extra.img of disk extra is missing"))
      << refused.status().ToString();
  fs::create_symlink(tmp_.path() / "nowhere.img", dir() / "extra.img");
  refused = Replica::Adopt(dir(), extra, kBase);
  EXPECT_EQ(refused.status().code(), ENOENT);
  EXPECT_TRUE(Contains(refused.status(), "a symlink to nothing")) << refused.status().ToString();
  fs::remove(dir() / "extra.img");
  fs::create_directory(dir() / "extra.img");
  refused = Replica::Adopt(dir(), extra, kBase);
  EXPECT_EQ(refused.status().code(), EINVAL);
  EXPECT_TRUE(Contains(refused.status(), "not a regular file")) << refused.status().ToString();
  fs::remove(dir() / "extra.img");

  ReplicaDefinition bigger = def;
  bigger.disks[0].size += 4096;
  refused = Replica::Adopt(dir(), bigger, kBase);
  EXPECT_EQ(refused.status().code(), EINVAL);
  EXPECT_TRUE(Contains(refused.status(), "has 2097152 bytes; disk os has 2101248 bytes"))
      << refused.status().ToString();
  EXPECT_EQ(Replica::Adopt(tmp_.path() / "nothing", def, kBase).status().code(), ENOENT);

  EXPECT_EQ(testing::TreeDigest(dir()), digest) << "a refused Adopt changes nothing";
  r = testing::ReopenReplica(dir(), r);
  ASSERT_TRUE(r);
  EXPECT_EQ(Ids(r->Points()), std::vector<uint64_t>{1});
}

// A failure or crash in the middle of Adopt: the folder holds no replica (the old state is
// not taken for the new), and Adopt again gives what an uninterrupted Adopt gives.
TEST_F(RoleTest, AnInterruptedAdoptIsNoReplicaAndAdoptAgainGivesTheSameResult) {
  GTEST_FLAG_SET(death_test_style, "fast");
  primary_ = NewPrimary("east");
  const ReplicaDefinition def = primary_->Definition(2, 0);
  // The reference: an uninterrupted Adopt of the same images.
  const fs::path reference = tmp_.path() / "reference";
  primary_->SeedReplica(reference);
  {
    Result<std::unique_ptr<Replica>> a = Replica::Adopt(reference, def, kBase);
    ASSERT_TRUE(a.ok()) << a.status().ToString();
  }
  const std::vector<std::string> specs = {
      "applier.adopt_after_remove=error", "applier.adopt_before_definition=error",
      "applier.adopt_after_remove=abort", "applier.adopt_before_definition=abort"};
  for (size_t k = 0; k < specs.size(); ++k) {
    SCOPED_TRACE(specs[k]);
    const fs::path d = tmp_.path() / ("r" + std::to_string(k));
    // An old replica with a point and a pending cycle.
    std::unique_ptr<Replica> r = CreateSeeded(d, 2, 0);
    ASSERT_TRUE(r);
    Cycle(*r);
    Cycle(*r, /*apply=*/false);
    r.reset();
    if (specs[k].ends_with("abort")) {
      EXPECT_DEATH(
          {
            (void)failpoint::Arm(specs[k]);
            (void)Replica::Adopt(d, def, kBase);
          },
          "");
    } else {
      ASSERT_TRUE(failpoint::Arm(specs[k]).ok());
      Result<std::unique_ptr<Replica>> failed = Replica::Adopt(d, def, kBase);
      failpoint::DisarmAll();
      ASSERT_FALSE(failed.ok());
      EXPECT_EQ(failed.status().code(), EIO);
    }
    EXPECT_EQ(Replica::Open(d).status().code(), ENOENT) << "no replica until Adopt ends";
    const std::vector<Bytes> images = {ReadBytes(d / "os.img"), ReadBytes(d / "data.img")};
    Result<std::unique_ptr<Replica>> again = Replica::Adopt(d, def, kBase);
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    EXPECT_EQ(ListDir(d), ListDir(reference));
    EXPECT_EQ(ListDir(d / "undo"), ListDir(reference / "undo"));
    EXPECT_EQ(ReceivedFiles(d), 0u);
    for (const char* f : {"replica.json", "position.json", "undo/points.json"}) {
      EXPECT_EQ(ReadBytes(d / f), ReadBytes(reference / f)) << f;
    }
    std::vector<RecoveryPoint> points = (*again)->Points();
    ASSERT_EQ(points.size(), 1u);
    EXPECT_EQ(points[0].id, 0u);
    EXPECT_EQ(points[0].cut_unix_nanos, kBase);
    ExpectView(**again, 0, images, "point 0");
  }
}

// =======================================================================================
// MaterializePoint

// Every cycle is a retained point (3 kept). Point 3 is materialized with cycle 6 pending
// and a segment half received: the images are what a view of 3 read before, the replica is
// at 3 with nothing else, also after a restart.
TEST_F(RoleTest, MaterializeAnOlderPointMakesTheImagesThatPoint) {
  primary_ = NewPrimary("east");
  std::unique_ptr<Replica> r = CreateSeeded(dir(), 3, 0);
  ASSERT_TRUE(r);
  for (int c = 0; c < 5; ++c) Cycle(*r);
  Cycle(*r, /*apply=*/false);
  PartialSegment(*r);
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{3, 4, 5}));
  // What the point reads as before, through a view and an export.
  std::vector<Bytes> exported;
  for (size_t i = 0; i < 2; ++i) {
    const fs::path out = tmp_.path() / ("export-" + std::to_string(i));
    ASSERT_TRUE(r->ExportPoint(3, i, out).ok());
    exported.push_back(ReadBytes(out));
    EXPECT_SAME_BYTES(exported[i], snaps_[3][i], "export of 3");
  }

  Status s = r->MaterializePoint(3);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectImages(*r, exported, "materialized point 3");
  const std::vector<RecoveryPoint> points = r->Points();
  ASSERT_EQ(points.size(), 1u);
  EXPECT_EQ(points[0].id, 3u);
  EXPECT_TRUE(points[0].latest);
  EXPECT_EQ(points[0].cut_unix_nanos, CutOf(3));
  const ReplicaPosition pos = r->Position();
  EXPECT_EQ(pos.applied_cycle, 3u);
  EXPECT_EQ(pos.received_cycle, 3u);
  EXPECT_EQ(pos.applied_cut_unix_nanos, CutOf(3));
  EXPECT_EQ(pos.pending_bytes, 0u);
  EXPECT_EQ(ReceivedFiles(dir()), 0u) << "the received stream is dropped";
  EXPECT_EQ(UndoFiles(dir()), std::vector<std::string>{UndoName(3)})
      << "3 is the one retained point again, with nothing saved yet";
  EXPECT_EQ(r->undo_bytes(), 0u);
  ExpectView(*r, kLatestPoint, exported, "view of 3 after");

  r = testing::ReopenReplica(dir(), r);
  ASSERT_TRUE(r);
  EXPECT_EQ(Ids(r->Points()), std::vector<uint64_t>{3});
  ExpectImages(*r, exported, "after a restart");
  EXPECT_EQ(r->MaterializePoint(4).code(), ENOENT) << "4 is gone";
}

TEST_F(RoleTest, MaterializeTheLatestPointWritesNothingAndDropsTheReceivedStream) {
  primary_ = NewPrimary("east");
  std::unique_ptr<Replica> r = CreateSeeded(dir(), 2, 0);
  ASSERT_TRUE(r);
  for (int c = 0; c < 3; ++c) Cycle(*r);
  Cycle(*r, /*apply=*/false);
  PartialSegment(*r);
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{2, 3}));
  // Any block written back would fail here.
  ASSERT_TRUE(failpoint::Arm("applier.materialize_mid=error").ok());
  Status s = r->MaterializePoint(3);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectImages(*r, snaps_[3], "latest point 3");
  EXPECT_EQ(Ids(r->Points()), std::vector<uint64_t>{3});
  const ReplicaPosition pos = r->Position();
  EXPECT_EQ(pos.applied_cycle, 3u);
  EXPECT_EQ(pos.received_cycle, 3u);
  EXPECT_EQ(pos.pending_bytes, 0u);
  EXPECT_EQ(ReceivedFiles(dir()), 0u);
  EXPECT_EQ(r->undo_bytes(), 0u);
  ASSERT_TRUE(r->MaterializePoint(3).ok()) << "again: nothing to do";
}

TEST_F(RoleTest, MaterializeRefusals) {
  primary_ = NewPrimary("east");
  std::unique_ptr<Replica> r = CreateSeeded(dir(), 2, 0);
  ASSERT_TRUE(r);
  for (int c = 0; c < 3; ++c) Cycle(*r);
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{2, 3}));
  const auto digest = testing::TreeDigest(dir());

  Status s = r->MaterializePoint(1);
  EXPECT_EQ(s.code(), ENOENT) << "pruned";
  EXPECT_TRUE(Contains(s, "no recovery point 1 (points: 2, 3 (latest))")) << s.ToString();
  EXPECT_EQ(r->MaterializePoint(99).code(), ENOENT);
  EXPECT_EQ(r->MaterializePoint(kLatestPoint).code(), EINVAL);

  ASSERT_TRUE(r->Start().ok());
  s = r->MaterializePoint(2);
  EXPECT_EQ(s.code(), EBUSY);
  EXPECT_TRUE(Contains(s, "Stop()")) << s.ToString();
  r->Stop();

  Result<std::unique_ptr<PointView>> view = r->OpenView(2);
  ASSERT_TRUE(view.ok());
  s = r->MaterializePoint(2);
  EXPECT_EQ(s.code(), EBUSY);
  EXPECT_TRUE(Contains(s, "views are open (of points 2)")) << s.ToString();
  view->reset();
  EXPECT_EQ(testing::TreeDigest(dir()), digest) << "a refusal changes nothing";
  EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{2, 3}));

  // A staged resync keeps 3 readable, but nothing is materialized while it runs.
  SyncPlan plan;
  plan.sync_id = 10;
  plan.kind = SyncKind::kResync;
  plan.epoch = r->Definition().epoch;
  for (const DiskDefinition& d : r->Definition().disks) {
    plan.disks.push_back(SyncDiskPlan{d.disk_id, SyncMode::kCompare, 1, 1, d.size});
  }
  ASSERT_TRUE(r->BeginSync(plan).ok());
  s = r->MaterializePoint(2);
  EXPECT_EQ(s.code(), EBUSY);
  EXPECT_TRUE(Contains(s, "sync 10 is unfinished")) << s.ToString();
}

// MaterializePoint stopped by an error after some blocks: the images are neither 5 nor 3,
// so until MaterializePoint(3) has run again nothing shows or reads a point, nothing is
// applied, received or synced, and no other point is materialized - in this process and
// after a restart. Running it again (failing once more, then not) gives point 3.
TEST_F(RoleTest, AnInterruptedMaterializationBlocksEverythingUntilItIsRunAgain) {
  primary_ = NewPrimary("east");
  std::unique_ptr<Replica> r = CreateSeeded(dir(), 3, 0);
  ASSERT_TRUE(r);
  for (int c = 0; c < 5; ++c) Cycle(*r);
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{3, 4, 5}));
  ASSERT_TRUE(failpoint::Arm("applier.materialize_mid=error@10*1").ok());
  Status s = r->MaterializePoint(3);
  ASSERT_EQ(s.code(), EIO) << s.ToString();
  EXPECT_TRUE(Contains(s, "MaterializePoint(3) again finishes it")) << s.ToString();
  EXPECT_NE(testing::FirstDiff(ReadBytes(r->ImagePath(0)), snaps_[5][0]), -1)
      << "some blocks were written back";

  auto expect_blocked = [&](Replica& replica, const std::string& what) {
    SCOPED_TRACE(what);
    EXPECT_TRUE(replica.Points().empty());
    EXPECT_EQ(replica.OpenView(kLatestPoint).status().code(), EBUSY);
    EXPECT_EQ(replica.OpenView(3).status().code(), EBUSY);
    EXPECT_EQ(replica.OpenView(5).status().code(), EBUSY);
    EXPECT_EQ(replica.ApplyPending().code(), EBUSY);
    Status other = replica.MaterializePoint(4);
    EXPECT_EQ(other.code(), EBUSY);
    EXPECT_TRUE(Contains(other, "being made point 3")) << other.ToString();
    SyncPlan plan;
    plan.sync_id = 10;
    plan.epoch = replica.Definition().epoch;
    for (const DiskDefinition& d : replica.Definition().disks) {
      plan.disks.push_back(SyncDiskPlan{d.disk_id, SyncMode::kCopy, 1, 1, d.size});
    }
    EXPECT_EQ(replica.BeginSync(plan).status().code(), EBUSY);
    const Bytes junk = Pattern(100, 1);
    EXPECT_EQ(replica.WriteSegment(primary_->disk_id(0), 999, 0, junk, false).code(), EBUSY);
    EXPECT_EQ(replica.CommitCycle(CycleInfo{6, 1, 0}).code(), EBUSY);
  };
  expect_blocked(*r, "in this process");
  r = testing::ReopenReplica(dir(), r);
  ASSERT_TRUE(r);
  expect_blocked(*r, "after a restart");

  ASSERT_TRUE(failpoint::Arm("applier.materialize_mid=error@3*1").ok());
  EXPECT_EQ(r->MaterializePoint(3).code(), EIO);
  s = r->MaterializePoint(3);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectImages(*r, snaps_[3], "point 3");
  EXPECT_EQ(Ids(r->Points()), std::vector<uint64_t>{3});
  ExpectView(*r, 3, snaps_[3], "view of 3");
  EXPECT_EQ(r->Position().applied_cycle, 3u);
}

// A real crash (abort in a forked child) at several moments of MaterializePoint: Open and
// MaterializePoint again always give the point.
TEST_F(RoleTest, ACrashAtAnyMomentOfMaterializeThenOpenAndAgainGivesThePoint) {
  GTEST_FLAG_SET(death_test_style, "fast");
  const std::vector<std::string> specs = {
      "applier.materialize_mid=abort",         "applier.materialize_mid=abort@7",
      "applier.materialize_mid=abort@60",      "applier.materialize_before_position=abort",
      "applier.materialize_before_drop=abort",
  };
  for (size_t k = 0; k < specs.size(); ++k) {
    SCOPED_TRACE(specs[k]);
    primary_ = NewPrimary("east" + std::to_string(k));
    snaps_.clear();
    const fs::path d = tmp_.path() / ("replica" + std::to_string(k));
    std::unique_ptr<Replica> r = CreateSeeded(d, 4, 0);
    ASSERT_TRUE(r);
    for (int c = 0; c < 6; ++c) Cycle(*r);
    ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{3, 4, 5, 6}));
    EXPECT_DEATH(
        {
          (void)failpoint::Arm(specs[k]);
          (void)r->MaterializePoint(4);
        },
        "");
    r = testing::ReopenReplica(d, r);
    ASSERT_TRUE(r);
    if (specs[k].starts_with("applier.materialize_before_drop")) {
      // Recorded at 4; Open dropped the newer points, the older ones still read right.
      EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{3, 4}));
      ExpectView(*r, 3, snaps_[3], "point 3 before the journal is emptied");
    } else {
      EXPECT_TRUE(r->Points().empty());
    }
    Status s = r->MaterializePoint(4);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectImages(*r, snaps_[4], "point 4");
    EXPECT_EQ(Ids(r->Points()), std::vector<uint64_t>{4});
    EXPECT_EQ(UndoFiles(d), std::vector<std::string>{UndoName(4)});
    r = testing::ReopenReplica(d, r);
    ASSERT_TRUE(r);
    ExpectView(*r, 4, snaps_[4], "point 4 after a restart");
  }
}

// An apply cut short leaves the images between the latest point and the next cycle. The
// journal holds what it overwrote: an older point and - when it is the newest chain point
// (retained) - the latest point can be materialized. Without recovery points the latest
// point is gone: refused until the interrupted cycle is applied.
TEST_F(RoleTest, MaterializeAfterAnInterruptedApply) {
  for (const uint64_t point : {4, 2}) {
    SCOPED_TRACE("point " + std::to_string(point));
    primary_ = NewPrimary("east" + std::to_string(point));
    snaps_.clear();
    const fs::path d = tmp_.path() / ("replica" + std::to_string(point));
    std::unique_ptr<Replica> r = CreateSeeded(d, 3, 0);
    ASSERT_TRUE(r);
    for (int c = 0; c < 4; ++c) Cycle(*r);
    Cycle(*r, /*apply=*/false);
    ASSERT_TRUE(failpoint::Arm("applier.mid_apply=error@3*1").ok());
    ASSERT_EQ(r->ApplyPending().code(), EIO);
    ASSERT_NE(Images(*r), snaps_[4]) << "the images hold part of cycle 5";
    r = testing::ReopenReplica(d, r);
    ASSERT_TRUE(r);
    Status s = r->MaterializePoint(point);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectImages(*r, snaps_[point], "point " + std::to_string(point));
    EXPECT_EQ(Ids(r->Points()), std::vector<uint64_t>{point});
  }

  primary_ = NewPrimary("east0");
  snaps_.clear();
  const fs::path d = tmp_.path() / "replica0";
  std::unique_ptr<Replica> r = CreateSeeded(d, 0, 0);
  ASSERT_TRUE(r);
  for (int c = 0; c < 3; ++c) Cycle(*r);
  Cycle(*r, /*apply=*/false);
  ASSERT_TRUE(failpoint::Arm("applier.mid_apply=error@3*1").ok());
  ASSERT_EQ(r->ApplyPending().code(), EIO);
  const auto digest = testing::TreeDigest(d);
  Status s = r->MaterializePoint(3);
  EXPECT_EQ(s.code(), EBUSY);
  EXPECT_TRUE(Contains(s, "apply the pending cycles first")) << s.ToString();
  EXPECT_EQ(testing::TreeDigest(d), digest);
  ASSERT_TRUE(r->ApplyPending().ok());
  s = r->MaterializePoint(4);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectImages(*r, snaps_[4], "point 4");
}

// =======================================================================================
// DropState

TEST_F(RoleTest, DropStateRemovesTheReplicaButKeepsTheImagesAndTheirSymlinks) {
  primary_ = NewPrimary("east");
  const fs::path images = tmp_.path() / "west-images";
  primary_->SeedReplica(images);
  fs::create_directories(dir());
  for (const std::string name : {"os", "data"}) {
    fs::create_symlink(images / (name + ".img"), dir() / (name + ".img"));
  }
  Result<std::unique_ptr<Replica>> adopted =
      Replica::Adopt(dir(), primary_->Definition(2, 0), kBase);
  ASSERT_TRUE(adopted.ok()) << adopted.status().ToString();
  std::unique_ptr<Replica> r = std::move(*adopted);
  for (int c = 0; c < 2; ++c) Cycle(*r);
  Cycle(*r, /*apply=*/false);
  PartialSegment(*r);
  Touch(dir() / "replica.json.tmp");

  const auto digest = testing::TreeDigest(dir());
  Status s = Replica::DropState(dir());
  EXPECT_EQ(s.code(), EBUSY) << "the replica is open";
  EXPECT_EQ(testing::TreeDigest(dir()), digest);
  const std::vector<Bytes> kept = Images(*r);
  r.reset();

  s = Replica::DropState(dir());
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(ListDir(dir()), (std::vector<std::string>{"data.img", "os.img"}));
  EXPECT_TRUE(fs::is_symlink(dir() / "os.img"));
  EXPECT_TRUE(fs::is_symlink(dir() / "data.img"));
  EXPECT_EQ(ListDir(images), (std::vector<std::string>{"data.img", "os.img"}));
  EXPECT_SAME_BYTES(ReadBytes(images / "os.img"), kept[0], "os image");
  EXPECT_SAME_BYTES(ReadBytes(images / "data.img"), kept[1], "data image");
  EXPECT_EQ(Replica::Open(dir()).status().code(), ENOENT);
  EXPECT_TRUE(Replica::DropState(dir()).ok()) << "idempotent";
  EXPECT_EQ(ListDir(dir()), (std::vector<std::string>{"data.img", "os.img"}));
  EXPECT_TRUE(Replica::DropState(tmp_.path() / "nothing").ok());
}

// replica.json goes first: DropState stopped right after it leaves no replica, and
// DropState again finishes.
TEST_F(RoleTest, AnInterruptedDropStateLeavesNoReplicaAndRunsAgain) {
  primary_ = NewPrimary("east");
  std::unique_ptr<Replica> r = CreateSeeded(dir(), 2, 0);
  ASSERT_TRUE(r);
  Cycle(*r);
  const std::vector<Bytes> kept = Images(*r);
  r.reset();
  ASSERT_TRUE(failpoint::Arm("applier.drop_state_mid=error*1").ok());
  EXPECT_EQ(Replica::DropState(dir()).code(), EIO);
  EXPECT_FALSE(fs::exists(dir() / "replica.json"));
  EXPECT_TRUE(fs::exists(dir() / "position.json")) << "the rest was not removed yet";
  EXPECT_EQ(Replica::Open(dir()).status().code(), ENOENT);
  ASSERT_TRUE(Replica::DropState(dir()).ok());
  EXPECT_EQ(ListDir(dir()), (std::vector<std::string>{"data.img", "os.img"}));
  EXPECT_SAME_BYTES(ReadBytes(dir() / "os.img"), kept[0], "os image");
  EXPECT_SAME_BYTES(ReadBytes(dir() / "data.img"), kept[1], "data image");
}

}  // namespace
}  // namespace siterep::applier
