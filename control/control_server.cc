#include "control/control_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/control_client.h"
#include "common/file_util.h"

namespace siterep::control {

ControlServer::~ControlServer() { Stop(); }

Status ControlServer::Start(const std::filesystem::path& path, Handler handler,
                            std::optional<gid_t> group) {
  path_ = path;
  handler_ = std::move(handler);
  group_ = group;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.native().size() >= sizeof(addr.sun_path)) {
    return Status::Invalid("control socket path is too long (max " +
                           std::to_string(sizeof(addr.sun_path) - 1) + "): " + path.string());
  }
  std::strcpy(addr.sun_path, path.c_str());
  SR_RETURN_IF_ERROR(MakeDirs(path.parent_path()));

  // A socket file nobody listens on is left over from a killed daemon: replace it.
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::Error(EEXIST, "control socket path " + path.string() +
                                       " exists and is not a socket");
    }
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      return Status::Error(EADDRINUSE, "control socket " + path.string() +
                                           " is in use by another siterepd");
    }
    ::unlink(path.c_str());
  }

  listen_fd_.Reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!listen_fd_.valid()) return Status::FromErrno(errno, "socket");
  // Create the socket file owner-only from the start: no window where others can connect.
  mode_t old_mask = ::umask(0177);
  int rc = ::bind(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int bind_errno = errno;
  ::umask(old_mask);
  if (rc != 0) return Status::FromErrno(bind_errno, "bind control socket " + path.string());
  if (group_) {
    // Group first, then the mode: the file never lets a group in that is not the one asked.
    if (::chown(path.c_str(), static_cast<uid_t>(-1), *group_) != 0 ||
        ::chmod(path.c_str(), 0660) != 0) {
      Status s = Status::FromErrno(errno, "give control socket " + path.string() + " to group " +
                                              std::to_string(*group_));
      listen_fd_.Reset();
      ::unlink(path.c_str());
      return s;
    }
  }
  if (::listen(listen_fd_.get(), 16) != 0) return Status::FromErrno(errno, "listen " + path.string());

  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return Status::FromErrno(errno, "pipe");
  wake_read_.Reset(pipe_fds[0]);
  wake_write_.Reset(pipe_fds[1]);
  thread_ = std::thread([this] { Serve(); });
  return Status::Ok();
}

void ControlServer::Stop() {
  if (!thread_.joinable()) return;
  char b = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_write_.get(), &b, 1);
  thread_.join();
  ReapWorkers(/*all=*/true);
  listen_fd_.Reset();
  ::unlink(path_.c_str());
}

namespace {
bool SendAll(int fd, const std::string& data);
}  // namespace

void ControlServer::Serve() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("control socket: poll: {}", std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    if ((fds[0].revents & POLLIN) == 0) continue;
    ReapWorkers(/*all=*/false);
    UniqueFd conn(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn.valid()) continue;
    if (workers_.size() >= static_cast<size_t>(kMaxClients)) {
      SendAll(conn.get(), ReplyLine(Refused("busy", "too many control requests at once")));
      continue;
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    workers_.push_back({std::thread([this, fd = std::move(conn), done]() mutable {
                          HandleConnection(fd.get());
                          fd.Reset();
                          done->store(true);
                        }),
                        done});
  }
}

void ControlServer::ReapWorkers(bool all) {
  for (auto it = workers_.begin(); it != workers_.end();) {
    if (all || it->done->load()) {
      it->thread.join();
      it = workers_.erase(it);
    } else {
      ++it;
    }
  }
}

namespace {

bool SendAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    off += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

bool ControlServer::PeerAllowed(int fd) const {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return false;
  if (cred.uid == 0 || cred.uid == ::geteuid()) return true;
  if (!group_) return false;
  if (cred.gid == *group_) return true;
  // The peer's supplementary groups, as they were when it connected.
  std::vector<gid_t> groups(64);
  for (;;) {
    socklen_t size = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &size) == 0) {
      groups.resize(size / sizeof(gid_t));
      break;
    }
    if (errno != ERANGE || groups.size() >= 65536) return false;
    groups.resize(size / sizeof(gid_t) + 1);
  }
  return std::find(groups.begin(), groups.end(), *group_) != groups.end();
}

void ControlServer::HandleConnection(int fd) {
  // A client that connects and says nothing must not hold the server forever.
  timeval timeout{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  if (!PeerAllowed(fd)) {
    const char* who = group_ ? "the control socket accepts only root and its group"
                             : "the control socket accepts only root";
    SendAll(fd, ReplyLine(Refused("permission-denied", who)));
    // Closing with the unread request still queued would reset the connection before the
    // client reads the refusal: end our side, then discard what it sent until it closes.
    ::shutdown(fd, SHUT_WR);
    char sink[4096];
    while (::recv(fd, sink, sizeof(sink), 0) > 0) {
    }
    return;
  }
  std::string line;
  char buf[65536];
  while (line.find('\n') == std::string::npos) {
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    line.append(buf, static_cast<size_t>(n));
    if (line.size() > kMaxControlMessage) {
      SendAll(fd, ReplyLine(Refused("bad-request", "request too large")));
      return;
    }
  }
  SendAll(fd, ReplyLine(AnswerRequest(line, handler_)));
}

}  // namespace siterep::control
