#include "applier/replica_state.h"

#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "common/file_util.h"

namespace siterep::applier {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

bool UsableFileName(const std::string& name) {
  if (name.empty() || name == "." || name == ".." || name.size() > 200) return false;
  for (char c : name) {
    if (c == '/' || c == '\0') return false;
  }
  return true;
}

std::string_view SyncModeName(SyncMode mode) {
  return mode == SyncMode::kCompare ? "compare" : "copy";
}

std::optional<SyncMode> SyncModeFromName(const std::string& name) {
  if (name == "copy") return SyncMode::kCopy;
  if (name == "compare") return SyncMode::kCompare;
  return std::nullopt;
}

std::optional<SyncKind> SyncKindFromName(const std::string& name) {
  for (SyncKind k : {SyncKind::kInitial, SyncKind::kSeeded, SyncKind::kResync}) {
    if (SyncKindName(k) == name) return k;
  }
  return std::nullopt;
}

json SyncToJson(const SyncState& sync, const ReplicaDefinition& def) {
  json disks = json::array();
  for (size_t i = 0; i < def.disks.size(); ++i) {
    const SyncDiskState& d = sync.disks[i];
    disks.push_back({{"name", def.disks[i].name},
                     {"mode", std::string(SyncModeName(d.mode))},
                     {"last_seq", d.last_seq},
                     {"last_segment", d.last_segment},
                     {"bytes_total", d.bytes_total},
                     {"done_offset", d.done_offset},
                     {"written_until", d.written_until},
                     {"older_written_until", d.older_written_until}});
  }
  return {{"sync_id", sync.sync_id},
          {"kind", std::string(SyncKindName(sync.kind))},
          {"epoch", sync.epoch},
          {"cut_unix_nanos", sync.cut_unix_nanos},
          {"staged", sync.staged},
          {"point", sync.point},
          {"bytes_written", sync.bytes_written},
          {"disks", disks}};
}

}  // namespace

std::string_view SyncKindName(SyncKind kind) {
  switch (kind) {
    case SyncKind::kInitial:
      return "initial";
    case SyncKind::kSeeded:
      return "seeded";
    case SyncKind::kResync:
      return "resync";
  }
  return "?";
}

SyncState SyncStateFor(const SyncPlan& plan) {
  SyncState s;
  s.sync_id = plan.sync_id;
  s.kind = plan.kind;
  s.epoch = plan.epoch;
  s.cut_unix_nanos = plan.cut_unix_nanos;
  for (const SyncDiskPlan& d : plan.disks) {
    SyncDiskState disk;
    disk.mode = d.mode;
    disk.last_seq = d.last_seq;
    disk.last_segment = d.last_segment;
    disk.bytes_total = d.bytes_total;
    s.disks.push_back(disk);
  }
  return s;
}

Status CheckSyncPlan(const SyncPlan& plan, const ReplicaDefinition& def) {
  const std::string what = "sync " + std::to_string(plan.sync_id) + " of VM " + def.vm;
  if (plan.sync_id == 0) return Status::Invalid("sync of VM " + def.vm + ": sync_id 0");
  if (plan.epoch < def.epoch) {
    return Status::Error(ESTALE, what + ": epoch " + std::to_string(plan.epoch) +
                                     " is older than the replica's " + std::to_string(def.epoch));
  }
  auto ids = [](const auto& disks) {
    std::string out;
    for (const auto& d : disks) out += (out.empty() ? "" : ", ") + std::to_string(d.disk_id);
    return "[" + out + "]";
  };
  bool same = plan.disks.size() == def.disks.size();
  for (size_t i = 0; same && i < def.disks.size(); ++i) {
    same = plan.disks[i].disk_id == def.disks[i].disk_id;
  }
  if (!same) {
    return Status::Invalid(what + " is for disk ids " + ids(plan.disks) + "; the replica has " +
                           ids(def.disks));
  }
  for (size_t i = 0; i < def.disks.size(); ++i) {
    if (plan.disks[i].bytes_total > def.disks[i].size) {
      return Status::Invalid(what + ": " + std::to_string(plan.disks[i].bytes_total) +
                             " bytes to scan on disk " + def.disks[i].name + ", which has " +
                             std::to_string(def.disks[i].size));
    }
  }
  return Status::Ok();
}

