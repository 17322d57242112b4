// Role changes: planned and unplanned failover, commit, reverse replication, failback and
// test failover, and the peer requests they make (promote, demote, vm-status).
//
// Every change validates against the VM's role and phase first and refuses with a name
// and one line; then it persists the new RoleState (role.h), then it acts. The caller
// holds the slot's op_mu for the whole change.
#include <fcntl.h>

#include <thread>

#include <spdlog/spdlog.h>

#include "common/failpoint.h"
#include "common/file_util.h"
#include "common/time_util.h"
#include "control/daemon.h"
#include "shipper/peer_call.h"

namespace siterep::control {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr auto kDrainTimeout = std::chrono::minutes(10);
constexpr auto kStatusTimeout = std::chrono::seconds(5);

// "latest" or a recovery point id (number or digits) from a request's "point".
std::optional<uint64_t> RequestedPoint(const json& request, bool* latest) {
  *latest = true;
  if (!request.contains("point") || request["point"].is_null()) return std::nullopt;
  const json& p = request["point"];
  if (p.is_string() && p.get<std::string>() == "latest") return std::nullopt;
  *latest = false;
  if (p.is_number_unsigned()) return p.get<uint64_t>();
  if (p.is_string()) {
    const std::string s = p.get<std::string>();
    if (!s.empty() && s.find_first_not_of("0123456789") == std::string::npos) {
      return std::stoull(s);
    }
  }
  return std::nullopt;
}

// Picks the point: the latest, or the one asked for. Empty reply = ok.
json ChoosePoint(const applier::Replica& replica, const json& request, applier::RecoveryPoint* out) {
  bool latest = true;
  std::optional<uint64_t> want = RequestedPoint(request, &latest);
  if (!latest && !want) return Refused("bad-request", "--point takes a recovery point id or latest");
  const std::vector<applier::RecoveryPoint> points = replica.Points();
  if (points.empty()) {
    return Refused("no-recovery-point",
                   "the replica holds no recovery point yet (initial replication not finished)");
  }
  for (const applier::RecoveryPoint& p : points) {
    if ((latest && p.latest) || (want && p.id == *want)) {
      *out = p;
      return json();
    }
  }
  std::string ids;
  for (const applier::RecoveryPoint& p : points) ids += (ids.empty() ? "" : ", ") + std::to_string(p.id);
  return Refused("unknown-point", "no recovery point " + std::to_string(want.value_or(0)) +
                                      " (retained: " + ids + "; see siterep points)");
}

}  // namespace

// --- Peer requests ------------------------------------------------------------------------

json Daemon::HandlePeer(const std::string& peer, const json& request) {
  const std::string op = request.value("op", "");
  const std::string vm = request.value("vm", "");
  if (op == "vm-status") return PeerVmStatus(vm);
  if (op == "plan-action") return HandlePlanAction(peer, request);
  if (op.starts_with("verify-")) return HandleVerifyPeer(peer, request);  // verify.cc
  VmSlot* slot = Slot(vm);
  if (slot == nullptr) return Refused("unknown-vm", "no VM named '" + vm + "' at " + config_.name);
  if (op != "promote" && op != "demote") {
    return Refused("unknown-op", "unknown peer request '" + op + "'");
  }
  OpLock op_lock(*slot, op == "promote" ? "promotion (asked by " + peer + ")"
                                        : "demotion (asked by " + peer + ")");
  if (!op_lock.owns()) return op_lock.Busy(config_.name);
  try {
    return op == "promote" ? Promote(*slot, peer, request) : Demote(*slot, peer, request);
  } catch (const json::exception& e) {
    return Refused("bad-request", e.what());
  }
}

json Daemon::PeerVmStatus(const std::string& vm) {
  VmSlot* slot = Slot(vm);
  if (slot == nullptr) return Ok({{"known", false}});
  json report = StatusReport(vm);
  json out = {{"known", true}};
  {
    std::lock_guard lk(slot->mu);
    out["role"] = RoleName(slot->role.role);
    out["epoch"] = slot->role.epoch;
    out["phase"] = PhaseName(slot->role.phase);
  }
  for (const json& v : report["vms"]) {
    out["state"] = v.value("state", "");
    out["health"] = v.value("health", "");
  }
  return Ok(out);
}

// --- Planned failover -------------------------------------------------------------------

