#include "control/role.h"

#include <nlohmann/json.hpp>

#include "applier/replica_state.h"
#include "common/file_util.h"

namespace siterep::control {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {
constexpr Phase kPhases[] = {Phase::kNone,       Phase::kFailingOver, Phase::kPromoting,
                             Phase::kDemoting,   Phase::kFailedOver,  Phase::kCommitting,
                             Phase::kFenced};
}  // namespace

std::string_view RoleName(Role role) {
  switch (role) {
    case Role::kPrimary:
      return "primary";
    case Role::kReplica:
      return "replica";
    case Role::kNone:
      break;
  }
  return "none";
}

std::string_view PhaseName(Phase phase) {
  switch (phase) {
    case Phase::kNone:
      return "";
    case Phase::kFailingOver:
      return "failing over";
    case Phase::kPromoting:
      return "promoting";
    case Phase::kDemoting:
      return "demoting";
    case Phase::kFailedOver:
      return "failed over";
    case Phase::kCommitting:
      return "committing";
    case Phase::kFenced:
      return "fenced";
  }
  return "";
}

fs::path RoleFile(const fs::path& state_dir, const std::string& vm) {
  return state_dir / "vms" / vm / "role.json";
}

Result<std::optional<RoleState>> LoadRole(const fs::path& state_dir, const std::string& vm) {
  const fs::path file = RoleFile(state_dir, vm);
  if (!fs::exists(file)) return std::optional<RoleState>();
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(file));
  auto damaged = [&](const std::string& what) {
    return Status::Corrupt(file.string() + " is damaged: " + what);
  };
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return damaged("not a JSON object");
  RoleState s;
  const std::string role = j.value("role", "");
  if (role == "primary") {
    s.role = Role::kPrimary;
  } else if (role == "replica") {
    s.role = Role::kReplica;
  } else if (role == "none") {
    s.role = Role::kNone;
  } else {
    return damaged("role must be primary, replica or none");
  }
  if (!j.contains("epoch") || !j["epoch"].is_number_unsigned() || j["epoch"].get<uint64_t>() == 0) {
    return damaged("epoch must be a positive integer");
  }
  s.epoch = j["epoch"].get<uint64_t>();
  s.peer = j.value("peer", "");
  const std::string phase = j.value("phase", "");
  bool known = false;
  for (Phase p : kPhases) {
    if (PhaseName(p) == phase) {
      s.phase = p;
      known = true;
    }
  }
  if (!known) return damaged("unknown phase '" + phase + "'");
  s.target_epoch = j.value("target_epoch", uint64_t{0});
  s.point = j.value("point", uint64_t{0});
  s.committed = j.value("committed", false);
  s.in_sync = j.value("in_sync", false);
  s.note = j.value("note", "");
  if (j.contains("definition")) {
    auto def = applier::DefinitionFromJson(j["definition"].dump(), file.string());
    if (!def.ok()) return def.status();
    s.definition = std::move(*def);
  }
  return std::optional<RoleState>(std::move(s));
}

Result<uint64_t> LegacyEpoch(const fs::path& state_dir, const std::string& vm) {
  const fs::path file = state_dir / "vms" / vm / "epoch.json";
  if (!fs::exists(file)) return uint64_t{1};
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(file));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("epoch") || !j["epoch"].is_number_unsigned()) {
    return Status::Corrupt(file.string() + " is damaged: expected {\"epoch\": N}");
  }
  return j["epoch"].get<uint64_t>();
}

Status StoreRole(const fs::path& state_dir, const std::string& vm, const RoleState& s) {
  const fs::path file = RoleFile(state_dir, vm);
  SR_RETURN_IF_ERROR(MakeDirs(file.parent_path()));
  json j = {{"role", RoleName(s.role)},
            {"epoch", s.epoch},
            {"peer", s.peer},
            {"phase", PhaseName(s.phase)},
            {"target_epoch", s.target_epoch},
            {"point", s.point},
            {"committed", s.committed},
            {"in_sync", s.in_sync},
            {"note", s.note}};
  if (!s.definition.disks.empty()) {
    j["definition"] = json::parse(applier::DefinitionToJson(s.definition));
  }
  return WriteFileAtomic(file, j.dump(1) + "\n");
}

}  // namespace siterep::control
