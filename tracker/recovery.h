// Recovery of one disk's change log when the tracker opens it (after a clean stop, a
// kill -9 or a crash):
//  1. the last segment (the one that was open) is scanned. Appenders write their records
//     concurrently into ranges reserved in seq order, so after a kill -9 the segment may
//     hold holes: ranges never (or partly) written, with complete records after them. At
//     the first short, bad or out-of-sequence record, the rest of the file is searched for
//     complete records of this disk with greater seqs (FindRecordsPastHoles). Those are
//     kept: their image writes may have happened. The holes are dropped: their records'
//     image writes never started (a record is written before its apply). If any are kept,
//     the segment is rewritten compactly (good prefix, then the kept records renumbered to
//     consecutive seqs; unshipped, so renumbering is safe) by write-then-rename; otherwise
//     it is truncated at the first bad record (the torn tail). Both are logged;
//  2. every write and discard after the last cut is redone into the image, which is then
//     fdatasynced. A change holds the VM lock until its apply returns and a cut takes it
//     exclusively, so every change before the last cut is already in the image; changes
//     after it may have reached the log but not the image. Redo is idempotent;
//  3. the other (sealed) segments are checked to end in a cut record, and become the
//     sealed segment list;
//  4. if the last segment ends in a cut it is sealed too, and a new empty segment is
//     created, so that the result always names an open segment that exists.
// Sequence and cycle numbers continue after the largest found (or the state.json floors).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "common/status.h"
#include "tracker/disk_state.h"
#include "tracker/segment_source.h"

namespace siterep::tracker {

struct RecoveryInput {
  std::string disk_name;  // for messages and SealedSegment::disk
  uint32_t disk_id = 0;
  std::filesystem::path log_dir;  // must exist
  int image_fd = -1;              // borrowed; O_DIRECT is fine (redo uses its own fd then)
  uint64_t image_size = 0;
  DiskState floors;  // numbering floors from state.json (defaults when there is none)
};

struct RecoveredLog {
  std::vector<SealedSegment> sealed;  // in log order
  uint64_t open_segment = 0;          // number of the segment to append to (exists)
  uint64_t open_bytes = 0;            // its size
  uint64_t open_first_seq = 0;        // seq of its first record; 0 when it is empty
  uint64_t last_seq = 0;              // the next record gets last_seq + 1
  uint64_t last_cut_seq = 0;          // seq of the last cut record (or the floor)
  uint64_t last_cycle = 0;
  int64_t last_cut_unix_nanos = 0;
  int64_t last_cut_first_change_unix_nanos = 0;
  uint64_t truncated_bytes = 0;  // torn tail dropped from the last segment
  uint64_t redone = 0;           // records redone into the image
};

// Runs the steps above. Errors: EBADMSG when a sealed segment is damaged (the caller
// falls back to the bitmap; the redo of step 2 has been done by then), EINVAL when the
// folder holds another disk's log, other codes for I/O errors, each naming the file.
Result<RecoveredLog> RecoverLog(const RecoveryInput& in);

}  // namespace siterep::tracker
