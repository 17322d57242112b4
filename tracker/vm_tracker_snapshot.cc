// VmTracker's point-in-time snapshot (vm_tracker.h, "Point-in-time snapshot"): the cut
// that starts it, the reads, the data ranges and the end. The per-disk copy-on-write is
// DiskSnapshot (snapshot.h); the way back from the bitmap is DiskLog::ReturnToLog.
//
// Locking: StartSnapshot and EndSnapshot are serialised by snapshot_ctl_mu_. The cut, the
// return of bitmap-mode disks to the log and the attaching of every disk's DiskSnapshot
// happen in one cut_lock_-exclusive section, so no change falls between the cut and the
// copy-on-write. A change reads its disk's snapshot pointer under cut_lock_ shared and
// saves under its range lock, before its apply; a read takes the range lock of each 1 MiB
// chunk it reads. EndSnapshot detaches with cut_lock_ exclusive, so no save is in flight
// when the files go.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <mutex>
#include <optional>
#include <string>

#include "tracker/vm_tracker_impl.h"

namespace siterep::tracker {

Result<SnapshotInfo> VmTracker::Impl::StartSnapshot() {
  std::lock_guard ctl(snapshot_ctl_mu_);
  if (snapshot_active()) {
    return Status::Error(EBUSY, "VM " + options_.vm + ": a snapshot is already active");
  }
  // The files first, outside the VM lock: they are not used until attached at the cut.
  auto snap = std::make_shared<VmSnapshot>();
  auto remove_files = [&] {
    for (const auto& d : snap->disks) (void)d->Remove();
  };
  for (const auto& d : disks_) {
    Result<std::unique_ptr<DiskSnapshot>> created = DiskSnapshot::Create(
        d->config.name, d->config.image_fd, d->config.size, SnapshotPathFor(d->config.log_dir));
    if (!created.ok()) {
      remove_files();
      return created.status().WithContext("VM " + options_.vm + ": start a snapshot of disk " +
                                          d->config.name);
    }
    snap->disks.push_back(std::move(*created));
  }
  snap->resync.assign(disks_.size(), false);

  const size_t n = disks_.size();
  CutWrite cut;
  std::vector<bool> log_resync(n, false);  // logging, but an earlier resync did not finish
  std::vector<std::optional<DiskLog::ResyncStart>> returned(n);
  std::vector<bool> sealed;
  {
    std::lock_guard cut_guard(cut_mu_);
    {
      // One instant for every disk: the cut records, the return of bitmap disks to the
      // log and the start of copy-on-write, with no change in flight and none between.
      std::unique_lock vm(cut_lock_);
      if (closed_) {
        remove_files();
        return Status::Error(ESHUTDOWN, "VM " + options_.vm + ": change tracking is closed");
      }
      FinishFallbacksLocked();
      for (size_t i = 0; i < n; ++i) log_resync[i] = disks_[i]->log->resync_required();
      cut = WriteCutsLocked(NextCutNanosLocked());  // a new cycle even when nothing changed
      for (size_t i = 0; i < n; ++i) {
        // Bitmap mode, or fell back while writing the cut: back to the log after the cut.
        if (!cut.tickets[i] && disks_[i]->log->tracking_with_bitmap()) {
          returned[i] = disks_[i]->log->ReturnToLog(cut.cycle);
        }
        disks_[i]->snapshot = snap->disks[i];
      }
      last_cycle_ = cut.cycle;
      last_cut_nanos_ = cut.nanos;
      std::lock_guard lk(snapshot_mu_);
      snapshot_ = snap;
    }
    sealed = FinishCut(cut, OnFailedCut::kKeepCycle);
  }

  // Outside every lock but snapshot_ctl_mu_: what each disk must resync.
  SnapshotInfo info;
  info.cycle = cut.cycle;
  info.cut_unix_nanos = cut.nanos;
  for (size_t i = 0; i < n; ++i) {
    const Disk& d = *disks_[i];
    SnapshotDisk sd;
    sd.name = d.config.name;
    sd.disk_id = DiskIdFor(options_.vm, d.config.name);
    sd.size = d.config.size;
    sd.snapshot_path = snap->disks[i]->path();
    if (const DiskLog::CutTicket* ticket = cut.tickets[i].get(); ticket != nullptr) {
      sd.last_seq = ticket->seq;
      sd.last_segment = ticket->segment;
      if (!sealed[i]) {
        // Its segment was not built (its blocks are in the next cycle), or its log was
        // dropped into the bitmap after the cut: what the replica lacks is no longer known
        // narrower than the disk.
        spdlog::warn("VM {} disk {}: the snapshot's cut was not built; resync of every block",
                     options_.vm, sd.name);
        sd.resync = sd.all_dirty = true;
      } else if (log_resync[i]) {
        sd.resync = sd.all_dirty = true;
      } else {
        Result<std::vector<ByteRange>> dirty = d.log->ChangedBlocksThrough(ticket->segment);
        if (dirty.ok()) {
          sd.dirty = std::move(*dirty);
        } else {
          spdlog::warn("VM {} disk {}: reading the unreleased log for the snapshot: {}",
                       options_.vm, sd.name, dirty.status().ToString());
          sd.all_dirty = true;
        }
      }
    } else if (returned[i]) {
      sd.last_seq = returned[i]->last_seq;
      sd.last_segment = returned[i]->last_segment;
      sd.resync = true;
      sd.all_dirty = returned[i]->all_dirty;
      sd.dirty = std::move(returned[i]->dirty);
    } else {
      // Neither logging nor tracking with the bitmap (stopped): nothing narrower is known.
      const DiskStats stats = d.log->Stats();
      sd.last_seq = stats.last_seq;
      sd.resync = sd.all_dirty = true;
    }
    snap->resync[i] = sd.resync;
    info.disks.push_back(std::move(sd));
  }
  spdlog::info("VM {}: snapshot at cycle {} started", options_.vm, info.cycle);
  return info;
}

Result<std::shared_ptr<VmTracker::Impl::VmSnapshot>> VmTracker::Impl::SnapshotFor(
    size_t index, uint64_t offset, uint64_t length, std::string_view what) const {
  std::shared_ptr<VmSnapshot> snap;
  {
    std::lock_guard lk(snapshot_mu_);
    snap = snapshot_;
  }
  const std::string where = "VM " + options_.vm + ": snapshot " + std::string(what);
  if (!snap) return Status::Error(EINVAL, where + ": no snapshot is active");
  if (index >= disks_.size()) {
    return Status::Error(EINVAL, where + ": no disk " + std::to_string(index));
  }
  const uint64_t size = disks_[index]->config.size;
  if (offset > size || length > size - offset) {
    return Status::Error(EINVAL, where + " of [" + std::to_string(offset) + ", +" +
                                     std::to_string(length) + ") is beyond the end of disk " +
                                     disks_[index]->config.name + " (" + std::to_string(size) +
                                     " bytes)");
  }
  return snap;
}

Status VmTracker::Impl::ReadSnapshot(size_t index, uint64_t offset, std::span<std::byte> out) {
  SR_ASSIGN_OR_RETURN(std::shared_ptr<VmSnapshot> snap,
                      SnapshotFor(index, offset, out.size(), "read"));
  DiskSnapshot& snapshot = *snap->disks[index];
  RangeLocks& ranges = disks_[index]->ranges;
  // One range-lock chunk at a time: a block is consistent under its chunk's lock, and a
  // long read holds up guest writes to one chunk only.
  constexpr uint64_t kChunk = uint64_t{1} << RangeLocks::kChunkShift;
  const uint64_t end = offset + out.size();
  for (uint64_t at = offset; at < end;) {
    const uint64_t stop = std::min(end, (at / kChunk + 1) * kChunk);
    {
      RangeLocks::Guard range = ranges.Lock(at, stop - at);
      Status s = snapshot.Read(at, out.subspan(at - offset, stop - at));
      if (!s.ok())
        return s.WithContext("VM " + options_.vm + " disk " + disks_[index]->config.name);
    }
    at = stop;
  }
  return Status::Ok();
}

Result<std::vector<ByteRange>> VmTracker::Impl::SnapshotDataRanges(size_t index, uint64_t from,
                                                                   uint64_t to) {
  if (from > to) {
    return Status::Error(EINVAL, "VM " + options_.vm + ": snapshot data ranges from " +
                                     std::to_string(from) + " to " + std::to_string(to));
  }
  SR_ASSIGN_OR_RETURN(std::shared_ptr<VmSnapshot> snap,
                      SnapshotFor(index, from, to - from, "data ranges"));
  return snap->disks[index]->DataRanges(from, to);
}

void VmTracker::Impl::SnapshotCopied(size_t index, uint64_t offset) {
  std::lock_guard lk(snapshot_mu_);
  if (snapshot_ && index < snapshot_->disks.size()) snapshot_->disks[index]->Copied(offset);
}

Status VmTracker::Impl::EndSnapshot(bool completed) {
  std::lock_guard ctl(snapshot_ctl_mu_);
  std::shared_ptr<VmSnapshot> snap;
  {
    std::lock_guard lk(snapshot_mu_);
    snap = std::move(snapshot_);
    snapshot_.reset();
  }
  if (!snap) return Status::Ok();
  for (const auto& d : snap->disks) d->End();  // readers in flight fail from now on
  {
    // No change is in flight: none is saving, and the next ones see no snapshot.
    std::unique_lock vm(cut_lock_);
    for (const auto& d : disks_) d->snapshot.reset();
  }
  Status result;
  for (size_t i = 0; i < disks_.size(); ++i) {
    Status removed = snap->disks[i]->Remove();
    if (!removed.ok() && result.ok()) result = removed.WithContext("VM " + options_.vm);
    if (!snap->resync[i]) continue;
    Status ended = disks_[i]->log->EndResync(completed);
    if (!ended.ok() && result.ok()) result = ended.WithContext("VM " + options_.vm);
  }
  spdlog::info("VM {}: snapshot ended ({})", options_.vm,
               completed ? "completed" : "not completed");
  return result;
}

}  // namespace siterep::tracker
