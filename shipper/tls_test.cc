#include "shipper/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
#include <optional>
#include <sstream>
#include <thread>

#include "common/file_util.h"
#include "common/testing/temp_dir.h"
#include "shipper/testing/test_certs.h"

namespace siterep::shipper {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using shipper::testing::SiteCertOptions;
using shipper::testing::TestPki;
using siterep::testing::TempDir;

Deadline In(std::chrono::milliseconds d) { return std::chrono::steady_clock::now() + d; }

std::span<const std::byte> Bytes(std::string_view s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

bool Contains(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

// A byte pattern that differs per chunk and per position, so a lost, repeated or
// reordered record shows up as a mismatch.
void Fill(std::vector<std::byte>& buf, uint32_t seed) {
  uint32_t x = seed * 2654435761u + 1;
  for (std::byte& b : buf) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b = static_cast<std::byte>(x);
  }
}

// What the server side of one connection did: the handshake's outcome, and the bytes it
// read after a successful one (a refused peer's bytes must never show up here).
struct ServerOutcome {
  Status accept;
  std::string peer_name;
  std::string received;
};

struct RawClientOutcome {
  bool handshake_ok = false;
  bool read_ok = false;
};

// A client built directly on OpenSSL, for what TlsConnect refuses to be: TLS 1.2 only, no
// certificate, or an expired one (TlsContext::Create would reject it). After its handshake
// attempt it sends "secret\n" (over TLS if the handshake went through on its side, raw
// otherwise) and tries to read a byte.
RawClientOutcome RawTlsClient(uint16_t port, const fs::path& ca, const TlsIdentity* own,
                              int max_version) {
  RawClientOutcome out;
  // In its own thread with SIGPIPE blocked: OpenSSL's socket BIO writes with write(2), and
  // a peer that already closed must not kill the test binary.
  std::thread([&] {
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
    UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
      ADD_FAILURE() << "connect: " << std::strerror(errno);
      return;
    }
    timeval timeout{5, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_client_method()),
                                                          SSL_CTX_free);
    ASSERT_NE(ctx, nullptr);
    ASSERT_EQ(SSL_CTX_set_max_proto_version(ctx.get(), max_version), 1);
    ASSERT_EQ(SSL_CTX_load_verify_locations(ctx.get(), ca.c_str(), nullptr), 1);
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
    if (own != nullptr) {
      ASSERT_EQ(SSL_CTX_use_certificate_chain_file(ctx.get(), own->cert.c_str()), 1);
      ASSERT_EQ(SSL_CTX_use_PrivateKey_file(ctx.get(), own->key.c_str(), SSL_FILETYPE_PEM), 1);
    }
    std::unique_ptr<SSL, decltype(&SSL_free)> ssl(SSL_new(ctx.get()), SSL_free);
    SSL_set_fd(ssl.get(), fd.get());
    out.handshake_ok = SSL_connect(ssl.get()) == 1;
    if (out.handshake_ok) {
      SSL_write(ssl.get(), "secret\n", 7);
      char c;
      out.read_ok = SSL_read(ssl.get(), &c, 1) > 0;
    } else {
      ::send(fd.get(), "secret\n", 7, MSG_NOSIGNAL);
    }
    ERR_clear_error();
  }).join();
  return out;
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<TestPki> pki = TestPki::Create(dir_.path() / "pki");
    ASSERT_TRUE(pki.ok()) << pki.status().ToString();
    pki_.emplace(std::move(*pki));
    east_ = pki_->Site("east");
    west_ = pki_->Site("west");
    server_ctx_ = Context(east_);
    ASSERT_NE(server_ctx_, nullptr);
    auto listener = TcpListener::Listen("127.0.0.1:0");
    ASSERT_TRUE(listener.ok()) << listener.status().ToString();
    listener_ = std::move(*listener);
    ASSERT_NE(listener_->port(), 0);
  }

  std::shared_ptr<TlsContext> Context(const TlsIdentity& identity) {
    auto ctx = TlsContext::Create(identity);
    EXPECT_TRUE(ctx.ok()) << ctx.status().ToString();
    return ctx.ok() ? *ctx : nullptr;
  }

  std::string Address() const { return "127.0.0.1:" + std::to_string(listener_->port()); }

  // The server side of one connection, as "east": accept, handshake allowing `allowed`.
  std::future<Result<std::unique_ptr<TlsStream>>> AcceptAsync(std::vector<std::string> allowed = {
                                                                  "west"}) {
    return std::async(std::launch::async, [this, allowed]() -> Result<std::unique_ptr<TlsStream>> {
      SR_ASSIGN_OR_RETURN(UniqueFd fd, listener_->Accept());
      return TlsAccept(*server_ctx_, std::move(fd), allowed, In(10s));
    });
  }

  // AcceptAsync, then a read of 7 bytes if the handshake succeeded.
  std::future<ServerOutcome> ServeOnce(std::vector<std::string> allowed = {"west"}) {
    return std::async(std::launch::async, [this, allowed] {
      ServerOutcome out;
      Result<std::unique_ptr<TlsStream>> stream = AcceptAsync(allowed).get();
      if (!stream.ok()) {
        out.accept = stream.status();
        return out;
      }
      out.peer_name = (*stream)->peer_name();
      std::string buf(7, '\0');
      if ((*stream)->ReadExact(std::as_writable_bytes(std::span(buf)), In(2s)).ok()) {
        out.received = buf;
      }
      return out;
    });
  }

  // A connected, authenticated pair: client "west" (or `client`) to server "east".
  void Connect(std::unique_ptr<TlsStream>* client, std::unique_ptr<TlsStream>* server) {
    auto accepted = AcceptAsync();
    auto ctx = Context(west_);
    ASSERT_NE(ctx, nullptr);
    auto connected = TlsConnect(*ctx, Address(), "east", In(10s));
    auto served = accepted.get();
    ASSERT_TRUE(connected.ok()) << connected.status().ToString();
    ASSERT_TRUE(served.ok()) << served.status().ToString();
    *client = std::move(*connected);
    *server = std::move(*served);
  }

  // A TlsConnect client whose certificate the server should refuse. TLS 1.3 completes
  // the client's side of the handshake before the server has checked its certificate, so
  // the client only learns of the refusal when it reads; it writes first, to show that
  // the bytes never reach the server.
  Status ConnectWriteRead(const TlsIdentity& identity) {
    auto ctx = Context(identity);
    if (ctx == nullptr) return Status::Invalid("no context");
    SR_ASSIGN_OR_RETURN(auto stream, TlsConnect(*ctx, Address(), "east", In(10s)));
    SR_RETURN_IF_ERROR(stream->WriteAll(Bytes("secret\n"), In(5s)));
    std::byte byte[1];
    return stream->ReadExact(byte, In(5s));
  }

  // The server refused with `code` and a message containing `why`, and read nothing.
  static void ExpectRefused(std::future<ServerOutcome>& server, int code, std::string_view why) {
    ServerOutcome out = server.get();
    EXPECT_FALSE(out.accept.ok());
    EXPECT_EQ(out.accept.code(), code) << out.accept.ToString();
    EXPECT_TRUE(Contains(out.accept.message(), why)) << out.accept.ToString();
    EXPECT_EQ(out.peer_name, "");
    EXPECT_EQ(out.received, "");
  }

  static void ExpectClientToldRefused(const Status& client) {
    EXPECT_EQ(client.code(), EACCES) << client.ToString();
    EXPECT_TRUE(Contains(client.message(), "peer refused our certificate")) << client.ToString();
  }

  TempDir dir_;
  std::optional<TestPki> pki_;
  TlsIdentity east_;
  TlsIdentity west_;
  std::shared_ptr<TlsContext> server_ctx_;
  std::unique_ptr<TcpListener> listener_;
};

