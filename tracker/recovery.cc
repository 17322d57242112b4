#include "tracker/recovery.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <optional>

#include "common/file_util.h"
#include "tracker/log_format.h"
#include "tracker/log_reader.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

namespace {

Status WrongDisk(const RecoveryInput& in, const fs::path& path, uint32_t found) {
  return Status::Invalid(path.string() + " holds records of disk id " + std::to_string(found) +
                         ", not of disk " + in.disk_name + " (id " + std::to_string(in.disk_id) +
                         "): is the log folder of another disk configured here?");
}

struct SealedInfo {
  RecoveredSegment found;
  int64_t cut_unix_nanos = 0;
};

// Reads what a sealed segment's list entry needs: its first record and its closing cut.
Result<SealedInfo> ReadSealed(const RecoveryInput& in, const SegmentFile& file) {
  constexpr size_t kCutRecordSize = kHeaderSize + kCutPayloadSize;
  if (file.size < kCutRecordSize) {
    return Status::Corrupt(file.path.string() + " is sealed but too short to end in a cut record");
  }
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(file.path, O_RDONLY));
  std::byte tail[kCutRecordSize];
  SR_RETURN_IF_ERROR(
      PReadAll(fd.get(), tail, sizeof(tail), file.size - kCutRecordSize, file.path.string()));
  ParsedRecord cut;
  std::string_view why;
  if (ParseRecord(tail, &cut, &why) != ParseStatus::kOk || cut.header.kind != RecordKind::kCut) {
    return Status::Corrupt(file.path.string() +
                           " is sealed but does not end in a valid cut record" +
                           (why.empty() ? std::string() : " (" + std::string(why) + ")"));
  }
  if (cut.header.disk_id != in.disk_id) return WrongDisk(in, file.path, cut.header.disk_id);

  SR_ASSIGN_OR_RETURN(SegmentReader reader, SegmentReader::Open(file.path));
  ParsedRecord first;
  std::string first_why;
  SR_ASSIGN_OR_RETURN(ReadStatus st, reader.Next(&first, &first_why));
  if (st != ReadStatus::kRecord) {
    return Status::Corrupt(file.path.string() + ": bad first record (" + first_why + ")");
  }
  const CutPayload payload = DecodeCutPayload(cut.payload.first<kCutPayloadSize>());
  SealedInfo info;
  SealedSegment& seg = info.found.segment;
  seg.disk = in.disk_name;
  seg.disk_id = in.disk_id;
  seg.number = file.number;
  seg.cycle = payload.cycle;
  seg.cut_unix_nanos = payload.unix_nanos;
  seg.first_change_unix_nanos = payload.first_change_unix_nanos;
  seg.first_seq = first.header.seq;
  seg.last_seq = cut.header.seq;
  seg.bytes = file.size;
  info.found.path = file.path;
  info.cut_unix_nanos = payload.unix_nanos;
  return info;
}

}  // namespace

Result<uint64_t> MarkSegmentBlocks(const fs::path& path, DirtyBitmap& map, bool strict) {
  SR_ASSIGN_OR_RETURN(SegmentReader reader, SegmentReader::Open(path));
  uint64_t records = 0;
  for (;;) {
    ParsedRecord rec;
    std::string why;
    SR_ASSIGN_OR_RETURN(ReadStatus st, reader.Next(&rec, &why));
    if (st == ReadStatus::kEnd) break;
    if (st != ReadStatus::kRecord) {
      if (!strict) break;
      return Status::Corrupt(path.string() + " at offset " + std::to_string(reader.offset()) +
                             ": " + why);
    }
    ++records;
    if (rec.header.kind != RecordKind::kCut) map.MarkRange(rec.header.offset, rec.header.length);
  }
  return records;
}

Result<RecoveredLog> RecoverLog(const RecoveryInput& in) {
  // 1. Unfinished builds (and an older version's compaction leftovers).
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(in.log_dir, ec)) {
    const fs::path& p = e.path();
    if (p.extension() != ".tmp" && p.extension() != ".compact") continue;
    if (::unlink(p.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "delete the unfinished file " + p.string());
    }
    spdlog::info("disk {}: deleted the unfinished file {}", in.disk_name, p.string());
  }
  if (ec) return Status::Error(ec.value(), "list " + in.log_dir.string() + ": " + ec.message());

  SR_ASSIGN_OR_RETURN(std::vector<SegmentFile> files, ListSegments(in.log_dir));
  RecoveredLog r;
  r.last_seq = in.floors.last_seq;
  r.last_cycle = in.floors.last_cycle;
  r.last_segment = std::max(in.floors.last_segment, files.empty() ? 0 : files.back().number);
  for (size_t i = 0; i < files.size(); ++i) {
    Result<SealedInfo> info = ReadSealed(in, files[i]);
    if (!info.ok()) {
      const bool last = i + 1 == files.size();
      if (!last || !in.legacy_open_segment || info.status().code() != EBADMSG) {
        return info.status();
      }
      // 3. An older version's open segment.
      if (files[i].size > 0) {
        Result<uint64_t> marked = MarkSegmentBlocks(files[i].path, *in.map, /*strict=*/false);
        if (!marked.ok()) return marked.status();
        r.upgraded_records = *marked;
        SR_RETURN_IF_ERROR(in.map->Flush());
        spdlog::info(
            "disk {}: {} records of the open segment {} of an older change log go into "
            "the changed-block map",
            in.disk_name, *marked, files[i].path.string());
      }
      if (::unlink(files[i].path.c_str()) != 0 && errno != ENOENT) {
        return Status::FromErrno(errno, "delete " + files[i].path.string());
      }
      SR_RETURN_IF_ERROR(SyncDir(in.log_dir));
      break;
    }
    const SealedSegment& seg = info->found.segment;
    if (!r.sealed.empty() && seg.first_seq != r.sealed.back().segment.last_seq + 1) {
      return Status::Corrupt(files[i].path.string() + " starts at seq " +
                             std::to_string(seg.first_seq) + " but the segment before it ends at " +
                             std::to_string(r.sealed.back().segment.last_seq));
    }
    r.last_cut_unix_nanos = info->cut_unix_nanos;
    r.last_cut_first_change_unix_nanos = seg.first_change_unix_nanos;
    r.sealed.push_back(std::move(info->found));
  }
  if (!r.sealed.empty()) {
    const SealedSegment& s = r.sealed.back().segment;
    r.last_seq = std::max(r.last_seq, s.last_seq);
    r.last_cycle = std::max(r.last_cycle, s.cycle);
  }
  return r;
}

}  // namespace siterep::tracker
