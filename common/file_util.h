// Small durable-file helpers used by every module that persists state.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "common/status.h"
#include "common/unique_fd.h"

namespace siterep {

// open(2) with a Status carrying the path.
Result<UniqueFd> OpenFile(const std::filesystem::path& path, int flags, mode_t mode = 0644);
// fsync of a directory, so that a create/rename/unlink in it is durable.
Status SyncDir(const std::filesystem::path& dir);
// Writes contents to path atomically and durably: temp file, fsync, rename, fsync dir.
Status WriteFileAtomic(const std::filesystem::path& path, std::string_view contents);
// Reads a whole (small) file.
Result<std::string> ReadFile(const std::filesystem::path& path);
// mkdir -p with a Status.
Status MakeDirs(const std::filesystem::path& dir);
// pwrite/pread the whole buffer, retrying on short counts and EINTR.
Status PWriteAll(int fd, const void* data, size_t length, uint64_t offset, std::string_view what);
Status PReadAll(int fd, void* data, size_t length, uint64_t offset, std::string_view what);

}  // namespace siterep
