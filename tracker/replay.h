// Replay: applying change-log records to an image file. Used by recovery (redo of the
// records after the last cut), by `siterep-log replay`, and by tests that check that
// replaying a log onto a copy of the pre-image gives the current image.
//
// Every record is verified before it is applied (CRC by the reader, bounds against the
// target's size here); a bad record stops the replay with a Status that says which file,
// offset and sequence number. Thread-compatible (no shared state).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>

#include "common/status.h"
#include "tracker/log_format.h"
#include "tracker/log_reader.h"

namespace siterep::tracker {

// Applies one verified record to fd, the image of image_size bytes: a write is pwritten,
// a discard punches a hole (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE; zeros are written where the
// file system cannot punch), a cut changes nothing. A range past image_size is EBADMSG.
Status ApplyRecord(int fd, uint64_t image_size, const RecordHeader& header,
                   std::span<const std::byte> payload);

struct ReplayOptions {
  // Stop after the cut record of this cycle (which must be in the log); nullopt: apply
  // every record, including those after the last cut.
  std::optional<uint64_t> through_cycle;
};

struct ReplayResult {
  uint64_t records = 0;  // records read (cuts included)
  uint64_t writes = 0;
  uint64_t discards = 0;
  uint64_t cuts = 0;
  uint64_t bytes_written = 0;
  uint64_t first_seq = 0;  // 0 when the log is empty
  uint64_t last_seq = 0;
  uint64_t last_cycle = 0;            // cycle of the last cut applied (0 if none)
  std::optional<TornTail> torn_tail;  // the last segment ended in a torn tail (not applied)
};

// Applies the records of the log folder log_dir to target_fd in log order, then
// fdatasyncs it.
Result<ReplayResult> ReplayLogToFd(const std::filesystem::path& log_dir, int target_fd,
                                   const ReplayOptions& options = {});
// Same, opening target (which must exist) read-write.
Result<ReplayResult> ReplayLogToFile(const std::filesystem::path& log_dir,
                                     const std::filesystem::path& target,
                                     const ReplayOptions& options = {});

}  // namespace siterep::tracker
