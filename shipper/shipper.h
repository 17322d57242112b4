// Shipper: the sending end of the replication link, one per replicated VM on the primary.
//
// control/ starts one Shipper per VM that is primary here and has a peer. It reads the VM's
// sealed segments from a tracker::SegmentSource as it sends them (the tracker makes each
// from the cut's blocks, every record with its CRC32C), in chunks of at most kMaxChunkRaw,
// cycle by cycle, to the peer's Receiver over TLS (wire format: shipper/wire_format.h).
// When the peer acknowledges a cycle (it is durable on the replica), the shipper releases
// the segments through that cycle, so the tracker forgets the cuts.
//
// Errors reading a segment (the blocks cannot be read, the cut was dropped by a fall back
// to the bitmap) end the connection with that error, which Stats().last_error shows; the
// cycle is sent again from its start after the reconnect.
//
// Delivery: the peer's HelloReply says which cycle it has received; the shipper resumes
// after it. Every cycle is sent whole (every disk's segment from offset 0, then CycleEnd),
// so after any failure (I/O error, timeout, peer Error frame, bad CRC) the shipper closes
// the connection, waits (backoff doubling from min_backoff to max_backoff, reset by an
// accepted Hello), reconnects and resends the partly sent cycle from its start: no gap and
// no duplicate committed cycle. A refusal by the peer (wrong epoch, unknown site, definition
// mismatch...) is recorded in Stats() (refused, refusal, refusal_message, last_error) and
// retried after max_backoff; nothing but Hello goes to a peer that has not accepted it.
//
// Failpoints: "shipper.after_send" (error: the connection fails right after a chunk was
// sent, as a broken link would).
//
// Threads: one thread per Shipper owns the connection (a TLS stream is not shared); the
// public methods may be called from any thread. The source's sealed callback only pokes an
// eventfd, so it never blocks the tracker.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "applier/segment_sink.h"
#include "common/status.h"
#include "shipper/tls.h"
#include "tracker/vm_tracker.h"
#include "tracker/segment_source.h"

