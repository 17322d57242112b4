// TLS for the replication link: TLS 1.3 only (OpenSSL 3), mutual certificate
// authentication against the site's configured CA, and the peer's certificate name
// checked against the site name the caller expects. Used by the shipper (client side)
// and the receiver (server side); nothing else in siterep opens a replication socket.
//
// A connection is refused during the handshake, before any application byte is read,
// when the peer sends no certificate, one not signed by our CA, an expired or not yet
// valid one, one whose name (subjectAltName DNS entry, else common name) is not an
// allowed site name, offers only TLS 1.2 or older, or speaks plaintext.
//
// Threads: a TlsContext is immutable after Create and shared by any number of threads.
// A TlsStream belongs to one thread at a time, except Cancel(), which any thread may call
// to wake a blocked Read/Write (they then fail with ECANCELED). Never read on one thread
// while writing on another (OpenSSL's SSL object is not thread-safe): a side that both
// sends and receives multiplexes in one thread, e.g. WaitReadable(now) between writes.
// Sockets are non-blocking; every blocking call takes a deadline and fails with ETIMEDOUT
// when it passes.
//
// Error codes (Status::code()), the same for the handshake and for reads and writes:
//   EACCES     a certificate was refused: ours by the peer, or the peer's by us (message
//              says why: no certificate, not signed by our CA, expired, wrong name).
//   EPROTO     not TLS 1.3 (the peer offers only older versions, or speaks plaintext), or
//              another TLS protocol error; the OpenSSL error text is in the message.
//   EPIPE      the peer closed the connection (message says "peer closed").
//   ETIMEDOUT  the deadline passed.   ECANCELED  Cancel() was called.
//   other      the socket's errno (ECONNREFUSED, ECONNRESET, ...), with context.
// In TLS 1.3 the client's side of the handshake ends before the server has checked the
// client's certificate, so a client that the server refuses learns it from its first
// read (EACCES, "peer refused our certificate"); the server never reads its data.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"

namespace siterep::shipper {

using Deadline = std::chrono::steady_clock::time_point;

struct TlsIdentity {
  std::filesystem::path ca;    // PEM, the CA that signs every site's certificate
  std::filesystem::path cert;  // PEM, this site's certificate (may hold a chain)
  std::filesystem::path key;   // PEM, this site's private key
};

class TlsContext {
 public:
  // Loads CA, certificate and key; fails with a message naming the file when one is
  // missing, unreadable or holds nothing usable (an encrypted key counts as unusable),
  // when the key does not match the certificate, or when our own certificate is expired.
  // Only identity.ca is trusted (never the system store). The context serves both the
  // client and the server role.
  static Result<std::shared_ptr<TlsContext>> Create(const TlsIdentity& identity);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  struct Impl;
  Impl* impl() const { return impl_.get(); }

 private:
  explicit TlsContext(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// One authenticated TLS 1.3 connection.
class TlsStream {
 public:
  ~TlsStream();  // closes without waiting for the peer
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  // Reads exactly out.size() bytes. EPIPE (message says "peer closed") when the peer
  // closes first, ETIMEDOUT at the deadline, ECANCELED after Cancel().
  // A failure is final (every later call returns the same error) except ETIMEDOUT with
  // no byte read, after which the stream is still in step and may be read again.
  Status ReadExact(std::span<std::byte> out, Deadline deadline);
  // Writes all of data (same errors). Any failure, ETIMEDOUT included, is final.
  Status WriteAll(std::span<const std::byte> data, Deadline deadline);
  // True when a read would not block: at least one byte is buffered in TLS or arrives on
  // the socket, or the next read fails at once (peer closed, TLS error, cancelled) and
  // will report why. Waits at most until deadline; a deadline of now just looks. Consumes
  // no application byte. False only when the deadline passed with nothing readable.
  bool WaitReadable(Deadline deadline);
  // Thread-safe: wakes any blocked call on this stream; all later calls fail ECANCELED.
  // The stream must outlive the call.
  void Cancel();

  // The peer's verified site name: for a client, expected_peer; for a server, the entry
  // of allowed_peers that the client's certificate matched.
  const std::string& peer_name() const;
  const std::string& peer_address() const;  // "ip:port" or "[ip6]:port", for messages
  int fd() const;  // for poll(2) on the socket; never read or write it directly

  struct Impl;
  explicit TlsStream(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

// Client side: TCP connect to address ("host:port", "[v6addr]:port"; every resolved address
// is tried in turn), TLS handshake, and verification that the server's certificate names
// expected_peer (subjectAltName DNS, else CN; no wildcards). The deadline covers connect
// and handshake; name resolution (getaddrinfo) is not bounded by it, so prefer numeric
// addresses. The socket gets TCP_NODELAY and SO_KEEPALIVE.
Result<std::unique_ptr<TlsStream>> TlsConnect(const TlsContext& ctx, const std::string& address,
                                              const std::string& expected_peer, Deadline deadline);

// Server side: handshake on an accepted socket; the client's certificate must name one of
// allowed_peers (checked during the handshake, so a wrong name gets a TLS alert like any
// other refused certificate). Takes ownership of fd. On failure the socket is closed
// after reading (and discarding, undecrypted) what the client still sends for at most
// 200 ms, so that the client reads our alert instead of a connection reset.
Result<std::unique_ptr<TlsStream>> TlsAccept(const TlsContext& ctx, UniqueFd fd,
                                             const std::vector<std::string>& allowed_peers,
                                             Deadline deadline);

// A listening TCP socket (SO_REUSEADDR). Accept() blocks until a connection arrives or
// Stop() is called (then it, and every later Accept, fails with ECANCELED); it returns a
// non-blocking, close-on-exec socket for TlsAccept. Stop() is thread-safe.
class TcpListener {
 public:
  // address is "host:port"; port 0 picks a free port (see port()).
  static Result<std::unique_ptr<TcpListener>> Listen(const std::string& address);
  ~TcpListener();
  Result<UniqueFd> Accept();
  void Stop();
  uint16_t port() const;

  struct Impl;
  explicit TcpListener(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace siterep::shipper
