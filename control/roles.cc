// The daemon's VM slots in their roles: finding them at start-up, opening a VM as primary,
// replica or failed-over copy, the steps of role changes that a restart finishes, the
// admission of a primary's Hello, and fencing. The commands that change roles are in
// failover.cc.
#include <fcntl.h>

#include <set>

#include <spdlog/spdlog.h>

#include "applier/replica_state.h"
#include "common/failpoint.h"
#include "common/file_util.h"
#include "common/time_util.h"
#include "control/daemon.h"
#include "shipper/peer_call.h"
#include "tracker/log_format.h"

namespace siterep::control {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// Overlay files of an uncommitted failover carry their point, so a restart never mixes
// the writes made on one point with another.
fs::path OverlayPath(const fs::path& dir, const std::string& disk, uint64_t point) {
  return dir / (disk + "." + std::to_string(point) + ".overlay");
}

}  // namespace

// --- Slots ------------------------------------------------------------------------------

VmSlot* Daemon::Slot(const std::string& vm) const {
  std::lock_guard lk(slots_mu_);
  auto it = slots_.find(vm);
  return it == slots_.end() ? nullptr : it->second.get();
}

std::vector<VmSlot*> Daemon::Slots() const {
  std::lock_guard lk(slots_mu_);
  std::vector<VmSlot*> out;
  for (const auto& [name, slot] : slots_) out.push_back(slot.get());
  return out;
}

VmSlot* Daemon::AddSlot(std::unique_ptr<VmSlot> slot) {
  std::lock_guard lk(slots_mu_);
  auto [it, inserted] = slots_.emplace(slot->name, std::move(slot));
  return it->second.get();
}

VmConfig Daemon::ConfigFor(const std::string& vm, const applier::ReplicaDefinition& def) const {
  if (const VmConfig* c = config_.FindVm(vm)) return *c;
  VmConfig c;
  c.name = vm;
  c.frequency = std::chrono::milliseconds(def.frequency_ms);
  c.frequency_text = FrequencyName(std::chrono::milliseconds(def.frequency_ms));
  c.recovery_points = def.recovery_points;
  c.recovery_point_interval = std::chrono::milliseconds(def.recovery_point_interval_ms);
  c.hooks = config_.HooksFor(vm);
  c.consistency_group = def.consistency_group;
  const fs::path dir = Inbound::ReplicaDir(config_, vm);
  for (const applier::DiskDefinition& d : def.disks) {
    c.disks.push_back({d.name, applier::PointStore::ImagePath(dir, d.name)});
  }
  return c;
}

applier::ReplicaDefinition Daemon::DefinitionOf(const VmSlot& slot, uint64_t epoch) const {
  applier::ReplicaDefinition def = slot.role.definition;
  const VmConfig& cfg = slot.config;
  def.vm = slot.name;
  def.primary_site = config_.name;
  def.epoch = epoch;
  def.frequency_ms = cfg.frequency.count();
  def.recovery_points = cfg.recovery_points;
  def.recovery_point_interval_ms = cfg.recovery_point_interval.count();
  def.consistency_group = cfg.consistency_group;
  if (slot.primary) {
    def.disks.clear();
    for (const ProtectedDisk& d : slot.primary->disks) {
      def.disks.push_back({d.name, tracker::DiskIdFor(slot.name, d.name), d.size});
    }
  }
  return def;
}

Status Daemon::PersistRole(VmSlot& slot, const RoleState& state) {
  SR_RETURN_IF_ERROR(StoreRole(config_.state_dir, slot.name, state));
  std::lock_guard lk(slot.mu);
  slot.role = state;
  return Status::Ok();
}

