// Running recovery plans (`siterep plan run|status|continue|cancel|cleanup`).
//
// A run is one JSON document, kept in memory and persisted to
// <state_dir>/plans/<plan>/run.json after every change, so `plan status` answers from the
// daemon whatever happened to the CLI that started it, and a restarted daemon still knows
// where the run stood. Its cursor names the next step: group g, stage pre | vms | post |
// manual, index i. One thread per running run walks the steps:
//
//   pre[i]      a command at the plan's from or to site (here: RunHook; at the peer: the
//               "plan-action" peer request, which the peer accepts only with
//               allow_plan_actions = true in its [[peers]] entry for this site)
//   vms         every VM of the group at once, one thread each: planned failover (run at
//               the from site), unplanned failover or test failover (at the to site). VMs
//               of one consistency group share one recovery point (ConsistentPoints).
//   post[i]     as pre
//   manual[i]   the run pauses (state "paused") until `plan continue`, unless --yes
//
// A failed step stops the run (state "failed"; VMs already failed over stay up); `plan
// continue` runs that step again: VMs already at their target are skipped, actions done
// are not run twice. `plan cancel` stops a run between steps. A daemon that stops while a
// run is running finishes the step under way and records the run as "interrupted";
// `plan continue` goes on from there.
#include <spdlog/spdlog.h>

#include <set>
#include <thread>

#include "common/file_util.h"
#include "common/time_util.h"
#include "control/daemon.h"
#include "control/plan.h"
#include "shipper/peer_call.h"

namespace siterep::control {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr auto kPeerActionMargin = std::chrono::seconds(15);

bool Finished(const std::string& state) {
  return state == "done" || state == "cancelled" || state == "cleaned";
}

json PendingActions(const std::vector<PlanAction>& actions) {
  json out = json::array();
  for (const PlanAction& a : actions) {
    out.push_back({{"site", a.site}, {"run", a.run}, {"state", "pending"}});
  }
  return out;
}

// The run document of a new run of plan.
json NewRun(const RecoveryPlan& plan, const std::string& kind, const json& request,
            const std::string& site) {
  json groups = json::array();
  for (const PlanGroup& g : plan.groups) {
    json vms = json::array();
    for (const std::string& vm : g.vms) vms.push_back({{"vm", vm}, {"state", "pending"}});
    json manual = json::array();
    for (const PlanManual& m : g.manual) {
      manual.push_back({{"message", m.message}, {"state", "pending"}});
    }
    groups.push_back({{"name", g.name}, {"state", "pending"}, {"pre", PendingActions(g.pre)},
                      {"vms", vms}, {"post", PendingActions(g.post)}, {"manual", manual}});
  }
  return {{"plan", PlanToJson(plan)},
          {"kind", kind},
          {"point", request.value("point", json("latest"))},
          {"yes", request.value("yes", false)},
          {"force", request.value("force", false)},
          {"site", site},
          {"state", "running"},
          {"message", ""},
          {"started", FormatUtc(NowUnixNanos())},
          {"started_unix_nanos", NowUnixNanos()},
          {"ended", nullptr},
          {"cursor", {{"group", 0}, {"stage", "pre"}, {"index", 0}}},
          {"groups", groups},
          {"consistency", json::object()},
          {"events", json::array()}};
}

// The state of the group the cursor is in, when it has started (a run stopped in it).
void MarkCursorGroup(json& run, const std::string& state) {
  const size_t gi = run["cursor"].value("group", size_t{0});
  if (gi < run["groups"].size() && run["groups"][gi].value("state", "") != "pending") {
    run["groups"][gi]["state"] = state;
  }
}

}  // namespace

struct Daemon::PlanRunSlot {
  ~PlanRunSlot() {
    if (thread.joinable()) thread.join();  // a run replaced after it ended
  }
  std::string name;
  std::mutex mu;  // protects run, cancel; after plans_mu_
  json run;
  bool cancel = false;
  bool active = false;  // a thread walks the steps
  std::thread thread;
};

fs::path Daemon::PlanDir(const std::string& plan) const {
  return config_.state_dir / "plans" / plan;
}

