#include "tracker/disk_log.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <optional>
#include <utility>

#include "common/block_hash.h"
#include "common/crc32c.h"
#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/activity_log.h"
#include "tracker/frozen_set.h"
#include "tracker/locks.h"
#include "tracker/log_reader.h"
#include "tracker/recovery.h"
#include "tracker/snapshot.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kLockFileName = "LOCK";
constexpr uint64_t kBlock = DirtyBitmap::kBlockSize;
constexpr std::string_view kCowSuffix = ".cow";

// The number of "<20 digits><suffix>"; nullopt for any other name.
std::optional<uint64_t> ParseNumbered(std::string_view name, std::string_view suffix) {
  if (name.size() != 20 + suffix.size() || !name.ends_with(suffix)) return std::nullopt;
  uint64_t number = 0;
  auto [ptr, ec] = std::from_chars(name.data(), name.data() + 20, number);
  if (ec != std::errc() || ptr != name.data() + 20) return std::nullopt;
  return number;
}

void Unlink(const std::string& disk, const fs::path& p) {
  if (::unlink(p.c_str()) != 0 && errno != ENOENT) {
    spdlog::warn("disk {}: delete {}: {}", disk, p.string(), std::strerror(errno));
  }
}

Status RemoveFile(const fs::path& p) {
  if (::unlink(p.c_str()) != 0 && errno != ENOENT) {
    return Status::FromErrno(errno, "delete " + p.string());
  }
  return Status::Ok();
}

}  // namespace

DiskLog::DiskLog(Options options)
    : opts_(std::move(options)), cow_budget_([&]() -> std::shared_ptr<CowBudget> {
        if (opts_.cow_limit == 0) return nullptr;  // unbounded: nothing to count
        auto budget = std::make_shared<CowBudget>();
        budget->limit = opts_.cow_limit;
        return budget;
      }()) {}

DiskLog::~DiskLog() {
  Status s = Stop();
  if (!s.ok()) spdlog::error("disk {}: stopping the change log: {}", opts_.name, s.ToString());
}

Result<std::unique_ptr<DiskLog>> DiskLog::Open(Options options) {
  std::unique_ptr<DiskLog> log(new DiskLog(std::move(options)));
  SR_RETURN_IF_ERROR(log->Init());
  return log;
}

