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

struct HeaderV1 {
  uint32_t magic;
  uint32_t version;
  uint64_t cycle;
  uint64_t disk_size;
  uint64_t words;
  uint32_t crc;
  uint8_t zero[28];
};
static_assert(sizeof(HeaderV1) == 64);

struct HeaderV2 {
  uint32_t magic;
  uint32_t version;
  uint64_t cycle;
  uint64_t disk_size;
  uint64_t words;
  uint32_t crc;
  uint32_t disk_id;
  uint64_t segment;
  uint64_t first_seq;
  uint64_t last_seq;
  uint64_t epoch;
  int64_t cut_unix_nanos;
  int64_t first_change_unix_nanos;
  uint8_t zero1[40];
};
static_assert(sizeof(HeaderV2) == 128);

uint64_t WordsFor(uint64_t disk_size) {
  const uint64_t blocks = (disk_size + DirtyBitmap::kBlockSize - 1) / DirtyBitmap::kBlockSize;
  return (blocks + 63) / 64;
}

uint32_t WordsCrc(const std::vector<uint64_t>& words) {
  return Crc32c(words.data(), words.size() * sizeof(uint64_t));
}

uint32_t WordsCrc(const std::vector<uint64_t>& words, uint32_t crc) {
  return Crc32cExtend(crc, words.data(), words.size() * sizeof(uint64_t));
}

uint32_t HeaderCrc(HeaderV2 h) {
  h.crc = 0;
  return Crc32c(&h, sizeof(h));
}

}  // namespace

Status SaveFrozenSet(const std::filesystem::path& path, uint64_t disk_size, const CutInfo& set,
                     const std::vector<uint64_t>& words) {
  HeaderV2 h{};
  h.magic = kFrozenMagic;
  h.version = 2;
  h.cycle = set.cycle;
  h.disk_size = disk_size;
  h.words = words.size();
  h.disk_id = set.disk_id;
  h.segment = set.segment;
  h.first_seq = set.first_seq;
  h.last_seq = set.last_seq;
  h.epoch = set.epoch;
  h.cut_unix_nanos = set.cut_unix_nanos;
  h.first_change_unix_nanos = set.first_change_unix_nanos;
  h.crc = WordsCrc(words, HeaderCrc(h));
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  Status s = [&]() -> Status {
    SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    iovec iov[2] = {{&h, sizeof(h)},
                    {const_cast<uint64_t*>(words.data()), words.size() * sizeof(uint64_t)}};
    const size_t total = iov[0].iov_len + iov[1].iov_len;
    const ssize_t n = ::pwritev(fd.get(), iov, 2, 0);
    if (n < 0) return Status::FromErrno(errno, "write " + tmp.string());
    if (static_cast<size_t>(n) != total) {
      return Status::Error(ENOSPC, "write " + tmp.string() + ": short write");
    }
    // Durable before the map's bits are cleared (they may reach the disk at any time).
    if (::fdatasync(fd.get()) != 0) return Status::FromErrno(errno, "fdatasync " + tmp.string());
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      return Status::FromErrno(errno, "rename " + tmp.string() + " to " + path.string());
    }
    return SyncDir(path.parent_path());
  }();
  if (!s.ok()) (void)::unlink(tmp.c_str());
  return s;
}

Result<std::optional<FrozenSet>> LoadFrozenSet(const std::filesystem::path& path,
                                               uint64_t disk_size) {
  Result<UniqueFd> fd = OpenFile(path, O_RDONLY | O_CLOEXEC);
  if (!fd.ok()) {
    if (fd.status().code() == ENOENT) return std::optional<FrozenSet>();
    return fd.status();
  }
  FrozenSet f;
  HeaderV2 h{};
  const ssize_t got = ::pread(fd->get(), &h, sizeof(h), 0);
  if (got < 0) return Status::FromErrno(errno, "read " + path.string());
  const uint64_t words = WordsFor(disk_size);
  const size_t header_size = h.version == 1 ? sizeof(HeaderV1) : sizeof(HeaderV2);
  if (static_cast<size_t>(got) < header_size || h.magic != kFrozenMagic ||
      (h.version != 1 && h.version != 2) || h.disk_size != disk_size || h.words != words) {
    f.torn = true;
    return std::optional<FrozenSet>(std::move(f));
  }
  f.version = h.version;
  f.cycle = h.cycle;
  if (h.version == 2) {
    f.disk_id = h.disk_id;
    f.segment = h.segment;
    f.first_seq = h.first_seq;
    f.last_seq = h.last_seq;
    f.epoch = h.epoch;
    f.cut_unix_nanos = h.cut_unix_nanos;
    f.first_change_unix_nanos = h.first_change_unix_nanos;
  }  // the header's fields in the order of CutInfo
  f.words.resize(words);
  const ssize_t n =
      ::pread(fd->get(), f.words.data(), words * sizeof(uint64_t), static_cast<off_t>(header_size));
  if (n < 0) return Status::FromErrno(errno, "read " + path.string());
  const uint32_t crc = h.version == 1 ? WordsCrc(f.words) : WordsCrc(f.words, HeaderCrc(h));
  if (static_cast<uint64_t>(n) != words * sizeof(uint64_t) || crc != h.crc) f.torn = true;
  return std::optional<FrozenSet>(std::move(f));
}

}  // namespace siterep::tracker
