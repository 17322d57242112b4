// A check of TOML text before toml++ parses it. Debian 12's toml++ (3.3) has undefined
// behaviour when it classifies some non-ASCII characters (is_non_ascii_horizontal_
// whitespace and is_non_ascii_bare_key_character reach __builtin_unreachable, e.g. for
// U+00E9 or U+FEFE), which it does in many places of its parser, inside strings of
// malformed files too. Found by control_input_fuzz. Until a fixed toml++ is in Debian, the
// site config and plan files are ASCII: any other byte is refused here, with its line and
// column, before toml++ sees the text; so are control characters (not TOML anywhere).
#pragma once

#include <string_view>

#include "common/status.h"

namespace siterep {

// EINVAL "<source>:<line>:<column>: a non-ASCII character (...)" or "...: a control
// character": anything but printable ASCII, tab, CR and LF.
Status CheckTomlText(std::string_view text, std::string_view source);

}  // namespace siterep
