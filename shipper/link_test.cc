// End-to-end tests of the replication link: a real tracker::VmTracker on temp images as the
// source, a Shipper and a Receiver talking real TLS on 127.0.0.1, and RecordingSink, a test
// double of the applier that stores what it gets in files and checks the order of chunks
// and commits (no gap, no duplicate), and keeps what a sync writes in memory. Syncs run
// from the tracker's snapshot through TrackerSyncSource (what control/outbound.cc does),
// into RecordingSink or the real applier::Replica, some while a guest writes on.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <utility>

#include "applier/replica.h"
#include "common/block_hash.h"
#include "common/failpoint.h"
#include "common/file_util.h"
#include "shipper/peer_call.h"
#include "shipper/receiver.h"
#include "shipper/shipper.h"
#include "shipper/testing/test_certs.h"
#include "shipper/wire_format.h"
#include "tracker/log_format.h"
#include "tracker/tracker_fixture.h"

namespace siterep::shipper {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using tracker::testing::Pattern;
using tracker::testing::ReadWhole;
using tracker::testing::WriteVia;

// Test double of applier::Replica. Keeps each complete segment in a file, and refuses (and
// records as a violation) chunks out of order, a segment that does not parse or end in a
// cut, a commit of a cycle it already has (duplicate) or that skips one (gap), and a commit
// without every disk's segment of the cycle.
//
// Syncs happen in memory: one image per disk (zero-filled at the first BeginSync, kept
// across syncs so a resync can compare), a done offset per disk and a durable done offset
// that lags it by up to durable_step bytes (the replica persists its progress now and then),
// so SyncAcks are sparse. A BeginSync of the sync in progress (a reconnect) resumes from the
// durable offsets, losing what was done but not durable as a crash would; another sync_id
// starts over and reports how far the unfinished one wrote. Refused and recorded as
// violations: sync data or hashes without a sync, below the done offset, past the disk's
// end, data and zeros at once; an EndSync before every disk is done; a segment during a sync.
class RecordingSink : public applier::SegmentSink {
 public:
  RecordingSink(fs::path dir, applier::ReplicaDefinition definition)
      : dir_(std::move(dir)), def_(std::move(definition)) {
    fs::create_directories(dir_);
  }

  Status WriteSegment(uint32_t disk_id, uint64_t number, uint64_t offset,
                      std::span<const std::byte> data, bool last) override {
    std::lock_guard lk(mu_);
    ++write_calls_;
    if (!write_refusal_.ok()) {
      ++write_refusals_;
      return write_refusal_;
    }
    if (sync_.active) return Violation("segment " + std::to_string(number) + " during a sync");
    Partial& p = partial_[disk_id];
    if (offset == 0) {
      p = Partial{number, {}};
    } else if (p.number != number || p.data.size() != offset) {
      return Violation("chunk of segment " + std::to_string(number) + " at offset " +
                       std::to_string(offset) + " out of order");
    }
    p.data.insert(p.data.end(), data.begin(), data.end());
    if (!last) return Status::Ok();
    if (number <= committed_segment_[disk_id]) {
      return Violation("segment " + std::to_string(number) + " of a committed cycle sent again");
    }
    // The whole segment must parse and end in a cut: what the applier will check.
    std::span<const std::byte> rest(p.data);
    uint64_t cut_cycle = 0;
    while (!rest.empty()) {
      tracker::ParsedRecord rec;
      if (tracker::ParseRecord(rest, &rec) != tracker::ParseStatus::kOk) {
        return Violation("segment " + std::to_string(number) + " does not parse");
      }
      cut_cycle = 0;
      if (rec.header.kind == tracker::RecordKind::kCut) {
        cut_cycle = tracker::DecodeCutPayload(rec.payload.first<tracker::kCutPayloadSize>()).cycle;
      }
      rest = rest.subspan(rec.size);
    }
    if (cut_cycle == 0) return Violation("segment " + std::to_string(number) + " has no cut");
    SR_RETURN_IF_ERROR(WriteFileAtomic(
        PathOf(disk_id, number),
        std::string_view(reinterpret_cast<const char*>(p.data.data()), p.data.size())));
    complete_[disk_id] = Complete{number, cut_cycle};
    p = Partial{};
    return Status::Ok();
  }

  Status CommitCycle(const applier::CycleInfo& cycle) override {
    {
      std::unique_lock lk(hold_mu_);
      ++commits_in_progress_;
      hold_cv_.wait(lk, [&] { return !hold_; });
    }
    Status s = Commit(cycle);
    std::lock_guard lk(hold_mu_);
    --commits_in_progress_;
    return s;
  }
  Status Commit(const applier::CycleInfo& cycle) {
    std::lock_guard lk(mu_);
    if (cycle.cycle <= received_) {
      return Violation("duplicate commit of cycle " + std::to_string(cycle.cycle));
    }
    if (cycle.cycle != received_ + 1) {
      return Violation("gap: cycle " + std::to_string(cycle.cycle) + " after " +
                       std::to_string(received_));
    }
    for (const applier::DiskDefinition& d : def_.disks) {
      auto it = complete_.find(d.disk_id);
      if (it == complete_.end() || it->second.cycle != cycle.cycle) {
        return Violation("commit of cycle " + std::to_string(cycle.cycle) + " without disk " +
                         d.name);
      }
    }
    for (const applier::DiskDefinition& d : def_.disks) {
      committed_segment_[d.disk_id] = complete_[d.disk_id].number;
    }
    received_ = cycle.cycle;
    cut_nanos_ = cycle.cut_unix_nanos;
    commits_.push_back(cycle);
    return Status::Ok();
  }

  applier::ReplicaPosition Position() const override {
    std::lock_guard lk(mu_);
    applier::ReplicaPosition p;
    p.epoch = def_.epoch;
    p.received_cycle = received_;
    p.applied_cycle = received_;  // this double "applies" at once
    p.applied_cut_unix_nanos = cut_nanos_;
    return p;
  }

  Result<applier::SyncResume> BeginSync(const applier::SyncPlan& plan) override {
    std::lock_guard lk(mu_);
    plans_.push_back(plan);
    if (!sync_refusal_.ok()) return sync_refusal_;
    if (plan.epoch < def_.epoch) {
      return Status::Error(ESTALE, "sync at epoch " + std::to_string(plan.epoch) + ", replica at " +
                                       std::to_string(def_.epoch));
    }
    if (plan.disks.size() != def_.disks.size()) return Status::Invalid("plan for other disks");
    for (size_t i = 0; i < plan.disks.size(); ++i) {
      if (plan.disks[i].disk_id != def_.disks[i].disk_id) {
        return Status::Invalid("plan for other disks");
      }
    }
    if (plan.sync_id < received_) {
      return Status::Invalid("sync " + std::to_string(plan.sync_id) + " older than cycle " +
                             std::to_string(received_));
    }
    const bool same = sync_.plan.sync_id == plan.sync_id && (sync_.active || sync_.ended);
    const bool ended_already = same && !sync_.active;
    applier::SyncResume resume;
    for (const applier::DiskDefinition& d : def_.disks) {
      std::vector<std::byte>& image = images_[d.disk_id];
      if (image.size() != d.size) image.resize(d.size);
      SyncDisk& sd = sync_.disks[d.disk_id];
      if (ended_already) {
        sd.done = sd.durable = d.size;
      } else if (same) {
        sd.done = sd.durable;  // what was not durable is lost
      } else {
        // An unfinished other sync wrote below its high-water mark: that must be compared.
        sd.written_until = sync_.active ? std::max(sd.written_until, sd.written_max) : 0;
        sd.written_max = 0;
        sd.done = sd.durable = 0;
      }
      resume.disks.push_back({d.disk_id, sd.durable, sd.written_until});
    }
    if (!same) sync_.bytes_written = 0;
    sync_.plan = plan;
    sync_.active = true;
    sync_.ended = false;
    return resume;
  }

  Result<std::vector<uint64_t>> SyncHashes(uint32_t disk_id, uint64_t offset,
                                           uint32_t count) override {
    std::lock_guard lk(mu_);
    ++hash_calls_;
    SR_ASSIGN_OR_RETURN(std::vector<std::byte> * image, SyncImage(disk_id, "hashes"));
    // Every block asked for starts within the disk (the last one may end past it).
    if (offset % applier::kSyncBlockSize != 0 || count == 0 || count > applier::kMaxHashBlocks ||
        offset + (uint64_t{count} - 1) * applier::kSyncBlockSize >= image->size()) {
      return Violation("hashes of " + std::to_string(count) + " blocks at " +
                       std::to_string(offset) + " of a disk of " + std::to_string(image->size()));
    }
    std::vector<uint64_t> out;
    for (uint32_t i = 0; i < count; ++i) {
      const uint64_t at = offset + uint64_t{i} * applier::kSyncBlockSize;
      const size_t n = static_cast<size_t>(std::min(applier::kSyncBlockSize, image->size() - at));
      out.push_back(BlockHash(std::span<const std::byte>(image->data() + at, n)));
    }
    return out;
  }

  Result<uint64_t> WriteSyncData(uint32_t disk_id, uint64_t offset, std::span<const std::byte> data,
                                 uint64_t zero_length, uint64_t done_to) override {
    std::lock_guard lk(mu_);
    ++sync_data_calls_;
    SR_ASSIGN_OR_RETURN(std::vector<std::byte> * image, SyncImage(disk_id, "data"));
    SyncDisk& sd = sync_.disks[disk_id];
    const uint64_t length = data.empty() ? zero_length : data.size();
    if (!data.empty() && zero_length != 0) return Violation("data and zeros at once");
    if (offset < sd.done) {
      return Violation("sync data at " + std::to_string(offset) + " below the done offset " +
                       std::to_string(sd.done));
    }
    if (offset + length > done_to || done_to > image->size()) {
      return Violation("sync data [" + std::to_string(offset) + ", +" + std::to_string(length) +
                       ") done to " + std::to_string(done_to) + " on a disk of " +
                       std::to_string(image->size()));
    }
    if (!data.empty()) {
      std::copy(data.begin(), data.end(), image->begin() + static_cast<ptrdiff_t>(offset));
      sync_.bytes_written += data.size();
    } else {
      std::fill_n(image->begin() + static_cast<ptrdiff_t>(offset), length, std::byte{0});
    }
    if (length > 0) sd.written_max = std::max(sd.written_max, offset + length);
    sd.done = done_to;
    if (sd.done - sd.durable >= durable_step_ || sd.done == image->size()) sd.durable = sd.done;
    return sd.durable;
  }

  Status EndSync(uint64_t sync_id, int64_t cut_unix_nanos) override {
    std::lock_guard lk(mu_);
    if (sync_.plan.sync_id != sync_id || !(sync_.active || sync_.ended)) {
      return Violation("EndSync of sync " + std::to_string(sync_id) + ", which is not running");
    }
    if (sync_.ended) return Status::Ok();  // idempotent
    for (const applier::DiskDefinition& d : def_.disks) {
      SyncDisk& sd = sync_.disks[d.disk_id];
      if (sd.done != d.size) {
        return Violation("EndSync with disk " + d.name + " done to " + std::to_string(sd.done) +
                         " of " + std::to_string(d.size));
      }
      sd.durable = sd.done;
      sd.written_until = sd.written_max = 0;
    }
    // The images are cycle sync_id; segments continue the plan's logs.
    for (const applier::SyncDiskPlan& d : sync_.plan.disks) {
      committed_segment_[d.disk_id] = d.last_segment;
    }
    partial_.clear();
    complete_.clear();
    received_ = sync_id;
    cut_nanos_ = cut_unix_nanos;
    sync_.active = false;
    sync_.ended = true;
    sync_ends_.push_back(sync_id);
    return Status::Ok();
  }

