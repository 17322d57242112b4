#include "tracker/disk_log.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <utility>

#include "common/block_hash.h"
#include "common/crc32c.h"
#include "common/failpoint.h"
#include "common/file_util.h"
#include "tracker/frozen_set.h"
#include "tracker/locks.h"
#include "tracker/log_reader.h"
#include "tracker/recovery.h"
#include "tracker/snapshot.h"

namespace siterep::tracker {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kLockFileName = "LOCK";
constexpr uint64_t kBlock = DirtyBitmap::kBlockSize;

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
  SR_ASSIGN_OR_RETURN(std::optional<DiskState> loaded, LoadDiskState(opts_.log_dir));
  const DiskState state = loaded.value_or(DiskState());
  floors_.last_cycle = state.last_cycle;
  floors_.last_seq = state.last_seq;
  floors_.last_segment = state.last_segment;
  last_cycle_ = state.last_cycle;
  last_seq_ = state.last_seq;
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
  builder_ = std::thread(&DiskLog::BuilderLoop, this);
  return Status::Ok();
}

Status DiskLog::OpenLogMode(const DiskState& state) {
  std::error_code ec;
  const bool first_open = !fs::exists(opts_.log_dir / kMapFileName, ec);
  SR_ASSIGN_OR_RETURN(map_, DirtyBitmap::Open(opts_.log_dir / kMapFileName, opts_.size));
  RecoveryInput in;
  in.disk_name = opts_.name;
  in.disk_id = opts_.disk_id;
  in.log_dir = opts_.log_dir;
  in.floors = state;
  in.map = map_.get();
  in.legacy_open_segment = first_open;
  SR_ASSIGN_OR_RETURN(RecoveredLog r, RecoverLog(in));
  for (SealedSegment& seg : r.sealed) {
    sealed_bytes_ += seg.bytes;
    sealed_.push_back(std::move(seg));
  }
  last_seq_ = r.last_seq;
  last_segment_ = r.last_segment;
  last_cycle_ = r.last_cycle;
  last_cut_nanos_ = r.last_cut_unix_nanos;
  last_cut_first_change_ = r.last_cut_first_change_unix_nanos;

  // A cut that was frozen but not published before the stop: its blocks go back into the
  // map (their content is in the image), so the next cycle carries them.
  const fs::path frozen_path = opts_.log_dir / kFrozenFileName;
  SR_ASSIGN_OR_RETURN(std::optional<FrozenSet> frozen, LoadFrozenSet(frozen_path, opts_.size));
  if (frozen) {
    if (frozen->torn) {
      spdlog::warn("disk {}: {} is torn: every block goes into the next cycle", opts_.name,
                   frozen_path.string());
      map_->MarkAll();
    } else if (frozen->cycle > last_cycle_) {
      map_->MarkWords(frozen->words);
      spdlog::info(
          "disk {}: cycle {} was cut but not finished before the stop; its blocks go "
          "into the next cycle",
          opts_.name, frozen->cycle);
    }
    SR_RETURN_IF_ERROR(map_->Flush());
    if (::unlink(frozen_path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "delete " + frozen_path.string());
    }
  }
  const fs::path cow_path = opts_.log_dir / kCowFileName;
  if (::unlink(cow_path.c_str()) != 0 && errno != ENOENT) {
    return Status::FromErrno(errno, "delete " + cow_path.string());
  }
  changed_ = map_->dirty_blocks() > 0;
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// The write path

LogOutcome DiskLog::BeforeChange(uint64_t offset, uint64_t length) {
  if (DirtyBitmap* map = map_.get(); map != nullptr) {
    // Log mode, or a fall back not finished yet (FinishFallback moves the map's bits into
    // the bitmap, with the VM lock exclusive, so no change is marking then).
    map->MarkRange(offset, length);
    if (!changed_.load(std::memory_order_relaxed)) changed_.store(true, std::memory_order_relaxed);
    // The cut's content of frozen blocks not yet read goes to the copy-on-write file
    // first; never fails the change (a failed save fails the build, which rolls back).
    // cow_ changes only at a cut, when no change is in flight, so no lock is needed.
    if (cow_active_.load(std::memory_order_acquire)) cow_->SaveBefore(offset, length);
    return LogOutcome::kLogged;
  }
  std::unique_lock lk(mu_);
  if (stop_) return LogOutcome::kShutdown;
  MarkWithoutLog(lk, offset, length);
  return LogOutcome::kBitmap;
}

void DiskLog::MarkWithoutLog(std::unique_lock<std::mutex>& lk, uint64_t offset, uint64_t length) {
  if (DirtyBitmap* bitmap = bitmap_.get(); bitmap != nullptr) {
    lk.unlock();
    bitmap->MarkRange(offset, length);
    return;
  }
  pending_ranges_.push_back(ByteRange{offset, length});
  lk.unlock();
  EnsureBitmap();
}

void DiskLog::RequestFallbackLocked(std::string reason) {
  if (mode_ != Mode::kLog) return;
  mode_ = Mode::kSwitching;
  resync_required_ = true;
  reason_ = std::move(reason);
  fallback_pending_.store(true, std::memory_order_release);
  spdlog::warn("disk {}: falling back to the dirty bitmap: {}", opts_.name, reason_);
}

void DiskLog::EnsureBitmap() {
  std::lock_guard bitmap_lock(bitmap_mu_);
  {
    std::lock_guard lk(mu_);
    if (bitmap_) return;
  }
  std::unique_ptr<DirtyBitmap> bitmap = OpenBitmap();
  std::lock_guard lk(mu_);
  for (const ByteRange& r : pending_ranges_) bitmap->MarkRange(r.offset, r.length);
  pending_ranges_.clear();
  bitmap_ = std::move(bitmap);
}

// ---------------------------------------------------------------------------------------
// Cuts

std::unique_ptr<DiskLog::CutTicket> DiskLog::WriteCut(uint64_t cycle, int64_t unix_nanos,
                                                      int64_t first_change_unix_nanos) {
  FinishFallback();  // a pending fall back gets no cut; finishing it needs what we hold
  {
    std::lock_guard lk(mu_);
    if (mode_ != Mode::kLog || stop_ || build_) return nullptr;
  }
  auto build = std::make_unique<Build>();
  auto frozen = std::make_shared<std::vector<uint64_t>>();
  build->frozen_blocks = map_->TakeAll(frozen.get());
  changed_.store(false, std::memory_order_relaxed);
  build->frozen = frozen;
  // In the page cache before the builder starts: a kill -9 from here on finds it. (Not
  // for power loss: the builder fdatasyncs it before it starts reading.)
  Status saved = SaveFrozenSet(opts_.log_dir / kFrozenFileName, cycle, opts_.size, *frozen);
  if (!saved.ok()) {
    spdlog::warn("disk {}: {} (cycle {} is built without it)", opts_.name, saved.ToString(), cycle);
  }
  if (build->frozen_blocks > 0) {
    SnapshotOptions so;
    so.block_size = kBlock;
    so.only = frozen;
    Result<std::unique_ptr<DiskSnapshot>> cow = DiskSnapshot::Create(
        opts_.name, opts_.image_fd, opts_.size, opts_.log_dir / kCowFileName, std::move(so));
    if (cow.ok()) {
      build->cow = std::move(*cow);
    } else {
      // The build fails (it cannot read the cut without the copy-on-write) and rolls back.
      spdlog::warn("disk {}: {}", opts_.name, cow.status().ToString());
    }
  }
  auto cut = std::make_unique<CutTicket>();
  cut->cycle = cycle;
  cut->unix_nanos = unix_nanos;
  cut->first_change_unix_nanos = first_change_unix_nanos;
  build->cut = cut.get();
  // The caller holds the VM lock exclusively: no change is reading cow_.
  cow_ = build->cow;
  cow_active_.store(cow_ != nullptr, std::memory_order_release);
  {
    std::lock_guard lk(mu_);
    build_ = std::move(build);
    build_queued_ = true;
  }
  build_cv_.notify_one();
  return cut;
}

bool DiskLog::WaitBuilt(CutTicket& cut) {
  std::unique_lock lk(mu_);
  done_cv_.wait(lk, [&] { return cut.state != CutTicket::State::kBuilding; });
  return cut.state == CutTicket::State::kBuilt;
}

bool DiskLog::Publish(CutTicket& cut) {
  std::unique_ptr<Build> b;
  {
    std::lock_guard lk(mu_);
    if (!build_ || build_->cut != &cut || cut.state != CutTicket::State::kBuilt) return false;
    b = std::move(build_);
    if (mode_ != Mode::kLog) return false;  // the fall back deletes the file
    const SealedSegment& seg = b->segment;
    sealed_bytes_ += seg.bytes;
    last_seq_ = seg.last_seq;
    last_segment_ = seg.number;
    last_cycle_ = seg.cycle;
    last_cut_nanos_ = seg.cut_unix_nanos;
    last_cut_first_change_ = seg.first_change_unix_nanos;
    ++cycles_built_;
    cut.seq = seg.last_seq;
    cut.segment = seg.number;
    sealed_.push_back(seg);
  }
  const fs::path frozen = opts_.log_dir / kFrozenFileName;
  if (::unlink(frozen.c_str()) != 0 && errno != ENOENT) {
    spdlog::warn("disk {}: delete {}: {}", opts_.name, frozen.string(), std::strerror(errno));
  }
  return true;
}

void DiskLog::RollBack(CutTicket& cut) {
  std::unique_ptr<Build> b;
  {
    std::lock_guard lk(mu_);
    cut.state = CutTicket::State::kDropped;
    cut.seq = last_seq_;
    cut.segment = last_segment_;
    if (!build_ || build_->cut != &cut) return;
    b = std::move(build_);
    // In bitmap mode the fall back marked the frozen set already.
    if (mode_ == Mode::kLog) {
      map_->MarkWords(*b->frozen);
      if (b->frozen_blocks > 0) changed_.store(true, std::memory_order_relaxed);
    }
  }
  if (!b->segment.path.empty() && ::unlink(b->segment.path.c_str()) != 0 && errno != ENOENT) {
    spdlog::warn("disk {}: delete {}: {}", opts_.name, b->segment.path.string(),
                 std::strerror(errno));
  }
  const fs::path frozen = opts_.log_dir / kFrozenFileName;
  (void)::unlink(frozen.c_str());  // the map holds the blocks again
}

Status DiskLog::RollBackAfter(uint64_t vm_cycle) {
  std::vector<SealedSegment> gone;
  {
    std::lock_guard lk(mu_);
    if (mode_ != Mode::kLog) return Status::Ok();
    while (!sealed_.empty() && sealed_.back().cycle > vm_cycle) {
      sealed_bytes_ -= sealed_.back().bytes;
      gone.push_back(std::move(sealed_.back()));
      sealed_.pop_back();
    }
    if (gone.empty()) return Status::Ok();
  }
  for (const SealedSegment& seg : gone) {
    SR_RETURN_IF_ERROR(MarkSegmentBlocks(seg.path, *map_, /*strict=*/true).status());
    spdlog::info(
        "disk {}: cycle {} is not on every disk of the VM; its blocks go into the next "
        "cycle",
        opts_.name, seg.cycle);
  }
  SR_RETURN_IF_ERROR(map_->Flush());
  for (const SealedSegment& seg : gone) {
    if (::unlink(seg.path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "delete " + seg.path.string());
    }
  }
  SR_RETURN_IF_ERROR(SyncDir(opts_.log_dir));
  std::lock_guard lk(mu_);
  changed_ = true;
  last_cycle_ = sealed_.empty() ? floors_.last_cycle : sealed_.back().cycle;
  last_seq_ = sealed_.empty() ? floors_.last_seq : sealed_.back().last_seq;
  last_cut_nanos_ = sealed_.empty() ? last_cut_nanos_ : sealed_.back().cut_unix_nanos;
  return Status::Ok();
}

bool DiskLog::ChangedSinceCut() const {
  std::lock_guard lk(mu_);
  return mode_ == Mode::kLog && changed_.load(std::memory_order_relaxed);
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

bool DiskLog::has_unreleased() const {
  std::lock_guard lk(mu_);
  return !sealed_.empty();
}

// ---------------------------------------------------------------------------------------
// Builder thread

void DiskLog::BuilderLoop() {
  std::unique_lock lk(mu_);
  for (;;) {
    build_cv_.wait(lk, [&] { return build_queued_ || builder_stop_; });
    if (!build_queued_) break;  // stopping, and nothing left to build
    build_queued_ = false;
    building_ = true;
    Build* b = build_.get();
    lk.unlock();
    Status s = BuildSegment(*b);
    if (b->cow) {
      // Every frozen block has been read (or the build failed): nothing more to save.
      b->cow->End();
      Status removed = b->cow->Remove();
      if (!removed.ok()) spdlog::warn("disk {}: {}", opts_.name, removed.ToString());
    }
    lk.lock();
    building_ = false;
    if (b->cow) cow_saved_bytes_ += b->cow->saved_bytes();
    cow_active_.store(false, std::memory_order_release);  // cow_ stays until the next cut
    if (s.ok()) build_error_.clear();
    if (s.ok() && mode_ == Mode::kLog) {
      b->cut->state = CutTicket::State::kBuilt;
    } else {
      if (!s.ok()) {
        build_error_ = s.message();
        spdlog::warn("disk {}: building cycle {} failed, its blocks go into the next cycle: {}",
                     opts_.name, b->cut->cycle, s.ToString());
        if (!b->tmp_path.empty()) (void)::unlink(b->tmp_path.c_str());
        b->segment.path.clear();
      }
      b->cut->state = CutTicket::State::kDropped;
    }
    done_cv_.notify_all();
  }
}

Status DiskLog::BuildSegment(Build& b) {
  if (b.frozen_blocks > 0 && !b.cow) {
    return Status::Error(EIO,
                         "no copy-on-write for the cut of cycle " + std::to_string(b.cut->cycle));
  }
  uint64_t number;
  uint64_t seq;
  {
    std::lock_guard lk(mu_);
    number = last_segment_ + 1;
    seq = last_seq_;
  }
  const fs::path final_path = SegmentPath(opts_.log_dir, number);
  b.tmp_path = final_path;
  b.tmp_path += ".tmp";
  // Power loss: the frozen set is durable before the map could lose its bits' copy.
  {
    Result<UniqueFd> frozen = OpenFile(opts_.log_dir / kFrozenFileName, O_RDONLY);
    if (frozen.ok() && ::fdatasync(frozen->get()) != 0) {
      return Status::FromErrno(errno, "fdatasync " + (opts_.log_dir / kFrozenFileName).string());
    }
  }
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(b.tmp_path, O_WRONLY | O_CREAT | O_TRUNC, 0600));
  const uint64_t first_seq = seq + 1;
  std::vector<std::byte> out;
  // Written out every 2 MiB: a disk with nothing frozen (a cycle of its cut record alone)
  // allocates nothing more, and four disks building at once stay within a few MiB.
  constexpr size_t kFlushAt = 2u << 20;
  if (b.frozen_blocks > 0) out.reserve(kFlushAt + kHeaderSize + kMaxRecordPayload);
  uint64_t file_offset = 0;
  auto flush_out = [&]() -> Status {
    if (out.empty()) return Status::Ok();
    SR_RETURN_IF_ERROR(
        PWriteAll(fd.get(), out.data(), out.size(), file_offset, b.tmp_path.string()));
    file_offset += out.size();
    out.clear();
    return Status::Ok();
  };
  auto put_record = [&](RecordKind kind, uint64_t offset, uint64_t length, size_t payload_size) {
    // The payload (if any) is already at out[at + kHeaderSize ...).
    const size_t at = out.size() - kHeaderSize - payload_size;
    RecordHeader h;
    h.kind = kind;
    h.disk_id = opts_.disk_id;
    h.epoch = opts_.epoch;
    h.seq = ++seq;
    h.offset = offset;
    h.length = length;
    EncodeHeader(h, std::span<const std::byte>(out.data() + at + kHeaderSize, payload_size),
                 std::span<std::byte, kHeaderSize>(out.data() + at, kHeaderSize));
  };

  // Runs of frozen blocks, at most kMaxRecordPayload each, in disk order.
  const std::vector<uint64_t>& words = *b.frozen;
  const uint64_t blocks = (opts_.size + kBlock - 1) / kBlock;
  constexpr uint64_t kMaxRunBlocks = kMaxRecordPayload / kBlock;
  auto is_set = [&](uint64_t block) {
    return block < blocks && ((words[block / 64] >> (block % 64)) & 1) != 0;
  };
  for (uint64_t block = 0; block < blocks;) {
    if ((words[block / 64] >> (block % 64)) == 0) {
      block = (block / 64 + 1) * 64;  // nothing more set in this word
      continue;
    }
    if (!is_set(block)) {
      ++block;
      continue;
    }
    uint64_t n = 1;
    while (n < kMaxRunBlocks && is_set(block + n)) ++n;
    const uint64_t offset = block * kBlock;
    const uint64_t length = std::min(n * kBlock, opts_.size - offset);
    block += n;
    const size_t at = out.size();
    out.resize(at + kHeaderSize + length);
    std::span<std::byte> payload(out.data() + at + kHeaderSize, length);
    {
      RangeLocks::Guard range = opts_.ranges->Lock(offset, length);
      SR_RETURN_IF_ERROR(b.cow->Read(offset, payload));
      b.cow->MarkRead(offset, length);
    }
    if (IsAllZero(payload)) {
      // Zeros at the cut (a discard, or zeros written): a discard record, no payload.
      out.resize(at + kHeaderSize);
      put_record(RecordKind::kDiscard, offset, length, 0);
    } else {
      put_record(RecordKind::kWrite, offset, length, length);
    }
    if (out.size() >= kFlushAt) SR_RETURN_IF_ERROR(flush_out());
  }
  // The cut record closes the segment.
  {
    const size_t at = out.size();
    out.resize(at + kHeaderSize + kCutPayloadSize);
    EncodeCutPayload(
        CutPayload{b.cut->cycle, b.cut->unix_nanos, b.cut->first_change_unix_nanos},
        std::span<std::byte, kCutPayloadSize>(out.data() + at + kHeaderSize, kCutPayloadSize));
    put_record(RecordKind::kCut, 0, kCutPayloadSize, kCutPayloadSize);
  }
  SR_RETURN_IF_ERROR(flush_out());
  if (failpoint::Check("tracker.before_seal") == failpoint::Action::kError) {
    return Status::Error(EIO, "failpoint tracker.before_seal");
  }
  if (::fdatasync(fd.get()) != 0) {
    return Status::FromErrno(errno, "fdatasync " + b.tmp_path.string());
  }
  if (::rename(b.tmp_path.c_str(), final_path.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + b.tmp_path.string() + " to " + final_path.string());
  }
  b.tmp_path.clear();
  SealedSegment& seg = b.segment;
  seg.disk = opts_.name;
  seg.disk_id = opts_.disk_id;
  seg.number = number;
  seg.cycle = b.cut->cycle;
  seg.first_seq = first_seq;
  seg.last_seq = seq;
  seg.bytes = file_offset;
  seg.cut_unix_nanos = b.cut->unix_nanos;
  seg.first_change_unix_nanos = b.cut->first_change_unix_nanos;
  seg.path = final_path;
  SR_RETURN_IF_ERROR(SyncDir(opts_.log_dir));
  failpoint::Check("tracker.after_seal");
  return Status::Ok();
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
    DirtyBitmap* map = mode_ == Mode::kBitmap ? bitmap_.get() : map_.get();
    lk.unlock();
    Status image_status = SyncFiles(map);
    lk.lock();
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

Status DiskLog::SyncFiles(DirtyBitmap* map) {
  if (map != nullptr) {
    Status b = map->Flush();
    if (!b.ok()) spdlog::error("disk {}: {}", opts_.name, b.ToString());
  }
  if (::fdatasync(opts_.image_fd) != 0) {
    return Status::FromErrno(errno, "fdatasync the image of disk " + opts_.name);
  }
  return Status::Ok();
}

Status DiskLog::Stop() {
  {
    std::lock_guard lk(mu_);
    if (stop_ && !builder_.joinable()) return Status::Ok();
    stop_ = true;
    builder_stop_ = true;
  }
  // The builder finishes a queued build, then exits.
  build_cv_.notify_one();
  if (builder_.joinable()) builder_.join();
  // No change runs now (the caller's guarantee), which is what FinishFallback needs.
  FinishFallback();
  if (opts_.image_fd < 0) return Status::Ok();
  DirtyBitmap* map;
  {
    std::lock_guard lk(mu_);
    map = mode_ == Mode::kBitmap ? bitmap_.get() : map_.get();
  }
  return SyncFiles(map);
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
  if (mode_ == Mode::kLog) {
    const uint64_t open = map_ ? map_->dirty_blocks() * kBlock : 0;
    const uint64_t frozen = build_ ? build_->frozen_blocks * kBlock : 0;
    s.unshipped_bytes = sealed_bytes_ + open + frozen;
  }
  s.cycles_built = cycles_built_;
  s.build_error = build_error_;
  s.cow_bytes = building_ && build_ && build_->cow ? build_->cow->saved_bytes() : 0;
  s.cow_bytes_total = cow_saved_bytes_ + s.cow_bytes;
  s.last_seq = last_seq_;
  s.last_cut_unix_nanos = last_cut_nanos_;
  if (bitmap_) {
    s.dirty_bytes = std::min(bitmap_->dirty_blocks() * DirtyBitmap::kBlockSize, opts_.size);
  }
  s.flush_syncs = syncs_done_;
  return s;
}

}  // namespace siterep::tracker