Status DiskLog::Init() {
  SR_RETURN_IF_ERROR(MakeDirs(opts_.log_dir));
  SR_ASSIGN_OR_RETURN(lock_fd_, OpenFile(opts_.log_dir / kLockFileName, O_RDWR | O_CREAT, 0644));
  if (::flock(lock_fd_.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return Status::Error(EBUSY, "change log " + opts_.log_dir.string() +
                                      " is in use by another tracker (its LOCK is held)");
    }
    return Status::FromErrno(errno, "lock " + (opts_.log_dir / kLockFileName).string());
  }
  SR_ASSIGN_OR_RETURN(std::optional<DiskState> loaded, LoadDiskState(opts_.log_dir));
  const DiskState state = loaded.value_or(DiskState());
  floors_.last_cycle = state.last_cycle;
  floors_.last_seq = state.last_seq;
  floors_.last_segment = state.last_segment;
  last_cycle_ = state.last_cycle;
  last_seq_ = state.last_seq;
  last_segment_ = state.last_segment;

  std::error_code ec;
  const bool bitmap_file = fs::exists(opts_.log_dir / kBitmapFileName, ec);
  SR_ASSIGN_OR_RETURN(ActivityLog::Previous previous,
                      ActivityLog::ReadPrevious(opts_.log_dir, opts_.size));
  if (previous.host_crashed) {
    // The host went down with the tracker running: the map, the cut files, the
    // copy-on-write and the image may each have lost what was not synced. What may differ
    // from the replica is within the activity log's extents, the map and the unshipped
    // cuts: the disk is compared there (a resync), every block when the activity log is
    // unreadable or a resync was under way.
    mode_ = Mode::kSwitching;
    resync_required_ = true;
    const bool all = !previous.extents || state.resync_required;
    reason_ = "unclean host stop (the host went down with siterepd running, boot " +
              previous.boot_id + "): " +
              (previous.extents
                   ? std::to_string(previous.extents->size()) + " extents of the activity log"
                   : std::string("the activity log is unreadable, so every block")) +
              ", the changed blocks and the unshipped cycles are compared with the replica";
    spdlog::warn("disk {}: {}", opts_.name, reason_);
    bitmap_ = OpenBitmap();
    if (previous.extents) {
      for (const ByteRange& r : *previous.extents) bitmap_->MarkRange(r.offset, r.length);
    }
    DropLog(*bitmap_, all);
    mode_ = Mode::kBitmap;
  } else if (state.tracking == DiskTracking::kBitmap || bitmap_file) {
    // Bitmap mode survives restarts until a resync. A bitmap file without the state means
    // a crash during the fall back: finish it (mark what is left of the log, drop it).
    mode_ = Mode::kSwitching;
    resync_required_ = true;
    reason_ = state.reason.empty() ? "dirty bitmap found at start" : state.reason;
    const bool lost = !bitmap_file;
    if (lost) reason_ += "; the dirty bitmap was lost, so every block is dirty";
    bitmap_ = OpenBitmap();
    DropLog(*bitmap_, lost);
    mode_ = Mode::kBitmap;
  } else {
    Status s = OpenLogMode(state);
    if (s.ok() && state.resync_required) {
      // Logging again after a bitmap, but the resync did not complete (or a crash cut it
      // short): which blocks it had to send is not kept across restarts, so all of them.
      resync_required_ = true;
      resync_all_dirty_ = true;
      reason_ = state.reason.empty() || state.reason == "resynchronising" ? "resync interrupted"
                                                                          : state.reason;
    }
    if (!s.ok()) {
      if (s.code() != EBADMSG) return s.WithContext("recover change log of disk " + opts_.name);
      // A damaged log cannot say which blocks changed: every block is dirty.
      spdlog::error("disk {}: {}", opts_.name, s.ToString());
      mode_ = Mode::kSwitching;
      resync_required_ = true;
      reason_ = "change log unreadable: " + s.message();
      unreleased_.clear();
      cows_.clear();
      bitmap_ = OpenBitmap();
      DropLog(*bitmap_, /*mark_all=*/true);
      mode_ = Mode::kBitmap;
    }
  }
  // Every change before this start is made durable in the map (a kill -9 left it in the
  // page cache), so the activity log can start empty.
  DirtyBitmap* map = map_ ? map_.get() : bitmap_.get();
  if (map != nullptr) SR_RETURN_IF_ERROR(map->Flush().WithContext("disk " + opts_.name));
  SR_ASSIGN_OR_RETURN(al_, ActivityLog::Start(opts_.log_dir, opts_.size, [this] {
                        // Trim runs with the VM lock exclusive: map_ and bitmap_ stay put.
                        DirtyBitmap* m = map_ ? map_.get() : bitmap_.get();
                        return m != nullptr ? m->Flush() : Status::Ok();
                      }));
  return Status::Ok();
}