  applier::SyncStatus Sync() const override {
    std::lock_guard lk(mu_);
    applier::SyncStatus st;
    st.active = sync_.active;
    st.sync_id = sync_.plan.sync_id;
    st.kind = sync_.plan.kind;
    st.bytes_written = sync_.bytes_written;
    for (const applier::DiskDefinition& d : def_.disks) {
      st.bytes_total += d.size;
      if (auto it = sync_.disks.find(d.disk_id); it != sync_.disks.end()) {
        st.bytes_done += it->second.durable;
      }
    }
    return st;
  }

  fs::path PathOf(uint32_t disk_id, uint64_t number) const {
    return dir_ / (std::to_string(disk_id) + "-" + std::to_string(number) + ".seg");
  }
  std::vector<uint64_t> Commits() const {
    std::lock_guard lk(mu_);
    std::vector<uint64_t> out;
    for (const applier::CycleInfo& c : commits_) out.push_back(c.cycle);
    return out;
  }
  std::vector<applier::CycleInfo> CommitInfos() const {
    std::lock_guard lk(mu_);
    return commits_;
  }
  std::vector<std::string> Violations() const {
    std::lock_guard lk(mu_);
    return violations_;
  }
  uint64_t write_calls() const {
    std::lock_guard lk(mu_);
    return write_calls_;
  }
  uint64_t received() const {
    std::lock_guard lk(mu_);
    return received_;
  }
  // Sync: what the images hold, the plans BeginSync was given (refused ones included), the
  // syncs ended, and the calls made.
  std::vector<std::byte> Image(uint32_t disk_id) const {
    std::lock_guard lk(mu_);
    auto it = images_.find(disk_id);
    return it == images_.end() ? std::vector<std::byte>{} : it->second;
  }
  std::vector<applier::SyncPlan> SyncPlans() const {
    std::lock_guard lk(mu_);
    return plans_;
  }
  std::vector<uint64_t> SyncEnds() const {
    std::lock_guard lk(mu_);
    return sync_ends_;
  }
  uint64_t hash_calls() const {
    std::lock_guard lk(mu_);
    return hash_calls_;
  }
  uint64_t sync_data_calls() const {
    std::lock_guard lk(mu_);
    return sync_data_calls_;
  }
  // Puts bytes into an image before a sync (a seed, or a replica that diverged).
  void SetImage(uint32_t disk_id, std::vector<std::byte> image) {
    std::lock_guard lk(mu_);
    images_[disk_id] = std::move(image);
  }
  void set_durable_step(uint64_t bytes) {
    std::lock_guard lk(mu_);
    durable_step_ = bytes;
  }
  // What WriteSegment answers while not ok (a replica that cannot store: ENOSPC).
  void SetWriteRefusal(Status s) {
    std::lock_guard lk(mu_);
    write_refusal_ = std::move(s);
  }
  uint64_t write_refusals() const {
    std::lock_guard lk(mu_);
    return write_refusals_;
  }
  // What BeginSync answers while not ok.
  void SetSyncRefusal(Status s) {
    std::lock_guard lk(mu_);
    sync_refusal_ = std::move(s);
  }
  // While held, CommitCycle waits before it commits, as a slow fsync would; the call counts
  // as in progress from its start until it returns.
  void HoldCommits() {
    std::lock_guard lk(hold_mu_);
    hold_ = true;
  }
  void ReleaseCommits() {
    {
      std::lock_guard lk(hold_mu_);
      hold_ = false;
    }
    hold_cv_.notify_all();
  }
  int commits_in_progress() const {
    std::lock_guard lk(hold_mu_);
    return commits_in_progress_;
  }

 private:
  struct Partial {
    uint64_t number = 0;
    std::vector<std::byte> data;
  };
  struct Complete {
    uint64_t number = 0;
    uint64_t cycle = 0;
  };
  Status Violation(std::string what) {
    violations_.push_back(what);
    return Status::Error(EPROTO, "RecordingSink: " + what);
  }
  // The image of a disk of the running sync (under mu_).
  Result<std::vector<std::byte>*> SyncImage(uint32_t disk_id, std::string_view what) {
    if (!sync_.active) return Violation("sync " + std::string(what) + " without a sync");
    auto it = images_.find(disk_id);
    if (it == images_.end() || sync_.disks.count(disk_id) == 0) {
      return Violation("sync " + std::string(what) + " for unknown disk " +
                       std::to_string(disk_id));
    }
    return &it->second;
  }
  struct SyncDisk {
    uint64_t done = 0;
    uint64_t durable = 0;
    uint64_t written_max = 0;    // end of the highest range this sync wrote
    uint64_t written_until = 0;  // reported to the sender: an older unfinished sync's mark
  };
  struct SyncState {
    applier::SyncPlan plan;
    bool active = false;
    bool ended = false;  // plan.sync_id has ended (and nothing started since)
    std::map<uint32_t, SyncDisk> disks;
    uint64_t bytes_written = 0;
  };

  const fs::path dir_;
  const applier::ReplicaDefinition def_;
  mutable std::mutex mu_;
  std::map<uint32_t, Partial> partial_;
  std::map<uint32_t, Complete> complete_;
  std::map<uint32_t, uint64_t> committed_segment_;
  uint64_t received_ = 0;
  int64_t cut_nanos_ = 0;
  std::vector<applier::CycleInfo> commits_;
  std::vector<std::string> violations_;
  uint64_t write_calls_ = 0;
  Status write_refusal_;
  uint64_t write_refusals_ = 0;
  // Sync:
  std::map<uint32_t, std::vector<std::byte>> images_;
  SyncState sync_;
  std::vector<applier::SyncPlan> plans_;
  std::vector<uint64_t> sync_ends_;
  uint64_t durable_step_ = 1 << 20;
  Status sync_refusal_;
  uint64_t hash_calls_ = 0;
  uint64_t sync_data_calls_ = 0;
  // HoldCommits; a leaf lock, never held with mu_.
  mutable std::mutex hold_mu_;
  std::condition_variable hold_cv_;
  bool hold_ = false;
  int commits_in_progress_ = 0;
};

// A TCP forwarder between shipper and receiver that a test can cut (close every
// connection) or freeze (stop forwarding, sockets left open, as a dead link looks).
class TcpProxy {
 public:
  explicit TcpProxy(uint16_t target) : target_(target) {
    Result<std::unique_ptr<TcpListener>> l = TcpListener::Listen("127.0.0.1:0");
    EXPECT_TRUE(l.ok()) << l.status().ToString();
    listener_ = std::move(*l);
    accept_ = std::thread([this] { AcceptLoop(); });
  }
  ~TcpProxy() {
    stop_ = true;
    listener_->Stop();
    accept_.join();
    std::lock_guard lk(mu_);
    for (std::thread& t : pumps_) t.join();
  }
  uint16_t port() const { return listener_->port(); }
  void CutAll() { ++cut_generation_; }
  void FreezeAll() { ++freeze_generation_; }
  int accepted() const { return accepted_; }

