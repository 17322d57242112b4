// Consistency groups on the replica side: the consistency_group of the definition, the
// apply gate (the applier thread, ApplyPending and BeginSync hold a cycle the gate refuses),
// CommittedCuts / CycleAtCut, and a cycle with no changes (a VM cut with its group while
// idle) applied as a recovery point like any other.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <thread>

#include "applier/applier_test_util.h"
#include "applier/replica.h"
#include "applier/replica_state.h"
#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/test_util.h"

namespace siterep::applier {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::Bytes;
using testing::PrimaryVm;
using testing::ReadBytes;
using testing::ReadView;
using testing::SegmentBuilder;
using testing::SendSegment;
using tracker::testing::Pattern;

constexpr int64_t kSec = 1000000000;
constexpr int64_t kBase = 1700000000 * kSec;  // cut times the tests choose
int64_t CutAt(int n) { return kBase + n * kSec; }

// Polls until done() or 5 s have passed; returns done().
bool WaitFor(const std::function<bool()>& done) {
  for (int i = 0; i < 500 && !done(); ++i) std::this_thread::sleep_for(10ms);
  return done();
}

// A gate that lets through the cycles cut at or before `limit` and records what it was
// asked (from whichever thread asks). The gate function shares the state, so an applier
// thread that outlives the test's TestGate (a failed ASSERT) reads nothing freed.
class TestGate {
 public:
  explicit TestGate(int64_t limit) : state_(std::make_shared<State>()) { set_limit(limit); }
  Replica::ApplyGate Fn() const {
    return [state = state_](const CycleInfo& c) {
      std::lock_guard lk(state->mu);
      state->asked.push_back(c);
      return c.cut_unix_nanos <= state->limit.load();
    };
  }
  void set_limit(int64_t limit) { state_->limit = limit; }
  std::vector<CycleInfo> asked() const {
    std::lock_guard lk(state_->mu);
    return state_->asked;
  }
  size_t asked_count() const { return asked().size(); }

 private:
  struct State {
    std::atomic<int64_t> limit{0};
    std::mutex mu;
    std::vector<CycleInfo> asked;
  };
  std::shared_ptr<State> state_;
};

class GroupTest : public ::testing::Test {
 protected:
  void SetUp() override { failpoint::DisarmAll(); }
  void TearDown() override { failpoint::DisarmAll(); }

  fs::path dir(const std::string& vm = "vm1") const { return tmp_.path() / "replicas" / vm; }

  PrimaryVm& MakePrimary(int recovery_points = 0) {
    primary_ = std::make_unique<PrimaryVm>(
        tmp_.path(), std::vector<testing::PrimaryDisk>{{"os", 2 << 20}, {"data", 1 << 20}});
    primary_->SeedReplica(dir());
    replica_ = testing::CreateReplica(dir(), primary_->Definition(recovery_points, 0));
    return *primary_;
  }

  // Changes, a cut shipped with cut time CutAt(n); the primary's images at the cut are
  // kept in snaps_[cycle].
  uint64_t Cycle(int n) {
    primary_->RandomChanges(rng_, 10);
    const uint64_t cycle = primary_->Cut();
    snaps_[cycle] = primary_->Snapshot();
    Status s = primary_->Ship(*replica_, cycle, CutAt(n));
    EXPECT_TRUE(s.ok()) << s.ToString();
    return cycle;
  }

  void ExpectImagesAt(uint64_t cycle, const std::string& what) {
    for (size_t d = 0; d < primary_->disk_count(); ++d) {
      EXPECT_SAME_BYTES(ReadBytes(replica_->ImagePath(d)), snaps_.at(cycle)[d],
                        what + ", disk " + std::to_string(d));
    }
  }

  testing::TempDir tmp_;
  std::mt19937_64 rng_{42};
  std::map<uint64_t, std::vector<Bytes>> snaps_;
  std::unique_ptr<PrimaryVm> primary_;
  std::unique_ptr<Replica> replica_;
};

// ---------------------------------------------------------------------------------------
// The definition

ReplicaDefinition GroupDef(const std::string& group) {
  ReplicaDefinition def;
  def.vm = "web01";
  def.primary_site = "east";
  def.epoch = 4;
  def.disks = {{"os", tracker::DiskIdFor("web01", "os"), 1 << 20}};
  def.consistency_group = group;
  return def;
}

TEST(GroupDefinitionTest, JsonCarriesTheGroupOnlyWhenSet) {
  const std::string with = DefinitionToJson(GroupDef("billing"));
  EXPECT_NE(with.find("\"consistency_group\": \"billing\""), std::string::npos) << with;
  Result<ReplicaDefinition> back = DefinitionFromJson(with, "test");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->consistency_group, "billing");
  EXPECT_EQ(DefinitionToJson(*back), with);

