// The replica store: creating and opening replicas, and the checks on what the receiver
// hands over (WriteSegment, CommitCycle) - rogue data is refused and changes nothing.
#include "applier/replica.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <functional>

#include "applier/applier_test_util.h"
#include "common/file_util.h"
#include "tracker/test_util.h"

namespace siterep::applier {
namespace {

namespace fs = std::filesystem;
using testing::Bytes;
using testing::PrimaryVm;
using testing::ReadBytes;
using testing::SegmentBuilder;
using testing::SendSegment;
using tracker::testing::Pattern;

ReplicaDefinition TwoDisks(uint64_t epoch = 5) {
  ReplicaDefinition def;
  def.vm = "web01";
  def.primary_site = "east";
  def.epoch = epoch;
  def.disks = {{"os", tracker::DiskIdFor("web01", "os"), 1 << 20},
               {"data", tracker::DiskIdFor("web01", "data"), 256 << 10}};
  def.recovery_points = 2;
  def.recovery_point_interval_ms = 60000;
  return def;
}

class ReplicaTest : public ::testing::Test {
 protected:
  fs::path dir() const { return tmp_.path() / "replicas" / "web01"; }
  testing::TempDir tmp_;
};

TEST_F(ReplicaTest, CreateMakesSparseImagesAndTheStateFiles) {
  Result<std::unique_ptr<Replica>> r = Replica::Create(dir(), TwoDisks());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  for (const char* disk : {"os", "data"}) {
    const fs::path image = dir() / (std::string(disk) + ".img");
    struct stat st {};
    ASSERT_EQ(::stat(image.c_str(), &st), 0) << image;
    EXPECT_EQ(st.st_blocks, 0) << "sparse";
  }
  EXPECT_EQ(fs::file_size(dir() / "os.img"), 1u << 20);
  EXPECT_EQ(fs::file_size(dir() / "data.img"), 256u << 10);
  EXPECT_TRUE(fs::exists(dir() / "replica.json"));
  EXPECT_TRUE(fs::exists(dir() / "position.json"));
  EXPECT_TRUE(fs::is_directory(dir() / "received" / "os"));
  const ReplicaDefinition def = (*r)->Definition();
  EXPECT_EQ(def.vm, "web01");
  EXPECT_EQ(def.primary_site, "east");
  EXPECT_EQ(def.epoch, 5u);
  EXPECT_EQ(def.disks.size(), 2u);
  EXPECT_EQ(def.recovery_points, 2);
  const ReplicaPosition pos = (*r)->Position();
  EXPECT_EQ(pos.epoch, 5u);
  EXPECT_EQ(pos.received_cycle, 0u);
  EXPECT_EQ(pos.applied_cycle, 0u);
  EXPECT_TRUE((*r)->Points().empty());
  Result<std::unique_ptr<PointView>> view = (*r)->OpenView(kLatestPoint);
  EXPECT_EQ(view.status().code(), ENOENT) << "nothing applied yet";

  // A second Replica on the same folder is refused while the first is open.
  EXPECT_EQ(Replica::Open(dir()).status().code(), EBUSY);
  r->reset();
  Result<std::unique_ptr<Replica>> again = Replica::Open(dir());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ((*again)->Definition().disks[1].name, "data");
}

TEST_F(ReplicaTest, CreateKeepsASeedImageOfTheRightSizeAndRefusesAnother) {
  fs::create_directories(dir());
  tracker::testing::MakeImage(dir() / "os.img", 1 << 20, 42);
  const Bytes seed = ReadBytes(dir() / "os.img");
  {
    Result<std::unique_ptr<Replica>> r = Replica::Create(dir(), TwoDisks());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }
  EXPECT_EQ(testing::FirstDiff(ReadBytes(dir() / "os.img"), seed), -1) << "the seed is kept";

  const fs::path other = tmp_.path() / "replicas" / "other";
  fs::create_directories(other);
  tracker::testing::MakeImage(other / "data.img", 100 << 10, 1);
  Result<std::unique_ptr<Replica>> r = Replica::Create(other, TwoDisks());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), EEXIST);
  EXPECT_NE(r.status().message().find("102400 bytes"), std::string::npos) << r.status().ToString();
  EXPECT_NE(r.status().message().find("262144 bytes"), std::string::npos) << r.status().ToString();
  EXPECT_FALSE(fs::exists(other / "replica.json")) << "no replica was made";
  EXPECT_EQ(fs::file_size(other / "data.img"), 100u << 10) << "the image is left alone";
}