Status ValidateDefinition(const ReplicaDefinition& def) {
  if (def.vm.empty()) return Status::Invalid("replica definition: the VM has no name");
  if (!UsableFileName(def.vm)) {
    return Status::Invalid("replica definition: VM name \"" + def.vm + "\" is not a file name");
  }
  if (!def.consistency_group.empty() && !UsableFileName(def.consistency_group)) {
    return Status::Invalid("replica definition: VM " + def.vm + ": consistency group name \"" +
                           def.consistency_group + "\" is not a file name");
  }
  if (def.disks.empty())
    return Status::Invalid("replica definition: VM " + def.vm + " has no disks");
  if (def.epoch == 0) return Status::Invalid("replica definition: VM " + def.vm + " has epoch 0");
  if (def.recovery_points < 0 || def.recovery_point_interval_ms < 0) {
    return Status::Invalid("replica definition: VM " + def.vm +
                           ": recovery points and their interval must not be negative");
  }
  std::set<std::string> names;
  std::set<uint32_t> ids;
  for (const DiskDefinition& d : def.disks) {
    const std::string what = "replica definition: disk \"" + d.name + "\" of VM " + def.vm;
    if (!UsableFileName(d.name)) return Status::Invalid(what + ": the name is not a file name");
    if (d.size == 0) return Status::Invalid(what + " has size 0");
    if (!names.insert(d.name).second) return Status::Invalid(what + " is listed twice");
    if (!ids.insert(d.disk_id).second) {
      return Status::Invalid(what + " has the disk id of another disk (" +
                             std::to_string(d.disk_id) + ")");
    }
  }
  return Status::Ok();
}

bool SameVmAndDisks(const ReplicaDefinition& a, const ReplicaDefinition& b) {
  if (a.vm != b.vm || a.disks.size() != b.disks.size()) return false;
  for (size_t i = 0; i < a.disks.size(); ++i) {
    const DiskDefinition& x = a.disks[i];
    const DiskDefinition& y = b.disks[i];
    if (x.name != y.name || x.disk_id != y.disk_id || x.size != y.size) return false;
  }
  return true;
}

std::string DefinitionToJson(const ReplicaDefinition& def) {
  json disks = json::array();
  for (const DiskDefinition& d : def.disks) {
    disks.push_back({{"name", d.name}, {"disk_id", d.disk_id}, {"size", d.size}});
  }
  json j = {{"vm", def.vm},
            {"primary_site", def.primary_site},
            {"epoch", def.epoch},
            {"disks", disks},
            {"recovery_points", def.recovery_points},
            {"recovery_point_interval_ms", def.recovery_point_interval_ms},
            {"frequency_ms", def.frequency_ms}};
  // Only when set: a replica outside any group keeps the replica.json it always had.
  if (!def.consistency_group.empty()) j["consistency_group"] = def.consistency_group;
  return j.dump(2) + "\n";
}

Result<ReplicaDefinition> DefinitionFromJson(const std::string& text, const std::string& where) {
  try {
    const json j = json::parse(text);
    ReplicaDefinition def;
    def.vm = j.at("vm").get<std::string>();
    def.primary_site = j.value("primary_site", std::string());
    def.epoch = j.at("epoch").get<uint64_t>();
    for (const json& d : j.at("disks")) {
      def.disks.push_back(DiskDefinition{d.at("name").get<std::string>(),
                                         d.at("disk_id").get<uint32_t>(),
                                         d.at("size").get<uint64_t>()});
    }
    def.recovery_points = j.value("recovery_points", 0);
    def.recovery_point_interval_ms = j.value("recovery_point_interval_ms", int64_t{3600000});
    def.frequency_ms = j.value("frequency_ms", int64_t{300000});
    def.consistency_group = j.value("consistency_group", std::string());
    Status valid = ValidateDefinition(def);
    if (!valid.ok()) return Status::Corrupt(where + ": " + valid.message());
    return def;
  } catch (const json::exception& e) {
    return Status::Corrupt(where + ": " + e.what());
  }
}

