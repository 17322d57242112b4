#include "shipper/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <initializer_list>

#include "common/file_util.h"
#include "shipper/openssl_ptr.h"

namespace siterep::shipper {
namespace {

using Clock = std::chrono::steady_clock;


// Site names are plain DNS-like labels; wildcards in a certificate must never stand in
// for one, so "*.x" cannot name every site.
constexpr unsigned kHostFlags = X509_CHECK_FLAG_NO_WILDCARDS;

// After a refused handshake we read (and throw away, undecrypted) what the peer still
// sends for at most this long, so that our close is a FIN and not a reset that would
// destroy our alert before the peer reads it.
constexpr auto kRefusalDrain = std::chrono::milliseconds(200);
constexpr size_t kRefusalDrainBytes = 1 << 20;

// This thread's OpenSSL error queue as one line, and the reasons in it. Taking the errors
// empties the queue, so a later SSL_get_error never sees stale entries.
struct SslErrors {
  std::string text;
  std::vector<int> reasons;  // ERR_GET_REASON of each SSL-library entry

  bool Has(std::initializer_list<int> any) const {
    return std::any_of(reasons.begin(), reasons.end(),
                       [&](int r) { return std::find(any.begin(), any.end(), r) != any.end(); });
  }
};

SslErrors TakeSslErrors() {
  SslErrors errors;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!errors.text.empty()) errors.text += "; ";
    errors.text += buf;
    if (ERR_GET_LIB(e) == ERR_LIB_SSL) errors.reasons.push_back(ERR_GET_REASON(e));
  }
  ERR_clear_error();
  return errors;
}

// Status for a failed OpenSSL call outside a connection (context set-up).
Status SslFailure(int code, std::string what) {
  SslErrors errors = TakeSslErrors();
  if (!errors.text.empty()) what += ": " + errors.text;
  return Status::Error(code, std::move(what));
}

// A name from a certificate, printable and bounded (a peer chooses these bytes).
std::string Quote(std::string_view name) {
  std::string out = "\"";
  for (char c : name.substr(0, 64)) {
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += c;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", static_cast<unsigned char>(c));
      out += buf;
    }
  }
  if (name.size() > 64) out += "...";
  return out + "\"";
}

// The names X509_check_host compares against: subjectAltName DNS entries, else the CN.
std::string CertNames(X509* cert) {
  std::vector<std::string> names;
  auto* sans =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  if (sans != nullptr) {
    for (int i = 0; i < sk_GENERAL_NAME_num(sans); ++i) {
      const GENERAL_NAME* gen = sk_GENERAL_NAME_value(sans, i);
      if (gen->type != GEN_DNS) continue;
      const ASN1_STRING* dns = gen->d.dNSName;
      names.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(dns)),
                         ASN1_STRING_length(dns));
    }
    GENERAL_NAMES_free(sans);
  }
  if (names.empty()) {
    X509_NAME* subject = X509_get_subject_name(cert);
    int index = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    if (index >= 0) {
      unsigned char* utf8 = nullptr;
      int length =
          ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, index)));
      if (length >= 0) names.emplace_back(reinterpret_cast<char*>(utf8), length);
      OPENSSL_free(utf8);
    }
  }
  if (names.empty()) return "no name";
  std::string out;
  for (size_t i = 0; i < names.size() && i < 8; ++i) {
    if (i > 0) out += ", ";
    out += Quote(names[i]);
  }
  if (names.size() > 8) out += ", ...";
  return out;
}

std::string Join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& name : names) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

std::string AsnTimeString(const ASN1_TIME* time) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || ASN1_TIME_print(bio.get(), time) != 1) return "?";
  char* data = nullptr;
  long length = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, length > 0 ? length : 0);
}

int PollTimeoutMs(Deadline deadline) {
  Deadline now = Clock::now();
  if (deadline <= now) return 0;
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(deadline - now).count();
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

// Waits until fd is ready for events (or has an error/hang-up, which the next I/O call
// reports), cancel_fd (if >= 0) is readable, or deadline passes. A deadline already past
// still reports readiness that exists now.
Status WaitFd(int fd, short events, int cancel_fd, Deadline deadline, std::string_view what) {
  for (;;) {
    pollfd fds[2] = {{fd, events, 0}, {cancel_fd, POLLIN, 0}};
    int n = ::poll(fds, cancel_fd >= 0 ? 2 : 1, PollTimeoutMs(deadline));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, std::string(what) + ": poll");
    }
    if (cancel_fd >= 0 && fds[1].revents != 0) {
      return Status::Error(ECANCELED, std::string(what) + ": cancelled");
    }
    if (fds[0].revents != 0) return Status::Ok();
    if (Clock::now() >= deadline) {
      return Status::Error(ETIMEDOUT, std::string(what) + ": timed out");
    }
  }
}

