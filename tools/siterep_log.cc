// siterep-log: inspect and use folders of segments (tracker/log_format.h) for tests and
// debugging: the archive of siterepd --archive-logs, a replica's received/<disk>/ folder,
// or a disk's log folder "<image>.srlog" (its unshipped cuts are read as the shipper
// would send them, from the image and their copy-on-write; --image names the image when
// the folder is not next to it).
//
//   siterep-log dump LOG_DIR [--image IMG]              one line per record
//   siterep-log check LOG_DIR [--image IMG]             verify every record; exit 1 on damage
//   siterep-log replay LOG_DIR TARGET_IMAGE [--image IMG] [--through-cycle N]
//
// Exit codes: 0 ok (a torn tail at the end of the last segment is a warning), 1 failure,
// 2 usage. A log folder must not be in use by siterepd (its images change under it).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>

#include "common/file_util.h"
#include "common/status.h"
#include "common/time_util.h"
#include "common/unique_fd.h"
#include "tracker/cut_stream.h"
#include "tracker/disk_state.h"
#include "tracker/locks.h"
#include "tracker/log_format.h"
#include "tracker/log_reader.h"
#include "tracker/replay.h"

namespace siterep::tracker {
namespace {

namespace fs = std::filesystem;

constexpr int kOk = 0;
constexpr int kFailed = 1;
constexpr int kUsage = 2;

int Fail(const Status& status) {
  std::fprintf(stderr, "siterep-log: %s\n", status.ToString().c_str());
  return kFailed;
}

void WarnTornTail(const TornTail& tail) {
  std::fprintf(stderr,
               "siterep-log: warning: torn tail in %s at offset %llu: %llu bytes (%s); "
               "recovery drops it\n",
               SegmentFileName(tail.segment).c_str(),
               static_cast<unsigned long long>(tail.file_offset),
               static_cast<unsigned long long>(tail.dropped_bytes), tail.why.c_str());
}

// A folder that holds what its segments are, removed at the end.
struct Scratch {
  fs::path dir;
  ~Scratch() {
    std::error_code ec;
    if (!dir.empty()) fs::remove_all(dir, ec);
  }
};

// The folder to read: log_dir itself, or, when it holds cut files, a scratch copy with
// an older version's segment files and every cut's segment as the shipper would send it.
Result<fs::path> Readable(const fs::path& log_dir, std::string image, Scratch* scratch) {
  bool cuts = false;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(log_dir, ec)) {
    if (e.path().extension() == ".cut") cuts = true;
  }
  if (ec) return Status::Error(ec.value(), "list " + log_dir.string() + ": " + ec.message());
  if (!cuts) return log_dir;
  if (image.empty()) {
    fs::path p = log_dir.lexically_normal();
    if (!p.has_filename()) p = p.parent_path();
    if (p.extension() != ".srlog") {
      return Status::Invalid(log_dir.string() +
                             " holds cuts but is not named <image>.srlog: give --image");
    }
    image = p.replace_extension().string();
  }
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(image, O_RDONLY | O_CLOEXEC));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, "stat " + image);
  char tmpl[] = "/tmp/siterep-log.XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return Status::FromErrno(errno, "make a scratch folder");
  scratch->dir = tmpl;
  SR_ASSIGN_OR_RETURN(std::vector<SegmentFile> files, ListSegments(log_dir));
  for (const SegmentFile& f : files) {
    fs::copy_file(f.path, scratch->dir / f.path.filename(), ec);
    if (ec) return Status::Error(ec.value(), "copy " + f.path.string() + ": " + ec.message());
  }
  Result<std::optional<DiskState>> state = LoadDiskState(log_dir);
  if (!state.ok()) return state.status();
  CutFiles in;
  in.log_dir = log_dir;
  in.disk_name = fs::path(image).filename().string();
  in.disk_size = static_cast<uint64_t>(st.st_size);
  in.image_fd = fd.get();
  if (*state) in.released_segment = (*state)->last_segment;
  SR_ASSIGN_OR_RETURN(std::vector<std::shared_ptr<FrozenCut>> cut_list, OpenCutFiles(in));
  RangeLocks locks;
  for (const std::shared_ptr<FrozenCut>& cut : cut_list) {
    CutStream stream(cut, in.disk_size, &locks);
    SR_RETURN_IF_ERROR(WriteSegmentFile(stream, SegmentPath(scratch->dir, cut->segment)));
  }
  return scratch->dir;
}

