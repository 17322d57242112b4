// DiskLog's fall back from the change log to the dirty bitmap, and its persisted state
// (state.json). See disk_log.h; split from disk_log.cc to keep each file one concern.
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "common/file_util.h"
#include "tracker/disk_log.h"
#include "tracker/frozen_set.h"
#include "tracker/log_reader.h"
#include "tracker/snapshot.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

void DiskLog::FinishFallback() {
  if (!fallback_pending()) return;
  std::string reason;
  std::vector<ByteRange> resync_dirty;  // a resync in progress: still to be sent
  bool resync_all_dirty;
  std::vector<std::shared_ptr<const FrozenCut>> cuts;  // unreleased and pending
  {
    std::unique_lock lk(mu_);
    if (mode_ != Mode::kSwitching) return;
    reason = reason_;
    resync_dirty = std::move(resync_dirty_);
    resync_dirty_.clear();
    resync_all_dirty = std::exchange(resync_all_dirty_, false);
    for (const Unreleased& u : unreleased_) {
      if (u.cut) cuts.push_back(u.cut);
    }
    // A cut not published yet is dropped with the rest (Publish then says so).
    if (pending_) cuts.push_back(pending_->cut);
  }
  spdlog::warn("disk {}: change log dropped, tracking with the dirty bitmap (resync required): {}",
               opts_.name, reason);
  // The bitmap usually exists already (step 1).
  EnsureBitmap();
  DirtyBitmap* bitmap;
  {
    std::lock_guard lk(mu_);
    bitmap = bitmap_.get();
  }
  // The blocks an unfinished resync still has to send are as dirty as the log's, and so
  // are the open cycle's and the cuts'. A reader of a cut fails from here on (ECANCELED).
  for (const ByteRange& r : resync_dirty) bitmap->MarkRange(r.offset, r.length);
  for (const auto& cut : cuts) {
    bitmap->MarkWords(*cut->frozen);
    if (cut->cow) cut->cow->End();
  }
  cows_.clear();  // the caller holds the VM lock exclusively
  if (map_) {
    std::vector<uint64_t> words;
    map_->TakeAll(&words);
    bitmap->MarkWords(words);
  }
  DropLog(*bitmap, /*mark_all=*/resync_all_dirty);
  { std::lock_guard lk(mu_); }
  {
    std::unique_lock lk(mu_);
    // A Flush leader may be syncing the map without the VM lock: let it finish.
    sync_cv_.wait(lk, [&] { return !sync_running_; });
    mode_ = Mode::kBitmap;
    fallback_pending_.store(false, std::memory_order_release);
    unreleased_.clear();
    unreleased_bytes_ = 0;
    changed_ = false;
    map_.reset();  // changes mark the bitmap from now on (no change is in flight)
  }
}

std::vector<fs::path> DiskLog::LogFiles() const {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(opts_.log_dir, ec)) {
    out.push_back(e.path());
  }
  if (ec) spdlog::error("disk {}: list {}: {}", opts_.name, opts_.log_dir.string(), ec.message());
  return out;
}

std::unique_ptr<DirtyBitmap> DiskLog::OpenBitmap() {
  const fs::path bitmap_path = opts_.log_dir / kBitmapFileName;
  Result<std::unique_ptr<DirtyBitmap>> opened = DirtyBitmap::Open(bitmap_path, opts_.size);
  if (opened.ok()) return std::move(*opened);
  spdlog::error("disk {}: cannot keep a dirty bitmap file, tracking in memory only: {}", opts_.name,
                opened.status().ToString());
  return DirtyBitmap::InMemory(opts_.size);
}

