#include "applier/point_store.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "common/file_util.h"
#include "tracker/replay.h"

namespace siterep::applier {
namespace fs = std::filesystem;
using tracker::RecordKind;

namespace {

bool AllZeros(std::span<const std::byte> data) {
  return std::all_of(data.begin(), data.end(), [](std::byte b) { return b == std::byte{0}; });
}

int64_t IntervalNanos(int64_t interval_ms) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max() / 1000000;
  return interval_ms >= kMax ? std::numeric_limits<int64_t>::max() : interval_ms * 1000000;
}

}  // namespace

fs::path PointStore::ImagePath(const fs::path& dir, const std::string& disk) {
  return dir / (disk + ".img");
}

Result<std::shared_ptr<PointStore>> PointStore::Open(const fs::path& dir,
                                                     std::vector<DiskDefinition> disks,
                                                     const ImagesState& at) {
  const uint64_t applied_cycle = at.applied_cycle;
  const SyncWrites sync = at.sync;
  std::shared_ptr<PointStore> store(new PointStore());
  std::vector<uint32_t> ids;
  for (DiskDefinition& def : disks) {
    Disk d;
    d.path = ImagePath(dir, def.name);
    SR_ASSIGN_OR_RETURN(d.fd, OpenFile(d.path, O_RDWR));
    struct stat st {};
    if (::fstat(d.fd.get(), &st) != 0) return Status::FromErrno(errno, "stat " + d.path.string());
    if (static_cast<uint64_t>(st.st_size) != def.size) {
      return Status::Error(EINVAL, "replica image " + d.path.string() + " is " +
                                       std::to_string(st.st_size) + " bytes; disk " + def.name +
                                       " is " + std::to_string(def.size) + " bytes");
    }
    ids.push_back(def.disk_id);
    d.def = std::move(def);
    store->disks_.push_back(std::move(d));
  }
  SR_ASSIGN_OR_RETURN(store->journal_, UndoJournal::Open(dir / "undo", std::move(ids)));
  store->latest_cycle_ = applied_cycle;
  store->latest_cut_unix_nanos_ = at.applied_cut_unix_nanos;
  store->has_latest_ = applied_cycle != 0 || at.cycle0_is_point;
  store->images_partial_ = at.partial;
  store->sync_ = sync;
  if (sync != SyncWrites::kNone) store->images_partial_ = true;
  if (sync == SyncWrites::kDirect) {
    store->latest_cycle_ = 0;
    store->has_latest_ = false;
  }
  if (at.materializing) {
    // The journal must stay as it is until the images are that point: nothing collected.
    store->materializing_ = at.materializing;
    store->images_partial_ = true;
    return store;
  }
  if (sync == SyncWrites::kStaged && !store->journal_->Find(applied_cycle)) {
    // The undo file of the point was lost (LoadPoints said why): the latest point cannot
    // be read until the sync ends; older points still can.
    spdlog::error(
        "replica {}: point {} is gone from the undo journal; it cannot be read "
        "while the sync runs",
        dir.string(), applied_cycle);
  }
  std::unique_lock lock(store->mu_);
  if (sync != SyncWrites::kDirect) {
    // A chain point newer than the applied cycle is left by a materialization that
    // recorded its (older) point and stopped before emptying the journal, or by a view of
    // a cycle whose apply was not recorded yet. Either way the images are at the applied
    // cycle (or being made the next one again), so those files hold no older point's
    // content that the older files and the images do not hold: drop them, no merge.
    const UndoJournal& j = *store->journal_;
    size_t keep = 0;
    while (keep < j.size() && j.point(keep).cycle <= applied_cycle) ++keep;
    if (keep < j.size()) {
      spdlog::warn("replica {}: dropping {} undo point(s) newer than the applied cycle {}",
                   dir.string(), j.size() - keep, applied_cycle);
      SR_RETURN_IF_ERROR(store->journal_->KeepOldest(keep));
    }
  }
  // Points that only views pinned (views do not survive a restart).
  SR_RETURN_IF_ERROR(store->CollectLocked());
  return store;
}

PointStore::Writer PointStore::BeginCycle() {
  Writer w(this, std::unique_lock(mu_));
  images_partial_ = true;
  return w;
}

