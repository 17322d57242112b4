#include "shipper/wire_format.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "tracker/log_format.h"

namespace siterep::shipper {
namespace {

std::vector<std::byte> Bytes(std::string_view s) {
  std::vector<std::byte> out(s.size());
  std::memcpy(out.data(), s.data(), s.size());
  return out;
}

std::vector<std::byte> Random(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng());
  return out;
}

void PutLe32(std::vector<std::byte>& v, size_t at, uint32_t x) {
  for (int i = 0; i < 4; ++i) v[at + i] = static_cast<std::byte>(x >> (8 * i));
}

// Parses and verifies a whole frame as the receiver does.
Result<FrameHeader> ParseWhole(const std::vector<std::byte>& frame,
                               std::span<const std::byte>* payload) {
  SR_ASSIGN_OR_RETURN(FrameHeader h, ParseFrameHeader(frame));
  *payload = std::span<const std::byte>(frame).subspan(kFrameHeaderSize);
  SR_RETURN_IF_ERROR(VerifyFrame(h, *payload));
  return h;
}

TEST(WireFormat, FrameRoundTrip) {
  const std::vector<std::byte> payload = Random(1000, 1);
  const std::vector<std::byte> frame = EncodeFrame(FrameType::kHeartbeat, payload);
  ASSERT_EQ(frame.size(), kFrameHeaderSize + payload.size());
  EXPECT_EQ(std::memcmp(frame.data(), "SRWF", 4), 0) << "magic reads SRWF on the wire";
  std::span<const std::byte> got;
  Result<FrameHeader> h = ParseWhole(frame, &got);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->type, FrameType::kHeartbeat);
  EXPECT_EQ(h->payload_length, payload.size());
  EXPECT_TRUE(std::equal(got.begin(), got.end(), payload.begin(), payload.end()));
}

TEST(WireFormat, EmptyPayloadFrame) {
  const std::vector<std::byte> frame = EncodeFrame(FrameType::kError, {});
  std::span<const std::byte> got;
  ASSERT_TRUE(ParseWhole(frame, &got).ok());
  EXPECT_TRUE(got.empty());
}

TEST(WireFormat, RefusesBadMagic) {
  std::vector<std::byte> frame = EncodeFrame(FrameType::kAck, Random(10, 2));
  frame[0] = std::byte{'X'};
  Result<FrameHeader> h = ParseFrameHeader(frame);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), EBADMSG);
  EXPECT_NE(h.status().message().find("magic"), std::string::npos);
}

TEST(WireFormat, RefusesOtherVersion) {
  std::vector<std::byte> frame = EncodeFrame(FrameType::kAck, Random(10, 2));
  frame[4] = std::byte{2};
  Result<FrameHeader> h = ParseFrameHeader(frame);
  ASSERT_FALSE(h.ok());
  EXPECT_NE(h.status().message().find("version 2"), std::string::npos);
}

TEST(WireFormat, RefusesUnknownTypeAndFlags) {
  for (uint16_t type : {0, 17, 0xffff}) {
    std::vector<std::byte> frame = EncodeFrame(FrameType::kAck, {});
    frame[6] = static_cast<std::byte>(type);
    frame[7] = static_cast<std::byte>(type >> 8);
    Result<FrameHeader> h = ParseFrameHeader(frame);
    ASSERT_FALSE(h.ok()) << type;
    EXPECT_NE(h.status().message().find("unknown frame type"), std::string::npos);
  }
  std::vector<std::byte> frame = EncodeFrame(FrameType::kAck, {});
  frame[9] = std::byte{1};
  EXPECT_FALSE(ParseFrameHeader(frame).ok());
}

TEST(WireFormat, RefusesTruncatedHeaderAndPayload) {
  const std::vector<std::byte> frame = EncodeFrame(FrameType::kCycleEnd, Random(24, 3));
  for (size_t n = 0; n < kFrameHeaderSize; ++n) {
    EXPECT_FALSE(ParseFrameHeader(std::span(frame).first(n)).ok()) << n;
  }
  Result<FrameHeader> h = ParseFrameHeader(frame);
  ASSERT_TRUE(h.ok());
  Status s = VerifyFrame(*h, std::span(frame).subspan(kFrameHeaderSize, 23));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EBADMSG);
}

TEST(WireFormat, RefusesOversizedLengthBeforeAllocating) {
  std::vector<std::byte> frame = EncodeFrame(FrameType::kSegmentChunk, {});
  PutLe32(frame, 12, kMaxFramePayload + 1);
  Result<FrameHeader> h = ParseFrameHeader(frame);
  ASSERT_FALSE(h.ok());
  EXPECT_NE(h.status().message().find("exceeds"), std::string::npos);
  // ReadFrame must not ask for the payload at all.
  size_t reads = 0;
  std::vector<std::byte> payload;
  Result<FrameHeader> r = ReadFrame(
      [&](std::span<std::byte> out) {
        ++reads;
        if (out.size() != kFrameHeaderSize) return Status::Error(EIO, "asked for the payload");
        std::memcpy(out.data(), frame.data(), out.size());
        return Status::Ok();
      },
      &payload);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(reads, 1u);
  EXPECT_TRUE(payload.empty());
}

TEST(WireFormat, CrcCoversHeaderAndPayload) {
  const std::vector<std::byte> good = EncodeFrame(FrameType::kAck, Random(40, 4));
  for (size_t i = 0; i < good.size(); ++i) {
    if (i >= 16 && i < 20) continue;  // the CRC field itself
    std::vector<std::byte> bad = good;
    bad[i] ^= std::byte{0x01};
    Result<FrameHeader> h = ParseFrameHeader(bad);
    if (!h.ok()) continue;  // a damaged header field refused earlier is fine too
    Status s = VerifyFrame(*h, std::span(bad).subspan(kFrameHeaderSize));
    EXPECT_FALSE(s.ok()) << "flipped byte " << i;
  }
}

TEST(WireFormat, ReadFrameReadsHeaderThenPayload) {
  const std::vector<std::byte> frame = EncodeFrame(FrameType::kHeartbeat, Random(24, 5));
  size_t at = 0;
  std::vector<std::byte> payload;
  Result<FrameHeader> h = ReadFrame(
      [&](std::span<std::byte> out) {
        if (at + out.size() > frame.size()) return Status::Error(EPIPE, "peer closed");
        std::memcpy(out.data(), frame.data() + at, out.size());
        at += out.size();
        return Status::Ok();
      },
      &payload);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(at, frame.size());
  EXPECT_TRUE(VerifyFrame(*h, payload).ok());
}

