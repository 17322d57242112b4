// Helpers for the tracker's unit tests: temporary folders, image files with patterns,
// whole-file reads, hand-made records, and a "crash copy" of a live log.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "common/function_ref.h"
#include "common/status.h"
#include "common/testing/temp_dir.h"
#include "common/unique_fd.h"
#include "tracker/log_format.h"
#include "tracker/write_observer.h"

namespace siterep::tracker::testing {

using siterep::testing::TempDir;

// Deterministic pseudo-random bytes.
std::vector<std::byte> Pattern(size_t size, uint64_t seed);
// Creates (or replaces) a file of size bytes filled with Pattern(size, seed).
void MakeImage(const std::filesystem::path& path, uint64_t size, uint64_t seed);
std::vector<std::byte> ReadWhole(const std::filesystem::path& path);
void AppendBytes(const std::filesystem::path& path, std::span<const std::byte> bytes);
void CopyTree(const std::filesystem::path& from, const std::filesystem::path& to);
// Opens a file O_RDWR (aborting the test on failure).
UniqueFd OpenRw(const std::filesystem::path& path);

// A whole encoded record.
std::vector<std::byte> EncodeRecord(const RecordHeader& header, std::span<const std::byte> payload);

// observer.Write with an apply that pwrites the image.
Status WriteVia(WriteObserver& observer, int image_fd, uint64_t offset,
                std::span<const std::byte> data);
Status DiscardVia(WriteObserver& observer, int image_fd, uint64_t offset, uint64_t length);

// Records of a log folder in order (fails the test on a read error).
struct Rec {
  RecordHeader header;
  std::vector<std::byte> payload;
  uint64_t segment = 0;
};
std::vector<Rec> ReadLog(const std::filesystem::path& log_dir);

}  // namespace siterep::tracker::testing
