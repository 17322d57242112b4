// FuseFs through real mounts: every test mounts in its own temporary directory and the
// fixture unmounts (and removes the directory) even when the test fails.
#include "blockdev/fuse_fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <set>
#include <thread>

#include "blockdev/disk_slot.h"
#include "blockdev/test_util.h"
#include "common/unique_fd.h"

namespace siterep::blockdev {
namespace {

namespace fs = std::filesystem;
using testing::AlignedBuffer;
using testing::MemBackend;
using testing::MountsUnder;
using testing::Range;
using testing::RunningFs;
using testing::TempDir;

constexpr uint64_t kDiskSize = 16 << 20;
constexpr size_t kMiB = 1 << 20;

std::set<std::string> ListDir(const fs::path& dir) {
  std::set<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (dirent* e = ::readdir(d)) names.insert(e->d_name);
  ::closedir(d);
  return names;
}

UniqueFd Open(const fs::path& path, int flags) {
  return UniqueFd(::open(path.c_str(), flags | O_CLOEXEC));
}

class FuseFsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access("/dev/fuse", R_OK | W_OK) != 0 || ::geteuid() != 0) {
      GTEST_SKIP() << "needs root and /dev/fuse";
    }
    mnt_ = dir_.path() / "mnt";
    Mount({{"vm1", "os", &os_}, {"vm1", "data", &data_}, {"vm2", "root", &vm2_root_}});
  }

  void Mount(std::vector<ExportedDisk> disks, FuseOptions options = {}) {
    running_ = std::make_unique<RunningFs>(mnt_, std::move(disks), options);
    ASSERT_TRUE(running_->status().ok()) << running_->status().ToString();
  }

  void TearDown() override {
    running_.reset();  // Stop, unmount, join: also when the test failed half-way
    EXPECT_TRUE(MountsUnder(dir_.path()).empty());
  }

  fs::path Disk(const std::string& vm, const std::string& disk) { return mnt_ / vm / disk; }

  TempDir dir_;  // destroyed last: removes whatever the test left behind
  fs::path mnt_;
  MemBackend os_{kDiskSize};
  MemBackend data_{kDiskSize / 2};
  MemBackend vm2_root_{kDiskSize};
  std::unique_ptr<RunningFs> running_;
};

TEST_F(FuseFsTest, ReaddirShowsVmsAndDisks) {
  EXPECT_EQ(ListDir(mnt_), (std::set<std::string>{".", "..", "vm1", "vm2"}));
  EXPECT_EQ(ListDir(mnt_ / "vm1"), (std::set<std::string>{".", "..", "os", "data"}));
  EXPECT_EQ(ListDir(mnt_ / "vm2"), (std::set<std::string>{".", "..", "root"}));
}

