// libFuzzer harness for the replication wire format (shipper/wire_format.h): what a
// receiver or shipper does with bytes from a peer after TLS. The input is a stream of
// frames; each header is parsed, its payload checked (CRC) and decoded by type, and the data
// of a segment chunk or sync data frame decompressed, exactly as the receiver does. Any input
// must end in a refusal or a clean decode: no crash, no read outside the input, no huge
// allocation.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "shipper/wire_format.h"

using namespace siterep::shipper;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  std::vector<std::byte> chunk_data;  // decompressed chunk or sync data
  while (in.size() >= kFrameHeaderSize) {
    auto header = ParseFrameHeader(in);
    if (!header.ok()) break;
    in = in.subspan(kFrameHeaderSize);
    if (header->payload_length > in.size()) break;
    std::span<const std::byte> payload = in.first(header->payload_length);
    in = in.subspan(header->payload_length);
    // The CRC is checked, but a bad one does not stop the harness: the decoders must
    // survive anything a broken peer could send even with a matching CRC.
    (void)VerifyFrame(*header, payload);
    switch (header->type) {
      case FrameType::kHello:
        (void)DecodeHello(payload);
        break;
      case FrameType::kHelloReply:
        (void)DecodeHelloReply(payload);
        break;
      case FrameType::kSegmentChunk: {
        auto chunk = DecodeSegmentChunk(payload);
        if (chunk.ok()) (void)ChunkData(*chunk, &chunk_data);
        break;
      }
      case FrameType::kCycleEnd:
        (void)DecodeCycleEnd(payload);
        break;
      case FrameType::kAck:
        (void)DecodeAck(payload);
        break;
      case FrameType::kHeartbeat:
        (void)DecodeHeartbeat(payload);
        break;
      case FrameType::kError:
        (void)DecodeError(payload);
        break;
      case FrameType::kSyncBegin:
        (void)DecodeSyncBegin(payload);
        break;
      case FrameType::kSyncReply:
        (void)DecodeSyncReply(payload);
        break;
      case FrameType::kHashRequest:
        (void)DecodeHashRequest(payload);
        break;
      case FrameType::kHashReply:
        (void)DecodeHashReply(payload);
        break;
      case FrameType::kSyncData: {
        auto sync_data = DecodeSyncData(payload);
        if (sync_data.ok() && !sync_data->zero()) (void)SyncDataBytes(*sync_data, &chunk_data);
        break;
      }
      case FrameType::kSyncAck:
        (void)DecodeSyncAck(payload);
        break;
      case FrameType::kSyncEnd:
        (void)DecodeSyncEnd(payload);
        break;
      case FrameType::kPeerRequest:
      case FrameType::kPeerReply:
        (void)DecodePeerMessage(payload);
        break;
    }
  }
  return 0;
}
