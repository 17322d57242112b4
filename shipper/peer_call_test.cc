// Peer calls (peer_call.h) against a real Receiver and its peer_handler: real TLS 1.3 with
// test certificates, real sockets on 127.0.0.1. Also hand-made servers and clients for what
// a well-behaved peer never does (a bad reply, a request whose "to" is wrong).
#include "shipper/peer_call.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "common/testing/temp_dir.h"
#include "shipper/receiver.h"
#include "shipper/testing/test_certs.h"
#include "shipper/wire_format.h"

namespace siterep::shipper {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

bool Contains(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

// A latch a handler can wait on, with a bound so a failing test cannot hang.
class Gate {
 public:
  void Open() {
    std::lock_guard lk(mu_);
    open_ = true;
    cv_.notify_all();
  }
  bool Wait(std::chrono::milliseconds limit = 20s) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, limit, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

class PeerCallTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::TestPki> pki = testing::TestPki::Create(tmp_.path() / "pki");
    ASSERT_TRUE(pki.ok()) << pki.status().ToString();
    pki_.emplace(std::move(*pki));
    east_ = Context(pki_->Site("east"));
    west_ = Context(pki_->Site("west"));
  }
  void TearDown() override {
    if (receiver_) receiver_->Stop();
  }

  static std::shared_ptr<const TlsContext> Context(const TlsIdentity& id) {
    Result<std::shared_ptr<TlsContext>> c = TlsContext::Create(id);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? std::shared_ptr<const TlsContext>(*c) : nullptr;
  }

  // Site west's receiver; it replicates nothing (every Hello is refused).
  void StartReceiver(PeerHandler handler, std::chrono::milliseconds io_timeout = 15s,
                     std::shared_ptr<const TlsContext> tls = nullptr) {
    ReceiverOptions o;
    o.site = "west";
    o.listen = "127.0.0.1:0";
    o.tls = tls ? tls : west_;
    o.allowed_peers = {"east"};
    o.io_timeout = io_timeout;
    o.provider = [](const std::string&,
                    const applier::ReplicaDefinition&) -> Result<applier::SegmentSink*> {
      return Status::Error(EPERM, "no replicas in this test");
    };
    o.peer_handler = std::move(handler);
    Result<std::unique_ptr<Receiver>> r = Receiver::Start(std::move(o));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    receiver_ = std::move(*r);
  }

  PeerCallOptions Opts(uint16_t port) const {
    PeerCallOptions o;
    o.tls = east_;
    o.local_site = "east";
    o.peer_site = "west";
    o.address = "127.0.0.1:" + std::to_string(port);
    o.connect_timeout = 2s;
    o.timeout = 5s;
    return o;
  }
  PeerCallOptions Opts() const { return Opts(receiver_->port()); }

  // A hand-made client: one TLS connection to the receiver as east.
  std::unique_ptr<TlsStream> RawConnect() {
    Result<std::unique_ptr<TlsStream>> s = TlsConnect(
        *east_, "127.0.0.1:" + std::to_string(receiver_->port()), "west", Clock::now() + 5s);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? std::move(*s) : nullptr;
  }
  // Sends one PeerRequest payload and returns the PeerReply's object.
  static json RawCall(TlsStream& stream, const std::vector<std::byte>& payload) {
    EXPECT_TRUE(
        stream.WriteAll(EncodeFrame(FrameType::kPeerRequest, payload), Clock::now() + 5s).ok());
    std::vector<std::byte> in;
    const Deadline deadline = Clock::now() + 5s;
    Result<FrameHeader> h =
        ReadFrame([&](std::span<std::byte> out) { return stream.ReadExact(out, deadline); }, &in);
    EXPECT_TRUE(h.ok()) << h.status().ToString();
    if (!h.ok()) return json();
    EXPECT_TRUE(VerifyFrame(*h, in).ok());
    EXPECT_EQ(h->type, FrameType::kPeerReply) << FrameTypeName(h->type);
    Result<json> reply = DecodePeerMessage(in);
    EXPECT_TRUE(reply.ok()) << reply.status().ToString();
    return reply.ok() ? *reply : json();
  }
  static std::vector<std::byte> Payload(const json& j) {
    Result<std::vector<std::byte>> p = EncodePeerMessage(j);
    EXPECT_TRUE(p.ok()) << p.status().ToString();
    return p.ok() ? *p : std::vector<std::byte>{};
  }

  siterep::testing::TempDir tmp_;
  std::optional<testing::TestPki> pki_;
  std::shared_ptr<const TlsContext> east_, west_;
  std::unique_ptr<Receiver> receiver_;
};

// A request reaches the handler with the caller's site (from the certificate) and its
// fields; the handler's object comes back as is. The caller cannot choose "from".
TEST_F(PeerCallTest, RequestAndReplyRoundTrip) {
  std::mutex mu;
  std::vector<std::pair<std::string, json>> seen;
  StartReceiver([&](const std::string& peer, const json& request) {
    std::lock_guard lk(mu);
    seen.emplace_back(peer, request);
    return json{{"ok", true}, {"role", "replica"}, {"epoch", 3}, {"vm", request.at("vm")}};
  });
  const json request = {{"op", "status"}, {"vm", "vm1"}, {"from", "mallory"}};
  Result<json> reply = CallPeer(Opts(), request);
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(*reply, (json{{"ok", true}, {"role", "replica"}, {"epoch", 3}, {"vm", "vm1"}}));
  std::lock_guard lk(mu);
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].first, "east");
  EXPECT_EQ(seen[0].second["from"], "east");
  EXPECT_EQ(seen[0].second["to"], "west");
  EXPECT_EQ(seen[0].second["op"], "status");
  EXPECT_EQ(seen[0].second["vm"], "vm1");
  EXPECT_TRUE(receiver_->Stats().empty()) << "a peer call is not a VM's connection";
  EXPECT_TRUE(receiver_->RefusedPeers().empty());
}

