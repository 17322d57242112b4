#include "tracker/disk_log.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "common/file_util.h"
#include "tracker/log_reader.h"
#include "tracker/recovery.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kLockFileName = "LOCK";
// A batch is one gather write: at most this many records (two iovecs each, below
// IOV_MAX) and about this many bytes.
constexpr size_t kMaxBatchEntries = 256;
constexpr uint64_t kMaxBatchBytes = 8u << 20;

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

std::string DiskLog::SegmentName() const {
  return SegmentPath(opts_.log_dir, open_number_).string();
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
  SR_ASSIGN_OR_RETURN(std::optional<DiskState> loaded, LoadDiskState(opts_.log_dir));
  const DiskState state = loaded.value_or(DiskState());
  floors_.last_cycle = state.last_cycle;
  floors_.last_seq = state.last_seq;
  floors_.last_segment = state.last_segment;
  last_cycle_ = state.last_cycle;
  last_seq_ = written_seq_ = last_cut_seq_ = state.last_seq;
  open_number_ = state.last_segment;

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
    bitmap_ = DropLog(lost, {});
    mode_ = Mode::kBitmap;
  } else {
    Status s = OpenLogMode(state);
    if (!s.ok()) {
      if (s.code() != EBADMSG) return s.WithContext("recover change log of disk " + opts_.name);
      // A damaged log cannot say which blocks changed: every block is dirty.
      spdlog::error("disk {}: {}", opts_.name, s.ToString());
      mode_ = Mode::kSwitching;
      resync_required_ = true;
      reason_ = "change log unreadable: " + s.message();
      bitmap_ = DropLog(/*mark_all=*/true, {});
      mode_ = Mode::kBitmap;
    }
  }

  SR_ASSIGN_OR_RETURN(ring_, IoRing::Create("change log writer of disk " + opts_.name));
  SR_ASSIGN_OR_RETURN(sealer_ring_, IoRing::Create("change log sealer of disk " + opts_.name));
  writer_running_ = true;
  writer_ = std::thread(&DiskLog::WriterLoop, this);
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
  open_number_ = r.open_segment;
  open_bytes_ = write_offset_ = r.open_bytes;
  open_first_seq_ = r.open_first_seq;
  last_seq_ = written_seq_ = r.last_seq;
  last_cut_seq_ = r.last_cut_seq;
  last_cycle_ = r.last_cycle;
  last_cut_nanos_ = r.last_cut_unix_nanos;
  SR_ASSIGN_OR_RETURN(seg_fd_, OpenFile(SegmentPath(opts_.log_dir, open_number_), O_WRONLY));
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// Appenders

LogOutcome DiskLog::AppendWrite(uint64_t offset, std::span<const std::byte> data) {
  if (data.empty()) return LogOutcome::kLogged;
  const size_t count = (data.size() + kMaxRecordPayload - 1) / kMaxRecordPayload;
  Entry one;
  std::vector<Entry> many;
  std::span<Entry> entries(&one, 1);
  if (count > 1) {
    many.resize(count);
    entries = many;
  }
  for (size_t i = 0; i < count; ++i) {
    Entry& e = entries[i];
    e.kind = RecordKind::kWrite;
    e.payload =
        data.subspan(i * kMaxRecordPayload,
                     std::min<size_t>(kMaxRecordPayload, data.size() - i * kMaxRecordPayload));
    e.offset = offset + i * kMaxRecordPayload;
    e.length = e.payload.size();
  }
  return Append(entries, offset, data.size());
}

LogOutcome DiskLog::AppendDiscard(uint64_t offset, uint64_t length) {
  if (length == 0) return LogOutcome::kLogged;
  Entry e;
  e.kind = RecordKind::kDiscard;
  e.offset = offset;
  e.length = length;
  return Append(std::span<Entry>(&e, 1), offset, length);
}

void DiskLog::RequestFallbackLocked(std::string reason) {
  if (fallback_request_.empty()) fallback_request_ = std::move(reason);
  work_cv_.notify_one();
}

