#include "common/failpoint.h"

#include <spdlog/spdlog.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace siterep::failpoint {
namespace {

enum class Kind { kAbort, kError, kTrigger };

struct Point {
  Kind kind = Kind::kAbort;
  uint64_t skip = 0;
  int64_t count = -1;  // -1: unlimited
};

constexpr KnownPoint kKnown[] = {
    // tracker/ (primary): changed-block tracking and the cycles built from it.
    {"tracker.after_mark", "a change's blocks marked in the map, the image not yet"},
    {"tracker.mid_cut", "a cycle frozen on some disks of the VM, not all"},
    {"tracker.before_seal", "a disk's cut file written (error: the cut fails on that disk)"},
    {"tracker.after_seal", "a disk's cut made, the VM's cycle not yet published to the shipper"},
    {"tracker.cow_save",
     "error: saving a block of a cut to its copy-on-write fails (the disk falls back)"},
    {"tracker.mid_release", "acknowledged segments' floors persisted, files not yet gone"},
    {"tracker.snapshot_mid", "a piece of a snapshot read for its copy (a sync), not the rest"},
    // shipper/: both ends of the link.
    {"shipper.after_send", "a segment chunk or sync data frame sent (error: drop the link)"},
    {"receiver.corrupt_frame", "trigger: a received frame damaged (a payload byte, else its CRC)"},
    {"receiver.before_ack", "a cycle committed at the replica, not yet acknowledged"},
    // applier/ (replica): apply of a cycle, in order.
    {"applier.before_apply", "a cycle received, its apply not started"},
    {"applier.after_undo", "the cycle's undo blocks durable, no image write yet"},
    {"applier.mid_apply", "after each record written to the replica image"},
    {"applier.before_position", "the cycle in the images, the position not updated"},
    {"applier.before_point", "the cycle applied, its recovery point not taken"},
    {"applier.before_delete", "the cycle applied, its received segments not deleted"},
    // applier/: syncs (initial copy, resync) at the replica.
    {"applier.sync_mid_write", "after each sync data write to the replica image"},
    {"applier.sync_before_end", "every sync block written and synced, the end not recorded"},
    // applier/: points, adoption, dropping a replica.
    {"applier.materialize_mid", "a recovery point half written back into the images"},
    {"applier.materialize_before_position", "a point written back, the position not updated"},
    {"applier.materialize_before_drop", "a point made current, the received segments kept"},
    {"applier.adopt_after_remove", "adopting images: the old state removed, none new"},
    {"applier.adopt_before_definition", "adopting images: position stored, no definition"},
    {"applier.drop_state_mid", "dropping a replica: definition removed, state files not"},
    // control/: role changes.
    {"control.planned_after_persist", "planned failover: failing-over phase recorded"},
    {"control.planned_after_drain", "planned failover: drained, the peer not yet asked"},
    {"control.planned_before_demote", "planned failover: the peer took over, not demoted"},
    {"control.promote_after_persist", "promotion recorded, the primary not yet opened"},
    {"control.unplanned_after_persist", "unplanned failover recorded, not yet opened"},
    {"control.commit_after_persist", "commit: committing phase recorded"},
    {"control.commit_mid", "commit: the images are the point, the overlay not yet in"},
    {"control.demote_after_persist", "demotion recorded, the primary not yet closed"},
};

bool IsKnown(std::string_view name) {
  for (const KnownPoint& k : kKnown) {
    if (k.name == name) return true;
  }
  return false;
}

// Protects points(); armed_count mirrors points().size() for the fast path.
std::mutex mu;
std::map<std::string, Point, std::less<>>& points() {
  static auto* p = new std::map<std::string, Point, std::less<>>();
  return *p;
}

std::string_view KindName(Kind k) {
  switch (k) {
    case Kind::kAbort:
      return "abort";
    case Kind::kError:
      return "error";
    case Kind::kTrigger:
      return "trigger";
  }
  return "?";
}

bool ParseNumber(std::string_view s, uint64_t* out) {
  if (s.empty() || s.size() > 18) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  *out = v;
  return true;
}

struct Parsed {
  std::string name;
  bool off = false;
  Point point;
};

Result<Parsed> ParseOne(std::string_view item) {
  size_t eq = item.find('=');
  if (eq == std::string_view::npos || eq == 0) {
    return Status::Error(EINVAL, "failpoint \"" + std::string(item) + "\": expected name=action");
  }
  Parsed p;
  p.name = std::string(item.substr(0, eq));
  if (!IsKnown(p.name)) {
    return Status::Error(EINVAL, "failpoint \"" + p.name +
                                     "\": no such point (siterep failpoint --list names them)");
  }
  std::string_view rest = item.substr(eq + 1);
  std::string_view count_text, skip_text;
  if (size_t star = rest.find('*'); star != std::string_view::npos) {
    count_text = rest.substr(star + 1);
    rest = rest.substr(0, star);
  }
  if (size_t at = rest.find('@'); at != std::string_view::npos) {
    skip_text = rest.substr(at + 1);
    rest = rest.substr(0, at);
  }
  if (rest == "abort")
    p.point.kind = Kind::kAbort;
  else if (rest == "error")
    p.point.kind = Kind::kError;
  else if (rest == "trigger")
    p.point.kind = Kind::kTrigger;
  else if (rest == "off")
    p.off = true;
  else {
    return Status::Error(EINVAL, "failpoint " + p.name + ": unknown action \"" + std::string(rest) +
                                     "\" (abort, error, trigger, off)");
  }
  uint64_t n = 0;
  if (!skip_text.empty()) {
    if (!ParseNumber(skip_text, &n))
      return Status::Error(EINVAL, "failpoint " + p.name + ": bad @skip");
    p.point.skip = n;
  }
  if (!count_text.empty()) {
    if (!ParseNumber(count_text, &n) || n == 0) {
      return Status::Error(EINVAL, "failpoint " + p.name + ": bad *count");
    }
    p.point.count = static_cast<int64_t>(n);
  }
  return p;
}

}  // namespace

