// The control socket protocol, shared by siterepd and the siterep CLI.
//
// A Unix stream socket; the client sends one JSON object on one line and reads one JSON
// object on one line back, then closes. Requests: {"op": "status", "vm": "web01"}.
// Replies: {"ok": true, "result": {...}} or
//          {"ok": false, "error": "<refusal name>", "message": "<one line for the CLI>"}.
#pragma once

#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace siterep {

// Largest request or reply line either side accepts.
inline constexpr size_t kMaxControlMessage = 16 * 1024 * 1024;

// Sends request and returns the reply object (ok or refused). A Status only for transport
// errors (no daemon at path, malformed reply).
Result<nlohmann::json> CallControl(const std::filesystem::path& socket_path,
                                   const nlohmann::json& request);

}  // namespace siterep