TEST_F(FuseFsTest, StatShowsBackendSizeAndMode) {
  struct stat st {};
  ASSERT_EQ(::stat(Disk("vm1", "os").c_str(), &st), 0) << std::strerror(errno);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(st.st_uid, 0u);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskSize);
  ASSERT_EQ(::stat(Disk("vm1", "data").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskSize / 2);
  ASSERT_EQ(::stat((mnt_ / "vm1").c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  // Inode numbers are stable while mounted.
  struct stat again {};
  ASSERT_EQ(::stat(Disk("vm1", "os").c_str(), &st), 0);
  ASSERT_EQ(::stat(Disk("vm1", "os").c_str(), &again), 0);
  EXPECT_EQ(st.st_ino, again.st_ino);
  EXPECT_NE(st.st_ino, 1u);

  errno = 0;
  EXPECT_NE(::stat(Disk("vm1", "nope").c_str(), &st), 0);
  EXPECT_EQ(errno, ENOENT);
}

TEST_F(FuseFsTest, BufferedRoundTrip) {
  UniqueFd fd = Open(Disk("vm1", "os"), O_RDWR);
  ASSERT_TRUE(fd.valid()) << std::strerror(errno);
  std::vector<char> out(10000);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<char>(i * 7 + 1);
  const off_t offset = 123457;  // unaligned on purpose
  ASSERT_EQ(::pwrite(fd.get(), out.data(), out.size(), offset), static_cast<ssize_t>(out.size()));
  std::vector<char> in(out.size());
  ASSERT_EQ(::pread(fd.get(), in.data(), in.size(), offset), static_cast<ssize_t>(in.size()));
  EXPECT_EQ(in, out);
  // Write-through: the backend has it before write() returned.
  std::vector<std::byte> stored = os_.Contents(offset, out.size());
  EXPECT_EQ(std::memcmp(stored.data(), out.data(), out.size()), 0);
}

TEST_F(FuseFsTest, DirectRoundTrip) {
  UniqueFd fd = Open(Disk("vm1", "os"), O_RDWR | O_DIRECT);
  ASSERT_TRUE(fd.valid()) << std::strerror(errno);
  AlignedBuffer out(64 << 10), in(64 << 10);
  out.FillPattern(7);
  const off_t offset = 1 << 20;
  ASSERT_EQ(::pwrite(fd.get(), out.data(), out.size(), offset), static_cast<ssize_t>(out.size()));
  EXPECT_EQ(os_.Contents(offset, out.size()), out.ToVector());
  ASSERT_EQ(::pread(fd.get(), in.data(), in.size(), offset), static_cast<ssize_t>(in.size()));
  EXPECT_EQ(in.ToVector(), out.ToVector());
}

TEST_F(FuseFsTest, DirectWriteIsSeenByBufferedReader) {
  UniqueFd buffered = Open(Disk("vm1", "os"), O_RDWR);
  UniqueFd direct = Open(Disk("vm1", "os"), O_RDWR | O_DIRECT);
  ASSERT_TRUE(buffered.valid() && direct.valid());
  char before[4096];
  ASSERT_EQ(::pread(buffered.get(), before, sizeof(before), 0), 4096);  // now cached
  AlignedBuffer out(4096);
  out.FillPattern(3);
  ASSERT_EQ(::pwrite(direct.get(), out.data(), out.size(), 0), 4096);
  char after[4096];
  ASSERT_EQ(::pread(buffered.get(), after, sizeof(after), 0), 4096);
  EXPECT_EQ(std::memcmp(after, out.data(), sizeof(after)), 0);
}

TEST_F(FuseFsTest, OneMiBDirectWriteArrivesWhole) {
  UniqueFd fd = Open(Disk("vm1", "os"), O_RDWR | O_DIRECT);
  ASSERT_TRUE(fd.valid());
  AlignedBuffer out(kMiB);
  out.FillPattern(11);
  os_.ClearLog();
  ASSERT_EQ(::pwrite(fd.get(), out.data(), out.size(), 4 * kMiB), static_cast<ssize_t>(kMiB));
  EXPECT_EQ(os_.writes(), (std::vector<Range>{{4 * kMiB, kMiB}}));
  EXPECT_EQ(os_.Contents(4 * kMiB, kMiB), out.ToVector());
}

TEST_F(FuseFsTest, OneMiBDirectReadArrivesWhole) {
  UniqueFd fd = Open(Disk("vm1", "os"), O_RDONLY | O_DIRECT);
  ASSERT_TRUE(fd.valid());
  AlignedBuffer in(kMiB);
  os_.ClearLog();
  ASSERT_EQ(::pread(fd.get(), in.data(), in.size(), 2 * kMiB), static_cast<ssize_t>(kMiB));
  EXPECT_EQ(os_.reads(), (std::vector<Range>{{2 * kMiB, kMiB}}));
}

TEST_F(FuseFsTest, WritePastEndIsEnospcAndWritesNothing) {
  for (int flags : {O_RDWR, O_RDWR | O_DIRECT}) {
    SCOPED_TRACE(flags & O_DIRECT ? "direct" : "buffered");
    UniqueFd fd = Open(Disk("vm1", "data"), flags);
    ASSERT_TRUE(fd.valid());
    const uint64_t size = kDiskSize / 2;
    AlignedBuffer out(8192);
    out.FillPattern(5);
    data_.ClearLog();
    // The last page is in the page cache (buffered case): a refused write must not leave
    // its data there either.
    ASSERT_EQ(::pread(fd.get(), out.data(), 4096, static_cast<off_t>(size - 4096)), 4096);
    out.FillPattern(5);
    errno = 0;
    EXPECT_EQ(::pwrite(fd.get(), out.data(), 8192, static_cast<off_t>(size - 4096)), -1);
    EXPECT_EQ(errno, ENOSPC);
    errno = 0;
    EXPECT_EQ(::pwrite(fd.get(), out.data(), 4096, static_cast<off_t>(size)), -1);
    EXPECT_EQ(errno, ENOSPC);
    EXPECT_TRUE(data_.writes().empty());
    EXPECT_EQ(data_.Contents(size - 4096, 4096), std::vector<std::byte>(4096));
    AlignedBuffer back(4096);
    ASSERT_EQ(::pread(fd.get(), back.data(), 4096, static_cast<off_t>(size - 4096)), 4096);
    EXPECT_EQ(back.ToVector(), std::vector<std::byte>(4096));
    struct stat st {};
    ASSERT_EQ(::fstat(fd.get(), &st), 0);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), size);
  }
}

