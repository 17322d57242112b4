#include "common/toml_guard.h"

#include <string>

namespace siterep {

Status CheckTomlText(std::string_view text, std::string_view source) {
  size_t line = 1, column = 1;
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    const char* what = nullptr;
    if (u >= 0x80) {
      what = "a non-ASCII character (configuration and plan files are ASCII: the TOML library "
             "of this release mishandles others)";
    } else if ((u < 0x20 && c != '\t' && c != '\n' && c != '\r') || u == 0x7f) {
      what = "a control character";
    }
    if (what != nullptr) {
      return Status::Invalid(std::string(source) + ":" + std::to_string(line) + ":" +
                             std::to_string(column) + ": " + what);
    }
    if (c == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return Status::Ok();
}

}  // namespace siterep
