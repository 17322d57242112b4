// ControlServer: the daemon's end of the control socket (common/control_client.h has
// the protocol). One thread accepts connections; each is answered on a thread of its own
// (a failover may take minutes while `status` must still answer), at most kMaxClients at
// once. Each request is handed to the handler, whose JSON reply is sent back.
//
// The socket file is created with mode 0600 (owner root), and a peer whose uid
// (SO_PEERCRED) is neither 0 nor the daemon's own is refused; its request is never parsed.
// With a group (`[site] control_group`), the file is mode 0660 in that group, and a peer
// whose primary or supplementary groups (SO_PEERGROUPS) include it is served as well.
// A stale socket file (nobody listening) is replaced; a live one means another siterepd
// uses the path, and Start fails.
#pragma once

#include <atomic>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "control/request.h"
#include "common/unique_fd.h"

namespace siterep::control {

class ControlServer {
 public:
  // Called on the server thread for each request; returns the whole reply object.
  // (control/request.h: AnswerRequest parses the request and maps a throw to bad-request.)
  using Handler = RequestHandler;

  ControlServer() = default;
  ~ControlServer();  // Stop()
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // group: the gid that may use the socket besides root (none: root only).
  Status Start(const std::filesystem::path& path, Handler handler,
               std::optional<gid_t> group = std::nullopt);
  // Stops accepting, waits for the requests being answered, removes the socket file.
  // Idempotent.
  void Stop();

  static constexpr int kMaxClients = 32;

 private:
  void Serve();
  void HandleConnection(int fd);
  void ReapWorkers(bool all);
  bool PeerAllowed(int fd) const;

  std::filesystem::path path_;
  Handler handler_;
  std::optional<gid_t> group_;
  UniqueFd listen_fd_;
  UniqueFd wake_read_, wake_write_;  // a pipe that wakes poll() on Stop
  std::thread thread_;
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::vector<Worker> workers_;  // Serve's thread only (and Stop after joining it)
};


}  // namespace siterep::control
