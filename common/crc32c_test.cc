#include "common/crc32c.h"

#include <gtest/gtest.h>

#include <string>

namespace siterep {
namespace {

TEST(Crc32cTest, KnownVector) {
  const std::string s = "123456789";
  EXPECT_EQ(Crc32c(s.data(), s.size()), 0xE3069283u);
}

TEST(Crc32cTest, EmptyIsZero) { EXPECT_EQ(Crc32c("", 0), 0u); }

TEST(Crc32cTest, ExtendEqualsWhole) {
  const std::string a = "hello, ", b = "replica";
  EXPECT_EQ(Crc32cExtend(Crc32c(a.data(), a.size()), b.data(), b.size()),
            Crc32c((a + b).data(), a.size() + b.size()));
}

TEST(Crc32cTest, OneBitFlipChangesCrc) {
  std::string s(4096, 'x');
  uint32_t before = Crc32c(s.data(), s.size());
  s[1234] ^= 0x01;
  EXPECT_NE(Crc32c(s.data(), s.size()), before);
}

}  // namespace
}  // namespace siterep
