#include "common/toml_guard.h"

#include <gtest/gtest.h>

#include "common/config.h"

namespace siterep {
namespace {

TEST(TomlGuardTest, PrintableAsciiTabsAndNewlinesPass) {
  EXPECT_TRUE(CheckTomlText("a = \"x y\" # c\r\nb =\t'z'\n", "t.toml").ok());
}

TEST(TomlGuardTest, OtherBytesAreRefusedWithTheirPlace) {
  Status s = CheckTomlText("a = 1\nb = \"caf\xc3\xa9\"\n", "t.toml");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.message().rfind("t.toml:2:9: a non-ASCII character", 0), 0u) << s.message();
  // The inputs control_input_fuzz found (toml++ reached __builtin_unreachable on them).
  EXPECT_FALSE(CheckTomlText("\xef\xbb\xbe" "e\"bm0X=[o\":\"west\"]", "t.toml").ok());
  EXPECT_FALSE(CheckTomlText("name = 0ea!{\"))))\xd0\x9a)i)", "t.toml").ok());
  EXPECT_FALSE(CheckTomlText("name = +:=tUUr\"\"\"S\xcb\x85", "t.toml").ok());
  Status ctl = CheckTomlText("a = \"x\x1a\"", "t.toml");
  ASSERT_FALSE(ctl.ok());
  EXPECT_EQ(ctl.message(), "t.toml:1:7: a control character");
  EXPECT_FALSE(CheckTomlText(std::string_view("a = 1\0", 6), "t.toml").ok());
}

TEST(TomlGuardTest, TheSiteConfigIsGuarded) {
  auto cfg = ParseConfig("[site]\nname = \"east\" \xc2\xa0\n", "/etc", "site.toml");
  ASSERT_FALSE(cfg.ok());
  EXPECT_NE(cfg.status().message().find("site.toml:2:15: a non-ASCII character"),
            std::string::npos)
      << cfg.status().message();
}

}  // namespace
}  // namespace siterep