applier::ReplicaDefinition Definition() {
  applier::ReplicaDefinition d;
  d.vm = "web01";
  d.primary_site = "east";
  d.epoch = 7;
  d.disks = {{"os", tracker::DiskIdFor("web01", "os"), 1 << 30},
             {"data", tracker::DiskIdFor("web01", "data"), 4096}};
  d.recovery_points = 4;
  d.recovery_point_interval_ms = 60000;
  d.frequency_ms = 30000;
  return d;
}

TEST(WireFormat, HelloRoundTrip) {
  Hello h;
  h.from = "east";
  h.to = "west";
  h.definition = Definition();
  Result<Hello> got = DecodeHello(EncodeHello(h));
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->protocol_version, kProtocolVersion);
  EXPECT_EQ(got->from, "east");
  EXPECT_EQ(got->to, "west");
  const applier::ReplicaDefinition& d = got->definition;
  EXPECT_EQ(d.vm, "web01");
  EXPECT_EQ(d.primary_site, "east");
  EXPECT_EQ(d.epoch, 7u);
  ASSERT_EQ(d.disks.size(), 2u);
  EXPECT_EQ(d.disks[0].name, "os");
  EXPECT_EQ(d.disks[0].disk_id, tracker::DiskIdFor("web01", "os"));
  EXPECT_EQ(d.disks[0].size, 1u << 30);
  EXPECT_EQ(d.disks[1].name, "data");
  EXPECT_EQ(d.recovery_points, 4);
  EXPECT_EQ(d.recovery_point_interval_ms, 60000);
  EXPECT_EQ(d.frequency_ms, 30000);
  EXPECT_EQ(d.consistency_group, "");
  h.definition.consistency_group = "core";
  got = DecodeHello(EncodeHello(h));
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->definition.consistency_group, "core");
  h.definition.consistency_group = "a/b";
  EXPECT_FALSE(DecodeHello(EncodeHello(h)).ok());
}

TEST(WireFormat, HelloRefusesMalformedJsonAndBadNames) {
  EXPECT_FALSE(DecodeHello(Bytes("not json")).ok());
  EXPECT_FALSE(DecodeHello(Bytes("[1,2]")).ok());
  EXPECT_FALSE(DecodeHello(Bytes("{\"version\": 1}")).ok());
  EXPECT_FALSE(DecodeHello({}).ok());
  Hello h;
  h.from = "east";
  h.to = "west";
  h.definition = Definition();
  h.definition.vm = "../etc";
  Result<Hello> bad = DecodeHello(EncodeHello(h));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("invalid VM name"), std::string::npos);
  h.definition = Definition();
  h.definition.disks[1].name = "a/b";
  EXPECT_FALSE(DecodeHello(EncodeHello(h)).ok());
  h.definition.disks.clear();
  EXPECT_FALSE(DecodeHello(EncodeHello(h)).ok());
  // A field of the wrong type is a Status, not an exception.
  EXPECT_FALSE(DecodeHello(Bytes(R"({"version":"x","from":"e","to":"w","vm":"v","epoch":1,
      "definition":{}})"))
                   .ok());
  EXPECT_FALSE(DecodeHello(Bytes(R"({"version":1,"from":"e","to":"w","vm":"v","epoch":-1,
      "definition":{"primary_site":"e","disks":5,"recovery_points":0,
      "recovery_point_interval_ms":0,"frequency_ms":0}})"))
                   .ok());
}

TEST(WireFormat, HelloReplyRoundTrip) {
  HelloReply accepted;
  accepted.accepted = true;
  accepted.position = {3, 41, 40, 123456789, 9999, "bad record at 17"};
  Result<HelloReply> a = DecodeHelloReply(EncodeHelloReply(accepted));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_TRUE(a->accepted);
  EXPECT_EQ(a->position.epoch, 3u);
  EXPECT_EQ(a->position.received_cycle, 41u);
  EXPECT_EQ(a->position.applied_cycle, 40u);
  EXPECT_EQ(a->position.applied_cut_unix_nanos, 123456789);
  EXPECT_EQ(a->position.pending_bytes, 9999u);
  EXPECT_EQ(a->position.apply_error, "bad record at 17");

  HelloReply refused;
  refused.error = std::string(RefusalName(ESTALE));
  refused.message = "replica at epoch 5, primary at 4";
  Result<HelloReply> r = DecodeHelloReply(EncodeHelloReply(refused));
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->accepted);
  EXPECT_EQ(r->error, "epoch_older");
  EXPECT_EQ(r->message, refused.message);
  EXPECT_EQ(RefusalCode(r->error), ESTALE);
  EXPECT_FALSE(DecodeHelloReply(Bytes("{\"accepted\": true}")).ok());
}

TEST(WireFormat, RefusalNamesMapBothWays) {
  for (int code : {ESTALE, EACCES, EBUSY, EINVAL, EPROTO, ENOSPC, EPERM, EAGAIN}) {
    EXPECT_EQ(RefusalCode(RefusalName(code)), code) << RefusalName(code);
  }
  EXPECT_EQ(RefusalName(EIO), "refused");
  EXPECT_EQ(RefusalName(EBUSY), "vm_busy");
  EXPECT_EQ(RefusalName(EINVAL), "definition_mismatch");
  EXPECT_EQ(RefusalCode("something new"), ECONNREFUSED);
}

