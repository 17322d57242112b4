#include "applier/segment_check.h"

#include <array>
#include <cstring>
#include <string>

#include "common/crc32c.h"
#include "tracker/log_reader.h"

namespace siterep::applier {

using tracker::ParsedRecord;
using tracker::ParseStatus;
using tracker::ReadStatus;
using tracker::RecordKind;

namespace {

std::string Where(const std::filesystem::path& path, uint64_t offset) {
  return path.string() + " at offset " + std::to_string(offset);
}

std::string WhereSeq(const std::filesystem::path& path, uint64_t offset, uint64_t seq) {
  return Where(path, offset) + " (seq " + std::to_string(seq) + ")";
}

// The rules that concern a record's place in the segment, shared by ScanSegment (a file
// read whole records at a time) and SegmentChecker (pieces as they arrive): the same
// checks, in the same order, with the same refusals.
class RecordSequence {
 public:
  RecordSequence(const std::filesystem::path& path, const SegmentRules& rules)
      : path_(path), rules_(rules) {}

  // A record that parsed (CRC included) at offset; cut_payload is its payload if a cut.
  Status Take(const tracker::RecordHeader& h, uint64_t offset,
              std::span<const std::byte> cut_payload) {
    if (have_cut_) {
      return Status::Corrupt(WhereSeq(path_, offset, h.seq) +
                             ": record after the cut that should end the segment");
    }
    const bool first = summary_.records == 0;
    const uint64_t expected = first ? rules_.first_seq.value_or(0) : summary_.last_seq + 1;
    Status s = CheckRecord(h, expected, !first || rules_.first_seq.has_value());
    if (!s.ok()) return Status::Corrupt(WhereSeq(path_, offset, h.seq) + ": " + s.message());
    if (h.kind == RecordKind::kCut) {
      summary_.cut = tracker::DecodeCutPayload(cut_payload.first<tracker::kCutPayloadSize>());
      if (rules_.cycle && summary_.cut.cycle != *rules_.cycle) {
        return Status::Corrupt(WhereSeq(path_, offset, h.seq) + ": cut of cycle " +
                               std::to_string(summary_.cut.cycle) + " where cycle " +
                               std::to_string(*rules_.cycle) + " was expected");
      }
      have_cut_ = true;
    }
    if (first) summary_.first_seq = h.seq;
    summary_.last_seq = h.seq;
    ++summary_.records;
    return Status::Ok();
  }

  // A record at offset that did not parse (kTruncated or kCorrupt, why).
  Status Bad(uint64_t offset, ParseStatus status, std::string_view why) const {
    // Its own seq cannot be trusted; name the record by the one before it.
    const std::string which = summary_.records == 0
                                  ? "the first record"
                                  : "the record after seq " + std::to_string(summary_.last_seq);
    return Status::Corrupt(Where(path_, offset) + ": " + which +
                           (status == ParseStatus::kTruncated ? " is truncated (" : " is bad (") +
                           std::string(why) + ")");
  }

  // Every record taken; bytes is the segment's size.
  Result<SegmentSummary> End(uint64_t bytes) {
    if (!have_cut_) {
      return Status::Corrupt(path_.string() + ": the segment does not end in a cut record (" +
                             std::to_string(summary_.records) + " records)");
    }
    if (rules_.last_seq && summary_.last_seq != *rules_.last_seq) {
      return Status::Corrupt(path_.string() + ": the segment ends at seq " +
                             std::to_string(summary_.last_seq) + " where " +
                             std::to_string(*rules_.last_seq) + " was expected");
    }
    summary_.bytes = bytes;
    return summary_;
  }

  Status TooLarge(uint64_t bytes) const {
    return Status::Corrupt(path_.string() + ": segment of " + std::to_string(bytes) +
                           " bytes is larger than the limit of " +
                           std::to_string(MaxSegmentBytes(rules_.disk_size)));
  }

 private:
  Status CheckRecord(const tracker::RecordHeader& h, uint64_t expected_seq,
                     bool have_expected_seq) const {
    if (h.disk_id != rules_.disk_id) {
      return Status::Corrupt("record of disk id " + std::to_string(h.disk_id) +
                             " in a segment of disk id " + std::to_string(rules_.disk_id));
    }
    if (h.epoch < rules_.min_epoch) {
      return Status::Corrupt("epoch " + std::to_string(h.epoch) + " is older than the replica's " +
                             std::to_string(rules_.min_epoch));
    }
    if (have_expected_seq && h.seq != expected_seq) {
      return Status::Corrupt("seq " + std::to_string(h.seq) + " where " +
                             std::to_string(expected_seq) + " was expected");
    }
    if (h.kind != RecordKind::kCut &&
        (h.offset > rules_.disk_size || h.length > rules_.disk_size - h.offset)) {
      return Status::Corrupt(std::string(tracker::RecordKindName(h.kind)) + " of [" +
                             std::to_string(h.offset) + ", +" + std::to_string(h.length) +
                             ") is beyond the end of the disk (" +
                             std::to_string(rules_.disk_size) + " bytes)");
    }
    return Status::Ok();
  }

