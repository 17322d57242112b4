// The replication link's wire format, shared by the shipper (sender, on the primary) and
// the receiver (on the secondary). One header, one truth: every frame is described here.
//
// The link is a TLS 1.3 stream (shipper/tls.h) carrying frames. Every frame is a fixed
// header followed by its payload; all integers are little-endian:
//
//   offset size field
//   0      4    magic          kFrameMagic ("SRWF" on the wire)
//   4      2    version        kProtocolVersion; any other value is refused
//   6      2    type           FrameType
//   8      4    flags          reserved, zero (a non-zero value is refused)
//   12     4    length         payload bytes, at most kMaxFramePayload (refused before any
//                              buffer is allocated for it)
//   16     4    crc            CRC32C over bytes [0, kFrameHeaderSize) with this field zero,
//                              followed by the payload
//   20     ..   payload
//
// A conversation, after the TLS handshake (which authenticates both sites):
//
//   shipper                                   receiver
//   Hello ------------------------------------>
//         <------------------------------------ HelloReply (accepted + position, or refused)
//   SegmentChunk ... (every disk's segment of cycle C, each from offset 0, last chunk flagged)
//   CycleEnd(C) ------------------------------>  (sink->CommitCycle)
//         <------------------------------------ Ack (after the commit returned Ok)
//   Heartbeat -------------------------------->
//         <------------------------------------ Ack
//   Error (either side, before closing; code 0 is a clean goodbye)
//
// A sync (initial copy, seeded enable, resync; applier/segment_sink.h) runs right after
// the HelloReply, before any segment, when the primary has one to do:
//   SyncBegin(plan) -------------------------->  (sink->BeginSync)
//         <------------------------------------ SyncReply (accepted + resume, or refused)
//   HashRequest(disk, offset, count) --------->  (compare mode; several in flight)
//         <------------------------------------ HashReply(disk, offset, hashes)
//   SyncData(disk, offset, data|zeros, done_to)> (sink->WriteSyncData)
//         <------------------------------------ SyncAck(disk, durable done offset)
//                                               (when the durable offset moved)
//   SyncEnd(sync_id, cut) -------------------->  (sink->EndSync)
//         <------------------------------------ Ack (received = applied = sync_id)
//   ... then segments of cycles > sync_id, as above. Heartbeats may come at any time.
//
// A peer call (shipper/peer_call.h) is a connection of its own that asks one question
// between the two daemons (failover: promote, demote, role and health of a VM):
//   PeerRequest ------------------------------>  (ReceiverOptions::peer_handler)
//         <------------------------------------ PeerReply
//   ... and the receiver closes the connection.
//
// The epoch fences split brain (DESIGN.md invariant 5) without a field in every frame: a
// connection is bound to the epoch its Hello carries (the receiver refuses an epoch older
// than the replica's), and every record inside a segment carries its own epoch, which the
// applier checks again.
//
// Payloads:
//   Hello (JSON object; rare and small):
//     {"version": 1, "from": site, "to": site, "vm": name, "epoch": n,
//      "definition": {"primary_site", "disks": [{"name", "disk_id", "size"}],
//                     "recovery_points", "recovery_point_interval_ms", "frequency_ms"}}
//   HelloReply (JSON object):
//     accepted: {"accepted": true, "position": {"epoch", "received_cycle",
//                "applied_cycle", "applied_cut_unix_nanos", "pending_bytes", "apply_error"}}
//     refused:  {"accepted": false, "error": name, "message": one line}
//     Refusal names (RefusalName): "epoch_older", "unknown_site", "vm_busy",
//     "definition_mismatch", "protocol", "no_space", "not_permitted", "refused".
//   SegmentChunk (binary; bytes [offset, offset + raw_length) of one sealed segment):
//     0  4 disk_id   4  4 chunk flags (kChunkLast, kChunkZstd)   8  8 segment number
//     16 8 cycle     24 8 offset within the segment                32 4 raw_length
//     36 .. data: raw_length bytes, or one zstd frame that decompresses to raw_length
//     raw_length <= kMaxChunkRaw. A segment's chunks are sent in order from offset 0.
//   CycleEnd (binary, 24 bytes): cycle u64, cut_unix_nanos i64, first_change_unix_nanos i64
//   Ack (binary): received_cycle u64, applied_cycle u64, applied_cut_unix_nanos i64,
//     pending_bytes u64, error_length u16, error text (at most kMaxErrorText bytes)
//   Heartbeat (binary, 24 bytes): primary unix_nanos i64,
//     oldest_unapplied_change_unix_nanos i64 (0: none), pending_bytes u64
//   Error (binary): code u32 (errno value; 0 = clean goodbye), length u16, reason text
//   SyncBegin (JSON): {"sync_id", "kind": "initial"|"seeded"|"resync", "cut_unix_nanos",
//     "epoch", "disks": [{"disk_id", "mode": "copy"|"compare", "last_seq", "last_segment",
//     "bytes_total"}]}
//   SyncReply (JSON): accepted: {"accepted": true, "disks": [{"disk_id", "done_offset",
//     "written_until"}]}; refused: {"accepted": false, "error": name, "message": line}
//   HashRequest (binary, 16 bytes): disk_id u32, count u32 (<= kMaxHashBlocks), offset u64
//     (a multiple of kSyncBlockSize)
//   HashReply (binary): disk_id u32, count u32, offset u64, count x u64 XXH3-64 hashes
//   SyncData (binary): disk_id u32, flags u32 (kSyncZstd, kSyncZero), offset u64,
//     length u64 (raw data bytes, or the zero extent's length), done_to u64, then the data
//     (raw: length bytes; kSyncZstd: one zstd frame of length bytes; kSyncZero: nothing).
//     length <= kMaxChunkRaw for data; a zero extent may be any length within the disk.
//     done_to >= offset + length.
//   SyncAck (binary, 16 bytes): disk_id u32, zero u32, durable done offset u64
//   SyncEnd (binary, 16 bytes): sync_id u64, cut_unix_nanos i64
//   PeerRequest, PeerReply (JSON object as UTF-8 text, at most kMaxPeerMessage bytes,
//     nested at most kMaxPeerMessageDepth deep). The fields are the daemons' business,
//     except: a request carries "from" (the caller's site; the receiver refuses one that is
//     not the certificate's site) and "to" (the receiver's site); a reply that the receiver
//     itself makes (not its handler) is {"ok": false, "error": name, "message": line} with
//     name "unknown_site" (from/to do not match), "unsupported" (no handler), "protocol"
//     (undecodable request) or "internal" (the handler threw or answered a non-object or
//     an oversize object).
//
// Every function here is pure (no I/O, no global state) except ReadFrame, which reads only
// through the callback it is given; each decoder checks lengths before it reads, so any
// byte string can be fed to it (a fuzzer may call them). Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "applier/segment_sink.h"
#include "common/function_ref.h"
#include "common/status.h"