TEST(WireFormat, SegmentChunkRoundTripRawAndCompressed) {
  // Compressible: long runs.
  std::vector<std::byte> raw(kMaxChunkRaw);
  for (size_t i = 0; i < raw.size(); ++i) raw[i] = static_cast<std::byte>((i / 4096) & 0xff);
  ChunkCompressor compressor;
  std::vector<std::byte> packed;
  ASSERT_TRUE(compressor.Compress(raw, &packed));
  EXPECT_LT(packed.size(), raw.size() / 10);

  SegmentChunk c;
  c.disk_id = 0xdeadbeef;
  c.flags = kChunkLast | kChunkZstd;
  c.segment = 12;
  c.cycle = 34;
  c.offset = 5ull << 32;
  c.raw_length = static_cast<uint32_t>(raw.size());
  c.data = packed;
  const std::vector<std::byte> payload = EncodeSegmentChunk(c);
  Result<SegmentChunk> got = DecodeSegmentChunk(payload);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->disk_id, 0xdeadbeefu);
  EXPECT_TRUE(got->last());
  EXPECT_TRUE(got->compressed());
  EXPECT_EQ(got->segment, 12u);
  EXPECT_EQ(got->cycle, 34u);
  EXPECT_EQ(got->offset, 5ull << 32);
  std::vector<std::byte> out;
  ASSERT_TRUE(ChunkData(*got, &out).ok());
  EXPECT_EQ(out, raw);

  // Incompressible data is not worth compressing: the caller sends it raw.
  const std::vector<std::byte> noise = Random(64 << 10, 6);
  EXPECT_FALSE(compressor.Compress(noise, &packed));
  c.flags = 0;
  c.raw_length = static_cast<uint32_t>(noise.size());
  c.data = noise;
  const std::vector<std::byte> raw_payload = EncodeSegmentChunk(c);  // got borrows from it
  got = DecodeSegmentChunk(raw_payload);
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(got->last());
  ASSERT_TRUE(ChunkData(*got, &out).ok());
  EXPECT_EQ(out, noise);
  // After a chunk that does not compress, the next kSkipAfterMiss go raw without a try
  // (even compressible ones); then it tries again, and works.
  for (int i = 0; i < ChunkCompressor::kSkipAfterMiss; ++i) {
    EXPECT_FALSE(compressor.Compress(raw, &packed)) << i;
  }
  EXPECT_TRUE(compressor.Compress(raw, &packed));
}

// The frame the shipper makes in place is byte for byte the one EncodeFrame of
// EncodeSegmentChunk makes, and it reads back as a checked frame with the chunk.
TEST(WireFormat, ASegmentChunkFrameMadeInPlaceIsTheEncodedOne) {
  const std::vector<std::byte> data = Random(100000, 8);
  SegmentChunk c;
  c.disk_id = 77;
  c.flags = kChunkLast;
  c.segment = 9;
  c.cycle = 8;
  c.offset = 1 << 20;
  c.raw_length = static_cast<uint32_t>(data.size());
  c.data = data;
  const std::vector<std::byte> want = EncodeFrame(FrameType::kSegmentChunk, EncodeSegmentChunk(c));

  std::vector<std::byte> frame(kSegmentChunkPrefix + data.size(), std::byte{0xee});  // stale
  std::copy(data.begin(), data.end(), frame.begin() + kSegmentChunkPrefix);
  SegmentChunk fields = c;
  fields.data = {};  // not read
  SealSegmentChunkFrame(fields, frame);
  EXPECT_EQ(frame, want);

  Result<FrameHeader> header = ParseFrameHeader(frame);
  ASSERT_TRUE(header.ok()) << header.status().ToString();
  const std::span<const std::byte> payload = std::span(frame).subspan(kFrameHeaderSize);
  ASSERT_TRUE(VerifyFrame(*header, payload).ok());
  Result<SegmentChunk> got = DecodeSegmentChunk(payload);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->offset, uint64_t{1} << 20);
  EXPECT_TRUE(std::equal(got->data.begin(), got->data.end(), data.begin(), data.end()));
}

TEST(WireFormat, SegmentChunkRefusals) {
  const std::vector<std::byte> data = Random(100, 7);
  SegmentChunk c;
  c.raw_length = 100;
  c.data = data;
  std::vector<std::byte> payload = EncodeSegmentChunk(c);
  ASSERT_TRUE(DecodeSegmentChunk(payload).ok());
  for (size_t n = 0; n < kChunkHeaderSize; ++n) {
    EXPECT_FALSE(DecodeSegmentChunk(std::span(payload).first(n)).ok()) << n;
  }
  EXPECT_FALSE(DecodeSegmentChunk(std::span(payload).first(payload.size() - 1)).ok())
      << "raw data shorter than raw_length";
  std::vector<std::byte> bad = payload;
  PutLe32(bad, 4, 4);  // unknown flag
  EXPECT_FALSE(DecodeSegmentChunk(bad).ok());
  bad = payload;
  PutLe32(bad, 32, kMaxChunkRaw + 1);
  EXPECT_FALSE(DecodeSegmentChunk(bad).ok());
  c.offset = ~0ull - 10;
  EXPECT_FALSE(DecodeSegmentChunk(EncodeSegmentChunk(c)).ok()) << "offset + length overflows";
}

TEST(WireFormat, DecompressionRefusesWrongSizesAndGarbage) {
  std::vector<std::byte> raw(10000, std::byte{'a'});
  ChunkCompressor compressor;
  std::vector<std::byte> packed;
  ASSERT_TRUE(compressor.Compress(raw, &packed));
  SegmentChunk c;
  c.flags = kChunkZstd;
  c.data = packed;
  std::vector<std::byte> out;
  for (uint32_t declared : {9999u, 10001u, kMaxChunkRaw}) {
    c.raw_length = declared;
    Status s = ChunkData(c, &out);
    EXPECT_FALSE(s.ok()) << declared;
    EXPECT_EQ(s.code(), EBADMSG);
  }
  c.raw_length = 10000;
  ASSERT_TRUE(ChunkData(c, &out).ok());
  const std::vector<std::byte> garbage = Random(200, 8);
  c.data = garbage;
  EXPECT_FALSE(ChunkData(c, &out).ok());
  std::vector<std::byte> cut = packed;
  cut.resize(cut.size() / 2);
  c.data = cut;
  EXPECT_FALSE(ChunkData(c, &out).ok()) << "truncated zstd frame";
}

