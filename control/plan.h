// Recovery plans: the file that says how many VMs fail over together, and in what order.
//
// A plan names the site the VMs run at now (from) and the site that takes them over (to),
// then groups of VMs, failed over one group after another. Around each group it may run
// commands (pre before the group's VMs fail over, post after) at either site, and pause
// for a person (manual, after post) until `siterep plan continue`. The file is TOML:
//
//   name = "east-outage"
//   from = "east"
//   to = "west"
//   [[groups]]
//   name = "databases"
//   vms = ["db1"]
//     [[groups.pre]]              # in order; also [[groups.post]]
//     site = "west"               # from or to
//     run = "/usr/local/bin/check-storage"
//     timeout = "60s"             # default 5m
//     [[groups.manual]]
//     message = "Confirm that the database accepts connections"
//
// This module checks what the file alone can tell: every key (an unknown key is refused),
// the types, valid names (letters, digits, '-', '_', '.'; at most 64), at least one group,
// at least one VM per group, unique group names, no VM in two groups, from != to, every
// action's site is from or to, positive timeouts. It does not know which VMs exist or are
// replicated; the daemon checks that before it starts a plan.
//
// Every problem found is reported, not only the first: the Status (EINVAL) message has one
// line per problem, "<file>: <key>: <reason>", e.g.
//   "plan.toml: groups[1].pre[0].timeout: must be positive". A TOML syntax error is one
// line, "<file>:<line>:<column>: <reason>".
//
// The CLI reads the file (LoadPlan) and sends the plan to the daemon as JSON (PlanToJson);
// the daemon validates it again on the way in (PlanFromJson), with the same rules.
// Value types and free functions; thread-compatible.
#pragma once

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace siterep::control {

// A command run with sh -c at one of the plan's two sites.
struct PlanAction {
  std::string site;  // the plan's from or to
  std::string run;
  std::chrono::milliseconds timeout{300'000};  // positive
  bool operator==(const PlanAction&) const = default;
};

// A pause until an operator continues the run (or the run was started with --yes).
struct PlanManual {
  std::string message;
  bool operator==(const PlanManual&) const = default;
};

// VMs failed over together: pre (in order), the VMs, post (in order), then manual.
struct PlanGroup {
  std::string name;
  std::vector<std::string> vms;  // at least one; a VM is in one group of a plan only
  std::vector<PlanAction> pre, post;
  std::vector<PlanManual> manual;
  bool operator==(const PlanGroup&) const = default;
};

struct RecoveryPlan {
  std::filesystem::path source;   // where the plan was read from (LoadPlan: absolute)
  std::string name, from, to;     // from != to
  std::vector<PlanGroup> groups;  // at least one, names unique; run in this order
  bool operator==(const RecoveryPlan&) const = default;
};

// Parses and checks a plan written in TOML. source names the text in messages and becomes
// plan.source.
Result<RecoveryPlan> ParsePlan(std::string_view text, std::string_view source);
// Reads path and parses it; plan.source is the absolute path, messages name path as given.
Result<RecoveryPlan> LoadPlan(const std::filesystem::path& path);

// {"name", "from", "to", "source", "groups": [{"name", "vms": [...],
//   "pre"/"post": [{"site", "run", "timeout_ms"}], "manual": [{"message"}]}]}.
// PlanFromJson(PlanToJson(p)) == p for every valid p.
nlohmann::json PlanToJson(const RecoveryPlan& plan);
// The inverse of PlanToJson, with every check ParsePlan makes; unknown keys and wrong types
// are refused (never thrown), every problem reported at once as in ParsePlan, the lines
// starting with "plan JSON from <source>" (or "plan JSON" without a source). "source",
// "pre", "post", "manual" and "timeout_ms" may be left out (empty, none, 5 min).
Result<RecoveryPlan> PlanFromJson(const nlohmann::json& json);

// The report of a plan run (the daemon's run document, `siterep plan status --json`) as
// text: the run's state, then per group its actions (exit code, time, last output line),
// its VMs (state, RTO, recovery point, data-loss window, hooks) and manual steps, then
// what failed or what the run waits for.
std::string PlanRunText(const nlohmann::json& run);

}  // namespace siterep::control