std::string PositionToJson(const PositionState& s, const ReplicaDefinition& def) {
  json disks = json::array();
  for (size_t i = 0; i < def.disks.size(); ++i) {
    disks.push_back({{"name", def.disks[i].name},
                     {"last_segment", s.disks[i].last_segment},
                     {"last_seq", s.disks[i].last_seq}});
  }
  json pending = json::array();
  for (const PendingCycle& c : s.pending) {
    json segments = json::array();
    for (size_t i = 0; i < def.disks.size(); ++i) {
      const PendingSegment& seg = c.segments[i];
      segments.push_back({{"disk", def.disks[i].name},
                          {"number", seg.number},
                          {"bytes", seg.bytes},
                          {"first_seq", seg.first_seq},
                          {"last_seq", seg.last_seq}});
    }
    pending.push_back({{"cycle", c.info.cycle},
                       {"cut_unix_nanos", c.info.cut_unix_nanos},
                       {"first_change_unix_nanos", c.info.first_change_unix_nanos},
                       {"min_epoch", c.min_epoch},
                       {"segments", segments}});
  }
  json j = {{"received_cycle", s.received_cycle},
            {"applying_cycle", s.applying_cycle},
            {"applied_cycle", s.applied_cycle},
            {"applied_cut_unix_nanos", s.applied_cut_unix_nanos},
            {"applied_first_change_unix_nanos", s.applied_first_change_unix_nanos},
            {"apply_error", s.apply_error},
            {"disks", disks},
            {"pending", pending},
            {"last_sync_id", s.last_sync_id}};
  if (s.sync) j["sync"] = SyncToJson(*s.sync, def);
  if (s.cycle0_is_point) j["cycle0_is_point"] = true;
  if (s.materialize) {
    j["materialize"] = {{"point", s.materialize->point},
                        {"cut_unix_nanos", s.materialize->cut_unix_nanos}};
  }
  return j.dump(2) + "\n";
}