Status Daemon::LoadSlots() {
  std::set<std::string> names;
  for (const VmConfig& vm : config_.vms) names.insert(vm.name);
  std::error_code ec;
  for (const char* sub : {"vms", "replicas"}) {
    const fs::path dir = config_.state_dir / sub;
    if (!fs::is_directory(dir)) continue;
    for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
      if (!e.is_directory()) continue;
      const bool known = std::string(sub) == "vms" ? fs::exists(e.path() / "role.json")
                                                   : fs::exists(e.path() / "replica.json");
      if (known) names.insert(e.path().filename().string());
    }
    if (ec) return Status::FromErrno(ec.value(), "list " + dir.string());
  }
  for (const std::string& name : names) {
    auto slot = std::make_unique<VmSlot>(name);
    slot->home = config_.FindVm(name) != nullptr;
    SR_ASSIGN_OR_RETURN(std::optional<RoleState> role, LoadRole(config_.state_dir, name));
    if (role) {
      slot->role = std::move(*role);
    } else if (slot->home) {
      // A [[vms]] entry from before roles were kept: primary at its epoch.
      slot->role.role = Role::kPrimary;
      SR_ASSIGN_OR_RETURN(slot->role.epoch, LegacyEpoch(config_.state_dir, name));
      const fs::path settings = config_.state_dir / "vms" / name / "replication.json";
      if (fs::exists(settings)) {
        SR_ASSIGN_OR_RETURN(std::string text, ReadFile(settings));
        slot->role.peer = json::parse(text, nullptr, false).value("peer", "");
      }
      SR_RETURN_IF_ERROR(StoreRole(config_.state_dir, name, slot->role));
    } else {
      // A replica made before roles were kept.
      SR_ASSIGN_OR_RETURN(applier::ReplicaDefinition def,
                          applier::LoadDefinition(Inbound::ReplicaDir(config_, name)));
      slot->role.role = Role::kReplica;
      slot->role.epoch = def.epoch;
      slot->role.peer = def.primary_site;
      slot->role.definition = def;
      SR_RETURN_IF_ERROR(StoreRole(config_.state_dir, name, slot->role));
    }
    if (slot->role.role == Role::kPrimary) {
      slot->config = ConfigFor(name, slot->role.definition);
    }
    AddSlot(std::move(slot));
  }
  return Status::Ok();
}

Status Daemon::ResumeSlot(VmSlot& slot, std::vector<std::string>* replicas) {
  const std::string& vm = slot.name;
  if (slot.role.role == Role::kReplica) {
    if (slot.role.phase == Phase::kDemoting) SR_RETURN_IF_ERROR(FinishDemotion(slot));
    // A test copy does not outlive the daemon: its writes are scratch.
    std::error_code ec;
    fs::remove_all(config_.state_dir / "vms" / vm / "test", ec);
    if (fs::exists(Inbound::ReplicaDir(config_, vm) / applier::kDefinitionFile)) {
      replicas->push_back(vm);
    }
    return Status::Ok();
  }
  if (slot.role.role != Role::kPrimary) return Status::Ok();
  switch (slot.role.phase) {
    case Phase::kPromoting:
      SR_RETURN_IF_ERROR(FinishPromotion(slot));
      break;
    case Phase::kCommitting:
      SR_RETURN_IF_ERROR(FinishCommit(slot));
      break;
    case Phase::kFailedOver: {
      SR_ASSIGN_OR_RETURN(std::unique_ptr<applier::Replica> replica,
                          applier::Replica::Open(Inbound::ReplicaDir(config_, vm)));
      spdlog::warn("VM {}: failed over to recovery point {} and not committed (siterep commit {})",
                   vm, slot.role.point, vm);
      return OpenFailedOver(slot, std::move(replica), /*fresh=*/false);
    }
    default:
      break;
  }
  const Phase phase = slot.role.phase;
  const bool fenced = phase == Phase::kFenced || phase == Phase::kFailingOver;
  SR_RETURN_IF_ERROR(OpenPrimary(slot, fenced ? blockdev::SlotMode::kReadOnly
                                              : blockdev::SlotMode::kReadWrite));
  if (phase == Phase::kFenced) {
    spdlog::warn("VM {}: fenced ({}); its disks refuse writes", vm, slot.role.note);
  } else if (phase == Phase::kFailingOver) {
    spdlog::warn("VM {}: a planned failover to {} was under way; its disks refuse writes until "
                 "it completes (siterep failover {} --planned) or is cancelled",
                 vm, slot.role.peer, vm);
  } else if (slot.outbound->enabled()) {
    // Split brain: while this daemon was down, the peer may have taken over at a newer
    // epoch. Guest writes wait until the peer says which of us is primary.
    std::lock_guard lk(slot.mu);
    slot.confirm_until_nanos =
        NowUnixNanos() + std::chrono::nanoseconds(config_.peer_wait).count();
    for (auto& d : slot.disks) d->SetMode(blockdev::SlotMode::kHold);
    spdlog::info("VM {}: guest writes wait until {} confirms this site is still primary "
                 "(at most {} s)",
                 vm, slot.outbound->peer(), config_.peer_wait.count() / 1000);
  }
  return Status::Ok();
}