// --- The good path -------------------------------------------------------------------

TEST_F(TlsTest, MutualHandshakeNamesBothSidesAndEchoes) {
  auto accepted = AcceptAsync({"north", "west"});
  auto ctx = Context(west_);
  auto client = TlsConnect(*ctx, Address(), "east", In(10s));
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  auto server = accepted.get();
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  EXPECT_EQ((*client)->peer_name(), "east");
  EXPECT_EQ((*server)->peer_name(), "west");  // the allowed name that matched
  EXPECT_EQ((*client)->peer_address(), Address());
  EXPECT_TRUE(Contains((*server)->peer_address(), "127.0.0.1:"));

  ASSERT_TRUE((*client)->WriteAll(Bytes("ping\n"), In(5s)).ok());
  std::string got(5, '\0');
  ASSERT_TRUE((*server)->ReadExact(std::as_writable_bytes(std::span(got)), In(5s)).ok());
  EXPECT_EQ(got, "ping\n");
  ASSERT_TRUE((*server)->WriteAll(Bytes("pong\n"), In(5s)).ok());
  ASSERT_TRUE((*client)->ReadExact(std::as_writable_bytes(std::span(got)), In(5s)).ok());
  EXPECT_EQ(got, "pong\n");
}

TEST_F(TlsTest, NameOnlyInCommonNameIsAccepted) {
  TlsIdentity cn_only = pki_->Site("west", {.subject_alt_name = false, .file_stem = "west-cn"});
  auto server = ServeOnce();
  auto ctx = Context(cn_only);
  auto client = TlsConnect(*ctx, Address(), "east", In(10s));
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  ASSERT_TRUE((*client)->WriteAll(Bytes("hello!\n"), In(5s)).ok());
  ServerOutcome out = server.get();
  EXPECT_TRUE(out.accept.ok()) << out.accept.ToString();
  EXPECT_EQ(out.peer_name, "west");
  EXPECT_EQ(out.received, "hello!\n");
}

