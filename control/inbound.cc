#include "control/inbound.h"

#include <algorithm>
#include <iterator>
#include <set>

#include <spdlog/spdlog.h>

#include "common/file_util.h"
#include "common/time_util.h"
#include "control/outbound.h"

namespace siterep::control {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {
constexpr double kNanos = 1e9;

bool SameDisks(const applier::ReplicaDefinition& a, const applier::ReplicaDefinition& b) {
  if (a.disks.size() != b.disks.size()) return false;
  for (size_t i = 0; i < a.disks.size(); ++i) {
    if (a.disks[i].name != b.disks[i].name || a.disks[i].size != b.disks[i].size ||
        a.disks[i].disk_id != b.disks[i].disk_id) {
      return false;
    }
  }
  return true;
}
const shipper::ReceiverVmStats* FindLink(const std::vector<shipper::ReceiverVmStats>& links,
                                         const std::string& vm) {
  for (const auto& l : links) {
    if (l.vm == vm) return &l;
  }
  return nullptr;
}

}  // namespace

Inbound::Inbound(const SiteConfig& site, std::shared_ptr<const shipper::TlsContext> tls)
    : site_(site),
      tls_(std::move(tls)),
      dir_(site.state_dir / "replicas"),
      started_nanos_(NowUnixNanos()) {}

Inbound::~Inbound() { Stop(); }

fs::path Inbound::ReplicaDir(const SiteConfig& site, const std::string& vm) {
  return site.state_dir / "replicas" / vm;
}

Status Inbound::Start(const std::vector<std::string>& vms, Admission admit,
                      PeerHandler peer_handler) {
  admit_ = std::move(admit);
  for (const std::string& vm : vms) {
    const fs::path dir = dir_ / vm;
    auto replica = applier::Replica::Open(dir);
    if (!replica.ok()) return replica.status().WithContext("replica " + dir.string());
    SR_RETURN_IF_ERROR(Add(std::move(*replica)));
  }
  if (site_.listen.empty()) return Status::Ok();
  if (!tls_) return Status::Invalid("site.listen is set but [tls] is missing");
  shipper::ReceiverOptions o;
  o.site = site_.name;
  o.listen = site_.listen;
  o.tls = tls_;
  for (const PeerConfig& p : site_.peers) o.allowed_peers.push_back(p.name);
  o.provider = [this](const std::string& peer, const applier::ReplicaDefinition& def) {
    return Provide(peer, def);
  };
  o.peer_handler = std::move(peer_handler);
  auto receiver = shipper::Receiver::Start(std::move(o));
  if (!receiver.ok()) return receiver.status().WithContext("replication listener " + site_.listen);
  receiver_ = std::move(*receiver);
  return Status::Ok();
}

Status Inbound::Add(std::shared_ptr<applier::Replica> replica) {
  const applier::ReplicaDefinition def = replica->Definition();
  SetGate(*replica, def.vm);
  SR_RETURN_IF_ERROR(replica->Start());
  auto entry = std::make_unique<Entry>(std::chrono::milliseconds(def.frequency_ms));
  entry->replica = std::move(replica);
  spdlog::info("replica of VM {} from {}: at cycle {}", def.vm, def.primary_site,
               entry->replica->Position().applied_cycle);
  std::lock_guard lk(mu_);
  replicas_[def.vm] = std::move(entry);
  return Status::Ok();
}

std::shared_ptr<applier::Replica> Inbound::Take(const std::string& vm) {
  // The connection first: once DropVm returns, no receiver thread uses the sink.
  if (receiver_) receiver_->DropVm(vm);
  std::unique_ptr<Entry> entry;
  {
    std::lock_guard lk(mu_);
    auto it = replicas_.find(vm);
    if (it == replicas_.end()) return nullptr;
    entry = std::move(it->second);
    replicas_.erase(it);
  }
  entry->replica->Stop();
  return std::move(entry->replica);
}

std::shared_ptr<applier::Replica> Inbound::Get(const std::string& vm) const {
  std::lock_guard lk(mu_);
  const Entry* e = Find(vm);
  return e == nullptr ? nullptr : e->replica;
}

void Inbound::Stop() {
  if (receiver_) receiver_->Stop();
  // Not under mu_: an applier in its gate takes mu_.
  std::vector<std::shared_ptr<applier::Replica>> all;
  {
    std::lock_guard lk(mu_);
    for (auto& [name, e] : replicas_) all.push_back(e->replica);
  }
  for (auto& r : all) r->Stop();
}

// --- Consistency groups -------------------------------------------------------------------

void Inbound::SetGate(applier::Replica& replica, const std::string& vm) {
  replica.SetApplyGate(
      [this, vm](const applier::CycleInfo& cycle) { return MayApply(vm, cycle); });
}

std::vector<std::shared_ptr<applier::Replica>> Inbound::Members(const std::string& group) const {
  std::vector<std::shared_ptr<applier::Replica>> all, members;
  {
    std::lock_guard lk(mu_);
    for (const auto& [name, e] : replicas_) all.push_back(e->replica);
  }
  for (auto& r : all) {
    if (r->Definition().consistency_group == group) members.push_back(std::move(r));
  }
  return members;
}

std::string Inbound::GroupOf(const std::string& vm) const {
  std::shared_ptr<applier::Replica> r = Get(vm);
  return r ? r->Definition().consistency_group : "";
}

std::vector<std::string> Inbound::GroupMembers(const std::string& group) const {
  std::vector<std::string> names;
  for (const auto& r : Members(group)) names.push_back(r->Definition().vm);
  return names;
}

std::optional<int64_t> Inbound::GroupInstant(const std::string& group) const {
  std::optional<std::set<int64_t>> common;
  for (const auto& r : Members(group)) {
    if (r->Points().empty()) continue;  // no consistent point yet: not counted
    const std::vector<int64_t> cuts = r->CommittedCuts();
    std::set<int64_t> mine(cuts.begin(), cuts.end());
    if (!common) {
      common = std::move(mine);
      continue;
    }
    std::set<int64_t> both;
    std::set_intersection(common->begin(), common->end(), mine.begin(), mine.end(),
                          std::inserter(both, both.end()));
    *common = std::move(both);
  }
  if (!common || common->empty()) return std::nullopt;
  return *common->rbegin();
}

void Inbound::HoldGroup(const std::string& group, std::optional<int64_t> instant) {
  {
    std::lock_guard lk(mu_);
    if (instant) {
      holds_[group] = *instant;
    } else {
      holds_.erase(group);
    }
  }
  for (const auto& r : Members(group)) r->Wake();
}

bool Inbound::MayApply(const std::string& vm, const applier::CycleInfo& cycle) const {
  std::shared_ptr<applier::Replica> self = Get(vm);
  // Not registered (being created, or taken for a failover): no group rule applies.
  if (!self) return true;
  const std::string group = self->Definition().consistency_group;
  if (group.empty()) return true;
  {
    std::lock_guard lk(mu_);
    if (auto it = holds_.find(group); it != holds_.end()) {
      return cycle.cut_unix_nanos <= it->second;
    }
  }
  const std::optional<int64_t> instant = GroupInstant(group);
  // No instant common to the counted members: wait for one (a member without a point is
  // not counted, so a lone member or a fresh group does not wait).
  return instant && cycle.cut_unix_nanos <= *instant;
}

Result<applier::SegmentSink*> Inbound::Provide(const std::string& peer,
                                               const applier::ReplicaDefinition& def) {
  if (def.primary_site != peer) {
    return Status::Error(
        EPERM, "site " + peer + " sent the definition of a VM of site " + def.primary_site);
  }
  if (admit_) SR_RETURN_IF_ERROR(admit_(peer, def));
  std::lock_guard lk(mu_);
  auto it = replicas_.find(def.vm);
  if (it != replicas_.end()) {
    applier::Replica& r = *it->second->replica;
    const applier::ReplicaDefinition& have = r.Definition();
    if (have.primary_site != peer) {
      return Status::Error(
          EPERM, "VM " + def.vm + " here replicates site " + have.primary_site + ", not " + peer);
    }
    if (!SameDisks(have, def)) {
      return Status::Error(
          EINVAL, "VM " + def.vm + ": the disks sent differ from the replica's (names or sizes)");
    }
    if (def.epoch < r.Position().epoch) {
      return Status::Error(ESTALE, "VM " + def.vm + ": epoch " + std::to_string(def.epoch) +
                                       " is older than the replica's " +
                                       std::to_string(r.Position().epoch));
    }
    SR_RETURN_IF_ERROR(r.UpdateDefinition(def));  // a newer epoch, changed point settings
    return static_cast<applier::SegmentSink*>(&r);
  }
  const fs::path dir = dir_ / def.vm;
  SR_RETURN_IF_ERROR(MakeDirs(dir));
  SR_ASSIGN_OR_RETURN(std::unique_ptr<applier::Replica> replica,
                      applier::Replica::Create(dir, def));
  SetGate(*replica, def.vm);
  SR_RETURN_IF_ERROR(replica->Start());
  auto entry = std::make_unique<Entry>(std::chrono::milliseconds(def.frequency_ms));
  entry->replica = std::move(replica);
  applier::SegmentSink* sink = entry->replica.get();
  replicas_[def.vm] = std::move(entry);
  return sink;
}

const Inbound::Entry* Inbound::Find(const std::string& vm) const {
  auto it = replicas_.find(vm);
  return it == replicas_.end() ? nullptr : it->second.get();
}

bool Inbound::HasVm(const std::string& vm) const {
  std::lock_guard lk(mu_);
  return Find(vm) != nullptr;
}

uint16_t Inbound::port() const { return receiver_ ? receiver_->port() : 0; }

std::optional<double> Inbound::RpoSeconds(int64_t now, const shipper::ReceiverVmStats* link,
                                          const applier::ReplicaPosition& pos) const {
  if (link == nullptr || link->last_contact_unix_nanos == 0) return std::nullopt;
  int64_t oldest = link->primary_oldest_unapplied_change_unix_nanos;
  // The primary's last word may be stale: what it told us covers changes up to our last
  // contact; if applied since, count from there; while the link is down, anything after
  // the last contact may be at risk.
  if (oldest != 0 && pos.applied_cut_unix_nanos >= oldest && link->connected) oldest = 0;
  if (!link->connected) {
    oldest = oldest == 0 ? link->last_contact_unix_nanos
                         : std::min(oldest, link->last_contact_unix_nanos);
  }
  if (oldest == 0) return 0.0;
  return std::max(0.0, static_cast<double>(now - oldest) / kNanos);
}

std::optional<double> Inbound::DataLossWindow(const std::string& vm,
                                              const applier::RecoveryPoint& point) const {
  if (!receiver_) return std::nullopt;
  const std::vector<shipper::ReceiverVmStats> links = receiver_->Stats();
  const shipper::ReceiverVmStats* link = FindLink(links, vm);
  if (link == nullptr || link->last_contact_unix_nanos == 0) return std::nullopt;
  if (point.latest && link->primary_oldest_unapplied_change_unix_nanos == 0) return 0.0;
  return std::max(0.0,
                  static_cast<double>(link->last_contact_unix_nanos - point.cut_unix_nanos) / kNanos);
}

void Inbound::Tick(int64_t now) {
  std::vector<shipper::ReceiverVmStats> links;
  if (receiver_) links = receiver_->Stats();
  std::lock_guard lk(mu_);
  for (auto& [name, e] : replicas_) {
    const shipper::ReceiverVmStats* link = FindLink(links, name);
    std::optional<double> rpo = RpoSeconds(now, link, e->replica->Position());
    if (rpo) e->monitor.Observe(now, *rpo);
  }
}

json Inbound::Report(int64_t now, const std::string& vm_filter) const {
  std::vector<shipper::ReceiverVmStats> links;
  if (receiver_) links = receiver_->Stats();
  json out = json::array();
  std::lock_guard lk(mu_);
  for (const auto& [name, e] : replicas_) {
    if (!vm_filter.empty() && name != vm_filter) continue;
    const applier::Replica& r = *e->replica;
    const applier::ReplicaDefinition& def = r.Definition();
    const applier::ReplicaPosition pos = r.Position();
    const shipper::ReceiverVmStats* link = FindLink(links, name);
    const std::optional<double> rpo = RpoSeconds(now, link, pos);
    json disks = json::array();
    for (const applier::DiskDefinition& d : def.disks) {
      disks.push_back({{"name", d.name},
                       {"size", d.size},
                       {"tracking", "off"},
                       {"image", (dir_ / name / (d.name + ".img")).string()},
                       {"path", (dir_ / name / (d.name + ".img")).string()}});
    }
    json points = json::array();
    for (const applier::RecoveryPoint& p : r.Points()) points.push_back(p.id);

    HealthInputs in;
    in.frequency = std::chrono::milliseconds(def.frequency_ms);
    in.rpo_seconds = rpo;
    in.missed_share = e->monitor.MissedShare(now);
    if (!pos.apply_error.empty()) in.stopped_reason = "apply stopped: " + pos.apply_error;
    const bool connected = link != nullptr && link->connected;
    if (!connected) {
      const int64_t since = link != nullptr && link->last_contact_unix_nanos != 0
                                ? link->last_contact_unix_nanos
                                : started_nanos_;
      in.link_down_reason = link != nullptr && !link->last_error.empty()
                                ? link->last_error
                                : "no connection from " + def.primary_site;
      in.link_down_seconds = static_cast<double>(now - since) / kNanos;
    }
    const applier::SyncStatus sync = r.Sync();
    if (sync.active) in.rpo_seconds.reset();
    HealthVerdict v = JudgeHealth(in);
    if (sync.active && sync.kind == applier::SyncKind::kResync && v.health == Health::kNormal) {
      v.health = Health::kWarning;
      v.reason = "resynchronising from " + def.primary_site;
    }
    std::string state = pos.apply_error.empty() ? "replicating" : "apply failed";
    json progress = IdleProgress();
    if (sync.active) {
      state = sync.kind == applier::SyncKind::kResync ? "resynchronising" : "initial replication";
      const double rate = link != nullptr && link->connected ? link->throughput_bytes_per_s : 0;
      progress = {{"percent", sync.bytes_total == 0
                                  ? 100.0
                                  : 100.0 * static_cast<double>(sync.bytes_done) /
                                        static_cast<double>(sync.bytes_total)},
                  {"bytes_done", sync.bytes_done},
                  {"bytes_total", sync.bytes_total},
                  {"bytes_written", sync.bytes_written},
                  {"rate_bytes_per_s", rate},
                  {"eta_seconds", rate > 0 ? json(static_cast<double>(sync.bytes_total -
                                                                      sync.bytes_done) /
                                                  rate)
                                           : json(nullptr)},
                  {"kind", applier::SyncKindName(sync.kind)}};
    }
    const uint64_t primary_pending = link != nullptr ? link->primary_pending_bytes : 0;
    json vm = {{"name", name},
               {"role", "replica"},
               {"peer", def.primary_site},
               {"epoch", pos.epoch},
               {"state", state},
               {"health", HealthName(v.health)},
               {"health_reason", v.reason},
               {"frequency", FrequencyName(std::chrono::milliseconds(def.frequency_ms))},
               {"rpo_seconds", rpo ? json(*rpo) : json(nullptr)},
               {"pending_bytes", pos.pending_bytes + primary_pending},
               {"received_cycle", pos.received_cycle},
               {"applied_cycle", pos.applied_cycle},
               {"last_cycle", pos.applied_cycle},
               {"last_cut", FormatUtc(pos.applied_cut_unix_nanos)},
               {"last_recovery_point", nullptr},
               {"recovery_points", points},
               {"progress", progress},
               {"disks", std::move(disks)}};
    // An initial copy has no consistent point until it ends; a resync keeps the one it had.
    if (pos.applied_cycle > 0 && !(sync.active && sync.kind != applier::SyncKind::kResync)) {
      vm["last_recovery_point"] = {{"id", pos.applied_cycle},
                                   {"time", FormatUtc(pos.applied_cut_unix_nanos)}};
    }
    if (!def.consistency_group.empty()) {
      vm["consistency_group"] = def.consistency_group;
      // Held: a cycle waits until every member has received its group instant.
      vm["apply_held"] = pos.apply_held;
    }
    if (link != nullptr) {
      const double ratio = link->bytes_wire == 0 ? 1.0
                                                 : static_cast<double>(link->bytes_raw) /
                                                       static_cast<double>(link->bytes_wire);
      vm["link"] = {{"state", link->connected ? "connected" : "disconnected"},
                    {"peer", def.primary_site},
                    // What ended the previous connection, while there is no new one.
                    {"last_error", link->connected ? std::string() : link->last_error},
                    {"last_contact", FormatUtc(link->last_contact_unix_nanos)},
                    {"throughput_bytes_per_s", link->throughput_bytes_per_s},
                    {"compression_ratio", ratio},
                    {"bytes_received", link->bytes_wire},
                    {"bytes_raw", link->bytes_raw}};
    } else {
      vm["link"] = {{"state", "disconnected"}, {"peer", def.primary_site}};
    }
    out.push_back(std::move(vm));
  }
  return out;
}

Result<json> Inbound::Points(const std::string& vm) const {
  std::lock_guard lk(mu_);
  const Entry* e = Find(vm);
  if (e == nullptr)
    return Status::Error(ENOENT, "no replica of VM '" + vm + "' at site " + site_.name);
  json points = json::array();
  for (const applier::RecoveryPoint& p : e->replica->Points()) {
    points.push_back({{"id", p.id},
                      {"time", FormatUtc(p.cut_unix_nanos)},
                      {"latest", p.latest},
                      {"consistent", true}});  // a point is a whole cycle of every disk
  }
  return json{{"vm", vm}, {"points", points}};
}

Status Inbound::Export(const std::string& vm, const std::string& disk, uint64_t point,
                       const fs::path& out) const {
  std::shared_ptr<applier::Replica> replica = Get(vm);
  if (replica == nullptr) {
    return Status::Error(ENOENT, "no replica of VM '" + vm + "' at site " + site_.name);
  }
  const applier::ReplicaDefinition def = replica->Definition();
  for (size_t i = 0; i < def.disks.size(); ++i) {
    // Copies a whole disk: done without mu_, so status and the receiver go on meanwhile.
    if (def.disks[i].name == disk) return replica->ExportPoint(point, i, out);
  }
  return Status::Error(ENOENT, "VM " + vm + " has no disk '" + disk + "'");
}

}  // namespace siterep::control
