// Replica::ChangedSince (replica.h): which blocks may differ between a recovery point and
// everything the replica received, for reverse replication after an unplanned failover.
//
// Two sources, both read-only:
//  - the undo journal: the undo file of point P and of every newer chain point together
//    hold every block the images had overwritten since they were P (undo_journal.h: a
//    point's file holds the blocks overwritten after it and before the next point; removing
//    a point merges its blocks into the previous one, so the union from P on never loses a
//    block and never gains one from before P);
//  - the committed cycles not applied yet (position.json pending[]): every write and
//    discard record of their segments, read with the applier's own checks (ScanSegment).
//    The cycle of an interrupted apply is among them until it is applied, so this also
//    covers whatever that apply wrote.
// Everything is widened to tracker::kSnapshotBlockSize blocks and clipped to the disk.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <string>

#include "applier/replica.h"
#include "applier/segment_check.h"
#include "tracker/log_reader.h"

namespace siterep::applier {
namespace fs = std::filesystem;
using tracker::ByteRange;
using tracker::kSnapshotBlockSize;

namespace {

static_assert(kSnapshotBlockSize % kUndoBlockSize == 0);

// [first, end) in kSnapshotBlockSize units.
struct BlockSpan {
  uint64_t first = 0;
  uint64_t end = 0;
};

// The kSnapshotBlockSize blocks [offset, offset + length) touches, within a disk of size
// bytes; nothing for an empty range or one past the end.
void AddBytes(uint64_t offset, uint64_t length, uint64_t size, std::vector<BlockSpan>& out) {
  if (length == 0 || offset >= size) return;
  const uint64_t end = offset + std::min(length, size - offset);
  out.push_back(BlockSpan{offset / kSnapshotBlockSize, (end - 1) / kSnapshotBlockSize + 1});
}

// Sorted, merged byte ranges of spans, the last one clipped to size.
std::vector<ByteRange> ToRanges(std::vector<BlockSpan>& spans, uint64_t size) {
  std::sort(spans.begin(), spans.end(),
            [](const BlockSpan& a, const BlockSpan& b) { return a.first < b.first; });
  std::vector<ByteRange> out;
  uint64_t first = 0;
  uint64_t end = 0;
  bool open = false;
  auto flush = [&] {
    if (!open) return;
    const uint64_t from = first * kSnapshotBlockSize;
    const uint64_t to = std::min(size, end * kSnapshotBlockSize);
    out.push_back(ByteRange{from, to - from});
  };
  for (const BlockSpan& s : spans) {
    if (open && s.first <= end) {
      end = std::max(end, s.end);
      continue;
    }
    flush();
    first = s.first;
    end = s.end;
    open = true;
  }
  flush();
  return out;
}

}  // namespace

Result<std::vector<std::vector<ByteRange>>> Replica::ChangedSince(uint64_t point_id) const {
  // Nothing is applied or received meanwhile: the journal and the pending cycles are one
  // state.
  std::lock_guard apply(apply_mu_);
  std::lock_guard recv(recv_mu_);
  const ReplicaDefinition def = Definition();
  if (point_id == kLatestPoint) {
    return Status::Invalid("blocks changed since the latest point of VM " + def.vm +
                           ": name the point by its id (from Points())");
  }
  const std::string what =
      "blocks changed since point " + std::to_string(point_id) + " of VM " + def.vm;
  PositionState state;
  {
    std::lock_guard lk(mu_);
    if (!stop_ && thread_.joinable()) {
      return Status::Error(EBUSY, what + ": the applier is running; Stop() it first");
    }
    state = state_;
  }
  // Refuses unknown points (ENOENT) and, during a materialization, other points (EBUSY).
  Result<std::vector<std::vector<uint64_t>>> undo = store_->UndoBlocksSince(point_id);
  if (!undo.ok()) return undo.status().WithContext(what);

  const size_t disks = def.disks.size();
  std::vector<std::vector<BlockSpan>> spans(disks);
  std::vector<bool> whole(disks, false);
  auto mark_whole = [&](size_t i, const std::string& why) {
    if (whole[i]) return;
    whole[i] = true;
    spdlog::warn("{}: disk {} is reported whole: {}", what, def.disks[i].name, why);
  };

  // Applied after the point: the blocks the undo files hold (kUndoBlockSize units).
  for (size_t i = 0; i < disks && i < undo->size(); ++i) {
    const uint64_t size = def.disks[i].size;
    std::vector<BlockSpan>& out = spans[i];
    for (uint64_t b : (*undo)[i]) {
      const uint64_t block = b * kUndoBlockSize / kSnapshotBlockSize;
      if (b * kUndoBlockSize >= size) continue;  // cannot be: saves stay inside the disk
      // BlocksFrom is increasing: 16 undo blocks of one 64 KiB block come in a row.
      if (!out.empty() && out.back().end > block) continue;
      if (!out.empty() && out.back().end == block) {
        out.back().end = block + 1;
      } else {
        out.push_back(BlockSpan{block, block + 1});
      }
    }
  }

  // An interrupted apply is of the oldest pending cycle (it is dropped from pending only
  // in the update that records it applied). Should the state say otherwise, what it wrote
  // cannot be told from the records.
  if (!state.sync && state.applying_cycle > state.applied_cycle &&
      std::none_of(state.pending.begin(), state.pending.end(),
                   [&](const PendingCycle& c) { return c.info.cycle == state.applying_cycle; })) {
    for (size_t i = 0; i < disks; ++i) {
      mark_whole(i, "the interrupted apply of cycle " + std::to_string(state.applying_cycle) +
                        " is not among the received cycles");
    }
  }

  // Received, committed and not applied yet: every write and discard record.
  for (const PendingCycle& cycle : state.pending) {
    for (size_t i = 0; i < disks && i < cycle.segments.size(); ++i) {
      if (whole[i]) continue;
      const DiskDefinition& d = def.disks[i];
      const PendingSegment& seg = cycle.segments[i];
      const std::string where = "cycle " + std::to_string(cycle.info.cycle) + ", disk " + d.name +
                                ", segment " + std::to_string(seg.number);
      // The applier's checks (CheckCycle): a record is only believed when the apply would
      // take it.
      SegmentRules rules{d.disk_id,     d.size,       cycle.min_epoch,
                         seg.first_seq, seg.last_seq, cycle.info.cycle};
      const fs::path path = tracker::SegmentPath(ReceivedDir(i), seg.number);
      std::vector<BlockSpan> found;
      Result<SegmentSummary> scanned =
          ScanSegment(path, rules, [&](const CheckedRecord& r) -> Status {
            const tracker::RecordHeader& h = r.record.header;
            if (h.kind != tracker::RecordKind::kCut) AddBytes(h.offset, h.length, d.size, found);
            return Status::Ok();
          });
      if (scanned.ok()) {
        spans[i].insert(spans[i].end(), found.begin(), found.end());
        continue;
      }
      const Status& s = scanned.status();
      if (s.code() == ENOENT) {
        mark_whole(i, where + ": the received segment is missing (" + path.string() + ")");
      } else if (s.code() == EBADMSG) {
        mark_whole(i, where + ": " + s.message());
      } else {
        return s.WithContext(what + ": " + where);
      }
    }
  }

  std::vector<std::vector<ByteRange>> out(disks);
  for (size_t i = 0; i < disks; ++i) {
    const uint64_t size = def.disks[i].size;
    if (whole[i]) {
      out[i] = {ByteRange{0, size}};
    } else {
      out[i] = ToRanges(spans[i], size);
    }
  }
  return out;
}

}  // namespace siterep::applier
