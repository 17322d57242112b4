#include "common/toml_guard.h"

#include <string>

namespace siterep {

Status CheckTomlText(std::string_view text, std::string_view source) {
  enum class In { kCode, kComment, kBasic, kLiteral, kMultiBasic, kMultiLiteral };
  In in = In::kCode;
  size_t line = 1, column = 1;
  auto at = [&](std::string_view what) {
    return Status::Invalid(std::string(source) + ":" + std::to_string(line) + ":" +
                           std::to_string(column) + ": " + std::string(what));
  };
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    const auto u = static_cast<unsigned char>(c);
    if (c == '\0') return at("a NUL byte");
    const std::string_view rest = text.substr(i);
    switch (in) {
      case In::kCode:
        if (u >= 0x80) return at("a non-ASCII character outside a string or comment");
        if (c == '#') {
          in = In::kComment;
        } else if (rest.starts_with("\"\"\"")) {
          in = In::kMultiBasic;
          i += 2;
          column += 2;
        } else if (rest.starts_with("'''")) {
          in = In::kMultiLiteral;
          i += 2;
          column += 2;
        } else if (c == '"') {
          in = In::kBasic;
        } else if (c == '\'') {
          in = In::kLiteral;
        }
        break;
      case In::kComment:
        if (c == '\n') in = In::kCode;
        break;
      case In::kBasic:
        if (c == '\\' && i + 1 < text.size() && text[i + 1] != '\n') {
          ++i;
          ++column;
        } else if (c == '"' || c == '\n') {
          in = In::kCode;  // an unterminated string ends at the line for this check
        }
        break;
      case In::kLiteral:
        if (c == '\'' || c == '\n') in = In::kCode;
        break;
      case In::kMultiBasic:
        if (c == '\\' && i + 1 < text.size()) {
          ++i;  // the escaped character (a newline is counted below)
          ++column;
        } else if (rest.starts_with("\"\"\"")) {
          in = In::kCode;
          i += 2;
          column += 2;
        }
        break;
      case In::kMultiLiteral:
        if (rest.starts_with("'''")) {
          in = In::kCode;
          i += 2;
          column += 2;
        }
        break;
    }
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return Status::Ok();
}

}  // namespace siterep
