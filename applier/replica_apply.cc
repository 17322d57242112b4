// Replica's applier: committed cycles into the images, in order and whole (see replica.h
// for the steps and why they are crash-safe).
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <system_error>

#include "applier/replica.h"
#include "applier/segment_check.h"
#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/log_reader.h"

namespace siterep::applier {
namespace fs = std::filesystem;

namespace {

constexpr auto kMaxRetryDelay = std::chrono::seconds(30);
constexpr auto kFirstRetryDelay = std::chrono::milliseconds(100);
// How often the applier thread asks the apply gate again about a cycle it holds.
constexpr auto kGateRetry = std::chrono::milliseconds(100);

Status AtFailpoint(std::string_view name) {
  if (failpoint::Check(name) == failpoint::Action::kError) {
    return Status::Error(EIO, "failpoint " + std::string(name));
  }
  return Status::Ok();
}

}  // namespace

Status Replica::Start() {
  std::lock_guard lk(mu_);
  if (thread_.joinable()) return Status::Ok();
  stop_ = false;
  try {
    thread_ = std::thread(&Replica::ApplierLoop, this);
  } catch (const std::system_error& e) {
    return Status::Error(e.code().value(), "start the applier of VM " + def_.vm + ": " + e.what());
  }
  return Status::Ok();
}

void Replica::Stop() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Replica::ApplierLoop() {
  auto delay = std::chrono::milliseconds(0);
  std::unique_lock lk(mu_);
  while (!stop_) {
    if (state_.pending.empty() || !state_.apply_error.empty() || state_.sync ||
        state_.materialize) {
      cv_.wait(lk);
      continue;
    }
    // A Wake() from here on makes a held cycle be asked about again at once.
    const uint64_t wakes = wakes_;
    lk.unlock();
    Result<ApplyStep> applied = [&] {
      std::lock_guard apply(apply_mu_);
      return ApplyNext();
    }();
    lk.lock();
    if (applied.ok()) {
      delay = std::chrono::milliseconds(0);
      if (*applied == ApplyStep::kHeld) {
        cv_.wait_for(lk, kGateRetry, [&] { return stop_ || wakes_ != wakes; });
      }
    } else if (state_.apply_error.empty()) {
      // Worth retrying (I/O error, full disk): back off.
      delay = std::min<std::chrono::milliseconds>(std::max(delay * 2, kFirstRetryDelay),
                                                  kMaxRetryDelay);
      spdlog::warn("replica of VM {}: apply failed, retrying in {} ms: {}", def_.vm, delay.count(),
                   applied.status().ToString());
      cv_.wait_for(lk, delay, [&] { return stop_; });
    }
  }
}

Status Replica::ApplyPending() {
  std::lock_guard apply(apply_mu_);
  for (;;) {
    SR_ASSIGN_OR_RETURN(ApplyStep step, ApplyNext());
    if (step != ApplyStep::kApplied) return Status::Ok();  // none left, or held by the gate
  }
}

void Replica::SetApplyGate(ApplyGate gate) {
  {
    std::lock_guard lk(mu_);
    gate_ = gate ? std::make_shared<const ApplyGate>(std::move(gate)) : nullptr;
    held_cycle_ = 0;  // the new gate has not answered yet
    ++wakes_;
  }
  cv_.notify_all();
}

void Replica::Wake() {
  {
    std::lock_guard lk(mu_);
    ++wakes_;
  }
  cv_.notify_all();
}

bool Replica::ApplyHeld() const {
  std::lock_guard lk(mu_);
  return ApplyHeldLocked();
}

bool Replica::ApplyHeldLocked() const {
  return gate_ && held_cycle_ != 0 && !state_.pending.empty() &&
         state_.pending.front().info.cycle == held_cycle_;
}

bool Replica::AppliedIsPointLocked() const {
  // As PointStore lists the latest point: none while a materialization rewrites the images
  // or a direct sync writes them, none before the first cycle unless adopted in sync.
  if (state_.materialize || (state_.sync && !state_.sync->staged)) return false;
  return state_.applied_cycle != 0 || state_.cycle0_is_point;
}

std::vector<int64_t> Replica::CommittedCuts() const {
  std::lock_guard lk(mu_);
  std::vector<int64_t> cuts;
  if (state_.materialize) return cuts;
  cuts.reserve(state_.pending.size() + 1);
  if (AppliedIsPointLocked()) cuts.push_back(state_.applied_cut_unix_nanos);
  for (const PendingCycle& c : state_.pending) cuts.push_back(c.info.cut_unix_nanos);
  return cuts;
}

std::optional<uint64_t> Replica::CycleAtCut(int64_t cut_unix_nanos) const {
  std::lock_guard lk(mu_);
  if (state_.materialize) return std::nullopt;
  if (AppliedIsPointLocked() && state_.applied_cut_unix_nanos == cut_unix_nanos) {
    return state_.applied_cycle;
  }
  for (const PendingCycle& c : state_.pending) {
    if (c.info.cut_unix_nanos == cut_unix_nanos) return c.info.cycle;
  }
  return std::nullopt;
}

Status Replica::ClearApplyError() {
  SR_RETURN_IF_ERROR(UpdatePosition([](PositionState& s) { s.apply_error.clear(); }));
  {
    std::lock_guard lk(mu_);
    transient_error_.clear();
  }
  cv_.notify_all();
  return Status::Ok();
}

Result<Replica::ApplyStep> Replica::ApplyNext() {
  PendingCycle cycle;
  ReplicaDefinition def;
  std::shared_ptr<const ApplyGate> gate;
  {
    std::lock_guard lk(mu_);
    if (!state_.apply_error.empty()) {
      return Status::Error(EBADMSG, "the apply is stopped: " + state_.apply_error);
    }
    SR_RETURN_IF_ERROR(RefuseWhileMaterializingLocked("apply"));
    // A sync rewrites the images until it ends; the cycles after it come then.
    if (state_.pending.empty() || state_.sync) return ApplyStep::kNone;
    cycle = state_.pending.front();
    def = def_;
    // An interrupted apply is finished whatever the gate says (see SetApplyGate).
    if (state_.applying_cycle != cycle.info.cycle) gate = gate_;
    if (!gate) held_cycle_ = 0;
  }
  if (gate) {
    // Without mu_ (the gate reads other replicas, and this one): apply_mu_ keeps the
    // pending front as it is until the cycle is applied.
    const bool open = (*gate)(cycle.info);
    std::lock_guard lk(mu_);
    if (!open) {
      // An answer of a gate replaced meanwhile says nothing; the loop asks the new one.
      if (gate_ == gate) held_cycle_ = cycle.info.cycle;
      return ApplyStep::kHeld;
    }
    held_cycle_ = 0;
  }
  Status s = ApplyCycle(cycle, def);
  if (s.ok()) {
    std::lock_guard lk(mu_);
    transient_error_.clear();
    return ApplyStep::kApplied;
  }
  if (s.code() == EBADMSG) {
    // Bad data does not get better by trying again: stop until an operator steps in.
    spdlog::error("replica of VM {}: apply stopped: {}", def.vm, s.message());
    Status persisted = UpdatePosition([&](PositionState& p) { p.apply_error = s.message(); });
    if (!persisted.ok()) {
      spdlog::error("replica of VM {}: recording the apply error: {}", def.vm,
                    persisted.ToString());
      std::lock_guard lk(mu_);
      state_.apply_error = s.message();  // stop in this process at least
    }
  } else {
    std::lock_guard lk(mu_);
    transient_error_ = s.ToString();
  }
  return s;
}

Status Replica::CheckCycle(const PendingCycle& cycle, const ReplicaDefinition& def) const {
  for (size_t i = 0; i < def.disks.size(); ++i) {
    const DiskDefinition& d = def.disks[i];
    const PendingSegment& seg = cycle.segments[i];
    SegmentRules rules{d.disk_id,     d.size,       cycle.min_epoch,
                       seg.first_seq, seg.last_seq, cycle.info.cycle};
    const fs::path path = tracker::SegmentPath(ReceivedDir(i), seg.number);
    Result<SegmentSummary> summary = ScanSegment(path, rules);
    const std::string where = "cycle " + std::to_string(cycle.info.cycle) + ", disk " + d.name +
                              ", segment " + std::to_string(seg.number);
    if (summary.ok()) continue;
    if (summary.status().code() == ENOENT) {
      return Status::Corrupt(where + ": the received segment is missing (" + path.string() + ")");
    }
    return summary.status().WithContext(where);
  }
  return Status::Ok();
}

Status Replica::WriteCycle(const PendingCycle& cycle, const ReplicaDefinition& def) {
  PointStore::Writer writer = store_->BeginCycle();
  auto scan = [&](size_t i, FunctionRef<Status(const CheckedRecord&)> visit) -> Status {
    const DiskDefinition& d = def.disks[i];
    const PendingSegment& seg = cycle.segments[i];
    SegmentRules rules{d.disk_id,     d.size,       cycle.min_epoch,
                       seg.first_seq, seg.last_seq, cycle.info.cycle};
    Result<SegmentSummary> r =
        ScanSegment(tracker::SegmentPath(ReceivedDir(i), seg.number), rules, visit);
    if (!r.ok()) {
      return r.status().WithContext("cycle " + std::to_string(cycle.info.cycle) + ", disk " +
                                    d.name + ", segment " + std::to_string(seg.number));
    }
    return Status::Ok();
  };
  // First every old block the cycle overwrites, durably, then the images: a crash in
  // between leaves undo files that hold all of them already.
  for (size_t i = 0; i < def.disks.size(); ++i) {
    SR_RETURN_IF_ERROR(
        scan(i, [&](const CheckedRecord& r) { return writer.Save(i, r.record.header); }));
  }
  SR_RETURN_IF_ERROR(writer.SyncUndo());
  SR_RETURN_IF_ERROR(AtFailpoint("applier.after_undo"));
  for (size_t i = 0; i < def.disks.size(); ++i) {
    SR_RETURN_IF_ERROR(scan(i, [&](const CheckedRecord& r) -> Status {
      if (r.record.header.kind == tracker::RecordKind::kCut) return Status::Ok();
      SR_RETURN_IF_ERROR(writer.WriteRecord(i, r.record.header, r.record.payload));
      return AtFailpoint("applier.mid_apply");
    }));
  }
  SR_RETURN_IF_ERROR(writer.SyncImages());
  writer.Finish(cycle.info.cycle, cycle.info.cut_unix_nanos);
  return Status::Ok();
}

Status Replica::ApplyCycle(const PendingCycle& cycle, const ReplicaDefinition& def) {
  const uint64_t c = cycle.info.cycle;
  SR_RETURN_IF_ERROR(CheckCycle(cycle, def));
  SR_RETURN_IF_ERROR(AtFailpoint("applier.before_apply"));
  SR_RETURN_IF_ERROR(UpdatePosition([&](PositionState& s) { s.applying_cycle = c; }));
  SR_RETURN_IF_ERROR(WriteCycle(cycle, def));
  SR_RETURN_IF_ERROR(AtFailpoint("applier.before_position"));
  SR_RETURN_IF_ERROR(UpdatePosition([&](PositionState& s) {
    s.applying_cycle = 0;
    s.applied_cycle = c;
    s.applied_cut_unix_nanos = cycle.info.cut_unix_nanos;
    s.applied_first_change_unix_nanos = cycle.info.first_change_unix_nanos;
    std::erase_if(s.pending, [&](const PendingCycle& p) { return p.info.cycle <= c; });
  }));
  SR_RETURN_IF_ERROR(AtFailpoint("applier.before_point"));
  // The cycle stays applied if this fails; the error is reported and the next cycle goes
  // on (it may become the point instead).
  Status point =
      store_->AfterApplied(c, cycle.info.cut_unix_nanos,
                           PointPolicy{def.recovery_points, def.recovery_point_interval_ms});
  if (!point.ok()) {
    DeleteSegments(cycle, def);
    return point.WithContext("recovery points after cycle " + std::to_string(c));
  }
  SR_RETURN_IF_ERROR(AtFailpoint("applier.before_delete"));
  DeleteSegments(cycle, def);
  return Status::Ok();
}

void Replica::DeleteSegments(const PendingCycle& cycle, const ReplicaDefinition& def) {
  // Best effort: Open deletes what a crash or an error leaves behind.
  for (size_t i = 0; i < def.disks.size(); ++i) {
    const fs::path path = tracker::SegmentPath(ReceivedDir(i), cycle.segments[i].number);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      spdlog::warn("replica: remove {}: {}", path.string(), std::strerror(errno));
      continue;
    }
    Status s = SyncDir(ReceivedDir(i));
    if (!s.ok()) spdlog::warn("replica: {}", s.ToString());
  }
}

}  // namespace siterep::applier
