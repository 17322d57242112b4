#include "tracker/disk_log.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/log_reader.h"
#include "tracker/recovery.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kLockFileName = "LOCK";

}  // namespace

DiskLog::DiskLog(Options options) : opts_(std::move(options)) {}

DiskLog::~DiskLog() {
  Status s = Stop();
  if (!s.ok()) spdlog::error("disk {}: stopping the change log: {}", opts_.name, s.ToString());
}

Result<std::unique_ptr<DiskLog>> DiskLog::Open(Options options) {
  std::unique_ptr<DiskLog> log(new DiskLog(std::move(options)));
  SR_RETURN_IF_ERROR(log->Init());
  return log;
}

Status DiskLog::Init() {
  SR_RETURN_IF_ERROR(MakeDirs(opts_.log_dir));
  SR_ASSIGN_OR_RETURN(lock_fd_, OpenFile(opts_.log_dir / kLockFileName, O_RDWR | O_CREAT, 0644));
  if (::flock(lock_fd_.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return Status::Error(EBUSY, "change log " + opts_.log_dir.string() +
                                      " is in use by another tracker (its LOCK is held)");
    }
    return Status::FromErrno(errno, "lock " + (opts_.log_dir / kLockFileName).string());
  }
  // Every thread that writes the log uses its own ring; check the kernel once, here.
  SR_ASSIGN_OR_RETURN(sealer_ring_, IoRing::Create("change log sealer of disk " + opts_.name));
  SR_ASSIGN_OR_RETURN(std::optional<DiskState> loaded, LoadDiskState(opts_.log_dir));
  const DiskState state = loaded.value_or(DiskState());
  floors_.last_cycle = state.last_cycle;
  floors_.last_seq = state.last_seq;
  floors_.last_segment = state.last_segment;
  last_cycle_ = state.last_cycle;
  last_seq_ = last_cut_seq_ = state.last_seq;
  last_segment_ = state.last_segment;

  std::error_code ec;
  const bool bitmap_file = fs::exists(opts_.log_dir / kBitmapFileName, ec);
  if (state.tracking == DiskTracking::kBitmap || bitmap_file) {
    // Bitmap mode survives restarts until a resync. A bitmap file without the state means
    // a crash during the fall back: finish it (mark what is left of the log, drop it).
    mode_ = Mode::kSwitching;
    resync_required_ = true;
    reason_ = state.reason.empty() ? "dirty bitmap found at start" : state.reason;
    const bool lost = !bitmap_file;
    if (lost) reason_ += "; the dirty bitmap was lost, so every block is dirty";
    bitmap_ = OpenBitmap();
    DropLog(*bitmap_, lost);
    mode_ = Mode::kBitmap;
  } else {
    Status s = OpenLogMode(state);
    if (s.ok() && state.resync_required) {
      // Logging again after a bitmap, but the resync did not complete (or a crash cut it
      // short): which blocks it had to send is not kept across restarts, so all of them.
      resync_required_ = true;
      resync_all_dirty_ = true;
      reason_ = state.reason.empty() || state.reason == "resynchronising" ? "resync interrupted"
                                                                          : state.reason;
    }
    if (!s.ok()) {
      if (s.code() != EBADMSG) return s.WithContext("recover change log of disk " + opts_.name);
      // A damaged log cannot say which blocks changed: every block is dirty.
      spdlog::error("disk {}: {}", opts_.name, s.ToString());
      mode_ = Mode::kSwitching;
      resync_required_ = true;
      reason_ = "change log unreadable: " + s.message();
      bitmap_ = OpenBitmap();
      DropLog(*bitmap_, /*mark_all=*/true);
      mode_ = Mode::kBitmap;
    }
  }
  sealer_ = std::thread(&DiskLog::SealerLoop, this);
  return Status::Ok();
}