// --- Opening and closing a primary ------------------------------------------------------

Status Daemon::ExportDisks(VmSlot& slot, const std::vector<blockdev::DiskBackend*>& backends,
                           blockdev::SlotMode mode) {
  if (!slot.disks.empty()) {
    for (size_t i = 0; i < backends.size() && i < slot.disks.size(); ++i) {
      slot.disks[i]->Set(backends[i], mode);
    }
    for (const DiskConfig& d : slot.config.disks) (void)fuse_->DropCache(slot.name, d.name);
    return Status::Ok();
  }
  std::vector<std::unique_ptr<blockdev::DiskSlot>> disks;
  for (blockdev::DiskBackend* b : backends) {
    disks.push_back(std::make_unique<blockdev::DiskSlot>(b->Size()));
    disks.back()->Set(b, mode);
  }
  for (size_t i = 0; i < disks.size(); ++i) {
    Status s = fuse_->AddDisk({slot.name, slot.config.disks[i].name, disks[i].get()});
    if (!s.ok()) {
      for (size_t j = 0; j < i; ++j) (void)fuse_->RemoveDisk(slot.name, slot.config.disks[j].name);
      return s.WithContext("export VM " + slot.name);
    }
  }
  std::lock_guard lk(slot.mu);
  slot.disks = std::move(disks);
  return Status::Ok();
}

void Daemon::SetDisksMode(VmSlot& slot, blockdev::SlotMode mode) {
  for (auto& d : slot.disks) d->SetMode(mode);
}

void Daemon::UnexportDisks(VmSlot& slot) {
  if (slot.disks.empty()) return;
  for (auto& d : slot.disks) d->Set(nullptr, blockdev::SlotMode::kOffline);
  for (size_t i = 0; i < slot.disks.size(); ++i) {
    Status s = fuse_->RemoveDisk(slot.name, slot.config.disks[i].name);
    if (!s.ok()) spdlog::warn("VM {}: unexport: {}", slot.name, s.ToString());
  }
  std::vector<std::unique_ptr<blockdev::DiskSlot>> gone;
  {
    std::lock_guard lk(slot.mu);
    gone = std::move(slot.disks);
    slot.disks.clear();
  }
}

Status Daemon::OpenPrimary(VmSlot& slot, blockdev::SlotMode mode) {
  SR_ASSIGN_OR_RETURN(std::unique_ptr<ProtectedVm> vm,
                      OpenProtectedVm(slot.config, slot.role.epoch, options_.archive_logs));
  spdlog::info("VM {}: primary, {} disk(s), epoch {}, tracking {}", slot.name, vm->disks.size(),
               vm->epoch, TrackingModeName(slot.config.tracking));
  std::vector<blockdev::DiskBackend*> backends;
  for (ProtectedDisk& d : vm->disks) backends.push_back(d.backend.get());
  auto out = std::make_unique<Outbound>(config_, vm.get(), tls_);
  SR_RETURN_IF_ERROR(ExportDisks(slot, backends, mode));
  {
    std::lock_guard lk(slot.mu);
    slot.primary = std::move(vm);
    slot.outbound = std::move(out);
  }
  if (slot.role.phase == Phase::kFenced) return Status::Ok();  // never ships to the newer side
  Status loaded = slot.outbound->Load();
  if (!loaded.ok()) return loaded.WithContext("VM " + slot.name + " replication");
  return Status::Ok();
}