// "host:port" or "[v6]:port" into its parts.
Status SplitHostPort(const std::string& address, std::string* host, std::string* port) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) {
    return Status::Invalid("address '" + address + "' is not host:port");
  }
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  } else if (host->find(':') != std::string::npos) {
    return Status::Invalid("address '" + address + "': write an IPv6 host as [addr]:port");
  }
  if (port->find_first_not_of("0123456789") != std::string::npos || port->size() > 5 ||
      std::stoul(*port) > 65535) {
    return Status::Invalid("address '" + address + "': bad port '" + *port + "'");
  }
  return Status::Ok();
}

struct AddrInfoFree {
  void operator()(addrinfo* ai) const { freeaddrinfo(ai); }
};
using AddrInfoPtr = std::unique_ptr<addrinfo, AddrInfoFree>;

Result<AddrInfoPtr> Resolve(const std::string& address, int flags) {
  std::string host, port;
  SR_RETURN_IF_ERROR(SplitHostPort(address, &host, &port));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | flags;
  addrinfo* list = nullptr;
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &list);
  if (rc == EAI_SYSTEM) return Status::FromErrno(errno, "resolve " + address);
  if (rc != 0) {
    return Status::Error(EHOSTUNREACH, "resolve " + address + ": " + ::gai_strerror(rc));
  }
  return AddrInfoPtr(list);
}

std::string SockaddrString(const sockaddr* sa, socklen_t length) {
  char host[NI_MAXHOST], port[NI_MAXSERV];
  if (::getnameinfo(sa, length, host, sizeof(host), port, sizeof(port),
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    return "?";
  }
  if (sa->sa_family == AF_INET6) return std::string("[") + host + "]:" + port;
  return std::string(host) + ":" + port;
}

std::string PeerAddress(int fd) {
  sockaddr_storage ss{};
  socklen_t length = sizeof(ss);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &length) != 0) return "?";
  return SockaddrString(reinterpret_cast<sockaddr*>(&ss), length);
}

// Non-blocking, no Nagle delay (frames and acks are latency-bound), keepalive so a
// vanished peer is eventually noticed by an idle connection.
Status PrepareSocket(int fd, std::string_view what) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
    return Status::FromErrno(errno, std::string(what) + ": set O_NONBLOCK");
  }
  int one = 1;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
    return Status::FromErrno(errno, std::string(what) + ": set TCP_NODELAY");
  }
  if (::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) != 0) {
    return Status::FromErrno(errno, std::string(what) + ": set SO_KEEPALIVE");
  }
  return Status::Ok();
}

// After a refused or failed handshake: OpenSSL has already written its alert; stop
// sending and swallow what the peer still has in flight until it closes (bounded), so
// that closing does not reset the connection and discard the alert unread.
void DrainBeforeClose(int fd, Deadline deadline) {
  ::shutdown(fd, SHUT_WR);
  Deadline until = std::min(deadline, Clock::now() + kRefusalDrain);
  char sink[4096];
  size_t total = 0;
  for (;;) {
    ssize_t n = ::recv(fd, sink, sizeof(sink), 0);
    if (n > 0) {
      total += n;
      if (total > kRefusalDrainBytes) return;
      continue;
    }
    if (n == 0) return;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, PollTimeoutMs(until)) <= 0) return;
  }
}

// The socket underneath OpenSSL. We give OpenSSL our own BIO rather than its socket BIO
// so that writes use MSG_NOSIGNAL (a peer that vanished must fail the call with EPIPE,
// not kill the daemon with SIGPIPE), and so that the errno of a failed send/recv is kept
// for the Status instead of whatever errno holds when we look.
struct SocketIo {
  int fd = -1;
  int last_errno = 0;  // of the last failed send/recv other than EAGAIN
  bool eof = false;    // recv returned 0
};

