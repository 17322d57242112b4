#include "tracker/log_format.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "tracker/test_util.h"

namespace siterep::tracker {
namespace {

using testing::EncodeRecord;
using testing::Pattern;

RecordHeader WriteHeader(uint64_t length) {
  RecordHeader h;
  h.kind = RecordKind::kWrite;
  h.disk_id = 0xA1B2C3D4;
  h.epoch = 7;
  h.seq = 42;
  h.offset = 1 << 20;
  h.length = length;
  return h;
}

TEST(LogFormatTest, WriteRecordRoundTrip) {
  const std::vector<std::byte> payload = Pattern(4096 + 3, 1);
  const RecordHeader h = WriteHeader(payload.size());
  const std::vector<std::byte> rec = EncodeRecord(h, payload);
  ASSERT_EQ(rec.size(), RecordSize(h));

  ParsedRecord parsed;
  ASSERT_EQ(ParseRecord(rec, &parsed), ParseStatus::kOk);
  EXPECT_EQ(parsed.size, rec.size());
  EXPECT_EQ(parsed.header.kind, RecordKind::kWrite);
  EXPECT_EQ(parsed.header.disk_id, h.disk_id);
  EXPECT_EQ(parsed.header.epoch, h.epoch);
  EXPECT_EQ(parsed.header.seq, h.seq);
  EXPECT_EQ(parsed.header.offset, h.offset);
  EXPECT_EQ(parsed.header.length, h.length);
  ASSERT_EQ(parsed.payload.size(), payload.size());
  EXPECT_EQ(std::memcmp(parsed.payload.data(), payload.data(), payload.size()), 0);
}

TEST(LogFormatTest, OnDiskLayoutIsLittleEndianAsDocumented) {
  RecordHeader h;
  h.kind = RecordKind::kDiscard;
  h.disk_id = 0x01020304;
  h.epoch = 0x1122334455667788;
  h.seq = 5;
  h.offset = 0x1000;
  h.length = 0x2000;
  const std::vector<std::byte> rec = EncodeRecord(h, {});
  ASSERT_EQ(rec.size(), kHeaderSize);
  EXPECT_EQ(std::memcmp(rec.data(), "SRLG", 4), 0);
  EXPECT_EQ(rec[4], std::byte{1});      // version
  EXPECT_EQ(rec[6], std::byte{2});      // kind: discard
  EXPECT_EQ(rec[8], std::byte{0x04});   // disk id, low byte first
  EXPECT_EQ(rec[16], std::byte{0x88});  // epoch, low byte first
  EXPECT_EQ(rec[24], std::byte{5});
  EXPECT_EQ(rec[33], std::byte{0x10});  // offset 0x1000
  EXPECT_EQ(rec[41], std::byte{0x20});  // length 0x2000
  // The CRC covers the header with the crc field zeroed.
  std::vector<std::byte> zeroed = rec;
  std::memset(zeroed.data() + 12, 0, 4);
  uint32_t stored;
  std::memcpy(&stored, rec.data() + 12, 4);
  EXPECT_EQ(stored, Crc32c(zeroed));
}

TEST(LogFormatTest, DiscardAndCutRoundTrip) {
  RecordHeader d;
  d.kind = RecordKind::kDiscard;
  d.seq = 1;
  d.offset = 8192;
  d.length = 1ull << 30;  // a discard's length is not payload
  EXPECT_EQ(PayloadSize(d), 0u);
  std::vector<std::byte> rec = EncodeRecord(d, {});
  ParsedRecord parsed;
  ASSERT_EQ(ParseRecord(rec, &parsed), ParseStatus::kOk);
  EXPECT_EQ(parsed.header.length, d.length);
  EXPECT_TRUE(parsed.payload.empty());

  RecordHeader c;
  c.kind = RecordKind::kCut;
  c.seq = 2;
  c.length = kCutPayloadSize;
  std::byte payload[kCutPayloadSize];
  EncodeCutPayload(CutPayload{99, -5}, payload);
  rec = EncodeRecord(c, payload);
  ASSERT_EQ(ParseRecord(rec, &parsed), ParseStatus::kOk);
  ASSERT_EQ(parsed.payload.size(), kCutPayloadSize);
  const CutPayload cut = DecodeCutPayload(parsed.payload.first<kCutPayloadSize>());
  EXPECT_EQ(cut.cycle, 99u);
  EXPECT_EQ(cut.unix_nanos, -5);
}

TEST(LogFormatTest, FlippedHeaderByteIsCrcMismatch) {
  const std::vector<std::byte> payload = Pattern(512, 2);
  std::vector<std::byte> rec = EncodeRecord(WriteHeader(payload.size()), payload);
  // Every byte of epoch, seq and offset is covered (these do not fail any other check).
  for (size_t i = 16; i < 40; ++i) {
    std::vector<std::byte> bad = rec;
    bad[i] ^= std::byte{0x01};
    ParsedRecord parsed;
    std::string_view why;
    ASSERT_EQ(ParseRecord(bad, &parsed, &why), ParseStatus::kCorrupt) << "byte " << i;
    EXPECT_NE(why.find("CRC"), std::string_view::npos) << why;
  }
}

TEST(LogFormatTest, FlippedPayloadByteIsCrcMismatch) {
  const std::vector<std::byte> payload = Pattern(4096, 3);
  std::vector<std::byte> rec = EncodeRecord(WriteHeader(payload.size()), payload);
  rec[kHeaderSize + 4000] ^= std::byte{0x80};
  ParsedRecord parsed;
  EXPECT_EQ(ParseRecord(rec, &parsed), ParseStatus::kCorrupt);
}

TEST(LogFormatTest, EveryPrefixOfARecordIsTruncated) {
  const std::vector<std::byte> payload = Pattern(300, 4);
  const std::vector<std::byte> rec = EncodeRecord(WriteHeader(payload.size()), payload);
  for (size_t n = 0; n < rec.size(); ++n) {
    ParsedRecord parsed;
    EXPECT_EQ(ParseRecord(std::span(rec).first(n), &parsed), ParseStatus::kTruncated) << n;
  }
  ParsedRecord parsed;
  EXPECT_EQ(ParseRecord(rec, &parsed), ParseStatus::kOk);
}

TEST(LogFormatTest, ParsesOnlyTheFirstRecordOfABuffer) {
  const std::vector<std::byte> a = EncodeRecord(WriteHeader(10), Pattern(10, 5));
  std::vector<std::byte> both = a;
  const std::vector<std::byte> b = EncodeRecord(WriteHeader(20), Pattern(20, 6));
  both.insert(both.end(), b.begin(), b.end());
  ParsedRecord parsed;
  ASSERT_EQ(ParseRecord(both, &parsed), ParseStatus::kOk);
  EXPECT_EQ(parsed.size, a.size());
  ASSERT_EQ(ParseRecord(std::span(both).subspan(parsed.size), &parsed), ParseStatus::kOk);
  EXPECT_EQ(parsed.header.length, 20u);
}

struct BadField {
  const char* name;
  size_t at;
  std::vector<uint8_t> bytes;
};

TEST(LogFormatTest, BadMagicVersionKindAndLengthAreCorrupt) {
  const std::vector<std::byte> payload = Pattern(64, 7);
  const std::vector<std::byte> good = EncodeRecord(WriteHeader(payload.size()), payload);
  const std::vector<BadField> cases = {
      {"magic", 0, {'X'}},
      {"version", 4, {2, 0}},
      {"kind zero", 6, {0, 0}},
      {"kind 4", 6, {4, 0}},
      {"length past kMaxPayload", 40, {0x01, 0x00, 0x80, 0x00, 0, 0, 0, 0}},
      {"length 2^63", 40, {0, 0, 0, 0, 0, 0, 0, 0x80}},
  };
  for (const BadField& c : cases) {
    std::vector<std::byte> bad = good;
    for (size_t i = 0; i < c.bytes.size(); ++i) bad[c.at + i] = std::byte{c.bytes[i]};
    ParsedRecord parsed;
    std::string_view why;
    EXPECT_EQ(ParseRecord(bad, &parsed, &why), ParseStatus::kCorrupt) << c.name;
    EXPECT_FALSE(why.empty()) << c.name;
    // Even when only the header is there, a bad header is corrupt, not "read more".
    EXPECT_EQ(ParseRecord(std::span(bad).first(kHeaderSize), &parsed), ParseStatus::kCorrupt)
        << c.name;
  }
}

TEST(LogFormatTest, CutWithWrongLengthIsCorrupt) {
  RecordHeader c;
  c.kind = RecordKind::kCut;
  c.length = kCutPayloadSize;
  std::byte payload[kCutPayloadSize] = {};
  std::vector<std::byte> rec = EncodeRecord(c, payload);
  rec[40] = std::byte{17};
  ParsedRecord parsed;
  EXPECT_EQ(ParseRecord(rec, &parsed), ParseStatus::kCorrupt);
}

TEST(LogFormatTest, OffsetPlusLengthOverflowIsCorrupt) {
  RecordHeader d;
  d.kind = RecordKind::kDiscard;
  d.offset = ~0ull - 10;
  d.length = 100;
  const std::vector<std::byte> rec = EncodeRecord(d, {});
  ParsedRecord parsed;
  EXPECT_EQ(ParseRecord(rec, &parsed), ParseStatus::kCorrupt);
}

TEST(LogFormatTest, DiskIdIsCrcOfVmSlashDisk) {
  EXPECT_EQ(DiskIdFor("web01", "os"), Crc32c("web01/os", 8));
  EXPECT_NE(DiskIdFor("web01", "os"), DiskIdFor("web01", "data"));
  EXPECT_NE(DiskIdFor("web0", "1/os"), DiskIdFor("web01", "data"));
  EXPECT_EQ(RecordKindName(RecordKind::kCut), "cut");
}

}  // namespace
}  // namespace siterep::tracker