  const std::string without = DefinitionToJson(GroupDef(""));
  EXPECT_EQ(without.find("consistency_group"), std::string::npos)
      << "a VM outside any group keeps the replica.json it always had: " << without;
  back = DefinitionFromJson(without, "test");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->consistency_group, "");
  EXPECT_EQ(DefinitionToJson(*back), without);
}

TEST(GroupDefinitionTest, AGroupNameMustBeUsableAsAFileNameLikeTheVmName) {
  EXPECT_TRUE(ValidateDefinition(GroupDef("")).ok());
  EXPECT_TRUE(ValidateDefinition(GroupDef("db-tier_2.prod")).ok());
  for (const std::string& bad :
       std::vector<std::string>{"a/b", ".", "..", std::string(201, 'g'), std::string("x\0y", 3)}) {
    SCOPED_TRACE(bad);
    Status s = ValidateDefinition(GroupDef(bad));
    EXPECT_EQ(s.code(), EINVAL) << s.ToString();
    EXPECT_NE(s.message().find("consistency group"), std::string::npos) << s.ToString();
  }
  // A replica.json naming a bad group is refused when read.
  std::string text = DefinitionToJson(GroupDef("ok"));
  text.replace(text.find("\"ok\""), 4, "\"../up\"");
  Result<ReplicaDefinition> read = DefinitionFromJson(text, "replica.json");
  EXPECT_FALSE(read.ok());
  EXPECT_NE(read.status().message().find("consistency group"), std::string::npos)
      << read.status().ToString();
  testing::TempDir tmp;
  EXPECT_EQ(Replica::Create(tmp.path() / "r", GroupDef("a/b")).status().code(), EINVAL);
}

TEST(GroupDefinitionTest, AnOldReplicaJsonOpensWithNoGroupAndTheGroupCanChange) {
  testing::TempDir tmp;
  const fs::path dir = tmp.path() / "web01";
  ASSERT_TRUE(Replica::Create(dir, GroupDef("")).ok());
  // replica.json as written before groups existed.
  const std::string old_json = R"({
  "disks": [{"disk_id": )" + std::to_string(tracker::DiskIdFor("web01", "os")) +
                               R"(, "name": "os", "size": 1048576}],
  "epoch": 4,
  "frequency_ms": 300000,
  "primary_site": "east",
  "recovery_point_interval_ms": 3600000,
  "recovery_points": 0,
  "vm": "web01"
}
)";
  ASSERT_TRUE(WriteFileAtomic(dir / kDefinitionFile, old_json).ok());
  Result<std::unique_ptr<Replica>> r = Replica::Open(dir);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)->Definition().consistency_group, "");
  EXPECT_EQ((*r)->Definition().vm, "web01");

  // Joining a group, moving to another, leaving: each is stored.
  ASSERT_TRUE((*r)->UpdateDefinition(GroupDef("g1")).ok());
  EXPECT_EQ((*r)->Definition().consistency_group, "g1");
  r->reset();
  r = Replica::Open(dir);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)->Definition().consistency_group, "g1");
  r->reset();
  r = Replica::Create(dir, GroupDef("g2"));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)->Definition().consistency_group, "g2");
  EXPECT_EQ(LoadDefinition(dir)->consistency_group, "g2");
  ASSERT_TRUE((*r)->UpdateDefinition(GroupDef("")).ok());
  EXPECT_EQ(LoadDefinition(dir)->consistency_group, "");
  Result<std::string> text = ReadFile(dir / kDefinitionFile);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(text->find("consistency_group"), std::string::npos) << *text;
  EXPECT_EQ((*r)->UpdateDefinition(GroupDef("a/b")).code(), EINVAL);
  EXPECT_EQ(LoadDefinition(dir)->consistency_group, "");
}

// ---------------------------------------------------------------------------------------
// The apply gate