int SocketBioWrite(BIO* bio, const char* data, int length) {
  auto* io = static_cast<SocketIo*>(BIO_get_data(bio));
  BIO_clear_retry_flags(bio);
  ssize_t n = ::send(io->fd, data, length, MSG_NOSIGNAL);
  if (n >= 0) return static_cast<int>(n);
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
    BIO_set_retry_write(bio);
  } else {
    io->last_errno = errno;
  }
  return -1;
}

int SocketBioRead(BIO* bio, char* data, int length) {
  auto* io = static_cast<SocketIo*>(BIO_get_data(bio));
  BIO_clear_retry_flags(bio);
  ssize_t n = ::recv(io->fd, data, length, 0);
  if (n > 0) return static_cast<int>(n);
  if (n == 0) {
    io->eof = true;
    return 0;
  }
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
    BIO_set_retry_read(bio);
  } else {
    io->last_errno = errno;
  }
  return -1;
}

long SocketBioCtrl(BIO* bio, int cmd, long /*num*/, void* /*ptr*/) {
  switch (cmd) {
    case BIO_CTRL_FLUSH:
      return 1;         // nothing is buffered here
    case BIO_CTRL_EOF:  // tells OpenSSL a 0 read was a real end of stream
      return static_cast<SocketIo*>(BIO_get_data(bio))->eof ? 1 : 0;
    default:
      return 0;
  }
}

const BIO_METHOD* SocketBioMethod() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "siterep socket");
    if (m == nullptr) return m;
    BIO_meth_set_write(m, SocketBioWrite);
    BIO_meth_set_read(m, SocketBioRead);
    BIO_meth_set_ctrl(m, SocketBioCtrl);
    return m;
  }();
  return method;
}

// What the certificate verify callback saw on the first failure; read back to explain a
// refused handshake better than "certificate verify failed".
struct VerifyFailure {
  bool failed = false;
  int error = X509_V_OK;
  int depth = 0;
  std::string names;  // of the certificate being verified (the peer's leaf)
};

int VerifyCallback(int preverify_ok, X509_STORE_CTX* store) {
  if (preverify_ok == 1) return 1;
  auto* ssl =
      static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  auto* failure = ssl != nullptr ? static_cast<VerifyFailure*>(SSL_get_app_data(ssl)) : nullptr;
  if (failure != nullptr && !failure->failed) {
    failure->failed = true;
    failure->error = X509_STORE_CTX_get_error(store);
    failure->depth = X509_STORE_CTX_get_error_depth(store);
    X509* leaf = X509_STORE_CTX_get0_cert(store);
    failure->names = leaf != nullptr ? CertNames(leaf) : "no name";
  }
  return 0;
}

Status CheckReadableFile(const std::filesystem::path& path, std::string_view role) {
  std::string what = "TLS " + std::string(role) + " file " + path.string();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, what);
  UniqueFd owner(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Status::FromErrno(errno, what);
  if (!S_ISREG(st.st_mode)) return Status::Invalid(what + ": not a regular file");
  return Status::Ok();
}

// A key file must never make OpenSSL prompt on the terminal for a pass phrase.
int NoPassphrase(char*, int, int, void*) { return -1; }

}  // namespace

// ---------------------------------------------------------------------------------------
// TlsContext

struct TlsContext::Impl {
  SslCtxPtr ctx;
};