Status DiskLog::OpenLogMode(const DiskState& state) {
  std::error_code ec;
  const bool first_open = !fs::exists(opts_.log_dir / kMapFileName, ec);
  SR_ASSIGN_OR_RETURN(map_, DirtyBitmap::Open(opts_.log_dir / kMapFileName, opts_.size));
  RecoveryInput in;
  in.disk_name = opts_.name;
  in.disk_id = opts_.disk_id;
  in.log_dir = opts_.log_dir;
  in.floors = state;
  in.map = map_.get();
  in.legacy_open_segment = first_open;
  SR_ASSIGN_OR_RETURN(RecoveredLog r, RecoverLog(in));
  for (RecoveredSegment& f : r.sealed) {
    unreleased_bytes_ += f.segment.bytes;
    unreleased_.push_back(Unreleased{std::move(f.segment), nullptr, std::move(f.path)});
  }
  last_seq_ = r.last_seq;
  last_segment_ = r.last_segment;
  last_cycle_ = r.last_cycle;
  last_cut_nanos_ = r.last_cut_unix_nanos;
  last_cut_first_change_ = r.last_cut_first_change_unix_nanos;

  // An older version's cut that was not published before the stop: its blocks go back
  // into the map (their content is in the image), so the next cycle carries them.
  const fs::path frozen_path = opts_.log_dir / kFrozenFileName;
  SR_ASSIGN_OR_RETURN(std::optional<FrozenSet> frozen, LoadFrozenSet(frozen_path, opts_.size));
  if (frozen) {
    if (frozen->torn) {
      spdlog::warn("disk {}: {} is torn: every block goes into the next cycle", opts_.name,
                   frozen_path.string());
      map_->MarkAll();
    } else if (frozen->cycle > last_cycle_) {
      map_->MarkWords(frozen->words);
      spdlog::info(
          "disk {}: cycle {} was cut but not finished before the stop; its blocks go "
          "into the next cycle",
          opts_.name, frozen->cycle);
    }
    SR_RETURN_IF_ERROR(map_->Flush());
    if (::unlink(frozen_path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "delete " + frozen_path.string());
    }
  }
  SR_RETURN_IF_ERROR(OpenCuts());
  changed_ = map_->dirty_blocks() > 0;
  return Status::Ok();
}

Status DiskLog::OpenCuts() {
  CutFiles in;
  in.log_dir = opts_.log_dir;
  in.disk_name = opts_.name;
  in.disk_size = opts_.size;
  in.image_fd = opts_.image_fd;
  in.disk_id = opts_.disk_id;
  in.released_segment = floors_.last_segment;
  in.remove_released = true;
  in.last_seq = last_seq_;
  in.cow_budget = cow_budget_;
  in.last_cycle = last_cycle_;
  SR_ASSIGN_OR_RETURN(std::vector<std::shared_ptr<FrozenCut>> cuts, OpenCutFiles(in));
  std::vector<uint64_t> kept;
  for (std::shared_ptr<FrozenCut>& cut : cuts) {
    if (cut->cow) cows_.push_back(cut->cow);
    last_seq_ = cut->last_seq;
    last_segment_ = cut->segment;
    last_cycle_ = cut->cycle;
    last_cut_nanos_ = cut->cut_unix_nanos;
    last_cut_first_change_ = cut->first_change_unix_nanos;
    kept.push_back(cut->segment);
    Unreleased u{SegmentOf(*cut), std::move(cut), {}};
    unreleased_bytes_ += u.seg.bytes;
    unreleased_.push_back(std::move(u));
  }
  // Copy-on-write files without their cut (a release deletes the cut file first).
  for (const fs::path& p : LogFiles()) {
    std::optional<uint64_t> n = ParseNumbered(p.filename().native(), kCowSuffix);
    if (n && !std::binary_search(kept.begin(), kept.end(), *n)) SR_RETURN_IF_ERROR(RemoveFile(p));
  }
  return Status::Ok();
}

SealedSegment DiskLog::SegmentOf(const FrozenCut& cut) const {
  SealedSegment seg;
  seg.disk = opts_.name;
  seg.disk_id = opts_.disk_id;
  seg.number = cut.segment;
  seg.cycle = cut.cycle;
  seg.first_seq = cut.first_seq;
  seg.last_seq = cut.last_seq;
  seg.bytes = CutBytesAtMost(*cut.frozen, opts_.size);
  seg.cut_unix_nanos = cut.cut_unix_nanos;
  seg.first_change_unix_nanos = cut.first_change_unix_nanos;
  return seg;
}

// ---------------------------------------------------------------------------------------
// The write path

