// DiskLog's part in a snapshot (VmTracker::StartSnapshot / EndSnapshot): the way back
// from the dirty bitmap to the log, the blocks of the unreleased log, and the end of a
// resync. See disk_log.h; split from disk_log.cc to keep each file one concern.
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/file_util.h"
#include "tracker/disk_log.h"
#include "tracker/log_reader.h"
#include "tracker/snapshot.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kResyncingReason = "resynchronising";
constexpr std::string_view kInterruptedReason = "resync interrupted";

// The kSnapshotBlockSize blocks with a dirty bit, as sorted, merged ranges.
std::vector<ByteRange> BitmapBlocks(const DirtyBitmap& bitmap, uint64_t size) {
  constexpr uint64_t kBits = kSnapshotBlockSize / DirtyBitmap::kBlockSize;  // per block
  static_assert(kSnapshotBlockSize % DirtyBitmap::kBlockSize == 0 && 64 % kBits == 0);
  constexpr uint64_t kMask = (uint64_t{1} << kBits) - 1;
  std::vector<ByteRange> out;
  for (uint64_t w = 0; w < bitmap.word_count(); ++w) {
    const uint64_t word = bitmap.word(w);
    if (word == 0) continue;
    for (uint64_t k = 0; k < 64 / kBits; ++k) {
      if (((word >> (k * kBits)) & kMask) == 0) continue;
      const uint64_t start = (w * 64 + k * kBits) * DirtyBitmap::kBlockSize;
      if (start >= size) break;
      const uint64_t stop = std::min(size, start + kSnapshotBlockSize);
      if (!out.empty() && out.back().offset + out.back().length == start) {
        out.back().length = stop - out.back().offset;
      } else {
        out.push_back(ByteRange{start, stop - start});
      }
    }
  }
  return out;
}

}  // namespace

bool DiskLog::tracking_with_bitmap() const {
  std::lock_guard lk(mu_);
  return mode_ == Mode::kBitmap;
}

bool DiskLog::resync_required() const {
  std::lock_guard lk(mu_);
  return resync_required_;
}

DiskLog::ResyncStart DiskLog::ReturnToLog(uint64_t cycle) {
  ResyncStart out;
  DirtyBitmap* bitmap;
  {
    std::lock_guard lk(mu_);
    out.last_seq = last_seq_;
    out.last_segment = last_segment_;
    if (mode_ != Mode::kBitmap || stop_) {
      out.all_dirty = true;  // not a disk to return (the caller checks): claim nothing
      return out;
    }
    bitmap = bitmap_.get();
  }
  // No appender marks the bitmap now (the caller holds the VM lock exclusively).
  if (bitmap == nullptr || bitmap->dirty_blocks() >= bitmap->block_count()) {
    out.all_dirty = true;
  } else {
    out.dirty = BitmapBlocks(*bitmap, opts_.size);
  }

  // 1. A new, empty map. Until state.json says "log", the next Open is in bitmap mode
  //    and deletes it.
  const fs::path map_path = opts_.log_dir / kMapFileName;
  if (::unlink(map_path.c_str()) != 0 && errno != ENOENT) {
    spdlog::error(
        "disk {}: cannot return to the change log, staying with the dirty bitmap: "
        "delete {}: {}",
        opts_.name, map_path.string(), std::strerror(errno));
    return out;
  }
  Result<std::unique_ptr<DirtyBitmap>> map = DirtyBitmap::Open(map_path, opts_.size);
  if (!map.ok()) {
    spdlog::error("disk {}: cannot return to the change log, staying with the dirty bitmap: {}",
                  opts_.name, map.status().ToString());
    return out;
  }

  std::unique_ptr<DirtyBitmap> old;
  {
    std::unique_lock lk(mu_);
    // A Flush leader syncs the bitmap without the VM lock: let it be done before the mode
    // changes.
    sync_cv_.wait(lk, [&] { return !sync_running_; });
    mode_ = Mode::kLog;
    map_ = std::move(*map);
    changed_ = false;
    last_cycle_ = std::max(last_cycle_, cycle);
    resync_required_ = true;
    reason_ = std::string(kResyncingReason);
    resync_all_dirty_ = out.all_dirty;
    resync_dirty_ = out.dirty;
    // No segment carries the numbers before the next one: state.json does.
    floors_.last_seq = std::max(floors_.last_seq, last_seq_);
    floors_.last_cycle = std::max(floors_.last_cycle, last_cycle_);
    floors_.last_segment = std::max(floors_.last_segment, out.last_segment);
    old = std::move(bitmap_);
  }
  out.logging = true;
  spdlog::info("disk {}: back to the change log at cycle {}, resynchronising", opts_.name, cycle);

  // 2. state.json, then 3. the bitmap file. A crash before 3 leaves a bitmap file, so the
  //    next Open is in bitmap mode and marks the new log's blocks in it: a superset.
  const fs::path bitmap_path = opts_.log_dir / kBitmapFileName;
  const bool persistent = old && old->persistent();
  old.reset();
  Status s = PersistState();
  if (!s.ok()) {
    spdlog::error("disk {}: {}; the dirty bitmap file stays (the next start uses it)", opts_.name,
                  s.ToString());
    return out;
  }
  if (persistent && ::unlink(bitmap_path.c_str()) != 0 && errno != ENOENT) {
    spdlog::error("disk {}: delete {}: {}", opts_.name, bitmap_path.string(), std::strerror(errno));
  }
  Status synced = SyncDir(opts_.log_dir);
  if (!synced.ok()) spdlog::error("disk {}: {}", opts_.name, synced.ToString());
  return out;
}

