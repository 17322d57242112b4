// Failover hooks: the operator's commands run around a failover (common/config.h,
// FailoverHooks), e.g. shutting the VM down before a planned failover and starting it at
// the new primary afterwards.
//
// A hook runs as `/bin/sh -c COMMAND` in its own process group, with stdin from /dev/null
// and stdout+stderr captured together. Environment: SITEREP_VM, SITEREP_SITE,
// SITEREP_EVENT ("pre_failover" | "post_failover"), SITEREP_MOUNTPOINT (where the VM's
// disks appear: <mountpoint>/<vm>/<disk>). On timeout the whole group gets SIGTERM, then
// SIGKILL 5 s later.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace siterep::control {

struct HookResult {
  bool ran = false;  // false: no hook configured (everything else is empty)
  std::string command;
  int exit_code = 0;       // the shell's exit status; 128 + N when killed by signal N
  bool timed_out = false;  //
  std::string output;      // the last 16 KiB of stdout+stderr
  double seconds = 0;

  bool ok() const { return !ran || (!timed_out && exit_code == 0); }
  // "hook 'cmd' exited with 3: <last line of output>" and the like; "" when ok().
  std::string Failure() const;
  nlohmann::json ToJson() const;
  // The inverse of ToJson (a hook run at the peer site); missing fields keep their defaults.
  static HookResult FromJson(const nlohmann::json& json);
};

struct HookContext {
  std::string vm;  // empty for a plan's action
  std::string site;
  std::string event;
  std::string mountpoint;
  std::vector<std::string> extra_env;  // more "SITEREP_NAME=value" (recovery plans)
  std::string who;  // names the hook's owner in the log: "VM <vm>" when empty
};

// Runs command (nothing when empty) and waits for it or the timeout.
HookResult RunHook(const std::string& command, const HookContext& context,
                   std::chrono::milliseconds timeout);

}  // namespace siterep::control
