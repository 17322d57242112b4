#include "common/config.h"

#include <gtest/gtest.h>

namespace siterep {
namespace {

constexpr const char* kGood = R"(
[site]
name = "east"
state_dir = "state"
mountpoint = "/run/siterep/east"
control_socket = "/run/siterep/east.sock"
control_group = "siterep"
listen = "127.0.0.1:7410"
peer_wait = "20s"

[tls]
ca = "certs/ca.pem"
cert = "certs/east.pem"
key = "certs/east.key"

[[peers]]
name = "west"
address = "127.0.0.1:7420"
bandwidth_limit = "50MiB"
compression = "zstd"
allow_plan_actions = true

[[vms]]
name = "web01"
frequency = "30s"
recovery_points = 4
recovery_point_interval = "1h"
tracking = "log"
resync = "auto"
resync_window = "18:30-06:00"
pre_failover = "virsh shutdown web01"
post_failover = "virsh start web01"
hook_timeout = "2m"
consistency_group = "front"
  [[vms.disks]]
  name = "os"
  image = "/var/lib/images/web01-os.img"
  [[vms.disks]]
  name = "data"
  image = "images/web01-data.img"

[[vms]]
name = "db1"
frequency = "continuous"
tracking = "off"
image_cache = "none"
cow_limit = "512MiB"
  [[vms.disks]]
  name = "os"
  image = "/var/lib/images/db1.img"

[[hooks]]
vm = "app7"
post_failover = "/usr/local/bin/start-vm app7"
timeout = "90s"
)";

Result<SiteConfig> Parse(const std::string& text) {
  return ParseConfig(text, "/etc/siterep", "site.toml");
}

TEST(ConfigTest, ParsesTheDesignExample) {
  auto cfg = Parse(kGood);
  ASSERT_TRUE(cfg.ok()) << cfg.status().message();
  EXPECT_EQ(cfg->name, "east");
  EXPECT_EQ(cfg->control_group, "siterep");
  EXPECT_EQ(cfg->state_dir, "/etc/siterep/state");  // relative to the config's folder
  EXPECT_EQ(cfg->tls.ca, "/etc/siterep/certs/ca.pem");
  ASSERT_EQ(cfg->peers.size(), 1u);
  EXPECT_EQ(cfg->peers[0].address, "127.0.0.1:7420");
  EXPECT_EQ(cfg->peers[0].bandwidth_limit, 50ull << 20);
  EXPECT_TRUE(cfg->peers[0].compress);
  ASSERT_EQ(cfg->vms.size(), 2u);
  const VmConfig& web = cfg->vms[0];
  EXPECT_EQ(web.frequency.count(), 30'000);
  EXPECT_EQ(web.recovery_points, 4);
  ASSERT_EQ(web.disks.size(), 2u);
  EXPECT_EQ(web.disks[1].image, "/etc/siterep/images/web01-data.img");
  const VmConfig& db = cfg->vms[1];
  EXPECT_EQ(db.frequency.count(), 1000);  // continuous
  EXPECT_EQ(db.tracking, TrackingMode::kOff);
  EXPECT_EQ(db.image_cache, ImageCache::kNone);
  EXPECT_EQ(web.image_cache, ImageCache::kWriteback);  // the default
  EXPECT_EQ(db.cow_limit, uint64_t{512} << 20);
  EXPECT_EQ(web.cow_limit, 0u);  // the default: no bound but the file system's
  EXPECT_EQ(cfg->FindVm("db1"), &cfg->vms[1]);
  EXPECT_EQ(cfg->FindVm("nope"), nullptr);
}

TEST(ConfigTest, DefaultsFollowTheDesign) {
  auto cfg = Parse(R"([site]
name = "a"
state_dir = "/s"
mountpoint = "/m"
[[vms]]
name = "v"
  [[vms.disks]]
  name = "d"
  image = "/i.img"
)");
  ASSERT_TRUE(cfg.ok()) << cfg.status().message();
  EXPECT_EQ(cfg->control_socket, "/s/control.sock");
  EXPECT_EQ(cfg->control_group, "");  // root only
  EXPECT_EQ(cfg->vms[0].tracking, TrackingMode::kLog);
  EXPECT_TRUE(cfg->vms[0].auto_resync);
  EXPECT_TRUE(InResyncWindow(cfg->vms[0], 0));
  EXPECT_TRUE(InResyncWindow(cfg->vms[0], 1439));
}

TEST(ConfigTest, FailoverHooksFromVmsAndHooks) {
  auto cfg = Parse(kGood);
  ASSERT_TRUE(cfg.ok()) << cfg.status().message();
  EXPECT_EQ(cfg->peer_wait, std::chrono::seconds(20));
  FailoverHooks web = cfg->HooksFor("web01");
  EXPECT_EQ(web.pre_failover, "virsh shutdown web01");
  EXPECT_EQ(web.post_failover, "virsh start web01");
  EXPECT_EQ(web.timeout, std::chrono::minutes(2));
  FailoverHooks app = cfg->HooksFor("app7");
  EXPECT_EQ(app.pre_failover, "");
  EXPECT_EQ(app.post_failover, "/usr/local/bin/start-vm app7");
  EXPECT_EQ(app.timeout, std::chrono::seconds(90));
  FailoverHooks none = cfg->HooksFor("db1");
  EXPECT_TRUE(none.pre_failover.empty() && none.post_failover.empty());
  EXPECT_EQ(none.timeout, std::chrono::minutes(5));
}

TEST(ConfigTest, ConsistencyGroupAndPlanActions) {
  auto cfg = Parse(kGood);
  ASSERT_TRUE(cfg.ok()) << cfg.status().message();
  EXPECT_EQ(cfg->vms[0].consistency_group, "front");
  EXPECT_EQ(cfg->vms[1].consistency_group, "");
  EXPECT_TRUE(cfg->peers[0].allow_plan_actions);
  auto plain = Parse(
      std::string(kGood).replace(std::string(kGood).find("allow_plan_actions = true"), 25, ""));
  ASSERT_TRUE(plain.ok()) << plain.status().message();
  EXPECT_FALSE(plain->peers[0].allow_plan_actions);
}

TEST(ConfigTest, ResyncWindowMayWrapPastMidnight) {
  auto cfg = Parse(kGood);
  ASSERT_TRUE(cfg.ok()) << cfg.status().message();
  const VmConfig& vm = cfg->vms[0];
  EXPECT_TRUE(InResyncWindow(vm, 18 * 60 + 30));
  EXPECT_TRUE(InResyncWindow(vm, 2 * 60));
  EXPECT_FALSE(InResyncWindow(vm, 6 * 60));
  EXPECT_FALSE(InResyncWindow(vm, 12 * 60));
  EXPECT_FALSE(InResyncWindow(vm, 18 * 60 + 29));
}

// Each bad config is refused with a message that names the key.
struct BadCase {
  const char* replace_from;
  const char* replace_to;
  const char* expect_in_message;
};

class BadConfigTest : public testing::TestWithParam<BadCase> {};

TEST_P(BadConfigTest, NamesTheKey) {
  std::string text = kGood;
  const BadCase& c = GetParam();
  size_t pos = text.find(c.replace_from);
  ASSERT_NE(pos, std::string::npos) << c.replace_from;
  text.replace(pos, std::string(c.replace_from).size(), c.replace_to);
  auto cfg = Parse(text);
  ASSERT_FALSE(cfg.ok());
  EXPECT_NE(cfg.status().message().find(c.expect_in_message), std::string::npos)
      << cfg.status().message();
  EXPECT_NE(cfg.status().message().find("site.toml"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(
    All, BadConfigTest,
    testing::Values(
        BadCase{"frequency = \"30s\"", "frequency = \"10s\"", "vms[0].frequency"},
        BadCase{"frequency = \"30s\"", "frequency = 30", "vms[0].frequency: must be a string"},
        BadCase{"tracking = \"log\"", "tracking = \"log\"\nlog_budget = \"25%\"",
                "vms[0].log_budget: no longer used"},
        BadCase{"tracking = \"log\"", "tracking = \"maybe\"", "vms[0].tracking"},
        BadCase{"image_cache = \"none\"", "image_cache = \"unsafe\"", "vms[1].image_cache"},
        BadCase{"cow_limit = \"512MiB\"", "cow_limit = \"lots\"", "vms[1].cow_limit"},
        BadCase{"cow_limit = \"512MiB\"", "cow_limit = -1",
                "vms[1].cow_limit: must not be negative"},
        BadCase{"recovery_points = 4", "recovery_points = -1", "vms[0].recovery_points"},
        BadCase{"recovery_point_interval = \"1h\"", "recovery_point_interval = \"1x\"",
                "vms[0].recovery_point_interval"},
        BadCase{"name = \"east\"", "nam = \"east\"", "site.name: required key is missing"},
        BadCase{"listen = \"127.0.0.1:7410\"", "listen = \"x\"\ncolour = \"blue\"",
                "site.colour: unknown key"},
        BadCase{"name = \"data\"", "name = \"os\"", "vms[0].disks[1].name"},
        BadCase{"image = \"images/web01-data.img\"", "", "vms[0].disks[1].image: required"},
        BadCase{"name = \"db1\"", "name = \"web01\"", "vms[1].name"},
        BadCase{"name = \"west\"", "name = \"east\"", "peers[0].name"},
        BadCase{"name = \"web01\"", "name = \"../etc\"", "vms[0].name"},
        BadCase{"[tls]", "[tls]\nca = 1", "site.toml:13:"},
        BadCase{"bandwidth_limit = \"50MiB\"", "bandwidth_limit = \"fast\"",
                "peers[0].bandwidth_limit"},
        BadCase{"bandwidth_limit = \"50MiB\"", "bandwidth_limit = -5", "peers[0].bandwidth_limit"},
        BadCase{"compression = \"zstd\"", "compression = \"lz4\"", "peers[0].compression"},
        BadCase{"resync = \"auto\"", "resync = \"sometimes\"", "vms[0].resync"},
        BadCase{"resync_window = \"18:30-06:00\"", "resync_window = \"18:30\"",
                "vms[0].resync_window"},
        BadCase{"resync_window = \"18:30-06:00\"", "resync_window = \"25:00-06:00\"",
                "vms[0].resync_window"},
        BadCase{"hook_timeout = \"2m\"", "hook_timeout = \"soon\"", "vms[0].hook_timeout"},
        BadCase{"peer_wait = \"20s\"", "peer_wait = \"0s\"", "site.peer_wait: must be positive"},
        BadCase{"allow_plan_actions = true", "allow_plan_actions = \"yes\"",
                "peers[0].allow_plan_actions: must be true or false"},
        BadCase{"consistency_group = \"front\"", "consistency_group = \"a b\"",
                "vms[0].consistency_group: 'a b' is not a valid name"},
        BadCase{"image_cache = \"none\"", "image_cache = \"none\"\nconsistency_group = \"front\"",
                "vms[1].consistency_group: VM 'db1' has tracking = \"off\""},
        BadCase{"tracking = \"off\"", "tracking = \"log\"\nconsistency_group = \"front\"",
                "vms[1].consistency_group: VM 'db1' replicates every continuous, but VM 'web01'"},
        BadCase{"vm = \"app7\"", "vm = \"web01\"", "hooks[0].vm: VM 'web01' is in [[vms]]"},
        BadCase{"timeout = \"90s\"", "timeout = \"90s\"\nwhen = \"now\"",
                "hooks[0].when: unknown key"},
        BadCase{"[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/east.pem\"\nkey = \"certs/east.key\"",
                "", "tls: the [tls] table"}));

TEST(ConfigTest, MissingFileSaysWhich) {
  auto cfg = LoadConfig("/nonexistent/site.toml");
  ASSERT_FALSE(cfg.ok());
  EXPECT_NE(cfg.status().message().find("/nonexistent/site.toml"), std::string::npos);
}

}  // namespace
}  // namespace siterep