TEST(WireFormat, CycleEndAckHeartbeatErrorRoundTrip) {
  applier::CycleInfo info{9, 1700000000123456789, 1699999999000000000};
  Result<applier::CycleInfo> ce = DecodeCycleEnd(EncodeCycleEnd(info));
  ASSERT_TRUE(ce.ok());
  EXPECT_EQ(ce->cycle, 9u);
  EXPECT_EQ(ce->cut_unix_nanos, info.cut_unix_nanos);
  EXPECT_EQ(ce->first_change_unix_nanos, info.first_change_unix_nanos);
  EXPECT_FALSE(DecodeCycleEnd(Random(23, 1)).ok());
  EXPECT_FALSE(DecodeCycleEnd(Random(25, 1)).ok());

  Ack ack{10, 8, -5, 1234, "apply stopped: bad CRC"};
  Result<Ack> a = DecodeAck(EncodeAck(ack));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->received_cycle, 10u);
  EXPECT_EQ(a->applied_cycle, 8u);
  EXPECT_EQ(a->applied_cut_unix_nanos, -5);
  EXPECT_EQ(a->pending_bytes, 1234u);
  EXPECT_EQ(a->apply_error, "apply stopped: bad CRC");
  std::vector<std::byte> ack_bytes = EncodeAck(ack);
  EXPECT_FALSE(DecodeAck(std::span(ack_bytes).first(ack_bytes.size() - 1)).ok());
  EXPECT_FALSE(DecodeAck(std::span(ack_bytes).first(kAckFixedSize - 1)).ok());
  ack_bytes.push_back(std::byte{0});
  EXPECT_FALSE(DecodeAck(ack_bytes).ok()) << "trailing bytes";
  ack.apply_error = std::string(10000, 'x');
  a = DecodeAck(EncodeAck(ack));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->apply_error.size(), kMaxErrorText) << "long text is clipped, not refused";

  Heartbeat hb{111, 222, 333};
  Result<Heartbeat> h = DecodeHeartbeat(EncodeHeartbeat(hb));
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->unix_nanos, 111);
  EXPECT_EQ(h->oldest_unapplied_change_unix_nanos, 222);
  EXPECT_EQ(h->pending_bytes, 333u);
  EXPECT_FALSE(DecodeHeartbeat({}).ok());

  Result<ErrorFrame> e = DecodeError(EncodeError(ErrorFrame{EBADMSG, "CRC mismatch"}));
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->code, static_cast<uint32_t>(EBADMSG));
  EXPECT_EQ(e->reason, "CRC mismatch");
  EXPECT_FALSE(DecodeError(Random(5, 1)).ok());
}

// --- Sync frames ---------------------------------------------------------------------------

// A decoder's refusal is EBADMSG, and its message says why.
void ExpectRefused(const Status& s, std::string_view why, const std::string& context = "") {
  EXPECT_FALSE(s.ok()) << context;
  EXPECT_EQ(s.code(), EBADMSG) << context << ": " << s.ToString();
  EXPECT_NE(s.message().find(why), std::string::npos)
      << context << ": \"" << s.message() << "\" does not say \"" << why << "\"";
}

TEST(WireFormat, EveryFrameTypeParsesAndHasAName) {
  for (uint16_t t = 1; t <= static_cast<uint16_t>(kLastFrameType); ++t) {
    const FrameType type = static_cast<FrameType>(t);
    const std::vector<std::byte> frame = EncodeFrame(type, Random(16, t));
    std::span<const std::byte> payload;
    Result<FrameHeader> h = ParseWhole(frame, &payload);
    ASSERT_TRUE(h.ok()) << t << ": " << h.status().ToString();
    EXPECT_EQ(h->type, type);
    EXPECT_NE(FrameTypeName(type), "unknown") << t;
  }
  EXPECT_EQ(FrameTypeName(FrameType::kSyncBegin), "SyncBegin");
  EXPECT_EQ(FrameTypeName(FrameType::kSyncReply), "SyncReply");
  EXPECT_EQ(FrameTypeName(FrameType::kHashRequest), "HashRequest");
  EXPECT_EQ(FrameTypeName(FrameType::kHashReply), "HashReply");
  EXPECT_EQ(FrameTypeName(FrameType::kSyncData), "SyncData");
  EXPECT_EQ(FrameTypeName(FrameType::kSyncAck), "SyncAck");
  EXPECT_EQ(FrameTypeName(FrameType::kSyncEnd), "SyncEnd");
  EXPECT_EQ(FrameTypeName(FrameType::kPeerRequest), "PeerRequest");
  EXPECT_EQ(FrameTypeName(FrameType::kPeerReply), "PeerReply");
  EXPECT_EQ(static_cast<uint16_t>(FrameType::kPeerRequest), 15);
  EXPECT_EQ(static_cast<uint16_t>(FrameType::kPeerReply), 16);
}

applier::SyncPlan Plan() {
  applier::SyncPlan plan;
  plan.sync_id = 42;
  plan.kind = applier::SyncKind::kSeeded;
  plan.cut_unix_nanos = 1700000000123456789;
  plan.epoch = 7;
  plan.disks = {
      {tracker::DiskIdFor("web01", "os"), applier::SyncMode::kCompare, 1000, 12, 1ull << 40},
      {tracker::DiskIdFor("web01", "data"), applier::SyncMode::kCopy, 0, 0, 4096}};
  return plan;
}

TEST(WireFormat, SyncBeginRoundTrip) {
  for (applier::SyncKind kind :
       {applier::SyncKind::kInitial, applier::SyncKind::kSeeded, applier::SyncKind::kResync}) {
    applier::SyncPlan plan = Plan();
    plan.kind = kind;
    Result<applier::SyncPlan> got = DecodeSyncBegin(EncodeSyncBegin(plan));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(got->sync_id, 42u);
    EXPECT_EQ(got->kind, kind);
    EXPECT_EQ(got->cut_unix_nanos, 1700000000123456789);
    EXPECT_EQ(got->epoch, 7u);
    ASSERT_EQ(got->disks.size(), 2u);
    EXPECT_EQ(got->disks[0].disk_id, tracker::DiskIdFor("web01", "os"));
    EXPECT_EQ(got->disks[0].mode, applier::SyncMode::kCompare);
    EXPECT_EQ(got->disks[0].last_seq, 1000u);
    EXPECT_EQ(got->disks[0].last_segment, 12u);
    EXPECT_EQ(got->disks[0].bytes_total, 1ull << 40);
    EXPECT_EQ(got->disks[1].disk_id, tracker::DiskIdFor("web01", "data"));
    EXPECT_EQ(got->disks[1].mode, applier::SyncMode::kCopy);
    EXPECT_EQ(got->disks[1].last_seq, 0u);
    EXPECT_EQ(got->disks[1].bytes_total, 4096u);
  }
  // The names on the wire are the documented ones.
  auto text_of = [](const applier::SyncPlan& plan) {
    const std::vector<std::byte> bytes = EncodeSyncBegin(plan);
    return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  };
  applier::SyncPlan plan = Plan();
  plan.kind = applier::SyncKind::kInitial;
  EXPECT_NE(text_of(plan).find("\"kind\":\"initial\""), std::string::npos) << text_of(plan);
  plan.kind = applier::SyncKind::kResync;
  EXPECT_NE(text_of(plan).find("\"kind\":\"resync\""), std::string::npos) << text_of(plan);
  const std::string text = text_of(Plan());
  EXPECT_NE(text.find("\"kind\":\"seeded\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"mode\":\"compare\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"mode\":\"copy\""), std::string::npos) << text;
}