 private:
  void AcceptLoop() {
    while (true) {
      Result<UniqueFd> fd = listener_->Accept();
      if (!fd.ok()) return;
      ++accepted_;
      UniqueFd out(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(target_);
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if (::connect(out.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) continue;
      std::lock_guard lk(mu_);
      pumps_.emplace_back([this, in = std::move(*fd), out = std::move(out)]() mutable {
        Pump(std::move(in), std::move(out));
      });
    }
  }
  void Pump(UniqueFd a, UniqueFd b) {
    const int cut_at = cut_generation_;
    const int freeze_at = freeze_generation_;
    std::vector<char> buf(64 << 10);
    while (!stop_ && cut_generation_ == cut_at) {
      if (freeze_generation_ != freeze_at) {  // a dead link: hold the sockets, move nothing
        std::this_thread::sleep_for(10ms);
        continue;
      }
      pollfd p[2] = {{a.get(), POLLIN, 0}, {b.get(), POLLIN, 0}};
      if (::poll(p, 2, 20) <= 0) continue;
      for (int i = 0; i < 2; ++i) {
        if (p[i].revents == 0) continue;
        const int from = i == 0 ? a.get() : b.get();
        const int to = i == 0 ? b.get() : a.get();
        const ssize_t n = ::read(from, buf.data(), buf.size());
        if (n <= 0) return;
        if (!PWriteAllSocket(to, buf.data(), static_cast<size_t>(n))) return;
      }
    }
  }
  static bool PWriteAllSocket(int fd, const char* data, size_t n) {
    while (n > 0) {
      const ssize_t w = ::send(fd, data, n, MSG_NOSIGNAL);
      if (w <= 0) return false;
      data += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }

  const uint16_t target_;
  std::unique_ptr<TcpListener> listener_;
  std::thread accept_;
  std::atomic<bool> stop_{false};
  std::atomic<int> cut_generation_{0};
  std::atomic<int> freeze_generation_{0};
  std::atomic<int> accepted_{0};
  std::mutex mu_;
  std::vector<std::thread> pumps_;
};

bool WaitFor(const std::function<bool()>& done, std::chrono::milliseconds timeout = 20s) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return done();
}

// The SyncSource of the daemon (control/outbound.cc) over the tracker's snapshot: Begin
// takes the snapshot and makes the plan the way Outbound::BeginSync does; Finished ends the
// snapshot (completed) and releases the segments through the sync's cut. Records the
// Copied watermarks and the syncs that finished.
class TrackerSyncSource : public SyncSource {
 public:
  TrackerSyncSource(tracker::VmTracker& tracker, std::vector<int> image_fds, uint64_t epoch)
      : tracker_(tracker), image_fds_(std::move(image_fds)), epoch_(epoch) {}

  Result<tracker::SnapshotInfo> Begin(applier::SyncKind kind, bool full = false) {
    SR_ASSIGN_OR_RETURN(tracker::SnapshotInfo info, tracker_.StartSnapshot());
    SyncJob job = PlanSync(info, kind, full, epoch_, image_fds_);
    std::lock_guard lk(mu_);
    plan_ = std::move(job.plan);
    ranges_ = std::move(job.ranges);
    copied_.assign(info.disks.size(), 0);
    return info;
  }

  std::optional<applier::SyncPlan> Plan() override {
    std::lock_guard lk(mu_);
    return plan_;
  }
  std::vector<tracker::ByteRange> CompareRanges(size_t disk) override {
    std::lock_guard lk(mu_);
    return disk < ranges_.size() ? ranges_[disk] : std::vector<tracker::ByteRange>{};
  }
  Status Read(size_t disk, uint64_t offset, std::span<std::byte> out) override {
    return tracker_.ReadSnapshot(disk, offset, out);
  }
  Result<std::vector<tracker::ByteRange>> DataRanges(size_t disk, uint64_t from,
                                                     uint64_t to) override {
    return tracker_.SnapshotDataRanges(disk, from, to);
  }
  void Copied(size_t disk, uint64_t offset) override {
    {
      std::lock_guard lk(mu_);
      if (disk < copied_.size()) copied_[disk] = std::max(copied_[disk], offset);
    }
    tracker_.SnapshotCopied(disk, offset);
  }
  Status Finished(uint64_t sync_id) override {
    std::lock_guard lk(mu_);
    if (!plan_ || plan_->sync_id != sync_id) return Status::Ok();  // already done
    if (!finish_error_.ok()) {
      // As Outbound::Finished fails when the snapshot cannot be ended or sync.json stays.
      return std::exchange(finish_error_, Status::Ok());
    }
    SR_RETURN_IF_ERROR(tracker_.EndSnapshot(true));
    SR_RETURN_IF_ERROR(tracker_.ReleaseThrough(sync_id));
    plan_.reset();
    ranges_.clear();
    finished_.push_back(sync_id);
    return Status::Ok();
  }

  // Finished was called for the plan: nothing is due any more.
  bool done() const {
    std::lock_guard lk(mu_);
    return !plan_ && !finished_.empty();
  }
  std::vector<uint64_t> finished() const {
    std::lock_guard lk(mu_);
    return finished_;
  }
  uint64_t copied(size_t disk) const {
    std::lock_guard lk(mu_);
    return disk < copied_.size() ? copied_[disk] : 0;
  }
  // The next Finished fails with s (and leaves the sync due).
  void FailNextFinished(Status s) {
    std::lock_guard lk(mu_);
    finish_error_ = std::move(s);
  }

 private:
  tracker::VmTracker& tracker_;
  const std::vector<int> image_fds_;
  const uint64_t epoch_;
  mutable std::mutex mu_;
  std::optional<applier::SyncPlan> plan_;
  std::vector<std::vector<tracker::ByteRange>> ranges_;
  std::vector<uint64_t> copied_;
  std::vector<uint64_t> finished_;
  Status finish_error_;
};

// A guest on its own thread: writes (and now and then discards) pseudo-random ranges of
// the disks through the tracker's observers, cutting a cycle every 25 changes, for as long
// as keep_going() says. The first change is always `first` (disk, offset, length), so a
// test knows one block it changes for sure.
class GuestWriter {
 public:
  struct Disk {
    tracker::WriteObserver* observer;
    int fd;
    uint64_t size;
  };
  struct Change {
    size_t disk;
    uint64_t offset;
    uint64_t length;
  };
  GuestWriter(tracker::VmTracker& tracker, std::vector<Disk> disks, uint64_t seed)
      : tracker_(tracker), disks_(std::move(disks)), seed_(seed) {}
  ~GuestWriter() { Stop(); }

  void Start(Change first, std::function<bool()> keep_going) {
    thread_ =
        std::thread([this, first, keep_going = std::move(keep_going)] { Run(first, keep_going); });
  }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int changes() const { return changes_; }
  uint64_t bytes_written() const { return bytes_written_; }
  uint64_t max_snapshot_bytes() const { return max_snapshot_bytes_; }
  Status error() const {
    std::lock_guard lk(mu_);
    return error_;
  }

 private:
  void Run(Change first, const std::function<bool()>& keep_going) {
    std::mt19937_64 rng(seed_);
    constexpr uint64_t kLengths[] = {4096, 8192, 20000, 70000};
    for (int n = 0; !stop_ && keep_going(); ++n) {
      Change c = first;
      bool discard = false;
      if (n > 0) {
        c.disk = rng() % disks_.size();
        const Disk& d = disks_[c.disk];
        c.length = kLengths[rng() % std::size(kLengths)];
        c.offset = rng() % ((d.size - c.length) / 512) * 512;
        discard = n % 7 == 6;
        if (discard) {
          c.offset -= c.offset % applier::kSyncBlockSize;
          c.length = std::min(applier::kSyncBlockSize, d.size - c.offset);
        }
      }
      const Disk& d = disks_[c.disk];
      Status s = discard ? tracker::testing::DiscardVia(*d.observer, d.fd, c.offset, c.length)
                         : WriteVia(*d.observer, d.fd, c.offset, Data(c.length, n));
      if (s.ok() && n % 25 == 24) s = tracker_.Cut().status();
      if (!s.ok()) {
        std::lock_guard lk(mu_);
        error_ = s;
        return;
      }
      if (!discard) bytes_written_ += c.length;
      uint64_t saved = 0;
      for (const tracker::DiskStats& ds : tracker_.Stats().disks) saved += ds.snapshot_bytes;
      if (saved > max_snapshot_bytes_) max_snapshot_bytes_ = saved;
      ++changes_;
      std::this_thread::sleep_for(5ms);
    }
  }

  // What change n writes: distinct from every other change's bytes, but compressible, so
  // that the cycles carrying the guest's changes are cheap on a throttled link.
  std::vector<std::byte> Data(uint64_t length, int n) const {
    std::vector<std::byte> out(length, static_cast<std::byte>(1 + n % 250));
    for (uint64_t at = 0; at + sizeof(uint64_t) <= length; at += 4096) {
      const uint64_t tag = seed_ << 32 | static_cast<uint64_t>(n);
      std::memcpy(out.data() + at, &tag, sizeof(tag));
    }
    return out;
  }

  tracker::VmTracker& tracker_;
  const std::vector<Disk> disks_;
  const uint64_t seed_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<int> changes_{0};
  std::atomic<uint64_t> bytes_written_{0};
  std::atomic<uint64_t> max_snapshot_bytes_{0};
  mutable std::mutex mu_;
  Status error_;
};

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kBlock = applier::kSyncBlockSize;

// Bytes of the kSyncBlockSize blocks of image that are not all zeros (the last block
// counts its bytes within the image): what a copy must send as data.
uint64_t NonZeroBlockBytes(const std::vector<std::byte>& image) {
  uint64_t n = 0;
  for (uint64_t at = 0; at < image.size(); at += kBlock) {
    const uint64_t len = std::min<uint64_t>(kBlock, image.size() - at);
    const auto first = image.begin() + static_cast<ptrdiff_t>(at);
    if (std::any_of(first, first + static_cast<ptrdiff_t>(len),
                    [](std::byte b) { return b != std::byte{0}; })) {
      n += len;
    }
  }
  return n;
}

// The first byte where a and b differ (their common size if none, and a differing size
// counts as a difference at the shorter one's end), for messages that say where.
size_t FirstDiff(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return i;
  }
  return a.size() == b.size() ? SIZE_MAX : n;
}

class LinkTest : public tracker::testing::TrackerFixture {
 protected:
  void SetUp() override {
    Result<testing::TestPki> pki = testing::TestPki::Create(tmp_.path() / "pki");
    ASSERT_TRUE(pki.ok()) << pki.status().ToString();
    pki_.emplace(std::move(*pki));
    east_ = Context(pki_->Site("east"));
    west_ = Context(pki_->Site("west"));
  }
  void TearDown() override {
    failpoint::DisarmAll();
    shipper_.reset();
    receiver_.reset();
    sync_.reset();  // after the shipper, which calls it
  }

  static std::shared_ptr<const TlsContext> Context(const TlsIdentity& id) {
    Result<std::shared_ptr<TlsContext>> c = TlsContext::Create(id);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? std::shared_ptr<const TlsContext>(*c) : nullptr;
  }

  applier::ReplicaDefinition Definition() const {
    applier::ReplicaDefinition d;
    d.vm = "vm1";
    d.primary_site = "east";
    d.epoch = 3;
    for (const DiskFiles& f : disks_) {
      d.disks.push_back({f.name, tracker::DiskIdFor("vm1", f.name), f.size});
    }
    return d;
  }

  // Two disks and an open tracker without a cycle timer.
  void OpenTracker(uint64_t size = 8 << 20) {
    AddDisk("os", size);
    AddDisk("data", size / 2);
    tracker_ = Open(Options());
    ASSERT_TRUE(tracker_);
    sink_ = std::make_unique<RecordingSink>(tmp_.path() / "sink", Definition());
  }

  // Writes data to disk i at offset.
  void Write(size_t i, uint64_t offset, const std::vector<std::byte>& data) {
    ASSERT_TRUE(WriteVia(tracker_->observer(i), disks_[i].fd.get(), offset, data).ok());
  }
  uint64_t Cut() {
    Result<uint64_t> c = tracker_->Cut();
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? *c : 0;
  }
  // Remembers every sealed segment's bytes (read as the shipper would), to compare with
  // what the sink got.
  void SnapshotSealed() {
    for (const tracker::SealedSegment& s : tracker_->SealedSegments()) {
      Result<std::unique_ptr<tracker::SegmentStream>> stream = tracker_->OpenSegment(s);
      ASSERT_TRUE(stream.ok()) << stream.status().ToString();
      Result<std::vector<std::byte>> bytes = tracker::ReadSegment(**stream);
      ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
      expected_[{s.disk_id, s.number}] = std::move(*bytes);
    }
  }
  void ExpectSinkHasEverySegment() {
    ASSERT_FALSE(expected_.empty());
    for (const auto& [key, bytes] : expected_) {
      const fs::path p = sink_->PathOf(key.first, key.second);
      ASSERT_TRUE(fs::exists(p)) << p;
      EXPECT_TRUE(ReadWhole(p) == bytes)
          << "segment " << key.second << " of disk " << key.first << " differs at the sink";
    }
  }

  void StartReceiver(std::vector<std::string> allowed = {"east"},
                     std::chrono::milliseconds io_timeout = 15s, PeerHandler peer_handler = {}) {
    ReceiverOptions o;
    o.peer_handler = std::move(peer_handler);
    o.site = "west";
    o.listen = "127.0.0.1:0";
    o.tls = west_;
    o.allowed_peers = std::move(allowed);
    o.io_timeout = io_timeout;
    o.provider = [this](const std::string& peer,
                        const applier::ReplicaDefinition& def) -> Result<applier::SegmentSink*> {
      ++provider_calls_;
      {
        std::lock_guard lk(refusal_mu_);
        if (!refusal_.ok()) return refusal_;
      }
      EXPECT_EQ(peer, "east");
      EXPECT_EQ(def.vm, "vm1");
      if (replica_) return static_cast<applier::SegmentSink*>(replica_.get());
      return sink_.get();
    };
    Result<std::unique_ptr<Receiver>> r = Receiver::Start(std::move(o));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    receiver_ = std::move(*r);
  }

  ShipperOptions ShipperOpts(uint16_t port) {
    ShipperOptions o;
    o.site = "east";
    o.peer = "west";
    o.peer_address = "127.0.0.1:" + std::to_string(port);
    o.tls = east_;
    o.definition = Definition();
    o.source = tracker_.get();
    o.heartbeat = 100ms;
    o.min_backoff = 20ms;
    o.max_backoff = 200ms;
    o.io_timeout = 5s;
    return o;
  }
  void StartShipper(ShipperOptions o) {
    Result<std::unique_ptr<Shipper>> s = Shipper::Start(std::move(o));
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    shipper_ = std::move(*s);
  }
  bool WaitAcked(uint64_t cycle, std::chrono::milliseconds timeout = 30s) {
    const bool ok = WaitFor([&] { return shipper_->Stats().acked_cycle >= cycle; }, timeout);
    if (!ok) ADD_FAILURE() << "not acked: " << shipper_->Stats().last_error;
    return ok;
  }

  // --- Syncs ------------------------------------------------------------------------------