namespace siterep::shipper {

inline constexpr uint32_t kFrameMagic = 0x46575253;  // "SRWF" on the wire
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr size_t kFrameHeaderSize = 20;
// Largest raw (uncompressed) chunk of a segment.
inline constexpr uint32_t kMaxChunkRaw = 1u << 20;
inline constexpr size_t kChunkHeaderSize = 36;
// Largest payload of any frame: a chunk whose zstd frame came out larger than raw is sent
// raw, so 1 MiB + header is the real bound; the rest is headroom for future frames.
inline constexpr uint32_t kMaxFramePayload = (4u << 20) + 4096;
// Longest reason or apply error text carried in Ack and Error frames.
inline constexpr size_t kMaxErrorText = 4096;
inline constexpr size_t kCycleEndSize = 24;
inline constexpr size_t kHeartbeatSize = 24;
inline constexpr size_t kAckFixedSize = 34;

enum class FrameType : uint16_t {
  kHello = 1,
  kHelloReply = 2,
  kSegmentChunk = 3,
  kCycleEnd = 4,
  kAck = 5,
  kHeartbeat = 6,
  kError = 7,
  kSyncBegin = 8,
  kSyncReply = 9,
  kHashRequest = 10,
  kHashReply = 11,
  kSyncData = 12,
  kSyncAck = 13,
  kSyncEnd = 14,
  kPeerRequest = 15,
  kPeerReply = 16,
};
inline constexpr FrameType kLastFrameType = FrameType::kPeerReply;
std::string_view FrameTypeName(FrameType type);

struct FrameHeader {
  FrameType type = FrameType::kError;
  uint32_t payload_length = 0;
  uint32_t crc = 0;
};

// Parses the first kFrameHeaderSize bytes of in. Refuses (EBADMSG, saying why) a short
// input, bad magic, another version, an unknown type, non-zero flags or a length above
// kMaxFramePayload.
Result<FrameHeader> ParseFrameHeader(std::span<const std::byte> in);
// Checks that payload has the header's length and that the CRC matches (EBADMSG if not).
Status VerifyFrame(const FrameHeader& header, std::span<const std::byte> payload);
// A whole frame: header (with its CRC) followed by payload. payload.size() must not exceed
// kMaxFramePayload.
std::vector<std::byte> EncodeFrame(FrameType type, std::span<const std::byte> payload);

// Reads one frame through read_exact (which must fill its whole span or fail): the header,
// then the payload into *payload (resized). Checks the header but NOT the CRC, so a caller
// can inject a fault between reading and verifying; call VerifyFrame before using it.
Result<FrameHeader> ReadFrame(FunctionRef<Status(std::span<std::byte>)> read_exact,
                              std::vector<std::byte>* payload);

// --- Hello / HelloReply -----------------------------------------------------------------

struct Hello {
  uint32_t protocol_version = kProtocolVersion;
  std::string from;                       // the shipper's site
  std::string to;                         // the receiver's site
  applier::ReplicaDefinition definition;  // carries vm and epoch
};
std::vector<std::byte> EncodeHello(const Hello& hello);
// Refuses malformed JSON, missing or mistyped fields, and names that are not valid site,
// VM or disk names (letters, digits, '-', '_', '.'; at most 64; not "." or "..").
Result<Hello> DecodeHello(std::span<const std::byte> payload);

struct HelloReply {
  bool accepted = false;
  applier::ReplicaPosition position;  // when accepted
  std::string error;                  // refusal name, when refused
  std::string message;                // one line, when refused
};
std::vector<std::byte> EncodeHelloReply(const HelloReply& reply);
Result<HelloReply> DecodeHelloReply(std::span<const std::byte> payload);

// The refusal name sent for a Status code, and back: ESTALE "epoch_older", EACCES
// "unknown_site", EBUSY "vm_busy", EINVAL "definition_mismatch", EPROTO "protocol",
// ENOSPC "no_space", EPERM "not_permitted", EAGAIN "try_again" (a passing state, e.g. a
// role change under way: the shipper retries at its normal pace); anything else "refused"
// (ECONNREFUSED).
std::string_view RefusalName(int code);
int RefusalCode(std::string_view name);

// --- SegmentChunk ------------------------------------------------------------------------

inline constexpr uint32_t kChunkLast = 1;  // the segment ends with this chunk
inline constexpr uint32_t kChunkZstd = 2;  // data is one zstd frame

struct SegmentChunk {
  uint32_t disk_id = 0;
  uint32_t flags = 0;
  uint64_t segment = 0;  // segment number within the disk's log
  uint64_t cycle = 0;
  uint64_t offset = 0;  // within the segment
  uint32_t raw_length = 0;
  std::span<const std::byte> data;  // as sent (compressed or not); borrows the input

