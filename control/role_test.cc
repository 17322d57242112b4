#include "control/role.h"

#include <gtest/gtest.h>

#include <fstream>

#include "common/file_util.h"
#include "common/testing/temp_dir.h"
#include "control/hooks.h"

namespace siterep::control {
namespace {

TEST(RoleTest, RoundTripsEveryField) {
  testing::TempDir tmp;
  RoleState s;
  s.role = Role::kPrimary;
  s.epoch = 7;
  s.peer = "west";
  s.phase = Phase::kFailedOver;
  s.target_epoch = 8;
  s.point = 42;
  s.committed = true;
  s.in_sync = true;
  s.note = "why";
  s.definition.vm = "vm1";
  s.definition.primary_site = "east";
  s.definition.epoch = 7;
  s.definition.disks.push_back({"d0", 12, 1 << 20});
  ASSERT_TRUE(StoreRole(tmp.path(), "vm1", s).ok());
  auto loaded = LoadRole(tmp.path(), "vm1");
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  ASSERT_TRUE(loaded->has_value());
  const RoleState& l = **loaded;
  EXPECT_EQ(l.role, Role::kPrimary);
  EXPECT_EQ(l.epoch, 7u);
  EXPECT_EQ(l.peer, "west");
  EXPECT_EQ(l.phase, Phase::kFailedOver);
  EXPECT_EQ(l.target_epoch, 8u);
  EXPECT_EQ(l.point, 42u);
  EXPECT_TRUE(l.committed);
  EXPECT_TRUE(l.in_sync);
  EXPECT_EQ(l.note, "why");
  ASSERT_EQ(l.definition.disks.size(), 1u);
  EXPECT_EQ(l.definition.disks[0].name, "d0");
  EXPECT_EQ(l.definition.disks[0].size, 1u << 20);
}

TEST(RoleTest, EveryPhaseHasAName) {
  testing::TempDir tmp;
  for (Phase p : {Phase::kNone, Phase::kFailingOver, Phase::kPromoting, Phase::kDemoting,
                  Phase::kFailedOver, Phase::kCommitting, Phase::kFenced}) {
    RoleState s;
    s.role = Role::kReplica;
    s.phase = p;
    ASSERT_TRUE(StoreRole(tmp.path(), "vm", s).ok());
    auto l = LoadRole(tmp.path(), "vm");
    ASSERT_TRUE(l.ok() && l->has_value()) << PhaseName(p);
    EXPECT_EQ((*l)->phase, p) << PhaseName(p);
  }
}

TEST(RoleTest, MissingIsNulloptAndDamagedIsRefused) {
  testing::TempDir tmp;
  auto none = LoadRole(tmp.path(), "vm");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  for (const char* bad : {"not json", "{\"role\": \"king\", \"epoch\": 1}",
                          "{\"role\": \"primary\", \"epoch\": 0}",
                          "{\"role\": \"primary\", \"epoch\": 1, \"phase\": \"dancing\"}"}) {
    ASSERT_TRUE(MakeDirs(tmp.path() / "vms" / "vm").ok());
    std::ofstream(RoleFile(tmp.path(), "vm")) << bad;
    auto l = LoadRole(tmp.path(), "vm");
    ASSERT_FALSE(l.ok()) << bad;
    EXPECT_NE(l.status().message().find("role.json is damaged"), std::string::npos)
        << l.status().message();
  }
}

TEST(RoleTest, LegacyEpochFileOrOne) {
  testing::TempDir tmp;
  auto one = LegacyEpoch(tmp.path(), "vm");
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(*one, 1u);
  ASSERT_TRUE(MakeDirs(tmp.path() / "vms" / "vm").ok());
  std::ofstream(tmp.path() / "vms" / "vm" / "epoch.json") << "{\"epoch\": 5}";
  auto five = LegacyEpoch(tmp.path(), "vm");
  ASSERT_TRUE(five.ok());
  EXPECT_EQ(*five, 5u);
}

TEST(ForkTest, UnionMergesOverlapsAndNeighbours) {
  using R = tracker::ByteRange;
  std::vector<R> a = {{0, 10}, {20, 5}, {100, 50}};
  std::vector<R> b = {{5, 10}, {25, 5}, {40, 10}, {149, 2}};
  EXPECT_EQ(UnionRanges(a, b), (std::vector<R>{{0, 15}, {20, 10}, {40, 10}, {100, 51}}));
  EXPECT_EQ(UnionRanges({}, b), (std::vector<R>{{5, 10}, {25, 5}, {40, 10}, {149, 2}}));
  EXPECT_TRUE(UnionRanges({}, {}).empty());
}

TEST(ForkTest, RangesRoundTripAndRefuseGarbage) {
  DiskRanges r = {{"os", {{0, 65536}, {131072, 65536}}}, {"data", {}}};
  auto back = DiskRangesFromJson(DiskRangesToJson(r));
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(*back, r);
  // An unsorted, overlapping list from a peer comes back sorted and merged.
  auto messy = DiskRangesFromJson(nlohmann::json::parse(R"({"os": [[100, 10], [0, 50], [40, 20]]})"));
  ASSERT_TRUE(messy.has_value());
  EXPECT_EQ((*messy)["os"], (std::vector<tracker::ByteRange>{{0, 60}, {100, 10}}));
  for (const char* bad : {R"([1, 2])", R"({"os": 5})", R"({"os": [[1]]})", R"({"os": [[-1, 2]]})",
                          R"({"os": [["a", 2]]})"}) {
    EXPECT_FALSE(DiskRangesFromJson(nlohmann::json::parse(bad)).has_value()) << bad;
  }
}

TEST(ForkTest, StoredAndRemoved) {
  testing::TempDir tmp;
  auto none = LoadFork(tmp.path(), "vm");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  ForkRecord f{17, {{"os", {{65536, 65536}}}}};
  ASSERT_TRUE(StoreFork(tmp.path(), "vm", f).ok());
  auto got = LoadFork(tmp.path(), "vm");
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->point, 17u);
  EXPECT_EQ((*got)->changed, f.changed);
  ASSERT_TRUE(RemoveFork(tmp.path(), "vm").ok());
  EXPECT_FALSE(LoadFork(tmp.path(), "vm")->has_value());
}

HookContext Context() { return {"vm1", "east", "pre_failover", "/run/siterep/east"}; }

TEST(HookTest, NoCommandRunsNothing) {
  HookResult r = RunHook("", Context(), std::chrono::seconds(5));
  EXPECT_FALSE(r.ran);
  EXPECT_TRUE(r.ok());
  EXPECT_TRUE(r.ToJson().is_null());
}

TEST(HookTest, SeesItsEnvironmentAndOutputIsKept) {
  HookResult r = RunHook("echo $SITEREP_VM $SITEREP_SITE $SITEREP_EVENT $SITEREP_MOUNTPOINT; echo oops >&2",
                         Context(), std::chrono::seconds(5));
  EXPECT_TRUE(r.ran);
  EXPECT_TRUE(r.ok()) << r.Failure();
  EXPECT_EQ(r.output, "vm1 east pre_failover /run/siterep/east\noops\n");
}

TEST(HookTest, AFailingHookSaysWhyWithItsLastLine) {
  HookResult r = RunHook("echo first; echo 'disk not ready'; exit 3", Context(),
                         std::chrono::seconds(5));
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_EQ(r.Failure(), "hook 'echo first; echo 'disk not ready'; exit 3' exited with 3: disk not ready");
}

TEST(HookTest, AResultSentByThePeerReadsBackTheSame) {
  HookResult r = RunHook("echo 'disk not ready'; exit 3", Context(), std::chrono::seconds(5));
  HookResult back = HookResult::FromJson(r.ToJson());
  EXPECT_EQ(back.Failure(), r.Failure());
  EXPECT_EQ(back.ToJson(), r.ToJson());
  EXPECT_FALSE(HookResult::FromJson(nullptr).ran);
}

TEST(HookTest, AHangingHookIsKilledAtTheTimeout) {
  const auto t0 = std::chrono::steady_clock::now();
  // The child keeps the output pipe open too: the whole group must go.
  HookResult r = RunHook("sleep 30 & sleep 30", Context(), std::chrono::milliseconds(300));
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(r.timed_out);
  EXPECT_FALSE(r.ok());
  EXPECT_LT(took, 10.0);
  EXPECT_NE(r.Failure().find("timed out"), std::string::npos) << r.Failure();
}

TEST(HookTest, AHookThatIgnoresTermIsKilled) {
  HookResult r = RunHook("trap '' TERM; sleep 30", Context(), std::chrono::milliseconds(200));
  EXPECT_TRUE(r.timed_out);
  EXPECT_EQ(r.exit_code, 128 + 9);
}

}  // namespace
}  // namespace siterep::control