// Ships everything and has the peer take over (planned failover): validates, runs the
// pre_failover hook, persists kFailingOver, makes the disks read-only, cuts, waits until
// the peer holds the last cycle, and asks it to promote itself. Null when the peer is
// primary now; else the refusal (the VM stays here, writable, unless the peer's answer is
// unknown: then it stays read-only in kFailingOver).
json Daemon::HandOver(VmSlot& slot, const RoleState& role,
                      std::chrono::steady_clock::time_point t0, json* op) {
  const std::string& vm = slot.name;
  const bool resuming = role.phase == Phase::kFailingOver;
  if (!slot.outbound || !slot.outbound->enabled()) {
    return Refused("not-replicating", "VM " + vm + " is not replicated: no site to fail over to");
  }
  const std::string peer = slot.outbound->peer();
  if (slot.outbound->sync_owed()) {
    return Refused("sync-running", "the replica of VM " + vm + " at " + peer +
                                       " is not a consistent copy yet (a sync runs); wait for it");
  }
  std::optional<shipper::ShipperStats> st = slot.outbound->LinkStats();
  if (!st || !st->connected) {
    return Refused("link-down",
                   "not connected to " + peer + (st && !st->last_error.empty() ? " (" + st->last_error + ")" : "") +
                       ": a planned failover ships the last changes first; if " + config_.name +
                       " is lost, run siterep failover " + vm + " --unplanned at " + peer);
  }
  if (st->paused) {
    return Refused("paused", "replication of VM " + vm + " is paused (siterep resume " + vm + ")");
  }
  uint64_t target = role.target_epoch;
  if (!resuming) {
    HookResult pre = RunVmHook(slot, /*pre=*/true);
    (*op)["pre_failover"] = pre.ToJson();
    if (!pre.ok()) {
      return Refused("hook-failed", pre.Failure() + "; nothing changed, VM " + vm + " stays here");
    }
    target = role.epoch + 1;
    RoleState r = role;
    r.phase = Phase::kFailingOver;
    r.target_epoch = target;
    r.peer = peer;
    if (Status s = PersistRole(slot, r); !s.ok()) return Refused("state-error", s.ToString());
    failpoint::Check("control.planned_after_persist");
  }
  // No write after the last cut: the peer gets exactly what the disks hold.
  SetDisksMode(slot, blockdev::SlotMode::kReadOnly);
  auto back_out = [&](const std::string& why) {
    RoleState r = role;
    r.phase = Phase::kNone;
    r.target_epoch = 0;
    Status s = PersistRole(slot, r);
    if (s.ok()) SetDisksMode(slot, blockdev::SlotMode::kReadWrite);
    spdlog::warn("VM {}: planned failover to {} abandoned: {}", vm, peer, why);
  };
  Result<uint64_t> cycle = slot.primary->tracker->Cut();
  if (!cycle.ok()) {
    back_out(cycle.status().message());
    return Refused("cut-failed", cycle.status().message() + "; the VM stays here, writable");
  }
  spdlog::info("VM {}: planned failover to {}: disks read-only, shipping through cycle {}", vm,
               peer, *cycle);
  while (true) {
    st = slot.outbound->LinkStats();
    if (st && st->acked_cycle >= *cycle) break;
    if (std::chrono::steady_clock::now() - t0 > kDrainTimeout) {
      back_out("the last changes were not shipped in time");
      return Refused("drain-timeout", "cycle " + std::to_string(*cycle) + " did not reach " + peer +
                                          " within 10 minutes; the VM stays here, writable");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  (*op)["drained_cycle"] = *cycle;
  (*op)["drain_seconds"] = SecondsSince(t0);
  failpoint::Check("control.planned_after_drain");

  // The peer runs its post_failover hook before it answers; give it our own hooks' time.
  const FailoverHooks hooks = config_.HooksFor(vm);
  const double asked_after = SecondsSince(t0);
  Result<json> reply = CallPeer(peer,
                                {{"op", "promote"}, {"vm", vm}, {"epoch", target},
                                 {"through_cycle", *cycle}},
                                hooks.timeout + std::chrono::minutes(5));
  if (!reply.ok()) {
    // Did the peer take over? Unknown: stay read-only, never two primaries.
    return Refused("peer-unreachable",
                   reply.status().message() + "; VM " + vm + " stays read-only here. Run the same "
                   "command again (or siterep status " + vm + " at " + peer + ")");
  }
  if (!reply->value("ok", false) && reply->value("error", "") == "promote-failed") {
    // The peer recorded its promotion but could not start: it will at its restart. Stay
    // read-only, never two primaries.
    return Refused("peer-failed", peer + " took over but could not start the VM: " +
                                      shipper::PeerRefusalMessage(*reply) + "; VM " + vm + " stays read-only "
                                      "here. Restart siterepd at " + peer +
                                      ", then run the same command again");
  }
  if (!reply->value("ok", false)) {
    back_out(shipper::PeerRefusalMessage(*reply));
    return Refused("peer-refused", peer + " refused to take over: " + shipper::PeerRefusalMessage(*reply) +
                                       "; the VM stays here, writable");
  }
  // From the command to the disks writable at the peer: the hook, the drain, and the
  // peer's promotion (its post_failover hook runs after).
  (*op)["rto_seconds"] = asked_after + (*reply)["result"].value("rto_seconds", 0.0);
  (*op)["peer"] = (*reply)["result"];
  return json();
}

json Daemon::FailoverPlanned(VmSlot& slot) {
  const std::string& vm = slot.name;
  RoleState role = slot.CurrentRole();
  if (role.role == Role::kReplica) {
    return Refused("wrong-site", "VM " + vm + " is a replica at " + config_.name +
                                     "; a planned failover runs at its primary (" + role.peer +
                                     "); here, siterep failover " + vm + " --unplanned");
  }
  if (role.role != Role::kPrimary) {
    return Refused("not-primary", "VM " + vm + " is not primary at " + config_.name);
  }
  if (role.phase == Phase::kFenced) {
    return Refused("fenced", "VM " + vm + " is fenced at " + config_.name + " (" + role.note +
                                 "); run siterep reverse " + vm + " at " + role.peer);
  }
  if (role.phase == Phase::kFailedOver || role.phase == Phase::kCommitting) {
    return Refused("not-committed", "VM " + vm + " runs on an uncommitted failover; run "
                                    "siterep commit " + vm + " and siterep reverse " + vm + " first");
  }
  const auto t0 = std::chrono::steady_clock::now();
  const std::string peer = role.phase == Phase::kFailingOver
                               ? role.peer
                               : (slot.outbound ? slot.outbound->peer() : role.peer);
  json op = {{"operation", "planned failover"},
             {"vm", vm},
             {"from", config_.name},
             {"to", peer},
             {"started", FormatUtc(NowUnixNanos())}};
  // Resuming after a crash or a lost answer: the peer may have taken over already.
  bool taken_over = false;
  if (role.phase == Phase::kFailingOver) {
    Result<json> answer = CallPeer(peer, {{"op", "vm-status"}, {"vm", vm}}, kStatusTimeout);
    taken_over = answer.ok() && answer->value("ok", false) &&
                 (*answer)["result"].value("role", "") == "primary" &&
                 (*answer)["result"].value("epoch", uint64_t{0}) == role.target_epoch;
  }
  if (!taken_over) {
    json refused = HandOver(slot, role, t0, &op);
    if (!refused.is_null()) return refused;
  }
  const uint64_t target = slot.CurrentRole().target_epoch;
  failpoint::Check("control.planned_before_demote");

  // The peer is primary at target: this site becomes its replica, with the same data.
  if (Status s = BecomeReplica(slot, peer, target, /*in_sync=*/true); !s.ok()) {
    return Refused("demote-failed", peer + " is primary now, but this site could not become its "
                                           "replica: " + s.ToString() + " (restart siterepd to finish)");
  }
  op["seconds"] = SecondsSince(t0);
  op["result"] = "VM " + vm + " runs at " + peer + " (epoch " + std::to_string(target) +
                 "); " + config_.name + " is its replica";
  spdlog::info("VM {}: planned failover to {} done in {:.1f} s", vm, peer, SecondsSince(t0));
  std::lock_guard lk(slot.mu);
  slot.last_operation = op;
  return Ok(op);
}

json Daemon::Promote(VmSlot& slot, const std::string& peer, const json& request) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string& vm = slot.name;
  const uint64_t epoch = request.at("epoch").get<uint64_t>();
  const uint64_t through = request.at("through_cycle").get<uint64_t>();
  RoleState role = slot.CurrentRole();
  if (role.role == Role::kPrimary && role.epoch == epoch && role.peer == peer &&
      role.phase == Phase::kNone) {
    return Ok({{"site", config_.name}, {"epoch", epoch}, {"already", true}});
  }
  if (role.role != Role::kReplica || role.phase != Phase::kNone) {
    return Refused("not-replica", "VM " + vm + " is " + std::string(RoleName(role.role)) +
                                      " at " + config_.name + ", not a replica ready to take over");
  }
  if (role.peer != peer) {
    return Refused("wrong-peer", "VM " + vm + " at " + config_.name + " replicates " + role.peer);
  }
  if (epoch <= role.epoch) {
    return Refused("epoch-older", "epoch " + std::to_string(epoch) + " is not newer than " +
                                      std::to_string(role.epoch));
  }
  std::shared_ptr<applier::Replica> replica = inbound_->Get(vm);
  if (!replica) return Refused("no-replica", "no replica of VM " + vm + " at " + config_.name);
  if (replica->Sync().active) {
    return Refused("sync-running", "the replica is in the middle of a sync");
  }
  {
    std::lock_guard lk(slot.mu);
    if (slot.test) {
      return Refused("test-running", "a test failover of VM " + vm + " runs at " + config_.name +
                                         " (siterep test-failover " + vm + " stop there)");
    }
  }
  if (replica->Position().received_cycle < through) {
    return Refused("not-drained", "the replica received cycle " +
                                      std::to_string(replica->Position().received_cycle) +
                                      ", not " + std::to_string(through));
  }
  replica = inbound_->Take(vm);  // no more segments; the applier stops
  Status applied = replica->ApplyPending();
  const applier::ReplicaPosition pos = replica->Position();
  if (!applied.ok() || pos.applied_cycle < through) {
    (void)inbound_->Add(replica);
    return Refused("apply-failed", "the replica could not apply through cycle " +
                                       std::to_string(through) + ": " +
                                       (applied.ok() ? pos.apply_error : applied.ToString()));
  }
  RoleState r;
  r.role = Role::kPrimary;
  r.epoch = epoch;
  r.peer = peer;
  r.phase = Phase::kPromoting;
  r.definition = replica->Definition();
  r.definition.epoch = epoch;
  r.definition.primary_site = config_.name;
  replica.reset();  // the last reference: closes the replica
  if (Status s = PersistRole(slot, r); !s.ok()) return Refused("state-error", s.ToString());
  failpoint::Check("control.promote_after_persist");
  Status s = FinishPromotion(slot);
  if (s.ok()) s = OpenPrimary(slot, blockdev::SlotMode::kReadWrite);
  if (!s.ok()) {
    return Refused("promote-failed", "VM " + vm + " is primary at " + config_.name +
                                         " but could not start: " + s.ToString() +
                                         " (restart siterepd to finish)");
  }
  const double rto = SecondsSince(t0);
  spdlog::info("VM {}: primary here at epoch {} (planned failover from {}), disks at {}/{}", vm,
               epoch, peer, config_.mountpoint.string(), vm);
  HookResult post = RunVmHook(slot, /*pre=*/false);
  json out = {{"site", config_.name},
              {"epoch", epoch},
              {"applied_cycle", pos.applied_cycle},
              {"rto_seconds", rto},
              {"post_failover", post.ToJson()}};
  std::lock_guard lk(slot.mu);
  slot.last_operation = {{"operation", "planned failover"}, {"from", peer}, {"to", config_.name},
                         {"finished", FormatUtc(NowUnixNanos())}, {"post_failover", post.ToJson()}};
  return Ok(out);
}

// --- Unplanned failover and commit ----------------------------------------------------------

json Daemon::FailoverUnplanned(VmSlot& slot, const json& request) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string& vm = slot.name;
  RoleState role = slot.CurrentRole();
  if (role.role == Role::kPrimary && role.phase == Phase::kFailedOver) {
    // Another point, before commit: the writes made on the current one are discarded.
    std::shared_ptr<applier::Replica> replica;
    {
      std::lock_guard lk(slot.mu);
      if (slot.failed_over) replica = slot.failed_over->replica;
    }
    if (!replica) return Refused("state-error", "VM " + vm + ": the failed-over copy is missing");
    applier::RecoveryPoint point;
    if (json refused = ChoosePoint(*replica, request, &point); !refused.is_null()) return refused;
    if (point.id == role.point) {
      return Ok({{"point", point.id}, {"time", FormatUtc(point.cut_unix_nanos)}, {"unchanged", true}});
    }
    RoleState r = role;
    r.point = point.id;
    if (Status s = PersistRole(slot, r); !s.ok()) return Refused("state-error", s.ToString());
    Status s = OpenFailedOver(slot, replica, /*fresh=*/true);
    if (!s.ok()) return Refused("failover-failed", s.ToString());
    spdlog::warn("VM {}: now at recovery point {}; the writes made on point {} are discarded", vm,
                 point.id, role.point);
    return Ok({{"point", point.id},
               {"time", FormatUtc(point.cut_unix_nanos)},
               {"epoch", r.epoch},
               {"warning", "the writes made since the failover to point " +
                               std::to_string(role.point) + " were discarded"}});
  }
  if (role.role == Role::kPrimary) {
    return Refused("wrong-site", "VM " + vm + " is primary at " + config_.name +
                                     "; an unplanned failover runs at its replica site" +
                                     (role.peer.empty() ? "" : " (" + role.peer + ")"));
  }
  if (role.role != Role::kReplica || role.phase != Phase::kNone) {
    return Refused("not-replica", "VM " + vm + " has no replica at " + config_.name);
  }
  std::shared_ptr<applier::Replica> replica = inbound_->Get(vm);
  if (!replica) return Refused("no-replica", "no replica of VM " + vm + " at " + config_.name);
  if (replica->Sync().active) {
    return Refused("sync-running", "the replica of VM " + vm +
                                       " is in the middle of a sync; no consistent point to run");
  }
  applier::RecoveryPoint point;
  if (json refused = ChoosePoint(*replica, request, &point); !refused.is_null()) return refused;
  {
    std::lock_guard lk(slot.mu);
    if (slot.test) {
      return Refused("test-running", "a test failover of VM " + vm + " runs (siterep "
                                     "test-failover " + vm + " stop)");
    }
  }

  json op = {{"operation", "unplanned failover"}, {"vm", vm}, {"from", role.peer},
             {"to", config_.name}, {"started", FormatUtc(NowUnixNanos())}};
  if (!request.value("force", false)) {
    Result<json> answer = CallPeer(role.peer, {{"op", "vm-status"}, {"vm", vm}}, kStatusTimeout);
    if (answer.ok() && answer->value("ok", false)) {
      const json& r = (*answer)["result"];
      if (r.value("role", "") == "primary" && r.value("phase", "") == "failing over") {
        return Refused("failover-running",
                       role.peer + " is handing VM " + vm + " over to this site (a planned "
                       "failover runs there): let it finish, or --force");
      }
      if (r.value("role", "") == "primary" && r.value("phase", "") == "" &&
          r.value("health", "") != "critical") {
        return Refused("primary-reachable",
                       role.peer + " answers and runs VM " + vm + " as primary (" +
                           r.value("state", "") + ", health " + r.value("health", "") +
                           "): use siterep failover " + vm + " --planned at " + role.peer +
                           ", or --force");
      }
      op["primary_status"] = r;
    } else {
      op["primary_status"] = answer.ok() ? *answer : json(answer.status().message());
    }
  }
  const std::optional<double> loss_window = inbound_->DataLossWindow(vm, point);
  replica = inbound_->Take(vm);  // the old primary's stream stops; its Hellos now fail
  RoleState r;
  r.role = Role::kPrimary;
  r.epoch = role.epoch + 1;
  r.peer = role.peer;
  r.phase = Phase::kFailedOver;
  r.point = point.id;
  r.definition = replica->Definition();
  r.definition.epoch = r.epoch;
  r.definition.primary_site = config_.name;
  if (Status s = PersistRole(slot, r); !s.ok()) {
    (void)inbound_->Add(replica);
    return Refused("state-error", s.ToString());
  }
  failpoint::Check("control.unplanned_after_persist");
  if (Status s = OpenFailedOver(slot, replica, /*fresh=*/true); !s.ok()) {
    return Refused("failover-failed", "VM " + vm + " failed over, but its disks could not be "
                                      "exposed: " + s.ToString() + " (restart siterepd)");
  }
  op["rto_seconds"] = SecondsSince(t0);
  op["point"] = {{"id", point.id},
                 {"time", FormatUtc(point.cut_unix_nanos)},
                 {"cut_unix_nanos", point.cut_unix_nanos}};
  op["data_loss_window_seconds"] = loss_window ? json(*loss_window) : json(nullptr);
  op["epoch"] = r.epoch;
  spdlog::warn("VM {}: unplanned failover to recovery point {} ({}), epoch {}; not protected "
               "until siterep commit {} and siterep reverse {}",
               vm, point.id, FormatUtc(point.cut_unix_nanos), r.epoch, vm, vm);
  HookResult post = RunVmHook(slot, /*pre=*/false);
  op["post_failover"] = post.ToJson();
  std::lock_guard lk(slot.mu);
  slot.last_operation = op;
  return Ok(op);
}

