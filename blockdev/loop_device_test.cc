// A disk file as a real block device: losetup on the FUSE file, mkfs.ext4, mount, write a
// file, unmount, mount again, the file is intact, e2fsck is clean. Skips when loop devices
// or e2fsprogs are missing; every step is undone in reverse order, also on failure.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "blockdev/image_backend.h"
#include "blockdev/test_util.h"
#include "common/unique_fd.h"

namespace siterep::blockdev {
namespace {

namespace fs = std::filesystem;
using testing::AlignedBuffer;
using testing::RunningFs;
using testing::TempDir;

constexpr uint64_t kDiskSize = 64 << 20;

// Runs a shell command; returns its exit code and collects its output.
int Shell(const std::string& command, std::string* output = nullptr) {
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return -1;
  std::string out;
  char buf[512];
  while (size_t n = std::fread(buf, 1, sizeof(buf), pipe)) out.append(buf, n);
  const int status = ::pclose(pipe);
  if (output != nullptr) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool HaveTool(const std::string& tool) { return Shell("command -v " + tool) == 0; }

// A loop device attached to a file; detached on destruction.
class LoopDevice {
 public:
  LoopDevice(const fs::path& file, bool direct_io) {
    std::string out;
    const std::string cmd =
        "losetup --find --show --direct-io=" + std::string(direct_io ? "on" : "off") + " " +
        file.string();
    if (Shell(cmd, &out) == 0) {
      while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
      device_ = out;
    } else {
      error_ = out;
    }
  }
  ~LoopDevice() {
    if (!device_.empty()) Shell("losetup -d " + device_);
  }
  const std::string& device() const { return device_; }
  const std::string& error() const { return error_; }

 private:
  std::string device_;
  std::string error_;
};

// An ext4 mount; unmounted on destruction if still mounted.
class Ext4Mount {
 public:
  Ext4Mount(const std::string& device, const fs::path& dir) : dir_(dir) {
    fs::create_directories(dir);
    mounted_ = ::mount(device.c_str(), dir.c_str(), "ext4", 0, nullptr) == 0;
    if (!mounted_) error_ = std::strerror(errno);
  }
  ~Ext4Mount() { Unmount(); }
  bool Unmount() {
    if (!mounted_) return true;
    if (::umount2(dir_.c_str(), 0) != 0) {
      ::umount2(dir_.c_str(), MNT_DETACH);
      mounted_ = false;
      return false;
    }
    mounted_ = false;
    return true;
  }
  bool mounted() const { return mounted_; }
  const std::string& error() const { return error_; }

 private:
  fs::path dir_;
  bool mounted_ = false;
  std::string error_;
};

class LoopDeviceTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (::geteuid() != 0 || ::access("/dev/fuse", R_OK | W_OK) != 0 ||
        ::access("/dev/loop-control", F_OK) != 0) {
      GTEST_SKIP() << "needs root, /dev/fuse and loop devices";
    }
    if (!HaveTool("losetup") || !HaveTool("mkfs.ext4") || !HaveTool("e2fsck")) {
      GTEST_SKIP() << "needs losetup, mkfs.ext4 and e2fsck";
    }
  }
};

TEST_P(LoopDeviceTest, Ext4SurvivesUnmountAndMount) {
  const bool direct_io = GetParam();
  TempDir dir;
  const fs::path image = dir.path() / "disk.img";
  UniqueFd image_fd(::open(image.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_TRUE(image_fd.valid());
  ASSERT_EQ(::ftruncate(image_fd.get(), kDiskSize), 0);
  ImageBackend backend(image_fd.get(), kDiskSize, nullptr);
  RunningFs running(dir.path() / "mnt", {{"vm", "disk", &backend}});
  ASSERT_TRUE(running.status().ok()) << running.status().ToString();
  const fs::path disk = dir.path() / "mnt" / "vm" / "disk";

  LoopDevice loop(disk, direct_io);
  ASSERT_FALSE(loop.device().empty()) << loop.error();
  std::string out;
  ASSERT_EQ(Shell("mkfs.ext4 -q -F " + loop.device(), &out), 0) << out;

  const fs::path fs_dir = dir.path() / "ext4";
  AlignedBuffer contents(3 << 20);
  contents.FillPattern(42);
  {
    Ext4Mount mount(loop.device(), fs_dir);
    ASSERT_TRUE(mount.mounted()) << mount.error();
    UniqueFd file(::open((fs_dir / "file").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    ASSERT_TRUE(file.valid());
    ASSERT_EQ(::write(file.get(), contents.data(), contents.size()),
              static_cast<ssize_t>(contents.size()));
    ASSERT_EQ(::fsync(file.get()), 0);
    file.Reset();
    ASSERT_TRUE(mount.Unmount());
  }
  {
    Ext4Mount mount(loop.device(), fs_dir);
    ASSERT_TRUE(mount.mounted()) << mount.error();
    UniqueFd file(::open((fs_dir / "file").c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(file.valid());
    std::vector<std::byte> back(contents.size() + 1);
    ASSERT_EQ(::read(file.get(), back.data(), back.size()), static_cast<ssize_t>(contents.size()));
    back.pop_back();
    EXPECT_TRUE(back == contents.ToVector());
    file.Reset();
    ASSERT_TRUE(mount.Unmount());
  }
  EXPECT_EQ(Shell("e2fsck -fn " + loop.device(), &out), 0) << out;
}

INSTANTIATE_TEST_SUITE_P(BufferedAndDirect, LoopDeviceTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "DirectIo" : "Buffered";
                         });

}  // namespace
}  // namespace siterep::blockdev
