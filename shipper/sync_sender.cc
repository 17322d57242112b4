// The sync phase of a shipper connection (initial copy, seeded enable, resync): streams the
// snapshot the SyncSource offers, disk after disk, before any segment. Wire frames and the
// replica's side: shipper/wire_format.h, applier/segment_sink.h.
//
// Per disk, from where the replica says it stands (SyncReply):
//  - kCopy: below written_until (an older, unfinished sync touched the replica there) the
//    blocks are hash-compared; above it the data ranges of the snapshot are read in 1 MiB
//    chunks and sent block by block, all-zero blocks and holes as zero extents (a few
//    bytes each, however long).
//  - kCompare: the listed ranges are hash-compared in batches of kMaxHashBlocks blocks,
//    kHashPipeline requests in flight, the local hashes computed while the replica works
//    on its own; only blocks whose hashes differ are sent.
// Every SyncData says up to where the replica now equals the snapshot (done_to); the
// replica answers with its durable position (SyncAck), which lets the tracker stop saving
// old blocks below it and is where a reconnect resumes.
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <algorithm>

#include "common/block_hash.h"
#include "common/failpoint.h"
#include "shipper/shipper_impl.h"

namespace siterep::shipper {
namespace {

constexpr uint64_t kBlock = applier::kSyncBlockSize;
constexpr size_t kHashPipeline = 4;
constexpr uint64_t kCopyWindow = 64ull << 20;  // data ranges are listed this much at a time

}  // namespace

SyncJob PlanSync(const tracker::SnapshotInfo& snapshot, applier::SyncKind kind, bool full,
                 uint64_t epoch, std::span<const int> image_fds) {
  SyncJob job;
  applier::SyncPlan& plan = job.plan;
  plan.sync_id = snapshot.cycle;
  plan.kind = kind;
  plan.cut_unix_nanos = snapshot.cut_unix_nanos;
  plan.epoch = epoch;
  for (size_t i = 0; i < snapshot.disks.size(); ++i) {
    const tracker::SnapshotDisk& d = snapshot.disks[i];
    applier::SyncDiskPlan dp;
    dp.disk_id = d.disk_id;
    dp.last_seq = d.last_seq;
    dp.last_segment = d.last_segment;
    std::vector<tracker::ByteRange> r;
    if (kind == applier::SyncKind::kInitial) {
      dp.mode = applier::SyncMode::kCopy;
      r = {tracker::ByteRange{0, d.size}};
    } else {
      dp.mode = applier::SyncMode::kCompare;
      if (kind == applier::SyncKind::kSeeded || full || d.all_dirty) {
        r = {tracker::ByteRange{0, d.size}};
      } else {
        r = d.dirty;
      }
    }
    dp.bytes_total = tracker::RangeBytes(r);
    struct stat st {};
    if (kind == applier::SyncKind::kInitial && i < image_fds.size() && image_fds[i] >= 0 &&
        ::fstat(image_fds[i], &st) == 0) {
      // What the copy writes at the replica (its free-space check): the allocated bytes,
      // not the size (holes go as zero extents).
      dp.bytes_total = std::min<uint64_t>(d.size, static_cast<uint64_t>(st.st_blocks) * 512);
    }
    plan.disks.push_back(dp);
    job.ranges.push_back(std::move(r));
  }
  return job;
}

std::optional<size_t> Shipper::Impl::Connection::DiskIndexOf(uint32_t disk_id) const {
  const auto& disks = opts_.definition.disks;
  for (size_t i = 0; i < disks.size(); ++i) {
    if (disks[i].disk_id == disk_id) return i;
  }
  return std::nullopt;
}

Status Shipper::Impl::Connection::RunSyncIfDue() {
  if (opts_.sync == nullptr) return Status::Ok();
  std::optional<applier::SyncPlan> plan = opts_.sync->Plan();
  if (!plan) return Status::Ok();
  if (plan->disks.size() != opts_.definition.disks.size()) {
    return Status::Invalid("sync plan of VM " + opts_.definition.vm + " does not match its disks");
  }
  return RunSync(*plan);
}

Status Shipper::Impl::Connection::WaitFor(const std::function<bool()>& ready, const char* what) {
  while (!ready()) {
    if (impl_.stopping_) return Status::Error(ECANCELED, "stopping");
    Status s = Service(Clock::now() + opts_.heartbeat);
    if (!s.ok()) return s.WithContext(std::string("waiting for ") + what);
  }
  return Status::Ok();
}

Status Shipper::Impl::Connection::RunSync(const applier::SyncPlan& plan) {
  const std::string vm = opts_.definition.vm;
  scan_ranges_.assign(plan.disks.size(), {});
  for (size_t i = 0; i < plan.disks.size(); ++i) {
    if (plan.disks[i].mode == applier::SyncMode::kCompare) {
      scan_ranges_[i] = opts_.sync->CompareRanges(i);
    } else {
      scan_ranges_[i] = {tracker::ByteRange{0, opts_.definition.disks[i].size}};
    }
  }
  {
    std::lock_guard lk(impl_.mu_);
    SyncProgress& p = impl_.sync_progress_;
    if (!p.active || p.sync_id != plan.sync_id) {
      p = SyncProgress{};
      p.sync_id = plan.sync_id;
      p.kind = plan.kind;
      p.disk_done.assign(plan.disks.size(), 0);
    }
    p.active = true;
    p.bytes_total = 0;
    for (const auto& r : scan_ranges_) p.bytes_total += tracker::RangeBytes(r);
    p.bytes_scanned = 0;
  }

  sync_reply_.reset();
  SR_RETURN_IF_ERROR(SendFrame(FrameType::kSyncBegin, EncodeSyncBegin(plan)));
  SR_RETURN_IF_ERROR(WaitFor([&] { return sync_reply_.has_value(); }, "the sync reply"));
  if (!sync_reply_->accepted) {
    const Status s = Status::Error(RefusalCode(sync_reply_->error),
                                   opts_.peer + " refused the " +
                                       std::string(applier::SyncKindName(plan.kind)) +
                                       " sync of VM " + vm + " (" + sync_reply_->error +
                                       "): " + sync_reply_->message);
    impl_.SetError(s, true, sync_reply_->error, sync_reply_->message);
    return s;
  }
  const applier::SyncResume resume = sync_reply_->resume;
  if (resume.disks.size() != plan.disks.size()) {
    return Status::Error(EPROTO, opts_.peer + " answered the sync with " +
                                     std::to_string(resume.disks.size()) + " disks, not " +
                                     std::to_string(plan.disks.size()));
  }
  spdlog::info("VM {}: {} sync {} to {} starts", vm, applier::SyncKindName(plan.kind),
               plan.sync_id, opts_.peer);
  for (size_t i = 0; i < plan.disks.size(); ++i) {
    if (resume.disks[i].disk_id != plan.disks[i].disk_id) {
      return Status::Error(EPROTO, opts_.peer + " answered the sync for other disks");
    }
    NoteScanned(i, 0);
    SR_RETURN_IF_ERROR(SyncDisk(i, plan.disks[i], resume.disks[i]));
  }
  SR_RETURN_IF_ERROR(FlushZeros());
  SR_RETURN_IF_ERROR(SendFrame(FrameType::kSyncEnd,
                               EncodeSyncEnd(SyncEnd{plan.sync_id, plan.cut_unix_nanos})));
  sync_end_pending_ = plan.sync_id;
  sync_end_acked_ = false;
  SR_RETURN_IF_ERROR(WaitFor([&] { return sync_end_acked_; }, "the end of the sync"));
  SR_RETURN_IF_ERROR(opts_.sync->Finished(plan.sync_id));
  {
    std::lock_guard lk(impl_.mu_);
    impl_.sync_progress_.active = false;
  }
  spdlog::info("VM {}: sync {} to {} finished; delta replication follows", vm, plan.sync_id,
               opts_.peer);
  return Status::Ok();
}

Status Shipper::Impl::Connection::SyncDisk(size_t disk, const applier::SyncDiskPlan& plan,
                                           const applier::SyncDiskResume& resume) {
  const uint64_t size = opts_.definition.disks[disk].size;
  const uint64_t start = std::min(resume.done_offset, size);
  {
    std::lock_guard lk(impl_.mu_);
    SyncProgress& p = impl_.sync_progress_;
    p.disk_done[disk] = start;
  }
  NoteScanned(disk, start);
  if (start > 0) opts_.sync->Copied(disk, start);
  if (start >= size) return Status::Ok();  // the replica holds all of it (or ended the sync)
  if (plan.mode == applier::SyncMode::kCompare) {
    for (const tracker::ByteRange& r : scan_ranges_[disk]) {
      const uint64_t from = std::max(r.offset, start);
      const uint64_t to = std::min(r.offset + r.length, size);
      if (from < to) SR_RETURN_IF_ERROR(CompareRange(disk, from, to));
    }
  } else {
    const uint64_t touched = std::min(std::max(resume.written_until, start), size);
    if (start < touched) SR_RETURN_IF_ERROR(CompareRange(disk, start, touched));
    if (touched < size) SR_RETURN_IF_ERROR(CopyRange(disk, touched, size));
  }
  SR_RETURN_IF_ERROR(FlushZeros());
  // The end of the disk: everything below its size is the snapshot now.
  return SendSyncData(disk, size, {}, 0, size);
}

Status Shipper::Impl::Connection::CopyRange(size_t disk, uint64_t from, uint64_t to) {
  uint64_t at = from;
  while (at < to) {
    const uint64_t window_end = std::min(to, at + kCopyWindow);
    SR_ASSIGN_OR_RETURN(std::vector<tracker::ByteRange> data,
                        opts_.sync->DataRanges(disk, at, window_end));
    for (const tracker::ByteRange& r : data) {
      if (r.offset > at) SR_RETURN_IF_ERROR(SendZeros(disk, at, r.offset - at));
      uint64_t off = r.offset;
      const uint64_t end = r.offset + r.length;
      while (off < end) {
        const uint64_t n = std::min<uint64_t>(kMaxChunkRaw, end - off);
        block_buf_.resize(n);
        SR_RETURN_IF_ERROR(opts_.sync->Read(disk, off, block_buf_));
        SR_RETURN_IF_ERROR(SendBlocks(disk, off, block_buf_));
        off += n;
        NoteScanned(disk, off);
      }
      at = end;
    }
    if (at < window_end) SR_RETURN_IF_ERROR(SendZeros(disk, at, window_end - at));
    at = window_end;
    NoteScanned(disk, at);
  }
  return Status::Ok();
}

Status Shipper::Impl::Connection::CompareRange(size_t disk, uint64_t from, uint64_t to) {
  const uint32_t disk_id = opts_.definition.disks[disk].disk_id;
  const uint64_t batch_bytes = uint64_t{applier::kMaxHashBlocks} * kBlock;
  // Ranges are block-aligned except at the disk's end.
  from -= from % kBlock;
  std::deque<HashRequest> outstanding;
  uint64_t next = from;
  std::vector<uint64_t> mine;
  SR_RETURN_IF_ERROR(FlushZeros());
  hash_replies_.clear();
  while (next < to || !outstanding.empty()) {
    while (outstanding.size() < kHashPipeline && next < to) {
      HashRequest req;
      req.disk_id = disk_id;
      req.offset = next;
      const uint64_t end = std::min(to, next + batch_bytes);
      req.count = static_cast<uint32_t>((end - next + kBlock - 1) / kBlock);
      SR_RETURN_IF_ERROR(Throttle(kFrameHeaderSize + kHashRequestSize));
      SR_RETURN_IF_ERROR(SendFrame(FrameType::kHashRequest, EncodeHashRequest(req)));
      outstanding.push_back(req);
      next = std::min(to, req.offset + uint64_t{req.count} * kBlock);
    }
    const HashRequest req = outstanding.front();
    outstanding.pop_front();
    // Read and hash our side while the replica hashes its own.
    const uint64_t end = std::min(to, req.offset + uint64_t{req.count} * kBlock);
    block_buf_.resize(end - req.offset);
    SR_RETURN_IF_ERROR(opts_.sync->Read(disk, req.offset, block_buf_));
    mine.clear();
    AppendBlockHashes(block_buf_, kBlock, &mine);
    SR_RETURN_IF_ERROR(WaitFor([&] { return !hash_replies_.empty(); }, "block hashes"));
    const HashReply reply = std::move(hash_replies_.front());
    hash_replies_.pop_front();
    if (reply.disk_id != disk_id || reply.offset != req.offset ||
        reply.hashes.size() != mine.size()) {
      return Status::Error(EPROTO, opts_.peer + " answered hashes for another range");
    }
    {
      std::lock_guard lk(impl_.mu_);
      impl_.sync_progress_.bytes_wire += kFrameHeaderSize * 2 + kHashRequestSize + 16 +
                                         reply.hashes.size() * sizeof(uint64_t);
    }
    // Send the runs of blocks that differ.
    size_t i = 0;
    while (i < mine.size()) {
      if (mine[i] == reply.hashes[i]) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < mine.size() && mine[j] != reply.hashes[j] &&
             (j - i + 1) * kBlock <= kMaxChunkRaw) {
        ++j;
      }
      const uint64_t off = i * kBlock;
      const uint64_t len = std::min<uint64_t>((j - i) * kBlock, block_buf_.size() - off);
      SR_RETURN_IF_ERROR(SendBlocks(disk, req.offset + off, std::span(block_buf_).subspan(off, len)));
      i = j;
    }
    SR_RETURN_IF_ERROR(FlushZeros());
    // The batch is done: say so even if nothing in it differed.
    SR_RETURN_IF_ERROR(SendSyncData(disk, end, {}, 0, end));
    NoteScanned(disk, end);
  }
  return Status::Ok();
}

