#include "control/daemon.h"

#include <grp.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <charconv>
#include <set>

#include "common/failpoint.h"
#include "common/file_util.h"
#include "common/time_util.h"

namespace siterep::control {

using nlohmann::json;

namespace {

// A group named or numbered in [site] control_group.
Result<gid_t> ResolveGroup(const std::string& name) {
  gid_t gid = 0;
  auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), gid);
  if (ec == std::errc() && end == name.data() + name.size()) return gid;
  group grp{};
  group* found = nullptr;
  std::vector<char> buf(16384);
  int rc;
  while ((rc = ::getgrnam_r(name.c_str(), &grp, buf.data(), buf.size(), &found)) == ERANGE &&
         buf.size() < (1u << 20)) {
    buf.resize(buf.size() * 2);
  }
  if (rc != 0) return Status::FromErrno(rc, "site.control_group: look up group " + name);
  if (found == nullptr) return Status::Invalid("site.control_group: no group named " + name);
  return grp.gr_gid;
}

}  // namespace

Daemon::Daemon(SiteConfig config, DaemonOptions options)
    : config_(std::move(config)), options_(options) {}

Daemon::~Daemon() { (void)Shutdown(); }

Result<std::unique_ptr<Daemon>> Daemon::Start(SiteConfig config, DaemonOptions options) {
  std::unique_ptr<Daemon> d(new Daemon(std::move(config), options));
  // A start refused for the config's sake leaves nothing behind (no new state_dir).
  std::optional<gid_t> control_group;
  if (!d->config_.control_group.empty()) {
    SR_ASSIGN_OR_RETURN(control_group, ResolveGroup(d->config_.control_group));
  }
  SR_RETURN_IF_ERROR(MakeDirs(d->config_.state_dir));

  if (!d->config_.tls.ca.empty()) {
    auto tls =
        shipper::TlsContext::Create({d->config_.tls.ca, d->config_.tls.cert, d->config_.tls.key});
    if (!tls.ok()) return tls.status().WithContext("[tls]");
    d->tls_ = std::move(*tls);
  }

  SR_RETURN_IF_ERROR(d->LoadSlots());
  SR_ASSIGN_OR_RETURN(d->fuse_, blockdev::FuseFs::Mount(d->config_.mountpoint, {}));
  spdlog::info("disks mounted at {}", d->config_.mountpoint.string());

  d->inbound_ = std::make_unique<Inbound>(d->config_, d->tls_);
  d->LoadPlanRuns();  // before the appliers start: a stopped run's held instants stay held
  std::vector<std::string> replicas;
  for (VmSlot* slot : d->Slots()) {
    Status s = d->ResumeSlot(*slot, &replicas);
    if (!s.ok()) return s.WithContext("VM " + slot->name);
  }
  Daemon* self = d.get();
  SR_RETURN_IF_ERROR(d->inbound_->Start(
      replicas,
      [self](const std::string& peer, const applier::ReplicaDefinition& def) {
        return self->Admit(peer, def);
      },
      [self](const std::string& peer, const json& request) {
        return self->HandlePeer(peer, request);
      }));

  SR_RETURN_IF_ERROR(d->control_.Start(
      d->config_.control_socket, [self](const json& r) { return self->Handle(r); }, control_group));
  spdlog::info("control socket {}", d->config_.control_socket.string());
  if (control_group) {
    struct stat dir;
    if (::stat(d->config_.control_socket.parent_path().c_str(), &dir) == 0 &&
        (dir.st_mode & (dir.st_gid == *control_group ? S_IXGRP : S_IXOTH)) == 0) {
      spdlog::warn("control_group {}: the folder {} does not let the group reach the socket",
                   d->config_.control_group, d->config_.control_socket.parent_path().string());
    }
  }

  if (d->options_.discard_sealed) {
    spdlog::warn("--discard-sealed: sealed segments are read and dropped (benchmark mode)");
    d->discard_thread_ = std::thread([self] { self->DiscardLoop(); });
  }
  d->monitor_thread_ = std::thread([self] { self->MonitorLoop(); });
  d->group_cut_thread_ = std::thread([self] { self->GroupCutLoop(); });
  return d;
}

siterep::Status Daemon::Run() {
  siterep::Status status = fuse_->Run();
  RequestStop();
  siterep::Status shutdown = Shutdown();
  return status.ok() ? shutdown : status;
}