  // A disk whose image is laid out by pieces: pattern data, or zeros written out (allocated
  // all-zero blocks); whatever no piece covers is a hole.
  struct Piece {
    uint64_t offset = 0;
    uint64_t length = 0;
    bool zeros = false;
  };
  void AddLaidOutDisk(const std::string& name, uint64_t size, const std::vector<Piece>& pieces) {
    DiskFiles d;
    d.name = name;
    d.image = tmp_.path() / (name + ".img");
    d.pre_image = tmp_.path() / (name + ".pre");
    d.log_dir = tmp_.path() / (name + ".img.srlog");
    d.size = size;
    {
      UniqueFd fd(::open(d.image.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
      ASSERT_TRUE(fd.valid());
      ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
      uint64_t seed = std::hash<std::string>()(name);
      for (const Piece& p : pieces) {
        const std::vector<std::byte> bytes =
            p.zeros ? std::vector<std::byte>(p.length) : Pattern(p.length, ++seed);
        ASSERT_TRUE(PWriteAll(fd.get(), bytes.data(), bytes.size(), p.offset, "image").ok());
      }
    }
    fs::copy_file(d.image, d.pre_image);
    d.fd = tracker::testing::OpenRw(d.image);
    disks_.push_back(std::move(d));
  }

  // The sync source over tracker_, and the snapshot of a sync of kind.
  Result<tracker::SnapshotInfo> BeginSync(applier::SyncKind kind) {
    std::vector<int> fds;
    for (const DiskFiles& d : disks_) fds.push_back(d.fd.get());
    sync_ = std::make_unique<TrackerSyncSource>(*tracker_, std::move(fds), Definition().epoch);
    return sync_->Begin(kind);
  }
  ShipperOptions SyncShipperOpts(uint16_t port) {
    ShipperOptions o = ShipperOpts(port);
    o.sync = sync_.get();
    return o;
  }
  bool WaitSynced(std::chrono::milliseconds timeout = 20s) {
    const bool ok = WaitFor([&] { return sync_->done(); }, timeout);
    if (!ok) ADD_FAILURE() << "the sync did not finish: " << shipper_->Stats().last_error;
    return ok;
  }
  // The real applier in dir (images already there are its seed), applying as cycles come.
  // recovery_points > 0: the first point (a sync's) is kept for an hour of cuts.
  void StartReplica(const fs::path& dir, int recovery_points = 0) {
    applier::ReplicaDefinition def = Definition();
    def.recovery_points = recovery_points;
    def.recovery_point_interval_ms = 3600 * 1000;
    Result<std::unique_ptr<applier::Replica>> replica = applier::Replica::Create(dir, def);
    ASSERT_TRUE(replica.ok()) << replica.status().ToString();
    replica_ = std::move(*replica);
    ASSERT_TRUE(replica_->Start().ok());
  }
  bool WaitApplied(uint64_t cycle, std::chrono::milliseconds timeout = 20s) {
    const bool ok = WaitFor([&] { return shipper_->Stats().applied_cycle >= cycle; }, timeout);
    if (!ok) {
      ADD_FAILURE() << "cycle " << cycle << " not applied: " << shipper_->Stats().last_error
                    << " / " << shipper_->Stats().peer_apply_error;
    }
    return ok;
  }
  // Every image of the replica (or of the sink when there is no replica) equals the
  // primary's.
  void ExpectReplicaEqualsPrimary() {
    for (size_t i = 0; i < disks_.size(); ++i) {
      const std::vector<std::byte> primary = ReadWhole(disks_[i].image);
      const std::vector<std::byte> replica = replica_ ? ReadWhole(replica_->ImagePath(i))
                                                      : sink_->Image(Definition().disks[i].disk_id);
      const size_t diff = FirstDiff(primary, replica);
      EXPECT_EQ(diff, SIZE_MAX) << "disk " << disks_[i].name << ": the replica differs at byte "
                                << diff << " (block " << diff / kBlock << ")";
    }
  }

  // A primary by hand: a TLS connection to the receiver whose Hello was accepted.
  std::unique_ptr<TlsStream> RawConnect() {
    Result<std::unique_ptr<TlsStream>> s =
        TlsConnect(*east_, "127.0.0.1:" + std::to_string(receiver_->port()), "west",
                   std::chrono::steady_clock::now() + 5s);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (!s.ok()) return nullptr;
    Hello h;
    h.from = "east";
    h.to = "west";
    h.definition = Definition();
    RawSend(**s, FrameType::kHello, EncodeHello(h));
    auto [type, payload] = RawRead(**s);
    EXPECT_EQ(type, FrameType::kHelloReply);
    Result<HelloReply> reply = DecodeHelloReply(payload);
    EXPECT_TRUE(reply.ok() && reply->accepted);
    return std::move(*s);
  }
  static void RawSend(TlsStream& stream, FrameType type, const std::vector<std::byte>& payload) {
    EXPECT_TRUE(
        stream.WriteAll(EncodeFrame(type, payload), std::chrono::steady_clock::now() + 5s).ok());
  }
  // The next frame, or type 0 when the connection ended (or failed).
  static std::pair<FrameType, std::vector<std::byte>> RawRead(TlsStream& stream) {
    std::vector<std::byte> payload;
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    Result<FrameHeader> h = ReadFrame(
        [&](std::span<std::byte> out) { return stream.ReadExact(out, deadline); }, &payload);
    if (!h.ok()) return {FrameType(0), {}};
    EXPECT_TRUE(VerifyFrame(*h, payload).ok());
    return {h->type, std::move(payload)};
  }
  // The receiver answers with an Error frame (code, reason containing why), then closes.
  static void ExpectErrorAndClose(TlsStream& stream, int code, std::string_view why) {
    auto [type, payload] = RawRead(stream);
    ASSERT_EQ(type, FrameType::kError) << FrameTypeName(type);
    Result<ErrorFrame> e = DecodeError(payload);
    ASSERT_TRUE(e.ok());
    EXPECT_EQ(e->code, static_cast<uint32_t>(code)) << e->reason;
    EXPECT_NE(e->reason.find(why), std::string::npos) << e->reason;
    EXPECT_EQ(RawRead(stream).first, FrameType(0)) << "the receiver closes the connection";
  }
  applier::SyncPlan RawPlan(uint64_t sync_id) const {
    applier::SyncPlan p;
    p.sync_id = sync_id;
    p.kind = applier::SyncKind::kInitial;
    p.cut_unix_nanos = 12345;
    p.epoch = Definition().epoch;
    for (const applier::DiskDefinition& d : Definition().disks) {
      p.disks.push_back({d.disk_id, applier::SyncMode::kCopy, 10, 4, d.size});
    }
    return p;
  }

  std::optional<testing::TestPki> pki_;
  std::shared_ptr<const TlsContext> east_, west_;
  std::unique_ptr<tracker::VmTracker> tracker_;
  std::unique_ptr<RecordingSink> sink_;
  std::unique_ptr<applier::Replica> replica_;  // when set, the provider hands out this one
  std::unique_ptr<Receiver> receiver_;
  std::unique_ptr<TrackerSyncSource> sync_;  // outlives shipper_
  std::unique_ptr<Shipper> shipper_;
  std::map<std::pair<uint32_t, uint64_t>, std::vector<std::byte>> expected_;
  std::atomic<int> provider_calls_{0};
  std::mutex refusal_mu_;
  Status refusal_;  // what the provider answers when not ok; guarded by refusal_mu_
  void SetRefusal(Status s) {
    std::lock_guard lk(refusal_mu_);
    refusal_ = std::move(s);
  }
};

// (a) Cycles arrive in order, byte-identical, and the source is released through the ack.
TEST_F(LinkTest, ShipsCyclesInOrderAndReleasesTheSource) {
  OpenTracker();
  Write(0, 0, Pattern(3 << 20, 1));  // several chunks
  Write(1, 4096, Pattern(1000, 2));
  EXPECT_EQ(Cut(), 1u);
  Write(1, 0, Pattern(200 << 10, 3));
  EXPECT_EQ(Cut(), 2u);
  Write(0, 100, Pattern(10, 4));
  EXPECT_EQ(Cut(), 3u);
  SnapshotSealed();
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitAcked(3));
  // Live: a cycle sealed while connected goes out through the sealed callback.
  Write(1, 8192, Pattern(5000, 5));
  EXPECT_EQ(Cut(), 4u);
  SnapshotSealed();
  ASSERT_TRUE(WaitAcked(4));

  EXPECT_EQ(sink_->Commits(), (std::vector<uint64_t>{1, 2, 3, 4}));
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
  ExpectSinkHasEverySegment();
  EXPECT_TRUE(WaitFor([&] { return tracker_->SealedSegments().empty(); }))
      << "acknowledged segments are released";
  const std::vector<applier::CycleInfo> infos = sink_->CommitInfos();
  for (const applier::CycleInfo& c : infos) EXPECT_GT(c.cut_unix_nanos, 0);
  EXPECT_GT(infos[0].first_change_unix_nanos, 0);
  EXPECT_LE(infos[0].first_change_unix_nanos, infos[0].cut_unix_nanos);

  const ShipperStats s = shipper_->Stats();
  EXPECT_TRUE(s.connected);
  EXPECT_EQ(s.connects, 1u);
  EXPECT_EQ(s.sent_cycle, 4u);
  EXPECT_EQ(s.applied_cycle, 4u);
  EXPECT_EQ(s.pending_bytes, 0u);
  EXPECT_EQ(s.oldest_unapplied_change_unix_nanos, 0) << "everything applied";
  EXPECT_GT(s.bytes_raw, 3u << 20);
  EXPECT_TRUE(s.last_error.empty()) << s.last_error;
  EXPECT_GT(s.last_contact_unix_nanos, 0);
  const std::vector<ReceiverVmStats> rs = receiver_->Stats();
  ASSERT_EQ(rs.size(), 1u);
  EXPECT_EQ(rs[0].vm, "vm1");
  EXPECT_EQ(rs[0].peer, "east");
  EXPECT_TRUE(rs[0].connected);
  EXPECT_EQ(rs[0].bytes_raw, s.bytes_raw);
  EXPECT_EQ(rs[0].received_cycle, 4u);
  EXPECT_EQ(provider_calls_, 1);
}

// With the real applier: after shipping and applying, the replica images equal the
// primary's images.
TEST_F(LinkTest, TheRealReplicaEndsEqualToThePrimary) {
  OpenTracker();
  const fs::path dir = tmp_.path() / "replica";
  fs::create_directories(dir);
  for (const DiskFiles& d : disks_) fs::copy_file(d.pre_image, dir / (d.name + ".img"));  // seed
  Result<std::unique_ptr<applier::Replica>> replica = applier::Replica::Create(dir, Definition());
  ASSERT_TRUE(replica.ok()) << replica.status().ToString();
  replica_ = std::move(*replica);
  ASSERT_TRUE(replica_->Start().ok());
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  for (int c = 0; c < 5; ++c) {
    Write(0, (c * 700) << 10, Pattern((c + 1) * (300 << 10), 10 + c));
    Write(1, c * 4096 + 17, Pattern(5000, 20 + c));
    ASSERT_EQ(Cut(), static_cast<uint64_t>(c + 1));
  }
  ASSERT_TRUE(WaitFor([&] { return shipper_->Stats().applied_cycle >= 5; }, 30s))
      << shipper_->Stats().last_error << " / " << shipper_->Stats().peer_apply_error;
  EXPECT_TRUE(shipper_->Stats().peer_apply_error.empty());
  for (size_t i = 0; i < disks_.size(); ++i) {
    EXPECT_TRUE(ReadWhole(replica_->ImagePath(i)) == ReadWhole(disks_[i].image))
        << "replica of disk " << disks_[i].name << " differs from the primary";
  }
  shipper_.reset();
  receiver_.reset();
  replica_->Stop();
}

// (b) The link is cut mid-stream, twice: the shipper reconnects and resumes after the
// replica's received cycle; the sink sees no gap and no duplicate.
TEST_F(LinkTest, ResumesAfterTheLinkIsCutWithoutGapOrDuplicate) {
  OpenTracker(16 << 20);
  constexpr int kCycles = 8;
  for (int c = 0; c < kCycles; ++c) {
    Write(c % 2, (c % 4) << 20, Pattern(1 << 20, 100 + c));
    ASSERT_EQ(Cut(), static_cast<uint64_t>(c + 1));
  }
  SnapshotSealed();
  StartReceiver();
  TcpProxy proxy(receiver_->port());
  ShipperOptions o = ShipperOpts(proxy.port());
  o.compress = false;
  o.bandwidth_limit = 4 << 20;  // ~2 s in all, so the cuts land mid-stream
  StartShipper(std::move(o));
  ASSERT_TRUE(WaitAcked(2));
  proxy.CutAll();
  ASSERT_TRUE(WaitFor([&] { return shipper_->Stats().connects >= 2; }));
  ASSERT_TRUE(WaitAcked(5));
  proxy.CutAll();
  ASSERT_TRUE(WaitAcked(kCycles));
  EXPECT_GE(shipper_->Stats().connects, 3u);
  std::vector<uint64_t> want;
  for (uint64_t c = 1; c <= kCycles; ++c) want.push_back(c);
  EXPECT_EQ(sink_->Commits(), want);
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
  ExpectSinkHasEverySegment();
}

// A dead link (no FIN, no RST): the shipper times out and reconnects, and the receiver
// lets the new connection take the VM over from the stalled one at once, long before its
// own io_timeout.
TEST_F(LinkTest, ANewConnectionReplacesAStalledOne) {
  OpenTracker();
  Write(0, 0, Pattern(4096, 1));
  ASSERT_EQ(Cut(), 1u);
  StartReceiver({"east"}, /*io_timeout=*/60s);
  TcpProxy proxy(receiver_->port());
  ShipperOptions o = ShipperOpts(proxy.port());
  o.io_timeout = 1s;
  StartShipper(std::move(o));
  ASSERT_TRUE(WaitAcked(1));
  proxy.FreezeAll();
  Write(1, 0, Pattern(4096, 2));
  ASSERT_EQ(Cut(), 2u);
  SnapshotSealed();
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(WaitAcked(2, 20s));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 30s);
  EXPECT_GE(proxy.accepted(), 2);
  EXPECT_EQ(sink_->Commits(), (std::vector<uint64_t>{1, 2}));
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
}

// The replica commits a cycle but the Ack is lost: after reconnecting, the HelloReply's
// received cycle keeps the shipper from sending it again.
TEST_F(LinkTest, ACommittedCycleWhoseAckWasLostIsNotSentAgain) {
  OpenTracker();
  Write(0, 0, Pattern(100 << 10, 1));
  ASSERT_EQ(Cut(), 1u);
  Write(1, 0, Pattern(100 << 10, 2));
  ASSERT_EQ(Cut(), 2u);
  SnapshotSealed();
  ASSERT_TRUE(failpoint::Arm("receiver.before_ack=error*1").ok());
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitAcked(2));
  EXPECT_EQ(shipper_->Stats().connects, 2u);
  EXPECT_EQ(sink_->Commits(), (std::vector<uint64_t>{1, 2}));
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
  ExpectSinkHasEverySegment();
}

// (c) A frame damaged after decryption fails its CRC: it is refused, nothing of it reaches
// the sink, and the shipper reconnects and completes delivery.
TEST_F(LinkTest, ACorruptFrameIsRefusedAndDeliveryCompletesAfterReconnect) {
  OpenTracker();
  Write(0, 0, Pattern(4096, 1));
  ASSERT_EQ(Cut(), 1u);
  SnapshotSealed();
  // The receiver's first frame after Hello is the shipper's first Heartbeat; the second is
  // the first chunk.
  ASSERT_TRUE(failpoint::Arm("receiver.corrupt_frame=trigger@1*1").ok());
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitAcked(1));
  EXPECT_EQ(shipper_->Stats().connects, 2u);
  // One chunk per disk, each written once: the corrupt copy never reached the sink.
  EXPECT_EQ(sink_->write_calls(), 2u);
  EXPECT_EQ(sink_->Commits(), (std::vector<uint64_t>{1}));
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
  ExpectSinkHasEverySegment();
  const std::vector<ReceiverVmStats> rs = receiver_->Stats();
  ASSERT_EQ(rs.size(), 1u);
  // The refused connection's reason stays until a later connection ends badly.
  EXPECT_NE(rs[0].last_error.find("CRC mismatch"), std::string::npos) << rs[0].last_error;
}