TEST(WireFormat, SyncBeginRefusals) {
  ExpectRefused(DecodeSyncBegin({}).status(), "not valid JSON");
  ExpectRefused(DecodeSyncBegin(Bytes("{\"sync_id\":")).status(), "not valid JSON");
  ExpectRefused(DecodeSyncBegin(Bytes("[1]")).status(), "not a JSON object");
  ExpectRefused(DecodeSyncBegin(Bytes(R"({"sync_id":1})")).status(), "malformed");
  const std::string good =
      R"({"sync_id":5,"kind":"initial","cut_unix_nanos":1,"epoch":2,"disks":[)"
      R"({"disk_id":9,"mode":"copy","last_seq":0,"last_segment":0,"bytes_total":10}]})";
  ASSERT_TRUE(DecodeSyncBegin(Bytes(good)).ok());
  auto with = [&](std::string_view from, std::string_view to) {
    std::string s = good;
    const size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) s.replace(at, from.size(), to);
    return DecodeSyncBegin(Bytes(s)).status();
  };
  ExpectRefused(with("\"initial\"", "\"full\""), "unknown kind \"full\"");
  ExpectRefused(with("\"copy\"", "\"diff\""), "unknown mode \"diff\"");
  ExpectRefused(with("\"kind\":\"initial\"", "\"kind\":3"), "malformed");
  ExpectRefused(with("\"sync_id\":5", "\"sync_id\":-5"), "malformed");
  ExpectRefused(with("\"disk_id\":9", "\"disk_id\":4294967296"), "malformed");
  ExpectRefused(with("\"bytes_total\":10", "\"bytes_total\":\"10\""), "malformed");
  ExpectRefused(with(",\"last_seq\":0", ""), "malformed");
  ExpectRefused(with(",\"epoch\":2", ""), "malformed");
  ExpectRefused(with(",\"cut_unix_nanos\":1", ""), "malformed");
  ExpectRefused(with("\"disks\":[", "\"disks\":7,\"x\":["), "disks is not an array");
  ExpectRefused(with("[{\"disk_id\":9", "[7,{\"disk_id\":9"), "malformed");
  applier::SyncPlan empty = Plan();
  empty.disks.clear();
  ExpectRefused(DecodeSyncBegin(EncodeSyncBegin(empty)).status(), "no disks");
}

TEST(WireFormat, SyncReplyRoundTripAndRefusals) {
  SyncReply accepted;
  accepted.accepted = true;
  accepted.resume.disks = {{1, 64 << 10, 0}, {2, 0, 1ull << 33}};
  Result<SyncReply> a = DecodeSyncReply(EncodeSyncReply(accepted));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_TRUE(a->accepted);
  ASSERT_EQ(a->resume.disks.size(), 2u);
  EXPECT_EQ(a->resume.disks[0].disk_id, 1u);
  EXPECT_EQ(a->resume.disks[0].done_offset, 64u << 10);
  EXPECT_EQ(a->resume.disks[0].written_until, 0u);
  EXPECT_EQ(a->resume.disks[1].disk_id, 2u);
  EXPECT_EQ(a->resume.disks[1].done_offset, 0u);
  EXPECT_EQ(a->resume.disks[1].written_until, 1ull << 33);

  SyncReply refused;
  refused.error = std::string(RefusalName(ENOSPC));
  refused.message = "replica needs 10 GiB, 2 GiB free";
  Result<SyncReply> r = DecodeSyncReply(EncodeSyncReply(refused));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r->accepted);
  EXPECT_EQ(r->error, "no_space");
  EXPECT_EQ(RefusalCode(r->error), ENOSPC);
  EXPECT_EQ(r->message, refused.message);
  EXPECT_TRUE(r->resume.disks.empty());
  // Invalid UTF-8 or an overlong message in a refusal is sent, not thrown.
  refused.message = std::string("bad \xff byte") + std::string(10000, 'x');
  r = DecodeSyncReply(EncodeSyncReply(refused));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_LE(r->message.size(), kMaxErrorText + 8);

  ExpectRefused(DecodeSyncReply({}).status(), "not valid JSON");
  ExpectRefused(DecodeSyncReply(Bytes(R"({"accepted":true})")).status(), "malformed");
  ExpectRefused(DecodeSyncReply(Bytes(R"({"accepted":true,"disks":{}})")).status(),
                "disks is not an array");
  ExpectRefused(
      DecodeSyncReply(Bytes(R"({"accepted":true,"disks":[{"disk_id":1,"done_offset":0}]})"))
          .status(),
      "malformed");
  ExpectRefused(DecodeSyncReply(Bytes(R"({"accepted":false,"error":"no_space"})")).status(),
                "malformed");
  ExpectRefused(DecodeSyncReply(Bytes(R"({"accepted":"yes"})")).status(), "malformed");
}

TEST(WireFormat, HashRequestRoundTripAndRefusals) {
  const HashRequest req{0xabcdef01, applier::kMaxHashBlocks, 3 * applier::kSyncBlockSize};
  const std::vector<std::byte> bytes = EncodeHashRequest(req);
  ASSERT_EQ(bytes.size(), kHashRequestSize);
  Result<HashRequest> got = DecodeHashRequest(bytes);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->disk_id, 0xabcdef01u);
  EXPECT_EQ(got->count, applier::kMaxHashBlocks);
  EXPECT_EQ(got->offset, 3 * applier::kSyncBlockSize);

  for (size_t n = 0; n < kHashRequestSize; ++n) {
    ExpectRefused(DecodeHashRequest(std::span(bytes).first(n)).status(), "payload of",
                  "truncated to " + std::to_string(n));
  }
  std::vector<std::byte> longer = bytes;
  longer.push_back(std::byte{0});
  ExpectRefused(DecodeHashRequest(longer).status(), "payload of");
  ExpectRefused(DecodeHashRequest(EncodeHashRequest({1, 0, 0})).status(), "count 0");
  ExpectRefused(DecodeHashRequest(EncodeHashRequest({1, applier::kMaxHashBlocks + 1, 0})).status(),
                "count 257");
  ExpectRefused(DecodeHashRequest(EncodeHashRequest({1, 1, 4096})).status(), "not a multiple of");
  // The last block whose end is still a uint64_t: [2^64 - 2 blocks, 2^64 - 1 block).
  const uint64_t last_block = 0 - 2 * applier::kSyncBlockSize;
  ASSERT_TRUE(DecodeHashRequest(EncodeHashRequest({1, 1, last_block})).ok());
  ExpectRefused(DecodeHashRequest(EncodeHashRequest({1, 2, last_block})).status(), "overflows");
}

