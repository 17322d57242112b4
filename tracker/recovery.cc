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
#include "tracker/replay.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

namespace {

Status WrongDisk(const RecoveryInput& in, const fs::path& path, uint32_t found) {
  return Status::Invalid(path.string() + " holds records of disk id " + std::to_string(found) +
                         ", not of disk " + in.disk_name + " (id " + std::to_string(in.disk_id) +
                         "): is the log folder of another disk configured here?");
}

struct SealedInfo {
  SealedSegment segment;
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
  SealedSegment& seg = info.segment;
  seg.disk = in.disk_name;
  seg.disk_id = in.disk_id;
  seg.number = file.number;
  seg.cycle = payload.cycle;
  seg.cut_unix_nanos = payload.unix_nanos;
  seg.first_change_unix_nanos = payload.first_change_unix_nanos;
  seg.first_seq = first.header.seq;
  seg.last_seq = cut.header.seq;
  seg.bytes = file.size;
  seg.path = file.path;
  info.cut_unix_nanos = payload.unix_nanos;
  return info;
}

// What the scan of the last segment found.
struct TailScan {
  uint64_t valid_end = 0;  // offset after the last good record
  uint64_t redo_from = 0;  // offset after the last cut record (0: none in this file)
  uint64_t records = 0;
  uint64_t first_seq = 0;
  uint64_t last_seq = 0;
  bool ends_in_cut = false;
  std::optional<CutPayload> last_cut;
  uint64_t last_cut_seq = 0;
  std::string torn_why;  // non-empty when the scan stopped at a bad record
};

Result<TailScan> ScanLastSegment(const RecoveryInput& in, const SegmentFile& file,
                                 std::optional<uint64_t> expected_seq) {
  SR_ASSIGN_OR_RETURN(SegmentReader reader, SegmentReader::Open(file.path));
  TailScan scan;
  for (;;) {
    ParsedRecord rec;
    std::string why;
    SR_ASSIGN_OR_RETURN(ReadStatus st, reader.Next(&rec, &why));
    if (st == ReadStatus::kEnd) break;
    if (st != ReadStatus::kRecord) {
      scan.torn_why = (st == ReadStatus::kTruncated ? "short record: " : "") + why;
      break;
    }
    const RecordHeader& h = rec.header;
    if (h.disk_id != in.disk_id) {
      // The first record decides whose log this is; later, a stray id is damage.
      if (scan.records == 0) return WrongDisk(in, file.path, h.disk_id);
      scan.torn_why = "record of another disk id " + std::to_string(h.disk_id);
      break;
    }
    if (expected_seq && h.seq != *expected_seq) {
      scan.torn_why = "sequence number " + std::to_string(h.seq) + " where " +
                      std::to_string(*expected_seq) + " was expected";
      break;
    }
    expected_seq = h.seq + 1;
    if (scan.records++ == 0) scan.first_seq = h.seq;
    scan.last_seq = h.seq;
    scan.valid_end = reader.offset();
    scan.ends_in_cut = h.kind == RecordKind::kCut;
    if (scan.ends_in_cut) {
      scan.last_cut = DecodeCutPayload(rec.payload.first<kCutPayloadSize>());
      scan.last_cut_seq = h.seq;
      scan.redo_from = reader.offset();
    }
  }
  return scan;
}

Status TruncateTornTail(const RecoveryInput& in, const SegmentFile& file, const TailScan& scan) {
  spdlog::warn("disk {}: dropping the torn tail of {}: {} bytes from offset {} ({})", in.disk_name,
               file.path.string(), file.size - scan.valid_end, scan.valid_end, scan.torn_why);
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(file.path, O_WRONLY));
  if (::ftruncate(fd.get(), static_cast<off_t>(scan.valid_end)) != 0) {
    return Status::FromErrno(
        errno, "truncate " + file.path.string() + " to " + std::to_string(scan.valid_end));
  }
  if (::fdatasync(fd.get()) != 0)
    return Status::FromErrno(errno, "fdatasync " + file.path.string());
  return Status::Ok();
}