TlsContext::TlsContext(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TlsContext::~TlsContext() = default;

Result<std::shared_ptr<TlsContext>> TlsContext::Create(const TlsIdentity& identity) {
  SR_RETURN_IF_ERROR(CheckReadableFile(identity.ca, "CA"));
  SR_RETURN_IF_ERROR(CheckReadableFile(identity.cert, "certificate"));
  SR_RETURN_IF_ERROR(CheckReadableFile(identity.key, "key"));
  ERR_clear_error();

  // TLS_method: the same context serves the shipper (client) and the receiver (server).
  SslCtxPtr ctx(SSL_CTX_new(TLS_method()));
  if (ctx == nullptr) return SslFailure(ENOMEM, "SSL_CTX_new");
  SSL_CTX* c = ctx.get();
  if (SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION) != 1 ||
      SSL_CTX_set_max_proto_version(c, TLS1_3_VERSION) != 1) {
    return SslFailure(EPROTO, "TLS: cannot restrict the protocol to TLS 1.3");
  }
  // Only our CA: the system store would let any public CA vouch for a "site".
  if (SSL_CTX_load_verify_locations(c, identity.ca.c_str(), nullptr) != 1) {
    return SslFailure(EINVAL, "TLS CA file " + identity.ca.string() + ": no usable certificate");
  }
  if (SSL_CTX_use_certificate_chain_file(c, identity.cert.c_str()) != 1) {
    return SslFailure(EINVAL,
                      "TLS certificate file " + identity.cert.string() + ": cannot load it");
  }
  X509* own = SSL_CTX_get0_certificate(c);
  if (X509_cmp_current_time(X509_get0_notAfter(own)) < 0) {
    return Status::Invalid("TLS certificate file " + identity.cert.string() + " expired on " +
                           AsnTimeString(X509_get0_notAfter(own)) +
                           "; issue a new one (siterep-certs DIR site NAME)");
  }

  PkeyPtr key;
  {
    BioPtr bio(BIO_new_file(identity.key.c_str(), "r"));
    if (bio != nullptr) {
      key.reset(PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassphrase, nullptr));
    }
    if (key == nullptr) {
      return SslFailure(
          EINVAL, "TLS key file " + identity.key.string() + ": not an unencrypted PEM private key");
    }
  }
  if (X509_check_private_key(own, key.get()) != 1) {
    return SslFailure(EINVAL, "TLS key file " + identity.key.string() +
                                  " does not match certificate " + identity.cert.string());
  }
  if (SSL_CTX_use_PrivateKey(c, key.get()) != 1 || SSL_CTX_check_private_key(c) != 1) {
    return SslFailure(EINVAL, "TLS key file " + identity.key.string() +
                                  " does not match certificate " + identity.cert.string());
  }

  // Both roles verify the peer; FAIL_IF_NO_PEER_CERT makes a server refuse a client that
  // sends none (clients ignore that flag: a server always sends one).
  SSL_CTX_set_verify(c, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, VerifyCallback);
  // No tickets and no session cache: a resumed session would skip the certificate check
  // of this connection, and a ticket sent after the handshake would be bytes the reader
  // did not ask for.
  SSL_CTX_set_num_tickets(c, 0);
  SSL_CTX_set_options(c, SSL_OP_NO_TICKET);
  SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
  // Partial writes let WriteAll advance record by record on a non-blocking socket (it
  // retries a WANT_WRITE with the same bytes, as OpenSSL requires).
  SSL_CTX_set_mode(c, SSL_MODE_ENABLE_PARTIAL_WRITE);

  auto impl = std::make_unique<Impl>();
  impl->ctx = std::move(ctx);
  return std::shared_ptr<TlsContext>(new TlsContext(std::move(impl)));
}

// ---------------------------------------------------------------------------------------
// TlsStream

struct TlsStream::Impl {
  // Declaration order is destruction order reversed: ssl (whose BIO points at io) goes
  // before io and the fds.
  UniqueFd fd;
  UniqueFd cancel_fd;  // eventfd; Cancel() makes it readable for good
  std::atomic<bool> cancelled{false};
  SocketIo io;
  VerifyFailure verify_failure;  // SSL app data during the handshake
  SslPtr ssl;
  std::string peer_name;
  std::string peer_address;
  std::vector<std::string> expected_names;  // for refusal messages
  bool handshake_done = false;
  Status sticky;  // the first fatal error: every later call returns it

  std::string read_what;   // "TLS read from west (10.0.0.2:7410)", set after the handshake
  std::string write_what;  // "TLS write to west (10.0.0.2:7410)"

  Status Cancelled(std::string_view what) const {
    return Status::Error(ECANCELED, std::string(what) + ": cancelled");
  }

