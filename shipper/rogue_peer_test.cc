// A rogue peer against a real Receiver: the client holds a VALID certificate of a configured
// peer site ("east"), so TLS lets it in, and then it sends crafted frames - built with the
// wire format's own encoders where they will, by hand where they refuse bad input. Behind
// the receiver (on 127.0.0.1) is a real applier::Replica of vm1, seeded with the primary's
// images and holding one good cycle that a real Shipper delivered from a real tracker.
//
// For every case: the receiver refuses (an Error frame, or a HelloReply "refused" before the
// stream starts, or a plain drop when the frame never arrived whole), the client's next read
// sees the connection end within seconds, the replica's images and Position() are exactly as
// before, and afterwards the real Shipper delivers the next cycle and the replica applies it:
// a rogue peer can neither change the replica nor wedge the receiver.
//
// The provider is thin (it hands out the replica for any Hello of vm1 from east), so what
// refuses is the receiver's own checks and the replica's, not control/'s admission.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <map>
#include <new>
#include <nlohmann/json.hpp>
#include <thread>

#include "applier/replica.h"
#include "common/endian.h"
#include "shipper/receiver.h"
#include "shipper/shipper.h"
#include "shipper/testing/test_certs.h"
#include "shipper/wire_format.h"
#include "tracker/log_format.h"
#include "tracker/tracker_fixture.h"

// --- Every operator new of this process is measured --------------------------------------
// The receiver's frame buffers are std::vectors, so the largest allocation shows whether a
// header's length was believed. Above kAllocationCap an allocation fails (bad_alloc) instead
// of taking the machine's memory: a receiver that tried would fail the test, not the host.
namespace {
constexpr size_t kAllocationCap = size_t{256} << 20;
std::atomic<size_t> largest_allocation{0};

void NoteAllocation(size_t n) {
  size_t seen = largest_allocation.load(std::memory_order_relaxed);
  while (n > seen &&
         !largest_allocation.compare_exchange_weak(seen, n, std::memory_order_relaxed)) {
  }
}
}  // namespace