Status Shipper::Impl::Connection::SendBlocks(size_t disk, uint64_t offset,
                                             std::span<const std::byte> data) {
  size_t at = 0;
  while (at < data.size()) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kBlock, data.size() - at));
    if (IsAllZero(data.subspan(at, n))) {
      SR_RETURN_IF_ERROR(SendZeros(disk, offset + at, n));
      at += n;
      continue;
    }
    // A run of non-zero blocks, up to the end of data (at most kMaxChunkRaw).
    size_t end = at + n;
    while (end < data.size()) {
      const size_t m = static_cast<size_t>(std::min<uint64_t>(kBlock, data.size() - end));
      if (IsAllZero(data.subspan(end, m))) break;
      end += m;
    }
    SR_RETURN_IF_ERROR(FlushZeros());
    SR_RETURN_IF_ERROR(
        SendSyncData(disk, offset + at, data.subspan(at, end - at), 0, offset + end));
    at = end;
  }
  return Status::Ok();
}

Status Shipper::Impl::Connection::SendZeros(size_t disk, uint64_t offset, uint64_t length) {
  if (length == 0) return Status::Ok();
  if (zeros_ && zeros_->disk == disk && zeros_->offset + zeros_->length == offset) {
    zeros_->length += length;
    return Status::Ok();
  }
  SR_RETURN_IF_ERROR(FlushZeros());
  zeros_ = PendingZeros{disk, offset, length};
  return Status::Ok();
}