void Daemon::PlanEvent(PlanRunSlot& p, const std::string& text) {
  // p.mu held.
  p.run["events"].push_back({{"at", FormatUtc(NowUnixNanos())}, {"text", text}});
  spdlog::info("plan {}: {}", p.name, text);
}

void Daemon::PersistPlanRun(PlanRunSlot& p) {
  // p.mu held. A run that cannot be recorded goes on; the log says so.
  Status s = MakeDirs(PlanDir(p.name));
  if (s.ok()) s = WriteFileAtomic(PlanDir(p.name) / "run.json", p.run.dump(1) + "\n");
  if (!s.ok()) spdlog::error("plan {}: cannot record the run: {}", p.name, s.ToString());
}

void Daemon::LoadPlanRuns() {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(config_.state_dir / "plans", ec)) {
    Result<std::string> text = ReadFile(entry.path() / "run.json");
    if (!text.ok()) continue;
    json run = json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (!run.is_object() || !run.contains("plan") || !run.contains("cursor")) {
      spdlog::warn("plan run {}: unreadable, ignored", (entry.path() / "run.json").string());
      continue;
    }
    auto p = std::make_shared<PlanRunSlot>();
    p->name = entry.path().filename().string();
    p->run = std::move(run);
    if (!Finished(p->run.value("state", ""))) HoldPlanInstants(p->run);
    if (p->run.value("state", "") == "running") {
      p->run["state"] = "interrupted";
      MarkCursorGroup(p->run, "interrupted");
      p->run["message"] = "siterepd stopped during the run; siterep plan continue " + p->name +
                          " goes on from where it stood";
      PlanEvent(*p, "interrupted by a restart of siterepd");
      PersistPlanRun(*p);
    }
    std::lock_guard lk(plans_mu_);
    plan_runs_[p->name] = p;
  }
}

void Daemon::StopPlanRuns() {
  std::vector<std::shared_ptr<PlanRunSlot>> runs;
  {
    std::lock_guard lk(plans_mu_);
    for (auto& [name, p] : plan_runs_) runs.push_back(p);
  }
  for (auto& p : runs) {
    {
      std::lock_guard lk(p->mu);
      p->cancel = true;  // between steps; the daemon is stopping, not the operator
    }
    if (p->thread.joinable()) p->thread.join();
  }
}

json Daemon::PlanRequest(const std::string& op, const json& request) {
  if (op == "plan-run") return StartPlanRun(request);
  const std::string name = request.value("plan", json("")).is_string()
                               ? request.value("plan", std::string())
                               : std::string();
  std::shared_ptr<PlanRunSlot> p;
  {
    std::lock_guard lk(plans_mu_);
    if (op == "plan-status" && name.empty()) {
      json runs = json::array();
      for (auto& [n, slot] : plan_runs_) {
        std::lock_guard rl(slot->mu);
        runs.push_back(slot->run);
      }
      return Ok({{"runs", runs}});
    }
    auto it = plan_runs_.find(name);
    if (it == plan_runs_.end()) {
      return Refused("unknown-plan", "no run of a plan named '" + name + "' at " + config_.name);
    }
    p = it->second;
  }
  if (op == "plan-status") {
    std::lock_guard lk(p->mu);
    return Ok(p->run);
  }
  if (op == "plan-cancel") {
    std::lock_guard lk(p->mu);
    const std::string state = p->run.value("state", "");
    if (Finished(state)) return Refused("not-running", "plan " + name + " is " + state);
    p->cancel = true;
    if (!p->active) {
      p->run["state"] = "cancelled";
      p->run["message"] = "cancelled by the operator";
      MarkCursorGroup(p->run, "cancelled");
      p->run["ended"] = FormatUtc(NowUnixNanos());
      PlanEvent(*p, "cancelled");
      PersistPlanRun(*p);
      ReleasePlanHolds(p->run);
    } else {
      PlanEvent(*p, "cancel asked; the run stops after the step under way");
      PersistPlanRun(*p);
    }
    return Ok(p->run);
  }
  if (op == "plan-continue") return ContinuePlanRun(p, request);
  if (op == "plan-cleanup") return CleanupPlanRun(p);
  return Refused("unknown-op", "unknown request '" + op + "'");
}

