#include "control/health.h"

#include <gtest/gtest.h>

namespace siterep::control {
namespace {

using std::chrono::milliseconds;
constexpr int64_t kSec = 1'000'000'000;

TEST(HealthTest, BudgetFollowsTheFrequency) {
  EXPECT_EQ(RpoBudget(milliseconds(1000)).count(), 32'000);
  EXPECT_EQ(RpoBudget(milliseconds(30'000)).count(), 90'000);
  EXPECT_EQ(RpoBudget(milliseconds(300'000)).count(), 630'000);
}

TEST(HealthTest, StoppedIsCriticalWhateverElse) {
  HealthInputs in;
  in.frequency = milliseconds(30'000);
  in.rpo_seconds = 1;
  in.stopped_reason = "replication paused by the operator";
  HealthVerdict v = JudgeHealth(in);
  EXPECT_EQ(v.health, Health::kCritical);
  EXPECT_EQ(v.reason, "replication paused by the operator");
}

TEST(HealthTest, RpoOverBudgetIsWarningAndUnderIsNormal) {
  HealthInputs in;
  in.frequency = milliseconds(30'000);
  in.rpo_seconds = 89;
  EXPECT_EQ(JudgeHealth(in).health, Health::kNormal);
  EXPECT_EQ(JudgeHealth(in).reason, "");
  in.rpo_seconds = 91;
  HealthVerdict v = JudgeHealth(in);
  EXPECT_EQ(v.health, Health::kWarning);
  EXPECT_NE(v.reason.find("RPO 91 s"), std::string::npos) << v.reason;
}

TEST(HealthTest, ALinkDownLongerThanTheBudgetIsWarning) {
  HealthInputs in;
  in.frequency = milliseconds(1000);
  in.rpo_seconds = 0;
  in.link_down_reason = "connection refused";
  in.link_down_seconds = 10;
  EXPECT_EQ(JudgeHealth(in).health, Health::kNormal);  // a short blip
  in.link_down_seconds = 40;
  HealthVerdict v = JudgeHealth(in);
  EXPECT_EQ(v.health, Health::kWarning);
  EXPECT_NE(v.reason.find("connection refused"), std::string::npos);
}

TEST(HealthTest, MoreThanAFifthOfMissedCyclesIsWarning) {
  HealthMonitor m(milliseconds(30'000));
  int64_t t = 1000 * kSec;
  m.Observe(t, 0);  // starts the first period
  // 10 periods: 2 missed (RPO over two periods), 8 fine: 20%, not more.
  for (int i = 0; i < 10; ++i) {
    t += 30 * kSec;
    m.Observe(t, i < 2 ? 61.0 : 5.0);
    m.Observe(t + kSec, 500.0);  // inside the same period: not sampled
  }
  EXPECT_DOUBLE_EQ(m.MissedShare(t), 0.2);
  HealthInputs in;
  in.frequency = milliseconds(30'000);
  in.rpo_seconds = 5;
  in.missed_share = m.MissedShare(t);
  EXPECT_EQ(JudgeHealth(in).health, Health::kNormal);
  t += 30 * kSec;
  m.Observe(t, 70.0);
  in.missed_share = m.MissedShare(t);
  EXPECT_GT(in.missed_share, 0.2);
  EXPECT_EQ(JudgeHealth(in).health, Health::kWarning);
  // An hour later the old samples have aged out.
  EXPECT_DOUBLE_EQ(m.MissedShare(t + 3601 * kSec), 0.0);
}

TEST(HealthTest, StalledIsWarningUnlessStopped) {
  HealthInputs in;
  in.frequency = std::chrono::seconds(30);
  in.rpo_seconds = 1;
  in.stalled_reason = "disk os: cycles cannot be built: No space left on device";
  HealthVerdict v = JudgeHealth(in);
  EXPECT_EQ(v.health, Health::kWarning);
  EXPECT_EQ(v.reason, in.stalled_reason);
  in.stopped_reason = "resync required";
  EXPECT_EQ(JudgeHealth(in).health, Health::kCritical);
}

}  // namespace
}  // namespace siterep::control
