// Verification: `siterep verify VM`, run at the VM's primary, compares the 64 KiB block
// hashes of every disk with the replica's and reports the ranges that differ; and the peer
// requests that serve it at the replica.
//
// One consistent point while the guest writes on: a tracker snapshot at the primary cuts
// cycle C and keeps each disk's content as of C readable (ReadSnapshot). The replica is
// asked for the hashes of its recovery point C, disk by disk, kBlocksPerRequest blocks a
// request; the primary hashes the same blocks from the snapshot meanwhile and compares.
//
// Peer requests (replica side, HandleVerifyPeer):
//   verify-hashes {vm, disk, point: C, offset, count[, wait_ms]}
//     -> {point, disk, size, offset, hashes: [XXH3-64 of each block]}
//     The first request of a verification carries wait_ms: the replica waits that long at
//     most until it has applied C, then opens a view of point C (PointView pins it, so it
//     stays readable while the applier moves on) and keeps it for the next requests, until
//     verify-end or kPinIdle without a request. Refusals: "not-applied" (C not applied in
//     time), "point-gone" (the replica moved past C before the view was opened and keeps
//     no retained point C: the primary retries once from a new snapshot), "sync-running",
//     "not-a-replica", "wrong-peer", "bad-request", "read-failed".
//   verify-end {vm, point} -> {released}: lets the pinned point go.
// The replica reads 1 MiB at a time and keeps nothing but the view between requests.
//
// Hashes are the resync's (common/block_hash.h): XXH3-64 over each kSyncBlockSize block,
// the last block of a disk over its bytes within the disk; holes read as zeros, so they
// hash like zero data on either side.
//
// Threads: Verify runs on a control-socket thread holding the slot's op_mu (no role change,
// which would close the tracker, runs meanwhile); HandleVerifyPeer on a receiver connection
// thread; the pins' reaper on its own thread.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <condition_variable>
#include <future>
#include <map>
#include <set>
#include <thread>

#include "common/block_hash.h"
#include "common/time_util.h"
#include "control/daemon.h"
#include "shipper/peer_call.h"

