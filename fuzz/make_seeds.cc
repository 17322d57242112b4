// Writes the seed corpus of the fuzz harnesses with the project's own encoders, so the
// seeds always match the current formats: make_seeds DIR writes DIR/log_record/* and
// DIR/wire_frame/*.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "shipper/wire_format.h"
#include "tracker/log_format.h"

namespace fs = std::filesystem;
using namespace siterep;

namespace {

void Write(const fs::path& p, const std::vector<std::byte>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

std::vector<std::byte> Record(tracker::RecordKind kind, uint64_t seq, uint64_t offset,
                              std::vector<std::byte> payload, uint64_t length) {
  tracker::RecordHeader h;
  h.kind = kind;
  h.disk_id = tracker::DiskIdFor("vm1", "d0");
  h.epoch = 1;
  h.seq = seq;
  h.offset = offset;
  h.length = length;
  std::vector<std::byte> out(tracker::kHeaderSize);
  tracker::EncodeHeader(
      h, payload, std::span<std::byte, tracker::kHeaderSize>(out.data(), tracker::kHeaderSize));
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

std::vector<std::byte> Cut(uint64_t seq, uint64_t cycle) {
  std::vector<std::byte> p(tracker::kCutPayloadSize);
  tracker::EncodeCutPayload({cycle, 1'700'000'000'000'000'000, 1'699'999'999'000'000'000},
                            std::span<std::byte, tracker::kCutPayloadSize>(p.data(), p.size()));
  return Record(tracker::RecordKind::kCut, seq, 0, p, tracker::kCutPayloadSize);
}

void Append(std::vector<std::byte>* a, const std::vector<std::byte>& b) {
  a->insert(a->end(), b.begin(), b.end());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds DIR\n");
    return 2;
  }
  const fs::path dir = argv[1];
  fs::create_directories(dir / "log_record");
  fs::create_directories(dir / "wire_frame");

  std::vector<std::byte> data(512, std::byte{0x61});
  std::vector<std::byte> seg;
  Append(&seg, Record(tracker::RecordKind::kWrite, 1, 4096, data, data.size()));
  Append(&seg, Record(tracker::RecordKind::kDiscard, 2, 8192, {}, 65536));
  Append(&seg, Cut(3, 1));
  Write(dir / "log_record" / "segment", seg);
  Write(dir / "log_record" / "write", Record(tracker::RecordKind::kWrite, 7, 0, data, data.size()));
  Write(dir / "log_record" / "cut", Cut(9, 4));

  using namespace shipper;
  Hello hello;
  hello.from = "east";
  hello.to = "west";
  hello.definition.vm = "vm1";
  hello.definition.primary_site = "east";
  hello.definition.disks = {{"d0", tracker::DiskIdFor("vm1", "d0"), 1 << 20}};
  HelloReply reply;
  reply.accepted = true;
  SegmentChunk chunk;
  chunk.disk_id = tracker::DiskIdFor("vm1", "d0");
  chunk.flags = kChunkLast;
  chunk.segment = 1;
  chunk.cycle = 1;
  chunk.raw_length = static_cast<uint32_t>(seg.size());
  chunk.data = seg;
  std::vector<std::byte> compressed;
  std::vector<std::byte> zeros(64 << 10);
  ChunkCompressor compressor;
  const bool packed = compressor.Compress(zeros, &compressed);
  SegmentChunk zchunk = chunk;
  zchunk.flags = packed ? kChunkZstd : 0;
  zchunk.raw_length = static_cast<uint32_t>(zeros.size());
  zchunk.data = packed ? std::span<const std::byte>(compressed) : std::span<const std::byte>(zeros);
  Ack ack;
  ack.received_cycle = 3;
  ack.applied_cycle = 2;
  applier::SyncPlan plan;
  plan.sync_id = 4;
  plan.kind = applier::SyncKind::kResync;
  plan.cut_unix_nanos = 1'700'000'000'000'000'000;
  plan.epoch = 1;
  plan.disks = {{chunk.disk_id, applier::SyncMode::kCompare, 3, 1, 1 << 20}};
  SyncReply sync_accepted;
  sync_accepted.accepted = true;
  sync_accepted.resume.disks = {{chunk.disk_id, 64 << 10, 1 << 20}};
  SyncReply sync_refused;
  sync_refused.error = "no_space";
  sync_refused.message = "replica needs 1 MiB";
  HashReply hashes;
  hashes.disk_id = chunk.disk_id;
  hashes.offset = applier::kSyncBlockSize;
  hashes.hashes = {0x0123456789abcdef, 0xfedcba9876543210};
  SyncData sync_raw;
  sync_raw.disk_id = chunk.disk_id;
  sync_raw.offset = 4096;
  sync_raw.length = data.size();
  sync_raw.done_to = 4096 + data.size();
  sync_raw.data = data;
  SyncData sync_zstd = sync_raw;
  sync_zstd.flags = packed ? kSyncZstd : 0;
  sync_zstd.length = zeros.size();
  sync_zstd.done_to = sync_zstd.offset + zeros.size();
  sync_zstd.data = zchunk.data;
  SyncData sync_zero;
  sync_zero.disk_id = chunk.disk_id;
  sync_zero.flags = kSyncZero;
  sync_zero.offset = 1 << 20;
  sync_zero.length = 1 << 30;
  sync_zero.done_to = (1 << 20) + (1 << 30);
  std::vector<std::byte> stream;
  const std::pair<FrameType, std::vector<std::byte>> frames[] = {
      {FrameType::kHello, EncodeHello(hello)},
      {FrameType::kHelloReply, EncodeHelloReply(reply)},
      {FrameType::kSegmentChunk, EncodeSegmentChunk(chunk)},
      {FrameType::kSegmentChunk, EncodeSegmentChunk(zchunk)},
      {FrameType::kCycleEnd, EncodeCycleEnd({1, 1'700'000'000'000'000'000, 0})},
      {FrameType::kAck, EncodeAck(ack)},
      {FrameType::kHeartbeat, EncodeHeartbeat({1, 0, 0})},
      {FrameType::kError, EncodeError({5, "bye"})},
      {FrameType::kSyncBegin, EncodeSyncBegin(plan)},
      {FrameType::kSyncReply, EncodeSyncReply(sync_accepted)},
      {FrameType::kSyncReply, EncodeSyncReply(sync_refused)},
      {FrameType::kHashRequest, EncodeHashRequest({chunk.disk_id, 2, applier::kSyncBlockSize})},
      {FrameType::kHashReply, EncodeHashReply(hashes)},
      {FrameType::kSyncData, EncodeSyncData(sync_raw)},
      {FrameType::kSyncData, EncodeSyncData(sync_zstd)},
      {FrameType::kSyncData, EncodeSyncData(sync_zero)},
      {FrameType::kSyncAck, EncodeSyncAck({chunk.disk_id, 64 << 10})},
      {FrameType::kSyncEnd, EncodeSyncEnd({4, 1'700'000'000'000'000'000})},
      {FrameType::kPeerRequest,
       EncodePeerMessage({{"op", "promote"}, {"vm", "vm1"}, {"epoch", 3}, {"through_cycle", 9}})
           .value()},
      {FrameType::kPeerReply, EncodePeerMessage({{"ok", true}, {"result", {{"epoch", 3}}}}).value()},
  };
  int n = 0;
  for (const auto& [type, payload] : frames) {
    std::vector<std::byte> frame = EncodeFrame(type, payload);
    Write(dir / "wire_frame" / ("frame" + std::to_string(n++)), frame);
    Append(&stream, frame);
  }
  Write(dir / "wire_frame" / "stream", stream);

  // control_input: the first byte picks the parser (0 plan TOML, 1 plan JSON, 2 ranges).
  fs::create_directories(dir / "control_input");
  auto text = [](char kind, std::string_view body) {
    std::vector<std::byte> out{std::byte(kind)};
    for (char c : body) out.push_back(std::byte(c));
    return out;
  };
  const char* plan_toml = R"(name = "east-outage"
from = "east"
to = "west"
[[groups]]
name = "databases"
vms = ["db1"]
  [[groups.pre]]
  site = "west"
  run = "/usr/local/bin/check-storage"
  timeout = "60s"
  [[groups.manual]]
  message = "Confirm that the database accepts connections"
[[groups]]
name = "web"
vms = ["web01", "web02"]
)";
  Write(dir / "control_input" / "plan_toml", text(0, plan_toml));
  Write(dir / "control_input" / "plan_json",
        text(1, R"({"name":"p","from":"east","to":"west","groups":[{"name":"g","vms":["a"],)"
                R"("pre":[{"site":"west","run":"true","timeout_ms":1000}],"manual":[{"message":"m"}]}]})"));
  Write(dir / "control_input" / "ranges", text(2, R"({"os":[[0,65536],[131072,65536]],"data":[]})"));

  // control_request: request lines as the CLI sends them (tools/siterep_cli.cc).
  fs::create_directories(dir / "control_request");
  const std::pair<const char*, std::string_view> requests[] = {
      {"status", R"({"op":"status"})"},
      {"status_vm", R"({"op":"status","vm":"vm1"})"},
      {"enable", R"({"op":"enable","vm":"vm1","to":"west","wait":true})"},
      {"failover", R"({"op":"failover","vm":"vm1","planned":true,"timeout":30.5})"},
      {"resync", R"({"op":"resync","vm":"vm1","full":false,"disks":["d0","d1"]})"},
      {"export", R"({"op":"export","vm":"vm1","disk":"d0","point":7,"out":"/tmp/x.img"})"},
      {"failpoint", R"({"op":"failpoint","spec":"applier.mid_apply=abort@3*1"})"},
      {"two_lines", "{\"op\":\"pause\",\"vm\":\"vm1\"}\n{\"op\":\"status\"}\n"},
  };
  for (const auto& [name, line] : requests) {
    std::vector<std::byte> out;
    for (char c : line) out.push_back(std::byte(c));
    Write(dir / "control_request" / name, out);
  }
  return 0;
}