// Not inlined: GCC would otherwise see free() called on what operator new returned.
[[gnu::noinline]] void* operator new(std::size_t n) {
  NoteAllocation(n);
  if (n > kAllocationCap) throw std::bad_alloc();
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
// The array and nothrow forms too: with only some replaced, a sanitizer's own operator
// new[] would meet this free (AddressSanitizer reports the mismatch).
[[gnu::noinline]] void* operator new[](std::size_t n) { return ::operator new(n); }
[[gnu::noinline]] void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(n);
  } catch (...) {
    return nullptr;
  }
}
[[gnu::noinline]] void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept {
  return ::operator new(n, t);
}
[[gnu::noinline]] void operator delete[](void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace siterep::shipper {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using tracker::testing::Pattern;
using tracker::testing::ReadWhole;
using tracker::testing::WriteVia;
using Bytes = std::vector<std::byte>;

constexpr uint64_t kEpoch = 3;  // the tracker fixture's, so the replica's
constexpr size_t kMiB = size_t{1} << 20;

bool WaitFor(const std::function<bool()>& done, std::chrono::milliseconds timeout = 10s) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return done();
}

// Change-log records made by hand, valid (CRC, seq + 1 each) unless the fields say otherwise.
class Records {
 public:
  Records(uint32_t disk_id, uint64_t first_seq, uint64_t epoch = kEpoch)
      : disk_id_(disk_id), epoch_(epoch), seq_(first_seq) {}
  Records& Raw(const tracker::RecordHeader& header, std::span<const std::byte> payload) {
    const Bytes rec = tracker::testing::EncodeRecord(header, payload);
    bytes_.insert(bytes_.end(), rec.begin(), rec.end());
    seq_ = header.seq + 1;
    return *this;
  }
  Records& Write(uint64_t offset, std::span<const std::byte> data) {
    return Raw(Header(tracker::RecordKind::kWrite, offset, data.size()), data);
  }
  Records& Discard(uint64_t offset, uint64_t length) {
    return Raw(Header(tracker::RecordKind::kDiscard, offset, length), {});
  }
  Records& Cut(uint64_t cycle) {
    std::byte payload[tracker::kCutPayloadSize];
    tracker::EncodeCutPayload(tracker::CutPayload{cycle, 1000 + static_cast<int64_t>(cycle), 0},
                              payload);
    return Raw(Header(tracker::RecordKind::kCut, 0, tracker::kCutPayloadSize), payload);
  }
  const Bytes& bytes() const { return bytes_; }

 private:
  tracker::RecordHeader Header(tracker::RecordKind kind, uint64_t offset, uint64_t length) const {
    tracker::RecordHeader h;
    h.kind = kind;
    h.disk_id = disk_id_;
    h.epoch = epoch_;
    h.seq = seq_;
    h.offset = offset;
    h.length = length;
    return h;
  }
  uint32_t disk_id_;
  uint64_t epoch_;
  uint64_t seq_;
  Bytes bytes_;
};

struct Frame {
  FrameType type;
  Bytes payload;
};
// What the receiver sent until the connection ended, and how it ended.
struct Ending {
  std::vector<Frame> frames;
  Status end;
};

// The receiver's images and position, to show that a rogue connection changed nothing.
struct ReplicaState {
  std::vector<Bytes> images;
  applier::ReplicaPosition position;
};

class RoguePeerTest : public tracker::testing::TrackerFixture {
 protected:
  void SetUp() override {
    Result<testing::TestPki> pki = testing::TestPki::Create(tmp_.path() / "pki");
    ASSERT_TRUE(pki.ok()) << pki.status().ToString();
    east_ = Context(pki->Site("east"));
    west_ = Context(pki->Site("west"));
    ASSERT_TRUE(east_ && west_);

    AddDisk("os", 1 << 20);
    AddDisk("data", 512 << 10);
    tracker_ = Open(Options());
    ASSERT_TRUE(tracker_);
    // The replica starts as a copy of the primary's images (a seed), so after every
    // applied cycle the two are equal byte for byte.
    const fs::path dir = tmp_.path() / "replica";
    fs::create_directories(dir);
    for (const DiskFiles& d : disks_) fs::copy_file(d.image, dir / (d.name + ".img"));
    Result<std::unique_ptr<applier::Replica>> replica = applier::Replica::Create(dir, Definition());
    ASSERT_TRUE(replica.ok()) << replica.status().ToString();
    replica_ = std::move(*replica);
    ASSERT_TRUE(replica_->Start().ok());
    StartReceiver();
    // One good cycle is committed and applied before the rogue comes.
    ASSERT_NO_FATAL_FAILURE(ShipGoodCycle());
    ASSERT_EQ(replica_->Position().applied_cycle, 1u);
  }
  void TearDown() override {
    shipper_.reset();
    receiver_.reset();
    replica_.reset();
  }

  static std::shared_ptr<const TlsContext> Context(const TlsIdentity& id) {
    Result<std::shared_ptr<TlsContext>> c = TlsContext::Create(id);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? std::shared_ptr<const TlsContext>(*c) : nullptr;
  }

  applier::ReplicaDefinition Definition() const {
    applier::ReplicaDefinition d;
    d.vm = "vm1";
    d.primary_site = "east";
    d.epoch = kEpoch;
    for (const DiskFiles& f : disks_) {
      d.disks.push_back({f.name, tracker::DiskIdFor("vm1", f.name), f.size});
    }
    return d;
  }
  uint32_t DiskId(size_t i) const { return tracker::DiskIdFor("vm1", disks_[i].name); }

  void StartReceiver() {
    ReceiverOptions o;
    o.site = "west";
    o.listen = "127.0.0.1:0";
    o.tls = west_;
    o.allowed_peers = {"east"};
    o.provider = [this](const std::string& peer,
                        const applier::ReplicaDefinition& def) -> Result<applier::SegmentSink*> {
      ++provider_calls_;
      if (peer != "east" || def.vm != "vm1") {
        return Status::Error(ENOENT, "no replica of VM " + def.vm + " from site " + peer);
      }
      return static_cast<applier::SegmentSink*>(replica_.get());
    };
    Result<std::unique_ptr<Receiver>> r = Receiver::Start(std::move(o));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    receiver_ = std::move(*r);
  }

  // The well-behaved primary: the guest writes, the tracker cuts the next cycle, a real
  // Shipper delivers it and the replica applies it; then the shipper stops. Notes where each
  // disk's log stands (tips_) for the rogue's segments that continue it.
  void ShipGoodCycle() {
    const uint64_t n = ++good_cycles_;
    ASSERT_TRUE(
        WriteVia(tracker_->observer(0), disks_[0].fd.get(), n * 8192, Pattern(8192, n)).ok());
    ASSERT_TRUE(
        WriteVia(tracker_->observer(1), disks_[1].fd.get(), n * 4096, Pattern(4096, 100 + n)).ok());
    Result<uint64_t> cycle = tracker_->Cut();
    ASSERT_TRUE(cycle.ok()) << cycle.status().ToString();
    for (const tracker::SealedSegment& s : tracker_->SealedSegments()) {
      if (s.cycle != *cycle) continue;
      for (size_t i = 0; i < disks_.size(); ++i) {
        if (disks_[i].name == s.disk) tips_[i] = Tip{s.number, s.last_seq};
      }
    }
    ASSERT_EQ(tips_.size(), disks_.size());
    ShipperOptions o;
    o.site = "east";
    o.peer = "west";
    o.peer_address = "127.0.0.1:" + std::to_string(receiver_->port());
    o.tls = east_;
    o.definition = Definition();
    o.source = tracker_.get();
    o.heartbeat = 50ms;
    o.min_backoff = 10ms;
    o.max_backoff = 100ms;
    o.io_timeout = 5s;
    Result<std::unique_ptr<Shipper>> s = Shipper::Start(std::move(o));
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    shipper_ = std::move(*s);
    const bool applied = WaitFor([&] {
      return shipper_->Stats().acked_cycle >= *cycle &&
             replica_->Position().applied_cycle >= *cycle;
    });
    const ShipperStats stats = shipper_->Stats();
    shipper_.reset();
    ASSERT_TRUE(applied) << "cycle " << *cycle << " not delivered: " << stats.last_error << " / "
                         << stats.peer_apply_error << " / " << replica_->Position().apply_error;
    committed_ = *cycle;
    for (size_t i = 0; i < disks_.size(); ++i) {
      EXPECT_TRUE(ReadWhole(replica_->ImagePath(i)) == ReadWhole(disks_[i].image))
          << "disk " << disks_[i].name << " of the replica differs from the primary's";
    }
  }
  // The last check of every test: the rogue did not wedge the receiver.
  void ExpectAGoodCycleStillGoesThrough() {
    const uint64_t before = replica_->Position().applied_cycle;
    ASSERT_NO_FATAL_FAILURE(ShipGoodCycle());
    EXPECT_EQ(replica_->Position().applied_cycle, before + 1);
    EXPECT_EQ(replica_->Position().pending_bytes, 0u);
    EXPECT_EQ(replica_->Position().apply_error, "");
  }

  ReplicaState Capture() const {
    ReplicaState s;
    for (size_t i = 0; i < disks_.size(); ++i) {
      s.images.push_back(ReadWhole(replica_->ImagePath(i)));
    }
    s.position = replica_->Position();
    return s;
  }
  void ExpectUnchanged(const ReplicaState& before, std::string_view what) const {
    const ReplicaState now = Capture();
    for (size_t i = 0; i < now.images.size(); ++i) {
      EXPECT_TRUE(now.images[i] == before.images[i])
          << what << ": disk " << disks_[i].name << " of the replica changed";
    }
    const applier::ReplicaPosition& a = before.position;
    const applier::ReplicaPosition& b = now.position;
    EXPECT_EQ(b.epoch, a.epoch) << what;
    EXPECT_EQ(b.received_cycle, a.received_cycle) << what;
    EXPECT_EQ(b.applied_cycle, a.applied_cycle) << what;
    EXPECT_EQ(b.applied_cut_unix_nanos, a.applied_cut_unix_nanos) << what;
    EXPECT_EQ(b.pending_bytes, a.pending_bytes) << what;
    EXPECT_EQ(b.apply_error, a.apply_error) << what;
  }

  // --- The rogue ------------------------------------------------------------------------

  std::unique_ptr<TlsStream> Connect() {
    Result<std::unique_ptr<TlsStream>> s =
        TlsConnect(*east_, "127.0.0.1:" + std::to_string(receiver_->port()), "west",
                   std::chrono::steady_clock::now() + 5s);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? std::move(*s) : nullptr;
  }
  Hello GoodHello() const {
    Hello h;
    h.from = "east";
    h.to = "west";
    h.definition = Definition();
    return h;
  }
  // A connection whose Hello was accepted.
  std::unique_ptr<TlsStream> ConnectAndHello(const Hello& hello) {
    std::unique_ptr<TlsStream> s = Connect();
    if (!s) return nullptr;
    Send(*s, FrameType::kHello, EncodeHello(hello));
    std::vector<std::byte> payload;
    Result<FrameHeader> h = ReadFrame(
        [&](std::span<std::byte> out) {
          return s->ReadExact(out, std::chrono::steady_clock::now() + 5s);
        },
        &payload);
    EXPECT_TRUE(h.ok() && h->type == FrameType::kHelloReply);
    Result<HelloReply> reply = DecodeHelloReply(payload);
    EXPECT_TRUE(reply.ok() && reply->accepted) << (reply.ok() ? reply->message : "undecodable");
    return s;
  }
  std::unique_ptr<TlsStream> ConnectAndHello() { return ConnectAndHello(GoodHello()); }

  static void SendBytes(TlsStream& s, std::span<const std::byte> bytes) {
    Status st = s.WriteAll(bytes, std::chrono::steady_clock::now() + 5s);
    EXPECT_TRUE(st.ok()) << st.ToString();
  }
  static void Send(TlsStream& s, FrameType type, const Bytes& payload) {
    SendBytes(s, EncodeFrame(type, payload));
  }
  // One chunk holding the whole segment.
  static Bytes Chunk(uint32_t disk_id, uint64_t number, uint64_t cycle, const Bytes& segment,
                     uint32_t flags = kChunkLast, uint64_t offset = 0) {
    SegmentChunk c;
    c.disk_id = disk_id;
    c.flags = flags;
    c.segment = number;
    c.cycle = cycle;
    c.offset = offset;
    c.raw_length = static_cast<uint32_t>(segment.size());
    c.data = segment;
    return EncodeSegmentChunk(c);
  }
  // The next cycle's records for disk i, continuing its log (valid unless changed).
  Records NextRecords(size_t i) const { return Records(DiskId(i), tips_.at(i).last_seq + 1); }
  uint64_t NextSegment(size_t i) const { return tips_.at(i).number + 1; }
  // A frame header as the encoder makes it, with another payload length.
  static Bytes HeaderWithLength(FrameType type, uint32_t length) {
    Bytes h = EncodeFrame(type, {});
    StoreLe<uint32_t>(h.data() + 12, length);
    return h;
  }
  // Ends the client's sending side (TCP FIN, no TLS close_notify), as a peer that died
  // mid-frame: the receiver reads to the end of what was sent and sees the stream end.
  static void CloseSendingSide(TlsStream& s) { ASSERT_EQ(::shutdown(s.fd(), SHUT_WR), 0); }

  // Reads what the receiver sends until the connection ends (or 5 s pass).
  static Ending ReadUntilClosed(TlsStream& s) {
    Ending e;
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (e.frames.size() < 16) {
      std::vector<std::byte> payload;
      Result<FrameHeader> h =
          ReadFrame([&](std::span<std::byte> out) { return s.ReadExact(out, deadline); }, &payload);
      if (!h.ok()) {
        e.end = h.status();
        return e;
      }
      EXPECT_TRUE(VerifyFrame(*h, payload).ok());
      e.frames.push_back(Frame{h->type, std::move(payload)});
    }
    e.end = Status::Error(EIO, "more than 16 frames");
    return e;
  }
  // The receiver closed the connection: the TLS read ended otherwise than by waiting (EOF,
  // a reset, or the fatal alert OpenSSL sends when the peer's stream ended mid-record), and
  // the socket itself reads to its end within seconds.
  static void ExpectClosed(TlsStream& s, const Ending& e, std::string_view what) {
    EXPECT_NE(e.end.code(), ETIMEDOUT) << what << ": the connection is still open";
    EXPECT_TRUE(e.end.code() == EPIPE || e.end.code() == ECONNRESET || e.end.code() == EPROTO)
        << what << ": " << e.end.ToString();
    // The TLS stream is dead now; what is left is to see the TCP connection end.
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{s.fd(), POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      char buf[4096];
      const ssize_t n = ::recv(s.fd(), buf, sizeof(buf), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno == ECONNRESET)) return;
    }
    ADD_FAILURE() << what << ": the receiver did not close the socket";
  }
  // The receiver answered with one Error frame whose reason contains why, then closed.
  static void ExpectError(TlsStream& s, std::string_view why, std::string_view what) {
    const Ending e = ReadUntilClosed(s);
    ASSERT_EQ(e.frames.size(), 1u) << what << ": " << e.end.ToString();
    ASSERT_EQ(e.frames[0].type, FrameType::kError)
        << what << ": got a " << FrameTypeName(e.frames[0].type);
    Result<ErrorFrame> err = DecodeError(e.frames[0].payload);
    ASSERT_TRUE(err.ok()) << what;
    EXPECT_NE(err->code, 0u) << what << ": an error, not a goodbye";
    EXPECT_NE(err->reason.find(why), std::string::npos) << what << ": " << err->reason;
    ExpectClosed(s, e, what);
  }
  // The receiver refused the Hello (HelloReply "refused" with that name), then closed.
  static void ExpectHelloRefused(TlsStream& s, std::string_view refusal, std::string_view why,
                                 std::string_view what) {
    const Ending e = ReadUntilClosed(s);
    ASSERT_EQ(e.frames.size(), 1u) << what << ": " << e.end.ToString();
    ASSERT_EQ(e.frames[0].type, FrameType::kHelloReply)
        << what << ": got a " << FrameTypeName(e.frames[0].type);
    Result<HelloReply> reply = DecodeHelloReply(e.frames[0].payload);
    ASSERT_TRUE(reply.ok()) << what;
    EXPECT_FALSE(reply->accepted) << what;
    EXPECT_EQ(reply->error, refusal) << what << ": " << reply->message;
    EXPECT_NE(reply->message.find(why), std::string::npos) << what << ": " << reply->message;
    ExpectClosed(s, e, what);
  }
  // The receiver sent nothing and closed.
  static void ExpectDropped(TlsStream& s, std::string_view what) {
    const Ending e = ReadUntilClosed(s);
    EXPECT_TRUE(e.frames.empty()) << what << ": got a " << FrameTypeName(e.frames[0].type);
    ExpectClosed(s, e, what);
  }

  struct Tip {
    uint64_t number = 0;    // the disk's last segment, committed on the replica
    uint64_t last_seq = 0;  // its last record
  };

  std::shared_ptr<const TlsContext> east_, west_;
  std::unique_ptr<tracker::VmTracker> tracker_;
  std::unique_ptr<applier::Replica> replica_;
  std::unique_ptr<Receiver> receiver_;
  std::unique_ptr<Shipper> shipper_;
  std::map<size_t, Tip> tips_;  // disk index -> where its log stands
  uint64_t good_cycles_ = 0;
  uint64_t committed_ = 0;  // the last cycle the replica holds
  std::atomic<int> provider_calls_{0};
};

