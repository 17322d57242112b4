// Mount point checks for FuseFs::Mount: what an operator gets told before anything is
// mounted. Called once per mount from the thread that mounts.
#pragma once

#include <filesystem>
#include <vector>

#include "common/status.h"

namespace siterep::blockdev {

// Makes path ready to be mounted on and returns its canonical form:
// - missing: created (with its parents);
// - a stale FUSE mount (stat gives ENOTCONN: its daemon was killed): ENOTCONN, with the
//   fusermount3 -u command that clears it;
// - not a directory: ENOTDIR;
// - already a mount point (of anything, including a bind mount): EBUSY.
Result<std::filesystem::path> PrepareMountpoint(const std::filesystem::path& path);

// Every mount point of this process's mount namespace (/proc/self/mountinfo, unescaped).
std::vector<std::filesystem::path> ListMountPoints();

// True if canonical_path is a mount point: its device differs from its parent's, it is
// "/", or /proc/self/mountinfo lists it.
bool IsMountPoint(const std::filesystem::path& canonical_path);

}  // namespace siterep::blockdev
