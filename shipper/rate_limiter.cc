#include "shipper/rate_limiter.h"

#include <algorithm>

namespace siterep::shipper {

TokenBucket::TokenBucket(uint64_t rate, SteadyTime now)
    : rate_(rate),
      capacity_(std::max(static_cast<double>(rate) / 4, 64.0 * 1024)),
      tokens_(capacity_),
      last_(now) {}

void TokenBucket::Refill(SteadyTime now) {
  if (now <= last_) return;
  const double seconds = std::chrono::duration<double>(now - last_).count();
  tokens_ = std::min(capacity_, tokens_ + seconds * static_cast<double>(rate_));
  last_ = now;
}

std::chrono::nanoseconds TokenBucket::Take(uint64_t bytes, SteadyTime now) {
  if (rate_ == 0) return std::chrono::nanoseconds(0);
  Refill(now);
  tokens_ -= static_cast<double>(bytes);
  if (tokens_ >= 0) return std::chrono::nanoseconds(0);
  return std::chrono::nanoseconds(
      static_cast<int64_t>(-tokens_ / static_cast<double>(rate_) * 1e9));
}

int64_t ThroughputMeter::BucketOf(SteadyTime now) const {
  return std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() /
         kBucketWidth.count();
}

void ThroughputMeter::Add(uint64_t bytes, SteadyTime now) {
  const int64_t b = BucketOf(now);
  if (first_bucket_ < 0) first_bucket_ = b;
  const size_t slot = static_cast<size_t>(b % kBuckets);
  if (index_[slot] != b) {
    index_[slot] = b;
    bytes_[slot] = 0;
  }
  bytes_[slot] += bytes;
}

double ThroughputMeter::Rate(SteadyTime now) const {
  if (first_bucket_ < 0) return 0;
  const int64_t current = BucketOf(now);
  uint64_t total = 0;
  for (int i = 0; i < kBuckets; ++i) {
    if (index_[i] > current - kBuckets && index_[i] <= current) total += bytes_[i];
  }
  // The window covers the full buckets before this one plus the elapsed part of this one,
  // but never reaches back before the first byte was counted.
  const int64_t window_start = std::max(current - kBuckets + 1, first_bucket_);
  const double ms_in_current = static_cast<double>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() %
      kBucketWidth.count());
  const double seconds =
      (static_cast<double>(current - window_start) * kBucketWidth.count() + ms_in_current) / 1000;
  return seconds > 0.05 ? static_cast<double>(total) / seconds : 0;
}

}  // namespace siterep::shipper
