#include "applier/undo_journal.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "common/crc32c.h"
#include "common/endian.h"
#include "common/file_util.h"

namespace siterep::applier {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr char kPointsFile[] = "points.json";
constexpr std::string_view kUndoSuffix = ".undo";
constexpr uint16_t kKindData = 1;
constexpr uint16_t kKindZeros = 2;
constexpr size_t kCrcAt = 12;
constexpr size_t kFlushBytes = 1u << 20;
constexpr size_t kScanChunk = 1u << 20;

uint32_t RecordCrc(const std::byte* header, std::span<const std::byte> data) {
  static constexpr std::byte kZero[4] = {};
  uint32_t crc = Crc32c(header, kCrcAt);
  crc = Crc32cExtend(crc, kZero, sizeof(kZero));
  crc = Crc32cExtend(crc, header + kCrcAt + 4, kUndoHeaderSize - kCrcAt - 4);
  return Crc32cExtend(crc, data.data(), data.size());
}

bool AllZeros(std::span<const std::byte> data) {
  return std::all_of(data.begin(), data.end(), [](std::byte b) { return b == std::byte{0}; });
}

// Appends one record to out.
void EncodeRecord(uint32_t disk_id, uint64_t block, std::span<const std::byte> content, bool zeros,
                  std::vector<std::byte>* out) {
  const size_t at = out->size();
  out->resize(at + kUndoHeaderSize + (zeros ? 0 : kUndoBlockSize));
  std::byte* h = out->data() + at;
  StoreLe<uint32_t>(h, kUndoMagic);
  StoreLe<uint16_t>(h + 4, zeros ? kKindZeros : kKindData);
  StoreLe<uint16_t>(h + 6, 0);
  StoreLe<uint32_t>(h + 8, disk_id);
  StoreLe<uint32_t>(h + kCrcAt, 0);
  StoreLe<uint64_t>(h + 16, block);
  StoreLe<uint64_t>(h + 24, 0);
  std::span<const std::byte> data;
  if (!zeros) {
    std::memcpy(h + kUndoHeaderSize, content.data(), kUndoBlockSize);
    data = std::span<const std::byte>(h + kUndoHeaderSize, kUndoBlockSize);
  }
  StoreLe<uint32_t>(h + kCrcAt, RecordCrc(h, data));
}

uint64_t PackEntry(uint64_t offset, bool zeros) { return (offset << 1) | (zeros ? 1 : 0); }
uint64_t EntryOffset(uint64_t entry) { return entry >> 1; }
bool EntryZeros(uint64_t entry) { return (entry & 1) != 0; }

std::optional<uint64_t> ParseUndoName(std::string_view name) {
  if (name.size() != 20 + kUndoSuffix.size() || !name.ends_with(kUndoSuffix)) return std::nullopt;
  uint64_t cycle = 0;
  auto [ptr, ec] = std::from_chars(name.data(), name.data() + 20, cycle);
  if (ec != std::errc() || ptr != name.data() + 20) return std::nullopt;
  return cycle;
}

}  // namespace

fs::path UndoJournal::PathOf(uint64_t cycle) const {
  char name[40];
  std::snprintf(name, sizeof(name), "%020llu.undo", static_cast<unsigned long long>(cycle));
  return dir_ / name;
}

std::optional<size_t> UndoJournal::DiskIndex(uint32_t disk_id) const {
  for (size_t i = 0; i < disk_ids_.size(); ++i) {
    if (disk_ids_[i] == disk_id) return i;
  }
  return std::nullopt;
}

Result<std::unique_ptr<UndoJournal>> UndoJournal::Open(const fs::path& dir,
                                                       std::vector<uint32_t> disk_ids) {
  SR_RETURN_IF_ERROR(MakeDirs(dir));
  std::unique_ptr<UndoJournal> j(new UndoJournal(dir, std::move(disk_ids)));
  SR_RETURN_IF_ERROR(j->LoadPoints());
  SR_RETURN_IF_ERROR(j->RemoveUnlisted());
  return j;
}