TEST_F(GroupTest, TheGateHoldsTheApplierThreadAndWakeLetsItGoOnOnceOpen) {
  TestGate gate(CutAt(2));
  MakePrimary();
  ASSERT_TRUE(replica_);
  replica_->SetApplyGate(gate.Fn());
  ASSERT_TRUE(replica_->Start().ok());
  for (int n = 1; n <= 4; ++n) ASSERT_EQ(Cycle(n), static_cast<uint64_t>(n));
  ASSERT_TRUE(WaitFor([&] { return replica_->ApplyHeld(); }));
  EXPECT_EQ(replica_->Position().applied_cycle, 2u);
  EXPECT_TRUE(replica_->Position().apply_held);
  // Held: the position stays, and the gate is asked again about cycle 3 (at least every
  // 100 ms), never about a later one.
  const size_t asked = gate.asked_count();
  std::this_thread::sleep_for(450ms);
  EXPECT_EQ(replica_->Position().applied_cycle, 2u);
  EXPECT_TRUE(replica_->ApplyHeld());
  EXPECT_GE(gate.asked_count(), asked + 2) << "asked again while held";
  for (const CycleInfo& c : gate.asked()) {
    EXPECT_LE(c.cycle, 3u);
    EXPECT_EQ(c.cut_unix_nanos, CutAt(static_cast<int>(c.cycle)));
  }
  ExpectImagesAt(2, "held at cycle 2");
  EXPECT_EQ(replica_->CommittedCuts(), (std::vector<int64_t>{CutAt(2), CutAt(3), CutAt(4)}));
  // Wake() makes it ask at once: in the same time, Wakes every 5 ms bring far more asks
  // than the 100 ms retry alone.
  const size_t quiet_start = gate.asked_count();
  std::this_thread::sleep_for(300ms);
  const size_t quiet = gate.asked_count() - quiet_start;
  const size_t woken_start = gate.asked_count();
  for (auto until = std::chrono::steady_clock::now() + 300ms;
       std::chrono::steady_clock::now() < until;) {
    replica_->Wake();
    std::this_thread::sleep_for(5ms);
  }
  const size_t woken = gate.asked_count() - woken_start;
  EXPECT_GT(woken, 2 * quiet + 4) << quiet << " asks without Wake, " << woken << " with";
  EXPECT_EQ(replica_->Position().applied_cycle, 2u);

  // Open as far as cycle 3: it goes on to 3 and holds 4.
  gate.set_limit(CutAt(3));
  replica_->Wake();
  ASSERT_TRUE(WaitFor([&] { return replica_->Position().applied_cycle == 3; }));
  ASSERT_TRUE(WaitFor([&] { return replica_->ApplyHeld(); }));
  EXPECT_EQ(gate.asked().back().cycle, 4u);
  // Open: it applies what is left; nothing is held.
  gate.set_limit(CutAt(100));
  replica_->Wake();
  ASSERT_TRUE(WaitFor([&] { return replica_->Position().applied_cycle == 4; }));
  EXPECT_FALSE(replica_->ApplyHeld());
  EXPECT_FALSE(replica_->Position().apply_held);
  // New cycles pass at once.
  Cycle(5);
  ASSERT_TRUE(WaitFor([&] { return replica_->Position().applied_cycle == 5; }));
  replica_->Stop();
  ExpectImagesAt(5, "after the gate opened");
  EXPECT_EQ(replica_->CommittedCuts(), std::vector<int64_t>{CutAt(5)});
}

TEST_F(GroupTest, RemovingTheGateReleasesAHeldApplierThread) {
  TestGate gate(0);  // holds everything
  MakePrimary();
  ASSERT_TRUE(replica_);
  replica_->SetApplyGate(gate.Fn());
  ASSERT_TRUE(replica_->Start().ok());
  Cycle(1);
  Cycle(2);
  ASSERT_TRUE(WaitFor([&] { return replica_->ApplyHeld(); }));
  EXPECT_EQ(replica_->Position().applied_cycle, 0u);
  replica_->SetApplyGate(nullptr);
  EXPECT_FALSE(replica_->ApplyHeld()) << "no gate, nothing held";
  ASSERT_TRUE(WaitFor([&] { return replica_->Position().applied_cycle == 2; }));
  replica_->Stop();
  ExpectImagesAt(2, "without the gate");
}

