// Replica's side of a sync (initial copy, seeded enable, resync): the calls are described
// in segment_sink.h, the replica's part in replica.h, how the images are written while
// older points stay readable in point_store.h.
//
// Crash safety: the sync is recorded (position.json "sync") before the images change and
// stays recorded until EndSync records the new applied cycle in the same update that
// drops it, so a restart always knows the images are between states. done_offset is only
// recorded after the image's fdatasync; written_until is recorded before a write passes
// it. In a staged sync every block a write changes is in the undo file of the kept point,
// synced, before the write (PointStore::SyncWrite / SyncZero).
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <cerrno>
#include <string>

#include "applier/replica.h"
#include "common/block_hash.h"
#include "common/failpoint.h"
#include "common/units.h"

namespace siterep::applier {
namespace {

// Largest data chunk of one WriteSyncData (the wire's raw chunk limit).
constexpr uint64_t kMaxSyncData = 1u << 20;
// Progress is recorded (image synced, position.json written) at least this often.
constexpr uint64_t kProgressBytes = 64ull << 20;
constexpr auto kProgressInterval = std::chrono::seconds(1);
// written_until is recorded this far beyond a write that passes it, so position.json is
// written about once per this many bytes written rather than at every write.
constexpr uint64_t kWrittenAhead = 256ull << 20;

Status AtFailpoint(std::string_view name) {
  if (failpoint::Check(name) == failpoint::Action::kError) {
    return Status::Error(EIO, "failpoint " + std::string(name));
  }
  return Status::Ok();
}

std::string SyncName(uint64_t sync_id) { return "sync " + std::to_string(sync_id); }

}  // namespace

// ---------------------------------------------------------------------------------------
// BeginSync

Status Replica::ApplyBeforeSync(uint64_t sync_id) {
  for (;;) {
    {
      std::lock_guard lk(mu_);
      if (state_.pending.empty() || state_.pending.front().info.cycle >= sync_id) {
        return Status::Ok();
      }
    }
    SR_ASSIGN_OR_RETURN(ApplyStep step, ApplyNext());
    if (step == ApplyStep::kHeld) {
      // The group's other members have not got that far: the sync replaces the cycle.
      spdlog::info("replica of VM {}: cycles held by the apply gate before sync {} are dropped",
                   Definition().vm, sync_id);
      return Status::Ok();
    }
    if (step != ApplyStep::kApplied) return Status::Ok();
  }
}

uint64_t SyncSpaceNeeded(const SyncPlan& plan, std::span<const uint64_t> allocated, bool undo) {
  uint64_t need = 0;
  for (size_t i = 0; i < plan.disks.size(); ++i) {
    const uint64_t total = plan.disks[i].bytes_total;
    if (i < allocated.size() && total > allocated[i]) need += total - allocated[i];
    if (undo) {
      const uint64_t blocks = (total + kUndoBlockSize - 1) / kUndoBlockSize;
      need += blocks * (kUndoBlockSize + kUndoHeaderSize);
    }
  }
  return need;
}

Status Replica::CheckSyncSpace(const SyncPlan& plan, bool undo) const {
  struct statvfs vfs {};
  if (::statvfs(dir_.c_str(), &vfs) != 0) {
    return Status::FromErrno(errno, "statvfs " + dir_.string());
  }
  const uint64_t free = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  std::vector<uint64_t> allocated;
  for (size_t i = 0; i < plan.disks.size(); ++i) {
    const std::filesystem::path image = ImagePath(i);
    struct stat st {};
    if (::stat(image.c_str(), &st) != 0) return Status::FromErrno(errno, "stat " + image.string());
    allocated.push_back(static_cast<uint64_t>(st.st_blocks) * 512);
  }
  const uint64_t need = SyncSpaceNeeded(plan, allocated, undo);
  if (need > free) {
    return Status::Error(ENOSPC, SyncName(plan.sync_id) + " of VM " + Definition().vm +
                                     ": the replica site has " + FormatSize(free) + " free in " +
                                     dir_.string() + ", the copy needs " + FormatSize(need) +
                                     (undo ? " (with the undo journal that keeps the last "
                                             "recovery point readable while it runs)"
                                           : ""));
  }
  return Status::Ok();
}

void Replica::DropReceived() {
  for (size_t i = 0; i < incoming_.size(); ++i) DropIncoming(i);
  {
    std::lock_guard lk(mu_);
    for (auto& s : staged_) s.reset();
  }
  // With no pending cycle, this deletes every received segment.
  Status s = CleanReceived();
  if (!s.ok()) spdlog::warn("replica of VM {}: {}", Definition().vm, s.ToString());
}

Result<SyncResume> Replica::BeginSync(const SyncPlan& plan) {
  // apply_mu_ keeps the applier thread out while the committed cycles are applied and the
  // sync is recorded; after that it sees the sync and applies nothing.
  std::lock_guard apply(apply_mu_);
  std::lock_guard recv(recv_mu_);
  ReplicaDefinition def = Definition();
  SR_RETURN_IF_ERROR(CheckSyncPlan(plan, def));
  const std::string what = SyncName(plan.sync_id) + " of VM " + def.vm;
  PositionState state;
  {
    std::lock_guard lk(mu_);
    SR_RETURN_IF_ERROR(RefuseWhileMaterializingLocked(what));
    state = state_;
  }

  if (plan.sync_id <= state.applied_cycle) {
    if (state.sync || plan.sync_id != state.applied_cycle || state.applying_cycle != 0) {
      return Status::Invalid(what + " is not newer than the replica's applied cycle " +
                             std::to_string(state.applied_cycle));
    }
    // The images are this cut already (the sync ended and the primary did not hear of
    // it): nothing to send; EndSync is a no-op. What came after it is dropped.
    SR_RETURN_IF_ERROR(UpdatePosition([&](PositionState& s) {
      s.received_cycle = plan.sync_id;
      for (size_t i = 0; i < s.disks.size(); ++i) {
        s.disks[i] = DiskReceived{plan.disks[i].last_segment, plan.disks[i].last_seq};
      }
      s.pending.clear();
      s.apply_error.clear();
    }));
    {
      std::lock_guard lk(mu_);
      transient_error_.clear();
    }
    DropReceived();
    SyncResume resume;
    for (const DiskDefinition& d : def.disks) resume.disks.push_back({d.disk_id, d.size, 0});
    spdlog::info("replica of VM {}: {} has ended already", def.vm, SyncName(plan.sync_id));
    return resume;
  }

  if (!state.sync) {
    // Committed cycles older than the plan first, so that the point kept during the sync
    // is as new as it can be. Whatever does not apply is replaced by the sync.
    Status applied = ApplyBeforeSync(plan.sync_id);
    if (!applied.ok()) {
      spdlog::warn("replica of VM {}: {} replaces the cycles not applied: {}", def.vm,
                   SyncName(plan.sync_id), applied.ToString());
    }
    std::lock_guard lk(mu_);
    state = state_;
  }
  const bool resumed = state.sync && state.sync->sync_id == plan.sync_id;
  const bool staged = state.sync ? state.sync->staged : store_->CanStage();
  // A staged sync saves what it overwrites before it writes: without room for that, it
  // would stop at the first block it cannot save, and again at every retry.
  SR_RETURN_IF_ERROR(CheckSyncSpace(plan, /*undo=*/staged && !resumed));

  SyncState next = SyncStateFor(plan);
  next.staged = staged;
  if (state.sync) {
    const SyncState& old = *state.sync;
    next.point = old.point;
    for (size_t i = 0; i < next.disks.size(); ++i) {
      const SyncDiskState& o = old.disks[i];
      SyncDiskState& n = next.disks[i];
      if (resumed) {
        n.done_offset = o.done_offset;
        n.written_until = o.written_until;
        n.older_written_until = o.older_written_until;
      } else {
        // Blocks below these offsets may hold the other sync's data, not the old point's.
        n.older_written_until = std::max({o.done_offset, o.written_until, o.older_written_until});
        n.written_until = n.older_written_until;
      }
    }
    if (resumed) next.bytes_written = old.bytes_written;
  } else {
    next.point = next.staged ? state.applied_cycle : 0;
  }
  // The store first (a crash before the position update leaves a chain point that Open
  // removes), then the record that the images are being rewritten.
  SR_RETURN_IF_ERROR(store_->BeginSync(next.staged ? SyncWrites::kStaged : SyncWrites::kDirect));
  Status recorded = UpdatePosition([&](PositionState& s) {
    s.sync = next;
    s.pending.clear();
    s.apply_error.clear();
  });
  if (!recorded.ok()) {
    if (!state.sync) store_->CancelSync();
    return recorded.WithContext(what);
  }
  {
    std::lock_guard lk(mu_);
    transient_error_.clear();
    for (size_t i = 0; i < sync_done_to_.size(); ++i) sync_done_to_[i] = next.disks[i].done_offset;
    sync_bytes_written_ = next.bytes_written;
  }
  sync_noted_at_ = std::chrono::steady_clock::now();
  DropReceived();

  SyncResume resume;
  for (size_t i = 0; i < def.disks.size(); ++i) {
    resume.disks.push_back(SyncDiskResume{def.disks[i].disk_id, next.disks[i].done_offset,
                                          next.disks[i].older_written_until});
  }
  spdlog::info("replica of VM {}: {} {} ({}, {}){}", def.vm, SyncName(plan.sync_id),
               resumed ? "resumed" : "started", SyncKindName(plan.kind),
               next.staged ? "point " + std::to_string(next.point) + " stays readable"
                           : "no consistent point until it ends",
               state.sync && !resumed
                   ? "; it replaces the unfinished " + SyncName(state.sync->sync_id)
                   : std::string());
  return resume;
}

// ---------------------------------------------------------------------------------------
// Hashes and data

Result<std::vector<uint64_t>> Replica::SyncHashes(uint32_t disk_id, uint64_t offset,
                                                  uint32_t count) {
  std::lock_guard recv(recv_mu_);
  const std::optional<size_t> disk = DiskIndex(disk_id);
  if (!disk) return Status::Invalid("sync hashes: no disk with id " + std::to_string(disk_id));
  const DiskDefinition& d = store_->disk(*disk);
  const std::string what = "sync hashes of disk " + d.name + " at offset " + std::to_string(offset);
  {
    std::lock_guard lk(mu_);
    if (!state_.sync) return Status::Invalid(what + ": no sync is in progress");
  }
  if (offset % kSyncBlockSize != 0) {
    return Status::Invalid(what + ": not a multiple of " + std::to_string(kSyncBlockSize));
  }
  if (count == 0 || count > kMaxHashBlocks) {
    return Status::Invalid(what + ": " + std::to_string(count) + " blocks (1 to " +
                           std::to_string(kMaxHashBlocks) + ")");
  }
  if (offset >= d.size) {
    return Status::Invalid(what + ": the disk has " + std::to_string(d.size) + " bytes");
  }
  // Blocks past the end are not hashed; the last one is hashed over its bytes in the disk.
  const uint64_t bytes = std::min<uint64_t>(uint64_t{count} * kSyncBlockSize, d.size - offset);
  const uint64_t blocks = (bytes + kSyncBlockSize - 1) / kSyncBlockSize;
  if (hash_buffer_.size() < bytes) hash_buffer_.resize(bytes);
  std::span<std::byte> buf(hash_buffer_.data(), bytes);
  // The primary asks for the next batches right after this one: read them ahead.
  SR_RETURN_IF_ERROR(store_->ReadImage(*disk, offset, buf, 2 * kMaxHashBlocks * kSyncBlockSize));
  std::vector<uint64_t> hashes;
  hashes.reserve(blocks);
  AppendBlockHashes(buf, kSyncBlockSize, &hashes);
  return hashes;
}

Result<uint64_t> Replica::WriteSyncData(uint32_t disk_id, uint64_t offset,
                                        std::span<const std::byte> data, uint64_t zero_length,
                                        uint64_t done_to) {
  std::lock_guard recv(recv_mu_);
  const std::optional<size_t> disk = DiskIndex(disk_id);
  if (!disk) return Status::Invalid("sync data: no disk with id " + std::to_string(disk_id));
  const size_t i = *disk;
  const DiskDefinition& d = store_->disk(i);
  const uint64_t length = data.empty() ? zero_length : data.size();
  const std::string what = "sync data for [" + std::to_string(offset) + ", +" +
                           std::to_string(length) + ") of disk " + d.name;
  uint64_t written_until;
  {
    std::lock_guard lk(mu_);
    if (!state_.sync) return Status::Invalid(what + ": no sync is in progress");
    written_until = state_.sync->disks[i].written_until;
  }
  if (!data.empty() && zero_length != 0) {
    return Status::Invalid(what + ": both data and a zero extent");
  }
  if (data.size() > kMaxSyncData) {
    return Status::Invalid(what + ": more than " + std::to_string(kMaxSyncData) +
                           " bytes of data in one call");
  }
  if (offset > d.size || length > d.size - offset) {
    return Status::Invalid(what + ": beyond the end of the disk (" + std::to_string(d.size) +
                           " bytes)");
  }
  if (done_to < offset + length || done_to > d.size) {
    return Status::Invalid(what + ": done_to " + std::to_string(done_to) +
                           " is not between the end of the data and the end of the disk");
  }

  bool changes = !data.empty();
  if (data.empty() && zero_length != 0) {
    SR_ASSIGN_OR_RETURN(changes, store_->HoldsData(i, offset, zero_length));
  }
  if (changes) {
    if (offset + length > written_until) {
      const uint64_t until = std::min<uint64_t>(d.size, offset + length + kWrittenAhead);
      SR_RETURN_IF_ERROR(
          UpdatePosition([&](PositionState& s) { s.sync->disks[i].written_until = until; }));
    }
    if (!data.empty()) {
      SR_RETURN_IF_ERROR(store_->SyncWrite(i, offset, data));
      std::lock_guard lk(mu_);
      sync_bytes_written_ += data.size();
    } else {
      SR_ASSIGN_OR_RETURN(bool zeroed, store_->SyncZero(i, offset, zero_length));
      (void)zeroed;
    }
    SR_RETURN_IF_ERROR(AtFailpoint("applier.sync_mid_write"));
  }
  {
    std::lock_guard lk(mu_);
    sync_done_to_[i] = std::max(sync_done_to_[i], done_to);
  }
  SR_RETURN_IF_ERROR(NoteSyncProgress(i));
  std::lock_guard lk(mu_);
  return state_.sync->disks[i].done_offset;
}

Status Replica::NoteSyncProgress(size_t disk) {
  uint64_t done_to;
  uint64_t durable;
  uint64_t bytes_written;
  {
    std::lock_guard lk(mu_);
    done_to = sync_done_to_[disk];
    durable = state_.sync->disks[disk].done_offset;
    bytes_written = sync_bytes_written_;
  }
  if (done_to <= durable) return Status::Ok();
  const auto now = std::chrono::steady_clock::now();
  const bool due = done_to - durable >= kProgressBytes || done_to == store_->disk(disk).size ||
                   now - sync_noted_at_ >= kProgressInterval;
  if (!due) return Status::Ok();
  SR_RETURN_IF_ERROR(store_->SyncImage(disk));
  SR_RETURN_IF_ERROR(UpdatePosition([&](PositionState& s) {
    s.sync->disks[disk].done_offset = done_to;
    s.sync->bytes_written = bytes_written;
  }));
  sync_noted_at_ = now;
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// EndSync and status

Status Replica::EndSync(uint64_t sync_id, int64_t cut_unix_nanos) {
  std::lock_guard apply(apply_mu_);
  std::lock_guard recv(recv_mu_);
  const ReplicaDefinition def = Definition();
  const std::string what = "end of " + SyncName(sync_id) + " of VM " + def.vm;
  std::optional<SyncState> sync;
  std::vector<uint64_t> done_to;
  {
    std::lock_guard lk(mu_);
    if (!state_.sync) {
      // Ended before (the primary did not hear of it): nothing to do.
      if (sync_id != 0 && (sync_id == state_.last_sync_id ||
                           (sync_id == state_.applied_cycle && state_.applying_cycle == 0))) {
        return Status::Ok();
      }
      return Status::Invalid(what + ": no sync is in progress (applied cycle " +
                             std::to_string(state_.applied_cycle) + ")");
    }
    sync = state_.sync;
    done_to = sync_done_to_;
  }
  if (sync->sync_id != sync_id) {
    return Status::Invalid(what + ": the sync in progress is " + SyncName(sync->sync_id));
  }
  for (size_t i = 0; i < def.disks.size(); ++i) {
    if (done_to[i] != def.disks[i].size) {
      return Status::Invalid(what + ": disk " + def.disks[i].name + " is done up to " +
                             std::to_string(done_to[i]) + " of " +
                             std::to_string(def.disks[i].size) + " bytes");
    }
  }
  SR_RETURN_IF_ERROR(store_->SyncImages());
  SR_RETURN_IF_ERROR(AtFailpoint("applier.sync_before_end"));
  const int64_t cut = cut_unix_nanos != 0 ? cut_unix_nanos : sync->cut_unix_nanos;
  SR_RETURN_IF_ERROR(UpdatePosition([&](PositionState& s) {
    s.received_cycle = sync_id;
    s.applied_cycle = sync_id;
    s.applying_cycle = 0;
    s.applied_cut_unix_nanos = cut;
    s.applied_first_change_unix_nanos = 0;
    for (size_t i = 0; i < s.disks.size(); ++i) {
      s.disks[i] = DiskReceived{sync->disks[i].last_segment, sync->disks[i].last_seq};
    }
    s.pending.clear();
    s.apply_error.clear();
    s.last_sync_id = sync_id;
    s.sync.reset();
  }));
  {
    std::lock_guard lk(mu_);
    transient_error_.clear();
    std::fill(sync_done_to_.begin(), sync_done_to_.end(), 0);
    sync_bytes_written_ = 0;
  }
  hash_buffer_ = {};  // up to 16 MiB, only needed during a sync
  spdlog::info("replica of VM {}: {} ended; the images are cycle {}", def.vm, SyncName(sync_id),
               sync_id);
  // The sync stays ended if this fails (as after an applied cycle); EndSync again is Ok.
  Status points = store_->FinishSync(
      sync_id, cut, PointPolicy{def.recovery_points, def.recovery_point_interval_ms});
  if (!points.ok()) return points.WithContext("recovery points after " + SyncName(sync_id));
  return Status::Ok();
}

SyncStatus Replica::Sync() const {
  std::lock_guard lk(mu_);
  SyncStatus st;
  if (!state_.sync) return st;
  st.active = true;
  st.sync_id = state_.sync->sync_id;
  st.kind = state_.sync->kind;
  for (size_t i = 0; i < def_.disks.size(); ++i) {
    st.bytes_done += state_.sync->disks[i].done_offset;
    st.bytes_total += def_.disks[i].size;
  }
  st.bytes_written = sync_bytes_written_;
  return st;
}

}  // namespace siterep::applier
