#include "shipper/shipper.h"

#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "common/failpoint.h"
#include "common/file_util.h"
#include "common/time_util.h"
#include "common/unique_fd.h"
#include "shipper/rate_limiter.h"
#include "shipper/shipper_impl.h"
#include "shipper/wire_format.h"

namespace siterep::shipper {

using detail::IsTlsRefusal;

// ---------------------------------------------------------------------------------------

Status Shipper::Impl::Init() {
  if (opts_.source == nullptr) return Status::Invalid("Shipper: no segment source");
  if (opts_.tls == nullptr) return Status::Invalid("Shipper: no TLS context");
  if (opts_.site.empty() || opts_.peer.empty() || opts_.peer_address.empty()) {
    return Status::Invalid("Shipper: site, peer and peer_address are required");
  }
  if (opts_.definition.vm.empty()) return Status::Invalid("Shipper: the definition has no VM");
  if (opts_.definition.disks.empty()) {
    return Status::Invalid("Shipper: VM " + opts_.definition.vm + " has no disks");
  }
  if (opts_.window_cycles == 0 || opts_.heartbeat.count() <= 0 || opts_.io_timeout.count() <= 0 ||
      opts_.min_backoff.count() <= 0 || opts_.max_backoff < opts_.min_backoff) {
    return Status::Invalid("Shipper: window, heartbeat, io_timeout and backoffs must be positive");
  }
  waker_ = std::make_shared<Waker>();
  waker_->fd = UniqueFd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!waker_->fd.valid()) return Status::FromErrno(errno, "Shipper: eventfd");
  opts_.source->SetSealedCallback([waker = waker_](uint64_t cycle) {
    uint64_t seen = waker->sealed_through.load();
    while (cycle > seen && !waker->sealed_through.compare_exchange_weak(seen, cycle)) {
    }
    waker->Wake();
  });
  thread_ = std::thread(&Impl::Run, this);
  return Status::Ok();
}

void Shipper::Impl::Stop() {
  if (!thread_.joinable()) return;
  stopping_ = true;
  waker_->Wake();
  {
    // Give the thread a moment to say goodbye cleanly; then cut whatever it is blocked in.
    std::unique_lock lk(stream_mu_);
    if (!finished_cv_.wait_for(lk, milliseconds(500), [&] { return finished_; }) &&
        stream_ != nullptr) {
      stream_->Cancel();
    }
  }
  thread_.join();
  opts_.source->SetSealedCallback(nullptr);
}

void Shipper::Impl::Sleep(Clock::time_point until) const {
  // Only Stop ends the wait early: a sealed cycle must not cut a backoff short, or a busy
  // VM would hammer an unreachable or refusing peer at every cut.
  while (!stopping_) {
    const auto now = Clock::now();
    if (now >= until) return;
    const auto ms = std::chrono::ceil<milliseconds>(until - now).count();
    pollfd p{waker_->fd.get(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(std::min<int64_t>(ms, 60000))) > 0) waker_->Drain();
  }
}

void Shipper::Impl::SetError(const Status& s, bool refused, std::string refusal,
                             std::string refusal_message) {
  std::lock_guard lk(mu_);
  stats_.connected = false;
  stats_.refused = refused;
  stats_.refusal = std::move(refusal);
  stats_.refusal_message = std::move(refusal_message);
  stats_.last_error = s.message();
}

void Shipper::Impl::Run() {
  milliseconds backoff = opts_.min_backoff;
  while (!stopping_) {
    bool accepted = false;
    Status s = RunConnection(&accepted);
    if (stopping_) break;
    bool refused;
    {
      std::lock_guard lk(mu_);
      stats_.connected = false;
      // "try_again" names a passing state at the peer: not worth the slow retry.
      refused = stats_.refused && stats_.refusal != "try_again";
    }
    spdlog::warn("VM {}: replication to {} ({}): {}", opts_.definition.vm, opts_.peer,
                 opts_.peer_address, s.ToString());
    if (accepted) backoff = opts_.min_backoff;
    // A refusal will not go away by itself soon: retry slowly.
    Sleep(Clock::now() + (refused ? opts_.max_backoff : backoff));
    backoff = std::min(backoff * 2, opts_.max_backoff);
  }
  std::lock_guard lk(stream_mu_);
  finished_ = true;
  finished_cv_.notify_all();
}

