// Inbound: the secondary side of a site — the receiver that accepts replication from peer
// sites over mutual TLS, and the replicas it feeds (applier::Replica, one per VM, under
// <state_dir>/replicas/<vm>/). A replica is created when a primary first sends the VM's
// definition; after a restart the existing replicas are opened again before the receiver
// listens, so a reconnecting primary finds them.
//
// Owned by the Daemon. Thread-safe: the receiver's connection threads call the sink
// provider; the control socket and monitor threads call the rest.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "applier/replica.h"
#include "common/config.h"
#include "common/status.h"
#include "control/health.h"
#include "shipper/receiver.h"
#include "shipper/tls.h"

namespace siterep::control {

// Asked before a primary's Hello reaches a replica: may peer replicate def here? The
// daemon refuses a VM it runs as primary (a split-brain attempt, or a failover still
// completing) and records the role of a VM it has not seen.
using Admission =
    std::function<Status(const std::string& peer, const applier::ReplicaDefinition& def)>;

// Answers a request of a peer site (promote, demote, vm-status: see Daemon).
using PeerHandler =
    std::function<nlohmann::json(const std::string& peer, const nlohmann::json& request)>;

class Inbound {
 public:
  Inbound(const SiteConfig& site, std::shared_ptr<const shipper::TlsContext> tls);
  ~Inbound();

  // Opens the replicas of vms (folders under <state_dir>/replicas) and starts their
  // appliers, then listens on [site] listen (when set). Peer requests (failover) go to
  // peer_handler.
  Status Start(const std::vector<std::string>& vms, Admission admit,
               PeerHandler peer_handler);
  // Stops the receiver first (no more segments), then the appliers.
  void Stop();

  static std::filesystem::path ReplicaDir(const SiteConfig& site, const std::string& vm);

  bool HasVm(const std::string& vm) const;
  std::shared_ptr<applier::Replica> Get(const std::string& vm) const;
  // The VM stops being a replica here: its connection is dropped, its applier stopped,
  // and the replica handed over (null if there is none).
  std::shared_ptr<applier::Replica> Take(const std::string& vm);
  // A replica made here (a demoted primary's images): starts its applier and takes its
  // primary's connections from now on.
  Status Add(std::shared_ptr<applier::Replica> replica);

  // How much time of writes a failover to point would lose, as far as this site knows:
  // 0 when the primary reported nothing unapplied at its last contact and point is the
  // latest; else from the point's cut to the last contact (writes after it are unknown
  // here). nullopt: the primary never connected since this daemon started.
  std::optional<double> DataLossWindow(const std::string& vm,
                                       const applier::RecoveryPoint& point) const;
  void Tick(int64_t now_nanos);
  // Status objects (as in `siterep status --json`) of the replica VMs, optionally one.
  nlohmann::json Report(int64_t now_nanos, const std::string& vm_filter) const;
  // `siterep points VM`.
  Result<nlohmann::json> Points(const std::string& vm) const;
  // `siterep export VM DISK --point ID FILE`.
  Status Export(const std::string& vm, const std::string& disk, uint64_t point,
                const std::filesystem::path& out) const;
  uint16_t port() const;  // the receiver's port (0 when not listening)

  // Consistency groups: replicas whose definition names one (the primary's
  // consistency_group). Their primaries cut them at the same instants (one cut time for
  // all); here a member applies a cycle only up to the latest instant every member has
  // received (or up to a held instant), so all members can always reach one common
  // recovery point by applying what they hold. A member without a consistent point yet
  // (initial replication) does not count.
  std::string GroupOf(const std::string& vm) const;  // "" for none, or not a replica here
  std::vector<std::string> GroupMembers(const std::string& group) const;
  // The latest cut time that every counted member has applied or holds committed.
  std::optional<int64_t> GroupInstant(const std::string& group) const;
  // Keeps the group's members at or below instant (a plan fails them over to it); nullopt
  // lifts the hold.
  void HoldGroup(const std::string& group, std::optional<int64_t> instant);

 private:
  struct Entry {
    explicit Entry(std::chrono::milliseconds frequency) : monitor(frequency) {}
    std::shared_ptr<applier::Replica> replica;
    HealthMonitor monitor;
  };
  Result<applier::SegmentSink*> Provide(const std::string& peer,
                                        const applier::ReplicaDefinition& definition);
  const Entry* Find(const std::string& vm) const;  // mu_ held
  // The apply gate of a replica (applier thread, no Inbound lock held).
  bool MayApply(const std::string& vm, const applier::CycleInfo& cycle) const;
  void SetGate(applier::Replica& replica, const std::string& vm);
  // Replicas of the group; takes mu_.
  std::vector<std::shared_ptr<applier::Replica>> Members(const std::string& group) const;
  std::optional<double> RpoSeconds(int64_t now_nanos, const shipper::ReceiverVmStats* link,
                                   const applier::ReplicaPosition& pos) const;

  const SiteConfig& site_;
  const std::shared_ptr<const shipper::TlsContext> tls_;
  const std::filesystem::path dir_;  // <state_dir>/replicas
  const int64_t started_nanos_;
  Admission admit_;
  std::unique_ptr<shipper::Receiver> receiver_;

  // Protects replicas_ (the map; a Replica is thread-safe on its own). An entry leaves
  // (Take) only after the receiver dropped the VM's connection, so a sink pointer handed
  // to the receiver stays valid while it is used.
  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<Entry>> replicas_;
  std::map<std::string, int64_t> holds_;  // consistency group -> held instant; under mu_
};

}  // namespace siterep::control