// Records and chunks whose range runs past the end: of the disk (a record's offset +
// length), or of the 64-bit space (a chunk's offset within its segment + raw_length).
TEST_F(RoguePeerTest, ARecordOrChunkPastTheEndIsRefused) {
  const ReplicaState before = Capture();
  const uint64_t size = disks_[0].size;
  const uint64_t cycle = committed_ + 1;
  struct Case {
    const char* what;
    Bytes segment;
    const char* why;
  };
  const Bytes block = Pattern(4096, 7);
  const Bytes two_blocks = Pattern(8192, 8);
  std::vector<Case> cases;
  cases.push_back({"a write straddling the end",
                   NextRecords(0).Write(0, block).Write(size - 4096, two_blocks).Cut(cycle).bytes(),
                   "beyond the end of the disk"});
  cases.push_back({"a write starting past the end",
                   NextRecords(0).Write(size, block).Cut(cycle).bytes(),
                   "beyond the end of the disk"});
  // These two the record parser refuses already (tracker::ParseRecord).
  cases.push_back({"a write whose offset + length wraps around",
                   NextRecords(0).Write(UINT64_MAX - 100, block).Cut(cycle).bytes(),
                   "offset + length overflows"});
  cases.push_back({"a discard of 2^64-1 bytes",
                   NextRecords(0).Discard(4096, UINT64_MAX).Cut(cycle).bytes(),
                   "offset + length overflows"});
  for (const Case& c : cases) {
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    Send(*rogue, FrameType::kSegmentChunk, Chunk(DiskId(0), NextSegment(0), cycle, c.segment));
    ExpectError(*rogue, c.why, c.what);
    ExpectUnchanged(before, c.what);
  }
  {
    // The encoder builds it; the decoder refuses it.
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    Send(*rogue, FrameType::kSegmentChunk,
         Chunk(DiskId(0), NextSegment(0), cycle, block, kChunkLast, UINT64_MAX - 100));
    ExpectError(*rogue, "overflows", "a chunk whose offset + raw_length wraps around");
    ExpectUnchanged(before, "a chunk whose offset + raw_length wraps around");
  }
  {
    // A chunk far into a segment whose start never came.
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    Send(*rogue, FrameType::kSegmentChunk,
         Chunk(DiskId(0), NextSegment(0), cycle, block, kChunkLast, uint64_t{1} << 40));
    ExpectError(*rogue, "without the start of the segment", "a chunk at 1 TiB");
    ExpectUnchanged(before, "a chunk at 1 TiB");
  }
  ExpectAGoodCycleStillGoesThrough();
}

