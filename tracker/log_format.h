// The change log's on-disk record format, shared by the tracker (writer), the recovery
// scan, the shipper, the applier and the debug tools. One header, one truth.
//
// A disk's change log is a folder next to its image, "<image>.srlog/", holding segment
// files "<20-digit segment number>.seg" (numbered from 1, in write order). A segment is a
// plain sequence of records; there is no segment header. Every record is:
//
//   offset size field
//   0      4    magic          kRecordMagic ("SRLG" little-endian)
//   4      2    version        kFormatVersion
//   6      2    kind           RecordKind
//   8      4    disk_id        stable id of the disk (DiskIdFor(vm, disk))
//   12     4    crc            CRC32C over bytes [0, kHeaderSize) with this field zero,
//                              followed by the payload
//   16     8    epoch          the VM's epoch (generation) when the record was written
//   24     8    seq            per-disk sequence number, +1 per record, never reused
//   32     8    offset         write/discard: byte offset in the disk; cut: 0
//   40     8    length         write: payload bytes; discard: bytes discarded; cut: 24
//   48     ..   payload        write: the data; discard: none; cut: CutPayload
//
// All integers little-endian. A cut record ends a replication cycle: every record before
// it in every disk of the VM belongs to that cycle or an earlier one, and the cut carries
// the same cycle number in every disk's log. A segment that ends in a cut is sealed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace siterep::tracker {

inline constexpr uint32_t kRecordMagic = 0x474C5253;  // "SRLG" on disk
inline constexpr uint16_t kFormatVersion = 1;
inline constexpr size_t kHeaderSize = 48;
// Largest payload the parser accepts; the FUSE layer never writes more than 1 MiB at once.
inline constexpr uint64_t kMaxPayload = 8u << 20;

enum class RecordKind : uint16_t { kWrite = 1, kDiscard = 2, kCut = 3 };

struct RecordHeader {
  RecordKind kind = RecordKind::kWrite;
  uint32_t disk_id = 0;
  uint64_t epoch = 0;
  uint64_t seq = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};

// The payload of a cut record.
struct CutPayload {
  uint64_t cycle = 0;      // cycle number, +1 per cut of the VM
  int64_t unix_nanos = 0;  // wall-clock time of the cut
  // Wall-clock time of the first change of the cycle in any disk of the VM (0: none known).
  // The replica's RPO is the age of the oldest change it has not applied.
  int64_t first_change_unix_nanos = 0;
};
inline constexpr size_t kCutPayloadSize = 24;

// Bytes of payload that follow a header of this kind and length.
uint64_t PayloadSize(const RecordHeader& header);
// Whole record size (header + payload).
inline uint64_t RecordSize(const RecordHeader& header) { return kHeaderSize + PayloadSize(header); }

// Writes header (with its CRC, computed over header and payload) into out[0..kHeaderSize).
// payload.size() must equal PayloadSize(header).
void EncodeHeader(const RecordHeader& header, std::span<const std::byte> payload,
                  std::span<std::byte, kHeaderSize> out);
void EncodeCutPayload(const CutPayload& cut, std::span<std::byte, kCutPayloadSize> out);
CutPayload DecodeCutPayload(std::span<const std::byte, kCutPayloadSize> in);

enum class ParseStatus {
  kOk,         // a whole, valid record
  kTruncated,  // fewer bytes than a whole record: a torn tail, or read more
  kCorrupt,    // bad magic, version, kind, length or CRC
};

struct ParsedRecord {
  RecordHeader header;
  std::span<const std::byte> payload;  // points into the input buffer
  size_t size = 0;                     // bytes consumed (header + payload)
};

// Parses the record at the start of in. On kCorrupt, *why says what was wrong.
ParseStatus ParseRecord(std::span<const std::byte> in, ParsedRecord* out,
                        std::string_view* why = nullptr);

// For a reader that gets a record in pieces (the replica's receiver): checks the header at
// the start of in as ParseRecord does (magic, version, kind, length; kTruncated below
// kHeaderSize) but not the CRC, which covers the payload too; *crc is the stored one. The
// record's CRC is then Crc32cExtend(RecordCrcBegin(header), payload...) over its pieces.
ParseStatus ParseHeader(std::span<const std::byte> in, RecordHeader* out, uint32_t* crc,
                        std::string_view* why = nullptr);
uint32_t RecordCrcBegin(std::span<const std::byte, kHeaderSize> header);

// Stable 32-bit id of a disk, the same on every site: CRC32C of "vm/disk".
uint32_t DiskIdFor(std::string_view vm, std::string_view disk);

std::string_view RecordKindName(RecordKind kind);

}  // namespace siterep::tracker
