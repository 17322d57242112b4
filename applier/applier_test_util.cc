#include "applier/applier_test_util.h"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <algorithm>

#include "common/crc32c.h"
#include "common/file_util.h"
#include "tracker/cut_stream.h"
#include "tracker/test_util.h"

namespace siterep::applier::testing {
namespace fs = std::filesystem;

PrimaryVm::PrimaryVm(const fs::path& dir, std::vector<PrimaryDisk> disks, uint64_t epoch)
    : epoch_(epoch) {
  tracker::VmTrackerOptions o;
  o.vm = vm_;
  o.epoch = epoch;
  o.cycle = std::chrono::milliseconds(0);
  for (const PrimaryDisk& pd : disks) {
    Disk d;
    d.name = pd.name;
    d.size = pd.size;
    d.image = dir / (pd.name + ".img");
    tracker::testing::MakeImage(d.image, pd.size, std::hash<std::string>()(pd.name));
    d.fd = tracker::testing::OpenRw(d.image);
    disks_.push_back(std::move(d));
  }
  for (const Disk& d : disks_) {
    o.disks.push_back(
        tracker::TrackedDisk{d.name, d.fd.get(), d.size, dir / (d.name + ".img.srlog")});
  }
  Result<std::unique_ptr<tracker::VmTracker>> t = tracker::VmTracker::Open(std::move(o));
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  if (t.ok()) tracker_ = std::move(*t);
}

PrimaryVm::~PrimaryVm() {
  if (tracker_) {
    EXPECT_TRUE(tracker_->Close().ok());
  }
}

uint32_t PrimaryVm::disk_id(size_t i) const { return tracker::DiskIdFor(vm_, disks_[i].name); }

ReplicaDefinition PrimaryVm::Definition(int recovery_points, int64_t interval_ms) const {
  ReplicaDefinition def;
  def.vm = vm_;
  def.primary_site = "east";
  def.epoch = epoch_;
  for (size_t i = 0; i < disks_.size(); ++i) {
    def.disks.push_back(DiskDefinition{disks_[i].name, disk_id(i), disks_[i].size});
  }
  def.recovery_points = recovery_points;
  def.recovery_point_interval_ms = interval_ms;
  def.frequency_ms = 1000;
  return def;
}

void PrimaryVm::SeedReplica(const fs::path& replica_dir) const {
  fs::create_directories(replica_dir);
  for (const Disk& d : disks_) {
    fs::copy_file(d.image, replica_dir / (d.name + ".img"), fs::copy_options::overwrite_existing);
  }
}

void PrimaryVm::Write(size_t disk, uint64_t offset, std::span<const std::byte> data) {
  Status s =
      tracker::testing::WriteVia(tracker_->observer(disk), disks_[disk].fd.get(), offset, data);
  ASSERT_TRUE(s.ok()) << s.ToString();
}

void PrimaryVm::Discard(size_t disk, uint64_t offset, uint64_t length) {
  Status s =
      tracker::testing::DiscardVia(tracker_->observer(disk), disks_[disk].fd.get(), offset, length);
  ASSERT_TRUE(s.ok()) << s.ToString();
}

void PrimaryVm::RandomChanges(std::mt19937_64& rng, int count) {
  for (int i = 0; i < count; ++i) {
    const size_t d = rng() % disks_.size();
    const uint64_t size = disks_[d].size;
    const int kind = static_cast<int>(rng() % 10);
    if (kind == 0) {
      const uint64_t length = (1 + rng() % 8) * kBlock;
      const uint64_t offset = (rng() % (size / kBlock - 8)) * kBlock;
      Discard(d, offset, length);
    } else if (kind == 1) {
      const uint64_t length = 1 + rng() % (3 * kBlock);  // unaligned: zeros part of blocks
      const uint64_t offset = rng() % (size - length);
      Discard(d, offset, length);
    } else {
      const uint64_t length = 1 + rng() % (64 << 10);
      const uint64_t offset = rng() % (size - length + 1);
      Write(d, offset, tracker::testing::Pattern(length, rng()));
    }
  }
}

uint64_t PrimaryVm::Cut() {
  Result<uint64_t> cycle = tracker_->Cut();
  EXPECT_TRUE(cycle.ok()) << cycle.status().ToString();
  return cycle.ok() ? *cycle : 0;
}

std::vector<tracker::SealedSegment> PrimaryVm::Sealed(uint64_t cycle) {
  std::vector<tracker::SealedSegment> out;
  for (tracker::SealedSegment& s : tracker_->SealedSegments()) {
    if (s.cycle == cycle) out.push_back(std::move(s));
  }
  return out;
}

Bytes PrimaryVm::SegmentBytes(const tracker::SealedSegment& s) {
  Result<std::unique_ptr<tracker::SegmentStream>> stream = tracker_->OpenSegment(s);
  EXPECT_TRUE(stream.ok()) << stream.status().ToString();
  if (!stream.ok()) return {};
  Result<Bytes> bytes = tracker::ReadSegment(**stream);
  EXPECT_TRUE(bytes.ok()) << bytes.status().ToString();
  return bytes.ok() ? std::move(*bytes) : Bytes();
}

Status PrimaryVm::Ship(SegmentSink& sink, uint64_t cycle, std::optional<int64_t> cut_unix_nanos,
                       size_t chunk) {
  std::vector<tracker::SealedSegment> segments = Sealed(cycle);
  if (segments.size() != disks_.size()) {
    return Status::Error(EINVAL, "cycle " + std::to_string(cycle) + " has " +
                                     std::to_string(segments.size()) + " sealed segments");
  }
  for (const tracker::SealedSegment& s : segments) {
    const Bytes bytes = SegmentBytes(s);
    SR_RETURN_IF_ERROR(SendSegment(sink, s.disk_id, s.number, bytes, chunk));
  }
  CycleInfo info;
  info.cycle = cycle;
  info.cut_unix_nanos = cut_unix_nanos.value_or(segments[0].cut_unix_nanos);
  info.first_change_unix_nanos = segments[0].first_change_unix_nanos;
  SR_RETURN_IF_ERROR(sink.CommitCycle(info));
  return tracker_->ReleaseThrough(cycle);
}

std::vector<Bytes> PrimaryVm::Snapshot() const {
  std::vector<Bytes> out;
  for (const Disk& d : disks_) out.push_back(ReadBytes(d.image));
  return out;
}

Status SendSegment(SegmentSink& sink, uint32_t disk_id, uint64_t number,
                   std::span<const std::byte> bytes, size_t chunk) {
  uint64_t at = 0;
  do {
    const size_t n = std::min<size_t>(chunk, bytes.size() - at);
    const bool last = at + n == bytes.size();
    SR_RETURN_IF_ERROR(sink.WriteSegment(disk_id, number, at, bytes.subspan(at, n), last));
    at += n;
  } while (at < bytes.size());
  return Status::Ok();
}

SegmentBuilder& SegmentBuilder::Raw(const tracker::RecordHeader& header,
                                    std::span<const std::byte> payload) {
  const Bytes rec = tracker::testing::EncodeRecord(header, payload);
  bytes_.insert(bytes_.end(), rec.begin(), rec.end());
  seq_ = header.seq + 1;
  return *this;
}

SegmentBuilder& SegmentBuilder::Write(uint64_t offset, std::span<const std::byte> data) {
  tracker::RecordHeader h;
  h.kind = tracker::RecordKind::kWrite;
  h.disk_id = disk_id_;
  h.epoch = epoch_;
  h.seq = seq_;
  h.offset = offset;
  h.length = data.size();
  return Raw(h, data);
}

SegmentBuilder& SegmentBuilder::Discard(uint64_t offset, uint64_t length) {
  tracker::RecordHeader h;
  h.kind = tracker::RecordKind::kDiscard;
  h.disk_id = disk_id_;
  h.epoch = epoch_;
  h.seq = seq_;
  h.offset = offset;
  h.length = length;
  return Raw(h, {});
}

SegmentBuilder& SegmentBuilder::Cut(uint64_t cycle, int64_t unix_nanos) {
  tracker::RecordHeader h;
  h.kind = tracker::RecordKind::kCut;
  h.disk_id = disk_id_;
  h.epoch = epoch_;
  h.seq = seq_;
  h.offset = 0;
  h.length = tracker::kCutPayloadSize;
  std::byte payload[tracker::kCutPayloadSize];
  tracker::CutPayload cut;
  cut.cycle = cycle;
  cut.unix_nanos = unix_nanos;
  tracker::EncodeCutPayload(cut, payload);
  return Raw(h, payload);
}

Bytes ReadBytes(const fs::path& path) {
  Result<std::string> text = ReadFile(path);
  EXPECT_TRUE(text.ok()) << text.status().ToString();
  if (!text.ok()) return {};
  const auto* p = reinterpret_cast<const std::byte*>(text->data());
  return Bytes(p, p + text->size());
}

Bytes ReadView(const PointView& view, size_t disk) {
  Bytes out(view.disk_size(disk));
  Status s = view.Read(disk, 0, out);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

int64_t FirstDiff(const Bytes& a, const Bytes& b) {
  if (a.size() != b.size()) return static_cast<int64_t>(std::min(a.size(), b.size()));
  auto [x, y] = std::mismatch(a.begin(), a.end(), b.begin());
  return x == a.end() ? -1 : static_cast<int64_t>(x - a.begin());
}

std::vector<std::string> ListDir(const fs::path& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    out.push_back(it->path().filename().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::map<std::string, uint32_t> TreeDigest(const fs::path& dir) {
  std::map<std::string, uint32_t> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_regular_file())
      out[fs::relative(e.path(), dir).string()] = Crc32c(ReadBytes(e.path()));
  }
  return out;
}

std::unique_ptr<Replica> CreateReplica(const std::filesystem::path& dir,
                                       const ReplicaDefinition& def) {
  Result<std::unique_ptr<Replica>> r = Replica::Create(dir, def);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? std::move(*r) : nullptr;
}

std::unique_ptr<Replica> ReopenReplica(const std::filesystem::path& dir,
                                       std::unique_ptr<Replica>& old) {
  old.reset();
  Result<std::unique_ptr<Replica>> r = Replica::Open(dir);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? std::move(*r) : nullptr;
}

}  // namespace siterep::applier::testing