json Daemon::StartPlanRun(const json& request) {
  if (!request.contains("plan") || !request["plan"].is_object()) {
    return Refused("bad-request", "plan-run needs \"plan\" (the plan as JSON)");
  }
  Result<RecoveryPlan> plan = PlanFromJson(request["plan"]);
  if (!plan.ok()) return Refused("bad-plan", plan.status().message());
  const std::string kind = request.value("kind", "");
  if (kind != "planned" && kind != "unplanned" && kind != "test") {
    return Refused("bad-request", "plan run needs --planned, --unplanned or --test");
  }
  const std::string& runs_at = kind == "planned" ? plan->from : plan->to;
  if (config_.name != runs_at) {
    return Refused("wrong-site", "a " + kind + " run of plan " + plan->name + " runs at " + runs_at +
                                     (kind == "planned" ? ", where the VMs run now"
                                                        : ", the site that takes the VMs over") +
                                     "; this is " + config_.name);
  }
  std::lock_guard lk(plans_mu_);
  if (auto it = plan_runs_.find(plan->name); it != plan_runs_.end()) {
    std::lock_guard rl(it->second->mu);
    const std::string state = it->second->run.value("state", "");
    const bool test_left = it->second->run.value("kind", "") == "test" && state == "done";
    if (!Finished(state) || test_left) {
      return Refused("plan-running",
                     "plan " + plan->name + " has a " + it->second->run.value("kind", "") +
                         " run that is " + state + ": " +
                         (test_left ? "remove its test copies first (siterep plan cleanup " +
                                          plan->name + ")"
                                    : "siterep plan continue " + plan->name + ", or siterep plan "
                                      "cancel " + plan->name));
    }
  }
  json vms;
  std::vector<std::string> problems =
      PlanProblems(*plan, kind, request.value("force", false), &vms);
  if (!problems.empty()) {
    std::string message;
    for (const std::string& s : problems) message += (message.empty() ? "" : "\n") + s;
    return Refused("plan-invalid", message);
  }
  // The previous run's record goes to history/.
  const fs::path dir = PlanDir(plan->name);
  std::error_code ec;
  if (fs::exists(dir / "run.json", ec)) {
    (void)MakeDirs(dir / "history");
    fs::rename(dir / "run.json", dir / "history" / (std::to_string(NowUnixNanos()) + ".json"), ec);
  }
  auto p = std::make_shared<PlanRunSlot>();
  p->name = plan->name;
  p->run = NewRun(*plan, kind, request, config_.name);
  {
    std::lock_guard rl(p->mu);
    PlanEvent(*p, kind + " run started at " + config_.name + " (" + plan->from + " -> " +
                      plan->to + ", " + std::to_string(plan->groups.size()) + " groups)");
    PersistPlanRun(*p);
    p->active = true;
  }
  // The run replaced has ended; its thread is at most returning (~PlanRunSlot joins it).
  plan_runs_[p->name] = p;
  p->thread = std::thread([this, p] { PlanRunLoop(p); });
  std::lock_guard rl(p->mu);
  return Ok(p->run);
}

json Daemon::ContinuePlanRun(const std::shared_ptr<PlanRunSlot>& p, const json& request) {
  std::unique_lock lk(p->mu);
  const std::string state = p->run.value("state", "");
  if (p->active) return Refused("plan-running", "plan " + p->name + " is running");
  if (state != "paused" && state != "failed" && state != "interrupted") {
    return Refused("not-paused", "plan " + p->name + " is " + state + "; nothing to continue");
  }
  if (request.value("yes", false)) p->run["yes"] = true;
  if (state == "paused") {
    json& cursor = p->run["cursor"];
    json& manual = p->run["groups"][cursor["group"].get<size_t>()]["manual"]
                         [cursor["index"].get<size_t>()];
    manual["state"] = "confirmed";
    manual["confirmed_by"] = "siterep plan continue";
    manual["at"] = FormatUtc(NowUnixNanos());
    cursor["index"] = cursor["index"].get<size_t>() + 1;
    PlanEvent(*p, "confirmed: " + manual.value("message", ""));
  } else {
    PlanEvent(*p, "continued after: " + p->run.value("message", ""));
  }
  p->run["state"] = "running";
  p->run["message"] = "";
  MarkCursorGroup(p->run, "running");
  p->cancel = false;
  p->active = true;
  PersistPlanRun(*p);
  lk.unlock();
  if (p->thread.joinable()) p->thread.join();
  p->thread = std::thread([this, p] { PlanRunLoop(p); });
  lk.lock();
  return Ok(p->run);
}

