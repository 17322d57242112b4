// Recovery of the segment files an older version left in a disk's change log folder,
// when the tracker opens it (this version writes no segments: disk_log.h). An older
// version wrote a cycle's segment to "<n>.seg.tmp" and renamed it once durable, so
//  1. "*.tmp" files (unfinished segments, and cut files not renamed: disk_log.h) and
//     "*.compact" files are deleted;
//  2. every segment must end in a cut record, with sequence numbers going on from the
//     segment before; a damaged one is an error (the caller falls back to the bitmap);
//  3. on the first open by this version (legacy_open_segment), a last segment that does not
//     end in a cut is the open segment of an older version's write-ahead log: the blocks of
//     its complete records are marked in the map (those changes are in the image, or were
//     never acknowledged), and the file is deleted (an empty one too). Otherwise it is
//     damage, as in step 2.
// Sequence and cycle numbers continue after the largest found (or the state.json floors).
// The map and the frozen set are DiskLog's; this file only reads segments.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "common/status.h"
#include "tracker/dirty_bitmap.h"
#include "tracker/disk_state.h"
#include "tracker/segment_source.h"

namespace siterep::tracker {

struct RecoveryInput {
  std::string disk_name;  // for messages and SealedSegment::disk
  uint32_t disk_id = 0;
  std::filesystem::path log_dir;     // must exist
  DiskState floors;                  // numbering floors from state.json (defaults when none)
  DirtyBitmap* map = nullptr;        // where step 3 marks blocks; must not be null
  bool legacy_open_segment = false;  // the folder has no changed-block map yet (step 3)
};

struct RecoveredSegment {
  SealedSegment segment;
  std::filesystem::path path;
};

struct RecoveredLog {
  std::vector<RecoveredSegment> sealed;  // in log order
  uint64_t last_seq = 0;              // the next record gets last_seq + 1
  uint64_t last_segment = 0;          // the next segment gets last_segment + 1
  uint64_t last_cycle = 0;
  int64_t last_cut_unix_nanos = 0;
  int64_t last_cut_first_change_unix_nanos = 0;
  uint64_t upgraded_records = 0;  // step 3: records whose blocks went into the map
};

// Runs the steps above. Errors: EBADMSG when a segment is damaged, EINVAL when the folder
// holds another disk's log, other codes for I/O errors, each naming the file.
Result<RecoveredLog> RecoverLog(const RecoveryInput& in);

// The blocks that the write and discard records of the segment at path touch are marked
// in map; returns how many records it read. A torn or bad record ends the scan (strict:
// EBADMSG naming the file and offset; not strict: the records before it count).
Result<uint64_t> MarkSegmentBlocks(const std::filesystem::path& path, DirtyBitmap& map,
                                   bool strict);

}  // namespace siterep::tracker