// A frame header announcing a payload the receiver must not allocate: refused on the
// header alone, before the Hello (the first frame) and after it.
TEST_F(RoguePeerTest, AHugeFrameLengthIsRefusedWithoutAllocatingIt) {
  const ReplicaState before = Capture();
  {
    // The measurement sees a std::vector's buffer (kept from being optimised away).
    largest_allocation = 0;
    Bytes probe(9 * kMiB);
    asm volatile("" : : "g"(probe.data()) : "memory");
    EXPECT_GE(largest_allocation.load(), 9 * kMiB);
  }
  for (const uint32_t length : {uint32_t{1} << 30, UINT32_MAX, kMaxFramePayload + 1}) {
    for (const bool after_hello : {false, true}) {
      const std::string what = "a header of " + std::to_string(length) + " bytes " +
                               (after_hello ? "after the Hello" : "as the first frame");
      std::unique_ptr<TlsStream> rogue = after_hello ? ConnectAndHello() : Connect();
      ASSERT_TRUE(rogue);
      largest_allocation = 0;
      SendBytes(*rogue, HeaderWithLength(after_hello ? FrameType::kSegmentChunk : FrameType::kHello,
                                         length));
      ExpectError(*rogue, "exceeds", what);
      EXPECT_LT(largest_allocation.load(), 8 * kMiB) << what;
      ExpectUnchanged(before, what);
    }
  }
  ExpectAGoodCycleStillGoesThrough();
}