Status PointStore::ReadImageBlock(size_t disk, uint64_t block, std::span<std::byte> out) const {
  const Disk& d = disks_[disk];
  const uint64_t at = block * kUndoBlockSize;
  const uint64_t n = std::min<uint64_t>(kUndoBlockSize, d.def.size - at);
  if (n < kUndoBlockSize) std::memset(out.data() + n, 0, kUndoBlockSize - n);
  return PReadAll(d.fd.get(), out.data(), n, at, d.path.string());
}

Status PointStore::SaveBlock(size_t disk, uint64_t block, bool skip_zeros,
                             std::span<std::byte> scratch) {
  if (journal_->NewestHas(disk, block)) return Status::Ok();
  SR_RETURN_IF_ERROR(ReadImageBlock(disk, block, scratch));
  if (skip_zeros && AllZeros(scratch)) return Status::Ok();
  return journal_->Save(disk, block, scratch);
}

Status PointStore::Writer::Save(size_t disk, const tracker::RecordHeader& h) {
  if (h.kind == RecordKind::kCut) return Status::Ok();
  return store_->SaveRange(disk, h.offset, h.length, h.kind == RecordKind::kDiscard);
}

Status PointStore::SaveRange(size_t disk, uint64_t offset, uint64_t length, bool data_only) {
  if (journal_->empty() || length == 0) return Status::Ok();
  std::vector<std::byte> scratch(kUndoBlockSize);
  const uint64_t first = offset / kUndoBlockSize;
  const uint64_t end = (offset + length + kUndoBlockSize - 1) / kUndoBlockSize;
  if (!data_only) {
    for (uint64_t b = first; b < end; ++b) SR_RETURN_IF_ERROR(SaveBlock(disk, b, false, scratch));
    return Status::Ok();
  }
  // A discard only changes blocks that hold data; skip the holes of the image (a discard
  // can span a whole disk) and save only blocks that do not read as zeros.
  const int fd = disks_[disk].fd.get();
  uint64_t b = first;
  while (b < end) {
    const off_t data = ::lseek(fd, static_cast<off_t>(b * kUndoBlockSize), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // only a hole from here on
      if (errno != EINVAL && errno != EOPNOTSUPP) {
        return Status::FromErrno(errno, "seek data in " + disks_[disk].path.string());
      }
      // No SEEK_DATA here: look at every block.
      for (; b < end; ++b) SR_RETURN_IF_ERROR(SaveBlock(disk, b, true, scratch));
      break;
    }
    const off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return Status::FromErrno(errno, "seek hole in " + disks_[disk].path.string());
    // data >= b * kUndoBlockSize, and hole > data, so this advances.
    b = static_cast<uint64_t>(data) / kUndoBlockSize;
    const uint64_t stop = std::min<uint64_t>(
        end, (static_cast<uint64_t>(hole) + kUndoBlockSize - 1) / kUndoBlockSize);
    for (; b < stop; ++b) SR_RETURN_IF_ERROR(SaveBlock(disk, b, true, scratch));
  }
  return Status::Ok();
}

Status PointStore::Writer::SyncUndo() { return store_->journal_->Sync(); }

Status PointStore::Writer::WriteRecord(size_t disk, const tracker::RecordHeader& header,
                                       std::span<const std::byte> payload) {
  const Disk& d = store_->disks_[disk];
  Status s = tracker::ApplyRecord(d.fd.get(), d.def.size, header, payload);
  if (!s.ok()) return s.WithContext("replica image " + d.path.string());
  return s;
}

Status PointStore::Writer::SyncImages() {
  for (const Disk& d : store_->disks_) {
    if (::fdatasync(d.fd.get()) != 0)
      return Status::FromErrno(errno, "fdatasync " + d.path.string());
  }
  return Status::Ok();
}

void PointStore::Writer::Finish(uint64_t cycle, int64_t cut_unix_nanos) {
  store_->latest_cycle_ = cycle;
  store_->latest_cut_unix_nanos_ = cut_unix_nanos;
  store_->has_latest_ = true;
  store_->images_partial_ = false;
}