json Daemon::Commit(VmSlot& slot) {
  const std::string& vm = slot.name;
  RoleState role = slot.CurrentRole();
  std::unique_ptr<PointCopy> copy;
  if (role.role != Role::kPrimary ||
      (role.phase != Phase::kFailedOver && role.phase != Phase::kCommitting)) {
    return Refused("nothing-to-commit", "VM " + vm + " has no uncommitted failover at " +
                                            config_.name);
  }
  const auto t0 = std::chrono::steady_clock::now();
  if (role.phase == Phase::kFailedOver) {
    RoleState r = role;
    r.phase = Phase::kCommitting;
    if (Status s = PersistRole(slot, r); !s.ok()) return Refused("state-error", s.ToString());
    failpoint::Check("control.commit_after_persist");
  }
  // Guest I/O waits while the images become point + overlay (reads included: the view
  // and the overlays go away).
  SetDisksMode(slot, blockdev::SlotMode::kPaused);
  {
    std::lock_guard lk(slot.mu);
    copy = std::move(slot.failed_over);
  }
  // The overlays go before FinishCommit reopens their files; the paused DiskSlots point
  // at them but let no request through until OpenPrimary sets the image backends.
  if (copy) {
    for (auto& ov : copy->overlays) (void)ov->Flush();
  }
  copy.reset();
  Status s = FinishCommit(slot);
  if (s.ok()) s = OpenPrimary(slot, blockdev::SlotMode::kReadWrite);
  if (!s.ok()) {
    for (auto& d : slot.disks) d->Set(nullptr, blockdev::SlotMode::kOffline);
    return Refused("commit-failed", s.ToString() + "; the disks are offline: run siterep commit " +
                                        vm + " again");
  }
  json out = {{"vm", vm}, {"point", role.point}, {"epoch", role.epoch},
              {"seconds", SecondsSince(t0)},
              {"next", "siterep reverse " + vm + " once " + role.peer + " is back"}};
  std::lock_guard lk(slot.mu);
  slot.last_operation = {{"operation", "commit"}, {"point", role.point},
                         {"finished", FormatUtc(NowUnixNanos())}};
  return Ok(out);
}

