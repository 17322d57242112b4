// Daemon: siterepd's wiring. Reads the site config, opens every protected VM (images,
// locks, trackers), mounts the FUSE file system, opens the replicas this site holds and
// listens for peers (Inbound), resumes shipping the VMs it replicates (Outbound), and
// serves the control socket.
//
// Start-up order matters to users and tests: the control socket appears only once the
// disks are mounted and replication is set up, so "siterep status succeeds" means "the
// disks are usable". Shutdown runs the other way: the socket goes first, then the
// shippers and the receiver, then the mount (requests drained), then the trackers are
// closed (logs cut, sealed and synced), then the images are unlocked.
// Threads: Run() on the main thread (the FUSE loop); RequestStop() from any thread; a
// monitor thread samples replication health once a second.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

#include "blockdev/fuse_fs.h"
#include "common/config.h"
#include "common/status.h"
#include "control/control_server.h"
#include "control/inbound.h"
#include "control/outbound.h"
#include "control/protected_disk.h"

namespace siterep::control {

struct DaemonOptions {
  // Benchmarks only: release sealed segments at once, like a shipper to nowhere, so the
  // log stays within its budget during long runs without a peer.
  bool discard_sealed = false;
  // Tests and checkers: released (shipped) log segments are moved to
  // <archive_logs>/<vm>/<disk>/ instead of being deleted.
  std::filesystem::path archive_logs;
};

class Daemon {
 public:
  static Result<std::unique_ptr<Daemon>> Start(SiteConfig config, DaemonOptions options);
  ~Daemon();

  // Serves until RequestStop() or an external unmount; then shuts down in order.
  Status Run();
  void RequestStop();

  // The reply to {"op": "status"}; public for tests.
  nlohmann::json StatusReport(const std::string& vm_filter) const;

 private:
  Daemon(SiteConfig config, DaemonOptions options);
  nlohmann::json Handle(const nlohmann::json& request);
  nlohmann::json HandleVmOp(const std::string& op, const std::string& vm,
                            const nlohmann::json& request);
  void DiscardLoop();
  void MonitorLoop();
  siterep::Status Shutdown();

  SiteConfig config_;
  DaemonOptions options_;
  std::vector<std::unique_ptr<ProtectedVm>> vms_;
  std::shared_ptr<const shipper::TlsContext> tls_;   // null without [tls]
  std::vector<std::unique_ptr<Outbound>> outbound_;  // one per entry of vms_, same order
  std::unique_ptr<Inbound> inbound_;
  std::unique_ptr<blockdev::FuseFs> fuse_;
  ControlServer control_;

  std::mutex stop_mu_;  // protects stopping_; leaf lock
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::thread discard_thread_;
  std::thread monitor_thread_;
};

}  // namespace siterep::control
