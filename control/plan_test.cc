#include "control/plan.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <limits>
#include <sstream>

namespace siterep::control {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;

constexpr const char* kPlan = R"(name = "east-outage"
from = "east"
to = "west"
[[groups]]
name = "databases"
vms = ["db1"]
  [[groups.pre]]
  site = "west"
  run = "/usr/local/bin/check-storage"
  timeout = "60s"
  [[groups.post]]
  site = "west"
  run = "/usr/local/bin/start-vm db1"
  timeout = "5m"
  [[groups.manual]]
  message = "Confirm that the database accepts connections"
[[groups]]
name = "web"
vms = ["web01", "web02"]
)";

Result<RecoveryPlan> Parse(const std::string& text) { return ParsePlan(text, "plan.toml"); }

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

TEST(PlanTest, ParsesTheExampleWithEveryField) {
  auto plan = Parse(kPlan);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  EXPECT_EQ(plan->source, "plan.toml");
  EXPECT_EQ(plan->name, "east-outage");
  EXPECT_EQ(plan->from, "east");
  EXPECT_EQ(plan->to, "west");
  ASSERT_EQ(plan->groups.size(), 2u);
  const PlanGroup& db = plan->groups[0];
  EXPECT_EQ(db.name, "databases");
  EXPECT_EQ(db.vms, std::vector<std::string>{"db1"});
  ASSERT_EQ(db.pre.size(), 1u);
  EXPECT_EQ(db.pre[0].site, "west");
  EXPECT_EQ(db.pre[0].run, "/usr/local/bin/check-storage");
  EXPECT_EQ(db.pre[0].timeout, milliseconds(60'000));
  ASSERT_EQ(db.post.size(), 1u);
  EXPECT_EQ(db.post[0].site, "west");
  EXPECT_EQ(db.post[0].run, "/usr/local/bin/start-vm db1");
  EXPECT_EQ(db.post[0].timeout, milliseconds(300'000));
  ASSERT_EQ(db.manual.size(), 1u);
  EXPECT_EQ(db.manual[0].message, "Confirm that the database accepts connections");
  const PlanGroup& web = plan->groups[1];
  EXPECT_EQ(web.name, "web");
  EXPECT_EQ(web.vms, (std::vector<std::string>{"web01", "web02"}));
  EXPECT_TRUE(web.pre.empty() && web.post.empty() && web.manual.empty());
}

TEST(PlanTest, DefaultsAndOrderAreKept) {
  auto plan = Parse(R"(name = "p"
from = "a"
to = "b"
[[groups]]
name = "g"
vms = ["v"]
  [[groups.pre]]
  site = "a"
  run = "first"
  [[groups.pre]]
  site = "b"
  run = "second"
  timeout = "250ms"
)");
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  const PlanGroup& g = plan->groups[0];
  ASSERT_EQ(g.pre.size(), 2u);
  EXPECT_EQ(g.pre[0].run, "first");
  EXPECT_EQ(g.pre[0].site, "a");  // from may run actions too
  EXPECT_EQ(g.pre[0].timeout, std::chrono::minutes(5));
  EXPECT_EQ(g.pre[1].run, "second");
  EXPECT_EQ(g.pre[1].timeout, milliseconds(250));
  EXPECT_TRUE(g.post.empty());
  EXPECT_TRUE(g.manual.empty());
}

TEST(PlanTest, APlanWithoutGroupsIsRefused) {
  auto plan = Parse("name = \"p\"\nfrom = \"a\"\nto = \"b\"\n");
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), EINVAL);
  EXPECT_EQ(plan.status().message(),
            "plan.toml: groups: a plan needs at least one group ([[groups]])");
}

TEST(PlanTest, AnEmptyFileNamesEveryMissingKey) {
  auto plan = Parse("");
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(
      Lines(plan.status().message()),
      (std::vector<std::string>{
          "plan.toml: name: required key is missing", "plan.toml: from: required key is missing",
          "plan.toml: to: required key is missing",
          "plan.toml: groups: a plan needs at least one group ([[groups]])"}));
}

// Each mistake is refused with a message that names the file and the key.
struct BadCase {
  const char* replace_from;
  const char* replace_to;
  const char* expect_in_message;
};

class PlanBadFileTest : public testing::TestWithParam<BadCase> {};

TEST_P(PlanBadFileTest, NamesTheKey) {
  std::string text = kPlan;
  const BadCase& c = GetParam();
  size_t pos = text.find(c.replace_from);
  ASSERT_NE(pos, std::string::npos) << c.replace_from;
  text.replace(pos, std::string(c.replace_from).size(), c.replace_to);
  auto plan = Parse(text);
  ASSERT_FALSE(plan.ok()) << text;
  EXPECT_EQ(plan.status().code(), EINVAL);
  const std::string& message = plan.status().message();
  EXPECT_NE(message.find(c.expect_in_message), std::string::npos) << message;
  for (const std::string& line : Lines(message)) {
    EXPECT_EQ(line.rfind("plan.toml: ", 0), 0u) << line;
  }
}

INSTANTIATE_TEST_SUITE_P(
    PlanMistakes, PlanBadFileTest,
    testing::Values(
        BadCase{"name = \"east-outage\"", "name = \"east outage\"",
                "plan.toml: name: 'east outage' is not a valid name"},
        BadCase{"name = \"east-outage\"", "title = \"east-outage\"",
                "plan.toml: title: unknown key"},
        BadCase{"from = \"east\"\n", "", "plan.toml: from: required key is missing"},
        BadCase{"from = \"east\"", "from = 7", "plan.toml: from: must be a string"},
        BadCase{"to = \"west\"", "to = \"east\"", "plan.toml: to: 'east' is also the plan's from"},
        BadCase{"to = \"west\"", "to = \"\"", "plan.toml: to: must not be empty"},
        BadCase{"to = \"west\"", "to = \"west\"\nowner = \"ops\"", "plan.toml: owner: unknown key"},
        BadCase{"[[groups]]\nname = \"web\"", "[[groups]]\nname = \"databases\"",
                "groups[1].name: group 'databases' appears twice (also groups[0])"},
        BadCase{"name = \"web\"\n", "", "groups[1].name: required key is missing"},
        BadCase{"name = \"web\"", "name = \"web/1\"",
                "groups[1].name: 'web/1' is not a valid name"},
        BadCase{"vms = [\"web01\", \"web02\"]", "vms = [\"web01\", \"db1\"]",
                "groups[1].vms[1]: VM 'db1' is in group 'databases' and in group 'web'"},
        BadCase{"name = \"web\"\nvms = [\"web01\", \"web02\"]",
                "name = \"databases\"\nvms = [\"db1\"]",
                "groups[1].vms[0]: VM 'db1' is in group 'databases' (groups[0]) and in group "
                "'databases' (groups[1])"},
        BadCase{"vms = [\"web01\", \"web02\"]", "vms = [\"web01\", \"web01\"]",
                "groups[1].vms[1]: VM 'web01' appears twice in the group"},
        BadCase{"vms = [\"web01\", \"web02\"]", "vms = []",
                "groups[1].vms: a group needs at least one VM"},
        BadCase{"vms = [\"web01\", \"web02\"]", "", "groups[1].vms: a group needs at least one VM"},
        BadCase{"vms = [\"web01\", \"web02\"]", "vms = \"web01\"",
                "groups[1].vms: must be an array of strings"},
        BadCase{"vms = [\"web01\", \"web02\"]", "vms = [\"web01\", 2]",
                "groups[1].vms[1]: must be a string"},
        BadCase{"vms = [\"web01\", \"web02\"]", "vms = [\"../etc\"]",
                "groups[1].vms[0]: '../etc' is not a valid name"},
        BadCase{"vms = [\"web01\", \"web02\"]", "vms = [\"web01\"]\nhosts = 2",
                "groups[1].hosts: unknown key"},
        BadCase{"site = \"west\"\n  run = \"/usr/local/bin/check-storage\"",
                "site = \"north\"\n  run = \"/usr/local/bin/check-storage\"",
                "groups[0].pre[0].site: 'north' is neither the plan's from ('east') nor its to "
                "('west')"},
        BadCase{"site = \"west\"\n  run = \"/usr/local/bin/check-storage\"",
                "run = \"/usr/local/bin/check-storage\"",
                "groups[0].pre[0].site: required key is missing"},
        BadCase{"run = \"/usr/local/bin/start-vm db1\"", "run = \"\"",
                "groups[0].post[0].run: must not be empty"},
        BadCase{"run = \"/usr/local/bin/start-vm db1\"", "command = \"start\"",
                "groups[0].post[0].run: required key is missing"},
        BadCase{"timeout = \"60s\"", "timeout = \"0s\"",
                "groups[0].pre[0].timeout: must be positive"},
        BadCase{"timeout = \"60s\"", "timeout = \"soon\"",
                "groups[0].pre[0].timeout: 'soon' is not a duration"},
        BadCase{"timeout = \"60s\"", "timeout = 60", "groups[0].pre[0].timeout: must be a string"},
        BadCase{"timeout = \"5m\"", "timeout = \"5m\"\n  retries = 3",
                "groups[0].post[0].retries: unknown key"},
        BadCase{"[[groups.pre]]", "[groups.pre]",
                "groups[0].pre: must be an array of tables ([[groups.pre]])"},
        BadCase{"message = \"Confirm", "text = \"Confirm",
                "groups[0].manual[0].message: required key is missing"},
        BadCase{"message = \"Confirm", "text = \"Confirm", "groups[0].manual[0].text: unknown key"},
        BadCase{"vms = [\"web01\", \"web02\"]", "vms = [\"web01\"]\nmanual = [\"Confirm\"]",
                "groups[1].manual[0]: must be a table"}));

TEST(PlanTest, EveryMistakeIsReportedOnItsOwnLine) {
  std::string text = kPlan;
  auto replace = [&](const std::string& from, const std::string& to) {
    size_t pos = text.find(from);
    ASSERT_NE(pos, std::string::npos) << from;
    text.replace(pos, from.size(), to);
  };
  replace("to = \"west\"", "to = \"west\"\ncolour = \"red\"");            // unknown key
  replace("timeout = \"60s\"", "timeout = \"-1s\"");                      // not a duration
  replace("vms = [\"web01\", \"web02\"]", "vms = [\"web01\", \"db1\"]");  // in two groups
  auto plan = Parse(text);
  ASSERT_FALSE(plan.ok());
  std::vector<std::string> lines = Lines(plan.status().message());
  ASSERT_EQ(lines.size(), 3u) << plan.status().message();
  EXPECT_EQ(
      lines[0],
      "plan.toml: groups[0].pre[0].timeout: '-1s' is not a duration (e.g. 30s, 5m, 1h, 250ms)");
  EXPECT_EQ(lines[1],
            "plan.toml: groups[1].vms[1]: VM 'db1' is in group 'databases' and in group 'web'; "
            "a VM belongs to one group of a plan");
  EXPECT_EQ(lines[2], "plan.toml: colour: unknown key");
}

TEST(PlanTest, SyntaxErrorSaysLineAndColumn) {
  auto plan = Parse("name = \"p\"\nfrom = \"a\"\nto = west\n");
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().message().rfind("plan.toml:3:6: ", 0), 0u) << plan.status().message();
  EXPECT_EQ(Lines(plan.status().message()).size(), 1u);
}

TEST(PlanTest, LoadPlanRecordsTheAbsolutePath) {
  const std::string dir = testing::TempDir() + "plan_test_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  const std::filesystem::path file = std::filesystem::path(dir) / "east-outage.toml";
  std::ofstream(file) << kPlan;
  auto plan = LoadPlan(file);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  EXPECT_EQ(plan->source, std::filesystem::absolute(file));
  EXPECT_EQ(plan->groups.size(), 2u);

  std::ofstream(file, std::ios::trunc) << "name = \"p\"\n";
  auto bad = LoadPlan(file);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(file.string() + ": from: required key is missing"),
            std::string::npos)
      << bad.status().message();
  std::filesystem::remove_all(dir);
}

