// Outbound: the primary side of replicating one VM — the persisted choice of peer (made by
// `siterep enable VM --to SITE`), pause/resume, the shipper that sends the VM's sealed
// change-log segments to the peer, and the VM's replication status (RPO, lag, health).
//
// The settings live in <state_dir>/vms/<vm>/replication.json ({"peer": ..., "paused": ...}),
// written before the shipper starts, so a restarted daemon resumes replication by itself.
//
// Syncs (initial replication, seeded enable, resync): the Outbound is the shipper's
// SyncSource. A sync owed to the replica is persisted in <state_dir>/vms/<vm>/sync.json
// ({"kind", "full"}) before the tracker's snapshot is taken, and deleted once the replica
// holds the snapshot. The snapshot itself does not survive a restart: a restarted daemon
// takes a new one and the sync starts again, the replica telling how far it got (blocks it
// already holds are compared, not sent). An interrupted resync starts again as a full
// comparison (its dirty-block set was in memory).
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
#include "control/role.h"
#include "shipper/shipper.h"
#include "shipper/tls.h"

namespace siterep::control {

struct ReplicationSettings {
  std::string peer;  // empty: replication not enabled
  bool paused = false;
};

// The "progress" object of `siterep status` when no sync runs.
nlohmann::json IdleProgress();

class Outbound : public shipper::SyncSource {
 public:
  // vm and config outlive the Outbound. tls may be null (no [tls]: enable is refused).
  Outbound(const SiteConfig& site, ProtectedVm* vm, std::shared_ptr<const shipper::TlsContext> tls);
  ~Outbound() override;

  // Reads replication.json and, when replication is enabled, starts the shipper.
  Status Load();
  // `siterep enable VM --to peer`: refuses a VM that is already replicated, an unknown
  // peer, an untracked VM or a site without certificates; persists, then starts shipping.
  // kind: kInitial copies, kSeeded compares every block, kResync with full (reverse
  // replication onto an old primary's images) compares every block too.
  // compare (kResync only): the blocks that may differ, by disk name (reverse replication:
  // both sides' changes since the fork); the snapshot's own dirty blocks are added. Without
  // it a kResync compares every block.
  Status Enable(const std::string& peer, applier::SyncKind kind = applier::SyncKind::kInitial,
                const DiskRanges* compare = nullptr);
  // `siterep resync VM`: snapshot now and compare (bitmap-guided where the dirty blocks are
  // known, every block otherwise); refused while a sync runs or when not replicated.
  Status Resync(bool full = false);
  Status Pause();
  Status Resume();
  void Stop();  // stops the shipper (daemon shutdown); settings stay

  bool enabled() const;
  std::string peer() const;
  bool sync_owed() const;
  // The shipper's figures; nullopt when it does not run.
  std::optional<shipper::ShipperStats> LinkStats() const;

  // replication.json of vm: written for a VM that becomes primary here with replication to
  // peer already in place (the old primary becomes its replica); Forget deletes it and
  // sync.json when the site stops being the VM's primary.
  static Status WriteSettings(const SiteConfig& site, const std::string& vm,
                              const ReplicationSettings& settings);
  static Status Forget(const SiteConfig& site, const std::string& vm);
  // Called about once a second: feeds the health monitor.
  void Tick(int64_t now_nanos);
  // Fills the replication fields of the VM's status object.
  void Report(int64_t now_nanos, nlohmann::json* vm_status) const;

  // shipper::SyncSource (called from the shipper's thread).
  std::optional<applier::SyncPlan> Plan() override;
  std::vector<tracker::ByteRange> CompareRanges(size_t disk) override;
  Status Read(size_t disk, uint64_t offset, std::span<std::byte> out) override;
  Result<std::vector<tracker::ByteRange>> DataRanges(size_t disk, uint64_t from,
                                                     uint64_t to) override;
  void Copied(size_t disk, uint64_t offset) override;
  Status Finished(uint64_t sync_id) override;

 private:
  Status Persist(const ReplicationSettings& s) const;
  Status StartShipper();  // mu_ held
  // Persists sync.json, takes the snapshot and makes the plan. mu_ held, no shipper.
  Status BeginSync(applier::SyncKind kind, bool full, const DiskRanges* compare = nullptr);
  Status ResyncLocked(const std::string& why, bool full);  // mu_ held
  void MaybeAutoResync(int64_t now_nanos);      // mu_ held
  // The "progress" objects of the VM and its disks while a sync is owed.
  void ReportSync(const shipper::ShipperStats& st,
                  const std::vector<std::vector<tracker::ByteRange>>& ranges,
                  nlohmann::json* vm) const;
  std::optional<double> RpoSeconds(int64_t now_nanos, const shipper::ShipperStats& st) const;

  const SiteConfig& site_;
  ProtectedVm* const vm_;
  const std::shared_ptr<const shipper::TlsContext> tls_;
  const std::filesystem::path file_;
  const std::filesystem::path sync_file_;
  HealthMonitor monitor_;

  mutable std::mutex mu_;  // protects settings_ and shipper_ (not the shipper's inside)
  ReplicationSettings settings_;
  std::unique_ptr<shipper::Shipper> shipper_;
  int64_t link_down_since_nanos_ = 0;  // written by Tick
  int64_t last_auto_resync_nanos_ = 0;  // written by Tick

  // The sync owed to the replica. Taken after mu_ (never the other way), and by the
  // shipper's thread alone, so Finished never waits for mu_.
  struct OwedSync {
    applier::SyncKind kind = applier::SyncKind::kInitial;
    bool full = false;  // compare every block
  };
  mutable std::mutex sync_mu_;
  std::optional<OwedSync> owed_;
  std::optional<applier::SyncPlan> plan_;  // of the snapshot taken for owed_
  std::vector<std::vector<tracker::ByteRange>> compare_ranges_;
};

}  // namespace siterep::control