TEST_F(TlsTest, LargeTransfersBothWaysInterleaved) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  // 1 MiB chunks are far larger than the socket buffers, so every chunk makes its writer
  // wait in WANT_WRITE and its reader in WANT_READ; the two sides take turns writing.
  constexpr size_t kChunk = 1 << 20;
  constexpr uint32_t kRounds = 20;  // 20 MiB each way
  Status server_status;
  std::thread server_thread([&] {
    std::vector<std::byte> in(kChunk), out(kChunk), want(kChunk);
    for (uint32_t i = 0; i < kRounds && server_status.ok(); ++i) {
      server_status = server->ReadExact(in, In(30s));
      Fill(want, 2 * i);
      if (server_status.ok() && in != want)
        server_status = Status::Corrupt("chunk " + std::to_string(i));
      Fill(out, 2 * i + 1);
      if (server_status.ok()) server_status = server->WriteAll(out, In(30s));
    }
    // Then one write much larger than a TLS record or a socket buffer, read in one call.
    std::vector<std::byte> big(17 << 20);
    Fill(big, 999);
    if (server_status.ok()) server_status = server->WriteAll(big, In(60s));
  });
  std::vector<std::byte> in(kChunk), out(kChunk), want(kChunk);
  for (uint32_t i = 0; i < kRounds; ++i) {
    Fill(out, 2 * i);
    ASSERT_TRUE(client->WriteAll(out, In(30s)).ok()) << i;
    Status read = client->ReadExact(in, In(30s));
    ASSERT_TRUE(read.ok()) << read.ToString();
    Fill(want, 2 * i + 1);
    ASSERT_TRUE(in == want) << "chunk " << i;
  }
  std::vector<std::byte> big(17 << 20), big_want(17 << 20);
  Status read = client->ReadExact(big, In(60s));
  server_thread.join();
  ASSERT_TRUE(read.ok()) << read.ToString();
  Fill(big_want, 999);
  EXPECT_TRUE(big == big_want);
  EXPECT_TRUE(server_status.ok()) << server_status.ToString();
}