void Daemon::RequestStop() {
  {
    std::lock_guard lock(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (fuse_) fuse_->Stop();
}

siterep::Status Daemon::Shutdown() {
  control_.Stop();
  {
    std::lock_guard lock(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  StopPlanRuns();  // a running plan finishes its step and is recorded as interrupted
  if (discard_thread_.joinable()) discard_thread_.join();
  if (monitor_thread_.joinable()) monitor_thread_.join();
  if (group_cut_thread_.joinable()) group_cut_thread_.join();
  const std::vector<VmSlot*> slots = Slots();
  for (VmSlot* slot : slots) {
    if (slot->outbound) slot->outbound->Stop();
    // Held writes are requests in flight: let them fail so the unmount can finish.
    for (auto& d : slot->disks) {
      if (d->mode() == blockdev::SlotMode::kHold || d->mode() == blockdev::SlotMode::kPaused) {
        d->SetMode(blockdev::SlotMode::kReadOnly);
      }
    }
  }
  if (inbound_) inbound_->Stop();
  fuse_.reset();  // unmounts; in-flight requests are answered first
  siterep::Status result;
  for (VmSlot* slot : slots) {
    if (!slot->primary || !slot->primary->tracker) continue;
    siterep::Status s = slot->primary->tracker->Close();
    if (!s.ok()) {
      spdlog::error("VM {}: closing the change logs: {}", slot->name, s.message());
      if (result.ok()) result = s;
    }
  }
  {
    std::lock_guard lk(slots_mu_);
    for (auto& [name, slot] : slots_) {
      slot->test.reset();
      slot->failed_over.reset();
      slot->outbound.reset();
      slot->primary.reset();  // closes and unlocks the images
    }
    slots_.clear();
  }
  inbound_.reset();
  return result;
}

void Daemon::GroupCutLoop() {
  using Clock = std::chrono::steady_clock;
  std::map<std::string, Clock::time_point> due;
  std::unique_lock lock(stop_mu_);
  while (!stop_cv_.wait_for(lock, std::chrono::milliseconds(100), [this] { return stopping_; })) {
    lock.unlock();
    std::map<std::string, std::chrono::milliseconds> period;
    for (VmSlot* slot : Slots()) {
      std::lock_guard lk(slot->mu);
      const std::string& g = slot->config.consistency_group;
      if (g.empty() || !slot->primary || !slot->primary->tracker) continue;
      auto [it, added] = period.emplace(g, slot->config.frequency);
      if (!added) it->second = std::min(it->second, slot->config.frequency);
    }
    const Clock::time_point now = Clock::now();
    for (const auto& [g, p] : period) {
      auto [it, added] = due.emplace(g, now + p);
      if (now < it->second) continue;
      it->second = now + p;
      Result<std::map<std::string, uint64_t>> cycles = CutGroup(g);
      if (!cycles.ok() && cycles.status().code() != ESHUTDOWN) {
        spdlog::warn("consistency group {}: cut failed: {}", g, cycles.status().ToString());
      }
    }
    lock.lock();
  }
}

Result<std::map<std::string, uint64_t>> Daemon::CutGroup(const std::string& group) {
  std::vector<VmSlot*> members;  // in name order (Slots), so cut_mu is taken in one order
  for (VmSlot* slot : Slots()) {
    std::lock_guard lk(slot->mu);
    if (slot->config.consistency_group == group) members.push_back(slot);
  }
  std::vector<std::unique_lock<std::mutex>> held;
  std::vector<tracker::VmTracker*> trackers;
  std::vector<std::string> names;
  for (VmSlot* slot : members) {
    held.emplace_back(slot->cut_mu);
    std::lock_guard lk(slot->mu);
    if (slot->primary && slot->primary->tracker && slot->role.role == Role::kPrimary) {
      trackers.push_back(slot->primary->tracker.get());
      names.push_back(slot->name);
    }
  }
  SR_ASSIGN_OR_RETURN(std::vector<uint64_t> cycles, tracker::VmTracker::CutTogether(trackers));
  std::map<std::string, uint64_t> out;
  for (size_t i = 0; i < names.size(); ++i) out[names[i]] = cycles[i];
  return out;
}

void Daemon::MonitorLoop() {
  std::unique_lock lock(stop_mu_);
  while (!stop_cv_.wait_for(lock, std::chrono::seconds(1), [this] { return stopping_; })) {
    lock.unlock();
    const int64_t now = NowUnixNanos();
    CheckRoles(now);
    for (VmSlot* slot : Slots()) {
      std::lock_guard lk(slot->mu);
      if (slot->outbound) slot->outbound->Tick(now);
    }
    if (inbound_) inbound_->Tick(now);
    lock.lock();
  }
}

void Daemon::DiscardLoop() {
  std::unique_lock lock(stop_mu_);
  while (!stop_cv_.wait_for(lock, std::chrono::milliseconds(200), [this] { return stopping_; })) {
    lock.unlock();
    for (VmSlot* slot : Slots()) {
      std::lock_guard lk(slot->mu);
      if (!slot->primary || !slot->primary->tracker) continue;
      if (slot->outbound && slot->outbound->enabled()) continue;
      // Each segment is read whole, as a shipper that keeps up would, then released.
      tracker::VmTracker& tracker = *slot->primary->tracker;
      uint64_t through = 0;
      for (const auto& seg : tracker.SealedSegments()) {
        Status read = [&]() -> Status {
          SR_ASSIGN_OR_RETURN(std::unique_ptr<tracker::SegmentStream> stream,
                              tracker.OpenSegment(seg));
          while (!stream->done()) SR_RETURN_IF_ERROR(stream->Next(1u << 20).status());
          return Status::Ok();
        }();
        if (!read.ok()) {
          spdlog::warn("--discard-sealed: VM {} disk {} cycle {}: {}", slot->name, seg.disk,
                       seg.cycle, read.ToString());
          break;
        }
        through = std::max(through, seg.cycle);
      }
      if (through > 0) (void)tracker.ReleaseThrough(through);
    }
    lock.lock();
  }
}

json Daemon::PrimaryReport(const VmSlot& slot, int64_t now) const {
  const ProtectedVm* vm = slot.primary.get();
  const VmConfig& cfg = slot.config;
  tracker::VmStats stats;
  if (vm->tracker) stats = vm->tracker->Stats();
  json disks = json::array();
  uint64_t pending = 0;
  std::string reasons;  // resync required (critical)
  std::string stalls;   // cycles cannot be cut, activity log not written (warning)
  for (size_t i = 0; i < vm->disks.size(); ++i) {
    const ProtectedDisk& disk = vm->disks[i];
    json d = {{"name", disk.name},
              {"size", disk.size},
              {"image", disk.image.string()},
              {"path", (config_.mountpoint / cfg.name / disk.name).string()},
              {"tracking", "off"},
              {"pending_bytes", 0},
              {"last_seq", 0},
              {"last_cut", ""},
              {"resync_required", false},
              {"resync_reason", ""},
              {"dirty_bytes", 0},
              {"cycles_cut", 0},
              {"cow_bytes", 0},
              {"cow_bytes_total", 0},
              {"cow_limit", cfg.cow_limit},
              {"cut_error", ""},
              {"activity_log_writes", 0},
              {"activity_log_error", ""}};
    if (vm->tracker) {
      const tracker::DiskStats& ds = stats.disks[i];
      d["tracking"] = tracker::DiskTrackingName(ds.tracking);
      d["pending_bytes"] = ds.unshipped_bytes;
      d["last_seq"] = ds.last_seq;
      d["last_cut"] = FormatUtc(ds.last_cut_unix_nanos);
      d["resync_required"] = ds.resync_required;
      d["resync_reason"] = ds.resync_reason;
      d["dirty_bytes"] = ds.dirty_bytes;
      d["cycles_cut"] = ds.cycles_cut;
      d["cow_bytes"] = ds.cow_bytes;
      d["cow_bytes_total"] = ds.cow_bytes_total;
      pending += ds.unshipped_bytes;
      if (ds.resync_required) {
        if (!reasons.empty()) reasons += "; ";
        reasons += "disk " + disk.name + ": resync required (" + ds.resync_reason + ")";
      }
      if (!ds.cut_error.empty()) {
        if (!stalls.empty()) stalls += "; ";
        stalls += "disk " + disk.name + ": cycles cannot be cut (" + ds.cut_error + ")";
      }
      d["cut_error"] = ds.cut_error;
      if (!ds.activity_log_error.empty()) {
        if (!stalls.empty()) stalls += "; ";
        stalls += "disk " + disk.name + ": activity log not written, a host crash would " +
                  "compare every block (" + ds.activity_log_error + ")";
      }
      d["activity_log_writes"] = ds.activity_log_writes;
      d["activity_log_error"] = ds.activity_log_error;
    }
    disks.push_back(std::move(d));
  }
  // A VM is "not replicating" until `siterep enable`; Outbound::Report then fills in the
  // link, RPO and health. A disk that lost its log needs a resync (critical).
  std::string state = slot.role.committed ? "committed" : "not replicating";
  std::string health = "normal";
  if (!reasons.empty()) {
    state = "resync required";
    health = "critical";
  } else if (!stalls.empty()) {
    health = "warning";  // the changes wait in the map; the next build retries
    reasons = stalls;
  }
  json out = {{"name", cfg.name},
              {"role", "primary"},
              {"peer", slot.role.peer.empty() ? json(nullptr) : json(slot.role.peer)},
              {"epoch", vm->epoch},
              {"state", state},
              {"health", health},
              {"health_reason", reasons},
              {"frequency", cfg.frequency_text},
              {"tracking", TrackingModeName(cfg.tracking)},
              {"image_cache", cfg.image_cache == ImageCache::kNone ? "none" : "writeback"},
              {"rpo_seconds", nullptr},
              {"pending_bytes", pending},
              {"last_cycle", stats.last_cycle},
              {"last_cut", FormatUtc(stats.last_cut_unix_nanos)},
              {"last_recovery_point", nullptr},
              {"progress", IdleProgress()},
              {"disks", std::move(disks)}};
  if (slot.outbound) slot.outbound->Report(now, &out);
  if (!cfg.consistency_group.empty()) out["consistency_group"] = cfg.consistency_group;
  if (slot.role.committed && out["state"] == "not replicating") out["state"] = "committed";
  if (!slot.home && out["state"] == "replicating") out["state"] = "reverse replicating";
  if (slot.role.committed && out["state"] == "committed") {
    out["health"] = "warning";
    out["health_reason"] =
        "failed over and committed; not protected until siterep reverse " + cfg.name;
  }
  if (slot.role.phase == Phase::kFenced) {
    // Not a primary any more (a newer epoch runs elsewhere), not yet a replica.
    out["role"] = "none";
    out["state"] = "fenced";
    out["health"] = "critical";
    out["health_reason"] = "fenced: " + slot.role.note + "; guest writes are refused";
  } else if (slot.role.phase == Phase::kFailingOver) {
    out["state"] = "failing over";
    out["health"] = "warning";
    out["health_reason"] = "planned failover to " + slot.role.peer + " under way; disks read-only";
  }
  if (slot.confirm_until_nanos != 0) {
    out["health_reason"] =
        "guest writes wait until " + slot.role.peer + " confirms this site is still primary";
  }
  return out;
}

json Daemon::StatusReport(const std::string& vm_filter) const {
  json vms = json::array();
  const int64_t now = NowUnixNanos();
  for (VmSlot* slot : Slots()) {
    if (!vm_filter.empty() && slot->name != vm_filter) continue;
    std::lock_guard lk(slot->mu);
    const RoleState& role = slot->role;
    json v;
    if (role.role == Role::kReplica) {
      json r = inbound_ ? inbound_->Report(now, slot->name) : json::array();
      if (r.empty()) {
        v = {{"name", slot->name},
             {"role", "replica"},
             {"peer", role.peer},
             {"epoch", role.epoch},
             {"state", role.phase == Phase::kNone ? "waiting for " + role.peer
                                                  : std::string(PhaseName(role.phase))},
             {"health", "warning"},
             {"health_reason", "no replica data yet"},
             {"rpo_seconds", nullptr},
             {"pending_bytes", 0},
             {"last_recovery_point", nullptr},
             {"progress", IdleProgress()},
             {"disks", json::array()}};
      } else {
        v = std::move(r[0]);
      }
      if (slot->test) {
        uint64_t written = 0;
        for (const auto& ov : slot->test->overlays) written += ov->written_bytes();
        v["test_failover"] = {{"point", slot->test->point},
                              {"path", (config_.mountpoint / (slot->name + "-test")).string()},
                              {"written_bytes", written}};
      }
    } else if (role.role == Role::kPrimary && slot->primary) {
      v = PrimaryReport(*slot, now);
    } else if (role.role == Role::kPrimary && slot->failed_over) {
      const PointCopy& copy = *slot->failed_over;
      json disks = json::array();
      uint64_t written = 0;
      for (size_t i = 0; i < copy.overlays.size(); ++i) {
        written += copy.overlays[i]->written_bytes();
        disks.push_back(
            {{"name", copy.view->disk_name(i)},
             {"size", copy.view->disk_size(i)},
             {"path", (config_.mountpoint / slot->name / copy.view->disk_name(i)).string()},
             {"tracking", "off"},
             {"written_since_failover", copy.overlays[i]->written_bytes()}});
      }
      const json point = {{"id", copy.point},
                          {"time", FormatUtc(copy.view->point().cut_unix_nanos)}};
      v = {{"name", slot->name},
           {"role", "primary"},
           {"peer", role.peer},
           {"epoch", role.epoch},
           {"state", "failed over"},
           {"health", "warning"},
           {"health_reason", "failed over to recovery point " + std::to_string(copy.point) +
                                 ", not committed and not protected (siterep commit " + slot->name +
                                 ")"},
           {"rpo_seconds", nullptr},
           {"pending_bytes", 0},
           {"failover_point", point},
           {"last_recovery_point", point},
           {"written_since_failover", written},
           {"progress", IdleProgress()},
           {"disks", disks}};
    } else {
      v = {{"name", slot->name},
           {"role", RoleName(role.role)},
           {"peer", role.peer},
           {"epoch", role.epoch},
           {"state", std::string(PhaseName(role.phase))},
           {"health", "critical"},
           {"health_reason", "not running here"},
           {"rpo_seconds", nullptr},
           {"pending_bytes", 0},
           {"last_recovery_point", nullptr},
           {"progress", IdleProgress()},
           {"disks", json::array()}};
    }
    v["home"] = slot->home;
    if (!slot->last_operation.is_null()) v["last_operation"] = slot->last_operation;
    if (!slot->disks.empty()) v["access"] = blockdev::SlotModeName(slot->disks[0]->mode());
    vms.push_back(std::move(v));
  }
  return {{"site", config_.name}, {"mountpoint", config_.mountpoint.string()}, {"vms", vms}};
}

json Daemon::Handle(const json& request) {
  const std::string op = request["op"].get<std::string>();
  std::string vm =
      request.contains("vm") && request["vm"].is_string() ? request["vm"].get<std::string>() : "";
  if (op == "status") {
    if (!vm.empty() && Slot(vm) == nullptr) {
      return Refused("unknown-vm", "no VM named '" + vm + "' at site " + config_.name);
    }
    return Ok(StatusReport(vm));
  }
  if (op == "failpoint") {
    // Tests arm failpoints in a running daemon (common/failpoint.h).
    if (!request.contains("spec") || !request["spec"].is_string()) {
      return Refused("bad-request", "failpoint needs \"spec\": \"name=action,...\"");
    }
    Status s = failpoint::Arm(request["spec"].get<std::string>());
    if (!s.ok()) return Refused("bad-failpoint", s.message());
    return Ok({{"armed", failpoint::Armed()}});
  }
  if (op == "plan-validate") return ValidatePlan(request);
  if (op.starts_with("plan-")) return PlanRequest(op, request);
  static const std::set<std::string> kVmOps = {
      "cut",      "enable", "pause",   "resume",   "resync",        "points", "export",
      "failover", "commit", "reverse", "failback", "test-failover", "verify"};
  if (kVmOps.contains(op)) {
    if (vm.empty()) return Refused("bad-request", op + " needs a VM");
    VmSlot* slot = Slot(vm);
    if (slot == nullptr) {
      return Refused("unknown-vm", "no VM named '" + vm + "' at site " + config_.name);
    }
    return HandleVmOp(op, *slot, request);
  }
  return Refused("unknown-op", "unknown request '" + op + "'");
}

json Daemon::HandleVmOp(const std::string& op, VmSlot& slot, const json& request) {
  const std::string& vm = slot.name;
  if (op == "verify") return Verify(slot, request);  // verify.cc: its own checks and locks
  if (op == "points" || op == "export") {
    std::shared_ptr<applier::Replica> replica = inbound_ ? inbound_->Get(vm) : nullptr;
    if (!replica) {
      return Refused("not-a-replica", "VM " + vm + " is not a replica at " + config_.name +
                                          "; its recovery points are kept at the replica site");
    }
    if (op == "points") {
      auto points = inbound_->Points(vm);
      if (!points.ok()) return Refused("points-failed", points.status().message());
      return Ok(*points);
    }
    if (!request.contains("disk") || !request["disk"].is_string() || !request.contains("point") ||
        !request["point"].is_number_unsigned() || !request.contains("out") ||
        !request["out"].is_string()) {
      return Refused("bad-request", "export needs \"disk\", \"point\" and \"out\"");
    }
    Status s =
        inbound_->Export(vm, request["disk"].get<std::string>(), request["point"].get<uint64_t>(),
                         request["out"].get<std::string>());
    if (!s.ok()) return Refused("export-failed", s.message());
    return Ok({{"out", request["out"]}});
  }

  // Role changes: one at a time per VM.
  if (op == "failover" || op == "commit" || op == "reverse" || op == "failback" ||
      op == "test-failover") {
    std::string what = op;
    if (op == "failover") what = request.value("kind", "") + " failover";
    OpLock op_lock(slot, what);
    if (!op_lock.owns()) return op_lock.Busy(config_.name);
    if (op == "failover") {
      const std::string kind = request.value("kind", "");
      if (kind == "planned") return FailoverPlanned(slot);
      if (kind == "unplanned") return FailoverUnplanned(slot, request);
      return Refused("bad-request", "failover needs --planned or --unplanned");
    }
    if (op == "commit") return Commit(slot);
    if (op == "reverse") return Reverse(slot);
    if (op == "failback") return Failback(slot);
    return TestFailover(slot, request);
  }

  // Operations on a running primary.
  OpLock op_lock(slot, op);
  if (!op_lock.owns()) return op_lock.Busy(config_.name);
  Outbound* out = nullptr;
  tracker::VmTracker* tracker = nullptr;
  {
    std::lock_guard lk(slot.mu);
    if (slot.role.role == Role::kPrimary && slot.primary) {
      out = slot.outbound.get();
      tracker = slot.primary->tracker.get();
    }
  }
  if (out == nullptr) {
    return Refused("not-primary",
                   "VM " + vm + " is not running as primary at " + config_.name +
                       (slot.role.role == Role::kReplica
                            ? "; run this at its primary site (" + slot.role.peer + ")"
                            : ""));
  }
  if (op == "cut") {
    // Cuts a VM's logs now (ends the current cycle); for tests and operators who want a
    // recovery point at a known instant.
    if (!tracker) return Refused("not-tracked", "VM " + vm + " has tracking = \"off\"");
    if (!slot.config.consistency_group.empty()) {
      // A member of a consistency group is cut with the whole group: one common point.
      auto cycles = CutGroup(slot.config.consistency_group);
      if (!cycles.ok()) return Refused("cut-failed", cycles.status().message());
      return Ok({{"cycle", (*cycles)[vm]},
                 {"consistency_group", slot.config.consistency_group},
                 {"cycles", *cycles}});
    }
    auto cycle = tracker->Cut();
    if (!cycle.ok()) return Refused("cut-failed", cycle.status().message());
    return Ok({{"cycle", *cycle}});
  }
  if (slot.role.phase == Phase::kFenced || slot.role.phase == Phase::kFailingOver) {
    return Refused("fenced", "VM " + vm + " is " + std::string(PhaseName(slot.role.phase)) +
                                 " at " + config_.name);
  }
  Status s;
  if (op == "enable") {
    if (!request.contains("to") || !request["to"].is_string()) {
      return Refused("bad-request", "enable needs \"to\": SITE");
    }
    const std::string to = request["to"].get<std::string>();
    s = out->Enable(to, request.value("seed", false) ? applier::SyncKind::kSeeded
                                                     : applier::SyncKind::kInitial);
    if (s.code() == EEXIST) return Refused("already-replicated", s.message());
    if (s.code() == ENOENT) return Refused("unknown-site", s.message());
    if (s.ok()) {
      RoleState r = slot.role;
      r.peer = to;
      (void)PersistRole(slot, r);
    }
  } else if (op == "resync") {
    s = out->Resync(request.value("full", false));
    if (s.code() == EBUSY) return Refused("sync-running", s.message());
  } else if (op == "pause") {
    s = out->Pause();
  } else {
    s = out->Resume();
  }
  if (!s.ok()) return Refused(op + "-refused", s.message());
  op_lock.Release();
  return Ok(StatusReport(vm));
}

}  // namespace siterep::control