  // Turns a failed SSL call into a Status with the reason an operator needs.
  Status Failure(int ssl_error, std::string_view what) {
    std::string w(what);
    SslErrors errors = TakeSslErrors();
    auto with_detail = [&](std::string message) {
      return errors.text.empty() ? message : message + " (" + errors.text + ")";
    };
    if (verify_failure.failed) {
      if (verify_failure.error == X509_V_ERR_HOSTNAME_MISMATCH) {
        return Status::Error(EACCES, w + ": peer certificate names " + verify_failure.names +
                                         ", expected one of: " + Join(expected_names));
      }
      std::string reason = X509_verify_cert_error_string(verify_failure.error);
      switch (verify_failure.error) {
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
        case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
        case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
        case X509_V_ERR_CERT_SIGNATURE_FAILURE:
          reason += " (not signed by our CA)";
          break;
        default:
          break;
      }
      if (verify_failure.depth > 0) {
        reason += " at chain depth " + std::to_string(verify_failure.depth);
      }
      return Status::Error(
          EACCES, w + ": peer certificate " + verify_failure.names + " refused: " + reason);
    }
    switch (ssl_error) {
      case SSL_ERROR_ZERO_RETURN:
        return Status::Error(EPIPE, w + ": peer closed the connection");
      case SSL_ERROR_SYSCALL:
        if (io.last_errno == EPIPE) {
          return Status::Error(EPIPE, w + ": peer closed the connection (broken pipe)");
        }
        if (io.last_errno != 0) return Status::FromErrno(io.last_errno, w);
        return Status::Error(EPIPE, with_detail(w + ": peer closed the connection"));
      case SSL_ERROR_SSL:
        break;
      default:
        return Status::Error(
            EIO, with_detail(w + ": unexpected SSL error " + std::to_string(ssl_error)));
    }
    if (errors.Has({SSL_R_UNEXPECTED_EOF_WHILE_READING})) {
      return Status::Error(EPIPE, w + ": peer closed the connection" +
                                      (handshake_done ? "" : " during the TLS handshake"));
    }
    if (errors.Has({SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE})) {
      return Status::Error(EACCES, with_detail(w + ": peer sent no certificate"));
    }
    // Alerts the peer sent because it refused our certificate.
    if (errors.Has({SSL_R_SSLV3_ALERT_BAD_CERTIFICATE, SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED,
                    SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED, SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN,
                    SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE, SSL_R_SSLV3_ALERT_NO_CERTIFICATE,
                    SSL_R_TLSV1_ALERT_UNKNOWN_CA, SSL_R_TLSV1_ALERT_ACCESS_DENIED,
                    SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED})) {
      return Status::Error(EACCES, with_detail(w + ": peer refused our certificate"));
    }
    if (errors.Has({SSL_R_UNSUPPORTED_PROTOCOL, SSL_R_TLSV1_ALERT_PROTOCOL_VERSION,
                    SSL_R_NO_PROTOCOLS_AVAILABLE})) {
      return Status::Error(EPROTO, with_detail(w + ": peer does not speak TLS 1.3"));
    }
    if (errors.Has({SSL_R_WRONG_VERSION_NUMBER, SSL_R_HTTP_REQUEST, SSL_R_HTTPS_PROXY_REQUEST,
                    SSL_R_PACKET_LENGTH_TOO_LONG, SSL_R_RECORD_LENGTH_MISMATCH,
                    SSL_R_UNKNOWN_PROTOCOL})) {
      return Status::Error(EPROTO, with_detail(w + ": peer is not speaking TLS"));
    }
    return Status::Error(EPROTO, with_detail(w + ": TLS protocol error"));
  }

  // Calls op (an SSL_* call returning > 0 on success) until it succeeds, waiting on the
  // socket for whichever direction OpenSSL asks for. The first fatal error sticks.
  template <typename Op>
  Status Run(std::string_view what, Deadline deadline, Op op) {
    if (!sticky.ok()) return sticky;
    for (;;) {
      if (cancelled.load(std::memory_order_acquire)) return Cancelled(what);
      ERR_clear_error();
      io.last_errno = 0;
      int ret = op();
      if (ret > 0) return Status::Ok();
      int error = SSL_get_error(ssl.get(), ret);
      short events = 0;
      if (error == SSL_ERROR_WANT_READ) {
        events = POLLIN;
      } else if (error == SSL_ERROR_WANT_WRITE) {
        events = POLLOUT;
      } else {
        sticky = Failure(error, what);
        return sticky;
      }
      SR_RETURN_IF_ERROR(WaitFd(fd.get(), events, cancel_fd.get(), deadline, what));
    }
  }
};

