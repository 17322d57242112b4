#include "control/outbound.h"

#include <spdlog/spdlog.h>

#include "common/file_util.h"
#include "common/time_util.h"
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

std::string PeerNames(const SiteConfig& site) {
  std::string out;
  for (const PeerConfig& p : site.peers) out += (out.empty() ? "" : ", ") + p.name;
  return out.empty() ? "none configured" : out;
}
}  // namespace

Outbound::Outbound(const SiteConfig& site, ProtectedVm* vm,
                   std::shared_ptr<const shipper::TlsContext> tls)
    : site_(site),
      vm_(vm),
      tls_(std::move(tls)),
      file_(site.state_dir / "vms" / vm->config->name / "replication.json"),
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
  return StartShipper();
}

Status Outbound::Persist(const ReplicationSettings& s) const {
  SR_RETURN_IF_ERROR(MakeDirs(file_.parent_path()));
  return WriteFileAtomic(file_, json{{"peer", s.peer}, {"paused", s.paused}}.dump() + "\n");
}

Status Outbound::Enable(const std::string& peer) {
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
  ReplicationSettings s{peer, false};
  SR_RETURN_IF_ERROR(Persist(s));
  settings_ = s;
  spdlog::info("VM {}: replication to {} enabled", name, peer);
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
  o.source = vm_->tracker.get();
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

std::optional<double> Outbound::RpoSeconds(int64_t now_nanos,
                                           const shipper::ShipperStats& st) const {
  if (st.oldest_unapplied_change_unix_nanos == 0) return 0.0;
  return std::max(0.0,
                  static_cast<double>(now_nanos - st.oldest_unapplied_change_unix_nanos) / kNanos);
}

void Outbound::Tick(int64_t now_nanos) {
  std::lock_guard lk(mu_);
  if (!shipper_) return;
  shipper::ShipperStats st = shipper_->Stats();
  if (st.connected)
    link_down_since_nanos_ = 0;
  else if (link_down_since_nanos_ == 0)
    link_down_since_nanos_ = now_nanos;
  if (!st.paused) monitor_.Observe(now_nanos, RpoSeconds(now_nanos, st).value_or(0));
}

void Outbound::Report(int64_t now_nanos, json* vm) const {
  std::lock_guard lk(mu_);
  json& out = *vm;
  if (settings_.peer.empty() || !shipper_) return;  // the daemon's defaults stand
  const shipper::ShipperStats st = shipper_->Stats();
  const std::optional<double> rpo = RpoSeconds(now_nanos, st);

  out["peer"] = settings_.peer;
  if (out["state"] == "not replicating") out["state"] = settings_.paused ? "paused" : "replicating";
  out["rpo_seconds"] = rpo ? json(*rpo) : json(nullptr);
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
  if (out.value("health", "normal") == "critical") {
    in.stopped_reason = out.value("health_reason", "");  // resync required, from the tracker
  } else if (settings_.paused) {
    in.stopped_reason =
        "replication paused by the operator (siterep resume " + vm_->config->name + ")";
  } else if (st.refused) {
    in.stopped_reason = "site " + settings_.peer + " refused replication: " + st.last_error;
  } else if (!st.peer_apply_error.empty()) {
    in.stopped_reason =
        "the replica at " + settings_.peer + " stopped applying: " + st.peer_apply_error;
  }
  if (!st.connected && link_down_since_nanos_ != 0) {
    in.link_down_reason =
        st.last_error.empty() ? "not connected to " + settings_.peer : st.last_error;
    in.link_down_seconds = static_cast<double>(now_nanos - link_down_since_nanos_) / kNanos;
  }
  const HealthVerdict v = JudgeHealth(in);
  out["health"] = HealthName(v.health);
  out["health_reason"] = v.reason;
}

}  // namespace siterep::control
