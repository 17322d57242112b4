// siterep-log: inspect and use change logs (tracker/log_format.h) for tests and debugging.
//
//   siterep-log dump LOG_DIR                 one line per record
//   siterep-log check LOG_DIR                verify every record; exit 1 on damage
//   siterep-log replay LOG_DIR TARGET_IMAGE [--through-cycle N]
//
// Exit codes: 0 ok (a torn tail at the end of the last segment is a warning), 1 failure,
// 2 usage. Works on a live log too (it only reads), but then sees a moment's snapshot.
#include <CLI/CLI.hpp>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>

#include "common/status.h"
#include "common/time_util.h"
#include "tracker/disk_state.h"
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
  std::optional<uint64_t> through;

  CLI::App* dump = app.add_subcommand("dump", "print one line per record");
  dump->add_option("LOG_DIR", log_dir, "change log folder (<image>.srlog)")->required();
  CLI::App* check = app.add_subcommand("check", "verify every record; exit 1 on damage");
  check->add_option("LOG_DIR", log_dir, "change log folder (<image>.srlog)")->required();
  CLI::App* replay = app.add_subcommand("replay", "apply the log's records to an image file");
  replay->add_option("LOG_DIR", log_dir, "change log folder (<image>.srlog)")->required();
  replay->add_option("TARGET_IMAGE", target, "image file to change (must exist)")->required();
  replay->add_option("--through-cycle", through, "stop after the cut of this cycle");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    (void)app.exit(e);
    return kUsage;
  }
  if (dump->parsed()) return Dump(log_dir);
  if (check->parsed()) return Check(log_dir);
  return Replay(log_dir, target, through);
}

}  // namespace
}  // namespace siterep::tracker

int main(int argc, char** argv) { return siterep::tracker::Main(argc, argv); }