TlsStream::TlsStream(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

TlsStream::~TlsStream() {
  // One non-blocking try at close_notify, so the peer reads a clean "peer closed" rather
  // than a truncated stream; never after a fatal error (OpenSSL forbids it).
  if (impl_ != nullptr && impl_->ssl != nullptr && impl_->handshake_done && impl_->sticky.ok()) {
    SSL_shutdown(impl_->ssl.get());
  }
  ERR_clear_error();
}

Status TlsStream::ReadExact(std::span<std::byte> out, Deadline deadline) {
  Impl& s = *impl_;
  if (s.cancelled.load(std::memory_order_acquire)) return s.Cancelled(s.read_what);
  size_t done = 0;
  while (done < out.size()) {
    size_t n = 0;
    Status status = s.Run(s.read_what, deadline, [&] {
      return SSL_read_ex(s.ssl.get(), out.data() + done, out.size() - done, &n);
    });
    if (!status.ok()) {
      // A read that gave up half way lost bytes the caller never saw: the stream is out
      // of step for good. With nothing read, a timeout can be retried.
      if (done > 0 && s.sticky.ok()) s.sticky = status;
      return status;
    }
    done += n;
  }
  return Status::Ok();
}

Status TlsStream::WriteAll(std::span<const std::byte> data, Deadline deadline) {
  Impl& s = *impl_;
  if (s.cancelled.load(std::memory_order_acquire)) return s.Cancelled(s.write_what);
  size_t done = 0;
  while (done < data.size()) {
    size_t n = 0;
    Status status = s.Run(s.write_what, deadline, [&] {
      return SSL_write_ex(s.ssl.get(), data.data() + done, data.size() - done, &n);
    });
    if (!status.ok()) {
      // OpenSSL may hold a half-sent record that only a retry with the same bytes could
      // finish, and the peer may have part of our data: nothing sane can follow.
      if (s.sticky.ok()) s.sticky = status;
      return status;
    }
    done += n;
  }
  return Status::Ok();
}

bool TlsStream::WaitReadable(Deadline deadline) {
  Impl& s = *impl_;
  for (;;) {
    // A read would not block when it fails at once: report true so the caller's read
    // surfaces the error.
    if (s.cancelled.load(std::memory_order_acquire) || !s.sticky.ok()) return true;
    if (SSL_pending(s.ssl.get()) > 0) return true;
    // Bytes on the socket may be a partial record or a record with no application data;
    // peeking lets OpenSSL process them without consuming any application byte.
    ERR_clear_error();
    s.io.last_errno = 0;
    char byte;
    size_t n = 0;
    int ret = SSL_peek_ex(s.ssl.get(), &byte, 1, &n);
    if (ret > 0) return true;
    int error = SSL_get_error(s.ssl.get(), ret);
    short events = 0;
    if (error == SSL_ERROR_WANT_READ) {
      events = POLLIN;
    } else if (error == SSL_ERROR_WANT_WRITE) {
      events = POLLOUT;
    } else {
      s.sticky = s.Failure(error, s.read_what);
      return true;
    }
    Status waited = WaitFd(s.fd.get(), events, s.cancel_fd.get(), deadline, "TLS wait");
    if (!waited.ok()) return waited.code() != ETIMEDOUT;
  }
}

void TlsStream::Cancel() {
  impl_->cancelled.store(true, std::memory_order_release);
  uint64_t one = 1;
  // The eventfd counter is never read back, so it stays readable: every later wait
  // returns at once. A failed write can only mean the counter is saturated, i.e. set.
  [[maybe_unused]] ssize_t n = ::write(impl_->cancel_fd.get(), &one, sizeof(one));
}

const std::string& TlsStream::peer_name() const { return impl_->peer_name; }
const std::string& TlsStream::peer_address() const { return impl_->peer_address; }
int TlsStream::fd() const { return impl_->fd.get(); }

namespace {

enum class Role { kClient, kServer };

// Builds the stream around a connected socket and runs the handshake; on failure the
// socket is drained briefly and closed.
Result<std::unique_ptr<TlsStream::Impl>> Handshake(const TlsContext& ctx, UniqueFd fd, Role role,
                                                   const std::vector<std::string>& names,
                                                   std::string peer_address, Deadline deadline) {
  std::string what =
      std::string(role == Role::kClient ? "TLS handshake with " : "TLS handshake from ") +
      peer_address;
  SR_RETURN_IF_ERROR(PrepareSocket(fd.get(), what));
  auto s = std::make_unique<TlsStream::Impl>();
  s->fd = std::move(fd);
  s->peer_address = std::move(peer_address);
  s->expected_names = names;
  int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) return Status::FromErrno(errno, what + ": eventfd");
  s->cancel_fd.Reset(efd);
  s->io.fd = s->fd.get();

  ERR_clear_error();
  s->ssl.reset(SSL_new(ctx.impl()->ctx.get()));
  if (s->ssl == nullptr) return SslFailure(ENOMEM, what + ": SSL_new");
  SSL* ssl = s->ssl.get();
  const BIO_METHOD* method = SocketBioMethod();
  BIO* bio = method != nullptr ? BIO_new(method) : nullptr;
  if (bio == nullptr) return SslFailure(ENOMEM, what + ": BIO_new");
  BIO_set_data(bio, &s->io);
  BIO_set_init(bio, 1);
  SSL_set_bio(ssl, bio, bio);  // ssl owns the BIO now
  SSL_set_app_data(ssl, &s->verify_failure);
  // The name check is part of certificate verification on both sides, so a wrong name
  // fails the handshake with an alert, like a bad signature would.
  SSL_set_hostflags(ssl, kHostFlags);
  for (size_t i = 0; i < names.size(); ++i) {
    int ok = i == 0 ? SSL_set1_host(ssl, names[i].c_str()) : SSL_add1_host(ssl, names[i].c_str());
    if (ok != 1) return SslFailure(EINVAL, what + ": bad peer name '" + names[i] + "'");
  }
  if (role == Role::kClient) {
    SSL_set_connect_state(ssl);
  } else {
    SSL_set_accept_state(ssl);
  }

  Status status = s->Run(what, deadline, [ssl] { return SSL_do_handshake(ssl); });
  if (status.ok() && SSL_version(ssl) != TLS1_3_VERSION) {
    status = Status::Error(EPROTO, what + ": negotiated " + SSL_get_version(ssl) + ", not TLS 1.3");
  }
  if (status.ok()) {
    // Belt and braces over the verify callback: the peer certificate is there, verified,
    // and names one of ours; peer_name is our spelling of the name it matched.
    X509* cert = SSL_get0_peer_certificate(ssl);
    if (cert == nullptr || SSL_get_verify_result(ssl) != X509_V_OK) {
      status = Status::Error(EACCES, what + ": peer certificate not verified");
    } else {
      for (const std::string& name : names) {
        if (X509_check_host(cert, name.data(), name.size(), kHostFlags, nullptr) == 1) {
          s->peer_name = name;
          break;
        }
      }
      if (s->peer_name.empty()) {
        status = Status::Error(EACCES, what + ": peer certificate names " + CertNames(cert) +
                                           ", expected one of: " + Join(names));
      }
    }
  }
  if (!status.ok()) {
    ERR_clear_error();
    DrainBeforeClose(s->fd.get(), deadline);
    return status;
  }
  s->handshake_done = true;
  std::string label = s->peer_name + " (" + s->peer_address + ")";
  s->read_what = "TLS read from " + label;
  s->write_what = "TLS write to " + label;
  SSL_set_app_data(ssl, nullptr);  // verification is over
  return s;
}

}  // namespace