TEST_F(FuseFsTest, ReadAtEndIsShort) {
  UniqueFd fd = Open(Disk("vm1", "data"), O_RDONLY);
  ASSERT_TRUE(fd.valid());
  const off_t size = kDiskSize / 2;
  char buf[4096];
  EXPECT_EQ(::pread(fd.get(), buf, sizeof(buf), size - 100), 100);
  EXPECT_EQ(::pread(fd.get(), buf, sizeof(buf), size), 0);
  EXPECT_EQ(::pread(fd.get(), buf, sizeof(buf), size + 8192), 0);
}

TEST_F(FuseFsTest, SizeChangesAreRefused) {
  UniqueFd fd = Open(Disk("vm1", "os"), O_RDWR);
  ASSERT_TRUE(fd.valid());
  errno = 0;
  EXPECT_EQ(::ftruncate(fd.get(), kDiskSize + 4096), -1);
  EXPECT_EQ(errno, EPERM);
  errno = 0;
  EXPECT_EQ(::ftruncate(fd.get(), 0), -1);
  EXPECT_EQ(errno, EPERM);
  EXPECT_EQ(::ftruncate(fd.get(), kDiskSize), 0) << std::strerror(errno);  // same size
  errno = 0;
  EXPECT_EQ(::truncate(Disk("vm1", "os").c_str(), 4096), -1);
  EXPECT_EQ(errno, EPERM);
  errno = 0;
  UniqueFd trunc = Open(Disk("vm1", "os"), O_RDWR | O_TRUNC);
  EXPECT_FALSE(trunc.valid());
  EXPECT_EQ(errno, EPERM);
  errno = 0;
  EXPECT_EQ(::fallocate(fd.get(), 0, kDiskSize - 4096, 8192), -1);
  EXPECT_EQ(errno, EPERM);
  struct stat st {};
  ASSERT_EQ(::fstat(fd.get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskSize);
}

TEST_F(FuseFsTest, PunchHoleDiscardsAndReadsZeros) {
  os_.Fill(0, 1 << 20, std::byte{0xab});
  UniqueFd fd = Open(Disk("vm1", "os"), O_RDWR);
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(::fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8192, 16384), 0)
      << std::strerror(errno);
  EXPECT_EQ(os_.discards(), (std::vector<Range>{{8192, 16384}}));
  std::vector<char> buf(32768);
  ASSERT_EQ(::pread(fd.get(), buf.data(), buf.size(), 0), 32768);
  for (size_t i = 0; i < buf.size(); ++i) {
    const char want = (i >= 8192 && i < 8192 + 16384) ? 0 : static_cast<char>(0xab);
    ASSERT_EQ(buf[i], want) << "at " << i;
  }
  // Past the end: clamped to the disk.
  os_.ClearLog();
  ASSERT_EQ(
      ::fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, kDiskSize - 4096, 1 << 20),
      0);
  EXPECT_EQ(os_.discards(), (std::vector<Range>{{kDiskSize - 4096, 4096}}));
  // Preallocation inside the disk: accepted, nothing to do.
  EXPECT_EQ(::fallocate(fd.get(), 0, 0, 1 << 20), 0);
  EXPECT_EQ(::fallocate(fd.get(), FALLOC_FL_KEEP_SIZE, 0, 1 << 20), 0);
  // Other modes are not supported.
  errno = 0;
  EXPECT_EQ(::fallocate(fd.get(), FALLOC_FL_ZERO_RANGE, 0, 4096), -1);
  EXPECT_EQ(errno, EOPNOTSUPP);
  EXPECT_EQ(os_.discards().size(), 1u);
}

