// A check of TOML text before toml++ parses it. Debian 12's toml++ (3.3) has undefined
// behaviour when it tests some non-ASCII characters for whitespace (is_non_ascii_
// horizontal_whitespace reaches __builtin_unreachable for e.g. U+00E9 or U+FEFE), which
// happens wherever a character outside a string or comment is read. TOML allows non-ASCII
// characters only inside strings and comments anyway, so anything else is refused here,
// with its line and column, before toml++ sees it. Found by control_input_fuzz.
#pragma once

#include <string_view>

#include "common/status.h"

namespace siterep {

// EINVAL "<source>:<line>:<column>: a non-ASCII character outside a string or comment"
// (or a NUL byte anywhere). Strings: "...", '...', """...""", '''...''', with backslash
// escapes in the double-quoted kinds.
Status CheckTomlText(std::string_view text, std::string_view source);

}  // namespace siterep