// A save to the copy-on-write of an unshipped cycle fails (a full log folder, an I/O
// error; here the failpoint): that cycle can no longer be read as it was at the cut, so it
// is never sent whole, the replica stays at the cycle before, and the disk drops its log
// for a resync of the cycle's blocks and those changed since. The resync brings the
// replica in line.
TEST_F(LinkTest, AFailedCopyOnWriteIsNotShippedAndItsDiskIsResyncedInstead) {
  OpenTracker();
  const fs::path dir = tmp_.path() / "replica";
  fs::create_directories(dir);
  for (const DiskFiles& d : disks_) fs::copy_file(d.pre_image, dir / (d.name + ".img"));
  StartReplica(dir);
  Write(0, 0, Pattern(300 << 10, 1));
  Write(1, 4096, Pattern(5000, 2));
  ASSERT_EQ(Cut(), 1u);
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitApplied(1));
  shipper_->Pause();
  Write(0, 1 << 20, Pattern(200 << 10, 3));
  Write(1, 0, Pattern(4096, 4));
  ASSERT_EQ(Cut(), 2u);
  ASSERT_TRUE(failpoint::Arm("tracker.cow_save=error*1").ok());
  Write(0, (1 << 20) + 8192, Pattern(4096, 5));  // frozen in cycle 2: the save fails
  shipper_->Resume();
  ASSERT_TRUE(WaitFor(
      [&] { return tracker_->Stats().disks[0].tracking == tracker::DiskTracking::kBitmap; }));
  const tracker::DiskStats os = tracker_->Stats().disks[0];
  EXPECT_TRUE(os.resync_required);
  EXPECT_NE(os.resync_reason.find("failpoint tracker.cow_save"), std::string::npos)
      << os.resync_reason;
  EXPECT_EQ(os.dirty_bytes, 200u << 10) << "cycle 2's blocks of os";
  std::this_thread::sleep_for(300ms);
  const applier::ReplicaPosition pos = replica_->Position();
  EXPECT_EQ(pos.received_cycle, 1u);
  EXPECT_EQ(pos.applied_cycle, 1u);
  EXPECT_TRUE(pos.apply_error.empty()) << pos.apply_error;

  shipper_.reset();
  Result<tracker::SnapshotInfo> info = BeginSync(applier::SyncKind::kResync);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  ASSERT_EQ(info->disks.size(), 2u);
  EXPECT_TRUE(info->disks[0].resync);
  EXPECT_FALSE(info->disks[0].all_dirty);
  EXPECT_EQ(info->disks[0].dirty, (std::vector<tracker::ByteRange>{{1 << 20, 256 << 10}}));
  StartShipper(SyncShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitSynced());
  ASSERT_TRUE(WaitApplied(info->cycle));
  ExpectReplicaEqualsPrimary();
  EXPECT_EQ(tracker_->Stats().disks[0].tracking, tracker::DiskTracking::kLog);
  EXPECT_FALSE(tracker_->Stats().disks[0].resync_required);
  shipper_.reset();
  receiver_.reset();
  replica_->Stop();
}

// (d) A certificate from another CA is refused in the handshake: no Hello, no sink.
TEST_F(LinkTest, APeerWithACertificateFromAnotherCaIsRefused) {
  OpenTracker();
  Write(0, 0, Pattern(4096, 1));
  ASSERT_EQ(Cut(), 1u);
  Result<testing::TestPki> other = testing::TestPki::Create(tmp_.path() / "other-pki");
  ASSERT_TRUE(other.ok());
  TlsIdentity forged = other->Site("east");
  forged.ca = pki_->ca_cert();  // it trusts the real CA, so only the receiver can object
  StartReceiver();
  ShipperOptions o = ShipperOpts(receiver_->port());
  o.tls = Context(forged);
  ASSERT_TRUE(o.tls);
  StartShipper(std::move(o));
  ASSERT_TRUE(WaitFor([&] { return shipper_->Stats().refused; }));
  const ShipperStats s = shipper_->Stats();
  EXPECT_FALSE(s.connected);
  EXPECT_FALSE(s.last_error.empty());
  EXPECT_EQ(s.acked_cycle, 0u);
  EXPECT_TRUE(WaitFor([&] { return !receiver_->RefusedPeers().empty(); }));
  EXPECT_EQ(provider_calls_, 0);
  EXPECT_EQ(sink_->write_calls(), 0u);
  EXPECT_TRUE(receiver_->Stats().empty());
}

TEST_F(LinkTest, AHelloFromAnotherSiteThanTheCertificateIsRefused) {
  OpenTracker();
  Write(0, 0, Pattern(4096, 1));
  ASSERT_EQ(Cut(), 1u);
  StartReceiver();
  ShipperOptions o = ShipperOpts(receiver_->port());
  o.site = "north";  // the certificate says "east"
  o.definition.primary_site = "north";
  StartShipper(std::move(o));
  ASSERT_TRUE(WaitFor([&] { return shipper_->Stats().refused; }));
  const ShipperStats s = shipper_->Stats();
  EXPECT_EQ(s.refusal, "unknown_site");
  EXPECT_NE(s.last_error.find("certificate names site east"), std::string::npos) << s.last_error;
  EXPECT_EQ(provider_calls_, 0);
  EXPECT_EQ(sink_->write_calls(), 0u);
}

// (g) The provider's refusal reaches the shipper's stats, name and message.
TEST_F(LinkTest, AProviderRefusalReachesTheShipper) {
  OpenTracker();
  Write(0, 0, Pattern(4096, 1));
  ASSERT_EQ(Cut(), 1u);
  SetRefusal(Status::Error(ESTALE, "the replica of vm1 is at epoch 9"));
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitFor([&] { return shipper_->Stats().refused; }));
  const ShipperStats s = shipper_->Stats();
  EXPECT_EQ(s.refusal, "epoch_older");
  EXPECT_NE(s.last_error.find("the replica of vm1 is at epoch 9"), std::string::npos)
      << s.last_error;
  EXPECT_FALSE(s.connected);
  EXPECT_EQ(sink_->write_calls(), 0u);
  EXPECT_FALSE(tracker_->SealedSegments().empty()) << "nothing released";
  // Once the replica accepts, replication starts on the next (slow) retry.
  SetRefusal(Status::Ok());
  ASSERT_TRUE(WaitAcked(1));
  EXPECT_FALSE(shipper_->Stats().refused);
  EXPECT_TRUE(shipper_->Stats().last_error.empty());
}

// The replica holds a newer epoch (the primary was failed over and must be fenced): the
// first refused Hello shows in Stats at once, with the refusal's name and message, and the
// shipper keeps retrying with its backoff, never sending a segment.
TEST_F(LinkTest, AnEpochOlderRefusalShowsAtOnceAndIsRetriedWithBackoff) {
  OpenTracker();
  Write(0, 0, Pattern(4096, 1));
  ASSERT_EQ(Cut(), 1u);
  const std::string message = "VM vm1 is at epoch 9 on site west, the primary at epoch 3";
  SetRefusal(Status::Error(ESTALE, message));
  StartReceiver();
  ShipperOptions o = ShipperOpts(receiver_->port());
  o.min_backoff = 20ms;
  o.max_backoff = 300ms;
  const auto start = std::chrono::steady_clock::now();
  StartShipper(std::move(o));
  ASSERT_TRUE(WaitFor([&] { return shipper_->Stats().refused; }, 5s));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s) << "the first refusal shows at once";
  EXPECT_EQ(provider_calls_, 1);
  ShipperStats s = shipper_->Stats();
  EXPECT_EQ(s.refusal, "epoch_older");
  EXPECT_EQ(s.refusal_message, message);
  EXPECT_NE(s.last_error.find(message), std::string::npos) << s.last_error;
  EXPECT_FALSE(s.connected);
  // Retried, but at the refusal's pace (max_backoff), not hammered.
  ASSERT_TRUE(WaitFor([&] { return provider_calls_ >= 3; }, 10s));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 550ms);
  s = shipper_->Stats();
  EXPECT_TRUE(s.refused);
  EXPECT_EQ(s.refusal, "epoch_older");
  EXPECT_EQ(s.refusal_message, message);
  EXPECT_EQ(s.connects, 0u);
  EXPECT_EQ(s.sent_cycle, 0u);
  EXPECT_EQ(s.bytes_wire, 0u);
  EXPECT_EQ(sink_->write_calls(), 0u) << "nothing reaches the sink of a refusing replica";
  EXPECT_TRUE(sink_->Commits().empty());
  EXPECT_FALSE(tracker_->SealedSegments().empty()) << "nothing released";
}

// --- DropVm ----------------------------------------------------------------------------