TEST(WireFormat, HashReplyRoundTripAndRefusals) {
  HashReply reply;
  reply.disk_id = 77;
  reply.offset = 5 * applier::kSyncBlockSize;
  for (uint32_t i = 0; i < applier::kMaxHashBlocks; ++i) reply.hashes.push_back(~0ull - i * 31);
  const std::vector<std::byte> bytes = EncodeHashReply(reply);
  ASSERT_EQ(bytes.size(), 16 + 8 * reply.hashes.size());
  Result<HashReply> got = DecodeHashReply(bytes);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->disk_id, 77u);
  EXPECT_EQ(got->offset, reply.offset);
  EXPECT_EQ(got->hashes, reply.hashes);

  for (size_t n : {size_t{0}, size_t{15}}) {
    ExpectRefused(DecodeHashReply(std::span(bytes).first(n)).status(), "truncated");
  }
  for (size_t n : {size_t{16}, size_t{17}, bytes.size() - 8, bytes.size() - 1}) {
    ExpectRefused(DecodeHashReply(std::span(bytes).first(n)).status(), "payload of",
                  "truncated to " + std::to_string(n));
  }
  std::vector<std::byte> longer = bytes;
  longer.resize(longer.size() + 8);
  ExpectRefused(DecodeHashReply(longer).status(), "payload of");
  reply.hashes.clear();
  ExpectRefused(DecodeHashReply(EncodeHashReply(reply)).status(), "count 0");
  reply.hashes.assign(applier::kMaxHashBlocks + 1, 1);
  ExpectRefused(DecodeHashReply(EncodeHashReply(reply)).status(), "count 257");
  reply.hashes.assign(1, 1);
  reply.offset = 100;
  ExpectRefused(DecodeHashReply(EncodeHashReply(reply)).status(), "not a multiple of");
  // A count field that claims more hashes than the payload holds is refused before reading.
  std::vector<std::byte> lying = EncodeHashReply(HashReply{1, 0, {9, 9}});
  PutLe32(lying, 4, 200);
  ExpectRefused(DecodeHashReply(lying).status(), "payload of");
}

TEST(WireFormat, SyncDataRoundTripRawCompressedAndZero) {
  const std::vector<std::byte> noise = Random(100000, 11);
  SyncData raw;
  raw.disk_id = 3;
  raw.offset = 1ull << 35;
  raw.length = noise.size();
  raw.done_to = raw.offset + raw.length + 4096;
  raw.data = noise;
  const std::vector<std::byte> raw_bytes = EncodeSyncData(raw);
  ASSERT_EQ(raw_bytes.size(), kSyncDataHeaderSize + noise.size());
  Result<SyncData> got = DecodeSyncData(raw_bytes);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->disk_id, 3u);
  EXPECT_EQ(got->flags, 0u);
  EXPECT_EQ(got->offset, raw.offset);
  EXPECT_EQ(got->length, noise.size());
  EXPECT_EQ(got->done_to, raw.done_to);
  EXPECT_FALSE(got->zero());
  EXPECT_FALSE(got->compressed());
  std::vector<std::byte> out;
  ASSERT_TRUE(SyncDataBytes(*got, &out).ok());
  EXPECT_EQ(out, noise);

  std::vector<std::byte> text(kMaxChunkRaw);
  for (size_t i = 0; i < text.size(); ++i) text[i] = static_cast<std::byte>('a' + (i / 977) % 26);
  ChunkCompressor compressor;
  std::vector<std::byte> packed;
  ASSERT_TRUE(compressor.Compress(text, &packed));
  SyncData zstd;
  zstd.disk_id = 4;
  zstd.flags = kSyncZstd;
  zstd.offset = 0;
  zstd.length = text.size();
  zstd.done_to = text.size();
  zstd.data = packed;
  const std::vector<std::byte> zstd_bytes = EncodeSyncData(zstd);
  got = DecodeSyncData(zstd_bytes);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_TRUE(got->compressed());
  EXPECT_EQ(got->data.size(), packed.size());
  ASSERT_TRUE(SyncDataBytes(*got, &out).ok());
  EXPECT_EQ(out, text);

  // A zero extent may be far larger than any data frame, and carries no bytes.
  SyncData zero;
  zero.disk_id = 5;
  zero.flags = kSyncZero;
  zero.offset = 1 << 20;
  zero.length = 1ull << 40;
  zero.done_to = zero.offset + zero.length;
  const std::vector<std::byte> zero_bytes = EncodeSyncData(zero);
  ASSERT_EQ(zero_bytes.size(), kSyncDataHeaderSize);
  got = DecodeSyncData(zero_bytes);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_TRUE(got->zero());
  EXPECT_EQ(got->length, 1ull << 40);
  EXPECT_TRUE(got->data.empty());
  Status s = SyncDataBytes(*got, &out);
  EXPECT_FALSE(s.ok()) << "a zero extent has no bytes to fetch";

  // A compare range with nothing to send: an empty extent that only moves done_to.
  SyncData nothing;
  nothing.flags = kSyncZero;
  nothing.offset = 1 << 20;
  nothing.done_to = 16 << 20;
  got = DecodeSyncData(EncodeSyncData(nothing));
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->length, 0u);
  EXPECT_EQ(got->done_to, 16u << 20);
}

