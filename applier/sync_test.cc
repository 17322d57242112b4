// Syncs on the replica side: a direct initial copy, resuming after a restart, a new sync
// replacing an unfinished one, block hashes, a staged resync that keeps the latest point
// readable (also across a restart and a real crash), and the refusals.
#include <gtest/gtest.h>
#include <sys/statvfs.h>

#include <chrono>
#include <random>
#include <thread>

#include "applier/applier_test_util.h"
#include "applier/replica.h"
#include "common/block_hash.h"
#include "common/failpoint.h"
#include "tracker/test_util.h"

namespace siterep::applier {
namespace {

namespace fs = std::filesystem;
using testing::Bytes;
using testing::ReadBytes;
using testing::ReadView;
using testing::SegmentBuilder;
using testing::SendSegment;
using tracker::testing::Pattern;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;
constexpr int64_t kSec = 1000000000;
constexpr int64_t kBase = 1700000000 * kSec;  // cut times the tests control
constexpr uint64_t kEpoch = 5;

ReplicaDefinition Def(uint64_t os_size, uint64_t data_size, int recovery_points = 0,
                      int64_t interval_ms = 0) {
  ReplicaDefinition def;
  def.vm = "vm1";
  def.primary_site = "east";
  def.epoch = kEpoch;
  def.disks = {{"os", tracker::DiskIdFor("vm1", "os"), os_size},
               {"data", tracker::DiskIdFor("vm1", "data"), data_size}};
  def.recovery_points = recovery_points;
  def.recovery_point_interval_ms = interval_ms;
  return def;
}

// A copy-mode plan of every disk; the primary's log stands at seq 1000 * (disk + 1) + id,
// segment 100 * (disk + 1) + id, so each plan has its own continuity fields.
SyncPlan Plan(const ReplicaDefinition& def, uint64_t sync_id, SyncKind kind = SyncKind::kInitial) {
  SyncPlan plan;
  plan.sync_id = sync_id;
  plan.kind = kind;
  plan.cut_unix_nanos = kBase + static_cast<int64_t>(sync_id) * kSec;
  plan.epoch = def.epoch;
  for (size_t i = 0; i < def.disks.size(); ++i) {
    plan.disks.push_back(SyncDiskPlan{def.disks[i].disk_id, SyncMode::kCopy,
                                      1000 * (i + 1) + sync_id, 100 * (i + 1) + sync_id,
                                      def.disks[i].size});
  }
  return plan;
}

// Per 64 KiB block: zeros, random data, random data in part of it, or a few bytes.
Bytes RandomDisk(std::mt19937_64& rng, uint64_t size) {
  Bytes out(size);
  for (uint64_t at = 0; at < size; at += kSyncBlockSize) {
    const uint64_t n = std::min<uint64_t>(kSyncBlockSize, size - at);
    uint64_t from = 0;
    uint64_t len = 0;
    switch (rng() % 4) {
      case 0:
        break;
      case 1:
        len = n;
        break;
      case 2:
        from = (rng() % 16) * 4 * kKiB % n;
        len = std::min<uint64_t>(n - from, (1 + rng() % 8) * 4 * kKiB);
        break;
      default:
        from = rng() % n;
        len = std::min<uint64_t>(n - from, 1 + rng() % 100);
        break;
    }
    if (len == 0) continue;
    const Bytes p = Pattern(len, rng());
    std::copy(p.begin(), p.end(), out.begin() + static_cast<ptrdiff_t>(at + from));
  }
  return out;
}

// Sends src[from, to) the way a copy-mode primary does: runs of all-zero 64 KiB blocks as
// one zero extent, other blocks as data of up to 1 MiB a call, done_to at each call's end.
// Returns the durable done offset of the last call (0 if none was made).
Result<uint64_t> Copy(SegmentSink& sink, uint32_t disk_id, const Bytes& src, uint64_t from,
                      uint64_t to) {
  auto zero = [&](uint64_t a, uint64_t b) {
    return IsAllZero(std::span<const std::byte>(src.data() + a, b - a));
  };
  uint64_t durable = 0;
  for (uint64_t at = from; at < to;) {
    uint64_t end = std::min(at + kSyncBlockSize, to);
    const bool zeros = zero(at, end);
    while (end < to) {
      const uint64_t next = std::min(end + kSyncBlockSize, to);
      if (zero(end, next) != zeros || (!zeros && next - at > kMiB)) break;
      end = next;
    }
    Result<uint64_t> r =
        zeros ? sink.WriteSyncData(disk_id, at, {}, end - at, end)
              : sink.WriteSyncData(disk_id, at,
                                   std::span<const std::byte>(src.data() + at, end - at), 0, end);
    if (!r.ok()) return r.status();
    durable = *r;
    at = end;
  }
  return durable;
}

uint64_t NonZeroBytes(const Bytes& src) {
  // What Copy sends as data: every 64 KiB block that is not all zeros.
  uint64_t n = 0;
  for (uint64_t at = 0; at < src.size(); at += kSyncBlockSize) {
    const uint64_t len = std::min<uint64_t>(kSyncBlockSize, src.size() - at);
    if (!IsAllZero(std::span<const std::byte>(src.data() + at, len))) n += len;
  }
  return n;
}

std::string UndoName(uint64_t cycle) {
  char name[40];
  std::snprintf(name, sizeof(name), "%020llu.undo", static_cast<unsigned long long>(cycle));
  return name;
}

std::vector<uint64_t> Ids(const std::vector<RecoveryPoint>& points) {
  std::vector<uint64_t> ids;
  for (const RecoveryPoint& p : points) ids.push_back(p.id);
  return ids;
}

// A primary made by hand: each Ship sends one segment per disk (its changes, then the cut
// of the cycle), commits the cycle and applies the same changes to `content`.
struct Change {
  size_t disk = 0;
  uint64_t offset = 0;
  Bytes data;            // a write, or
  uint64_t discard = 0;  // a discard of this many bytes
};

class HandPrimary {
 public:
  explicit HandPrimary(const ReplicaDefinition& def) : def_(def) {
    for (const DiskDefinition& d : def.disks) content.emplace_back(d.size);
    next_seq.assign(def.disks.size(), 1);
    next_segment.assign(def.disks.size(), 1);
  }
  // Continues the primary's log where plan's cut left it.
  void ContinueAfter(const SyncPlan& plan) {
    for (size_t i = 0; i < plan.disks.size(); ++i) {
      next_seq[i] = plan.disks[i].last_seq + 1;
      next_segment[i] = plan.disks[i].last_segment + 1;
    }
  }
  Status Ship(SegmentSink& sink, uint64_t cycle, int64_t cut, const std::vector<Change>& changes) {
    for (size_t i = 0; i < def_.disks.size(); ++i) {
      SegmentBuilder b(def_.disks[i].disk_id, def_.epoch, next_seq[i]);
      for (const Change& c : changes) {
        if (c.disk != i) continue;
        if (c.discard != 0) {
          b.Discard(c.offset, c.discard);
          std::fill_n(content[i].begin() + static_cast<ptrdiff_t>(c.offset), c.discard,
                      std::byte{0});
        } else {
          b.Write(c.offset, c.data);
          std::copy(c.data.begin(), c.data.end(),
                    content[i].begin() + static_cast<ptrdiff_t>(c.offset));
        }
      }
      b.Cut(cycle, cut);
      SR_RETURN_IF_ERROR(SendSegment(sink, def_.disks[i].disk_id, next_segment[i], b.bytes()));
      next_seq[i] = b.next_seq();
      ++next_segment[i];
    }
    return sink.CommitCycle(CycleInfo{cycle, cut, 0});
  }

