#include "tracker/test_util.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <random>

#include "common/file_util.h"
#include "tracker/log_reader.h"

namespace siterep::tracker::testing {
namespace fs = std::filesystem;

std::vector<std::byte> Pattern(size_t size, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> out(size);
  for (size_t i = 0; i < size; i += 8) {
    const uint64_t v = rng();
    std::memcpy(out.data() + i, &v, std::min<size_t>(8, size - i));
  }
  return out;
}

void MakeImage(const fs::path& path, uint64_t size, uint64_t seed) {
  const std::vector<std::byte> bytes = Pattern(size, seed);
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.valid()) << path;
  ASSERT_TRUE(PWriteAll(fd.get(), bytes.data(), bytes.size(), 0, "image").ok());
}

std::vector<std::byte> ReadWhole(const fs::path& path) {
  Result<std::string> text = ReadFile(path);
  EXPECT_TRUE(text.ok()) << text.status().ToString();
  if (!text.ok()) return {};
  std::vector<std::byte> out(text->size());
  std::memcpy(out.data(), text->data(), text->size());
  return out;
}

void AppendBytes(const fs::path& path, std::span<const std::byte> bytes) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC));
  ASSERT_TRUE(fd.valid()) << path;
  ASSERT_EQ(::write(fd.get(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
}

void CopyTree(const fs::path& from, const fs::path& to) {
  fs::copy(from, to, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
}

UniqueFd OpenRw(const fs::path& path) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  EXPECT_TRUE(fd.valid()) << path << ": " << std::strerror(errno);
  return fd;
}

std::vector<std::byte> EncodeRecord(const RecordHeader& header,
                                    std::span<const std::byte> payload) {
  std::vector<std::byte> out(kHeaderSize + payload.size());
  EncodeHeader(header, payload, std::span<std::byte, kHeaderSize>(out.data(), kHeaderSize));
  if (!payload.empty()) std::memcpy(out.data() + kHeaderSize, payload.data(), payload.size());
  return out;
}

Status WriteVia(WriteObserver& observer, int image_fd, uint64_t offset,
                std::span<const std::byte> data) {
  return observer.Write(offset, data, [&]() -> Status {
    return PWriteAll(image_fd, data.data(), data.size(), offset, "test image");
  });
}

Status DiscardVia(WriteObserver& observer, int image_fd, uint64_t offset, uint64_t length) {
  return observer.Discard(offset, length, [&]() -> Status {
    if (::fallocate(image_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(offset), static_cast<off_t>(length)) != 0) {
      return Status::FromErrno(errno, "punch test image");
    }
    return Status::Ok();
  });
}

std::vector<Rec> ReadLog(const fs::path& log_dir) {
  std::vector<Rec> out;
  Result<LogScanner> scanner = LogScanner::Open(log_dir);
  EXPECT_TRUE(scanner.ok()) << scanner.status().ToString();
  if (!scanner.ok()) return out;
  ScannedRecord rec;
  for (;;) {
    Result<bool> more = scanner->Next(&rec);
    EXPECT_TRUE(more.ok()) << more.status().ToString();
    if (!more.ok() || !*more) break;
    out.push_back(Rec{rec.header, std::vector<std::byte>(rec.payload.begin(), rec.payload.end()),
                      rec.segment});
  }
  EXPECT_FALSE(scanner->torn_tail().has_value());
  return out;
}

}  // namespace siterep::tracker::testing
