// Reading change logs: segment file names, listing a log folder, and reading its records
// in order, either one segment at a time (SegmentReader) or across the whole folder
// (LogScanner). Used by recovery, the bitmap fallback, replay, the siterep-log tool and
// (later) the shipper and the checker. Readers verify every record (log_format.h) and
// never change the files. Not thread-safe: one reader per thread.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "tracker/log_format.h"
#include "tracker/segment_source.h"

namespace siterep::tracker {

// "<20-digit number>.seg".
std::string SegmentFileName(uint64_t number);
std::filesystem::path SegmentPath(const std::filesystem::path& log_dir, uint64_t number);

struct SegmentFile {
  uint64_t number = 0;
  std::filesystem::path path;
  uint64_t size = 0;  // bytes, when listed
};

// The segment files of a log folder, in number order; other files are ignored. A folder
// that does not exist is an error (ENOENT).
Result<std::vector<SegmentFile>> ListSegments(const std::filesystem::path& log_dir);

enum class ReadStatus {
  kRecord,     // a whole, valid record
  kEnd,        // clean end of the file
  kTruncated,  // the file ends inside a record (torn tail)
  kCorrupt,    // bad magic, version, kind, length or CRC
};

// Reads the records of one segment file from a start offset, in order, through a bounded
// buffer (it grows to hold one record, at most kHeaderSize + kMaxPayload bytes).
class SegmentReader {
 public:
  static Result<SegmentReader> Open(const std::filesystem::path& path, uint64_t start_offset = 0);

  // Reads the record at offset(). kRecord: *out is filled (its payload points into the
  // reader's buffer and stays valid until the next call) and offset() moves past it.
  // kEnd: nothing left. kTruncated / kCorrupt: the record at offset() is short or bad,
  // *why says how; offset() stays at its start. A read error is a Status.
  Result<ReadStatus> Next(ParsedRecord* out, std::string* why = nullptr);

  // File offset of the next record (after a kTruncated / kCorrupt: of the bad one).
  uint64_t offset() const { return offset_; }
  // File size when the reader was opened.
  uint64_t file_size() const { return file_size_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  SegmentReader(std::filesystem::path path, UniqueFd fd, uint64_t size, uint64_t offset);
  // Moves the unread bytes to the front of the buffer (growing it if it is full) and reads
  // more. Sets eof_ when the file has no more bytes.
  Status Refill();

  std::filesystem::path path_;
  UniqueFd fd_;
  uint64_t file_size_ = 0;
  uint64_t offset_ = 0;         // file offset of the next record
  std::vector<std::byte> buf_;  // holds file bytes [buf_offset_, buf_offset_ + buf_len_)
  uint64_t buf_offset_ = 0;
  size_t buf_len_ = 0;
  bool eof_ = false;
};

// Checks the file at path of a sealed segment an older version wrote, before it leaves the
// primary (DiskLog::OpenSegment): the file holds exactly seg.bytes bytes of whole, valid records
// (ParseRecord: magic, version, kind, length, CRC) of seg.disk_id, numbered +1 each from
// seg.first_seq (when set) to seg.last_seq, the last one - and only it - the cut of
// seg.cycle. A damaged segment is an EBADMSG Status naming the file, the offset and what is
// wrong; a read error is the read's Status (ENOENT: the segment was released or dropped).
Status CheckSealedSegment(const SealedSegment& seg, const std::filesystem::path& path);

// One record found by LogScanner.
struct ScannedRecord {
  uint64_t segment = 0;      // segment number
  uint64_t file_offset = 0;  // where the record starts in its segment file
  RecordHeader header;
  std::span<const std::byte> payload;  // valid until the next call to Next
};

// Where a log stopped being readable in its last segment.
struct TornTail {
  uint64_t segment = 0;
  uint64_t file_offset = 0;    // start of the first bad record
  uint64_t dropped_bytes = 0;  // bytes from there to the end of the file
  std::string why;
};

// Reads every record of a log folder in order: all segments by number, records in file
// order. Besides each record's own checks, it checks that the log is one sequence: the
// same disk id throughout and sequence numbers +1 per record.
//
// A short, bad or out-of-sequence record in the last segment ends the scan as a torn tail
// (what recovery truncates; see torn_tail()). Anywhere else it is a corrupt log: Next
// returns an EBADMSG Status naming the file and offset.
class LogScanner {
 public:
  static Result<LogScanner> Open(const std::filesystem::path& log_dir);

  // Next record in log order: true with *out filled, or false at the end of the log.
  Result<bool> Next(ScannedRecord* out);

  // After Next returned false: set if the last segment ended in a torn tail.
  const std::optional<TornTail>& torn_tail() const { return torn_tail_; }
  const std::vector<SegmentFile>& segments() const { return segments_; }

 private:
  explicit LogScanner(std::vector<SegmentFile> segments) : segments_(std::move(segments)) {}

  std::vector<SegmentFile> segments_;
  size_t next_segment_ = 0;  // index into segments_ of the segment to open next
  std::optional<SegmentReader> reader_;
  uint64_t current_segment_ = 0;
  bool have_prev_ = false;
  uint32_t disk_id_ = 0;
  uint64_t prev_seq_ = 0;
  std::optional<TornTail> torn_tail_;
};

}  // namespace siterep::tracker