// This site stops being the VM's replica (a promotion): DropVm ends the live connection,
// resets the VM's stats, and the primary's reconnects go through the provider again (here
// refused until the replica is taken back, then accepted).
TEST_F(LinkTest, DropVmEndsTheConnectionAndHellosGoThroughTheProviderAgain) {
  OpenTracker();
  Write(0, 0, Pattern(100 << 10, 1));
  ASSERT_EQ(Cut(), 1u);
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitAcked(1));
  ASSERT_EQ(receiver_->Stats().size(), 1u);
  EXPECT_GT(receiver_->Stats()[0].bytes_raw, 0u);
  const int calls = provider_calls_;
  const uint64_t connects = shipper_->Stats().connects;

  SetRefusal(Status::Error(EPERM, "VM vm1 is primary on site west"));
  receiver_->DropVm("vm1");
  // Gone, or back only as the refused reconnect: the old counters are not there.
  for (const ReceiverVmStats& st : receiver_->Stats()) {
    EXPECT_EQ(st.bytes_raw, 0u);
    EXPECT_EQ(st.received_cycle, 0u);
  }
  ASSERT_TRUE(WaitFor([&] { return shipper_->Stats().refusal == "not_permitted"; }));
  EXPECT_GT(provider_calls_, calls);
  Write(1, 0, Pattern(4096, 2));
  ASSERT_EQ(Cut(), 2u);
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(sink_->Commits(), (std::vector<uint64_t>{1}));

  SetRefusal(Status::Ok());
  ASSERT_TRUE(WaitAcked(2));
  EXPECT_EQ(sink_->Commits(), (std::vector<uint64_t>{1, 2}));
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
  EXPECT_GT(shipper_->Stats().connects, connects);
  ASSERT_EQ(receiver_->Stats().size(), 1u);
  EXPECT_TRUE(receiver_->Stats()[0].connected);

  // Without a connection, DropVm only forgets the stats.
  shipper_->Stop();
  ASSERT_TRUE(WaitFor([&] { return !receiver_->Stats()[0].connected; }));
  receiver_->DropVm("vm1");
  EXPECT_TRUE(receiver_->Stats().empty());
  receiver_->DropVm("no-such-vm");
}

// DropVm returns only once the connection's thread has left the sink: here it is inside a
// slow CommitCycle when DropVm is called.
TEST_F(LinkTest, DropVmWaitsUntilTheConnectionHasLeftTheSink) {
  OpenTracker();
  Write(0, 0, Pattern(4096, 1));
  ASSERT_EQ(Cut(), 1u);
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitAcked(1));
  sink_->HoldCommits();
  Write(0, 8192, Pattern(4096, 2));
  ASSERT_EQ(Cut(), 2u);
  ASSERT_TRUE(WaitFor([&] { return sink_->commits_in_progress() == 1; }));

  SetRefusal(Status::Error(EPERM, "VM vm1 is primary on site west"));
  std::future<void> dropped = std::async(std::launch::async, [&] { receiver_->DropVm("vm1"); });
  EXPECT_EQ(dropped.wait_for(300ms), std::future_status::timeout)
      << "DropVm returned while the connection was inside CommitCycle";
  sink_->ReleaseCommits();
  ASSERT_EQ(dropped.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(sink_->commits_in_progress(), 0);
  // The provider refuses now, so nothing touches the sink any more.
  const uint64_t writes = sink_->write_calls();
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(sink_->write_calls(), writes);
  EXPECT_EQ(shipper_->Stats().refusal, "not_permitted");

  SetRefusal(Status::Ok());
  ASSERT_TRUE(WaitAcked(2));
  EXPECT_EQ(sink_->Commits(), (std::vector<uint64_t>{1, 2}));
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
}

// How control/ promotes on a peer's request: the peer handler makes the provider refuse the
// VM and drops it, on the receiver's own connection thread; the VM's connection ends.
TEST_F(LinkTest, APeerHandlerCanDropAVm) {
  OpenTracker();
  Write(0, 0, Pattern(4096, 1));
  ASSERT_EQ(Cut(), 1u);
  StartReceiver({"east"}, 15s, [this](const std::string& peer, const nlohmann::json& request) {
    SetRefusal(Status::Error(
        EPERM, "VM " + request.at("vm").get<std::string>() + " is primary on site west"));
    receiver_->DropVm(request.at("vm"));
    return nlohmann::json{{"ok", true}, {"asked_by", peer}};
  });
  StartShipper(ShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitAcked(1));
  PeerCallOptions call;
  call.tls = east_;
  call.local_site = "east";
  call.peer_site = "west";
  call.address = "127.0.0.1:" + std::to_string(receiver_->port());
  Result<nlohmann::json> reply = CallPeer(call, {{"op", "promote"}, {"vm", "vm1"}});
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(*reply, (nlohmann::json{{"ok", true}, {"asked_by", "east"}}));
  ASSERT_TRUE(WaitFor([&] { return shipper_->Stats().refusal == "not_permitted"; }));
  EXPECT_FALSE(shipper_->Stats().connected);
}

// (e) The bandwidth limit holds: 2 MiB at 1 MiB/s cannot take less than ~1.5 s.
TEST_F(LinkTest, TheBandwidthLimitIsHonoured) {
  OpenTracker();
  Write(0, 0, Pattern(2 << 20, 1));  // pseudo-random: no help from compression
  ASSERT_EQ(Cut(), 1u);
  StartReceiver();
  ShipperOptions o = ShipperOpts(receiver_->port());
  o.bandwidth_limit = 1 << 20;
  const auto start = std::chrono::steady_clock::now();
  StartShipper(std::move(o));
  ASSERT_TRUE(WaitAcked(1));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(seconds, 1.5);
  EXPECT_GE(shipper_->Stats().bytes_wire, 2u << 20);
}

// (f) Compressible data shrinks on the wire; incompressible data goes raw (never grows).
TEST_F(LinkTest, CompressionShrinksWhatItCanAndSendsTheRestRaw) {
  OpenTracker();
  Write(0, 0, std::vector<std::byte>(2 << 20, std::byte{0x5a}));
  ASSERT_EQ(Cut(), 1u);
  SnapshotSealed();
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitAcked(1));
  ShipperStats s = shipper_->Stats();
  EXPECT_LT(s.bytes_wire * 20, s.bytes_raw) << s.bytes_wire << " of " << s.bytes_raw;
  ExpectSinkHasEverySegment();
  ASSERT_EQ(receiver_->Stats().size(), 1u);
  EXPECT_EQ(receiver_->Stats()[0].bytes_wire, s.bytes_wire);

  const uint64_t raw_before = s.bytes_raw, wire_before = s.bytes_wire;
  Write(0, 0, Pattern(2 << 20, 7));
  ASSERT_EQ(Cut(), 2u);
  SnapshotSealed();
  ASSERT_TRUE(WaitAcked(2));
  s = shipper_->Stats();
  const uint64_t raw = s.bytes_raw - raw_before, wire = s.bytes_wire - wire_before;
  EXPECT_GE(raw, 2u << 20);
  EXPECT_LE(wire, raw) << "a chunk that does not shrink goes raw";
  EXPECT_GT(wire, raw - 4096) << "random data cannot shrink";
  ExpectSinkHasEverySegment();
}

TEST_F(LinkTest, PauseHoldsSegmentsAndResumeSendsThem) {
  OpenTracker();
  Write(0, 0, Pattern(4096, 1));
  ASSERT_EQ(Cut(), 1u);
  StartReceiver();
  ShipperOptions o = ShipperOpts(receiver_->port());
  StartShipper(std::move(o));
  ASSERT_TRUE(WaitAcked(1));
  shipper_->Pause();
  Write(0, 0, Pattern(4096, 2));
  ASSERT_EQ(Cut(), 2u);
  std::this_thread::sleep_for(500ms);
  ShipperStats s = shipper_->Stats();
  EXPECT_TRUE(s.paused);
  EXPECT_TRUE(s.connected) << "heartbeats keep the connection";
  EXPECT_EQ(s.acked_cycle, 1u);
  EXPECT_GT(s.pending_bytes, 0u);
  EXPECT_GT(s.oldest_unapplied_change_unix_nanos, 0) << "cycle 2 is not applied: RPO grows";
  ASSERT_EQ(receiver_->Stats().size(), 1u);
  EXPECT_GT(receiver_->Stats()[0].primary_oldest_unapplied_change_unix_nanos, 0)
      << "the heartbeat carries it";
  shipper_->Resume();
  ASSERT_TRUE(WaitAcked(2));
  EXPECT_EQ(shipper_->Stats().oldest_unapplied_change_unix_nanos, 0);
}

TEST_F(LinkTest, StopIsPromptAndTheReceiverSeesAGoodbye) {
  OpenTracker();
  Write(0, 0, Pattern(4096, 1));
  ASSERT_EQ(Cut(), 1u);
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitAcked(1));
  const auto start = std::chrono::steady_clock::now();
  shipper_->Stop();
  shipper_->Stop();  // idempotent
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
  ASSERT_TRUE(WaitFor([&] { return !receiver_->Stats()[0].connected; }));
  EXPECT_TRUE(receiver_->Stats()[0].last_error.empty()) << receiver_->Stats()[0].last_error;
}

TEST_F(LinkTest, AnUnreachablePeerIsNotARefusal) {
  OpenTracker();
  // A port nobody listens on: bind one, then close it.
  uint16_t port;
  {
    Result<std::unique_ptr<TcpListener>> l = TcpListener::Listen("127.0.0.1:0");
    ASSERT_TRUE(l.ok());
    port = (*l)->port();
  }
  StartShipper(ShipperOpts(port));
  ASSERT_TRUE(WaitFor([&] { return !shipper_->Stats().last_error.empty(); }));
  const ShipperStats s = shipper_->Stats();
  EXPECT_FALSE(s.refused);
  EXPECT_FALSE(s.connected);
}

// --- Syncs end to end ------------------------------------------------------------------