Status Daemon::ClosePrimary(VmSlot& slot) {
  std::unique_ptr<Outbound> out;
  std::unique_ptr<ProtectedVm> vm;
  {
    std::lock_guard cut(slot.cut_mu);
    std::lock_guard lk(slot.mu);
    out = std::move(slot.outbound);
    vm = std::move(slot.primary);
  }
  if (out) out->Stop();
  UnexportDisks(slot);
  Status result;
  if (vm && vm->tracker) result = vm->tracker->Close();
  out.reset();  // refers to vm
  vm.reset();   // closes and unlocks the images
  return result;
}

// --- Steps a restart finishes -------------------------------------------------------------

Status Daemon::FinishPromotion(VmSlot& slot) {
  // The replica's images become the primary's: drop the replica's state (its recovery
  // points mean nothing on a primary), start a new change log, and ship to the old
  // primary, which becomes the replica of this epoch.
  const fs::path dir = Inbound::ReplicaDir(config_, slot.name);
  SR_RETURN_IF_ERROR(applier::Replica::DropState(dir));
  slot.config = ConfigFor(slot.name, slot.role.definition);
  SR_RETURN_IF_ERROR(DiscardChangeLogs(slot.config));
  SR_RETURN_IF_ERROR(Outbound::Forget(config_, slot.name));
  SR_RETURN_IF_ERROR(Outbound::WriteSettings(config_, slot.name, {slot.role.peer, false}));
  RoleState r = slot.role;
  r.phase = Phase::kNone;
  r.committed = false;
  r.note.clear();
  SR_RETURN_IF_ERROR(PersistRole(slot, r));
  spdlog::info("VM {}: primary at epoch {}, replicating to {}", slot.name, r.epoch, r.peer);
  return Status::Ok();
}

Status Daemon::FinishDemotion(VmSlot& slot) {
  const applier::ReplicaDefinition& def = slot.role.definition;
  const VmConfig images = ConfigFor(slot.name, def);
  SR_RETURN_IF_ERROR(DiscardChangeLogs(images));
  SR_RETURN_IF_ERROR(Outbound::Forget(config_, slot.name));
  const fs::path dir = Inbound::ReplicaDir(config_, slot.name);
  SR_RETURN_IF_ERROR(MakeDirs(dir));
  if (slot.home) {
    // The replica keeps this site's own images: the replica folder links to them.
    for (const DiskConfig& d : images.disks) {
      const fs::path link = applier::PointStore::ImagePath(dir, d.name);
      std::error_code ec;
      if (fs::is_symlink(link, ec) && fs::read_symlink(link, ec) == fs::absolute(d.image)) continue;
      fs::remove(link, ec);
      fs::create_symlink(fs::absolute(d.image), link, ec);
      if (ec) return Status::FromErrno(ec.value(), "link " + link.string());
    }
    SR_RETURN_IF_ERROR(SyncDir(dir));
  }
  std::optional<int64_t> in_sync;
  if (slot.role.in_sync) in_sync = NowUnixNanos();
  {
    SR_ASSIGN_OR_RETURN(std::unique_ptr<applier::Replica> replica,
                        applier::Replica::Adopt(dir, def, in_sync));
  }
  RoleState r = slot.role;
  r.phase = Phase::kNone;
  r.in_sync = false;
  r.committed = false;
  SR_RETURN_IF_ERROR(PersistRole(slot, r));
  spdlog::info("VM {}: replica of {} at epoch {}{}", slot.name, r.peer, r.epoch,
               in_sync ? "" : "; it waits for a comparison with the primary");
  return Status::Ok();
}

