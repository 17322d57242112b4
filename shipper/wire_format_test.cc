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
  for (uint16_t type : {0, 8, 0xffff}) {
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
  for (int code : {ESTALE, EACCES, EBUSY, EINVAL, EPROTO, ENOSPC, EPERM}) {
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
    Result<SegmentChunk> c = DecodeSegmentChunk(junk);
    if (c.ok()) (void)ChunkData(*c, &out);
  }
}

}  // namespace
}  // namespace siterep::shipper
