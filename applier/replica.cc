// Replica: creating and opening the replica folder, receiving segments, committing
// cycles, position and points. The applier is in replica_apply.cc.
#include "applier/replica.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <set>

#include "applier/segment_check.h"
#include "common/file_util.h"
#include "tracker/log_reader.h"

namespace siterep::applier {
namespace fs = std::filesystem;

namespace {

constexpr char kLockFile[] = "lock";
constexpr char kPartSuffix[] = ".part";

std::string DiskList(const ReplicaDefinition& def) {
  std::string out;
  for (const DiskDefinition& d : def.disks) {
    out += (out.empty() ? "" : ", ") + d.name + " (id " + std::to_string(d.disk_id) + ", " +
           std::to_string(d.size) + " bytes)";
  }
  return out;
}

// May `stored` (the replica's) take `incoming` (the primary's)?
Status CheckIncomingDefinition(const fs::path& dir, const ReplicaDefinition& stored,
                               const ReplicaDefinition& incoming) {
  if (!SameVmAndDisks(stored, incoming)) {
    return Status::Error(EEXIST, dir.string() + " holds the replica of VM " + stored.vm +
                                     " with disks " + DiskList(stored) + "; VM " + incoming.vm +
                                     " with disks " + DiskList(incoming) + " cannot use it");
  }
  if (incoming.epoch < stored.epoch) {
    return Status::Error(EPERM, "epoch " + std::to_string(incoming.epoch) +
                                    " is older than the replica's " + std::to_string(stored.epoch));
  }
  return Status::Ok();
}

// A missing image is created sparse; an existing one must have the disk's size.
Status PrepareImage(const fs::path& path, uint64_t size) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if (!S_ISREG(st.st_mode))
      return Status::Error(EEXIST, path.string() + " is not a regular file");
    if (static_cast<uint64_t>(st.st_size) != size) {
      return Status::Error(EEXIST, "image " + path.string() + " exists with " +
                                       std::to_string(st.st_size) + " bytes; the disk has " +
                                       std::to_string(size) + " bytes");
    }
    return Status::Ok();  // a seed copy placed by the operator
  }
  if (errno != ENOENT) return Status::FromErrno(errno, "stat " + path.string());
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDWR | O_CREAT | O_EXCL, 0600));
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
    return Status::FromErrno(errno, "size " + path.string() + " to " + std::to_string(size));
  }
  if (::fsync(fd.get()) != 0) return Status::FromErrno(errno, "fsync " + path.string());
  return Status::Ok();
}

}  // namespace

// One Replica per folder, also across processes: the lock goes with the fd.
Result<UniqueFd> Replica::LockDir(const fs::path& dir) {
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(dir / kLockFile, O_RDWR | O_CREAT, 0600));
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return Status::Error(EBUSY, "replica " + dir.string() + " is already open");
    }
    return Status::FromErrno(errno, "lock " + (dir / kLockFile).string());
  }
  return fd;
}

Replica::Replica(fs::path dir, UniqueFd lock_fd, ReplicaDefinition def, PositionState state,
                 std::shared_ptr<PointStore> store)
    : dir_(std::move(dir)),
      lock_fd_(std::move(lock_fd)),
      store_(std::move(store)),
      def_(std::move(def)),
      state_(std::move(state)),
      incoming_(def_.disks.size()),
      staged_(def_.disks.size()),
      sync_done_to_(def_.disks.size()) {
  if (state_.sync) {
    for (size_t i = 0; i < sync_done_to_.size(); ++i) {
      sync_done_to_[i] = state_.sync->disks[i].done_offset;
    }
    sync_bytes_written_ = state_.sync->bytes_written;
  }
}

Replica::~Replica() {
  Stop();
  std::lock_guard recv(recv_mu_);
  for (size_t i = 0; i < incoming_.size(); ++i) DropIncoming(i);
}

