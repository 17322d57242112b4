#include "common/toml_guard.h"

#include <gtest/gtest.h>

#include "common/config.h"

namespace siterep {
namespace {

TEST(TomlGuardTest, NonAsciiInStringsAndCommentsIsFine) {
  EXPECT_TRUE(CheckTomlText("a = \"café ☕\" # thé\nb = 'naïve'\n", "t.toml").ok());
  EXPECT_TRUE(CheckTomlText("m = \"\"\"\nline ü\n\\\"\"\" still é\n\"\"\"\n", "t.toml").ok());
  EXPECT_TRUE(CheckTomlText("m = '''\nraw \" ü\n'''\n", "t.toml").ok());
  EXPECT_TRUE(CheckTomlText("e = \"a \\\" é\"\n", "t.toml").ok());
}

TEST(TomlGuardTest, NonAsciiElsewhereIsRefusedWithItsPlace) {
  Status s = CheckTomlText("a = 1\nb = 2 é\n", "t.toml");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.message(), "t.toml:2:7: a non-ASCII character outside a string or comment");
  // The input control_input_fuzz found: U+FEFE where toml++ tests for whitespace.
  EXPECT_FALSE(CheckTomlText("\xef\xbb\xbe" "e\"bm0X=[o\":\"west\"]", "t.toml").ok());
  EXPECT_FALSE(CheckTomlText("\"a\"\xc3\xa9 = 1", "t.toml").ok());  // after a string closes
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