TEST(WireFormat, SyncDataRefusals) {
  const std::vector<std::byte> data = Random(1000, 12);
  SyncData d;
  d.disk_id = 1;
  d.offset = 4096;
  d.length = data.size();
  d.done_to = d.offset + d.length;
  d.data = data;
  const std::vector<std::byte> good = EncodeSyncData(d);
  ASSERT_TRUE(DecodeSyncData(good).ok());
  for (size_t n = 0; n < kSyncDataHeaderSize; ++n) {
    ExpectRefused(DecodeSyncData(std::span(good).first(n)).status(), "truncated",
                  std::to_string(n));
  }
  ExpectRefused(DecodeSyncData(std::span(good).first(good.size() - 1)).status(),
                "raw data of 999 bytes");
  std::vector<std::byte> longer = good;
  longer.push_back(std::byte{1});
  ExpectRefused(DecodeSyncData(longer).status(), "raw data of 1001 bytes");

  std::vector<std::byte> bad = good;
  PutLe32(bad, 4, 4);
  ExpectRefused(DecodeSyncData(bad).status(), "unknown flags 4");
  PutLe32(bad, 4, kSyncZstd | kSyncZero);
  ExpectRefused(DecodeSyncData(bad).status(), "both zero and compressed");
  PutLe32(bad, 4, kSyncZero);
  ExpectRefused(DecodeSyncData(bad).status(), "zero extent carries 1000 bytes");

  SyncData e = d;
  e.done_to = d.offset + d.length - 1;
  ExpectRefused(DecodeSyncData(EncodeSyncData(e)).status(), "below the end");
  e = d;
  e.offset = ~0ull - 10;
  e.done_to = ~0ull;
  ExpectRefused(DecodeSyncData(EncodeSyncData(e)).status(), "overflows");
  e = SyncData{};
  e.flags = kSyncZero;
  e.offset = 1;
  e.length = ~0ull;
  e.done_to = ~0ull;
  ExpectRefused(DecodeSyncData(EncodeSyncData(e)).status(), "overflows");

  // Data frames are bounded like chunks, raw or compressed; zero extents are not.
  const std::vector<std::byte> big(kMaxChunkRaw + 1);
  e = SyncData{};
  e.length = big.size();
  e.done_to = big.size();
  e.data = big;
  ExpectRefused(DecodeSyncData(EncodeSyncData(e)).status(), "exceeds");
  e.flags = kSyncZstd;
  e.data = std::span(data).first(10);
  ExpectRefused(DecodeSyncData(EncodeSyncData(e)).status(), "exceeds");
  e.data = {};
  e.length = 10;
  ExpectRefused(DecodeSyncData(EncodeSyncData(e)).status(), "without a frame");
  e.flags = kSyncZero;
  ASSERT_TRUE(DecodeSyncData(EncodeSyncData(e)).ok());
}

TEST(WireFormat, SyncDataBytesRefusesWrongSizesAndGarbage) {
  const std::vector<std::byte> raw(20000, std::byte{'z'});
  ChunkCompressor compressor;
  std::vector<std::byte> packed;
  ASSERT_TRUE(compressor.Compress(raw, &packed));
  SyncData d;
  d.flags = kSyncZstd;
  d.data = packed;
  std::vector<std::byte> out;
  for (uint64_t declared : {uint64_t{19999}, uint64_t{20001}, uint64_t{kMaxChunkRaw}}) {
    d.length = declared;
    d.done_to = declared;
    const std::vector<std::byte> bytes = EncodeSyncData(d);
    Result<SyncData> got = DecodeSyncData(bytes);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ExpectRefused(SyncDataBytes(*got, &out), "raw length", std::to_string(declared));
  }
  d.length = raw.size();
  ASSERT_TRUE(SyncDataBytes(d, &out).ok());
  EXPECT_EQ(out, raw);
  const std::vector<std::byte> garbage = Random(300, 13);
  d.data = garbage;
  ExpectRefused(SyncDataBytes(d, &out), "not a zstd frame");
  std::vector<std::byte> cut = packed;
  cut.resize(cut.size() / 2);
  d.data = cut;
  EXPECT_FALSE(SyncDataBytes(d, &out).ok()) << "truncated zstd frame";
  // A hand-built frame above the bound is refused before anything is allocated.
  d.data = packed;
  d.length = uint64_t{1} << 40;
  ExpectRefused(SyncDataBytes(d, &out), "exceeds");
}

TEST(WireFormat, SyncAckAndSyncEndRoundTripAndRefusals) {
  const std::vector<std::byte> ack_bytes = EncodeSyncAck({0xfeedf00d, 1ull << 42});
  ASSERT_EQ(ack_bytes.size(), kSyncAckSize);
  Result<SyncAck> ack = DecodeSyncAck(ack_bytes);
  ASSERT_TRUE(ack.ok()) << ack.status().ToString();
  EXPECT_EQ(ack->disk_id, 0xfeedf00du);
  EXPECT_EQ(ack->done_offset, 1ull << 42);
  for (size_t n = 0; n < kSyncAckSize; ++n) {
    ExpectRefused(DecodeSyncAck(std::span(ack_bytes).first(n)).status(), "payload of");
  }
  std::vector<std::byte> bad = ack_bytes;
  bad.push_back(std::byte{0});
  ExpectRefused(DecodeSyncAck(bad).status(), "payload of");
  bad = ack_bytes;
  PutLe32(bad, 4, 1);
  ExpectRefused(DecodeSyncAck(bad).status(), "reserved");

  const std::vector<std::byte> end_bytes = EncodeSyncEnd({99, -1700000000000000000});
  ASSERT_EQ(end_bytes.size(), kSyncEndSize);
  Result<SyncEnd> end = DecodeSyncEnd(end_bytes);
  ASSERT_TRUE(end.ok()) << end.status().ToString();
  EXPECT_EQ(end->sync_id, 99u);
  EXPECT_EQ(end->cut_unix_nanos, -1700000000000000000);
  for (size_t n = 0; n < kSyncEndSize; ++n) {
    ExpectRefused(DecodeSyncEnd(std::span(end_bytes).first(n)).status(), "payload of");
  }
  bad = end_bytes;
  bad.push_back(std::byte{0});
  ExpectRefused(DecodeSyncEnd(bad).status(), "payload of");
}

// --- PeerRequest / PeerReply ------------------------------------------------------------

