#include "shipper/wire_format.h"

#include <zstd.h>

#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <utility>

#include "common/crc32c.h"
#include "common/endian.h"

namespace siterep::shipper {
namespace {

using nlohmann::json;

void Put16(std::byte* p, uint16_t v) { StoreLe(p, v); }
void Put32(std::byte* p, uint32_t v) { StoreLe(p, v); }
void Put64(std::byte* p, uint64_t v) { StoreLe(p, v); }
uint16_t Get16(const std::byte* p) { return LoadLe<uint16_t>(p); }
uint32_t Get32(const std::byte* p) { return LoadLe<uint32_t>(p); }
uint64_t Get64(const std::byte* p) { return LoadLe<uint64_t>(p); }

Status Bad(std::string_view what, std::string why) {
  return Status::Corrupt(std::string(what) + ": " + std::move(why));
}

std::string Clip(std::string_view text) {
  return std::string(text.substr(0, std::min(text.size(), kMaxErrorText)));
}

// The same rule as the configuration's names (common/config.cc): these names become file
// and folder names on the replica, so nothing else may pass the link.
bool ValidName(const std::string& name) {
  if (name.empty() || name.size() > 64 || name == "." || name == "..") return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return true;
}

// Invalid UTF-8 in a text (a refusal message) must not make dump() throw: it is replaced.
std::vector<std::byte> JsonBytes(const json& j) {
  const std::string text = j.dump(-1, ' ', false, json::error_handler_t::replace);
  std::vector<std::byte> out(text.size());
  std::memcpy(out.data(), text.data(), text.size());
  return out;
}

// Parses a JSON object without exceptions; the callers catch the type errors of field
// access themselves.
Result<json> ParseJsonObject(std::span<const std::byte> payload, std::string_view what) {
  const char* begin = reinterpret_cast<const char*>(payload.data());
  json j = json::parse(begin, begin + payload.size(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(what, "payload is not valid JSON");
  if (!j.is_object()) return Bad(what, "payload is not a JSON object");
  return j;
}

std::vector<std::byte> EncodeText(uint32_t head_size, std::string_view text) {
  std::vector<std::byte> out(head_size + text.size());
  Put16(out.data() + head_size - 2, static_cast<uint16_t>(text.size()));
  std::memcpy(out.data() + head_size, text.data(), text.size());
  return out;
}

Result<std::string> DecodeText(std::span<const std::byte> payload, size_t length_at,
                               std::string_view what) {
  const size_t length = Get16(payload.data() + length_at);
  const size_t at = length_at + 2;
  if (length > kMaxErrorText) return Bad(what, "text of " + std::to_string(length) + " bytes");
  if (payload.size() != at + length) {
    return Bad(what, "payload of " + std::to_string(payload.size()) + " bytes, expected " +
                         std::to_string(at + length));
  }
  return std::string(reinterpret_cast<const char*>(payload.data() + at), length);
}

Status CheckSize(std::span<const std::byte> payload, size_t size, std::string_view what) {
  if (payload.size() != size) {
    return Bad(what, "payload of " + std::to_string(payload.size()) + " bytes, expected " +
                         std::to_string(size));
  }
  return Status::Ok();
}

// One zstd frame that must decompress to exactly raw_length bytes (at most kMaxChunkRaw,
// checked by the callers' decoders), into *out.
Status Decompress(std::span<const std::byte> frame, uint64_t raw_length, std::string_view what,
                  std::vector<std::byte>* out) {
  // The declared content size must be present and exact before anything is allocated.
  const unsigned long long declared = ZSTD_getFrameContentSize(frame.data(), frame.size());
  if (declared == ZSTD_CONTENTSIZE_ERROR) return Bad(what, "not a zstd frame");
  if (declared == ZSTD_CONTENTSIZE_UNKNOWN || declared != raw_length) {
    return Bad(what, "zstd frame does not declare the raw length " + std::to_string(raw_length));
  }
  out->resize(raw_length);
  const size_t n = ZSTD_decompress(out->data(), out->size(), frame.data(), frame.size());
  if (ZSTD_isError(n)) return Bad(what, std::string("zstd: ") + ZSTD_getErrorName(n));
  if (n != raw_length) {
    return Bad(what, "decompressed to " + std::to_string(n) + " bytes, expected " +
                         std::to_string(raw_length));
  }
  return Status::Ok();
}

// nlohmann's get<> converts a negative or too large number to an unsigned type silently (and
// a float to an integer); the Hello's epoch and sizes and the sync frames' ids and offsets
// must be exactly what was sent (an epoch of -1 must not read as 2^64-1).
struct FieldError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename T>
T Unsigned(const json& j, const char* key) {
  const json& v = j.at(key);
  if (!v.is_number_unsigned()) throw FieldError(std::string(key) + " is not an unsigned integer");
  const uint64_t x = v.get<uint64_t>();
  if (x > std::numeric_limits<T>::max()) throw FieldError(std::string(key) + " is out of range");
  return static_cast<T>(x);
}

template <typename T = int64_t>
T Signed(const json& j, const char* key) {
  const json& v = j.at(key);
  if (!v.is_number_integer()) throw FieldError(std::string(key) + " is not an integer");
  if (v.is_number_unsigned() &&
      v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<T>::max())) {
    throw FieldError(std::string(key) + " is out of range");
  }
  const int64_t x = v.get<int64_t>();
  if constexpr (sizeof(T) < sizeof(int64_t)) {
    if (x < std::numeric_limits<T>::min() || x > std::numeric_limits<T>::max()) {
      throw FieldError(std::string(key) + " is out of range");
    }
  }
  return static_cast<T>(x);
}

std::string Text(const json& j, const char* key) {
  const json& v = j.at(key);
  if (!v.is_string()) throw FieldError(std::string(key) + " is not a string");
  return v.get<std::string>();
}

}  // namespace

std::string_view FrameTypeName(FrameType type) {
  switch (type) {
    case FrameType::kHello:
      return "Hello";
    case FrameType::kHelloReply:
      return "HelloReply";
    case FrameType::kSegmentChunk:
      return "SegmentChunk";
    case FrameType::kCycleEnd:
      return "CycleEnd";
    case FrameType::kAck:
      return "Ack";
    case FrameType::kHeartbeat:
      return "Heartbeat";
    case FrameType::kError:
      return "Error";
    case FrameType::kSyncBegin:
      return "SyncBegin";
    case FrameType::kSyncReply:
      return "SyncReply";
    case FrameType::kHashRequest:
      return "HashRequest";
    case FrameType::kHashReply:
      return "HashReply";
    case FrameType::kSyncData:
      return "SyncData";
    case FrameType::kSyncAck:
      return "SyncAck";
    case FrameType::kSyncEnd:
      return "SyncEnd";
    case FrameType::kPeerRequest:
      return "PeerRequest";
    case FrameType::kPeerReply:
      return "PeerReply";
  }
  return "unknown";
}

// --- Frames ------------------------------------------------------------------------------

Result<FrameHeader> ParseFrameHeader(std::span<const std::byte> in) {
  constexpr std::string_view kWhat = "frame header";
  if (in.size() < kFrameHeaderSize) {
    return Bad(kWhat, "truncated (" + std::to_string(in.size()) + " bytes)");
  }
  const std::byte* p = in.data();
  if (Get32(p) != kFrameMagic) return Bad(kWhat, "bad magic (not a siterep frame)");
  const uint16_t version = Get16(p + 4);
  if (version != kProtocolVersion) {
    return Bad(kWhat, "protocol version " + std::to_string(version) + ", this side speaks " +
                          std::to_string(kProtocolVersion));
  }
  const uint16_t type = Get16(p + 6);
  if (type < static_cast<uint16_t>(FrameType::kHello) ||
      type > static_cast<uint16_t>(kLastFrameType)) {
    return Bad(kWhat, "unknown frame type " + std::to_string(type));
  }
  if (Get32(p + 8) != 0) return Bad(kWhat, "reserved flags are set");
  FrameHeader h;
  h.type = static_cast<FrameType>(type);
  h.payload_length = Get32(p + 12);
  h.crc = Get32(p + 16);
  if (h.payload_length > kMaxFramePayload) {
    return Bad(kWhat, "payload of " + std::to_string(h.payload_length) + " bytes exceeds " +
                          std::to_string(kMaxFramePayload));
  }
  return h;
}

namespace {
void EncodeHeaderInto(FrameType type, std::span<const std::byte> payload, std::byte* out) {
  Put32(out, kFrameMagic);
  Put16(out + 4, kProtocolVersion);
  Put16(out + 6, static_cast<uint16_t>(type));
  Put32(out + 8, 0);
  Put32(out + 12, static_cast<uint32_t>(payload.size()));
  Put32(out + 16, 0);
  const uint32_t crc = Crc32cExtend(Crc32c(out, kFrameHeaderSize), payload.data(), payload.size());
  Put32(out + 16, crc);
}
}  // namespace

Status VerifyFrame(const FrameHeader& header, std::span<const std::byte> payload) {
  if (payload.size() != header.payload_length) {
    return Bad(FrameTypeName(header.type), "payload of " + std::to_string(payload.size()) +
                                               " bytes, header says " +
                                               std::to_string(header.payload_length));
  }
  std::byte head[kFrameHeaderSize];
  EncodeHeaderInto(header.type, payload, head);
  if (Get32(head + 16) != header.crc) return Bad(FrameTypeName(header.type), "CRC mismatch");
  return Status::Ok();
}

std::vector<std::byte> EncodeFrame(FrameType type, std::span<const std::byte> payload) {
  std::vector<std::byte> out(kFrameHeaderSize + payload.size());
  if (!payload.empty()) std::memcpy(out.data() + kFrameHeaderSize, payload.data(), payload.size());
  EncodeHeaderInto(type, payload, out.data());
  return out;
}

Result<FrameHeader> ReadFrame(FunctionRef<Status(std::span<std::byte>)> read_exact,
                              std::vector<std::byte>* payload) {
  std::byte head[kFrameHeaderSize];
  SR_RETURN_IF_ERROR(read_exact(std::span<std::byte>(head, kFrameHeaderSize)));
  SR_ASSIGN_OR_RETURN(FrameHeader header, ParseFrameHeader(head));
  payload->resize(header.payload_length);  // bounded by ParseFrameHeader
  if (header.payload_length > 0) SR_RETURN_IF_ERROR(read_exact(*payload));
  return header;
}

// --- Hello / HelloReply -------------------------------------------------------------------

std::vector<std::byte> EncodeHello(const Hello& hello) {
  const applier::ReplicaDefinition& d = hello.definition;
  json disks = json::array();
  for (const applier::DiskDefinition& disk : d.disks) {
    disks.push_back({{"name", disk.name}, {"disk_id", disk.disk_id}, {"size", disk.size}});
  }
  json j = {{"version", hello.protocol_version},
            {"from", hello.from},
            {"to", hello.to},
            {"vm", d.vm},
            {"epoch", d.epoch},
            {"definition",
             {{"primary_site", d.primary_site},
              {"disks", std::move(disks)},
              {"recovery_points", d.recovery_points},
              {"recovery_point_interval_ms", d.recovery_point_interval_ms},
              {"frequency_ms", d.frequency_ms}}}};
  if (!d.consistency_group.empty()) j["definition"]["consistency_group"] = d.consistency_group;
  return JsonBytes(j);
}

Result<Hello> DecodeHello(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "Hello";
  SR_ASSIGN_OR_RETURN(json j, ParseJsonObject(payload, kWhat));
  Hello h;
  try {
    h.protocol_version = Unsigned<uint32_t>(j, "version");
    h.from = j.at("from").get<std::string>();
    h.to = j.at("to").get<std::string>();
    applier::ReplicaDefinition& d = h.definition;
    d.vm = j.at("vm").get<std::string>();
    d.epoch = Unsigned<uint64_t>(j, "epoch");
    const json& def = j.at("definition");
    d.primary_site = def.at("primary_site").get<std::string>();
    d.recovery_points = Signed<int>(def, "recovery_points");
    d.recovery_point_interval_ms = Signed(def, "recovery_point_interval_ms");
    d.frequency_ms = Signed(def, "frequency_ms");
    if (def.contains("consistency_group")) {
      d.consistency_group = def.at("consistency_group").get<std::string>();
    }
    const json& disks = def.at("disks");
    if (!disks.is_array()) return Bad(kWhat, "definition.disks is not an array");
    for (const json& disk : disks) {
      d.disks.push_back(applier::DiskDefinition{disk.at("name").get<std::string>(),
                                                Unsigned<uint32_t>(disk, "disk_id"),
                                                Unsigned<uint64_t>(disk, "size")});
    }
  } catch (const json::exception& e) {
    return Bad(kWhat, std::string("malformed: ") + e.what());
  } catch (const FieldError& e) {
    return Bad(kWhat, std::string("malformed: ") + e.what());
  }
  if (!ValidName(h.from)) return Bad(kWhat, "invalid site name \"" + Clip(h.from) + "\"");
  if (!ValidName(h.to)) return Bad(kWhat, "invalid site name \"" + Clip(h.to) + "\"");
  if (!ValidName(h.definition.vm)) {
    return Bad(kWhat, "invalid VM name \"" + Clip(h.definition.vm) + "\"");
  }
  if (!h.definition.primary_site.empty() && !ValidName(h.definition.primary_site)) {
    return Bad(kWhat, "invalid primary site name \"" + Clip(h.definition.primary_site) + "\"");
  }
  if (!h.definition.consistency_group.empty() && !ValidName(h.definition.consistency_group)) {
    return Bad(kWhat, "invalid consistency group \"" + Clip(h.definition.consistency_group) + "\"");
  }
  if (h.definition.disks.empty()) return Bad(kWhat, "VM " + h.definition.vm + " has no disks");
  for (const applier::DiskDefinition& disk : h.definition.disks) {
    if (!ValidName(disk.name)) return Bad(kWhat, "invalid disk name \"" + Clip(disk.name) + "\"");
  }
  return h;
}

std::vector<std::byte> EncodeHelloReply(const HelloReply& reply) {
  json j;
  j["accepted"] = reply.accepted;
  if (reply.accepted) {
    const applier::ReplicaPosition& p = reply.position;
    j["position"] = {{"epoch", p.epoch},
                     {"received_cycle", p.received_cycle},
                     {"applied_cycle", p.applied_cycle},
                     {"applied_cut_unix_nanos", p.applied_cut_unix_nanos},
                     {"pending_bytes", p.pending_bytes},
                     {"apply_error", Clip(p.apply_error)}};
  } else {
    j["error"] = reply.error;
    j["message"] = Clip(reply.message);
  }
  return JsonBytes(j);
}

Result<HelloReply> DecodeHelloReply(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "HelloReply";
  SR_ASSIGN_OR_RETURN(json j, ParseJsonObject(payload, kWhat));
  HelloReply r;
  try {
    r.accepted = j.at("accepted").get<bool>();
    if (r.accepted) {
      const json& p = j.at("position");
      r.position.epoch = p.at("epoch").get<uint64_t>();
      r.position.received_cycle = p.at("received_cycle").get<uint64_t>();
      r.position.applied_cycle = p.at("applied_cycle").get<uint64_t>();
      r.position.applied_cut_unix_nanos = p.at("applied_cut_unix_nanos").get<int64_t>();
      r.position.pending_bytes = p.at("pending_bytes").get<uint64_t>();
      r.position.apply_error = Clip(p.at("apply_error").get<std::string>());
    } else {
      r.error = Clip(j.at("error").get<std::string>());
      r.message = Clip(j.at("message").get<std::string>());
    }
  } catch (const json::exception& e) {
    return Bad(kWhat, std::string("malformed: ") + e.what());
  }
  return r;
}

namespace {
struct RefusalEntry {
  int code;
  std::string_view name;
};
constexpr RefusalEntry kRefusals[] = {
    {ESTALE, "epoch_older"},         {EACCES, "unknown_site"}, {EBUSY, "vm_busy"},
    {EINVAL, "definition_mismatch"}, {EPROTO, "protocol"},     {ENOSPC, "no_space"},
    {EPERM, "not_permitted"},       {EAGAIN, "try_again"},
};
}  // namespace

std::string_view RefusalName(int code) {
  for (const RefusalEntry& e : kRefusals) {
    if (e.code == code) return e.name;
  }
  return "refused";
}

int RefusalCode(std::string_view name) {
  for (const RefusalEntry& e : kRefusals) {
    if (e.name == name) return e.code;
  }
  return ECONNREFUSED;
}

// --- SegmentChunk -------------------------------------------------------------------------

namespace {

void PutChunkHeader(const SegmentChunk& chunk, std::byte* p) {
  Put32(p, chunk.disk_id);
  Put32(p + 4, chunk.flags);
  Put64(p + 8, chunk.segment);
  Put64(p + 16, chunk.cycle);
  Put64(p + 24, chunk.offset);
  Put32(p + 32, chunk.raw_length);
}

}  // namespace

std::vector<std::byte> EncodeSegmentChunk(const SegmentChunk& chunk) {
  std::vector<std::byte> out(kChunkHeaderSize + chunk.data.size());
  PutChunkHeader(chunk, out.data());
  if (!chunk.data.empty()) {
    std::memcpy(out.data() + kChunkHeaderSize, chunk.data.data(), chunk.data.size());
  }
  return out;
}

void SealSegmentChunkFrame(const SegmentChunk& chunk, std::span<std::byte> frame) {
  PutChunkHeader(chunk, frame.data() + kFrameHeaderSize);
  EncodeHeaderInto(FrameType::kSegmentChunk, frame.subspan(kFrameHeaderSize), frame.data());
}

Result<SegmentChunk> DecodeSegmentChunk(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "SegmentChunk";
  if (payload.size() < kChunkHeaderSize) {
    return Bad(kWhat, "truncated (" + std::to_string(payload.size()) + " bytes)");
  }
  const std::byte* p = payload.data();
  SegmentChunk c;
  c.disk_id = Get32(p);
  c.flags = Get32(p + 4);
  c.segment = Get64(p + 8);
  c.cycle = Get64(p + 16);
  c.offset = Get64(p + 24);
  c.raw_length = Get32(p + 32);
  c.data = payload.subspan(kChunkHeaderSize);
  if ((c.flags & ~(kChunkLast | kChunkZstd)) != 0) {
    return Bad(kWhat, "unknown flags " + std::to_string(c.flags));
  }
  if (c.raw_length > kMaxChunkRaw) {
    return Bad(kWhat, "raw length " + std::to_string(c.raw_length) + " exceeds " +
                          std::to_string(kMaxChunkRaw));
  }
  if (c.offset > std::numeric_limits<uint64_t>::max() - c.raw_length) {
    return Bad(kWhat, "offset " + std::to_string(c.offset) + " overflows");
  }
  if (!c.compressed() && c.data.size() != c.raw_length) {
    return Bad(kWhat, "raw chunk of " + std::to_string(c.data.size()) + " bytes, header says " +
                          std::to_string(c.raw_length));
  }
  if (c.compressed() && c.data.empty()) return Bad(kWhat, "compressed chunk without data");
  return c;
}

ChunkCompressor::ChunkCompressor() : cctx_(ZSTD_createCCtx()) {
  if (cctx_ != nullptr) {
    ZSTD_CCtx_setParameter(static_cast<ZSTD_CCtx*>(cctx_), ZSTD_c_compressionLevel, 1);
  }
}

ChunkCompressor::~ChunkCompressor() { ZSTD_freeCCtx(static_cast<ZSTD_CCtx*>(cctx_)); }

bool ChunkCompressor::Compress(std::span<const std::byte> raw, std::vector<std::byte>* out) {
  if (cctx_ == nullptr || raw.empty()) return false;
  if (skip_ > 0) {
    --skip_;
    return false;
  }
  // Only a result clearly smaller than raw is worth sending; zstd stops with an error when
  // the output buffer is too small, which is exactly that answer.
  const size_t limit = static_cast<size_t>(static_cast<double>(raw.size()) * (1.0 - kMinSaving));
  if (limit == 0) return false;
  out->resize(limit);
  const size_t n = ZSTD_compress2(static_cast<ZSTD_CCtx*>(cctx_), out->data(), out->size(),
                                  raw.data(), raw.size());
  if (ZSTD_isError(n)) {
    // The context may be mid-frame after an error; reset it for the next chunk.
    ZSTD_CCtx_reset(static_cast<ZSTD_CCtx*>(cctx_), ZSTD_reset_session_only);
    skip_ = kSkipAfterMiss;
    return false;
  }
  out->resize(n);
  return true;
}

Status ChunkData(const SegmentChunk& chunk, std::vector<std::byte>* out) {
  if (!chunk.compressed()) {
    out->assign(chunk.data.begin(), chunk.data.end());
    return Status::Ok();
  }
  return Decompress(chunk.data, chunk.raw_length, "SegmentChunk", out);
}

// --- CycleEnd, Ack, Heartbeat, Error ----------------------------------------------------

std::vector<std::byte> EncodeCycleEnd(const applier::CycleInfo& cycle) {
  std::vector<std::byte> out(kCycleEndSize);
  Put64(out.data(), cycle.cycle);
  Put64(out.data() + 8, static_cast<uint64_t>(cycle.cut_unix_nanos));
  Put64(out.data() + 16, static_cast<uint64_t>(cycle.first_change_unix_nanos));
  return out;
}

Result<applier::CycleInfo> DecodeCycleEnd(std::span<const std::byte> payload) {
  SR_RETURN_IF_ERROR(CheckSize(payload, kCycleEndSize, "CycleEnd"));
  applier::CycleInfo c;
  c.cycle = Get64(payload.data());
  c.cut_unix_nanos = static_cast<int64_t>(Get64(payload.data() + 8));
  c.first_change_unix_nanos = static_cast<int64_t>(Get64(payload.data() + 16));
  return c;
}

std::vector<std::byte> EncodeAck(const Ack& ack) {
  std::vector<std::byte> out = EncodeText(kAckFixedSize, Clip(ack.apply_error));
  Put64(out.data(), ack.received_cycle);
  Put64(out.data() + 8, ack.applied_cycle);
  Put64(out.data() + 16, static_cast<uint64_t>(ack.applied_cut_unix_nanos));
  Put64(out.data() + 24, ack.pending_bytes);
  return out;
}

Result<Ack> DecodeAck(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "Ack";
  if (payload.size() < kAckFixedSize) {
    return Bad(kWhat, "truncated (" + std::to_string(payload.size()) + " bytes)");
  }
  Ack a;
  a.received_cycle = Get64(payload.data());
  a.applied_cycle = Get64(payload.data() + 8);
  a.applied_cut_unix_nanos = static_cast<int64_t>(Get64(payload.data() + 16));
  a.pending_bytes = Get64(payload.data() + 24);
  SR_ASSIGN_OR_RETURN(a.apply_error, DecodeText(payload, kAckFixedSize - 2, kWhat));
  return a;
}

std::vector<std::byte> EncodeHeartbeat(const Heartbeat& heartbeat) {
  std::vector<std::byte> out(kHeartbeatSize);
  Put64(out.data(), static_cast<uint64_t>(heartbeat.unix_nanos));
  Put64(out.data() + 8, static_cast<uint64_t>(heartbeat.oldest_unapplied_change_unix_nanos));
  Put64(out.data() + 16, heartbeat.pending_bytes);
  return out;
}

Result<Heartbeat> DecodeHeartbeat(std::span<const std::byte> payload) {
  SR_RETURN_IF_ERROR(CheckSize(payload, kHeartbeatSize, "Heartbeat"));
  Heartbeat h;
  h.unix_nanos = static_cast<int64_t>(Get64(payload.data()));
  h.oldest_unapplied_change_unix_nanos = static_cast<int64_t>(Get64(payload.data() + 8));
  h.pending_bytes = Get64(payload.data() + 16);
  return h;
}

std::vector<std::byte> EncodeError(const ErrorFrame& error) {
  constexpr uint32_t kFixed = 6;
  std::vector<std::byte> out = EncodeText(kFixed, Clip(error.reason));
  Put32(out.data(), error.code);
  return out;
}

Result<ErrorFrame> DecodeError(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "Error";
  if (payload.size() < 6)
    return Bad(kWhat, "truncated (" + std::to_string(payload.size()) + " bytes)");
  ErrorFrame e;
  e.code = Get32(payload.data());
  SR_ASSIGN_OR_RETURN(e.reason, DecodeText(payload, 4, kWhat));
  return e;
}

// --- Sync frames ----------------------------------------------------------------------------

namespace {

constexpr std::pair<applier::SyncKind, std::string_view> kSyncKinds[] = {
    {applier::SyncKind::kInitial, "initial"},
    {applier::SyncKind::kSeeded, "seeded"},
    {applier::SyncKind::kResync, "resync"},
};
constexpr std::pair<applier::SyncMode, std::string_view> kSyncModes[] = {
    {applier::SyncMode::kCopy, "copy"},
    {applier::SyncMode::kCompare, "compare"},
};

// The wire's kind names, the same as applier::SyncKindName's (which lives in the applier;
// this file stays free of it so that the fuzz harness builds from the parsers alone).
std::string_view KindName(applier::SyncKind kind) {
  for (const auto& [k, name] : kSyncKinds) {
    if (k == kind) return name;
  }
  return "unknown";
}

std::string_view SyncModeName(applier::SyncMode mode) {
  for (const auto& [m, name] : kSyncModes) {
    if (m == mode) return name;
  }
  return "unknown";
}

// [offset, offset + count blocks) must be addressable: offset block-aligned, no overflow.
Status CheckHashRange(uint64_t offset, uint64_t count, std::string_view what) {
  if (offset % applier::kSyncBlockSize != 0) {
    return Bad(what, "offset " + std::to_string(offset) + " is not a multiple of " +
                         std::to_string(applier::kSyncBlockSize));
  }
  if (offset > std::numeric_limits<uint64_t>::max() - count * applier::kSyncBlockSize) {
    return Bad(what, "offset " + std::to_string(offset) + " overflows");
  }
  return Status::Ok();
}

Status CheckHashCount(uint64_t count, std::string_view what) {
  if (count == 0 || count > applier::kMaxHashBlocks) {
    return Bad(what, "count " + std::to_string(count) + " outside [1, " +
                         std::to_string(applier::kMaxHashBlocks) + "]");
  }
  return Status::Ok();
}

}  // namespace

std::vector<std::byte> EncodeSyncBegin(const applier::SyncPlan& plan) {
  json disks = json::array();
  for (const applier::SyncDiskPlan& d : plan.disks) {
    disks.push_back({{"disk_id", d.disk_id},
                     {"mode", SyncModeName(d.mode)},
                     {"last_seq", d.last_seq},
                     {"last_segment", d.last_segment},
                     {"bytes_total", d.bytes_total}});
  }
  json j = {{"sync_id", plan.sync_id},
            {"kind", KindName(plan.kind)},
            {"cut_unix_nanos", plan.cut_unix_nanos},
            {"epoch", plan.epoch},
            {"disks", std::move(disks)}};
  return JsonBytes(j);
}

Result<applier::SyncPlan> DecodeSyncBegin(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "SyncBegin";
  SR_ASSIGN_OR_RETURN(json j, ParseJsonObject(payload, kWhat));
  applier::SyncPlan plan;
  try {
    plan.sync_id = Unsigned<uint64_t>(j, "sync_id");
    const std::string kind = Text(j, "kind");
    bool known = false;
    for (const auto& [k, name] : kSyncKinds) {
      if (name == kind) {
        plan.kind = k;
        known = true;
      }
    }
    if (!known) return Bad(kWhat, "unknown kind \"" + Clip(kind) + "\"");
    plan.cut_unix_nanos = Signed(j, "cut_unix_nanos");
    plan.epoch = Unsigned<uint64_t>(j, "epoch");
    const json& disks = j.at("disks");
    if (!disks.is_array()) return Bad(kWhat, "disks is not an array");
    for (const json& disk : disks) {
      applier::SyncDiskPlan d;
      d.disk_id = Unsigned<uint32_t>(disk, "disk_id");
      const std::string mode = Text(disk, "mode");
      known = false;
      for (const auto& [m, name] : kSyncModes) {
        if (name == mode) {
          d.mode = m;
          known = true;
        }
      }
      if (!known) return Bad(kWhat, "unknown mode \"" + Clip(mode) + "\"");
      d.last_seq = Unsigned<uint64_t>(disk, "last_seq");
      d.last_segment = Unsigned<uint64_t>(disk, "last_segment");
      d.bytes_total = Unsigned<uint64_t>(disk, "bytes_total");
      plan.disks.push_back(d);
    }
  } catch (const json::exception& e) {
    return Bad(kWhat, std::string("malformed: ") + e.what());
  } catch (const FieldError& e) {
    return Bad(kWhat, std::string("malformed: ") + e.what());
  }
  if (plan.disks.empty())
    return Bad(kWhat, "sync " + std::to_string(plan.sync_id) + " has no disks");
  return plan;
}

std::vector<std::byte> EncodeSyncReply(const SyncReply& reply) {
  json j;
  j["accepted"] = reply.accepted;
  if (reply.accepted) {
    json disks = json::array();
    for (const applier::SyncDiskResume& d : reply.resume.disks) {
      disks.push_back({{"disk_id", d.disk_id},
                       {"done_offset", d.done_offset},
                       {"written_until", d.written_until}});
    }
    j["disks"] = std::move(disks);
  } else {
    j["error"] = Clip(reply.error);
    j["message"] = Clip(reply.message);
  }
  return JsonBytes(j);
}

Result<SyncReply> DecodeSyncReply(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "SyncReply";
  SR_ASSIGN_OR_RETURN(json j, ParseJsonObject(payload, kWhat));
  SyncReply r;
  try {
    r.accepted = j.at("accepted").get<bool>();
    if (r.accepted) {
      const json& disks = j.at("disks");
      if (!disks.is_array()) return Bad(kWhat, "disks is not an array");
      for (const json& disk : disks) {
        r.resume.disks.push_back(applier::SyncDiskResume{
            Unsigned<uint32_t>(disk, "disk_id"), Unsigned<uint64_t>(disk, "done_offset"),
            Unsigned<uint64_t>(disk, "written_until")});
      }
    } else {
      r.error = Clip(Text(j, "error"));
      r.message = Clip(Text(j, "message"));
    }
  } catch (const json::exception& e) {
    return Bad(kWhat, std::string("malformed: ") + e.what());
  } catch (const FieldError& e) {
    return Bad(kWhat, std::string("malformed: ") + e.what());
  }
  return r;
}

std::vector<std::byte> EncodeHashRequest(const HashRequest& request) {
  std::vector<std::byte> out(kHashRequestSize);
  Put32(out.data(), request.disk_id);
  Put32(out.data() + 4, request.count);
  Put64(out.data() + 8, request.offset);
  return out;
}

Result<HashRequest> DecodeHashRequest(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "HashRequest";
  SR_RETURN_IF_ERROR(CheckSize(payload, kHashRequestSize, kWhat));
  HashRequest r;
  r.disk_id = Get32(payload.data());
  r.count = Get32(payload.data() + 4);
  r.offset = Get64(payload.data() + 8);
  SR_RETURN_IF_ERROR(CheckHashCount(r.count, kWhat));
  SR_RETURN_IF_ERROR(CheckHashRange(r.offset, r.count, kWhat));
  return r;
}

std::vector<std::byte> EncodeHashReply(const HashReply& reply) {
  std::vector<std::byte> out(16 + 8 * reply.hashes.size());
  Put32(out.data(), reply.disk_id);
  Put32(out.data() + 4, static_cast<uint32_t>(reply.hashes.size()));
  Put64(out.data() + 8, reply.offset);
  for (size_t i = 0; i < reply.hashes.size(); ++i) Put64(out.data() + 16 + 8 * i, reply.hashes[i]);
  return out;
}

Result<HashReply> DecodeHashReply(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "HashReply";
  if (payload.size() < 16) {
    return Bad(kWhat, "truncated (" + std::to_string(payload.size()) + " bytes)");
  }
  HashReply r;
  r.disk_id = Get32(payload.data());
  const uint32_t count = Get32(payload.data() + 4);
  r.offset = Get64(payload.data() + 8);
  SR_RETURN_IF_ERROR(CheckHashCount(count, kWhat));
  SR_RETURN_IF_ERROR(CheckSize(payload, 16 + 8 * size_t{count}, kWhat));
  SR_RETURN_IF_ERROR(CheckHashRange(r.offset, count, kWhat));
  r.hashes.resize(count);
  for (uint32_t i = 0; i < count; ++i) r.hashes[i] = Get64(payload.data() + 16 + 8 * size_t{i});
  return r;
}

std::vector<std::byte> EncodeSyncData(const SyncData& data) {
  std::vector<std::byte> out(kSyncDataHeaderSize + data.data.size());
  std::byte* p = out.data();
  Put32(p, data.disk_id);
  Put32(p + 4, data.flags);
  Put64(p + 8, data.offset);
  Put64(p + 16, data.length);
  Put64(p + 24, data.done_to);
  if (!data.data.empty()) std::memcpy(p + kSyncDataHeaderSize, data.data.data(), data.data.size());
  return out;
}

Result<SyncData> DecodeSyncData(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "SyncData";
  if (payload.size() < kSyncDataHeaderSize) {
    return Bad(kWhat, "truncated (" + std::to_string(payload.size()) + " bytes)");
  }
  const std::byte* p = payload.data();
  SyncData d;
  d.disk_id = Get32(p);
  d.flags = Get32(p + 4);
  d.offset = Get64(p + 8);
  d.length = Get64(p + 16);
  d.done_to = Get64(p + 24);
  d.data = payload.subspan(kSyncDataHeaderSize);
  if ((d.flags & ~(kSyncZstd | kSyncZero)) != 0) {
    return Bad(kWhat, "unknown flags " + std::to_string(d.flags));
  }
  if (d.zero() && d.compressed()) return Bad(kWhat, "both zero and compressed");
  if (d.offset > std::numeric_limits<uint64_t>::max() - d.length) {
    return Bad(kWhat, "offset " + std::to_string(d.offset) + " + length " +
                          std::to_string(d.length) + " overflows");
  }
  if (d.done_to < d.offset + d.length) {
    return Bad(kWhat, "done_to " + std::to_string(d.done_to) + " below the end of the data " +
                          std::to_string(d.offset + d.length));
  }
  if (d.zero()) {
    if (!d.data.empty()) {
      return Bad(kWhat, "zero extent carries " + std::to_string(d.data.size()) + " bytes");
    }
    return d;
  }
  if (d.length > kMaxChunkRaw) {
    return Bad(kWhat,
               "length " + std::to_string(d.length) + " exceeds " + std::to_string(kMaxChunkRaw));
  }
  if (!d.compressed() && d.data.size() != d.length) {
    return Bad(kWhat, "raw data of " + std::to_string(d.data.size()) + " bytes, header says " +
                          std::to_string(d.length));
  }
  if (d.compressed() && d.data.empty()) return Bad(kWhat, "compressed data without a frame");
  return d;
}

Status SyncDataBytes(const SyncData& data, std::vector<std::byte>* out) {
  constexpr std::string_view kWhat = "SyncData";
  if (data.zero()) return Status::Invalid("SyncData: a zero extent has no bytes");
  if (!data.compressed()) {
    out->assign(data.data.begin(), data.data.end());
    return Status::Ok();
  }
  // Decode refuses length > kMaxChunkRaw; a hand-built SyncData must not allocate more.
  if (data.length > kMaxChunkRaw) {
    return Bad(kWhat, "length " + std::to_string(data.length) + " exceeds " +
                          std::to_string(kMaxChunkRaw));
  }
  return Decompress(data.data, data.length, kWhat, out);
}

std::vector<std::byte> EncodeSyncAck(const SyncAck& ack) {
  std::vector<std::byte> out(kSyncAckSize);
  Put32(out.data(), ack.disk_id);
  Put32(out.data() + 4, 0);
  Put64(out.data() + 8, ack.done_offset);
  return out;
}

Result<SyncAck> DecodeSyncAck(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "SyncAck";
  SR_RETURN_IF_ERROR(CheckSize(payload, kSyncAckSize, kWhat));
  if (Get32(payload.data() + 4) != 0) return Bad(kWhat, "reserved field is not zero");
  SyncAck a;
  a.disk_id = Get32(payload.data());
  a.done_offset = Get64(payload.data() + 8);
  return a;
}

std::vector<std::byte> EncodeSyncEnd(const SyncEnd& end) {
  std::vector<std::byte> out(kSyncEndSize);
  Put64(out.data(), end.sync_id);
  Put64(out.data() + 8, static_cast<uint64_t>(end.cut_unix_nanos));
  return out;
}

Result<SyncEnd> DecodeSyncEnd(std::span<const std::byte> payload) {
  SR_RETURN_IF_ERROR(CheckSize(payload, kSyncEndSize, "SyncEnd"));
  SyncEnd e;
  e.sync_id = Get64(payload.data());
  e.cut_unix_nanos = static_cast<int64_t>(Get64(payload.data() + 8));
  return e;
}

// --- PeerRequest / PeerReply ------------------------------------------------------------

namespace {
// True when the JSON text nests arrays and objects deeper than limit. Brackets inside
// strings do not count; for text that is not JSON the answer does not matter (the parser
// refuses it).
bool NestedDeeperThan(std::string_view text, int limit) {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}
}  // namespace

Result<std::vector<std::byte>> EncodePeerMessage(const json& message) {
  if (!message.is_object()) {
    return Status::Invalid(std::string("peer message: a JSON object is needed, not ") +
                           message.type_name());
  }
  std::vector<std::byte> out = JsonBytes(message);
  if (out.size() > kMaxPeerMessage) {
    return Status::Error(EMSGSIZE, "peer message: " + std::to_string(out.size()) +
                                       " bytes of JSON, at most " +
                                       std::to_string(kMaxPeerMessage) + " may be sent");
  }
  if (NestedDeeperThan(std::string_view(reinterpret_cast<const char*>(out.data()), out.size()),
                       kMaxPeerMessageDepth)) {
    return Status::Error(EMSGSIZE, "peer message: nested deeper than " +
                                       std::to_string(kMaxPeerMessageDepth) + " levels");
  }
  return out;
}

Result<json> DecodePeerMessage(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "peer message";
  if (payload.size() > kMaxPeerMessage) {
    return Bad(kWhat, "payload of " + std::to_string(payload.size()) + " bytes exceeds " +
                          std::to_string(kMaxPeerMessage));
  }
  if (NestedDeeperThan(
          std::string_view(reinterpret_cast<const char*>(payload.data()), payload.size()),
          kMaxPeerMessageDepth)) {
    return Bad(kWhat,
               "JSON nested deeper than " + std::to_string(kMaxPeerMessageDepth) + " levels");
  }
  return ParseJsonObject(payload, kWhat);
}

}  // namespace siterep::shipper
