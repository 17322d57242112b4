#include "shipper/wire_format.h"

#include <zstd.h>

#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

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

std::vector<std::byte> JsonBytes(const json& j) {
  const std::string text = j.dump();
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
      type > static_cast<uint16_t>(FrameType::kError)) {
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
  return JsonBytes(j);
}

Result<Hello> DecodeHello(std::span<const std::byte> payload) {
  constexpr std::string_view kWhat = "Hello";
  SR_ASSIGN_OR_RETURN(json j, ParseJsonObject(payload, kWhat));
  Hello h;
  try {
    h.protocol_version = j.at("version").get<uint32_t>();
    h.from = j.at("from").get<std::string>();
    h.to = j.at("to").get<std::string>();
    applier::ReplicaDefinition& d = h.definition;
    d.vm = j.at("vm").get<std::string>();
    d.epoch = j.at("epoch").get<uint64_t>();
    const json& def = j.at("definition");
    d.primary_site = def.at("primary_site").get<std::string>();
    d.recovery_points = def.at("recovery_points").get<int>();
    d.recovery_point_interval_ms = def.at("recovery_point_interval_ms").get<int64_t>();
    d.frequency_ms = def.at("frequency_ms").get<int64_t>();
    const json& disks = def.at("disks");
    if (!disks.is_array()) return Bad(kWhat, "definition.disks is not an array");
    for (const json& disk : disks) {
      d.disks.push_back(applier::DiskDefinition{disk.at("name").get<std::string>(),
                                                disk.at("disk_id").get<uint32_t>(),
                                                disk.at("size").get<uint64_t>()});
    }
  } catch (const json::exception& e) {
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
  // Invalid UTF-8 in a message must not make dump() throw.
  const std::string text = j.dump(-1, ' ', false, json::error_handler_t::replace);
  std::vector<std::byte> out(text.size());
  std::memcpy(out.data(), text.data(), text.size());
  return out;
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
    {EPERM, "not_permitted"},
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

std::vector<std::byte> EncodeSegmentChunk(const SegmentChunk& chunk) {
  std::vector<std::byte> out(kChunkHeaderSize + chunk.data.size());
  std::byte* p = out.data();
  Put32(p, chunk.disk_id);
  Put32(p + 4, chunk.flags);
  Put64(p + 8, chunk.segment);
  Put64(p + 16, chunk.cycle);
  Put64(p + 24, chunk.offset);
  Put32(p + 32, chunk.raw_length);
  if (!chunk.data.empty()) std::memcpy(p + kChunkHeaderSize, chunk.data.data(), chunk.data.size());
  return out;
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
  constexpr std::string_view kWhat = "SegmentChunk";
  if (!chunk.compressed()) {
    out->assign(chunk.data.begin(), chunk.data.end());
    return Status::Ok();
  }
  // The declared content size must be present and exact before anything is allocated.
  const unsigned long long declared =
      ZSTD_getFrameContentSize(chunk.data.data(), chunk.data.size());
  if (declared == ZSTD_CONTENTSIZE_ERROR) return Bad(kWhat, "not a zstd frame");
  if (declared == ZSTD_CONTENTSIZE_UNKNOWN || declared != chunk.raw_length) {
    return Bad(kWhat,
               "zstd frame does not declare the raw length " + std::to_string(chunk.raw_length));
  }
  out->resize(chunk.raw_length);
  const size_t n = ZSTD_decompress(out->data(), out->size(), chunk.data.data(), chunk.data.size());
  if (ZSTD_isError(n)) return Bad(kWhat, std::string("zstd: ") + ZSTD_getErrorName(n));
  if (n != chunk.raw_length) {
    return Bad(kWhat, "decompressed to " + std::to_string(n) + " bytes, expected " +
                          std::to_string(chunk.raw_length));
  }
  return Status::Ok();
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

}  // namespace siterep::shipper
