// The control socket's request parser under mutated input, in a running daemon: a real
// siterepd (Daemon::Start: FUSE mount, tracker, control socket) protecting one VM gets
// thousands of requests made by mutating well-formed ones (fields dropped, retyped,
// enlarged; ops renamed; raw bytes truncated, flipped, padded). Every request must get
// one JSON reply with a boolean "ok" (and, when refused, an error name and a message),
// the daemon must keep answering status, and the guest's disk must keep its data.
// The seed of the mutations is printed; SITEREP_MUTATION_SEED replays it and
// SITEREP_MUTATIONS sets the count (default 4000). Under `make check-asan` the same run
// is checked by AddressSanitizer and UBSan.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/config.h"
#include "common/control_client.h"
#include "control/daemon.h"

namespace siterep::control {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Sends raw bytes (a request line, well-formed or not) and returns the reply line, or ""
// when the daemon closed the connection without one.
std::string SendRaw(const fs::path& socket_path, const std::string& bytes) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "";
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_path.c_str(), sizeof(addr.sun_path) - 1);
  std::string reply;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    size_t off = 0;
    while (off < bytes.size()) {
      ssize_t n = ::send(fd, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
    ::shutdown(fd, SHUT_WR);
    char buf[65536];
    ssize_t n;
    while (reply.find('\n') == std::string::npos && (n = ::recv(fd, buf, sizeof(buf), 0)) > 0) {
      reply.append(buf, static_cast<size_t>(n));
    }
  }
  ::close(fd);
  if (auto nl = reply.find('\n'); nl != std::string::npos) reply.resize(nl);
  return reply;
}

