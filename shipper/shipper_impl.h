// Private to the shipper: Shipper::Impl and its Connection, shared by shipper.cc (segments,
// connection set-up) and sync_sender.cc (the sync phase). Not for other parts.
#pragma once

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "shipper/rate_limiter.h"
#include "shipper/shipper.h"
#include "shipper/wire_format.h"

namespace siterep::shipper {
namespace detail {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// What the tracker's sealed callback may touch. Shared with the callback, which the tracker
// may still be running (it calls a copy outside its lock) after Stop cleared it, so the
// Shipper itself must not be captured.
struct Waker {
  UniqueFd fd;                              // eventfd: written to wake the shipper's thread
  std::atomic<uint64_t> sealed_through{0};  // highest cycle the tracker reported sealed

  void Wake() const {
    const uint64_t one = 1;
    // Non-blocking; a full counter (never in practice) already means "wake up".
    [[maybe_unused]] ssize_t n = ::write(fd.get(), &one, sizeof(one));
  }
  void Drain() const {
    uint64_t value;
    [[maybe_unused]] ssize_t n = ::read(fd.get(), &value, sizeof(value));
  }
};

// A TLS failure that means "the peer does not accept us" rather than "cannot reach it".
inline bool IsTlsRefusal(const Status& s) {
  switch (s.code()) {
    case EACCES:
    case EPERM:
    case EPROTO:
    case EKEYREJECTED:
    case EKEYEXPIRED:
    case EKEYREVOKED:
      return true;
    default:
      return false;
  }
}

// One cycle ready to go: every disk's sealed segment of it.
struct CycleBatch {
  uint64_t cycle = 0;
  int64_t cut_unix_nanos = 0;
  int64_t first_change_unix_nanos = 0;
  std::vector<tracker::SealedSegment> segments;
};

}  // namespace detail

using detail::Clock;
using detail::CycleBatch;
using detail::Waker;
using std::chrono::milliseconds;

class Shipper::Impl {
 public:
  explicit Impl(ShipperOptions options) : opts_(std::move(options)) {}
  ~Impl() { Stop(); }

  Status Init();
  void Stop();
  void Pause() {
    paused_ = true;
    waker_->Wake();
  }
  void Resume() {
    paused_ = false;
    waker_->Wake();
  }
  ShipperStats Stats() const;

 private:
  class Connection;
  friend class Connection;

  struct Backlog {
    int64_t oldest_unapplied_change_unix_nanos = 0;
    uint64_t pending_bytes = 0;
  };

  void Run();
  // Connects, says Hello, and ships until an error or Stop. *accepted tells whether the
  // peer accepted the Hello (the backoff then starts again from min_backoff).
  Status RunConnection(bool* accepted);
  // Waits until `until` or Stop.
  void Sleep(Clock::time_point until) const;
  // Backlog for RPO and pending bytes, from the source and what the replica told us.
  Backlog ComputeBacklog() const;
  void SetError(const Status& s, bool refused, std::string refusal = "",
                std::string refusal_message = "");

  const ShipperOptions opts_;
  std::shared_ptr<Waker> waker_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> paused_{false};
  std::thread thread_;
  ChunkCompressor compressor_;  // used only by thread_

  // Protects the stream pointer, so Stop can cancel a connection that is blocked in I/O.
  std::mutex stream_mu_;
  TlsStream* stream_ = nullptr;
  bool finished_ = false;  // the thread is done (guarded by stream_mu_)
  std::condition_variable finished_cv_;

  // Protects stats_, meter_ and unapplied_; a leaf (nothing is called with it held).
  mutable std::mutex mu_;
  ShipperStats stats_;
  ThroughputMeter meter_;
  // First-change time of each cycle sent but not yet applied on the replica: after the ack
  // the source no longer has its segments, but the cycle still counts for the RPO.
  std::map<uint64_t, int64_t> unapplied_;
  // The running sync's progress (sync_sender.cc), and its scan rate.
  SyncProgress sync_progress_;
  ThroughputMeter sync_meter_;
};

// One accepted connection: the state of the conversation. Lives on the thread's stack.
class Shipper::Impl::Connection {
 public:
  Connection(Impl& impl, TlsStream& stream, const applier::ReplicaPosition& position)
      : impl_(impl),
        opts_(impl.opts_),
        stream_(stream),
        bucket_(impl.opts_.bandwidth_limit),
        acked_(position.received_cycle),
        sent_through_(position.received_cycle) {
    last_contact_ = Clock::now();
    last_heartbeat_ = Clock::time_point();  // send one at once
  }

