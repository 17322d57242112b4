// Wall-clock time in the forms the status output uses.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace siterep {

// Nanoseconds since the Unix epoch (CLOCK_REALTIME).
int64_t NowUnixNanos();
// "2026-11-26T04:00:00Z" (UTC, second precision); "" for 0.
std::string FormatUtc(int64_t unix_nanos);
// Seconds on the steady clock since t0 (durations of operations: RTO, verify, drains).
double SecondsSince(std::chrono::steady_clock::time_point t0);

}  // namespace siterep
