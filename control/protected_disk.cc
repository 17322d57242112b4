#include "control/protected_disk.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "common/file_util.h"

namespace siterep::control {

namespace fs = std::filesystem;

namespace {

Status OpenImage(const DiskConfig& config, const std::string& vm, ImageCache cache,
                 ProtectedDisk* disk) {
  const std::string what = "VM " + vm + " disk " + config.name + ": image " + config.image.string();
  int fd = ::open(config.image.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, what);
  disk->fd.Reset(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) return Status::FromErrno(errno, what);
  if (!S_ISREG(st.st_mode)) return Status::Invalid(what + " is not a regular file");
  if (st.st_size == 0 || st.st_size % 512 != 0) {
    return Status::Invalid(what + " has size " + std::to_string(st.st_size) +
                           "; a disk image must be a non-zero multiple of 512 bytes");
  }
  // One siterepd per image: a second writer would corrupt the log's order.
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return Status::Error(EBUSY,
                           what + " is already protected by another siterepd (file lock held)");
    }
    return Status::FromErrno(errno, what + ": flock");
  }
  // image_cache = "none": aligned guest I/O bypasses the host page cache
  // (blockdev/image_backend.h). A file system without O_DIRECT keeps the cached path.
  if (cache == ImageCache::kNone) {
    int direct = ::open(config.image.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
    if (direct >= 0) {
      disk->direct_fd.Reset(direct);
    } else {
      spdlog::warn("{}: no O_DIRECT ({}); guest I/O goes through the page cache", what,
                   std::strerror(errno));
    }
  }
  disk->name = config.name;
  disk->image = config.image;
  disk->size = static_cast<uint64_t>(st.st_size);
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<ProtectedVm>> OpenProtectedVm(const VmConfig& config, uint64_t epoch,
                                                     const fs::path& archive_dir) {
  auto vm = std::make_unique<ProtectedVm>();
  vm->config = &config;
  for (const DiskConfig& dc : config.disks) {
    ProtectedDisk disk;
    SR_RETURN_IF_ERROR(OpenImage(dc, config.name, config.image_cache, &disk));
    vm->disks.push_back(std::move(disk));
  }
  vm->epoch = epoch;

  if (config.tracking == TrackingMode::kLog) {
    tracker::VmTrackerOptions options;
    options.vm = config.name;
    options.epoch = vm->epoch;
    // A consistency group's VMs are cut together by the daemon (GroupCutLoop), at once.
    options.cycle =
        config.consistency_group.empty() ? config.frequency : std::chrono::milliseconds(0);
    if (!archive_dir.empty()) options.archive_dir = archive_dir / config.name;
    options.cow_limit = config.cow_limit;
    for (const ProtectedDisk& disk : vm->disks) {
      fs::path log_dir = disk.image;
      log_dir += ".srlog";
      options.disks.push_back({disk.name, disk.fd.get(), disk.size, log_dir});
    }
    auto tracker = tracker::VmTracker::Open(std::move(options));
    if (!tracker.ok()) return tracker.status().WithContext("VM " + config.name);
    vm->tracker = std::move(tracker).value();
  }
  for (size_t i = 0; i < vm->disks.size(); ++i) {
    ProtectedDisk& disk = vm->disks[i];
    tracker::WriteObserver* observer = vm->tracker ? &vm->tracker->observer(i) : nullptr;
    disk.backend = std::make_unique<blockdev::ImageBackend>(disk.fd.get(), disk.size, observer,
                                                            disk.direct_fd.get());
  }
  return vm;
}

}  // namespace siterep::control

namespace siterep::control {

Status DiscardChangeLogs(const VmConfig& vm) {
  for (const DiskConfig& d : vm.disks) {
    for (const char* suffix : {".srlog", ".srsnap"}) {
      fs::path p = d.image;
      p += suffix;
      std::error_code ec;
      fs::remove_all(p, ec);
      if (ec) return Status::FromErrno(ec.value(), "remove " + p.string());
    }
  }
  return Status::Ok();
}

}  // namespace siterep::control
