// Helpers for the applier's tests: a primary VM built from the real tracker (images,
// VmTracker, sealed segments) that ships its cycles into a SegmentSink the way the
// receiver does, hand-made segments for rogue-peer tests, and whole-disk comparisons.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "applier/point_view.h"
#include "applier/replica.h"
#include "applier/segment_sink.h"
#include "common/testing/temp_dir.h"
#include "common/unique_fd.h"
#include "tracker/log_format.h"
#include "tracker/vm_tracker.h"

namespace siterep::applier::testing {

using siterep::testing::TempDir;
using Bytes = std::vector<std::byte>;

inline constexpr uint64_t kBlock = 4096;

struct PrimaryDisk {
  std::string name;
  uint64_t size = 0;
};

// A primary VM: patterned images in `dir` and a VmTracker over them (no cycle timer).
class PrimaryVm {
 public:
  PrimaryVm(const std::filesystem::path& dir, std::vector<PrimaryDisk> disks, uint64_t epoch = 3);
  ~PrimaryVm();

  // What the primary would send to create the replica.
  ReplicaDefinition Definition(int recovery_points = 0, int64_t interval_ms = 0) const;
  // Copies the images into replica_dir as seed images (<disk>.img).
  void SeedReplica(const std::filesystem::path& replica_dir) const;

  size_t disk_count() const { return disks_.size(); }
  uint32_t disk_id(size_t i) const;
  const std::filesystem::path& image(size_t i) const { return disks_[i].image; }

  void Write(size_t disk, uint64_t offset, std::span<const std::byte> data);
  void Discard(size_t disk, uint64_t offset, uint64_t length);
  // count random writes (unaligned, up to 64 KiB) and discards (some unaligned) over disks.
  void RandomChanges(std::mt19937_64& rng, int count);
  // Cuts a cycle (there must be changes) and returns its number.
  uint64_t Cut();
  // Sealed segments of cycle, in disk order.
  std::vector<tracker::SealedSegment> Sealed(uint64_t cycle);
  // The bytes of sealed segment s, read as the shipper would send them.
  Bytes SegmentBytes(const tracker::SealedSegment& s);
  // Sends every segment of cycle to sink in chunks of chunk bytes and commits the cycle
  // (with cut_unix_nanos if given, else the tracker's cut time); then releases it.
  Status Ship(SegmentSink& sink, uint64_t cycle, std::optional<int64_t> cut_unix_nanos = {},
              size_t chunk = 64 << 10);
  // Contents of every image now.
  std::vector<Bytes> Snapshot() const;

 private:
  struct Disk {
    std::string name;
    uint64_t size = 0;
    std::filesystem::path image;
    UniqueFd fd;
  };
  std::string vm_ = "vm1";
  uint64_t epoch_;
  std::vector<Disk> disks_;
  std::unique_ptr<tracker::VmTracker> tracker_;
};

// Sends bytes as segment `number` of disk_id in chunks, like the receiver.
Status SendSegment(SegmentSink& sink, uint32_t disk_id, uint64_t number,
                   std::span<const std::byte> bytes, size_t chunk = 64 << 10);

// Records made by hand (valid CRCs unless the test breaks them afterwards).
class SegmentBuilder {
 public:
  SegmentBuilder(uint32_t disk_id, uint64_t epoch, uint64_t first_seq)
      : disk_id_(disk_id), epoch_(epoch), seq_(first_seq) {}
  SegmentBuilder& Write(uint64_t offset, std::span<const std::byte> data);
  SegmentBuilder& Discard(uint64_t offset, uint64_t length);
  SegmentBuilder& Cut(uint64_t cycle, int64_t unix_nanos = 1);
  // A record with any header fields (kind, offset, length, epoch, disk id, seq as given).
  SegmentBuilder& Raw(const tracker::RecordHeader& header, std::span<const std::byte> payload);
  uint64_t next_seq() const { return seq_; }
  const Bytes& bytes() const { return bytes_; }
  Bytes& bytes() { return bytes_; }

 private:
  uint32_t disk_id_;
  uint64_t epoch_;
  uint64_t seq_;
  Bytes bytes_;
};

Bytes ReadBytes(const std::filesystem::path& path);
// Whole disk through a view.
Bytes ReadView(const PointView& view, size_t disk);
// Index of the first differing byte, or -1 when equal (sizes must match).
int64_t FirstDiff(const Bytes& a, const Bytes& b);
// Names of the files in dir (not recursive), sorted; empty if dir is missing.
std::vector<std::string> ListDir(const std::filesystem::path& dir);
// Every file under dir with the CRC32C of its contents, to show that a refused call
// changed nothing.
std::map<std::string, uint32_t> TreeDigest(const std::filesystem::path& dir);

#define EXPECT_SAME_BYTES(a, b, what) \
  EXPECT_EQ(::siterep::applier::testing::FirstDiff((a), (b)), -1) << (what)

// Replica::Create / Replica::Open in dir as a test step: a failure is a test failure
// (null result). ReopenReplica closes old first.
std::unique_ptr<Replica> CreateReplica(const std::filesystem::path& dir,
                                       const ReplicaDefinition& def);
std::unique_ptr<Replica> ReopenReplica(const std::filesystem::path& dir,
                                       std::unique_ptr<Replica>& old);

}  // namespace siterep::applier::testing