LogOutcome DiskLog::Append(std::span<Entry> entries, uint64_t offset, uint64_t length) {
  uint64_t bytes = 0;
  for (const Entry& e : entries) bytes += e.size();

  std::unique_lock lk(mu_);
  if (!writer_running_ || stop_) return LogOutcome::kShutdown;
  if (mode_ == Mode::kLog && opts_.log_budget != 0 &&
      UnshippedLocked() + bytes > opts_.log_budget) {
    RequestFallbackLocked("log budget of " + std::to_string(opts_.log_budget) +
                          " bytes exceeded (" + std::to_string(UnshippedLocked()) +
                          " bytes unshipped)");
  }
  if (mode_ != Mode::kLog || !fallback_request_.empty()) {
    done_cv_.wait(lk, [&] { return mode_ == Mode::kBitmap || !writer_running_; });
    if (mode_ != Mode::kBitmap) return LogOutcome::kShutdown;
    lk.unlock();
    bitmap_->MarkRange(offset, length);
    return LogOutcome::kBitmap;
  }
  // Sequence numbers are taken in queue order, so file order is seq order.
  for (Entry& e : entries) {
    e.seq = ++last_seq_;
    queue_.push_back(&e);
  }
  queued_bytes_ += bytes;
  lk.unlock();

  // Encode (CRC over header and payload) outside the mutex, in parallel with other
  // appenders; the writer only takes entries once they are ready.
  for (Entry& e : entries) {
    RecordHeader h;
    h.kind = e.kind;
    h.disk_id = opts_.disk_id;
    h.epoch = opts_.epoch;
    h.seq = e.seq;
    h.offset = e.offset;
    h.length = e.length;
    EncodeHeader(h, e.payload, std::span<std::byte, kHeaderSize>(e.head.data(), kHeaderSize));
  }

  lk.lock();
  std::condition_variable& written = waiter_slots_[entries.back().seq % kWaiterSlots];
  entries.back().waiter = &written;
  bool wake = false;
  for (Entry& e : entries) {
    e.ready = true;
    if (!queue_.empty() && queue_.front() == &e) wake = true;
  }
  if (wake) work_cv_.notify_one();
  // The writer completes entries in queue order, and a fall back completes all at once.
  written.wait(lk, [&] { return entries.back().state != Entry::State::kPending; });
  const bool logged = std::all_of(entries.begin(), entries.end(),
                                  [](const Entry& e) { return e.state == Entry::State::kLogged; });
  lk.unlock();
  if (logged) return LogOutcome::kLogged;
  bitmap_->MarkRange(offset, length);
  return LogOutcome::kBitmap;
}

void DiskLog::ApplyFailed(const Status& status, uint64_t offset, uint64_t length) {
  std::unique_lock lk(mu_);
  if (mode_ == Mode::kLog) {
    RequestFallbackLocked("image write failed at offset " + std::to_string(offset) + ": " +
                          status.ToString());
  }
  done_cv_.wait(lk, [&] { return mode_ == Mode::kBitmap || !writer_running_; });
  if (mode_ != Mode::kBitmap) return;
  lk.unlock();
  bitmap_->MarkRange(offset, length);
}

// ---------------------------------------------------------------------------------------
// Cuts

std::unique_ptr<DiskLog::Entry> DiskLog::EnqueueCut(uint64_t cycle, int64_t unix_nanos) {
  std::lock_guard lk(mu_);
  if (mode_ != Mode::kLog || !fallback_request_.empty() || !writer_running_ || stop_)
    return nullptr;
  auto e = std::make_unique<Entry>();
  e->kind = RecordKind::kCut;
  e->seq = ++last_seq_;
  e->cycle = cycle;
  e->unix_nanos = unix_nanos;
  RecordHeader h;
  h.kind = RecordKind::kCut;
  h.disk_id = opts_.disk_id;
  h.epoch = opts_.epoch;
  h.seq = e->seq;
  h.offset = 0;
  h.length = kCutPayloadSize;
  std::span<std::byte, kCutPayloadSize> payload(e->head.data() + kHeaderSize, kCutPayloadSize);
  EncodeCutPayload(CutPayload{cycle, unix_nanos}, payload);
  EncodeHeader(h, payload, std::span<std::byte, kHeaderSize>(e->head.data(), kHeaderSize));
  e->head_size = kHeaderSize + kCutPayloadSize;
  e->ready = true;
  queue_.push_back(e.get());
  queued_bytes_ += e->size();
  last_cut_seq_ = e->seq;
  work_cv_.notify_one();
  return e;
}

