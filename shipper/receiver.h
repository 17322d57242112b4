// Receiver: the receiving end of the replication link, one per siterepd on the secondary.
//
// control/ starts one Receiver per daemon, listening on [site] listen. Each primary that
// replicates a VM here connects (TLS 1.3, mutual certificates; the peer's certificate must
// name one of allowed_peers), says Hello with the VM's definition, and streams the VM's
// sealed segments (wire format: shipper/wire_format.h). The receiver hands them to the VM's
// applier::SegmentSink, which control/ provides through SinkProvider (creating the replica
// when it does not exist yet), and acknowledges each cycle once the sink has committed it.
//
// Syncs (initial copy, seeded enable, resync): after the HelloReply, outside a cycle, the
// primary may send SyncBegin; the sink's BeginSync accepts it (SyncReply with where each
// disk stands) or refuses it (SyncReply "refused" with RefusalName of its errno and its
// message; the connection then closes, like a refused Hello). Until the SyncEnd, every
// HashRequest is answered from sink->SyncHashes with a HashReply, every SyncData goes to
// sink->WriteSyncData, and a SyncAck reports a disk's durable done offset whenever it has
// moved since the last one sent (or since the SyncReply). SyncEnd -> sink->EndSync, then an
// Ack of the sink's position (received = applied = the sync's cycle). HashRequest, SyncData
// or SyncEnd without a SyncBegin on the connection, a segment chunk during a sync, a frame
// for a disk that is not in the plan, a SyncBegin at another epoch than the Hello's, and
// any error of the sink are answered with an Error frame and the connection is closed.
// Heartbeats are answered in between as always.
//
// Refusals: a TLS peer that is not allowed is closed during the handshake, before any byte
// is read. A Hello whose "from" is not the certificate's site, whose "to" is not our site,
// or that the provider refuses (its Status's errno names the refusal, its message is sent)
// gets a HelloReply "refused" and the connection is closed. A bad frame (header, CRC, an
// undecodable or out-of-order payload) is answered with an Error frame and the connection
// is closed; nothing of that frame reaches the sink. After an Error frame on an accepted
// connection (a bad frame, a refusal of the sink such as ENOSPC) the receiver stops sending
// and reads and drops what the primary still sends, until it closes or for at most 1 s, so
// that the primary reads the reason instead of a connection reset.
//
// One connection per VM: a new connection for a VM from the same peer replaces the old one
// (the old stream is cancelled and its thread waited for before the new one touches the
// sink), so a primary reconnecting after a network cut does not wait for the old one's
// timeout. A connection for the VM from another peer is refused ("vm_busy").
//
// Peer calls (shipper/peer_call.h): a connection whose first frame is a PeerRequest
// instead of a Hello asks one question. The receiver checks that the request's "from" is
// the certificate's site (and its "to", when present, is ours; else it replies
// {"ok": false, "error": "unknown_site"}), calls peer_handler on the connection's thread,
// sends its answer as the PeerReply and closes the connection. No io_timeout applies
// while the handler runs (a promotion runs hooks and may take minutes); the reply is then
// written within io_timeout. Without a handler the reply is "unsupported"; a handler that
// throws, or answers with something that is not a JSON object of at most kMaxPeerMessage
// bytes, gets "internal" sent in its place.
//
// Dropping a VM: DropVm(vm) ends the VM's connection, for when this site stops being the
// VM's replica (a promotion): afterwards no connection thread uses the VM's sink.
//
// Failpoints: "receiver.corrupt_frame" (trigger: one byte of the next frame's payload is
// flipped after decryption, before the CRC check), "receiver.before_ack" (error: the
// connection drops after a CommitCycle, before its Ack; abort: crash there).
//
// Threads: an accept thread, plus one thread per connection (each owns its TLS stream and
// is the only caller of its sink while it runs). Public methods may be called from any
// thread, the peer handler included. The provider is called from connection threads,
// possibly concurrently for different VMs; so is the peer handler, possibly concurrently
// for different connections.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "applier/segment_sink.h"
#include "common/status.h"
#include "shipper/tls.h"