TEST_F(ReplicaTest, CreateOverAnExistingReplicaChecksVmDisksAndEpoch) {
  ASSERT_TRUE(Replica::Create(dir(), TwoDisks(5)).ok());
  {
    // Same definition: opened.
    Result<std::unique_ptr<Replica>> r = Replica::Create(dir(), TwoDisks(5));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }
  {
    ReplicaDefinition def = TwoDisks(7);
    def.recovery_points = 4;
    Result<std::unique_ptr<Replica>> r = Replica::Create(dir(), def);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ((*r)->Position().epoch, 7u);
  }
  Result<std::unique_ptr<Replica>> reopened = Replica::Open(dir());
  ASSERT_TRUE(reopened.ok());
  EXPECT_EQ((*reopened)->Definition().epoch, 7u) << "the newer epoch is stored";
  EXPECT_EQ((*reopened)->Definition().recovery_points, 4);
  reopened->reset();

  Result<std::unique_ptr<Replica>> older = Replica::Create(dir(), TwoDisks(6));
  ASSERT_FALSE(older.ok());
  EXPECT_EQ(older.status().code(), EPERM);
  EXPECT_EQ(older.status().message(), "epoch 6 is older than the replica's 7");

  ReplicaDefinition other_disks = TwoDisks(7);
  other_disks.disks[1].size *= 2;
  EXPECT_EQ(Replica::Create(dir(), other_disks).status().code(), EEXIST);
  ReplicaDefinition other_vm = TwoDisks(7);
  other_vm.vm = "db01";
  EXPECT_EQ(Replica::Create(dir(), other_vm).status().code(), EEXIST);
}

TEST_F(ReplicaTest, BadDefinitionsAreRefused) {
  ReplicaDefinition none = TwoDisks();
  none.disks.clear();
  EXPECT_EQ(Replica::Create(dir(), none).status().code(), EINVAL);
  ReplicaDefinition twice = TwoDisks();
  twice.disks[1].name = "os";
  EXPECT_EQ(Replica::Create(dir(), twice).status().code(), EINVAL);
  ReplicaDefinition slash = TwoDisks();
  slash.disks[0].name = "../os";
  EXPECT_EQ(Replica::Create(dir(), slash).status().code(), EINVAL);
  ReplicaDefinition same_id = TwoDisks();
  same_id.disks[1].disk_id = same_id.disks[0].disk_id;
  EXPECT_EQ(Replica::Create(dir(), same_id).status().code(), EINVAL);
  EXPECT_EQ(Replica::Open(dir()).status().code(), ENOENT);
}

TEST_F(ReplicaTest, UpdateDefinitionTakesANewerEpochAndRefusesAnOlderOne) {
  Result<std::unique_ptr<Replica>> r = Replica::Create(dir(), TwoDisks(5));
  ASSERT_TRUE(r.ok());
  Replica& replica = **r;
  EXPECT_TRUE(replica.UpdateDefinition(TwoDisks(6)).ok());
  EXPECT_EQ(replica.Position().epoch, 6u);
  EXPECT_EQ(replica.UpdateDefinition(TwoDisks(5)).code(), EPERM);
  // Records of the old epoch are refused from now on.
  const DiskDefinition os = TwoDisks().disks[0];
  SegmentBuilder old_epoch(os.disk_id, 5, 1);
  old_epoch.Write(0, Pattern(100, 1)).Cut(1);
  Status s = SendSegment(replica, os.disk_id, 1, old_epoch.bytes());
  EXPECT_EQ(s.code(), EBADMSG) << s.ToString();
  EXPECT_NE(s.message().find("epoch 5 is older than the replica's 6"), std::string::npos)
      << s.ToString();
}