Status PointStore::AfterApplied(uint64_t cycle, int64_t cut_unix_nanos, const PointPolicy& policy) {
  std::unique_lock lock(mu_);
  // The journal is the materialization's until it ends (FinishMaterialize runs this then).
  if (materializing_) return Status::Ok();
  if (policy.recovery_points > 0 && (cycle != 0 || has_latest_)) {
    const UndoPoint* newest_retained = nullptr;
    for (size_t i = journal_->size(); i-- > 0;) {
      if (journal_->point(i).retained) {
        newest_retained = &journal_->point(i);
        break;
      }
    }
    bool take = newest_retained == nullptr;
    if (!take && cycle > newest_retained->cycle &&
        cut_unix_nanos >= newest_retained->cut_unix_nanos) {
      take = cut_unix_nanos - newest_retained->cut_unix_nanos >= IntervalNanos(policy.interval_ms);
    }
    if (take) {
      if (!journal_->empty() && journal_->point(journal_->size() - 1).cycle == cycle) {
        // A view pinned the latest point before it became a recovery point.
        SR_RETURN_IF_ERROR(journal_->SetRetained(journal_->size() - 1, true));
      } else if (journal_->empty() || journal_->point(journal_->size() - 1).cycle < cycle) {
        SR_RETURN_IF_ERROR(journal_->AddPoint(cycle, cut_unix_nanos, true));
      }
    }
  }
  return PruneLocked(policy.recovery_points);
}

Status PointStore::Prune(int recovery_points) {
  std::unique_lock lock(mu_);
  if (materializing_) return Status::Ok();  // FinishMaterialize prunes
  return PruneLocked(recovery_points);
}

Status PointStore::PruneLocked(int recovery_points) {
  size_t retained = 0;
  for (size_t i = 0; i < journal_->size(); ++i) retained += journal_->point(i).retained ? 1 : 0;
  for (size_t i = 0; i < journal_->size() && retained > static_cast<size_t>(recovery_points); ++i) {
    if (!journal_->point(i).retained) continue;
    SR_RETURN_IF_ERROR(journal_->SetRetained(i, false));
    --retained;
  }
  return CollectLocked();
}

Status PointStore::CollectLocked() {
  // Oldest first: dropping the oldest point is a plain delete, no merge.
  for (size_t i = 0; i < journal_->size();) {
    const UndoPoint& p = journal_->point(i);
    const bool sync_point = sync_ == SyncWrites::kStaged && p.cycle == latest_cycle_;
    if (p.retained || pins_.count(p.cycle) != 0 || sync_point) {
      ++i;
      continue;
    }
    const uint64_t cycle = p.cycle;
    SR_RETURN_IF_ERROR(journal_->RemovePoint(i));
    spdlog::debug("replica undo: point {} removed", cycle);
  }
  return Status::Ok();
}

std::vector<RecoveryPoint> PointStore::Points() const {
  std::shared_lock lock(mu_);
  std::vector<RecoveryPoint> out;
  if (materializing_) return out;
  for (size_t i = 0; i < journal_->size(); ++i) {
    const UndoPoint& p = journal_->point(i);
    if (p.retained)
      out.push_back(RecoveryPoint{p.cycle, p.cut_unix_nanos, p.cycle == latest_cycle_});
  }
  if (has_latest_ && (out.empty() || out.back().id != latest_cycle_)) {
    out.push_back(RecoveryPoint{latest_cycle_, latest_cut_unix_nanos_, true});
  }
  return out;
}

uint64_t PointStore::undo_bytes() const {
  std::shared_lock lock(mu_);
  return journal_->bytes();
}

std::string PointStore::PointList() const {
  std::string list;
  for (size_t i = 0; i < journal_->size(); ++i) {
    const UndoPoint& p = journal_->point(i);
    if (!p.retained || (has_latest_ && p.cycle == latest_cycle_)) continue;  // listed below
    list += (list.empty() ? "" : ", ") + std::to_string(p.cycle);
  }
  if (has_latest_) list += (list.empty() ? "" : ", ") + std::to_string(latest_cycle_) + " (latest)";
  return list.empty() ? "none" : list;
}