// Segments for disks vm1 does not have: an id no Hello named (the receiver refuses it), and
// a disk the Hello added to the definition (the thin provider lets that Hello through, as
// control/ would not; the replica refuses the segment and makes nothing for the disk).
TEST_F(RoguePeerTest, ASegmentForADiskTheVmDoesNotHaveIsRefused) {
  const ReplicaState before = Capture();
  const uint64_t cycle = committed_ + 1;
  {
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    const Bytes segment = Records(12345, 1).Write(0, Pattern(4096, 1)).Cut(cycle).bytes();
    Send(*rogue, FrameType::kSegmentChunk, Chunk(12345, 1, cycle, segment));
    ExpectError(*rogue, "disk id 12345, which VM vm1 does not have", "disk id 12345");
    ExpectUnchanged(before, "disk id 12345");
  }
  {
    Hello hello = GoodHello();
    const uint32_t scratch = tracker::DiskIdFor("vm1", "scratch");
    hello.definition.disks.push_back({"scratch", scratch, 1 << 20});
    std::unique_ptr<TlsStream> rogue = ConnectAndHello(hello);
    ASSERT_TRUE(rogue);
    const Bytes segment = Records(scratch, 1).Write(0, Pattern(4096, 2)).Cut(cycle).bytes();
    Send(*rogue, FrameType::kSegmentChunk, Chunk(scratch, 1, cycle, segment));
    ExpectError(*rogue, "which VM vm1 does not have", "a disk the Hello added");
    ExpectUnchanged(before, "a disk the Hello added");
    EXPECT_FALSE(fs::exists(replica_->dir() / "scratch.img"));
    EXPECT_FALSE(fs::exists(replica_->dir() / "received" / "scratch"));
  }
  ExpectAGoodCycleStillGoesThrough();
}

