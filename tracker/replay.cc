#include "tracker/replay.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>
#include <vector>

#include "common/file_util.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

namespace {

// Writes zeros over [offset, offset + length), for file systems that cannot punch holes.
Status WriteZeros(int fd, uint64_t offset, uint64_t length) {
  static constexpr size_t kChunk = 1u << 20;
  std::vector<std::byte> zeros(std::min<uint64_t>(length, kChunk));
  while (length > 0) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(length, zeros.size()));
    SR_RETURN_IF_ERROR(PWriteAll(fd, zeros.data(), n, offset, "image (zero fill)"));
    offset += n;
    length -= n;
  }
  return Status::Ok();
}

std::string Describe(const ScannedRecord& r, const fs::path& log_dir) {
  return (log_dir / SegmentFileName(r.segment)).string() + " at offset " +
         std::to_string(r.file_offset) + " (seq " + std::to_string(r.header.seq) + ")";
}

}  // namespace

Status ApplyRecord(int fd, uint64_t image_size, const RecordHeader& header,
                   std::span<const std::byte> payload) {
  if (header.kind == RecordKind::kCut) return Status::Ok();
  if (header.offset > image_size || header.length > image_size - header.offset) {
    return Status::Corrupt(
        std::string(RecordKindName(header.kind)) + " of [" + std::to_string(header.offset) + ", " +
        std::to_string(header.offset + header.length) + ") is beyond the end of the image (" +
        std::to_string(image_size) + " bytes)");
  }
  if (header.kind == RecordKind::kWrite) {
    return PWriteAll(fd, payload.data(), payload.size(), header.offset, "image");
  }
  if (header.length == 0) return Status::Ok();
  if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(header.offset),
                  static_cast<off_t>(header.length)) == 0) {
    return Status::Ok();
  }
  if (errno == EOPNOTSUPP) return WriteZeros(fd, header.offset, header.length);
  return Status::FromErrno(errno, "punch hole in image at offset " + std::to_string(header.offset) +
                                      " length " + std::to_string(header.length));
}

Result<ReplayResult> ReplayLogToFd(const fs::path& log_dir, int target_fd,
                                   const ReplayOptions& options) {
  struct stat st {};
  if (::fstat(target_fd, &st) != 0) return Status::FromErrno(errno, "stat replay target");
  const uint64_t target_size = static_cast<uint64_t>(st.st_size);

  SR_ASSIGN_OR_RETURN(LogScanner scanner, LogScanner::Open(log_dir));
  ReplayResult result;
  bool reached = false;
  ScannedRecord rec;
  for (;;) {
    SR_ASSIGN_OR_RETURN(bool more, scanner.Next(&rec));
    if (!more) break;
    const RecordHeader& h = rec.header;
    if (h.kind == RecordKind::kCut && options.through_cycle) {
      const CutPayload cut = DecodeCutPayload(rec.payload.first<kCutPayloadSize>());
      if (cut.cycle > *options.through_cycle) {
        return Status::Error(ENOENT, "cycle " + std::to_string(*options.through_cycle) +
                                         " is not in " + log_dir.string() +
                                         ": the log reaches cut " + std::to_string(cut.cycle) +
                                         " first");
      }
    }
    Status s = ApplyRecord(target_fd, target_size, h, rec.payload);
    if (!s.ok()) return s.WithContext("replay " + Describe(rec, log_dir));
    ++result.records;
    if (result.first_seq == 0) result.first_seq = h.seq;
    result.last_seq = h.seq;
    switch (h.kind) {
      case RecordKind::kWrite:
        ++result.writes;
        result.bytes_written += h.length;
        break;
      case RecordKind::kDiscard:
        ++result.discards;
        break;
      case RecordKind::kCut:
        ++result.cuts;
        result.last_cycle = DecodeCutPayload(rec.payload.first<kCutPayloadSize>()).cycle;
        break;
    }
    if (options.through_cycle && h.kind == RecordKind::kCut &&
        result.last_cycle == *options.through_cycle) {
      reached = true;
      break;
    }
  }
  if (options.through_cycle && !reached) {
    return Status::Error(ENOENT, "cycle " + std::to_string(*options.through_cycle) + " is not in " +
                                     log_dir.string() +
                                     " (last cut: " + std::to_string(result.last_cycle) + ")");
  }
  if (!reached) result.torn_tail = scanner.torn_tail();
  if (::fdatasync(target_fd) != 0) return Status::FromErrno(errno, "fdatasync replay target");
  return result;
}

Result<ReplayResult> ReplayLogToFile(const fs::path& log_dir, const fs::path& target,
                                     const ReplayOptions& options) {
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(target, O_RDWR));
  Result<ReplayResult> r = ReplayLogToFd(log_dir, fd.get(), options);
  if (!r.ok()) return r.status().WithContext("replay onto " + target.string());
  return r;
}

}  // namespace siterep::tracker
