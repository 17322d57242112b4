#include "tracker/disk_state.h"

#include <cerrno>
#include <nlohmann/json.hpp>

#include "common/file_util.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

Result<std::optional<DiskState>> LoadDiskState(const fs::path& log_dir) {
  const fs::path path = log_dir / kStateFileName;
  Result<std::string> text = ReadFile(path);
  if (!text.ok()) {
    if (text.status().code() == ENOENT) return std::optional<DiskState>();
    return text.status();
  }
  DiskState state;
  try {
    const nlohmann::json j = nlohmann::json::parse(*text);
    const std::string tracking = j.value("tracking", "log");
    if (tracking == "log") {
      state.tracking = DiskTracking::kLog;
    } else if (tracking == "bitmap") {
      state.tracking = DiskTracking::kBitmap;
    } else {
      return Status::Corrupt(path.string() + ": unknown tracking \"" + tracking + "\"");
    }
    state.resync_required = j.value("resync_required", false);
    state.reason = j.value("reason", "");
    state.last_cycle = j.value("last_cycle", uint64_t{0});
    state.last_seq = j.value("last_seq", uint64_t{0});
    state.last_segment = j.value("last_segment", uint64_t{0});
  } catch (const nlohmann::json::exception& e) {
    return Status::Corrupt(path.string() + ": " + e.what());
  }
  return std::optional<DiskState>(std::move(state));
}

Status SaveDiskState(const fs::path& log_dir, const DiskState& state) {
  nlohmann::json j = {
      {"tracking", std::string(DiskTrackingName(state.tracking))},
      {"resync_required", state.resync_required},
      {"reason", state.reason},
      {"last_cycle", state.last_cycle},
      {"last_seq", state.last_seq},
      {"last_segment", state.last_segment},
  };
  return WriteFileAtomic(log_dir / kStateFileName, j.dump(2) + "\n");
}

}  // namespace siterep::tracker
