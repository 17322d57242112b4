// Logging setup: spdlog to stderr, one line per event, "[time] [level] [module] message".
#pragma once

#include <memory>
#include <string>

#include <spdlog/spdlog.h>

namespace siterep {

// Sets the default logger (stderr, thread-safe). level: trace|debug|info|warn|error.
void SetupLogging(const std::string& level = "info");

}  // namespace siterep