Result<std::unique_ptr<Replica>> Replica::Create(const fs::path& dir,
                                                 const ReplicaDefinition& def) {
  SR_RETURN_IF_ERROR(ValidateDefinition(def));
  SR_RETURN_IF_ERROR(MakeDirs(dir));
  SR_ASSIGN_OR_RETURN(UniqueFd lock, LockDir(dir));
  if (fs::exists(dir / kDefinitionFile)) {
    SR_ASSIGN_OR_RETURN(ReplicaDefinition stored, LoadDefinition(dir));
    SR_RETURN_IF_ERROR(CheckIncomingDefinition(dir, stored, def));
    if (DefinitionToJson(stored) != DefinitionToJson(def))
      SR_RETURN_IF_ERROR(StoreDefinition(dir, def));
    return OpenLocked(dir, std::move(lock));
  }
  // replica.json goes last: until it exists, the folder is not a replica and Create may
  // run again from the start.
  for (const DiskDefinition& d : def.disks) {
    SR_RETURN_IF_ERROR(PrepareImage(PointStore::ImagePath(dir, d.name), d.size));
    SR_RETURN_IF_ERROR(MakeDirs(dir / "received" / d.name));
  }
  PositionState state;
  state.disks.resize(def.disks.size());
  SR_RETURN_IF_ERROR(StorePosition(dir, state, def));
  SR_RETURN_IF_ERROR(StoreDefinition(dir, def));
  spdlog::info("replica of VM {} created in {} (epoch {}, {} disks)", def.vm, dir.string(),
               def.epoch, def.disks.size());
  return OpenLocked(dir, std::move(lock));
}

Result<std::unique_ptr<Replica>> Replica::Open(const fs::path& dir) {
  if (!fs::exists(dir / kDefinitionFile)) {
    return Status::Error(ENOENT, "no replica in " + dir.string() + " (no " + kDefinitionFile + ")");
  }
  SR_ASSIGN_OR_RETURN(UniqueFd lock, LockDir(dir));
  return OpenLocked(dir, std::move(lock));
}

Result<std::unique_ptr<Replica>> Replica::OpenLocked(const fs::path& dir, UniqueFd lock_fd) {
  SR_ASSIGN_OR_RETURN(ReplicaDefinition def, LoadDefinition(dir));
  SR_ASSIGN_OR_RETURN(PositionState state, LoadPosition(dir, def));
  const bool partial = state.applying_cycle > state.applied_cycle;
  ImagesState at;
  at.applied_cycle = state.applied_cycle;
  at.applied_cut_unix_nanos = state.applied_cut_unix_nanos;
  at.cycle0_is_point = state.cycle0_is_point;
  at.partial = partial;
  at.sync = !state.sync          ? SyncWrites::kNone
            : state.sync->staged ? SyncWrites::kStaged
                                 : SyncWrites::kDirect;
  if (state.materialize) at.materializing = state.materialize->point;
  SR_ASSIGN_OR_RETURN(std::shared_ptr<PointStore> store, PointStore::Open(dir, def.disks, at));
  const PointPolicy policy{def.recovery_points, def.recovery_point_interval_ms};
  std::unique_ptr<Replica> r(
      new Replica(dir, std::move(lock_fd), std::move(def), std::move(state), std::move(store)));
  SR_RETURN_IF_ERROR(r->CleanReceived());
  // A crash may have come between recording the applied cycle and taking its point.
  // (Not during a sync: the applied cycle is then the sync's point, or not a point. Not
  // during a materialization: the journal is its own until it ends.)
  if ((r->state_.applied_cycle != 0 || r->state_.cycle0_is_point) && !r->state_.sync &&
      !r->state_.materialize) {
    SR_RETURN_IF_ERROR(
        r->store_->AfterApplied(r->state_.applied_cycle, r->state_.applied_cut_unix_nanos, policy));
  }
  if (r->state_.materialize) {
    spdlog::warn(
        "replica of VM {}: making the images point {} was interrupted; nothing reads or "
        "writes them until MaterializePoint({}) has run again",
        r->def_.vm, r->state_.materialize->point, r->state_.materialize->point);
  } else if (r->state_.sync) {
    spdlog::info(
        "replica of VM {}: sync {} is unfinished ({}); it goes on when the primary "
        "starts it again",
        r->def_.vm, r->state_.sync->sync_id,
        r->state_.sync->staged
            ? "point " + std::to_string(r->state_.sync->point) + " stays readable meanwhile"
            : "no consistent point until it ends");
  } else if (partial) {
    spdlog::warn("replica of VM {}: the apply of cycle {} was interrupted; it is applied again",
                 r->def_.vm, r->state_.applying_cycle);
  }
  if (!r->state_.apply_error.empty()) {
    spdlog::error("replica of VM {}: the apply is stopped: {}", r->def_.vm, r->state_.apply_error);
  }
  return r;
}