TEST_F(GroupTest, ApplyPendingStopsAtTheGateAndReturnsOk) {
  TestGate gate(CutAt(2));
  MakePrimary(/*recovery_points=*/2);
  ASSERT_TRUE(replica_);
  for (int n = 1; n <= 4; ++n) Cycle(n);
  replica_->SetApplyGate(gate.Fn());
  EXPECT_FALSE(replica_->ApplyHeld()) << "not asked yet";
  ASSERT_TRUE(replica_->ApplyPending().ok());
  ReplicaPosition pos = replica_->Position();
  EXPECT_EQ(pos.applied_cycle, 2u);
  EXPECT_EQ(pos.applied_cut_unix_nanos, CutAt(2));
  EXPECT_EQ(pos.received_cycle, 4u);
  EXPECT_GT(pos.pending_bytes, 0u);
  EXPECT_EQ(pos.apply_error, "") << "held is not an error";
  EXPECT_TRUE(pos.apply_held);
  EXPECT_TRUE(replica_->ApplyHeld());
  ExpectImagesAt(2, "stopped at the gate");
  // Asked about 1, 2 and 3 (refused), each with its CycleInfo.
  const std::vector<CycleInfo> asked = gate.asked();
  ASSERT_EQ(asked.size(), 3u);
  for (size_t i = 0; i < asked.size(); ++i) {
    EXPECT_EQ(asked[i].cycle, i + 1);
    EXPECT_EQ(asked[i].cut_unix_nanos, CutAt(static_cast<int>(i + 1)));
    EXPECT_GT(asked[i].first_change_unix_nanos, 0);
  }
  // Still held: ApplyPending asks once more and changes nothing.
  ASSERT_TRUE(replica_->ApplyPending().ok());
  EXPECT_EQ(replica_->Position().applied_cycle, 2u);
  EXPECT_EQ(gate.asked_count(), 4u);
  // A new gate has not answered yet: nothing counts as held until it is asked.
  TestGate open(CutAt(100));
  replica_->SetApplyGate(open.Fn());
  EXPECT_FALSE(replica_->ApplyHeld());
  ASSERT_TRUE(replica_->ApplyPending().ok());
  EXPECT_EQ(replica_->Position().applied_cycle, 4u);
  EXPECT_FALSE(replica_->ApplyHeld());
  ExpectImagesAt(4, "after the gate opened");
  std::vector<uint64_t> ids;
  for (const RecoveryPoint& p : replica_->Points()) ids.push_back(p.id);
  EXPECT_EQ(ids, (std::vector<uint64_t>{3, 4}));
}

TEST_F(GroupTest, CommittedCutsListTheLatestPointThenThePendingCycles) {
  MakePrimary();
  ASSERT_TRUE(replica_);
  EXPECT_TRUE(replica_->CommittedCuts().empty()) << "seeded images are no point";
  EXPECT_FALSE(replica_->CycleAtCut(CutAt(1)));
  for (int n = 1; n <= 3; ++n) Cycle(n * 10);
  EXPECT_EQ(replica_->CommittedCuts(), (std::vector<int64_t>{CutAt(10), CutAt(20), CutAt(30)}));
  EXPECT_EQ(replica_->CycleAtCut(CutAt(20)), 2u);
  EXPECT_FALSE(replica_->CycleAtCut(CutAt(20) + 1)) << "exactly the cut time";

  TestGate gate(CutAt(10));
  replica_->SetApplyGate(gate.Fn());
  ASSERT_TRUE(replica_->ApplyPending().ok());
  EXPECT_EQ(replica_->CommittedCuts(), (std::vector<int64_t>{CutAt(10), CutAt(20), CutAt(30)}))
      << "the applied cycle, then the pending ones";
  EXPECT_EQ(replica_->CycleAtCut(CutAt(10)), 1u);
  EXPECT_EQ(replica_->CycleAtCut(CutAt(30)), 3u);
  // The same after a restart (from position.json).
  replica_ = testing::ReopenReplica(dir(), replica_);
  ASSERT_TRUE(replica_);
  EXPECT_FALSE(replica_->ApplyHeld()) << "a gate is not kept across a restart";
  EXPECT_EQ(replica_->CommittedCuts(), (std::vector<int64_t>{CutAt(10), CutAt(20), CutAt(30)}));
  ASSERT_TRUE(replica_->ApplyPending().ok());
  EXPECT_EQ(replica_->CommittedCuts(), std::vector<int64_t>{CutAt(30)});
  EXPECT_FALSE(replica_->CycleAtCut(CutAt(10))) << "applied over: no longer reachable";
  EXPECT_EQ(replica_->CycleAtCut(CutAt(30)), 3u);
}

