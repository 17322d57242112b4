// libFuzzer harness for the change-log record parser (tracker/log_format.h), which reads
// segments written by the tracker and, at the replica, segments sent by a peer. Parses
// records one after another as a reader would; a valid record must re-encode to the same
// bytes (round trip) and pass the header-only parse with its CRC taken in pieces, and nothing may
// read outside the input (ASan) or overflow (UBSan).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "common/crc32c.h"
#include "tracker/log_format.h"

using namespace siterep::tracker;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  while (!in.empty()) {
    ParsedRecord rec;
    std::string_view why;
    if (ParseRecord(in, &rec, &why) != ParseStatus::kOk) break;
    if (rec.size == 0 || rec.size > in.size()) std::abort();
    if (rec.payload.size() != PayloadSize(rec.header)) std::abort();
    std::byte head[kHeaderSize];
    EncodeHeader(rec.header, rec.payload, std::span<std::byte, kHeaderSize>(head));
    if (std::memcmp(head, in.data(), kHeaderSize) != 0) std::abort();  // round trip
    // The header-only parse of a reader that gets records in pieces agrees, and so does
    // the CRC extended over the payload.
    RecordHeader header;
    uint32_t stored = 0;
    if (ParseHeader(in, &header, &stored) != ParseStatus::kOk) std::abort();
    if (RecordSize(header) != rec.size) std::abort();
    const uint32_t crc = siterep::Crc32cExtend(RecordCrcBegin(in.first<kHeaderSize>()),
                                               rec.payload.data(), rec.payload.size());
    if (crc != stored) std::abort();
    if (rec.header.kind == RecordKind::kCut) {
      (void)DecodeCutPayload(rec.payload.first<kCutPayloadSize>());
    }
    in = in.subspan(rec.size);
  }
  return 0;
}
