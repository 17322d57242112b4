// Block hashes for syncs (initial copy from a seed, resync): XXH3-64 of one block's bytes.
// Both sites hash the same way; a block past a disk's end is hashed over its bytes within
// the disk only. Pure and thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace siterep {

uint64_t BlockHash(std::span<const std::byte> block);
// Appends the BlockHash of each block_size block of data (the last one over what is left).
void AppendBlockHashes(std::span<const std::byte> data, uint64_t block_size,
                       std::vector<uint64_t>* out);

// True when every byte is zero (word-wise; any length).
bool IsAllZero(std::span<const std::byte> data);

}  // namespace siterep
