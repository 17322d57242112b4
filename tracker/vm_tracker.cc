#include "tracker/vm_tracker.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>

#include "common/failpoint.h"
#include "common/time_util.h"
#include "tracker/snapshot.h"
#include "tracker/vm_tracker_impl.h"

namespace siterep::tracker {

std::string_view DiskTrackingName(DiskTracking t) {
  switch (t) {
    case DiskTracking::kLog:
      return "log";
    case DiskTracking::kBitmap:
      return "bitmap";
  }
  return "unknown";
}

Status VmTracker::Impl::Validate() const {
  if (options_.vm.empty()) return Status::Invalid("VmTracker: the VM has no name");
  if (options_.disks.empty())
    return Status::Invalid("VmTracker: VM " + options_.vm + " has no disks");
  std::set<std::string> names;
  std::set<std::filesystem::path> dirs;
  for (const TrackedDisk& d : options_.disks) {
    const std::string what = "VmTracker: disk \"" + d.name + "\" of VM " + options_.vm;
    if (d.name.empty())
      return Status::Invalid("VmTracker: a disk of VM " + options_.vm + " has no name");
    if (d.image_fd < 0) return Status::Invalid(what + " has no image file descriptor");
    if (d.size == 0) return Status::Invalid(what + " has size 0");
    if (d.log_dir.empty()) return Status::Invalid(what + " has no log folder");
    if (!names.insert(d.name).second) return Status::Invalid(what + " is listed twice");
    if (!dirs.insert(d.log_dir.lexically_normal()).second) {
      return Status::Invalid(what + " shares its log folder " + d.log_dir.string());
    }
  }
  return Status::Ok();
}

Status VmTracker::Impl::Open() {
  SR_RETURN_IF_ERROR(Validate());
  for (size_t i = 0; i < options_.disks.size(); ++i) {
    const TrackedDisk& config = options_.disks[i];
    // A snapshot does not survive its tracker (it is not crash-safe by design).
    Status removed = RemoveLeftoverSnapshot(SnapshotPathFor(config.log_dir));
    if (!removed.ok()) spdlog::warn("VM {}: {}", options_.vm, removed.ToString());
    auto disk = std::make_unique<Disk>(this, i, config);
    DiskLog::Options o;
    o.name = config.name;
    o.disk_id = DiskIdFor(options_.vm, config.name);
    o.epoch = options_.epoch;
    o.image_fd = config.image_fd;
    o.size = config.size;
    o.log_dir = config.log_dir;
    if (!options_.archive_dir.empty()) o.archive_dir = options_.archive_dir / config.name;
    o.ranges = &disk->ranges;
    o.cow_limit = options_.cow_limit;
    Result<std::unique_ptr<DiskLog>> log = DiskLog::Open(std::move(o));
    if (!log.ok()) return log.status().WithContext("VM " + options_.vm + " disk " + config.name);
    disk->log = std::move(*log);
    disks_.push_back(std::move(disk));
  }
  for (const auto& d : disks_) {
    if (d->log->last_cycle() > last_cycle_) {
      last_cycle_ = d->log->last_cycle();
      last_cut_nanos_ = d->log->last_cut_unix_nanos();
    }
  }
  SR_RETURN_IF_ERROR(RollBackUnfinishedCycle());
  // Blocks changed after the last published cut: when is not recorded, so the last cut
  // stands in for it (the oldest they can be), keeping the RPO an upper bound.
  if (std::any_of(disks_.begin(), disks_.end(),
                  [](const auto& d) { return d->log->ChangedSinceCut(); })) {
    open_first_change_ = last_cut_nanos_ != 0 ? last_cut_nanos_.load() : NowUnixNanos();
  }
  cutter_ = std::thread(&Impl::CutterLoop, this);
  return Status::Ok();
}

// Each disk publishes its cut of a cycle only once every disk has made its own, but a
// kill -9 can fall between two disks' WriteCut: then some disks hold cycle N and the
// others end at N - 1. Those that hold it give it back (its blocks go into their maps), so
// every disk ends at N - 1 and the next cut covers the lost cycle on all of them.
Status VmTracker::Impl::RollBackUnfinishedCycle() {
  uint64_t common = UINT64_MAX;
  for (const auto& d : disks_) {
    if (d->log->tracking_with_bitmap()) continue;
    common = std::min(common, d->log->last_cycle());
  }
  if (common == UINT64_MAX || common == last_cycle_) return Status::Ok();
  for (const auto& d : disks_) {
    if (d->log->tracking_with_bitmap() || d->log->last_cycle() <= common) continue;
    SR_RETURN_IF_ERROR(
        d->log->RollBackAfter(common).WithContext("VM " + options_.vm + " disk " + d->config.name));
  }
  // The cycle's number is used again: the replica never committed it (it never had every
  // disk's segment of it) and takes cycles only in sequence.
  last_cycle_ = common;
  return Status::Ok();
}

Status VmTracker::Impl::Change(size_t index, RecordKind kind, uint64_t offset, uint64_t length,
                               FunctionRef<Status()> apply) {
  Disk& disk = *disks_[index];
  if (offset > disk.config.size || length > disk.config.size - offset) {
    return Status::Error(EINVAL, std::string(RecordKindName(kind)) + " of [" +
                                     std::to_string(offset) + ", +" + std::to_string(length) +
                                     ") is beyond the end of disk " + disk.config.name + " (" +
                                     std::to_string(disk.config.size) + " bytes)");
  }
  Status applied;
  {
    std::shared_lock vm(cut_lock_);
    if (closed_) {
      return Status::Error(ESHUTDOWN, "VM " + options_.vm + " disk " + disk.config.name +
                                          ": change tracking is closed");
    }
    if (open_first_change_.load(std::memory_order_relaxed) == 0) {
      int64_t none = 0;
      open_first_change_.compare_exchange_strong(none, NowUnixNanos());
    }
    RangeLocks::Guard range = disk.ranges.Lock(offset, length);
    // Marks the blocks (before the image changes: a kill -9 after this finds them in the
    // map) and saves the content at the cut of frozen blocks of unreleased cycles.
    const LogOutcome outcome = disk.log->BeforeChange(offset, length);
    if (outcome == LogOutcome::kShutdown) {
      return Status::Error(
          ESHUTDOWN, "VM " + options_.vm + " disk " + disk.config.name + ": change log stopped");
    }
    // Marked, not yet in the image.
    if (outcome == LogOutcome::kLogged) failpoint::Check("tracker.after_mark");
    // Copy-on-write: the blocks' content as of the snapshot's cut goes to the snapshot
    // file before the change reaches the image. Never fails the change.
    if (disk.snapshot) disk.snapshot->SaveBefore(offset, length);
    applied = apply();
  }
  // A fall back to the bitmap is pending: finish it now, so the disk is in bitmap mode
  // when the change returns.
  if (disk.log->fallback_pending()) FinishFallback(index);
  return applied;
}

void VmTracker::Impl::FinishFallback(size_t index) {
  std::unique_lock vm(cut_lock_);
  disks_[index]->log->FinishFallback();
}

Status VmTracker::Impl::FlushDisk(size_t index) {
  DiskLog& log = *disks_[index]->log;
  if (log.fallback_pending()) FinishFallback(index);
  return log.Flush();
}

void VmTracker::Impl::FinishFallbacksLocked() {
  for (const auto& d : disks_) d->log->FinishFallback();
}

bool VmTracker::Impl::ChangedSinceCutLocked() {
  FinishFallbacksLocked();
  return std::any_of(disks_.begin(), disks_.end(),
                     [](const auto& d) { return d->log->ChangedSinceCut(); });
}

int64_t VmTracker::Impl::NextCutNanosLocked() const {
  return std::max(NowUnixNanos(), last_cut_nanos_.load() + 1);
}

VmTracker::Impl::CutWrite VmTracker::Impl::WriteCutsLocked(int64_t nanos) {
  CutWrite cut;
  cut.cycle = last_cycle_ + 1;
  cut.nanos = nanos;
  const int64_t first_change = open_first_change_.exchange(0);
  cut.first_change = first_change;
  for (const auto& d : disks_) {
    // Some disks have frozen the cut, the others not yet (all under the VM lock).
    if (!cut.tickets.empty()) failpoint::Check("tracker.mid_cut");
    cut.tickets.push_back(d->log->WriteCut(cut.cycle, cut.nanos, first_change));
    cut.any = cut.any || cut.tickets.back() != nullptr;
  }
  return cut;
}

std::optional<VmTracker::Impl::CutWrite> VmTracker::Impl::CutLocked(CutWhen when, int64_t nanos) {
  if (when == CutWhen::kIfChanged && !ChangedSinceCutLocked()) return std::nullopt;
  CutWrite cut = WriteCutsLocked(nanos);
  if (!cut.any) return std::nullopt;
  last_cycle_ = cut.cycle;
  last_cut_nanos_ = cut.nanos;
  return cut;
}

std::vector<bool> VmTracker::Impl::FinishCut(CutWrite& cut, OnFailedCut on_failure) {
  const size_t n = disks_.size();
  bool all = true;
  bool any = false;
  for (size_t i = 0; i < n; ++i) {
    if (!cut.tickets[i]) continue;
    all = all && cut.tickets[i]->made;
    any = true;
  }
  std::vector<bool> published(n, false);
  if (!any) return published;
  if (!all) {
    // A cycle is on every disk or on none.
    for (size_t i = 0; i < n; ++i) {
      if (cut.tickets[i]) disks_[i]->log->RollBack(*cut.tickets[i]);
    }
    if (on_failure == OnFailedCut::kReuseCycle) {
      last_cycle_ = cut.cycle - 1;
      // The cycle's changes are pending again; its first change is the oldest of them.
      int64_t none = 0;
      if (cut.first_change != 0) open_first_change_.compare_exchange_strong(none, cut.first_change);
    }
    spdlog::warn(
        "VM {}: cycle {} could not be cut on every disk; its changes go into the "
        "next cycle",
        options_.vm, cut.cycle);
    return published;
  }
  for (size_t i = 0; i < n; ++i) {
    if (cut.tickets[i]) published[i] = disks_[i]->log->Publish(*cut.tickets[i]);
  }
  std::function<void(uint64_t)> callback;
  {
    std::lock_guard lk(callback_mu_);
    callback = callback_;
  }
  if (callback) callback(cut.cycle);
  return published;
}

bool VmTracker::Impl::HasUnreleased() const {
  return std::any_of(disks_.begin(), disks_.end(),
                     [](const auto& d) { return d->log->has_unreleased(); });
}

Result<uint64_t> VmTracker::Impl::Cut(bool closing) {
  std::lock_guard cut_guard(cut_mu_);
  std::optional<CutWrite> cut;
  {
    std::unique_lock vm(cut_lock_);
    if (closed_ && !closing) {
      return Status::Error(ESHUTDOWN, "VM " + options_.vm + ": change tracking is closed");
    }
    if (closing) closed_ = true;
    cut = CutLocked(CutWhen::kIfChanged, NextCutNanosLocked());
    if (!cut) return last_cycle_.load();
  }
  std::vector<bool> published = FinishCut(*cut, OnFailedCut::kReuseCycle);
  if (std::none_of(published.begin(), published.end(), [](bool b) { return b; })) {
    return Status::Error(EAGAIN, "VM " + options_.vm + ": cycle " + std::to_string(cut->cycle) +
                                     " could not be cut; its changes go into the next cycle");
  }
  return cut->cycle;
}

Result<std::vector<uint64_t>> VmTracker::Impl::CutTogether(std::span<Impl* const> group) {
  // One lock order for every caller, whatever order it lists the trackers in.
  std::vector<Impl*> order(group.begin(), group.end());
  std::sort(order.begin(), order.end(), std::less<Impl*>());
  if (std::adjacent_find(order.begin(), order.end()) != order.end()) {
    return Status::Invalid("cut together: a tracker is listed twice");
  }
  const size_t n = order.size();
  std::vector<std::unique_lock<std::mutex>> serialised;  // each member's cut_mu_
  serialised.reserve(n);
  for (Impl* t : order) serialised.emplace_back(t->cut_mu_);
  std::vector<std::optional<CutWrite>> cuts(n);  // in the order of order
  std::vector<uint64_t> cycles(n);
  {
    // The group's instant: no change in flight in any disk of any member.
    std::vector<std::unique_lock<CutLock>> vm;
    vm.reserve(n);
    for (Impl* t : order) vm.emplace_back(t->cut_lock_);
    for (Impl* t : order) {
      if (t->closed_) {
        return Status::Error(ESHUTDOWN,
                             "cut together: VM " + t->options_.vm + ": change tracking is closed");
      }
    }
    bool changed = false;
    for (Impl* t : order) changed = t->ChangedSinceCutLocked() || changed;
    // Members whose last cuts differ (one was cut alone since, at a segment roll, or joined
    // the group) share no latest instant: cut them all once more, so an idle group ends on
    // one, and its replicas do not hold the lone cycle until the next change.
    bool apart = false;
    for (Impl* t : order)
      apart = apart || t->last_cut_nanos_.load() != order[0]->last_cut_nanos_.load();
    if (changed || apart) {
      // One time for every member, past every member's last cut.
      int64_t nanos = NowUnixNanos();
      for (Impl* t : order) nanos = std::max(nanos, t->last_cut_nanos_.load() + 1);
      for (size_t i = 0; i < n; ++i) cuts[i] = order[i]->CutLocked(CutWhen::kAlways, nanos);
    }
    for (size_t i = 0; i < n; ++i) cycles[i] = order[i]->last_cycle_;
  }
  // Outside the VM locks; each member's cut_mu_ until its cut is sealed and reported, so
  // its cycles still seal and report in order.
  for (size_t i = 0; i < n; ++i) {
    if (cuts[i]) {
      std::vector<bool> published = order[i]->FinishCut(*cuts[i], OnFailedCut::kReuseCycle);
      if (std::none_of(published.begin(), published.end(), [](bool b) { return b; })) {
        cycles[i] = order[i]->last_cycle_;  // given up: the member stays at its last cycle
      }
    }
    serialised[i].unlock();
  }
  std::vector<uint64_t> result;
  result.reserve(n);
  for (Impl* t : group) {
    auto at = std::lower_bound(order.begin(), order.end(), t, std::less<Impl*>());
    result.push_back(cycles[at - order.begin()]);
  }
  return result;
}

VmStats VmTracker::Impl::Stats() const {
  VmStats stats;
  stats.last_cycle = last_cycle_;
  stats.last_cut_unix_nanos = last_cut_nanos_;
  stats.open_first_change_unix_nanos = open_first_change_;
  for (const auto& d : disks_) stats.disks.push_back(d->log->Stats());
  std::lock_guard lk(snapshot_mu_);
  if (snapshot_) {
    for (size_t i = 0; i < stats.disks.size(); ++i) {
      stats.disks[i].snapshot_bytes = snapshot_->disks[i]->saved_bytes();
    }
  }
  return stats;
}

std::vector<SealedSegment> VmTracker::Impl::SealedSegments() const {
  std::vector<SealedSegment> all;
  for (const auto& d : disks_) {
    std::vector<SealedSegment> segs = d->log->SealedSegments();
    all.insert(all.end(), std::make_move_iterator(segs.begin()),
               std::make_move_iterator(segs.end()));
  }
  // Disks were appended in index order; a stable sort by cycle keeps that within a cycle.
  std::stable_sort(all.begin(), all.end(), [](const SealedSegment& a, const SealedSegment& b) {
    return a.cycle < b.cycle;
  });
  return all;
}

Status VmTracker::Impl::ReleaseThrough(uint64_t cycle) {
  Status result;
  for (const auto& d : disks_) {
    Status s = d->log->ReleaseThrough(cycle);
    if (!s.ok() && result.ok()) result = s;
  }
  // The cycle timer may have been waiting for this.
  if (!HasUnreleased()) RequestCut();
  return result;
}

Result<std::unique_ptr<SegmentStream>> VmTracker::Impl::OpenSegment(const SealedSegment& seg) {
  for (size_t i = 0; i < disks_.size(); ++i) {
    if (disks_[i]->config.name != seg.disk) continue;
    Result<std::unique_ptr<SegmentStream>> stream = disks_[i]->log->OpenSegment(seg.number);
    if (disks_[i]->log->fallback_pending()) FinishFallback(i);
    return stream;
  }
  return Status::Error(ENOENT, "VM " + options_.vm + " has no disk " + seg.disk);
}

void VmTracker::Impl::RequestCut() {
  {
    std::lock_guard lk(cutter_mu_);
    cut_requested_ = true;
  }
  cutter_cv_.notify_one();
}

void VmTracker::Impl::CutterLoop() {
  using Clock = std::chrono::steady_clock;
  const auto period = options_.cycle;
  std::unique_lock lk(cutter_mu_);
  if (period.count() == 0) {  // cuts come from Cut / CutTogether only
    cutter_cv_.wait(lk, [&] { return cutter_stop_; });
    return;
  }
  auto next = Clock::now() + period;
  while (!cutter_stop_) {
    cutter_cv_.wait_until(lk, next, [&] { return cutter_stop_; });
    if (cutter_stop_) break;
    if (Clock::now() < next) continue;
    cut_requested_ = false;
    lk.unlock();
    // Pacing: the next cycle is cut once the previous one has been shipped (released), so
    // a slow or cut link makes cycles longer, with overwrites coalesced, not more numerous.
    const bool paced = HasUnreleased();
    if (!paced) {
      Result<uint64_t> cycle = Cut(/*closing=*/false);
      if (!cycle.ok() && cycle.status().code() != ESHUTDOWN) {
        spdlog::warn("VM {}: cut failed: {}", options_.vm, cycle.status().ToString());
      }
    }
    if (paced) TrimActivityLogs();  // a cut trims them; without cuts, every period
    lk.lock();
    if (paced) {
      // ReleaseThrough wakes us (RequestCut); then the cut is due at once.
      cutter_cv_.wait_for(lk, period, [&] { return cutter_stop_ || cut_requested_; });
      next = Clock::now();
    } else {
      next = Clock::now() + period;
    }
  }
}

void VmTracker::Impl::TrimActivityLogs() {
  if (std::none_of(disks_.begin(), disks_.end(),
                   [](const auto& d) { return d->log->activity_log_over(); })) {
    return;
  }
  std::unique_lock vm(cut_lock_);  // no change in flight
  for (const auto& d : disks_) d->log->TrimActivityLog();
}

void VmTracker::Impl::StopCutter() {
  {
    std::lock_guard lk(cutter_mu_);
    cutter_stop_ = true;
  }
  cutter_cv_.notify_one();
  if (cutter_.joinable()) cutter_.join();
}

Status VmTracker::Impl::Close() {
  std::lock_guard close_guard(close_mu_);
  if (close_done_) return Status::Ok();
  StopCutter();
  Status result;
  Result<uint64_t> cycle = Cut(/*closing=*/true);
  if (!cycle.ok()) result = cycle.status();
  // The caller cannot finish a copy once the tracker is closed.
  Status ended = EndSnapshot(/*completed=*/false);
  if (!ended.ok() && result.ok()) result = ended;
  for (const auto& d : disks_) {
    Status s = d->log->Stop();
    if (!s.ok() && result.ok())
      result = s.WithContext("VM " + options_.vm + " disk " + d->config.name);
  }
  close_done_ = true;
  return result;
}

// ---------------------------------------------------------------------------------------

VmTracker::VmTracker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

VmTracker::~VmTracker() {
  Status s = impl_->Close();
  if (!s.ok()) spdlog::error("closing the change tracker: {}", s.ToString());
}

Result<std::unique_ptr<VmTracker>> VmTracker::Open(VmTrackerOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  SR_RETURN_IF_ERROR(impl->Open());
  return std::unique_ptr<VmTracker>(new VmTracker(std::move(impl)));
}

WriteObserver& VmTracker::observer(size_t disk_index) { return impl_->observer(disk_index); }
Result<uint64_t> VmTracker::Cut() { return impl_->Cut(/*closing=*/false); }
Result<std::vector<uint64_t>> VmTracker::CutTogether(std::span<VmTracker* const> trackers) {
  std::vector<Impl*> impls;
  impls.reserve(trackers.size());
  for (VmTracker* t : trackers) {
    if (t == nullptr) return Status::Invalid("cut together: a tracker is null");
    impls.push_back(t->impl_.get());
  }
  return Impl::CutTogether(impls);
}
VmStats VmTracker::Stats() const { return impl_->Stats(); }
Status VmTracker::Close() { return impl_->Close(); }
Result<SnapshotInfo> VmTracker::StartSnapshot() { return impl_->StartSnapshot(); }
bool VmTracker::snapshot_active() const { return impl_->snapshot_active(); }
Status VmTracker::ReadSnapshot(size_t disk, uint64_t offset, std::span<std::byte> out) {
  return impl_->ReadSnapshot(disk, offset, out);
}
Result<std::vector<ByteRange>> VmTracker::SnapshotDataRanges(size_t disk, uint64_t from,
                                                             uint64_t to) {
  return impl_->SnapshotDataRanges(disk, from, to);
}
void VmTracker::SnapshotCopied(size_t disk, uint64_t offset) {
  impl_->SnapshotCopied(disk, offset);
}
Status VmTracker::EndSnapshot(bool completed) { return impl_->EndSnapshot(completed); }
std::vector<SealedSegment> VmTracker::SealedSegments() { return impl_->SealedSegments(); }
Status VmTracker::ReleaseThrough(uint64_t cycle) { return impl_->ReleaseThrough(cycle); }
Result<std::unique_ptr<SegmentStream>> VmTracker::OpenSegment(const SealedSegment& seg) {
  return impl_->OpenSegment(seg);
}
void VmTracker::SetSealedCallback(std::function<void(uint64_t cycle)> callback) {
  impl_->SetSealedCallback(std::move(callback));
}

}  // namespace siterep::tracker
