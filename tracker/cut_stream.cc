#include "tracker/cut_stream.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cstdio>

#include "common/block_hash.h"
#include "common/file_util.h"
#include "tracker/dirty_bitmap.h"
#include "tracker/frozen_set.h"
#include "tracker/locks.h"
#include "tracker/log_format.h"
#include "tracker/snapshot.h"

namespace siterep::tracker {
namespace {

constexpr uint64_t kBlock = DirtyBitmap::kBlockSize;
constexpr uint64_t kMaxRunBlocks = kMaxRecordPayload / kBlock;

uint64_t BlockCount(uint64_t disk_size) { return (disk_size + kBlock - 1) / kBlock; }

namespace fs = std::filesystem;

// The next run of set bits at or after from: its first block and length in blocks (at
// most kMaxRunBlocks, and never across a kMaxRecordPayload-aligned boundary, so a run is
// within one range-lock chunk, and a guest's aligned discard of a whole chunk is a run of
// its own); false when there is none.
bool NextRun(const std::vector<uint64_t>& words, uint64_t blocks, uint64_t from, uint64_t* first,
             uint64_t* count) {
  auto is_set = [&](uint64_t block) {
    return block < blocks && ((words[block / 64] >> (block % 64)) & 1) != 0;
  };
  for (uint64_t block = from; block < blocks;) {
    if ((words[block / 64] >> (block % 64)) == 0) {
      block = (block / 64 + 1) * 64;  // nothing more set in this word
      continue;
    }
    if (!is_set(block)) {
      ++block;
      continue;
    }
    uint64_t n = 1;
    while ((block + n) % kMaxRunBlocks != 0 && is_set(block + n)) ++n;
    *first = block;
    *count = n;
    return true;
  }
  return false;
}

}  // namespace

fs::path CutPath(const fs::path& log_dir, uint64_t segment) {
  char name[32];
  std::snprintf(name, sizeof(name), "%020llu.cut", static_cast<unsigned long long>(segment));
  return log_dir / name;
}

fs::path CowPath(const fs::path& log_dir, uint64_t segment) {
  char name[32];
  std::snprintf(name, sizeof(name), "%020llu.cow", static_cast<unsigned long long>(segment));
  return log_dir / name;
}

SnapshotOptions CutCowOptions(std::shared_ptr<const std::vector<uint64_t>> frozen,
                              std::shared_ptr<CowBudget> budget) {
  SnapshotOptions so;
  so.block_size = kBlock;
  so.only = std::move(frozen);
  so.persistent = true;
  so.budget = std::move(budget);
  return so;
}

uint64_t CutRecordCount(const std::vector<uint64_t>& words, uint64_t disk_size) {
  const uint64_t blocks = BlockCount(disk_size);
  uint64_t records = 1;  // the cut record
  uint64_t first = 0;
  uint64_t count = 0;
  for (uint64_t at = 0; NextRun(words, blocks, at, &first, &count); at = first + count) ++records;
  return records;
}

uint64_t CutBytesAtMost(const std::vector<uint64_t>& words, uint64_t disk_size) {
  const uint64_t blocks = BlockCount(disk_size);
  uint64_t bytes = kHeaderSize + kCutPayloadSize;
  uint64_t first = 0;
  uint64_t count = 0;
  for (uint64_t at = 0; NextRun(words, blocks, at, &first, &count); at = first + count) {
    bytes += kHeaderSize + std::min(count * kBlock, disk_size - first * kBlock);
  }
  return bytes;
}

CutStream::CutStream(std::shared_ptr<const FrozenCut> cut, uint64_t disk_size, RangeLocks* ranges,
                     std::function<void(const Status&)> on_damage)
    : cut_(std::move(cut)),
      disk_size_(disk_size),
      ranges_(ranges),
      on_damage_(std::move(on_damage)),
      seq_(cut_->first_seq - 1) {}

Result<std::span<const std::byte>> CutStream::Next(size_t max) {
  if (pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
    if (ended_) return std::span<const std::byte>();
    SR_RETURN_IF_ERROR(MakeRecord());
  }
  const size_t n = std::min(max, buf_.size() - pos_);
  std::span<const std::byte> out(buf_.data() + pos_, n);
  pos_ += n;
  return out;
}

Status CutStream::MakeRecord() {
  RecordHeader h;
  h.disk_id = cut_->disk_id;
  h.epoch = cut_->epoch;
  h.seq = ++seq_;
  uint64_t first = 0;
  uint64_t count = 0;
  if (cut_->frozen && NextRun(*cut_->frozen, BlockCount(disk_size_), next_block_, &first, &count)) {
    if (!cut_->cow) {
      return Status::Error(
          EIO, "cycle " + std::to_string(cut_->cycle) + " has frozen blocks but no copy-on-write");
    }
    next_block_ = first + count;
    const uint64_t offset = first * kBlock;
    const uint64_t length = std::min(count * kBlock, disk_size_ - offset);
    buf_.resize(kHeaderSize + length);
    std::span<std::byte> payload(buf_.data() + kHeaderSize, length);
    Status read;
    {
      RangeLocks::Guard range = ranges_->Lock(offset, length);
      read = cut_->cow->Read(offset, payload);
    }
    if (!read.ok()) {
      if (read.code() == EBADMSG && on_damage_) on_damage_(read);
      return read;
    }
    h.offset = offset;
    h.length = length;
    if (IsAllZero(payload)) {
      // Zeros at the cut (a discard, or zeros written): a discard record, no payload.
      h.kind = RecordKind::kDiscard;
      buf_.resize(kHeaderSize);
      payload = payload.first(0);
    } else {
      h.kind = RecordKind::kWrite;
    }
    EncodeHeader(h, payload, std::span<std::byte, kHeaderSize>(buf_.data(), kHeaderSize));
    return Status::Ok();
  }
  // The cut record closes the segment.
  if (seq_ != cut_->last_seq) {
    return Status::Error(
        EIO, "cycle " + std::to_string(cut_->cycle) + " made " +
                 std::to_string(seq_ - cut_->first_seq + 1) + " records, not the " +
                 std::to_string(cut_->last_seq - cut_->first_seq + 1) + " of its frozen set");
  }
  buf_.resize(kHeaderSize + kCutPayloadSize);
  std::span<std::byte, kCutPayloadSize> payload(buf_.data() + kHeaderSize, kCutPayloadSize);
  EncodeCutPayload(CutPayload{cut_->cycle, cut_->cut_unix_nanos, cut_->first_change_unix_nanos},
                   payload);
  h.kind = RecordKind::kCut;
  h.offset = 0;
  h.length = kCutPayloadSize;
  EncodeHeader(h, payload, std::span<std::byte, kHeaderSize>(buf_.data(), kHeaderSize));
  ended_ = true;
  return Status::Ok();
}

Result<std::vector<std::shared_ptr<FrozenCut>>> OpenCutFiles(CutFiles in) {
  std::vector<uint64_t> numbers;
  std::error_code ec;
  fs::directory_iterator it(in.log_dir, ec);
  if (ec) return Status::Error(ec.value(), "list " + in.log_dir.string() + ": " + ec.message());
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) return Status::Error(ec.value(), "list " + in.log_dir.string() + ": " + ec.message());
    const std::string name = it->path().filename().native();
    if (name.size() != 24 || !name.ends_with(".cut")) continue;
    uint64_t n = 0;
    auto [ptr, err] = std::from_chars(name.data(), name.data() + 20, n);
    if (err == std::errc() && ptr == name.data() + 20) numbers.push_back(n);
  }
  std::sort(numbers.begin(), numbers.end());
  std::vector<std::shared_ptr<FrozenCut>> out;
  for (uint64_t n : numbers) {
    const fs::path path = CutPath(in.log_dir, n);
    if (n <= in.released_segment) {
      if (in.remove_released) {
        for (const fs::path& p : {path, CowPath(in.log_dir, n)}) {
          if (::unlink(p.c_str()) != 0 && errno != ENOENT) {
            return Status::FromErrno(errno, "delete " + p.string());
          }
        }
      }
      continue;
    }
    SR_ASSIGN_OR_RETURN(std::optional<FrozenSet> set, LoadFrozenSet(path, in.disk_size));
    if (!set) continue;  // deleted meanwhile
    if (!set->torn && set->version == 2 && in.disk_id != 0 && set->disk_id != in.disk_id) {
      return Status::Invalid(path.string() + " holds the cut of disk id " +
                             std::to_string(set->disk_id) + ", not of disk " + in.disk_name +
                             " (id " + std::to_string(in.disk_id) +
                             "): is the log folder of another disk configured here?");
    }
    if (set->torn || set->version != 2 || set->segment != n || set->last_seq < set->first_seq) {
      return Status::Corrupt("cut file " + path.string() + " is damaged");
    }
    if (in.last_seq && (set->first_seq != *in.last_seq + 1 || set->cycle <= in.last_cycle)) {
      return Status::Corrupt("cut file " + path.string() + " does not follow the log (cycle " +
                             std::to_string(set->cycle) + ", first seq " +
                             std::to_string(set->first_seq) + ")");
    }
    in.disk_id = set->disk_id;
    auto cut = std::make_shared<FrozenCut>();
    static_cast<CutInfo&>(*cut) = *set;
    auto words = std::make_shared<std::vector<uint64_t>>(std::move(set->words));
    for (uint64_t w : *words) cut->frozen_blocks += static_cast<uint64_t>(std::popcount(w));
    if (cut->last_seq - cut->first_seq + 1 != CutRecordCount(*words, in.disk_size)) {
      return Status::Corrupt("cut file " + path.string() + " says seq " +
                             std::to_string(cut->first_seq) + ".." + std::to_string(cut->last_seq) +
                             ", not what its blocks make");
    }
    cut->frozen = words;
    if (cut->frozen_blocks > 0) {
      Result<std::unique_ptr<DiskSnapshot>> cow =
          DiskSnapshot::Reopen(in.disk_name, in.image_fd, in.disk_size, CowPath(in.log_dir, n),
                               CutCowOptions(words, in.cow_budget));
      if (!cow.ok()) {
        // Without it the blocks overwritten since the cut are gone: a resync must say.
        return Status::Corrupt("copy-on-write of cycle " + std::to_string(cut->cycle) + ": " +
                               cow.status().message());
      }
      cut->cow = std::move(*cow);
    }
    if (in.last_seq) {
      in.last_seq = cut->last_seq;
      in.last_cycle = cut->cycle;
    }
    out.push_back(std::move(cut));
  }
  return out;
}

