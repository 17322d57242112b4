#include "tracker/log_format.h"

#include <cstring>
#include <string>

#include "common/crc32c.h"
#include "common/endian.h"

namespace siterep::tracker {
namespace {

// Field offsets within the header (see the table in log_format.h).
constexpr size_t kMagicAt = 0;
constexpr size_t kVersionAt = 4;
constexpr size_t kKindAt = 6;
constexpr size_t kDiskIdAt = 8;
constexpr size_t kCrcAt = 12;
constexpr size_t kEpochAt = 16;
constexpr size_t kSeqAt = 24;
constexpr size_t kOffsetAt = 32;
constexpr size_t kLengthAt = 40;

bool KnownKind(uint16_t kind) {
  return kind == static_cast<uint16_t>(RecordKind::kWrite) ||
         kind == static_cast<uint16_t>(RecordKind::kDiscard) ||
         kind == static_cast<uint16_t>(RecordKind::kCut);
}

// CRC32C over the header with the crc field taken as zero, then the payload.
uint32_t RecordCrc(const std::byte* header, std::span<const std::byte> payload) {
  static constexpr std::byte kZero[4] = {};
  uint32_t crc = Crc32c(header, kCrcAt);
  crc = Crc32cExtend(crc, kZero, sizeof(kZero));
  crc = Crc32cExtend(crc, header + kCrcAt + 4, kHeaderSize - kCrcAt - 4);
  return Crc32cExtend(crc, payload.data(), payload.size());
}

ParseStatus Corrupt(std::string_view* why, std::string_view reason) {
  if (why != nullptr) *why = reason;
  return ParseStatus::kCorrupt;
}

}  // namespace

uint64_t PayloadSize(const RecordHeader& header) {
  switch (header.kind) {
    case RecordKind::kWrite:
      return header.length;
    case RecordKind::kDiscard:
      return 0;
    case RecordKind::kCut:
      return kCutPayloadSize;
  }
  return 0;
}

void EncodeHeader(const RecordHeader& header, std::span<const std::byte> payload,
                  std::span<std::byte, kHeaderSize> out) {
  std::byte* p = out.data();
  StoreLe<uint32_t>(p + kMagicAt, kRecordMagic);
  StoreLe<uint16_t>(p + kVersionAt, kFormatVersion);
  StoreLe<uint16_t>(p + kKindAt, static_cast<uint16_t>(header.kind));
  StoreLe<uint32_t>(p + kDiskIdAt, header.disk_id);
  StoreLe<uint32_t>(p + kCrcAt, 0);
  StoreLe<uint64_t>(p + kEpochAt, header.epoch);
  StoreLe<uint64_t>(p + kSeqAt, header.seq);
  StoreLe<uint64_t>(p + kOffsetAt, header.offset);
  StoreLe<uint64_t>(p + kLengthAt, header.length);
  StoreLe<uint32_t>(p + kCrcAt, RecordCrc(p, payload));
}

void EncodeCutPayload(const CutPayload& cut, std::span<std::byte, kCutPayloadSize> out) {
  StoreLe<uint64_t>(out.data(), cut.cycle);
  StoreLe<int64_t>(out.data() + 8, cut.unix_nanos);
  StoreLe<int64_t>(out.data() + 16, cut.first_change_unix_nanos);
}

CutPayload DecodeCutPayload(std::span<const std::byte, kCutPayloadSize> in) {
  CutPayload cut;
  cut.cycle = LoadLe<uint64_t>(in.data());
  cut.unix_nanos = LoadLe<int64_t>(in.data() + 8);
  cut.first_change_unix_nanos = LoadLe<int64_t>(in.data() + 16);
  return cut;
}

ParseStatus ParseHeader(std::span<const std::byte> in, RecordHeader* out, uint32_t* crc,
                        std::string_view* why) {
  const std::byte* p = in.data();
  // Check what the available bytes allow before calling a short input truncated, so that
  // garbage is reported as corrupt as early as possible.
  if (in.size() >= kVersionAt && LoadLe<uint32_t>(p + kMagicAt) != kRecordMagic) {
    return Corrupt(why, "bad magic");
  }
  if (in.size() >= kKindAt && LoadLe<uint16_t>(p + kVersionAt) != kFormatVersion) {
    return Corrupt(why, "unsupported format version");
  }
  if (in.size() >= kDiskIdAt && !KnownKind(LoadLe<uint16_t>(p + kKindAt))) {
    return Corrupt(why, "unknown record kind");
  }
  if (in.size() < kHeaderSize) {
    if (why != nullptr) *why = "short header";
    return ParseStatus::kTruncated;
  }

  RecordHeader h;
  h.kind = static_cast<RecordKind>(LoadLe<uint16_t>(p + kKindAt));
  h.disk_id = LoadLe<uint32_t>(p + kDiskIdAt);
  h.epoch = LoadLe<uint64_t>(p + kEpochAt);
  h.seq = LoadLe<uint64_t>(p + kSeqAt);
  h.offset = LoadLe<uint64_t>(p + kOffsetAt);
  h.length = LoadLe<uint64_t>(p + kLengthAt);

  switch (h.kind) {
    case RecordKind::kWrite:
      if (h.length > kMaxPayload) return Corrupt(why, "write length exceeds the maximum payload");
      break;
    case RecordKind::kDiscard:
      break;
    case RecordKind::kCut:
      if (h.length != kCutPayloadSize || h.offset != 0) {
        return Corrupt(why, "cut record with bad offset or length");
      }
      break;
  }
  if (h.offset + h.length < h.offset) return Corrupt(why, "offset + length overflows");
  *out = h;
  *crc = LoadLe<uint32_t>(p + kCrcAt);
  return ParseStatus::kOk;
}

uint32_t RecordCrcBegin(std::span<const std::byte, kHeaderSize> header) {
  return RecordCrc(header.data(), {});
}

ParseStatus ParseRecord(std::span<const std::byte> in, ParsedRecord* out, std::string_view* why) {
  RecordHeader h;
  uint32_t stored_crc = 0;
  if (ParseStatus st = ParseHeader(in, &h, &stored_crc, why); st != ParseStatus::kOk) return st;
  const uint64_t size = RecordSize(h);
  if (in.size() < size) {
    if (why != nullptr) *why = "short payload";
    return ParseStatus::kTruncated;
  }
  std::span<const std::byte> payload = in.subspan(kHeaderSize, size - kHeaderSize);
  if (RecordCrc(in.data(), payload) != stored_crc) return Corrupt(why, "CRC mismatch");

  out->header = h;
  out->payload = payload;
  out->size = size;
  return ParseStatus::kOk;
}

uint32_t DiskIdFor(std::string_view vm, std::string_view disk) {
  std::string key;
  key.reserve(vm.size() + 1 + disk.size());
  key.append(vm).append("/").append(disk);
  return Crc32c(key.data(), key.size());
}

std::string_view RecordKindName(RecordKind kind) {
  switch (kind) {
    case RecordKind::kWrite:
      return "write";
    case RecordKind::kDiscard:
      return "discard";
    case RecordKind::kCut:
      return "cut";
  }
  return "unknown";
}

}  // namespace siterep::tracker