Status Shipper::Impl::RunConnection(bool* accepted) {
  Result<std::unique_ptr<TlsStream>> connected =
      TlsConnect(*opts_.tls, opts_.peer_address, opts_.peer, Clock::now() + opts_.io_timeout);
  if (!connected.ok()) {
    Status s =
        connected.status().WithContext("connect to " + opts_.peer + " at " + opts_.peer_address);
    SetError(s, IsTlsRefusal(connected.status()));
    return s;
  }
  std::unique_ptr<TlsStream> stream = std::move(*connected);
  {
    std::lock_guard lk(stream_mu_);
    if (stopping_) return Status::Error(ECANCELED, "stopping");
    stream_ = stream.get();
  }
  // Unregisters the stream before it is destroyed, whatever way this function returns.
  struct Unregister {
    Impl* impl;
    ~Unregister() {
      std::lock_guard lk(impl->stream_mu_);
      impl->stream_ = nullptr;
    }
  } unregister{this};

  Hello hello;
  hello.from = opts_.site;
  hello.to = opts_.peer;
  hello.definition = opts_.definition;
  if (hello.definition.primary_site.empty()) hello.definition.primary_site = opts_.site;
  const std::vector<std::byte> frame = EncodeFrame(FrameType::kHello, EncodeHello(hello));
  Status s = stream->WriteAll(frame, Clock::now() + opts_.io_timeout);
  std::vector<std::byte> payload;
  Result<FrameHeader> header = Status::Ok();
  if (s.ok()) {
    const Deadline deadline = Clock::now() + opts_.io_timeout;
    header = ReadFrame([&](std::span<std::byte> out) { return stream->ReadExact(out, deadline); },
                       &payload);
    if (!header.ok()) s = header.status();
  }
  if (s.ok()) s = VerifyFrame(*header, payload);
  if (!s.ok()) {
    // TLS 1.3 clients finish the handshake first; a server that rejects our certificate
    // says so in an alert that arrives here.
    SetError(s.WithContext("hello to " + opts_.peer), IsTlsRefusal(s));
    return s.WithContext("hello to " + opts_.peer);
  }
  if (header->type == FrameType::kError) {
    Result<ErrorFrame> e = DecodeError(payload);
    s = Status::Error(EPROTO, opts_.peer + " closed the connection: " +
                                  (e.ok() ? e->reason : e.status().message()));
    SetError(s, false);
    return s;
  }
  if (header->type != FrameType::kHelloReply) {
    s = Status::Error(
        EPROTO, opts_.peer + " answered Hello with " + std::string(FrameTypeName(header->type)));
    SetError(s, false);
    return s;
  }
  Result<HelloReply> reply = DecodeHelloReply(payload);
  if (!reply.ok()) {
    SetError(reply.status(), false);
    return reply.status();
  }
  if (!reply->accepted) {
    s = Status::Error(RefusalCode(reply->error), opts_.peer + " refused VM " + opts_.definition.vm +
                                                     " (" + reply->error + "): " + reply->message);
    SetError(s, true, reply->error, reply->message);
    return s;
  }
  *accepted = true;
  const applier::ReplicaPosition& pos = reply->position;
  spdlog::info("VM {}: connected to {} ({}); replica has received cycle {}, applied {}",
               opts_.definition.vm, opts_.peer, opts_.peer_address, pos.received_cycle,
               pos.applied_cycle);
  if (pos.received_cycle > 0) {
    Status released = opts_.source->ReleaseThrough(pos.received_cycle);
    if (!released.ok()) {
      spdlog::warn("VM {}: releasing segments through cycle {}: {}", opts_.definition.vm,
                   pos.received_cycle, released.ToString());
    }
  }
  {
    std::lock_guard lk(mu_);
    stats_.connected = true;
    stats_.refused = false;
    stats_.refusal.clear();
    stats_.refusal_message.clear();
    stats_.last_error.clear();
    stats_.connects++;
    stats_.acked_cycle = pos.received_cycle;
    stats_.sent_cycle = pos.received_cycle;
    stats_.applied_cycle = pos.applied_cycle;
    stats_.applied_cut_unix_nanos = pos.applied_cut_unix_nanos;
    stats_.peer_apply_error = pos.apply_error;
    stats_.last_contact_unix_nanos = NowUnixNanos();
    unapplied_.erase(unapplied_.begin(), unapplied_.upper_bound(pos.applied_cycle));
  }
  Connection connection(*this, *stream, pos);
  s = connection.Run();
  if (!s.ok() && !stopping_) {
    std::lock_guard lk(mu_);
    stats_.last_error = s.message();
  }
  return s;
}

