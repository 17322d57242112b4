// The control socket's requests and replies, apart from the socket (control_server.h):
// what a client's bytes parse to, and the shape of every reply. Kept free of sockets and
// of the daemon so that fuzz/control_request_fuzz.cc can run it alone.
//
// A request is one line of JSON: an object with a string "op" and the op's fields. A
// reply is one object: {"ok": true, "result": ...} or {"ok": false, "error": NAME,
// "message": TEXT}.
#pragma once

#include <functional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace siterep::control {

// Answers one request; returns the whole reply object. May throw nlohmann::json's
// exceptions when a field has the wrong type: that is the client's error (bad-request).
using RequestHandler = std::function<nlohmann::json(const nlohmann::json& request)>;

// The reply to `received`, what a client sent: the text up to its first newline must be
// one JSON object with a string "op", which goes to handler; anything else, or a handler
// that throws, gets a bad-request refusal naming why. Never throws.
nlohmann::json AnswerRequest(std::string_view received, const RequestHandler& handler);

// The reply as sent: one line of JSON. Bytes that are not UTF-8 in its strings (a file
// name in a message, say) are sent as U+FFFD instead of failing the reply.
std::string ReplyLine(const nlohmann::json& reply);

nlohmann::json Ok(nlohmann::json result);
nlohmann::json Refused(std::string_view name, std::string_view message);

}  // namespace siterep::control