TEST_F(GroupTest, CommittedCutsOfAdoptedImages) {
  PrimaryVm primary(tmp_.path(), {{"os", 1 << 20}});
  primary.SeedReplica(dir());
  {
    Result<std::unique_ptr<Replica>> r = Replica::Adopt(dir(), primary.Definition(), CutAt(7));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ((*r)->CommittedCuts(), std::vector<int64_t>{CutAt(7)}) << "in sync: cycle 0";
    EXPECT_EQ((*r)->CycleAtCut(CutAt(7)), 0u);
  }
  Result<std::unique_ptr<Replica>> r = Replica::Adopt(dir(), primary.Definition(), std::nullopt);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE((*r)->CommittedCuts().empty()) << "not in sync: no point";
  EXPECT_FALSE((*r)->CycleAtCut(0));
}

// The gate let the cycle through when its apply started; an interrupted apply left part of
// it in the images, so it is finished without asking again.
TEST_F(GroupTest, AnInterruptedApplyIsFinishedWithoutAskingTheGate) {
  MakePrimary(/*recovery_points=*/2);
  ASSERT_TRUE(replica_);
  Cycle(1);
  ASSERT_TRUE(replica_->ApplyPending().ok());
  Cycle(2);
  Cycle(3);
  ASSERT_TRUE(failpoint::Arm("applier.mid_apply=error@3*1").ok());
  EXPECT_FALSE(replica_->ApplyPending().ok());
  failpoint::DisarmAll();
  replica_ = testing::ReopenReplica(dir(), replica_);
  ASSERT_TRUE(replica_);
  TestGate gate(0);  // refuses everything
  replica_->SetApplyGate(gate.Fn());
  ASSERT_TRUE(replica_->ApplyPending().ok());
  EXPECT_EQ(replica_->Position().applied_cycle, 2u);
  ExpectImagesAt(2, "the interrupted cycle finished");
  ASSERT_EQ(gate.asked().size(), 1u);
  EXPECT_EQ(gate.asked()[0].cycle, 3u) << "asked about the next cycle only";
  EXPECT_TRUE(replica_->ApplyHeld());
}

// BeginSync applies the committed cycles older than the sync first, asking the gate too:
// what it holds is replaced by the sync, and the point kept meanwhile is the one before.
TEST_F(GroupTest, BeginSyncLeavesWhatTheGateHoldsToTheSync) {
  MakePrimary(/*recovery_points=*/1);
  ASSERT_TRUE(replica_);
  for (int n = 1; n <= 3; ++n) Cycle(n);
  TestGate gate(CutAt(1));
  replica_->SetApplyGate(gate.Fn());
  const ReplicaDefinition def = replica_->Definition();
  SyncPlan plan;
  plan.sync_id = 5;
  plan.kind = SyncKind::kResync;
  plan.cut_unix_nanos = CutAt(5);
  plan.epoch = def.epoch;
  for (const DiskDefinition& d : def.disks) {
    plan.disks.push_back(SyncDiskPlan{d.disk_id, SyncMode::kCompare, 1000, 1000, d.size});
  }
  Result<SyncResume> resume = replica_->BeginSync(plan);
  ASSERT_TRUE(resume.ok()) << resume.status().ToString();
  EXPECT_EQ(replica_->Position().applied_cycle, 1u);
  EXPECT_FALSE(replica_->ApplyHeld()) << "the held cycle is gone";
  EXPECT_EQ(replica_->CommittedCuts(), std::vector<int64_t>{CutAt(1)})
      << "the staged sync keeps point 1; nothing is pending";
  ASSERT_EQ(gate.asked().size(), 2u);
  EXPECT_EQ(gate.asked()[1].cycle, 2u);
  ExpectImagesAt(1, "before the sync writes");
}