LogOutcome DiskLog::BeforeChange(uint64_t offset, uint64_t length) {
  // Its extents are in the activity log before anything of the change can reach the disk.
  if (al_) al_->Touch(offset, length);
  if (DirtyBitmap* map = map_.get(); map != nullptr) {
    // Log mode, or a fall back not finished yet (FinishFallback moves the map's bits into
    // the bitmap, with the VM lock exclusive, so no change is marking then).
    map->MarkRange(offset, length);
    if (!changed_.load(std::memory_order_relaxed)) changed_.store(true, std::memory_order_relaxed);
    // The cut's content of frozen blocks goes to the copy-on-write file first. cows_
    // changes only with the VM lock exclusive, so no lock is needed. A save that fails
    // never fails the change: the disk falls back to the bitmap instead.
    for (const std::shared_ptr<DiskSnapshot>& cow : cows_) {
      cow->SaveBefore(offset, length);
      if (cow->failed()) CowFailed(cow->status());
    }
    return LogOutcome::kLogged;
  }
  std::unique_lock lk(mu_);
  if (stop_) return LogOutcome::kShutdown;
  MarkWithoutLog(lk, offset, length);
  return LogOutcome::kBitmap;
}

void DiskLog::MarkWithoutLog(std::unique_lock<std::mutex>& lk, uint64_t offset, uint64_t length) {
  if (DirtyBitmap* bitmap = bitmap_.get(); bitmap != nullptr) {
    lk.unlock();
    bitmap->MarkRange(offset, length);
    return;
  }
  pending_ranges_.push_back(ByteRange{offset, length});
  lk.unlock();
  EnsureBitmap();
}

void DiskLog::RequestFallbackLocked(std::string reason) {
  if (mode_ != Mode::kLog) return;
  mode_ = Mode::kSwitching;
  resync_required_ = true;
  reason_ = std::move(reason);
  fallback_pending_.store(true, std::memory_order_release);
  spdlog::warn("disk {}: falling back to the dirty bitmap: {}", opts_.name, reason_);
}

void DiskLog::CowFailed(const Status& why) {
  {
    std::lock_guard lk(mu_);
    if (mode_ != Mode::kLog || stop_) return;
    // The failed copy-on-write's own error (ENOSPC, EIO), whichever cut it belongs to: an
    // unreleased one or the one just cut and not yet published.
    RequestFallbackLocked(why.message());
  }
  EnsureBitmap();
}

void DiskLog::CutDamaged(const Status& why) {
  {
    std::lock_guard lk(mu_);
    if (mode_ != Mode::kLog || stop_) return;
    // Not every block: the damaged cut's blocks are marked with the rest of the log.
    RequestFallbackLocked("change log: " + why.message());
  }
  EnsureBitmap();
}

void DiskLog::EnsureBitmap() {
  std::lock_guard bitmap_lock(bitmap_mu_);
  {
    std::lock_guard lk(mu_);
    if (bitmap_) return;
  }
  std::unique_ptr<DirtyBitmap> bitmap = OpenBitmap();
  std::lock_guard lk(mu_);
  for (const ByteRange& r : pending_ranges_) bitmap->MarkRange(r.offset, r.length);
  pending_ranges_.clear();
  bitmap_ = std::move(bitmap);
}

// ---------------------------------------------------------------------------------------
// Cuts