  bool last() const { return (flags & kChunkLast) != 0; }
  bool compressed() const { return (flags & kChunkZstd) != 0; }
};
// chunk.data is what goes on the wire; flags must say whether it is compressed.
std::vector<std::byte> EncodeSegmentChunk(const SegmentChunk& chunk);
// A SegmentChunk frame made in place, so that the shipper copies a chunk's data once,
// into the frame (EncodeFrame(EncodeSegmentChunk(...)) copies it twice more): the caller
// puts the data at frame[kSegmentChunkPrefix..], then SealSegmentChunkFrame writes the
// frame header, the chunk header and the frame's CRC in front of it. The result is the
// bytes EncodeFrame(kSegmentChunk, EncodeSegmentChunk(chunk)) would make; chunk.data is
// not read (the data is what the frame holds after the prefix).
inline constexpr size_t kSegmentChunkPrefix = kFrameHeaderSize + kChunkHeaderSize;
void SealSegmentChunkFrame(const SegmentChunk& chunk, std::span<std::byte> frame);
// Refuses a short payload, unknown flags, raw_length above kMaxChunkRaw, an offset that
// overflows with raw_length, and uncompressed data whose size is not raw_length.
Result<SegmentChunk> DecodeSegmentChunk(std::span<const std::byte> payload);

// Chunk compression (zstd level 1). A ChunkCompressor keeps its zstd context between
// chunks; one per thread. Guest data that does not compress (already compressed or
// encrypted files) would cost a zstd pass per chunk for nothing, so after a chunk that
// does not shrink by at least kMinSaving the next kSkipAfterMiss chunks go raw without a
// try; one that compresses again ends the skipping.
class ChunkCompressor {
 public:
  ChunkCompressor();
  ~ChunkCompressor();
  ChunkCompressor(const ChunkCompressor&) = delete;
  ChunkCompressor& operator=(const ChunkCompressor&) = delete;
  // Compresses raw into *out; returns false (out unspecified) when the result would not be
  // smaller than raw, so the caller sends raw.
  bool Compress(std::span<const std::byte> raw, std::vector<std::byte>* out);