// Two members of a group, each gate answering from the other's CommittedCuts (what control
// does): a member applies a cycle only once the other has received as far. Both applier
// threads ask across at the same time.
TEST_F(GroupTest, TwoMembersGatedOnEachOtherNeverRunAheadOfTheOther) {
  fs::create_directories(tmp_.path() / "a-primary");
  fs::create_directories(tmp_.path() / "b-primary");
  auto pa = std::make_unique<PrimaryVm>(tmp_.path() / "a-primary",
                                        std::vector<testing::PrimaryDisk>{{"os", 1 << 20}});
  auto pb = std::make_unique<PrimaryVm>(tmp_.path() / "b-primary",
                                        std::vector<testing::PrimaryDisk>{{"os", 1 << 20}});
  ASSERT_FALSE(HasFailure());
  pa->SeedReplica(dir("a"));
  pb->SeedReplica(dir("b"));
  std::unique_ptr<Replica> a = testing::CreateReplica(dir("a"), pa->Definition());
  std::unique_ptr<Replica> b = testing::CreateReplica(dir("b"), pb->Definition());
  ASSERT_TRUE(a && b);
  // Each gate reads the other replica: both threads stop before either replica goes.
  struct StopBoth {
    Replica& a;
    Replica& b;
    ~StopBoth() {
      a.Stop();
      b.Stop();
    }
  } stop_both{*a, *b};
  auto reached = [](const Replica& other) {
    return [&other](const CycleInfo& c) {
      const std::vector<int64_t> cuts = other.CommittedCuts();
      return !cuts.empty() && cuts.back() >= c.cut_unix_nanos;
    };
  };
  a->SetApplyGate(reached(*b));
  b->SetApplyGate(reached(*a));
  ASSERT_TRUE(a->Start().ok());
  ASSERT_TRUE(b->Start().ok());
  std::mt19937_64 rng(7);
  auto ship = [&](PrimaryVm& p, Replica& r, Replica& other, int n) {
    p.RandomChanges(rng, 5);
    const uint64_t c = p.Cut();
    ASSERT_TRUE(p.Ship(r, c, CutAt(n)).ok());
    other.Wake();  // control wakes the group's other members on a commit
  };
  // A receives group instants 1 and 2, and a cut of its own at 3.
  ship(*pa, *a, *b, 1);
  ship(*pa, *a, *b, 2);
  ship(*pa, *a, *b, 3);
  ASSERT_TRUE(WaitFor([&] { return a->ApplyHeld(); }));
  EXPECT_EQ(a->Position().applied_cycle, 0u) << "B has nothing yet";
  // B receives instant 1: both may apply it; A holds at 2.
  ship(*pb, *b, *a, 1);
  ASSERT_TRUE(WaitFor([&] { return a->Position().applied_cycle == 1 && a->ApplyHeld(); }));
  ASSERT_TRUE(WaitFor([&] { return b->Position().applied_cycle == 1; }));
  EXPECT_EQ(a->CycleAtCut(CutAt(2)), 2u) << "instant 2 is reachable for A by applying";
  // B receives instants 2 and 4: A applies through its own cut 3, B holds 4.
  ship(*pb, *b, *a, 2);
  ship(*pb, *b, *a, 4);
  ASSERT_TRUE(WaitFor([&] { return a->Position().applied_cycle == 3; }));
  ASSERT_TRUE(WaitFor([&] { return b->Position().applied_cycle == 2 && b->ApplyHeld(); }));
  EXPECT_FALSE(a->ApplyHeld()) << "nothing pending";
  // A receives instant 4: both end there.
  ship(*pa, *a, *b, 4);
  ASSERT_TRUE(WaitFor([&] { return a->Position().applied_cycle == 4; }));
  ASSERT_TRUE(WaitFor([&] { return b->Position().applied_cycle == 3; }));
  EXPECT_EQ(a->CommittedCuts(), std::vector<int64_t>{CutAt(4)});
  EXPECT_EQ(b->CommittedCuts(), std::vector<int64_t>{CutAt(4)});
}

// ---------------------------------------------------------------------------------------
// A cycle with no changes

