#include "tracker/dirty_bitmap.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <boost/interprocess/exceptions.hpp>
#include <cerrno>
#include <cstring>

#include "common/file_util.h"

namespace siterep::tracker {
namespace fs = std::filesystem;
namespace bip = boost::interprocess;

namespace {

// The words are used in host order; the file format says little-endian.
static_assert(std::endian::native == std::endian::little, "dirty bitmap assumes little-endian");

constexpr uint32_t kBitmapMagic = 0x4D425253;  // "SRBM" on disk
constexpr uint32_t kBitmapVersion = 1;

struct FileHeader {
  uint32_t magic;
  uint32_t version;
  uint64_t block_size;
  uint64_t disk_size;
  uint8_t zero[40];
};
static_assert(sizeof(FileHeader) == DirtyBitmap::kFileHeaderSize);

}  // namespace

DirtyBitmap::DirtyBitmap(uint64_t disk_size, fs::path path)
    : disk_size_(disk_size),
      blocks_((disk_size + kBlockSize - 1) / kBlockSize),
      path_(std::move(path)) {}

DirtyBitmap::~DirtyBitmap() = default;

uint64_t DirtyBitmap::WordCount(uint64_t disk_size) {
  const uint64_t blocks = (disk_size + kBlockSize - 1) / kBlockSize;
  return (blocks + 63) / 64;
}

Result<std::unique_ptr<DirtyBitmap>> DirtyBitmap::Open(const fs::path& path, uint64_t disk_size) {
  const uint64_t file_size = kFileHeaderSize + WordCount(disk_size) * 8;
  {
    SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDWR | O_CREAT, 0644));
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, "stat " + path.string());
    FileHeader header{};
    const bool fresh = static_cast<uint64_t>(st.st_size) < kFileHeaderSize;
    // A new file that cannot be made whole goes again: a bitmap file tells the next start
    // that its bits hold what changed, and the caller will mark nothing in this one.
    auto discard = [&](const Status& s) {
      if (fresh && ::unlink(path.c_str()) != 0 && errno != ENOENT) {
        return Status::FromErrno(errno, "remove " + path.string() + " after: " + s.message());
      }
      return s;
    };
    if (!fresh) {
      SR_RETURN_IF_ERROR(PReadAll(fd.get(), &header, sizeof(header), 0, path.string()));
      if (header.magic != kBitmapMagic || header.version != kBitmapVersion) {
        return Status::Corrupt(path.string() + " is not a dirty bitmap (bad magic or version)");
      }
      if (header.block_size != kBlockSize || header.disk_size != disk_size) {
        return Status::Invalid(path.string() + " is a bitmap of a " +
                               std::to_string(header.disk_size) + "-byte disk with " +
                               std::to_string(header.block_size) + "-byte blocks, not of this " +
                               std::to_string(disk_size) + "-byte disk");
      }
    } else {
      // New, or torn at creation (never used): start clean.
      header = FileHeader{kBitmapMagic, kBitmapVersion, kBlockSize, disk_size, {}};
      if (::ftruncate(fd.get(), 0) != 0) {
        return discard(Status::FromErrno(errno, "truncate " + path.string()));
      }
      Status written = PWriteAll(fd.get(), &header, sizeof(header), 0, path.string());
      if (!written.ok()) return discard(written);
    }
    // Every block of the file is allocated before it is mapped: a store into a hole of the
    // mapping on a full file system would kill the process with SIGBUS, where this says
    // ENOSPC and the caller tracks in memory instead.
    if (int err = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(file_size)); err != 0) {
      return discard(Status::FromErrno(
          err, "allocate " + std::to_string(file_size) + " bytes for " + path.string()));
    }
    if (fresh) {
      if (::fsync(fd.get()) != 0) {
        return discard(Status::FromErrno(errno, "fsync " + path.string()));
      }
      Status synced = SyncDir(path.parent_path());
      if (!synced.ok()) return discard(synced);
    }
  }

  std::unique_ptr<DirtyBitmap> bitmap(new DirtyBitmap(disk_size, path));
  try {
    bitmap->mapping_ = std::make_unique<bip::file_mapping>(path.c_str(), bip::read_write);
    bitmap->region_ =
        std::make_unique<bip::mapped_region>(*bitmap->mapping_, bip::read_write, 0, file_size);
  } catch (const bip::interprocess_exception& e) {
    return Status::Error(EIO, "map " + path.string() + ": " + e.what());
  }
  bitmap->words_ = reinterpret_cast<uint64_t*>(
      static_cast<std::byte*>(bitmap->region_->get_address()) + kFileHeaderSize);
  bitmap->CountDirty();
  return bitmap;
}