Result<std::unique_ptr<TlsStream>> TlsConnect(const TlsContext& ctx, const std::string& address,
                                              const std::string& expected_peer, Deadline deadline) {
  if (expected_peer.empty()) return Status::Invalid("TlsConnect " + address + ": no peer name");
  SR_ASSIGN_OR_RETURN(AddrInfoPtr list, Resolve(address, 0));
  Status last = Status::Error(EHOSTUNREACH, "connect to " + address + ": no address");
  UniqueFd connected;
  for (addrinfo* ai = list.get(); ai != nullptr && !connected.valid(); ai = ai->ai_next) {
    std::string what = "connect to " + address;
    UniqueFd fd(::socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd.valid()) {
      last = Status::FromErrno(errno, what + ": socket");
      continue;
    }
    if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) {
        last = Status::FromErrno(errno, what);
        continue;
      }
      // The deadline covers every address: once it passes there is no point going on.
      SR_RETURN_IF_ERROR(WaitFd(fd.get(), POLLOUT, -1, deadline, what));
      int error = 0;
      socklen_t length = sizeof(error);
      if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &error, &length) != 0) error = errno;
      if (error != 0) {
        last = Status::FromErrno(error, what);
        continue;
      }
    }
    connected = std::move(fd);
  }
  if (!connected.valid()) return last;
  std::string peer_address = PeerAddress(connected.get());
  SR_ASSIGN_OR_RETURN(auto impl, Handshake(ctx, std::move(connected), Role::kClient,
                                           {expected_peer}, peer_address, deadline));
  return std::make_unique<TlsStream>(std::move(impl));
}

