#include "control/daemon.h"

#include <spdlog/spdlog.h>

#include "common/failpoint.h"
#include "common/file_util.h"
#include "common/time_util.h"

namespace siterep::control {

using nlohmann::json;

Daemon::Daemon(SiteConfig config, DaemonOptions options)
    : config_(std::move(config)), options_(options) {}

Daemon::~Daemon() { (void)Shutdown(); }

Result<std::unique_ptr<Daemon>> Daemon::Start(SiteConfig config, DaemonOptions options) {
  std::unique_ptr<Daemon> d(new Daemon(std::move(config), options));
  SR_RETURN_IF_ERROR(MakeDirs(d->config_.state_dir));

  if (!d->config_.tls.ca.empty()) {
    auto tls =
        shipper::TlsContext::Create({d->config_.tls.ca, d->config_.tls.cert, d->config_.tls.key});
    if (!tls.ok()) return tls.status().WithContext("[tls]");
    d->tls_ = std::move(*tls);
  }

  std::vector<blockdev::ExportedDisk> exported;
  for (const VmConfig& vm_config : d->config_.vms) {
    SR_ASSIGN_OR_RETURN(auto vm,
                        OpenProtectedVm(vm_config, d->config_.state_dir, d->options_.archive_logs));
    for (ProtectedDisk& disk : vm->disks) {
      exported.push_back({vm_config.name, disk.name, disk.backend.get()});
    }
    spdlog::info("VM {}: {} disk(s), epoch {}, tracking {}", vm_config.name, vm->disks.size(),
                 vm->epoch, TrackingModeName(vm_config.tracking));
    d->vms_.push_back(std::move(vm));
  }

  SR_ASSIGN_OR_RETURN(d->fuse_,
                      blockdev::FuseFs::Mount(d->config_.mountpoint, std::move(exported)));
  spdlog::info("disks mounted at {}", d->config_.mountpoint.string());

  d->inbound_ = std::make_unique<Inbound>(d->config_, d->tls_);
  SR_RETURN_IF_ERROR(d->inbound_->Start());
  for (auto& vm : d->vms_) {
    auto out = std::make_unique<Outbound>(d->config_, vm.get(), d->tls_);
    Status loaded = out->Load();
    if (!loaded.ok()) return loaded.WithContext("VM " + vm->config->name + " replication");
    d->outbound_.push_back(std::move(out));
  }

  Daemon* self = d.get();
  SR_RETURN_IF_ERROR(d->control_.Start(d->config_.control_socket,
                                       [self](const json& r) { return self->Handle(r); }));
  spdlog::info("control socket {}", d->config_.control_socket.string());

  if (d->options_.discard_sealed) {
    spdlog::warn("--discard-sealed: sealed log segments are dropped (benchmark mode)");
    d->discard_thread_ = std::thread([self] { self->DiscardLoop(); });
  }
  d->monitor_thread_ = std::thread([self] { self->MonitorLoop(); });
  return d;
}

siterep::Status Daemon::Run() {
  siterep::Status status = fuse_->Run();
  RequestStop();
  siterep::Status shutdown = Shutdown();
  return status.ok() ? shutdown : status;
}

void Daemon::RequestStop() {
  {
    std::lock_guard lock(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (fuse_) fuse_->Stop();
}

siterep::Status Daemon::Shutdown() {
  control_.Stop();
  {
    std::lock_guard lock(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (discard_thread_.joinable()) discard_thread_.join();
  if (monitor_thread_.joinable()) monitor_thread_.join();
  for (auto& out : outbound_) out->Stop();
  if (inbound_) inbound_->Stop();
  fuse_.reset();  // unmounts; in-flight requests are answered first
  siterep::Status result;
  for (auto& vm : vms_) {
    if (!vm->tracker) continue;
    siterep::Status s = vm->tracker->Close();
    if (!s.ok()) {
      spdlog::error("VM {}: closing the change logs: {}", vm->config->name, s.message());
      if (result.ok()) result = s;
    }
  }
  outbound_.clear();
  inbound_.reset();
  vms_.clear();  // closes and unlocks the images
  return result;
}

void Daemon::MonitorLoop() {
  std::unique_lock lock(stop_mu_);
  while (!stop_cv_.wait_for(lock, std::chrono::seconds(1), [this] { return stopping_; })) {
    lock.unlock();
    const int64_t now = NowUnixNanos();
    for (auto& out : outbound_) out->Tick(now);
    if (inbound_) inbound_->Tick(now);
    lock.lock();
  }
}

void Daemon::DiscardLoop() {
  std::unique_lock lock(stop_mu_);
  while (!stop_cv_.wait_for(lock, std::chrono::milliseconds(200), [this] { return stopping_; })) {
    lock.unlock();
    for (size_t i = 0; i < vms_.size(); ++i) {
      auto& vm = vms_[i];
      if (!vm->tracker || (i < outbound_.size() && outbound_[i]->enabled())) continue;
      uint64_t through = 0;
      for (const auto& seg : vm->tracker->SealedSegments()) through = std::max(through, seg.cycle);
      if (through > 0) (void)vm->tracker->ReleaseThrough(through);
    }
    lock.lock();
  }
}

json Daemon::StatusReport(const std::string& vm_filter) const {
  json vms = json::array();
  const int64_t now = NowUnixNanos();
  for (size_t vi = 0; vi < vms_.size(); ++vi) {
    const auto& vm = vms_[vi];
    const VmConfig& cfg = *vm->config;
    if (!vm_filter.empty() && cfg.name != vm_filter) continue;
    tracker::VmStats stats;
    if (vm->tracker) stats = vm->tracker->Stats();
    json disks = json::array();
    uint64_t pending = 0;
    std::string reasons;
    for (size_t i = 0; i < vm->disks.size(); ++i) {
      const ProtectedDisk& disk = vm->disks[i];
      json d = {{"name", disk.name},
                {"size", disk.size},
                {"image", disk.image.string()},
                {"path", (config_.mountpoint / cfg.name / disk.name).string()},
                {"tracking", "off"},
                {"pending_bytes", 0},
                {"last_seq", 0},
                {"last_cut", ""},
                {"resync_required", false},
                {"resync_reason", ""},
                {"dirty_bytes", 0}};
      if (vm->tracker) {
        const tracker::DiskStats& ds = stats.disks[i];
        d["tracking"] = tracker::DiskTrackingName(ds.tracking);
        d["pending_bytes"] = ds.unshipped_bytes;
        d["last_seq"] = ds.last_seq;
        d["last_cut"] = FormatUtc(ds.last_cut_unix_nanos);
        d["resync_required"] = ds.resync_required;
        d["resync_reason"] = ds.resync_reason;
        d["dirty_bytes"] = ds.dirty_bytes;
        pending += ds.unshipped_bytes;
        if (ds.resync_required) {
          if (!reasons.empty()) reasons += "; ";
          reasons += "disk " + disk.name + ": resync required (" + ds.resync_reason + ")";
        }
      }
      disks.push_back(std::move(d));
    }
    // A VM is "not replicating" until `siterep enable`; Outbound::Report then fills in the
    // link, RPO and health. A disk that lost its log needs a resync (critical).
    std::string state = "not replicating";
    std::string health = "normal";
    if (!reasons.empty()) {
      state = "resync required";
      health = "critical";
    }
    vms.push_back({{"name", cfg.name},
                   {"role", "primary"},
                   {"peer", nullptr},
                   {"epoch", vm->epoch},
                   {"state", state},
                   {"health", health},
                   {"health_reason", reasons},
                   {"frequency", cfg.frequency_text},
                   {"tracking", TrackingModeName(cfg.tracking)},
                   {"image_cache", cfg.image_cache == ImageCache::kNone ? "none" : "writeback"},
                   {"rpo_seconds", nullptr},
                   {"pending_bytes", pending},
                   {"last_cycle", stats.last_cycle},
                   {"last_cut", FormatUtc(stats.last_cut_unix_nanos)},
                   {"last_recovery_point", nullptr},
                   {"progress", IdleProgress()},
                   {"disks", std::move(disks)}});
    if (vi < outbound_.size()) outbound_[vi]->Report(now, &vms.back());
  }
  if (inbound_) {
    for (json& r : inbound_->Report(now, vm_filter)) vms.push_back(std::move(r));
  }
  return {{"site", config_.name}, {"mountpoint", config_.mountpoint.string()}, {"vms", vms}};
}

json Daemon::Handle(const json& request) {
  const std::string op = request["op"].get<std::string>();
  std::string vm =
      request.contains("vm") && request["vm"].is_string() ? request["vm"].get<std::string>() : "";
  if (op == "status") {
    if (!vm.empty() && config_.FindVm(vm) == nullptr && !(inbound_ && inbound_->HasVm(vm))) {
      return Refused("unknown-vm", "no VM named '" + vm + "' at site " + config_.name);
    }
    return Ok(StatusReport(vm));
  }
  if (op == "cut") {
    // Cuts a VM's logs now (ends the current cycle); for tests and operators who want a
    // recovery point at a known instant.
    for (auto& v : vms_) {
      if (v->config->name != vm) continue;
      if (!v->tracker) return Refused("not-tracked", "VM " + vm + " has tracking = \"off\"");
      auto cycle = v->tracker->Cut();
      if (!cycle.ok()) return Refused("cut-failed", cycle.status().message());
      return Ok({{"cycle", *cycle}});
    }
    return Refused("unknown-vm", "no VM named '" + vm + "' at site " + config_.name);
  }
  if (op == "failpoint") {
    // Tests arm failpoints in a running daemon (common/failpoint.h).
    if (!request.contains("spec") || !request["spec"].is_string()) {
      return Refused("bad-request", "failpoint needs \"spec\": \"name=action,...\"");
    }
    Status s = failpoint::Arm(request["spec"].get<std::string>());
    if (!s.ok()) return Refused("bad-failpoint", s.message());
    return Ok({{"armed", failpoint::Armed()}});
  }
  if (op == "enable" || op == "pause" || op == "resume" || op == "resync" || op == "points" ||
      op == "export") {
    if (vm.empty()) return Refused("bad-request", op + " needs a VM");
    return HandleVmOp(op, vm, request);
  }
  return Refused("unknown-op", "unknown request '" + op + "'");
}

json Daemon::HandleVmOp(const std::string& op, const std::string& vm, const json& request) {
  if (op == "points" || op == "export") {
    if (!inbound_ || !inbound_->HasVm(vm)) {
      return Refused("not-a-replica",
                     config_.FindVm(vm) != nullptr
                         ? "VM " + vm + " is a primary at " + config_.name +
                               "; its recovery points are kept at the replica site"
                         : "no replica of VM '" + vm + "' at site " + config_.name);
    }
    if (op == "points") {
      auto points = inbound_->Points(vm);
      if (!points.ok()) return Refused("points-failed", points.status().message());
      return Ok(*points);
    }
    if (!request.contains("disk") || !request["disk"].is_string() || !request.contains("point") ||
        !request["point"].is_number_unsigned() || !request.contains("out") ||
        !request["out"].is_string()) {
      return Refused("bad-request", "export needs \"disk\", \"point\" and \"out\"");
    }
    Status s =
        inbound_->Export(vm, request["disk"].get<std::string>(), request["point"].get<uint64_t>(),
                         request["out"].get<std::string>());
    if (!s.ok()) return Refused("export-failed", s.message());
    return Ok({{"out", request["out"]}});
  }
  Outbound* out = nullptr;
  for (size_t i = 0; i < vms_.size(); ++i) {
    if (vms_[i]->config->name == vm) out = outbound_[i].get();
  }
  if (out == nullptr) {
    return Refused("unknown-vm", inbound_ && inbound_->HasVm(vm)
                                     ? "VM " + vm + " is a replica at " + config_.name +
                                           "; run this at its primary site"
                                     : "no VM named '" + vm + "' at site " + config_.name);
  }
  Status s;
  if (op == "enable") {
    if (!request.contains("to") || !request["to"].is_string()) {
      return Refused("bad-request", "enable needs \"to\": SITE");
    }
    s = out->Enable(request["to"].get<std::string>(), request.value("seed", false));
    if (s.code() == EEXIST) return Refused("already-replicated", s.message());
    if (s.code() == ENOENT) return Refused("unknown-site", s.message());
  } else if (op == "resync") {
    s = out->Resync(request.value("full", false));
    if (s.code() == EBUSY) return Refused("sync-running", s.message());
  } else if (op == "pause") {
    s = out->Pause();
  } else {
    s = out->Resume();
  }
  if (!s.ok()) return Refused(op + "-refused", s.message());
  return Ok(StatusReport(vm));
}

}  // namespace siterep::control
