// siterep: the operator's command line. Talks to siterepd only through the control
// socket (common/control_client.h). Exit codes: 0 done, 1 refused or failed (one line on
// stderr; also `verify` finding blocks that differ), 2 usage, 3 a plan run paused for an
// operator (siterep plan continue).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "common/config.h"
#include "common/control_client.h"
#include "common/failpoint.h"
#include "common/units.h"
#include "control/plan.h"

namespace {

using nlohmann::json;

constexpr const char* kDefaultConfig = "/etc/siterep/site.toml";

struct Globals {
  std::string socket;
  std::string config;
  bool json = false;
};

// Finds the control socket: --socket, else the config's control_socket.
siterep::Result<std::string> SocketPath(const Globals& g) {
  if (!g.socket.empty()) return g.socket;
  std::string path = g.config.empty() ? kDefaultConfig : g.config;
  auto config = siterep::LoadConfig(path);
  if (!config.ok()) {
    if (g.config.empty()) {
      return siterep::Status::Invalid("no --socket or -c given, and " + config.status().message());
    }
    return config.status();
  }
  return config->control_socket.string();
}

// Sends request; on success returns the "result" object, else prints the reason.
int Call(const Globals& g, const json& request, json* result) {
  auto socket = SocketPath(g);
  if (!socket.ok()) {
    std::fprintf(stderr, "siterep: %s\n", socket.status().message().c_str());
    return 1;
  }
  auto reply = siterep::CallControl(*socket, request);
  if (!reply.ok()) {
    std::fprintf(stderr, "siterep: %s\n", reply.status().message().c_str());
    return 1;
  }
  if (!(*reply)["ok"].get<bool>()) {
    if (g.json) std::cout << reply->dump(2) << "\n";
    std::fprintf(stderr, "siterep: %s\n", reply->value("message", "refused").c_str());
    return 1;
  }
  *result = (*reply)["result"];
  return 0;
}

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f s", s);
  return buf;
}

std::string Str(const json& j, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return "-";
  if (j[key].is_string())
    return j[key].get<std::string>().empty() ? "-" : j[key].get<std::string>();
  return j[key].dump();
}

// --- Recovery plan runs -------------------------------------------------------------------

// Exit code of a plan run's state: 0 done, 3 paused for an operator, 1 otherwise.
int PlanExit(const std::string& state) {
  if (state == "done" || state == "cleaned") return 0;
  if (state == "paused") return 3;
  return 1;
}