Shipper::Impl::Backlog Shipper::Impl::ComputeBacklog() const {
  Backlog b;
  uint64_t acked, applied;
  int64_t applied_cut;
  std::vector<int64_t> firsts;
  {
    std::lock_guard lk(mu_);
    acked = stats_.acked_cycle;
    applied = stats_.applied_cycle;
    applied_cut = stats_.applied_cut_unix_nanos;
    for (const auto& [cycle, first] : unapplied_) {
      if (cycle > applied) firsts.push_back(first);
    }
    // Received but unapplied cycles we did not send (a restart came between): their first
    // change is no older than the applied cut, which is the cautious bound.
    if (acked > applied && unapplied_.lower_bound(applied + 1) == unapplied_.end() &&
        applied_cut > 0) {
      firsts.push_back(applied_cut);
    }
  }
  for (const tracker::SealedSegment& seg : opts_.source->SealedSegments()) {
    if (seg.cycle <= acked) continue;
    b.pending_bytes += seg.bytes;
    if (seg.cycle > applied) firsts.push_back(seg.first_change_unix_nanos);
  }
  if (opts_.open_cycle_first_change) firsts.push_back(opts_.open_cycle_first_change());
  for (int64_t t : firsts) {
    if (t > 0 &&
        (b.oldest_unapplied_change_unix_nanos == 0 || t < b.oldest_unapplied_change_unix_nanos)) {
      b.oldest_unapplied_change_unix_nanos = t;
    }
  }
  return b;
}

ShipperStats Shipper::Impl::Stats() const {
  const Backlog backlog = ComputeBacklog();
  // A sync that is due but has not started on a connection yet shows as active too.
  std::optional<applier::SyncPlan> plan;
  if (opts_.sync != nullptr) plan = opts_.sync->Plan();
  std::lock_guard lk(mu_);
  ShipperStats s = stats_;
  s.paused = paused_;
  s.pending_bytes = backlog.pending_bytes;
  s.oldest_unapplied_change_unix_nanos = backlog.oldest_unapplied_change_unix_nanos;
  s.throughput_bytes_per_s = meter_.Rate(Clock::now());
  s.sync = sync_progress_;
  s.sync.rate_bytes_per_s = sync_progress_.active ? sync_meter_.Rate(Clock::now()) : 0;
  if (plan && (!s.sync.active || s.sync.sync_id != plan->sync_id)) {
    s.sync = SyncProgress{};
    s.sync.active = true;
    s.sync.sync_id = plan->sync_id;
    s.sync.kind = plan->kind;
    for (size_t i = 0; i < plan->disks.size(); ++i) {
      // A copy scans the whole disk; a comparison its ranges (bytes_total).
      const applier::SyncDiskPlan& d = plan->disks[i];
      s.sync.bytes_total += d.mode == applier::SyncMode::kCopy && i < opts_.definition.disks.size()
                                ? opts_.definition.disks[i].size
                                : d.bytes_total;
    }
    s.sync.disk_done.assign(plan->disks.size(), 0);
  } else if (!plan) {
    s.sync.active = false;
  }
  return s;
}

// ---------------------------------------------------------------------------------------
// Connection

Status Shipper::Impl::Connection::Run() {
  if (Status s = RunSyncIfDue(); !s.ok()) {
    if (!impl_.stopping_) return s;
  }
  while (!impl_.stopping_) {
    SR_RETURN_IF_ERROR(Service(Clock::now()));
    if (!impl_.paused_ && sent_through_ - acked_ < opts_.window_cycles) {
      if (std::optional<CycleBatch> next = NextCycle()) {
        Status s = SendCycle(*next);
        if (!s.ok() && !impl_.stopping_) return s;
        continue;  // stopping mid-cycle still says goodbye below
      }
    }
    // Nothing to send (or the window is full): wait for an ack, a sealed cycle, Resume or
    // the next heartbeat.
    SR_RETURN_IF_ERROR(Service(last_heartbeat_ + opts_.heartbeat));
  }
  // Best effort: the peer learns this is a goodbye, not a failure.
  const std::vector<std::byte> bye = EncodeError(ErrorFrame{0, "shipper stopping"});
  (void)stream_.WriteAll(EncodeFrame(FrameType::kError, bye), Clock::now() + milliseconds(200));
  return Status::Error(ECANCELED, "stopping");
}

