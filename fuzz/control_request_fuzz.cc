// libFuzzer harness for the control socket's request parser (control/request.h): the
// bytes a client sends, as the server hands them to AnswerRequest, and the reply line the
// server sends back (ReplyLine). The handler stands in for the daemon's dispatch the way
// the daemon reads a request: typed reads of the fields the CLI sends, which throw on a
// wrong type, and a refusal that quotes part of the op (cut at a byte, so not always
// UTF-8). Checked on every input:
//   - the handler runs exactly when the first line is a JSON object with a string "op";
//   - every reply is an object with a boolean "ok", and a refusal has a string "error"
//     and "message";
//   - the reply line is one line of valid JSON that parses back to an object.
// (The daemon's handling of each op is exercised against a running daemon by
// control/request_mutation_test.cc.)
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "control/request.h"

using nlohmann::json;
using namespace siterep::control;

namespace {

json Handle(const json& request) {
  const std::string op = request["op"].get<std::string>();
  // Typed reads as the daemon's handlers do them: a field of another type throws.
  if (request.contains("vm")) (void)request["vm"].get<std::string>();
  if (request.contains("disk")) (void)request["disk"].get<std::string>();
  if (request.contains("point")) (void)request["point"].get<uint64_t>();
  if (request.contains("full")) (void)request["full"].get<bool>();
  if (request.contains("planned")) (void)request["planned"].get<bool>();
  if (request.contains("timeout")) (void)request["timeout"].get<double>();
  if (request.contains("spec")) (void)request["spec"].get<std::string>();
  if (request.contains("disks")) {
    for (const json& d : request["disks"]) (void)d.get<std::string>();
  }
  if (op == "status") return Ok({{"vms", json::array()}});
  // Part of the op in the message, cut at a byte: may end inside a UTF-8 sequence.
  return Refused("unknown-op", "unknown request '" + op.substr(0, 7) + "'");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view received(reinterpret_cast<const char*>(data), size);
  bool handled = false;
  json reply = AnswerRequest(received, [&](const json& request) {
    handled = true;
    return Handle(request);
  });

  // The handler ran exactly for a first line that is an object with a string op.
  const std::string_view line = received.substr(0, received.find('\n'));
  json expect = json::parse(line, nullptr, /*allow_exceptions=*/false);
  const bool valid = !expect.is_discarded() && expect.is_object() && expect.contains("op") &&
                     expect["op"].is_string();
  if (handled != valid) std::abort();

  if (!reply.is_object() || !reply.contains("ok") || !reply["ok"].is_boolean()) std::abort();
  if (!reply["ok"].get<bool>() &&
      (!reply.contains("error") || !reply["error"].is_string() || !reply.contains("message") ||
       !reply["message"].is_string())) {
    std::abort();
  }
  const std::string sent = ReplyLine(reply);
  if (sent.empty() || sent.back() != '\n' || sent.find('\n') != sent.size() - 1) std::abort();
  json back = json::parse(sent, nullptr, /*allow_exceptions=*/false);
  if (back.is_discarded() || !back.is_object() || back["ok"] != reply["ok"]) std::abort();
  return 0;
}
