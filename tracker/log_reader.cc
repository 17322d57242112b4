#include "tracker/log_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <system_error>

#include "common/file_util.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kSegmentSuffix = ".seg";
constexpr size_t kSegmentDigits = 20;
constexpr size_t kInitialBuffer = 1u << 20;
constexpr size_t kMaxBuffer = kHeaderSize + kMaxPayload;

// Parses "<20 digits>.seg"; nullopt for any other name.
std::optional<uint64_t> ParseSegmentName(std::string_view name) {
  if (name.size() != kSegmentDigits + kSegmentSuffix.size() || !name.ends_with(kSegmentSuffix)) {
    return std::nullopt;
  }
  uint64_t number = 0;
  const char* first = name.data();
  const char* last = first + kSegmentDigits;
  auto [ptr, ec] = std::from_chars(first, last, number);
  if (ec != std::errc() || ptr != last) return std::nullopt;
  return number;
}

std::string Where(const fs::path& path, uint64_t offset) {
  return path.string() + " at offset " + std::to_string(offset);
}

}  // namespace

std::string SegmentFileName(uint64_t number) {
  char name[kSegmentDigits + 8];
  std::snprintf(name, sizeof(name), "%020llu.seg", static_cast<unsigned long long>(number));
  return name;
}

fs::path SegmentPath(const fs::path& log_dir, uint64_t number) {
  return log_dir / SegmentFileName(number);
}

Result<std::vector<SegmentFile>> ListSegments(const fs::path& log_dir) {
  std::error_code ec;
  fs::directory_iterator it(log_dir, ec);
  if (ec) return Status::Error(ec.value(), "list " + log_dir.string() + ": " + ec.message());
  std::vector<SegmentFile> out;
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) return Status::Error(ec.value(), "list " + log_dir.string() + ": " + ec.message());
    std::optional<uint64_t> number = ParseSegmentName(it->path().filename().native());
    if (!number) continue;
    uint64_t size = it->file_size(ec);
    if (ec) {
      // Released (deleted) between the listing and the stat: not part of the log any more.
      if (ec == std::errc::no_such_file_or_directory) continue;
      return Status::Error(ec.value(), "stat " + it->path().string() + ": " + ec.message());
    }
    out.push_back(SegmentFile{*number, it->path(), size});
  }
  std::sort(out.begin(), out.end(),
            [](const SegmentFile& a, const SegmentFile& b) { return a.number < b.number; });
  return out;
}

// ---------------------------------------------------------------------------------------
// SegmentReader

SegmentReader::SegmentReader(fs::path path, UniqueFd fd, uint64_t size, uint64_t offset)
    : path_(std::move(path)),
      fd_(std::move(fd)),
      file_size_(size),
      offset_(offset),
      buf_offset_(offset) {}

Result<SegmentReader> SegmentReader::Open(const fs::path& path, uint64_t start_offset) {
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDONLY));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, "stat " + path.string());
  return SegmentReader(path, std::move(fd), static_cast<uint64_t>(st.st_size), start_offset);
}