Status Shipper::Impl::Connection::FlushZeros() {
  if (!zeros_) return Status::Ok();
  const PendingZeros z = *zeros_;
  zeros_.reset();
  return SendSyncData(z.disk, z.offset, {}, z.length, z.offset + z.length);
}

Status Shipper::Impl::Connection::SendSyncData(size_t disk, uint64_t offset,
                                               std::span<const std::byte> data,
                                               uint64_t zero_length, uint64_t done_to) {
  // Pausing holds the sync where it is; it continues from here on Resume.
  while (impl_.paused_ && !impl_.stopping_) {
    SR_RETURN_IF_ERROR(Service(last_heartbeat_ + opts_.heartbeat));
  }
  if (impl_.stopping_) return Status::Error(ECANCELED, "stopping");
  SyncData d;
  d.disk_id = opts_.definition.disks[disk].disk_id;
  d.offset = offset;
  d.done_to = done_to;
  if (data.empty()) {
    d.length = zero_length;
    if (zero_length > 0) d.flags = kSyncZero;
  } else {
    d.length = data.size();
    if (opts_.compress && impl_.compressor_.Compress(data, &packed_)) {
      d.flags = kSyncZstd;
      d.data = packed_;
    } else {
      d.data = data;
    }
  }
  const std::vector<std::byte> payload = EncodeSyncData(d);
  SR_RETURN_IF_ERROR(Throttle(kFrameHeaderSize + payload.size()));
  SR_RETURN_IF_ERROR(SendFrame(FrameType::kSyncData, payload));
  {
    std::lock_guard lk(impl_.mu_);
    SyncProgress& p = impl_.sync_progress_;
    p.bytes_data += data.size();
    p.bytes_wire += kFrameHeaderSize + payload.size();
    impl_.stats_.bytes_raw += data.size();
    impl_.stats_.bytes_wire += d.data.size();
  }
  if (failpoint::Check("shipper.after_send") == failpoint::Action::kError) {
    return Status::Error(EIO, "failpoint shipper.after_send");
  }
  return Service(Clock::now());  // acks, hash replies and heartbeats between frames
}

