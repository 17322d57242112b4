// siterep: the operator's command line. Talks to siterepd only through the control
// socket (common/control_client.h). Exit codes: 0 done, 1 refused or failed (one line on
// stderr), 2 usage.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/config.h"
#include "common/control_client.h"
#include "common/units.h"

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

std::string Str(const json& j, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return "-";
  if (j[key].is_string()) return j[key].get<std::string>().empty() ? "-" : j[key].get<std::string>();
  return j[key].dump();
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
    if (g.json) std::cout << result.dump(2) << "\n";
    else PrintStatus(result);
    return 0;
  }
  if (cut->parsed()) {
    if (int rc = Call(g, {{"op", "cut"}, {"vm", vm}}, &result); rc != 0) return rc;
    if (g.json) std::cout << result.dump(2) << "\n";
    else std::printf("VM %s cut at cycle %s\n", vm.c_str(), result["cycle"].dump().c_str());
    return 0;
  }
  return 2;
}
