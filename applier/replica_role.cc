// Replica's part in a failover (see replica.h): Adopt (a fresh replica over images that
// are already there), MaterializePoint (the images become one recovery point for good)
// and DropState (the replica's state goes, the images stay).
//
// Crash safety: replica.json is what says "a replica exists here". Adopt and DropState
// remove it first (and sync the folder) and Adopt writes the new one last, so old and new
// state are never taken for each other: a crash in between leaves a folder that Open
// refuses and that Adopt/DropState simply redo. MaterializePoint records the point before
// the images change and keeps the undo journal whole until the images are synced and the
// new position recorded (point_store.h), so running it again always finishes the job.
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <string_view>
#include <system_error>

#include "applier/replica.h"
#include "common/failpoint.h"
#include "common/file_util.h"

namespace siterep::applier {
namespace fs = std::filesystem;

namespace {

constexpr char kLockFile[] = "lock";
constexpr char kReceivedDir[] = "received";
constexpr char kUndoDir[] = "undo";
constexpr std::string_view kTempSuffix = ".tmp";

Status AtFailpoint(std::string_view name) {
  if (failpoint::Check(name) == failpoint::Action::kError) {
    return Status::Error(EIO, "failpoint " + std::string(name));
  }
  return Status::Ok();
}

// An image Adopt takes: there (through a symlink too), a regular file of the disk's size,
// writable. Opened and closed only.
Status CheckAdoptedImage(const fs::path& path, const DiskDefinition& d) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno != ENOENT) return Status::FromErrno(errno, "stat " + path.string());
    std::error_code ec;
    const bool dangling = fs::is_symlink(path, ec);
    return Status::Error(ENOENT, "image " + path.string() + " of disk " + d.name + " is missing" +
                                     (dangling ? " (a symlink to nothing)" : ""));
  }
  if (!S_ISREG(st.st_mode)) {
    return Status::Invalid("image " + path.string() + " of disk " + d.name +
                           " is not a regular file (nor a symlink to one)");
  }
  if (static_cast<uint64_t>(st.st_size) != d.size) {
    return Status::Invalid("image " + path.string() + " has " + std::to_string(st.st_size) +
                           " bytes; disk " + d.name + " has " + std::to_string(d.size) + " bytes");
  }
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDWR));
  return Status::Ok();
}

// Removes path: a file, a symlink (never what it points to) or a folder with everything in
// it. Ok when it is not there.
Status RemovePath(const fs::path& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) return Status::Error(ec.value(), "remove " + path.string() + ": " + ec.message());
  return Status::Ok();
}

// replica.json first, durably: from here on the folder holds no replica.
Status RemoveDefinition(const fs::path& dir) {
  SR_RETURN_IF_ERROR(RemovePath(dir / kDefinitionFile));
  return SyncDir(dir);
}

// Everything else of the replica's state but the lock file; the images stay. The folder
// is synced.
Status RemoveStateFiles(const fs::path& dir) {
  for (const char* name : {kPositionFile, kReceivedDir, kUndoDir}) {
    SR_RETURN_IF_ERROR(RemovePath(dir / name));
  }
  // Temp files of interrupted atomic writes (replica.json.tmp, position.json.tmp).
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->path().filename().string().ends_with(kTempSuffix)) continue;
    std::error_code type_ec;
    if (!it->is_regular_file(type_ec) || it->is_symlink(type_ec)) continue;
    SR_RETURN_IF_ERROR(RemovePath(it->path()));
  }
  if (ec) return Status::Error(ec.value(), "list " + dir.string() + ": " + ec.message());
  return SyncDir(dir);
}

}  // namespace

Status Replica::RefuseWhileMaterializingLocked(const std::string& what) const {
  if (!state_.materialize) return Status::Ok();
  const std::string p = std::to_string(state_.materialize->point);
  return Status::Error(EBUSY, what + ": the images are being made point " + p +
                                  "; MaterializePoint(" + p + ") must end first");
}

// ---------------------------------------------------------------------------------------
// Adopt and DropState

Result<std::unique_ptr<Replica>> Replica::Adopt(const fs::path& dir, const ReplicaDefinition& def,
                                                std::optional<int64_t> in_sync_cut_unix_nanos) {
  const std::string what = "adopt " + dir.string() + " as a replica of VM " + def.vm;
  if (Status valid = ValidateDefinition(def); !valid.ok()) return valid.WithContext(what);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return Status::Error(ENOENT, what + ": no such folder (the images must be in it)");
  }
  // Everything is checked before anything changes.
  for (const DiskDefinition& d : def.disks) {
    Status image = CheckAdoptedImage(PointStore::ImagePath(dir, d.name), d);
    if (!image.ok()) return image.WithContext(what);
  }
  Result<UniqueFd> lock = LockDir(dir);
  if (!lock.ok()) return lock.status().WithContext(what);

  SR_RETURN_IF_ERROR(RemoveDefinition(dir));
  SR_RETURN_IF_ERROR(RemoveStateFiles(dir));
  SR_RETURN_IF_ERROR(AtFailpoint("applier.adopt_after_remove"));
  for (const DiskDefinition& d : def.disks)
    SR_RETURN_IF_ERROR(MakeDirs(dir / kReceivedDir / d.name));
  PositionState state;
  state.disks.resize(def.disks.size());
  if (in_sync_cut_unix_nanos) {
    state.cycle0_is_point = true;
    state.applied_cut_unix_nanos = *in_sync_cut_unix_nanos;
  }
  SR_RETURN_IF_ERROR(StorePosition(dir, state, def));
  SR_RETURN_IF_ERROR(AtFailpoint("applier.adopt_before_definition"));
  // Last: only now is dir a replica (of def, at this position).
  SR_RETURN_IF_ERROR(StoreDefinition(dir, def));
  spdlog::info("replica of VM {} adopted in {} over the images there (epoch {}, {} disks, {})",
               def.vm, dir.string(), def.epoch, def.disks.size(),
               in_sync_cut_unix_nanos ? "in sync with the primary's cycle 0"
                                      : "no consistent point until a sync ends");
  return OpenLocked(dir, std::move(*lock));
}