Result<RecoveryPoint> PointStore::Pin(uint64_t point_id) {
  std::unique_lock lock(mu_);
  if (materializing_) {
    return Status::Error(EBUSY, "the images are being made point " +
                                    std::to_string(*materializing_) +
                                    "; no point can be read until that ends");
  }
  const uint64_t cycle = point_id == kLatestPoint ? latest_cycle_ : point_id;
  const bool is_latest = has_latest_ && cycle == latest_cycle_;
  if (cycle == 0 && !has_latest_ && sync_ == SyncWrites::kDirect) {
    return Status::Error(ENOENT, "the replica has no consistent point until its sync ends");
  }
  if (cycle == 0 && !has_latest_) {
    return Status::Error(ENOENT, "the replica has no recovery point yet (no cycle applied)");
  }
  const std::optional<size_t> at = journal_->Find(cycle);
  if (at && (journal_->point(*at).retained || is_latest)) {
    ++pins_[cycle];
    return RecoveryPoint{cycle, journal_->point(*at).cut_unix_nanos, is_latest};
  }
  if (!is_latest) {
    return Status::Error(
        ENOENT, "no recovery point " + std::to_string(point_id) + " (points: " + PointList() + ")");
  }
  if (images_partial_) {
    return Status::Error(EBUSY, "the latest recovery point (" + std::to_string(cycle) +
                                    ") cannot be read while the images are between cycles; it "
                                    "can once the next cycle is applied");
  }
  SR_RETURN_IF_ERROR(journal_->AddPoint(cycle, latest_cut_unix_nanos_, /*retained=*/false));
  ++pins_[cycle];
  return RecoveryPoint{cycle, latest_cut_unix_nanos_, true};
}

void PointStore::Unpin(uint64_t cycle) {
  std::unique_lock lock(mu_);
  auto it = pins_.find(cycle);
  if (it == pins_.end()) return;
  if (--it->second > 0) return;
  pins_.erase(it);
  Status s = CollectLocked();
  if (!s.ok())
    spdlog::warn("replica undo: dropping point {} after its last view: {}", cycle, s.ToString());
}

Result<std::vector<std::vector<uint64_t>>> PointStore::UndoBlocksSince(uint64_t point_id) const {
  std::shared_lock lock(mu_);
  const std::optional<size_t> at = journal_->Find(point_id);
  if (materializing_) {
    if (point_id != *materializing_) {
      return Status::Error(EBUSY, "the images are being made point " +
                                      std::to_string(*materializing_) +
                                      "; no other point can be looked at until that ends");
    }
  } else {
    const bool is_latest = has_latest_ && point_id == latest_cycle_;
    if (!is_latest && !(at && journal_->point(*at).retained)) {
      return Status::Error(ENOENT, "no recovery point " + std::to_string(point_id) +
                                       " (points: " + PointList() + ")");
    }
  }
  std::vector<std::vector<uint64_t>> out(disks_.size());
  if (at) {
    for (size_t disk = 0; disk < disks_.size(); ++disk) out[disk] = journal_->BlocksFrom(*at, disk);
  }
  return out;
}

Status PointStore::Read(uint64_t cycle, size_t disk, uint64_t offset,
                        std::span<std::byte> out) const {
  std::shared_lock lock(mu_);
  if (disk >= disks_.size()) return Status::Invalid("no disk " + std::to_string(disk));
  const Disk& d = disks_[disk];
  if (offset > d.def.size || out.size() > d.def.size - offset) {
    return Status::Invalid("read of [" + std::to_string(offset) + ", +" +
                           std::to_string(out.size()) + ") is beyond the end of disk " +
                           d.def.name + " (" + std::to_string(d.def.size) + " bytes)");
  }
  const std::optional<size_t> at = journal_->Find(cycle);
  if (!at) return Status::Error(ENOENT, "recovery point " + std::to_string(cycle) + " is gone");
  // Blocks the undo files do not hold come from the image; consecutive ones in one pread.
  uint64_t run_start = offset;  // disk offset where the pending image run starts
  size_t run_len = 0;
  auto flush_run = [&]() -> Status {
    if (run_len == 0) return Status::Ok();
    Status s = PReadAll(d.fd.get(), out.data() + (run_start - offset), run_len, run_start,
                        d.path.string());
    run_len = 0;
    return s;
  };
  std::vector<std::byte> block(kUndoBlockSize);
  uint64_t pos = offset;
  const uint64_t end = offset + out.size();
  while (pos < end) {
    const uint64_t b = pos / kUndoBlockSize;
    const uint64_t in_block = pos - b * kUndoBlockSize;
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kUndoBlockSize - in_block, end - pos));
    SR_ASSIGN_OR_RETURN(bool from_undo, journal_->ReadAsOf(*at, disk, b, block));
    if (from_undo) {
      SR_RETURN_IF_ERROR(flush_run());
      std::memcpy(out.data() + (pos - offset), block.data() + in_block, n);
    } else {
      if (run_len == 0) run_start = pos;
      run_len += n;
    }
    pos += n;
  }
  return flush_run();
}

