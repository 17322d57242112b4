// Outbound: the primary side of replicating one VM — the persisted choice of peer (made by
// `siterep enable VM --to SITE`), pause/resume, the shipper that sends the VM's sealed
// change-log segments to the peer, and the VM's replication status (RPO, lag, health).
//
// The settings live in <state_dir>/vms/<vm>/replication.json ({"peer": ..., "paused": ...}),
// written before the shipper starts, so a restarted daemon resumes replication by itself.
// Owned by the Daemon, one per protected VM; methods are thread-safe (the control socket
// thread and the monitor thread call them).
#pragma once

#include <filesystem>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>

#include "common/config.h"
#include "common/status.h"
#include "control/health.h"
#include "control/protected_disk.h"
#include "shipper/shipper.h"
#include "shipper/tls.h"

namespace siterep::control {

struct ReplicationSettings {
  std::string peer;  // empty: replication not enabled
  bool paused = false;
};

class Outbound {
 public:
  // vm and config outlive the Outbound. tls may be null (no [tls]: enable is refused).
  Outbound(const SiteConfig& site, ProtectedVm* vm, std::shared_ptr<const shipper::TlsContext> tls);
  ~Outbound();

  // Reads replication.json and, when replication is enabled, starts the shipper.
  Status Load();
  // `siterep enable VM --to peer`: refuses a VM that is already replicated, an unknown
  // peer, an untracked VM or a site without certificates; persists, then starts shipping.
  Status Enable(const std::string& peer);
  Status Pause();
  Status Resume();
  void Stop();  // stops the shipper (daemon shutdown); settings stay

  bool enabled() const;
  // Called about once a second: feeds the health monitor.
  void Tick(int64_t now_nanos);
  // Fills the replication fields of the VM's status object.
  void Report(int64_t now_nanos, nlohmann::json* vm_status) const;

 private:
  Status Persist(const ReplicationSettings& s) const;
  Status StartShipper();  // mu_ held
  std::optional<double> RpoSeconds(int64_t now_nanos, const shipper::ShipperStats& st) const;

  const SiteConfig& site_;
  ProtectedVm* const vm_;
  const std::shared_ptr<const shipper::TlsContext> tls_;
  const std::filesystem::path file_;
  HealthMonitor monitor_;

  mutable std::mutex mu_;  // protects settings_ and shipper_ (not the shipper's inside)
  ReplicationSettings settings_;
  std::unique_ptr<shipper::Shipper> shipper_;
  int64_t link_down_since_nanos_ = 0;  // written by Tick
};

}  // namespace siterep::control
