#include "shipper/receiver.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "common/failpoint.h"
#include "common/time_util.h"
#include "shipper/peer_call.h"
#include "shipper/rate_limiter.h"
#include "shipper/wire_format.h"
#include "tracker/log_format.h"

namespace siterep::shipper {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kMaxRefusals = 16;
// Connections (handshakes included) served at once; more are closed at accept, so a flood
// of sockets cannot exhaust threads. Far above one per replicated VM.
constexpr size_t kMaxConnections = 256;
// How long a connection ended by an Error frame waits for the peer to close (DrainAfterError).
constexpr auto kErrorDrain = std::chrono::milliseconds(1000);

// "ip:port" of the socket's peer, for logs about connections that have no site name yet.
std::string PeerAddress(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return "unknown peer";
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (addr.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&addr);
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    port = ntohs(in->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&addr);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    port = ntohs(in6->sin6_port);
  }
  return std::string(host) + ":" + std::to_string(port);
}

// A site name from a peer request, for messages: a peer chooses these bytes, so a long one
// is cut and a value that is not a string is named by its type.
std::string SiteText(const nlohmann::json& j) {
  if (!j.is_string()) return std::string("(a JSON ") + j.type_name() + ")";
  const std::string& name = j.get_ref<const std::string&>();
  return name.size() <= 64 ? name : name.substr(0, 64) + "...";
}

// Why a connection ended: a clean end leaves no error in the VM's stats.
struct Outcome {
  Status status;
  bool clean = false;
};

}  // namespace

class Receiver::Impl {
 public:
  explicit Impl(ReceiverOptions options) : opts_(std::move(options)) {}
  ~Impl() { Stop(); }

  Status Init();
  void Stop();
  uint16_t port() const { return listener_->port(); }
  std::vector<ReceiverVmStats> Stats() const;
  void DropVm(const std::string& vm);
  std::vector<std::string> RefusedPeers() const {
    std::lock_guard lk(mu_);
    return std::vector<std::string>(refused_.begin(), refused_.end());
  }

 private:
  // One accepted socket, from accept to the end of its thread.
  struct Conn {
    std::thread thread;
    // A second descriptor of the socket: shutdown() on it wakes any I/O. Guarded by mu_;
    // closed when the thread ends.
    UniqueFd dup;
    // Guarded by Impl::mu_:
    TlsStream* stream = nullptr;
    std::string vm;      // set once the connection owns the VM
    uint64_t epoch = 0;  // its Hello's epoch, set with vm
    std::string peer;    // the certificate's site name
    bool done = false;
  };
  struct VmEntry {
    ReceiverVmStats stats;
    ThroughputMeter meter;
  };

  void AcceptLoop();
  void Serve(std::shared_ptr<Conn> conn, UniqueFd fd);
  // Reads the first frame and serves what it asks for: a VM's replication (Hello) or one
  // peer request.
  Outcome Converse(Conn& conn, TlsStream& stream);
  // Hello checks (the first frame's payload), VM takeover, provider: the sink to feed, or
  // a refusal already sent.
  Result<applier::SegmentSink*> Handshake(Conn& conn, TlsStream& stream,
                                          std::span<const std::byte> payload,
                                          applier::ReplicaDefinition* definition);
  // Checks a PeerRequest, has the handler answer it, and sends the PeerReply.
  Outcome AnswerPeer(TlsStream& stream, std::span<const std::byte> payload);
  // The handler's answer to a request that passed the checks, or "internal".
  nlohmann::json RunPeerHandler(const std::string& peer, const nlohmann::json& request);
  Outcome Stream(Conn& conn, TlsStream& stream, applier::SegmentSink& sink,
                 const applier::ReplicaDefinition& definition);
  // The sync in progress on one connection, from its SyncBegin to its SyncEnd.
  struct SyncSession {
    bool active = false;
    uint64_t sync_id = 0;
    std::map<uint32_t, uint64_t> acked;  // disk id -> durable done offset the primary knows
    std::vector<std::byte> data;         // the current SyncData's raw bytes
  };
  // Handles one sync frame (SyncBegin, HashRequest, SyncData, SyncEnd): nothing to return
  // to continue the conversation, or how the connection ends. mid_cycle: a cycle's chunks
  // are arriving (no sync may start). *committed follows a SyncEnd.
  std::optional<Outcome> SyncFrame(TlsStream& stream, applier::SegmentSink& sink,
                                   const applier::ReplicaDefinition& definition,
                                   const FrameHeader& header, std::span<const std::byte> payload,
                                   bool mid_cycle, SyncSession* sync, uint64_t* committed);
  // Sends an Error frame (best effort), lets the peer read it (DrainAfterError) and ends
  // the connection with s.
  Outcome Fail(TlsStream& stream, const std::string& vm, const Status& s);
  // An Ack of the sink's position.
  Status SendAck(TlsStream& stream, const applier::SegmentSink& sink);
  // Sends HelloReply "refused" (best effort) and returns the refusal as a Status.
  Status Refuse(TlsStream& stream, const std::string& who, int code, const std::string& message);
  void CancelLocked(Conn& conn);
  void NoteRefusal(std::string line);
  void ReapFinished();
  template <typename F>
  void UpdateVm(const std::string& vm, F&& f) {
    std::lock_guard lk(mu_);
    f(vms_[vm]);
  }

