// Peer calls: one question from this site's daemon to the peer site's daemon, over the
// replication link's listener and TLS (the peer's [site] listen address; mutual
// certificates from the site CA, the peer's certificate must name the peer site).
//
// control/ uses them for failover: "promote this VM to primary at epoch N" (planned
// failover), "demote this VM" (reverse replication), "what is your role, epoch and health
// for VM X" (an unplanned failover is refused while the primary still answers). Each call
// is its own connection: connect, one PeerRequest, one PeerReply, close (wire_format.h).
// The peer's Receiver hands the request to its ReceiverOptions::peer_handler.
//
// What a caller can tell apart:
//   - the peer answered: CallPeer returns the reply object as the peer sent it, whatever
//     it says ({"ok": false, ...} included; the receiver's own refusals are listed in
//     wire_format.h: "unknown_site", "unsupported", "protocol", "internal");
//   - the peer could not be reached or did not answer: an error Status (see CallPeer).
//
// Threads: CallPeer blocks the calling thread for at most connect_timeout + timeout (plus
// name resolution, which is not bounded: prefer numeric addresses); any number of calls
// may run at once.
#pragma once

#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "common/status.h"
#include "shipper/tls.h"

namespace siterep::shipper {

struct PeerCallOptions {
  std::shared_ptr<const TlsContext> tls;
  std::string local_site;  // our site name (the receiver checks it against our certificate)
  std::string peer_site;   // expected name in the peer's certificate
  std::string address;     // host:port
  // TCP connect and TLS handshake.
  std::chrono::milliseconds connect_timeout{5000};
  // Sending the request and waiting for the reply, after connecting. A request whose
  // handler runs hooks (a promotion) needs this longer than the hooks take.
  std::chrono::milliseconds timeout{30000};
};

// Connects, sends request (a JSON object) as one PeerRequest with "from": local_site and
// "to": peer_site set (replacing what the request had there), waits for the PeerReply,
// closes. Returns the reply object as is.
// Errors (Status::code()):
//   EINVAL        bad options, or request is not an object; EMSGSIZE: request too large
//                 (wire_format.h kMaxPeerMessage). Nothing was sent.
//   unreachable:  ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, ... (the socket's errno), and
//                 ETIMEDOUT when connect_timeout passed during connect or handshake, or
//                 timeout passed before the whole reply arrived (the peer may then have
//                 acted on the request: a timeout is not a refusal).
//   EACCES        a certificate was refused in the handshake: the peer's by us (another
//                 CA, another name) or ours by the peer (tls.h).
//   EPIPE, ECONNRESET  the peer closed without replying (e.g. it is stopping).
//   EPROTO        not TLS 1.3, or the peer answered with something other than a PeerReply
//                 holding a JSON object (an Error frame from a peer too old to know peer
//                 calls, a reply that does not decode).
// Every message names the peer site and address.
Result<nlohmann::json> CallPeer(const PeerCallOptions& options, const nlohmann::json& request);

// {"ok": false, "error": error, "message": message}: the shape of every refusal in a reply
// (the receiver's own, and a handler's by convention).
nlohmann::json PeerErrorReply(std::string_view error, std::string_view message);
// The one line a refusal in that shape gives: its message, else its error name.
std::string PeerRefusalMessage(const nlohmann::json& reply);

}  // namespace siterep::shipper