// A refusal by the peer is an answer: CallPeer succeeds and returns it.
TEST_F(PeerCallTest, ARefusingAnswerIsAReplyNotAnError) {
  StartReceiver([](const std::string&, const json&) {
    return PeerErrorReply("epoch_older", "VM vm1 is at epoch 9 here");
  });
  Result<json> reply = CallPeer(Opts(), {{"op", "promote"}, {"vm", "vm1"}, {"epoch", 4}});
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(
      *reply,
      (json{{"ok", false}, {"error", "epoch_older"}, {"message", "VM vm1 is at epoch 9 here"}}));
}

TEST_F(PeerCallTest, WithoutAHandlerTheAnswerIsUnsupported) {
  StartReceiver(nullptr);
  Result<json> reply = CallPeer(Opts(), {{"op", "status"}});
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ((*reply)["ok"], false);
  EXPECT_EQ((*reply)["error"], "unsupported");
  EXPECT_TRUE(Contains((*reply)["message"].get<std::string>(), "site west")) << *reply;
}

// A handler that throws or answers with a non-object does not take the receiver down; the
// caller gets "internal".
TEST_F(PeerCallTest, AHandlerThatThrowsOrAnswersBadlyGetsInternal) {
  StartReceiver([](const std::string&, const json& request) -> json {
    if (request.at("op") == "throw") return request.at("no such field");
    if (request.at("op") == "array") return json::array({1, 2});
    if (request.at("op") == "big") return json{{"big", std::string(kMaxPeerMessage, 'x')}};
    return json{{"ok", true}};
  });
  for (const char* op : {"throw", "array", "big"}) {
    Result<json> reply = CallPeer(Opts(), {{"op", op}});
    ASSERT_TRUE(reply.ok()) << op << ": " << reply.status().ToString();
    EXPECT_EQ((*reply)["ok"], false) << op;
    EXPECT_EQ((*reply)["error"], "internal") << op;
  }
  // Still serving.
  Result<json> reply = CallPeer(Opts(), {{"op", "fine"}});
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(*reply, (json{{"ok", true}}));
}

// "from" must be the certificate's site: a caller configured as another site is answered
// "unknown_site" and the handler never runs.
TEST_F(PeerCallTest, AFromThatIsNotTheCertificatesSiteIsRefused) {
  std::atomic<int> calls{0};
  StartReceiver([&](const std::string&, const json&) {
    ++calls;
    return json{{"ok", true}};
  });
  PeerCallOptions o = Opts();
  o.local_site = "north";  // the certificate says east
  Result<json> reply = CallPeer(o, {{"op", "promote"}});
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ((*reply)["ok"], false);
  EXPECT_EQ((*reply)["error"], "unknown_site");
  const std::string message = (*reply)["message"];
  EXPECT_TRUE(Contains(message, "north") && Contains(message, "certificate names site east"))
      << message;
  EXPECT_EQ(calls, 0);
  ASSERT_EQ(receiver_->RefusedPeers().size(), 1u);
  EXPECT_TRUE(Contains(receiver_->RefusedPeers()[0], "unknown_site"));
}