Status DiskLog::OpenLogMode(const DiskState& state) {
  RecoveryInput in;
  in.disk_name = opts_.name;
  in.disk_id = opts_.disk_id;
  in.log_dir = opts_.log_dir;
  in.image_fd = opts_.image_fd;
  in.image_size = opts_.size;
  in.floors = state;
  SR_ASSIGN_OR_RETURN(RecoveredLog r, RecoverLog(in));
  for (SealedSegment& seg : r.sealed) {
    sealed_bytes_ += seg.bytes;
    sealed_.push_back(std::move(seg));
  }
  auto seg = std::make_shared<Segment>();
  seg->number = last_segment_ = r.open_segment;
  seg->path = SegmentPath(opts_.log_dir, r.open_segment).string();
  SR_ASSIGN_OR_RETURN(seg->fd, OpenFile(seg->path, O_WRONLY));
  seg_ = std::move(seg);
  open_bytes_ = r.open_bytes;
  open_first_seq_ = r.open_first_seq;
  last_seq_ = r.last_seq;
  last_cut_seq_ = r.last_cut_seq;
  last_cycle_ = r.last_cycle;
  last_cut_nanos_ = r.last_cut_unix_nanos;
  last_cut_first_change_ = r.last_cut_first_change_unix_nanos;
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// Appenders

LogOutcome DiskLog::AppendWrite(uint64_t offset, std::span<const std::byte> data) {
  if (data.empty()) return LogOutcome::kLogged;
  const size_t count = (data.size() + kMaxRecordPayload - 1) / kMaxRecordPayload;
  Record one;
  std::vector<Record> many;
  std::span<Record> records(&one, 1);
  if (count > 1) {
    many.resize(count);
    records = many;
  }
  for (size_t i = 0; i < count; ++i) {
    Record& r = records[i];
    r.kind = RecordKind::kWrite;
    r.payload =
        data.subspan(i * kMaxRecordPayload,
                     std::min<size_t>(kMaxRecordPayload, data.size() - i * kMaxRecordPayload));
    r.offset = offset + i * kMaxRecordPayload;
    r.length = r.payload.size();
  }
  return Append(records, offset, data.size());
}

LogOutcome DiskLog::AppendDiscard(uint64_t offset, uint64_t length) {
  if (length == 0) return LogOutcome::kLogged;
  Record r;
  r.kind = RecordKind::kDiscard;
  r.offset = offset;
  r.length = length;
  return Append(std::span<Record>(&r, 1), offset, length);
}

void DiskLog::RequestFallbackLocked(std::string reason) {
  if (mode_ != Mode::kLog) return;
  mode_ = Mode::kSwitching;
  resync_required_ = true;
  reason_ = std::move(reason);
  fallback_pending_.store(true, std::memory_order_release);
  spdlog::warn("disk {}: falling back to the dirty bitmap: {}", opts_.name, reason_);
}

void DiskLog::MarkWithoutLog(std::unique_lock<std::mutex>& lk, uint64_t offset, uint64_t length) {
  if (DirtyBitmap* bitmap = bitmap_.get(); bitmap != nullptr) {
    lk.unlock();
    bitmap->MarkRange(offset, length);
    return;
  }
  pending_ranges_.push_back(Range{offset, length});
  lk.unlock();
  EnsureBitmap();
}

void DiskLog::EnsureBitmap() {
  std::lock_guard bitmap_lock(bitmap_mu_);
  {
    std::lock_guard lk(mu_);
    if (bitmap_) return;
  }
  std::unique_ptr<DirtyBitmap> bitmap = OpenBitmap();
  std::lock_guard lk(mu_);
  for (const Range& r : pending_ranges_) bitmap->MarkRange(r.offset, r.length);
  pending_ranges_.clear();
  bitmap_ = std::move(bitmap);
}

LogOutcome DiskLog::Append(std::span<Record> records, uint64_t offset, uint64_t length) {
  uint64_t bytes = 0;
  for (const Record& r : records) bytes += r.size();

  std::unique_lock lk(mu_);
  if (stop_) return LogOutcome::kShutdown;
  if (mode_ == Mode::kLog && opts_.log_budget != 0 &&
      UnshippedLocked() + bytes > opts_.log_budget) {
    RequestFallbackLocked("log budget of " + std::to_string(opts_.log_budget) +
                          " bytes exceeded (" + std::to_string(UnshippedLocked()) +
                          " bytes unshipped, a change of " + std::to_string(bytes) + " more)");
  }
  if (mode_ != Mode::kLog) {
    MarkWithoutLog(lk, offset, length);
    return LogOutcome::kBitmap;
  }
  // Reserve seqs and bytes together, so file order is seq order. seg_ stays the same
  // until this change's apply returns: replacing it needs the VM lock exclusively.
  const Segment& seg = *seg_;
  const uint64_t at = open_bytes_;
  open_bytes_ += bytes;
  for (Record& r : records) r.seq = ++last_seq_;
  if (open_first_seq_ == 0) open_first_seq_ = records.front().seq;
  bool roll = false;
  if (opts_.segment_roll_bytes != 0 && open_bytes_ >= opts_.segment_roll_bytes &&
      !roll_requested_) {
    roll = roll_requested_ = true;
  }
  lk.unlock();
  if (roll && opts_.request_cut) opts_.request_cut();

  for (Record& r : records) {
    EncodeHead(r, r.payload);
  }
  Status s = WriteRecords(seg, records, at);
  if (s.ok()) return LogOutcome::kLogged;
  // The range stays a hole (or a torn record) in the segment; FinishFallback drops it.
  lk.lock();
  RequestFallbackLocked("log write failed: " + s.message());
  MarkWithoutLog(lk, offset, length);
  return LogOutcome::kBitmap;
}

void DiskLog::EncodeHead(Record& r, std::span<const std::byte> payload) const {
  RecordHeader h;
  h.kind = r.kind;
  h.disk_id = opts_.disk_id;
  h.epoch = opts_.epoch;
  h.seq = r.seq;
  h.offset = r.offset;
  h.length = r.length;
  EncodeHeader(h, payload, std::span<std::byte, kHeaderSize>(r.head, kHeaderSize));
}

Status DiskLog::WriteRecords(const Segment& seg, std::span<Record> records, uint64_t at) {
  Result<IoRing*> ring = IoRing::ForThisThread();
  if (!ring.ok()) return ring.status();
  // Two iovecs per record; a write is one record unless it is over kMaxRecordPayload.
  iovec one[2];
  std::vector<iovec> many;
  if (records.size() > 1) many.resize(2 * records.size());
  iovec* out = records.size() > 1 ? many.data() : one;
  size_t n = 0;
  for (Record& r : records) {
    out[n++] = iovec{r.head, r.head_size};
    if (!r.payload.empty()) {
      out[n++] = iovec{const_cast<std::byte*>(r.payload.data()), r.payload.size()};
    }
  }
  return (*ring)->WriteAll(seg.fd.get(), std::span<iovec>(out, n), at, seg.path);
}

void DiskLog::ApplyFailed(const Status& status, uint64_t offset, uint64_t length) {
  std::unique_lock lk(mu_);
  RequestFallbackLocked("image write failed at offset " + std::to_string(offset) + ": " +
                        status.ToString());
  MarkWithoutLog(lk, offset, length);
}

// ---------------------------------------------------------------------------------------
// Cuts

std::unique_ptr<DiskLog::CutTicket> DiskLog::WriteCut(uint64_t cycle, int64_t unix_nanos,
                                                      int64_t first_change_unix_nanos) {
  FinishFallback();  // a pending fall back gets no cut; finishing it needs what we hold
  std::unique_lock lk(mu_);
  if (mode_ != Mode::kLog || stop_) return nullptr;
  auto cut = std::make_unique<CutTicket>();
  cut->cycle = cycle;
  cut->unix_nanos = unix_nanos;
  cut->first_change_unix_nanos = first_change_unix_nanos;
  Record r;
  r.kind = RecordKind::kCut;
  r.seq = cut->seq = ++last_seq_;
  cut->segment = seg_->number;
  r.length = kCutPayloadSize;
  r.head_size = kHeaderSize + kCutPayloadSize;
  const uint64_t at = open_bytes_;
  open_bytes_ += r.size();
  if (open_first_seq_ == 0) open_first_seq_ = r.seq;
  last_cut_seq_ = r.seq;
  std::shared_ptr<Segment> old = seg_;
  lk.unlock();

  std::span<std::byte, kCutPayloadSize> payload(r.head + kHeaderSize, kCutPayloadSize);
  EncodeCutPayload(CutPayload{cycle, unix_nanos, first_change_unix_nanos}, payload);
  EncodeHead(r, payload);
  Status s = WriteRecords(*old, std::span<Record>(&r, 1), at);
  // The cut record is in the file: the segment is complete. Appending goes on at once in
  // the next segment; the sealer makes the old one durable and publishes it, so a guest
  // write never waits for a seal's fdatasync. A Flush does wait, because the records it
  // covers may be in the segment being sealed.
  auto next = std::make_shared<Segment>();
  Status failed;
  if (!s.ok()) {
    failed = Status::Error(s.code(), "log write failed: " + s.message());
  } else {
    next->number = old->number + 1;
    next->path = SegmentPath(opts_.log_dir, next->number).string();
    Result<UniqueFd> fd = OpenFile(next->path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd.ok()) {
      next->fd = std::move(*fd);
    } else {
      failed = Status::Error(fd.status().code(),
                             "starting the next segment failed: " + fd.status().message());
    }
  }
  lk.lock();
  if (!failed.ok()) {
    RequestFallbackLocked(failed.message());
    lk.unlock();
    FinishFallback();
    return nullptr;
  }
  PendingSeal pending;
  pending.seg = std::move(old);
  pending.cut = cut.get();
  SealedSegment& seg = pending.segment;
  seg.disk = opts_.name;
  seg.disk_id = opts_.disk_id;
  seg.cycle = cycle;
  seg.cut_unix_nanos = unix_nanos;
  seg.first_change_unix_nanos = first_change_unix_nanos;
  seg.last_seq = cut->seq;
  seg.path = pending.seg->path;
  seg.number = pending.seg->number;
  seg.first_seq = open_first_seq_;
  seg.bytes = open_bytes_;
  sealing_bytes_ += seg.bytes;
  seg_ = std::move(next);
  last_segment_ = seg_->number;
  open_bytes_ = 0;
  open_first_seq_ = 0;
  roll_requested_ = false;
  seals_.push_back(std::move(pending));
  lk.unlock();
  seal_cv_.notify_one();
  return cut;
}

bool DiskLog::WaitSealed(CutTicket& cut) {
  std::unique_lock lk(mu_);
  done_cv_.wait(lk, [&] { return cut.state != CutTicket::State::kSealing; });
  return cut.state == CutTicket::State::kSealed;
}

bool DiskLog::ChangedSinceCut() const {
  std::lock_guard lk(mu_);
  return mode_ == Mode::kLog && last_seq_ > last_cut_seq_;
}

uint64_t DiskLog::last_cycle() const {
  std::lock_guard lk(mu_);
  return last_cycle_;
}

int64_t DiskLog::last_cut_first_change_unix_nanos() const {
  std::lock_guard lk(mu_);
  return last_cut_first_change_;
}

int64_t DiskLog::last_cut_unix_nanos() const {
  std::lock_guard lk(mu_);
  return last_cut_nanos_;
}

// ---------------------------------------------------------------------------------------
// Sealer thread

void DiskLog::SealerLoop() {
  std::unique_lock lk(mu_);
  for (;;) {
    seal_cv_.wait(lk, [&] { return !seals_.empty() || sealer_stop_; });
    if (seals_.empty()) break;  // stopping, and nothing left to seal
    PendingSeal p = std::move(seals_.front());
    seals_.pop_front();
    sealing_ = true;
    lk.unlock();
    failpoint::Check("tracker.before_seal");
    // fdatasync the sealed segment, then the folder (which makes the next segment's
    // creation durable).
    const std::string_view whats[1] = {p.seg->path};
    const int fds[1] = {p.seg->fd.get()};
    Status synced[1];
    sealer_ring_->DataSync(fds, whats, synced);
    const std::string what = p.seg->path;
    p.seg.reset();
    Status s = synced[0].ok() ? SyncDir(opts_.log_dir) : synced[0];
    if (s.ok()) failpoint::Check("tracker.after_seal");
    lk.lock();
    sealing_ = false;
    if (mode_ == Mode::kLog && s.ok()) {
      sealing_bytes_ -= p.segment.bytes;
      sealed_bytes_ += p.segment.bytes;
      last_cycle_ = p.cut->cycle;
      last_cut_nanos_ = p.cut->unix_nanos;
      last_cut_first_change_ = p.cut->first_change_unix_nanos;
      sealed_.push_back(std::move(p.segment));
      p.cut->state = CutTicket::State::kSealed;
    } else {
      // Falling back meanwhile (the segment goes with the log), or the seal failed: then
      // fall back (the next change or Flush finishes it).
      RequestFallbackLocked("sealing " + what + " failed: " + s.message());
      p.cut->state = CutTicket::State::kDropped;
    }
    done_cv_.notify_all();
  }
}

// ---------------------------------------------------------------------------------------
// Flush, stop

Status DiskLog::Flush() {
  std::unique_lock lk(mu_);
  // Every sync that starts after this point covers what the caller completed before it.
  const uint64_t need = syncs_started_ + 1;
  while (syncs_completed_ < need) {
    if (sync_running_) {
      sync_cv_.wait(lk);
      continue;
    }
    // Become the leader of the next generation.
    sync_running_ = true;
    const uint64_t generation = ++syncs_started_;
    // Records this sync covers may be in segments still being sealed.
    done_cv_.wait(lk, [&] { return seals_.empty() && !sealing_; });
    std::shared_ptr<Segment> seg = mode_ != Mode::kBitmap ? seg_ : nullptr;
    DirtyBitmap* bitmap = bitmap_.get();
    lk.unlock();
    bool log_failed = false;
    Status image_status = SyncFiles(seg.get(), bitmap, &log_failed);
    lk.lock();
    // The log may have lost records: the caller finishes the fall back, which marks them.
    if (log_failed) RequestFallbackLocked("log sync failed");
    syncs_completed_ = generation;
    sync_running_ = false;
    ++syncs_done_;
    if (!image_status.ok()) {
      sync_error_generation_ = generation;
      sync_error_ = image_status;
    }
    sync_cv_.notify_all();
  }
  if (sync_error_generation_ >= need) return sync_error_;
  return Status::Ok();
}

Status DiskLog::SyncFiles(const Segment* seg, DirtyBitmap* bitmap, bool* log_failed) {
  *log_failed = false;
  if (bitmap != nullptr) {
    Status b = bitmap->Flush();
    if (!b.ok()) spdlog::error("disk {}: {}", opts_.name, b.ToString());
  }
  const std::string image_what = "image of disk " + opts_.name;
  int fds[2];
  std::string_view whats[2];
  Status results[2];
  size_t n = 0;
  if (seg != nullptr) {
    fds[n] = seg->fd.get();
    whats[n++] = seg->path;
  }
  fds[n] = opts_.image_fd;
  whats[n++] = image_what;
  Result<IoRing*> ring = IoRing::ForThisThread();
  if (ring.ok()) {
    (*ring)->DataSync(std::span<const int>(fds, n), std::span<const std::string_view>(whats, n),
                      std::span<Status>(results, n));
  } else {
    for (size_t i = 0; i < n; ++i) {
      if (::fdatasync(fds[i]) != 0) {
        results[i] = Status::FromErrno(errno, "fdatasync " + std::string(whats[i]));
      }
    }
  }
  if (seg != nullptr && !results[0].ok()) {
    spdlog::error("disk {}: {}", opts_.name, results[0].ToString());
    *log_failed = true;
  }
  return results[n - 1];
}

Status DiskLog::Stop() {
  {
    std::lock_guard lk(mu_);
    if (stop_ && !sealer_.joinable()) return Status::Ok();
    stop_ = true;
    sealer_stop_ = true;
  }
  // The sealer finishes the queued seals, then exits.
  seal_cv_.notify_one();
  if (sealer_.joinable()) sealer_.join();
  // No appender runs now (the caller's guarantee), which is what FinishFallback needs.
  FinishFallback();
  if (opts_.image_fd < 0) return Status::Ok();
  std::shared_ptr<Segment> seg;
  DirtyBitmap* bitmap;
  {
    std::lock_guard lk(mu_);
    if (mode_ == Mode::kLog) seg = seg_;
    bitmap = bitmap_.get();
  }
  bool log_failed = false;
  Status image = SyncFiles(seg.get(), bitmap, &log_failed);
  if (log_failed && image.ok()) return Status::Error(EIO, "fdatasync " + seg->path + " failed");
  return image;
}

// ---------------------------------------------------------------------------------------
// Sealed segments, stats

std::vector<SealedSegment> DiskLog::SealedSegments() const {
  std::lock_guard lk(mu_);
  return std::vector<SealedSegment>(sealed_.begin(), sealed_.end());
}

Status DiskLog::ReleaseThrough(uint64_t cycle) {
  std::lock_guard release(release_mu_);
  std::vector<SealedSegment> gone;
  {
    std::lock_guard lk(mu_);
    while (!sealed_.empty() && sealed_.front().cycle <= cycle) {
      sealed_bytes_ -= sealed_.front().bytes;
      gone.push_back(std::move(sealed_.front()));
      sealed_.pop_front();
    }
    if (gone.empty()) return Status::Ok();
    floors_.last_cycle = std::max(floors_.last_cycle, gone.back().cycle);
    floors_.last_seq = std::max(floors_.last_seq, gone.back().last_seq);
    floors_.last_segment = std::max(floors_.last_segment, gone.back().number);
  }
  // The floors must be durable before the segments that carry the numbers go.
  Status result = PersistState();
  if (!result.ok()) return result.WithContext("release change log of disk " + opts_.name);
  failpoint::Check("tracker.mid_release");
  if (!opts_.archive_dir.empty()) {
    Status made = MakeDirs(opts_.archive_dir);
    if (!made.ok()) return made.WithContext("archive of disk " + opts_.name);
  }
  for (const SealedSegment& seg : gone) {
    if (!opts_.archive_dir.empty()) {
      const std::filesystem::path to = opts_.archive_dir / seg.path.filename();
      if (::rename(seg.path.c_str(), to.c_str()) != 0 && result.ok()) {
        result = Status::FromErrno(errno, "archive " + seg.path.string() + " to " + to.string());
      }
    } else if (::unlink(seg.path.c_str()) != 0 && errno != ENOENT && result.ok()) {
      result = Status::FromErrno(errno, "delete " + seg.path.string());
    }
  }
  if (!opts_.archive_dir.empty() && result.ok()) result = SyncDir(opts_.archive_dir);
  Status synced = SyncDir(opts_.log_dir);
  return result.ok() ? synced : result;
}

DiskStats DiskLog::Stats() const {
  std::lock_guard lk(mu_);
  DiskStats s;
  s.name = opts_.name;
  s.tracking = mode_ == Mode::kLog ? DiskTracking::kLog : DiskTracking::kBitmap;
  s.resync_required = resync_required_;
  s.resync_reason = reason_;
  s.unshipped_bytes = mode_ == Mode::kLog ? UnshippedLocked() : 0;
  s.last_seq = last_seq_;
  s.last_cut_unix_nanos = last_cut_nanos_;
  if (bitmap_) {
    s.dirty_bytes = std::min(bitmap_->dirty_blocks() * DirtyBitmap::kBlockSize, opts_.size);
  }
  s.flush_syncs = syncs_done_;
  return s;
}

}  // namespace siterep::tracker