Result<std::vector<std::byte>> ReadSegment(SegmentStream& stream, size_t max) {
  std::vector<std::byte> out;
  while (!stream.done()) {
    SR_ASSIGN_OR_RETURN(std::span<const std::byte> bytes, stream.Next(max));
    out.insert(out.end(), bytes.begin(), bytes.end());
  }
  return out;
}

Status WriteSegmentFile(SegmentStream& stream, const fs::path& path) {
  fs::path tmp = path;
  tmp += ".tmp";
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  uint64_t offset = 0;
  while (!stream.done()) {
    SR_ASSIGN_OR_RETURN(std::span<const std::byte> bytes, stream.Next(4u << 20));
    SR_RETURN_IF_ERROR(PWriteAll(fd.get(), bytes.data(), bytes.size(), offset, tmp.string()));
    offset += bytes.size();
  }
  if (::fdatasync(fd.get()) != 0) return Status::FromErrno(errno, "fdatasync " + tmp.string());
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + tmp.string() + " to " + path.string());
  }
  return Status::Ok();
}

Result<std::unique_ptr<FileSegmentStream>> FileSegmentStream::Open(
    const std::filesystem::path& path) {
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDONLY | O_CLOEXEC));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, "stat " + path.string());
  return std::unique_ptr<FileSegmentStream>(
      new FileSegmentStream(path, std::move(fd), static_cast<uint64_t>(st.st_size)));
}

Result<std::span<const std::byte>> FileSegmentStream::Next(size_t max) {
  const size_t n = static_cast<size_t>(std::min<uint64_t>(max, size_ - offset_));
  buf_.resize(n);
  if (n > 0) SR_RETURN_IF_ERROR(PReadAll(fd_.get(), buf_.data(), n, offset_, path_.string()));
  offset_ += n;
  return std::span<const std::byte>(buf_.data(), n);
}

}  // namespace siterep::tracker