int Dump(const fs::path& log_dir) {
  Result<LogScanner> scanner = LogScanner::Open(log_dir);
  if (!scanner.ok()) return Fail(scanner.status());
  ScannedRecord rec;
  for (;;) {
    Result<bool> more = scanner->Next(&rec);
    if (!more.ok()) return Fail(more.status());
    if (!*more) break;
    const RecordHeader& h = rec.header;
    std::printf(
        "segment=%llu at=%llu seq=%llu kind=%s offset=%llu length=%llu epoch=%llu",
        static_cast<unsigned long long>(rec.segment),
        static_cast<unsigned long long>(rec.file_offset), static_cast<unsigned long long>(h.seq),
        std::string(RecordKindName(h.kind)).c_str(), static_cast<unsigned long long>(h.offset),
        static_cast<unsigned long long>(h.length), static_cast<unsigned long long>(h.epoch));
    if (h.kind == RecordKind::kCut) {
      const CutPayload cut = DecodeCutPayload(rec.payload.first<kCutPayloadSize>());
      std::printf(" cycle=%llu time=%s", static_cast<unsigned long long>(cut.cycle),
                  FormatUtc(cut.unix_nanos).c_str());
      if (cut.first_change_unix_nanos != 0) {
        std::printf(" first_change=%s", FormatUtc(cut.first_change_unix_nanos).c_str());
      }
    }
    std::printf("\n");
  }
  if (scanner->torn_tail()) WarnTornTail(*scanner->torn_tail());
  return kOk;
}

int Check(const fs::path& log_dir) {
  Result<LogScanner> scanner = LogScanner::Open(log_dir);
  if (!scanner.ok()) return Fail(scanner.status());
  const std::vector<SegmentFile>& segments = scanner->segments();
  uint64_t records = 0, writes = 0, discards = 0, cuts = 0, bytes = 0;
  uint64_t first_seq = 0, last_seq = 0, last_cycle = 0;
  // Every segment but the last was sealed, so it must end in a cut record.
  size_t index = 0;  // index in segments of the segment being read
  bool last_was_cut = false;
  auto check_sealed = [&](size_t i) -> Status {
    if (i + 1 < segments.size() && !last_was_cut) {
      return Status::Corrupt(segments[i].path.string() +
                             " is followed by another segment but does "
                             "not end in a cut record");
    }
    return Status::Ok();
  };
  ScannedRecord rec;
  for (;;) {
    Result<bool> more = scanner->Next(&rec);
    if (!more.ok()) return Fail(more.status());
    if (!*more) break;
    while (segments[index].number != rec.segment) {
      Status s = check_sealed(index);
      if (!s.ok()) return Fail(s);
      ++index;
      last_was_cut = false;
    }
    const RecordHeader& h = rec.header;
    ++records;
    if (first_seq == 0) first_seq = h.seq;
    last_seq = h.seq;
    last_was_cut = h.kind == RecordKind::kCut;
    switch (h.kind) {
      case RecordKind::kWrite:
        ++writes;
        bytes += h.length;
        break;
      case RecordKind::kDiscard:
        ++discards;
        break;
      case RecordKind::kCut: {
        const CutPayload cut = DecodeCutPayload(rec.payload.first<kCutPayloadSize>());
        if (cut.cycle <= last_cycle) {
          return Fail(Status::Corrupt((log_dir / SegmentFileName(rec.segment)).string() +
                                      " at offset " + std::to_string(rec.file_offset) + ": cycle " +
                                      std::to_string(cut.cycle) + " does not follow cycle " +
                                      std::to_string(last_cycle)));
        }
        last_cycle = cut.cycle;
        ++cuts;
        break;
      }
    }
  }
  for (; index < segments.size(); ++index) {
    Status s = check_sealed(index);
    if (!s.ok()) return Fail(s);
    last_was_cut = false;
  }
  std::printf(
      "%s: %zu segments, %llu records (%llu writes of %llu bytes, %llu discards, %llu cuts)",
      log_dir.string().c_str(), segments.size(), static_cast<unsigned long long>(records),
      static_cast<unsigned long long>(writes), static_cast<unsigned long long>(bytes),
      static_cast<unsigned long long>(discards), static_cast<unsigned long long>(cuts));
  if (records > 0) {
    std::printf(", seq %llu..%llu", static_cast<unsigned long long>(first_seq),
                static_cast<unsigned long long>(last_seq));
  }
  if (cuts > 0) std::printf(", last cycle %llu", static_cast<unsigned long long>(last_cycle));
  std::printf("\n");
  Result<std::optional<DiskState>> state = LoadDiskState(log_dir);
  if (!state.ok()) return Fail(state.status());
  if (state->has_value() && (*state)->tracking == DiskTracking::kBitmap) {
    std::printf("tracking: bitmap (resync required: %s)\n", (*state)->reason.c_str());
  }
  if (scanner->torn_tail()) WarnTornTail(*scanner->torn_tail());
  std::printf("ok\n");
  return kOk;
}