  std::vector<Bytes> content;
  std::vector<uint64_t> next_seq;
  std::vector<uint64_t> next_segment;

 private:
  ReplicaDefinition def_;
};

class SyncTest : public ::testing::Test {
 protected:
  void SetUp() override { failpoint::DisarmAll(); }
  void TearDown() override { failpoint::DisarmAll(); }

  fs::path dir() const { return tmp_.path() / "replicas" / "vm1"; }

  std::unique_ptr<Replica> Create(const ReplicaDefinition& def) {
    return testing::CreateReplica(dir(), def);
  }
  std::unique_ptr<Replica> Reopen(std::unique_ptr<Replica>& old) {
    return testing::ReopenReplica(dir(), old);
  }
  // Creates in *r a replica whose os disk is a sparse file twice the free space (*free) of
  // the file system it is on. False when that file system cannot hold such a file.
  bool CreateLargerThanFree(std::unique_ptr<Replica>* r, uint64_t* free) {
    fs::create_directories(dir());
    struct statvfs vfs {};
    EXPECT_EQ(::statvfs(dir().c_str(), &vfs), 0);
    *free = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    Result<std::unique_ptr<Replica>> created =
        Replica::Create(dir(), Def((2 * *free / kMiB + 1) * kMiB, kMiB));
    if (!created.ok() && created.status().code() == EFBIG) return false;
    EXPECT_TRUE(created.ok()) << created.status().ToString();
    if (created.ok()) *r = std::move(*created);
    return true;
  }

  static void ExpectImages(const Replica& r, const std::vector<Bytes>& want,
                           const std::string& what) {
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_SAME_BYTES(ReadBytes(r.ImagePath(i)), want[i], what + ": image " + std::to_string(i));
    }
  }

  static void ExpectPoint(Replica& r, uint64_t id, const std::vector<Bytes>& want,
                          const std::string& what) {
    Result<std::unique_ptr<PointView>> view = r.OpenView(id);
    ASSERT_TRUE(view.ok()) << what << ": " << view.status().ToString();
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_SAME_BYTES(ReadView(**view, i), want[i],
                        what + ": point " + std::to_string(id) + " disk " + std::to_string(i));
    }
  }

  std::vector<std::string> UndoFiles() const {
    std::vector<std::string> out;
    for (const std::string& f : testing::ListDir(dir() / "undo")) {
      if (f.ends_with(".undo")) out.push_back(f);
    }
    return out;
  }

  testing::TempDir tmp_;
  std::mt19937_64 rng_{21};
};

// ---------------------------------------------------------------------------------------