bool DiskLog::WaitSealed(Entry& cut) {
  std::unique_lock lk(mu_);
  done_cv_.wait(lk, [&] { return cut.state != Entry::State::kPending; });
  return cut.state == Entry::State::kLogged;
}

bool DiskLog::ChangedSinceCut() const {
  std::lock_guard lk(mu_);
  return mode_ == Mode::kLog && fallback_request_.empty() && last_seq_ > last_cut_seq_;
}

uint64_t DiskLog::last_cycle() const {
  std::lock_guard lk(mu_);
  return last_cycle_;
}

int64_t DiskLog::last_cut_unix_nanos() const {
  std::lock_guard lk(mu_);
  return last_cut_nanos_;
}

// ---------------------------------------------------------------------------------------
// Writer thread

void DiskLog::WriterLoop() {
  std::vector<Entry*> batch;
  std::vector<iovec> iov;
  std::unique_lock lk(mu_);
  for (;;) {
    work_cv_.wait(lk, [&] {
      return (mode_ == Mode::kLog && !fallback_request_.empty()) || sync_wanted_ ||
             (!queue_.empty() && queue_.front()->ready) || (stop_ && queue_.empty());
    });
    if (mode_ == Mode::kLog && !fallback_request_.empty()) {
      const std::string reason = fallback_request_;
      lk.unlock();
      FallBack(reason, {});
      lk.lock();
      continue;
    }
    batch.clear();
    uint64_t batch_bytes = 0;
    while (!queue_.empty() && queue_.front()->ready && batch.size() < kMaxBatchEntries &&
           batch_bytes < kMaxBatchBytes) {
      Entry* e = queue_.front();
      queue_.pop_front();
      batch.push_back(e);
      batch_bytes += e->size();
      if (e->kind == RecordKind::kCut) break;  // a cut ends its segment
    }
    // A sync generation started here covers every change applied before now: their
    // records were written before their apply, so only the fdatasyncs remain.
    uint64_t generation = 0;
    if (sync_wanted_) {
      sync_wanted_ = false;
      generation = ++syncs_started_;
    }
    if (batch.empty() && generation == 0) {
      if (stop_ && queue_.empty()) break;
      continue;
    }
    lk.unlock();
    if (!batch.empty()) WriteBatch(batch, iov);
    if (generation != 0) DoSync(generation);
    lk.lock();
  }
  writer_running_ = false;
  lk.unlock();
  done_cv_.notify_all();
}

void DiskLog::WriteBatch(std::vector<Entry*>& batch, std::vector<iovec>& iov) {
  iov.clear();
  uint64_t bytes = 0;
  for (Entry* e : batch) {
    iov.push_back(iovec{e->head.data(), e->head_size});
    if (!e->payload.empty()) {
      iov.push_back(iovec{const_cast<std::byte*>(e->payload.data()), e->payload.size()});
    }
    bytes += e->size();
  }
  Status s = ring_->WriteAll(seg_fd_.get(), iov, write_offset_, SegmentName());
  if (!s.ok()) {
    FallBack("log write failed: " + s.message(), batch);
    return;
  }
  write_offset_ += bytes;
  Entry* last = batch.back();
  const bool cut = last->kind == RecordKind::kCut;
  bool roll = false;
  {
    std::lock_guard lk(mu_);
    open_bytes_ += bytes;
    queued_bytes_ -= bytes;
    written_seq_ = last->seq;
    if (open_first_seq_ == 0) open_first_seq_ = batch.front()->seq;
    // Wake the appenders after unlocking, so they do not wake into a held mutex.
    to_wake_.clear();
    for (Entry* e : batch) {
      if (e == last && cut) continue;
      e->state = Entry::State::kLogged;
      if (e->waiter != nullptr) to_wake_.push_back(e->waiter);
    }
    if (!cut && opts_.segment_roll_bytes != 0 && open_bytes_ >= opts_.segment_roll_bytes &&
        !roll_requested_) {
      roll = roll_requested_ = true;
    }
  }
  std::sort(to_wake_.begin(), to_wake_.end());
  to_wake_.erase(std::unique(to_wake_.begin(), to_wake_.end()), to_wake_.end());
  for (std::condition_variable* cv : to_wake_) cv->notify_all();
  if (roll && opts_.request_cut) opts_.request_cut();
  if (cut) Seal(last);
}