Status Shipper::Impl::Connection::Service(Clock::time_point until) {
  while (true) {
    bool handled = false;
    while (stream_.WaitReadable(Clock::now())) {
      SR_RETURN_IF_ERROR(HandleFrame());
      handled = true;
    }
    auto now = Clock::now();
    if (now - last_contact_ > opts_.io_timeout) {
      return Status::Error(ETIMEDOUT, "no frame from " + opts_.peer + " for " +
                                          std::to_string(opts_.io_timeout.count()) + " ms");
    }
    if (now - last_heartbeat_ >= opts_.heartbeat) {
      SR_RETURN_IF_ERROR(SendHeartbeat());
      now = Clock::now();
    }
    // A frame may have opened the window: the caller looks again.
    if (now >= until || impl_.stopping_ || handled) return Status::Ok();
    const auto wake_at =
        std::min({until, last_heartbeat_ + opts_.heartbeat, last_contact_ + opts_.io_timeout});
    const auto ms = std::max<int64_t>(0, std::chrono::ceil<milliseconds>(wake_at - now).count());
    pollfd p[2] = {{impl_.waker_->fd.get(), POLLIN, 0}, {stream_.fd(), POLLIN, 0}};
    const int n = ::poll(p, 2, static_cast<int>(std::min<int64_t>(ms, 60000)));
    if (n < 0 && errno != EINTR) return Status::FromErrno(errno, "poll");
    if (n > 0 && (p[0].revents & POLLIN) != 0) {
      impl_.waker_->Drain();
      return Status::Ok();  // something changed: the caller looks again
    }
    if (n > 0 && p[1].revents != 0) {
      // Socket bytes that are not (yet) a whole application record, such as a TLS session
      // ticket or half a record, are absorbed here instead of spinning on poll.
      (void)stream_.WaitReadable(std::min(until, Clock::now() + milliseconds(20)));
    }
  }
}

Status Shipper::Impl::Connection::HandleFrame() {
  const Deadline deadline = IoDeadline();
  SR_ASSIGN_OR_RETURN(
      FrameHeader header,
      ReadFrame([&](std::span<std::byte> out) { return stream_.ReadExact(out, deadline); }, &in_));
  SR_RETURN_IF_ERROR(VerifyFrame(header, in_));
  last_contact_ = Clock::now();
  {
    std::lock_guard lk(impl_.mu_);
    impl_.stats_.last_contact_unix_nanos = NowUnixNanos();
  }
  switch (header.type) {
    case FrameType::kAck: {
      SR_ASSIGN_OR_RETURN(Ack ack, DecodeAck(in_));
      return HandleAck(ack);
    }
    case FrameType::kSyncReply:
    case FrameType::kHashReply:
    case FrameType::kSyncAck:
      return HandleSyncFrame(header.type);
    case FrameType::kError: {
      SR_ASSIGN_OR_RETURN(ErrorFrame e, DecodeError(in_));
      return Status::Error(e.code != 0 ? static_cast<int>(e.code) : ECONNRESET,
                           opts_.peer + " closed the connection: " + e.reason);
    }
    default:
      return Status::Error(EPROTO, opts_.peer + " sent an unexpected " +
                                       std::string(FrameTypeName(header.type)) + " frame");
  }
}

