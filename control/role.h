// RoleState: what this site is for one VM — primary, replica or nothing — at which epoch,
// and which role change is under way. The daemon's role changes (failover, commit,
// reverse, failback) all go one way: propose, validate against the rules, persist the new
// RoleState, then act. A restart reads the persisted state and finishes the step it names,
// so a crash at any moment leaves either the old role or the new one, never two primaries.
//
// On disk: <state_dir>/vms/<vm>/role.json, written atomically (file_util.h). A VM with no
// role.json is taken from older layouts: a [[vms]] entry is a primary at the epoch of
// epoch.json (or 1); a replica folder is a replica at its definition's epoch.
//
// Epochs: every promotion starts a new epoch, one above the highest either site held.
// A site learns of a newer epoch from its peer and is then fenced: its disks refuse
// writes (EROFS) and it never ships to the newer side.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include <map>
#include <vector>

#include <nlohmann/json.hpp>

#include "applier/segment_sink.h"
#include "common/status.h"
#include "tracker/vm_tracker.h"

namespace siterep::control {

enum class Role { kPrimary, kReplica, kNone };

// The role change in progress (kNone: none). Each names what a restart must finish.
enum class Phase {
  kNone,
  // Planned failover, at the old primary: the disks refuse writes, the last changes are
  // shipped, the peer is asked to take over at target_epoch. A restart keeps the disks
  // fenced; the same command (or status) finishes or the operator cancels it.
  kFailingOver,
  // At a site becoming primary (planned failover or the commit of an unplanned one): the
  // replica's state is being dropped and its images opened as the primary's.
  kPromoting,
  // At a site becoming replica: its tracker and mount are being closed and its images
  // adopted by a replica.
  kDemoting,
  // Unplanned failover, not committed: the disks run at recovery point `point` with the
  // writes since in an overlay; the replica's other points are kept.
  kFailedOver,
  // Commit of kFailedOver: the images are being turned into point + overlay.
  kCommitting,
  // A primary that learned its peer holds a newer epoch: writes refused until reverse
  // replication makes it the replica.
  kFenced,
};

std::string_view RoleName(Role role);    // "primary" | "replica" | "none"
std::string_view PhaseName(Phase phase);  // "" | "failing over" | ... | "fenced"

struct RoleState {
  Role role = Role::kNone;
  uint64_t epoch = 1;
  std::string peer;  // the other site of this VM ("" before replication)
  Phase phase = Phase::kNone;
  uint64_t target_epoch = 0;  // kFailingOver: the epoch the peer takes over at
  uint64_t point = 0;         // kFailedOver / kCommitting: the recovery point in use
  bool committed = false;     // a primary after a committed unplanned failover, until reverse
  bool in_sync = false;       // kDemoting: the images equal the new primary's (planned)
  std::string note;           // one line for status (why fenced, ...)
  // The VM as the site knows it (disk names, ids, sizes; point settings; frequency), for
  // a VM that has no [[vms]] entry here. Empty disks: take it from the config.
  applier::ReplicaDefinition definition;
};

std::filesystem::path RoleFile(const std::filesystem::path& state_dir, const std::string& vm);
// nullopt: no role.json.
Result<std::optional<RoleState>> LoadRole(const std::filesystem::path& state_dir,
                                          const std::string& vm);
// The epoch of a VM from before role.json (<state_dir>/vms/<vm>/epoch.json), or 1.
Result<uint64_t> LegacyEpoch(const std::filesystem::path& state_dir, const std::string& vm);
Status StoreRole(const std::filesystem::path& state_dir, const std::string& vm,
                 const RoleState& state);

// --- What changed since a fork ------------------------------------------------------------
//
// Reverse replication after an unplanned failover sends only the blocks that may differ
// between the two sites: those the new primary changed since the recovery point it failed
// over to (cycles the replica applied or received after it, the writes made before commit,
// the log since), and those the old primary wrote and never had acknowledged (its
// unreleased log and dirty bitmap). Each side's part is a list of byte ranges per disk.

using DiskRanges = std::map<std::string, std::vector<tracker::ByteRange>>;  // by disk name

// Sorted, merged union of two sorted range lists.
std::vector<tracker::ByteRange> UnionRanges(const std::vector<tracker::ByteRange>& a,
                                            const std::vector<tracker::ByteRange>& b);
// {"disk": [[offset, length], ...], ...}; nullopt for anything else.
nlohmann::json DiskRangesToJson(const DiskRanges& ranges);
std::optional<DiskRanges> DiskRangesFromJson(const nlohmann::json& j);

// <state_dir>/vms/<vm>/fork.json: the new primary's part, written at commit (before the
// replica's state that tells it is dropped), used and deleted by reverse.
struct ForkRecord {
  uint64_t point = 0;
  DiskRanges changed;
};
Status StoreFork(const std::filesystem::path& state_dir, const std::string& vm,
                 const ForkRecord& fork);
Result<std::optional<ForkRecord>> LoadFork(const std::filesystem::path& state_dir,
                                           const std::string& vm);
Status RemoveFork(const std::filesystem::path& state_dir, const std::string& vm);

}  // namespace siterep::control
