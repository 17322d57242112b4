// Replication health, as Hyper-V Replica defines it, computed the same way on both sites.
//
//   critical  replication is stopped: paused by the operator, refused by the peer (a
//             certificate, epoch or definition the peer will not take), resync required,
//             or the replica's apply stopped on a bad record;
//   warning   more than 20% of the cycles in the last hour were missed, or the RPO now is
//             over the budget of the VM's frequency, or the link is down for longer than
//             that budget;
//   normal    otherwise.
//
// The RPO budget is 2 x frequency + 30 s (continuous: 32 s, 30s: 90 s, 5m: 630 s, 15m:
// 1830 s). A cycle is missed when, at the end of a frequency period, the RPO is over two
// periods: the changes of the period before were still not applied on the replica.
//
// HealthMonitor keeps the missed-cycle samples of the last hour. Thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

namespace siterep::control {

enum class Health { kNormal, kWarning, kCritical };
std::string_view HealthName(Health h);  // "normal" | "warning" | "critical"

std::chrono::milliseconds RpoBudget(std::chrono::milliseconds frequency);

// The facts health is judged on, gathered by the daemon for one VM at one moment.
struct HealthInputs {
  std::chrono::milliseconds frequency{300'000};
  std::optional<double> rpo_seconds;  // unset: not known (never connected)
  std::string stopped_reason;         // non-empty: replication is stopped (critical)
  std::string stalled_reason;         // non-empty: cycles cannot be made now (warning)
  std::string link_down_reason;       // non-empty: not connected to the peer
  double link_down_seconds = 0;
  double missed_share = 0;  // share of missed cycles in the last hour, 0..1
};

struct HealthVerdict {
  Health health = Health::kNormal;
  std::string reason;  // one line; empty when normal
};

HealthVerdict JudgeHealth(const HealthInputs& in);

class HealthMonitor {
 public:
  explicit HealthMonitor(std::chrono::milliseconds frequency) : frequency_(frequency) {}

  // Called often (e.g. every second) with the RPO now; records one sample per frequency
  // period. now_nanos: wall clock, so tests can drive it.
  void Observe(int64_t now_nanos, double rpo_seconds);
  // Share of the samples of the last hour that were missed cycles (0 with no samples).
  double MissedShare(int64_t now_nanos) const;

 private:
  const std::chrono::milliseconds frequency_;
  mutable std::mutex mu_;  // protects the members below; a leaf
  int64_t last_sample_nanos_ = 0;
  std::deque<std::pair<int64_t, bool>> samples_;  // (time, missed), oldest first
};

}  // namespace siterep::control
