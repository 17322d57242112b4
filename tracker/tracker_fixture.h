// A test fixture with image files and their logs, shared by vm_tracker_test.cc and
// recovery_test.cc.
#pragma once

#include <gtest/gtest.h>

#include <deque>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/unique_fd.h"
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
    for (const DiskFiles& d : disks_) {
      o.disks.push_back(TrackedDisk{d.name, d.fd.get(), d.size, d.log_dir});
    }
    return o;
  }

  std::unique_ptr<VmTracker> Open(VmTrackerOptions options) {
    Result<std::unique_ptr<VmTracker>> t = VmTracker::Open(std::move(options));
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    if (!t.ok()) return nullptr;
    return std::move(*t);
  }

  // Replays disk i's log onto a copy of its pre-image and compares with the image.
  void ExpectReplayEqualsImage(size_t i) {
    const DiskFiles& d = disks_[i];
    const std::filesystem::path copy = tmp_.path() / (d.name + ".replayed");
    std::filesystem::copy_file(d.pre_image, copy,
                               std::filesystem::copy_options::overwrite_existing);
    Result<ReplayResult> r = ReplayLogToFile(d.log_dir, copy);
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