namespace internal {
std::atomic<int> armed_count{0};

Action CheckSlow(std::string_view name) {
  Kind kind;
  {
    std::lock_guard lk(mu);
    auto it = points().find(name);
    if (it == points().end()) return Action::kNone;
    Point& p = it->second;
    if (p.skip > 0) {
      --p.skip;
      return Action::kNone;
    }
    kind = p.kind;
    if (p.count > 0 && --p.count == 0) {
      points().erase(it);
      armed_count.store(static_cast<int>(points().size()), std::memory_order_relaxed);
    }
  }
  switch (kind) {
    case Kind::kAbort:
      spdlog::error("failpoint {}: abort", name);
      std::abort();
    case Kind::kError:
      return Action::kError;
    case Kind::kTrigger:
      return Action::kTrigger;
  }
  return Action::kNone;
}
}  // namespace internal

std::span<const KnownPoint> KnownPoints() { return kKnown; }

Status Arm(std::string_view spec) {
  std::vector<Parsed> parsed;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t comma = spec.find(',', start);
    std::string_view item =
        spec.substr(start, comma == std::string_view::npos ? spec.npos : comma - start);
    if (!item.empty()) {
      SR_ASSIGN_OR_RETURN(Parsed p, ParseOne(item));
      parsed.push_back(std::move(p));
    }
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  std::lock_guard lk(mu);
  for (Parsed& p : parsed) {
    if (p.off)
      points().erase(p.name);
    else
      points()[p.name] = p.point;
  }
  internal::armed_count.store(static_cast<int>(points().size()), std::memory_order_relaxed);
  return Status::Ok();
}

Status ArmFromEnvironment() {
  const char* spec = std::getenv("SITEREP_FAILPOINTS");
  if (spec == nullptr || *spec == '\0') return Status::Ok();
  Status s = Arm(spec);
  if (!s.ok()) return s.WithContext("SITEREP_FAILPOINTS");
  return s;
}

void DisarmAll() {
  std::lock_guard lk(mu);
  points().clear();
  internal::armed_count.store(0, std::memory_order_relaxed);
}

std::vector<std::string> Armed() {
  std::lock_guard lk(mu);
  std::vector<std::string> out;
  for (const auto& [name, p] : points()) out.push_back(name + "=" + std::string(KindName(p.kind)));
  return out;
}

}  // namespace siterep::failpoint