namespace siterep::control {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint64_t kBlock = tracker::kSnapshotBlockSize;
static_assert(kBlock == applier::kSyncBlockSize, "verify hashes the blocks a resync compares");
constexpr uint64_t kBlocksPerRequest = 1024;        // 64 MiB of disk per verify-hashes
constexpr uint64_t kReadChunk = uint64_t{1} << 20;  // each side reads 1 MiB at a time
static_assert(kReadChunk % kBlock == 0);
// How long the replica may take to apply the snapshot's cycle.
constexpr auto kApplyTimeout = std::chrono::seconds(60);
// One request's hashing at the replica (64 MiB), beyond any wait.
constexpr auto kHashTimeout = std::chrono::seconds(60);
constexpr auto kMaxWait = std::chrono::seconds(120);  // the most a request may ask to wait
// A pinned point nobody asked about for this long is let go (the primary died mid-way).
constexpr auto kPinIdle = std::chrono::seconds(30);
constexpr size_t kMaxRangesListed = 100;



// XXH3-64 of the blocks [offset, offset + count * kBlock) of a disk of size bytes (blocks
// past the end are not hashed; the last one over its bytes within the disk), read through
// read(at, out) 1 MiB at a time. offset is block-aligned and below size.
template <typename Read>
Result<std::vector<uint64_t>> HashBlocks(uint64_t size, uint64_t offset, uint64_t count,
                                         Read&& read) {
  const uint64_t end = std::min(size, offset + count * kBlock);
  std::vector<uint64_t> hashes;
  hashes.reserve((end - offset + kBlock - 1) / kBlock);
  std::vector<std::byte> buf(std::min(kReadChunk, end - offset));
  for (uint64_t at = offset; at < end;) {
    const uint64_t n = std::min(kReadChunk, end - at);
    std::span<std::byte> chunk(buf.data(), n);
    SR_RETURN_IF_ERROR(read(at, chunk));
    AppendBlockHashes(chunk, kBlock, &hashes);
    at += n;
  }
  return hashes;
}

// XXH3-64 of a block of zeros of length bytes (at most kBlock): a hole hashes like zeros.
uint64_t ZeroBlockHash(uint64_t length) {
  static const std::vector<std::byte> zeros(kBlock);
  static const uint64_t full = BlockHash(zeros);
  return length == kBlock ? full : BlockHash(std::span(zeros).first(length));
}

// HashBlocks over the tracker's snapshot of disk: only the ranges that may hold data as of
// the cut are read; the rest reads as zeros (SnapshotDataRanges), so a sparse disk costs
// the primary no reads of its holes.
Result<std::vector<uint64_t>> HashSnapshotBlocks(tracker::VmTracker& tracker, size_t disk,
                                                 uint64_t size, uint64_t offset, uint64_t count) {
  const uint64_t end = std::min(size, offset + count * kBlock);
  SR_ASSIGN_OR_RETURN(std::vector<tracker::ByteRange> data,
                      tracker.SnapshotDataRanges(disk, offset, end));
  auto read = [&](uint64_t at, std::span<std::byte> out) {
    return tracker.ReadSnapshot(disk, at, out);
  };
  std::vector<uint64_t> hashes;
  hashes.reserve((end - offset + kBlock - 1) / kBlock);
  uint64_t at = offset;  // block-aligned: the ranges are widened to whole blocks
  auto zeros_to = [&](uint64_t stop) {
    for (; at < stop; at += kBlock) hashes.push_back(ZeroBlockHash(std::min(kBlock, size - at)));
  };
  for (const tracker::ByteRange& r : data) {
    zeros_to(r.offset);
    const uint64_t blocks = (r.length + kBlock - 1) / kBlock;
    SR_ASSIGN_OR_RETURN(std::vector<uint64_t> h, HashBlocks(size, r.offset, blocks, read));
    hashes.insert(hashes.end(), h.begin(), h.end());
    at = r.offset + blocks * kBlock;
  }
  zeros_to(end);
  return hashes;
}

// The differing blocks of one disk, as merged ranges; the first kMaxRangesListed are kept.
class DiskDiff {
 public:
  DiskDiff(std::string name, uint64_t size) : name_(std::move(name)), size_(size) {}

  void Add(uint64_t offset, uint64_t length) {
    ++blocks_;
    if (ranges_ > 0 && last_end_ == offset) {
      if (ranges_ <= kMaxRangesListed) listed_.back().length += length;
    } else {
      ++ranges_;
      if (listed_.size() < kMaxRangesListed) listed_.push_back({offset, length});
    }
    last_end_ = offset + length;
  }
  uint64_t differing_blocks() const { return blocks_; }

  json ToJson() const {
    json ranges = json::array();
    for (const tracker::ByteRange& r : listed_) {
      ranges.push_back({{"offset", r.offset}, {"length", r.length}});
    }
    return {{"name", name_},
            {"size", size_},
            {"blocks", (size_ + kBlock - 1) / kBlock},
            {"block_size", kBlock},
            {"differing_blocks", blocks_},
            {"range_count", ranges_},
            {"ranges", std::move(ranges)}};
  }