// The shipper's pattern: stream frames, and between frames take whatever acks arrived
// without blocking (WaitReadable with a deadline of now).
TEST_F(TlsTest, PipelinedFramesWithAcksThroughWaitReadable) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  constexpr size_t kFrame = 64 << 10;
  constexpr uint32_t kFrames = 256;  // 16 MiB
  Status server_status;
  std::thread receiver([&] {
    std::vector<std::byte> frame(kFrame), want(kFrame);
    for (uint32_t i = 0; i < kFrames && server_status.ok(); ++i) {
      server_status = server->ReadExact(frame, In(30s));
      Fill(want, i);
      if (server_status.ok() && frame != want) server_status = Status::Corrupt("frame");
      uint32_t ack = i;
      if (server_status.ok()) {
        server_status = server->WriteAll(std::as_bytes(std::span(&ack, 1)), In(30s));
      }
    }
  });
  uint32_t next_ack = 0;
  auto read_ack = [&](Deadline deadline) {
    uint32_t ack = ~0u;
    Status s = client->ReadExact(std::as_writable_bytes(std::span(&ack, 1)), deadline);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(ack, next_ack);
    ++next_ack;
  };
  std::vector<std::byte> frame(kFrame);
  for (uint32_t i = 0; i < kFrames; ++i) {
    Fill(frame, i);
    ASSERT_TRUE(client->WriteAll(frame, In(30s)).ok());
    while (client->WaitReadable(std::chrono::steady_clock::now())) {
      ASSERT_NO_FATAL_FAILURE(read_ack(In(5s)));
    }
  }
  while (next_ack < kFrames) ASSERT_NO_FATAL_FAILURE(read_ack(In(30s)));
  receiver.join();
  EXPECT_TRUE(server_status.ok()) << server_status.ToString();
  EXPECT_FALSE(client->WaitReadable(In(50ms)));
}

TEST_F(TlsTest, WaitReadableSeesDataBufferedInsideTls) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  EXPECT_FALSE(client->WaitReadable(std::chrono::steady_clock::now()));
  EXPECT_FALSE(client->WaitReadable(In(50ms)));
  ASSERT_TRUE(server->WriteAll(Bytes("0123456789abcdef"), In(5s)).ok());  // one record
  EXPECT_TRUE(client->WaitReadable(In(5s)));
  std::string half(8, '\0');
  ASSERT_TRUE(client->ReadExact(std::as_writable_bytes(std::span(half)), In(5s)).ok());
  EXPECT_EQ(half, "01234567");
  // The socket is empty now; the other half sits decrypted in OpenSSL's buffer.
  EXPECT_TRUE(client->WaitReadable(std::chrono::steady_clock::now()));
  ASSERT_TRUE(client->ReadExact(std::as_writable_bytes(std::span(half)), In(5s)).ok());
  EXPECT_EQ(half, "89abcdef");
  EXPECT_FALSE(client->WaitReadable(std::chrono::steady_clock::now()));
}

// --- Refusals: the server must fail TlsAccept and read nothing -------------------------

TEST_F(TlsTest, RefusesClientWithoutCertificate) {
  auto server = ServeOnce();
  RawClientOutcome client =
      RawTlsClient(listener_->port(), pki_->ca_cert(), nullptr, TLS1_3_VERSION);
  EXPECT_FALSE(client.read_ok);
  ExpectRefused(server, EACCES, "peer sent no certificate");
}

TEST_F(TlsTest, RefusesClientCertificateFromAnotherCa) {
  Result<TestPki> other = TestPki::Create(dir_.path() / "other");
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  TlsIdentity foreign = other->Site("west");
  foreign.ca = pki_->ca_cert();  // the client trusts our server; only its own cert is foreign
  auto server = ServeOnce();
  ExpectClientToldRefused(ConnectWriteRead(foreign));
  ExpectRefused(server, EACCES, "not signed by our CA");
}

TEST_F(TlsTest, RefusesExpiredClientCertificate) {
  TlsIdentity expired =
      pki_->Site("west", {.not_before = -48h, .not_after = -1h, .file_stem = "west-expired"});
  auto server = ServeOnce();
  RawClientOutcome client =
      RawTlsClient(listener_->port(), pki_->ca_cert(), &expired, TLS1_3_VERSION);
  EXPECT_FALSE(client.read_ok);
  ExpectRefused(server, EACCES, "certificate has expired");
}