Status Daemon::FinishCommit(VmSlot& slot) {
  const std::string& vm = slot.name;
  const uint64_t point = slot.role.point;
  const fs::path dir = Inbound::ReplicaDir(config_, vm);
  const fs::path overlay_dir = config_.state_dir / "vms" / vm / "failover";
  const applier::ReplicaDefinition& def = slot.role.definition;
  std::vector<std::unique_ptr<blockdev::OverlayBackend>> overlays(def.disks.size());
  for (size_t i = 0; i < def.disks.size(); ++i) {
    const fs::path overlay = OverlayPath(overlay_dir, def.disks[i].name, point);
    if (!fs::exists(overlay)) continue;
    SR_ASSIGN_OR_RETURN(overlays[i], blockdev::OverlayBackend::Open(
                                         overlay, def.disks[i].size,
                                         [](uint64_t, std::span<std::byte>) {
                                           return Status::Error(EIO, "no base while committing");
                                         }));
  }
  // 1. What this site changed since the point (for reverse replication), recorded before
  //    the replica's state that tells it goes; then the images become the point (a no-op
  //    once done: the replica's state goes in step 3).
  if (fs::exists(dir / applier::kDefinitionFile)) {
    SR_ASSIGN_OR_RETURN(std::unique_ptr<applier::Replica> replica, applier::Replica::Open(dir));
    SR_ASSIGN_OR_RETURN(std::optional<ForkRecord> fork, LoadFork(config_.state_dir, vm));
    if (!fork || fork->point != point) {
      SR_ASSIGN_OR_RETURN(auto changed, replica->ChangedSince(point));
      ForkRecord record{point, {}};
      for (size_t i = 0; i < def.disks.size() && i < changed.size(); ++i) {
        std::vector<tracker::ByteRange> written;
        if (overlays[i]) written = overlays[i]->WrittenRanges();
        record.changed[def.disks[i].name] = UnionRanges(changed[i], written);
      }
      SR_RETURN_IF_ERROR(StoreFork(config_.state_dir, vm, record));
    }
    SR_RETURN_IF_ERROR(replica->MaterializePoint(point));
  }
  failpoint::Check("control.commit_mid");
  // 2. The writes made since the failover go in (again, after a crash: the same result).
  for (size_t i = 0; i < def.disks.size(); ++i) {
    if (!overlays[i]) continue;
    const fs::path image = applier::PointStore::ImagePath(dir, def.disks[i].name);
    UniqueFd fd(::open(image.c_str(), O_RDWR | O_CLOEXEC));
    if (!fd.valid()) return Status::FromErrno(errno, "open " + image.string());
    SR_RETURN_IF_ERROR(overlays[i]->CopyWrittenTo(fd.get()));
  }
  overlays.clear();
  // 3. The replica's state and the overlays go; the images are the primary's now.
  SR_RETURN_IF_ERROR(applier::Replica::DropState(dir));
  std::error_code ec;
  fs::remove_all(overlay_dir, ec);
  slot.config = ConfigFor(vm, def);
  SR_RETURN_IF_ERROR(DiscardChangeLogs(slot.config));
  SR_RETURN_IF_ERROR(Outbound::Forget(config_, vm));
  RoleState r = slot.role;
  r.phase = Phase::kNone;
  r.committed = true;
  SR_RETURN_IF_ERROR(PersistRole(slot, r));
  spdlog::info("VM {}: failover to point {} committed; the other recovery points are gone", vm,
               point);
  return Status::Ok();
}

