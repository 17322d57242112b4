// DiskState: what the tracker persists about one disk besides its segments, in
// "<log dir>/state.json" (written atomically: temp file, fsync, rename, fsync dir).
//
//   {"tracking": "log" | "bitmap", "resync_required": bool, "reason": "...",
//    "last_cycle": N, "last_seq": N, "last_segment": N}
//
// The last_* fields are floors for numbering: when segments have been released (deleted
// after shipping) or dropped (bitmap fallback), the next cycle, sequence number and
// segment number still go on above them, so numbers are never reused.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "common/status.h"
#include "tracker/vm_tracker.h"

namespace siterep::tracker {

inline constexpr std::string_view kStateFileName = "state.json";

struct DiskState {
  DiskTracking tracking = DiskTracking::kLog;
  bool resync_required = false;
  std::string reason;
  uint64_t last_cycle = 0;
  uint64_t last_seq = 0;
  uint64_t last_segment = 0;
};

// Reads "<log_dir>/state.json"; nullopt when there is none. A file that does not parse
// is EBADMSG with the path and the parser's message.
Result<std::optional<DiskState>> LoadDiskState(const std::filesystem::path& log_dir);
Status SaveDiskState(const std::filesystem::path& log_dir, const DiskState& state);

}  // namespace siterep::tracker