// --- Reverse replication -------------------------------------------------------------------

json Daemon::Reverse(VmSlot& slot) {
  const std::string& vm = slot.name;
  RoleState role = slot.CurrentRole();
  if (role.role == Role::kReplica) {
    return Refused("wrong-site", "VM " + vm + " is a replica at " + config_.name +
                                     "; reverse replication runs at its primary (" + role.peer + ")");
  }
  if (role.role != Role::kPrimary) return Refused("not-primary", "VM " + vm + " is not primary here");
  if (role.phase == Phase::kFenced) {
    return Refused("fenced", "VM " + vm + " is fenced at " + config_.name + " (" + role.note +
                                 "); run siterep reverse " + vm + " at " + role.peer);
  }
  if (role.peer.empty()) {
    return Refused("no-peer", "VM " + vm + " has no other site to replicate to (siterep enable)");
  }
  json out = {{"vm", vm}, {"to", role.peer}};
  if (role.phase == Phase::kFailedOver || role.phase == Phase::kCommitting) {
    // Reverse replication starts from one state: the failover is committed first.
    Result<json> reachable = CallPeer(role.peer, {{"op", "vm-status"}, {"vm", vm}}, kStatusTimeout);
    if (!reachable.ok()) {
      return Refused("peer-unreachable", "cannot reach " + role.peer + ": " +
                                             reachable.status().message() +
                                             "; reverse replication needs its siterepd running");
    }
    json committed = Commit(slot);
    if (!committed.value("ok", false)) return committed;
    out["committed"] = committed["result"];
    role = slot.CurrentRole();
  }
  if (slot.outbound && slot.outbound->enabled()) {
    return Refused("already-replicating",
                   "VM " + vm + " already replicates to " + slot.outbound->peer());
  }
  Result<json> reply =
      CallPeer(role.peer, {{"op", "demote"}, {"vm", vm}, {"epoch", role.epoch}},
               std::chrono::minutes(10));
  if (!reply.ok()) {
    return Refused("peer-unreachable", "cannot reach " + role.peer + ": " +
                                           reply.status().message() +
                                           "; reverse replication needs its siterepd running");
  }
  if (!reply->value("ok", false)) {
    return Refused("peer-refused", role.peer + " refused to become the replica: " +
                                       shipper::PeerRefusalMessage(*reply));
  }
  // The old primary's disks may hold writes never shipped, and this site wrote since the
  // failover: compare the blocks either side changed since the fork when both are known,
  // else every block; send those that differ.
  Result<std::optional<ForkRecord>> fork = LoadFork(config_.state_dir, vm);
  std::optional<DiskRanges> theirs;
  const json& result = (*reply)["result"];
  if (result.contains("divergent")) theirs = DiskRangesFromJson(result["divergent"]);
  std::optional<DiskRanges> compare;
  if (fork.ok() && *fork && theirs) {
    compare = (*fork)->changed;
    for (const auto& [disk, ranges] : *theirs) (*compare)[disk] = UnionRanges((*compare)[disk], ranges);
    uint64_t n = 0;
    for (const auto& [disk, ranges] : *compare) n += tracker::RangeBytes(ranges);
    out["compare"] = "blocks changed since recovery point " + std::to_string((*fork)->point) +
                     " at either site";
    out["compare_bytes"] = n;
  } else {
    out["compare"] = "every block";
    spdlog::info("VM {}: reverse replication compares every block ({})", vm,
                 !fork.ok() ? fork.status().ToString()
                 : !*fork   ? "no record of the fork here"
                            : std::string(role.peer) + " did not know its divergent blocks");
  }
  Status s = slot.outbound->Enable(role.peer, applier::SyncKind::kResync,
                                   compare ? &*compare : nullptr);
  if (!s.ok()) return Refused("reverse-failed", s.ToString());
  (void)RemoveFork(config_.state_dir, vm);
  RoleState r = role;
  r.committed = false;
  (void)PersistRole(slot, r);
  out["state"] = "resynchronising";
  out["result"] = role.peer + " is the replica of VM " + vm + "; the blocks that differ are sent "
                  "(siterep status " + vm + ")";
  std::lock_guard lk(slot.mu);
  slot.last_operation = {{"operation", "reverse"}, {"to", role.peer},
                         {"finished", FormatUtc(NowUnixNanos())}};
  return Ok(out);
}