  // Ships until an error or Stop (then says goodbye and returns ECANCELED).
  Status Run();

 private:
  // Reads every frame the peer has sent, sends a heartbeat when one is due, and checks the
  // peer is alive; then waits until `until` for a frame or a wake-up (returning early on
  // either). until <= now: does not wait.
  Status Service(Clock::time_point until);
  Status HandleFrame();
  Status HandleAck(const Ack& ack);
  Status SendHeartbeat();
  Status SendFrame(FrameType type, std::span<const std::byte> payload);
  // Sends a frame already encoded (a SegmentChunk made in place) and counts its bytes.
  Status SendEncoded(std::span<const std::byte> frame);
  // The lowest cycle above sent_through_ whose segments are all sealed, if any.
  std::optional<CycleBatch> NextCycle();
  Status SendCycle(const CycleBatch& batch);
  Status SendSegment(const tracker::SealedSegment& seg);
  // Waits for the bandwidth limit to allow `bytes`, serving the connection meanwhile.
  Status Throttle(uint64_t bytes);
  Deadline IoDeadline() const { return Clock::now() + opts_.io_timeout; }

  // --- The sync phase (sync_sender.cc) -------------------------------------------------
  // Runs the sync the SyncSource has due, if any, before any segment: SyncBegin, every
  // disk in turn, SyncEnd, and Finished once the replica acknowledged it.
  Status RunSyncIfDue();
  Status RunSync(const applier::SyncPlan& plan);
  Status SyncDisk(size_t disk, const applier::SyncDiskPlan& plan,
                  const applier::SyncDiskResume& resume);
  // Copies [from, to): data ranges block by block (zero blocks as zero extents), holes as
  // zero extents.
  Status CopyRange(size_t disk, uint64_t from, uint64_t to);
  // Hash-compares [from, to) with the replica (several requests in flight) and sends the
  // blocks that differ.
  Status CompareRange(size_t disk, uint64_t from, uint64_t to);
  // Sends data (block-aligned at offset) as zero extents and data frames, block by block.
  Status SendBlocks(size_t disk, uint64_t offset, std::span<const std::byte> data);
  // Queues a zero extent (merged with the queued one when adjacent).
  Status SendZeros(size_t disk, uint64_t offset, uint64_t length);
  Status FlushZeros();
  Status SendSyncData(size_t disk, uint64_t offset, std::span<const std::byte> data,
                      uint64_t zero_length, uint64_t done_to);
  // Waits for the peer (serving the connection) until ready() or an error / Stop.
  Status WaitFor(const std::function<bool()>& ready, const char* what);
  void NoteScanned(size_t disk, uint64_t position);
  Status HandleSyncFrame(FrameType type);
  std::optional<size_t> DiskIndexOf(uint32_t disk_id) const;

  std::optional<SyncReply> sync_reply_;
  std::deque<HashReply> hash_replies_;
  uint64_t sync_end_pending_ = 0;  // SyncEnd sent for this sync_id; its Ack not yet here
  bool sync_end_acked_ = false;
  std::vector<std::vector<tracker::ByteRange>> scan_ranges_;  // per disk: what the sync scans
  struct PendingZeros {
    size_t disk = 0;
    uint64_t offset = 0;
    uint64_t length = 0;
  };
  std::optional<PendingZeros> zeros_;
  std::vector<std::byte> block_buf_;  // a hash batch or a copy chunk, as read

  Impl& impl_;
  const ShipperOptions& opts_;
  TlsStream& stream_;
  TokenBucket bucket_;
  uint64_t acked_;         // the replica holds every cycle through this one durably
  uint64_t sent_through_;  // CycleEnd sent for every cycle through this one
  Clock::time_point last_contact_;
  Clock::time_point last_heartbeat_;
  std::vector<std::byte> in_;  // payload of the frame being read
  std::vector<std::byte> frame_;   // the SegmentChunk frame being made (reused)
  std::vector<std::byte> packed_;  // its data compressed
};

}  // namespace siterep::shipper