TEST_F(TlsTest, RefusesNotYetValidClientCertificate) {
  TlsIdentity early =
      pki_->Site("west", {.not_before = 1h, .not_after = 48h, .file_stem = "west-early"});
  auto server = ServeOnce();
  ExpectClientToldRefused(ConnectWriteRead(early));
  ExpectRefused(server, EACCES, "certificate is not yet valid");
}

TEST_F(TlsTest, RefusesClientWithWrongName) {
  TlsIdentity north = pki_->Site("north");
  auto server = ServeOnce({"west"});
  ExpectClientToldRefused(ConnectWriteRead(north));
  ExpectRefused(server, EACCES, "peer certificate names \"north\", expected one of: west");
}

TEST_F(TlsTest, ClientRefusesServerWithWrongName) {
  auto server = ServeOnce();
  auto ctx = Context(west_);
  auto client = TlsConnect(*ctx, Address(), "south", In(10s));
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), EACCES);
  EXPECT_TRUE(Contains(client.status().message(),
                       "peer certificate names \"east\", expected one of: south"))
      << client.status().ToString();
  ExpectRefused(server, EACCES, "peer refused our certificate");
}

TEST_F(TlsTest, RefusesTls12Client) {
  auto server = ServeOnce();
  RawClientOutcome client =
      RawTlsClient(listener_->port(), pki_->ca_cert(), &west_, TLS1_2_VERSION);
  EXPECT_FALSE(client.handshake_ok);
  ExpectRefused(server, EPROTO, "peer does not speak TLS 1.3");
}

TEST_F(TlsTest, RefusesPlaintextClient) {
  auto server = ServeOnce();
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(listener_->port());
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  ASSERT_EQ(::send(fd.get(), "hello\n", 6, MSG_NOSIGNAL), 6);
  ExpectRefused(server, EPROTO, "peer is not speaking TLS");
}

// --- Ending a call: cancel, deadline, peer close --------------------------------------

TEST_F(TlsTest, CancelWakesBlockedReadAndFailsLaterCalls) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  std::thread canceller([&] {
    std::this_thread::sleep_for(100ms);
    client->Cancel();
  });
  std::byte buf[16];
  Status read = client->ReadExact(buf, In(60s));
  canceller.join();
  EXPECT_EQ(read.code(), ECANCELED) << read.ToString();
  EXPECT_EQ(client->WriteAll(Bytes("x"), In(60s)).code(), ECANCELED);
  EXPECT_EQ(client->ReadExact(buf, In(60s)).code(), ECANCELED);
  EXPECT_TRUE(client->WaitReadable(In(60s)));  // a read would not block: it fails at once
}

TEST_F(TlsTest, CancelWakesBlockedWrite) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  std::thread canceller([&] {
    std::this_thread::sleep_for(100ms);
    client->Cancel();
  });
  std::vector<std::byte> lots(64 << 20);  // the server never reads, so this blocks
  Status write = client->WriteAll(lots, In(60s));
  canceller.join();
  EXPECT_EQ(write.code(), ECANCELED) << write.ToString();
}

TEST_F(TlsTest, WriteTimingOutIsFinal) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  std::vector<std::byte> lots(64 << 20);  // the server never reads, so this blocks
  Status write = client->WriteAll(lots, In(200ms));
  EXPECT_EQ(write.code(), ETIMEDOUT) << write.ToString();
  // Part of a record may be out: the next write must not start a new one.
  EXPECT_EQ(client->WriteAll(Bytes("x"), In(5s)).code(), ETIMEDOUT);
}

TEST_F(TlsTest, ReadPastDeadlineTimesOut) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  std::byte buf[4];
  Status read = client->ReadExact(buf, In(100ms));
  EXPECT_EQ(read.code(), ETIMEDOUT) << read.ToString();
  // Nothing was read, so the stream is still in step and usable.
  ASSERT_TRUE(server->WriteAll(Bytes("abcd"), In(5s)).ok());
  read = client->ReadExact(buf, In(5s));
  EXPECT_TRUE(read.ok()) << read.ToString();
}