// Rewrites the open segment as its good prefix [0, keep) followed by the records found past
// holes, renumbered from first_seq on (they were never shipped, so renumbering is safe).
// The new file is built beside the segment and renamed over it, so a crash during the
// rewrite leaves either the old file (recovered again the same way) or the new one; an
// in-place rewrite could leave stale copies of moved records behind the new tail.
Result<uint64_t> CompactPastHoles(const RecoveryInput& in, const SegmentFile& file, uint64_t keep,
                                  const std::vector<FoundRecord>& found, uint64_t first_seq) {
  fs::path tmp = file.path;
  tmp += ".compact";
  SR_ASSIGN_OR_RETURN(UniqueFd src, OpenFile(file.path, O_RDONLY));
  SR_ASSIGN_OR_RETURN(UniqueFd dst, OpenFile(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644));
  uint64_t out = 0;
  std::vector<std::byte> buf(1u << 20);
  while (out < keep) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), keep - out));
    SR_RETURN_IF_ERROR(PReadAll(src.get(), buf.data(), n, out, file.path.string()));
    SR_RETURN_IF_ERROR(PWriteAll(dst.get(), buf.data(), n, out, tmp.string()));
    out += n;
  }
  uint64_t seq = first_seq;
  for (const FoundRecord& f : found) {
    SR_ASSIGN_OR_RETURN(SegmentReader reader, SegmentReader::Open(file.path, f.file_offset));
    ParsedRecord rec;
    SR_ASSIGN_OR_RETURN(ReadStatus st, reader.Next(&rec));
    if (st != ReadStatus::kRecord) {
      return Status::Error(EIO, file.path.string() + " changed during recovery at offset " +
                                    std::to_string(f.file_offset));
    }
    RecordHeader h = rec.header;
    h.seq = seq++;
    std::byte head[kHeaderSize];
    EncodeHeader(h, rec.payload, std::span<std::byte, kHeaderSize>(head, kHeaderSize));
    SR_RETURN_IF_ERROR(PWriteAll(dst.get(), head, kHeaderSize, out, tmp.string()));
    SR_RETURN_IF_ERROR(PWriteAll(dst.get(), rec.payload.data(), rec.payload.size(),
                                 out + kHeaderSize, tmp.string()));
    out += kHeaderSize + rec.payload.size();
  }
  if (::fdatasync(dst.get()) != 0) return Status::FromErrno(errno, "fdatasync " + tmp.string());
  if (::rename(tmp.c_str(), file.path.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + tmp.string() + " to " + file.path.string());
  }
  SR_RETURN_IF_ERROR(SyncDir(in.log_dir));
  const uint64_t tail = found.back().file_offset + found.back().size;
  if (tail < file.size) {
    spdlog::warn("disk {}: dropping the torn tail of {}: {} bytes from offset {}", in.disk_name,
                 file.path.string(), file.size - tail, tail);
  }
  spdlog::warn(
      "disk {}: {} had holes from offset {} (appends that never finished): kept {} "
      "complete records after them, renumbered from seq {}; {} bytes dropped",
      in.disk_name, file.path.string(), keep, found.size(), first_seq, file.size - out);
  return out;
}

// Redoes the records in [from, to) of the segment into the image.
Result<uint64_t> Redo(const RecoveryInput& in, const SegmentFile& file, uint64_t from,
                      uint64_t to) {
  if (from >= to) return uint64_t{0};
  // Records need not be aligned, so never redo through an O_DIRECT descriptor.
  UniqueFd own;
  int fd = in.image_fd;
  const int flags = ::fcntl(in.image_fd, F_GETFL);
  if (flags < 0) return Status::FromErrno(errno, "fcntl on the image of disk " + in.disk_name);
  if (flags & O_DIRECT) {
    SR_ASSIGN_OR_RETURN(own, OpenFile("/proc/self/fd/" + std::to_string(in.image_fd), O_RDWR));
    fd = own.get();
  }
  SR_ASSIGN_OR_RETURN(SegmentReader reader, SegmentReader::Open(file.path, from));
  uint64_t redone = 0;
  while (reader.offset() < to) {
    ParsedRecord rec;
    std::string why;
    SR_ASSIGN_OR_RETURN(ReadStatus st, reader.Next(&rec, &why));
    if (st != ReadStatus::kRecord) {
      return Status::Error(EIO, file.path.string() + " changed during recovery at offset " +
                                    std::to_string(reader.offset()));
    }
    Status s = ApplyRecord(fd, in.image_size, rec.header, rec.payload);
    if (!s.ok()) {
      return s.WithContext("redo " + file.path.string() + " at offset " +
                           std::to_string(reader.offset() - rec.size) + " (seq " +
                           std::to_string(rec.header.seq) + ")");
    }
    ++redone;
  }
  if (::fdatasync(fd) != 0)
    return Status::FromErrno(errno, "fdatasync image of disk " + in.disk_name);
  return redone;
}

Result<uint64_t> CreateSegment(const fs::path& log_dir, uint64_t number) {
  const fs::path path = SegmentPath(log_dir, number);
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_WRONLY | O_CREAT | O_EXCL, 0644));
  SR_RETURN_IF_ERROR(SyncDir(log_dir));
  return number;
}

}  // namespace