  static constexpr double kMinSaving = 0.03;
  static constexpr int kSkipAfterMiss = 15;

 private:
  void* cctx_;    // ZSTD_CCtx
  int skip_ = 0;  // chunks still to send raw without trying
};
// The chunk's bytes, decompressed if needed, into *out (resized to raw_length). Refuses
// (EBADMSG) a zstd frame that is malformed or whose content is not exactly raw_length.
Status ChunkData(const SegmentChunk& chunk, std::vector<std::byte>* out);

// --- CycleEnd, Ack, Heartbeat, Error ------------------------------------------------------

std::vector<std::byte> EncodeCycleEnd(const applier::CycleInfo& cycle);
Result<applier::CycleInfo> DecodeCycleEnd(std::span<const std::byte> payload);

struct Ack {
  uint64_t received_cycle = 0;
  uint64_t applied_cycle = 0;
  int64_t applied_cut_unix_nanos = 0;
  uint64_t pending_bytes = 0;  // received, not yet applied, on the replica
  std::string apply_error;     // truncated to kMaxErrorText
};
std::vector<std::byte> EncodeAck(const Ack& ack);
Result<Ack> DecodeAck(std::span<const std::byte> payload);

struct Heartbeat {
  int64_t unix_nanos = 0;                          // the primary's clock
  int64_t oldest_unapplied_change_unix_nanos = 0;  // 0: everything applied
  uint64_t pending_bytes = 0;                      // sealed, unacknowledged, on the primary
};
std::vector<std::byte> EncodeHeartbeat(const Heartbeat& heartbeat);
Result<Heartbeat> DecodeHeartbeat(std::span<const std::byte> payload);

struct ErrorFrame {
  uint32_t code = 0;   // errno value; 0: a clean goodbye
  std::string reason;  // truncated to kMaxErrorText
};
std::vector<std::byte> EncodeError(const ErrorFrame& error);
Result<ErrorFrame> DecodeError(std::span<const std::byte> payload);

// --- Sync frames ------------------------------------------------------------------------

inline constexpr size_t kHashRequestSize = 16;
inline constexpr size_t kSyncDataHeaderSize = 32;
inline constexpr size_t kSyncAckSize = 16;
inline constexpr size_t kSyncEndSize = 16;
inline constexpr uint32_t kSyncZstd = 1;
inline constexpr uint32_t kSyncZero = 2;

std::vector<std::byte> EncodeSyncBegin(const applier::SyncPlan& plan);
// Refuses malformed JSON, missing fields, unknown kind or mode, no disks.
Result<applier::SyncPlan> DecodeSyncBegin(std::span<const std::byte> payload);

struct SyncReply {
  bool accepted = false;
  applier::SyncResume resume;  // when accepted
  std::string error;           // refusal name (RefusalName), when refused
  std::string message;
};
std::vector<std::byte> EncodeSyncReply(const SyncReply& reply);
Result<SyncReply> DecodeSyncReply(std::span<const std::byte> payload);

struct HashRequest {
  uint32_t disk_id = 0;
  uint32_t count = 0;
  uint64_t offset = 0;
};
std::vector<std::byte> EncodeHashRequest(const HashRequest& request);
// Refuses count 0 or above kMaxHashBlocks, an offset not a multiple of kSyncBlockSize.
Result<HashRequest> DecodeHashRequest(std::span<const std::byte> payload);

struct HashReply {
  uint32_t disk_id = 0;
  uint64_t offset = 0;
  std::vector<uint64_t> hashes;  // at most kMaxHashBlocks
};
std::vector<std::byte> EncodeHashReply(const HashReply& reply);
Result<HashReply> DecodeHashReply(std::span<const std::byte> payload);

struct SyncData {
  uint32_t disk_id = 0;
  uint32_t flags = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t done_to = 0;
  std::span<const std::byte> data;  // as sent (borrowed from the input); empty for kSyncZero