// What CallPeer never sends, from a hand-made client: no "from", a "to" that is not the
// receiver's site, a payload that is not a JSON object. Each is answered, not run.
TEST_F(PeerCallTest, TheReceiverChecksEveryRequest) {
  std::atomic<int> calls{0};
  StartReceiver([&](const std::string&, const json&) {
    ++calls;
    return json{{"ok", true}};
  });
  struct Case {
    std::vector<std::byte> payload;
    std::string error, why;
  };
  const std::string not_json = "[1, 2, 3]";
  const Case cases[] = {
      {Payload({{"op", "x"}}), "unknown_site", "names no site"},
      {Payload({{"op", "x"}, {"from", 7}}), "unknown_site", "names no site"},
      {Payload({{"op", "x"}, {"from", "east"}, {"to", "south"}}), "unknown_site",
       "addressed to site south, this is site west"},
      {std::vector<std::byte>(
           reinterpret_cast<const std::byte*>(not_json.data()),
           reinterpret_cast<const std::byte*>(not_json.data()) + not_json.size()),
       "protocol", "not a JSON object"},
  };
  for (const Case& c : cases) {
    std::unique_ptr<TlsStream> stream = RawConnect();
    ASSERT_TRUE(stream);
    const json reply = RawCall(*stream, c.payload);
    EXPECT_EQ(reply["ok"], false) << reply;
    EXPECT_EQ(reply["error"], c.error) << reply;
    EXPECT_TRUE(reply["message"].is_string() &&
                Contains(reply["message"].get<std::string>(), c.why))
        << reply;
  }
  EXPECT_EQ(calls, 0);
  // Without "to" (optional) and with the right one, the handler runs.
  for (const json& request : {json{{"from", "east"}}, json{{"from", "east"}, {"to", "west"}}}) {
    std::unique_ptr<TlsStream> stream = RawConnect();
    ASSERT_TRUE(stream);
    EXPECT_EQ(RawCall(*stream, Payload(request)), (json{{"ok", true}}));
  }
  EXPECT_EQ(calls, 2);
}

// Our peer's certificate from another CA: our side refuses it during the handshake.
TEST_F(PeerCallTest, APeerWithACertificateFromAnotherCaIsRefusedInTheHandshake) {
  Result<testing::TestPki> other = testing::TestPki::Create(tmp_.path() / "other-pki");
  ASSERT_TRUE(other.ok());
  TlsIdentity forged = other->Site("west");
  forged.ca = pki_->ca_cert();  // it trusts the real CA, so only the caller can object
  std::atomic<int> calls{0};
  StartReceiver(
      [&](const std::string&, const json&) {
        ++calls;
        return json{{"ok", true}};
      },
      15s, Context(forged));
  Result<json> reply = CallPeer(Opts(), {{"op", "status"}});
  ASSERT_FALSE(reply.ok()) << "answered: " << *reply;
  EXPECT_EQ(reply.status().code(), EACCES) << reply.status().ToString();
  EXPECT_TRUE(Contains(reply.status().message(), "peer call to west at 127.0.0.1:"))
      << reply.status().ToString();
  EXPECT_EQ(calls, 0);
}

// Our certificate from another CA: the receiver refuses it during the handshake and never
// reads the request; the caller learns it as a TLS refusal, not as a reply.
TEST_F(PeerCallTest, ACallerWithACertificateFromAnotherCaIsRefusedInTheHandshake) {
  Result<testing::TestPki> other = testing::TestPki::Create(tmp_.path() / "other-pki");
  ASSERT_TRUE(other.ok());
  TlsIdentity forged = other->Site("east");
  forged.ca = pki_->ca_cert();
  std::atomic<int> calls{0};
  StartReceiver([&](const std::string&, const json&) {
    ++calls;
    return json{{"ok", true}};
  });
  PeerCallOptions o = Opts();
  o.tls = Context(forged);
  ASSERT_TRUE(o.tls);
  Result<json> reply = CallPeer(o, {{"op", "status"}});
  ASSERT_FALSE(reply.ok()) << "answered: " << *reply;
  EXPECT_EQ(reply.status().code(), EACCES) << reply.status().ToString();
  EXPECT_EQ(calls, 0);
  // The receiver notes it once it has drained the socket (tls.h), after our side failed.
  const auto until = Clock::now() + 5s;
  while (receiver_->RefusedPeers().empty() && Clock::now() < until) {
    std::this_thread::sleep_for(10ms);
  }
  ASSERT_EQ(receiver_->RefusedPeers().size(), 1u);
  EXPECT_TRUE(Contains(receiver_->RefusedPeers()[0], "TLS handshake"))
      << receiver_->RefusedPeers()[0];
}