TEST_F(TlsTest, ReadTimingOutHalfWayBreaksTheStream) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  ASSERT_TRUE(server->WriteAll(Bytes("ab"), In(5s)).ok());
  std::byte buf[4];
  EXPECT_EQ(client->ReadExact(buf, In(200ms)).code(), ETIMEDOUT);
  // "ab" is gone to the failed call; a later read must not hand out "cd" as a frame start.
  ASSERT_TRUE(server->WriteAll(Bytes("cdef"), In(5s)).ok());
  EXPECT_EQ(client->ReadExact(buf, In(5s)).code(), ETIMEDOUT);
}

TEST_F(TlsTest, HandshakeWithSilentPeerTimesOut) {
  // Nobody accepts: the kernel completes the TCP connection, but no ServerHello comes.
  auto ctx = Context(west_);
  auto client = TlsConnect(*ctx, Address(), "east", In(200ms));
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), ETIMEDOUT) << client.status().ToString();
  // And the server side of a client that connects and says nothing.
  auto accepted = listener_->Accept();
  ASSERT_TRUE(accepted.ok());
  UniqueFd silent(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(listener_->port());
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(silent.get(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  auto fd = listener_->Accept();
  ASSERT_TRUE(fd.ok());
  auto server = TlsAccept(*server_ctx_, std::move(*fd), {"west"}, In(200ms));
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), ETIMEDOUT) << server.status().ToString();
}

TEST_F(TlsTest, PeerCloseGivesEpipe) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  ASSERT_TRUE(server->WriteAll(Bytes("last"), In(5s)).ok());
  server.reset();  // sends close_notify
  std::string got(4, '\0');
  ASSERT_TRUE(client->ReadExact(std::as_writable_bytes(std::span(got)), In(5s)).ok());
  EXPECT_EQ(got, "last");
  EXPECT_TRUE(client->WaitReadable(In(5s)));  // the close is readable
  std::byte byte[1];
  Status read = client->ReadExact(byte, In(5s));
  EXPECT_EQ(read.code(), EPIPE) << read.ToString();
  EXPECT_TRUE(Contains(read.message(), "peer closed")) << read.ToString();
}

TEST_F(TlsTest, PeerVanishingWithoutCloseNotifyGivesEpipe) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  ASSERT_EQ(::shutdown(server->fd(), SHUT_RDWR), 0);  // TCP FIN, no TLS close_notify
  std::byte byte[1];
  Status read = client->ReadExact(byte, In(5s));
  EXPECT_EQ(read.code(), EPIPE) << read.ToString();
  EXPECT_TRUE(Contains(read.message(), "peer closed")) << read.ToString();
}

TEST_F(TlsTest, WritingToClosedPeerFailsWithoutSigpipe) {
  std::unique_ptr<TlsStream> client, server;
  ASSERT_NO_FATAL_FAILURE(Connect(&client, &server));
  server.reset();
  std::vector<std::byte> data(1 << 20);
  Status write;
  // The first writes may still land in the socket buffer before the reset comes back.
  for (int i = 0; i < 64 && write.ok(); ++i) write = client->WriteAll(data, In(5s));
  EXPECT_TRUE(write.code() == EPIPE || write.code() == ECONNRESET) << write.ToString();
}

// --- Sockets ----------------------------------------------------------------------------

TEST_F(TlsTest, ListenerStopWakesAccept) {
  std::future<Result<UniqueFd>> accepted =
      std::async(std::launch::async, [this] { return listener_->Accept(); });
  std::this_thread::sleep_for(50ms);
  listener_->Stop();
  Result<UniqueFd> fd = accepted.get();
  ASSERT_FALSE(fd.ok());
  EXPECT_EQ(fd.status().code(), ECANCELED) << fd.status().ToString();
  EXPECT_EQ(listener_->Accept().status().code(), ECANCELED);  // and stays stopped
}

