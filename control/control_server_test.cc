#include "control/control_server.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "common/control_client.h"

namespace siterep::control {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

class ControlServerTest : public testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/siterep-ctl-XXXXXX";
    dir_ = mkdtemp(tmpl);
    path_ = dir_ / "ctl.sock";
  }
  void TearDown() override { fs::remove_all(dir_); }

  static json Echo(const json& r) {
    if (r["op"] == "fail") return Refused("nope", "refused on purpose");
    return Ok({{"echo", r["op"]}});
  }

  fs::path dir_, path_;
};

TEST_F(ControlServerTest, AnswersRequests) {
  ControlServer server;
  ASSERT_TRUE(server.Start(path_, Echo).ok());
  auto reply = CallControl(path_, {{"op", "ping"}});
  ASSERT_TRUE(reply.ok()) << reply.status().message();
  EXPECT_TRUE((*reply)["ok"].get<bool>());
  EXPECT_EQ((*reply)["result"]["echo"], "ping");

  reply = CallControl(path_, {{"op", "fail"}});
  ASSERT_TRUE(reply.ok());
  EXPECT_FALSE((*reply)["ok"].get<bool>());
  EXPECT_EQ((*reply)["error"], "nope");
  EXPECT_EQ((*reply)["message"], "refused on purpose");
}

TEST_F(ControlServerTest, SocketIsOwnerOnly) {
  ControlServer server;
  ASSERT_TRUE(server.Start(path_, Echo).ok());
  struct stat st;
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  server.Stop();
  EXPECT_FALSE(fs::exists(path_));
}

TEST_F(ControlServerTest, MalformedRequestIsRefused) {
  ControlServer server;
  ASSERT_TRUE(server.Start(path_, Echo).ok());
  for (const json& bad : {json::array({1, 2}), json{{"noop", 1}}, json{{"op", 7}}}) {
    auto reply = CallControl(path_, bad);
    ASSERT_TRUE(reply.ok());
    EXPECT_FALSE((*reply)["ok"].get<bool>()) << bad.dump();
    EXPECT_EQ((*reply)["error"], "bad-request");
  }
}

TEST_F(ControlServerTest, StaleSocketIsReplacedLiveOneRefused) {
  {
    // A socket file nobody listens on, as a killed daemon leaves it.
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path_.c_str());
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ::close(fd);
  }
  ControlServer first;
  ASSERT_TRUE(first.Start(path_, Echo).ok());
  ControlServer second;
  Status s = second.Start(path_, Echo);
  EXPECT_EQ(s.code(), EADDRINUSE) << s.message();
  EXPECT_TRUE(CallControl(path_, {{"op", "still-there"}}).ok());
}

TEST_F(ControlServerTest, OtherUsersAreRefused) {
  ControlServer server;
  ASSERT_TRUE(server.Start(path_, Echo).ok());
  // Even if someone loosens the modes, the uid check holds.
  ::chmod(dir_.c_str(), 0755);
  ::chmod(path_.c_str(), 0666);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (::setuid(65534) != 0) _exit(3);
    auto reply = CallControl(path_, {{"op", "ping"}});
    if (!reply.ok()) _exit(4);
    _exit((*reply)["ok"].get<bool>() ? 1 : ((*reply)["error"] == "permission-denied" ? 0 : 2));
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
}  // namespace siterep::control
