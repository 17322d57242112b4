// Rate limiting and rate measuring for the replication link.
//
// TokenBucket: the shipper's bandwidth limit on wire bytes. The caller asks how long to
// wait before sending n bytes and waits itself (in small steps, so it stays responsive to
// Stop); the bucket never sleeps. ThroughputMeter: bytes per second over the last few
// seconds, for status. Both take the time as an argument, so tests can drive them.
// Thread-compatible: each belongs to one thread, or is guarded by its owner's mutex.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>

namespace siterep::shipper {

using SteadyTime = std::chrono::steady_clock::time_point;

class TokenBucket {
 public:
  // rate: bytes per second, 0 = unlimited. The bucket holds at most a quarter second of
  // tokens (at least 64 KiB), so a burst after an idle period stays short.
  explicit TokenBucket(uint64_t rate, SteadyTime now = std::chrono::steady_clock::now());

  // Takes bytes from the bucket (it may go into debt) and returns how long the caller must
  // wait before sending them: zero when the tokens were there.
  std::chrono::nanoseconds Take(uint64_t bytes, SteadyTime now);
  uint64_t rate() const { return rate_; }

 private:
  void Refill(SteadyTime now);

  uint64_t rate_;
  double capacity_;
  double tokens_;  // negative: debt, paid off by waiting
  SteadyTime last_;
};

class ThroughputMeter {
 public:
  void Add(uint64_t bytes, SteadyTime now);
  // Bytes per second over the last kBuckets * kBucketWidth (less right after the start).
  double Rate(SteadyTime now) const;

 private:
  static constexpr int kBuckets = 10;
  static constexpr std::chrono::milliseconds kBucketWidth{500};
  int64_t BucketOf(SteadyTime now) const;

  std::array<uint64_t, kBuckets> bytes_{};
  std::array<int64_t, kBuckets> index_{};  // which bucket number each slot holds
  int64_t first_bucket_ = -1;              // the first bucket ever filled
};

}  // namespace siterep::shipper
