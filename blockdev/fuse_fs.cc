// FuseFs: session, mount, loop and the low-level request handlers.
//
// Every handler answers its request exactly once, as its last statement, and nothing
// throws out of it: the trampolines in kOps catch what a handler may throw before it
// replies (allocation failure) and answer EIO.
#define FUSE_USE_VERSION 314

#include "blockdev/fuse_fs.h"

#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/falloc.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "blockdev/inode_table.h"
#include "blockdev/mountpoint.h"

namespace siterep::blockdev {

namespace fs = std::filesystem;

namespace {

// Largest request: max_write, and (derived from it by libfuse) max_pages * page size.
constexpr unsigned kMaxIo = 1u << 20;
// Kernel background requests (async direct I/O, readahead). The default of 12 would cap
// an io_uring queue of 32 at 12 requests in flight.
constexpr unsigned kMaxBackground = 128;
// How long the kernel may cache names and attributes. The tree changes rarely, and when
// a disk is removed the kernel is told at once (notify_inval_*); sizes never change.
constexpr double kCacheTimeout = 1.0;
// Looked up by Stop() to wake the loop; never a node (names cannot start with '.').
constexpr char kWakeName[] = ".siterep-stop";

// What fuse_file_info::fh points to. Every handle is also listed in Impl::handles_, so
// that the ones whose release never arrives (the loop stopped first) are freed by ~Impl.
struct Handle {
  virtual ~Handle() = default;
};

// An open disk file: keeps the DiskFile alive while the kernel holds the handle.
struct OpenDisk : Handle {
  explicit OpenDisk(std::shared_ptr<DiskFile> f) : file(std::move(f)) {}
  std::shared_ptr<DiskFile> file;
};

// An open directory: a snapshot of its entries, so readdir offsets stay valid while the
// tree changes.
struct OpenDir : Handle {
  std::vector<DirEntry> entries;  // includes "." and ".."
};

Handle* HandleOf(const fuse_file_info* fi) { return reinterpret_cast<Handle*>(fi->fh); }
OpenDisk* DiskHandle(const fuse_file_info* fi) { return static_cast<OpenDisk*>(HandleOf(fi)); }
OpenDir* DirHandle(const fuse_file_info* fi) { return static_cast<OpenDir*>(HandleOf(fi)); }

int ErrnoOf(const Status& status) { return status.code() > 0 ? status.code() : EIO; }

mode_t TypeBits(NodeKind kind) { return kind == NodeKind::kDisk ? S_IFREG : S_IFDIR; }

void FillStat(const NodeInfo& info, struct stat* st) {
  *st = {};
  st->st_ino = info.ino;
  st->st_mode = TypeBits(info.kind) | info.perm;
  st->st_nlink = info.nlink;
  st->st_uid = info.uid;
  st->st_gid = info.gid;
  st->st_size = static_cast<off_t>(info.size);
  st->st_blksize = 4096;
  st->st_blocks = static_cast<blkcnt_t>((info.size + 511) / 512);
  st->st_atim = info.time;
  st->st_mtim = info.time;
  st->st_ctim = info.time;
}

// One read buffer per FUSE worker thread: no allocation per request. Allocated with new[]
// (not value-initialised), so untouched pages cost no memory.
std::byte* ReadBuffer(size_t size) {
  thread_local std::unique_ptr<std::byte[]> buffer;
  thread_local size_t capacity = 0;
  if (size > capacity) {
    const size_t want = std::max<size_t>(size, kMaxIo);
    buffer.reset(new std::byte[want]);
    capacity = want;
  }
  return buffer.get();
}

// Backend errors go to the log, but a guest hammering a failing (or fenced) disk must not
// flood it: at most one line per second, with the number of errors not shown.
// Process-wide, which is what a log reader needs.
void LogIoError(const DiskFile& file, const Status& status) {
  static std::atomic<int64_t> next_log_ns{0};
  static std::atomic<uint64_t> suppressed{0};
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch())
                          .count();
  int64_t next = next_log_ns.load(std::memory_order_relaxed);
  if (now < next || !next_log_ns.compare_exchange_strong(next, now + 1'000'000'000)) {
    suppressed.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  const uint64_t hidden = suppressed.exchange(0, std::memory_order_relaxed);
  if (hidden == 0) {
    spdlog::warn("disk {}: {}", file.name(), status.ToString());
  } else {
    spdlog::warn("disk {}: {} ({} more I/O errors since the last message)", file.name(),
                 status.ToString(), hidden);
  }
}

// Routes libfuse's own messages (mount errors and the like) to the daemon's log.
void FuseLog(enum fuse_log_level level, const char* fmt, va_list ap) {
  char line[512];
  std::vsnprintf(line, sizeof(line), fmt, ap);
  std::string_view text(line);
  while (!text.empty() && text.back() == '\n') text.remove_suffix(1);
  if (level <= FUSE_LOG_ERR) {
    spdlog::error("libfuse: {}", text);
  } else if (level <= FUSE_LOG_NOTICE) {
    spdlog::warn("libfuse: {}", text);
  } else {
    spdlog::debug("libfuse: {}", text);
  }
}

}  // namespace

class FuseFs::Impl {
 public:
  explicit Impl(FuseOptions options) : options_(options) {}
  ~Impl();