TEST_F(FuseFsTest, FsyncAndFdatasyncFlushTheBackend) {
  for (int flags : {O_RDWR, O_RDWR | O_DIRECT}) {
    UniqueFd fd = Open(Disk("vm1", "os"), flags);
    ASSERT_TRUE(fd.valid());
    os_.ClearLog();
    ASSERT_EQ(::fsync(fd.get()), 0);
    EXPECT_EQ(os_.flushes(), 1);
    ASSERT_EQ(::fdatasync(fd.get()), 0);
    EXPECT_EQ(os_.flushes(), 2);
  }
}

TEST_F(FuseFsTest, BackendErrorsReachTheCaller) {
  UniqueFd fd = Open(Disk("vm1", "os"), O_RDWR | O_DIRECT);
  ASSERT_TRUE(fd.valid());
  AlignedBuffer out(4096);
  os_.FailWith(EROFS);
  errno = 0;
  EXPECT_EQ(::pwrite(fd.get(), out.data(), 4096, 0), -1);
  EXPECT_EQ(errno, EROFS);
  os_.FailWith(EIO);
  errno = 0;
  EXPECT_EQ(::fsync(fd.get()), -1);
  EXPECT_EQ(errno, EIO);
  os_.FailWith(0);
  EXPECT_EQ(::pwrite(fd.get(), out.data(), 4096, 0), 4096);
}

TEST_F(FuseFsTest, ChmodAndChownAreKept) {
  const fs::path disk = Disk("vm2", "root");
  ASSERT_EQ(::chmod(disk.c_str(), 0660), 0) << std::strerror(errno);
  ASSERT_EQ(::chown(disk.c_str(), 1234, 5678), 0) << std::strerror(errno);
  struct stat st {};
  ASSERT_EQ(::stat(disk.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0660u);
  EXPECT_EQ(st.st_uid, 1234u);
  EXPECT_EQ(st.st_gid, 5678u);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskSize);
}

TEST_F(FuseFsTest, OtherUsersNeedPermission) {
  // default_permissions + allow_other: another user reaches the mount, the mode decides.
  fs::permissions(dir_.path(), fs::perms(0755));  // mkdtemp made it 0700
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (::setgid(4321) != 0 || ::setuid(4321) != 0) ::_exit(10);
    struct stat st {};
    if (::stat(Disk("vm1", "os").c_str(), &st) != 0) ::_exit(11);  // allow_other
    int fd = ::open(Disk("vm1", "os").c_str(), O_RDONLY);
    ::_exit(fd < 0 && errno == EACCES ? 0 : 12);  // 0600 root: refused
  }
  int wstatus = 0;
  ASSERT_EQ(::waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(WIFEXITED(wstatus));
  EXPECT_EQ(WEXITSTATUS(wstatus), 0);

  ASSERT_EQ(::chown(Disk("vm1", "os").c_str(), 4321, 4321), 0);
  child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (::setgid(4321) != 0 || ::setuid(4321) != 0) ::_exit(10);
    int fd = ::open(Disk("vm1", "os").c_str(), O_RDWR | O_DIRECT);
    ::_exit(fd >= 0 ? 0 : 13);
  }
  ASSERT_EQ(::waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(WIFEXITED(wstatus));
  EXPECT_EQ(WEXITSTATUS(wstatus), 0);
}

TEST_F(FuseFsTest, TreeCannotBeChangedThroughTheMount) {
  errno = 0;
  EXPECT_NE(::mkdir((mnt_ / "vm3").c_str(), 0755), 0);
  EXPECT_EQ(errno, EPERM);
  errno = 0;
  EXPECT_FALSE(Open(mnt_ / "vm1" / "new", O_RDWR | O_CREAT).valid());
  EXPECT_EQ(errno, EPERM);
  errno = 0;
  EXPECT_NE(::unlink(Disk("vm1", "os").c_str()), 0);
  EXPECT_EQ(errno, EPERM);
  errno = 0;
  EXPECT_NE(::rename(Disk("vm1", "os").c_str(), Disk("vm1", "os2").c_str()), 0);
  EXPECT_EQ(errno, EPERM);
}