// Rogue-peer checks: every refusal returns an error and leaves the replica as it was.
class ReceiveChecksTest : public ReplicaTest {
 protected:
  void SetUp() override {
    primary_ = std::make_unique<PrimaryVm>(tmp_.path(),
                                           std::vector<testing::PrimaryDisk>{{"os", 1 << 20}});
    primary_->SeedReplica(dir());
    Result<std::unique_ptr<Replica>> r = Replica::Create(dir(), primary_->Definition());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    replica_ = std::move(*r);
    primary_->Write(0, 5000, Pattern(9000, 1));
    ASSERT_EQ(primary_->Cut(), 1u);
    const std::vector<tracker::SealedSegment> sealed = primary_->Sealed(1);
    ASSERT_EQ(sealed.size(), 1u);
    last_number_ = sealed[0].number;
    last_seq_ = sealed[0].last_seq;
    ASSERT_TRUE(primary_->Ship(*replica_, 1).ok());
    ASSERT_TRUE(replica_->ApplyPending().ok());
    id_ = primary_->disk_id(0);
  }

  // A valid next segment for cycle 2, to break.
  SegmentBuilder Next() const { return SegmentBuilder(id_, 3, last_seq_ + 1); }

  // Runs send, which must fail, and checks that nothing changed.
  void ExpectRefused(const std::string& what, const std::function<Status()>& send,
                     const std::string& message_part = "") {
    SCOPED_TRACE(what);
    const auto before = testing::TreeDigest(dir());
    const ReplicaPosition pos = replica_->Position();
    Status s = send();
    EXPECT_FALSE(s.ok());
    if (!message_part.empty()) {
      EXPECT_NE(s.message().find(message_part), std::string::npos) << s.ToString();
    }
    EXPECT_EQ(testing::TreeDigest(dir()), before) << s.ToString();
    const ReplicaPosition after = replica_->Position();
    EXPECT_EQ(after.received_cycle, pos.received_cycle);
    EXPECT_EQ(after.pending_bytes, pos.pending_bytes);
    // A commit finds nothing staged.
    EXPECT_FALSE(replica_->CommitCycle(CycleInfo{2, 1, 1}).ok());
  }

  Status Send(const Bytes& bytes, uint64_t number = 0) {
    return SendSegment(*replica_, id_, number == 0 ? last_number_ + 1 : number, bytes, 100);
  }

  std::unique_ptr<PrimaryVm> primary_;
  std::unique_ptr<Replica> replica_;
  uint32_t id_ = 0;
  uint64_t last_number_ = 0;
  uint64_t last_seq_ = 0;
};

