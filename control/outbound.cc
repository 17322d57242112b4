#include "control/outbound.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>

#include <ctime>

#include "common/file_util.h"
#include "common/time_util.h"
#include "common/units.h"
#include "tracker/log_format.h"

namespace siterep::control {

using nlohmann::json;

namespace {
constexpr double kNanos = 1e9;

const PeerConfig* FindPeer(const SiteConfig& site, const std::string& name) {
  for (const PeerConfig& p : site.peers) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

std::optional<applier::SyncKind> SyncKindFromName(const std::string& name) {
  for (applier::SyncKind k :
       {applier::SyncKind::kInitial, applier::SyncKind::kSeeded, applier::SyncKind::kResync}) {
    if (applier::SyncKindName(k) == name) return k;
  }
  return std::nullopt;
}

int LocalMinuteOfDay(int64_t unix_nanos) {
  const std::time_t t = static_cast<std::time_t>(unix_nanos / 1'000'000'000);
  std::tm tm{};
  localtime_r(&t, &tm);
  return tm.tm_hour * 60 + tm.tm_min;
}

std::string PeerNames(const SiteConfig& site) {
  std::string out;
  for (const PeerConfig& p : site.peers) out += (out.empty() ? "" : ", ") + p.name;
  return out.empty() ? "none configured" : out;
}
}  // namespace

json IdleProgress() {
  return {{"percent", 100.0},
          {"bytes_done", 0},
          {"bytes_total", 0},
          {"rate_bytes_per_s", 0},
          {"eta_seconds", 0}};
}

Outbound::Outbound(const SiteConfig& site, ProtectedVm* vm,
                   std::shared_ptr<const shipper::TlsContext> tls)
    : site_(site),
      vm_(vm),
      tls_(std::move(tls)),
      file_(site.state_dir / "vms" / vm->config->name / "replication.json"),
      sync_file_(site.state_dir / "vms" / vm->config->name / "sync.json"),
      monitor_(vm->config->frequency) {}

Outbound::~Outbound() { Stop(); }

Status Outbound::Load() {
  if (!std::filesystem::exists(file_)) return Status::Ok();
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(file_));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("peer") || !j["peer"].is_string()) {
    return Status::Corrupt(file_.string() +
                           " is damaged: expected {\"peer\": NAME, \"paused\": BOOL}");
  }
  ReplicationSettings s;
  s.peer = j["peer"].get<std::string>();
  s.paused = j.value("paused", false);
  if (FindPeer(site_, s.peer) == nullptr) {
    return Status::Invalid("VM " + vm_->config->name + " replicates to '" + s.peer + "' (" +
                           file_.string() + "), which is not in [[peers]] any more");
  }
  std::lock_guard lk(mu_);
  settings_ = s;
  if (std::filesystem::exists(sync_file_) && vm_->tracker) {
    SR_ASSIGN_OR_RETURN(std::string sync_text, ReadFile(sync_file_));
    json sj = json::parse(sync_text, nullptr, /*allow_exceptions=*/false);
    std::optional<applier::SyncKind> kind;
    if (sj.is_object() && sj.contains("kind") && sj["kind"].is_string()) {
      kind = SyncKindFromName(sj["kind"].get<std::string>());
    }
    if (!kind) {
      return Status::Corrupt(sync_file_.string() +
                             " is damaged: expected {\"kind\": initial|seeded|resync, ...}");
    }
    // The snapshot of the interrupted sync is gone: take a new one. A resync's set of
    // dirty blocks went with it, so it compares every block now.
    const bool full = *kind == applier::SyncKind::kResync || sj.value("full", false);
    spdlog::info("VM {}: the {} sync to {} was interrupted; it starts again from a new snapshot",
                 vm_->config->name, applier::SyncKindName(*kind), s.peer);
    SR_RETURN_IF_ERROR(BeginSync(*kind, full));
  }
  return StartShipper();
}

Status Outbound::Persist(const ReplicationSettings& s) const {
  return WriteSettings(site_, vm_->config->name, s);
}

Status Outbound::WriteSettings(const SiteConfig& site, const std::string& vm,
                               const ReplicationSettings& s) {
  const std::filesystem::path file = site.state_dir / "vms" / vm / "replication.json";
  SR_RETURN_IF_ERROR(MakeDirs(file.parent_path()));
  return WriteFileAtomic(file, json{{"peer", s.peer}, {"paused", s.paused}}.dump() + "\n");
}

Status Outbound::Forget(const SiteConfig& site, const std::string& vm) {
  for (const char* name : {"sync.json", "replication.json"}) {
    const std::filesystem::path file = site.state_dir / "vms" / vm / name;
    std::error_code ec;
    std::filesystem::remove(file, ec);
    if (ec) return Status::FromErrno(ec.value(), "remove " + file.string());
  }
  return SyncDir(site.state_dir / "vms" / vm);
}

Status Outbound::BeginSync(applier::SyncKind kind, bool full, const DiskRanges* compare) {
  const VmConfig& cfg = *vm_->config;
  SR_RETURN_IF_ERROR(MakeDirs(sync_file_.parent_path()));
  SR_RETURN_IF_ERROR(WriteFileAtomic(
      sync_file_, json{{"kind", applier::SyncKindName(kind)}, {"full", full}}.dump() + "\n"));
  Result<tracker::SnapshotInfo> info = vm_->tracker->StartSnapshot();
  if (!info.ok()) return info.status().WithContext("VM " + cfg.name + ": snapshot");
  std::vector<int> fds;
  for (const ProtectedDisk& d : vm_->disks) fds.push_back(d.fd.get());
  shipper::SyncJob job = shipper::PlanSync(*info, kind, full, vm_->epoch, fds);
  applier::SyncPlan& plan = job.plan;
  if (compare != nullptr) {
    // Widened to the comparison's blocks, added to what the snapshot knows is dirty.
    constexpr uint64_t kBlock = tracker::kSnapshotBlockSize;
    for (size_t i = 0; i < job.ranges.size() && i < vm_->disks.size(); ++i) {
      auto it = compare->find(vm_->disks[i].name);
      if (it == compare->end()) continue;
      const uint64_t size = vm_->disks[i].size;
      std::vector<tracker::ByteRange> wide;
      for (const tracker::ByteRange& r : it->second) {
        if (r.length == 0 || r.offset >= size) continue;
        const uint64_t start = r.offset / kBlock * kBlock;
        const uint64_t end =
            std::min(size, (std::min(size, r.offset + r.length) + kBlock - 1) / kBlock * kBlock);
        wide.push_back({start, end - start});
      }
      job.ranges[i] = UnionRanges(job.ranges[i], UnionRanges(wide, {}));
      plan.disks[i].bytes_total = tracker::RangeBytes(job.ranges[i]);
    }
  }
  uint64_t total = 0;
  for (const applier::SyncDiskPlan& d : plan.disks) total += d.bytes_total;
  spdlog::info("VM {}: {} sync {} to {}: snapshot at cycle {}, {} to {}", cfg.name,
               applier::SyncKindName(kind), plan.sync_id, settings_.peer, info->cycle,
               FormatSize(total), kind == applier::SyncKind::kInitial ? "copy" : "compare");
  std::lock_guard lk(sync_mu_);
  owed_ = OwedSync{kind, full};
  plan_ = std::move(plan);
  compare_ranges_ = std::move(job.ranges);
  return Status::Ok();
}

std::optional<applier::SyncPlan> Outbound::Plan() {
  std::lock_guard lk(sync_mu_);
  return plan_;
}

std::vector<tracker::ByteRange> Outbound::CompareRanges(size_t disk) {
  std::lock_guard lk(sync_mu_);
  return disk < compare_ranges_.size() ? compare_ranges_[disk] : std::vector<tracker::ByteRange>{};
}

Status Outbound::Read(size_t disk, uint64_t offset, std::span<std::byte> out) {
  // The sync reads on in increasing offsets: let the kernel read the next 32 MiB of the
  // image meanwhile (a hint; the snapshot's saved blocks are few).
  if (disk < vm_->disks.size()) {
    (void)::posix_fadvise(vm_->disks[disk].fd.get(), static_cast<off_t>(offset + out.size()),
                          32 << 20, POSIX_FADV_WILLNEED);
  }
  return vm_->tracker->ReadSnapshot(disk, offset, out);
}

Result<std::vector<tracker::ByteRange>> Outbound::DataRanges(size_t disk, uint64_t from,
                                                             uint64_t to) {
  return vm_->tracker->SnapshotDataRanges(disk, from, to);
}

void Outbound::Copied(size_t disk, uint64_t offset) { vm_->tracker->SnapshotCopied(disk, offset); }

Status Outbound::Finished(uint64_t sync_id) {
  std::lock_guard lk(sync_mu_);
  if (!plan_ || plan_->sync_id != sync_id) return Status::Ok();  // already done
  SR_RETURN_IF_ERROR(vm_->tracker->EndSnapshot(true));
  // The replica holds the snapshot, which includes every cycle up to its cut.
  Status released = vm_->tracker->ReleaseThrough(sync_id);
  if (!released.ok()) {
    spdlog::warn("VM {}: releasing segments through cycle {}: {}", vm_->config->name, sync_id,
                 released.ToString());
  }
  std::error_code ec;
  std::filesystem::remove(sync_file_, ec);
  if (ec) return Status::FromErrno(ec.value(), "remove " + sync_file_.string());
  spdlog::info("VM {}: {} sync {} done; the replica is a consistent copy", vm_->config->name,
               applier::SyncKindName(plan_->kind), sync_id);
  owed_.reset();
  plan_.reset();
  compare_ranges_.clear();
  return Status::Ok();
}

Status Outbound::Resync(bool full) {
  std::lock_guard lk(mu_);
  return ResyncLocked("requested by the operator", full);
}

Status Outbound::ResyncLocked(const std::string& why, bool full) {
  const std::string& name = vm_->config->name;
  if (settings_.peer.empty()) {
    return Status::Error(
        EINVAL, "VM " + name + " is not replicated (siterep enable " + name + " --to SITE)");
  }
  {
    std::lock_guard lk(sync_mu_);
    if (owed_) {
      return Status::Error(EBUSY, "VM " + name + " has a " +
                                      std::string(applier::SyncKindName(owed_->kind)) +
                                      " sync running already");
    }
  }
  if (shipper_) {
    // A replica whose apply stopped on a bad record may hold anything: compare everything.
    if (!shipper_->Stats().peer_apply_error.empty()) full = true;
    shipper_->Stop();
    shipper_.reset();
  }
  spdlog::info("VM {}: resync to {} ({}{})", name, settings_.peer, why,
               full ? ", every block compared" : "");
  Status s = BeginSync(applier::SyncKind::kResync, full);
  Status started = StartShipper();
  return s.ok() ? started : s;
}

void Outbound::MaybeAutoResync(int64_t now_nanos) {
  const VmConfig& cfg = *vm_->config;
  if (!cfg.auto_resync || settings_.peer.empty() || !vm_->tracker) return;
  {
    std::lock_guard lk(sync_mu_);
    if (owed_) return;
  }
  bool needed = false;
  for (const tracker::DiskStats& d : vm_->tracker->Stats().disks) needed |= d.resync_required;
  if (!needed) return;
  if (!InResyncWindow(cfg, LocalMinuteOfDay(now_nanos))) return;
  // A failing attempt is retried once a minute, not every second.
  if (last_auto_resync_nanos_ != 0 && now_nanos - last_auto_resync_nanos_ < 60'000'000'000) return;
  last_auto_resync_nanos_ = now_nanos;
  Status s = ResyncLocked("automatic: a disk needs it", false);
  if (!s.ok()) spdlog::warn("VM {}: automatic resync: {}", cfg.name, s.ToString());
}

Status Outbound::Enable(const std::string& peer, applier::SyncKind kind,
                        const DiskRanges* compare) {
  const std::string& name = vm_->config->name;
  std::lock_guard lk(mu_);
  if (FindPeer(site_, peer) == nullptr) {
    return Status::Error(ENOENT, "unknown site '" + peer + "' (peers: " + PeerNames(site_) + ")");
  }
  if (!settings_.peer.empty()) {
    return Status::Error(EEXIST, "VM " + name + " is already replicated to " + settings_.peer);
  }
  if (!vm_->tracker) {
    return Status::Error(EINVAL, "VM " + name + " has tracking = \"off\": nothing to replicate");
  }
  if (!tls_) {
    return Status::Error(EINVAL, "site " + site_.name + " has no [tls] certificates");
  }
  {
    std::lock_guard sl(sync_mu_);
    if (owed_) return Status::Error(EBUSY, "VM " + name + " has a sync under way");
  }
  ReplicationSettings s{peer, false};
  settings_ = s;  // BeginSync names the peer
  // sync.json before replication.json: a crash in between leaves a sync.json without a
  // peer, which Load ignores.
  Status begun = BeginSync(kind, kind == applier::SyncKind::kResync && compare == nullptr, compare);
  if (begun.ok()) begun = Persist(s);
  if (!begun.ok()) {
    settings_ = ReplicationSettings{};
    (void)vm_->tracker->EndSnapshot(false);
    std::lock_guard sl(sync_mu_);
    owed_.reset();
    plan_.reset();
    std::error_code ec;
    std::filesystem::remove(sync_file_, ec);
    return begun;
  }
  spdlog::info("VM {}: replication to {} enabled ({})", name, peer,
               kind == applier::SyncKind::kInitial ? "full copy" : "only differing blocks");
  return StartShipper();
}

Status Outbound::StartShipper() {
  if (settings_.peer.empty() || shipper_) return Status::Ok();
  if (!tls_) return Status::Invalid("site " + site_.name + " has no [tls] certificates");
  if (!vm_->tracker) return Status::Invalid("VM " + vm_->config->name + " is not tracked");
  const PeerConfig* peer = FindPeer(site_, settings_.peer);
  const VmConfig& cfg = *vm_->config;

  shipper::ShipperOptions o;
  o.site = site_.name;
  o.peer = peer->name;
  o.peer_address = peer->address;
  o.tls = tls_;
  o.definition.vm = cfg.name;
  o.definition.primary_site = site_.name;
  o.definition.epoch = vm_->epoch;
  for (const ProtectedDisk& d : vm_->disks) {
    o.definition.disks.push_back({d.name, tracker::DiskIdFor(cfg.name, d.name), d.size});
  }
  o.definition.recovery_points = cfg.recovery_points;
  o.definition.recovery_point_interval_ms = cfg.recovery_point_interval.count();
  o.definition.frequency_ms = cfg.frequency.count();
  o.definition.consistency_group = cfg.consistency_group;
  o.source = vm_->tracker.get();
  o.sync = this;
  o.bandwidth_limit = peer->bandwidth_limit;
  o.compress = peer->compress;
  tracker::VmTracker* tracker = vm_->tracker.get();
  o.open_cycle_first_change = [tracker] { return tracker->Stats().open_first_change_unix_nanos; };
  SR_ASSIGN_OR_RETURN(shipper_, shipper::Shipper::Start(std::move(o)));
  if (settings_.paused) shipper_->Pause();
  return Status::Ok();
}

Status Outbound::Pause() {
  std::lock_guard lk(mu_);
  if (settings_.peer.empty()) {
    return Status::Error(EINVAL, "VM " + vm_->config->name + " is not replicated");
  }
  ReplicationSettings s = settings_;
  s.paused = true;
  SR_RETURN_IF_ERROR(Persist(s));
  settings_ = s;
  if (shipper_) shipper_->Pause();
  return Status::Ok();
}

Status Outbound::Resume() {
  std::lock_guard lk(mu_);
  if (settings_.peer.empty()) {
    return Status::Error(EINVAL, "VM " + vm_->config->name + " is not replicated");
  }
  ReplicationSettings s = settings_;
  s.paused = false;
  SR_RETURN_IF_ERROR(Persist(s));
  settings_ = s;
  if (shipper_) shipper_->Resume();
  return Status::Ok();
}

void Outbound::Stop() {
  std::unique_ptr<shipper::Shipper> s;
  {
    std::lock_guard lk(mu_);
    s = std::move(shipper_);
  }
  if (s) s->Stop();
}

bool Outbound::enabled() const {
  std::lock_guard lk(mu_);
  return !settings_.peer.empty();
}

std::string Outbound::peer() const {
  std::lock_guard lk(mu_);
  return settings_.peer;
}

bool Outbound::sync_owed() const {
  std::lock_guard lk(sync_mu_);
  return owed_.has_value();
}

std::optional<shipper::ShipperStats> Outbound::LinkStats() const {
  std::lock_guard lk(mu_);
  if (!shipper_) return std::nullopt;
  return shipper_->Stats();
}

std::optional<double> Outbound::RpoSeconds(int64_t now_nanos,
                                           const shipper::ShipperStats& st) const {
  if (st.oldest_unapplied_change_unix_nanos == 0) return 0.0;
  return std::max(0.0,
                  static_cast<double>(now_nanos - st.oldest_unapplied_change_unix_nanos) / kNanos);
}

void Outbound::Tick(int64_t now_nanos) {
  std::lock_guard lk(mu_);
  MaybeAutoResync(now_nanos);
  if (!shipper_) return;
  shipper::ShipperStats st = shipper_->Stats();
  if (st.connected)
    link_down_since_nanos_ = 0;
  else if (link_down_since_nanos_ == 0)
    link_down_since_nanos_ = now_nanos;
  // While a sync runs there is no RPO to judge cycles by.
  if (!st.paused && !st.sync.active) {
    monitor_.Observe(now_nanos, RpoSeconds(now_nanos, st).value_or(0));
  }
}

void Outbound::Report(int64_t now_nanos, json* vm) const {
  std::lock_guard lk(mu_);
  json& out = *vm;
  if (settings_.peer.empty() || !shipper_) return;  // the daemon's defaults stand
  const shipper::ShipperStats st = shipper_->Stats();
  const std::optional<double> rpo = RpoSeconds(now_nanos, st);

  std::optional<OwedSync> owed;
  std::vector<std::vector<tracker::ByteRange>> ranges;
  {
    std::lock_guard sl(sync_mu_);
    owed = owed_;
    ranges = compare_ranges_;
  }

  out["peer"] = settings_.peer;
  if (owed) {
    out["state"] =
        owed->kind == applier::SyncKind::kResync ? "resynchronising" : "initial replication";
    ReportSync(st, ranges, &out);
  } else if (out["state"] == "not replicating") {
    out["state"] = settings_.paused ? "paused" : "replicating";
  }
  if (!owed && st.sync.sync_id != 0) {
    // The sync this daemon ran last (since it started): what it cost on the link.
    out["last_sync"] = {{"id", st.sync.sync_id},
                        {"kind", applier::SyncKindName(st.sync.kind)},
                        {"bytes_total", st.sync.bytes_total},
                        {"bytes_sent", st.sync.bytes_data},
                        {"bytes_wire", st.sync.bytes_wire}};
  }
  out["rpo_seconds"] =
      rpo && !(owed && owed->kind != applier::SyncKind::kResync) ? json(*rpo) : json(nullptr);
  if (st.applied_cycle > 0) {
    out["last_recovery_point"] = {{"id", st.applied_cycle},
                                  {"time", FormatUtc(st.applied_cut_unix_nanos)}};
  }
  out["acked_cycle"] = st.acked_cycle;
  out["applied_cycle"] = st.applied_cycle;
  const double ratio = st.bytes_wire == 0
                           ? 1.0
                           : static_cast<double>(st.bytes_raw) / static_cast<double>(st.bytes_wire);
  out["link"] = {{"state", st.connected ? "connected" : (st.refused ? "refused" : "connecting")},
                 {"peer", settings_.peer},
                 {"last_error", st.last_error},
                 {"last_contact", FormatUtc(st.last_contact_unix_nanos)},
                 {"throughput_bytes_per_s", st.throughput_bytes_per_s},
                 {"compression_ratio", ratio},
                 {"bytes_sent", st.bytes_wire},
                 {"bytes_raw", st.bytes_raw},
                 {"connects", st.connects}};

  HealthInputs in;
  in.frequency = vm_->config->frequency;
  in.rpo_seconds = rpo;
  in.missed_share = monitor_.MissedShare(now_nanos);
  if (owed) {
    in.rpo_seconds.reset();  // no RPO to judge while the replica is being brought in line
  }
  if (out.value("health", "normal") == "warning") {
    in.stalled_reason = out.value("health_reason", "");  // a cycle build failing, from the tracker
  }
  if (out.value("health", "normal") == "critical" && !owed) {
    in.stopped_reason = out.value("health_reason", "");  // resync required, from the tracker
  } else if (settings_.paused) {
    in.stopped_reason =
        "replication paused by the operator (siterep resume " + vm_->config->name + ")";
  } else if (st.refused) {
    in.stopped_reason = "site " + settings_.peer + " refused replication: " + st.last_error;
  } else if (!st.peer_apply_error.empty() && !(owed && owed->kind == applier::SyncKind::kResync)) {
    // A resync under way repairs what stopped the apply (the replica drops those cycles
    // when it begins), as it does a disk's lost tracking above: Warning, not Critical.
    in.stopped_reason =
        "the replica at " + settings_.peer + " stopped applying: " + st.peer_apply_error;
  }
  if (!st.connected && link_down_since_nanos_ != 0) {
    in.link_down_reason =
        st.last_error.empty() ? "not connected to " + settings_.peer : st.last_error;
    in.link_down_seconds = static_cast<double>(now_nanos - link_down_since_nanos_) / kNanos;
  }
  HealthVerdict v = JudgeHealth(in);
  if (owed && owed->kind == applier::SyncKind::kResync && v.health == Health::kNormal) {
    v.health = Health::kWarning;
    v.reason = "resynchronising with " + settings_.peer;
  }
  out["health"] = HealthName(v.health);
  out["health_reason"] = v.reason;
}

void Outbound::ReportSync(const shipper::ShipperStats& st,
                          const std::vector<std::vector<tracker::ByteRange>>& ranges,
                          json* vm) const {
  // Live progress: what this connection scanned (it starts at the replica's durable
  // position), never less than what the replica holds durably.
  const uint64_t total = st.sync.bytes_total;
  uint64_t done = std::max(st.sync.bytes_done, st.connected ? st.sync.bytes_scanned : 0);
  if (total > 0) done = std::min(done, total);
  const double rate = st.connected ? st.sync.rate_bytes_per_s : 0;
  auto progress = [&](uint64_t d, uint64_t t) {
    json p = {{"percent", t == 0 ? 100.0 : 100.0 * static_cast<double>(d) / static_cast<double>(t)},
              {"bytes_done", d},
              {"bytes_total", t},
              {"rate_bytes_per_s", rate},
              {"eta_seconds", rate > 0 ? json(static_cast<double>(t - d) / rate) : json(nullptr)}};
    return p;
  };
  json& out = *vm;
  out["progress"] = progress(done, total);
  out["progress"]["kind"] = applier::SyncKindName(st.sync.kind);
  out["progress"]["bytes_sent"] = st.sync.bytes_data;
  out["progress"]["bytes_wire"] = st.sync.bytes_wire;
  // Per disk: the disks go one after another, so the live figure fills them in order.
  uint64_t left = done;
  for (size_t i = 0; i < ranges.size() && i < out["disks"].size(); ++i) {
    const uint64_t t = tracker::RangeBytes(ranges[i]);
    uint64_t d = std::min(left, t);
    if (i < st.sync.disk_done.size())
      d = std::max(d, tracker::RangeBytesBelow(ranges[i], st.sync.disk_done[i]));
    left -= std::min(left, t);
    out["disks"][i]["progress"] = progress(std::min(d, t), t);
  }
}

}  // namespace siterep::control
