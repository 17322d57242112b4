#include "blockdev/inode_table.h"

#include <mutex>

namespace siterep::blockdev {

namespace {

constexpr uint32_t kDirPerm = 0755;
constexpr uint32_t kDiskPerm = 0600;
constexpr size_t kMaxNameLength = 255;

timespec Now() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

}  // namespace

bool DiskFile::Enter() {
  in_flight_.fetch_add(1, std::memory_order_seq_cst);
  if (retired_.load(std::memory_order_seq_cst)) {
    Leave();
    return false;
  }
  return true;
}

void DiskFile::Leave() {
  if (in_flight_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
      retired_.load(std::memory_order_seq_cst)) {
    in_flight_.notify_all();
  }
}

void DiskFile::Retire() {
  retired_.store(true, std::memory_order_seq_cst);
  for (uint32_t n = in_flight_.load(std::memory_order_seq_cst); n != 0;
       n = in_flight_.load(std::memory_order_seq_cst)) {
    in_flight_.wait(n, std::memory_order_seq_cst);
  }
}

Status ValidateName(std::string_view what, std::string_view name) {
  std::string quoted = std::string(what) + " name \"" + std::string(name) + "\"";
  if (name.empty()) return Status::Invalid(std::string(what) + " name is empty");
  if (name.size() > kMaxNameLength) return Status::Invalid(quoted + " is longer than 255 bytes");
  if (name.find('/') != std::string_view::npos || name.find('\0') != std::string_view::npos) {
    return Status::Invalid(quoted + " contains '/' or NUL");
  }
  if (name.front() == '.') return Status::Invalid(quoted + " starts with '.'");
  return Status::Ok();
}

InodeTable::InodeTable() {
  Node root;
  root.kind = NodeKind::kRoot;
  root.parent = kRootIno;
  root.perm = kDirPerm;
  root.time = Now();
  nodes_.emplace(kRootIno, std::move(root));
}

Status InodeTable::AddDisk(const std::string& vm, const std::string& disk, DiskBackend* backend) {
  SR_RETURN_IF_ERROR(ValidateName("VM", vm));
  SR_RETURN_IF_ERROR(ValidateName("disk", disk));
  if (backend == nullptr) return Status::Invalid("disk " + vm + "/" + disk + " has no backend");

  std::unique_lock lock(mu_);
  Node& root = nodes_.at(kRootIno);
  uint64_t vm_ino;
  auto vm_it = root.children.find(vm);
  if (vm_it == root.children.end()) {
    vm_ino = next_ino_++;
    Node dir;
    dir.kind = NodeKind::kVmDir;
    dir.parent = kRootIno;
    dir.perm = kDirPerm;
    dir.time = Now();
    nodes_.emplace(vm_ino, std::move(dir));
    root.children.emplace(vm, vm_ino);
  } else {
    vm_ino = vm_it->second;
  }
  Node& dir = nodes_.at(vm_ino);
  if (dir.children.contains(disk)) {
    return Status::Error(EEXIST, "disk " + vm + "/" + disk + " is exported already");
  }
  uint64_t ino = next_ino_++;
  Node file;
  file.kind = NodeKind::kDisk;
  file.parent = vm_ino;
  file.perm = kDiskPerm;
  file.time = Now();
  file.disk = std::make_shared<DiskFile>(ino, vm + "/" + disk, backend);
  total_bytes_ += file.disk->size();
  nodes_.emplace(ino, std::move(file));
  dir.children.emplace(disk, ino);
  return Status::Ok();
}

Result<RemovedDisk> InodeTable::RemoveDisk(const std::string& vm, const std::string& disk) {
  std::unique_lock lock(mu_);
  Node& root = nodes_.at(kRootIno);
  auto vm_it = root.children.find(vm);
  if (vm_it == root.children.end()) {
    return Status::Error(ENOENT, "remove disk " + vm + "/" + disk + ": no such VM");
  }
  const uint64_t vm_ino = vm_it->second;
  Node& dir = nodes_.at(vm_ino);
  auto disk_it = dir.children.find(disk);
  if (disk_it == dir.children.end()) {
    return Status::Error(ENOENT, "remove disk " + vm + "/" + disk + ": no such disk");
  }
  auto node_it = nodes_.find(disk_it->second);
  RemovedDisk removed;
  removed.file = std::move(node_it->second.disk);
  removed.vm_ino = vm_ino;
  total_bytes_ -= removed.file->size();
  nodes_.erase(node_it);
  dir.children.erase(disk_it);
  if (dir.children.empty()) {
    nodes_.erase(vm_ino);
    root.children.erase(vm_it);
    removed.vm_removed = true;
  }
  return removed;
}

NodeInfo InodeTable::InfoLocked(uint64_t ino, const Node& node) const {
  NodeInfo info;
  info.ino = ino;
  info.kind = node.kind;
  info.perm = node.perm;
  info.uid = node.uid;
  info.gid = node.gid;
  info.time = node.time;
  switch (node.kind) {
    case NodeKind::kRoot:
      // "." and ".." plus the ".." of every VM directory.
      info.nlink = 2 + static_cast<uint32_t>(node.children.size());
      break;
    case NodeKind::kVmDir:
      info.nlink = 2;
      break;
    case NodeKind::kDisk:
      info.nlink = 1;
      info.size = node.disk->size();
      break;
  }
  return info;
}

int InodeTable::Lookup(uint64_t parent, std::string_view name, NodeInfo* out) const {
  std::shared_lock lock(mu_);
  auto parent_it = nodes_.find(parent);
  if (parent_it == nodes_.end()) return ENOENT;
  const Node& dir = parent_it->second;
  if (dir.kind == NodeKind::kDisk) return ENOTDIR;
  auto child = dir.children.find(name);
  if (child == dir.children.end()) return ENOENT;
  *out = InfoLocked(child->second, nodes_.at(child->second));
  return 0;
}

int InodeTable::GetAttr(uint64_t ino, NodeInfo* out) const {
  std::shared_lock lock(mu_);
  auto it = nodes_.find(ino);
  if (it == nodes_.end()) return ENOENT;
  *out = InfoLocked(ino, it->second);
  return 0;
}

int InodeTable::SetAttr(uint64_t ino, const AttrChange& change, NodeInfo* out) {
  std::unique_lock lock(mu_);
  auto it = nodes_.find(ino);
  if (it == nodes_.end()) return ENOENT;
  Node& node = it->second;
  if (change.size.has_value()) {
    if (node.kind != NodeKind::kDisk) return EISDIR;
    if (*change.size != node.disk->size()) return EPERM;
  }
  if (change.perm.has_value()) node.perm = *change.perm & 07777;
  if (change.uid.has_value()) node.uid = *change.uid;
  if (change.gid.has_value()) node.gid = *change.gid;
  if (change.perm.has_value() || change.uid.has_value() || change.gid.has_value()) {
    node.time = Now();
  }
  *out = InfoLocked(ino, node);
  return 0;
}

int InodeTable::OpenDisk(uint64_t ino, std::shared_ptr<DiskFile>* out) const {
  std::shared_lock lock(mu_);
  auto it = nodes_.find(ino);
  if (it == nodes_.end()) return ENOENT;
  if (it->second.kind != NodeKind::kDisk) return EISDIR;
  *out = it->second.disk;
  return 0;
}

int InodeTable::List(uint64_t ino, std::vector<DirEntry>* out, uint64_t* parent_ino) const {
  std::shared_lock lock(mu_);
  auto it = nodes_.find(ino);
  if (it == nodes_.end()) return ENOENT;
  const Node& dir = it->second;
  if (dir.kind == NodeKind::kDisk) return ENOTDIR;
  out->clear();
  out->reserve(dir.children.size());
  for (const auto& [name, child_ino] : dir.children) {
    out->push_back(DirEntry{name, child_ino, nodes_.at(child_ino).kind});
  }
  *parent_ino = dir.parent;
  return 0;
}

uint64_t InodeTable::TotalBytes() const {
  std::shared_lock lock(mu_);
  return total_bytes_;
}

uint64_t InodeTable::NodeCount() const {
  std::shared_lock lock(mu_);
  return nodes_.size();
}

}  // namespace siterep::blockdev