  const ReceiverOptions opts_;
  std::unique_ptr<TcpListener> listener_;
  std::thread accept_thread_;

  // Protects everything below. A leaf: no sink, provider or blocking I/O is called with it
  // held (the condition wait in Handshake releases it).
  mutable std::mutex mu_;
  std::condition_variable done_cv_;  // a connection thread ended (or left its VM)
  bool stopping_ = false;
  std::list<std::shared_ptr<Conn>> conns_;
  std::map<std::string, Conn*> owner_;  // VM -> the connection feeding its sink
  std::map<std::string, VmEntry> vms_;
  std::deque<std::string> refused_;
};

Status Receiver::Impl::Init() {
  if (opts_.tls == nullptr) return Status::Invalid("Receiver: no TLS context");
  if (!opts_.provider) return Status::Invalid("Receiver: no sink provider");
  if (opts_.site.empty()) return Status::Invalid("Receiver: no site name");
  SR_ASSIGN_OR_RETURN(listener_, TcpListener::Listen(opts_.listen));
  accept_thread_ = std::thread(&Impl::AcceptLoop, this);
  spdlog::info("receiver of site {} listening on {} (port {})", opts_.site, opts_.listen,
               listener_->port());
  return Status::Ok();
}

void Receiver::Impl::Stop() {
  {
    std::lock_guard lk(mu_);
    if (stopping_) return;
    stopping_ = true;
    for (const auto& c : conns_) CancelLocked(*c);
  }
  done_cv_.notify_all();  // a connection waiting to take over a VM gives up
  if (listener_) listener_->Stop();
  if (accept_thread_.joinable()) accept_thread_.join();
  // No connection is added once stopping_ is set, so the list is final.
  std::list<std::shared_ptr<Conn>> conns;
  {
    std::lock_guard lk(mu_);
    conns.swap(conns_);
  }
  for (const auto& c : conns) {
    if (c->thread.joinable()) c->thread.join();
  }
}

void Receiver::Impl::CancelLocked(Conn& conn) {
  if (conn.stream != nullptr) conn.stream->Cancel();
  // Also reaches a handshake in progress, which has no stream yet.
  if (conn.dup.valid()) ::shutdown(conn.dup.get(), SHUT_RDWR);
}

void Receiver::Impl::NoteRefusal(std::string line) {
  spdlog::warn("receiver: refused {}", line);
  std::lock_guard lk(mu_);
  refused_.push_back(std::move(line));
  while (refused_.size() > kMaxRefusals) refused_.pop_front();
}