std::unique_ptr<DiskLog::CutTicket> DiskLog::WriteCut(uint64_t cycle, int64_t unix_nanos,
                                                      int64_t first_change_unix_nanos) {
  FinishFallback();  // a pending fall back gets no cut; finishing it needs what we hold
  auto ticket = std::make_unique<CutTicket>();
  ticket->cycle = cycle;
  ticket->unix_nanos = unix_nanos;
  ticket->first_change_unix_nanos = first_change_unix_nanos;
  auto cut = std::make_shared<FrozenCut>();
  {
    std::lock_guard lk(mu_);
    if (mode_ != Mode::kLog || stop_ || pending_) return nullptr;
    cut->segment = last_segment_ + 1;
    cut->first_seq = last_seq_ + 1;
    ticket->seq = last_seq_;
    ticket->segment = last_segment_;
  }
  // The caller holds the VM lock exclusively: no change marks the map meanwhile, so its
  // bits are read here and cleared only once the cut file holds them.
  auto words = std::make_shared<std::vector<uint64_t>>(map_->word_count());
  for (uint64_t w = 0; w < words->size(); ++w) (*words)[w] = map_->word(w);
  cut->disk_id = opts_.disk_id;
  cut->cycle = cycle;
  cut->epoch = opts_.epoch;
  cut->cut_unix_nanos = unix_nanos;
  cut->first_change_unix_nanos = first_change_unix_nanos;
  cut->frozen_blocks = map_->dirty_blocks();  // the map counts its bits
  cut->last_seq = cut->first_seq + CutRecordCount(*words, opts_.size) - 1;
  cut->frozen = words;
  const fs::path cut_path = CutPath(opts_.log_dir, cut->segment);
  Status made = [&]() -> Status {
    if (cut->frozen_blocks > 0) {
      SR_ASSIGN_OR_RETURN(cut->cow, DiskSnapshot::Create(opts_.name, opts_.image_fd, opts_.size,
                                                         CowPath(opts_.log_dir, cut->segment),
                                                         CutCowOptions(words, cow_budget_)));
    }
    // Last: a restart takes a cut file as a cut made (kill -9 from here on finds it all).
    return SaveFrozenSet(cut_path, opts_.size, *cut, *words);
  }();
  if (failpoint::Check("tracker.before_seal") == failpoint::Action::kError && made.ok()) {
    made = Status::Error(EIO, "failpoint tracker.before_seal");
  }
  if (!made.ok()) {
    spdlog::warn("disk {}: cycle {} cannot be cut, its blocks stay for the next cycle: {}",
                 opts_.name, cycle, made.ToString());
    RemoveCutFiles(*cut);
    std::lock_guard lk(mu_);
    cut_error_ = made.message();
    return ticket;
  }
  std::vector<uint64_t> cleared;
  map_->TakeAll(&cleared);  // the same bits: no change is in flight
  changed_.store(false, std::memory_order_relaxed);
  // The caller holds the VM lock exclusively: no change walks cows_, and none is in flight
  // for the activity log's trim.
  std::erase_if(cows_, [](const std::shared_ptr<DiskSnapshot>& c) { return c->ended(); });
  if (cut->cow) cows_.push_back(cut->cow);
  if (al_) al_->Trim();
  ticket->made = true;
  ticket->seq = cut->last_seq;
  ticket->segment = cut->segment;
  failpoint::Check("tracker.after_seal");
  std::lock_guard lk(mu_);
  cut_error_.clear();
  pending_ = std::make_unique<Unreleased>(Unreleased{SegmentOf(*cut), std::move(cut), {}});
  return ticket;
}

bool DiskLog::Publish(CutTicket& ticket) {
  std::lock_guard lk(mu_);
  if (!pending_ || pending_->seg.cycle != ticket.cycle || !ticket.made) return false;
  std::unique_ptr<Unreleased> u = std::move(pending_);
  if (mode_ != Mode::kLog) return false;  // the fall back marked its blocks
  last_seq_ = u->seg.last_seq;
  last_segment_ = u->seg.number;
  last_cycle_ = u->seg.cycle;
  last_cut_nanos_ = u->seg.cut_unix_nanos;
  last_cut_first_change_ = u->seg.first_change_unix_nanos;
  ++cycles_cut_;
  unreleased_bytes_ += u->seg.bytes;
  unreleased_.push_back(std::move(*u));
  return true;
}

void DiskLog::RollBack(CutTicket& ticket) {
  std::unique_ptr<Unreleased> u;
  {
    std::lock_guard lk(mu_);
    ticket.made = false;
    ticket.seq = last_seq_;
    ticket.segment = last_segment_;
    if (!pending_ || pending_->seg.cycle != ticket.cycle) return;
    u = std::move(pending_);
    // In bitmap mode the fall back marked the frozen set already.
    if (mode_ == Mode::kLog) {
      map_->MarkWords(*u->cut->frozen);
      if (u->cut->frozen_blocks > 0) changed_.store(true, std::memory_order_relaxed);
    }
  }
  RemoveCutFiles(*u->cut);
}

