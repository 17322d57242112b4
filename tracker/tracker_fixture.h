// A test fixture with image files and their logs, shared by vm_tracker_test.cc and
// recovery_test.cc.
#pragma once

#include <gtest/gtest.h>

#include <deque>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "common/unique_fd.h"
#include "tracker/cut_stream.h"
#include "tracker/log_reader.h"
#include "tracker/replay.h"
#include "tracker/test_util.h"
#include "tracker/vm_tracker.h"

namespace siterep::tracker::testing {

class TrackerFixture : public ::testing::Test {
 protected:
  struct DiskFiles {
    std::string name;
    std::filesystem::path image;
    std::filesystem::path pre_image;  // the image when its log started
    std::filesystem::path log_dir;
    UniqueFd fd;
    uint64_t size = 0;
  };

  // Adds a disk with a patterned image (and a copy of it as the pre-image).
  DiskFiles& AddDisk(const std::string& name, uint64_t size) {
    DiskFiles d;
    d.name = name;
    d.image = tmp_.path() / (name + ".img");
    d.pre_image = tmp_.path() / (name + ".pre");
    d.log_dir = tmp_.path() / (name + ".img.srlog");
    d.size = size;
    MakeImage(d.image, size, std::hash<std::string>()(name));
    std::filesystem::copy_file(d.image, d.pre_image);
    d.fd = OpenRw(d.image);
    disks_.push_back(std::move(d));
    return disks_.back();
  }

  VmTrackerOptions Options(std::chrono::milliseconds cycle = std::chrono::milliseconds(0)) const {
    VmTrackerOptions o;
    o.vm = "vm1";
    o.epoch = 3;
    o.cycle = cycle;
    o.archive_dir = tmp_.path() / "archive";
    for (const DiskFiles& d : disks_) {
      o.disks.push_back(TrackedDisk{d.name, d.fd.get(), d.size, d.log_dir});
    }
    return o;
  }

  // Where disk i's released segments go (Options' archive).
  std::filesystem::path ArchiveOf(size_t i) const {
    return tmp_.path() / "archive" / disks_[i].name;
  }

  // A folder with every segment of disk i that t has sealed so far, as files: the
  // released ones from the archive, the others read now as the shipper would send them.
  // Works on a closed tracker too; releases nothing.
  std::filesystem::path LogOf(VmTracker& t, size_t i) {
    namespace fs = std::filesystem;
    const fs::path dir = tmp_.path() / "log-copies" / disks_[i].name;
    fs::remove_all(dir);
    fs::create_directories(dir);
    if (fs::exists(ArchiveOf(i))) {
      for (const auto& e : fs::directory_iterator(ArchiveOf(i))) {
        fs::copy_file(e.path(), dir / e.path().filename());
      }
    }
    for (const SealedSegment& seg : t.SealedSegments()) {
      if (seg.disk != disks_[i].name) continue;
      Result<std::unique_ptr<SegmentStream>> stream = t.OpenSegment(seg);
      EXPECT_TRUE(stream.ok()) << stream.status().ToString();
      if (!stream.ok()) continue;
      Result<std::vector<std::byte>> read = ReadSegment(**stream);
      EXPECT_TRUE(read.ok()) << read.status().ToString();
      const std::vector<std::byte> bytes = read.ok() ? std::move(*read) : std::vector<std::byte>();
      EXPECT_LE(bytes.size(), seg.bytes);
      std::ofstream(SegmentPath(dir, seg.number), std::ios::binary)
          .write(reinterpret_cast<const char*>(bytes.data()),
                 static_cast<std::streamsize>(bytes.size()));
    }
    return dir;
  }

  // The records of every segment of disk i that t has sealed so far (LogOf).
  std::vector<Rec> RecordsOf(VmTracker& t, size_t i) { return ReadLog(LogOf(t, i)); }

  std::unique_ptr<VmTracker> Open(VmTrackerOptions options) {
    Result<std::unique_ptr<VmTracker>> t = VmTracker::Open(std::move(options));
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    if (!t.ok()) return nullptr;
    return std::move(*t);
  }

  // Replays every segment of disk i (LogOf) onto a copy of its pre-image and compares
  // with the image.
  void ExpectReplayEqualsImage(VmTracker& t, size_t i) {
    const std::filesystem::path log = LogOf(t, i);
    const DiskFiles& d = disks_[i];
    const std::filesystem::path copy = tmp_.path() / (d.name + ".replayed");
    std::filesystem::copy_file(d.pre_image, copy,
                               std::filesystem::copy_options::overwrite_existing);
    Result<ReplayResult> r = ReplayLogToFile(log, copy);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_FALSE(r->torn_tail.has_value());
    const std::vector<std::byte> image = ReadWhole(d.image);
    const std::vector<std::byte> replayed = ReadWhole(copy);
    ASSERT_EQ(image.size(), replayed.size());
    size_t first_diff = image.size();
    for (size_t k = 0; k < image.size(); ++k) {
      if (image[k] != replayed[k]) {
        first_diff = k;
        break;
      }
    }
    EXPECT_EQ(first_diff, image.size())
        << "disk " << d.name << ": replay differs from the image at byte " << first_diff;
  }

  TempDir tmp_;
  std::deque<DiskFiles> disks_;  // a deque: references stay valid as disks are added
};

}  // namespace siterep::tracker::testing
