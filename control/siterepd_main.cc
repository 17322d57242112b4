// siterepd: the siterep daemon, one per host. Foreground; logs to stderr; SIGTERM or
// SIGINT stops it cleanly (requests drained, logs synced, mount removed).
#include <signal.h>
#include <spdlog/fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <thread>

#include "common/config.h"
#include "common/failpoint.h"
#include "common/logging.h"
#include "control/daemon.h"

int main(int argc, char** argv) {
  CLI::App app{"siterepd: block replication daemon for VM disks"};
  std::string config_path;
  std::string log_level = "info";
  siterep::control::DaemonOptions options;
  app.add_option("-c,--config", config_path, "site configuration (TOML)")->required();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
  app.add_flag("--discard-sealed", options.discard_sealed,
               "benchmarks only: read each sealed segment and drop it (no replication)");
  std::string archive;
  app.add_option("--archive-logs", archive,
                 "tests and checkers: write each shipped segment to DIR/<vm>/<disk>/ "
                 "(same file system as the images)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  siterep::SetupLogging(log_level);
  options.archive_logs = archive;
  if (siterep::Status fp = siterep::failpoint::ArmFromEnvironment(); !fp.ok()) {
    std::fprintf(stderr, "siterepd: %s\n", fp.message().c_str());
    return 2;
  }
  if (!siterep::failpoint::Armed().empty()) {
    spdlog::warn("failpoints armed: {}", fmt::join(siterep::failpoint::Armed(), ", "));
  }

  auto config = siterep::LoadConfig(config_path);
  if (!config.ok()) {
    std::fprintf(stderr, "siterepd: %s\n", config.status().message().c_str());
    return 1;
  }

  // Signals are taken by one thread with sigwait, never by a handler running inside a
  // FUSE or io_uring thread. Block them before any thread starts so all inherit the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto daemon = siterep::control::Daemon::Start(std::move(config).value(), options);
  if (!daemon.ok()) {
    std::fprintf(stderr, "siterepd: %s\n", daemon.status().message().c_str());
    return 1;
  }
  siterep::control::Daemon* d = daemon->get();
  std::thread signal_thread([d, signals] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (sig != 0) spdlog::info("signal {}: stopping", sig);
    d->RequestStop();
  });

  siterep::Status status = d->Run();
  // Wake the signal thread if the loop ended for another reason (external unmount).
  pthread_kill(signal_thread.native_handle(), SIGTERM);
  signal_thread.join();
  daemon->reset();
  if (!status.ok()) {
    spdlog::error("stopped with error: {}", status.message());
    return 1;
  }
  spdlog::info("stopped cleanly");
  return 0;
}