std::unique_ptr<DirtyBitmap> DirtyBitmap::InMemory(uint64_t disk_size) {
  std::unique_ptr<DirtyBitmap> bitmap(new DirtyBitmap(disk_size, fs::path()));
  bitmap->memory_.assign(WordCount(disk_size), 0);
  bitmap->words_ = bitmap->memory_.data();
  return bitmap;
}

void DirtyBitmap::CountDirty() {
  uint64_t count = 0;
  const uint64_t words = WordCount(disk_size_);
  for (uint64_t w = 0; w < words; ++w) count += std::popcount(words_[w]);
  dirty_blocks_.store(count, std::memory_order_relaxed);
}

void DirtyBitmap::MarkRange(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= disk_size_) return;
  const uint64_t end = std::min(disk_size_, offset + std::min(length, disk_size_ - offset));
  uint64_t block = offset / kBlockSize;
  const uint64_t last = (end - 1) / kBlockSize;
  while (block <= last) {
    const uint64_t word = block / 64;
    const unsigned first_bit = static_cast<unsigned>(block % 64);
    const unsigned bits =
        static_cast<unsigned>(std::min<uint64_t>(64 - first_bit, last - block + 1));
    const uint64_t mask = (bits == 64 ? ~0ull : ((1ull << bits) - 1)) << first_bit;
    std::atomic_ref<uint64_t> ref(words_[word]);
    // Most writes of a busy disk hit blocks already marked this cycle: a load, no locked
    // instruction, no cache line taken from the other cores.
    if ((ref.load(std::memory_order_relaxed) & mask) != mask) {
      const uint64_t old = ref.fetch_or(mask, std::memory_order_relaxed);
      const uint64_t newly = mask & ~old;
      if (newly != 0) dirty_blocks_.fetch_add(std::popcount(newly), std::memory_order_relaxed);
    }
    block += bits;
  }
}

bool DirtyBitmap::IsDirty(uint64_t block) const {
  if (block >= blocks_) return false;
  const uint64_t word =
      std::atomic_ref<uint64_t>(words_[block / 64]).load(std::memory_order_relaxed);
  return (word >> (block % 64)) & 1;
}

uint64_t DirtyBitmap::TakeAll(std::vector<uint64_t>* words) {
  const uint64_t n = WordCount(disk_size_);
  words->assign(n, 0);
  uint64_t taken = 0;
  for (uint64_t w = 0; w < n; ++w) {
    std::atomic_ref<uint64_t> ref(words_[w]);
    if (ref.load(std::memory_order_relaxed) == 0) continue;
    const uint64_t old = ref.exchange(0, std::memory_order_relaxed);
    (*words)[w] = old;
    taken += std::popcount(old);
  }
  // Called with no writer in flight (a cut holds the VM lock exclusively).
  dirty_blocks_.fetch_sub(taken, std::memory_order_relaxed);
  return taken;
}

void DirtyBitmap::MarkWords(std::span<const uint64_t> words) {
  const uint64_t n = std::min<uint64_t>(words.size(), WordCount(disk_size_));
  for (uint64_t w = 0; w < n; ++w) {
    if (words[w] == 0) continue;
    const uint64_t old =
        std::atomic_ref<uint64_t>(words_[w]).fetch_or(words[w], std::memory_order_relaxed);
    const uint64_t newly = words[w] & ~old;
    if (newly != 0) dirty_blocks_.fetch_add(std::popcount(newly), std::memory_order_relaxed);
  }
}

uint64_t DirtyBitmap::word(uint64_t w) const {
  return std::atomic_ref<uint64_t>(words_[w]).load(std::memory_order_relaxed);
}

Status DirtyBitmap::Flush() {
  if (!region_) return Status::Ok();
  if (!region_->flush(0, 0, /*async=*/false)) {
    return Status::FromErrno(errno, "msync " + path_.string());
  }
  return Status::Ok();
}

}  // namespace siterep::tracker