// ---------------------------------------------------------------------------------------
// Syncs

bool PointStore::CanStage() const {
  std::shared_lock lock(mu_);
  if (sync_ != SyncWrites::kNone) return sync_ == SyncWrites::kStaged;
  if (!has_latest_) return false;
  if (!images_partial_) return true;
  return !journal_->empty() && journal_->point(journal_->size() - 1).cycle == latest_cycle_;
}

Status PointStore::BeginSync(SyncWrites mode) {
  std::unique_lock lock(mu_);
  if (mode == SyncWrites::kNone) return Status::Invalid("replica images: sync mode none");
  if (sync_ == mode) return Status::Ok();
  if (sync_ != SyncWrites::kNone) {
    return Status::Invalid("replica images: an unfinished sync writes them another way");
  }
  if (materializing_) return Status::Invalid("replica images: a materialization is unfinished");
  if (mode == SyncWrites::kStaged) {
    if (!has_latest_) return Status::Invalid("replica images: no point to keep for a sync");
    const bool newest =
        !journal_->empty() && journal_->point(journal_->size() - 1).cycle == latest_cycle_;
    if (!newest) {
      if (images_partial_) {
        return Status::Invalid("replica images: point " + std::to_string(latest_cycle_) +
                               " cannot be kept, the images are between cycles");
      }
      SR_RETURN_IF_ERROR(journal_->AddPoint(latest_cycle_, latest_cut_unix_nanos_, false));
    }
  }
  pre_sync_latest_cycle_ = latest_cycle_;
  pre_sync_has_latest_ = has_latest_;
  pre_sync_partial_ = images_partial_;
  sync_ = mode;
  images_partial_ = true;
  if (mode == SyncWrites::kDirect) {
    latest_cycle_ = 0;
    has_latest_ = false;
  }
  return Status::Ok();
}

void PointStore::CancelSync() {
  std::unique_lock lock(mu_);
  if (sync_ == SyncWrites::kNone) return;
  sync_ = SyncWrites::kNone;
  latest_cycle_ = pre_sync_latest_cycle_;
  has_latest_ = pre_sync_has_latest_;
  images_partial_ = pre_sync_partial_;
  Status s = CollectLocked();
  if (!s.ok()) spdlog::warn("replica undo: after a cancelled sync: {}", s.ToString());
}

Status PointStore::SaveRangeDurably(size_t disk, uint64_t offset, uint64_t length, bool data_only) {
  const uint64_t before = journal_->bytes();
  SR_RETURN_IF_ERROR(SaveRange(disk, offset, length, data_only));
  // Old blocks are durable before the image changes: a crash leaves the point readable.
  if (journal_->bytes() != before) SR_RETURN_IF_ERROR(journal_->Sync());
  return Status::Ok();
}

Status PointStore::SyncWrite(size_t disk, uint64_t offset, std::span<const std::byte> data) {
  std::unique_lock lock(mu_);
  const Disk& d = disks_[disk];
  if (offset > d.def.size || data.size() > d.def.size - offset) {
    return Status::Invalid("sync write beyond the end of disk " + d.def.name);
  }
  SR_RETURN_IF_ERROR(SaveRangeDurably(disk, offset, data.size(), /*data_only=*/false));
  return PWriteAll(d.fd.get(), data.data(), data.size(), offset, d.path.string());
}