// After cycle 1 was committed and applied: the cycle, the segment number or the seq goes
// back, or the cycle's end names another cycle than its segments.
TEST_F(RoguePeerTest, ARewoundCycleSegmentOrSequenceIsRefused) {
  const ReplicaState before = Capture();
  const uint64_t next = committed_ + 1;
  {
    const char* what = "a chunk of the committed cycle";
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    Send(*rogue, FrameType::kSegmentChunk,
         Chunk(DiskId(0), NextSegment(0), committed_,
               NextRecords(0).Write(0, Pattern(4096, 1)).Cut(committed_).bytes()));
    ExpectError(*rogue, "is already committed", what);
    ExpectUnchanged(before, what);
  }
  {
    const char* what = "the committed segment's number again";
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    Send(*rogue, FrameType::kSegmentChunk,
         Chunk(DiskId(0), tips_[0].number, next,
               NextRecords(0).Write(0, Pattern(4096, 2)).Cut(next).bytes()));
    ExpectError(*rogue, "is not newer than the last received segment", what);
    ExpectUnchanged(before, what);
  }
  {
    const char* what = "a seq that goes back";
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    const uint64_t rewound = tips_[0].last_seq;  // one less than the next
    Send(*rogue, FrameType::kSegmentChunk,
         Chunk(DiskId(0), NextSegment(0), next,
               Records(DiskId(0), rewound).Write(0, Pattern(4096, 3)).Cut(next).bytes()));
    ExpectError(*rogue,
                "seq " + std::to_string(rewound) + " where " + std::to_string(rewound + 1) +
                    " was expected",
                what);
    ExpectUnchanged(before, what);
  }
  // Good segments of every disk for the next cycle (the replica keeps them, uncommitted),
  // then an end of cycle that goes back; then segments whose cuts go back.
  for (const bool cuts_go_back : {false, true}) {
    const char* what = cuts_go_back ? "segments whose cuts name the committed cycle"
                                    : "a CycleEnd of the committed cycle";
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    for (size_t i = 0; i < disks_.size(); ++i) {
      Send(*rogue, FrameType::kSegmentChunk,
           Chunk(DiskId(i), NextSegment(i), next,
                 NextRecords(i)
                     .Write(0, Pattern(4096, 10 + i))
                     .Cut(cuts_go_back ? committed_ : next)
                     .bytes()));
    }
    const uint64_t end = cuts_go_back ? next : committed_;
    Send(*rogue, FrameType::kCycleEnd, EncodeCycleEnd(applier::CycleInfo{end, 1, 1}));
    ExpectError(*rogue,
                cuts_go_back
                    ? "ends in the cut of cycle " + std::to_string(committed_)
                    : "CycleEnd of cycle " + std::to_string(committed_) + " without its segments",
                what);
    ExpectUnchanged(before, what);
  }
  ExpectAGoodCycleStillGoesThrough();
}

// The replica is at epoch 3: a Hello at epoch 2 is fenced; so is one whose epoch is not a
// plain unsigned integer (-1 must not read as 2^64-1, nor 3.5 as 3); records of epoch 2
// inside a segment are refused on a connection at epoch 3; and a Hello at epoch 2 does not
// take the VM from a connection at epoch 3.
TEST_F(RoguePeerTest, AnOlderEpochIsRefused) {
  const ReplicaState before = Capture();
  {
    Hello hello = GoodHello();
    hello.definition.epoch = kEpoch - 1;
    std::unique_ptr<TlsStream> rogue = Connect();
    ASSERT_TRUE(rogue);
    Send(*rogue, FrameType::kHello, EncodeHello(hello));
    ExpectHelloRefused(*rogue, "epoch_older", "at epoch 3, the primary at epoch 2", "epoch 2");
    ExpectUnchanged(before, "a Hello at epoch 2");
  }
  for (const nlohmann::json& epoch : {nlohmann::json(-1), nlohmann::json(3.5)}) {
    const std::string what = "a Hello at epoch " + epoch.dump();
    const Bytes good = EncodeHello(GoodHello());
    nlohmann::json j =
        nlohmann::json::parse(reinterpret_cast<const char*>(good.data()),
                              reinterpret_cast<const char*>(good.data()) + good.size());
    j["epoch"] = epoch;
    const std::string text = j.dump();
    const auto* p = reinterpret_cast<const std::byte*>(text.data());
    std::unique_ptr<TlsStream> rogue = Connect();
    ASSERT_TRUE(rogue);
    Send(*rogue, FrameType::kHello, Bytes(p, p + text.size()));
    ExpectHelloRefused(*rogue, "protocol", "epoch", what);
    ExpectUnchanged(before, what);
  }
  {
    const char* what = "records of epoch 2";
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    const uint64_t cycle = committed_ + 1;
    Send(*rogue, FrameType::kSegmentChunk,
         Chunk(DiskId(0), NextSegment(0), cycle,
               Records(DiskId(0), tips_[0].last_seq + 1, kEpoch - 1)
                   .Write(0, Pattern(4096, 4))
                   .Cut(cycle)
                   .bytes()));
    ExpectError(*rogue, "epoch 2 is older than the replica's 3", what);
    ExpectUnchanged(before, what);
  }
  {
    // With a connection at epoch 3 holding the VM, a Hello at epoch 2 is refused before
    // that connection is touched: it stays open.
    std::unique_ptr<TlsStream> current = ConnectAndHello();
    ASSERT_TRUE(current);
    Hello hello = GoodHello();
    hello.definition.epoch = kEpoch - 1;
    std::unique_ptr<TlsStream> rogue = Connect();
    ASSERT_TRUE(rogue);
    Send(*rogue, FrameType::kHello, EncodeHello(hello));
    ExpectHelloRefused(*rogue, "epoch_older", "replicated here at epoch 3 by another connection",
                       "a Hello at epoch 2 beside a connection at epoch 3");
    std::byte one[1];
    const Status read = current->ReadExact(one, std::chrono::steady_clock::now() + 1s);
    EXPECT_EQ(read.code(), ETIMEDOUT) << "the connection at epoch 3: " << read.ToString();
    ExpectUnchanged(before, "a Hello at epoch 2 beside a connection at epoch 3");
  }
  EXPECT_EQ(replica_->Definition().epoch, kEpoch);
  ExpectAGoodCycleStillGoesThrough();
}