Result<std::vector<ByteRange>> DiskLog::ChangedBlocksThrough(uint64_t through) const {
  std::vector<Unreleased> entries;
  {
    std::lock_guard lk(mu_);
    for (const Unreleased& u : unreleased_) {
      if (u.seg.number <= through) entries.push_back(u);
    }
  }
  std::vector<ByteRange> ranges;
  size_t compact_at = 1 << 16;  // merge as we go, so a long log needs little memory
  auto add = [&](uint64_t offset, uint64_t length) {
    ranges.push_back(ByteRange{offset, length});
    if (ranges.size() >= compact_at) {
      ranges = ToBlockRanges(std::move(ranges), opts_.size);
      compact_at = std::max(compact_at, 2 * ranges.size());
    }
  };
  for (const Unreleased& u : entries) {
    if (u.cut) {
      const std::vector<uint64_t>& words = *u.cut->frozen;
      for (uint64_t w = 0; w < words.size(); ++w) {
        for (uint64_t bits = words[w]; bits != 0; bits &= bits - 1) {
          const uint64_t block = 64 * w + static_cast<uint64_t>(__builtin_ctzll(bits));
          add(block * DirtyBitmap::kBlockSize, DirtyBitmap::kBlockSize);
        }
      }
      continue;
    }
    Result<SegmentReader> reader = SegmentReader::Open(u.path);
    if (!reader.ok()) {
      if (reader.status().code() == ENOENT) continue;  // released meanwhile: on the replica
      return reader.status();
    }
    for (;;) {
      ParsedRecord rec;
      std::string why;
      SR_ASSIGN_OR_RETURN(ReadStatus st, reader->Next(&rec, &why));
      if (st == ReadStatus::kEnd) break;
      if (st != ReadStatus::kRecord) {
        return Status::Corrupt(u.path.string() + " at offset " + std::to_string(reader->offset()) +
                               ": " + why);
      }
      if (rec.header.kind != RecordKind::kCut) add(rec.header.offset, rec.header.length);
    }
  }
  return ToBlockRanges(std::move(ranges), opts_.size);
}

Status DiskLog::EndResync(bool completed) {
  {
    std::lock_guard lk(mu_);
    // In bitmap mode (a fall back since the cut), the bitmap holds what is left to do.
    if (mode_ != Mode::kLog || !resync_required_) return Status::Ok();
    resync_dirty_.clear();
    if (completed) {
      resync_required_ = false;
      reason_.clear();
      resync_all_dirty_ = false;
    } else {
      reason_ = std::string(kInterruptedReason);
      resync_all_dirty_ = true;
    }
  }
  Status s = PersistState();
  if (!s.ok()) return s.WithContext("end the resync of disk " + opts_.name);
  return Status::Ok();
}

}  // namespace siterep::tracker