Result<PositionState> PositionFromJson(const std::string& text, const ReplicaDefinition& def,
                                       const std::string& where) {
  // Disks are found by name, so the file stays readable if the definition lists them in
  // another order one day.
  auto index_of = [&](const std::string& name) -> int {
    for (size_t i = 0; i < def.disks.size(); ++i) {
      if (def.disks[i].name == name) return static_cast<int>(i);
    }
    return -1;
  };
  try {
    const json j = json::parse(text);
    PositionState s;
    s.received_cycle = j.at("received_cycle").get<uint64_t>();
    s.applying_cycle = j.value("applying_cycle", uint64_t{0});
    s.applied_cycle = j.at("applied_cycle").get<uint64_t>();
    s.applied_cut_unix_nanos = j.value("applied_cut_unix_nanos", int64_t{0});
    s.applied_first_change_unix_nanos = j.value("applied_first_change_unix_nanos", int64_t{0});
    s.apply_error = j.value("apply_error", std::string());
    s.disks.resize(def.disks.size());
    std::vector<bool> seen(def.disks.size());
    for (const json& d : j.at("disks")) {
      const int i = index_of(d.at("name").get<std::string>());
      if (i < 0) continue;
      s.disks[i].last_segment = d.at("last_segment").get<uint64_t>();
      s.disks[i].last_seq = d.at("last_seq").get<uint64_t>();
      seen[i] = true;
    }
    for (size_t i = 0; i < seen.size(); ++i) {
      if (!seen[i]) return Status::Corrupt(where + ": disk " + def.disks[i].name + " is missing");
    }
    for (const json& c : j.at("pending")) {
      PendingCycle p;
      p.info.cycle = c.at("cycle").get<uint64_t>();
      p.info.cut_unix_nanos = c.value("cut_unix_nanos", int64_t{0});
      p.info.first_change_unix_nanos = c.value("first_change_unix_nanos", int64_t{0});
      p.min_epoch = c.at("min_epoch").get<uint64_t>();
      p.segments.resize(def.disks.size());
      std::vector<bool> have(def.disks.size());
      for (const json& seg : c.at("segments")) {
        const int i = index_of(seg.at("disk").get<std::string>());
        if (i < 0) continue;
        p.segments[i] =
            PendingSegment{seg.at("number").get<uint64_t>(), seg.at("bytes").get<uint64_t>(),
                           seg.at("first_seq").get<uint64_t>(), seg.at("last_seq").get<uint64_t>()};
        have[i] = true;
      }
      for (size_t i = 0; i < have.size(); ++i) {
        if (!have[i]) {
          return Status::Corrupt(where + ": pending cycle " + std::to_string(p.info.cycle) +
                                 " has no segment of disk " + def.disks[i].name);
        }
      }
      s.pending.push_back(std::move(p));
    }
    s.last_sync_id = j.value("last_sync_id", uint64_t{0});
    if (j.contains("sync")) {
      const json& y = j.at("sync");
      SyncState sync;
      sync.sync_id = y.at("sync_id").get<uint64_t>();
      const std::string kind = y.at("kind").get<std::string>();
      const std::optional<SyncKind> k = SyncKindFromName(kind);
      if (!k) return Status::Corrupt(where + ": unknown sync kind \"" + kind + "\"");
      sync.kind = *k;
      sync.epoch = y.at("epoch").get<uint64_t>();
      sync.cut_unix_nanos = y.at("cut_unix_nanos").get<int64_t>();
      sync.staged = y.at("staged").get<bool>();
      sync.point = y.value("point", uint64_t{0});
      sync.bytes_written = y.value("bytes_written", uint64_t{0});
      sync.disks.resize(def.disks.size());
      std::vector<bool> have(def.disks.size());
      for (const json& d : y.at("disks")) {
        const int i = index_of(d.at("name").get<std::string>());
        if (i < 0) continue;
        SyncDiskState& disk = sync.disks[i];
        const std::string mode = d.at("mode").get<std::string>();
        const std::optional<SyncMode> m = SyncModeFromName(mode);
        if (!m) return Status::Corrupt(where + ": unknown sync mode \"" + mode + "\"");
        disk.mode = *m;
        disk.last_seq = d.at("last_seq").get<uint64_t>();
        disk.last_segment = d.at("last_segment").get<uint64_t>();
        disk.bytes_total = d.at("bytes_total").get<uint64_t>();
        disk.done_offset = d.at("done_offset").get<uint64_t>();
        disk.written_until = d.at("written_until").get<uint64_t>();
        disk.older_written_until = d.value("older_written_until", uint64_t{0});
        if (disk.done_offset > def.disks[i].size) {
          return Status::Corrupt(where + ": sync done offset " + std::to_string(disk.done_offset) +
                                 " is beyond the end of disk " + def.disks[i].name);
        }
        have[i] = true;
      }
      for (size_t i = 0; i < have.size(); ++i) {
        if (!have[i]) {
          return Status::Corrupt(where + ": the sync has no state of disk " + def.disks[i].name);
        }
      }
      if (sync.staged && sync.point != s.applied_cycle) {
        return Status::Corrupt(where + ": the staged sync keeps point " +
                               std::to_string(sync.point) + ", not the applied cycle " +
                               std::to_string(s.applied_cycle));
      }
      s.sync = std::move(sync);
    }
    s.cycle0_is_point = j.value("cycle0_is_point", false);
    if (j.contains("materialize")) {
      const json& m = j.at("materialize");
      s.materialize =
          MaterializeState{m.at("point").get<uint64_t>(), m.at("cut_unix_nanos").get<int64_t>()};
      if (s.sync) {
        return Status::Corrupt(where + ": a sync and a materialization are both unfinished");
      }
      if (s.materialize->point > s.applied_cycle) {
        return Status::Corrupt(where + ": point " + std::to_string(s.materialize->point) +
                               " being materialized is newer than the applied cycle " +
                               std::to_string(s.applied_cycle));
      }
    }
    return s;
  } catch (const json::exception& e) {
    return Status::Corrupt(where + ": " + e.what());
  }
}

Result<ReplicaDefinition> LoadDefinition(const fs::path& dir) {
  const fs::path path = dir / kDefinitionFile;
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return DefinitionFromJson(text, path.string());
}

Status StoreDefinition(const fs::path& dir, const ReplicaDefinition& def) {
  return WriteFileAtomic(dir / kDefinitionFile, DefinitionToJson(def));
}

Result<PositionState> LoadPosition(const fs::path& dir, const ReplicaDefinition& def) {
  const fs::path path = dir / kPositionFile;
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return PositionFromJson(text, def, path.string());
}

Status StorePosition(const fs::path& dir, const PositionState& state,
                     const ReplicaDefinition& def) {
  return WriteFileAtomic(dir / kPositionFile, PositionToJson(state, def));
}

}  // namespace siterep::applier