// Well-formed requests of every kind the CLI sends (none arms a failpoint: an armed
// "abort" would end the test's own process).
std::vector<json> SeedRequests() {
  return {
      {{"op", "status"}},
      {{"op", "status"}, {"vm", "vm1"}},
      {{"op", "cut"}, {"vm", "vm1"}},
      {{"op", "enable"}, {"vm", "vm1"}, {"to", "west"}, {"seed", false}},
      {{"op", "pause"}, {"vm", "vm1"}},
      {{"op", "resume"}, {"vm", "vm1"}},
      {{"op", "resync"}, {"vm", "vm1"}, {"full", true}},
      {{"op", "points"}, {"vm", "vm1"}},
      {{"op", "export"}, {"vm", "vm1"}, {"disk", "d0"}, {"point", 1}, {"out", "/nonexistent/x"}},
      {{"op", "failover"}, {"vm", "vm1"}, {"kind", "planned"}},
      {{"op", "failover"}, {"vm", "vm1"}, {"kind", "unplanned"}, {"point", "latest"}},
      {{"op", "commit"}, {"vm", "vm1"}},
      {{"op", "reverse"}, {"vm", "vm1"}, {"wait_ms", 10}},
      {{"op", "failback"}, {"vm", "vm1"}},
      {{"op", "test-failover"}, {"vm", "vm1"}, {"action", "start"}, {"point", 1}},
      {{"op", "test-failover"}, {"vm", "vm1"}, {"action", "stop"}},
      {{"op", "verify"}, {"vm", "vm1"}, {"timeout_ms", 100}},
      {{"op", "plan-validate"}, {"plan", "/nonexistent/plan.toml"}, {"force", false}},
      {{"op", "plan-status"}},
      {{"op", "plan-status"}, {"plan", "p1"}},
      {{"op", "plan-run"}, {"plan", "/nonexistent/plan.toml"}, {"kind", "test"}, {"yes", true}},
      {{"op", "plan-continue"}, {"plan", "p1"}, {"yes", true}},
      {{"op", "plan-cancel"}, {"plan", "p1"}},
      {{"op", "plan-cleanup"}, {"plan", "p1"}},
  };
}

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}

  size_t Below(size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng_); }

  std::string RandomString() {
    static const std::string kChars =
        "abcdefghijklmnopqrstuvwxyz0123456789-_./:@= \"\\{}[],\t";
    static const char* kSpecial[] = {"", "vm1", "d0", "west", "east", "latest", "..",
                                     "/", "vm1\n", "\xc3\xa9t\xc3\xa9", "\xff\xfe", "%s%n"};
    if (Below(3) == 0) return kSpecial[Below(std::size(kSpecial))];
    std::string s(Below(4) == 0 ? Below(5000) : Below(24), 'x');
    for (char& c : s) c = kChars[Below(kChars.size())];
    return s;
  }

  json RandomValue(int depth = 0) {
    switch (Below(depth > 2 ? 7 : 9)) {
      case 0: return nullptr;
      case 1: return Below(2) == 0;
      case 2: return static_cast<int64_t>(Below(1000)) - 500;
      case 3: {
        static const uint64_t kEdges[] = {0, 1, UINT32_MAX, UINT64_MAX, uint64_t{1} << 63};
        return kEdges[Below(std::size(kEdges))];
      }
      case 4: return (Below(2) == 0 ? -1.0 : 1.0) * std::ldexp(1.0, static_cast<int>(Below(2100)) - 1050);
      case 5:
      case 6: return RandomString();
      case 7: {
        json a = json::array();
        for (size_t i = Below(4); i > 0; --i) a.push_back(RandomValue(depth + 1));
        return a;
      }
      default: {
        json o = json::object();
        for (size_t i = Below(4); i > 0; --i) o[RandomString()] = RandomValue(depth + 1);
        return o;
      }
    }
  }

  // One request line: a structured mutation of a seed, or its text damaged.
  std::string Next(const std::vector<json>& seeds) {
    json r = seeds[Below(seeds.size())];
    for (size_t n = 1 + Below(3); n > 0 && r.is_object(); --n) {
      std::vector<std::string> keys;
      for (auto& [k, v] : r.items()) keys.push_back(k);
      switch (Below(6)) {
        case 0:  // drop a field
          if (!keys.empty()) r.erase(keys[Below(keys.size())]);
          break;
        case 1:  // retype a field
          if (!keys.empty()) r[keys[Below(keys.size())]] = RandomValue();
          break;
        case 2:  // add a field
          r[Below(2) == 0 ? RandomString() : keys.empty() ? "vm" : keys[Below(keys.size())]] =
              RandomValue();
          break;
        case 3:  // another op (never "failpoint")
          r["op"] = Below(2) == 0 ? seeds[Below(seeds.size())]["op"] : json(RandomString());
          break;
        case 4:  // another VM name
          r["vm"] = RandomString();
          break;
        default:  // the whole request something else
          if (Below(4) == 0) r = RandomValue();
          break;
      }
    }
    if (r.is_object() && r.contains("op") && r["op"] == "failpoint") r["op"] = "status";
    std::string text = r.dump(-1, ' ', false, json::error_handler_t::replace);
    switch (Below(8)) {
      case 0:  // truncated
        text.resize(Below(text.size() + 1));
        break;
      case 1:  // a flipped byte
        if (!text.empty()) text[Below(text.size())] ^= static_cast<char>(1 + Below(255));
        break;
      case 2:  // trailing garbage, or a second request on the same line
        text += Below(2) == 0 ? RandomString() : std::string(" {\"op\":\"status\"}");
        break;
      case 3:  // deep nesting
        text = std::string(Below(2) == 0 ? 100 : 5000, '[') + text;
        break;
      default:
        break;
    }
    if (text.find("failpoint") != std::string::npos) text = "{\"op\":\"status\"}";
    return text + "\n";
  }

 private:
  std::mt19937_64 rng_;
};