json Daemon::CleanupPlanRun(const std::shared_ptr<PlanRunSlot>& p) {
  std::unique_lock lk(p->mu);
  if (p->run.value("kind", "") != "test") {
    return Refused("not-a-test", "plan " + p->name + "'s last run is a " +
                                     p->run.value("kind", "") + " run; cleanup removes a test "
                                     "run's copies");
  }
  if (p->active) return Refused("plan-running", "plan " + p->name + " is running; cancel it first");
  const json run = p->run;
  lk.unlock();
  std::vector<std::string> errors;
  json removed = json::array();
  for (const json& g : run["groups"]) {
    for (const json& v : g["vms"]) {
      VmSlot* slot = Slot(v.value("vm", ""));
      if (slot == nullptr) continue;
      bool has_test = false;
      {
        std::lock_guard sl(slot->mu);
        has_test = slot->test != nullptr;
      }
      if (!has_test) continue;
      std::unique_lock op(slot->op_mu);
      if (Status s = StopTestCopy(*slot); !s.ok()) {
        errors.push_back("VM " + slot->name + ": " + s.ToString());
      } else {
        removed.push_back(slot->name);
      }
    }
  }
  lk.lock();
  ReleasePlanHolds(p->run);
  if (!errors.empty()) {
    std::string message;
    for (const std::string& e : errors) message += (message.empty() ? "" : "\n") + e;
    PlanEvent(*p, "cleanup failed: " + message);
    PersistPlanRun(*p);
    return Refused("cleanup-failed", message);
  }
  p->run["state"] = "cleaned";
  if (p->run["ended"].is_null()) p->run["ended"] = FormatUtc(NowUnixNanos());
  PlanEvent(*p, "test copies removed (" + std::to_string(removed.size()) + " VMs)");
  PersistPlanRun(*p);
  return Ok(p->run);
}

// --- The steps -------------------------------------------------------------------------

void Daemon::PlanRunLoop(std::shared_ptr<PlanRunSlot> p) {
  try {
    WalkPlan(p);
  } catch (const std::exception& e) {
    // A defect, not the operator's doing: the run stops where it is, and says so.
    std::lock_guard lk(p->mu);
    p->run["state"] = "failed";
    p->run["message"] = std::string("internal error: ") + e.what();
    PlanEvent(*p, p->run["message"].get<std::string>());
    p->active = false;
    PersistPlanRun(*p);
  }
}