namespace siterep::shipper {

// What the shipper needs to run a sync (applier/segment_sink.h): control/ implements it
// over the VM's tracker snapshot (tracker/vm_tracker.h). Called from the shipper's
// thread; Plan() also from Stats().
class SyncSource {
 public:
  virtual ~SyncSource() = default;
  // The sync to run before any segment, if one is due. The plan stays the same until
  // Finished (or until control/ replaces the shipper).
  virtual std::optional<applier::SyncPlan> Plan() = 0;
  // For a kCompare disk: the ranges to compare (kSyncBlockSize-aligned, sorted).
  virtual std::vector<tracker::ByteRange> CompareRanges(size_t disk) = 0;
  // The disk's content as of the sync's cut.
  virtual Status Read(size_t disk, uint64_t offset, std::span<std::byte> out) = 0;
  // Ranges of [from, to) that may hold data as of the cut (others read as zeros).
  virtual Result<std::vector<tracker::ByteRange>> DataRanges(size_t disk, uint64_t from,
                                                             uint64_t to) = 0;
  // The replica holds the disk durably below offset.
  virtual void Copied(size_t disk, uint64_t offset) = 0;
  // The replica ended the sync: the snapshot may go, and segments through sync_id (the
  // snapshot holds them) are released.
  virtual Status Finished(uint64_t sync_id) = 0;
};

// A sync's plan and, per disk, the ranges it scans, made from a tracker snapshot.
struct SyncJob {
  applier::SyncPlan plan;
  std::vector<std::vector<tracker::ByteRange>> ranges;  // per disk, in the plan's order
};
// kInitial copies whole disks; kSeeded compares whole disks; kResync compares each disk's
// dirty ranges (every block when full or when the disk's dirty set is unknown).
// image_fds[i]: the image of disk i, whose allocated bytes are what a copy needs at the
// replica (a disk's size when unknown or -1).
SyncJob PlanSync(const tracker::SnapshotInfo& snapshot, applier::SyncKind kind, bool full,
                 uint64_t epoch, std::span<const int> image_fds);

struct ShipperOptions {
  std::string site;          // our site name
  std::string peer;          // peer site name; its certificate must name it
  std::string peer_address;  // host:port
  std::shared_ptr<const TlsContext> tls;
  applier::ReplicaDefinition definition;     // sent in Hello (vm, primary_site, epoch, disks)
  tracker::SegmentSource* source = nullptr;  // outlives the Shipper
  SyncSource* sync = nullptr;                // outlives the Shipper; null: never syncs
  uint64_t bandwidth_limit = 0;              // bytes/s on the wire, 0 = unlimited
  bool compress = true;                      // zstd level 1 per chunk
  // The tracker's open (not yet cut) cycle: time of its first change, 0 if none. For RPO.
  // Called from the shipper's thread and from Stats(); must be thread-safe and not block.
  std::function<int64_t()> open_cycle_first_change;
  std::chrono::milliseconds heartbeat{1000};
  std::chrono::milliseconds io_timeout{15000};  // no progress / no frame this long: reconnect
  std::chrono::milliseconds min_backoff{200};
  std::chrono::milliseconds max_backoff{10000};
  size_t window_cycles = 8;  // cycles sent ahead of acknowledgements
};

struct SyncProgress {
  bool active = false;  // a sync is due or running
  uint64_t sync_id = 0;
  applier::SyncKind kind = applier::SyncKind::kInitial;
  uint64_t bytes_total = 0;  // bytes to scan, every disk
  uint64_t bytes_done = 0;   // bytes the replica holds durably (its done offsets)
  uint64_t bytes_scanned = 0;  // bytes read and sent or found equal on this connection
  uint64_t bytes_data = 0;   // data bytes sent (raw), this sync
  uint64_t bytes_wire = 0;   // sync bytes on the wire (data after compression + hashes)
  double rate_bytes_per_s = 0;  // scan rate over the last few seconds
  std::vector<uint64_t> disk_done;  // per disk: durable done offset
};

struct ShipperStats {
  bool connected = false;
  bool paused = false;
  bool refused = false;        // the peer refused us (TLS, epoch, definition): not just unreachable
  // The peer's refusal name (wire_format.h RefusalName: "epoch_older", ...) and its message,
  // when a HelloReply or SyncReply refused us; empty for a TLS refusal. Set as soon as the
  // refusal arrives and kept until a Hello is accepted or a later attempt fails otherwise.
  std::string refusal;
  std::string refusal_message;
  std::string last_error;      // why the last connection failed / was refused; "" when fine
  uint64_t sent_cycle = 0;     // last cycle whose CycleEnd went out on this connection
  uint64_t acked_cycle = 0;    // last cycle the replica holds durably (released here)
  uint64_t applied_cycle = 0;  // last cycle applied on the replica
  int64_t applied_cut_unix_nanos = 0;
  // Oldest first-change time over every cycle not yet applied on the replica (sent or not,
  // and the open cycle): RPO = now - this; 0 = everything applied.
  int64_t oldest_unapplied_change_unix_nanos = 0;
  uint64_t pending_bytes = 0;           // sealed bytes not yet acknowledged
  uint64_t bytes_raw = 0;               // segment bytes sent, before compression (total)
  uint64_t bytes_wire = 0;              // segment bytes sent, after compression (total)
  double throughput_bytes_per_s = 0;    // wire bytes/s over the last few seconds
  std::string peer_apply_error;         // the replica's apply error from the last Ack
  int64_t last_contact_unix_nanos = 0;  // last frame from the peer
  uint64_t connects = 0;                // accepted Hellos
  SyncProgress sync;
};

class Shipper {
 public:
  // Checks the options (source, tls, names, definition.vm) and starts the thread, which
  // connects in the background: an unreachable peer is not an error here (see Stats()).
  static Result<std::unique_ptr<Shipper>> Start(ShipperOptions options);
  ~Shipper();  // Stop()
  Shipper(const Shipper&) = delete;
  Shipper& operator=(const Shipper&) = delete;

  // Idempotent; wakes everything, says goodbye to the peer if connected, joins the thread
  // and clears the source's sealed callback. A TLS connect in progress is not interruptible
  // and may delay Stop by up to io_timeout.
  void Stop();
  // Stops sending segments (heartbeats continue; the connection stays up). A cycle being
  // sent is paused between chunks and continues on Resume.
  void Pause();
  void Resume();
  ShipperStats Stats() const;

  class Impl;

 private:
  explicit Shipper(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace siterep::shipper