TEST_F(SyncTest, AnInitialSyncCopiesTheDisksAndTheSegmentsContinueFromItsCut) {
  const ReplicaDefinition def = Def(3 * kMiB + 12345, 2 * kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  const std::vector<Bytes> src = {RandomDisk(rng_, def.disks[0].size),
                                  RandomDisk(rng_, def.disks[1].size)};
  const SyncPlan plan = Plan(def, 40);
  Result<SyncResume> resume = r->BeginSync(plan);
  ASSERT_TRUE(resume.ok()) << resume.status().ToString();
  ASSERT_EQ(resume->disks.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(resume->disks[i].disk_id, def.disks[i].disk_id);
    EXPECT_EQ(resume->disks[i].done_offset, 0u);
    EXPECT_EQ(resume->disks[i].written_until, 0u);
  }
  // Direct: no point at all while it runs.
  EXPECT_TRUE(r->Points().empty());
  EXPECT_EQ(r->OpenView(kLatestPoint).status().code(), ENOENT);
  SyncStatus st = r->Sync();
  EXPECT_TRUE(st.active);
  EXPECT_EQ(st.sync_id, 40u);
  EXPECT_EQ(st.kind, SyncKind::kInitial);
  EXPECT_EQ(st.bytes_total, def.disks[0].size + def.disks[1].size);
  EXPECT_EQ(st.bytes_done, 0u);

  for (size_t i = 0; i < 2; ++i) {
    Result<uint64_t> durable = Copy(*r, def.disks[i].disk_id, src[i], 0, src[i].size());
    ASSERT_TRUE(durable.ok()) << durable.status().ToString();
    EXPECT_EQ(*durable, def.disks[i].size) << "a disk's end is recorded at once";
  }
  st = r->Sync();
  EXPECT_EQ(st.bytes_done, st.bytes_total);
  EXPECT_EQ(st.bytes_written, NonZeroBytes(src[0]) + NonZeroBytes(src[1]));
  EXPECT_EQ(r->Position().applied_cycle, 0u) << "not a point before EndSync";

  ASSERT_TRUE(r->EndSync(40, kBase + 41 * kSec).ok());
  ExpectImages(*r, src, "after the sync");
  ReplicaPosition pos = r->Position();
  EXPECT_EQ(pos.applied_cycle, 40u);
  EXPECT_EQ(pos.received_cycle, 40u);
  EXPECT_EQ(pos.applied_cut_unix_nanos, kBase + 41 * kSec) << "EndSync's cut wins";
  EXPECT_EQ(pos.apply_error, "");
  EXPECT_FALSE(r->Sync().active);
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{40}));
  EXPECT_TRUE(r->Points()[0].latest);
  ExpectPoint(*r, kLatestPoint, src, "latest after the sync");
  EXPECT_TRUE(r->EndSync(40, kBase + 41 * kSec).ok()) << "idempotent";
  EXPECT_EQ(r->EndSync(41, 0).code(), EINVAL) << "no such sync";

  // The next cycle's segments must continue the plan's log exactly.
  r = Reopen(r);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->Position().applied_cycle, 40u);
  HandPrimary primary(def);
  primary.content = src;
  primary.ContinueAfter(plan);
  {
    SegmentBuilder gap(def.disks[0].disk_id, kEpoch, plan.disks[0].last_seq + 2);
    gap.Write(0, Pattern(4096, 1)).Cut(41);
    Status s = SendSegment(*r, def.disks[0].disk_id, plan.disks[0].last_segment + 1, gap.bytes());
    EXPECT_FALSE(s.ok()) << "a seq gap after the sync's cut";
    SegmentBuilder old(def.disks[0].disk_id, kEpoch, plan.disks[0].last_seq + 1);
    old.Write(0, Pattern(4096, 1)).Cut(41);
    s = SendSegment(*r, def.disks[0].disk_id, plan.disks[0].last_segment, old.bytes());
    EXPECT_FALSE(s.ok()) << "a segment number the sync covered";
  }
  const Bytes change = Pattern(5000, 2);
  Status s =
      primary.Ship(*r, 41, kBase + 42 * kSec, {{0, 70000, change}, {1, 2 * kMiB - 5000, change}});
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_TRUE(r->ApplyPending().ok());
  EXPECT_EQ(r->Position().applied_cycle, 41u);
  ExpectImages(*r, primary.content, "cycle 41 on top of the sync");
  EXPECT_TRUE(r->EndSync(40, 0).ok()) << "the last sync that ended, cycles later";
  EXPECT_EQ(r->Position().applied_cycle, 41u);
  EXPECT_EQ(r->BeginSync(plan).status().code(), EINVAL) << "older than the applied cycle";
}

TEST_F(SyncTest, ASyncSurvivesARestartAndResumesFromItsDurableOffsets) {
  // os: data, then 78 MiB of zeros (one extent: more than 64 MiB of progress), then data.
  const ReplicaDefinition def = Def(80 * kMiB, kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  std::vector<Bytes> src = {Bytes(def.disks[0].size), RandomDisk(rng_, def.disks[1].size)};
  const Bytes head = RandomDisk(rng_, kMiB);
  const Bytes tail = Pattern(kMiB, 3);
  std::copy(head.begin(), head.end(), src[0].begin());
  std::copy(tail.begin(), tail.end(), src[0].end() - static_cast<ptrdiff_t>(kMiB));
  const SyncPlan plan = Plan(def, 50);
  ASSERT_TRUE(r->BeginSync(plan).ok());

  Result<uint64_t> os_durable = Copy(*r, def.disks[0].disk_id, src[0], 0, 79 * kMiB + 512 * kKiB);
  ASSERT_TRUE(os_durable.ok()) << os_durable.status().ToString();
  EXPECT_GE(*os_durable, 79 * kMiB) << "64 MiB of progress is recorded";
  EXPECT_LT(*os_durable, def.disks[0].size);
  Result<uint64_t> data_durable = Copy(*r, def.disks[1].disk_id, src[1], 0, 512 * kKiB);
  ASSERT_TRUE(data_durable.ok()) << data_durable.status().ToString();
  EXPECT_LE(*data_durable, 512 * kKiB);
  const uint64_t durable[2] = {*os_durable, *data_durable};

  r = Reopen(r);
  ASSERT_TRUE(r);
  SyncStatus st = r->Sync();
  EXPECT_TRUE(st.active) << "the sync survives the restart";
  EXPECT_EQ(st.sync_id, 50u);
  EXPECT_EQ(st.bytes_done, durable[0] + durable[1]);
  EXPECT_TRUE(r->Points().empty());
  EXPECT_EQ(r->Position().applied_cycle, 0u);
  {
    SegmentBuilder b(def.disks[0].disk_id, kEpoch, 1);
    b.Write(0, Pattern(4096, 1)).Cut(51);
    EXPECT_EQ(SendSegment(*r, def.disks[0].disk_id, 1000, b.bytes()).code(), EBUSY)
        << "no segment while a sync is unfinished";
    EXPECT_EQ(r->CommitCycle(CycleInfo{51, kBase, 0}).code(), EBUSY);
  }

  Result<SyncResume> resume = r->BeginSync(plan);
  ASSERT_TRUE(resume.ok()) << resume.status().ToString();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(resume->disks[i].done_offset, durable[i]) << "disk " << i;
    EXPECT_EQ(resume->disks[i].written_until, 0u) << "no older sync wrote anything";
  }
  for (size_t i = 0; i < 2; ++i) {
    Result<uint64_t> d = Copy(*r, def.disks[i].disk_id, src[i], durable[i], src[i].size());
    ASSERT_TRUE(d.ok()) << d.status().ToString();
  }
  ASSERT_TRUE(r->EndSync(50, 0).ok());
  EXPECT_EQ(r->Position().applied_cut_unix_nanos, plan.cut_unix_nanos) << "the plan's cut";
  ExpectImages(*r, src, "after the resumed sync");
  r = Reopen(r);
  ASSERT_TRUE(r);
  EXPECT_FALSE(r->Sync().active);
  EXPECT_EQ(r->Position().applied_cycle, 50u);
  ExpectPoint(*r, 50, src, "after a restart");
}