// Nobody listens: refused at once, and distinguishable from any answer.
TEST_F(PeerCallTest, AClosedPortFailsFastWithConnectionRefused) {
  uint16_t port;
  {
    Result<std::unique_ptr<TcpListener>> l = TcpListener::Listen("127.0.0.1:0");
    ASSERT_TRUE(l.ok());
    port = (*l)->port();
  }
  PeerCallOptions o = Opts(port);
  o.connect_timeout = 5s;
  const auto start = Clock::now();
  Result<json> reply = CallPeer(o, {{"op", "status"}});
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), ECONNREFUSED) << reply.status().ToString();
  EXPECT_LT(Clock::now() - start, 1s);
  EXPECT_TRUE(Contains(reply.status().message(), "peer call to west")) << reply.status().ToString();
}

// A black hole: the kernel completes TCP connects to a listening socket nobody accepts, and
// no TLS answer ever comes. The call gives up at connect_timeout.
TEST_F(PeerCallTest, APeerThatNeverAnswersTlsTimesOutAtConnectTimeout) {
  Result<std::unique_ptr<TcpListener>> hole = TcpListener::Listen("127.0.0.1:0");
  ASSERT_TRUE(hole.ok());
  PeerCallOptions o = Opts((*hole)->port());
  o.connect_timeout = 300ms;
  o.timeout = 30s;
  const auto start = Clock::now();
  Result<json> reply = CallPeer(o, {{"op", "status"}});
  const auto took = Clock::now() - start;
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), ETIMEDOUT) << reply.status().ToString();
  EXPECT_GE(took, 290ms);
  EXPECT_LT(took, 2s);
}

// Connected, but the answer does not come in time: ETIMEDOUT at timeout (the peer may still
// act on the request; that is the caller's to sort out).
TEST_F(PeerCallTest, AnAnswerSlowerThanTheCallsTimeoutTimesOut) {
  Gate release;
  StartReceiver([&](const std::string&, const json&) {
    release.Wait();
    return json{{"ok", true}};
  });
  PeerCallOptions o = Opts();
  o.timeout = 300ms;
  const auto start = Clock::now();
  Result<json> reply = CallPeer(o, {{"op", "promote"}});
  const auto took = Clock::now() - start;
  release.Open();
  // The handler may still be waking up on release's condition variable: stop (which waits
  // for it) before release goes out of scope, not in TearDown after it has.
  receiver_->Stop();
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), ETIMEDOUT) << reply.status().ToString();
  EXPECT_GE(took, 290ms);
  EXPECT_LT(took, 2s);
}

// A handler that runs longer than the receiver's io_timeout (a promotion running hooks)
// still gets its reply through: no timeout applies while it runs.
TEST_F(PeerCallTest, AHandlerSlowerThanTheReceiversIoTimeoutStillReplies) {
  StartReceiver(
      [](const std::string&, const json&) {
        std::this_thread::sleep_for(800ms);
        return json{{"ok", true}, {"epoch", 5}};
      },
      /*io_timeout=*/200ms);
  Result<json> reply = CallPeer(Opts(), {{"op", "promote"}, {"vm", "vm1"}, {"epoch", 5}});
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(*reply, (json{{"ok", true}, {"epoch", 5}}));
}

// Handlers of different connections run at the same time: each waits until both are in.
TEST_F(PeerCallTest, HandlersOfDifferentCallsRunConcurrently) {
  std::mutex mu;
  std::condition_variable cv;
  int inside = 0;
  StartReceiver([&](const std::string&, const json& request) {
    std::unique_lock lk(mu);
    ++inside;
    cv.notify_all();
    const bool both = cv.wait_for(lk, 10s, [&] { return inside >= 2; });
    return json{{"ok", both}, {"n", request.at("n")}};
  });
  auto call = [&](int n) { return CallPeer(Opts(), {{"n", n}}); };
  std::future<Result<json>> a = std::async(std::launch::async, call, 1);
  std::future<Result<json>> b = std::async(std::launch::async, call, 2);
  for (auto* f : {&a, &b}) {
    Result<json> reply = f->get();
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    EXPECT_EQ((*reply)["ok"], true) << "the handlers ran one after the other";
  }
}

