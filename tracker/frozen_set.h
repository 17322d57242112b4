// The frozen set of a cut on disk: "<log dir>/<segment>.cut", written by DiskLog::WriteCut
// (to "<segment>.cut.tmp", synced, renamed, the folder synced: durable before the map's
// bits are cleared) and deleted when the cycle is released or rolled back. It
// holds what the cut's records are made of: the frozen blocks, and the numbers the
// records carry. An older version wrote "<log dir>/frozen.map" (version 1: cycle and
// words only) for a cut not yet published; a restart puts its blocks back into the map.
//
// Layout (little-endian), version 2:
//   0  4  magic "SRFZ"     4  4  version (2)    8  8  cycle      16  8  disk size
//   24 8  word count      32  4  CRC32C of the header (this field zero) and the words
//   36 4  disk id         40  8  segment        48  8  first seq  56  8  last seq
//   64 8  epoch           72  8  cut time (ns)  80  8  first change time (ns, 0: none)
//   88 40 zero
//   128 .. the words: bit b of word w is the 4 KiB block 64 * w + b
// Version 1: the same first 32 bytes, the CRC32C of the words alone, zero to byte 64, then
// the words.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <vector>

#include "common/status.h"

namespace siterep::tracker {

// What a cut's records carry, and where they go: one disk's share of a cut.
struct CutInfo {
  uint32_t disk_id = 0;
  uint64_t cycle = 0;
  uint64_t segment = 0;  // the segment number it ships as
  uint64_t first_seq = 0;
  uint64_t last_seq = 0;  // of its cut record
  uint64_t epoch = 0;     // what its records carry
  int64_t cut_unix_nanos = 0;
  int64_t first_change_unix_nanos = 0;  // 0: none
};

struct FrozenSet : CutInfo {
  uint32_t version = 2;  // version 1 has the cycle alone of CutInfo
  std::vector<uint64_t> words;
  // The file is short, of another disk size, or its CRC does not match: what it held is
  // unknown (the caller marks every block).
  bool torn = false;
};

// Writes cut and words (as version 2) to "<path>.tmp", fdatasyncs it, renames it to path and syncs
// the folder. ENOSPC for a short write; the .tmp file is deleted on failure.
Status SaveFrozenSet(const std::filesystem::path& path, uint64_t disk_size, const CutInfo& cut,
                     const std::vector<uint64_t>& words);
// nullopt when there is no file.
Result<std::optional<FrozenSet>> LoadFrozenSet(const std::filesystem::path& path,
                                               uint64_t disk_size);

}  // namespace siterep::tracker