Status UndoJournal::LoadPoints() {
  const fs::path path = dir_ / kPointsFile;
  if (!fs::exists(path)) return Status::Ok();
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  std::vector<UndoPoint> metas;
  try {
    const json doc = json::parse(text);  // named: a range-for over a temporary's member dangles
    for (const json& p : doc.at("points")) {
      metas.push_back(UndoPoint{p.at("cycle").get<uint64_t>(),
                                p.at("cut_unix_nanos").get<int64_t>(),
                                p.at("retained").get<bool>()});
    }
  } catch (const json::exception& e) {
    return Status::Corrupt(path.string() + ": " + e.what());
  }
  for (const UndoPoint& meta : metas) {
    auto p = std::make_unique<Point>();
    p->meta = meta;
    p->index.resize(disk_ids_.size());
    Status s = ScanFile(*p);
    if (s.code() == ENOENT) {
      // Every point up to this one needs this file: they are lost, the newer ones are not.
      spdlog::error("undo journal {}: {}; recovery points up to cycle {} are dropped",
                    dir_.string(), s.message(), meta.cycle);
      points_.clear();
      continue;
    }
    SR_RETURN_IF_ERROR(s);
    points_.push_back(std::move(p));
  }
  if (points_.size() != metas.size()) SR_RETURN_IF_ERROR(StorePoints());
  return Status::Ok();
}

Status UndoJournal::StorePoints() const {
  json points = json::array();
  for (const auto& p : points_) {
    points.push_back({{"cycle", p->meta.cycle},
                      {"cut_unix_nanos", p->meta.cut_unix_nanos},
                      {"retained", p->meta.retained}});
  }
  return WriteFileAtomic(dir_ / kPointsFile, json{{"points", points}}.dump(2) + "\n");
}

Status UndoJournal::ScanFile(Point& p) {
  const fs::path path = PathOf(p.meta.cycle);
  SR_ASSIGN_OR_RETURN(p.fd, OpenFile(path, O_RDWR));
  const off_t size = ::lseek(p.fd.get(), 0, SEEK_END);
  if (size < 0) return Status::FromErrno(errno, "seek " + path.string());
  std::vector<std::byte> buf;
  uint64_t buf_at = 0;  // file offset of buf[0]
  uint64_t at = 0;      // file offset of the next record
  std::string torn;
  while (at < static_cast<uint64_t>(size)) {
    // Keep at least one whole record in the buffer.
    if (at + kUndoHeaderSize + kUndoBlockSize > buf_at + buf.size() &&
        buf_at + buf.size() < static_cast<uint64_t>(size)) {
      const uint64_t want = std::min<uint64_t>(kScanChunk, static_cast<uint64_t>(size) - at);
      buf.resize(want);
      SR_RETURN_IF_ERROR(PReadAll(p.fd.get(), buf.data(), want, at, path.string()));
      buf_at = at;
    }
    const std::byte* r = buf.data() + (at - buf_at);
    const uint64_t avail = buf_at + buf.size() - at;
    if (avail < kUndoHeaderSize) {
      torn = "short header";
      break;
    }
    const uint16_t kind = LoadLe<uint16_t>(r + 4);
    if (LoadLe<uint32_t>(r) != kUndoMagic || (kind != kKindData && kind != kKindZeros)) {
      torn = "bad magic or kind";
      break;
    }
    const size_t data_size = kind == kKindData ? kUndoBlockSize : 0;
    if (avail < kUndoHeaderSize + data_size) {
      torn = "short data";
      break;
    }
    std::span<const std::byte> data(r + kUndoHeaderSize, data_size);
    if (RecordCrc(r, data) != LoadLe<uint32_t>(r + kCrcAt)) {
      torn = "CRC mismatch";
      break;
    }
    std::optional<size_t> disk = DiskIndex(LoadLe<uint32_t>(r + 8));
    if (!disk) {
      torn = "unknown disk id";
      break;
    }
    // A block appears once per file; keep the first record should it appear twice.
    p.index[*disk].try_emplace(LoadLe<uint64_t>(r + 16), PackEntry(at, kind == kKindZeros));
    at += kUndoHeaderSize + data_size;
  }
  p.end = at;
  if (at < static_cast<uint64_t>(size)) {
    // Records are synced before the images change, so what follows the first bad record
    // was never relied on: the end of an append cut short by a crash.
    spdlog::warn("undo file {}: dropping {} bytes from offset {} ({})", path.string(),
                 static_cast<uint64_t>(size) - at, at, torn);
    if (::ftruncate(p.fd.get(), static_cast<off_t>(at)) != 0) {
      return Status::FromErrno(errno, "truncate " + path.string() + " to " + std::to_string(at));
    }
    if (::fdatasync(p.fd.get()) != 0) return Status::FromErrno(errno, "fdatasync " + path.string());
  }
  return Status::Ok();
}

