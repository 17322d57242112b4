// FuseFs: the FUSE file system (libfuse3 low-level API, multi-threaded loop) that
// exposes every disk as "<mountpoint>/<vm>/<disk>": a fixed-size regular file served by
// a DiskBackend.
//
// Supported: lookup, getattr, readdir, open, read, write, flush, fsync (fsync/fdatasync
// call DiskBackend::Flush), fallocate with FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE
// (discard; plain allocation inside the disk is accepted as a no-op), statfs, release.
// Changing the size (truncate, fallocate past the end) is refused with EPERM; a write or
// read past the end gets ENOSPC / a short read. Large requests come whole (max_write =
// max_pages = 1 MiB); O_DIRECT opens are served with async direct I/O.
//
// The tree may change while mounted (AddDisk / RemoveDisk), for failover in later
// issues. Mount checks the mountpoint first: missing (created), not a directory, already
// a mount point, or a stale FUSE mount (ENOTCONN) each give a clear error.
// Threads: Run() blocks in the FUSE loop; Stop() may be called from any thread (not from
// a signal handler); the destructor unmounts.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "blockdev/backend.h"
#include "common/status.h"

namespace siterep::blockdev {

struct ExportedDisk {
  std::string vm;
  std::string disk;
  DiskBackend* backend = nullptr;  // borrowed; must outlive the mount or RemoveDisk
};

struct FuseOptions {
  unsigned max_threads = 16;   // FUSE worker threads
  bool allow_other = true;     // let users other than root (qemu) open the disks
};

class FuseFs {
 public:
  // Mounts the file system at mountpoint (created if missing) and exports disks.
  static Result<std::unique_ptr<FuseFs>> Mount(const std::filesystem::path& mountpoint,
                                              std::vector<ExportedDisk> disks,
                                              FuseOptions options = {});
  ~FuseFs();  // Stop(), wait for Run() to return, unmount

  // Serves requests until Stop() or an external unmount. Returns the loop's status.
  Status Run();
  // Makes Run() return after the requests in flight are answered. Thread-safe.
  void Stop();

  Status AddDisk(ExportedDisk disk);
  // Open files of a removed disk get EIO from then on. Waits for the requests in flight.
  Status RemoveDisk(const std::string& vm, const std::string& disk);
  // Drops the pages of vm/disk that the kernel caches for buffered opens (a loop device):
  // call it when the backend's contents changed other than through the mount (a DiskSlot
  // got an inner backend with other contents). ENOENT if there is no such disk. Blocks
  // while a buffered write to the disk is in flight (the kernel holds its pages locked), so
  // not while the disk's writes are held (SlotMode::kHold).
  Status DropCache(const std::string& vm, const std::string& disk);

 private:
  class Impl;
  explicit FuseFs(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace siterep::blockdev
