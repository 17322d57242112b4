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

// Opens and locks every image of vm, opens the tracker at epoch (which recovers the logs),
// and builds the backends. Refuses a missing image, an image that is not a regular file, a
// size that is zero or not a multiple of 512, and an image locked by another process.
// archive_dir (may be empty): where shipped log segments go instead of being deleted.
Result<std::unique_ptr<ProtectedVm>> OpenProtectedVm(const VmConfig& vm, uint64_t epoch,
                                                     const std::filesystem::path& archive_dir = {});

// Deletes what a tracker keeps next to vm's images (the change logs "<image>.srlog" and a
// leftover snapshot "<image>.srsnap"). Done when the site stops being the VM's primary
// and before it becomes primary again: a new epoch starts a new log, and an old log's
// records must never be redone into images that changed since.
Status DiscardChangeLogs(const VmConfig& vm);

}  // namespace siterep::control