TEST_F(SyncTest, ProgressIsRecordedAfterASecondEvenIfSmall) {
  const ReplicaDefinition def = Def(kMiB, kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  ASSERT_TRUE(r->BeginSync(Plan(def, 3)).ok());
  const uint32_t os = def.disks[0].disk_id;
  Result<uint64_t> d = r->WriteSyncData(os, 0, Pattern(4096, 1), 0, 4096);
  ASSERT_TRUE(d.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  d = r->WriteSyncData(os, 4096, Pattern(4096, 2), 0, 8192);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(*d, 8192u) << "a second has passed since BeginSync recorded the sync";
  EXPECT_EQ(r->Sync().bytes_done, 8192u);
  d = r->WriteSyncData(os, 8192, Pattern(4096, 3), 0, 12288);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(*d, 8192u) << "4 KiB right after: not yet recorded";
  r = Reopen(r);
  ASSERT_TRUE(r);
  Result<SyncResume> resume = r->BeginSync(Plan(def, 3));
  ASSERT_TRUE(resume.ok());
  EXPECT_EQ(resume->disks[0].done_offset, 8192u);
}

TEST_F(SyncTest, ANewSyncIdStartsOverAndReportsWhereTheOldSyncWrote) {
  const ReplicaDefinition def = Def(2 * kMiB, 2 * kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  const SyncPlan old_plan = Plan(def, 60);
  ASSERT_TRUE(r->BeginSync(old_plan).ok());
  const Bytes junk = Pattern(kMiB, 4);
  Result<uint64_t> d = r->WriteSyncData(def.disks[0].disk_id, 0, junk, 0, kMiB);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  // The data disk: only holes reported done, nothing written.
  d = r->WriteSyncData(def.disks[1].disk_id, 0, {}, 256 * kKiB, 256 * kKiB);
  ASSERT_TRUE(d.ok()) << d.status().ToString();

  const SyncPlan plan = Plan(def, 61);
  Result<SyncResume> resume = r->BeginSync(plan);
  ASSERT_TRUE(resume.ok()) << resume.status().ToString();
  EXPECT_EQ(resume->disks[0].done_offset, 0u) << "another sync: from the start";
  EXPECT_EQ(resume->disks[1].done_offset, 0u);
  EXPECT_GE(resume->disks[0].written_until, kMiB) << "the old sync wrote below 1 MiB";
  EXPECT_LE(resume->disks[0].written_until, def.disks[0].size);
  EXPECT_LE(resume->disks[1].written_until, 256 * kKiB) << "nothing written there";
  EXPECT_EQ(r->Sync().sync_id, 61u);
  EXPECT_EQ(r->EndSync(60, 0).code(), EINVAL) << "the old sync is gone";

  // Replaced again after a restart: what the first sync wrote is still reported.
  r = Reopen(r);
  ASSERT_TRUE(r);
  const SyncPlan newest = Plan(def, 62);
  resume = r->BeginSync(newest);
  ASSERT_TRUE(resume.ok()) << resume.status().ToString();
  EXPECT_GE(resume->disks[0].written_until, kMiB);

  const std::vector<Bytes> src = {RandomDisk(rng_, 2 * kMiB), Bytes(2 * kMiB)};
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(Copy(*r, def.disks[i].disk_id, src[i], 0, src[i].size()).ok());
  }
  ASSERT_TRUE(r->EndSync(62, 0).ok());
  ExpectImages(*r, src, "after the third sync");
  // The log continues from the plan of sync 62, not 60's.
  SegmentBuilder b(def.disks[0].disk_id, kEpoch, newest.disks[0].last_seq + 1);
  b.Write(0, Pattern(100, 5)).Cut(63);
  Status s = SendSegment(*r, def.disks[0].disk_id, newest.disks[0].last_segment + 1, b.bytes());
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST_F(SyncTest, HashesAreBlockHashesOfTheImage) {
  const ReplicaDefinition def = Def(kMiB + 5000, kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  const uint32_t os = def.disks[0].disk_id;
  EXPECT_EQ(r->SyncHashes(os, 0, 1).status().code(), EINVAL) << "no sync in progress";
  ASSERT_TRUE(r->BeginSync(Plan(def, 7)).ok());
  Result<std::vector<uint64_t>> hashes = r->SyncHashes(os, 0, 2);
  ASSERT_TRUE(hashes.ok()) << hashes.status().ToString();
  const Bytes zeros(kSyncBlockSize);
  EXPECT_EQ(*hashes, (std::vector<uint64_t>{BlockHash(zeros), BlockHash(zeros)}));

  const Bytes src = RandomDisk(rng_, def.disks[0].size);
  ASSERT_TRUE(Copy(*r, os, src, 0, src.size()).ok());
  auto expected = [&](uint64_t from_block, uint64_t blocks) {
    std::vector<uint64_t> out;
    for (uint64_t b = from_block; b < from_block + blocks; ++b) {
      const uint64_t at = b * kSyncBlockSize;
      const uint64_t n = std::min<uint64_t>(kSyncBlockSize, src.size() - at);
      out.push_back(BlockHash(std::span<const std::byte>(src.data() + at, n)));
    }
    return out;
  };
  hashes = r->SyncHashes(os, 0, kMaxHashBlocks);
  ASSERT_TRUE(hashes.ok()) << hashes.status().ToString();
  EXPECT_EQ(hashes->size(), 17u) << "clipped at the disk's end: 16 blocks and 5000 bytes";
  EXPECT_EQ(*hashes, expected(0, 17));
  hashes = r->SyncHashes(os, 3 * kSyncBlockSize, 2);
  ASSERT_TRUE(hashes.ok());
  EXPECT_EQ(*hashes, expected(3, 2));
  hashes = r->SyncHashes(os, 16 * kSyncBlockSize, 4);
  ASSERT_TRUE(hashes.ok());
  EXPECT_EQ(*hashes, expected(16, 1)) << "the short last block";
  // One byte short of the disk's end: a hash over anything but exactly the block's bytes
  // within the disk differs.
  EXPECT_NE((*hashes)[0], BlockHash(std::span<const std::byte>(src.data() + 16 * kSyncBlockSize,
                                                               src.size() - 16 * kSyncBlockSize - 1)))
      << "hashed over exactly its bytes in the disk";

  EXPECT_EQ(r->SyncHashes(os, 17 * kSyncBlockSize, 1).status().code(), EINVAL) << "past the end";
  EXPECT_EQ(r->SyncHashes(os, 4096, 1).status().code(), EINVAL) << "unaligned";
  EXPECT_EQ(r->SyncHashes(os, 0, 0).status().code(), EINVAL);
  EXPECT_EQ(r->SyncHashes(os, 0, kMaxHashBlocks + 1).status().code(), EINVAL);
  EXPECT_EQ(r->SyncHashes(12345, 0, 1).status().code(), EINVAL) << "unknown disk";
}

// The replica at point 2 (with retained point 1) is resynced: blocks are rewritten, some
// zeroed where 2 had data, some written where 2 had holes. Point 2 stays readable as it
// was - as the latest point, by id, exported, through a view opened before - also after a
// restart in the middle; after EndSync the sync is the latest point and 1 still reads right.
TEST_F(SyncTest, AStagedResyncKeepsTheLatestPointReadableUntilItEnds) {
  const ReplicaDefinition def = Def(2 * kMiB, kMiB, 2, 3600 * 1000);
  auto r = Create(def);
  ASSERT_TRUE(r);
  HandPrimary primary(def);
  Status s = primary.Ship(*r, 1, kBase + kSec,
                          {{0, 0, Pattern(256 * kKiB, 10)},
                           {0, kMiB, Pattern(100 * kKiB, 11)},
                           {1, 0, Pattern(128 * kKiB, 12)}});
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_TRUE(r->ApplyPending().ok());
  const std::vector<Bytes> p1 = primary.content;
  s = primary.Ship(*r, 2, kBase + 2 * kSec,
                   {{0, 128 * kKiB, Pattern(256 * kKiB, 20)},
                    {0, kMiB + 4 * kKiB, {}, 8 * kKiB},
                    {1, 512 * kKiB, Pattern(88 * kKiB, 21)}});
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_TRUE(r->ApplyPending().ok());
  const std::vector<Bytes> p2 = primary.content;
  ASSERT_EQ(Ids(r->Points()), (std::vector<uint64_t>{1, 2}));
  ASSERT_EQ(UndoFiles(), (std::vector<std::string>{UndoName(1)})) << "2 is not a chain point";

  std::vector<Bytes> src = p2;
  auto put = [&](size_t disk, uint64_t at, const Bytes& data) {
    std::copy(data.begin(), data.end(), src[disk].begin() + static_cast<ptrdiff_t>(at));
  };
  put(0, 64 * kKiB, Pattern(128 * kKiB, 30));                    // rewrites data
  std::fill_n(src[0].begin() + kMiB, 128 * kKiB, std::byte{0});  // zeros where 2 has data
  put(0, 1536 * kKiB, Pattern(64 * kKiB, 31));                   // data where 2 has a hole
  std::fill_n(src[1].begin(), 64 * kKiB, std::byte{0});
  put(1, 900 * kKiB, Pattern(64 * kKiB, 32));

  Result<std::unique_ptr<PointView>> before = r->OpenView(kLatestPoint);
  ASSERT_TRUE(before.ok());
  const SyncPlan plan = Plan(def, 10, SyncKind::kResync);
  ASSERT_TRUE(r->BeginSync(plan).ok());
  EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{1, 2}));
  EXPECT_TRUE(r->Points().back().latest);

  auto expect_points = [&](const std::string& what) {
    ExpectPoint(*r, 2, p2, what);
    ExpectPoint(*r, 1, p1, what);
    Result<std::unique_ptr<PointView>> latest = r->OpenView(kLatestPoint);
    ASSERT_TRUE(latest.ok()) << what << ": " << latest.status().ToString();
    EXPECT_EQ((*latest)->point().id, 2u) << what;
    EXPECT_SAME_BYTES(ReadView(**latest, 0), p2[0], what + ": latest");
    const fs::path out = tmp_.path() / "export";
    ASSERT_TRUE(r->ExportPoint(2, 1, out).ok());
    EXPECT_SAME_BYTES(ReadBytes(out), p2[1], what + ": export of point 2");
  };

  ASSERT_TRUE(Copy(*r, def.disks[0].disk_id, src[0], 0, src[0].size()).ok());
  Result<uint64_t> data_durable = Copy(*r, def.disks[1].disk_id, src[1], 0, 576 * kKiB);
  ASSERT_TRUE(data_durable.ok());
  EXPECT_NE(testing::FirstDiff(ReadBytes(r->ImagePath(0)), p2[0]), -1) << "the sync wrote";
  ExpectImages(*r, {src[0]}, "os synced");
  expect_points("during the sync");
  EXPECT_SAME_BYTES(ReadView(**before, 0), p2[0], "a view opened before the sync");
  before->reset();

  r = Reopen(r);
  ASSERT_TRUE(r);
  EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{1, 2}));
  expect_points("during the sync, after a restart");
  Result<SyncResume> resume = r->BeginSync(plan);
  ASSERT_TRUE(resume.ok()) << resume.status().ToString();
  EXPECT_EQ(resume->disks[0].done_offset, def.disks[0].size);
  EXPECT_EQ(resume->disks[1].done_offset, *data_durable);
  Result<std::unique_ptr<PointView>> held = r->OpenView(2);
  ASSERT_TRUE(held.ok());
  ASSERT_TRUE(Copy(*r, def.disks[1].disk_id, src[1], *data_durable, src[1].size()).ok());
  expect_points("the sync done, not ended");

  ASSERT_TRUE(r->EndSync(10, 0).ok());
  ExpectImages(*r, src, "after the resync");
  EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{1, 10})) << "2 was not retained";
  ExpectPoint(*r, kLatestPoint, src, "latest after the resync");
  ExpectPoint(*r, 1, p1, "older point after the resync");
  EXPECT_EQ(r->OpenView(2).status().code(), ENOENT);
  EXPECT_SAME_BYTES(ReadView(**held, 0), p2[0], "a view of 2 kept open across EndSync");
  EXPECT_SAME_BYTES(ReadView(**held, 1), p2[1], "a view of 2 kept open across EndSync");
  held->reset();
  EXPECT_EQ(UndoFiles(), (std::vector<std::string>{UndoName(1)})) << "2 went with its view";
  ExpectPoint(*r, 1, p1, "older point after 2 went");

  // And cycles go on from the sync.
  primary.ContinueAfter(plan);
  primary.content = src;
  s = primary.Ship(*r, 11, kBase + 20 * kSec, {{1, 4096, Pattern(4096, 40)}});
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_TRUE(r->ApplyPending().ok());
  ExpectImages(*r, primary.content, "cycle 11");
  ExpectPoint(*r, 1, p1, "older point after cycle 11");
}