TEST_F(TlsTest, ListenAndConnectErrors) {
  auto taken = TcpListener::Listen(Address());
  ASSERT_FALSE(taken.ok());
  EXPECT_EQ(taken.status().code(), EADDRINUSE) << taken.status().ToString();
  EXPECT_EQ(TcpListener::Listen("no-port-here").status().code(), EINVAL);
  EXPECT_EQ(TcpListener::Listen("::1:80").status().code(), EINVAL);  // needs [::1]:80

  uint16_t closed_port = listener_->port();
  listener_.reset();
  auto ctx = Context(west_);
  auto client = TlsConnect(*ctx, "127.0.0.1:" + std::to_string(closed_port), "east", In(5s));
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), ECONNREFUSED) << client.status().ToString();
  EXPECT_EQ(TlsConnect(*ctx, "127.0.0.1:99999", "east", In(5s)).status().code(), EINVAL);
}

TEST_F(TlsTest, Ipv6Loopback) {
  auto listener = TcpListener::Listen("[::1]:0");
  if (!listener.ok()) GTEST_SKIP() << "no IPv6 loopback: " << listener.status().ToString();
  std::string address = "[::1]:" + std::to_string((*listener)->port());
  auto accepted = std::async(std::launch::async, [&]() -> Result<std::unique_ptr<TlsStream>> {
    SR_ASSIGN_OR_RETURN(UniqueFd fd, (*listener)->Accept());
    return TlsAccept(*server_ctx_, std::move(fd), {"west"}, In(10s));
  });
  auto ctx = Context(west_);
  auto client = TlsConnect(*ctx, address, "east", In(10s));
  auto server = accepted.get();
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  EXPECT_EQ((*client)->peer_address(), address);
  EXPECT_EQ((*server)->peer_name(), "west");
}

TEST_F(TlsTest, AcceptedSocketsAreCloseOnExec) {
  auto accepted = std::async(std::launch::async, [this] { return listener_->Accept(); });
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(listener_->port());
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  Result<UniqueFd> server_fd = accepted.get();
  ASSERT_TRUE(server_fd.ok()) << server_fd.status().ToString();
  EXPECT_NE(::fcntl(server_fd->get(), F_GETFD) & FD_CLOEXEC, 0);
}

// --- TlsContext::Create ----------------------------------------------------------------

TEST_F(TlsTest, ContextCreateErrorsNameTheProblem) {
  TlsIdentity missing_ca = east_;
  missing_ca.ca = dir_.path() / "nope" / "ca.pem";
  auto ctx = TlsContext::Create(missing_ca);
  ASSERT_FALSE(ctx.ok());
  EXPECT_EQ(ctx.status().code(), ENOENT);
  EXPECT_TRUE(Contains(ctx.status().message(), missing_ca.ca.string())) << ctx.status().ToString();

  TlsIdentity missing_key = east_;
  missing_key.key = dir_.path() / "east-missing.key";
  ctx = TlsContext::Create(missing_key);
  ASSERT_FALSE(ctx.ok());
  EXPECT_TRUE(Contains(ctx.status().message(), missing_key.key.string()))
      << ctx.status().ToString();

  TlsIdentity mismatched = east_;
  mismatched.key = west_.key;
  ctx = TlsContext::Create(mismatched);
  ASSERT_FALSE(ctx.ok());
  EXPECT_EQ(ctx.status().code(), EINVAL);
  EXPECT_TRUE(Contains(ctx.status().message(), "does not match")) << ctx.status().ToString();

  TlsIdentity expired =
      pki_->Site("east", {.not_before = -48h, .not_after = -1h, .file_stem = "east-expired"});
  ctx = TlsContext::Create(expired);
  ASSERT_FALSE(ctx.ok());
  EXPECT_TRUE(Contains(ctx.status().message(), "expired")) << ctx.status().ToString();
  EXPECT_TRUE(Contains(ctx.status().message(), expired.cert.string()));

  TlsIdentity garbage_ca = east_;
  garbage_ca.ca = dir_.path() / "garbage.pem";
  ASSERT_TRUE(WriteFileAtomic(garbage_ca.ca, "not a certificate\n").ok());
  ctx = TlsContext::Create(garbage_ca);
  ASSERT_FALSE(ctx.ok());
  EXPECT_TRUE(Contains(ctx.status().message(), garbage_ca.ca.string())) << ctx.status().ToString();

  TlsIdentity garbage_key = east_;
  garbage_key.key = garbage_ca.ca;
  ctx = TlsContext::Create(garbage_key);
  ASSERT_FALSE(ctx.ok());
  EXPECT_TRUE(Contains(ctx.status().message(), "private key")) << ctx.status().ToString();
}