// The peer's sending side ends in the middle of a frame: of the first frame's header, of a
// header after the Hello, of a chunk's payload, and of a CycleEnd's payload after whole,
// good segments of every disk. The receiver sends nothing, closes, and commits nothing.
TEST_F(RoguePeerTest, ATruncatedFrameIsDroppedAndNothingOfItIsKept) {
  const ReplicaState before = Capture();
  const uint64_t next = committed_ + 1;
  const Bytes segment0 = NextRecords(0).Write(0, Pattern(4096, 5)).Cut(next).bytes();
  {
    const char* what = "the first frame's header cut short";
    std::unique_ptr<TlsStream> rogue = Connect();
    ASSERT_TRUE(rogue);
    const Bytes hello = EncodeFrame(FrameType::kHello, EncodeHello(GoodHello()));
    SendBytes(*rogue, std::span(hello).first(10));
    CloseSendingSide(*rogue);
    ExpectDropped(*rogue, what);
    ExpectUnchanged(before, what);
  }
  {
    const char* what = "a header cut short after the Hello";
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    const Bytes frame =
        EncodeFrame(FrameType::kSegmentChunk, Chunk(DiskId(0), NextSegment(0), next, segment0));
    SendBytes(*rogue, std::span(frame).first(kFrameHeaderSize - 3));
    CloseSendingSide(*rogue);
    ExpectDropped(*rogue, what);
    ExpectUnchanged(before, what);
  }
  {
    const char* what = "a chunk's payload cut short";
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    const Bytes frame =
        EncodeFrame(FrameType::kSegmentChunk, Chunk(DiskId(0), NextSegment(0), next, segment0));
    SendBytes(*rogue, std::span(frame).first(frame.size() / 2));
    CloseSendingSide(*rogue);
    ExpectDropped(*rogue, what);
    ExpectUnchanged(before, what);
  }
  {
    const char* what = "a CycleEnd's payload cut short";
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    for (size_t i = 0; i < disks_.size(); ++i) {
      Send(*rogue, FrameType::kSegmentChunk,
           Chunk(DiskId(i), NextSegment(i), next,
                 NextRecords(i).Write(0, Pattern(4096, 20 + i)).Cut(next).bytes()));
    }
    const Bytes end =
        EncodeFrame(FrameType::kCycleEnd, EncodeCycleEnd(applier::CycleInfo{next, 1, 1}));
    SendBytes(*rogue, std::span(end).first(kFrameHeaderSize + kCycleEndSize / 2));
    CloseSendingSide(*rogue);
    ExpectDropped(*rogue, what);
    ExpectUnchanged(before, what);
  }
  ExpectAGoodCycleStillGoesThrough();
}

// Frame types nobody defined (with a good CRC, made by the encoder), and types the receiver
// never takes from a primary, before the Hello and after it.
TEST_F(RoguePeerTest, AFrameOfAnUnknownOrWrongTypeIsRefused) {
  const ReplicaState before = Capture();
  for (const uint16_t type : {uint16_t{0}, uint16_t{99}, uint16_t{0xffff}}) {
    for (const bool after_hello : {false, true}) {
      const std::string what = "a frame of type " + std::to_string(type) +
                               (after_hello ? " after the Hello" : " as the first frame");
      std::unique_ptr<TlsStream> rogue = after_hello ? ConnectAndHello() : Connect();
      ASSERT_TRUE(rogue);
      Send(*rogue, static_cast<FrameType>(type), Pattern(16, type));
      ExpectError(*rogue, "unknown frame type " + std::to_string(type), what);
      ExpectUnchanged(before, what);
    }
  }
  for (const FrameType type : {FrameType::kHello, FrameType::kHelloReply, FrameType::kAck,
                               FrameType::kPeerRequest, FrameType::kPeerReply}) {
    const std::string what = "a " + std::string(FrameTypeName(type)) + " after the Hello";
    std::unique_ptr<TlsStream> rogue = ConnectAndHello();
    ASSERT_TRUE(rogue);
    const Bytes payload = type == FrameType::kHello ? EncodeHello(GoodHello())
                          : type == FrameType::kAck ? EncodeAck(Ack{})
                                                    : Bytes{std::byte{'{'}, std::byte{'}'}};
    Send(*rogue, type, payload);
    ExpectError(*rogue, "unexpected " + std::string(FrameTypeName(type)) + " frame", what);
    ExpectUnchanged(before, what);
  }
  ExpectAGoodCycleStillGoesThrough();
}

