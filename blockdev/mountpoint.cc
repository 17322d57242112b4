#include "blockdev/mountpoint.h"

#include <sys/stat.h>

#include <cerrno>
#include <fstream>
#include <sstream>
#include <string>

#include "common/file_util.h"

namespace siterep::blockdev {

namespace fs = std::filesystem;

namespace {

// mountinfo escapes space, tab, newline and backslash as \ooo (octal).
std::string UnescapeMountinfo(const std::string& field) {
  std::string out;
  out.reserve(field.size());
  for (size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size()) {
      const char a = field[i + 1], b = field[i + 2], c = field[i + 3];
      if (a >= '0' && a <= '3' && b >= '0' && b <= '7' && c >= '0' && c <= '7') {
        out.push_back(static_cast<char>((a - '0') * 64 + (b - '0') * 8 + (c - '0')));
        i += 3;
        continue;
      }
    }
    out.push_back(field[i]);
  }
  return out;
}

}  // namespace

std::vector<fs::path> ListMountPoints() {
  std::vector<fs::path> out;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw": field 5 is the
    // mount point.
    std::istringstream fields(line);
    std::string id, parent, dev, root, mount_point;
    if (fields >> id >> parent >> dev >> root >> mount_point) {
      out.emplace_back(UnescapeMountinfo(mount_point));
    }
  }
  return out;
}

bool IsMountPoint(const fs::path& canonical_path) {
  struct stat self {};
  struct stat parent {};
  if (::stat(canonical_path.c_str(), &self) != 0) return false;
  const fs::path parent_path = canonical_path.parent_path();
  if (::stat(parent_path.c_str(), &parent) != 0) return false;
  if (self.st_dev != parent.st_dev) return true;
  if (self.st_ino == parent.st_ino) return true;  // "/"
  for (const fs::path& mount_point : ListMountPoints()) {
    if (mount_point == canonical_path) return true;
  }
  return false;
}

Result<fs::path> PrepareMountpoint(const fs::path& path) {
  const std::string shown = path.string();
  if (path.empty()) return Status::Invalid("mountpoint is empty");
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOTCONN) {
      return Status::Error(ENOTCONN, "mountpoint " + shown +
                                         " is a stale FUSE mount (its daemon is gone); "
                                         "clear it with `fusermount3 -u " +
                                         shown + "` and try again");
    }
    if (err != ENOENT) return Status::FromErrno(err, "mountpoint " + shown);
    SR_RETURN_IF_ERROR(MakeDirs(path).WithContext("create mountpoint"));
    if (::stat(path.c_str(), &st) != 0) return Status::FromErrno(errno, "mountpoint " + shown);
  }
  if (!S_ISDIR(st.st_mode)) {
    return Status::Error(ENOTDIR, "mountpoint " + shown + " is not a directory");
  }
  std::error_code ec;
  fs::path canonical = fs::canonical(path, ec);
  if (ec) return Status::Error(ec.value(), "mountpoint " + shown + ": " + ec.message());
  if (IsMountPoint(canonical)) {
    return Status::Error(EBUSY, "mountpoint " + shown +
                                    " is already a mount point (another siterepd, or "
                                    "something else mounted there); unmount it or choose "
                                    "another mountpoint");
  }
  return canonical;
}

}  // namespace siterep::blockdev
