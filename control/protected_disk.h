// ProtectedVm / ProtectedDisk: the primary side of one VM as the daemon holds it — the
// image files (opened and locked), the tracker of its change logs, and the backends that
// blockdev serves. Built by Daemon from the config; owns everything it opens.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "blockdev/image_backend.h"
#include "common/config.h"
#include "common/status.h"
#include "common/unique_fd.h"
#include "tracker/vm_tracker.h"

namespace siterep::control {

struct ProtectedDisk {
  std::string name;
  std::filesystem::path image;
  UniqueFd fd;         // O_RDWR, flock(LOCK_EX) held for the life of the daemon
  UniqueFd direct_fd;  // image_cache = "none": the image O_RDWR|O_DIRECT; else invalid
  uint64_t size = 0;
  std::unique_ptr<blockdev::ImageBackend> backend;
};

struct ProtectedVm {
  const VmConfig* config = nullptr;  // points into the daemon's SiteConfig
  uint64_t epoch = 0;
  std::vector<ProtectedDisk> disks;
  std::unique_ptr<tracker::VmTracker> tracker;  // null when tracking = "off"
};

// Opens and locks every image of vm, reads or creates the VM's persisted epoch under
// state_dir, opens the tracker (which recovers the logs), and builds the backends.
// Refuses a missing image, an image that is not a regular file, a size that is zero or
// not a multiple of 512, and an image locked by another process. archive_dir (may be
// empty): where shipped log segments go instead of being deleted.
Result<std::unique_ptr<ProtectedVm>> OpenProtectedVm(const VmConfig& vm,
                                                     const std::filesystem::path& state_dir,
                                                     const std::filesystem::path& archive_dir = {});

}  // namespace siterep::control