Status Shipper::Impl::Connection::HandleAck(const Ack& ack) {
  if (sync_end_pending_ != 0) {
    // While a sync runs, Acks answer heartbeats with the replica's old position; only the
    // one that confirms SyncEnd moves anything.
    if (ack.received_cycle == sync_end_pending_ && ack.applied_cycle == sync_end_pending_) {
      sync_end_acked_ = true;
      acked_ = sent_through_ = sync_end_pending_;
      sync_end_pending_ = 0;
      std::lock_guard lk(impl_.mu_);
      ShipperStats& s = impl_.stats_;
      s.acked_cycle = s.sent_cycle = acked_;
      s.applied_cycle = ack.applied_cycle;
      s.applied_cut_unix_nanos = ack.applied_cut_unix_nanos;
      s.peer_apply_error = ack.apply_error;
      impl_.unapplied_.erase(impl_.unapplied_.begin(),
                             impl_.unapplied_.upper_bound(ack.applied_cycle));
    }
    return Status::Ok();
  }
  if (sync_reply_ && !sync_end_acked_) return Status::Ok();  // sync under way
  if (ack.received_cycle > sent_through_ || ack.received_cycle < acked_) {
    return Status::Error(EPROTO, opts_.peer + " acknowledged cycle " +
                                     std::to_string(ack.received_cycle) + ", but cycles " +
                                     std::to_string(acked_) + ".." + std::to_string(sent_through_) +
                                     " are in flight");
  }
  if (ack.received_cycle > acked_) {
    acked_ = ack.received_cycle;
    Status released = opts_.source->ReleaseThrough(acked_);
    if (!released.ok()) {
      spdlog::warn("VM {}: releasing segments through cycle {}: {}", opts_.definition.vm, acked_,
                   released.ToString());
    }
  }
  std::lock_guard lk(impl_.mu_);
  ShipperStats& s = impl_.stats_;
  s.acked_cycle = acked_;
  s.applied_cycle = ack.applied_cycle;
  s.applied_cut_unix_nanos = ack.applied_cut_unix_nanos;
  s.peer_apply_error = ack.apply_error;
  impl_.unapplied_.erase(impl_.unapplied_.begin(), impl_.unapplied_.upper_bound(ack.applied_cycle));
  return Status::Ok();
}

Status Shipper::Impl::Connection::SendFrame(FrameType type, std::span<const std::byte> payload) {
  return SendEncoded(EncodeFrame(type, payload));
}

Status Shipper::Impl::Connection::SendEncoded(std::span<const std::byte> frame) {
  SR_RETURN_IF_ERROR(stream_.WriteAll(frame, IoDeadline()));
  std::lock_guard lk(impl_.mu_);
  impl_.meter_.Add(frame.size(), Clock::now());
  return Status::Ok();
}

Status Shipper::Impl::Connection::SendHeartbeat() {
  const Backlog backlog = impl_.ComputeBacklog();
  Heartbeat hb;
  hb.unix_nanos = NowUnixNanos();
  hb.oldest_unapplied_change_unix_nanos = backlog.oldest_unapplied_change_unix_nanos;
  hb.pending_bytes = backlog.pending_bytes;
  last_heartbeat_ = Clock::now();
  return SendFrame(FrameType::kHeartbeat, EncodeHeartbeat(hb));
}

std::optional<CycleBatch> Shipper::Impl::Connection::NextCycle() {
  std::vector<tracker::SealedSegment> all = opts_.source->SealedSegments();
  std::optional<CycleBatch> batch;
  bool later_cycle_sealed = false;
  for (tracker::SealedSegment& seg : all) {
    if (seg.cycle <= sent_through_) continue;
    if (!batch) {
      batch.emplace();
      batch->cycle = seg.cycle;
      batch->cut_unix_nanos = seg.cut_unix_nanos;
      batch->first_change_unix_nanos = seg.first_change_unix_nanos;
    }
    if (seg.cycle != batch->cycle) {
      later_cycle_sealed = true;
      break;
    }
    batch->segments.push_back(std::move(seg));
  }
  if (!batch) return std::nullopt;
  // Each disk's segment is sealed by its own sealer thread, so right after a cut a listing
  // may hold some disks of the newest cycle but not yet the others. The cycle is complete
  // when the tracker has reported it sealed, a later cycle exists (the tracker cuts cycle
  // C+1 only after every segment of C is sealed), or every disk of the VM is there.
  const bool complete = batch->cycle <= impl_.waker_->sealed_through.load() || later_cycle_sealed ||
                        batch->segments.size() >= opts_.definition.disks.size();
  if (!complete) return std::nullopt;
  return batch;
}

Status Shipper::Impl::Connection::SendCycle(const CycleBatch& batch) {
  for (const tracker::SealedSegment& seg : batch.segments) SR_RETURN_IF_ERROR(SendSegment(seg));
  applier::CycleInfo info;
  info.cycle = batch.cycle;
  info.cut_unix_nanos = batch.cut_unix_nanos;
  info.first_change_unix_nanos = batch.first_change_unix_nanos;
  SR_RETURN_IF_ERROR(SendFrame(FrameType::kCycleEnd, EncodeCycleEnd(info)));
  sent_through_ = batch.cycle;
  std::lock_guard lk(impl_.mu_);
  impl_.stats_.sent_cycle = sent_through_;
  if (batch.first_change_unix_nanos > 0) {
    impl_.unapplied_[batch.cycle] = batch.first_change_unix_nanos;
  }
  return Status::Ok();
}