void DiskLog::DropLog(DirtyBitmap& bitmap, bool mark_all) {
  std::lock_guard release(release_mu_);
  // Every block that a record of the unshipped log touches is dirty: those records will
  // never be shipped now. The scan also finds the highest numbers, which state.json keeps
  // as floors once the segments are gone.
  if (mark_all) bitmap.MarkAll();
  uint64_t max_seq = 0;
  uint64_t max_cycle = 0;
  uint64_t max_segment = 0;
  auto take = [&](const RecordHeader& h, std::span<const std::byte> payload) {
    max_seq = std::max(max_seq, h.seq);
    if (h.kind == RecordKind::kCut) {
      if (payload.size() >= kCutPayloadSize) {
        max_cycle = std::max(max_cycle, DecodeCutPayload(payload.first<kCutPayloadSize>()).cycle);
      }
    } else if (!mark_all) {
      bitmap.MarkRange(h.offset, h.length);
    }
  };
  Result<LogScanner> scanner = LogScanner::Open(opts_.log_dir);
  Status scan_status = scanner.status();
  if (scanner.ok() && !scanner->segments().empty()) max_segment = scanner->segments().back().number;
  ScannedRecord rec;
  while (scan_status.ok()) {
    Result<bool> more = scanner->Next(&rec);
    if (!more.ok()) {
      scan_status = more.status();
      break;
    }
    if (!*more) break;
    take(rec.header, rec.payload);
  }
  if (!scan_status.ok() && !mark_all) {
    spdlog::error("disk {}: cannot read the change log to mark its blocks, marking all: {}",
                  opts_.name, scan_status.ToString());
    bitmap.MarkAll();
  }
  // The open cycle's map and a frozen cut, when this runs at Open (FinishFallback has
  // moved the live ones into the bitmap already): their blocks are as dirty as the log's.
  if (!map_ && !mark_all) {
    const fs::path map_path = opts_.log_dir / kMapFileName;
    std::error_code ec;
    if (fs::exists(map_path, ec)) {
      Result<std::unique_ptr<DirtyBitmap>> old_map = DirtyBitmap::Open(map_path, opts_.size);
      if (old_map.ok()) {
        std::vector<uint64_t> words;
        (*old_map)->TakeAll(&words);
        bitmap.MarkWords(words);
      } else {
        spdlog::error("disk {}: cannot read {}, marking all: {}", opts_.name, map_path.string(),
                      old_map.status().ToString());
        bitmap.MarkAll();
      }
    }
    // An older version's frozen set.
    Result<std::optional<FrozenSet>> frozen =
        LoadFrozenSet(opts_.log_dir / kFrozenFileName, opts_.size);
    if (!frozen.ok() || (*frozen && (*frozen)->torn)) {
      bitmap.MarkAll();
    } else if (*frozen) {
      bitmap.MarkWords((*frozen)->words);
    }
  }
  // The cut files: their blocks (at Open; FinishFallback marked the live cuts already),
  // and their numbers, which state.json keeps as floors once they are gone.
  for (const fs::path& p : LogFiles()) {
    if (p.extension() != ".cut") continue;
    Result<std::optional<FrozenSet>> cut = LoadFrozenSet(p, opts_.size);
    if (!cut.ok() || !*cut || (*cut)->torn) {
      if (!map_) bitmap.MarkAll();
      continue;
    }
    if (!map_ && !mark_all) bitmap.MarkWords((*cut)->words);
    max_seq = std::max(max_seq, (*cut)->last_seq);
    max_cycle = std::max(max_cycle, (*cut)->cycle);
    max_segment = std::max(max_segment, (*cut)->segment);
  }
  {
    std::lock_guard lk(mu_);
    last_seq_ = std::max(last_seq_, max_seq);
    last_cycle_ = std::max(last_cycle_, max_cycle);
    last_segment_ = std::max(last_segment_, max_segment);
  }
  Status flushed = bitmap.Flush();
  if (!flushed.ok()) spdlog::error("disk {}: {}", opts_.name, flushed.ToString());

  // Crash order: bitmap (its file marks the switch), then state.json, then the segments.
  // Without a bitmap file, delete first: the segments may be what fills the folder, and a
  // state.json saying "bitmap" with no bitmap file marks every block at the next start.
  auto delete_segments = [&] {
    // The map, the cuts and an older version's frozen set are in the bitmap now.
    std::vector<fs::path> gone = {opts_.log_dir / kMapFileName, opts_.log_dir / kFrozenFileName};
    for (const fs::path& p : LogFiles()) {
      if (p.extension() == ".cut" || p.extension() == ".cow") gone.push_back(p);
    }
    for (const fs::path& p : gone) {
      if (::unlink(p.c_str()) != 0 && errno != ENOENT) {
        spdlog::error("disk {}: delete {}: {}", opts_.name, p.string(), std::strerror(errno));
      }
    }
    Result<std::vector<SegmentFile>> files = ListSegments(opts_.log_dir);
    if (!files.ok()) {
      spdlog::error("disk {}: {}", opts_.name, files.status().ToString());
      return;
    }
    for (const SegmentFile& f : *files) {
      if (::unlink(f.path.c_str()) != 0 && errno != ENOENT) {
        spdlog::error("disk {}: delete {}: {}", opts_.name, f.path.string(), std::strerror(errno));
      }
    }
    Status s = SyncDir(opts_.log_dir);
    if (!s.ok()) spdlog::error("disk {}: {}", opts_.name, s.ToString());
  };
  if (bitmap.persistent()) {
    Status s = PersistState();
    if (!s.ok()) spdlog::error("disk {}: {}", opts_.name, s.ToString());
    delete_segments();
  } else {
    delete_segments();
    Status s = PersistState();
    if (!s.ok()) spdlog::error("disk {}: {}", opts_.name, s.ToString());
  }
}

Status DiskLog::PersistState() {
  std::lock_guard state_lock(state_mu_);
  DiskState st;
  {
    std::lock_guard lk(mu_);
    st.tracking = mode_ == Mode::kLog ? DiskTracking::kLog : DiskTracking::kBitmap;
    st.resync_required = resync_required_;
    st.reason = reason_;
    st.last_cycle = floors_.last_cycle;
    st.last_seq = floors_.last_seq;
    st.last_segment = floors_.last_segment;
    if (mode_ != Mode::kLog) {
      // No segment will remain to carry the numbers.
      st.last_cycle = std::max(st.last_cycle, last_cycle_);
      st.last_seq = std::max(st.last_seq, last_seq_);
      st.last_segment = std::max(st.last_segment, last_segment_);
    }
  }
  return SaveDiskState(opts_.log_dir, st);
}

}  // namespace siterep::tracker