 private:
  std::string name_;
  uint64_t size_;
  uint64_t blocks_ = 0;
  uint64_t ranges_ = 0;
  uint64_t last_end_ = 0;
  std::vector<tracker::ByteRange> listed_;
};

// What one verification at one snapshot needs from the daemon.
struct VerifyContext {
  std::string vm;
  std::string site;
  std::string peer;
  tracker::VmTracker* tracker = nullptr;
  std::function<Result<json>(const json& request, std::chrono::milliseconds timeout)> call;
  std::function<bool()> stopping;
};

// Takes a snapshot, compares every disk at its cycle and ends the snapshot. The reply
// (Ok or Refused); *point_gone when the replica lost the cycle before it could hold it.
json VerifyAtSnapshot(const VerifyContext& c, bool* point_gone) {
  Result<tracker::SnapshotInfo> info = c.tracker->StartSnapshot();
  if (!info.ok()) {
    if (info.status().code() == EBUSY) {
      return Refused("sync-running", "the change tracker's snapshot of VM " + c.vm +
                                         " is in use (a sync to " + c.peer +
                                         " or a role change started); verify when it is done");
    }
    return Refused("verify-failed", "snapshot of VM " + c.vm + ": " + info.status().ToString());
  }
  // Ended on every path: verify only reads, so it never completes a resync.
  struct SnapshotEnder {
    tracker::VmTracker* tracker;
    ~SnapshotEnder() { (void)tracker->EndSnapshot(/*completed=*/false); }
  } ender{c.tracker};
  for (const tracker::SnapshotDisk& d : info->disks) {
    if (d.resync) {
      return Refused("resync-required", "disk " + d.name + " of VM " + c.vm +
                                            " lost its change log just now: the replica "
                                            "differs; run siterep resync " +
                                            c.vm);
    }
  }
  const uint64_t cycle = info->cycle;
  bool pinned = false;
  auto release = [&] {
    if (pinned)
      (void)c.call({{"op", "verify-end"}, {"vm", c.vm}, {"point", cycle}},
                   std::chrono::seconds(10));
  };
  json disks = json::array();
  uint64_t differing = 0;
  for (size_t i = 0; i < info->disks.size(); ++i) {
    const std::string& name = info->disks[i].name;
    const uint64_t size = info->disks[i].size;
    const uint64_t blocks = (size + kBlock - 1) / kBlock;
    DiskDiff diff(name, size);
    for (uint64_t first = 0; first < blocks; first += kBlocksPerRequest) {
      if (c.stopping()) {
        release();
        return Refused("stopping", "siterepd at " + c.site + " is stopping");
      }
      const uint64_t count = std::min(kBlocksPerRequest, blocks - first);
      const uint64_t offset = first * kBlock;
      json request = {{"op", "verify-hashes"}, {"vm", c.vm},       {"disk", name},
                      {"point", cycle},        {"offset", offset}, {"count", count}};
      std::chrono::milliseconds timeout = kHashTimeout;
      if (!pinned) {
        request["wait_ms"] = std::chrono::milliseconds(kApplyTimeout).count();
        timeout += kApplyTimeout;
      }
      // The replica hashes its blocks while this site hashes the snapshot's.
      std::future<Result<json>> remote = std::async(
          std::launch::async, [&c, request, timeout] { return c.call(request, timeout); });
      Result<std::vector<uint64_t>> local = HashSnapshotBlocks(*c.tracker, i, size, offset, count);
      Result<json> reply = remote.get();
      if (!reply.ok()) {
        release();
        return Refused("peer-unreachable", "asking " + c.peer + " for the hashes of disk " + name +
                                               ": " + reply.status().message());
      }
      if (!reply->value("ok", false)) {
        const std::string error = reply->value("error", "");
        *point_gone = error == "point-gone";
        release();
        return Refused(*point_gone ? "point-gone" : "replica-refused",
                       c.peer + " refused to hash disk " + name + ": " + shipper::PeerRefusalMessage(*reply));
      }
      pinned = true;
      if (!local.ok()) {
        release();
        return Refused("read-failed", "reading disk " + name + " of VM " + c.vm + " at cycle " +
                                          std::to_string(cycle) + ": " + local.status().ToString());
      }
      const json& r = (*reply)["result"];
      const json hashes = r.value("hashes", json());
      if (r.value("size", uint64_t{0}) != size) {
        release();
        return Refused("replica-refused",
                       "disk " + name + " is " + std::to_string(r.value("size", uint64_t{0})) +
                           " bytes at " + c.peer + ", " + std::to_string(size) + " here");
      }
      if (!hashes.is_array() || hashes.size() != local->size()) {
        release();
        return Refused("replica-refused",
                       c.peer + " answered " +
                           std::to_string(hashes.is_array() ? hashes.size() : 0) + " hashes for " +
                           std::to_string(local->size()) + " blocks of disk " + name);
      }
      for (size_t k = 0; k < local->size(); ++k) {
        const json& h = hashes[k];
        if (h.is_number_unsigned() && h.get<uint64_t>() == (*local)[k]) continue;
        const uint64_t at = offset + k * kBlock;
        diff.Add(at, std::min(kBlock, size - at));
      }
      // The snapshot need not keep the old content of blocks compared already.
      c.tracker->SnapshotCopied(i, std::min(size, offset + count * kBlock));
    }
    differing += diff.differing_blocks();
    disks.push_back(diff.ToJson());
  }
  release();
  json out = {{"cycle", cycle},
              {"cut", FormatUtc(info->cut_unix_nanos)},
              {"equal", differing == 0},
              {"differing_blocks", differing},
              {"disks", std::move(disks)}};
  return Ok(std::move(out));
}

}  // namespace