Status UndoJournal::RemoveUnlisted() {
  std::set<uint64_t> listed;
  for (const auto& p : points_) listed.insert(p->meta.cycle);
  std::error_code ec;
  bool removed = false;
  for (fs::directory_iterator it(dir_, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::optional<uint64_t> cycle = ParseUndoName(name);
    const bool stale = cycle ? listed.count(*cycle) == 0 : name.ends_with(".tmp");
    if (!stale) continue;
    spdlog::info("undo journal {}: removing leftover {}", dir_.string(), name);
    fs::remove(it->path(), ec);
    if (ec) return Status::Error(ec.value(), "remove " + it->path().string() + ": " + ec.message());
    removed = true;
  }
  if (ec) return Status::Error(ec.value(), "list " + dir_.string() + ": " + ec.message());
  return removed ? SyncDir(dir_) : Status::Ok();
}

std::optional<size_t> UndoJournal::Find(uint64_t cycle) const {
  for (size_t i = 0; i < points_.size(); ++i) {
    if (points_[i]->meta.cycle == cycle) return i;
  }
  return std::nullopt;
}

uint64_t UndoJournal::bytes() const {
  uint64_t total = buffer_.size();
  for (const auto& p : points_) total += p->end;
  return total;
}

Status UndoJournal::AddPoint(uint64_t cycle, int64_t cut_unix_nanos, bool retained) {
  if (!points_.empty() && cycle <= points_.back()->meta.cycle) {
    return Status::Invalid("undo journal: point " + std::to_string(cycle) +
                           " is not newer than point " +
                           std::to_string(points_.back()->meta.cycle));
  }
  SR_RETURN_IF_ERROR(Sync());
  auto p = std::make_unique<Point>();
  p->meta = UndoPoint{cycle, cut_unix_nanos, retained};
  p->index.resize(disk_ids_.size());
  const fs::path path = PathOf(cycle);
  SR_ASSIGN_OR_RETURN(p->fd, OpenFile(path, O_RDWR | O_CREAT | O_TRUNC, 0600));
  SR_RETURN_IF_ERROR(SyncDir(dir_));
  points_.push_back(std::move(p));
  Status s = StorePoints();
  if (!s.ok()) {
    points_.pop_back();
    ::unlink(path.c_str());
  }
  return s;
}

Status UndoJournal::SetRetained(size_t i, bool retained) {
  const bool old = points_[i]->meta.retained;
  points_[i]->meta.retained = retained;
  Status s = StorePoints();
  if (!s.ok()) points_[i]->meta.retained = old;
  return s;
}

Status UndoJournal::RemovePoint(size_t i) {
  if (i + 1 == points_.size()) SR_RETURN_IF_ERROR(Sync());
  Point& gone = *points_[i];
  if (i > 0) {
    // Copy into the previous point what it lacks, then make that durable before the
    // chain forgets this point.
    Point& prev = *points_[i - 1];
    std::vector<std::byte> out;
    std::vector<std::byte> block(kUndoBlockSize);
    std::vector<std::tuple<size_t, uint64_t, uint64_t>> added;  // disk, block, entry
    uint64_t out_at = prev.end;
    auto write_out = [&]() -> Status {
      if (out.empty()) return Status::Ok();
      SR_RETURN_IF_ERROR(PWriteAll(prev.fd.get(), out.data(), out.size(), prev.end,
                                   PathOf(prev.meta.cycle).string()));
      prev.end += out.size();
      for (const auto& [disk, b, entry] : added) prev.index[disk].emplace(b, entry);
      out.clear();
      added.clear();
      return Status::Ok();
    };
    for (size_t disk = 0; disk < disk_ids_.size(); ++disk) {
      for (const auto& [b, entry] : gone.index[disk]) {
        if (prev.index[disk].count(b) != 0) continue;
        Status read = ReadEntry(gone, disk, b, entry, block);
        if (read.code() == EBADMSG) return DropThrough(i, read);
        SR_RETURN_IF_ERROR(read);
        const bool zeros = EntryZeros(entry);
        added.emplace_back(disk, b, PackEntry(out_at, zeros));
        const size_t before = out.size();
        EncodeRecord(disk_ids_[disk], b, block, zeros, &out);
        out_at += out.size() - before;
        if (out.size() >= kFlushBytes) SR_RETURN_IF_ERROR(write_out());
      }
    }
    SR_RETURN_IF_ERROR(write_out());
    if (::fdatasync(prev.fd.get()) != 0) {
      return Status::FromErrno(errno, "fdatasync " + PathOf(prev.meta.cycle).string());
    }
  }
  std::unique_ptr<Point> removed = std::move(points_[i]);
  points_.erase(points_.begin() + static_cast<ptrdiff_t>(i));
  Status s = StorePoints();
  if (!s.ok()) {
    points_.insert(points_.begin() + static_cast<ptrdiff_t>(i), std::move(removed));
    return s;
  }
  const fs::path path = PathOf(removed->meta.cycle);
  removed.reset();
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return Status::FromErrno(errno, "remove " + path.string());
  }
  return SyncDir(dir_);
}

