#include "applier/segment_check.h"

#include <string>

#include "tracker/log_reader.h"

namespace siterep::applier {

using tracker::ParsedRecord;
using tracker::ReadStatus;
using tracker::RecordKind;

namespace {

std::string Where(const std::filesystem::path& path, uint64_t offset) {
  return path.string() + " at offset " + std::to_string(offset);
}

std::string WhereSeq(const std::filesystem::path& path, uint64_t offset, uint64_t seq) {
  return Where(path, offset) + " (seq " + std::to_string(seq) + ")";
}

// Checks one parsed record against the rules and its place in the segment.
Status CheckRecord(const ParsedRecord& rec, const SegmentRules& rules, uint64_t expected_seq,
                   bool have_expected_seq) {
  const tracker::RecordHeader& h = rec.header;
  if (h.disk_id != rules.disk_id) {
    return Status::Corrupt("record of disk id " + std::to_string(h.disk_id) +
                           " in a segment of disk id " + std::to_string(rules.disk_id));
  }
  if (h.epoch < rules.min_epoch) {
    return Status::Corrupt("epoch " + std::to_string(h.epoch) + " is older than the replica's " +
                           std::to_string(rules.min_epoch));
  }
  if (have_expected_seq && h.seq != expected_seq) {
    return Status::Corrupt("seq " + std::to_string(h.seq) + " where " +
                           std::to_string(expected_seq) + " was expected");
  }
  if (h.kind != RecordKind::kCut &&
      (h.offset > rules.disk_size || h.length > rules.disk_size - h.offset)) {
    return Status::Corrupt(std::string(tracker::RecordKindName(h.kind)) + " of [" +
                           std::to_string(h.offset) + ", +" + std::to_string(h.length) +
                           ") is beyond the end of the disk (" + std::to_string(rules.disk_size) +
                           " bytes)");
  }
  return Status::Ok();
}

}  // namespace

Result<SegmentSummary> ScanSegment(const std::filesystem::path& path, const SegmentRules& rules) {
  return ScanSegment(path, rules, [](const CheckedRecord&) { return Status::Ok(); });
}

Result<SegmentSummary> ScanSegment(const std::filesystem::path& path, const SegmentRules& rules,
                                   FunctionRef<Status(const CheckedRecord&)> visit) {
  SR_ASSIGN_OR_RETURN(tracker::SegmentReader reader, tracker::SegmentReader::Open(path));
  SegmentSummary summary;
  summary.bytes = reader.file_size();
  if (summary.bytes > MaxSegmentBytes(rules.disk_size)) {
    return Status::Corrupt(path.string() + ": segment of " + std::to_string(summary.bytes) +
                           " bytes is larger than the limit of " +
                           std::to_string(MaxSegmentBytes(rules.disk_size)));
  }
  bool have_cut = false;
  ParsedRecord rec;
  for (;;) {
    const uint64_t offset = reader.offset();
    std::string why;
    SR_ASSIGN_OR_RETURN(ReadStatus status, reader.Next(&rec, &why));
    if (status == ReadStatus::kEnd) break;
    if (status == ReadStatus::kTruncated || status == ReadStatus::kCorrupt) {
      // Its own seq cannot be trusted; name the record by the one before it.
      const std::string which = summary.records == 0
                                    ? "the first record"
                                    : "the record after seq " + std::to_string(summary.last_seq);
      return Status::Corrupt(Where(path, offset) + ": " + which +
                             (status == ReadStatus::kTruncated ? " is truncated (" : " is bad (") +
                             why + ")");
    }
    if (have_cut) {
      return Status::Corrupt(WhereSeq(path, offset, rec.header.seq) +
                             ": record after the cut that should end the segment");
    }
    const bool first = summary.records == 0;
    const uint64_t expected = first ? rules.first_seq.value_or(0) : summary.last_seq + 1;
    Status s = CheckRecord(rec, rules, expected, !first || rules.first_seq.has_value());
    if (!s.ok())
      return Status::Corrupt(WhereSeq(path, offset, rec.header.seq) + ": " + s.message());
    if (rec.header.kind == RecordKind::kCut) {
      summary.cut = tracker::DecodeCutPayload(rec.payload.first<tracker::kCutPayloadSize>());
      if (rules.cycle && summary.cut.cycle != *rules.cycle) {
        return Status::Corrupt(WhereSeq(path, offset, rec.header.seq) + ": cut of cycle " +
                               std::to_string(summary.cut.cycle) + " where cycle " +
                               std::to_string(*rules.cycle) + " was expected");
      }
      have_cut = true;
    }
    if (first) summary.first_seq = rec.header.seq;
    summary.last_seq = rec.header.seq;
    ++summary.records;
    SR_RETURN_IF_ERROR(visit(CheckedRecord{rec, offset}));
  }
  if (!have_cut) {
    return Status::Corrupt(path.string() + ": the segment does not end in a cut record (" +
                           std::to_string(summary.records) + " records)");
  }
  if (rules.last_seq && summary.last_seq != *rules.last_seq) {
    return Status::Corrupt(path.string() + ": the segment ends at seq " +
                           std::to_string(summary.last_seq) + " where " +
                           std::to_string(*rules.last_seq) + " was expected");
  }
  return summary;
}

}  // namespace siterep::applier