// The cut record is in the file: the segment is complete. Appending goes on at once in
// the next segment; the sealer thread makes the old one durable and publishes it, so a
// guest write never waits for a seal's fdatasync. A Flush does wait (DoSync), because the
// records it covers may be in the segment being sealed.
void DiskLog::Seal(Entry* cut) {
  PendingSeal pending;
  pending.cut = cut;
  SealedSegment& seg = pending.segment;
  seg.disk = opts_.name;
  seg.disk_id = opts_.disk_id;
  seg.cycle = cut->cycle;
  seg.last_seq = cut->seq;
  seg.path = SegmentName();
  {
    std::lock_guard lk(mu_);
    seg.number = open_number_;
    seg.first_seq = open_first_seq_;
    seg.bytes = open_bytes_;
  }
  const fs::path next = SegmentPath(opts_.log_dir, seg.number + 1);
  Result<UniqueFd> fd_next = OpenFile(next, O_WRONLY | O_CREAT | O_EXCL, 0644);
  if (!fd_next.ok()) {
    FallBack("starting the next segment failed: " + fd_next.status().message(),
             std::span<Entry* const>(&cut, 1));
    return;
  }
  pending.fd = std::exchange(seg_fd_, std::move(*fd_next));
  write_offset_ = 0;
  {
    std::lock_guard lk(mu_);
    sealing_bytes_ += seg.bytes;
    open_bytes_ = 0;
    open_first_seq_ = 0;
    open_number_ += 1;
    roll_requested_ = false;
    seals_.push_back(std::move(pending));
  }
  seal_cv_.notify_one();
}

void DiskLog::SealerLoop() {
  std::unique_lock lk(mu_);
  for (;;) {
    seal_cv_.wait(lk, [&] { return !seals_.empty() || sealer_stop_; });
    if (seals_.empty()) break;  // stopping, and nothing left to seal
    PendingSeal p = std::move(seals_.front());
    seals_.pop_front();
    sealing_ = true;
    lk.unlock();
    // fdatasync the sealed segment, then the folder (which makes the next segment's
    // creation durable).
    const std::string what = p.segment.path.string();
    const std::string_view whats[1] = {what};
    const int fds[1] = {p.fd.get()};
    Status synced[1];
    sealer_ring_->DataSync(fds, whats, synced);
    p.fd.Reset();
    Status s = synced[0].ok() ? SyncDir(opts_.log_dir) : synced[0];
    lk.lock();
    sealing_ = false;
    if (mode_ == Mode::kLog && s.ok()) {
      sealing_bytes_ -= p.segment.bytes;
      sealed_bytes_ += p.segment.bytes;
      last_cycle_ = p.cut->cycle;
      last_cut_nanos_ = p.cut->unix_nanos;
      sealed_.push_back(std::move(p.segment));
      CompleteLocked(p.cut, Entry::State::kLogged);
    } else {
      // Fell back meanwhile (the segment is gone), or the seal failed: then fall back.
      if (mode_ == Mode::kLog) RequestFallbackLocked("sealing " + what + " failed: " + s.message());
      CompleteLocked(p.cut, Entry::State::kBitmap);
    }
    done_cv_.notify_all();
  }
}