Status UndoJournal::DropThrough(size_t i, const Status& why) {
  spdlog::error(
      "undo journal {}: {}; the points up to cycle {} cannot be kept right and are dropped",
      dir_.string(), why.ToString(), points_[i]->meta.cycle);
  std::vector<fs::path> files;
  for (size_t k = 0; k <= i; ++k) files.push_back(PathOf(points_[k]->meta.cycle));
  points_.erase(points_.begin(), points_.begin() + static_cast<ptrdiff_t>(i) + 1);
  if (points_.empty()) {
    buffer_.clear();  // only when the newest went, whose records RemovePoint synced
    buffered_.clear();
  }
  SR_RETURN_IF_ERROR(StorePoints());
  for (const fs::path& f : files) {
    if (::unlink(f.c_str()) != 0 && errno != ENOENT)
      return Status::FromErrno(errno, "remove " + f.string());
  }
  return SyncDir(dir_);
}

Status UndoJournal::KeepOldest(size_t n) {
  if (n >= points_.size()) return Status::Ok();
  // The newest point goes, and with it whatever it has buffered.
  buffer_.clear();
  buffered_.clear();
  std::vector<std::unique_ptr<Point>> removed;
  for (size_t k = n; k < points_.size(); ++k) removed.push_back(std::move(points_[k]));
  points_.resize(n);
  Status s = StorePoints();
  if (!s.ok()) {
    for (auto& p : removed) points_.push_back(std::move(p));
    return s;
  }
  for (auto& p : removed) {
    const fs::path path = PathOf(p->meta.cycle);
    p.reset();
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "remove " + path.string());
    }
  }
  return SyncDir(dir_);
}

std::vector<uint64_t> UndoJournal::BlocksFrom(size_t i, size_t disk) const {
  std::vector<uint64_t> blocks;
  for (size_t k = i; k < points_.size(); ++k) {
    for (const auto& [block, entry] : points_[k]->index[disk]) blocks.push_back(block);
  }
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  return blocks;
}