// Initial copy of a VM with data, holes and written-out zero blocks (and a partial last
// block) into the real replica, while a guest writes and discards on through the tracker:
// the copy reads the snapshot's cut (blocks changed ahead of it are saved first), the
// changes go as the cycles after the cut, and the replica ends equal to the primary. Only
// the blocks that hold data at the cut go as data.
TEST_F(LinkTest, AnInitialCopyWhileTheGuestWritesEndsEqualOnTheReplica) {
  AddLaidOutDisk("os", 8 * kMiB,
                 {{0, kMiB},               // data
                  {kMiB, kMiB / 2, true},  // zeros written out
                  {3 * kMiB, 100 * kKiB},  // data ending mid-block
                  {4 * kMiB, kBlock},      // data, zeros, data, zeros
                  {4 * kMiB + kBlock, kBlock, true},
                  {4 * kMiB + 2 * kBlock, kBlock},
                  {4 * kMiB + 3 * kBlock, kBlock, true},
                  {7 * kMiB + 4096, 4096}});    // the rest is holes
  AddLaidOutDisk("data", 4 * kMiB + 20 * kKiB,  // a partial last block
                 {{0, 256 * kKiB, true}, {kMiB, kMiB}, {4 * kMiB, 20 * kKiB}});
  tracker_ = Open(Options());
  ASSERT_TRUE(tracker_);
  Result<tracker::SnapshotInfo> info = BeginSync(applier::SyncKind::kInitial);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const uint64_t sync_id = info->cycle;
  std::vector<std::vector<std::byte>> at_cut;
  uint64_t data_at_cut = 0;
  for (const DiskFiles& d : disks_) {
    at_cut.push_back(ReadWhole(d.image));
    data_at_cut += NonZeroBlockBytes(at_cut.back());
  }
  // 16 + 2 + 2 + 1 blocks of os; 16 blocks and the partial last one of data.
  ASSERT_EQ(data_at_cut, 37 * kBlock + 20 * kKiB);
  StartReplica(tmp_.path() / "replica", /*recovery_points=*/1);  // keeps the sync's point
  StartReceiver();

  // The guest's first change hits a data block of the disk copied last: it is saved.
  GuestWriter guest(*tracker_,
                    {{&tracker_->observer(0), disks_[0].fd.get(), disks_[0].size},
                     {&tracker_->observer(1), disks_[1].fd.get(), disks_[1].size}},
                    /*seed=*/42);
  guest.Start({1, kMiB + 8192, 4096}, [&] { return !sync_->done(); });
  ASSERT_TRUE(WaitFor([&] { return guest.changes() >= 1; }));
  ShipperOptions o = SyncShipperOpts(receiver_->port());
  o.bandwidth_limit = 4 * kMiB;  // over half a second of copy, for the guest to write during
  StartShipper(std::move(o));
  ASSERT_TRUE(WaitSynced());
  guest.Stop();
  ASSERT_TRUE(guest.error().ok()) << guest.error().ToString();
  EXPECT_GT(guest.changes(), 25) << "the guest wrote during the copy, over several cycles";
  EXPECT_GT(guest.max_snapshot_bytes(), 0u) << "blocks changed ahead of the copy were saved";
  EXPECT_FALSE(tracker_->snapshot_active());
  for (const tracker::SnapshotDisk& d : info->disks) {
    EXPECT_FALSE(fs::exists(d.snapshot_path)) << d.snapshot_path;
  }

  // The guest's changes follow as cycles.
  const uint64_t last = Cut();
  ASSERT_GT(last, sync_id);
  ASSERT_TRUE(WaitApplied(last));
  ExpectReplicaEqualsPrimary();
  // The sync itself brought the replica to the cut, not to some mix of the guest's writes:
  // its recovery point is the images as they were at the snapshot.
  for (size_t i = 0; i < disks_.size(); ++i) {
    const fs::path exported = tmp_.path() / ("point-" + disks_[i].name);
    ASSERT_TRUE(replica_->ExportPoint(sync_id, i, exported).ok());
    const size_t diff = FirstDiff(ReadWhole(exported), at_cut[i]);
    EXPECT_EQ(diff, SIZE_MAX) << "point " << sync_id << " of disk " << disks_[i].name
                              << " differs from the cut at byte " << diff;
  }

  const ShipperStats s = shipper_->Stats();
  EXPECT_FALSE(s.sync.active);
  EXPECT_EQ(s.sync.sync_id, sync_id);
  EXPECT_EQ(s.sync.kind, applier::SyncKind::kInitial);
  EXPECT_EQ(s.connects, 1u);
  // Holes and zero blocks went as zero extents: the data at the cut went once, nothing else.
  EXPECT_LE(s.sync.bytes_data, data_at_cut + guest.bytes_written());
  EXPECT_EQ(s.sync.bytes_data, data_at_cut);
  EXPECT_EQ(s.sync.bytes_total, disks_[0].size + disks_[1].size);
  EXPECT_EQ(s.sync.bytes_done, s.sync.bytes_total);
  EXPECT_EQ(s.sync.disk_done, (std::vector<uint64_t>{disks_[0].size, disks_[1].size}));
  EXPECT_EQ(sync_->copied(0), disks_[0].size);
  EXPECT_EQ(sync_->copied(1), disks_[1].size);
  EXPECT_TRUE(s.peer_apply_error.empty()) << s.peer_apply_error;
  EXPECT_FALSE(replica_->Sync().active);
  EXPECT_TRUE(WaitFor([&] { return tracker_->SealedSegments().empty(); }))
      << "every cycle is released once applied";
  shipper_.reset();
  receiver_.reset();
  replica_->Stop();
}

// Seeded enable: the replica starts from a copy that differs from the primary in known
// blocks (two of them because the primary has zeros there, one a hole). Every block is
// compared by hash; only the differing blocks with data go as data, and the cycle before
// the sync's cut is never sent (the sync holds it).
TEST_F(LinkTest, ASeededSyncSendsOnlyTheBlocksThatDiffer) {
  AddDisk("os", 8 * kMiB);
  AddDisk("data", 4 * kMiB);
  // Zeros at the primary: os blocks 10 and 11 written out, data block 20 a hole.
  const std::vector<std::byte> zeros(2 * kBlock);
  ASSERT_TRUE(PWriteAll(disks_[0].fd.get(), zeros.data(), zeros.size(), 10 * kBlock, "os").ok());
  ASSERT_EQ(::fallocate(disks_[1].fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 20 * kBlock,
                        kBlock),
            0);
  const fs::path dir = tmp_.path() / "replica";
  fs::create_directories(dir);
  // The seed: the images as they are, then changed in the blocks below.
  struct Diff {
    size_t disk;
    uint64_t block;
  };
  const std::vector<Diff> seed_diffs = {{0, 3},  {0, 4},  {0, 100}, {1, 7}, {1, 63},  // data
                                        {0, 10}, {0, 11}, {1, 20}};  // zeros at the primary
  for (const DiskFiles& d : disks_) fs::copy_file(d.image, dir / (d.name + ".img"));
  for (const Diff& diff : seed_diffs) {
    UniqueFd fd = tracker::testing::OpenRw(dir / (disks_[diff.disk].name + ".img"));
    const std::vector<std::byte> other = Pattern(kBlock, 900 + diff.block);
    ASSERT_TRUE(PWriteAll(fd.get(), other.data(), other.size(), diff.block * kBlock, "seed").ok());
  }
  tracker_ = Open(Options());
  ASSERT_TRUE(tracker_);
  // A cycle before the sync: its changes reach the replica through the sync.
  Write(0, 50 * kBlock, Pattern(kBlock, 77));
  Write(0, 60 * kBlock + 1000, Pattern(10, 78));
  ASSERT_EQ(Cut(), 1u);
  Result<tracker::SnapshotInfo> info = BeginSync(applier::SyncKind::kSeeded);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  ASSERT_EQ(info->cycle, 2u);
  // What differs, from the files: 7 blocks with data (os 3, 4, 50, 60, 100; data 7, 63)
  // and 3 that are zeros at the primary.
  uint64_t differ_data = 0, differ_zero = 0;
  for (size_t i = 0; i < disks_.size(); ++i) {
    const std::vector<std::byte> primary = ReadWhole(disks_[i].image);
    const std::vector<std::byte> seed = ReadWhole(dir / (disks_[i].name + ".img"));
    ASSERT_EQ(primary.size(), seed.size());
    for (uint64_t at = 0; at < primary.size(); at += kBlock) {
      const std::vector<std::byte> p(primary.begin() + at, primary.begin() + at + kBlock);
      if (std::equal(p.begin(), p.end(), seed.begin() + at)) continue;
      (NonZeroBlockBytes(p) != 0 ? differ_data : differ_zero) += kBlock;
    }
  }
  ASSERT_EQ(differ_data, 7 * kBlock);
  ASSERT_EQ(differ_zero, 3 * kBlock);
  StartReplica(dir);
  StartReceiver();
  StartShipper(SyncShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitSynced());
  ASSERT_TRUE(WaitApplied(2));
  ExpectReplicaEqualsPrimary();
  ShipperStats s = shipper_->Stats();
  EXPECT_EQ(s.sync.kind, applier::SyncKind::kSeeded);
  EXPECT_EQ(s.sync.bytes_total, disks_[0].size + disks_[1].size);
  EXPECT_EQ(s.sync.bytes_data, differ_data);
  EXPECT_EQ(s.bytes_raw, differ_data) << "no segment was sent: cycle 1 came with the sync";
  // Data, hashes (8 bytes per block) and frame headers; nothing else.
  EXPECT_LT(s.sync.bytes_wire, differ_data + 64 * kKiB);
  EXPECT_EQ(s.connects, 1u);
  EXPECT_TRUE(tracker_->SealedSegments().empty()) << "cycles 1 and 2 released by the sync";

  // Delta replication follows.
  Write(1, 5000, Pattern(3000, 79));
  ASSERT_EQ(Cut(), 3u);
  ASSERT_TRUE(WaitApplied(3));
  ExpectReplicaEqualsPrimary();
  shipper_.reset();
  receiver_.reset();
  replica_->Stop();
}

// The link drops in the middle of a copy (the shipper fails right after a SyncData went
// out, as a broken link would): the shipper reconnects, the replica says how far it holds
// each disk durably, and the copy goes on from there instead of from the start.
TEST_F(LinkTest, ACopyCutMidwayResumesFromTheReplicasDurablePosition) {
  OpenTracker();  // os 8 MiB and data 4 MiB, every block data
  sink_->set_durable_step(256 * kKiB);
  Result<tracker::SnapshotInfo> info = BeginSync(applier::SyncKind::kInitial);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const uint64_t data = disks_[0].size + disks_[1].size;
  // os goes as 8 SyncData of 1 MiB and its end; the 11th SyncData, the second MiB of data,
  // is the last one on the first connection.
  ASSERT_TRUE(failpoint::Arm("shipper.after_send=error@10*1").ok());
  StartReceiver();
  ShipperOptions o = SyncShipperOpts(receiver_->port());
  o.bandwidth_limit = 32 * kMiB;  // the receiver keeps up: it holds what was sent
  StartShipper(std::move(o));
  ASSERT_TRUE(WaitSynced());
  EXPECT_TRUE(failpoint::Armed().empty()) << "the failpoint fired";
  ExpectReplicaEqualsPrimary();

  const ShipperStats s = shipper_->Stats();
  EXPECT_EQ(s.connects, 2u);
  EXPECT_FALSE(s.sync.active);
  // 10 MiB went before the drop; a restart from scratch would make it 22 MiB in all.
  EXPECT_GE(s.sync.bytes_data, data);
  EXPECT_LE(s.sync.bytes_data, data + kMiB) << "at most the frame in flight is sent again";
  const std::vector<applier::SyncPlan> plans = sink_->SyncPlans();
  ASSERT_EQ(plans.size(), 2u);
  EXPECT_EQ(plans[0].sync_id, info->cycle);
  EXPECT_EQ(plans[1].sync_id, info->cycle) << "the same sync, resumed";
  EXPECT_EQ(sink_->SyncEnds(), std::vector<uint64_t>{info->cycle});
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
  EXPECT_EQ(sink_->received(), info->cycle);

  // Cycles follow the resumed sync, with no gap and no duplicate.
  Write(0, 123, Pattern(5000, 5));
  Write(1, 456, Pattern(5000, 6));
  ASSERT_EQ(Cut(), info->cycle + 1);
  SnapshotSealed();
  ASSERT_TRUE(WaitAcked(info->cycle + 1));
  EXPECT_EQ(sink_->Commits(), std::vector<uint64_t>{info->cycle + 1});
  ExpectSinkHasEverySegment();
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
}

// The replica ended the sync but the primary did not get to finish it (here its Finished
// fails once; a link lost before the SyncEnd's Ack does the same): on the next connection
// the same sync begins again, the replica says every disk is done, and the sync ends
// without sending anything again.
TEST_F(LinkTest, ASyncTheReplicaEndedIsFinishedOnTheNextConnection) {
  OpenTracker();
  Result<tracker::SnapshotInfo> info = BeginSync(applier::SyncKind::kInitial);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const uint64_t sync_id = info->cycle;
  sync_->FailNextFinished(Status::Error(EIO, "test: the snapshot cannot be ended"));
  StartReplica(tmp_.path() / "replica");
  StartReceiver();
  StartShipper(SyncShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitSynced(10s));
  ExpectReplicaEqualsPrimary();
  const ShipperStats s = shipper_->Stats();
  EXPECT_EQ(s.connects, 2u);
  EXPECT_EQ(s.sync.bytes_data, disks_[0].size + disks_[1].size) << "nothing sent twice";
  EXPECT_EQ(s.acked_cycle, sync_id);
  EXPECT_FALSE(replica_->Sync().active);
  // Delta replication follows.
  Write(0, 4096, Pattern(5000, 3));
  ASSERT_EQ(Cut(), sync_id + 1);
  ASSERT_TRUE(WaitApplied(sync_id + 1));
  ExpectReplicaEqualsPrimary();
  shipper_.reset();
  receiver_.reset();
  replica_->Stop();
}