void Receiver::Impl::ReapFinished() {
  std::vector<std::shared_ptr<Conn>> finished;
  {
    std::lock_guard lk(mu_);
    for (auto it = conns_.begin(); it != conns_.end();) {
      if ((*it)->done) {
        finished.push_back(*it);
        it = conns_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (const auto& c : finished) c->thread.join();
}

void Receiver::Impl::AcceptLoop() {
  while (true) {
    Result<UniqueFd> fd = listener_->Accept();
    ReapFinished();
    if (!fd.ok()) {
      {
        std::lock_guard lk(mu_);
        if (stopping_) return;
      }
      if (fd.status().code() == ECANCELED) return;
      // EMFILE and friends: do not spin.
      spdlog::warn("receiver: accept: {}", fd.status().ToString());
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    auto conn = std::make_shared<Conn>();
    conn->dup = UniqueFd(::fcntl(fd->get(), F_DUPFD_CLOEXEC, 0));
    std::lock_guard lk(mu_);
    if (stopping_) return;  // fd closes here
    if (conns_.size() >= kMaxConnections) {
      spdlog::warn("receiver: {} connections already; closing one from {}", conns_.size(),
                   PeerAddress(fd->get()));
      continue;
    }
    conns_.push_back(conn);
    conn->thread = std::thread(&Impl::Serve, this, conn, std::move(*fd));
  }
}

void Receiver::Impl::Serve(std::shared_ptr<Conn> conn, UniqueFd fd) {
  const std::string address = PeerAddress(fd.get());
  Result<std::unique_ptr<TlsStream>> accepted = TlsAccept(
      *opts_.tls, std::move(fd), opts_.allowed_peers, Clock::now() + opts_.handshake_timeout);
  if (!accepted.ok()) {
    bool stopping;
    {
      std::lock_guard lk(mu_);
      stopping = stopping_;
    }
    if (!stopping) NoteRefusal(address + ": TLS handshake: " + accepted.status().message());
  } else {
    std::unique_ptr<TlsStream> stream = std::move(*accepted);
    {
      std::lock_guard lk(mu_);
      conn->stream = stream.get();
      conn->peer = stream->peer_name();
      if (stopping_) stream->Cancel();
    }
    Outcome outcome = Converse(*conn, *stream);
    std::lock_guard lk(mu_);
    conn->stream = nullptr;
    if (!conn->vm.empty()) {
      VmEntry& e = vms_[conn->vm];
      if (auto it = owner_.find(conn->vm); it != owner_.end() && it->second == conn.get()) {
        owner_.erase(it);
        e.stats.connected = false;
      }
      if (!outcome.clean) e.stats.last_error = outcome.status.message();
    }
    if (!outcome.clean) {
      spdlog::warn("receiver: connection from {} ({}{}{}) ended: {}", conn->peer, address,
                   conn->vm.empty() ? "" : ", VM ", conn->vm, outcome.status.ToString());
    }
  }
  std::lock_guard lk(mu_);
  // The dup is the socket's last descriptor now: closing it ends the TCP connection at once,
  // not when the accept thread reaps this one at some later accept (a peer waiting for the
  // end of the stream would wait until then).
  conn->dup.Reset();
  conn->done = true;
  done_cv_.notify_all();
}

Status Receiver::Impl::Refuse(TlsStream& stream, const std::string& who, int code,
                              const std::string& message) {
  HelloReply reply;
  reply.accepted = false;
  reply.error = std::string(RefusalName(code));
  reply.message = message;
  (void)stream.WriteAll(EncodeFrame(FrameType::kHelloReply, EncodeHelloReply(reply)),
                        Clock::now() + std::chrono::seconds(1));
  NoteRefusal(who + ": " + reply.error + ": " + message);
  return Status::Error(code, reply.error + ": " + message);
}

namespace {
// Best effort: tells the peer why the connection is being closed.
void SendError(TlsStream& stream, int code, const std::string& reason) {
  (void)stream.WriteAll(
      EncodeFrame(FrameType::kError, EncodeError(ErrorFrame{static_cast<uint32_t>(code), reason})),
      Clock::now() + std::chrono::seconds(1));
}

// After an Error frame in the middle of a stream: stop sending, and swallow what the peer
// still has in flight until it closes (it reads our frames between its chunks), for at most
// kErrorDrain. Closing with its data unread would reset the connection, and the reset would
// reach the peer before it read the Error frame: it would report a reset, not our reason.
void DrainAfterError(TlsStream& stream) {
  ::shutdown(stream.fd(), SHUT_WR);
  const Deadline until = Clock::now() + kErrorDrain;
  std::byte sink[16384];
  while (stream.ReadExact(sink, until).ok()) {
  }
}
}  // namespace

Result<applier::SegmentSink*> Receiver::Impl::Handshake(Conn& conn, TlsStream& stream,
                                                        std::span<const std::byte> payload,
                                                        applier::ReplicaDefinition* definition) {
  const std::string peer = stream.peer_name();
  Result<Hello> hello = DecodeHello(payload);
  if (!hello.ok()) return Refuse(stream, peer, EPROTO, hello.status().message());
  applier::ReplicaDefinition& def = hello->definition;
  const std::string who = peer + " (VM " + def.vm + ")";
  if (hello->protocol_version != kProtocolVersion) {
    return Refuse(stream, who, EPROTO,
                  "protocol version " + std::to_string(hello->protocol_version) + ", site " +
                      opts_.site + " speaks " + std::to_string(kProtocolVersion));
  }
  if (hello->from != peer) {
    return Refuse(stream, who, EACCES,
                  "Hello says it comes from site " + hello->from +
                      ", but the certificate names site " + peer);
  }
  if (hello->to != opts_.site) {
    return Refuse(stream, who, EACCES,
                  "Hello is addressed to site " + hello->to + ", this is site " + opts_.site);
  }
  if (def.primary_site.empty()) def.primary_site = peer;
  if (def.primary_site != peer) {
    return Refuse(
        stream, who, EINVAL,
        "definition names primary site " + def.primary_site + ", but " + peer + " sent it");
  }
  std::set<std::string> names;
  for (const applier::DiskDefinition& d : def.disks) {
    if (!names.insert(d.name).second) {
      return Refuse(stream, who, EINVAL, "disk " + d.name + " is listed twice");
    }
    if (d.disk_id != tracker::DiskIdFor(def.vm, d.name)) {
      return Refuse(stream, who, EINVAL, "disk " + d.name + " has the wrong disk id");
    }
    if (d.size == 0) return Refuse(stream, who, EINVAL, "disk " + d.name + " has size 0");
  }

  // Take the VM over from an older connection of the same peer (a reconnect after a cut
  // link): cancel it and wait until it has left the sink. A Hello at an older epoch than
  // that connection's is refused first, without touching it (a stale or rogue primary
  // process must not cut the current one off).
  {
    std::unique_lock lk(mu_);
    while (true) {
      if (stopping_) return Status::Error(ECANCELED, "receiver stopping");
      auto it = owner_.find(def.vm);
      if (it == owner_.end() || it->second == &conn) break;
      Conn* old = it->second;
      if (old->peer != peer) {
        lk.unlock();
        return Refuse(stream, who, EBUSY,
                      "VM " + def.vm + " is being replicated here from site " + old->peer);
      }
      if (def.epoch < old->epoch) {
        const uint64_t current = old->epoch;
        lk.unlock();
        return Refuse(stream, who, ESTALE,
                      "VM " + def.vm + " is replicated here at epoch " + std::to_string(current) +
                          " by another connection from " + peer + ", the primary at epoch " +
                          std::to_string(def.epoch));
      }
      CancelLocked(*old);
      done_cv_.wait(lk, [&] {
        auto now_owner = owner_.find(def.vm);
        return stopping_ || now_owner == owner_.end() || now_owner->second != old;
      });
    }
    owner_[def.vm] = &conn;
    conn.vm = def.vm;
    conn.epoch = def.epoch;
    VmEntry& e = vms_[def.vm];
    e.stats.vm = def.vm;
    e.stats.peer = peer;
    e.stats.connected = true;
    e.stats.last_contact_unix_nanos = NowUnixNanos();
  }

  Result<applier::SegmentSink*> sink = opts_.provider(peer, def);
  if (!sink.ok()) return Refuse(stream, who, sink.status().code(), sink.status().message());
  if (*sink == nullptr) return Refuse(stream, who, EIO, "no replica for VM " + def.vm);
  const applier::ReplicaPosition pos = (*sink)->Position();
  if (pos.epoch > def.epoch) {
    return Refuse(stream, who, ESTALE,
                  "the replica of VM " + def.vm + " is at epoch " + std::to_string(pos.epoch) +
                      ", the primary at epoch " + std::to_string(def.epoch));
  }
  HelloReply reply;
  reply.accepted = true;
  reply.position = pos;
  SR_RETURN_IF_ERROR(stream.WriteAll(EncodeFrame(FrameType::kHelloReply, EncodeHelloReply(reply)),
                                     Clock::now() + opts_.io_timeout));
  spdlog::info("receiver: VM {} from {}: connected; replica received cycle {}, applied {}", def.vm,
               peer, pos.received_cycle, pos.applied_cycle);
  {
    std::lock_guard lk(mu_);
    vms_[def.vm].stats.received_cycle = pos.received_cycle;
  }
  *definition = std::move(def);
  return *sink;
}

Outcome Receiver::Impl::Converse(Conn& conn, TlsStream& stream) {
  const std::string peer = stream.peer_name();
  std::vector<std::byte> payload;
  const Deadline deadline = Clock::now() + opts_.handshake_timeout;
  Result<FrameHeader> header = ReadFrame(
      [&](std::span<std::byte> out) { return stream.ReadExact(out, deadline); }, &payload);
  Status s = header.ok() ? VerifyFrame(*header, payload) : header.status();
  if (!s.ok()) {
    if (s.code() == EBADMSG) SendError(stream, EPROTO, s.message());
    return Outcome{s.WithContext("first frame from " + peer), s.code() == ECANCELED};
  }
  if (header->type == FrameType::kPeerRequest) return AnswerPeer(stream, payload);
  if (header->type != FrameType::kHello) {
    Status refused = Refuse(stream, peer, EPROTO,
                            "expected Hello, got " + std::string(FrameTypeName(header->type)));
    return Outcome{refused, false};
  }
  applier::ReplicaDefinition definition;
  Result<applier::SegmentSink*> sink = Handshake(conn, stream, payload, &definition);
  if (!sink.ok()) return Outcome{sink.status(), sink.status().code() == ECANCELED};
  return Stream(conn, stream, **sink, definition);
}

Outcome Receiver::Impl::AnswerPeer(TlsStream& stream, std::span<const std::byte> payload) {
  const std::string peer = stream.peer_name();
  nlohmann::json reply;
  // The receiver's own refusals are noted like refused Hellos.
  auto refuse = [&](int code, const std::string& message) {
    NoteRefusal(peer + " (peer request): " + std::string(RefusalName(code)) + ": " + message);
    return PeerErrorReply(RefusalName(code), message);
  };
  Result<nlohmann::json> request = DecodePeerMessage(payload);
  if (!request.ok()) {
    reply = refuse(EPROTO, request.status().message());
  } else {
    auto from = request->find("from");
    auto to = request->find("to");
    if (from == request->end() || !from->is_string() || from->get<std::string>() != peer) {
      const std::string says = from != request->end() && from->is_string()
                                   ? "says it comes from site " + SiteText(*from)
                                   : "names no site in \"from\"";
      reply = refuse(EACCES, "the request " + says + ", but the certificate names site " + peer);
    } else if (to != request->end() && (!to->is_string() || to->get<std::string>() != opts_.site)) {
      reply = refuse(EACCES, "the request is addressed to site " + SiteText(*to) +
                                 ", this is site " + opts_.site);
    } else if (!opts_.peer_handler) {
      reply = PeerErrorReply("unsupported", "site " + opts_.site + " does not serve peer requests");
    } else {
      reply = RunPeerHandler(peer, *request);
    }
  }
  Result<std::vector<std::byte>> body = EncodePeerMessage(reply);
  if (!body.ok()) {
    spdlog::error("receiver: the answer to a peer request from {}: {}", peer,
                  body.status().ToString());
    body = EncodePeerMessage(PeerErrorReply(
        "internal",
        "site " + opts_.site + " could not send its answer: " + body.status().message()));
  }
  // The reply's deadline starts now: the handler may have run for minutes.
  Status s =
      stream.WriteAll(EncodeFrame(FrameType::kPeerReply, *body), Clock::now() + opts_.io_timeout);
  if (!s.ok()) {
    return Outcome{s.WithContext("reply to a peer request from " + peer), s.code() == ECANCELED};
  }
  spdlog::debug("receiver: answered a peer request from {}", peer);
  return Outcome{Status::Ok(), true};
}

nlohmann::json Receiver::Impl::RunPeerHandler(const std::string& peer,
                                              const nlohmann::json& request) {
  // The handler is the daemon's code, typically reading fields with at(): an exception
  // must not end the thread (std::terminate) but answer the caller.
  try {
    nlohmann::json reply = opts_.peer_handler(peer, request);
    if (reply.is_object()) return reply;
    spdlog::error("receiver: the peer handler answered a request from {} with a JSON {}", peer,
                  reply.type_name());
    return PeerErrorReply("internal", "site " + opts_.site + " answered with a JSON " +
                                          reply.type_name() + ", not an object");
  } catch (const std::exception& e) {
    spdlog::error("receiver: the peer handler failed on a request from {}: {}", peer, e.what());
    return PeerErrorReply("internal", "site " + opts_.site + " failed: " + e.what());
  }
}

Outcome Receiver::Impl::Stream(Conn& conn, TlsStream& stream, applier::SegmentSink& sink,
                               const applier::ReplicaDefinition& definition) {
  const std::string& vm = definition.vm;
  std::set<uint32_t> disk_ids;
  for (const applier::DiskDefinition& d : definition.disks) disk_ids.insert(d.disk_id);
  std::vector<std::byte> payload;
  std::vector<std::byte> data;
  uint64_t cycle = 0;  // the cycle whose chunks are arriving; 0 between cycles
  uint64_t committed = sink.Position().received_cycle;
  SyncSession sync;
  auto fail = [&](const Status& s) { return Fail(stream, vm, s); };
  auto send_ack = [&]() { return SendAck(stream, sink); };

  while (true) {
    const Deadline deadline = Clock::now() + opts_.io_timeout;
    Result<FrameHeader> header = ReadFrame(
        [&](std::span<std::byte> out) { return stream.ReadExact(out, deadline); }, &payload);
    if (!header.ok()) {
      const Status& s = header.status();
      if (s.code() == ECANCELED) return Outcome{s, true};  // replaced or stopping
      if (s.code() == EBADMSG) return fail(s);
      if (s.code() == ETIMEDOUT) {
        return Outcome{
            Status::Error(ETIMEDOUT, "no frame from " + conn.peer + " for " +
                                         std::to_string(opts_.io_timeout.count()) + " ms"),
            false};
      }
      return Outcome{s, false};
    }
    // A test proves here that a frame damaged in transit is refused whole.
    if (failpoint::Check("receiver.corrupt_frame") == failpoint::Action::kTrigger) {
      if (!payload.empty()) {
        payload[payload.size() / 2] ^= std::byte{0x40};
      } else {
        header->crc ^= 1;
      }
    }
    if (Status s = VerifyFrame(*header, payload); !s.ok()) return fail(s);
    const auto now = Clock::now();
    UpdateVm(vm, [&](VmEntry& e) { e.stats.last_contact_unix_nanos = NowUnixNanos(); });

    switch (header->type) {
      case FrameType::kSegmentChunk: {
        Result<SegmentChunk> chunk = DecodeSegmentChunk(payload);
        if (!chunk.ok()) return fail(chunk.status());
        if (sync.active) {
          return fail(
              Status::Error(EPROTO, "segment chunk during sync " + std::to_string(sync.sync_id)));
        }
        if (disk_ids.count(chunk->disk_id) == 0) {
          return fail(Status::Error(EPROTO, "chunk for disk id " + std::to_string(chunk->disk_id) +
                                                ", which VM " + vm + " does not have"));
        }
        if (cycle == 0) {
          if (chunk->cycle <= committed) {
            return fail(Status::Error(EPROTO, "chunk of cycle " + std::to_string(chunk->cycle) +
                                                  ", but cycle " + std::to_string(committed) +
                                                  " is already committed"));
          }
          cycle = chunk->cycle;
        } else if (chunk->cycle != cycle) {
          return fail(Status::Error(EPROTO, "chunk of cycle " + std::to_string(chunk->cycle) +
                                                " before cycle " + std::to_string(cycle) +
                                                " ended"));
        }
        if (Status s = ChunkData(*chunk, &data); !s.ok()) return fail(s);
        if (Status s = sink.WriteSegment(chunk->disk_id, chunk->segment, chunk->offset, data,
                                         chunk->last());
            !s.ok()) {
          return fail(s);
        }
        UpdateVm(vm, [&](VmEntry& e) {
          e.stats.bytes_raw += data.size();
          e.stats.bytes_wire += chunk->data.size();
          e.meter.Add(kFrameHeaderSize + payload.size(), now);
        });
        break;
      }
      case FrameType::kCycleEnd: {
        Result<applier::CycleInfo> info = DecodeCycleEnd(payload);
        if (!info.ok()) return fail(info.status());
        if (cycle == 0 || info->cycle != cycle) {
          return fail(Status::Error(EPROTO, "CycleEnd of cycle " + std::to_string(info->cycle) +
                                                " without its segments"));
        }
        if (Status s = sink.CommitCycle(*info); !s.ok()) return fail(s);
        committed = cycle;
        cycle = 0;
        UpdateVm(vm, [&](VmEntry& e) { e.stats.received_cycle = committed; });
        // A test proves here that a committed but unacknowledged cycle is not sent twice.
        if (failpoint::Check("receiver.before_ack") == failpoint::Action::kError) {
          return Outcome{Status::Error(EIO, "failpoint receiver.before_ack"), false};
        }
        if (Status s = send_ack(); !s.ok()) return Outcome{s, false};
        break;
      }
      case FrameType::kHeartbeat: {
        Result<Heartbeat> hb = DecodeHeartbeat(payload);
        if (!hb.ok()) return fail(hb.status());
        UpdateVm(vm, [&](VmEntry& e) {
          e.stats.primary_oldest_unapplied_change_unix_nanos =
              hb->oldest_unapplied_change_unix_nanos;
          e.stats.primary_pending_bytes = hb->pending_bytes;
        });
        if (Status s = send_ack(); !s.ok()) return Outcome{s, false};
        break;
      }
      case FrameType::kSyncBegin:
      case FrameType::kHashRequest:
      case FrameType::kSyncData:
      case FrameType::kSyncEnd: {
        std::optional<Outcome> end =
            SyncFrame(stream, sink, definition, *header, payload, cycle != 0, &sync, &committed);
        if (end) return std::move(*end);
        break;
      }
      case FrameType::kError: {
        Result<ErrorFrame> e = DecodeError(payload);
        if (!e.ok()) return Outcome{e.status(), false};
        if (e->code == 0) return Outcome{Status::Ok(), true};  // goodbye
        return Outcome{Status::Error(static_cast<int>(e->code),
                                     conn.peer + " closed the connection: " + e->reason),
                       false};
      }
      default:
        return fail(Status::Error(
            EPROTO, "unexpected " + std::string(FrameTypeName(header->type)) + " frame"));
    }
  }
}

Outcome Receiver::Impl::Fail(TlsStream& stream, const std::string& vm, const Status& s) {
  SendError(stream, s.code(), s.message());
  DrainAfterError(stream);
  return Outcome{s.WithContext("VM " + vm), false};
}

Status Receiver::Impl::SendAck(TlsStream& stream, const applier::SegmentSink& sink) {
  const applier::ReplicaPosition pos = sink.Position();
  Ack ack;
  ack.received_cycle = pos.received_cycle;
  ack.applied_cycle = pos.applied_cycle;
  ack.applied_cut_unix_nanos = pos.applied_cut_unix_nanos;
  ack.pending_bytes = pos.pending_bytes;
  ack.apply_error = pos.apply_error;
  return stream.WriteAll(EncodeFrame(FrameType::kAck, EncodeAck(ack)),
                         Clock::now() + opts_.io_timeout);
}

std::optional<Outcome> Receiver::Impl::SyncFrame(TlsStream& stream, applier::SegmentSink& sink,
                                                 const applier::ReplicaDefinition& definition,
                                                 const FrameHeader& header,
                                                 std::span<const std::byte> payload, bool mid_cycle,
                                                 SyncSession* sync, uint64_t* committed) {
  const std::string& vm = definition.vm;
  auto fail = [&](const Status& s) { return Fail(stream, vm, s); };
  auto send = [&](FrameType type, const std::vector<std::byte>& body) {
    return stream.WriteAll(EncodeFrame(type, body), Clock::now() + opts_.io_timeout);
  };
  const std::string_view name = FrameTypeName(header.type);
  if (header.type != FrameType::kSyncBegin && !sync->active) {
    return fail(Status::Error(EPROTO, std::string(name) + " without a SyncBegin"));
  }
  // Sync data and hashes only for the disks of the plan (a subset of the VM's).
  auto in_plan = [&](uint32_t disk_id) -> Status {
    if (sync->acked.count(disk_id) != 0) return Status::Ok();
    return Status::Error(EPROTO, std::string(name) + " for disk id " + std::to_string(disk_id) +
                                     ", which sync " + std::to_string(sync->sync_id) + " of VM " +
                                     vm + " does not have");
  };

  switch (header.type) {
    case FrameType::kSyncBegin: {
      if (mid_cycle) return fail(Status::Error(EPROTO, "SyncBegin in the middle of a cycle"));
      if (sync->active) {
        return fail(Status::Error(
            EPROTO, "SyncBegin while sync " + std::to_string(sync->sync_id) + " is running"));
      }
      Result<applier::SyncPlan> plan = DecodeSyncBegin(payload);
      if (!plan.ok()) return fail(plan.status());
      // The connection is bound to its Hello's epoch (wire_format.h).
      if (plan->epoch != definition.epoch) {
        return fail(Status::Error(EPROTO, "SyncBegin at epoch " + std::to_string(plan->epoch) +
                                              " on a connection at epoch " +
                                              std::to_string(definition.epoch)));
      }
      const std::string what = "sync " + std::to_string(plan->sync_id) + " (" +
                               std::string(applier::SyncKindName(plan->kind)) + ")";
      Result<applier::SyncResume> resume = sink.BeginSync(*plan);
      if (!resume.ok()) {
        // Like a refused Hello: the reply names the refusal, then the connection closes.
        const Status& s = resume.status();
        SyncReply reply;
        reply.accepted = false;
        reply.error = std::string(RefusalName(s.code()));
        reply.message = s.message();
        (void)stream.WriteAll(EncodeFrame(FrameType::kSyncReply, EncodeSyncReply(reply)),
                              Clock::now() + std::chrono::seconds(1));
        spdlog::warn("receiver: VM {}: refused {}: {}: {}", vm, what, reply.error, s.message());
        return Outcome{
            Status::Error(s.code(), what + " refused: " + reply.error + ": " + s.message())
                .WithContext("VM " + vm),
            false};
      }
      sync->active = true;
      sync->sync_id = plan->sync_id;
      sync->acked.clear();
      for (const applier::SyncDiskPlan& d : plan->disks) sync->acked[d.disk_id] = 0;
      uint64_t resumed = 0;
      for (const applier::SyncDiskResume& d : resume->disks) {
        if (auto it = sync->acked.find(d.disk_id); it != sync->acked.end()) {
          it->second = d.done_offset;
          resumed += d.done_offset;
        }
      }
      SyncReply reply;
      reply.accepted = true;
      reply.resume = std::move(*resume);
      if (Status s = send(FrameType::kSyncReply, EncodeSyncReply(reply)); !s.ok()) {
        return Outcome{s, false};
      }
      spdlog::info("receiver: VM {}: {} {} ({} bytes already done)", vm,
                   resumed > 0 ? "resuming" : "starting", what, resumed);
      return std::nullopt;
    }

    case FrameType::kHashRequest: {
      Result<HashRequest> req = DecodeHashRequest(payload);
      if (!req.ok()) return fail(req.status());
      if (Status s = in_plan(req->disk_id); !s.ok()) return fail(s);
      Result<std::vector<uint64_t>> hashes = sink.SyncHashes(req->disk_id, req->offset, req->count);
      if (!hashes.ok()) return fail(hashes.status());
      if (hashes->size() != req->count) {
        return fail(Status::Error(EIO, "the replica returned " + std::to_string(hashes->size()) +
                                           " hashes for " + std::to_string(req->count) +
                                           " blocks"));
      }
      HashReply reply;
      reply.disk_id = req->disk_id;
      reply.offset = req->offset;
      reply.hashes = std::move(*hashes);
      if (Status s = send(FrameType::kHashReply, EncodeHashReply(reply)); !s.ok()) {
        return Outcome{s, false};
      }
      return std::nullopt;
    }

    case FrameType::kSyncData: {
      Result<SyncData> d = DecodeSyncData(payload);
      if (!d.ok()) return fail(d.status());
      if (Status s = in_plan(d->disk_id); !s.ok()) return fail(s);
      std::vector<std::byte>& data = sync->data;
      data.clear();
      if (!d->zero()) {
        if (Status s = SyncDataBytes(*d, &data); !s.ok()) return fail(s);
      }
      Result<uint64_t> durable =
          sink.WriteSyncData(d->disk_id, d->offset, data, d->zero() ? d->length : 0, d->done_to);
      if (!durable.ok()) return fail(durable.status());
      const auto now = Clock::now();
      UpdateVm(vm, [&](VmEntry& e) {
        e.stats.bytes_raw += data.size();
        e.stats.bytes_wire += d->data.size();
        e.meter.Add(kFrameHeaderSize + payload.size(), now);
      });
      uint64_t& acked = sync->acked[d->disk_id];
      if (*durable > acked) {
        if (Status s = send(FrameType::kSyncAck, EncodeSyncAck(SyncAck{d->disk_id, *durable}));
            !s.ok()) {
          return Outcome{s, false};
        }
        acked = *durable;
      }
      return std::nullopt;
    }

    case FrameType::kSyncEnd: {
      Result<SyncEnd> end = DecodeSyncEnd(payload);
      if (!end.ok()) return fail(end.status());
      if (end->sync_id != sync->sync_id) {
        return fail(Status::Error(EPROTO, "SyncEnd of sync " + std::to_string(end->sync_id) +
                                              " during sync " + std::to_string(sync->sync_id)));
      }
      if (Status s = sink.EndSync(end->sync_id, end->cut_unix_nanos); !s.ok()) return fail(s);
      const applier::ReplicaPosition pos = sink.Position();
      if (pos.received_cycle < end->sync_id) {
        return fail(Status::Error(EIO, "the replica ended sync " + std::to_string(end->sync_id) +
                                           " but stands at cycle " +
                                           std::to_string(pos.received_cycle)));
      }
      sync->active = false;
      *committed = pos.received_cycle;
      UpdateVm(vm, [&](VmEntry& e) { e.stats.received_cycle = pos.received_cycle; });
      spdlog::info("receiver: VM {}: sync {} ended; replica at cycle {}", vm, end->sync_id,
                   pos.received_cycle);
      if (Status s = SendAck(stream, sink); !s.ok()) return Outcome{s, false};
      return std::nullopt;
    }

    default:
      return fail(Status::Error(EPROTO, "unexpected " + std::string(name) + " frame"));
  }
}

void Receiver::Impl::DropVm(const std::string& vm) {
  std::unique_lock lk(mu_);
  // A connection that takes the VM over while we wait (its provider call came first) is
  // ended too: loop until no connection owns the VM.
  while (true) {
    auto it = owner_.find(vm);
    if (it == owner_.end()) break;
    Conn* old = it->second;
    CancelLocked(*old);
    // The owner leaves owner_ only after its last sink call (Serve, after Converse).
    done_cv_.wait(lk, [&] {
      auto now_owner = owner_.find(vm);
      return now_owner == owner_.end() || now_owner->second != old;
    });
  }
  vms_.erase(vm);
  lk.unlock();
  spdlog::info("receiver: VM {} dropped", vm);
}

std::vector<ReceiverVmStats> Receiver::Impl::Stats() const {
  std::lock_guard lk(mu_);
  std::vector<ReceiverVmStats> out;
  const auto now = Clock::now();
  for (const auto& [vm, e] : vms_) {
    out.push_back(e.stats);
    out.back().throughput_bytes_per_s = e.meter.Rate(now);
  }
  return out;
}

// ---------------------------------------------------------------------------------------

Receiver::Receiver(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Receiver::~Receiver() { Stop(); }

Result<std::unique_ptr<Receiver>> Receiver::Start(ReceiverOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  SR_RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<Receiver>(new Receiver(std::move(impl)));
}

void Receiver::Stop() { impl_->Stop(); }
uint16_t Receiver::port() const { return impl_->port(); }
std::vector<ReceiverVmStats> Receiver::Stats() const { return impl_->Stats(); }
std::vector<std::string> Receiver::RefusedPeers() const { return impl_->RefusedPeers(); }
void Receiver::DropVm(const std::string& vm) { impl_->DropVm(vm); }

}  // namespace siterep::shipper