// --- The replica's pinned points ------------------------------------------------------------

struct Daemon::VerifyPins {
  struct Pin {
    uint64_t point = 0;
    // Which replica the view is of; weak, so that it never keeps a replica open (the view
    // keeps only its point store).
    std::weak_ptr<applier::Replica> replica;
    std::shared_ptr<applier::PointView> view;
    Clock::time_point used;
  };

  explicit VerifyPins(std::filesystem::path dir)
      : state_dir(std::move(dir)), reaper([this] { Reap(); }) {}
  ~VerifyPins() {
    {
      std::lock_guard lk(mu);
      stop = true;
    }
    cv.notify_all();
    reaper.join();
  }

  // The view held for vm at point, taken from replica (null if none).
  std::shared_ptr<applier::PointView> Find(const std::string& vm, uint64_t point,
                                           const std::shared_ptr<applier::Replica>& replica) {
    std::lock_guard lk(mu);
    auto it = pins.find(vm);
    if (it == pins.end() || it->second.point != point) return nullptr;
    const std::weak_ptr<applier::Replica>& of = it->second.replica;
    if (of.owner_before(replica) || replica.owner_before(of)) return nullptr;  // another one
    it->second.used = Clock::now();
    return it->second.view;
  }
  // Holds view for vm (replacing what vm held: one verification of a VM at a time).
  void Put(const std::string& vm, Pin pin) {
    pin.used = Clock::now();
    std::shared_ptr<applier::PointView> old;  // unpinned outside mu
    std::lock_guard lk(mu);
    if (auto it = pins.find(vm); it != pins.end()) old = std::move(it->second.view);
    pins[vm] = std::move(pin);
  }
  void Touch(const std::string& vm) {
    std::lock_guard lk(mu);
    if (auto it = pins.find(vm); it != pins.end()) it->second.used = Clock::now();
  }
  bool Release(const std::string& vm, uint64_t point) {
    std::shared_ptr<applier::PointView> old;
    std::lock_guard lk(mu);
    auto it = pins.find(vm);
    if (it == pins.end() || it->second.point != point) return false;
    old = std::move(it->second.view);
    pins.erase(it);
    return true;
  }

  // Once a second: lets go the pins nobody asked about for kPinIdle, and those of a VM
  // that is no replica here any more (a failover started here; its role.json says so
  // within a second, before a commit could open the replica's folder again).
  void Reap() {
    std::unique_lock lk(mu);
    while (!cv.wait_for(lk, std::chrono::seconds(1), [this] { return stop; })) {
      std::vector<std::string> vms;
      for (const auto& [vm, pin] : pins) vms.push_back(vm);
      lk.unlock();
      std::set<std::string> moved;
      for (const std::string& vm : vms) {
        Result<std::optional<RoleState>> role = LoadRole(state_dir, vm);
        if (role.ok() && *role && (*role)->role != Role::kReplica) moved.insert(vm);
      }
      std::vector<std::shared_ptr<applier::PointView>> gone;
      lk.lock();
      const Clock::time_point now = Clock::now();
      for (auto it = pins.begin(); it != pins.end();) {
        const bool idle = now - it->second.used >= kPinIdle;
        if (!idle && !moved.contains(it->first) && !it->second.replica.expired()) {
          ++it;
          continue;
        }
        spdlog::info("VM {}: recovery point {} held for a verification is let go ({})", it->first,
                     it->second.point,
                     idle ? "no request for " + std::to_string(kPinIdle.count()) + " s"
                          : "not a replica here any more");
        gone.push_back(std::move(it->second.view));
        it = pins.erase(it);
      }
      // Unpinning takes the point store's lock, which the applier holds while it writes a
      // cycle: not under mu.
      lk.unlock();
      gone.clear();
      lk.lock();
    }
  }