void Daemon::WalkPlan(const std::shared_ptr<PlanRunSlot>& p) {
  std::unique_lock lk(p->mu);
  Result<RecoveryPlan> parsed = PlanFromJson(p->run["plan"]);
  auto stop = [&](const std::string& state, const std::string& message) {
    p->run["state"] = state;
    p->run["message"] = message;
    if (state != "paused" && state != "failed" && state != "interrupted") {
      p->run["ended"] = FormatUtc(NowUnixNanos());
    }
    if (!message.empty()) PlanEvent(*p, message);
    p->active = false;
    PersistPlanRun(*p);
  };
  if (!parsed.ok()) return stop("failed", "the recorded plan is unreadable: " + parsed.status().message());
  const RecoveryPlan& plan = *parsed;
  const std::string kind = p->run.value("kind", "");
  while (true) {
    if (p->cancel) {
      bool stopping;
      {
        std::lock_guard sl(stop_mu_);
        stopping = stopping_;
      }
      if (stopping) {
        MarkCursorGroup(p->run, "interrupted");
        return stop("interrupted", "siterepd stopped during the run; siterep plan continue " +
                                       p->name + " goes on from here");
      }
      ReleasePlanHolds(p->run);
      MarkCursorGroup(p->run, "cancelled");
      return stop("cancelled", "cancelled by the operator");
    }
    json& cursor = p->run["cursor"];
    const size_t gi = cursor["group"].get<size_t>();
    if (gi >= plan.groups.size()) {
      ReleasePlanHolds(p->run);
      const double seconds =
          (NowUnixNanos() - p->run.value("started_unix_nanos", int64_t{0})) / 1e9;
      p->run["seconds"] = seconds;
      std::string done = "done: " + std::to_string(plan.groups.size()) + " groups";
      if (kind == "test") done += "; remove the test copies with siterep plan cleanup " + p->name;
      if (kind == "unplanned") {
        done += "; commit each VM (siterep commit VM) once its point is right, then siterep "
                "reverse VM";
      }
      return stop("done", done);
    }
    const PlanGroup& group = plan.groups[gi];
    json& greport = p->run["groups"][gi];
    const std::string stage = cursor["stage"].get<std::string>();
    const size_t index = cursor["index"].get<size_t>();
    if (greport["state"] == "pending") {
      greport["state"] = "running";
      greport["started"] = FormatUtc(NowUnixNanos());
      greport["started_unix_nanos"] = NowUnixNanos();
      PlanEvent(*p, "group " + group.name + ": started");
      PersistPlanRun(*p);
    }
    auto advance = [&](const std::string& next_stage) {
      cursor["stage"] = next_stage;
      cursor["index"] = 0;
    };
    if (stage == "pre" || stage == "post") {
      const std::vector<PlanAction>& actions = stage == "pre" ? group.pre : group.post;
      if (index >= actions.size()) {
        advance(stage == "pre" ? "vms" : "manual");
        continue;
      }
      json& entry = greport[stage][index];
      if (entry.value("state", "") == "done" || entry.value("state", "") == "skipped") {
        cursor["index"] = index + 1;
        continue;
      }
      entry["state"] = "running";
      entry["started"] = FormatUtc(NowUnixNanos());
      PersistPlanRun(*p);
      lk.unlock();
      json result = RunPlanAction(plan, group, actions[index], stage, kind);
      lk.lock();
      const std::string state = result.value("state", "failed");
      for (auto& [k, v] : result.items()) entry[k] = v;
      entry["ended"] = FormatUtc(NowUnixNanos());
      const std::string what = "group " + group.name + ": " + stage + "[" + std::to_string(index) +
                               "] at " + actions[index].site + " (" + actions[index].run + ")";
      if (state == "failed") {
        greport["state"] = "failed";
        return stop("failed", what + " failed: " + result.value("error", std::string()));
      }
      PlanEvent(*p, what + ": " + state +
                        (result.contains("exit_code")
                             ? " (exit " + std::to_string(result.value("exit_code", 0)) + ")"
                             : "") +
                        (result.contains("note") ? ", " + result.value("note", "") : ""));
      cursor["index"] = index + 1;
      PersistPlanRun(*p);
      continue;
    }
    if (stage == "vms") {
      std::string failure = RunPlanVms(*p, lk, plan, group, gi);
      if (!failure.empty()) {
        greport["state"] = "failed";
        return stop("failed", "group " + group.name + ": " + failure);
      }
      advance("post");
      PersistPlanRun(*p);
      continue;
    }
    if (stage == "manual") {
      if (index >= group.manual.size()) {
        greport["state"] = "done";
        greport["ended"] = FormatUtc(NowUnixNanos());
        greport["seconds"] =
            (NowUnixNanos() - greport.value("started_unix_nanos", int64_t{0})) / 1e9;
        PlanEvent(*p, "group " + group.name + ": done");
        cursor["group"] = gi + 1;
        advance("pre");
        PersistPlanRun(*p);
        continue;
      }
      json& entry = greport["manual"][index];
      if (p->run.value("yes", false)) {
        entry["state"] = "confirmed";
        entry["confirmed_by"] = "--yes";
        entry["at"] = FormatUtc(NowUnixNanos());
        PlanEvent(*p, "group " + group.name + ": manual step confirmed by --yes: " +
                          group.manual[index].message);
        cursor["index"] = index + 1;
        PersistPlanRun(*p);
        continue;
      }
      entry["state"] = "waiting";
      greport["state"] = "paused";
      return stop("paused", "group " + group.name + ": waiting for the operator: " +
                                group.manual[index].message + " (then siterep plan continue " +
                                p->name + ")");
    }
    return stop("failed", "the recorded cursor names an unknown stage '" + stage + "'");
  }
}