Status SegmentReader::Refill() {
  const size_t consumed = static_cast<size_t>(offset_ - buf_offset_);
  const size_t unread = buf_len_ - consumed;
  if (buf_.empty()) {
    buf_.resize(kInitialBuffer);
  } else if (consumed == 0 && unread == buf_.size()) {
    // One record is larger than the buffer: grow (bounded by the largest valid record).
    buf_.resize(std::min(buf_.size() * 2, kMaxBuffer));
  }
  if (consumed > 0) std::memmove(buf_.data(), buf_.data() + consumed, unread);
  buf_offset_ = offset_;
  buf_len_ = unread;
  while (buf_len_ < buf_.size()) {
    ssize_t n = ::pread(fd_.get(), buf_.data() + buf_len_, buf_.size() - buf_len_,
                        static_cast<off_t>(buf_offset_ + buf_len_));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read " + Where(path_, buf_offset_ + buf_len_));
    }
    if (n == 0) {
      eof_ = true;
      break;
    }
    buf_len_ += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Result<ReadStatus> SegmentReader::Next(ParsedRecord* out, std::string* why) {
  for (;;) {
    const size_t consumed = static_cast<size_t>(offset_ - buf_offset_);
    std::span<const std::byte> avail(buf_.data() + consumed, buf_len_ - consumed);
    std::string_view reason;
    ParseStatus st = avail.empty() ? ParseStatus::kTruncated : ParseRecord(avail, out, &reason);
    if (st == ParseStatus::kOk) {
      offset_ += out->size;
      return ReadStatus::kRecord;
    }
    if (st == ParseStatus::kCorrupt) {
      if (why != nullptr) *why = std::string(reason);
      return ReadStatus::kCorrupt;
    }
    // Truncated: read more unless the file has no more.
    if (eof_) {
      if (avail.empty()) return ReadStatus::kEnd;
      if (why != nullptr) *why = std::string(reason);
      return ReadStatus::kTruncated;
    }
    SR_RETURN_IF_ERROR(Refill());
  }
}

// ---------------------------------------------------------------------------------------
// Sealed segments

Status CheckSealedSegment(const SealedSegment& seg, const fs::path& path) {
  SR_ASSIGN_OR_RETURN(SegmentReader reader, SegmentReader::Open(path));
  auto damaged = [&](uint64_t offset, const std::string& why) {
    return Status::Corrupt("damaged segment " + Where(path, offset) + ": " + why);
  };
  if (reader.file_size() != seg.bytes) {
    return damaged(0, "the file holds " + std::to_string(reader.file_size()) +
                          " bytes, the sealed segment " + std::to_string(seg.bytes));
  }
  uint64_t records = 0;
  uint64_t prev_seq = 0;
  bool have_cut = false;
  for (;;) {
    ParsedRecord rec;
    std::string why;
    SR_ASSIGN_OR_RETURN(ReadStatus st, reader.Next(&rec, &why));
    if (st == ReadStatus::kEnd) break;
    const uint64_t at = reader.offset();
    if (st == ReadStatus::kTruncated) return damaged(at, "short record (" + why + ")");
    if (st == ReadStatus::kCorrupt) return damaged(at, why);
    const RecordHeader& h = rec.header;
    const uint64_t start = at - rec.size;
    if (have_cut) return damaged(start, "a record after the cut that ends the segment");
    if (h.disk_id != seg.disk_id) {
      return damaged(start, "record of disk id " + std::to_string(h.disk_id) +
                                " in a segment of disk id " + std::to_string(seg.disk_id));
    }
    const bool first = records == 0;
    if (first ? seg.first_seq != 0 && h.seq != seg.first_seq : h.seq != prev_seq + 1) {
      return damaged(start, "seq " + std::to_string(h.seq) + " where " +
                                std::to_string(first ? seg.first_seq : prev_seq + 1) +
                                " was expected");
    }
    if (h.kind == RecordKind::kCut) {
      const uint64_t cycle = DecodeCutPayload(rec.payload.first<kCutPayloadSize>()).cycle;
      if (cycle != seg.cycle) {
        return damaged(start, "cut of cycle " + std::to_string(cycle) + " where cycle " +
                                  std::to_string(seg.cycle) + " was expected");
      }
      have_cut = true;
    }
    prev_seq = h.seq;
    ++records;
  }
  if (!have_cut) return damaged(reader.offset(), "the segment does not end in a cut record");
  if (prev_seq != seg.last_seq) {
    return damaged(reader.offset(), "the segment ends at seq " + std::to_string(prev_seq) +
                                        " where " + std::to_string(seg.last_seq) + " was expected");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// LogScanner

Result<LogScanner> LogScanner::Open(const fs::path& log_dir) {
  SR_ASSIGN_OR_RETURN(std::vector<SegmentFile> segments, ListSegments(log_dir));
  return LogScanner(std::move(segments));
}

Result<bool> LogScanner::Next(ScannedRecord* out) {
  for (;;) {
    if (!reader_) {
      if (next_segment_ >= segments_.size()) return false;
      const SegmentFile& seg = segments_[next_segment_++];
      SR_ASSIGN_OR_RETURN(SegmentReader reader, SegmentReader::Open(seg.path));
      reader_.emplace(std::move(reader));
      current_segment_ = seg.number;
    }
    ParsedRecord rec;
    std::string why;
    SR_ASSIGN_OR_RETURN(ReadStatus st, reader_->Next(&rec, &why));
    if (st == ReadStatus::kEnd) {
      reader_.reset();
      continue;
    }
    if (st == ReadStatus::kRecord && have_prev_) {
      if (rec.header.disk_id != disk_id_) {
        st = ReadStatus::kCorrupt;
        why = "disk id " + std::to_string(rec.header.disk_id) + " differs from the log's " +
              std::to_string(disk_id_);
      } else if (rec.header.seq != prev_seq_ + 1) {
        st = ReadStatus::kCorrupt;
        why = "sequence number " + std::to_string(rec.header.seq) + " does not follow " +
              std::to_string(prev_seq_);
      }
    }
    if (st != ReadStatus::kRecord) {
      const uint64_t at = reader_->offset();
      if (st == ReadStatus::kTruncated) why = "short record (" + why + ")";
      if (next_segment_ < segments_.size()) {
        return Status::Corrupt("corrupt change log: " + Where(reader_->path(), at) + ": " + why);
      }
      const uint64_t size = reader_->file_size();
      torn_tail_ = TornTail{current_segment_, at, size > at ? size - at : 0, why};
      reader_.reset();
      return false;
    }
    have_prev_ = true;
    disk_id_ = rec.header.disk_id;
    prev_seq_ = rec.header.seq;
    out->segment = current_segment_;
    out->file_offset = reader_->offset() - rec.size;
    out->header = rec.header;
    out->payload = rec.payload;
    return true;
  }
}

}  // namespace siterep::tracker
