// The frozen set of a cut on disk: "<log dir>/frozen.map", written by DiskLog::WriteCut
// (page cache; the builder fdatasyncs it before it reads the blocks) and deleted once the
// cycle is published or rolled back. A restart finds it only when the cut was not
// published: its blocks then go back into the changed-block map (disk_log.h).
//
// Layout (little-endian):
//   0  4  magic "SRFZ"     4  4  version (1)    8  8  cycle      16  8  disk size
//   24 8  word count      32  4  CRC32C of the words              36 28  zero
//   64 .. the words: bit b of word w is the 4 KiB block 64 * w + b
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <vector>

#include "common/status.h"

namespace siterep::tracker {

struct FrozenSet {
  uint64_t cycle = 0;
  std::vector<uint64_t> words;
  // The file is short, of another disk size, or its CRC does not match: what it held is
  // unknown (the caller marks every block).
  bool torn = false;
};

// Writes the frozen set of cycle (no sync). ENOSPC for a short write.
Status SaveFrozenSet(const std::filesystem::path& path, uint64_t cycle, uint64_t disk_size,
                     const std::vector<uint64_t>& words);
// nullopt when there is no file.
Result<std::optional<FrozenSet>> LoadFrozenSet(const std::filesystem::path& path,
                                               uint64_t disk_size);

}  // namespace siterep::tracker