// Stream frames before any Hello: refused like a bad Hello, and the provider is never asked.
TEST_F(RoguePeerTest, AFrameBeforeAnyHelloIsRefused) {
  const ReplicaState before = Capture();
  const int calls = provider_calls_;
  const uint64_t next = committed_ + 1;
  applier::SyncPlan plan;
  plan.sync_id = next;
  plan.epoch = kEpoch;
  plan.disks = {{DiskId(0), applier::SyncMode::kCopy, 1, 1, 4096}};
  const std::vector<std::pair<FrameType, Bytes>> frames = {
      {FrameType::kSegmentChunk,
       Chunk(DiskId(0), NextSegment(0), next,
             NextRecords(0).Write(0, Pattern(4096, 6)).Cut(next).bytes())},
      {FrameType::kCycleEnd, EncodeCycleEnd(applier::CycleInfo{next, 1, 1})},
      {FrameType::kHeartbeat, EncodeHeartbeat(Heartbeat{1, 0, 0})},
      {FrameType::kSyncBegin, EncodeSyncBegin(plan)},
  };
  for (const auto& [type, payload] : frames) {
    const std::string what = "a " + std::string(FrameTypeName(type)) + " before the Hello";
    std::unique_ptr<TlsStream> rogue = Connect();
    ASSERT_TRUE(rogue);
    Send(*rogue, type, payload);
    ExpectHelloRefused(*rogue, "protocol",
                       "expected Hello, got " + std::string(FrameTypeName(type)), what);
    ExpectUnchanged(before, what);
  }
  EXPECT_EQ(provider_calls_, calls);
  ExpectAGoodCycleStillGoesThrough();
}

// Hellos that lie about the sites or name files outside the replica's folder: refused
// before the provider is asked (it would make a replica folder of the VM's name).
TEST_F(RoguePeerTest, AHelloNamingAnotherSiteOrAPathIsRefused) {
  const ReplicaState before = Capture();
  const int calls = provider_calls_;
  struct Case {
    const char* what;
    std::function<void(Hello&)> change;
    const char* refusal;
    const char* why;
  };
  const std::vector<Case> cases = {
      {"from another site than the certificate",
       [](Hello& h) {
         h.from = "north";
         h.definition.primary_site = "north";
       },
       "unknown_site", "certificate names site east"},
      {"to another site", [](Hello& h) { h.to = "south"; }, "unknown_site", "this is site west"},
      {"a definition of another primary", [](Hello& h) { h.definition.primary_site = "north"; },
       "definition_mismatch", "definition names primary site north"},
      {"VM ../x", [](Hello& h) { h.definition.vm = "../x"; }, "protocol", "invalid VM name"},
      {"VM ..", [](Hello& h) { h.definition.vm = ".."; }, "protocol", "invalid VM name"},
      {"VM a/b", [](Hello& h) { h.definition.vm = "a/b"; }, "protocol", "invalid VM name"},
      {"disk ../os", [](Hello& h) { h.definition.disks[0].name = "../os"; }, "protocol",
       "invalid disk name"},
      {"site ../east",
       [](Hello& h) {
         h.from = "../east";
         h.definition.primary_site = "../east";
       },
       "protocol", "invalid site name"},
  };
  for (const Case& c : cases) {
    Hello hello = GoodHello();
    c.change(hello);
    std::unique_ptr<TlsStream> rogue = Connect();
    ASSERT_TRUE(rogue);
    Send(*rogue, FrameType::kHello, EncodeHello(hello));
    ExpectHelloRefused(*rogue, c.refusal, c.why, c.what);
    ExpectUnchanged(before, c.what);
  }
  EXPECT_EQ(provider_calls_, calls);
  EXPECT_FALSE(fs::exists(tmp_.path() / "x"));
  EXPECT_FALSE(fs::exists(replica_->dir().parent_path() / "x"));
  ExpectAGoodCycleStillGoesThrough();
}

// A rogue that holds vm1 with half a frame sent and then goes silent (no close) does not
// keep the real primary out: the shipper's Hello takes the VM over, and the rogue's
// connection is ended.
TEST_F(RoguePeerTest, ASilentRogueHoldingTheVmIsReplacedByTheShipper) {
  const ReplicaState before = Capture();
  std::unique_ptr<TlsStream> rogue = ConnectAndHello();
  ASSERT_TRUE(rogue);
  const uint64_t next = committed_ + 1;
  const Bytes frame = EncodeFrame(
      FrameType::kSegmentChunk, Chunk(DiskId(0), NextSegment(0), next,
                                      NextRecords(0).Write(0, Pattern(4096, 7)).Cut(next).bytes()));
  SendBytes(*rogue, std::span(frame).first(frame.size() - 100));
  ExpectUnchanged(before, "half a chunk");
  ExpectAGoodCycleStillGoesThrough();
  ExpectDropped(*rogue, "the replaced rogue");
}

}  // namespace
}  // namespace siterep::shipper