json Daemon::RunPlanAction(const RecoveryPlan& plan, const PlanGroup& group,
                           const PlanAction& action, const std::string& stage,
                           const std::string& kind) {
  std::string vms;
  for (const std::string& vm : group.vms) vms += (vms.empty() ? "" : " ") + vm;
  const json request = {{"op", "plan-action"},   {"plan", plan.name}, {"group", group.name},
                        {"stage", stage},        {"kind", kind},      {"vms", vms},
                        {"run", action.run},     {"timeout_ms", action.timeout.count()}};
  auto report = [](const HookResult& r) {
    json out = r.ToJson();
    out["state"] = r.ok() ? "done" : "failed";
    if (!r.ok()) out["error"] = r.Failure();
    return out;
  };
  if (action.site == config_.name) return report(RunPlanHook(request));
  Result<json> answer =
      CallPeer(action.site, request,
               action.timeout + std::chrono::duration_cast<std::chrono::milliseconds>(kPeerActionMargin));
  if (!answer.ok() || !answer->value("ok", false)) {
    const std::string why =
        answer.ok() ? shipper::PeerRefusalMessage(*answer) : answer.status().message();
    // In an unplanned run the from site is usually the one that failed: its actions are
    // done if it can be reached, skipped if not. A refusal is still a failure.
    if (kind == "unplanned" && action.site == plan.from && !answer.ok()) {
      return {{"state", "skipped"}, {"note", "site " + action.site + " unreachable (" + why + ")"}};
    }
    return {{"state", "failed"}, {"error", "site " + action.site + ": " + why}};
  }
  return report(HookResult::FromJson((*answer)["result"]));
}

