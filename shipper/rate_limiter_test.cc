#include "shipper/rate_limiter.h"

#include <gtest/gtest.h>

namespace siterep::shipper {
namespace {

using namespace std::chrono_literals;

TEST(TokenBucket, UnlimitedNeverWaits) {
  const SteadyTime t0{};
  TokenBucket b(0, t0);
  EXPECT_EQ(b.Take(1ull << 40, t0).count(), 0);
}

TEST(TokenBucket, WaitsForDebtAtTheRate) {
  const SteadyTime t0 = SteadyTime{} + 100s;
  TokenBucket b(1 << 20, t0);  // 1 MiB/s, a quarter second of burst
  EXPECT_EQ(b.Take(256 << 10, t0).count(), 0) << "the burst is free";
  // The next MiB must wait one second.
  auto wait = b.Take(1 << 20, t0);
  EXPECT_NEAR(std::chrono::duration<double>(wait).count(), 1.0, 0.01);
  // After waiting it off, refilled tokens cover the debt and nothing more.
  wait = b.Take(0, t0 + 1s);
  EXPECT_EQ(wait.count(), 0);
  // Idle for long: the bucket is full again, but only to its capacity.
  EXPECT_EQ(b.Take(256 << 10, t0 + 100s).count(), 0);
  EXPECT_GT(b.Take(64 << 10, t0 + 100s).count(), 0);
}

TEST(TokenBucket, SendingNBytesTakesNOverRateSeconds) {
  SteadyTime now = SteadyTime{} + 10s;
  TokenBucket b(100000, now);
  for (int i = 0; i < 100; ++i) now += b.Take(10000, now);  // 1 MB at 100 kB/s
  const double seconds = std::chrono::duration<double>(now - (SteadyTime{} + 10s)).count();
  EXPECT_GT(seconds, 9.0);
  EXPECT_LT(seconds, 10.5);
}

TEST(ThroughputMeter, MeasuresRecentRate) {
  ThroughputMeter m;
  SteadyTime t = SteadyTime{} + 1000s;
  EXPECT_EQ(m.Rate(t), 0);
  for (int i = 0; i < 40; ++i) {  // 4 s at 1 MB/s, in 100 ms steps
    m.Add(100000, t);
    t += 100ms;
  }
  EXPECT_NEAR(m.Rate(t), 1e6, 1.5e5);
  EXPECT_EQ(m.Rate(t + 60s), 0) << "old traffic drops out of the window";
}

}  // namespace
}  // namespace siterep::shipper