  bool zero() const { return (flags & kSyncZero) != 0; }
  bool compressed() const { return (flags & kSyncZstd) != 0; }
};
std::vector<std::byte> EncodeSyncData(const SyncData& data);
// Refuses unknown flags or both, data with kSyncZero, raw data whose size is not length,
// length above kMaxChunkRaw for data, done_to < offset + length, overflowing offsets.
Result<SyncData> DecodeSyncData(std::span<const std::byte> payload);
// The raw bytes of a data SyncData (decompressed if needed) into *out (resized to length).
Status SyncDataBytes(const SyncData& data, std::vector<std::byte>* out);

struct SyncAck {
  uint32_t disk_id = 0;
  uint64_t done_offset = 0;
};
std::vector<std::byte> EncodeSyncAck(const SyncAck& ack);
Result<SyncAck> DecodeSyncAck(std::span<const std::byte> payload);

struct SyncEnd {
  uint64_t sync_id = 0;
  int64_t cut_unix_nanos = 0;
};
std::vector<std::byte> EncodeSyncEnd(const SyncEnd& end);
Result<SyncEnd> DecodeSyncEnd(std::span<const std::byte> payload);

// --- PeerRequest / PeerReply ------------------------------------------------------------

inline constexpr size_t kMaxPeerMessage = 1u << 20;
// Deeper JSON is refused before it is parsed: nothing that walks a parsed value
// recursively (dump, comparison) can then run out of stack on what a peer sent.
inline constexpr int kMaxPeerMessageDepth = 64;

// The object as compact UTF-8 JSON (invalid UTF-8 in strings is replaced, never thrown).
// Refuses a value that is not an object (EINVAL) or whose text exceeds kMaxPeerMessage or
// kMaxPeerMessageDepth (EMSGSIZE).
Result<std::vector<std::byte>> EncodePeerMessage(const nlohmann::json& message);
// Refuses (EBADMSG, saying why) a payload above kMaxPeerMessage bytes or nested deeper
// than kMaxPeerMessageDepth, text that is not JSON (invalid UTF-8 included), and JSON that
// is not an object.
Result<nlohmann::json> DecodePeerMessage(std::span<const std::byte> payload);

}  // namespace siterep::shipper