Result<std::unique_ptr<TlsStream>> TlsAccept(const TlsContext& ctx, UniqueFd fd,
                                             const std::vector<std::string>& allowed_peers,
                                             Deadline deadline) {
  std::string peer_address = PeerAddress(fd.get());
  if (allowed_peers.empty()) {
    return Status::Invalid("TLS handshake from " + peer_address + ": no allowed peer names");
  }
  SR_ASSIGN_OR_RETURN(auto impl, Handshake(ctx, std::move(fd), Role::kServer, allowed_peers,
                                           peer_address, deadline));
  return std::make_unique<TlsStream>(std::move(impl));
}

// ---------------------------------------------------------------------------------------
// TcpListener

struct TcpListener::Impl {
  UniqueFd fd;
  UniqueFd stop_fd;  // eventfd; Stop() makes it readable for good
  uint16_t port = 0;
  std::string address;
};

TcpListener::TcpListener(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TcpListener::~TcpListener() = default;

Result<std::unique_ptr<TcpListener>> TcpListener::Listen(const std::string& address) {
  SR_ASSIGN_OR_RETURN(AddrInfoPtr list, Resolve(address, AI_PASSIVE));
  std::string what = "listen on " + address;
  Status last = Status::Error(EADDRNOTAVAIL, what + ": no address");
  auto impl = std::make_unique<Impl>();
  impl->address = address;
  for (addrinfo* ai = list.get(); ai != nullptr; ai = ai->ai_next) {
    UniqueFd fd(::socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd.valid()) {
      last = Status::FromErrno(errno, what + ": socket");
      continue;
    }
    int one = 1;
    // A restarted daemon must be able to listen again while old connections linger in
    // TIME_WAIT.
    if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0) {
      last = Status::FromErrno(errno, what + ": SO_REUSEADDR");
      continue;
    }
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      last = Status::FromErrno(errno, what);
      continue;
    }
    if (::listen(fd.get(), SOMAXCONN) != 0) {
      last = Status::FromErrno(errno, what);
      continue;
    }
    sockaddr_storage ss{};
    socklen_t length = sizeof(ss);
    if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&ss), &length) != 0) {
      return Status::FromErrno(errno, what + ": getsockname");
    }
    impl->port = ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                          : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    impl->fd = std::move(fd);
    break;
  }
  if (!impl->fd.valid()) return last;
  int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) return Status::FromErrno(errno, what + ": eventfd");
  impl->stop_fd.Reset(efd);
  return std::make_unique<TcpListener>(std::move(impl));
}

Result<UniqueFd> TcpListener::Accept() {
  Impl& l = *impl_;
  std::string what = "accept on " + l.address;
  for (;;) {
    Status waited = WaitFd(l.fd.get(), POLLIN, l.stop_fd.get(), Deadline::max(), what);
    if (waited.code() == ECANCELED) {
      return Status::Error(ECANCELED, "listener on " + l.address + " stopped");
    }
    SR_RETURN_IF_ERROR(waited);
    int fd = ::accept4(l.fd.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) return UniqueFd(fd);
    switch (errno) {
      // Gone before we took it, taken by another thread, or a network error that
      // accept(2) says to treat like EAGAIN: wait for the next one.
      case EAGAIN:
      case EINTR:
      case ECONNABORTED:
      case EPROTO:
      case ENETDOWN:
      case ENOPROTOOPT:
      case EHOSTDOWN:
      case ENONET:
      case EHOSTUNREACH:
      case EOPNOTSUPP:
      case ENETUNREACH:
        continue;
      default:
        return Status::FromErrno(errno, what);
    }
  }
}

void TcpListener::Stop() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(impl_->stop_fd.get(), &one, sizeof(one));
}

uint16_t TcpListener::port() const { return impl_->port; }

}  // namespace siterep::shipper