// A real crash in the middle of a staged resync (in a forked child): point 2 still reads
// right after the restart, and the sync goes on from its durable offsets.
TEST_F(SyncTest, ACrashMidResyncKeepsThePointAndTheSyncResumes) {
  GTEST_FLAG_SET(death_test_style, "fast");
  const ReplicaDefinition def = Def(2 * kMiB, kMiB, 1, 0);
  auto r = Create(def);
  ASSERT_TRUE(r);
  HandPrimary primary(def);
  ASSERT_TRUE(
      primary.Ship(*r, 2, kBase, {{0, 0, Pattern(2 * kMiB, 1)}, {1, 0, Pattern(kMiB, 2)}}).ok());
  ASSERT_TRUE(r->ApplyPending().ok());
  const std::vector<Bytes> p2 = primary.content;
  const std::vector<Bytes> src = {RandomDisk(rng_, 2 * kMiB), RandomDisk(rng_, kMiB)};
  const SyncPlan plan = Plan(def, 9, SyncKind::kResync);
  ASSERT_TRUE(r->BeginSync(plan).ok());
  EXPECT_DEATH(
      {
        (void)failpoint::Arm("applier.sync_mid_write=abort@5");
        (void)Copy(*r, def.disks[0].disk_id, src[0], 0, src[0].size());
      },
      "");
  EXPECT_NE(testing::FirstDiff(ReadBytes(r->ImagePath(0)), p2[0]), -1) << "the child wrote";
  r = Reopen(r);
  ASSERT_TRUE(r);
  ExpectPoint(*r, 2, p2, "after the crash");
  Result<SyncResume> resume = r->BeginSync(plan);
  ASSERT_TRUE(resume.ok()) << resume.status().ToString();
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(
        Copy(*r, def.disks[i].disk_id, src[i], resume->disks[i].done_offset, src[i].size()).ok());
  }
  ExpectPoint(*r, 2, p2, "the sync done");
  ASSERT_TRUE(r->EndSync(9, 0).ok());
  ExpectImages(*r, src, "after the resync");
  EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{9})) << "one recovery point: the sync";
}

