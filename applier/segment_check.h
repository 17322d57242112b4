// Checking a received segment record by record: the one place that decides whether a
// segment from the primary may be kept (Replica::WriteSegment, with a SegmentChecker fed
// each chunk as it arrives) and may be applied (the applier checks every segment of a
// cycle again before it writes anything, so a byte that flipped on the replica's disk
// after reception is caught).
//
// A segment is accepted when every record parses (magic, version, kind, length, CRC;
// tracker::ParseRecord), carries the segment's disk id, has an epoch not older than
// the replica's, keeps write/discard ranges inside the disk, numbers its records seq + 1
// each (the first one as expected, when given), and the last record - and only it - is a
// cut. ScanSegment is stateless; both are thread-compatible.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>

#include "common/function_ref.h"
#include "common/status.h"
#include "tracker/log_format.h"

namespace siterep::applier {

// Largest segment a replica accepts for a disk of disk_size bytes. A cycle holds each
// changed 4 KiB block of a disk once (tracker/disk_log.h), so at worst every block of the
// disk in a record of its own, then the cut record; never less than 1 GiB, the limit
// when segments were pieces of a data log.
inline uint64_t MaxSegmentBytes(uint64_t disk_size) {
  const uint64_t blocks = (disk_size + 4095) / 4096;
  const uint64_t worst = disk_size + (blocks + 1) * tracker::kHeaderSize + tracker::kCutPayloadSize;
  return std::max<uint64_t>(uint64_t{1} << 30, worst);
}

struct SegmentRules {
  uint32_t disk_id = 0;
  uint64_t disk_size = 0;
  uint64_t min_epoch = 0;
  std::optional<uint64_t> first_seq;  // the seq the first record must carry; nullopt: any
  std::optional<uint64_t> last_seq;   // the seq the last record must carry; nullopt: any
  std::optional<uint64_t> cycle;      // the cycle the cut must carry; nullopt: any
};

struct SegmentSummary {
  uint64_t records = 0;
  uint64_t bytes = 0;  // file size
  uint64_t first_seq = 0;
  uint64_t last_seq = 0;
  tracker::CutPayload cut;
};

// One checked record, handed to ScanSegment's visitor.
struct CheckedRecord {
  const tracker::ParsedRecord& record;
  uint64_t file_offset;
};

// Reads the segment at path and checks every record against rules. The visitor, if any, is
// called for each record right after that record passed its checks (so a visitor
// sees the records of a segment whose later part may still turn out bad; callers that
// must not act on a bad segment scan it once without a visitor first). A refusal is an
// EBADMSG Status naming the file, offset, seq and what was wrong; a visitor's error is
// returned as it is; a read error is the read's Status.
Result<SegmentSummary> ScanSegment(const std::filesystem::path& path, const SegmentRules& rules,
                                   FunctionRef<Status(const CheckedRecord&)> visit);
Result<SegmentSummary> ScanSegment(const std::filesystem::path& path, const SegmentRules& rules);

// Checks a segment as its bytes arrive, in pieces of any size (the receiver's chunks), by
// the rules and with the refusals of ScanSegment (path names the segment in them), so the
// replica never reads a received segment back to check it. Between pieces it holds at
// most one record header and a cut's payload, never a write's data: each payload's CRC
// is extended piece by piece. The first refusal stays: every later Feed and Finish
// return it. Thread-compatible.
class SegmentChecker {
 public:
  SegmentChecker(std::filesystem::path path, SegmentRules rules);
  ~SegmentChecker();
  SegmentChecker(SegmentChecker&&) noexcept;
  SegmentChecker& operator=(SegmentChecker&&) noexcept;

  // The next bytes of the segment. One that grows past MaxSegmentBytes is refused.
  Status Feed(std::span<const std::byte> data);
  // Every byte fed: the summary, or the refusal (a record cut short, no cut at the end,
  // the wrong last seq).
  Result<SegmentSummary> Finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace siterep::applier
