#include "shipper/peer_call.h"

#include <spdlog/spdlog.h>

#include <vector>

#include "shipper/wire_format.h"

namespace siterep::shipper {

using Clock = std::chrono::steady_clock;

nlohmann::json PeerErrorReply(std::string_view error, std::string_view message) {
  return {{"ok", false}, {"error", error}, {"message", message}};
}

std::string PeerRefusalMessage(const nlohmann::json& reply) {
  return reply.value("message", reply.value("error", std::string("refused")));
}

Result<nlohmann::json> CallPeer(const PeerCallOptions& options, const nlohmann::json& request) {
  const std::string what = "peer call to " + options.peer_site + " at " + options.address;
  if (options.tls == nullptr) return Status::Invalid(what + ": no TLS context");
  if (options.local_site.empty() || options.peer_site.empty() || options.address.empty()) {
    return Status::Invalid(what + ": local_site, peer_site and address are required");
  }
  if (options.connect_timeout.count() <= 0 || options.timeout.count() <= 0) {
    return Status::Invalid(what + ": connect_timeout and timeout must be positive");
  }
  if (!request.is_object()) {
    return Status::Invalid(what + ": the request must be a JSON object, not " +
                           request.type_name());
  }
  nlohmann::json message = request;
  message["from"] = options.local_site;
  message["to"] = options.peer_site;
  Result<std::vector<std::byte>> payload = EncodePeerMessage(message);
  if (!payload.ok()) return payload.status().WithContext(what);

  // TlsConnect connects without blocking and polls until the deadline, so the deadline
  // bounds connect and handshake together.
  Result<std::unique_ptr<TlsStream>> connected = TlsConnect(
      *options.tls, options.address, options.peer_site, Clock::now() + options.connect_timeout);
  if (!connected.ok()) return connected.status().WithContext(what);
  TlsStream& stream = **connected;

  const Deadline deadline = Clock::now() + options.timeout;
  SR_RETURN_IF_ERROR(
      stream.WriteAll(EncodeFrame(FrameType::kPeerRequest, *payload), deadline).WithContext(what));
  std::vector<std::byte> in;
  Result<FrameHeader> header =
      ReadFrame([&](std::span<std::byte> out) { return stream.ReadExact(out, deadline); }, &in);
  Status s = header.ok() ? VerifyFrame(*header, in) : header.status();
  if (!s.ok()) {
    // A frame that does not parse is the peer's fault, not the network's.
    if (s.code() == EBADMSG) return Status::Error(EPROTO, what + ": " + s.message());
    return s.WithContext(what);
  }
  if (header->type == FrameType::kError) {
    Result<ErrorFrame> e = DecodeError(in);
    return Status::Error(EPROTO, what + ": the peer closed the connection: " +
                                     (e.ok() ? e->reason : e.status().message()));
  }
  if (header->type != FrameType::kPeerReply) {
    return Status::Error(EPROTO, what + ": the peer answered with a " +
                                     std::string(FrameTypeName(header->type)) + " frame");
  }
  Result<nlohmann::json> reply = DecodePeerMessage(in);
  if (!reply.ok()) return Status::Error(EPROTO, what + ": " + reply.status().message());
  return std::move(*reply);
}

}  // namespace siterep::shipper