TEST_F(FuseFsTest, StatfsReportsTheDisks) {
  struct statvfs st {};
  ASSERT_EQ(::statvfs(mnt_.c_str(), &st), 0) << std::strerror(errno);
  EXPECT_EQ(st.f_frsize, 4096u);
  EXPECT_EQ(st.f_blocks * st.f_frsize, kDiskSize + kDiskSize / 2 + kDiskSize);
}

TEST_F(FuseFsTest, ConcurrentDirectWriters) {
  constexpr int kThreads = 8;
  constexpr int kWritesPerThread = 64;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      UniqueFd fd = Open(Disk("vm1", "os"), O_RDWR | O_DIRECT);
      AlignedBuffer buf(4096);
      for (int i = 0; i < kWritesPerThread; ++i) {
        buf.FillPattern(static_cast<uint32_t>(t * 1000 + i));
        const off_t off = static_cast<off_t>((t * kWritesPerThread + i) * 4096);
        if (::pwrite(fd.get(), buf.data(), 4096, off) != 4096) failures++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kWritesPerThread; ++i) {
      AlignedBuffer want(4096);
      want.FillPattern(static_cast<uint32_t>(t * 1000 + i));
      ASSERT_EQ(os_.Contents(static_cast<uint64_t>((t * kWritesPerThread + i) * 4096), 4096),
                want.ToVector());
    }
  }
}

TEST_F(FuseFsTest, AddAndRemoveDisksWhileMounted) {
  MemBackend extra(kDiskSize);
  ASSERT_TRUE(running_->fs()->AddDisk({"vm3", "extra", &extra}).ok());
  EXPECT_EQ(ListDir(mnt_ / "vm3"), (std::set<std::string>{".", "..", "extra"}));
  struct stat st {};
  ASSERT_EQ(::stat(Disk("vm3", "extra").c_str(), &st), 0);
  const ino_t old_ino = st.st_ino;
  EXPECT_EQ(running_->fs()->AddDisk({"vm3", "extra", &extra}).code(), EEXIST);
  EXPECT_EQ(running_->fs()->AddDisk({"vm3", "bad/name", &extra}).code(), EINVAL);

  UniqueFd direct = Open(Disk("vm3", "extra"), O_RDWR | O_DIRECT);
  UniqueFd buffered = Open(Disk("vm3", "extra"), O_RDWR);
  ASSERT_TRUE(direct.valid() && buffered.valid());
  char buf[4096] = {1};
  ASSERT_EQ(::pwrite(buffered.get(), buf, sizeof(buf), 0), 4096);
  ASSERT_EQ(::pread(buffered.get(), buf, sizeof(buf), 0), 4096);  // cached now

  ASSERT_TRUE(running_->fs()->RemoveDisk("vm3", "extra").ok());
  errno = 0;
  EXPECT_NE(::stat(Disk("vm3", "extra").c_str(), &st), 0);
  EXPECT_EQ(errno, ENOENT);
  EXPECT_NE(::stat((mnt_ / "vm3").c_str(), &st), 0);  // last disk: VM directory gone
  EXPECT_EQ(ListDir(mnt_), (std::set<std::string>{".", "..", "vm1", "vm2"}));
  AlignedBuffer abuf(4096);
  errno = 0;
  EXPECT_EQ(::pwrite(direct.get(), abuf.data(), 4096, 0), -1);
  EXPECT_EQ(errno, EIO);
  errno = 0;
  EXPECT_EQ(::pread(direct.get(), abuf.data(), 4096, 0), -1);
  EXPECT_EQ(errno, EIO);
  errno = 0;
  EXPECT_EQ(::pread(buffered.get(), buf, sizeof(buf), 0), -1);  // cache was dropped
  EXPECT_EQ(errno, EIO);
  errno = 0;
  EXPECT_EQ(::fsync(buffered.get()), -1);
  EXPECT_EQ(errno, EIO);
  EXPECT_EQ(running_->fs()->RemoveDisk("vm3", "extra").code(), ENOENT);

  // Added again: a new inode, usable at once; the old handles stay dead.
  ASSERT_TRUE(running_->fs()->AddDisk({"vm3", "extra", &extra}).ok());
  ASSERT_EQ(::stat(Disk("vm3", "extra").c_str(), &st), 0);
  EXPECT_NE(st.st_ino, old_ino);
  UniqueFd again = Open(Disk("vm3", "extra"), O_RDWR | O_DIRECT);
  ASSERT_TRUE(again.valid());
  EXPECT_EQ(::pwrite(again.get(), abuf.data(), 4096, 0), 4096);
  EXPECT_EQ(::pwrite(direct.get(), abuf.data(), 4096, 0), -1);
  again.Reset();
  ASSERT_TRUE(running_->fs()->RemoveDisk("vm3", "extra").ok());
}