// Stop waits for a handler in progress (documented), returns as soon as it has, and the
// caller gets no reply (the connection is cancelled), so it cannot mistake it for one.
TEST_F(PeerCallTest, StopWaitsForARunningHandlerAndSendsNoReply) {
  Gate entered, release;
  StartReceiver([&](const std::string&, const json&) {
    entered.Open();
    release.Wait();
    return json{{"ok", true}};
  });
  std::future<Result<json>> reply = std::async(std::launch::async, [&] {
    return CallPeer(Opts(), {{"op", "demote"}});
  });
  ASSERT_TRUE(entered.Wait());
  std::future<void> stopped = std::async(std::launch::async, [&] { receiver_->Stop(); });
  EXPECT_EQ(stopped.wait_for(300ms), std::future_status::timeout)
      << "Stop returned while the handler was running";
  const auto released_at = Clock::now();
  release.Open();
  ASSERT_EQ(stopped.wait_for(5s), std::future_status::ready);
  EXPECT_LT(Clock::now() - released_at, 2s);
  Result<json> r = reply.get();
  EXPECT_FALSE(r.ok()) << "replied during Stop: " << *r;
}

// A peer too old to know peer calls answers the unknown frame type with an Error frame;
// a peer that answers with junk: both are EPROTO, not replies.
TEST_F(PeerCallTest, AnswersThatAreNotAPeerReplyAreProtocolErrors) {
  Result<std::unique_ptr<TcpListener>> listener = TcpListener::Listen("127.0.0.1:0");
  ASSERT_TRUE(listener.ok());
  const uint16_t port = (*listener)->port();
  struct Answer {
    FrameType type;
    std::string payload;
    std::string why;
  };
  const Answer answers[] = {
      {FrameType::kError, "", "closed the connection: frame header: unknown frame type 15"},
      {FrameType::kHelloReply, "{}", "answered with a HelloReply frame"},
      {FrameType::kPeerReply, "not json", "not valid JSON"},
      {FrameType::kPeerReply, "[]", "not a JSON object"},
  };
  for (const Answer& answer : answers) {
    std::thread server([&] {
      Result<UniqueFd> fd = (*listener)->Accept();
      ASSERT_TRUE(fd.ok());
      Result<std::unique_ptr<TlsStream>> s =
          TlsAccept(*west_, std::move(*fd), {"east"}, Clock::now() + 5s);
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      std::vector<std::byte> in;
      const Deadline deadline = Clock::now() + 5s;
      ASSERT_TRUE(
          ReadFrame([&](std::span<std::byte> out) { return (*s)->ReadExact(out, deadline); }, &in)
              .ok());
      std::vector<std::byte> payload;
      if (answer.type == FrameType::kError) {
        payload = EncodeError(ErrorFrame{EPROTO, "frame header: unknown frame type 15"});
      } else {
        const auto* p = reinterpret_cast<const std::byte*>(answer.payload.data());
        payload.assign(p, p + answer.payload.size());
      }
      ASSERT_TRUE((*s)->WriteAll(EncodeFrame(answer.type, payload), Clock::now() + 5s).ok());
    });
    Result<json> reply = CallPeer(Opts(port), {{"op", "status"}});
    server.join();
    ASSERT_FALSE(reply.ok()) << answer.why << ": answered " << *reply;
    EXPECT_EQ(reply.status().code(), EPROTO) << reply.status().ToString();
    EXPECT_TRUE(Contains(reply.status().message(), answer.why)) << reply.status().ToString();
  }
}

TEST_F(PeerCallTest, BadOptionsAndRequestsAreRefusedBeforeConnecting) {
  StartReceiver(nullptr);
  PeerCallOptions o = Opts();
  o.tls = nullptr;
  EXPECT_EQ(CallPeer(o, json::object()).status().code(), EINVAL);
  o = Opts();
  o.peer_site.clear();
  EXPECT_EQ(CallPeer(o, json::object()).status().code(), EINVAL);
  o = Opts();
  o.timeout = 0ms;
  EXPECT_EQ(CallPeer(o, json::object()).status().code(), EINVAL);
  EXPECT_EQ(CallPeer(Opts(), json::array()).status().code(), EINVAL);
  EXPECT_EQ(CallPeer(Opts(), {{"x", std::string(kMaxPeerMessage, 'x')}}).status().code(), EMSGSIZE);
}

}  // namespace
}  // namespace siterep::shipper