  const std::filesystem::path& path_;
  const SegmentRules& rules_;
  SegmentSummary summary_;
  bool have_cut_ = false;
};

}  // namespace

// ---------------------------------------------------------------------------------------
// SegmentChecker

struct SegmentChecker::Impl {
  Impl(std::filesystem::path p, SegmentRules r)
      : path(std::move(p)), rules(r), sequence(path, rules) {}

  Status Feed(std::span<const std::byte> data);

  std::filesystem::path path;
  SegmentRules rules;
  RecordSequence sequence;
  Status refused;
  uint64_t fed = 0;            // bytes fed
  uint64_t record_offset = 0;  // where the record in progress starts
  std::array<std::byte, tracker::kHeaderSize> header_bytes{};
  size_t header_have = 0;
  bool in_payload = false;  // the header parsed; payload_left bytes to come
  tracker::RecordHeader header;
  uint32_t stored_crc = 0;
  uint32_t crc = 0;
  uint64_t payload_left = 0;
  std::array<std::byte, tracker::kCutPayloadSize> cut{};
  size_t cut_have = 0;
};

Status SegmentChecker::Impl::Feed(std::span<const std::byte> data) {
  const uint64_t limit = MaxSegmentBytes(rules.disk_size);
  if (fed > limit || data.size() > limit - fed) return sequence.TooLarge(fed + data.size());
  while (!data.empty()) {
    if (!in_payload) {
      const size_t n = std::min(tracker::kHeaderSize - header_have, data.size());
      std::memcpy(header_bytes.data() + header_have, data.data(), n);
      header_have += n;
      fed += n;
      data = data.subspan(n);
      std::string_view why;
      const ParseStatus st = tracker::ParseHeader(std::span(header_bytes.data(), header_have),
                                                  &header, &stored_crc, &why);
      if (st == ParseStatus::kCorrupt) return sequence.Bad(record_offset, st, why);
      if (st == ParseStatus::kTruncated) continue;  // data is used up
      crc = tracker::RecordCrcBegin(header_bytes);
      payload_left = tracker::PayloadSize(header);
      cut_have = 0;
      in_payload = true;
    }
    const size_t n = static_cast<size_t>(std::min<uint64_t>(payload_left, data.size()));
    crc = Crc32cExtend(crc, data.data(), n);
    if (header.kind == RecordKind::kCut) {  // its payload is kCutPayloadSize bytes
      std::memcpy(cut.data() + cut_have, data.data(), n);
      cut_have += n;
    }
    payload_left -= n;
    fed += n;
    data = data.subspan(n);
    if (payload_left > 0) continue;  // data is used up
    if (crc != stored_crc)
      return sequence.Bad(record_offset, ParseStatus::kCorrupt, "CRC mismatch");
    SR_RETURN_IF_ERROR(sequence.Take(header, record_offset, cut));
    record_offset = fed;
    header_have = 0;
    in_payload = false;
  }
  return Status::Ok();
}

SegmentChecker::SegmentChecker(std::filesystem::path path, SegmentRules rules)
    : impl_(std::make_unique<Impl>(std::move(path), rules)) {}
SegmentChecker::~SegmentChecker() = default;
SegmentChecker::SegmentChecker(SegmentChecker&&) noexcept = default;
SegmentChecker& SegmentChecker::operator=(SegmentChecker&&) noexcept = default;

Status SegmentChecker::Feed(std::span<const std::byte> data) {
  if (impl_->refused.ok()) impl_->refused = impl_->Feed(data);
  return impl_->refused;
}

Result<SegmentSummary> SegmentChecker::Finish() {
  if (!impl_->refused.ok()) return impl_->refused;
  if (impl_->header_have > 0) {
    return impl_->sequence.Bad(impl_->record_offset, ParseStatus::kTruncated,
                               impl_->in_payload ? "short payload" : "short header");
  }
  return impl_->sequence.End(impl_->fed);
}

// ---------------------------------------------------------------------------------------
// ScanSegment

Result<SegmentSummary> ScanSegment(const std::filesystem::path& path, const SegmentRules& rules) {
  return ScanSegment(path, rules, [](const CheckedRecord&) { return Status::Ok(); });
}

Result<SegmentSummary> ScanSegment(const std::filesystem::path& path, const SegmentRules& rules,
                                   FunctionRef<Status(const CheckedRecord&)> visit) {
  SR_ASSIGN_OR_RETURN(tracker::SegmentReader reader, tracker::SegmentReader::Open(path));
  RecordSequence sequence(path, rules);
  if (reader.file_size() > MaxSegmentBytes(rules.disk_size)) {
    return sequence.TooLarge(reader.file_size());
  }
  ParsedRecord rec;
  for (;;) {
    const uint64_t offset = reader.offset();
    std::string why;
    SR_ASSIGN_OR_RETURN(ReadStatus status, reader.Next(&rec, &why));
    if (status == ReadStatus::kEnd) break;
    if (status == ReadStatus::kTruncated || status == ReadStatus::kCorrupt) {
      return sequence.Bad(
          offset,
          status == ReadStatus::kTruncated ? ParseStatus::kTruncated : ParseStatus::kCorrupt, why);
    }
    SR_RETURN_IF_ERROR(sequence.Take(rec.header, offset, rec.payload));
    SR_RETURN_IF_ERROR(visit(CheckedRecord{rec, offset}));
  }
  return sequence.End(reader.file_size());
}

}  // namespace siterep::applier
