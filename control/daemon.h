// Daemon: siterepd's wiring. Reads the site config and the persisted roles (role.h), opens
// every VM in its role here (a primary's images, locks and tracker; a replica; an
// uncommitted failover), mounts the FUSE file system, opens the replicas this site holds
// and listens for peers (Inbound), resumes shipping the VMs it replicates (Outbound),
// serves the control socket, and carries out role changes (failover.cc, roles.cc).
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
#include <map>
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
#include "control/plan.h"
#include "control/protected_disk.h"
#include "control/vm_slot.h"

namespace siterep::control {

struct DaemonOptions {
  // Benchmarks only: read each sealed segment and release it at once, like a shipper to
  // nowhere that keeps up, so cycles are cut at the configured frequency without a peer.
  bool discard_sealed = false;
  // Tests and checkers: each released (shipped) segment is written to
  // <archive_logs>/<vm>/<disk>/ as it was sent.
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
  nlohmann::json HandleVmOp(const std::string& op, VmSlot& slot, const nlohmann::json& request);
  void DiscardLoop();
  void MonitorLoop();
  // Cuts each consistency group's VMs running as primary here together, every period of
  // the group's frequency (VmTracker::CutTogether).
  void GroupCutLoop();
  // One cut of the group's VMs (those of members running as primary here): each VM's cycle.
  Result<std::map<std::string, uint64_t>> CutGroup(const std::string& group);
  siterep::Status Shutdown();
  nlohmann::json PrimaryReport(const VmSlot& slot, int64_t now) const;  // slot.mu held

  // --- Slots (roles.cc) ---------------------------------------------------------------
  VmSlot* Slot(const std::string& vm) const;  // null: unknown here
  std::vector<VmSlot*> Slots() const;
  VmSlot* AddSlot(std::unique_ptr<VmSlot> slot);
  // Finds every VM this site knows (config, role.json, replica folders) and its role.
  Status LoadSlots();
  // Brings a slot up in its persisted role, finishing an interrupted role change first.
  // Replica VMs are added to *replicas (Inbound opens them).
  Status ResumeSlot(VmSlot& slot, std::vector<std::string>* replicas);
  // The VmConfig of a VM run here as primary: its [[vms]] entry, or built from the
  // definition with the images in the replica folder.
  VmConfig ConfigFor(const std::string& vm, const applier::ReplicaDefinition& def) const;
  Status PersistRole(VmSlot& slot, const RoleState& state);
  // Opens the images and tracker at the slot's epoch, exports the disks (mode), and
  // starts its Outbound (replication.json decides whether it ships).
  Status OpenPrimary(VmSlot& slot, blockdev::SlotMode mode);
  // Stops the Outbound, takes the disks offline and closes tracker and images.
  Status ClosePrimary(VmSlot& slot);
  Status ExportDisks(VmSlot& slot, const std::vector<blockdev::DiskBackend*>& backends,
                     blockdev::SlotMode mode);
  void SetDisksMode(VmSlot& slot, blockdev::SlotMode mode);
  void UnexportDisks(VmSlot& slot);
  // Steps of role changes that a restart finishes (roles.cc).
  Status FinishPromotion(VmSlot& slot);
  Status FinishDemotion(VmSlot& slot);
  Status FinishCommit(VmSlot& slot);
  Status OpenFailedOver(VmSlot& slot, std::shared_ptr<applier::Replica> replica, bool fresh);
  // The VM's definition as this site would send it as primary at epoch.
  applier::ReplicaDefinition DefinitionOf(const VmSlot& slot, uint64_t epoch) const;
  // May peer replicate def here (Inbound's admission)?
  Status Admit(const std::string& peer, const applier::ReplicaDefinition& def);
  // Monitor: a restarted primary waiting for its peer; a peer that holds a newer epoch.
  void CheckRoles(int64_t now);
  Status Fence(VmSlot& slot, const std::string& why);
  HookResult RunVmHook(const VmSlot& slot, bool pre);
  Result<nlohmann::json> CallPeer(const std::string& peer, const nlohmann::json& request,
                                  std::chrono::milliseconds timeout);