Result<bool> PointStore::HoldsData(size_t disk, uint64_t offset, uint64_t length) const {
  std::shared_lock lock(mu_);
  return HoldsDataLocked(disk, offset, length);
}

Result<bool> PointStore::HoldsDataLocked(size_t disk, uint64_t offset, uint64_t length) const {
  if (length == 0) return false;
  const Disk& d = disks_[disk];
  const off_t data = ::lseek(d.fd.get(), static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0) {
    if (errno == ENXIO) return false;                         // holes to the end of the image
    if (errno == EINVAL || errno == EOPNOTSUPP) return true;  // cannot tell: assume data
    return Status::FromErrno(errno, "seek data in " + d.path.string());
  }
  return static_cast<uint64_t>(data) < offset + length;
}

Result<bool> PointStore::SyncZero(size_t disk, uint64_t offset, uint64_t length) {
  std::unique_lock lock(mu_);
  const Disk& d = disks_[disk];
  if (offset > d.def.size || length > d.def.size - offset) {
    return Status::Invalid("sync zeros beyond the end of disk " + d.def.name);
  }
  SR_ASSIGN_OR_RETURN(bool holds_data, HoldsDataLocked(disk, offset, length));
  if (!holds_data) return false;
  SR_RETURN_IF_ERROR(SaveRangeDurably(disk, offset, length, /*data_only=*/true));
  tracker::RecordHeader h;
  h.kind = RecordKind::kDiscard;
  h.offset = offset;
  h.length = length;
  Status s = tracker::ApplyRecord(d.fd.get(), d.def.size, h, {});
  if (!s.ok()) return s.WithContext("replica image " + d.path.string());
  return true;
}

Status PointStore::SyncImage(size_t disk) const {
  const Disk& d = disks_[disk];
  if (::fdatasync(d.fd.get()) != 0) return Status::FromErrno(errno, "fdatasync " + d.path.string());
  return Status::Ok();
}

Status PointStore::SyncImages() const {
  for (size_t i = 0; i < disks_.size(); ++i) SR_RETURN_IF_ERROR(SyncImage(i));
  return Status::Ok();
}

Status PointStore::ReadImage(size_t disk, uint64_t offset, std::span<std::byte> out,
                             uint64_t readahead) const {
  std::shared_lock lock(mu_);
  const Disk& d = disks_[disk];
  if (offset > d.def.size || out.size() > d.def.size - offset) {
    return Status::Invalid("read beyond the end of disk " + d.def.name);
  }
  if (readahead > 0) {
    (void)::posix_fadvise(d.fd.get(), static_cast<off_t>(offset + out.size()),
                          static_cast<off_t>(readahead), POSIX_FADV_WILLNEED);
  }
  return PReadAll(d.fd.get(), out.data(), out.size(), offset, d.path.string());
}

Status PointStore::FinishSync(uint64_t cycle, int64_t cut_unix_nanos, const PointPolicy& policy) {
  {
    std::unique_lock lock(mu_);
    sync_ = SyncWrites::kNone;
    latest_cycle_ = cycle;
    latest_cut_unix_nanos_ = cut_unix_nanos;
    has_latest_ = true;
    images_partial_ = false;
    // The sync's point goes now unless it is retained or a view reads it.
    SR_RETURN_IF_ERROR(CollectLocked());
  }
  return AfterApplied(cycle, cut_unix_nanos, policy);
}

// ---------------------------------------------------------------------------------------
// Materializing a point

