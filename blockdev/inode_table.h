// InodeTable: the tree that FuseFs serves (root, one directory per VM, one regular file
// per disk) and the inode numbers the kernel knows its nodes by.
//
// Inode numbers are handed out once and never reused while the table lives, so a node
// keeps its number as long as it is in the tree; a disk removed and added again gets a
// new one (and the kernel cannot mix up the two). Attributes (permission bits, owner)
// live here too: chmod/chown are kept in memory for the life of the mount, so that a
// management layer (libvirt) can hand a disk to the qemu user.
//
// DiskFile is the part of a disk that open file handles share with the table: the
// backend and a gate that lets RemoveDisk wait until no request still uses the backend.
//
// Threads: every method is thread-safe. The table's mutex is a leaf lock (nothing else is
// taken while it is held); DiskFile's gate is lock-free and never taken with it.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <ctime>
#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "blockdev/backend.h"
#include "common/status.h"

namespace siterep::blockdev {

inline constexpr uint64_t kRootIno = 1;  // FUSE_ROOT_ID

enum class NodeKind : uint8_t { kRoot, kVmDir, kDisk };

// One exported disk. Shared (shared_ptr) by the table and by every open handle, so that a
// handle of a removed disk stays valid and answers EIO instead of touching a backend that
// may already be gone.
class DiskFile {
 public:
  DiskFile(uint64_t ino, std::string name, DiskBackend* backend)
      : ino_(ino), name_(std::move(name)), size_(backend->Size()), backend_(backend) {}
  DiskFile(const DiskFile&) = delete;
  DiskFile& operator=(const DiskFile&) = delete;

  uint64_t ino() const { return ino_; }
  const std::string& name() const { return name_; }  // "vm/disk", for messages
  uint64_t size() const { return size_; }

  // After Retire() returns, no request uses the backend any more and none will: the
  // caller may destroy it. Blocks while requests that entered before are in flight.
  void Retire();
  bool retired() const { return retired_.load(std::memory_order_acquire); }

 private:
  friend class IoGuard;
  // Dekker-style pair (both seq_cst): a request increments in_flight_ and then checks
  // retired_; Retire sets retired_ and then waits for in_flight_ to drain. Either the
  // request sees retired_ or Retire sees the request. Unlike a reader-writer lock this
  // cannot starve Retire under a steady stream of requests.
  bool Enter();
  void Leave();

  const uint64_t ino_;
  const std::string name_;
  const uint64_t size_;
  DiskBackend* const backend_;
  std::atomic<uint32_t> in_flight_{0};
  std::atomic<bool> retired_{false};
};

// Scope of one request's use of a disk's backend.
class IoGuard {
 public:
  explicit IoGuard(DiskFile& file) : file_(file), entered_(file.Enter()) {}
  ~IoGuard() {
    if (entered_) file_.Leave();
  }
  IoGuard(const IoGuard&) = delete;
  IoGuard& operator=(const IoGuard&) = delete;

  // false: the disk was removed; answer EIO and do not touch backend().
  bool ok() const { return entered_; }
  DiskBackend* backend() const { return file_.backend_; }

 private:
  DiskFile& file_;
  const bool entered_;
};

// What getattr/lookup report about a node.
struct NodeInfo {
  uint64_t ino = 0;
  NodeKind kind = NodeKind::kRoot;
  uint32_t perm = 0;  // permission bits only (07777)
  uid_t uid = 0;
  gid_t gid = 0;
  uint64_t size = 0;  // disks: the backend size; directories: 0
  uint32_t nlink = 1;
  timespec time{};  // atime = mtime = ctime
};

struct DirEntry {
  std::string name;
  uint64_t ino = 0;
  NodeKind kind = NodeKind::kRoot;
};

// Which attributes a setattr changes; unset members stay as they are.
struct AttrChange {
  std::optional<uint64_t> size;  // only the current size is accepted (EPERM otherwise)
  std::optional<uint32_t> perm;
  std::optional<uid_t> uid;
  std::optional<gid_t> gid;
};

// What RemoveDisk took out of the tree, for the caller to retire and announce.
struct RemovedDisk {
  std::shared_ptr<DiskFile> file;
  uint64_t vm_ino = 0;
  bool vm_removed = false;  // the disk was the VM's last: its directory is gone too
};

// VM and disk names: 1..255 bytes, no '/' or NUL, not starting with '.' (so that "." and
// ".." and FuseFs's internal wake-up name can never be a node). EINVAL otherwise.
Status ValidateName(std::string_view what, std::string_view name);

class InodeTable {
 public:
  InodeTable();
  InodeTable(const InodeTable&) = delete;
  InodeTable& operator=(const InodeTable&) = delete;

  // Adds vm/disk (creating the VM directory if needed). backend is borrowed and must
  // outlive the table or the RemoveDisk of this disk. EEXIST if vm/disk is there already,
  // EINVAL for a bad name or a null backend.
  Status AddDisk(const std::string& vm, const std::string& disk, DiskBackend* backend);
  // Takes vm/disk out of the tree (and the VM directory with its last disk). ENOENT if
  // absent. The caller retires the returned file.
  Result<RemovedDisk> RemoveDisk(const std::string& vm, const std::string& disk);

  // The node called name in directory parent. Returns 0 or an errno (ENOENT, ENOTDIR).
  int Lookup(uint64_t parent, std::string_view name, NodeInfo* out) const;
  // Returns 0 or ENOENT.
  int GetAttr(uint64_t ino, NodeInfo* out) const;
  // Applies change atomically (all or nothing). Returns 0, ENOENT, or EPERM when the size
  // would change.
  int SetAttr(uint64_t ino, const AttrChange& change, NodeInfo* out);
  // The disk behind ino, for open. Returns 0, ENOENT, or EISDIR.
  int OpenDisk(uint64_t ino, std::shared_ptr<DiskFile>* out) const;
  // The entries of directory ino (without "." and ".."), sorted by name, and the inode of
  // its parent. Returns 0, ENOENT or ENOTDIR.
  int List(uint64_t ino, std::vector<DirEntry>* out, uint64_t* parent_ino) const;

  // Sum of the disk sizes and number of nodes, for statfs.
  uint64_t TotalBytes() const;
  uint64_t NodeCount() const;

 private:
  struct Node {
    NodeKind kind = NodeKind::kRoot;
    uint64_t parent = kRootIno;
    uint32_t perm = 0;
    uid_t uid = 0;
    gid_t gid = 0;
    timespec time{};
    std::map<std::string, uint64_t, std::less<>> children;  // directories only
    std::shared_ptr<DiskFile> disk;                         // disks only
  };

  NodeInfo InfoLocked(uint64_t ino, const Node& node) const;

  // Protects everything below. Leaf lock.
  mutable std::shared_mutex mu_;
  std::unordered_map<uint64_t, Node> nodes_;
  uint64_t next_ino_ = kRootIno + 1;
  uint64_t total_bytes_ = 0;
};

}  // namespace siterep::blockdev