TEST_F(FuseFsTest, RemoveDiskWaitsForRequestsInFlight) {
  // A writer hammers a disk while it is removed: RemoveDisk returns only when no request
  // uses the backend, and every write either succeeded or got EIO.
  auto extra = std::make_unique<MemBackend>(kDiskSize);
  ASSERT_TRUE(running_->fs()->AddDisk({"vm3", "busy", extra.get()}).ok());
  UniqueFd fd = Open(Disk("vm3", "busy"), O_RDWR | O_DIRECT);
  ASSERT_TRUE(fd.valid());
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::thread writer([&] {
    AlignedBuffer buf(65536);
    while (!stop.load()) {
      ssize_t n = ::pwrite(fd.get(), buf.data(), buf.size(), 0);
      if (n != 65536 && !(n == -1 && errno == EIO)) bad++;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_TRUE(running_->fs()->RemoveDisk("vm3", "busy").ok());
  const size_t writes_at_removal = extra->writes().size();
  extra.reset();  // the backend may go away now; a request still using it would crash
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  stop = true;
  writer.join();
  EXPECT_GT(writes_at_removal, 0u);
  EXPECT_EQ(bad.load(), 0);
}

TEST_F(FuseFsTest, DiskSlotSwapsBackendsUnderAnOpenFile) {
  // The disk file stays while its backend changes: an open descriptor follows the slot.
  DiskSlot slot(kDiskSize);
  MemBackend first(kDiskSize), second(kDiskSize);
  first.Fill(0, kDiskSize, std::byte{0x11});
  second.Fill(0, kDiskSize, std::byte{0x22});
  ASSERT_TRUE(running_->fs()->AddDisk({"vm3", "slot", &slot}).ok());
  struct stat st {};
  ASSERT_EQ(::stat(Disk("vm3", "slot").c_str(), &st), 0);
  const ino_t ino = st.st_ino;
  UniqueFd direct = Open(Disk("vm3", "slot"), O_RDWR | O_DIRECT);
  ASSERT_TRUE(direct.valid()) << std::strerror(errno);  // opens while offline
  AlignedBuffer buf(4096);
  errno = 0;
  EXPECT_EQ(::pread(direct.get(), buf.data(), 4096, 0), -1);
  EXPECT_EQ(errno, EIO);

  slot.Set(&first, SlotMode::kReadWrite);
  ASSERT_EQ(::pread(direct.get(), buf.data(), 4096, 0), 4096);
  EXPECT_EQ(buf.data()[0], std::byte{0x11});
  AlignedBuffer out(4096);
  out.FillPattern(9);
  ASSERT_EQ(::pwrite(direct.get(), out.data(), 4096, 8192), 4096);
  EXPECT_EQ(first.Contents(8192, 4096), out.ToVector());

  slot.Set(&second, SlotMode::kReadOnly);
  ASSERT_EQ(::pread(direct.get(), buf.data(), 4096, 8192), 4096);
  EXPECT_EQ(buf.data()[0], std::byte{0x22});
  errno = 0;
  EXPECT_EQ(::pwrite(direct.get(), out.data(), 4096, 0), -1);
  EXPECT_EQ(errno, EROFS);
  EXPECT_EQ(::fsync(direct.get()), 0);
  EXPECT_EQ(second.flushes(), 1);

  // Held: the guest's write waits in the FUSE worker until the mode changes.
  slot.SetMode(SlotMode::kHold);
  auto held = std::async(std::launch::async,
                         [&] { return ::pwrite(direct.get(), out.data(), 4096, 4096); });
  EXPECT_EQ(held.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout);
  EXPECT_TRUE(second.writes().empty());
  slot.SetMode(SlotMode::kReadWrite);
  EXPECT_EQ(held.get(), 4096);
  EXPECT_EQ(second.Contents(4096, 4096), out.ToVector());

  // A buffered reader keeps pages read through the old backend until they are dropped.
  UniqueFd buffered = Open(Disk("vm3", "slot"), O_RDWR);
  ASSERT_TRUE(buffered.valid());
  char page[4096];
  ASSERT_EQ(::pread(buffered.get(), page, sizeof(page), kMiB), 4096);
  EXPECT_EQ(page[0], 0x22);
  slot.Set(&first, SlotMode::kReadWrite);
  ASSERT_EQ(::pread(buffered.get(), page, sizeof(page), kMiB), 4096);
  EXPECT_EQ(page[0], 0x22);  // still cached
  ASSERT_TRUE(running_->fs()->DropCache("vm3", "slot").ok());
  ASSERT_EQ(::pread(buffered.get(), page, sizeof(page), kMiB), 4096);
  EXPECT_EQ(page[0], 0x11);
  EXPECT_EQ(running_->fs()->DropCache("vm3", "nope").code(), ENOENT);
  EXPECT_EQ(running_->fs()->DropCache("vm9", "slot").code(), ENOENT);

  ASSERT_EQ(::stat(Disk("vm3", "slot").c_str(), &st), 0);
  EXPECT_EQ(st.st_ino, ino);
  ASSERT_TRUE(running_->fs()->RemoveDisk("vm3", "slot").ok());
}

TEST_F(FuseFsTest, StopReturnsRunPromptlyWithFilesOpen) {
  UniqueFd fd = Open(Disk("vm1", "os"), O_RDWR);  // an open file keeps a lazy unmount busy
  ASSERT_TRUE(fd.valid());
  const auto start = std::chrono::steady_clock::now();
  Status status = running_->StopAndJoin();
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(status.ok()) << status.ToString();
  EXPECT_LT(elapsed, std::chrono::seconds(2));
  fd.Reset();
  running_.reset();
  EXPECT_TRUE(MountsUnder(dir_.path()).empty());
}

TEST_F(FuseFsTest, ExternalUnmountEndsRun) {
  ASSERT_EQ(::umount2(mnt_.c_str(), MNT_DETACH), 0) << std::strerror(errno);
  for (int i = 0; i < 200 && !running_->loop_done(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(running_->loop_done());
}

// ---- Mount point checks (own mounts, not the fixture's).

class MountpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access("/dev/fuse", R_OK | W_OK) != 0 || ::geteuid() != 0) {
      GTEST_SKIP() << "needs root and /dev/fuse";
    }
  }
  void TearDown() override {}
  TempDir dir_;
  MemBackend disk_{kDiskSize};
};

TEST_F(MountpointTest, MissingMountpointIsCreated) {
  const fs::path mnt = dir_.path() / "a" / "b" / "mnt";
  RunningFs running(mnt, {{"vm", "disk", &disk_}});
  ASSERT_TRUE(running.status().ok()) << running.status().ToString();
  struct stat st {};
  ASSERT_EQ(::stat((mnt / "vm" / "disk").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskSize);
}

TEST_F(MountpointTest, RegularFileIsRefused) {
  const fs::path file = dir_.path() / "file";
  UniqueFd(::open(file.c_str(), O_CREAT | O_WRONLY, 0644));
  auto mounted = FuseFs::Mount(file, {{"vm", "disk", &disk_}});
  ASSERT_FALSE(mounted.ok());
  EXPECT_EQ(mounted.status().code(), ENOTDIR);
  EXPECT_NE(mounted.status().message().find("not a directory"), std::string::npos);
}

TEST_F(MountpointTest, MountPointInUseIsRefused) {
  const fs::path mnt = dir_.path() / "mnt";
  RunningFs first(mnt, {{"vm", "disk", &disk_}});
  ASSERT_TRUE(first.status().ok());
  MemBackend other(kDiskSize);
  auto second = FuseFs::Mount(mnt, {{"vm", "disk", &other}});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), EBUSY);
  EXPECT_NE(second.status().message().find("already a mount point"), std::string::npos);
  // The first mount is untouched.
  struct stat st {};
  EXPECT_EQ(::stat((mnt / "vm" / "disk").c_str(), &st), 0);

  // A bind mount (same device as its parent) is found too, also with a space in its path
  // (escaped in /proc/self/mountinfo).
  const fs::path src = dir_.path() / "src";
  const fs::path bind = dir_.path() / "bind point";
  fs::create_directories(src);
  fs::create_directories(bind);
  ASSERT_EQ(::mount(src.c_str(), bind.c_str(), nullptr, MS_BIND, nullptr), 0);
  auto over_bind = FuseFs::Mount(bind, {{"vm", "disk", &other}});
  EXPECT_EQ(over_bind.status().code(), EBUSY);
  ::umount2(bind.c_str(), MNT_DETACH);
}

TEST_F(MountpointTest, StaleMountIsRefusedWithAHint) {
  // A daemon killed with SIGKILL leaves its mount behind, answering ENOTCONN.
  const fs::path mnt = dir_.path() / "mnt";
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    MemBackend disk(kDiskSize);
    auto mounted = FuseFs::Mount(mnt, {{"vm", "disk", &disk}});
    char c = mounted.ok() ? 'y' : 'n';
    (void)::write(ready[1], &c, 1);
    ::pause();
    ::_exit(0);
  }
  ::close(ready[1]);
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  ::close(ready[0]);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ASSERT_EQ(c, 'y');

  struct stat st {};
  errno = 0;
  EXPECT_NE(::stat(mnt.c_str(), &st), 0);
  EXPECT_EQ(errno, ENOTCONN);
  auto again = FuseFs::Mount(mnt, {{"vm", "disk", &disk_}});
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), ENOTCONN);
  EXPECT_NE(again.status().message().find("fusermount3 -u " + mnt.string()), std::string::npos)
      << again.status().message();
  // TempDir unmounts the stale mount (ours) on the way out.
}

