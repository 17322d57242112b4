#include "tracker/prefix_check.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <vector>

#include "common/file_util.h"
#include "common/unique_fd.h"
#include "tracker/log_reader.h"
#include "tracker/replay.h"

namespace siterep::tracker {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kBlock = 4096;
constexpr uint64_t kChunk = 1 << 20;

Result<uint64_t> FileSize(const fs::path& p) {
  struct stat st;
  if (::stat(p.c_str(), &st) != 0) return Status::FromErrno(errno, "stat " + p.string());
  return static_cast<uint64_t>(st.st_size);
}

// Compares [offset, offset + length) of two files; adds the differing block numbers to
// *diff and removes the equal ones.
Status CompareRange(int a, int b, uint64_t size, uint64_t offset, uint64_t length,
                    std::set<uint64_t>* diff, std::vector<std::byte>* ba,
                    std::vector<std::byte>* bb) {
  if (length == 0 || offset >= size) return Status::Ok();
  // Whole blocks covering the range (the last block of an odd-sized disk is short).
  const uint64_t stop =
      std::min(size, (std::min(size, offset + length) + kBlock - 1) / kBlock * kBlock);
  for (uint64_t at = offset / kBlock * kBlock; at < stop;) {
    const uint64_t bytes = std::min(kChunk, stop - at);
    ba->resize(bytes);
    bb->resize(bytes);
    SR_RETURN_IF_ERROR(PReadAll(a, ba->data(), bytes, at, "work image"));
    SR_RETURN_IF_ERROR(PReadAll(b, bb->data(), bytes, at, "replica"));
    for (uint64_t i = 0; i < bytes; i += kBlock) {
      const uint64_t len = std::min(kBlock, bytes - i);
      if (std::memcmp(ba->data() + i, bb->data() + i, len) != 0) {
        diff->insert((at + i) / kBlock);
      } else {
        diff->erase((at + i) / kBlock);
      }
    }
    at += bytes;
  }
  return Status::Ok();
}

Result<PrefixCheckDiskResult> CheckDisk(const PrefixCheckDisk& d, const fs::path& work_dir) {
  PrefixCheckDiskResult r;
  r.name = d.name;
  SR_ASSIGN_OR_RETURN(uint64_t size, FileSize(d.replica));
  SR_ASSIGN_OR_RETURN(uint64_t pre_size, FileSize(d.pre_image));
  if (size != pre_size) {
    return Status::Invalid("disk " + d.name + ": replica " + d.replica.string() + " has " +
                           std::to_string(size) + " bytes, pre-image " + std::to_string(pre_size));
  }
  const fs::path work = work_dir / (d.name + ".prefix-check.img");
  std::error_code ec;
  fs::copy_file(d.pre_image, work, fs::copy_options::overwrite_existing, ec);
  if (ec)
    return Status::FromErrno(ec.value(), "copy " + d.pre_image.string() + " to " + work.string());
  struct Remove {
    fs::path p;
    ~Remove() {
      std::error_code ignored;
      fs::remove(p, ignored);
    }
  } remove{work};
  SR_ASSIGN_OR_RETURN(UniqueFd wfd, OpenFile(work, O_RDWR));
  SR_ASSIGN_OR_RETURN(UniqueFd rfd, OpenFile(d.replica, O_RDONLY));

  std::set<uint64_t> diff;
  std::vector<std::byte> ba, bb;
  SR_RETURN_IF_ERROR(CompareRange(wfd.get(), rfd.get(), size, 0, size, &diff, &ba, &bb));
  r.fewest_differing_blocks = diff.size();
  if (diff.empty()) r.matching_cycles.push_back(0);

  SR_ASSIGN_OR_RETURN(LogScanner scanner, LogScanner::Open(d.log_dir));
  ScannedRecord rec;
  for (;;) {
    SR_ASSIGN_OR_RETURN(bool more, scanner.Next(&rec));
    if (!more) break;
    if (rec.header.kind == RecordKind::kCut) {
      const uint64_t cycle = DecodeCutPayload(rec.payload.first<kCutPayloadSize>()).cycle;
      r.last_cycle = cycle;
      if (diff.empty()) r.matching_cycles.push_back(cycle);
      if (diff.size() < r.fewest_differing_blocks) {
        r.fewest_differing_blocks = diff.size();
        r.fewest_at_cycle = cycle;
      }
      continue;
    }
    SR_RETURN_IF_ERROR(
        ApplyRecord(wfd.get(), size, rec.header, rec.payload)
            .WithContext("disk " + d.name + " seq " + std::to_string(rec.header.seq)));
    SR_RETURN_IF_ERROR(CompareRange(wfd.get(), rfd.get(), size, rec.header.offset,
                                    rec.header.length, &diff, &ba, &bb));
  }
  if (!r.matching_cycles.empty()) r.fewest_differing_blocks = 0;
  return r;
}

}  // namespace

Result<PrefixCheckResult> CheckReplicaIsLogPrefix(const std::vector<PrefixCheckDisk>& disks,
                                                  const fs::path& work_dir) {
  if (disks.empty()) return Status::Invalid("no disks to check");
  PrefixCheckResult result;
  std::optional<std::set<uint64_t>> common;
  for (const PrefixCheckDisk& d : disks) {
    SR_ASSIGN_OR_RETURN(PrefixCheckDiskResult r, CheckDisk(d, work_dir));
    std::set<uint64_t> mine(r.matching_cycles.begin(), r.matching_cycles.end());
    if (!common) {
      common = std::move(mine);
    } else {
      std::set<uint64_t> both;
      std::set_intersection(common->begin(), common->end(), mine.begin(), mine.end(),
                            std::inserter(both, both.end()));
      common = std::move(both);
    }
    result.disks.push_back(std::move(r));
  }
  if (!common->empty()) result.cycle = *common->rbegin();
  return result;
}

std::string PrefixCheckResult::Summary() const {
  std::string out;
  for (const PrefixCheckDiskResult& d : disks) {
    out += "disk " + d.name + ": ";
    if (d.matching_cycles.empty()) {
      out += "equals no cut of its log (at best " + std::to_string(d.fewest_differing_blocks) +
             " differing 4 KiB blocks, at cycle " + std::to_string(d.fewest_at_cycle) + ")";
    } else {
      out += "equals the log through cycle";
      out += d.matching_cycles.size() > 1 ? "s " : " ";
      const size_t shown = std::min<size_t>(d.matching_cycles.size(), 8);
      for (size_t i = d.matching_cycles.size() - shown; i < d.matching_cycles.size(); ++i) {
        out += std::to_string(d.matching_cycles[i]) + (i + 1 < d.matching_cycles.size() ? "," : "");
      }
    }
    out += " (log ends at cycle " + std::to_string(d.last_cycle) + ")\n";
  }
  out += cycle ? "consistent: every disk is the pre-image plus the log through cycle " +
                     std::to_string(*cycle) + "\n"
               : "NOT consistent: no cycle at which every disk matches\n";
  return out;
}

}  // namespace siterep::tracker
