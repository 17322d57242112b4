#include "common/block_hash.h"

#include <algorithm>

#include <xxhash.h>

#include <cstring>

namespace siterep {

uint64_t BlockHash(std::span<const std::byte> block) {
  return XXH3_64bits(block.data(), block.size());
}

void AppendBlockHashes(std::span<const std::byte> data, uint64_t block_size,
                       std::vector<uint64_t>* out) {
  for (uint64_t at = 0; at < data.size(); at += block_size) {
    out->push_back(BlockHash(data.subspan(at, std::min<uint64_t>(block_size, data.size() - at))));
  }
}

bool IsAllZero(std::span<const std::byte> data) {
  const std::byte* p = data.data();
  size_t n = data.size();
  while (n >= 64) {
    uint64_t w[8];
    std::memcpy(w, p, 64);
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return false;
    p += 64;
    n -= 64;
  }
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != std::byte{0}) return false;
  }
  return true;
}

}  // namespace siterep