  const std::filesystem::path state_dir;
  std::mutex mu;  // protects pins and stop; leaf lock
  std::condition_variable cv;
  std::map<std::string, Pin> pins;  // by VM
  bool stop = false;
  std::thread reaper;  // last: starts once the rest is built
};

Daemon::VerifyPins& Daemon::Pins() {
  std::lock_guard lk(verify_mu_);
  if (!verify_pins_) verify_pins_ = std::make_shared<VerifyPins>(config_.state_dir);
  return *verify_pins_;
}

// --- The primary's side -------------------------------------------------------------------------

json Daemon::Verify(VmSlot& slot, const json& request) {
  (void)request;
  const std::string& vm = slot.name;
  OpLock op_lock(slot, "verify");
  if (!op_lock.owns()) return op_lock.Busy(config_.name);
  RoleState role;
  Outbound* out = nullptr;
  tracker::VmTracker* tracker = nullptr;
  bool primary = false;
  {
    std::lock_guard lk(slot.mu);
    role = slot.role;
    primary = role.role == Role::kPrimary && slot.primary != nullptr;
    if (primary) {
      out = slot.outbound.get();
      tracker = slot.primary->tracker.get();
    }
  }
  if (role.role == Role::kReplica) {
    return Refused("not-primary", "VM " + vm + " is a replica at " + config_.name +
                                      "; verify runs at its primary: siterep verify " + vm +
                                      " at " + role.peer);
  }
  if (role.role == Role::kPrimary &&
      (role.phase == Phase::kFailedOver || role.phase == Phase::kCommitting)) {
    return Refused("not-replicating", "VM " + vm + " runs on an uncommitted failover at " +
                                          config_.name + ": it has no replica to compare with");
  }
  if (!primary || out == nullptr) {
    return Refused("not-primary", "VM " + vm + " is not running as primary at " + config_.name);
  }
  if (role.phase == Phase::kFenced || role.phase == Phase::kFailingOver) {
    return Refused(
        "fenced", "VM " + vm + " is " + std::string(PhaseName(role.phase)) + " at " + config_.name);
  }
  if (tracker == nullptr) {
    return Refused("not-tracked", "VM " + vm +
                                      " has tracking = \"off\": it is not replicated, "
                                      "there is no replica to compare with");
  }
  if (!out->enabled()) {
    return Refused("not-replicating", "VM " + vm + " is not replicated (siterep enable " + vm +
                                          " --to SITE): there is no replica to compare with");
  }
  const std::string peer = out->peer();
  if (out->sync_owed()) {
    return Refused("sync-running",
                   "a sync of VM " + vm + " to " + peer +
                       " runs: the replica is no consistent "
                       "copy until it ends, and the sync holds the snapshot verify needs; verify "
                       "when it is done (siterep status " +
                       vm + ")");
  }
  for (const tracker::DiskStats& d : tracker->Stats().disks) {
    if (d.resync_required) {
      return Refused("resync-required", "disk " + d.name + " of VM " + vm + " needs a resync (" +
                                            d.resync_reason +
                                            "): the replica is known to "
                                            "differ; run siterep resync " +
                                            vm + " first");
    }
  }
  const std::optional<shipper::ShipperStats> st = out->LinkStats();
  if (!st || !st->connected) {
    return Refused("peer-unreachable",
                   "not connected to " + peer +
                       (st && !st->last_error.empty() ? " (" + st->last_error + ")" : "") +
                       ": verify compares with the replica there");
  }
  if (st->paused) {
    return Refused("paused", "replication of VM " + vm +
                                 " is paused, so the replica cannot "
                                 "reach the point verify compares (siterep resume " +
                                 vm + ")");
  }
  if (!st->peer_apply_error.empty()) {
    return Refused("replica-not-applying", "the replica at " + peer + " stopped applying (" +
                                               st->peer_apply_error + "); siterep resync " + vm);
  }

  VerifyContext c;
  c.vm = vm;
  c.site = config_.name;
  c.peer = peer;
  c.tracker = tracker;
  c.call = [this, peer](const json& r, std::chrono::milliseconds timeout) {
    return CallPeer(peer, r, timeout);
  };
  c.stopping = [this] {
    std::lock_guard lk(stop_mu_);
    return stopping_;
  };
  const auto t0 = Clock::now();
  spdlog::info("VM {}: verify against {} started", vm, peer);
  json reply;
  int attempts = 0;
  for (bool point_gone = true; point_gone && attempts < 2;) {
    point_gone = false;
    ++attempts;
    reply = VerifyAtSnapshot(c, &point_gone);
    if (point_gone && attempts < 2) {
      spdlog::info("VM {}: verify: {}; again from a new snapshot", vm, shipper::PeerRefusalMessage(reply));
    }
  }
  if (!reply.value("ok", false)) {
    spdlog::warn("VM {}: verify against {} refused: {}", vm, peer, shipper::PeerRefusalMessage(reply));
    if (reply.value("error", "") == "point-gone") {
      reply["message"] = shipper::PeerRefusalMessage(reply) +
                         " (twice; the replica applies a backlog of cycles, or, in a "
                         "consistency group, whole group instants at once: verify again when "
                         "it has caught up)";
    }
    return reply;
  }
  json& result = reply["result"];
  result["vm"] = vm;
  result["site"] = config_.name;
  result["peer"] = peer;
  result["seconds"] = SecondsSince(t0);
  result["attempts"] = attempts;
  const uint64_t differing = result.value("differing_blocks", uint64_t{0});
  if (differing != 0) {
    result["next"] = "siterep resync " + vm +
                     " --full compares every block and sends those "
                     "that differ (a resync without --full compares only the blocks the change "
                     "log knows changed)";
    spdlog::warn("VM {}: verify against {} at cycle {}: {} blocks differ", vm, peer,
                 result.value("cycle", uint64_t{0}), differing);
  } else {
    spdlog::info("VM {}: verify against {} at cycle {}: every block equal ({:.1f} s)", vm, peer,
                 result.value("cycle", uint64_t{0}), SecondsSince(t0));
  }
  return reply;
}

