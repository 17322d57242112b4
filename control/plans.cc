// Recovery plans in the daemon: what a site checks of a plan before any of it runs (the
// file's own rules are control/plan.h's). Running them is plan_run.cc.
#include <set>

#include "control/daemon.h"
#include "control/plan.h"

namespace siterep::control {

using nlohmann::json;

json Daemon::ValidatePlan(const json& request) {
  if (!request.contains("plan")) return Refused("bad-request", "plan-validate needs \"plan\"");
  Result<RecoveryPlan> plan = PlanFromJson(request["plan"]);
  if (!plan.ok()) return Refused("bad-plan", plan.status().message());
  if (config_.name != plan->from && config_.name != plan->to) {
    return Refused("wrong-site", "plan " + plan->name + " moves VMs from " + plan->from + " to " +
                                     plan->to + "; this is site " + config_.name);
  }
  json vms;
  std::vector<std::string> problems =
      PlanProblems(*plan, "", request.value("force", false), &vms);
  if (!problems.empty()) {
    std::string message;
    for (const std::string& p : problems) message += (message.empty() ? "" : "\n") + p;
    return Refused("plan-invalid", message);
  }
  return Ok({{"plan", plan->name}, {"site", config_.name}, {"groups", plan->groups.size()},
             {"vms", vms}});
}

std::vector<std::string> Daemon::PlanProblems(const RecoveryPlan& plan, const std::string& kind,
                                              bool force, json* vms) {
  const bool at_from = config_.name == plan.from;
  // Every problem at once, one line each, as the file's own check does.
  std::vector<std::string> problems;
  *vms = json::array();
  const json report = StatusReport("");
  for (const PlanGroup& group : plan.groups) {
    for (const std::string& vm : group.vms) {
      const std::string where = "group " + group.name + ": VM " + vm + ": ";
      VmSlot* slot = Slot(vm);
      if (slot == nullptr) {
        problems.push_back(where + "unknown at " + config_.name);
        continue;
      }
      const RoleState role = slot->CurrentRole();
      json status;
      for (const json& v : report["vms"]) {
        if (v.value("name", "") == vm) status = v;
      }
      const std::string state = status.value("state", "");
      const std::string health = status.value("health", "");
      vms->push_back({{"vm", vm}, {"group", group.name}, {"role", RoleName(role.role)},
                      {"state", state}, {"health", health}});
      const std::string other = at_from ? plan.to : plan.from;
      if (at_from) {
        if (role.role != Role::kPrimary || role.phase != Phase::kNone) {
          problems.push_back(where + "not running as primary at " + config_.name + " (" + state + ")");
          continue;
        }
        if (!slot->outbound || !slot->outbound->enabled() || slot->outbound->peer() != other) {
          problems.push_back(where + "not replicated to " + other);
          continue;
        }
      } else {
        if (role.role != Role::kReplica || role.peer != other) {
          problems.push_back(where + "not a replica of " + other + " at " + config_.name + " (" +
                             std::string(RoleName(role.role)) + ", " + state + ")");
          continue;
        }
        std::lock_guard lk(slot->mu);
        if (slot->test) {
          problems.push_back(where + "a test failover of it runs (siterep test-failover " + vm +
                             " stop, or siterep plan cleanup)");
          continue;
        }
      }
      if (state == "initial replication" || state == "resynchronising") {
        problems.push_back(where + "its replica is not a consistent copy yet (" + state + ")");
        continue;
      }
      // An unplanned run expects a critical link (the primary is down); a replica that
      // cannot apply is another matter.
      std::shared_ptr<applier::Replica> replica = inbound_ ? inbound_->Get(vm) : nullptr;
      const std::string apply_error = replica ? replica->Position().apply_error : "";
      if (kind == "unplanned") {
        if (!apply_error.empty() && !force) {
          problems.push_back(where + "its replica stopped applying (" + apply_error +
                             "); --force to go on");
        }
      } else if (health == "critical" && !force) {
        problems.push_back(where + "replication is critical (" +
                           status.value("health_reason", std::string()) + "); --force to go on");
      }
    }
  }
  return problems;
}

}  // namespace siterep::control