// A VM cut with its group while idle sends, for every disk, a segment holding only the cut
// record. It is applied like any other cycle: the images stay, and it becomes a recovery
// point (its cut time is the group instant the replicas meet at).
TEST_F(GroupTest, ACycleOfOnlyCutRecordsAppliesAndBecomesARecoveryPoint) {
  PrimaryVm& primary = MakePrimary(/*recovery_points=*/3);
  ASSERT_TRUE(replica_);
  primary.Write(0, 8192, Pattern(5000, 1));
  primary.Write(1, 0, Pattern(3000, 2));
  ASSERT_EQ(primary.Cut(), 1u);
  snaps_[1] = primary.Snapshot();
  std::vector<uint64_t> number, seq;
  for (const tracker::SealedSegment& s : primary.Sealed(1)) {
    number.push_back(s.number);
    seq.push_back(s.last_seq);
  }
  ASSERT_EQ(number.size(), 2u);
  ASSERT_TRUE(primary.Ship(*replica_, 1, CutAt(1)).ok());
  ASSERT_TRUE(replica_->ApplyPending().ok());

  // Cycle 2: only cuts.
  for (size_t d = 0; d < 2; ++d) {
    SegmentBuilder b(primary.disk_id(d), 3, ++seq[d]);
    b.Cut(2, CutAt(2));
    ASSERT_TRUE(SendSegment(*replica_, primary.disk_id(d), ++number[d], b.bytes()).ok());
  }
  ASSERT_TRUE(replica_->CommitCycle(CycleInfo{2, CutAt(2), 0}).ok());
  EXPECT_GT(replica_->Position().pending_bytes, 0u);
  EXPECT_EQ(replica_->CommittedCuts(), (std::vector<int64_t>{CutAt(1), CutAt(2)}));
  TestGate gate(CutAt(2));
  replica_->SetApplyGate(gate.Fn());
  ASSERT_TRUE(replica_->ApplyPending().ok());
  ASSERT_EQ(gate.asked().size(), 1u);
  EXPECT_EQ(gate.asked()[0].first_change_unix_nanos, 0) << "no change in the cycle";
  ReplicaPosition pos = replica_->Position();
  EXPECT_EQ(pos.applied_cycle, 2u);
  EXPECT_EQ(pos.applied_cut_unix_nanos, CutAt(2));
  EXPECT_EQ(pos.pending_bytes, 0u);
  EXPECT_EQ(pos.apply_error, "");
  ExpectImagesAt(1, "a cycle without changes changes nothing");
  EXPECT_TRUE(testing::ListDir(dir() / "received" / "os").empty()) << "its segments go";
  std::vector<RecoveryPoint> points = replica_->Points();
  ASSERT_EQ(points.size(), 2u);
  EXPECT_EQ(points[1].id, 2u);
  EXPECT_TRUE(points[1].latest);
  EXPECT_EQ(points[1].cut_unix_nanos, CutAt(2));
  EXPECT_EQ(replica_->CommittedCuts(), std::vector<int64_t>{CutAt(2)});

  // The next cycle writes again; point 2 still reads as cycle 1's content.
  for (size_t d = 0; d < 2; ++d) {
    SegmentBuilder b(primary.disk_id(d), 3, ++seq[d]);
    if (d == 0) b.Write(8192, Pattern(4096, 9));
    b.Cut(3, CutAt(3));
    ASSERT_TRUE(SendSegment(*replica_, primary.disk_id(d), ++number[d], b.bytes()).ok());
  }
  ASSERT_TRUE(replica_->CommitCycle(CycleInfo{3, CutAt(3), CutAt(3) - 1}).ok());
  gate.set_limit(CutAt(3));
  ASSERT_TRUE(replica_->ApplyPending().ok());
  EXPECT_EQ(replica_->Position().applied_cycle, 3u);
  points = replica_->Points();
  ASSERT_EQ(points.size(), 3u);
  for (uint64_t id : {1u, 2u}) {
    Result<std::unique_ptr<PointView>> view = replica_->OpenView(id);
    ASSERT_TRUE(view.ok()) << view.status().ToString();
    for (size_t d = 0; d < 2; ++d) {
      EXPECT_SAME_BYTES(ReadView(**view, d), snaps_[1][d],
                        "point " + std::to_string(id) + " disk " + std::to_string(d));
    }
  }
  Bytes expected = snaps_[1][0];
  const Bytes written = Pattern(4096, 9);
  std::copy(written.begin(), written.end(), expected.begin() + 8192);
  EXPECT_SAME_BYTES(ReadBytes(replica_->ImagePath(0)), expected, "cycle 3");
}

}  // namespace
}  // namespace siterep::applier