TEST_F(SyncTest, BeginSyncAppliesTheCommittedCyclesFirst) {
  const ReplicaDefinition def = Def(kMiB, kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  HandPrimary primary(def);
  ASSERT_TRUE(primary.Ship(*r, 1, kBase, {{0, 8192, Pattern(9000, 1)}}).ok());
  ASSERT_TRUE(primary.Ship(*r, 2, kBase + kSec, {{1, 0, Pattern(9000, 2)}}).ok());
  ASSERT_EQ(r->Position().applied_cycle, 0u);
  ASSERT_TRUE(r->BeginSync(Plan(def, 5)).ok());
  const ReplicaPosition pos = r->Position();
  EXPECT_EQ(pos.applied_cycle, 2u) << "both cycles applied before the sync";
  EXPECT_EQ(pos.pending_bytes, 0u);
  EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{2})) << "staged: 2 stays the latest";
  ExpectPoint(*r, 2, primary.content, "during the sync");
  EXPECT_TRUE(testing::ListDir(dir() / "received" / "os").empty());
  EXPECT_TRUE(testing::ListDir(dir() / "received" / "data").empty());
}

TEST_F(SyncTest, BeginSyncDropsCommittedCyclesThatCannotBeApplied) {
  const ReplicaDefinition def = Def(kMiB, kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  HandPrimary primary(def);
  ASSERT_TRUE(primary.Ship(*r, 1, kBase, {{0, 8192, Pattern(9000, 1)}}).ok());
  const std::vector<std::string> received = testing::ListDir(dir() / "received" / "os");
  ASSERT_EQ(received.size(), 1u);
  fs::remove(dir() / "received" / "os" / received[0]);
  EXPECT_FALSE(r->ApplyPending().ok());
  EXPECT_NE(r->Position().apply_error, "");

  ASSERT_TRUE(r->BeginSync(Plan(def, 5)).ok());
  const ReplicaPosition pos = r->Position();
  EXPECT_EQ(pos.applied_cycle, 0u);
  EXPECT_EQ(pos.pending_bytes, 0u) << "the cycle is dropped";
  EXPECT_EQ(pos.apply_error, "") << "the sync replaces it";
  EXPECT_TRUE(r->Points().empty()) << "direct: nothing was applied";
  EXPECT_TRUE(testing::ListDir(dir() / "received" / "data").empty());
  const std::vector<Bytes> src = {RandomDisk(rng_, kMiB), RandomDisk(rng_, kMiB)};
  for (size_t i = 0; i < 2; ++i) ASSERT_TRUE(Copy(*r, def.disks[i].disk_id, src[i], 0, kMiB).ok());
  ASSERT_TRUE(r->EndSync(5, 0).ok());
  ExpectImages(*r, src, "after the sync");
  r = Reopen(r);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->Position().apply_error, "");
  EXPECT_EQ(r->Position().applied_cycle, 5u);
}