Status Shipper::Impl::Connection::SendSegment(const tracker::SealedSegment& seg) {
  // The tracker reads the segment as it is sent (from the cut's blocks, or an older
  // version's file), each record checked as it is made.
  Result<std::unique_ptr<tracker::SegmentStream>> opened = opts_.source->OpenSegment(seg);
  if (!opened.ok()) {
    return opened.status().WithContext("VM " + opts_.definition.vm + " disk " + seg.disk +
                                       " cycle " + std::to_string(seg.cycle));
  }
  tracker::SegmentStream& stream = **opened;
  uint64_t offset = 0;
  bool last = false;
  do {
    // Pausing holds the cycle where it is; it continues from here on Resume.
    while (impl_.paused_ && !impl_.stopping_) {
      SR_RETURN_IF_ERROR(Service(last_heartbeat_ + opts_.heartbeat));
    }
    if (impl_.stopping_) return Status::Error(ECANCELED, "stopping");
    // The chunk's bytes go straight into the frame, after room for its headers.
    frame_.resize(kSegmentChunkPrefix);
    while (frame_.size() - kSegmentChunkPrefix < kMaxChunkRaw && !stream.done()) {
      Result<std::span<const std::byte>> bytes =
          stream.Next(kMaxChunkRaw - (frame_.size() - kSegmentChunkPrefix));
      if (!bytes.ok()) {
        return bytes.status().WithContext("VM " + opts_.definition.vm + " disk " + seg.disk +
                                          " cycle " + std::to_string(seg.cycle));
      }
      frame_.insert(frame_.end(), bytes->begin(), bytes->end());
    }
    last = stream.done();
    const uint32_t n = static_cast<uint32_t>(frame_.size() - kSegmentChunkPrefix);
    if (n == 0) {
      return Status::Error(EIO, "VM " + opts_.definition.vm + " disk " + seg.disk + ": segment " +
                                    std::to_string(seg.number) + " is empty");
    }
    SegmentChunk chunk;
    chunk.disk_id = seg.disk_id;
    chunk.segment = seg.number;
    chunk.cycle = seg.cycle;
    chunk.offset = offset;
    chunk.raw_length = n;
    chunk.flags = last ? kChunkLast : 0;
    if (opts_.compress &&
        impl_.compressor_.Compress(std::span(frame_).subspan(kSegmentChunkPrefix), &packed_)) {
      chunk.flags |= kChunkZstd;
      frame_.resize(kSegmentChunkPrefix);
      frame_.insert(frame_.end(), packed_.begin(), packed_.end());
    }
    const uint64_t wire = frame_.size() - kSegmentChunkPrefix;
    SealSegmentChunkFrame(chunk, frame_);
    SR_RETURN_IF_ERROR(Throttle(frame_.size()));
    SR_RETURN_IF_ERROR(SendEncoded(frame_));
    {
      std::lock_guard lk(impl_.mu_);
      impl_.stats_.bytes_raw += n;
      impl_.stats_.bytes_wire += wire;
    }
    if (failpoint::Check("shipper.after_send") == failpoint::Action::kError) {
      return Status::Error(EIO, "failpoint shipper.after_send");
    }
    offset += n;
    SR_RETURN_IF_ERROR(Service(Clock::now()));  // acks and heartbeats between chunks
  } while (!last);
  return Status::Ok();
}

Status Shipper::Impl::Connection::Throttle(uint64_t bytes) {
  const auto wait = bucket_.Take(bytes, Clock::now());
  if (wait.count() <= 0) return Status::Ok();
  const auto until = Clock::now() + wait;
  while (Clock::now() < until) {
    if (impl_.stopping_) return Status::Error(ECANCELED, "stopping");
    SR_RETURN_IF_ERROR(Service(until));
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------

Shipper::Shipper(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Shipper::~Shipper() { Stop(); }

Result<std::unique_ptr<Shipper>> Shipper::Start(ShipperOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  SR_RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<Shipper>(new Shipper(std::move(impl)));
}

void Shipper::Stop() { impl_->Stop(); }
void Shipper::Pause() { impl_->Pause(); }
void Shipper::Resume() { impl_->Resume(); }
ShipperStats Shipper::Stats() const { return impl_->Stats(); }

}  // namespace siterep::shipper