HookResult Daemon::RunPlanHook(const json& request) {
  HookContext context;
  context.site = config_.name;
  context.who = "plan " + request.value("plan", std::string()) + " (group " +
                request.value("group", std::string()) + ")";
  context.event = "plan_" + request.value("stage", std::string());
  context.mountpoint = config_.mountpoint.string();
  context.extra_env = {"SITEREP_PLAN=" + request.value("plan", std::string()),
                       "SITEREP_GROUP=" + request.value("group", std::string()),
                       "SITEREP_VMS=" + request.value("vms", std::string()),
                       "SITEREP_RUN_KIND=" + request.value("kind", std::string())};
  return RunHook(request.value("run", std::string()), context,
                 std::chrono::milliseconds(request.value("timeout_ms", int64_t{300'000})));
}

json Daemon::HandlePlanAction(const std::string& peer, const json& request) {
  const PeerConfig* p = nullptr;
  for (const PeerConfig& c : config_.peers) {
    if (c.name == peer) p = &c;
  }
  if (p == nullptr || !p->allow_plan_actions) {
    return Refused("plan-actions-refused",
                   config_.name + " does not run plan actions for " + peer +
                       ": set allow_plan_actions = true in the [[peers]] entry of " + peer +
                       " in " + config_.name + "'s config");
  }
  if (!request.contains("run") || !request["run"].is_string() ||
      request["run"].get<std::string>().empty() || !request.contains("timeout_ms") ||
      !request["timeout_ms"].is_number_integer() || request["timeout_ms"].get<int64_t>() <= 0) {
    return Refused("bad-request", "plan-action needs \"run\" and a positive \"timeout_ms\"");
  }
  spdlog::info("plan {}: running an action for {}: {}", request.value("plan", std::string()), peer,
               request["run"].get<std::string>());
  return Ok(RunPlanHook(request).ToJson());
}

std::string Daemon::RunPlanVms(PlanRunSlot& p, std::unique_lock<std::mutex>& lk,
                               const RecoveryPlan& plan, const PlanGroup& group, size_t gi) {
  json& greport = p.run["groups"][gi];
  const std::string kind = p.run.value("kind", "");
  const bool force = p.run.value("force", false);
  const json point = p.run.value("point", json("latest"));
  // Consistency groups first: one instant for all their members (unplanned, test).
  std::map<std::string, uint64_t> points;
  if (kind != "planned") {
    std::string failure = ConsistentPoints(p, group, &points);
    if (!failure.empty()) return failure;
  }
  std::vector<size_t> todo;
  for (size_t i = 0; i < group.vms.size(); ++i) {
    json& v = greport["vms"][i];
    if (v.value("state", "") == "done") continue;
    v["state"] = "running";
    v["started"] = FormatUtc(NowUnixNanos());
    v.erase("error");
    todo.push_back(i);
  }
  PlanEvent(p, "group " + group.name + ": " + kind + " failover of " + std::to_string(todo.size()) +
                   " VMs");
  PersistPlanRun(p);
  lk.unlock();
  std::vector<json> results(group.vms.size());
  std::vector<std::thread> threads;
  for (size_t i : todo) {
    const std::string& vm = group.vms[i];
    json request = {{"force", force}, {"point", point}};
    if (auto it = points.find(vm); it != points.end()) request["point"] = it->second;
    threads.emplace_back([this, &plan, &kind, &results, i, vm, request] {
      try {
        results[i] = PlanVmStep(plan, kind, vm, request);
      } catch (const std::exception& e) {  // a reply of an unexpected shape: fail the VM
        results[i] = {{"state", "failed"}, {"error", std::string("internal error: ") + e.what()}};
      }
    });
  }
  for (std::thread& t : threads) t.join();
  lk.lock();
  std::string failures;
  for (size_t i : todo) {
    json& v = greport["vms"][i];
    for (auto& [k, value] : results[i].items()) v[k] = value;
    v["ended"] = FormatUtc(NowUnixNanos());
    const std::string& vm = group.vms[i];
    if (v.value("state", "") != "done") {
      // One event for all of them: the run's message (stop).
      failures += (failures.empty() ? "" : "; ") + std::string("VM ") + vm + ": " +
                  v.value("error", std::string("failed"));
    } else {
      std::string text = "group " + group.name + ": VM " + vm + " " +
                         (kind == "test" ? "test copy up" : "failed over");
      if (v.contains("rto_seconds") && v["rto_seconds"].is_number()) {
        text += ", RTO " + std::to_string(v["rto_seconds"].get<double>()).substr(0, 5) + " s";
      }
      if (v.contains("note")) text += " (" + v.value("note", "") + ")";
      PlanEvent(p, text);
    }
  }
  PersistPlanRun(p);
  return failures;
}

json Daemon::PlanVmStep(const RecoveryPlan& plan, const std::string& kind, const std::string& vm,
                        const json& request) {
  const auto t0 = std::chrono::steady_clock::now();
  VmSlot* slot = Slot(vm);
  if (slot == nullptr) return {{"state", "failed"}, {"error", "unknown at " + config_.name}};
  const RoleState role = slot->CurrentRole();
  json out = {{"state", "done"}};
  // Already where this step puts it (a step run again after a failure or a restart).
  if (kind == "planned" && role.role == Role::kReplica && role.peer == plan.to) {
    out["note"] = "already running at " + plan.to;
    return out;
  }
  if (kind == "unplanned" && role.role == Role::kPrimary && role.peer == plan.from &&
      (role.phase == Phase::kFailedOver || role.phase == Phase::kNone)) {
    out["note"] = "already failed over";
    out["point"] = {{"id", role.point}};
    return out;
  }
  if (kind == "test") {
    std::lock_guard lk(slot->mu);
    if (slot->test) {
      out["note"] = "test copy up already";
      out["point"] = {{"id", slot->test->point}};
      return out;
    }
  }
  OpLock op_lock(*slot, "plan step " + kind + " failover");
  if (!op_lock.owns()) return {{"state", "failed"}, {"error", op_lock.Busy(config_.name)["message"]}};
  json reply;
  if (kind == "planned") {
    reply = FailoverPlanned(*slot);
  } else if (kind == "unplanned") {
    reply = FailoverUnplanned(*slot, request);
  } else {
    json r = request;
    r["action"] = "start";
    reply = TestFailover(*slot, r);
  }
  out["seconds"] = SecondsSince(t0);
  if (!reply.value("ok", false)) {
    out["state"] = "failed";
    out["error"] = reply.value("message", std::string("refused"));
    return out;
  }
  const json& r = reply["result"];
  if (kind == "planned") {
    out["rto_seconds"] = r.value("rto_seconds", SecondsSince(t0));
    // Nothing is lost: the new primary starts from the old one's last cycle, shipped.
    out["point"] = {{"id", r.value("drained_cycle", uint64_t{0})}, {"every_change", true}};
    out["data_loss_window_seconds"] = 0.0;
    out["result"] = r.value("result", std::string());
  } else if (kind == "unplanned") {
    out["rto_seconds"] = r.value("rto_seconds", SecondsSince(t0));
    out["point"] = r.value("point", json());
    out["data_loss_window_seconds"] = r.value("data_loss_window_seconds", json());
  } else {
    out["rto_seconds"] = SecondsSince(t0);
    out["point"] = r.value("point", json());
    out["path"] = r.value("path", "");
  }
  json hooks = json::object();
  for (const char* h : {"pre_failover", "post_failover"}) {
    if (r.contains(h) && r[h].is_object() && r[h].value("ran", false)) hooks[h] = r[h];
  }
  if (!hooks.empty()) out["hooks"] = hooks;
  return out;
}

// --- Consistency groups ----------------------------------------------------------------

std::string Daemon::ConsistentPoints(PlanRunSlot& p, const PlanGroup& group,
                                     std::map<std::string, uint64_t>* points) {
  std::map<std::string, std::vector<std::string>> here;  // consistency group -> its VMs here
  for (const std::string& vm : group.vms) {
    const std::string g = inbound_->GroupOf(vm);
    if (!g.empty()) here[g].push_back(vm);
  }
  for (const auto& [g, vms] : here) {
    json& record = p.run["consistency"][g];
    if (!record.contains("instant")) {
      const std::optional<int64_t> instant = inbound_->GroupInstant(g);
      const std::vector<std::string> members = inbound_->GroupMembers(g);
      if (!instant) {
        return "consistency group " + g + ": its replicas share no recovery point yet";
      }
      record = {{"instant", *instant}, {"time", FormatUtc(*instant)}, {"members", members}};
      std::string list;
      for (const std::string& m : members) list += (list.empty() ? "" : ", ") + m;
      PlanEvent(p, "consistency group " + g + " (" + list + "): every member fails over to " +
                       FormatUtc(*instant));
      PersistPlanRun(p);
    }
    const int64_t instant = record["instant"].get<int64_t>();
    inbound_->HoldGroup(g, instant);
    for (const std::string& vm : vms) {
      std::shared_ptr<applier::Replica> replica = inbound_->Get(vm);
      if (!replica) continue;  // failed over already (a step run again)
      if (Status s = replica->ApplyPending(); !s.ok()) {
        return "VM " + vm + ": cannot apply up to the instant of consistency group " + g + ": " +
               s.ToString();
      }
      std::optional<uint64_t> id;
      std::string latest;
      for (const applier::RecoveryPoint& point : replica->Points()) {
        if (point.cut_unix_nanos == instant) id = point.id;
        if (point.latest) latest = std::to_string(point.id) + " at " + FormatUtc(point.cut_unix_nanos);
      }
      if (!id) {
        return "VM " + vm + " has no recovery point at " + FormatUtc(instant) +
               ", the instant of consistency group " + g + " (its latest: " +
               (latest.empty() ? "none" : latest) + ")";
      }
      (*points)[vm] = *id;
    }
  }
  return "";
}

void Daemon::HoldPlanInstants(const json& run) {
  if (!run.contains("consistency") || !run["consistency"].is_object()) return;
  for (const auto& [g, record] : run["consistency"].items()) {
    if (record.contains("instant") && record["instant"].is_number_integer()) {
      inbound_->HoldGroup(g, record["instant"].get<int64_t>());
    }
  }
}

void Daemon::ReleasePlanHolds(const json& run) {
  if (!run.contains("consistency") || !run["consistency"].is_object()) return;
  for (const auto& [g, record] : run["consistency"].items()) inbound_->HoldGroup(g, std::nullopt);
}

}  // namespace siterep::control