TEST_F(ReceiveChecksTest, RogueSegmentsAreRefusedAndChangeNothing) {
  const uint64_t size = 1 << 20;
  ExpectRefused(
      "bad CRC",
      [&] {
        SegmentBuilder b = Next();
        b.Write(0, Pattern(200, 1)).Cut(2);
        b.bytes()[tracker::kHeaderSize + 50] ^= std::byte{1};
        return Send(b.bytes());
      },
      "CRC mismatch");
  ExpectRefused(
      "flipped header byte",
      [&] {
        SegmentBuilder b = Next();
        b.Write(0, Pattern(200, 1)).Cut(2);
        b.bytes()[32 + 2] ^= std::byte{4};  // the offset field
        return Send(b.bytes());
      },
      "CRC mismatch");
  ExpectRefused(
      "write past the end",
      [&] { return Send(Next().Write(size - 10, Pattern(100, 1)).Cut(2).bytes()); },
      "beyond the end of the disk");
  ExpectRefused(
      "huge discard", [&] { return Send(Next().Discard(4096, 1ull << 60).Cut(2).bytes()); },
      "beyond the end of the disk");
  ExpectRefused(
      "discard at 1 TiB", [&] { return Send(Next().Discard(1ull << 40, 4096).Cut(2).bytes()); },
      "beyond the end of the disk");
  ExpectRefused("offset + length overflows",
                [&] { return Send(Next().Discard(~uint64_t{0} - 10, 100).Cut(2).bytes()); });
  ExpectRefused(
      "unknown disk",
      [&] {
        return SendSegment(*replica_, id_ + 1, last_number_ + 1,
                           Next().Write(0, Pattern(10, 1)).Cut(2).bytes());
      },
      "does not have");
  ExpectRefused(
      "record of another disk",
      [&] {
        SegmentBuilder b(id_ + 1, 3, last_seq_ + 1);
        return Send(b.Write(0, Pattern(10, 1)).Cut(2).bytes());
      },
      "disk id");
  ExpectRefused(
      "older epoch",
      [&] {
        SegmentBuilder b(id_, 2, last_seq_ + 1);
        return Send(b.Write(0, Pattern(10, 1)).Cut(2).bytes());
      },
      "epoch 2 is older than the replica's 3");
  ExpectRefused(
      "rewound seq",
      [&] {
        SegmentBuilder b(id_, 3, last_seq_);
        return Send(b.Write(0, Pattern(10, 1)).Cut(2).bytes());
      },
      "seq " + std::to_string(last_seq_) + " where " + std::to_string(last_seq_ + 1));
  ExpectRefused("skipped seq", [&] {
    SegmentBuilder b(id_, 3, last_seq_ + 2);
    return Send(b.Write(0, Pattern(10, 1)).Cut(2).bytes());
  });
  ExpectRefused(
      "gap inside the segment",
      [&] {
        SegmentBuilder b = Next();
        b.Write(0, Pattern(10, 1));
        tracker::RecordHeader h{tracker::RecordKind::kWrite, id_, 3, b.next_seq() + 1, 0, 10};
        const Bytes payload = Pattern(10, 2);
        b.Raw(h, payload).Cut(2);
        return Send(b.bytes());
      },
      "was expected");
  ExpectRefused(
      "no cut", [&] { return Send(Next().Write(0, Pattern(10, 1)).bytes()); },
      "does not end in a cut");
  ExpectRefused(
      "empty segment", [&] { return Send(Bytes{}); }, "does not end in a cut");
  ExpectRefused(
      "record after the cut",
      [&] { return Send(Next().Write(0, Pattern(10, 1)).Cut(2).Write(0, Pattern(10, 1)).bytes()); },
      "after the cut");
  ExpectRefused(
      "two cuts", [&] { return Send(Next().Cut(2).Cut(3).bytes()); }, "after the cut");
  ExpectRefused(
      "truncated last record",
      [&] {
        Bytes bytes = Next().Write(0, Pattern(300, 1)).Cut(2).bytes();
        bytes.resize(bytes.size() - 5);
        return Send(bytes);
      },
      "truncated");
  ExpectRefused(
      "segment number not newer",
      [&] { return Send(Next().Write(0, Pattern(10, 1)).Cut(2).bytes(), last_number_); },
      "not newer");
  ExpectRefused(
      "non-contiguous chunk",
      [&] {
        const Bytes bytes = Next().Write(0, Pattern(1000, 1)).Cut(2).bytes();
        std::span<const std::byte> all(bytes);
        SR_RETURN_IF_ERROR(replica_->WriteSegment(id_, last_number_ + 1, 0, all.first(100), false));
        return replica_->WriteSegment(id_, last_number_ + 1, 200, all.subspan(200), true);
      },
      "does not follow the 100 bytes");
  ExpectRefused(
      "chunk without a start",
      [&] {
        const Bytes bytes = Next().Write(0, Pattern(1000, 1)).Cut(2).bytes();
        return replica_->WriteSegment(id_, last_number_ + 1, 100, std::span(bytes).subspan(100),
                                      true);
      },
      "without the start");
  ExpectRefused("chunk at 1 TiB", [&] {
    const Bytes bytes = Next().Write(0, Pattern(1000, 1)).Cut(2).bytes();
    SR_RETURN_IF_ERROR(
        replica_->WriteSegment(id_, last_number_ + 1, 0, std::span(bytes).first(100), false));
    return replica_->WriteSegment(id_, last_number_ + 1, 1ull << 40, std::span(bytes).subspan(100),
                                  true);
  });
  EXPECT_TRUE(testing::ListDir(dir() / "received" / "os").empty()) << "no partial file is left";

  // After all that, the real next cycle goes through.
  primary_->Write(0, 100, Pattern(5000, 2));
  ASSERT_EQ(primary_->Cut(), 2u);
  ASSERT_TRUE(primary_->Ship(*replica_, 2).ok());
  ASSERT_TRUE(replica_->ApplyPending().ok());
  EXPECT_EQ(testing::FirstDiff(ReadBytes(replica_->ImagePath(0)), ReadBytes(primary_->image(0))),
            -1);
}