TEST_F(MountpointTest, BadDisksChangeNothing) {
  const fs::path mnt = dir_.path() / "never";
  auto dup = FuseFs::Mount(mnt, {{"vm", "disk", &disk_}, {"vm", "disk", &disk_}});
  EXPECT_EQ(dup.status().code(), EEXIST);
  auto null_backend = FuseFs::Mount(mnt, {{"vm", "disk", nullptr}});
  EXPECT_EQ(null_backend.status().code(), EINVAL);
  auto bad_name = FuseFs::Mount(mnt, {{"..", "disk", &disk_}});
  EXPECT_EQ(bad_name.status().code(), EINVAL);
  EXPECT_FALSE(fs::exists(mnt));
}

TEST_F(MountpointTest, StopBeforeRunMakesRunReturn) {
  const fs::path mnt = dir_.path() / "mnt";
  auto mounted = FuseFs::Mount(mnt, {{"vm", "disk", &disk_}});
  ASSERT_TRUE(mounted.ok());
  (*mounted)->Stop();
  EXPECT_TRUE((*mounted)->Run().ok());
  mounted->reset();
  EXPECT_TRUE(MountsUnder(dir_.path()).empty());
}

TEST_F(MountpointTest, DestroyWithoutRunUnmounts) {
  const fs::path mnt = dir_.path() / "mnt";
  {
    auto mounted = FuseFs::Mount(mnt, {{"vm", "disk", &disk_}});
    ASSERT_TRUE(mounted.ok());
    EXPECT_EQ(MountsUnder(dir_.path()).size(), 1u);
  }
  EXPECT_TRUE(MountsUnder(dir_.path()).empty());
}

}  // namespace
}  // namespace siterep::blockdev
