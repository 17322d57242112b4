// siterep-tlsbench: the raw TLS 1.3 stream that `make bench` compares shipping against.
// One process listens, accepts one connection and reads until the peer closes; the other
// connects and writes BYTES of random data in 1 MiB writes. Both use the same TLS layer,
// certificates and cipher negotiation as the replication link (shipper/tls.h), but
// nothing else: no framing, no CRC, no compression, no disk. The server prints the bytes
// it read and the seconds from the first byte to the close.
//
//   siterep-tlsbench serve ADDRESS CA CERT KEY PEER_NAME
//   siterep-tlsbench send  ADDRESS CA CERT KEY PEER_NAME BYTES
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "shipper/tls.h"

namespace {

using namespace siterep;
using namespace siterep::shipper;
using Clock = std::chrono::steady_clock;

int Fail(const Status& s) {
  std::fprintf(stderr, "siterep-tlsbench: %s\n", s.message().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7 || (std::string(argv[1]) == "send" && argc < 8)) {
    std::fprintf(stderr,
                 "usage: siterep-tlsbench serve|send ADDRESS CA CERT KEY PEER_NAME [BYTES]\n");
    return 2;
  }
  const std::string mode = argv[1], address = argv[2], peer = argv[6];
  auto ctx = TlsContext::Create({argv[3], argv[4], argv[5]});
  if (!ctx.ok()) return Fail(ctx.status());
  const auto forever = Clock::now() + std::chrono::hours(1);
  std::vector<std::byte> buf(1 << 20);

  if (mode == "serve") {
    auto listener = TcpListener::Listen(address);
    if (!listener.ok()) return Fail(listener.status());
    std::printf("listening %u\n", (*listener)->port());
    std::fflush(stdout);
    auto fd = (*listener)->Accept();
    if (!fd.ok()) return Fail(fd.status());
    auto stream = TlsAccept(**ctx, std::move(*fd), {peer}, forever);
    if (!stream.ok()) return Fail(stream.status());
    uint64_t total = 0;
    Clock::time_point first{};
    // Reads 64 KiB at a time until the peer closes (EPIPE).
    std::span<std::byte> chunk(buf.data(), 64 << 10);
    for (;;) {
      Status s = (*stream)->ReadExact(chunk, forever);
      if (!s.ok()) break;
      if (total == 0) first = Clock::now();
      total += chunk.size();
    }
    const double secs = std::chrono::duration<double>(Clock::now() - first).count();
    std::printf("%llu %.6f\n", static_cast<unsigned long long>(total), secs);
    return 0;
  }
  if (mode == "send") {
    const uint64_t bytes = std::stoull(argv[7]);
    std::mt19937_64 rng(42);
    for (size_t i = 0; i < buf.size(); i += 8) {
      const uint64_t v = rng();
      std::memcpy(buf.data() + i, &v, 8);
    }
    auto stream = TlsConnect(**ctx, address, peer, forever);
    if (!stream.ok()) return Fail(stream.status());
    for (uint64_t sent = 0; sent < bytes; sent += buf.size()) {
      Status s = (*stream)->WriteAll(buf, forever);
      if (!s.ok()) return Fail(s);
    }
    return 0;  // the destructor sends close_notify
  }
  std::fprintf(stderr, "siterep-tlsbench: unknown mode %s\n", mode.c_str());
  return 2;
}