void DiskLog::RemoveCutFiles(const FrozenCut& cut) {
  if (cut.cow) {
    cut.cow->End();
    Status removed = cut.cow->Remove();
    if (!removed.ok()) spdlog::warn("disk {}: {}", opts_.name, removed.ToString());
  }
  // The cut file first: a restart that finds a copy-on-write file alone deletes it.
  Unlink(opts_.name, CutPath(opts_.log_dir, cut.segment));
  if (!cut.cow) Unlink(opts_.name, CowPath(opts_.log_dir, cut.segment));
}

Status DiskLog::RollBackAfter(uint64_t vm_cycle) {
  std::vector<Unreleased> gone;
  {
    std::lock_guard lk(mu_);
    if (mode_ != Mode::kLog) return Status::Ok();
    while (!unreleased_.empty() && unreleased_.back().seg.cycle > vm_cycle) {
      unreleased_bytes_ -= unreleased_.back().seg.bytes;
      gone.push_back(std::move(unreleased_.back()));
      unreleased_.pop_back();
    }
    if (gone.empty()) return Status::Ok();
  }
  for (const Unreleased& u : gone) {
    if (u.cut) {
      map_->MarkWords(*u.cut->frozen);
    } else {
      SR_RETURN_IF_ERROR(MarkSegmentBlocks(u.path, *map_, /*strict=*/true).status());
    }
    spdlog::info(
        "disk {}: cycle {} is not on every disk of the VM; its blocks go into the next "
        "cycle",
        opts_.name, u.seg.cycle);
  }
  SR_RETURN_IF_ERROR(map_->Flush());
  for (const Unreleased& u : gone) {
    if (u.cut) {
      RemoveCutFiles(*u.cut);
    } else if (::unlink(u.path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "delete " + u.path.string());
    }
  }
  // Called before any change: no one walks cows_.
  std::erase_if(cows_, [](const std::shared_ptr<DiskSnapshot>& c) { return c->ended(); });
  SR_RETURN_IF_ERROR(SyncDir(opts_.log_dir));
  std::lock_guard lk(mu_);
  changed_ = true;
  const SealedSegment* last = unreleased_.empty() ? nullptr : &unreleased_.back().seg;
  last_cycle_ = last ? last->cycle : floors_.last_cycle;
  last_seq_ = last ? last->last_seq : floors_.last_seq;
  last_segment_ = last ? last->number : floors_.last_segment;
  if (last) last_cut_nanos_ = last->cut_unix_nanos;
  return Status::Ok();
}

bool DiskLog::ChangedSinceCut() const {
  std::lock_guard lk(mu_);
  return mode_ == Mode::kLog && changed_.load(std::memory_order_relaxed);
}

uint64_t DiskLog::last_cycle() const {
  std::lock_guard lk(mu_);
  return last_cycle_;
}

int64_t DiskLog::last_cut_first_change_unix_nanos() const {
  std::lock_guard lk(mu_);
  return last_cut_first_change_;
}

int64_t DiskLog::last_cut_unix_nanos() const {
  std::lock_guard lk(mu_);
  return last_cut_nanos_;
}

bool DiskLog::has_unreleased() const {
  std::lock_guard lk(mu_);
  return !unreleased_.empty() || pending_ != nullptr;
}

// ---------------------------------------------------------------------------------------
// Flush, stop

Status DiskLog::Flush() {
  std::unique_lock lk(mu_);
  // Every sync that starts after this point covers what the caller completed before it.
  const uint64_t need = syncs_started_ + 1;
  while (syncs_completed_ < need) {
    if (sync_running_) {
      sync_cv_.wait(lk);
      continue;
    }
    // Become the leader of the next generation.
    sync_running_ = true;
    const uint64_t generation = ++syncs_started_;
    DirtyBitmap* map = mode_ == Mode::kBitmap ? bitmap_.get() : map_.get();
    lk.unlock();
    Status image_status = SyncFiles(map);
    lk.lock();
    syncs_completed_ = generation;
    sync_running_ = false;
    ++syncs_done_;
    if (!image_status.ok()) {
      sync_error_generation_ = generation;
      sync_error_ = image_status;
    }
    sync_cv_.notify_all();
  }
  if (sync_error_generation_ >= need) return sync_error_;
  return Status::Ok();
}

