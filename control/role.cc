#include "control/role.h"

#include <algorithm>
#include <iterator>

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

std::vector<tracker::ByteRange> UnionRanges(const std::vector<tracker::ByteRange>& a,
                                            const std::vector<tracker::ByteRange>& b) {
  std::vector<tracker::ByteRange> all;
  all.reserve(a.size() + b.size());
  std::merge(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(all),
             [](const tracker::ByteRange& x, const tracker::ByteRange& y) {
               return x.offset < y.offset;
             });
  std::vector<tracker::ByteRange> out;
  for (const tracker::ByteRange& r : all) {
    if (r.length == 0) continue;
    if (!out.empty() && r.offset <= out.back().offset + out.back().length) {
      const uint64_t end = std::max(out.back().offset + out.back().length, r.offset + r.length);
      out.back().length = end - out.back().offset;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

json DiskRangesToJson(const DiskRanges& ranges) {
  json out = json::object();
  for (const auto& [disk, list] : ranges) {
    json a = json::array();
    for (const tracker::ByteRange& r : list) a.push_back({r.offset, r.length});
    out[disk] = std::move(a);
  }
  return out;
}

std::optional<DiskRanges> DiskRangesFromJson(const json& j) {
  if (!j.is_object()) return std::nullopt;
  DiskRanges out;
  for (const auto& [disk, list] : j.items()) {
    if (!list.is_array()) return std::nullopt;
    std::vector<tracker::ByteRange>& v = out[disk];
    for (const json& r : list) {
      if (!r.is_array() || r.size() != 2 || !r[0].is_number_unsigned() ||
          !r[1].is_number_unsigned()) {
        return std::nullopt;
      }
      v.push_back({r[0].get<uint64_t>(), r[1].get<uint64_t>()});
    }
    // Whatever the sender did, the list is sorted and merged here.
    std::sort(v.begin(), v.end(), [](const tracker::ByteRange& x, const tracker::ByteRange& y) {
      return x.offset < y.offset;
    });
    v = UnionRanges(v, {});
  }
  return out;
}

namespace {
fs::path ForkFile(const fs::path& state_dir, const std::string& vm) {
  return state_dir / "vms" / vm / "fork.json";
}
}  // namespace

Status StoreFork(const fs::path& state_dir, const std::string& vm, const ForkRecord& fork) {
  const fs::path file = ForkFile(state_dir, vm);
  SR_RETURN_IF_ERROR(MakeDirs(file.parent_path()));
  return WriteFileAtomic(
      file, json{{"point", fork.point}, {"changed", DiskRangesToJson(fork.changed)}}.dump() + "\n");
}

Result<std::optional<ForkRecord>> LoadFork(const fs::path& state_dir, const std::string& vm) {
  const fs::path file = ForkFile(state_dir, vm);
  if (!fs::exists(file)) return std::optional<ForkRecord>();
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(file));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  std::optional<DiskRanges> changed;
  if (j.is_object() && j.contains("changed")) changed = DiskRangesFromJson(j["changed"]);
  if (!changed || !j.contains("point") || !j["point"].is_number_unsigned()) {
    return Status::Corrupt(file.string() + " is damaged: expected {\"point\", \"changed\"}");
  }
  return std::optional<ForkRecord>(ForkRecord{j["point"].get<uint64_t>(), std::move(*changed)});
}

Status RemoveFork(const fs::path& state_dir, const std::string& vm) {
  std::error_code ec;
  fs::remove(ForkFile(state_dir, vm), ec);
  if (ec) return Status::FromErrno(ec.value(), "remove " + ForkFile(state_dir, vm).string());
  return Status::Ok();
}

}  // namespace siterep::control