class RequestMutationTest : public testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/siterep-mutation-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    image_ = dir_ / "d0.img";
    {
      std::ofstream f(image_, std::ios::binary);
      f.seekp((16 << 20) - 1);
      f.put('\0');
    }
    const std::string text = "[site]\nname = \"east\"\nstate_dir = \"" + (dir_ / "state").string() +
                             "\"\nmountpoint = \"" + (dir_ / "mnt").string() +
                             "\"\n\n[[vms]]\nname = \"vm1\"\n  [[vms.disks]]\n  name = \"d0\"\n"
                             "  image = \"" + image_.string() + "\"\n";
    auto config = ParseConfig(text, dir_, "site.toml");
    ASSERT_TRUE(config.ok()) << config.status().message();
    socket_ = config->control_socket;
    auto daemon = Daemon::Start(std::move(*config), {});
    ASSERT_TRUE(daemon.ok()) << daemon.status().message();
    daemon_ = std::move(*daemon);
    run_ = std::thread([this] { run_status_ = daemon_->Run(); });
  }

  void TearDown() override {
    if (daemon_) {
      daemon_->RequestStop();
      run_.join();
      EXPECT_TRUE(run_status_.ok()) << run_status_.message();
      daemon_.reset();
    }
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  fs::path disk() const { return dir_ / "mnt" / "vm1" / "d0"; }

  fs::path dir_, image_, socket_;
  std::unique_ptr<Daemon> daemon_;
  std::thread run_;
  Status run_status_;
};

TEST_F(RequestMutationTest, EveryMutatedRequestGetsOneWellFormedReply) {
  uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("SITEREP_MUTATION_SEED")) seed = std::strtoull(s, nullptr, 10);
  int count = 4000;
  if (const char* s = std::getenv("SITEREP_MUTATIONS")) count = std::atoi(s);
  std::printf("mutation seed %llu (SITEREP_MUTATION_SEED replays it), %d requests\n",
              static_cast<unsigned long long>(seed), count);

  // What the guest wrote before: it must read back at the end.
  std::string block(4096, '\0');
  for (size_t i = 0; i < block.size(); ++i) block[i] = static_cast<char>(i * 7 + 3);
  {
    int fd = ::open(disk().c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, block.data(), block.size(), 1 << 20), 4096);
    ASSERT_EQ(::fsync(fd), 0);
    ::close(fd);
  }

  Mutator mutate(seed);
  const std::vector<json> seeds = SeedRequests();
  int refused = 0, served = 0;
  std::map<std::string, int> errors;  // refusal name -> count, printed
  for (int i = 0; i < count; ++i) {
    const std::string request = mutate.Next(seeds);
    const std::string reply_text = SendRaw(socket_, request);
    json reply = json::parse(reply_text, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(reply.is_object() && reply.contains("ok") && reply["ok"].is_boolean())
        << "request #" << i << ": " << request.substr(0, 300) << "\nreply: " << reply_text.substr(0, 300);
    if (reply["ok"].get<bool>()) {
      ++served;
    } else {
      ++refused;
      if (reply.contains("error") && reply["error"].is_string()) ++errors[reply["error"]];
      ASSERT_TRUE(reply.contains("error") && reply["error"].is_string() &&
                  !reply["error"].get<std::string>().empty() && reply.contains("message") &&
                  reply["message"].is_string())
          << "request #" << i << ": " << request.substr(0, 300) << "\nreply: " << reply_text;
    }
    if (i % 500 == 499) {
      auto status = CallControl(socket_, {{"op", "status"}});
      ASSERT_TRUE(status.ok() && (*status)["ok"].get<bool>()) << "after request #" << i;
      ASSERT_EQ((*status)["result"]["vms"][0]["name"], "vm1");
    }
  }
  std::printf("%d served, %d refused:", served, refused);
  for (const auto& [name, n] : errors) std::printf(" %s %d", name.c_str(), n);
  std::printf("\n");
  EXPECT_GT(served, 0);
  EXPECT_GT(refused, count / 2);

  // The guest's disk still holds its data and takes writes.
  int fd = ::open(disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  std::string back(4096, '\0');
  ASSERT_EQ(::pread(fd, back.data(), back.size(), 1 << 20), 4096);
  EXPECT_EQ(back, block);
  EXPECT_EQ(::pwrite(fd, block.data(), block.size(), 2 << 20), 4096);
  EXPECT_EQ(::fsync(fd), 0);
  ::close(fd);
}

}  // namespace
}  // namespace siterep::control