TEST(WireFormat, PeerMessageRoundTripsThroughAFrame) {
  const nlohmann::json request = {
      {"op", "promote"},
      {"vm", "vm1"},
      {"epoch", 7},
      {"from", "east"},
      {"note", "caf\u00e9 \"quoted\" [not a bracket] {nor this}"},
      {"hooks", {{"pre", {"a", "b"}}, {"timeout_ms", 120000}}},
  };
  Result<std::vector<std::byte>> payload = EncodePeerMessage(request);
  ASSERT_TRUE(payload.ok()) << payload.status().ToString();
  const std::vector<std::byte> frame = EncodeFrame(FrameType::kPeerRequest, *payload);
  std::span<const std::byte> got;
  Result<FrameHeader> h = ParseWhole(frame, &got);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->type, FrameType::kPeerRequest);
  Result<nlohmann::json> decoded = DecodePeerMessage(got);
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  EXPECT_EQ(*decoded, request);
  // An empty object is a message too.
  Result<std::vector<std::byte>> empty = EncodePeerMessage(nlohmann::json::object());
  ASSERT_TRUE(empty.ok());
  Result<nlohmann::json> back = DecodePeerMessage(*empty);
  ASSERT_TRUE(back.ok());
  EXPECT_TRUE(back->is_object() && back->empty());
}

TEST(WireFormat, PeerMessageRefusesWhatIsNotAJsonObject) {
  const std::pair<std::string, std::string> cases[] = {
      {"", "not valid JSON"},
      {"not json", "not valid JSON"},
      {"{\"a\": 1", "not valid JSON"},
      {"{\"a\": 1} trailing", "not valid JSON"},
      {"{\"a\": \"\xff\xfe\"}", "not valid JSON"},  // invalid UTF-8
      {"[1, 2]", "not a JSON object"},
      {"42", "not a JSON object"},
      {"\"text\"", "not a JSON object"},
      {"null", "not a JSON object"},
  };
  for (const auto& [text, why] : cases) {
    Result<nlohmann::json> j = DecodePeerMessage(Bytes(text));
    ASSERT_FALSE(j.ok()) << text;
    EXPECT_EQ(j.status().code(), EBADMSG) << text;
    EXPECT_NE(j.status().message().find("peer message"), std::string::npos) << j.status().message();
    EXPECT_NE(j.status().message().find(why), std::string::npos) << j.status().message();
  }
}

TEST(WireFormat, PeerMessageSizeLimitBothWays) {
  // {"x":"..."} of exactly kMaxPeerMessage bytes passes; one more byte does not.
  const size_t overhead = std::string(R"({"x":""})").size();
  nlohmann::json at_limit = {{"x", std::string(kMaxPeerMessage - overhead, 'a')}};
  Result<std::vector<std::byte>> ok = EncodePeerMessage(at_limit);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->size(), kMaxPeerMessage);
  EXPECT_TRUE(DecodePeerMessage(*ok).ok());

  nlohmann::json over = {{"x", std::string(kMaxPeerMessage - overhead + 1, 'a')}};
  Result<std::vector<std::byte>> refused = EncodePeerMessage(over);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), EMSGSIZE);
  const std::vector<std::byte> big = Bytes(R"({"x":")" + std::string(kMaxPeerMessage, 'a') + "\"}");
  Result<nlohmann::json> j = DecodePeerMessage(big);
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.status().code(), EBADMSG);
  EXPECT_NE(j.status().message().find("exceeds"), std::string::npos) << j.status().message();

  Result<std::vector<std::byte>> not_object = EncodePeerMessage(nlohmann::json::array({1, 2}));
  ASSERT_FALSE(not_object.ok());
  EXPECT_EQ(not_object.status().code(), EINVAL);
}

// Nesting is bounded before parsing; brackets inside strings do not count.
TEST(WireFormat, PeerMessageDepthLimit) {
  auto nested = [](int depth) {  // an object holding arrays: depth levels in all
    return "{\"a\":" + std::string(depth - 1, '[') + std::string(depth - 1, ']') + "}";
  };
  EXPECT_TRUE(DecodePeerMessage(Bytes(nested(kMaxPeerMessageDepth))).ok());
  Result<nlohmann::json> deep = DecodePeerMessage(Bytes(nested(kMaxPeerMessageDepth + 1)));
  ASSERT_FALSE(deep.ok());
  EXPECT_EQ(deep.status().code(), EBADMSG);
  EXPECT_NE(deep.status().message().find("nested deeper"), std::string::npos);
  // A hostile peer's hundred thousand open brackets are refused without parsing them.
  EXPECT_FALSE(DecodePeerMessage(Bytes(std::string(100000, '['))).ok());
  const std::string brackets(1000, '[');
  Result<nlohmann::json> in_string = DecodePeerMessage(Bytes("{\"a\":\"" + brackets + "\\\"{\"}"));
  ASSERT_TRUE(in_string.ok()) << in_string.status().ToString();
  EXPECT_EQ((*in_string)["a"], brackets + "\"{");

  nlohmann::json too_deep = nlohmann::json::object();
  nlohmann::json* at = &too_deep;
  for (int i = 0; i < kMaxPeerMessageDepth; ++i) at = &((*at)["n"] = nlohmann::json::object());
  Result<std::vector<std::byte>> refused = EncodePeerMessage(too_deep);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), EMSGSIZE);
}

// Every decoder takes any bytes without crashing (a tiny stand-in for the fuzzer).
TEST(WireFormat, DecodersSurviveRandomInput) {
  std::mt19937_64 rng(42);
  std::vector<std::byte> out;
  for (int i = 0; i < 3000; ++i) {
    const std::vector<std::byte> junk = Random(rng() % 128, rng());
    (void)ParseFrameHeader(junk);
    (void)DecodeHello(junk);
    (void)DecodeHelloReply(junk);
    (void)DecodeCycleEnd(junk);
    (void)DecodeAck(junk);
    (void)DecodeHeartbeat(junk);
    (void)DecodeError(junk);
    (void)DecodeSyncBegin(junk);
    (void)DecodeSyncReply(junk);
    (void)DecodeHashRequest(junk);
    (void)DecodeHashReply(junk);
    (void)DecodeSyncAck(junk);
    (void)DecodeSyncEnd(junk);
    (void)DecodePeerMessage(junk);
    Result<SegmentChunk> c = DecodeSegmentChunk(junk);
    if (c.ok()) (void)ChunkData(*c, &out);
    Result<SyncData> d = DecodeSyncData(junk);
    if (d.ok() && !d->zero()) (void)SyncDataBytes(*d, &out);
  }
}

}  // namespace
}  // namespace siterep::shipper