// --- The replica's side
// ---------------------------------------------------------------------------

json Daemon::HandleVerifyPeer(const std::string& peer, const json& request) {
  const std::string op = request.value("op", "");
  try {
    const std::string vm = request.at("vm").get<std::string>();
    const uint64_t point = request.at("point").get<uint64_t>();
    if (op == "verify-end") return Ok({{"released", Pins().Release(vm, point)}});
    if (op != "verify-hashes") return Refused("unknown-op", "unknown peer request '" + op + "'");
    const std::string disk = request.at("disk").get<std::string>();
    const uint64_t offset = request.at("offset").get<uint64_t>();
    const uint64_t count = request.at("count").get<uint64_t>();
    const auto wait = std::min<std::chrono::milliseconds>(
        std::chrono::milliseconds(request.value("wait_ms", uint64_t{0})), kMaxWait);
    if (count == 0 || count > kBlocksPerRequest || offset % kBlock != 0) {
      return Refused("bad-request", "verify-hashes takes 1 to " +
                                        std::to_string(kBlocksPerRequest) +
                                        " blocks from a multiple of " + std::to_string(kBlock));
    }

    VmSlot* slot = Slot(vm);
    const RoleState role = slot != nullptr ? slot->CurrentRole() : RoleState{};
    std::shared_ptr<applier::Replica> replica = inbound_ ? inbound_->Get(vm) : nullptr;
    if (slot == nullptr || role.role != Role::kReplica || !replica) {
      return Refused("not-a-replica", "VM " + vm + " is not a replica at " + config_.name);
    }
    if (role.peer != peer) {
      return Refused("wrong-peer", "VM " + vm + " at " + config_.name + " replicates " + role.peer +
                                       ", not " + peer);
    }

    std::shared_ptr<applier::PointView> view = Pins().Find(vm, point, replica);
    if (!view) {
      // Wait until the point is applied, then hold it at once: the applier may move on to
      // the next cycle any moment, and only a retained point would survive that.
      const Clock::time_point t0 = Clock::now();
      applier::ReplicaPosition pos;
      for (;;) {
        pos = replica->Position();
        if (pos.applied_cycle >= point) break;
        if (replica->Sync().active) {
          return Refused("sync-running", "the replica of VM " + vm + " at " + config_.name +
                                             " is in the middle of a sync");
        }
        bool stopping;
        {
          std::lock_guard lk(stop_mu_);
          stopping = stopping_;
        }
        if (stopping) return Refused("stopping", "siterepd at " + config_.name + " is stopping");
        if (Clock::now() - t0 >= wait) {
          std::string why;
          if (pos.apply_held) why = "; applying is held for its consistency group";
          if (!pos.apply_error.empty()) why += "; apply error: " + pos.apply_error;
          return Refused(
              "not-applied",
              "the replica of VM " + vm + " at " + config_.name + " has applied cycle " +
                  std::to_string(pos.applied_cycle) + " (received " +
                  std::to_string(pos.received_cycle) + "), not cycle " + std::to_string(point) +
                  ", after " +
                  std::to_string(std::chrono::duration_cast<std::chrono::seconds>(wait).count()) +
                  " s" + why);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      Result<std::unique_ptr<applier::PointView>> opened = replica->OpenView(point);
      if (!opened.ok()) {
        if (opened.status().code() == ENOENT) {
          return Refused("point-gone", "the replica of VM " + vm + " at " + config_.name +
                                           " moved on to cycle " +
                                           std::to_string(replica->Position().applied_cycle) +
                                           " and keeps no recovery point " + std::to_string(point));
        }
        return Refused("read-failed", opened.status().ToString());
      }
      view = std::move(*opened);
      Pins().Put(vm, {point, replica, view, {}});
      spdlog::info("VM {}: recovery point {} held for a verification by {}", vm, point, peer);
    }

    std::optional<size_t> index;
    for (size_t i = 0; i < view->disk_count(); ++i) {
      if (view->disk_name(i) == disk) index = i;
    }
    if (!index) return Refused("bad-request", "VM " + vm + " has no disk " + disk + " here");
    const uint64_t size = view->disk_size(*index);
    if (offset >= size) {
      return Refused("bad-request", "disk " + disk + " has " + std::to_string(size) +
                                        " bytes; offset " + std::to_string(offset));
    }
    Result<std::vector<uint64_t>> hashes = HashBlocks(
        size, offset, count,
        [&](uint64_t at, std::span<std::byte> out) { return view->Read(*index, at, out); });
    if (!hashes.ok()) {
      return Refused("read-failed", "VM " + vm + " disk " + disk + " at point " +
                                        std::to_string(point) + ": " + hashes.status().ToString());
    }
    Pins().Touch(vm);
    return Ok({{"point", point},
               {"disk", disk},
               {"size", size},
               {"offset", offset},
               {"hashes", std::move(*hashes)}});
  } catch (const json::exception& e) {
    return Refused("bad-request", std::string(op) + ": " + e.what());
  }
}

}  // namespace siterep::control