TEST(PlanTest, MissingFileSaysWhich) {
  auto plan = LoadPlan("/nonexistent/east-outage.toml");
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), ENOENT);
  EXPECT_NE(plan.status().message().find("/nonexistent/east-outage.toml"), std::string::npos)
      << plan.status().message();
}

TEST(PlanJsonTest, RoundTripsExactly) {
  auto plan = Parse(kPlan);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  json j = PlanToJson(*plan);
  EXPECT_EQ(j["source"], "plan.toml");
  EXPECT_EQ(j["groups"][0]["pre"][0]["timeout_ms"], 60'000);
  EXPECT_EQ(j["groups"][0]["manual"][0]["message"],
            "Confirm that the database accepts connections");
  EXPECT_EQ(j["groups"][1]["vms"], json({"web01", "web02"}));

  // As it travels over the control socket: text, then parsed again.
  auto back = PlanFromJson(json::parse(j.dump()));
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(*back, *plan);
  EXPECT_EQ(PlanToJson(*back), j);

  // Odd but valid values survive too: a timeout that is no round unit, an empty source.
  RecoveryPlan odd = *plan;
  odd.source.clear();
  odd.groups[1].post.push_back({"east", "echo 'a \"quoted\" arg'", milliseconds(1)});
  odd.groups[1].pre.push_back({"west", "true", milliseconds(86'400'000LL * 365)});
  auto odd_back = PlanFromJson(json::parse(PlanToJson(odd).dump()));
  ASSERT_TRUE(odd_back.ok()) << odd_back.status().message();
  EXPECT_EQ(*odd_back, odd);
}

TEST(PlanJsonTest, OptionalKeysMayBeLeftOut) {
  json j = {
      {"name", "p"},
      {"from", "a"},
      {"to", "b"},
      {"groups", {{{"name", "g"}, {"vms", {"v"}}, {"post", {{{"site", "b"}, {"run", "x"}}}}}}}};
  auto plan = PlanFromJson(j);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  EXPECT_TRUE(plan->source.empty());
  ASSERT_EQ(plan->groups[0].post.size(), 1u);
  EXPECT_EQ(plan->groups[0].post[0].timeout, std::chrono::minutes(5));
  EXPECT_TRUE(plan->groups[0].pre.empty());
}

TEST(PlanJsonTest, NotAnObjectIsRefused) {
  for (const json& j : {json(), json::array(), json("plan"), json(3)}) {
    auto plan = PlanFromJson(j);
    ASSERT_FALSE(plan.ok());
    EXPECT_EQ(plan.status().code(), EINVAL);
    EXPECT_EQ(plan.status().message().rfind("plan JSON: must be an object, not ", 0), 0u)
        << plan.status().message();
  }
}

// Malformed JSON (wrong types, unknown keys) and what the file rules refuse are refused,
// never thrown, with the key named.
struct BadJsonCase {
  void (*mutate)(json& plan);
  const char* expect_in_message;
  const char* line_prefix = "plan JSON from plan.toml: ";
};

class PlanBadJsonTest : public testing::TestWithParam<BadJsonCase> {};

TEST_P(PlanBadJsonTest, NamesTheKey) {
  auto plan = Parse(kPlan);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  json j = PlanToJson(*plan);
  GetParam().mutate(j);
  Result<RecoveryPlan> back = [&]() -> Result<RecoveryPlan> {
    try {
      return PlanFromJson(j);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "threw " << e.what();
      return Status::Invalid("threw");
    }
  }();
  ASSERT_FALSE(back.ok()) << j.dump();
  EXPECT_EQ(back.status().code(), EINVAL);
  const std::string& message = back.status().message();
  EXPECT_NE(message.find(GetParam().expect_in_message), std::string::npos) << message;
  for (const std::string& line : Lines(message)) {
    EXPECT_EQ(line.rfind(GetParam().line_prefix, 0), 0u) << line;
  }
}

INSTANTIATE_TEST_SUITE_P(
    PlanJsonMistakes, PlanBadJsonTest,
    testing::Values(
        BadJsonCase{[](json& j) { j["groups"] = "databases"; },
                    "groups: must be an array of objects"},
        BadJsonCase{[](json& j) { j["groups"] = json::array(); },
                    "groups: a plan needs at least one group"},
        BadJsonCase{[](json& j) { j["groups"][1] = 5; }, "groups[1]: must be an object"},
        BadJsonCase{[](json& j) { j.erase("name"); }, "name: required key is missing"},
        BadJsonCase{[](json& j) { j["from"] = nullptr; }, "from: must be a string"},
        BadJsonCase{[](json& j) { j["to"] = "east"; }, "to: 'east' is also the plan's from"},
        BadJsonCase{[](json& j) { j["version"] = 2; }, "version: unknown key"},
        BadJsonCase{[](json& j) { j["source"] = 1; }, "source: must be a string",
                    "plan JSON: "},  // a source that is not a string is not named
        BadJsonCase{[](json& j) {
                      j["groups"][0]["vms"] = {"db1", true};
                    },
                    "groups[0].vms[1]: must be a string"},
        BadJsonCase{[](json& j) { j["groups"][1]["vms"].push_back("db1"); },
                    "groups[1].vms[2]: VM 'db1' is in group 'databases' and in group 'web'"},
        BadJsonCase{[](json& j) { j["groups"][0]["pre"][0]["timeout_ms"] = "60s"; },
                    "groups[0].pre[0].timeout_ms: must be an integer (milliseconds)"},
        BadJsonCase{[](json& j) { j["groups"][0]["pre"][0]["timeout_ms"] = 1.5; },
                    "groups[0].pre[0].timeout_ms: must be an integer (milliseconds)"},
        BadJsonCase{[](json& j) { j["groups"][0]["pre"][0]["timeout_ms"] = 0; },
                    "groups[0].pre[0].timeout_ms: must be positive"},
        BadJsonCase{[](json& j) { j["groups"][0]["pre"][0]["timeout_ms"] = -5; },
                    "groups[0].pre[0].timeout_ms: must be positive"},
        BadJsonCase{[](json& j) {
                      j["groups"][0]["pre"][0]["timeout_ms"] = std::numeric_limits<uint64_t>::max();
                    },
                    "groups[0].pre[0].timeout_ms: is out of range"},
        BadJsonCase{[](json& j) { j["groups"][0]["post"][0]["site"] = "north"; },
                    "groups[0].post[0].site: 'north' is neither"},
        BadJsonCase{[](json& j) { j["groups"][0]["post"][0]["timeout"] = "5m"; },
                    "groups[0].post[0].timeout: unknown key"},
        BadJsonCase{[](json& j) {
                      j["groups"][0]["manual"] = {{"message", "x"}};
                    },
                    "groups[0].manual: must be an array of objects"},
        BadJsonCase{[](json& j) { j["groups"][0]["manual"][0]["message"] = ""; },
                    "groups[0].manual[0].message: must not be empty"}));

TEST(PlanJsonTest, EveryMistakeIsReportedOnItsOwnLine) {
  auto plan = Parse(kPlan);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  json j = PlanToJson(*plan);
  j["groups"][0]["vms"] = json::array();
  j["groups"][1]["name"] = "databases";
  j["groups"][0]["post"][0]["run"] = 7;
  auto back = PlanFromJson(j);
  ASSERT_FALSE(back.ok());
  EXPECT_EQ(Lines(back.status().message()),
            (std::vector<std::string>{
                "plan JSON from plan.toml: groups[0].vms: a group needs at least one VM (vms = "
                "[\"...\"])",
                "plan JSON from plan.toml: groups[0].post[0].run: must be a string",
                "plan JSON from plan.toml: groups[1].name: group 'databases' appears twice (also "
                "groups[0])"}));
}

TEST(PlanRunTextTest, ReportsEveryStepAndWhatFailed) {
  auto plan = Parse(kPlan);
  ASSERT_TRUE(plan.ok()) << plan.status().message();
  json run = {{"plan", PlanToJson(*plan)},
              {"kind", "unplanned"},
              {"site", "west"},
              {"state", "failed"},
              {"started", "2026-11-26T10:00:00Z"},
              {"ended", nullptr},
              {"message", "group web: VM web01 failed: no recovery point"},
              {"consistency", {{"core", {{"time", "2026-11-26T09:59:58Z"},
                                         {"members", {"db1", "app1"}}}}}},
              {"groups",
               {{{"name", "databases"},
                 {"state", "done"},
                 {"seconds", 1.5},
                 {"pre", {{{"site", "west"}, {"run", "check"}, {"state", "done"},
                           {"exit_code", 0}, {"output", "first\nstorage ok\n"}}}},
                 {"vms", {{{"vm", "db1"}, {"state", "done"}, {"rto_seconds", 0.25},
                           {"point", {{"id", 12}, {"time", "2026-11-26T09:59:58Z"}}},
                           {"data_loss_window_seconds", 2.0},
                           {"hooks", {{"post_failover", {{"exit_code", 0}}}}}}}},
                 {"post", json::array()},
                 {"manual", {{{"message", "check db"}, {"state", "confirmed"},
                              {"confirmed_by", "--yes"}}}}},
                {{"name", "web"},
                 {"state", "failed"},
                 {"pre", json::array()},
                 {"vms", {{{"vm", "web01"}, {"state", "failed"},
                           {"data_loss_window_seconds", nullptr},
                           {"error", "no recovery point"}}}},
                 {"post", {{{"site", "east"}, {"run", "notify"}, {"state", "pending"}}}},
                 {"manual", json::array()}}}}};
  const std::string text = PlanRunText(run);
  for (const char* part :
       {"plan east-outage: unplanned run, east -> west, at west: failed",
        "consistency group core (db1, app1): instant 2026-11-26T09:59:58Z",
        "group databases: done, 1.50 s", "pre   at west: check  done, exit 0",
        "output: storage ok", "vm    db1  done, RTO 0.25 s, point 12 (2026-11-26T09:59:58Z), "
        "data loss 2.00 s",
        "post_failover: exit 0", "manual \"check db\"  confirmed by --yes",
        "vm    web01  failed, data loss unknown", "error: no recovery point",
        "post  at east: notify  pending", "group web: VM web01 failed: no recovery point"}) {
    EXPECT_NE(text.find(part), std::string::npos) << "missing: " << part << "\nin:\n" << text;
  }
}

}  // namespace
}  // namespace siterep::control