TEST_F(ReceiveChecksTest, CommitChecksEveryDiskHasTheCycle) {
  // Nothing staged.
  EXPECT_EQ(replica_->CommitCycle(CycleInfo{2, 1, 1}).code(), EINVAL);
  // A segment of cycle 2, committed as cycle 3 or as cycle 1.
  ASSERT_TRUE(Send(Next().Write(0, Pattern(10, 1)).Cut(2).bytes()).ok());
  Status s = replica_->CommitCycle(CycleInfo{3, 1, 1});
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_NE(s.message().find("the next must be 2"), std::string::npos) << s.ToString();
  EXPECT_EQ(replica_->CommitCycle(CycleInfo{1, 1, 1}).code(), EINVAL);
  EXPECT_EQ(replica_->Position().received_cycle, 1u);
  // A segment whose cut is not the cycle committed.
  ASSERT_TRUE(Send(Next().Write(0, Pattern(10, 1)).Cut(7).bytes()).ok());
  s = replica_->CommitCycle(CycleInfo{2, 1, 1});
  EXPECT_NE(s.message().find("ends in the cut of cycle 7"), std::string::npos) << s.ToString();
  // Sent again correctly (replacing the uncommitted one), then committed.
  ASSERT_TRUE(Send(Next().Write(0, Pattern(10, 1)).Cut(2, 123).bytes()).ok());
  ASSERT_TRUE(replica_->CommitCycle(CycleInfo{2, 0, 0}).ok());
  ReplicaPosition pos = replica_->Position();
  EXPECT_EQ(pos.received_cycle, 2u);
  EXPECT_GT(pos.pending_bytes, 0u);
  EXPECT_EQ(testing::ListDir(dir() / "received" / "os").size(), 1u);
  ASSERT_TRUE(replica_->ApplyPending().ok());
  EXPECT_EQ(replica_->Position().applied_cut_unix_nanos, 123) << "the cut record's time";
}

TEST_F(ReceiveChecksTest, AnInterruptedTransferStartsAgainFromOffsetZero) {
  const Bytes bytes = Next().Write(0, Pattern(3000, 1)).Cut(2).bytes();
  std::span<const std::byte> all(bytes);
  ASSERT_TRUE(replica_->WriteSegment(id_, last_number_ + 1, 0, all.first(1000), false).ok());
  // The connection drops; the segment comes again from the start.
  ASSERT_TRUE(Send(bytes).ok());
  ASSERT_TRUE(replica_->CommitCycle(CycleInfo{2, 5, 4}).ok());
  ASSERT_TRUE(replica_->ApplyPending().ok());
  EXPECT_EQ(testing::FirstDiff(ReadBytes(replica_->ImagePath(0)),
                               [&] {
                                 Bytes b = ReadBytes(primary_->image(0));
                                 const Bytes p = Pattern(3000, 1);
                                 std::copy(p.begin(), p.end(), b.begin());
                                 return b;
                               }()),
            -1);
}

}  // namespace
}  // namespace siterep::applier
