#include "common/control_client.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "common/unique_fd.h"

namespace siterep {

Result<nlohmann::json> CallControl(const std::filesystem::path& socket_path,
                                   const nlohmann::json& request) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.native().size() >= sizeof(addr.sun_path)) {
    return Status::Invalid("control socket path is too long: " + socket_path.string());
  }
  std::strcpy(addr.sun_path, socket_path.c_str());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::FromErrno(errno, "socket");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return Status::FromErrno(errno, "cannot reach siterepd at " + socket_path.string());
  }
  std::string line = request.dump() + "\n";
  size_t off = 0;
  while (off < line.size()) {
    ssize_t n = ::send(fd.get(), line.data() + off, line.size() - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "send to " + socket_path.string());
    }
    off += static_cast<size_t>(n);
  }
  std::string reply;
  char buf[65536];
  while (reply.find('\n') == std::string::npos) {
    ssize_t n = ::recv(fd.get(), buf, sizeof(buf), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "receive from " + socket_path.string());
    }
    if (n == 0) break;
    reply.append(buf, static_cast<size_t>(n));
    if (reply.size() > kMaxControlMessage) return Status::Error(EMSGSIZE, "control reply too large");
  }
  if (reply.empty()) {
    return Status::Error(ECONNRESET, "siterepd at " + socket_path.string() +
                                         " closed the connection without an answer (did it "
                                         "stop? siterep status shows where things stand)");
  }
  auto parsed = nlohmann::json::parse(reply, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded() || !parsed.is_object() || !parsed.contains("ok")) {
    return Status::Error(EPROTO, "malformed reply from siterepd at " + socket_path.string());
  }
  return parsed;
}

}  // namespace siterep
