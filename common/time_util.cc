#include "common/time_util.h"

#include <ctime>

namespace siterep {

int64_t NowUnixNanos() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

std::string FormatUtc(int64_t unix_nanos) {
  if (unix_nanos == 0) return "";
  time_t secs = static_cast<time_t>(unix_nanos / 1'000'000'000);
  tm utc;
  gmtime_r(&secs, &utc);
  char buf[32];
  strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace siterep