Result<MaterializePlan> PointStore::BeginMaterialize(uint64_t point_id, bool resume) {
  std::unique_lock lock(mu_);
  const std::string what = "point " + std::to_string(point_id);
  if (materializing_ && *materializing_ != point_id) {
    return Status::Error(EBUSY, "the images are being made point " +
                                    std::to_string(*materializing_) + "; that must end first");
  }
  const std::optional<size_t> at = journal_->Find(point_id);
  if (resume) {
    // The images may hold anything between the old latest point and point_id.
    materializing_ = point_id;
    const int64_t cut = at ? journal_->point(*at).cut_unix_nanos : latest_cut_unix_nanos_;
    return MaterializePlan{cut, true};
  }
  if (sync_ != SyncWrites::kNone) {
    return Status::Error(EBUSY, what + " cannot be materialized while a sync writes the images");
  }
  if (!pins_.empty()) {
    std::string pinned;
    for (const auto& [cycle, n] : pins_) {
      pinned += (pinned.empty() ? "" : ", ") + std::to_string(cycle);
    }
    return Status::Error(EBUSY, what + " cannot be materialized while views are open (of points " +
                                    pinned + "); close them first");
  }
  const bool is_latest = has_latest_ && point_id == latest_cycle_;
  if (!is_latest && !(at && journal_->point(*at).retained)) {
    return Status::Error(
        ENOENT, "no recovery point " + std::to_string(point_id) + " (points: " + PointList() + ")");
  }
  MaterializePlan plan;
  plan.cut_unix_nanos = is_latest ? latest_cut_unix_nanos_ : journal_->point(*at).cut_unix_nanos;
  if (is_latest && !images_partial_) {
    plan.write_back = false;
  } else if (is_latest && !(at && *at + 1 == journal_->size())) {
    // The interrupted apply saved what it overwrote into an older point's file, which
    // already held older contents of some of those blocks: the latest point is gone.
    return Status::Error(EBUSY, "the latest " + what +
                                    " cannot be materialized: the apply of the next cycle was "
                                    "interrupted and the undo journal does not hold all it "
                                    "overwrote; apply the pending cycles first (then materialize "
                                    "the new latest point) or choose an older point");
  } else {
    plan.write_back = true;
  }
  materializing_ = point_id;
  return plan;
}

void PointStore::CancelMaterialize() {
  std::unique_lock lock(mu_);
  materializing_.reset();
}

Status PointStore::WriteBackPoint(uint64_t point_id, FunctionRef<Status()> after_block) {
  std::unique_lock lock(mu_);
  const std::optional<size_t> at = journal_->Find(point_id);
  if (!at) {
    return Status::Error(ENOENT, "point " + std::to_string(point_id) +
                                     " is not in the undo journal; the images cannot be made it");
  }
  std::vector<std::byte> block(kUndoBlockSize);
  for (size_t disk = 0; disk < disks_.size(); ++disk) {
    const Disk& d = disks_[disk];
    for (uint64_t b : journal_->BlocksFrom(*at, disk)) {
      const uint64_t offset = b * kUndoBlockSize;
      if (offset >= d.def.size) continue;  // no record names one (Save checks the range)
      SR_ASSIGN_OR_RETURN(bool held, journal_->ReadAsOf(*at, disk, b, block));
      if (!held) continue;  // cannot be: BlocksFrom lists only held blocks
      const uint64_t n = std::min<uint64_t>(kUndoBlockSize, d.def.size - offset);
      if (AllZeros(block)) {
        tracker::RecordHeader h;
        h.kind = RecordKind::kDiscard;
        h.offset = offset;
        h.length = n;
        Status s = tracker::ApplyRecord(d.fd.get(), d.def.size, h, {});
        if (!s.ok()) return s.WithContext("replica image " + d.path.string());
      } else {
        SR_RETURN_IF_ERROR(PWriteAll(d.fd.get(), block.data(), n, offset, d.path.string()));
      }
      SR_RETURN_IF_ERROR(after_block());
    }
  }
  for (const Disk& d : disks_) {
    if (::fdatasync(d.fd.get()) != 0)
      return Status::FromErrno(errno, "fdatasync " + d.path.string());
  }
  return Status::Ok();
}

Status PointStore::FinishMaterialize(uint64_t point_id, int64_t cut_unix_nanos,
                                     const PointPolicy& policy) {
  {
    std::unique_lock lock(mu_);
    latest_cycle_ = point_id;
    latest_cut_unix_nanos_ = cut_unix_nanos;
    has_latest_ = true;
    images_partial_ = false;
    // No pin exists (BeginMaterialize refused them, Pin refuses meanwhile).
    SR_RETURN_IF_ERROR(journal_->KeepOldest(0));
    materializing_.reset();
  }
  return AfterApplied(point_id, cut_unix_nanos, policy);
}

}  // namespace siterep::applier