  // --- Role changes (failover.cc) -------------------------------------------------------
  nlohmann::json HandlePeer(const std::string& peer, const nlohmann::json& request);
  nlohmann::json PeerVmStatus(const std::string& vm);
  nlohmann::json FailoverPlanned(VmSlot& slot);
  nlohmann::json HandOver(VmSlot& slot, const RoleState& role,
                          std::chrono::steady_clock::time_point t0, nlohmann::json* op);
  nlohmann::json Promote(VmSlot& slot, const std::string& peer, const nlohmann::json& request);
  nlohmann::json FailoverUnplanned(VmSlot& slot, const nlohmann::json& request);
  nlohmann::json Commit(VmSlot& slot);
  nlohmann::json Reverse(VmSlot& slot);
  nlohmann::json Demote(VmSlot& slot, const std::string& peer, const nlohmann::json& request);
  // Persists kDemoting at epoch (the peer primary), closes the primary, adopts the images as
  // the peer's replica (in_sync: they equal the peer's) and starts receiving.
  Status BecomeReplica(VmSlot& slot, const std::string& peer, uint64_t epoch, bool in_sync);
  nlohmann::json Failback(VmSlot& slot);
  nlohmann::json TestFailover(VmSlot& slot, const nlohmann::json& request);
  // --- Recovery plans (plans.cc: checks; plan_run.cc: runs) ------------------------------
  struct PlanRunSlot;
  // `siterep plan validate`: what this site knows of the plan's VMs.
  nlohmann::json ValidatePlan(const nlohmann::json& request);
  // Every reason the plan's VMs cannot be run here, one line each; kind "" (validate),
  // "planned", "unplanned" or "test". *vms: what this site knows of each VM.
  std::vector<std::string> PlanProblems(const RecoveryPlan& plan, const std::string& kind,
                                        bool force, nlohmann::json* vms);
  // plan-run, plan-status, plan-continue, plan-cancel, plan-cleanup.
  nlohmann::json PlanRequest(const std::string& op, const nlohmann::json& request);
  nlohmann::json StartPlanRun(const nlohmann::json& request);
  nlohmann::json ContinuePlanRun(const std::shared_ptr<PlanRunSlot>& p,
                                 const nlohmann::json& request);
  nlohmann::json CleanupPlanRun(const std::shared_ptr<PlanRunSlot>& p);
  void LoadPlanRuns();
  void StopPlanRuns();
  std::filesystem::path PlanDir(const std::string& plan) const;
  void PlanEvent(PlanRunSlot& p, const std::string& text);  // p.mu held
  void PersistPlanRun(PlanRunSlot& p);                      // p.mu held
  void PlanRunLoop(std::shared_ptr<PlanRunSlot> p);  // the run's thread
  void WalkPlan(const std::shared_ptr<PlanRunSlot>& p);
  nlohmann::json RunPlanAction(const RecoveryPlan& plan, const PlanGroup& group,
                               const PlanAction& action, const std::string& stage,
                               const std::string& kind);
  HookResult RunPlanHook(const nlohmann::json& request);
  // The peer request "plan-action": a pre/post action of a plan run at the peer.
  nlohmann::json HandlePlanAction(const std::string& peer, const nlohmann::json& request);
  // Fails the group's VMs over at once; "" or what failed. lk (p.mu) is released meanwhile.
  std::string RunPlanVms(PlanRunSlot& p, std::unique_lock<std::mutex>& lk,
                         const RecoveryPlan& plan, const PlanGroup& group, size_t gi);
  nlohmann::json PlanVmStep(const RecoveryPlan& plan, const std::string& kind,
                            const std::string& vm, const nlohmann::json& request);
  // For the group's VMs in a consistency group: the instant they all fail over to, held
  // at the replicas (recorded in the run), and each VM's recovery point at that instant.
  // "" or why there is none. p.mu held.
  std::string ConsistentPoints(PlanRunSlot& p, const PlanGroup& group,
                               std::map<std::string, uint64_t>* points);
  // Holds the replicas of the run's consistency groups at the instants it chose (a run
  // loaded at start-up), or lets them apply past them (a run that ended).
  void HoldPlanInstants(const nlohmann::json& run);
  void ReleasePlanHolds(const nlohmann::json& run);
  Status StopTestCopy(VmSlot& slot);
  // --- Verification (verify.cc) ----------------------------------------------------------
  // `siterep verify VM`, at the primary: the 64 KiB block hashes of every disk at one cut
  // (a tracker snapshot here, the same recovery point pinned at the replica), compared.
  nlohmann::json Verify(VmSlot& slot, const nlohmann::json& request);
  // The peer requests "verify-hashes" and "verify-end": the replica's side of Verify.
  nlohmann::json HandleVerifyPeer(const std::string& peer, const nlohmann::json& request);
  struct VerifyPins;   // views of recovery points held for verifications under way here
  VerifyPins& Pins();  // made on first use

  SiteConfig config_;
  DaemonOptions options_;
  std::shared_ptr<const shipper::TlsContext> tls_;  // null without [tls]
  std::unique_ptr<Inbound> inbound_;
  std::unique_ptr<blockdev::FuseFs> fuse_;
  ControlServer control_;

  mutable std::mutex slots_mu_;  // protects slots_ (the map; slots are never removed)
  std::map<std::string, std::unique_ptr<VmSlot>> slots_;

  std::mutex stop_mu_;  // protects stopping_; leaf lock
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::mutex plans_mu_;  // protects plan_runs_ (the map); before a run's own mutex
  std::map<std::string, std::shared_ptr<PlanRunSlot>> plan_runs_;
  std::mutex verify_mu_;  // protects verify_pins_ (the pointer); leaf lock
  std::shared_ptr<VerifyPins> verify_pins_;

  std::thread discard_thread_;
  std::thread monitor_thread_;
  std::thread group_cut_thread_;
};

}  // namespace siterep::control
