#include "tracker/activity_log.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/crc32c.h"
#include "common/file_util.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

namespace {

constexpr uint32_t kMagic = 0x4c415253;  // "SRAL"
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderSize = 64;

struct Header {
  uint32_t magic;
  uint32_t version;
  uint64_t generation;
  uint64_t disk_size;
  uint32_t extent_shift;
  uint32_t count;
  uint32_t crc;
  uint8_t zero[28];
};
static_assert(sizeof(Header) == kHeaderSize);

uint64_t ExtentsOf(uint64_t disk_size) {
  return (disk_size + (uint64_t{1} << ActivityLog::kExtentShift) - 1) >> ActivityLog::kExtentShift;
}

size_t FileSize(uint64_t disk_size) {
  return (kHeaderSize + 4 * ExtentsOf(disk_size) + 4095) / 4096 * 4096;
}

uint32_t CrcOf(Header h, const uint32_t* extents) {
  h.crc = 0;
  return Crc32cExtend(Crc32c(&h, sizeof(h)), extents, 4 * size_t{h.count});
}

// This host's boot id (SITEREP_BOOT_ID instead, for tests that simulate a reboot).
std::string BootId() {
  if (const char* env = std::getenv("SITEREP_BOOT_ID"); env != nullptr && *env != '\0') return env;
  Result<std::string> id = ReadFile("/proc/sys/kernel/random/boot_id");
  if (!id.ok()) return "unknown";
  std::string s = *id;
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

}  // namespace

Result<ActivityLog::Previous> ActivityLog::ReadPrevious(const fs::path& log_dir,
                                                        uint64_t disk_size) {
  Previous p;
  Result<std::string> marker = ReadFile(log_dir / kRunningFileName);
  if (marker.ok()) {
    p.unclean = true;
    p.boot_id = *marker;
    while (!p.boot_id.empty() && p.boot_id.back() == '\n') p.boot_id.pop_back();
    p.host_crashed = p.boot_id != BootId();
  } else if (marker.status().code() != ENOENT) {
    return marker.status();
  }
  Result<std::string> raw = ReadFile(log_dir / kActivityLogFileName);
  if (!raw.ok()) {
    if (raw.status().code() != ENOENT) return raw.status();
    return p;  // no log: extents stays nullopt
  }
  Header h{};
  if (raw->size() < kHeaderSize) return p;
  std::memcpy(&h, raw->data(), sizeof(h));
  if (h.magic != kMagic || h.version != kVersion || h.disk_size != disk_size ||
      h.extent_shift != kExtentShift || h.count > ExtentsOf(disk_size) ||
      raw->size() < kHeaderSize + 4 * size_t{h.count}) {
    return p;
  }
  std::vector<uint32_t> extents(h.count);
  std::memcpy(extents.data(), raw->data() + kHeaderSize, 4 * extents.size());
  if (CrcOf(h, extents.data()) != h.crc) return p;
  std::vector<ByteRange> ranges;
  for (uint32_t e : extents) {
    if (e >= ExtentsOf(disk_size)) return p;
    const uint64_t offset = uint64_t{e} << kExtentShift;
    ranges.push_back(ByteRange{offset, std::min(uint64_t{1} << kExtentShift, disk_size - offset)});
  }
  p.extents = std::move(ranges);
  return p;
}

ActivityLog::ActivityLog(fs::path log_dir, uint64_t disk_size, std::function<Status()> sync_map)
    : log_dir_(std::move(log_dir)),
      disk_size_(disk_size),
      extents_(ExtentsOf(disk_size)),
      sync_map_(std::move(sync_map)),
      state_(std::make_unique<std::atomic<uint8_t>[]>(extents_)) {}

ActivityLog::~ActivityLog() = default;

Result<std::unique_ptr<ActivityLog>> ActivityLog::Start(fs::path log_dir, uint64_t disk_size,
                                                        std::function<Status()> sync_map) {
  std::unique_ptr<ActivityLog> log(
      new ActivityLog(std::move(log_dir), disk_size, std::move(sync_map)));
  const fs::path path = log->log_dir_ / kActivityLogFileName;
  SR_ASSIGN_OR_RETURN(log->fd_, OpenFile(path, O_RDWR | O_CREAT | O_DSYNC | O_CLOEXEC, 0600));
  {
    std::lock_guard lk(log->mu_);
    SR_RETURN_IF_ERROR(log->WriteLocked());  // empty: the caller synced the map
  }
  // The marker last: from here on an unclean stop is told by it.
  SR_RETURN_IF_ERROR(WriteFileAtomic(log->log_dir_ / kRunningFileName, BootId() + "\n"));
  return log;
}

void ActivityLog::Miss(uint64_t extent) {
  std::lock_guard lk(mu_);
  if (state_[extent].load(std::memory_order_relaxed) != kOut) return;  // another thread did
  slots_.push_back(static_cast<uint32_t>(extent));
  Status s = WriteLocked();
  if (!s.ok() && error_.empty()) {
    // Nothing narrower than the disk is known after a host crash from here on: delete the
    // log, so the next start after one compares every block.
    error_ = s.message();
    spdlog::error("{}: activity log not written, a host crash will compare every block: {}",
                  log_dir_.string(), s.ToString());
    fd_.Reset();
    (void)::unlink((log_dir_ / kActivityLogFileName).c_str());
  }
  // Set also when the write failed: the log is gone, so there is nothing to wait for.
  state_[extent].store(kActiveReferenced, std::memory_order_release);
}

void ActivityLog::Trim() {
  std::lock_guard lk(mu_);
  if (slots_.size() <= kSlots || !fd_.valid()) return;
  // No change is in flight: every bit of the extents about to leave is in the map.
  Status synced = sync_map_();
  if (!synced.ok()) {
    spdlog::warn("{}: activity log not trimmed: {}", log_dir_.string(), synced.ToString());
    return;
  }
  while (slots_.size() > kSlots) {
    if (hand_ >= slots_.size()) hand_ = 0;
    const uint32_t e = slots_[hand_];
    if (state_[e].load(std::memory_order_relaxed) == kActiveReferenced) {
      state_[e].store(kActive, std::memory_order_relaxed);  // a second chance
      ++hand_;
      continue;
    }
    state_[e].store(kOut, std::memory_order_relaxed);
    slots_.erase(slots_.begin() + static_cast<ptrdiff_t>(hand_));
  }
  Status s = WriteLocked();
  if (!s.ok()) spdlog::warn("{}: activity log not trimmed: {}", log_dir_.string(), s.ToString());
}

Status ActivityLog::WriteLocked() {
  if (!fd_.valid()) return Status::Error(EIO, "the activity log failed before: " + error_);
  std::vector<std::byte> buf(FileSize(disk_size_));
  Header h{};
  h.magic = kMagic;
  h.version = kVersion;
  h.generation = ++generation_;
  h.disk_size = disk_size_;
  h.extent_shift = kExtentShift;
  h.count = static_cast<uint32_t>(slots_.size());
  h.crc = CrcOf(h, slots_.data());
  std::memcpy(buf.data(), &h, sizeof(h));
  std::memcpy(buf.data() + kHeaderSize, slots_.data(), 4 * slots_.size());
  // One write of the whole file, O_DSYNC: durable when it returns. A torn one fails its
  // CRC at the next start, which then compares every block.
  SR_RETURN_IF_ERROR(
      PWriteAll(fd_.get(), buf.data(), buf.size(), 0, (log_dir_ / kActivityLogFileName).string()));
  writes_.fetch_add(1, std::memory_order_relaxed);
  return Status::Ok();
}

Status ActivityLog::MarkClean() {
  const fs::path marker = log_dir_ / kRunningFileName;
  if (::unlink(marker.c_str()) != 0 && errno != ENOENT) {
    return Status::FromErrno(errno, "delete " + marker.string());
  }
  return SyncDir(log_dir_);
}

bool ActivityLog::over() const {
  std::lock_guard lk(mu_);
  return slots_.size() > kSlots && fd_.valid();
}

std::string ActivityLog::error() const {
  std::lock_guard lk(mu_);
  return error_;
}

}  // namespace siterep::tracker