json Daemon::Demote(VmSlot& slot, const std::string& peer, const json& request) {
  const std::string& vm = slot.name;
  const uint64_t epoch = request.at("epoch").get<uint64_t>();
  RoleState role = slot.CurrentRole();
  if (role.role == Role::kReplica && role.epoch == epoch && role.peer == peer &&
      role.phase == Phase::kNone) {
    return Ok({{"role", "replica"}, {"already", true}});
  }
  if (role.role == Role::kPrimary &&
      (role.phase == Phase::kFailedOver || role.phase == Phase::kCommitting)) {
    return Refused("both-failed-over", "VM " + vm + " also failed over at " + config_.name +
                                           "; decide which site keeps it");
  }
  if (role.role != Role::kPrimary) {
    return Refused("not-primary", "VM " + vm + " is " + std::string(RoleName(role.role)) + " at " +
                                      config_.name);
  }
  if (epoch <= role.epoch) {
    return Refused("epoch-not-newer", "VM " + vm + " is primary at " + config_.name + " at epoch " +
                                          std::to_string(role.epoch) + "; epoch " +
                                          std::to_string(epoch) + " is not newer");
  }
  // What this site wrote that the peer never acknowledged (its divergent tail): the
  // unreleased log and the dirty bitmap, read through a snapshot's cut. Unknown (a disk
  // fell back without a narrower set, or no log) means the peer compares every block.
  json dirty = nullptr;
  if (slot.primary && slot.primary->tracker) {
    Result<tracker::SnapshotInfo> snap = slot.primary->tracker->StartSnapshot();
    if (snap.ok()) {
      DiskRanges ranges;
      size_t count = 0;
      bool known = true;
      for (const tracker::SnapshotDisk& d : snap->disks) {
        known &= !d.all_dirty;
        count += d.dirty.size();
        ranges[d.name] = d.dirty;
      }
      (void)slot.primary->tracker->EndSnapshot(false);
      // A peer message holds at most 1 MiB: a very scattered tail goes as "unknown".
      if (known && count <= 20000) dirty = DiskRangesToJson(ranges);
    } else {
      spdlog::warn("VM {}: the divergent blocks are not known ({}); {} compares every block",
                   vm, snap.status().ToString(), peer);
    }
  }
  spdlog::warn("VM {}: {} is primary at epoch {}: this site becomes its replica; writes made "
               "here since the failover are discarded",
               vm, peer, epoch);
  if (Status s = BecomeReplica(slot, peer, epoch, /*in_sync=*/false); !s.ok()) {
    return Refused("demote-failed", s.ToString());
  }
  std::lock_guard lk(slot.mu);
  slot.last_operation = {{"operation", "demoted"}, {"primary", peer}, {"epoch", epoch},
                         {"finished", FormatUtc(NowUnixNanos())}};
  return Ok({{"role", "replica"}, {"epoch", epoch}, {"divergent", dirty}});
}

