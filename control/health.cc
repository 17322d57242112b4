#include "control/health.h"

#include <cstdio>

namespace siterep::control {
namespace {
constexpr int64_t kHourNanos = 3600LL * 1'000'000'000;
constexpr int64_t kMilliNanos = 1'000'000;

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.0f s", s);
  return buf;
}
}  // namespace

std::string_view HealthName(Health h) {
  switch (h) {
    case Health::kNormal:
      return "normal";
    case Health::kWarning:
      return "warning";
    case Health::kCritical:
      return "critical";
  }
  return "?";
}

std::chrono::milliseconds RpoBudget(std::chrono::milliseconds frequency) {
  return 2 * frequency + std::chrono::seconds(30);
}

HealthVerdict JudgeHealth(const HealthInputs& in) {
  if (!in.stopped_reason.empty()) return {Health::kCritical, in.stopped_reason};
  if (!in.stalled_reason.empty()) return {Health::kWarning, in.stalled_reason};
  const double budget = std::chrono::duration<double>(RpoBudget(in.frequency)).count();
  if (!in.link_down_reason.empty() && in.link_down_seconds > budget) {
    return {Health::kWarning,
            "link down for " + Seconds(in.link_down_seconds) + ": " + in.link_down_reason};
  }
  if (in.rpo_seconds && *in.rpo_seconds > budget) {
    return {Health::kWarning,
            "RPO " + Seconds(*in.rpo_seconds) + " is over the budget of " + Seconds(budget)};
  }
  if (in.missed_share > 0.2) {
    char buf[96];
    std::snprintf(buf, sizeof(buf), "%.0f%% of the replication cycles in the last hour were missed",
                  in.missed_share * 100);
    return {Health::kWarning, buf};
  }
  return {Health::kNormal, ""};
}

void HealthMonitor::Observe(int64_t now_nanos, double rpo_seconds) {
  std::lock_guard lk(mu_);
  const int64_t period = frequency_.count() * kMilliNanos;
  if (last_sample_nanos_ == 0) {
    last_sample_nanos_ = now_nanos;  // the first period starts now
    return;
  }
  if (now_nanos - last_sample_nanos_ < period) return;
  last_sample_nanos_ = now_nanos;
  const double missed_over = 2.0 * std::chrono::duration<double>(frequency_).count();
  samples_.emplace_back(now_nanos, rpo_seconds > missed_over);
  while (!samples_.empty() && samples_.front().first < now_nanos - kHourNanos) samples_.pop_front();
}

double HealthMonitor::MissedShare(int64_t now_nanos) const {
  std::lock_guard lk(mu_);
  size_t total = 0, missed = 0;
  for (const auto& [t, m] : samples_) {
    if (t < now_nanos - kHourNanos) continue;
    ++total;
    missed += m ? 1 : 0;
  }
  return total == 0 ? 0.0 : static_cast<double>(missed) / static_cast<double>(total);
}

}  // namespace siterep::control