Status DiskLog::SyncFiles(DirtyBitmap* map, Status* map_status) {
  if (map != nullptr) {
    Status b = map->Flush();
    if (!b.ok()) spdlog::error("disk {}: {}", opts_.name, b.ToString());
    if (map_status != nullptr) *map_status = b;
  }
  if (::fdatasync(opts_.image_fd) != 0) {
    return Status::FromErrno(errno, "fdatasync the image of disk " + opts_.name);
  }
  return Status::Ok();
}

Status DiskLog::Stop() {
  {
    std::lock_guard lk(mu_);
    if (stop_) return Status::Ok();
    stop_ = true;
  }
  // No change runs now (the caller's guarantee), which is what FinishFallback needs.
  FinishFallback();
  if (opts_.image_fd < 0) return Status::Ok();
  DirtyBitmap* map;
  {
    std::lock_guard lk(mu_);
    map = mode_ == Mode::kBitmap ? bitmap_.get() : map_.get();
  }
  Status map_synced;
  SR_RETURN_IF_ERROR(SyncFiles(map, &map_synced));
  SR_RETURN_IF_ERROR(map_synced);
  // Everything is durable: a clean stop.
  return al_ ? al_->MarkClean() : Status::Ok();
}

void DiskLog::TrimActivityLog() {
  if (al_) al_->Trim();
}

bool DiskLog::activity_log_over() const { return al_ && al_->over(); }

// ---------------------------------------------------------------------------------------
// Sealed segments, stats

std::vector<SealedSegment> DiskLog::SealedSegments() const {
  std::lock_guard lk(mu_);
  std::vector<SealedSegment> out;
  out.reserve(unreleased_.size());
  for (const Unreleased& u : unreleased_) out.push_back(u.seg);
  return out;
}

Result<std::unique_ptr<SegmentStream>> DiskLog::OpenSegment(uint64_t number) {
  std::shared_ptr<const FrozenCut> cut;
  fs::path path;
  SealedSegment seg;
  {
    std::lock_guard lk(mu_);
    auto it = std::find_if(unreleased_.begin(), unreleased_.end(),
                           [&](const Unreleased& u) { return u.seg.number == number; });
    if (it == unreleased_.end()) {
      return Status::Error(ENOENT, "segment " + std::to_string(number) + " of disk " + opts_.name +
                                       " is not sealed and unreleased");
    }
    cut = it->cut;
    path = it->path;
    seg = it->seg;
  }
  if (!cut) {
    // An older version's file is checked whole before any byte of it is sent; a damaged
    // one is never shipped as data: the disk falls back to a resync instead.
    Status checked = CheckSealedSegment(seg, path);
    if (checked.code() == EBADMSG) {
      {
        std::lock_guard lk(mu_);
        if (mode_ == Mode::kLog && !stop_) {
          RequestFallbackLocked("change log: " + checked.message());
          resync_all_dirty_ = true;  // what the damaged records changed is unknown
        }
      }
      EnsureBitmap();
    }
    SR_RETURN_IF_ERROR(checked);
    SR_ASSIGN_OR_RETURN(std::unique_ptr<FileSegmentStream> file, FileSegmentStream::Open(path));
    return std::unique_ptr<SegmentStream>(std::move(file));
  }
  return std::unique_ptr<SegmentStream>(std::make_unique<CutStream>(
      std::move(cut), opts_.size, opts_.ranges, [this](const Status& why) { CutDamaged(why); }));
}

Status DiskLog::Archive(const Unreleased& u) {
  const fs::path to = SegmentPath(opts_.archive_dir, u.seg.number);
  if (!u.cut) {
    if (::rename(u.path.c_str(), to.c_str()) != 0) {
      return Status::FromErrno(errno, "archive " + u.path.string() + " to " + to.string());
    }
    return Status::Ok();
  }
  CutStream stream(u.cut, opts_.size, opts_.ranges, [this](const Status& why) { CutDamaged(why); });
  return WriteSegmentFile(stream, to);
}

