// VmSlot: everything the daemon holds for one VM, whatever its role here. The slot lives as
// long as the daemon; role changes swap what is inside it.
//
//   primary (committed)      ProtectedVm (images, tracker) + Outbound; disks exported
//   primary, failed over     the held replica (applier stopped), a view of the chosen
//                            point and one overlay per disk; disks exported
//   replica                  the Replica lives in Inbound; disks not exported; a test
//                            failover exports <vm>-test/<disk> (TestCopy)
//
// Disks are exported through DiskSlots that stay mounted across role changes, so a loop
// device or a qemu drive on <mountpoint>/<vm>/<disk> keeps its file when an unplanned
// failover is committed (overlay swapped for the image) or when the site is fenced.
//
// Locks: op_mu serialises role changes of the VM (held for a whole failover, try_lock
// refuses a second one). mu protects the fields below against the status and monitor
// threads; it is held only to read or swap them, never while waiting on I/O or the peer.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "applier/point_view.h"
#include "applier/replica.h"
#include "blockdev/disk_slot.h"
#include "blockdev/overlay_backend.h"
#include "common/config.h"
#include "control/hooks.h"
#include "control/outbound.h"
#include "control/protected_disk.h"
#include "control/request.h"
#include "control/role.h"

namespace siterep::control {

// A writable copy of a replica's recovery point (test failover, or an unplanned failover
// before commit): a view of the point plus an overlay per disk.
struct PointCopy {
  uint64_t point = 0;
  std::shared_ptr<applier::Replica> replica;  // keeps the store; applier may run (test)
  std::unique_ptr<applier::PointView> view;
  std::vector<std::unique_ptr<blockdev::OverlayBackend>> overlays;
  std::vector<std::unique_ptr<blockdev::DiskSlot>> slots;  // test copy: its own exports
};

struct VmSlot {
  explicit VmSlot(std::string vm_name) : name(std::move(vm_name)) {}

  const std::string name;
  std::mutex op_mu;
  // Held by a consistency group's cut while it uses primary->tracker; ClosePrimary takes
  // it before it takes the tracker away. After op_mu, before mu.
  std::mutex cut_mu;

  mutable std::mutex mu;
  RoleState role;
  bool home = false;  // the site config lists the VM ([[vms]]): this is its home site
  VmConfig config;    // the VM as run here when primary
  std::vector<std::unique_ptr<blockdev::DiskSlot>> disks;  // one per disk while exported
  std::unique_ptr<ProtectedVm> primary;
  std::unique_ptr<Outbound> outbound;
  std::unique_ptr<PointCopy> failed_over;  // phase kFailedOver
  std::unique_ptr<PointCopy> test;         // test failover at a replica
  // A restarted primary holds writes until its peer confirms no newer epoch took over,
  // or until this time (unix nanos; 0: not waiting).
  int64_t confirm_until_nanos = 0;
  nlohmann::json last_operation;  // the last role change here: what, when, hooks, result
  // What holds op_mu through an OpLock ("planned failover", "verify", ...); empty when
  // nothing does or a holder did not say.
  std::string op_running;

  RoleState CurrentRole() const {
    std::lock_guard lk(mu);
    return role;
  }
};

// op_mu taken without waiting, by an operation that says what it is, so that the one it
// turns away can be told what runs. owns() false: another holds it (busy()).
class OpLock {
 public:
  OpLock(VmSlot& slot, std::string what) : slot_(slot), lock_(slot.op_mu, std::try_to_lock) {
    std::lock_guard lk(slot_.mu);
    if (lock_.owns_lock()) {
      slot_.op_running = std::move(what);
    } else {
      running_ = slot_.op_running.empty() ? "another operation" : slot_.op_running;
      what_ = std::move(what);
    }
  }
  ~OpLock() { Release(); }
  // Lets the next operation in before this object goes.
  void Release() {
    if (!lock_.owns_lock()) return;
    {
      std::lock_guard lk(slot_.mu);
      slot_.op_running.clear();
    }
    lock_.unlock();
  }
  OpLock(const OpLock&) = delete;
  OpLock& operator=(const OpLock&) = delete;

  bool owns() const { return lock_.owns_lock(); }
  // The refusal when !owns(): "busy", naming what runs.
  nlohmann::json Busy(const std::string& site) const {
    return Refused("busy", what_ + " of VM " + slot_.name + " cannot start: " + running_ +
                               " of it runs at " + site + "; try again when it is done");
  }

 private:
  VmSlot& slot_;
  std::unique_lock<std::mutex> lock_;
  std::string running_, what_;
};

}  // namespace siterep::control