namespace siterep::shipper {

// Returns the VM's sink (creating the replica if needed; the sink must outlive the
// Receiver or at least every connection using it), or a refusal: ESTALE "epoch_older",
// EACCES "unknown_site", EBUSY "vm_busy", EINVAL "definition_mismatch", ... (RefusalName in
// wire_format.h); the message is sent to the primary and shown there.
using SinkProvider = std::function<Result<applier::SegmentSink*>(
    const std::string& peer_site, const applier::ReplicaDefinition& definition)>;

// Answers one peer request (shipper/peer_call.h). peer_site is the site the caller's
// certificate names (the request's "from" has been checked against it). Returns the reply,
// a JSON object; by convention {"ok": true, ...} or PeerErrorReply(name, message). Runs on
// the connection's thread, may block for as long as the request takes (the caller's
// PeerCallOptions::timeout bounds what it waits for), and may be called concurrently for
// different connections. Exceptions are caught and answered as "internal".
using PeerHandler =
    std::function<nlohmann::json(const std::string& peer_site, const nlohmann::json& request)>;

struct ReceiverOptions {
  std::string site;    // our site name (Hello.to must equal it)
  std::string listen;  // host:port, port 0 for tests
  std::shared_ptr<const TlsContext> tls;
  std::vector<std::string> allowed_peers;  // site names from [[peers]]
  SinkProvider provider;
  PeerHandler peer_handler;                     // empty: peer requests are answered "unsupported"
  std::chrono::milliseconds io_timeout{15000};  // no frame this long: close
  // TLS handshake and the first frame (Hello or PeerRequest).
  std::chrono::milliseconds handshake_timeout{10000};
};

struct ReceiverVmStats {
  std::string vm, peer;
  bool connected = false;
  int64_t last_contact_unix_nanos = 0;
  // Segment and sync data bytes (not zero extents, which carry none):
  uint64_t bytes_raw = 0;   // received, decompressed (total)
  uint64_t bytes_wire = 0;  // received as sent (total)
  double throughput_bytes_per_s = 0;
  int64_t primary_oldest_unapplied_change_unix_nanos = 0;  // from the last Heartbeat
  uint64_t primary_pending_bytes = 0;
  uint64_t received_cycle = 0;  // last cycle committed through this receiver
  std::string last_error;       // why the last connection of this VM ended badly; "" if fine
};

class Receiver {
 public:
  // Listens and starts the accept thread; fails when the address cannot be bound.
  static Result<std::unique_ptr<Receiver>> Start(ReceiverOptions options);
  ~Receiver();  // Stop()
  Receiver(const Receiver&) = delete;
  Receiver& operator=(const Receiver&) = delete;

  // Stops accepting, cancels every connection (handshakes included) and joins every
  // thread. Idempotent. No sink is called after it returns. A peer handler in progress
  // cannot be interrupted: Stop waits for it to return (its reply is then not sent), so
  // the owner must not call Stop from a peer handler, and must not leave a handler
  // waiting on something that only happens after Stop.
  void Stop();
  // Ends the VM's connection, if any (cancelled; the primary sees the link drop and
  // reconnects with its backoff), waits until no connection thread uses the VM's sink any
  // more, and removes the VM from Stats(). Afterwards the caller may destroy the sink. A
  // later Hello for the VM goes through the provider again, so make the provider refuse
  // the VM (or hand out another sink) before calling DropVm; a connection the provider
  // accepts while DropVm waits is ended as well. Blocks while a sink call of the VM's
  // connection (a commit's fsync) or the provider is running: do not call it with a lock
  // held that the provider or the sink takes. May be called from a peer handler.
  void DropVm(const std::string& vm);
  uint16_t port() const;
  // One entry per VM that has connected since Start, ordered by VM name.
  std::vector<ReceiverVmStats> Stats() const;
  // The most recent refused handshakes and Hellos (at most 16, oldest first), one line
  // each: "peer or address: reason".
  std::vector<std::string> RefusedPeers() const;

  class Impl;

 private:
  explicit Receiver(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace siterep::shipper
