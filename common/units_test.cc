#include "common/units.h"

#include <gtest/gtest.h>

namespace siterep {
namespace {

TEST(UnitsTest, Sizes) {
  EXPECT_EQ(*ParseSize("65536"), 65536u);
  EXPECT_EQ(*ParseSize("4K"), 4096u);
  EXPECT_EQ(*ParseSize("64MiB"), 64u << 20);
  EXPECT_EQ(*ParseSize("2 GB"), 2ull << 30);
  EXPECT_EQ(*ParseSize("1.5g"), 3ull << 29);
  EXPECT_FALSE(ParseSize("").ok());
  EXPECT_FALSE(ParseSize("lots").ok());
  EXPECT_FALSE(ParseSize("12 parsecs").ok());
  EXPECT_FALSE(ParseSize("99999999999999999999T").ok());  // would overflow
}

TEST(UnitsTest, Durations) {
  EXPECT_EQ(ParseDuration("30s")->count(), 30'000);
  EXPECT_EQ(ParseDuration("5m")->count(), 300'000);
  EXPECT_EQ(ParseDuration("1h")->count(), 3'600'000);
  EXPECT_EQ(ParseDuration("250ms")->count(), 250);
  EXPECT_FALSE(ParseDuration("30").ok());  // a bare number is ambiguous
  EXPECT_FALSE(ParseDuration("5 fortnights").ok());
  EXPECT_FALSE(ParseDuration("200000000000d").ok());  // would overflow
  EXPECT_FALSE(ParseDuration("1e400s").ok());
  EXPECT_EQ(ParseDuration("3650d")->count(), 3650LL * 86'400'000);
}

TEST(UnitsTest, FormatSize) {
  EXPECT_EQ(FormatSize(512), "512 B");
  EXPECT_EQ(FormatSize(1536), "1.5 KiB");
  EXPECT_EQ(FormatSize(4ull << 30), "4.0 GiB");
}

}  // namespace
}  // namespace siterep