// --- tools/siterep-certs ---------------------------------------------------------------

class CertScriptTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access("/usr/bin/openssl", X_OK) != 0) GTEST_SKIP() << "/usr/bin/openssl is missing";
  }
  // Runs the script with args; its output goes to a log shown on failure.
  int Run(const std::string& args) {
    std::string command = std::string("bash '") + SITEREP_CERTS_SCRIPT + "' " + args + " >>'" +
                          log_.string() + "' 2>&1";
    int rc = std::system(command.c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }
  std::string Log() const {
    std::ifstream in(log_);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  mode_t Mode(const fs::path& path) const {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 ? st.st_mode & 0777 : 0;
  }

  TempDir dir_;
  fs::path certs_ = dir_.path() / "certs";
  fs::path log_ = dir_.path() / "script.log";
};

TEST_F(CertScriptTest, MakesCertificatesThatHandshake) {
  std::string dir = "'" + certs_.string() + "'";
  ASSERT_EQ(Run(dir + " ca"), 0) << Log();
  ASSERT_EQ(Run(dir + " site east"), 0) << Log();
  ASSERT_EQ(Run(dir + " site west --days 30"), 0) << Log();
  EXPECT_EQ(Mode(certs_ / "ca.key"), 0600u);
  EXPECT_EQ(Mode(certs_ / "east.key"), 0600u);
  EXPECT_EQ(Mode(certs_ / "west.key"), 0600u);

  auto east = TlsContext::Create({certs_ / "ca.pem", certs_ / "east.pem", certs_ / "east.key"});
  auto west = TlsContext::Create({certs_ / "ca.pem", certs_ / "west.pem", certs_ / "west.key"});
  ASSERT_TRUE(east.ok()) << east.status().ToString();
  ASSERT_TRUE(west.ok()) << west.status().ToString();
  auto listener = TcpListener::Listen("127.0.0.1:0");
  ASSERT_TRUE(listener.ok()) << listener.status().ToString();
  auto accepted = std::async(std::launch::async, [&]() -> Result<std::unique_ptr<TlsStream>> {
    SR_ASSIGN_OR_RETURN(UniqueFd fd, (*listener)->Accept());
    return TlsAccept(**east, std::move(fd), {"west"}, In(10s));
  });
  auto client =
      TlsConnect(**west, "127.0.0.1:" + std::to_string((*listener)->port()), "east", In(10s));
  auto server = accepted.get();
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  EXPECT_EQ((*server)->peer_name(), "west");
  ASSERT_TRUE((*client)->WriteAll(Bytes("ping"), In(5s)).ok());
  std::string got(4, '\0');
  ASSERT_TRUE((*server)->ReadExact(std::as_writable_bytes(std::span(got)), In(5s)).ok());
  EXPECT_EQ(got, "ping");
}

TEST_F(CertScriptTest, RefusesToReplaceOrToWorkWithoutCa) {
  std::string dir = "'" + certs_.string() + "'";
  EXPECT_EQ(Run(dir + " site east"), 1) << Log();  // no CA yet
  EXPECT_TRUE(Contains(Log(), "no CA in"));
  ASSERT_EQ(Run(dir + " ca"), 0) << Log();
  EXPECT_EQ(Run(dir + " ca"), 1) << Log();
  EXPECT_TRUE(Contains(Log(), "--force"));
  EXPECT_EQ(Run(dir + " ca --force"), 0) << Log();
  EXPECT_EQ(Run(dir + " site 'bad name'"), 1) << Log();
  EXPECT_EQ(Run(dir + " site east --days 0"), 2) << Log();
  EXPECT_EQ(Run("--help"), 0) << Log();
  EXPECT_EQ(Run(dir + " frobnicate"), 2) << Log();
}

}  // namespace
}  // namespace siterep::shipper