Status Replica::UpdateDefinition(const ReplicaDefinition& def) {
  SR_RETURN_IF_ERROR(ValidateDefinition(def));
  {
    std::lock_guard persist(persist_mu_);
    ReplicaDefinition stored = Definition();
    SR_RETURN_IF_ERROR(CheckIncomingDefinition(dir_, stored, def));
    SR_RETURN_IF_ERROR(StoreDefinition(dir_, def));
    std::lock_guard lk(mu_);
    def_ = def;
  }
  // Fewer recovery points take effect now; more as new cycles are applied.
  return store_->Prune(def.recovery_points);
}

ReplicaDefinition Replica::Definition() const {
  std::lock_guard lk(mu_);
  return def_;
}

fs::path Replica::ImagePath(size_t disk_index) const {
  return PointStore::ImagePath(dir_, store_->disk(disk_index).name);
}

fs::path Replica::ReceivedDir(size_t disk_index) const {
  return dir_ / "received" / store_->disk(disk_index).name;
}

fs::path Replica::PartPath(size_t disk_index, uint64_t number) const {
  fs::path p = tracker::SegmentPath(ReceivedDir(disk_index), number);
  p += kPartSuffix;
  return p;
}

std::optional<size_t> Replica::DiskIndex(uint32_t disk_id) const {
  for (size_t i = 0; i < store_->disk_count(); ++i) {
    if (store_->disk(i).disk_id == disk_id) return i;
  }
  return std::nullopt;
}

Status Replica::CleanReceived() {
  std::vector<PendingCycle> pending;
  {
    std::lock_guard lk(mu_);
    pending = state_.pending;
  }
  for (size_t i = 0; i < store_->disk_count(); ++i) {
    const fs::path dir = ReceivedDir(i);
    SR_RETURN_IF_ERROR(MakeDirs(dir));
    std::set<fs::path> needed;
    for (const PendingCycle& c : pending) {
      needed.insert(tracker::SegmentPath(dir, c.segments[i].number));
    }
    bool removed = false;
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      if (needed.count(it->path()) != 0) continue;
      fs::remove(it->path(), ec);
      if (ec)
        return Status::Error(ec.value(), "remove " + it->path().string() + ": " + ec.message());
      removed = true;
    }
    if (ec) return Status::Error(ec.value(), "list " + dir.string() + ": " + ec.message());
    if (removed) SR_RETURN_IF_ERROR(SyncDir(dir));
  }
  return Status::Ok();
}