Status Replica::DropState(const fs::path& dir) {
  const std::string what = "drop the replica state in " + dir.string();
  std::error_code ec;
  const fs::file_status st = fs::status(dir, ec);
  if (!fs::exists(st)) {
    if (ec && ec != std::errc::no_such_file_or_directory) {
      return Status::Error(ec.value(), what + ": " + ec.message());
    }
    return Status::Ok();  // nothing there, nothing to drop
  }
  if (!fs::is_directory(st)) return Status::Error(ENOTDIR, what + ": not a folder");
  Result<UniqueFd> lock = LockDir(dir);
  if (!lock.ok()) return lock.status().WithContext(what);
  SR_RETURN_IF_ERROR(RemoveDefinition(dir));
  SR_RETURN_IF_ERROR(AtFailpoint("applier.drop_state_mid"));
  SR_RETURN_IF_ERROR(RemoveStateFiles(dir));
  // The lock file last, while it is still locked (a Replica opening now finds no
  // replica.json and refuses).
  const fs::path lock_file = dir / kLockFile;
  if (::unlink(lock_file.c_str()) != 0 && errno != ENOENT) {
    return Status::FromErrno(errno, "remove " + lock_file.string());
  }
  SR_RETURN_IF_ERROR(SyncDir(dir));
  spdlog::info("replica state in {} dropped; the images stay", dir.string());
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// MaterializePoint

Status Replica::MaterializePoint(uint64_t point_id) {
  // Nothing applies, receives or syncs meanwhile.
  std::lock_guard apply(apply_mu_);
  std::lock_guard recv(recv_mu_);
  const ReplicaDefinition def = Definition();
  const std::string id = std::to_string(point_id);
  if (point_id == kLatestPoint) {
    return Status::Invalid("materialize the latest point of VM " + def.vm +
                           ": name the point by its id (from Points())");
  }
  const std::string what = "materialize point " + id + " of VM " + def.vm;
  PositionState state;
  {
    std::lock_guard lk(mu_);
    if (!stop_ && thread_.joinable()) {
      return Status::Error(EBUSY, what + ": the applier is running; Stop() it first");
    }
    state = state_;
  }
  if (state.sync) {
    return Status::Error(EBUSY,
                         what + ": sync " + std::to_string(state.sync->sync_id) + " is unfinished");
  }
  if (state.materialize && state.materialize->point != point_id) {
    const std::string p = std::to_string(state.materialize->point);
    return Status::Error(EBUSY, what + ": the images are being made point " + p +
                                    "; MaterializePoint(" + p + ") must end first");
  }
  const bool resume = state.materialize.has_value();
  Result<MaterializePlan> plan = store_->BeginMaterialize(point_id, resume);
  if (!plan.ok()) return plan.status().WithContext(what);
  const int64_t cut = resume ? state.materialize->cut_unix_nanos : plan->cut_unix_nanos;

  if (plan->write_back) {
    if (!resume) {
      // Before the first image write: from here on a restart knows the images are
      // neither the old point nor this one.
      Status recorded = UpdatePosition([&](PositionState& s) {
        s.materialize = MaterializeState{point_id, cut};
      });
      if (!recorded.ok()) {
        store_->CancelMaterialize();
        return recorded.WithContext(what);
      }
    }
    Status written =
        store_->WriteBackPoint(point_id, [] { return AtFailpoint("applier.materialize_mid"); });
    if (!written.ok()) {
      return written.WithContext(what + " (unfinished: MaterializePoint(" + id +
                                 ") again finishes it)");
    }
    SR_RETURN_IF_ERROR(AtFailpoint("applier.materialize_before_position"));
  }

  // The images are point_id, synced: one position update makes the replica that point.
  Status recorded = UpdatePosition([&](PositionState& s) {
    // The per-disk continuity describes the log as of the received cycle only.
    if (point_id != s.received_cycle) {
      for (DiskReceived& d : s.disks) d = DiskReceived{};
    }
    if (point_id != s.applied_cycle) s.applied_first_change_unix_nanos = 0;
    s.received_cycle = point_id;
    s.applying_cycle = 0;
    s.applied_cycle = point_id;
    s.applied_cut_unix_nanos = cut;
    s.pending.clear();
    s.apply_error.clear();
    if (s.last_sync_id > point_id) s.last_sync_id = 0;  // that sync's data is gone
    s.materialize.reset();
  });
  if (!recorded.ok()) {
    if (!plan->write_back) store_->CancelMaterialize();  // nothing was touched
    return recorded.WithContext(what);
  }
  {
    std::lock_guard lk(mu_);
    transient_error_.clear();
  }
  DropReceived();  // nothing is pending: every received segment goes
  SR_RETURN_IF_ERROR(AtFailpoint("applier.materialize_before_drop"));
  Status finished = store_->FinishMaterialize(
      point_id, cut, PointPolicy{def.recovery_points, def.recovery_point_interval_ms});
  if (!finished.ok()) return finished.WithContext(what);
  spdlog::info(
      "replica of VM {}: the images are point {} for good ({}); the received stream and "
      "the undo journal are dropped",
      def.vm, point_id, plan->write_back ? "written back from the undo journal" : "as they were");
  return Status::Ok();
}

}  // namespace siterep::applier