bool UndoJournal::NewestHas(size_t disk, uint64_t block) const {
  return !points_.empty() && points_.back()->index[disk].count(block) != 0;
}

Status UndoJournal::Save(size_t disk, uint64_t block, std::span<const std::byte> content) {
  if (points_.empty()) return Status::Invalid("undo journal: no point to save a block into");
  Point& p = *points_.back();
  const bool zeros = AllZeros(content);
  const uint64_t at = p.end + buffer_.size();
  EncodeRecord(disk_ids_[disk], block, content, zeros, &buffer_);
  p.index[disk].emplace(block, PackEntry(at, zeros));
  buffered_.emplace_back(disk, block);
  if (buffer_.size() >= kFlushBytes) return Flush();
  return Status::Ok();
}

Status UndoJournal::Flush() {
  if (buffer_.empty()) return Status::Ok();
  Point& p = *points_.back();
  Status s =
      PWriteAll(p.fd.get(), buffer_.data(), buffer_.size(), p.end, PathOf(p.meta.cycle).string());
  if (s.ok()) {
    p.end += buffer_.size();
  } else {
    // The index must only name records that are in the file: forget these blocks (they
    // are saved again when the cycle is retried) and cut off whatever part was written.
    for (const auto& [disk, block] : buffered_) p.index[disk].erase(block);
    if (::ftruncate(p.fd.get(), static_cast<off_t>(p.end)) != 0) {
      spdlog::warn("undo file {}: truncate after a failed write: {}", PathOf(p.meta.cycle).string(),
                   std::strerror(errno));
    }
  }
  buffer_.clear();
  buffered_.clear();
  return s;
}

Status UndoJournal::Sync() {
  if (points_.empty()) return Status::Ok();
  SR_RETURN_IF_ERROR(Flush());
  Point& p = *points_.back();
  if (::fdatasync(p.fd.get()) != 0) {
    return Status::FromErrno(errno, "fdatasync " + PathOf(p.meta.cycle).string());
  }
  return Status::Ok();
}

Status UndoJournal::ReadEntry(const Point& p, size_t disk, uint64_t block, uint64_t entry,
                              std::span<std::byte> out) const {
  const uint64_t at = EntryOffset(entry);
  const size_t size = kUndoHeaderSize + (EntryZeros(entry) ? 0 : kUndoBlockSize);
  std::vector<std::byte> rec(size);
  if (&p == points_.back().get() && at >= p.end) {
    std::memcpy(rec.data(), buffer_.data() + (at - p.end), size);
  } else {
    SR_RETURN_IF_ERROR(PReadAll(p.fd.get(), rec.data(), size, at, PathOf(p.meta.cycle).string()));
  }
  const std::byte* r = rec.data();
  std::span<const std::byte> data(r + kUndoHeaderSize, size - kUndoHeaderSize);
  if (LoadLe<uint32_t>(r) != kUndoMagic || LoadLe<uint32_t>(r + 8) != disk_ids_[disk] ||
      LoadLe<uint64_t>(r + 16) != block || RecordCrc(r, data) != LoadLe<uint32_t>(r + kCrcAt)) {
    return Status::Corrupt(PathOf(p.meta.cycle).string() + " at offset " + std::to_string(at) +
                           ": bad undo record for block " + std::to_string(block));
  }
  if (EntryZeros(entry)) {
    std::memset(out.data(), 0, kUndoBlockSize);
  } else {
    std::memcpy(out.data(), data.data(), kUndoBlockSize);
  }
  return Status::Ok();
}

Result<bool> UndoJournal::ReadAsOf(size_t i, size_t disk, uint64_t block,
                                   std::span<std::byte> out) const {
  for (size_t k = i; k < points_.size(); ++k) {
    const auto& index = points_[k]->index[disk];
    auto it = index.find(block);
    if (it == index.end()) continue;
    SR_RETURN_IF_ERROR(ReadEntry(*points_[k], disk, block, it->second, out));
    return true;
  }
  return false;
}

}  // namespace siterep::applier