Status Replica::UpdatePosition(const std::function<void(PositionState&)>& change) {
  std::lock_guard persist(persist_mu_);
  PositionState next;
  ReplicaDefinition def;
  {
    std::lock_guard lk(mu_);
    next = state_;
    def = def_;
  }
  change(next);
  SR_RETURN_IF_ERROR(StorePosition(dir_, next, def));
  std::lock_guard lk(mu_);
  state_ = std::move(next);
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// Receiving

void Replica::DropIncoming(size_t disk) {
  std::optional<Incoming>& in = incoming_[disk];
  if (!in) return;
  const fs::path part = PartPath(disk, in->number);
  in.reset();
  if (::unlink(part.c_str()) != 0 && errno != ENOENT) {
    spdlog::warn("replica: remove {}: {}", part.string(), std::strerror(errno));
  }
}

Status Replica::WriteSegment(uint32_t disk_id, uint64_t number, uint64_t offset,
                             std::span<const std::byte> data, bool last) {
  std::lock_guard recv(recv_mu_);
  const std::optional<size_t> disk = DiskIndex(disk_id);
  if (!disk) {
    return Status::Error(EINVAL, "segment " + std::to_string(number) + " is for disk id " +
                                     std::to_string(disk_id) + ", which VM " + Definition().vm +
                                     " does not have");
  }
  Status s = WriteSegmentLocked(*disk, number, offset, data, last);
  if (!s.ok()) DropIncoming(*disk);
  return s;
}

Status Replica::WriteSegmentLocked(size_t disk, uint64_t number, uint64_t offset,
                                   std::span<const std::byte> data, bool last) {
  const DiskDefinition& d = store_->disk(disk);
  const std::string what = "segment " + std::to_string(number) + " of disk " + d.name;
  uint64_t last_segment;
  {
    std::lock_guard lk(mu_);
    SR_RETURN_IF_ERROR(RefuseWhileMaterializingLocked(what));
    if (state_.sync) {
      return Status::Error(EBUSY, what + ": sync " + std::to_string(state_.sync->sync_id) +
                                      " is unfinished; segments come after it ends");
    }
    last_segment = state_.disks[disk].last_segment;
  }
  std::optional<Incoming>& in = incoming_[disk];
  if (offset == 0) {
    if (number <= last_segment) {
      return Status::Error(EINVAL, what + " is not newer than the last received segment (" +
                                       std::to_string(last_segment) + ")");
    }
    DropIncoming(disk);  // a transfer cut short: start afresh
    SegmentRules rules;
    rules.disk_id = d.disk_id;
    rules.disk_size = d.size;
    {
      std::lock_guard lk(mu_);
      rules.min_epoch = def_.epoch;
      // A brand-new replica takes the log from wherever the primary's starts.
      if (state_.received_cycle != 0) rules.first_seq = state_.disks[disk].last_seq + 1;
    }
    SR_ASSIGN_OR_RETURN(UniqueFd fd,
                        OpenFile(PartPath(disk, number), O_WRONLY | O_CREAT | O_TRUNC, 0600));
    in = Incoming{number,          0, std::move(fd), SegmentChecker(PartPath(disk, number), rules),
                  rules.min_epoch, 0};
  } else if (!in || in->number != number) {
    return Status::Error(EINVAL, what + ": chunk at offset " + std::to_string(offset) +
                                     " without the start of the segment");
  } else if (offset != in->written) {
    return Status::Error(EINVAL, what + ": chunk at offset " + std::to_string(offset) +
                                     " does not follow the " + std::to_string(in->written) +
                                     " bytes received");
  }
  if (const uint64_t limit = MaxSegmentBytes(d.size);
      offset > limit || data.size() > limit - offset) {
    return Status::Error(EFBIG,
                         what + " would pass the limit of " + std::to_string(limit) + " bytes");
  }
  // Checked before it is written: a refused chunk never reaches the disk.
  SR_RETURN_IF_ERROR(in->check.Feed(data));
  SR_RETURN_IF_ERROR(
      PWriteAll(in->fd.get(), data.data(), data.size(), offset, PartPath(disk, number).string()));
  in->written += data.size();
  if (in->written - in->written_back >= kWritebackStep) {
    // Starts the writeback of what is in without waiting for it (a hint: its failure is
    // the fdatasync's to report).
    (void)::sync_file_range(in->fd.get(), static_cast<off_t>(in->written_back),
                            static_cast<off_t>(in->written - in->written_back),
                            SYNC_FILE_RANGE_WRITE);
    in->written_back = in->written;
  }
  if (!last) return Status::Ok();
  Status s = FinishSegment(disk, *in);
  if (!s.ok()) return s.WithContext(what + " refused");
  return s;
}

Status Replica::FinishSegment(size_t disk, Incoming& in) {
  const fs::path part = PartPath(disk, in.number);
  // Checked as it arrived; nothing is read back.
  SR_ASSIGN_OR_RETURN(SegmentSummary summary, in.check.Finish());
  {
    std::lock_guard lk(mu_);
    if (def_.epoch != in.epoch) {
      return Status::Error(ESTALE, "the replica's epoch changed from " + std::to_string(in.epoch) +
                                       " to " + std::to_string(def_.epoch) +
                                       " while the segment arrived");
    }
  }
  if (::fdatasync(in.fd.get()) != 0) return Status::FromErrno(errno, "fdatasync " + part.string());
  in.fd.Reset();
  const fs::path seg = tracker::SegmentPath(ReceivedDir(disk), in.number);
  if (::rename(part.c_str(), seg.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + part.string() + " to " + seg.string());
  }
  const uint64_t number = in.number;
  const uint64_t in_epoch = in.epoch;
  incoming_[disk].reset();  // `in` is gone from here on
  SR_RETURN_IF_ERROR(SyncDir(ReceivedDir(disk)));
  std::optional<Staged> previous;
  {
    std::lock_guard lk(mu_);
    previous = staged_[disk];
    staged_[disk] = Staged{number,
                           summary.bytes,
                           summary.first_seq,
                           summary.last_seq,
                           summary.cut.cycle,
                           summary.cut.unix_nanos,
                           summary.cut.first_change_unix_nanos,
                           in_epoch};
  }
  if (previous && previous->number != number) {
    // An uncommitted segment this one replaces (the primary never sends two per cycle).
    const fs::path old = tracker::SegmentPath(ReceivedDir(disk), previous->number);
    if (::unlink(old.c_str()) != 0 && errno != ENOENT) {
      spdlog::warn("replica: remove {}: {}", old.string(), std::strerror(errno));
    }
  }
  return Status::Ok();
}

Status Replica::CommitCycle(const CycleInfo& cycle) {
  std::lock_guard recv(recv_mu_);
  PendingCycle pending;
  pending.info = cycle;
  std::vector<DiskReceived> received;
  {
    std::lock_guard lk(mu_);
    const std::string what = "commit of cycle " + std::to_string(cycle.cycle);
    SR_RETURN_IF_ERROR(RefuseWhileMaterializingLocked(what));
    if (state_.sync) {
      return Status::Error(EBUSY, what + ": sync " + std::to_string(state_.sync->sync_id) +
                                      " is unfinished; cycles come after it ends");
    }
    if (state_.received_cycle != 0 && cycle.cycle != state_.received_cycle + 1) {
      return Status::Error(EINVAL, what + ": the replica has received cycle " +
                                       std::to_string(state_.received_cycle) +
                                       "; the next must be " +
                                       std::to_string(state_.received_cycle + 1));
    }
    if (cycle.cycle <= state_.applied_cycle) {
      return Status::Error(
          EINVAL, what + ": the replica has applied cycle " + std::to_string(state_.applied_cycle));
    }
    // The applier checks the records again against the epoch they were received under.
    pending.min_epoch = def_.epoch;
    for (size_t i = 0; i < staged_.size(); ++i) {
      const std::optional<Staged>& s = staged_[i];
      const std::string disk = store_->disk(i).name;
      if (!s) return Status::Error(EINVAL, what + ": disk " + disk + " has no segment of it");
      if (s->cycle != cycle.cycle) {
        return Status::Error(EINVAL, what + ": the newest segment of disk " + disk + " (" +
                                         std::to_string(s->number) + ") ends in the cut of cycle " +
                                         std::to_string(s->cycle));
      }
      pending.min_epoch = std::min(pending.min_epoch, s->min_epoch);
      pending.segments.push_back(PendingSegment{s->number, s->bytes, s->first_seq, s->last_seq});
      received.push_back(DiskReceived{s->number, s->last_seq});
      // The cut records carry the times too; they stand in for a sender that left them out.
      if (pending.info.cut_unix_nanos == 0) pending.info.cut_unix_nanos = s->cut_unix_nanos;
      if (pending.info.first_change_unix_nanos == 0) {
        pending.info.first_change_unix_nanos = s->first_change_unix_nanos;
      }
    }
  }
  SR_RETURN_IF_ERROR(UpdatePosition([&](PositionState& s) {
    s.received_cycle = cycle.cycle;
    s.disks = received;
    s.pending.push_back(pending);
  }));
  {
    std::lock_guard lk(mu_);
    for (auto& s : staged_) s.reset();
  }
  cv_.notify_all();
  return Status::Ok();
}

ReplicaPosition Replica::Position() const {
  std::lock_guard lk(mu_);
  ReplicaPosition p;
  p.epoch = def_.epoch;
  p.received_cycle = state_.received_cycle;
  p.applied_cycle = state_.applied_cycle;
  p.applied_cut_unix_nanos = state_.applied_cut_unix_nanos;
  for (const PendingCycle& c : state_.pending) {
    for (const PendingSegment& s : c.segments) p.pending_bytes += s.bytes;
  }
  p.apply_error = !state_.apply_error.empty() ? state_.apply_error : transient_error_;
  p.apply_held = ApplyHeldLocked();
  return p;
}

// ---------------------------------------------------------------------------------------
// Points

std::vector<RecoveryPoint> Replica::Points() const { return store_->Points(); }

Result<std::unique_ptr<PointView>> Replica::OpenView(uint64_t point_id) {
  Result<std::unique_ptr<PointView>> view = PointView::Open(store_, point_id);
  if (!view.ok()) return view.status().WithContext("replica of VM " + Definition().vm);
  return view;
}

Status Replica::ExportPoint(uint64_t point_id, size_t disk_index, const fs::path& out_file) {
  SR_ASSIGN_OR_RETURN(std::unique_ptr<PointView> view, OpenView(point_id));
  return ExportDisk(*view, disk_index, out_file);
}

}  // namespace siterep::applier