// Prints the run's events after *shown until it stops running; returns its last state.
int FollowPlan(const Globals& g, const std::string& name, size_t* shown, json* run) {
  while (true) {
    json result;
    if (int rc = Call(g, {{"op", "plan-status"}, {"plan", name}}, &result); rc != 0) return rc;
    *run = result;
    const json& events = result["events"];
    for (; *shown < events.size(); ++(*shown)) {
      if (!g.json) {
        std::printf("%s  %s\n", events[*shown].value("at", "").c_str(),
                    events[*shown].value("text", "").c_str());
        std::fflush(stdout);
      }
    }
    if (result.value("state", "") != "running") return 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
}

int PlanCommand(const Globals& g, const std::string& op, const std::string& plan_arg,
                const json& options) {
  json request = {{"op", op}};
  std::string name = plan_arg;
  std::error_code ec;
  if (op == "plan-run" || (!plan_arg.empty() && std::filesystem::is_regular_file(plan_arg, ec))) {
    auto parsed = siterep::control::LoadPlan(plan_arg);
    if (!parsed.ok()) {
      std::fprintf(stderr, "siterep: %s\n", parsed.status().message().c_str());
      return 1;
    }
    name = parsed->name;
    if (op == "plan-run") {
      if (options["kind"] == "") {
        std::fprintf(stderr, "siterep: plan run needs --planned, --unplanned or --test\n");
        return 2;
      }
      request["plan"] = siterep::control::PlanToJson(*parsed);
      request["kind"] = options["kind"];
      request["point"] = options["point"];
      request["force"] = options["force"];
    }
  }
  if (op != "plan-run") request["plan"] = name;
  if (op == "plan-run" || op == "plan-continue") request["yes"] = options["yes"];
  json result;
  if (op == "plan-status" && name.empty()) {
    if (int rc = Call(g, request, &result); rc != 0) return rc;
    if (g.json) {
      std::cout << result.dump(2) << "\n";
      return 0;
    }
    if (result["runs"].empty()) std::printf("no plan has run at this site\n");
    for (const json& run : result["runs"]) std::printf("%s\n", siterep::control::PlanRunText(run).c_str());
    return 0;
  }
  if (int rc = Call(g, request, &result); rc != 0) return rc;
  json run = result;
  if ((op == "plan-run" || op == "plan-continue") && !options.value("detach", false)) {
    size_t shown = 0;
    if (op == "plan-continue") shown = run["events"].size() - 1;  // from the confirmation on
    if (int rc = FollowPlan(g, name, &shown, &run); rc != 0) return rc;
  }
  if (g.json) {
    std::cout << run.dump(2) << "\n";
  } else {
    std::printf("%s", siterep::control::PlanRunText(run).c_str());
  }
  if (op == "plan-status" || op == "plan-cancel" || options.value("detach", false)) return 0;
  return PlanExit(run.value("state", ""));
}

void PrintStatus(const json& s) {
  std::printf("site %s (disks at %s)\n", Str(s, "site").c_str(), Str(s, "mountpoint").c_str());
  if (s["vms"].empty()) std::printf("no VMs\n");
  for (const json& vm : s["vms"]) {
    std::printf("\nVM %s  role %s  state %s  health %s  epoch %s  frequency %s\n",
                Str(vm, "name").c_str(), Str(vm, "role").c_str(), Str(vm, "state").c_str(),
                Str(vm, "health").c_str(), Str(vm, "epoch").c_str(), Str(vm, "frequency").c_str());
    if (!vm.value("health_reason", "").empty()) {
      std::printf("  reason: %s\n", vm["health_reason"].get<std::string>().c_str());
    }
    if (vm.value("access", "read-write") != "read-write") {
      std::printf("  disks: %s\n", Str(vm, "access").c_str());
    }
    if (vm.contains("consistency_group")) {
      std::printf("  consistency group %s%s\n", Str(vm, "consistency_group").c_str(),
                  vm.value("apply_held", false)
                      ? ": applying held until every member has the next group instant"
                      : "");
    }
    if (vm.contains("test_failover")) {
      const json& t = vm["test_failover"];
      std::printf("  test failover of point %s at %s/ (%s written)\n", Str(t, "point").c_str(),
                  Str(t, "path").c_str(),
                  siterep::FormatSize(t.value("written_bytes", uint64_t{0})).c_str());
    }
    if (vm.contains("last_operation") && vm["last_operation"].is_object()) {
      const json& op = vm["last_operation"];
      std::printf("  last role change: %s%s%s\n", Str(op, "operation").c_str(),
                  op.contains("finished") ? " at " : "",
                  op.contains("finished") ? Str(op, "finished").c_str() : "");
    }
    if (vm.contains("peer") && !vm["peer"].is_null()) {
      std::string rpo = "-";
      if (vm.contains("rpo_seconds") && vm["rpo_seconds"].is_number()) {
        char buf[32];
        std::snprintf(buf, sizeof(buf), "%.1f s", vm["rpo_seconds"].get<double>());
        rpo = buf;
      }
      std::string point = "none yet";
      if (vm.contains("last_recovery_point") && vm["last_recovery_point"].is_object()) {
        point =
            Str(vm["last_recovery_point"], "id") + " at " + Str(vm["last_recovery_point"], "time");
      }
      std::printf("  %s %s, RPO %s, latest recovery point %s\n",
                  vm.value("role", "") == "replica" ? "replica of" : "replicating to",
                  Str(vm, "peer").c_str(), rpo.c_str(), point.c_str());
      if (vm.contains("link") && vm["link"].is_object()) {
        const json& l = vm["link"];
        std::printf(
            "  link %s, %s/s, compression %.2fx%s%s\n", Str(l, "state").c_str(),
            siterep::FormatSize(static_cast<uint64_t>(l.value("throughput_bytes_per_s", 0.0)))
                .c_str(),
            l.value("compression_ratio", 1.0),
            l.value("last_error", "").empty() ? "" : ", last error: ",
            l.value("last_error", "").c_str());
      }
    }
    std::printf("  last cycle %s at %s, pending %s\n", Str(vm, "last_cycle").c_str(),
                Str(vm, "last_cut").c_str(),
                siterep::FormatSize(vm.value("pending_bytes", uint64_t{0})).c_str());
    std::printf("  %-12s %10s  %-8s %12s %10s  %-20s  %s\n", "DISK", "SIZE", "TRACKING", "PENDING",
                "LAST SEQ", "LAST CUT", "PATH");
    for (const json& d : vm["disks"]) {
      std::printf("  %-12s %10s  %-8s %12s %10s  %-20s  %s\n", Str(d, "name").c_str(),
                  siterep::FormatSize(d.value("size", uint64_t{0})).c_str(),
                  Str(d, "tracking").c_str(),
                  siterep::FormatSize(d.value("pending_bytes", uint64_t{0})).c_str(),
                  Str(d, "last_seq").c_str(), Str(d, "last_cut").c_str(), Str(d, "path").c_str());
      if (d.value("resync_required", false)) {
        std::printf("  %-12s resync required: %s\n", "", Str(d, "resync_reason").c_str());
      }
    }
  }
}

// One line of sync progress: "initial replication 45.2% (1.2 GiB of 2.0 GiB, 350 MiB/s,
// ETA 3 s)".
std::string ProgressText(const json& p) {
  const uint64_t done = p.value("bytes_done", uint64_t{0});
  const uint64_t total = p.value("bytes_total", uint64_t{0});
  const double rate = p.value("rate_bytes_per_s", 0.0);
  char buf[256];
  std::string eta = "-";
  if (p.contains("eta_seconds") && p["eta_seconds"].is_number()) {
    eta = std::to_string(static_cast<long long>(p["eta_seconds"].get<double>() + 0.5)) + " s";
  }
  std::snprintf(buf, sizeof(buf), "%5.1f%% (%s of %s, %s/s, ETA %s)", p.value("percent", 0.0),
                siterep::FormatSize(done).c_str(), siterep::FormatSize(total).c_str(),
                siterep::FormatSize(static_cast<uint64_t>(rate)).c_str(), eta.c_str());
  return buf;
}

// enable --wait / resync --wait: polls the VM's status until the replica has applied every
// cycle that was cut when the wait began. While a sync (initial copy, resync) runs, draws a
// progress bar on a terminal and prints plain progress lines (every 10% or 5 s) otherwise.
// Fails when the peer refuses replication or the VM turns critical.
int WaitCaughtUp(const Globals& g, const std::string& vm) {
  json s;
  if (int rc = Call(g, {{"op", "cut"}, {"vm", vm}}, &s); rc != 0) return rc;
  const uint64_t target = s.value("cycle", uint64_t{0});
  const bool tty = !g.json && ::isatty(STDOUT_FILENO) != 0;
  std::string last_line;
  bool bar_drawn = false;
  double last_percent = -100;
  auto last_print = std::chrono::steady_clock::time_point();
  auto end_bar = [&] {
    if (bar_drawn) std::printf("\n");
    bar_drawn = false;
  };
  for (;;) {
    json status;
    if (int rc = Call(g, {{"op", "status"}, {"vm", vm}}, &status); rc != 0) {
      end_bar();
      return rc;
    }
    const json& v = status["vms"][0];
    const uint64_t applied = v.value("applied_cycle", uint64_t{0});
    const std::string link = v.contains("link") ? v["link"].value("state", "") : "";
    const std::string state = v.value("state", "");
    const bool syncing = state == "initial replication" || state == "resynchronising";
    if (syncing && v.contains("progress") && !g.json) {
      const json& p = v["progress"];
      const double percent = p.value("percent", 0.0);
      const std::string text = state + " " + ProgressText(p);
      if (tty) {
        constexpr int kWidth = 30;
        const int filled = static_cast<int>(percent / 100.0 * kWidth + 0.5);
        std::printf("\r[%s%s] %s\033[K", std::string(std::clamp(filled, 0, kWidth), '#').c_str(),
                    std::string(kWidth - std::clamp(filled, 0, kWidth), '.').c_str(), text.c_str());
        std::fflush(stdout);
        bar_drawn = true;
      } else {
        const auto now = std::chrono::steady_clock::now();
        if (percent - last_percent >= 10 || now - last_print >= std::chrono::seconds(5)) {
          std::printf("VM %s: %s\n", vm.c_str(), text.c_str());
          std::fflush(stdout);
          last_percent = percent;
          last_print = now;
        }
      }
    } else {
      end_bar();
      char line[256];
      std::snprintf(line, sizeof(line), "VM %s: %s, link %s, applied cycle %llu of %llu, pending %s",
                    vm.c_str(), state.c_str(), link.c_str(), static_cast<unsigned long long>(applied),
                    static_cast<unsigned long long>(target),
                    siterep::FormatSize(v.value("pending_bytes", uint64_t{0})).c_str());
      if (line != last_line && !g.json) std::printf("%s\n", line);
      last_line = line;
    }
    if (link == "refused" || v.value("health", "") == "critical") {
      end_bar();
      std::fprintf(stderr, "siterep: %s\n",
                   v.value("health_reason", std::string("replication stopped")).c_str());
      return 1;
    }
    if (link == "connected" && !syncing && applied >= target) {
      end_bar();
      if (g.json)
        std::cout << v.dump(2) << "\n";
      else
        std::printf("VM %s: the replica at %s is at recovery point %llu\n", vm.c_str(),
                    Str(v, "peer").c_str(), static_cast<unsigned long long>(applied));
      return 0;
    }
    ::usleep(tty ? 200 * 1000 : 500 * 1000);
  }
}

// "64KiB", "1MiB", "512B": a range length in the verify report.
std::string LengthText(uint64_t n) {
  if (n != 0 && n % (uint64_t{1} << 20) == 0) return std::to_string(n >> 20) + "MiB";
  if (n != 0 && n % 1024 == 0) return std::to_string(n >> 10) + "KiB";
  return std::to_string(n) + "B";
}

// One disk of `siterep verify`: "os: 4096 blocks, equal" or
// "os: 3 blocks differ: 0x30000+64KiB, 0x5000000+128KiB".
std::string VerifyLine(const json& d) {
  const uint64_t differ = d.value("differing_blocks", uint64_t{0});
  std::string line = Str(d, "name") + ": ";
  if (differ == 0) return line + Str(d, "blocks") + " blocks, equal";
  line += std::to_string(differ) + (differ == 1 ? " block differs: " : " blocks differ: ");
  size_t listed = 0;
  for (const json& r : d.value("ranges", json::array())) {
    char at[32];
    std::snprintf(at, sizeof at, "0x%llx",
                  static_cast<unsigned long long>(r.value("offset", uint64_t{0})));
    line += (listed++ == 0 ? "" : ", ") + std::string(at) + "+" +
            LengthText(r.value("length", uint64_t{0}));
  }
  const uint64_t total = d.value("range_count", uint64_t{listed});
  if (total > listed) line += " and " + std::to_string(total - listed) + " more ranges";
  return line;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"siterep: replication of VM disks between two sites"};
  app.require_subcommand(1);
  Globals g;
  auto* sock_opt = app.add_option("--socket", g.socket, "siterepd's control socket");
  app.add_option("-c,--config", g.config, "site configuration, to find the control socket")
      ->excludes(sock_opt);
  app.add_flag("--json", g.json, "machine-readable output");

  std::string vm;
  auto* status = app.add_subcommand("status", "roles, state, health, lag and disks");
  status->add_option("VM", vm, "only this VM");
  status->add_flag("--json", g.json, "machine-readable output");

  auto* cut = app.add_subcommand("cut", "end the current replication cycle of a VM now");
  cut->add_option("VM", vm, "the VM")->required();
  cut->add_flag("--json", g.json, "machine-readable output");

  std::string to;
  bool wait = false;
  auto* enable = app.add_subcommand("enable", "start replicating a VM to a peer site");
  enable->add_option("VM", vm, "the VM")->required();
  enable->add_option("--to", to, "the replica site (one of [[peers]])")->required();
  enable->add_flag("--wait", wait, "wait until the replica has caught up (progress bar)");
  bool seed = false;
  enable->add_flag("--seed", seed,
                   "the replica site already holds an older copy of the disks (restored from "
                   "backup, carried on media): compare block hashes, send only what differs");
  enable->add_flag("--json", g.json, "machine-readable output");

  auto* pause =
      app.add_subcommand("pause", "stop shipping a VM's changes (they keep being logged)");
  pause->add_option("VM", vm, "the VM")->required();
  pause->add_flag("--json", g.json, "machine-readable output");
  auto* resume = app.add_subcommand("resume", "ship a paused VM's changes again");
  resume->add_option("VM", vm, "the VM")->required();
  resume->add_flag("--json", g.json, "machine-readable output");
  auto* resync = app.add_subcommand(
      "resync", "bring a VM's replica in line again after tracking was lost (at the primary)");
  resync->add_option("VM", vm, "the VM")->required();
  bool full = false, resync_wait = false;
  resync->add_flag("--full", full, "compare every block, not only the ones known to be dirty");
  resync->add_flag("--wait", resync_wait, "wait until the replica has caught up (progress bar)");
  resync->add_flag("--json", g.json, "machine-readable output");

  auto* verify = app.add_subcommand(
      "verify", "compare a VM's disks with its replica block by block (64 KiB hashes, at one "
                "cycle, while the guest writes on; at the primary site). Exit code 0: every "
                "block is equal; 1: blocks differ (listed) or refused");
  verify->add_option("VM", vm, "the VM")->required();
  verify->add_flag("--json", g.json, "machine-readable output");

  auto* points =
      app.add_subcommand("points", "list a replica's recovery points (at the replica site)");
  points->add_option("VM", vm, "the VM")->required();
  points->add_flag("--json", g.json, "machine-readable output");

  std::string disk, out_file;
  uint64_t point = 0;
  auto* exp = app.add_subcommand(
      "export", "write a disk as of a recovery point to a file (at the replica site)");
  exp->add_option("VM", vm, "the VM")->required();
  exp->add_option("DISK", disk, "the disk")->required();
  exp->add_option("FILE", out_file, "where to write it")->required();
  exp->add_option("--point", point, "recovery point id (siterep points VM)")->required();
  exp->add_flag("--json", g.json, "machine-readable output");

  bool planned = false, unplanned = false, force = false;
  std::string point_text;
  auto* failover = app.add_subcommand(
      "failover", "move a VM to its other site: --planned at the primary, --unplanned at the "
                  "replica when the primary is lost");
  failover->add_option("VM", vm, "the VM")->required();
  auto* planned_flag = failover->add_flag(
      "--planned", planned, "run pre_failover, ship every change, then the replica takes over");
  failover->add_flag("--unplanned", unplanned,
                     "bring the replica up at a recovery point (the primary is unreachable)")
      ->excludes(planned_flag);
  failover->add_option("--point", point_text,
                       "--unplanned: recovery point id or latest (default latest)");
  failover->add_flag("--force", force, "--unplanned: even while the primary answers");
  failover->add_flag("--json", g.json, "machine-readable output");

  auto* commit = app.add_subcommand(
      "commit", "keep an unplanned failover's state; drops the other recovery points");
  commit->add_option("VM", vm, "the VM")->required();
  commit->add_flag("--json", g.json, "machine-readable output");
  bool reverse_wait = false;
  auto* reverse = app.add_subcommand(
      "reverse", "make the old primary the replica of this site (after a failover)");
  reverse->add_option("VM", vm, "the VM")->required();
  reverse->add_flag("--wait", reverse_wait, "wait until the replica is in line (progress bar)");
  reverse->add_flag("--json", g.json, "machine-readable output");
  auto* failback = app.add_subcommand(
      "failback", "reverse replication, planned failover back, reverse again: the original "
                  "site runs the VM, protected (run where the VM runs now)");
  failback->add_option("VM", vm, "the VM")->required();
  failback->add_flag("--json", g.json, "machine-readable output");
  std::string test_action;
  auto* test = app.add_subcommand(
      "test-failover", "a writable copy of a recovery point at the replica site, while "
                       "replication goes on: start [--point ID] | stop");
  test->add_option("VM", vm, "the VM")->required();
  test->add_option("ACTION", test_action, "start or stop")
      ->required()
      ->check(CLI::IsMember({"start", "stop"}));
  test->add_option("--point", point_text, "recovery point id or latest (default latest)");
  test->add_flag("--json", g.json, "machine-readable output");

  auto* plan = app.add_subcommand("plan", "recovery plans: many VMs failed over in order");
  plan->require_subcommand(1);
  std::string plan_file;
  bool plan_force = false;
  auto* plan_validate = plan->add_subcommand(
      "validate", "check a plan file, and what this site knows of its VMs, without running it");
  plan_validate->add_option("PLAN", plan_file, "the plan (TOML)")->required();
  plan_validate->add_flag("--force", plan_force, "accept VMs whose replication is critical");
  plan_validate->add_flag("--json", g.json, "machine-readable output");
  bool plan_planned = false, plan_unplanned = false, plan_test = false, plan_yes = false;
  bool plan_detach = false;
  std::string plan_point;
  auto* plan_run = plan->add_subcommand(
      "run", "run a plan: a planned run at the from site, an unplanned or test run at the to site");
  plan_run->add_option("PLAN", plan_file, "the plan (TOML)")->required();
  auto* run_planned = plan_run->add_flag("--planned", plan_planned,
                                         "shut down, ship everything, then fail over: no data lost");
  auto* run_unplanned =
      plan_run->add_flag("--unplanned", plan_unplanned, "the from site is lost: each VM's latest "
                                                        "recovery point (a consistency group's "
                                                        "common one)");
  auto* run_test = plan_run->add_flag("--test", plan_test,
                                      "test copies of every VM at the to site; replication goes on");
  run_planned->excludes(run_unplanned)->excludes(run_test);
  run_unplanned->excludes(run_test);
  plan_run->add_option("--point", plan_point, "--unplanned/--test: latest (default) or a point id");
  plan_run->add_flag("--yes", plan_yes, "confirm the plan's manual steps without pausing");
  plan_run->add_flag("--force", plan_force, "accept VMs whose replication is critical");
  plan_run->add_flag("--detach", plan_detach, "start the run and return; follow it with plan status");
  plan_run->add_flag("--json", g.json, "machine-readable report");
  std::string plan_name;
  auto* plan_status = plan->add_subcommand("status", "where the runs of plans stand, with reports");
  plan_status->add_option("PLAN", plan_name, "a plan name or file (default: every run)");
  plan_status->add_flag("--json", g.json, "machine-readable output");
  auto* plan_continue = plan->add_subcommand(
      "continue", "confirm the manual step a run waits for, or retry the step that failed");
  plan_continue->add_option("PLAN", plan_name, "a plan name or file")->required();
  plan_continue->add_flag("--yes", plan_yes, "confirm the later manual steps too");
  plan_continue->add_flag("--json", g.json, "machine-readable report");
  auto* plan_cancel = plan->add_subcommand("cancel", "stop a run after the step under way");
  plan_cancel->add_option("PLAN", plan_name, "a plan name or file")->required();
  auto* plan_cleanup =
      plan->add_subcommand("cleanup", "remove the test copies of a plan's test run");
  plan_cleanup->add_option("PLAN", plan_name, "a plan name or file")->required();

  std::string spec;
  bool fp_list = false;
  auto* fp = app.add_subcommand("failpoint", "arm failpoints in the daemon (tests)");
  auto* fp_spec = fp->add_option("SPEC", spec, "name=abort|error|trigger|off[@skip][*count],...");
  fp->add_flag("--list", fp_list, "list the failpoints this build knows (no daemon asked)")
      ->excludes(fp_spec);
  fp->require_option(1);
  fp->group("");  // not listed in --help: a testing aid

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }

  json result;
  if (status->parsed()) {
    json req = {{"op", "status"}};
    if (!vm.empty()) req["vm"] = vm;
    if (int rc = Call(g, req, &result); rc != 0) return rc;
    if (g.json)
      std::cout << result.dump(2) << "\n";
    else
      PrintStatus(result);
    return 0;
  }
  if (cut->parsed()) {
    if (int rc = Call(g, {{"op", "cut"}, {"vm", vm}}, &result); rc != 0) return rc;
    if (g.json)
      std::cout << result.dump(2) << "\n";
    else
      std::printf("VM %s cut at cycle %s\n", vm.c_str(), result["cycle"].dump().c_str());
    return 0;
  }
  if (resync->parsed()) {
    if (int rc = Call(g, {{"op", "resync"}, {"vm", vm}, {"full", full}}, &result); rc != 0) {
      return rc;
    }
    if (resync_wait) return WaitCaughtUp(g, vm);
    if (g.json)
      std::cout << result.dump(2) << "\n";
    else
      std::printf("VM %s: resynchronisation started\n", vm.c_str());
    return 0;
  }
  if (enable->parsed()) {
    if (int rc = Call(g, {{"op", "enable"}, {"vm", vm}, {"to", to}, {"seed", seed}}, &result);
        rc != 0) {
      return rc;
    }
    if (!wait) {
      if (g.json)
        std::cout << result.dump(2) << "\n";
      else
        std::printf("VM %s: replication to %s enabled\n", vm.c_str(), to.c_str());
      return 0;
    }
    return WaitCaughtUp(g, vm);
  }
  if (pause->parsed() || resume->parsed()) {
    const char* op = pause->parsed() ? "pause" : "resume";
    if (int rc = Call(g, {{"op", op}, {"vm", vm}}, &result); rc != 0) return rc;
    if (g.json)
      std::cout << result.dump(2) << "\n";
    else
      std::printf("VM %s: replication %s\n", vm.c_str(), pause->parsed() ? "paused" : "resumed");
    return 0;
  }
  if (verify->parsed()) {
    if (int rc = Call(g, {{"op", "verify"}, {"vm", vm}}, &result); rc != 0) return rc;
    const bool equal = result.value("equal", false);
    if (g.json) {
      std::cout << result.dump(2) << "\n";
    } else {
      std::printf("VM %s: compared with %s at cycle %s (%s)\n", vm.c_str(),
                  Str(result, "peer").c_str(), Str(result, "cycle").c_str(),
                  Seconds(result.value("seconds", 0.0)).c_str());
      for (const json& d : result["disks"]) std::printf("%s\n", VerifyLine(d).c_str());
      if (!equal) std::printf("next: %s\n", Str(result, "next").c_str());
    }
    if (!equal) {
      std::fprintf(stderr, "siterep: VM %s: %s blocks differ from the replica at %s\n", vm.c_str(),
                   Str(result, "differing_blocks").c_str(), Str(result, "peer").c_str());
    }
    return equal ? 0 : 1;
  }
  if (points->parsed()) {
    if (int rc = Call(g, {{"op", "points"}, {"vm", vm}}, &result); rc != 0) return rc;
    if (g.json) {
      std::cout << result.dump(2) << "\n";
      return 0;
    }
    std::printf("%-10s  %-24s  %-10s  %s\n", "ID", "TIME", "CONSISTENT", "");
    for (const json& p : result["points"]) {
      std::printf("%-10s  %-24s  %-10s  %s\n", Str(p, "id").c_str(), Str(p, "time").c_str(),
                  p.value("consistent", false) ? "all disks" : "no",
                  p.value("latest", false) ? "latest" : "");
    }
    return 0;
  }
  if (exp->parsed()) {
    std::error_code ec;
    std::string abs = std::filesystem::absolute(out_file, ec).string();
    if (int rc =
            Call(g, {{"op", "export"}, {"vm", vm}, {"disk", disk}, {"point", point}, {"out", abs}},
                 &result);
        rc != 0) {
      return rc;
    }
    if (g.json)
      std::cout << result.dump(2) << "\n";
    else
      std::printf("VM %s disk %s at point %llu written to %s\n", vm.c_str(), disk.c_str(),
                  static_cast<unsigned long long>(point), abs.c_str());
    return 0;
  }
  auto point_value = [&]() -> json {
    if (point_text.empty() || point_text == "latest") return "latest";
    return point_text;
  };
  auto print = [&](const std::string& line) {
    if (g.json)
      std::cout << result.dump(2) << "\n";
    else
      std::cout << line << "\n";
  };
  if (failover->parsed()) {
    if (!planned && !unplanned) {
      std::fprintf(stderr, "siterep: failover needs --planned or --unplanned\n");
      return 2;
    }
    json req = {{"op", "failover"}, {"vm", vm}, {"kind", planned ? "planned" : "unplanned"}};
    if (unplanned) {
      req["point"] = point_value();
      req["force"] = force;
    }
    if (int rc = Call(g, req, &result); rc != 0) return rc;
    if (planned) {
      print(Str(result, "result") + " (" +
            Seconds(result.value("seconds", 0.0)) + ", disks writable after " +
            Seconds(result.value("rto_seconds", 0.0)) + ")");
    } else if (result.value("unchanged", false)) {
      print("VM " + vm + " runs at recovery point " + Str(result, "point") + " already");
    } else if (result.contains("warning")) {
      print("VM " + vm + " now runs at recovery point " + Str(result, "point") + " (" +
            Str(result, "time") + "); warning: " + Str(result, "warning"));
    } else {
      print("VM " + vm + " runs here at recovery point " + Str(result["point"], "id") + " (" +
            Str(result["point"], "time") + "), epoch " + Str(result, "epoch") +
            ". Not protected: siterep commit " + vm + ", then siterep reverse " + vm);
    }
    for (const char* hook : {"pre_failover", "post_failover"}) {
      if (!g.json && result.contains(hook) && !result[hook].is_null() &&
          result[hook].value("exit_code", 0) != 0) {
        std::fprintf(stderr, "siterep: warning: %s hook exited with %d\n", hook,
                     result[hook].value("exit_code", 0));
      }
    }
    return 0;
  }
  if (commit->parsed()) {
    if (int rc = Call(g, {{"op", "commit"}, {"vm", vm}}, &result); rc != 0) return rc;
    print("VM " + vm + ": failover to recovery point " + Str(result, "point") +
          " committed; next: " + Str(result, "next"));
    return 0;
  }
  if (reverse->parsed()) {
    if (int rc = Call(g, {{"op", "reverse"}, {"vm", vm}}, &result); rc != 0) return rc;
    if (reverse_wait) return WaitCaughtUp(g, vm);
    print("VM " + vm + ": " + Str(result, "result"));
    return 0;
  }
  if (failback->parsed()) {
    if (int rc = Call(g, {{"op", "failback"}, {"vm", vm}}, &result); rc != 0) return rc;
    if (g.json) {
      std::cout << result.dump(2) << "\n";
      return 0;
    }
    int n = 1;
    for (const json& step : result["steps"]) {
      std::printf("%d. %s: %s\n", n++, Str(step, "step").c_str(), Str(step, "result").c_str());
    }
    return 0;
  }
  if (test->parsed()) {
    json req = {{"op", "test-failover"}, {"vm", vm}, {"action", test_action}};
    if (test_action == "start") req["point"] = point_value();
    if (int rc = Call(g, req, &result); rc != 0) return rc;
    if (test_action == "start") {
      print("VM " + vm + ": test copy of recovery point " + Str(result["point"], "id") + " (" +
            Str(result["point"], "time") + ") at " + Str(result, "path") +
            "/; replication goes on");
    } else {
      print("VM " + vm + ": test failover stopped, its writes discarded");
    }
    return 0;
  }
  if (plan_validate->parsed()) {
    auto parsed = siterep::control::LoadPlan(plan_file);
    if (!parsed.ok()) {
      std::fprintf(stderr, "siterep: %s\n", parsed.status().message().c_str());
      return 1;
    }
    json req = {{"op", "plan-validate"},
                {"plan", siterep::control::PlanToJson(*parsed)},
                {"force", plan_force}};
    if (int rc = Call(g, req, &result); rc != 0) return rc;
    if (g.json) {
      std::cout << result.dump(2) << "\n";
      return 0;
    }
    std::printf("plan %s: valid at %s (%zu groups)\n", Str(result, "plan").c_str(),
                Str(result, "site").c_str(), result["groups"].get<size_t>());
    for (const json& v : result["vms"]) {
      std::printf("  %-10s %-12s %-8s %-20s %s\n", Str(v, "group").c_str(), Str(v, "vm").c_str(),
                  Str(v, "role").c_str(), Str(v, "state").c_str(), Str(v, "health").c_str());
    }
    return 0;
  }
  if (plan_run->parsed() || plan_status->parsed() || plan_continue->parsed() ||
      plan_cancel->parsed() || plan_cleanup->parsed()) {
    return PlanCommand(g, plan_run->parsed()        ? "plan-run"
                          : plan_status->parsed()   ? "plan-status"
                          : plan_continue->parsed() ? "plan-continue"
                          : plan_cancel->parsed()   ? "plan-cancel"
                                                    : "plan-cleanup",
                       plan_run->parsed() ? plan_file : plan_name,
                       {{"kind", plan_planned ? "planned" : plan_unplanned ? "unplanned"
                                                  : plan_test            ? "test"
                                                                         : ""},
                        {"point", plan_point.empty() ? "latest" : plan_point},
                        {"yes", plan_yes},
                        {"force", plan_force},
                        {"detach", plan_detach}});
  }
  if (fp->parsed()) {
    if (fp_list) {
      for (const siterep::failpoint::KnownPoint& k : siterep::failpoint::KnownPoints()) {
        std::printf("%-36.*s %.*s\n", static_cast<int>(k.name.size()), k.name.data(),
                    static_cast<int>(k.where.size()), k.where.data());
      }
      return 0;
    }
    if (int rc = Call(g, {{"op", "failpoint"}, {"spec", spec}}, &result); rc != 0) return rc;
    std::cout << result.dump() << "\n";
    return 0;
  }
  return 2;
}
