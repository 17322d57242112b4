// Parsing of the human units in the config: sizes ("64MiB", "4G", "1048576"),
// durations ("30s", "5m", "1h", "250ms"), and log budgets ("50%" of the disk, or a size).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace siterep {

// Accepts a plain number of bytes or a number with K/M/G/T, KB/MB/..., KiB/MiB/...
// (all binary multiples: 1K == 1KiB == 1024).
Result<uint64_t> ParseSize(std::string_view text);
// Accepts "<n>ms", "<n>s", "<n>m", "<n>h", "<n>d". A bare number is refused (ambiguous).
Result<std::chrono::milliseconds> ParseDuration(std::string_view text);
// "1.5 GiB", "512 B": for messages and the CLI.
std::string FormatSize(uint64_t bytes);

}  // namespace siterep