void Shipper::Impl::Connection::NoteScanned(size_t disk, uint64_t position) {
  std::lock_guard lk(impl_.mu_);
  SyncProgress& p = impl_.sync_progress_;
  uint64_t scanned = 0;
  for (size_t i = 0; i < scan_ranges_.size(); ++i) {
    if (i < disk) {
      scanned += tracker::RangeBytes(scan_ranges_[i]);
    } else if (i == disk) {
      scanned += tracker::RangeBytesBelow(scan_ranges_[i], position);
    }
  }
  if (scanned > p.bytes_scanned) impl_.sync_meter_.Add(scanned - p.bytes_scanned, Clock::now());
  p.bytes_scanned = scanned;
}

Status Shipper::Impl::Connection::HandleSyncFrame(FrameType type) {
  switch (type) {
    case FrameType::kSyncReply: {
      SR_ASSIGN_OR_RETURN(SyncReply reply, DecodeSyncReply(in_));
      sync_reply_ = std::move(reply);
      return Status::Ok();
    }
    case FrameType::kHashReply: {
      SR_ASSIGN_OR_RETURN(HashReply reply, DecodeHashReply(in_));
      hash_replies_.push_back(std::move(reply));
      return Status::Ok();
    }
    case FrameType::kSyncAck: {
      SR_ASSIGN_OR_RETURN(SyncAck ack, DecodeSyncAck(in_));
      const std::optional<size_t> disk = DiskIndexOf(ack.disk_id);
      if (!disk) return Status::Error(EPROTO, opts_.peer + " acknowledged an unknown disk");
      opts_.sync->Copied(*disk, ack.done_offset);
      std::lock_guard lk(impl_.mu_);
      SyncProgress& p = impl_.sync_progress_;
      if (*disk < p.disk_done.size()) p.disk_done[*disk] = ack.done_offset;
      uint64_t done = 0;
      for (size_t i = 0; i < scan_ranges_.size() && i < p.disk_done.size(); ++i) {
        done += tracker::RangeBytesBelow(scan_ranges_[i], p.disk_done[i]);
      }
      p.bytes_done = done;
      return Status::Ok();
    }
    default:
      return Status::Error(EPROTO, "unexpected frame");
  }
}

}  // namespace siterep::shipper