Status Daemon::BecomeReplica(VmSlot& slot, const std::string& peer, uint64_t epoch,
                             bool in_sync) {
  RoleState r;
  r.role = Role::kReplica;
  r.epoch = epoch;
  r.peer = peer;
  r.phase = Phase::kDemoting;
  r.in_sync = in_sync;
  r.definition = DefinitionOf(slot, epoch);
  r.definition.primary_site = peer;
  SR_RETURN_IF_ERROR(PersistRole(slot, r));
  failpoint::Check("control.demote_after_persist");
  SR_RETURN_IF_ERROR(ClosePrimary(slot));
  SR_RETURN_IF_ERROR(FinishDemotion(slot));
  SR_ASSIGN_OR_RETURN(auto replica, applier::Replica::Open(Inbound::ReplicaDir(config_, slot.name)));
  return inbound_->Add(std::move(replica));
}

// --- Failback ---------------------------------------------------------------------------------

json Daemon::Failback(VmSlot& slot) {
  const std::string& vm = slot.name;
  RoleState role = slot.CurrentRole();
  if (role.role != Role::kPrimary) {
    return Refused("wrong-site", "failback runs where VM " + vm + " is primary now" +
                                     (role.peer.empty() ? "" : " (" + role.peer + ")"));
  }
  json steps = json::array();
  auto stop = [&](int step, const std::string& what, const json& res) {
    return Refused("failback-stopped", "step " + std::to_string(step) + " (" + what + "): " +
                                           res.value("message", std::string("failed")));
  };
  // 1. Reverse replication, so the original site holds this site's data.
  if (!slot.outbound || !slot.outbound->enabled() || role.phase != Phase::kNone) {
    json res = Reverse(slot);
    if (!res.value("ok", false)) return stop(1, "reverse replication", res);
    steps.push_back({{"step", "reverse replication"}, {"result", res["result"]["result"]}});
  } else {
    steps.push_back({{"step", "reverse replication"}, {"result", "already running"}});
  }
  while (slot.outbound && slot.outbound->sync_owed()) {
    std::optional<shipper::ShipperStats> st = slot.outbound->LinkStats();
    if (st && st->refused) {
      return stop(1, "reverse replication", Refused("refused", st->last_error));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  // 2. Planned failover back; 3. it makes this site the replica, so the VM is protected.
  json res = FailoverPlanned(slot);
  if (!res.value("ok", false)) return stop(2, "planned failover", res);
  steps.push_back({{"step", "planned failover"}, {"result", res["result"]["result"]},
                   {"details", res["result"]}});
  steps.push_back({{"step", "reverse replication"},
                   {"result", role.peer + " replicates VM " + vm + " to " + config_.name}});
  return Ok({{"vm", vm}, {"primary", role.peer}, {"steps", steps}});
}

// --- Test failover -----------------------------------------------------------------------------

json Daemon::TestFailover(VmSlot& slot, const json& request) {
  const std::string& vm = slot.name;
  const std::string action = request.value("action", "");
  RoleState role = slot.CurrentRole();
  if (action == "stop") {
    {
      std::lock_guard lk(slot.mu);
      if (!slot.test) return Refused("no-test", "no test failover of VM " + vm + " runs here");
    }
    if (Status s = StopTestCopy(slot); !s.ok()) return Refused("test-stop-failed", s.ToString());
    return Ok({{"vm", vm}, {"stopped", true}});
  }
  if (action != "start") return Refused("bad-request", "test-failover takes start or stop");
  if (role.role != Role::kReplica) {
    return Refused("wrong-site", "VM " + vm + " is not a replica at " + config_.name +
                                     "; a test failover runs at the replica site");
  }
  std::shared_ptr<applier::Replica> replica = inbound_->Get(vm);
  if (!replica) return Refused("no-replica", "no replica of VM " + vm + " at " + config_.name);
  {
    std::lock_guard lk(slot.mu);
    if (slot.test) {
      return Refused("test-running", "a test failover of VM " + vm + " runs already (point " +
                                         std::to_string(slot.test->point) + ")");
    }
  }
  applier::RecoveryPoint point;
  if (json refused = ChoosePoint(*replica, request, &point); !refused.is_null()) return refused;
  const fs::path dir = config_.state_dir / "vms" / vm / "test";
  std::error_code ec;
  fs::remove_all(dir, ec);
  if (Status s = MakeDirs(dir); !s.ok()) return Refused("test-failed", s.ToString());
  auto copy = std::make_unique<PointCopy>();
  copy->point = point.id;
  copy->replica = replica;
  auto view = replica->OpenView(point.id);
  if (!view.ok()) return Refused("test-failed", view.status().ToString());
  copy->view = std::move(*view);
  const applier::PointView* v = copy->view.get();
  const std::string test_vm = vm + "-test";
  for (size_t i = 0; i < v->disk_count(); ++i) {
    auto overlay = blockdev::OverlayBackend::Open(
        dir / (v->disk_name(i) + ".overlay"), v->disk_size(i),
        [v, i](uint64_t offset, std::span<std::byte> out) { return v->Read(i, offset, out); });
    if (!overlay.ok()) return Refused("test-failed", overlay.status().ToString());
    copy->slots.push_back(std::make_unique<blockdev::DiskSlot>(v->disk_size(i)));
    copy->slots.back()->Set(overlay->get(), blockdev::SlotMode::kReadWrite);
    copy->overlays.push_back(std::move(*overlay));
  }
  for (size_t i = 0; i < copy->slots.size(); ++i) {
    Status s = fuse_->AddDisk({test_vm, v->disk_name(i), copy->slots[i].get()});
    if (!s.ok()) {
      for (size_t j = 0; j < i; ++j) (void)fuse_->RemoveDisk(test_vm, v->disk_name(j));
      return Refused("test-failed", s.ToString());
    }
  }
  json out = {{"vm", vm},
              {"point", {{"id", point.id},
                         {"time", FormatUtc(point.cut_unix_nanos)},
                         {"cut_unix_nanos", point.cut_unix_nanos}}},
              {"path", (config_.mountpoint / test_vm).string()}};
  spdlog::info("VM {}: test failover of point {} at {}", vm, point.id,
               (config_.mountpoint / test_vm).string());
  std::lock_guard lk(slot.mu);
  slot.test = std::move(copy);
  return Ok(out);
}

Status Daemon::StopTestCopy(VmSlot& slot) {
  std::unique_ptr<PointCopy> copy;
  {
    std::lock_guard lk(slot.mu);
    copy = std::move(slot.test);
  }
  if (!copy) return Status::Ok();
  Status result;
  for (size_t i = 0; i < copy->slots.size(); ++i) {
    copy->slots[i]->Set(nullptr, blockdev::SlotMode::kOffline);
    Status s = fuse_->RemoveDisk(slot.name + "-test", copy->view->disk_name(i));
    if (!s.ok() && result.ok()) result = s;
  }
  copy.reset();
  std::error_code ec;
  fs::remove_all(config_.state_dir / "vms" / slot.name / "test", ec);
  spdlog::info("VM {}: test failover stopped; its writes are discarded", slot.name);
  return result;
}

}  // namespace siterep::control
