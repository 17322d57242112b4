#include "common/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

namespace siterep {

namespace fs = std::filesystem;

Result<UniqueFd> OpenFile(const fs::path& path, int flags, mode_t mode) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  if (fd < 0) return Status::FromErrno(errno, "open " + path.string());
  return UniqueFd(fd);
}

Status SyncDir(const fs::path& dir) {
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(dir, O_RDONLY | O_DIRECTORY));
  if (::fsync(fd.get()) != 0) return Status::FromErrno(errno, "fsync " + dir.string());
  return Status::Ok();
}

Status WriteFileAtomic(const fs::path& path, std::string_view contents) {
  fs::path tmp = path;
  tmp += ".tmp";
  {
    SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600));
    SR_RETURN_IF_ERROR(PWriteAll(fd.get(), contents.data(), contents.size(), 0, tmp.string()));
    if (::fsync(fd.get()) != 0) return Status::FromErrno(errno, "fsync " + tmp.string());
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + tmp.string() + " to " + path.string());
  }
  return SyncDir(path.parent_path().empty() ? fs::path(".") : path.parent_path());
}

Result<std::string> ReadFile(const fs::path& path) {
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDONLY));
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read " + path.string());
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

Status MakeDirs(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Status::Error(ec.value(), "create directory " + dir.string() + ": " + ec.message());
  return Status::Ok();
}

Status PWriteAll(int fd, const void* data, size_t length, uint64_t offset, std::string_view what) {
  const char* p = static_cast<const char*>(data);
  while (length > 0) {
    ssize_t n = ::pwrite(fd, p, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, std::string("write ") + std::string(what) + " at offset " +
                                          std::to_string(offset));
    }
    p += n;
    length -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status PReadAll(int fd, void* data, size_t length, uint64_t offset, std::string_view what) {
  char* p = static_cast<char*>(data);
  while (length > 0) {
    ssize_t n = ::pread(fd, p, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, std::string("read ") + std::string(what) + " at offset " +
                                          std::to_string(offset));
    }
    if (n == 0) {
      return Status::Error(EIO, std::string("read ") + std::string(what) + ": unexpected end at offset " +
                                    std::to_string(offset));
    }
    p += n;
    length -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

}  // namespace siterep