Status DiskLog::ReleaseThrough(uint64_t cycle) {
  // Archive first, with no lock of ours held (the reader takes range locks): the entries
  // stay listed until they are written out. The archive is for checkers: one that cannot
  // be written (a full file system) is logged and left out, and the release goes on, so
  // replication never waits for it.
  if (!opts_.archive_dir.empty()) {
    std::vector<Unreleased> out;
    {
      std::lock_guard lk(mu_);
      for (const Unreleased& u : unreleased_) {
        if (u.seg.cycle > cycle) break;
        out.push_back(u);
      }
    }
    Status made = out.empty() ? Status::Ok() : MakeDirs(opts_.archive_dir);
    for (const Unreleased& u : out) {
      Status s = made.ok() ? Archive(u) : made;
      if (!s.ok()) {
        spdlog::error("disk {}: segment {} (cycle {}) is not archived: {}", opts_.name,
                      u.seg.number, u.seg.cycle, s.ToString());
      }
    }
    if (!out.empty() && made.ok()) {
      Status synced = SyncDir(opts_.archive_dir);
      if (!synced.ok()) spdlog::error("disk {}: {}", opts_.name, synced.ToString());
    }
  }
  std::lock_guard release(release_mu_);
  std::vector<Unreleased> gone;
  {
    std::lock_guard lk(mu_);
    while (!unreleased_.empty() && unreleased_.front().seg.cycle <= cycle) {
      unreleased_bytes_ -= unreleased_.front().seg.bytes;
      gone.push_back(std::move(unreleased_.front()));
      unreleased_.pop_front();
    }
    if (gone.empty()) return Status::Ok();
    floors_.last_cycle = std::max(floors_.last_cycle, gone.back().seg.cycle);
    floors_.last_seq = std::max(floors_.last_seq, gone.back().seg.last_seq);
    floors_.last_segment = std::max(floors_.last_segment, gone.back().seg.number);
    for (const Unreleased& u : gone) {
      if (u.cut && u.cut->cow) cow_released_bytes_ += u.cut->cow->saved_bytes();
    }
  }
  // The floors must be durable before the files that carry the numbers go.
  Status result = PersistState();
  if (!result.ok()) return result.WithContext("release change log of disk " + opts_.name);
  failpoint::Check("tracker.mid_release");
  for (const Unreleased& u : gone) {
    if (u.cut) {
      RemoveCutFiles(*u.cut);
    } else if (opts_.archive_dir.empty() && ::unlink(u.path.c_str()) != 0 && errno != ENOENT &&
               result.ok()) {
      result = Status::FromErrno(errno, "delete " + u.path.string());
    }
  }
  Status synced = SyncDir(opts_.log_dir);
  return result.ok() ? synced : result;
}

DiskStats DiskLog::Stats() const {
  std::lock_guard lk(mu_);
  DiskStats s;
  s.name = opts_.name;
  s.tracking = mode_ == Mode::kLog ? DiskTracking::kLog : DiskTracking::kBitmap;
  s.resync_required = resync_required_;
  s.resync_reason = reason_;
  if (mode_ == Mode::kLog) {
    const uint64_t open = map_ ? map_->dirty_blocks() * kBlock : 0;
    const uint64_t pending = pending_ ? pending_->seg.bytes : 0;
    s.unshipped_bytes = unreleased_bytes_ + open + pending;
  }
  s.cycles_cut = cycles_cut_;
  s.cut_error = cut_error_;
  if (al_) {
    s.activity_log_writes = al_->writes();
    s.activity_log_error = al_->error();
  }
  for (const Unreleased& u : unreleased_) {
    if (u.cut && u.cut->cow) s.cow_bytes += u.cut->cow->saved_bytes();
  }
  s.cow_bytes_total = cow_released_bytes_ + s.cow_bytes;
  s.last_seq = last_seq_;
  s.last_cut_unix_nanos = last_cut_nanos_;
  if (bitmap_) {
    s.dirty_bytes = std::min(bitmap_->dirty_blocks() * DirtyBitmap::kBlockSize, opts_.size);
  }
  s.flush_syncs = syncs_done_;
  return s;
}

}  // namespace siterep::tracker