Result<RecoveredLog> RecoverLog(const RecoveryInput& in) {
  SR_ASSIGN_OR_RETURN(std::vector<SegmentFile> files, ListSegments(in.log_dir));
  if (!files.empty()) {
    // Left by a crash during CompactPastHoles; the segment itself is still the old one.
    fs::path tmp = files.back().path;
    tmp += ".compact";
    std::error_code ec;
    fs::remove(tmp, ec);
  }
  RecoveredLog r;
  r.last_seq = in.floors.last_seq;
  r.last_cut_seq = in.floors.last_seq;
  r.last_cycle = in.floors.last_cycle;
  const uint64_t segment_floor =
      std::max(in.floors.last_segment, files.empty() ? 0 : files.back().number);
  if (files.empty()) {
    SR_ASSIGN_OR_RETURN(r.open_segment, CreateSegment(in.log_dir, segment_floor + 1));
    return r;
  }

  // Sealed segments first (their tails only), but a damaged one is reported only after
  // the redo, which must happen whatever the state of the older segments.
  Status sealed_status;
  for (size_t i = 0; i + 1 < files.size() && sealed_status.ok(); ++i) {
    Result<SealedInfo> info = ReadSealed(in, files[i]);
    if (!info.ok()) {
      if (info.status().code() != EBADMSG) return info.status();
      sealed_status = info.status();
      break;
    }
    const SealedSegment& seg = info->segment;
    if (!r.sealed.empty() && seg.first_seq != r.sealed.back().last_seq + 1) {
      sealed_status = Status::Corrupt(
          files[i].path.string() + " starts at seq " + std::to_string(seg.first_seq) +
          " but the segment before it ends at " + std::to_string(r.sealed.back().last_seq));
      break;
    }
    r.last_cut_unix_nanos = info->cut_unix_nanos;
    r.last_cut_first_change_unix_nanos = info->segment.first_change_unix_nanos;
    r.sealed.push_back(std::move(info->segment));
  }

  SegmentFile last = files.back();
  std::optional<uint64_t> expected_seq;
  if (sealed_status.ok() && !r.sealed.empty()) expected_seq = r.sealed.back().last_seq + 1;
  SR_ASSIGN_OR_RETURN(TailScan scan, ScanLastSegment(in, last, expected_seq));
  if (!scan.torn_why.empty()) {
    // Appenders write their reserved ranges concurrently, so a bad record may be a hole
    // with complete records after it, whose image writes may have happened: keep those.
    // (Not before the last cut: a cut is written only when every earlier range is.)
    const uint64_t good_seq = scan.records > 0 ? scan.last_seq
                              : expected_seq   ? *expected_seq - 1
                                               : in.floors.last_seq;
    SR_ASSIGN_OR_RETURN(std::vector<FoundRecord> found,
                        FindRecordsPastHoles(last.path, scan.valid_end, in.disk_id, good_seq));
    if (!found.empty()) {
      SR_ASSIGN_OR_RETURN(last.size,
                          CompactPastHoles(in, last, scan.valid_end, found, good_seq + 1));
      SR_ASSIGN_OR_RETURN(scan, ScanLastSegment(in, last, expected_seq));
    }
  }
  if (scan.valid_end < last.size) {
    SR_RETURN_IF_ERROR(TruncateTornTail(in, last, scan));
    r.truncated_bytes = last.size - scan.valid_end;
  }
  SR_ASSIGN_OR_RETURN(r.redone, Redo(in, last, scan.redo_from, scan.valid_end));
  if (r.redone > 0) {
    spdlog::info("disk {}: redid {} records after the last cut into the image", in.disk_name,
                 r.redone);
  }
  SR_RETURN_IF_ERROR(sealed_status);

  if (!r.sealed.empty()) {
    const SealedSegment& s = r.sealed.back();
    r.last_seq = std::max(r.last_seq, s.last_seq);
    r.last_cut_seq = std::max(r.last_cut_seq, s.last_seq);
    r.last_cycle = std::max(r.last_cycle, s.cycle);
  }
  if (scan.records > 0) r.last_seq = std::max(r.last_seq, scan.last_seq);
  if (scan.last_cut) {
    r.last_cycle = std::max(r.last_cycle, scan.last_cut->cycle);
    r.last_cut_seq = std::max(r.last_cut_seq, scan.last_cut_seq);
    r.last_cut_unix_nanos = scan.last_cut->unix_nanos;
    r.last_cut_first_change_unix_nanos = scan.last_cut->first_change_unix_nanos;
  }

  if (scan.ends_in_cut) {
    // Interrupted while sealing: the segment is complete; seal it and start the next.
    SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(last.path, O_RDONLY));
    if (::fdatasync(fd.get()) != 0)
      return Status::FromErrno(errno, "fdatasync " + last.path.string());
    SealedSegment seg;
    seg.disk = in.disk_name;
    seg.disk_id = in.disk_id;
    seg.number = last.number;
    seg.cycle = scan.last_cut->cycle;
    seg.cut_unix_nanos = scan.last_cut->unix_nanos;
    seg.first_change_unix_nanos = scan.last_cut->first_change_unix_nanos;
    seg.first_seq = scan.first_seq;
    seg.last_seq = scan.last_seq;
    seg.bytes = scan.valid_end;
    seg.path = last.path;
    r.sealed.push_back(std::move(seg));
    SR_ASSIGN_OR_RETURN(r.open_segment, CreateSegment(in.log_dir, segment_floor + 1));
    return r;
  }
  r.open_segment = last.number;
  r.open_bytes = scan.valid_end;
  r.open_first_seq = scan.records > 0 ? scan.first_seq : 0;
  return r;
}

}  // namespace siterep::tracker