Status Daemon::OpenFailedOver(VmSlot& slot, std::shared_ptr<applier::Replica> replica,
                              bool fresh) {
  const uint64_t point = slot.role.point;
  const fs::path dir = config_.state_dir / "vms" / slot.name / "failover";
  const applier::ReplicaDefinition def = replica->Definition();
  // Overlays of another point (or all, for a new failover) hold discarded writes.
  std::error_code ec;
  if (fs::is_directory(dir)) {
    for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
      bool keep = !fresh;
      if (keep) {
        keep = false;
        for (const applier::DiskDefinition& d : def.disks) {
          keep |= e.path() == OverlayPath(dir, d.name, point);
        }
      }
      if (!keep) fs::remove(e.path(), ec);
    }
  }
  SR_RETURN_IF_ERROR(MakeDirs(dir));
  auto copy = std::make_unique<PointCopy>();
  copy->point = point;
  copy->replica = replica;
  SR_ASSIGN_OR_RETURN(copy->view, replica->OpenView(point));
  const applier::PointView* view = copy->view.get();
  std::vector<blockdev::DiskBackend*> backends;
  for (size_t i = 0; i < def.disks.size(); ++i) {
    SR_ASSIGN_OR_RETURN(auto overlay,
                        blockdev::OverlayBackend::Open(
                            OverlayPath(dir, def.disks[i].name, point), def.disks[i].size,
                            [view, i](uint64_t offset, std::span<std::byte> out) {
                              return view->Read(i, offset, out);
                            }));
    backends.push_back(overlay.get());
    copy->overlays.push_back(std::move(overlay));
  }
  if (slot.disks.empty()) slot.config = ConfigFor(slot.name, def);
  std::unique_ptr<PointCopy> old;
  {
    std::lock_guard lk(slot.mu);
    old = std::move(slot.failed_over);
  }
  SR_RETURN_IF_ERROR(ExportDisks(slot, backends, blockdev::SlotMode::kReadWrite));
  std::lock_guard lk(slot.mu);
  slot.failed_over = std::move(copy);
  return Status::Ok();
}

// --- Admission, fencing, hooks, peers ---------------------------------------------------

Status Daemon::Admit(const std::string& peer, const applier::ReplicaDefinition& def) {
  VmSlot* slot = Slot(def.vm);
  if (slot == nullptr) {
    // A VM this site has not seen: it becomes its replica.
    auto fresh = std::make_unique<VmSlot>(def.vm);
    fresh->role.role = Role::kReplica;
    fresh->role.epoch = def.epoch;
    fresh->role.peer = peer;
    fresh->role.definition = def;
    SR_RETURN_IF_ERROR(StoreRole(config_.state_dir, def.vm, fresh->role));
    AddSlot(std::move(fresh));
    return Status::Ok();
  }
  // No replica may appear or change under a role change of the VM (a promotion has taken
  // the replica away; a demotion is making one).
  std::unique_lock op(slot->op_mu, std::try_to_lock);
  if (!op.owns_lock()) {
    return Status::Error(EAGAIN, "VM " + def.vm + " is changing roles at " + config_.name);
  }
  RoleState role = slot->CurrentRole();
  const std::string vm = def.vm;
  const std::string e = std::to_string(def.epoch);
  switch (role.role) {
    case Role::kReplica:
      if (role.phase != Phase::kNone) {
        return Status::Error(EAGAIN, "VM " + vm + " is changing roles at " + config_.name);
      }
      if (!role.peer.empty() && role.peer != peer) {
        return Status::Error(EPERM, "VM " + vm + " at " + config_.name + " replicates site " +
                                        role.peer + ", not " + peer);
      }
      if (def.epoch < role.epoch) {
        return Status::Error(ESTALE, "VM " + vm + ": epoch " + e + " is older than epoch " +
                                         std::to_string(role.epoch) + " at " + config_.name);
      }
      if (def.epoch > role.epoch) {
        role.epoch = def.epoch;
        role.definition = def;
        SR_RETURN_IF_ERROR(PersistRole(*slot, role));
      }
      return Status::Ok();
    case Role::kPrimary:
      if (role.phase == Phase::kFailingOver && def.epoch == role.target_epoch) {
        return Status::Error(EAGAIN, "VM " + vm + ": " + config_.name +
                                         " is still completing its failover to " + peer);
      }
      if (def.epoch <= role.epoch) {
        return Status::Error(ESTALE, "VM " + vm + " is primary at " + config_.name +
                                         " at epoch " + std::to_string(role.epoch) +
                                         "; epoch " + e + " is older: " + peer +
                                         " is fenced (siterep reverse " + vm + " at " +
                                         config_.name + ")");
      }
      // The peer took over at a newer epoch while this site still thinks it is primary.
      (void)Fence(*slot, "site " + peer + " is primary at epoch " + e);
      return Status::Error(EAGAIN, "VM " + vm + " was primary at " + config_.name +
                                       " at an older epoch; fenced now: run siterep reverse " +
                                       vm + " at " + peer);
    case Role::kNone:
      break;
  }
  role = RoleState{};
  role.role = Role::kReplica;
  role.epoch = def.epoch;
  role.peer = peer;
  role.definition = def;
  return PersistRole(*slot, role);
}

