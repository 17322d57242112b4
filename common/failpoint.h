// Failpoints: named places in the code where a test can make the process crash (abort,
// as kill -9 would) or make an operation fail, to prove that recovery works from there.
//
// Armed at start-up from the environment variable SITEREP_FAILPOINTS, or at run time
// through Arm() (siterepd exposes it on the control socket). A spec is a comma-separated
// list of  name=action[@skip][*count]:
//   action  abort    the process calls abort() at the point
//           error    Check() returns kError: the caller fails the operation
//           trigger  Check() returns kTrigger: the caller does its point-specific fault
//                    (for example flipping a byte of a received frame)
//           off      disarms the point
//   @skip   pass the point skip times before it fires (default 0)
//   *count  fire count times, then disarm (default: every time)
// Example: SITEREP_FAILPOINTS="applier.mid_apply=abort@3,receiver.corrupt_frame=trigger*1"
//
// Cost when nothing is armed: one relaxed atomic load per Check(). Thread-safe.
//
// Every point is listed in KnownPoints() (failpoint.cc), and Arm refuses any other name, so
// a misspelt spec fails at once instead of never firing: a new Check() adds its name there.
#pragma once

#include <atomic>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace siterep::failpoint {

enum class Action { kNone, kError, kTrigger };

namespace internal {
extern std::atomic<int> armed_count;
Action CheckSlow(std::string_view name);
}  // namespace internal

// What the point named `name` should do now. Never returns for an armed "abort".
inline Action Check(std::string_view name) {
  if (internal::armed_count.load(std::memory_order_relaxed) == 0) return Action::kNone;
  return internal::CheckSlow(name);
}

// A failpoint of the code: its name and where a crash there leaves things.
struct KnownPoint {
  std::string_view name;
  std::string_view where;
};
// Every failpoint the code checks, by module, then in the order a run reaches them.
std::span<const KnownPoint> KnownPoints();

// Arms (or with action "off", disarms) the points in spec; refuses a malformed spec or a
// name not in KnownPoints() without changing anything.
Status Arm(std::string_view spec);
// Reads SITEREP_FAILPOINTS; called once by siterepd at start-up.
Status ArmFromEnvironment();
void DisarmAll();
// "name=action" for every armed point, for status and logs.
std::vector<std::string> Armed();

}  // namespace siterep::failpoint
