// DiskLog's fall back from the change log to the dirty bitmap, and its persisted state
// (state.json). See disk_log.h; split from disk_log.cc to keep each file one concern.
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/file_util.h"
#include "tracker/disk_log.h"
#include "tracker/log_reader.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

void DiskLog::FallBack(const std::string& reason, std::span<Entry* const> unlogged) {
  std::vector<Entry*> pending(unlogged.begin(), unlogged.end());
  {
    std::lock_guard lk(mu_);
    if (mode_ != Mode::kLog) {
      // Already tracking with the bitmap: the callers mark their own blocks.
      for (Entry* e : pending) CompleteLocked(e, Entry::State::kBitmap);
      done_cv_.notify_all();
      return;
    }
    mode_ = Mode::kSwitching;
    resync_required_ = true;
    reason_ = reason;
    fallback_request_.clear();
    pending.insert(pending.end(), queue_.begin(), queue_.end());
    queue_.clear();
    // Segments waiting for the sealer are dropped with the rest; their cuts did not seal.
    // (One the sealer is working on sees the mode when it is done.)
    for (PendingSeal& p : seals_) pending.push_back(p.cut);
    seals_.clear();
  }
  spdlog::warn("disk {}: change log dropped, tracking with the dirty bitmap (resync required): {}",
               opts_.name, reason);
  std::vector<Range> extra;
  for (Entry* e : pending) {
    if (e->kind != RecordKind::kCut) extra.push_back(Range{e->offset, e->length});
  }
  std::unique_ptr<DirtyBitmap> bitmap = DropLog(/*mark_all=*/false, extra);
  {
    std::lock_guard lk(mu_);
    bitmap_ = std::move(bitmap);
    mode_ = Mode::kBitmap;
    sealed_.clear();
    sealed_bytes_ = sealing_bytes_ = open_bytes_ = queued_bytes_ = 0;
    open_first_seq_ = 0;
    for (Entry* e : pending) CompleteLocked(e, Entry::State::kBitmap);
  }
  done_cv_.notify_all();
}

std::unique_ptr<DirtyBitmap> DiskLog::DropLog(bool mark_all, std::span<const Range> extra) {
  std::lock_guard release(release_mu_);
  const fs::path bitmap_path = opts_.log_dir / kBitmapFileName;
  std::unique_ptr<DirtyBitmap> bitmap;
  Result<std::unique_ptr<DirtyBitmap>> opened = DirtyBitmap::Open(bitmap_path, opts_.size);
  if (opened.ok()) {
    bitmap = std::move(*opened);
  } else {
    spdlog::error("disk {}: cannot keep a dirty bitmap file, tracking in memory only: {}",
                  opts_.name, opened.status().ToString());
    bitmap = DirtyBitmap::InMemory(opts_.size);
  }

  // Every block that a record of the unshipped log touches is dirty: those records will
  // never be shipped now. The scan also finds the highest numbers, which state.json keeps
  // as floors once the segments are gone.
  if (mark_all) bitmap->MarkAll();
  uint64_t max_seq = 0;
  uint64_t max_cycle = 0;
  uint64_t max_segment = 0;
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
    max_seq = std::max(max_seq, rec.header.seq);
    if (rec.header.kind == RecordKind::kCut) {
      max_cycle = std::max(max_cycle, DecodeCutPayload(rec.payload.first<kCutPayloadSize>()).cycle);
    } else if (!mark_all) {
      bitmap->MarkRange(rec.header.offset, rec.header.length);
    }
  }
  if (!scan_status.ok() && !mark_all) {
    spdlog::error("disk {}: cannot read the change log to mark its blocks, marking all: {}",
                  opts_.name, scan_status.ToString());
    bitmap->MarkAll();
  }
  {
    std::lock_guard lk(mu_);
    last_seq_ = std::max(last_seq_, max_seq);
    last_cycle_ = std::max(last_cycle_, max_cycle);
    open_number_ = std::max(open_number_, max_segment);
  }
  for (const Range& r : extra) bitmap->MarkRange(r.offset, r.length);
  Status flushed = bitmap->Flush();
  if (!flushed.ok()) spdlog::error("disk {}: {}", opts_.name, flushed.ToString());

  // Crash order: bitmap (its file marks the switch), then state.json, then the segments.
  // Without a bitmap file, delete first: the segments may be what fills the folder, and a
  // state.json saying "bitmap" with no bitmap file marks every block at the next start.
  auto delete_segments = [&] {
    seg_fd_.Reset();
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
  if (bitmap->persistent()) {
    Status s = PersistState();
    if (!s.ok()) spdlog::error("disk {}: {}", opts_.name, s.ToString());
    delete_segments();
  } else {
    delete_segments();
    Status s = PersistState();
    if (!s.ok()) spdlog::error("disk {}: {}", opts_.name, s.ToString());
  }
  return bitmap;
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
      st.last_segment = std::max(st.last_segment, open_number_);
    }
  }
  return SaveDiskState(opts_.log_dir, st);
}

}  // namespace siterep::tracker