  InodeTable& table() { return table_; }
  Status Mount(const fs::path& mountpoint);
  Status Run();
  void Stop();
  Status RemoveDisk(const std::string& vm, const std::string& disk);
  Status DropCache(const std::string& vm, const std::string& disk);

  // Request handlers (called through the trampolines in kOps).
  void Init(fuse_conn_info* conn);
  void Lookup(fuse_req_t req, fuse_ino_t parent, const char* name);
  void GetAttr(fuse_req_t req, fuse_ino_t ino);
  void SetAttr(fuse_req_t req, fuse_ino_t ino, const struct stat* attr, int to_set);
  void Open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void Read(fuse_req_t req, size_t size, off_t offset, fuse_file_info* fi);
  void Write(fuse_req_t req, const char* buf, size_t size, off_t offset, fuse_file_info* fi);
  void Fsync(fuse_req_t req, fuse_file_info* fi);
  void Fallocate(fuse_req_t req, int mode, off_t offset, off_t length, fuse_file_info* fi);
  void Release(fuse_req_t req, fuse_file_info* fi);
  void OpenDirectory(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void ReadDirectory(fuse_req_t req, size_t size, off_t offset, fuse_file_info* fi);
  void ReleaseDirectory(fuse_req_t req, fuse_file_info* fi);
  void StatFs(fuse_req_t req);

 private:
  static const fuse_lowlevel_ops kOps;
  static Impl* Self(fuse_req_t req) { return static_cast<Impl*>(fuse_req_userdata(req)); }

  // Lists handle (owned from then on) and stores it in fi->fh. Before the reply: a
  // release may arrive as soon as the open is answered.
  void AdoptHandle(std::unique_ptr<Handle> handle, fuse_file_info* fi);
  // Unlists and deletes the handle in fi->fh (release, or an open whose reply failed).
  void DropHandle(fuse_file_info* fi);

  const FuseOptions options_;
  InodeTable table_;
  fs::path mountpoint_;
  fuse_session* se_ = nullptr;  // owned; unmounted and destroyed by ~Impl

  // Protects the four members below. Leaf lock: nothing is called while it is held except
  // fuse_session_exit (a flag store) and std::thread creation.
  std::mutex run_mu_;
  std::condition_variable run_cv_;  // signalled when running_ drops
  bool running_ = false;
  bool stop_requested_ = false;
  std::thread waker_;  // Stop()'s wake-up lookup; joined by ~Impl after the session is torn down

  // Protects handles_. Leaf lock; taken only by open/release paths and ~Impl.
  std::mutex handles_mu_;
  std::unordered_set<Handle*> handles_;  // owned
};

// ---- Trampolines: libfuse calls these; each forwards to the Impl and answers EIO if the
// handler throws before it replied (the handlers reply as their last statement).

namespace {

template <typename F>
void Guarded(fuse_req_t req, F&& body) noexcept {
  try {
    body();
  } catch (const std::exception& e) {
    spdlog::error("FUSE request failed: {}", e.what());
    fuse_reply_err(req, EIO);
  } catch (...) {
    fuse_reply_err(req, EIO);
  }
}

void RefusePermission(fuse_req_t req) { fuse_reply_err(req, EPERM); }

}  // namespace

const fuse_lowlevel_ops FuseFs::Impl::kOps = [] {
  fuse_lowlevel_ops ops{};
  ops.init = [](void* userdata, fuse_conn_info* conn) { static_cast<Impl*>(userdata)->Init(conn); };
  ops.lookup = [](fuse_req_t req, fuse_ino_t parent, const char* name) {
    Guarded(req, [&] { Self(req)->Lookup(req, parent, name); });
  };
  ops.getattr = [](fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
    Guarded(req, [&] { Self(req)->GetAttr(req, ino); });
  };
  ops.setattr = [](fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info*) {
    Guarded(req, [&] { Self(req)->SetAttr(req, ino, attr, to_set); });
  };
  ops.open = [](fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    Guarded(req, [&] { Self(req)->Open(req, ino, fi); });
  };
  ops.read = [](fuse_req_t req, fuse_ino_t, size_t size, off_t offset, fuse_file_info* fi) {
    Guarded(req, [&] { Self(req)->Read(req, size, offset, fi); });
  };
  ops.write = [](fuse_req_t req, fuse_ino_t, const char* buf, size_t size, off_t offset,
                 fuse_file_info* fi) {
    Guarded(req, [&] { Self(req)->Write(req, buf, size, offset, fi); });
  };
  // Nothing is buffered here, so close has nothing to push (open also sets noflush).
  ops.flush = [](fuse_req_t req, fuse_ino_t, fuse_file_info*) { fuse_reply_err(req, 0); };
  ops.fsync = [](fuse_req_t req, fuse_ino_t, int /*datasync*/, fuse_file_info* fi) {
    // fdatasync and fsync alike: the only metadata (size) never changes.
    Guarded(req, [&] { Self(req)->Fsync(req, fi); });
  };
  ops.fallocate = [](fuse_req_t req, fuse_ino_t, int mode, off_t offset, off_t length,
                     fuse_file_info* fi) {
    Guarded(req, [&] { Self(req)->Fallocate(req, mode, offset, length, fi); });
  };
  ops.release = [](fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
    Guarded(req, [&] { Self(req)->Release(req, fi); });
  };
  ops.opendir = [](fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    Guarded(req, [&] { Self(req)->OpenDirectory(req, ino, fi); });
  };
  ops.readdir = [](fuse_req_t req, fuse_ino_t, size_t size, off_t offset, fuse_file_info* fi) {
    Guarded(req, [&] { Self(req)->ReadDirectory(req, size, offset, fi); });
  };
  ops.releasedir = [](fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
    Guarded(req, [&] { Self(req)->ReleaseDirectory(req, fi); });
  };
  ops.statfs = [](fuse_req_t req, fuse_ino_t) { Guarded(req, [&] { Self(req)->StatFs(req); }); };
  // The tree is the configuration's: nothing is created, removed or renamed through the
  // mount.
  ops.mknod = [](fuse_req_t req, fuse_ino_t, const char*, mode_t, dev_t) { RefusePermission(req); };
  ops.mkdir = [](fuse_req_t req, fuse_ino_t, const char*, mode_t) { RefusePermission(req); };
  ops.unlink = [](fuse_req_t req, fuse_ino_t, const char*) { RefusePermission(req); };
  ops.rmdir = [](fuse_req_t req, fuse_ino_t, const char*) { RefusePermission(req); };
  ops.symlink = [](fuse_req_t req, const char*, fuse_ino_t, const char*) { RefusePermission(req); };
  ops.rename = [](fuse_req_t req, fuse_ino_t, const char*, fuse_ino_t, const char*, unsigned int) {
    RefusePermission(req);
  };
  ops.link = [](fuse_req_t req, fuse_ino_t, fuse_ino_t, const char*) { RefusePermission(req); };
  ops.create = [](fuse_req_t req, fuse_ino_t, const char*, mode_t, fuse_file_info*) {
    RefusePermission(req);
  };
  return ops;
}();

// ---- Handlers.

void FuseFs::Impl::Init(fuse_conn_info* conn) {
  conn->max_write = kMaxIo;  // libfuse derives max_pages from it (256 pages of 4 KiB)
  conn->max_readahead = kMaxIo;
  conn->max_background = kMaxBackground;
  conn->congestion_threshold = kMaxBackground * 3 / 4;
  // Parallel O_DIRECT from io_uring / libaio: the kernel sends the requests of one
  // submission without waiting for each other.
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  // The kernel must not hold guest writes back (a guest flush has to reach Flush()), so
  // no writeback cache. Splicing does not pay for small requests: the copy from the
  // request buffer is the only one. The page cache of a disk is only changed through this
  // mount and dropped at open, so no attribute-driven invalidation either (it would cost a
  // GETATTR after every buffered write).
  conn->want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
                  FUSE_CAP_SPLICE_MOVE | FUSE_CAP_AUTO_INVAL_DATA);
  spdlog::debug("FUSE init at {}: protocol 7.{}, max_write {}, async_dio {}, max_background {}",
                mountpoint_.string(), conn->proto_minor, conn->max_write,
                (conn->want & FUSE_CAP_ASYNC_DIO) != 0, conn->max_background);
}

void FuseFs::Impl::Lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  NodeInfo info;
  if (int err = table_.Lookup(parent, name, &info); err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_entry_param entry{};
  entry.ino = info.ino;
  entry.generation = 1;  // inode numbers are never reused within a mount
  entry.attr_timeout = kCacheTimeout;
  entry.entry_timeout = kCacheTimeout;
  FillStat(info, &entry.attr);
  fuse_reply_entry(req, &entry);
}

void FuseFs::Impl::GetAttr(fuse_req_t req, fuse_ino_t ino) {
  NodeInfo info;
  if (int err = table_.GetAttr(ino, &info); err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  struct stat st;
  FillStat(info, &st);
  fuse_reply_attr(req, &st, kCacheTimeout);
}

void FuseFs::Impl::SetAttr(fuse_req_t req, fuse_ino_t ino, const struct stat* attr, int to_set) {
  // Size: only "truncate to the current size" is accepted. Mode and owner are kept (in
  // memory) so that a management layer can hand the disk to the qemu user. Times are
  // accepted and ignored.
  AttrChange change;
  if (to_set & FUSE_SET_ATTR_SIZE) change.size = static_cast<uint64_t>(attr->st_size);
  if (to_set & FUSE_SET_ATTR_MODE) change.perm = attr->st_mode & 07777;
  if (to_set & FUSE_SET_ATTR_UID) change.uid = attr->st_uid;
  if (to_set & FUSE_SET_ATTR_GID) change.gid = attr->st_gid;
  NodeInfo info;
  if (int err = table_.SetAttr(ino, change, &info); err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  struct stat st;
  FillStat(info, &st);
  fuse_reply_attr(req, &st, kCacheTimeout);
}

void FuseFs::Impl::Open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  if (fi->flags & O_TRUNC) {
    fuse_reply_err(req, EPERM);  // would change the size
    return;
  }
  std::shared_ptr<DiskFile> file;
  if (int err = table_.OpenDisk(ino, &file); err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  AdoptHandle(std::make_unique<OpenDisk>(std::move(file)), fi);
  // O_DIRECT opens (qemu cache=none, fio direct=1) bypass the page cache and are served
  // without the kernel's page-cache write path; buffered opens (loop devices) keep it.
  fi->direct_io = (fi->flags & O_DIRECT) ? 1 : 0;
  fi->keep_cache = 0;
  fi->noflush = 1;
  // If the reply fails the open was interrupted and no release will come.
  if (fuse_reply_open(req, fi) != 0) DropHandle(fi);
}

void FuseFs::Impl::Read(fuse_req_t req, size_t size, off_t offset, fuse_file_info* fi) {
  DiskFile& file = *DiskHandle(fi)->file;
  if (offset < 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  const uint64_t off = static_cast<uint64_t>(offset);
  if (off >= file.size() || size == 0) {
    fuse_reply_buf(req, nullptr, 0);  // at or past the end: EOF
    return;
  }
  const size_t want = static_cast<size_t>(std::min<uint64_t>(size, file.size() - off));
  std::byte* buffer = ReadBuffer(want);
  Result<size_t> got = size_t{0};
  {
    IoGuard guard(file);
    if (!guard.ok()) {
      fuse_reply_err(req, EIO);  // the disk was removed
      return;
    }
    got = guard.backend()->Read(off, std::span<std::byte>(buffer, want));
  }
  if (!got.ok()) {
    LogIoError(file, got.status());
    fuse_reply_err(req, ErrnoOf(got.status()));
    return;
  }
  fuse_reply_buf(req, reinterpret_cast<const char*>(buffer), *got);
}

void FuseFs::Impl::Write(fuse_req_t req, const char* buf, size_t size, off_t offset,
                         fuse_file_info* fi) {
  DiskFile& file = *DiskHandle(fi)->file;
  if (offset < 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  const uint64_t off = static_cast<uint64_t>(offset);
  if (off > file.size() || size > file.size() - off) {
    fuse_reply_err(req, ENOSPC);  // a disk does not grow; nothing is written
    return;
  }
  Status status;
  {
    IoGuard guard(file);
    if (!guard.ok()) {
      fuse_reply_err(req, EIO);
      return;
    }
    status = guard.backend()->Write(
        off, std::span<const std::byte>(reinterpret_cast<const std::byte*>(buf), size));
  }
  if (!status.ok()) {
    LogIoError(file, status);
    fuse_reply_err(req, ErrnoOf(status));
    return;
  }
  fuse_reply_write(req, size);
}

void FuseFs::Impl::Fsync(fuse_req_t req, fuse_file_info* fi) {
  DiskFile& file = *DiskHandle(fi)->file;
  Status status;
  {
    IoGuard guard(file);
    if (!guard.ok()) {
      fuse_reply_err(req, EIO);
      return;
    }
    status = guard.backend()->Flush();
  }
  if (!status.ok()) {
    LogIoError(file, status);
    fuse_reply_err(req, ErrnoOf(status));
    return;
  }
  fuse_reply_err(req, 0);
}

void FuseFs::Impl::Fallocate(fuse_req_t req, int mode, off_t offset, off_t length,
                             fuse_file_info* fi) {
  DiskFile& file = *DiskHandle(fi)->file;
  if (offset < 0 || length <= 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  const uint64_t off = static_cast<uint64_t>(offset);
  const uint64_t len = static_cast<uint64_t>(length);
  const bool past_end = off > file.size() || len > file.size() - off;
  if (mode == 0 || mode == FALLOC_FL_KEEP_SIZE) {
    // Preallocation: every block of a disk is there already. Without KEEP_SIZE a range
    // past the end would grow the file, which a disk refuses.
    fuse_reply_err(req, (mode == 0 && past_end) ? EPERM : 0);
    return;
  }
  if (mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)) {
    fuse_reply_err(req, EOPNOTSUPP);
    return;
  }
  // Discard, clamped to the disk like a punch hole past EOF on any file system.
  if (off >= file.size()) {
    fuse_reply_err(req, 0);
    return;
  }
  const uint64_t clamped = std::min(len, file.size() - off);
  Status status;
  {
    IoGuard guard(file);
    if (!guard.ok()) {
      fuse_reply_err(req, EIO);
      return;
    }
    status = guard.backend()->Discard(off, clamped);
  }
  if (!status.ok()) {
    LogIoError(file, status);
    fuse_reply_err(req, ErrnoOf(status));
    return;
  }
  fuse_reply_err(req, 0);
}

void FuseFs::Impl::Release(fuse_req_t req, fuse_file_info* fi) {
  DropHandle(fi);
  fuse_reply_err(req, 0);
}

void FuseFs::Impl::OpenDirectory(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  auto handle = std::make_unique<OpenDir>();
  std::vector<DirEntry> children;
  uint64_t parent_ino = kRootIno;
  if (int err = table_.List(ino, &children, &parent_ino); err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  handle->entries.reserve(children.size() + 2);
  handle->entries.push_back(DirEntry{".", ino, NodeKind::kVmDir});
  handle->entries.push_back(DirEntry{"..", parent_ino, NodeKind::kVmDir});
  for (DirEntry& child : children) handle->entries.push_back(std::move(child));
  AdoptHandle(std::move(handle), fi);
  fi->cache_readdir = 0;
  if (fuse_reply_open(req, fi) != 0) DropHandle(fi);
}

void FuseFs::Impl::ReadDirectory(fuse_req_t req, size_t size, off_t offset, fuse_file_info* fi) {
  const OpenDir& dir = *DirHandle(fi);
  std::vector<char> buffer(size);
  size_t used = 0;
  for (size_t i = static_cast<size_t>(std::max<off_t>(offset, 0)); i < dir.entries.size(); ++i) {
    const DirEntry& entry = dir.entries[i];
    struct stat st {};
    st.st_ino = entry.ino;
    st.st_mode = TypeBits(entry.kind);
    // The offset of an entry is the position of the next one.
    const size_t need = fuse_add_direntry(req, buffer.data() + used, size - used,
                                          entry.name.c_str(), &st, static_cast<off_t>(i + 1));
    if (need > size - used) break;
    used += need;
  }
  fuse_reply_buf(req, buffer.data(), used);
}

void FuseFs::Impl::ReleaseDirectory(fuse_req_t req, fuse_file_info* fi) {
  DropHandle(fi);
  fuse_reply_err(req, 0);
}

void FuseFs::Impl::StatFs(fuse_req_t req) {
  struct statvfs st {};
  st.f_bsize = 4096;
  st.f_frsize = 4096;
  st.f_blocks = table_.TotalBytes() / 4096;
  st.f_bfree = 0;  // the disks use all of it; nothing can be created
  st.f_bavail = 0;
  st.f_files = table_.NodeCount();
  st.f_ffree = 0;
  st.f_favail = 0;
  st.f_namemax = 255;
  fuse_reply_statfs(req, &st);
}

void FuseFs::Impl::AdoptHandle(std::unique_ptr<Handle> handle, fuse_file_info* fi) {
  std::lock_guard lock(handles_mu_);
  handles_.insert(handle.get());
  fi->fh = reinterpret_cast<uint64_t>(handle.release());
}

void FuseFs::Impl::DropHandle(fuse_file_info* fi) {
  Handle* handle = HandleOf(fi);
  {
    std::lock_guard lock(handles_mu_);
    handles_.erase(handle);
  }
  delete handle;
}

// ---- Session, loop, tree changes.

Status FuseFs::Impl::Mount(const fs::path& mountpoint) {
  static std::once_flag log_once;
  std::call_once(log_once, [] { fuse_set_log_func(&FuseLog); });

  // default_permissions: the kernel checks the mode bits, so the disks' owner and mode
  // decide who may open them. allow_other: qemu may run as another user (root needs no
  // user_allow_other in /etc/fuse.conf).
  std::string opts = "fsname=siterep,subtype=siterep,default_permissions";
  if (options_.allow_other) opts += ",allow_other";
  std::string arg0 = "siterepd", arg1 = "-o";
  char* argv[] = {arg0.data(), arg1.data(), opts.data(), nullptr};
  fuse_args args = FUSE_ARGS_INIT(3, argv);
  se_ = fuse_session_new(&args, &kOps, sizeof(kOps), this);
  fuse_opt_free_args(&args);
  if (se_ == nullptr) {
    return Status::Error(EINVAL, "create FUSE session for " + mountpoint.string() +
                                     " failed (see the libfuse message above)");
  }
  if (fuse_session_mount(se_, mountpoint.c_str()) != 0) {
    fuse_session_destroy(se_);
    se_ = nullptr;
    return Status::Error(EIO, "mount FUSE file system at " + mountpoint.string() +
                                  " failed (see the libfuse message above; is /dev/fuse "
                                  "there and are we root?)");
  }
  mountpoint_ = mountpoint;
  return Status::Ok();
}

Status FuseFs::Impl::Run() {
  {
    std::lock_guard lock(run_mu_);
    if (running_)
      return Status::Error(EBUSY, "FUSE loop of " + mountpoint_.string() + " runs already");
    if (stop_requested_) return Status::Ok();
    running_ = true;
  }
  fuse_loop_config* config = fuse_loop_cfg_create();
  int rc = ENOMEM;
  if (config != nullptr) {
    // One /dev/fuse descriptor per worker: less contention in the kernel. max_idle_threads
    // keeps libfuse's default (never retire a worker): creating threads under load costs
    // more than idle ones do.
    fuse_loop_cfg_set_clone_fd(config, 1);
    fuse_loop_cfg_set_max_threads(config, options_.max_threads);
    rc = fuse_session_loop_mt(se_, config);
    fuse_loop_cfg_destroy(config);
  }
  Status status;
  if (rc != 0) {
    const int err = rc < 0 ? -rc : rc;
    status = Status::FromErrno(err, "FUSE loop of " + mountpoint_.string());
  }
  {
    // Notified under the lock: ~Impl may destroy run_cv_ as soon as it sees running_ drop.
    std::lock_guard lock(run_mu_);
    running_ = false;
    run_cv_.notify_all();
  }
  return status;
}

void FuseFs::Impl::Stop() {
  std::lock_guard lock(run_mu_);
  if (stop_requested_) return;
  stop_requested_ = true;
  fuse_session_exit(se_);
  if (!running_) return;
  // The workers sleep in read(2) on /dev/fuse and look at the exit flag only after a
  // request. Send one: a lookup of a name that never exists (never cached either). The
  // worker that answers it sees the flag, and the loop cancels the others. It runs on its
  // own thread because it blocks if the loop ends first (an external unmount); then it is
  // released when ~Impl closes the session and the kernel aborts the connection.
  waker_ = std::thread([path = mountpoint_ / kWakeName] {
    struct stat st;
    (void)::stat(path.c_str(), &st);
  });
}

Status FuseFs::Impl::RemoveDisk(const std::string& vm, const std::string& disk) {
  SR_ASSIGN_OR_RETURN(RemovedDisk removed, table_.RemoveDisk(vm, disk));
  // From here on lookups fail; wait for the requests that still use the backend. Open
  // handles get EIO from now on.
  removed.file->Retire();
  bool running;
  {
    std::lock_guard lock(run_mu_);
    running = running_ && !stop_requested_;
  }
  // Tell the kernel to drop its cached name and pages (so a buffered read of an open
  // handle gets EIO too, not stale pages). Only while the loop answers: a notification
  // may have to wait for requests on the same directory. Errors (e.g. ENOENT when the
  // kernel has nothing cached) are fine.
  if (running) {
    fuse_lowlevel_notify_inval_inode(se_, removed.file->ino(), 0, 0);
    fuse_lowlevel_notify_inval_entry(se_, removed.vm_ino, disk.c_str(), disk.size());
    if (removed.vm_removed) fuse_lowlevel_notify_inval_entry(se_, kRootIno, vm.c_str(), vm.size());
  }
  return Status::Ok();
}

Status FuseFs::Impl::DropCache(const std::string& vm, const std::string& disk) {
  NodeInfo vm_node, disk_node;
  if (table_.Lookup(kRootIno, vm, &vm_node) != 0 ||
      table_.Lookup(vm_node.ino, disk, &disk_node) != 0 || disk_node.kind != NodeKind::kDisk) {
    return Status::Error(ENOENT, "drop the cached pages of " + vm + "/" + disk + ": no such disk");
  }
  {
    // A loop that has not run yet has served nothing; one that stopped serves nothing more.
    std::lock_guard lock(run_mu_);
    if (!running_ || stop_requested_) return Status::Ok();
  }
  const int rc = fuse_lowlevel_notify_inval_inode(se_, disk_node.ino, 0, 0);
  if (rc != 0 && rc != -ENOENT) {  // ENOENT: the kernel has nothing of the disk cached
    return Status::FromErrno(-rc, "drop the cached pages of " + vm + "/" + disk);
  }
  return Status::Ok();
}

FuseFs::Impl::~Impl() {
  if (se_ == nullptr) return;  // never mounted
  Stop();
  {
    std::unique_lock lock(run_mu_);
    run_cv_.wait(lock, [this] { return !running_; });
  }
  // Lazy unmount (as root: umount2 MNT_DETACH) and close of /dev/fuse; libfuse skips the
  // unmount if the connection is gone already (external unmount), so nothing else mounted
  // there later is touched. Closing the last descriptor aborts the connection, which
  // releases a waker still waiting for an answer.
  fuse_session_unmount(se_);
  if (waker_.joinable()) waker_.join();
  fuse_session_destroy(se_);
  // Handles whose release the loop never read.
  for (Handle* handle : handles_) delete handle;
}

// ---- FuseFs.

FuseFs::FuseFs(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FuseFs::~FuseFs() = default;

Result<std::unique_ptr<FuseFs>> FuseFs::Mount(const fs::path& mountpoint,
                                              std::vector<ExportedDisk> disks,
                                              FuseOptions options) {
  if (options.max_threads == 0) return Status::Invalid("FUSE max_threads must be at least 1");
  auto impl = std::make_unique<Impl>(options);
  // The disks first: a bad one changes nothing on the file system.
  for (const ExportedDisk& disk : disks) {
    SR_RETURN_IF_ERROR(impl->table().AddDisk(disk.vm, disk.disk, disk.backend));
  }
  SR_ASSIGN_OR_RETURN(fs::path canonical, PrepareMountpoint(mountpoint));
  SR_RETURN_IF_ERROR(impl->Mount(canonical));
  return std::unique_ptr<FuseFs>(new FuseFs(std::move(impl)));
}

Status FuseFs::Run() { return impl_->Run(); }

void FuseFs::Stop() { impl_->Stop(); }

Status FuseFs::AddDisk(ExportedDisk disk) {
  // A new name needs no notification: failed lookups are not cached by the kernel.
  return impl_->table().AddDisk(disk.vm, disk.disk, disk.backend);
}

Status FuseFs::RemoveDisk(const std::string& vm, const std::string& disk) {
  return impl_->RemoveDisk(vm, disk);
}

Status FuseFs::DropCache(const std::string& vm, const std::string& disk) {
  return impl_->DropCache(vm, disk);
}

}  // namespace siterep::blockdev