TEST_F(SyncTest, BadPlansAreRefusedAndChangeNothing) {
  const ReplicaDefinition def = Def(kMiB, kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  const auto digest = testing::TreeDigest(dir());
  auto refused = [&](const SyncPlan& plan, int code, const std::string& what) {
    Result<SyncResume> res = r->BeginSync(plan);
    ASSERT_FALSE(res.ok()) << what;
    EXPECT_EQ(res.status().code(), code) << what << ": " << res.status().ToString();
    EXPECT_FALSE(r->Sync().active) << what;
  };
  SyncPlan p = Plan(def, 5);
  p.epoch = kEpoch - 1;
  refused(p, ESTALE, "older epoch");
  p = Plan(def, 5);
  std::swap(p.disks[0], p.disks[1]);
  refused(p, EINVAL, "disks in another order");
  p = Plan(def, 5);
  p.disks.pop_back();
  refused(p, EINVAL, "a disk missing");
  p = Plan(def, 5);
  p.disks[1].disk_id = 12345;
  refused(p, EINVAL, "an unknown disk");
  p = Plan(def, 5);
  p.disks[0].bytes_total = kMiB + 1;
  refused(p, EINVAL, "more bytes than the disk has");
  refused(Plan(def, 0), EINVAL, "sync id 0");
  EXPECT_EQ(testing::TreeDigest(dir()), digest);

  p = Plan(def, 5);
  p.epoch = kEpoch + 1;
  EXPECT_TRUE(r->BeginSync(p).ok()) << "a newer epoch is fine";
}

TEST_F(SyncTest, ASyncOlderThanTheAppliedCycleIsRefused) {
  const ReplicaDefinition def = Def(kMiB, kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  HandPrimary primary(def);
  ASSERT_TRUE(primary.Ship(*r, 8, kBase, {{0, 0, Pattern(100, 1)}}).ok());
  ASSERT_TRUE(r->ApplyPending().ok());
  Result<SyncResume> res = r->BeginSync(Plan(def, 7));
  EXPECT_EQ(res.status().code(), EINVAL) << res.status().ToString();
  EXPECT_FALSE(r->Sync().active);
}

TEST_F(SyncTest, ASyncWithoutRoomIsRefusedWithENOSPC) {
  // A sparse disk twice the free space: the copy of all of it cannot fit.
  std::unique_ptr<Replica> r;
  uint64_t free = 0;
  if (!CreateLargerThanFree(&r, &free)) GTEST_SKIP() << "no room for a sparse file that large";
  ASSERT_TRUE(r);
  const ReplicaDefinition def = r->Definition();
  Result<SyncResume> res = r->BeginSync(Plan(def, 3));
  ASSERT_FALSE(res.ok());
  EXPECT_EQ(res.status().code(), ENOSPC);
  EXPECT_NE(res.status().message().find("free"), std::string::npos) << res.status().ToString();
  EXPECT_NE(res.status().message().find("the copy needs"), std::string::npos);
  EXPECT_FALSE(r->Sync().active);

  SyncPlan small = Plan(def, 3);
  small.disks[0].bytes_total = kMiB;  // e.g. a mostly empty disk: only its data is scanned
  EXPECT_TRUE(r->BeginSync(small).ok());
}

// The same resync plan on the same replica, which has room for what the plan may write:
// accepted while the replica has no point to keep (written directly), refused with ENOSPC
// once it has one, because keeping it readable needs the undo journal's room too.
TEST_F(SyncTest, AStagedSyncWithoutRoomForItsUndoJournalIsRefusedWithENOSPC) {
  std::unique_ptr<Replica> r;
  uint64_t free = 0;
  if (!CreateLargerThanFree(&r, &free)) GTEST_SKIP() << "no room for a sparse file that large";
  ASSERT_TRUE(r);
  const ReplicaDefinition def = r->Definition();
  auto resync = [&](uint64_t sync_id) {
    SyncPlan p = Plan(def, sync_id, SyncKind::kResync);
    for (SyncDiskPlan& d : p.disks) d.mode = SyncMode::kCompare;
    p.disks[0].bytes_total = free / 10 * 6;  // fits; with as much undo again, it does not
    p.disks[1].bytes_total = 0;
    return p;
  };
  // No point yet: a direct sync; it ends with every disk done (all zeros, nothing written).
  ASSERT_TRUE(r->BeginSync(resync(3)).ok());
  EXPECT_TRUE(r->Points().empty());
  for (const DiskDefinition& d : def.disks) {
    ASSERT_TRUE(r->WriteSyncData(d.disk_id, 0, {}, d.size, d.size).ok());
  }
  ASSERT_TRUE(r->EndSync(3, kBase).ok());
  ASSERT_EQ(r->Position().applied_cycle, 3u);

  Result<SyncResume> res = r->BeginSync(resync(5));
  ASSERT_FALSE(res.ok());
  EXPECT_EQ(res.status().code(), ENOSPC) << res.status().ToString();
  EXPECT_NE(res.status().message().find("undo journal"), std::string::npos)
      << res.status().ToString();
  EXPECT_FALSE(r->Sync().active);
  EXPECT_EQ(r->Position().applied_cycle, 3u);
}

// A sync that keeps the applied point readable saves every block it may overwrite in the
// undo journal before it writes it: its need counts those blocks (and a record header
// each) even where the images are allocated already. A direct sync's need does not.
TEST(SyncSpaceTest, AStagedSyncNeedsRoomForTheUndoOfWhatItMayOverwrite) {
  SyncPlan plan;
  plan.disks = {SyncDiskPlan{1, SyncMode::kCompare, 0, 0, 8 * kMiB},
                SyncDiskPlan{2, SyncMode::kCopy, 0, 0, 4096 + 1}};
  const std::vector<uint64_t> allocated = {8 * kMiB, 0};
  EXPECT_EQ(SyncSpaceNeeded(plan, allocated, /*undo=*/false), 4096u + 1);
  EXPECT_EQ(SyncSpaceNeeded(plan, allocated, /*undo=*/true),
            4096u + 1 + (2048 + 2) * (kUndoBlockSize + kUndoHeaderSize));
}

TEST_F(SyncTest, EndSyncNeedsEveryDiskDone) {
  const ReplicaDefinition def = Def(kMiB, kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->EndSync(4, 0).code(), EINVAL) << "no sync";
  ASSERT_TRUE(r->BeginSync(Plan(def, 4)).ok());
  const std::vector<Bytes> src = {RandomDisk(rng_, kMiB), RandomDisk(rng_, kMiB)};
  ASSERT_TRUE(Copy(*r, def.disks[0].disk_id, src[0], 0, kMiB).ok());
  ASSERT_TRUE(Copy(*r, def.disks[1].disk_id, src[1], 0, kMiB / 2).ok());
  Status s = r->EndSync(4, 0);
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_NE(s.message().find("disk data"), std::string::npos) << s.ToString();
  EXPECT_EQ(r->EndSync(5, 0).code(), EINVAL) << "another sync id";
  EXPECT_TRUE(r->Sync().active);
  EXPECT_EQ(r->Position().applied_cycle, 0u);
  ASSERT_TRUE(Copy(*r, def.disks[1].disk_id, src[1], kMiB / 2, kMiB).ok());
  ASSERT_TRUE(r->EndSync(4, 0).ok());
  ExpectImages(*r, src, "after the sync");
}

TEST_F(SyncTest, WriteSyncDataChecksItsArguments) {
  const ReplicaDefinition def = Def(kMiB, kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  const uint32_t os = def.disks[0].disk_id;
  const Bytes block = Pattern(4096, 1);
  EXPECT_EQ(r->WriteSyncData(os, 0, block, 0, 4096).status().code(), EINVAL) << "no sync";
  ASSERT_TRUE(r->BeginSync(Plan(def, 4)).ok());
  const auto digest = testing::TreeDigest(dir());
  EXPECT_EQ(r->WriteSyncData(999, 0, block, 0, 4096).status().code(), EINVAL) << "unknown disk";
  EXPECT_EQ(r->WriteSyncData(os, kMiB - 100, block, 0, kMiB).status().code(), EINVAL)
      << "past the end";
  EXPECT_EQ(r->WriteSyncData(os, 4096, {}, kMiB, kMiB).status().code(), EINVAL)
      << "zeros past the end";
  const Bytes big(kMiB + 4096, std::byte{1});
  EXPECT_EQ(r->WriteSyncData(os, 0, big, 0, kMiB).status().code(), EINVAL) << "over 1 MiB";
  EXPECT_EQ(r->WriteSyncData(os, 0, block, 0, 100).status().code(), EINVAL) << "done_to short";
  EXPECT_EQ(r->WriteSyncData(os, 0, block, 0, kMiB + 1).status().code(), EINVAL)
      << "done_to past the end";
  EXPECT_EQ(r->WriteSyncData(os, 0, block, 4096, 8192).status().code(), EINVAL)
      << "data and zeros at once";
  EXPECT_EQ(testing::TreeDigest(dir()), digest) << "refused calls change nothing";
  EXPECT_EQ(r->Sync().bytes_done, 0u);

  Result<uint64_t> d = r->WriteSyncData(os, 0, block, 0, kMiB);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(*d, kMiB) << "a done_to beyond the data (the rest compared equal)";
}

TEST_F(SyncTest, AFailedEndIsRetriedAndAnEndedSyncIsNotRedone) {
  const ReplicaDefinition def = Def(kMiB, kMiB);
  auto r = Create(def);
  ASSERT_TRUE(r);
  const SyncPlan plan = Plan(def, 4);
  ASSERT_TRUE(r->BeginSync(plan).ok());
  const std::vector<Bytes> src = {RandomDisk(rng_, kMiB), RandomDisk(rng_, kMiB)};
  ASSERT_TRUE(failpoint::Arm("applier.sync_mid_write=error*1").ok());
  EXPECT_FALSE(Copy(*r, def.disks[0].disk_id, src[0], 0, kMiB).ok());
  for (size_t i = 0; i < 2; ++i) ASSERT_TRUE(Copy(*r, def.disks[i].disk_id, src[i], 0, kMiB).ok());
  ASSERT_TRUE(failpoint::Arm("applier.sync_before_end=error*1").ok());
  EXPECT_FALSE(r->EndSync(4, 0).ok());
  EXPECT_TRUE(r->Sync().active);
  EXPECT_EQ(r->Position().applied_cycle, 0u);
  ASSERT_TRUE(r->EndSync(4, 0).ok());
  EXPECT_EQ(r->Position().applied_cycle, 4u);

  // The primary did not hear of the end and starts the sync again: nothing to do.
  r = Reopen(r);
  ASSERT_TRUE(r);
  Result<SyncResume> resume = r->BeginSync(plan);
  ASSERT_TRUE(resume.ok()) << resume.status().ToString();
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(resume->disks[i].done_offset, def.disks[i].size);
  EXPECT_FALSE(r->Sync().active);
  ASSERT_TRUE(r->EndSync(4, 0).ok());
  ExpectImages(*r, src, "after the repeated end");
  EXPECT_EQ(Ids(r->Points()), (std::vector<uint64_t>{4}));
}

}  // namespace
}  // namespace siterep::applier