// Sync frames out of order reach the receiver from a hand-driven primary: each is refused
// with an Error frame naming it, the connection closes, and the sink sees nothing of it.
TEST_F(LinkTest, SyncFramesWithoutASyncBeginAreRefused) {
  OpenTracker();
  StartReceiver();
  const uint32_t os = Definition().disks[0].disk_id;
  {
    std::unique_ptr<TlsStream> peer = RawConnect();
    ASSERT_TRUE(peer);
    RawSend(*peer, FrameType::kSyncData,
            EncodeSyncData(SyncData{os, kSyncZero, 0, 4096, 4096, {}}));
    ExpectErrorAndClose(*peer, EPROTO, "SyncData without a SyncBegin");
  }
  {
    std::unique_ptr<TlsStream> peer = RawConnect();
    ASSERT_TRUE(peer);
    RawSend(*peer, FrameType::kHashRequest, EncodeHashRequest(HashRequest{os, 1, 0}));
    ExpectErrorAndClose(*peer, EPROTO, "HashRequest without a SyncBegin");
  }
  {
    std::unique_ptr<TlsStream> peer = RawConnect();
    ASSERT_TRUE(peer);
    RawSend(*peer, FrameType::kSyncEnd, EncodeSyncEnd(SyncEnd{1, 1}));
    ExpectErrorAndClose(*peer, EPROTO, "SyncEnd without a SyncBegin");
  }
  EXPECT_TRUE(sink_->SyncPlans().empty());
  EXPECT_EQ(sink_->sync_data_calls(), 0u);
  EXPECT_EQ(sink_->hash_calls(), 0u);
  EXPECT_TRUE(sink_->SyncEnds().empty());
  ASSERT_TRUE(WaitFor([&] {
    const std::vector<ReceiverVmStats> rs = receiver_->Stats();
    return rs.size() == 1 && !rs[0].connected;
  }));
  EXPECT_NE(receiver_->Stats()[0].last_error.find("SyncEnd without a SyncBegin"), std::string::npos)
      << receiver_->Stats()[0].last_error;
}

TEST_F(LinkTest, SyncFramesForADiskTheSyncDoesNotHaveAreRefused) {
  OpenTracker();
  StartReceiver();
  for (FrameType type : {FrameType::kSyncData, FrameType::kHashRequest}) {
    std::unique_ptr<TlsStream> peer = RawConnect();
    ASSERT_TRUE(peer);
    RawSend(*peer, FrameType::kSyncBegin, EncodeSyncBegin(RawPlan(5)));
    auto [reply_type, reply_payload] = RawRead(*peer);
    ASSERT_EQ(reply_type, FrameType::kSyncReply);
    Result<SyncReply> reply = DecodeSyncReply(reply_payload);
    ASSERT_TRUE(reply.ok() && reply->accepted);
    const uint32_t unknown = 12345;
    if (type == FrameType::kSyncData) {
      RawSend(*peer, type, EncodeSyncData(SyncData{unknown, kSyncZero, 0, 4096, 4096, {}}));
    } else {
      RawSend(*peer, type, EncodeHashRequest(HashRequest{unknown, 1, 0}));
    }
    ExpectErrorAndClose(*peer, EPROTO,
                        std::string(FrameTypeName(type)) + " for disk id 12345, which sync 5");
  }
  EXPECT_EQ(sink_->SyncPlans().size(), 2u);
  EXPECT_EQ(sink_->sync_data_calls(), 0u) << "nothing reached the sink";
  EXPECT_EQ(sink_->hash_calls(), 0u);
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
}

// The replica refuses the sync (no room): the shipper's stats say refused, with the
// refusal's name and message; once the replica accepts, the sync runs on the next retry.
TEST_F(LinkTest, ARefusedSyncReachesTheShipperAsARefusal) {
  OpenTracker();
  sink_->SetSyncRefusal(Status::Error(ENOSPC, "the replica site has 1 MiB free, needs 12 MiB"));
  Result<tracker::SnapshotInfo> info = BeginSync(applier::SyncKind::kInitial);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  StartReceiver();
  ShipperOptions o = SyncShipperOpts(receiver_->port());
  o.max_backoff = 1s;  // the refused state lasts until the retry
  StartShipper(std::move(o));
  ASSERT_TRUE(WaitFor([&] { return shipper_->Stats().refused; }));
  ShipperStats s = shipper_->Stats();
  EXPECT_EQ(s.refusal, "no_space");
  EXPECT_NE(s.last_error.find("the replica site has 1 MiB free, needs 12 MiB"), std::string::npos)
      << s.last_error;
  EXPECT_NE(s.last_error.find("initial sync"), std::string::npos) << s.last_error;
  EXPECT_FALSE(s.connected);
  EXPECT_TRUE(s.sync.active) << "the sync is still due";
  EXPECT_EQ(sink_->sync_data_calls(), 0u);
  EXPECT_TRUE(tracker_->snapshot_active());

  sink_->SetSyncRefusal(Status::Ok());
  ASSERT_TRUE(WaitSynced());
  s = shipper_->Stats();
  EXPECT_FALSE(s.refused);
  EXPECT_TRUE(s.refusal.empty());
  EXPECT_GE(sink_->SyncPlans().size(), 2u);
  EXPECT_EQ(sink_->SyncEnds(), std::vector<uint64_t>{info->cycle});
  ExpectReplicaEqualsPrimary();
}

// Resync of a disk that fell back to the dirty bitmap (a save to the copy-on-write of its
// unshipped cycle failed, so the blocks of that cycle and those changed since are
// compared): the snapshot returns it to the log, and the other disk with
// the blocks of its unshipped cycles; only the blocks that differ are sent (a block
// rewritten with its own content is not). Then cycles follow, both disks logging again.
TEST_F(LinkTest, AResyncComparesOnlyTheDirtyBlocks) {
  AddDisk("os", 8 * kMiB);
  AddDisk("data", 4 * kMiB);
  tracker_ = Open(Options());
  ASSERT_TRUE(tracker_);
  sink_ = std::make_unique<RecordingSink>(tmp_.path() / "sink", Definition());
  // The replica holds the disks as they were when tracking started.
  for (size_t i = 0; i < disks_.size(); ++i) {
    sink_->SetImage(Definition().disks[i].disk_id, ReadWhole(disks_[i].pre_image));
  }
  for (uint64_t b = 0; b < 8; ++b) Write(0, b * kBlock, Pattern(kBlock, 300 + b));
  Write(1, 5 * kBlock + 100, Pattern(100, 1));
  ASSERT_EQ(Cut(), 1u);
  ASSERT_TRUE(failpoint::Arm("tracker.cow_save=error*1").ok());
  Write(0, 0, Pattern(kBlock, 299));  // frozen in cycle 1: its save fails
  for (uint64_t b = 40; b < 56; ++b) Write(0, b * kBlock, Pattern(kBlock, 400 + b));
  ASSERT_TRUE(WaitFor(
      [&] { return tracker_->Stats().disks[0].tracking == tracker::DiskTracking::kBitmap; }));
  EXPECT_TRUE(tracker_->Stats().disks[0].resync_required);
  const std::vector<std::byte> pre = ReadWhole(disks_[0].pre_image);
  Write(0, 100 * kBlock,
        std::vector<std::byte>(pre.begin() + 100 * kBlock, pre.begin() + 101 * kBlock));
  Write(1, 30 * kBlock, Pattern(2 * kBlock, 2));
  ASSERT_EQ(Cut(), 2u);

  Result<tracker::SnapshotInfo> info = BeginSync(applier::SyncKind::kResync);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const uint64_t sync_id = info->cycle;
  ASSERT_EQ(info->disks.size(), 2u);
  EXPECT_TRUE(info->disks[0].resync);
  EXPECT_FALSE(info->disks[0].all_dirty);
  EXPECT_EQ(info->disks[0].dirty,
            (std::vector<tracker::ByteRange>{
                {0, 8 * kBlock}, {40 * kBlock, 16 * kBlock}, {100 * kBlock, kBlock}}));
  EXPECT_FALSE(info->disks[1].resync);
  EXPECT_EQ(info->disks[1].dirty,
            (std::vector<tracker::ByteRange>{{5 * kBlock, kBlock}, {30 * kBlock, 2 * kBlock}}));
  const uint64_t dirty = 25 * kBlock + 3 * kBlock;
  const uint64_t differ = 27 * kBlock;  // block 100 of os has its old content

  StartReceiver();
  StartShipper(SyncShipperOpts(receiver_->port()));
  ASSERT_TRUE(WaitSynced());
  ExpectReplicaEqualsPrimary();
  ShipperStats s = shipper_->Stats();
  EXPECT_EQ(s.sync.kind, applier::SyncKind::kResync);
  EXPECT_EQ(s.sync.bytes_total, dirty);
  EXPECT_LE(s.sync.bytes_data, dirty);
  EXPECT_EQ(s.sync.bytes_data, differ);
  EXPECT_EQ(sink_->SyncEnds(), std::vector<uint64_t>{sync_id});
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
  const tracker::DiskStats os = tracker_->Stats().disks[0];
  EXPECT_EQ(os.tracking, tracker::DiskTracking::kLog);
  EXPECT_FALSE(os.resync_required) << os.resync_reason;

  // Both disks log again; their next segments continue the sync's plan.
  Write(0, 70 * kBlock + 10, Pattern(1000, 5));
  Write(1, 3 * kBlock, Pattern(kBlock, 6));
  ASSERT_EQ(Cut(), sync_id + 1);
  SnapshotSealed();
  ASSERT_TRUE(WaitAcked(sync_id + 1));
  EXPECT_EQ(sink_->Commits(), std::vector<uint64_t>{sync_id + 1});
  ExpectSinkHasEverySegment();
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
}

// A replica that cannot store what it receives (its state_dir is full) refuses the first
// chunk of a large cycle, with the primary still sending the rest. The receiver lets the
// primary read the Error frame before it closes (no reset that would discard it), so the
// shipper names the replica's reason after every attempt, not "connection reset".
TEST_F(LinkTest, AReplicaThatCannotStoreTellsTheShipperWhyEveryTime) {
  OpenTracker();
  Write(0, 0, Pattern(6 << 20, 1));  // 6 chunks: most are in flight at the refusal
  Write(1, 0, Pattern(3 << 20, 2));
  ASSERT_EQ(Cut(), 1u);
  const std::string why = "write received/os/1.seg.part: No space left on device";
  sink_->SetWriteRefusal(Status::Error(ENOSPC, why));
  StartReceiver();
  StartShipper(ShipperOpts(receiver_->port()));
  // The error of each connection, as the shipper shows it once that connection has ended.
  std::map<uint64_t, std::string> errors;
  const auto until = std::chrono::steady_clock::now() + 20s;
  while (errors.size() < 6 && std::chrono::steady_clock::now() < until) {
    const ShipperStats st = shipper_->Stats();
    if (!st.connected && st.connects > 0 && !st.last_error.empty()) {
      errors[st.connects] = st.last_error;
    }
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_GE(errors.size(), 6u) << "connections: " << shipper_->Stats().connects;
  for (const auto& [n, e] : errors) {
    EXPECT_NE(e.find(why), std::string::npos) << "connection " << n << ": " << e;
  }
  EXPECT_GE(sink_->write_refusals(), 6u);
  // Room again: the same cycle goes through whole.
  sink_->SetWriteRefusal(Status::Ok());
  ASSERT_TRUE(WaitAcked(1));
  EXPECT_EQ(sink_->Commits(), std::vector<uint64_t>{1});
  EXPECT_TRUE(sink_->Violations().empty()) << sink_->Violations().front();
}

}  // namespace
}  // namespace siterep::shipper
