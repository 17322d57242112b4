#include "tracker/frozen_set.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <span>

#include "common/crc32c.h"
#include "common/file_util.h"
#include "tracker/dirty_bitmap.h"

namespace siterep::tracker {
namespace {

constexpr uint32_t kFrozenMagic = 0x5a465253;  // "SRFZ"
constexpr uint32_t kFrozenVersion = 1;

struct FrozenHeader {
  uint32_t magic;
  uint32_t version;
  uint64_t cycle;
  uint64_t disk_size;
  uint64_t words;
  uint32_t crc;
  uint8_t zero[28];
};
static_assert(sizeof(FrozenHeader) == 64);

uint64_t WordsFor(uint64_t disk_size) {
  const uint64_t blocks = (disk_size + DirtyBitmap::kBlockSize - 1) / DirtyBitmap::kBlockSize;
  return (blocks + 63) / 64;
}

uint32_t WordsCrc(const std::vector<uint64_t>& words) {
  return Crc32c(std::as_bytes(std::span<const uint64_t>(words)));
}

}  // namespace

Status SaveFrozenSet(const std::filesystem::path& path, uint64_t cycle, uint64_t disk_size,
                     const std::vector<uint64_t>& words) {
  FrozenHeader h{};
  h.magic = kFrozenMagic;
  h.version = kFrozenVersion;
  h.cycle = cycle;
  h.disk_size = disk_size;
  h.words = words.size();
  h.crc = WordsCrc(words);
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  iovec iov[2] = {{&h, sizeof(h)},
                  {const_cast<uint64_t*>(words.data()), words.size() * sizeof(uint64_t)}};
  const size_t total = iov[0].iov_len + iov[1].iov_len;
  const ssize_t n = ::pwritev(fd.get(), iov, 2, 0);
  if (n < 0) return Status::FromErrno(errno, "write " + path.string());
  if (static_cast<size_t>(n) != total) {
    return Status::Error(ENOSPC, "write " + path.string() + ": short write");
  }
  return Status::Ok();
}

Result<std::optional<FrozenSet>> LoadFrozenSet(const std::filesystem::path& path,
                                               uint64_t disk_size) {
  Result<UniqueFd> fd = OpenFile(path, O_RDONLY | O_CLOEXEC);
  if (!fd.ok()) {
    if (fd.status().code() == ENOENT) return std::optional<FrozenSet>();
    return fd.status();
  }
  FrozenSet f;
  FrozenHeader h{};
  const ssize_t got = ::pread(fd->get(), &h, sizeof(h), 0);
  if (got < 0) return Status::FromErrno(errno, "read " + path.string());
  const uint64_t words = WordsFor(disk_size);
  if (got != sizeof(h) || h.magic != kFrozenMagic || h.version != kFrozenVersion ||
      h.disk_size != disk_size || h.words != words) {
    f.torn = true;
    return std::optional<FrozenSet>(std::move(f));
  }
  f.cycle = h.cycle;
  f.words.resize(words);
  const ssize_t n = ::pread(fd->get(), f.words.data(), words * sizeof(uint64_t), sizeof(h));
  if (n < 0) return Status::FromErrno(errno, "read " + path.string());
  if (static_cast<uint64_t>(n) != words * sizeof(uint64_t) || WordsCrc(f.words) != h.crc) {
    f.torn = true;
  }
  return std::optional<FrozenSet>(std::move(f));
}

}  // namespace siterep::tracker