Status Daemon::Fence(VmSlot& slot, const std::string& why) {
  RoleState r;
  {
    std::lock_guard lk(slot.mu);
    if (slot.role.role != Role::kPrimary || slot.role.phase == Phase::kFenced) return Status::Ok();
    r = slot.role;
    slot.confirm_until_nanos = 0;
  }
  r.phase = Phase::kFenced;
  r.note = why;
  // Persisted before the disks change: a restart stays fenced.
  Status s = PersistRole(slot, r);
  SetDisksMode(slot, blockdev::SlotMode::kReadOnly);
  if (slot.outbound) slot.outbound->Stop();
  spdlog::error("VM {}: fenced: {}; guest writes are refused (EROFS)", slot.name, why);
  return s;
}

void Daemon::CheckRoles(int64_t now) {
  for (VmSlot* slot : Slots()) {
    std::unique_lock op(slot->op_mu, std::try_to_lock);
    if (!op.owns_lock()) continue;
    std::optional<shipper::ShipperStats> st;
    int64_t confirm_until = 0;
    std::string peer;
    {
      std::lock_guard lk(slot->mu);
      // A planned failover under way has its disks read-only already; the peer's refusal
      // then means it took over, which the failover itself finds out.
      if (slot->role.role != Role::kPrimary || !slot->outbound ||
          slot->role.phase == Phase::kFenced || slot->role.phase == Phase::kFailingOver) {
        continue;
      }
      st = slot->outbound->LinkStats();
      confirm_until = slot->confirm_until_nanos;
      peer = slot->outbound->peer();
    }
    if (st && st->refused && st->refusal == "epoch_older") {
      (void)Fence(*slot, "site " + peer + " holds a newer epoch: " + st->last_error);
      continue;
    }
    if (confirm_until == 0) continue;
    const bool confirmed = st && st->connects > 0;
    if (!confirmed && now < confirm_until) continue;
    {
      std::lock_guard lk(slot->mu);
      slot->confirm_until_nanos = 0;
    }
    if (slot->role.phase == Phase::kNone) SetDisksMode(*slot, blockdev::SlotMode::kReadWrite);
    if (confirmed) {
      spdlog::info("VM {}: {} confirmed this site as primary; guest writes go on", slot->name,
                   peer);
    } else {
      spdlog::warn("VM {}: {} did not answer within {} s; guest writes go on. If {} took over "
                   "meanwhile, these writes are discarded by reverse replication",
                   slot->name, peer, config_.peer_wait.count() / 1000, peer);
    }
  }
}

HookResult Daemon::RunVmHook(const VmSlot& slot, bool pre) {
  const FailoverHooks hooks = config_.HooksFor(slot.name);
  return RunHook(pre ? hooks.pre_failover : hooks.post_failover,
                 {slot.name, config_.name, pre ? "pre_failover" : "post_failover",
                  config_.mountpoint.string()},
                 hooks.timeout);
}

Result<json> Daemon::CallPeer(const std::string& peer, const json& request,
                              std::chrono::milliseconds timeout) {
  const PeerConfig* p = nullptr;
  for (const PeerConfig& c : config_.peers) {
    if (c.name == peer) p = &c;
  }
  if (p == nullptr) return Status::Error(ENOENT, "site " + peer + " is not in [[peers]]");
  if (!tls_) return Status::Invalid("site " + config_.name + " has no [tls] certificates");
  shipper::PeerCallOptions o;
  o.tls = tls_;
  o.local_site = config_.name;
  o.peer_site = peer;
  o.address = p->address;
  o.connect_timeout = std::chrono::milliseconds(3000);
  o.timeout = timeout;
  return shipper::CallPeer(o, request);
}

}  // namespace siterep::control
