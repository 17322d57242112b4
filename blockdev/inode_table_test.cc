#include "blockdev/inode_table.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "blockdev/test_util.h"

namespace siterep::blockdev {
namespace {

using testing::MemBackend;

TEST(InodeTableTest, TreeAndStableInodes) {
  MemBackend a(4096), b(8192);
  InodeTable table;
  ASSERT_TRUE(table.AddDisk("vm", "a", &a).ok());
  ASSERT_TRUE(table.AddDisk("vm", "b", &b).ok());

  NodeInfo vm, disk_a, again;
  ASSERT_EQ(table.Lookup(kRootIno, "vm", &vm), 0);
  EXPECT_EQ(vm.kind, NodeKind::kVmDir);
  ASSERT_EQ(table.Lookup(vm.ino, "a", &disk_a), 0);
  EXPECT_EQ(disk_a.kind, NodeKind::kDisk);
  EXPECT_EQ(disk_a.size, 4096u);
  EXPECT_EQ(disk_a.perm, 0600u);
  ASSERT_EQ(table.GetAttr(disk_a.ino, &again), 0);
  EXPECT_EQ(again.ino, disk_a.ino);
  EXPECT_EQ(table.Lookup(vm.ino, "c", &again), ENOENT);
  EXPECT_EQ(table.Lookup(disk_a.ino, "x", &again), ENOTDIR);
  EXPECT_EQ(table.TotalBytes(), 12288u);

  std::vector<DirEntry> entries;
  uint64_t parent = 0;
  ASSERT_EQ(table.List(vm.ino, &entries, &parent), 0);
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].name, "a");
  EXPECT_EQ(entries[1].name, "b");
  EXPECT_EQ(parent, kRootIno);
  EXPECT_EQ(table.List(disk_a.ino, &entries, &parent), ENOTDIR);

  // Removing b leaves a's number alone; adding b again gives a new number.
  NodeInfo disk_b;
  ASSERT_EQ(table.Lookup(vm.ino, "b", &disk_b), 0);
  auto removed = table.RemoveDisk("vm", "b");
  ASSERT_TRUE(removed.ok());
  EXPECT_FALSE(removed->vm_removed);
  EXPECT_EQ(removed->file->ino(), disk_b.ino);
  ASSERT_TRUE(table.AddDisk("vm", "b", &b).ok());
  NodeInfo b_again;
  ASSERT_EQ(table.Lookup(vm.ino, "b", &b_again), 0);
  EXPECT_NE(b_again.ino, disk_b.ino);
  ASSERT_EQ(table.Lookup(vm.ino, "a", &again), 0);
  EXPECT_EQ(again.ino, disk_a.ino);
  EXPECT_EQ(table.GetAttr(disk_b.ino, &again), ENOENT);
}

TEST(InodeTableTest, LastDiskTakesTheVmDirectory) {
  MemBackend a(4096);
  InodeTable table;
  ASSERT_TRUE(table.AddDisk("vm", "a", &a).ok());
  auto removed = table.RemoveDisk("vm", "a");
  ASSERT_TRUE(removed.ok());
  EXPECT_TRUE(removed->vm_removed);
  NodeInfo info;
  EXPECT_EQ(table.Lookup(kRootIno, "vm", &info), ENOENT);
  EXPECT_EQ(table.RemoveDisk("vm", "a").status().code(), ENOENT);
  EXPECT_EQ(table.NodeCount(), 1u);
}

TEST(InodeTableTest, BadNamesAndDuplicates) {
  MemBackend a(4096);
  InodeTable table;
  for (const char* bad : {"", ".", "..", ".hidden", "a/b"}) {
    EXPECT_EQ(table.AddDisk(bad, "a", &a).code(), EINVAL) << bad;
    EXPECT_EQ(table.AddDisk("vm", bad, &a).code(), EINVAL) << bad;
  }
  EXPECT_EQ(table.AddDisk(std::string(256, 'x'), "a", &a).code(), EINVAL);
  EXPECT_EQ(table.AddDisk("vm", "a", nullptr).code(), EINVAL);
  ASSERT_TRUE(table.AddDisk("vm", "a", &a).ok());
  EXPECT_EQ(table.AddDisk("vm", "a", &a).code(), EEXIST);
}

TEST(InodeTableTest, SetAttrKeepsSizeAndStoresOwner) {
  MemBackend a(4096);
  InodeTable table;
  ASSERT_TRUE(table.AddDisk("vm", "a", &a).ok());
  NodeInfo vm, disk;
  ASSERT_EQ(table.Lookup(kRootIno, "vm", &vm), 0);
  ASSERT_EQ(table.Lookup(vm.ino, "a", &disk), 0);
  NodeInfo out;
  EXPECT_EQ(table.SetAttr(disk.ino, AttrChange{.size = 8192, .perm = 0644}, &out), EPERM);
  ASSERT_EQ(table.GetAttr(disk.ino, &out), 0);
  EXPECT_EQ(out.perm, 0600u);  // all or nothing
  ASSERT_EQ(table.SetAttr(disk.ino, AttrChange{.size = 4096, .perm = 0640, .uid = 7}, &out), 0);
  EXPECT_EQ(out.perm, 0640u);
  EXPECT_EQ(out.uid, 7u);
  EXPECT_EQ(out.size, 4096u);
  EXPECT_EQ(table.SetAttr(vm.ino, AttrChange{.size = 0}, &out), EISDIR);
}

TEST(InodeTableTest, RetireWaitsForRequestsInFlight) {
  MemBackend a(4096);
  InodeTable table;
  ASSERT_TRUE(table.AddDisk("vm", "a", &a).ok());
  NodeInfo vm, disk;
  ASSERT_EQ(table.Lookup(kRootIno, "vm", &vm), 0);
  ASSERT_EQ(table.Lookup(vm.ino, "a", &disk), 0);
  std::shared_ptr<DiskFile> file;
  ASSERT_EQ(table.OpenDisk(disk.ino, &file), 0);
  EXPECT_EQ(table.OpenDisk(vm.ino, &file), EISDIR);
  ASSERT_EQ(table.OpenDisk(disk.ino, &file), 0);

  std::atomic<bool> retired{false};
  auto guard = std::make_unique<IoGuard>(*file);
  ASSERT_TRUE(guard->ok());
  std::thread remover([&] {
    file->Retire();
    retired = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(retired.load());  // a request is still in flight
  guard.reset();
  remover.join();
  EXPECT_TRUE(retired.load());
  IoGuard late(*file);
  EXPECT_FALSE(late.ok());
}

}  // namespace
}  // namespace siterep::blockdev