int Replay(const fs::path& log_dir, const fs::path& target, std::optional<uint64_t> through) {
  Result<ReplayResult> r = ReplayLogToFile(log_dir, target, ReplayOptions{through});
  if (!r.ok()) return Fail(r.status());
  std::printf(
      "applied %llu records (%llu writes, %llu discards, %llu cuts)",
      static_cast<unsigned long long>(r->records), static_cast<unsigned long long>(r->writes),
      static_cast<unsigned long long>(r->discards), static_cast<unsigned long long>(r->cuts));
  if (r->records > 0) {
    std::printf(", seq %llu..%llu", static_cast<unsigned long long>(r->first_seq),
                static_cast<unsigned long long>(r->last_seq));
  }
  if (r->cuts > 0)
    std::printf(", through cycle %llu", static_cast<unsigned long long>(r->last_cycle));
  std::printf(" to %s\n", target.string().c_str());
  if (r->torn_tail) WarnTornTail(*r->torn_tail);
  return kOk;
}

int Main(int argc, char** argv) {
  CLI::App app{"siterep-log: dump, check and replay siterep change logs"};
  app.require_subcommand(1);
  std::string log_dir;
  std::string target;
  std::string image;
  std::optional<uint64_t> through;

  const std::string what =
      "folder of segments: an archive, a replica's received folder, or <image>.srlog";
  const std::string image_help = "the image of a log folder with cuts (default: its name)";
  CLI::App* dump = app.add_subcommand("dump", "print one line per record");
  dump->add_option("LOG_DIR", log_dir, what)->required();
  dump->add_option("--image", image, image_help);
  CLI::App* check = app.add_subcommand("check", "verify every record; exit 1 on damage");
  check->add_option("LOG_DIR", log_dir, what)->required();
  check->add_option("--image", image, image_help);
  CLI::App* replay = app.add_subcommand("replay", "apply the log's records to an image file");
  replay->add_option("LOG_DIR", log_dir, what)->required();
  replay->add_option("TARGET_IMAGE", target, "image file to change (must exist)")->required();
  replay->add_option("--image", image, image_help);
  replay->add_option("--through-cycle", through, "stop after the cut of this cycle");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    (void)app.exit(e);
    return kUsage;
  }
  Scratch scratch;
  Result<fs::path> dir = Readable(log_dir, image, &scratch);
  if (!dir.ok()) return Fail(dir.status());
  if (dump->parsed()) return Dump(*dir);
  if (check->parsed()) return Check(*dir);
  return Replay(*dir, target, through);
}

}  // namespace
}  // namespace siterep::tracker

int main(int argc, char** argv) { return siterep::tracker::Main(argc, argv); }