void DiskLog::DoSync(uint64_t generation) {
  Mode mode;
  std::string fallback;
  {
    // Records that this sync covers may be in segments still being sealed.
    std::unique_lock lk(mu_);
    done_cv_.wait(lk, [&] { return seals_.empty() && !sealing_; });
    fallback = mode_ == Mode::kLog ? fallback_request_ : std::string();
  }
  if (!fallback.empty()) FallBack(fallback, {});  // e.g. a seal failed: its records may be lost
  {
    std::lock_guard lk(mu_);
    mode = mode_;
  }
  const std::string image_what = "image of disk " + opts_.name;
  Status image_status;
  if (mode == Mode::kLog) {
    const std::string seg_what = SegmentName();
    const int fds[2] = {seg_fd_.get(), opts_.image_fd};
    const std::string_view whats[2] = {seg_what, image_what};
    Status results[2];
    ring_->DataSync(fds, whats, results);
    image_status = results[1];
    if (!results[0].ok()) {
      // The log may have lost records: the bitmap takes over and is synced below.
      FallBack("log sync failed: " + results[0].message(), {});
      Status b = bitmap_->Flush();
      if (!b.ok()) spdlog::error("disk {}: {}", opts_.name, b.ToString());
    }
  } else {
    Status b = bitmap_->Flush();
    if (!b.ok()) spdlog::error("disk {}: {}", opts_.name, b.ToString());
    const int fd = opts_.image_fd;
    const std::string_view what = image_what;
    ring_->DataSync(std::span<const int>(&fd, 1), std::span<const std::string_view>(&what, 1),
                    std::span<Status>(&image_status, 1));
  }
  {
    std::lock_guard lk(mu_);
    syncs_completed_ = generation;
    ++syncs_done_;
    if (!image_status.ok()) {
      sync_error_generation_ = generation;
      sync_error_ = image_status;
    }
  }
  done_cv_.notify_all();
}

// ---------------------------------------------------------------------------------------
// Flush, stop

Status DiskLog::Flush() {
  std::unique_lock lk(mu_);
  if (!writer_running_) {
    lk.unlock();
    return SyncNow();
  }
  const uint64_t need = syncs_started_ + 1;
  sync_wanted_ = true;
  work_cv_.notify_one();
  done_cv_.wait(lk, [&] { return syncs_completed_ >= need || !writer_running_; });
  if (syncs_completed_ < need) {
    lk.unlock();
    return SyncNow();
  }
  if (sync_error_generation_ >= need) return sync_error_;
  return Status::Ok();
}

Status DiskLog::SyncNow() {
  Mode mode;
  DirtyBitmap* bitmap;
  {
    std::lock_guard lk(mu_);
    mode = mode_;
    bitmap = bitmap_.get();
  }
  Status result;
  if (mode == Mode::kLog && seg_fd_.valid() && ::fdatasync(seg_fd_.get()) != 0) {
    result = Status::FromErrno(errno, "fdatasync " + SegmentName());
  }
  if (bitmap != nullptr) {
    Status s = bitmap->Flush();
    if (!s.ok() && result.ok()) result = s;
  }
  if (::fdatasync(opts_.image_fd) != 0) {
    return Status::FromErrno(errno, "fdatasync image of disk " + opts_.name);
  }
  return result;
}

Status DiskLog::Stop() {
  {
    std::lock_guard lk(mu_);
    if (stop_ && !writer_.joinable() && !sealer_.joinable()) return Status::Ok();
    stop_ = true;
  }
  work_cv_.notify_one();
  if (writer_.joinable()) writer_.join();
  // The writer queues no more seals; the sealer finishes the queued ones, then exits.
  {
    std::lock_guard lk(mu_);
    sealer_stop_ = true;
  }
  seal_cv_.notify_one();
  if (sealer_.joinable()) sealer_.join();
  if (opts_.image_fd < 0) return Status::Ok();
  return SyncNow();
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
  for (const SealedSegment& seg : gone) {
    if (::unlink(seg.path.c_str()) != 0 && errno != ENOENT && result.ok()) {
      result = Status::FromErrno(errno, "delete " + seg.path.string());
    }
  }
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
  s.last_seq = mode_ == Mode::kLog ? written_seq_ : last_seq_;
  s.last_cut_unix_nanos = last_cut_nanos_;
  if (bitmap_) {
    s.dirty_bytes = std::min(bitmap_->dirty_blocks() * DirtyBitmap::kBlockSize, opts_.size);
  }
  s.flush_syncs = syncs_done_;
  return s;
}

}  // namespace siterep::tracker
