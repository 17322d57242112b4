// libFuzzer harness for what the control daemon parses from outside: recovery plan files
// (control/plan.h, TOML from the operator), plans as JSON (from the CLI over the control
// socket), and block-range lists as JSON (from the peer site, in a demote reply). The
// first byte picks the parser, the rest is its input. A plan that parses must round-trip
// through JSON to an equal plan; nothing may throw out of a parser, read outside the input
// (ASan) or overflow (UBSan).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include <nlohmann/json.hpp>

#include "control/plan.h"
#include "control/role.h"

using namespace siterep::control;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 3) {
    case 0: {
      auto plan = ParsePlan(text, "fuzz.toml");
      if (plan.ok()) {
        auto back = PlanFromJson(PlanToJson(*plan));
        if (!back.ok() || !(*back == *plan)) std::abort();  // round trip
      }
      break;
    }
    case 1: {
      nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) break;
      auto plan = PlanFromJson(j);
      if (plan.ok()) {
        auto back = PlanFromJson(PlanToJson(*plan));
        if (!back.ok() || !(*back == *plan)) std::abort();
      }
      break;
    }
    default: {
      nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) break;
      auto ranges = DiskRangesFromJson(j);
      if (ranges) {
        // Sorted and merged, whatever came in.
        for (const auto& [disk, list] : *ranges) {
          for (size_t i = 1; i < list.size(); ++i) {
            if (list[i].offset <= list[i - 1].offset + list[i - 1].length) std::abort();
          }
        }
      }
      break;
    }
  }
  return 0;
}
