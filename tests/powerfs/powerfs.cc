// siterep-powerfs: a FUSE pass-through file system that simulates a host power loss under
// the files of a process under test (in the manner of LazyFS).
//
//   siterep-powerfs BACKING_DIR MOUNTPOINT [--control SOCKET] [-f] [-o FUSE_OPTIONS]
//
// MOUNTPOINT shows BACKING_DIR. What is durable and what is not:
//   - Metadata is durable at once: create, mkdir, unlink, rename, link, symlink, chmod,
//     chown, utimens, truncate (also O_TRUNC) and fallocate (allocate, punch hole, zero
//     range) are applied to the backing directory when they are called. This is a known
//     simplification versus LazyFS, which can also lose metadata.
//   - Data is not: a write goes to an in-memory overlay of the file (4 KiB pages, each with
//     a bitmap of the bytes written). Reads return overlay bytes over backing bytes, and
//     getattr reports the size including unsynced writes past the backing file's end.
//     A size extension made only by writes is data too: it is lost with the overlay.
//   - fsync/fdatasync (and msync, which reaches us as writes plus fsync) write the file's
//     overlay to the backing file and fdatasync it. flush (close) does not sync. fsyncdir
//     fsyncs the backing directory. A file opened O_SYNC/O_DSYNC writes through.
//   - A clean unmount or `exit` (without a cut before it) writes every overlay back, as a
//     clean shutdown would.
// No direct_io and no writeback cache: write(2) reaches us synchronously, and a MAP_SHARED
// mapping lives in the kernel page cache, which sends its dirty pages as writes on msync,
// on close and on background writeback. POSIX and flock locks are left to the kernel
// (local to this host), which is what a single-host test needs.
//
// Control channel: a UNIX stream socket, by default MOUNTPOINT.powerfs.sock (a sibling of
// the mountpoint: "/t/mnt" -> "/t/mnt.powerfs.sock"). Commands, one per line, each answered
// with one line "ok ..." or "error ...":
//   stats                 -> ok files=F pages=P bytes=B cut=0|1   (pending, unsynced data)
//   cut all|random|torn [SEED]
//                         -> ok cut MODE seed=S dropped=D kept=K torn=T
//       The power goes: from now on every write, fsync and other change is refused with
//       EIO. Then every pending page is dropped (all), or survives with probability 1/2
//       (random, torn; seeded, default seed 1) and is written to the backing file, as the
//       disk may have written some dirty pages. In torn mode one surviving page per file
//       is written only up to a random 512-byte boundary (1..7 sectors). Kept counts the
//       torn pages too. Afterwards BACKING_DIR holds exactly what survived.
//   exit                  -> ok exit; then unmounts and exits 0.
//
// A realistic power cut must also make the kernel drop its own dirty pages (mmap) for the
// mount. The sequence (tests/powerfs_selftest.sh does it):
//   1. send "cut MODE [SEED]" on the control socket;
//   2. kill -9 every process using the mount (their close-time writes now fail with EIO);
//   3. abort the FUSE connection: echo 1 > /sys/fs/fuse/connections/N/abort (fusectl; it
//      can also be mounted privately: mount -t fusectl none DIR). N is the kernel's dev_t
//      of the FUSE super block. FUSE mounts use an anonymous device (major 0), so N is the
//      minor number. stat(2) returns st_dev in the glibc encoding (minor bits 0-7 in bits
//      0-7, major in bits 8-19, minor bits 8-19 in bits 20-31), hence
//        N = (st_dev & 0xff) | ((st_dev >> 12) & ~0xff)   with st_dev = $(stat -c %d MNT)
//      (the same as the minor of `mountpoint -d MNT`);
//   4. fusermount3 -u -z MOUNTPOINT. This process then sees the connection gone and exits
//      without writing anything. A new siterep-powerfs on BACKING_DIR shows the state after
//      the power loss.
//
// Threads: the FUSE loop is single-threaded; a second thread serves the control socket.
// One mutex (Fs::mu) protects all overlay state. Memory for pending data is not bounded.
// Exit codes: 0 after an unmount, 1 on a run-time error (missing backing dir, mount
// failure), 2 on bad usage.

#define FUSE_USE_VERSION 35

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <linux/falloc.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bitset>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr off_t kPage = 4096;
constexpr off_t kSector = 512;

// Unsynced bytes of one 4 KiB page of a file.
struct Page {
  std::array<char, kPage> data{};
  std::bitset<kPage> valid;  // which bytes of data were written and not yet synced
};

// One backing inode with an overlay. It holds an open fd on the backing file for its whole
// life, so the backing inode (and its number, the key) cannot be reused while it exists.
struct Inode {
  int fd = -1;
  int opens = 0;                // open FUSE handles
  std::map<off_t, Page> pages;  // page index -> unsynced bytes
  off_t end = 0;                // the highest byte written + 1 (file size by writes)
};

// What a FUSE handle (fi->fh) points to.
struct Handle {
  Inode* inode;
  bool sync;  // opened O_SYNC/O_DSYNC: every write is written through
};

using Key = std::pair<dev_t, ino_t>;

enum class CutMode { kAll, kRandom, kTorn };

struct Fs {
  std::string backing;  // absolute, no trailing slash

  // Protects inodes, every Inode in it and powered_off. The only lock; system calls on
  // backing files are made while holding it (correctness over speed).
  std::mutex mu;
  std::map<Key, std::unique_ptr<Inode>> inodes;
  bool powered_off = false;
};

Fs* g_fs = nullptr;

std::string Backing(const char* path) { return g_fs->backing + path; }

Handle* H(fuse_file_info* fi) { return reinterpret_cast<Handle*>(fi->fh); }

Inode* FindLocked(const struct stat& st) {
  auto it = g_fs->inodes.find({st.st_dev, st.st_ino});
  return it == g_fs->inodes.end() ? nullptr : it->second.get();
}

[[nodiscard]] off_t BackingSize(int fd) {
  struct stat st;
  return fstat(fd, &st) == 0 ? st.st_size : 0;
}

[[nodiscard]] bool HasPending(const Inode& n) {
  return !n.pages.empty() || n.end > BackingSize(n.fd);
}

// Drops overlay bytes in [from, to): they were truncated, punched or zeroed in the backing
// file, which is what reads must show now.
void DiscardLocked(Inode& n, off_t from, off_t to) {
  if (to <= from) return;
  auto it = n.pages.lower_bound(from / kPage);
  while (it != n.pages.end() && it->first * kPage < to) {
    off_t base = it->first * kPage;
    off_t lo = std::max(from, base) - base;
    off_t hi = std::min(to, base + kPage) - base;
    for (off_t i = lo; i < hi; i++) it->second.valid.reset(i);
    it = it->second.valid.none() ? n.pages.erase(it) : std::next(it);
  }
}

// Writes the valid bytes of page `index` below `limit` (a byte count within the page).
[[nodiscard]] int WritePage(int fd, off_t index, const Page& p, off_t limit) {
  off_t i = 0;
  while (i < limit) {
    if (!p.valid.test(i)) {
      i++;
      continue;
    }
    off_t j = i;
    while (j < limit && p.valid.test(j)) j++;
    off_t done = 0;
    while (done < j - i) {
      ssize_t w = pwrite(fd, p.data.data() + i + done, j - i - done, index * kPage + i + done);
      if (w < 0) return -errno;
      done += w;
    }
    i = j;
  }
  return 0;
}

// fsync: the overlay goes to the backing file, which is made durable; the overlay is then
// empty. On an error the pages not yet written stay pending.
[[nodiscard]] int SyncLocked(Inode& n) {
  while (!n.pages.empty()) {
    auto it = n.pages.begin();
    if (int r = WritePage(n.fd, it->first, it->second, kPage); r < 0) return r;
    n.pages.erase(it);
  }
  if (n.end > BackingSize(n.fd) && ftruncate(n.fd, n.end) < 0) return -errno;
  n.end = 0;
  return fdatasync(n.fd) < 0 ? -errno : 0;
}

// Forgets inodes that nothing opens and that lost their last link (unlink, rename over):
// their pending data can never be read again.
void ForgetUnlinkedLocked() {
  for (auto it = g_fs->inodes.begin(); it != g_fs->inodes.end();) {
    struct stat st;
    if (it->second->opens == 0 && fstat(it->second->fd, &st) == 0 && st.st_nlink == 0) {
      close(it->second->fd);
      it = g_fs->inodes.erase(it);
    } else {
      ++it;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Metadata operations: applied to the backing directory at once.

int OpGetattr(const char* path, struct stat* st, fuse_file_info* fi) {
  int r = fi ? fstat(H(fi)->inode->fd, st) : lstat(Backing(path).c_str(), st);
  if (r < 0) return -errno;
  if (S_ISREG(st->st_mode)) {
    std::lock_guard lock(g_fs->mu);
    if (Inode* n = FindLocked(*st)) st->st_size = std::max(st->st_size, n->end);
  }
  return 0;
}

int OpReadlink(const char* path, char* buf, size_t size) {
  ssize_t n = readlink(Backing(path).c_str(), buf, size - 1);
  if (n < 0) return -errno;
  buf[n] = '\0';
  return 0;
}

// Every change is refused once the power is gone.
[[nodiscard]] bool PoweredOff() {
  std::lock_guard lock(g_fs->mu);
  return g_fs->powered_off;
}

int OpMknod(const char* path, mode_t mode, dev_t rdev) {
  if (PoweredOff()) return -EIO;
  return mknod(Backing(path).c_str(), mode, rdev) < 0 ? -errno : 0;
}

int OpMkdir(const char* path, mode_t mode) {
  if (PoweredOff()) return -EIO;
  return mkdir(Backing(path).c_str(), mode) < 0 ? -errno : 0;
}

int OpUnlink(const char* path) {
  std::lock_guard lock(g_fs->mu);
  if (g_fs->powered_off) return -EIO;
  if (unlink(Backing(path).c_str()) < 0) return -errno;
  ForgetUnlinkedLocked();
  return 0;
}

int OpRmdir(const char* path) {
  if (PoweredOff()) return -EIO;
  return rmdir(Backing(path).c_str()) < 0 ? -errno : 0;
}

int OpSymlink(const char* target, const char* path) {
  if (PoweredOff()) return -EIO;
  return symlink(target, Backing(path).c_str()) < 0 ? -errno : 0;
}

int OpRename(const char* from, const char* to, unsigned int flags) {
  std::lock_guard lock(g_fs->mu);
  if (g_fs->powered_off) return -EIO;
  if (renameat2(AT_FDCWD, Backing(from).c_str(), AT_FDCWD, Backing(to).c_str(), flags) < 0) {
    return -errno;
  }
  ForgetUnlinkedLocked();
  return 0;
}

int OpLink(const char* from, const char* to) {
  if (PoweredOff()) return -EIO;
  return link(Backing(from).c_str(), Backing(to).c_str()) < 0 ? -errno : 0;
}

int OpChmod(const char* path, mode_t mode, fuse_file_info* fi) {
  if (PoweredOff()) return -EIO;
  int r = fi ? fchmod(H(fi)->inode->fd, mode) : chmod(Backing(path).c_str(), mode);
  return r < 0 ? -errno : 0;
}

int OpChown(const char* path, uid_t uid, gid_t gid, fuse_file_info* fi) {
  if (PoweredOff()) return -EIO;
  int r = fi ? fchown(H(fi)->inode->fd, uid, gid) : lchown(Backing(path).c_str(), uid, gid);
  return r < 0 ? -errno : 0;
}

int OpUtimens(const char* path, const struct timespec tv[2], fuse_file_info* fi) {
  if (PoweredOff()) return -EIO;
  int r = fi ? futimens(H(fi)->inode->fd, tv)
             : utimensat(AT_FDCWD, Backing(path).c_str(), tv, AT_SYMLINK_NOFOLLOW);
  return r < 0 ? -errno : 0;
}

// A truncate is metadata: durable at once, and the overlay past the new size is dropped.
int OpTruncate(const char* path, off_t size, fuse_file_info* fi) {
  std::lock_guard lock(g_fs->mu);
  if (g_fs->powered_off) return -EIO;
  Inode* n = fi ? H(fi)->inode : nullptr;
  if (!n) {
    struct stat st;
    if (lstat(Backing(path).c_str(), &st) < 0) return -errno;
    n = FindLocked(st);
  }
  int r = n ? ftruncate(n->fd, size) : truncate(Backing(path).c_str(), size);
  if (r < 0) return -errno;
  if (n) {
    DiscardLocked(*n, size, std::numeric_limits<off_t>::max());
    n->end = std::min(n->end, size);
  }
  return 0;
}

int OpStatfs(const char* path, struct statvfs* st) {
  return statvfs(Backing(path).c_str(), st) < 0 ? -errno : 0;
}

int OpOpendir(const char* path, fuse_file_info* fi) {
  DIR* d = opendir(Backing(path).c_str());
  if (!d) return -errno;
  fi->fh = reinterpret_cast<uint64_t>(d);
  return 0;
}

int OpReaddir(const char*, void* buf, fuse_fill_dir_t fill, off_t, fuse_file_info* fi,
              fuse_readdir_flags) {
  DIR* d = reinterpret_cast<DIR*>(fi->fh);
  rewinddir(d);
  errno = 0;
  while (dirent* e = readdir(d)) {
    struct stat st {};
    st.st_ino = e->d_ino;
    st.st_mode = DTTOIF(e->d_type);
    if (fill(buf, e->d_name, &st, 0, fuse_fill_dir_flags{}) != 0) return 0;
  }
  return errno != 0 ? -errno : 0;
}

int OpReleasedir(const char*, fuse_file_info* fi) {
  closedir(reinterpret_cast<DIR*>(fi->fh));
  return 0;
}

int OpFsyncdir(const char* path, int, fuse_file_info*) {
  if (PoweredOff()) return -EIO;
  int fd = open(Backing(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -errno;
  int r = fsync(fd) < 0 ? -errno : 0;
  close(fd);
  return r;
}

// ---------------------------------------------------------------------------------------
// Files: open handles share one Inode (and its overlay) per backing inode.

// Opens the backing file with the caller's flags (so O_CREAT, O_EXCL, O_TRUNC and errors
// behave as usual) and attaches the handle to the inode's overlay.
int OpenCommon(const char* path, mode_t mode, fuse_file_info* fi) {
  std::lock_guard lock(g_fs->mu);
  if (g_fs->powered_off && (fi->flags & (O_CREAT | O_TRUNC))) return -EIO;
  // O_APPEND: the kernel passes the offset. O_DIRECT: we buffer anyway. O_SYNC: handled.
  int flags = fi->flags & ~(O_APPEND | O_DIRECT | O_SYNC | O_DSYNC | O_NOCTTY);
  int fd = open(Backing(path).c_str(), flags | O_CLOEXEC, mode);
  if (fd < 0) return -errno;
  struct stat st;
  if (fstat(fd, &st) < 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  Inode* n = FindLocked(st);
  if (n) {
    close(fd);
  } else {
    // The overlay's fd must be writable whatever this caller asked for: later handles
    // write through it. Reopen through /proc to get exactly this inode.
    if ((fi->flags & O_ACCMODE) != O_RDWR) {
      std::string self = "/proc/self/fd/" + std::to_string(fd);
      int rw = open(self.c_str(), O_RDWR | O_CLOEXEC);
      if (rw >= 0) {
        close(fd);
        fd = rw;
      }
    }
    auto owned = std::make_unique<Inode>();
    owned->fd = fd;
    n = owned.get();
    g_fs->inodes[{st.st_dev, st.st_ino}] = std::move(owned);
  }
  if (fi->flags & O_TRUNC) {
    n->pages.clear();
    n->end = 0;
  }
  n->opens++;
  fi->fh = reinterpret_cast<uint64_t>(new Handle{n, (fi->flags & (O_SYNC | O_DSYNC)) != 0});
  return 0;
}

int OpOpen(const char* path, fuse_file_info* fi) { return OpenCommon(path, 0, fi); }

int OpCreate(const char* path, mode_t mode, fuse_file_info* fi) {
  fi->flags |= O_CREAT;
  return OpenCommon(path, mode, fi);
}

int OpRead(const char*, char* buf, size_t size, off_t off, fuse_file_info* fi) {
  std::lock_guard lock(g_fs->mu);
  if (g_fs->powered_off) return -EIO;
  Inode& n = *H(fi)->inode;
  off_t file_size = std::max(BackingSize(n.fd), n.end);
  if (off >= file_size) return 0;
  size = std::min<off_t>(size, file_size - off);
  // Backing bytes first (a short read leaves zeros: a hole or not yet on disk)...
  memset(buf, 0, size);
  size_t got = 0;
  while (got < size) {
    ssize_t r = pread(n.fd, buf + got, size - got, off + got);
    if (r < 0) return -errno;
    if (r == 0) break;
    got += r;
  }
  // ...then the unsynced bytes over them.
  for (auto it = n.pages.lower_bound(off / kPage);
       it != n.pages.end() && it->first * kPage < off + static_cast<off_t>(size); ++it) {
    off_t base = it->first * kPage;
    off_t lo = std::max(off, base), hi = std::min(off + static_cast<off_t>(size), base + kPage);
    for (off_t i = lo; i < hi; i++) {
      if (it->second.valid.test(i - base)) buf[i - off] = it->second.data[i - base];
    }
  }
  return size;
}

int OpWrite(const char*, const char* buf, size_t size, off_t off, fuse_file_info* fi) {
  std::lock_guard lock(g_fs->mu);
  if (g_fs->powered_off) return -EIO;
  Inode& n = *H(fi)->inode;
  for (off_t pos = off; pos < off + static_cast<off_t>(size);) {
    Page& p = n.pages[pos / kPage];
    off_t in_page = pos % kPage;
    off_t len = std::min(kPage - in_page, off + static_cast<off_t>(size) - pos);
    memcpy(p.data.data() + in_page, buf + (pos - off), len);
    for (off_t i = in_page; i < in_page + len; i++) p.valid.set(i);
    pos += len;
  }
  n.end = std::max(n.end, off + static_cast<off_t>(size));
  if (H(fi)->sync) {
    if (int r = SyncLocked(n); r < 0) return r;
  }
  return size;
}

// close(2): not a sync, the data stays pending.
int OpFlush(const char*, fuse_file_info*) { return 0; }

int OpRelease(const char*, fuse_file_info* fi) {
  std::unique_ptr<Handle> h(H(fi));
  std::lock_guard lock(g_fs->mu);
  Inode* n = h->inode;
  if (--n->opens > 0 || HasPending(*n)) return 0;
  struct stat st;
  if (fstat(n->fd, &st) == 0) {
    close(n->fd);
    g_fs->inodes.erase({st.st_dev, st.st_ino});  // frees n
  }
  return 0;
}

int OpFsync(const char*, int, fuse_file_info* fi) {
  std::lock_guard lock(g_fs->mu);
  if (g_fs->powered_off) return -EIO;
  return SyncLocked(*H(fi)->inode);
}

int OpFallocate(const char*, int mode, off_t off, off_t len, fuse_file_info* fi) {
  // Collapse and insert move data around the overlay; nobody we test needs them.
  if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
    return -EOPNOTSUPP;
  }
  std::lock_guard lock(g_fs->mu);
  if (g_fs->powered_off) return -EIO;
  Inode& n = *H(fi)->inode;
  if (fallocate(n.fd, mode, off, len) < 0) return -errno;
  if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) DiscardLocked(n, off, off + len);
  return 0;
}

// SEEK_DATA/SEEK_HOLE over backing extents and overlay pages. A page with any pending
// byte counts as data; reporting a hole as data is allowed, the reverse is not.
off_t OpLseek(const char*, off_t off, int whence, fuse_file_info* fi) {
  std::lock_guard lock(g_fs->mu);
  Inode& n = *H(fi)->inode;
  off_t backing_size = BackingSize(n.fd);
  off_t size = std::max(backing_size, n.end);
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    off_t r = lseek(n.fd, off, whence);
    return r < 0 ? -errno : r;
  }
  if (off < 0) return -EINVAL;
  if (off >= size) return -ENXIO;
  auto backing_seek = [&](off_t pos, int w) -> off_t {
    if (pos >= backing_size) return w == SEEK_DATA ? size : pos;
    off_t r = lseek(n.fd, pos, w);
    return r < 0 ? (w == SEEK_DATA ? size : pos) : r;  // ENXIO: no more data
  };
  if (whence == SEEK_DATA) {
    off_t data = backing_seek(off, SEEK_DATA);
    auto it = n.pages.lower_bound(off / kPage);
    if (it != n.pages.end()) data = std::min(data, std::max(off, it->first * kPage));
    return data < size ? data : -ENXIO;
  }
  off_t pos = off;
  while (pos < size) {
    off_t hole = backing_seek(pos, SEEK_HOLE);
    if (hole >= size) return size;
    auto it = n.pages.find(hole / kPage);
    if (it == n.pages.end()) return hole;
    off_t index = it->first;
    while (n.pages.count(index + 1)) index++;
    pos = (index + 1) * kPage;
  }
  return size;
}

// ---------------------------------------------------------------------------------------
// Power cut and control channel.

struct CutResult {
  uint64_t dropped = 0, kept = 0, torn = 0;
};

CutResult CutLocked(CutMode mode, uint64_t seed) {
  CutResult res;
  g_fs->powered_off = true;
  std::mt19937_64 rng(seed);
  for (auto& [key, n] : g_fs->inodes) {
    std::vector<std::pair<off_t, const Page*>> kept;
    for (const auto& [index, page] : n->pages) {
      bool survives = mode != CutMode::kAll && (rng() & 1) != 0;
      if (survives) {
        kept.emplace_back(index, &page);
      } else {
        res.dropped++;
      }
    }
    size_t torn = kept.size();  // none
    off_t torn_limit = kPage;
    if (mode == CutMode::kTorn && !kept.empty()) {
      torn = rng() % kept.size();
      torn_limit = kSector * static_cast<off_t>(1 + rng() % (kPage / kSector - 1));
      res.torn++;
    }
    for (size_t i = 0; i < kept.size(); i++) {
      // A failed write loses the page, as a failing disk would; report it.
      int r = WritePage(n->fd, kept[i].first, *kept[i].second, i == torn ? torn_limit : kPage);
      if (r < 0) {
        fprintf(stderr, "siterep-powerfs: cut: writing a surviving page failed: %s\n",
                strerror(-r));
      }
      res.kept++;
    }
    if (!kept.empty()) (void)fdatasync(n->fd);
    n->pages.clear();
    n->end = 0;
  }
  return res;
}

std::string Stats() {
  std::lock_guard lock(g_fs->mu);
  uint64_t files = 0, pages = 0, bytes = 0;
  for (const auto& [key, n] : g_fs->inodes) {
    if (!HasPending(*n)) continue;
    files++;
    pages += n->pages.size();
    for (const auto& [index, page] : n->pages) bytes += page.valid.count();
  }
  std::ostringstream out;
  out << "ok files=" << files << " pages=" << pages << " bytes=" << bytes
      << " cut=" << (g_fs->powered_off ? 1 : 0);
  return out.str();
}

std::string Command(const std::string& line, bool* exit_after) {
  std::istringstream in(line);
  std::string cmd, mode_name, extra;
  in >> cmd;
  if (cmd == "stats") return Stats();
  if (cmd == "exit") {
    *exit_after = true;
    return "ok exit";
  }
  if (cmd != "cut") return "error unknown command '" + cmd + "' (stats, cut, exit)";
  in >> mode_name;
  CutMode mode;
  if (mode_name == "all") {
    mode = CutMode::kAll;
  } else if (mode_name == "random") {
    mode = CutMode::kRandom;
  } else if (mode_name == "torn") {
    mode = CutMode::kTorn;
  } else {
    return "error cut needs a mode: all, random or torn";
  }
  uint64_t seed = 1;
  if (in >> extra) {
    char* end = nullptr;
    seed = strtoull(extra.c_str(), &end, 10);
    if (*end != '\0' || extra[0] == '-') return "error bad seed '" + extra + "'";
  }
  std::lock_guard lock(g_fs->mu);
  if (g_fs->powered_off) return "error the power is already cut";
  CutResult r = CutLocked(mode, seed);
  std::ostringstream out;
  out << "ok cut " << mode_name << " seed=" << seed << " dropped=" << r.dropped
      << " kept=" << r.kept << " torn=" << r.torn;
  return out.str();
}

// Serves one client at a time, until the listening socket is shut down.
void ControlLoop(int listen_fd) {
  for (;;) {
    int c = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;
    }
    std::string buf;
    char chunk[512];
    bool exit_after = false;
    ssize_t r;
    while (!exit_after && (r = read(c, chunk, sizeof chunk)) > 0) {
      buf.append(chunk, r);
      size_t nl;
      while (!exit_after && (nl = buf.find('\n')) != std::string::npos) {
        std::string reply = Command(buf.substr(0, nl), &exit_after) + "\n";
        buf.erase(0, nl + 1);
        (void)send(c, reply.data(), reply.size(), MSG_NOSIGNAL);
      }
    }
    close(c);
    // The FUSE loop runs in the main thread; a signal is how libfuse's loop is told to stop
    // (its handler calls fuse_session_exit, and read(2) on /dev/fuse returns EINTR).
    if (exit_after) kill(getpid(), SIGTERM);
  }
}

// Binds the control socket; refuses a path where a live powerfs answers.
[[nodiscard]] int ListenControl(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) {
    fprintf(stderr, "siterep-powerfs: control socket path too long: %s\n", path.c_str());
    return -1;
  }
  memcpy(addr.sun_path, path.c_str(), path.size());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
    fprintf(stderr, "siterep-powerfs: control socket %s is in use\n", path.c_str());
    close(fd);
    return -1;
  }
  close(fd);
  unlink(path.c_str());  // a stale socket of a killed instance
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0 ||
      listen(fd, 4) < 0) {
    fprintf(stderr, "siterep-powerfs: control socket %s: %s\n", path.c_str(), strerror(errno));
    if (fd >= 0) close(fd);
    return -1;
  }
  return fd;
}

// A clean unmount writes everything back, unless the power was cut.
void OpDestroy(void*) {
  std::lock_guard lock(g_fs->mu);
  if (g_fs->powered_off) return;
  for (auto& [key, n] : g_fs->inodes) {
    if (int r = SyncLocked(*n); r < 0) {
      fprintf(stderr, "siterep-powerfs: writing back at unmount failed: %s\n", strerror(-r));
    }
  }
}

void* OpInit(fuse_conn_info*, fuse_config* cfg) {
  // Inode numbers of the backing files, so st_ino is stable across remounts.
  cfg->use_ino = 1;
  cfg->direct_io = 0;
  cfg->kernel_cache = 0;
  return nullptr;
}

fuse_operations MakeOps() {
  fuse_operations ops{};
  ops.getattr = OpGetattr;
  ops.readlink = OpReadlink;
  ops.mknod = OpMknod;
  ops.mkdir = OpMkdir;
  ops.unlink = OpUnlink;
  ops.rmdir = OpRmdir;
  ops.symlink = OpSymlink;
  ops.rename = OpRename;
  ops.link = OpLink;
  ops.chmod = OpChmod;
  ops.chown = OpChown;
  ops.truncate = OpTruncate;
  ops.open = OpOpen;
  ops.read = OpRead;
  ops.write = OpWrite;
  ops.statfs = OpStatfs;
  ops.flush = OpFlush;
  ops.release = OpRelease;
  ops.fsync = OpFsync;
  ops.opendir = OpOpendir;
  ops.readdir = OpReaddir;
  ops.releasedir = OpReleasedir;
  ops.fsyncdir = OpFsyncdir;
  ops.init = OpInit;
  ops.destroy = OpDestroy;
  ops.create = OpCreate;
  ops.utimens = OpUtimens;
  ops.fallocate = OpFallocate;
  ops.lseek = OpLseek;
  // No copy_file_range, read_buf, write_buf: the kernel falls back to read and write,
  // which go through the overlay.
  return ops;
}

int Usage() {
  fprintf(stderr,
          "usage: siterep-powerfs BACKING_DIR MOUNTPOINT [--control SOCKET] [-f] "
          "[-o FUSE_OPTIONS]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional, fuse_opts;
  std::string control;
  bool foreground = false;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--control" && i + 1 < argc) {
      control = argv[++i];
    } else if (a == "-o" && i + 1 < argc) {
      fuse_opts.push_back(argv[++i]);
    } else if (a == "-f") {
      foreground = true;
    } else if (a == "-h" || a == "--help") {
      Usage();
      return 0;
    } else if (!a.empty() && a[0] == '-') {
      return Usage();
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 2) return Usage();

  char* real = realpath(positional[0].c_str(), nullptr);
  struct stat st;
  if (!real || stat(real, &st) < 0 || !S_ISDIR(st.st_mode)) {
    fprintf(stderr, "siterep-powerfs: backing dir %s: %s\n", positional[0].c_str(),
            real ? strerror(ENOTDIR) : strerror(errno));
    free(real);
    return 1;
  }
  Fs fs;
  fs.backing = real;
  free(real);
  if (fs.backing == "/") fs.backing.clear();  // "/" + "/path" would double the slash
  g_fs = &fs;

  // Absolute paths: without -f, fuse_daemonize changes the working folder to "/".
  char* real_mnt = realpath(positional[1].c_str(), nullptr);
  if (!real_mnt) {
    fprintf(stderr, "siterep-powerfs: mountpoint %s: %s\n", positional[1].c_str(), strerror(errno));
    return 1;
  }
  std::string mountpoint = real_mnt;
  free(real_mnt);
  if (control.empty()) control = mountpoint + ".powerfs.sock";
  if (control[0] != '/') {
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) return 1;
    control = std::string(cwd) + "/" + control;
  }
  int listen_fd = ListenControl(control);
  if (listen_fd < 0) return 1;

  std::vector<std::string> args_store = {argv[0], "-o", "fsname=powerfs,subtype=powerfs"};
  for (const auto& o : fuse_opts) {
    args_store.push_back("-o");
    args_store.push_back(o);
  }
  std::vector<char*> args_ptrs;
  for (auto& s : args_store) args_ptrs.push_back(s.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(args_ptrs.size()), args_ptrs.data());
  fuse_operations ops = MakeOps();
  int rc = 1;
  fuse* f = fuse_new(&args, &ops, sizeof ops, nullptr);
  if (!f) {
    fprintf(stderr, "siterep-powerfs: bad FUSE options\n");
  } else if (fuse_mount(f, mountpoint.c_str()) != 0) {
    fprintf(stderr, "siterep-powerfs: cannot mount %s\n", mountpoint.c_str());
  } else {
    if (fuse_daemonize(foreground ? 1 : 0) == 0 &&
        fuse_set_signal_handlers(fuse_get_session(f)) == 0) {
      // The control thread must not take the signals meant for the FUSE loop.
      sigset_t all, old;
      sigfillset(&all);
      pthread_sigmask(SIG_BLOCK, &all, &old);
      std::thread control_thread(ControlLoop, listen_fd);
      pthread_sigmask(SIG_SETMASK, &old, nullptr);
      // The loop ends on an unmount, an aborted connection or a signal (which it returns
      // as a positive number): all normal ends. Negative is an error.
      rc = fuse_loop(f) < 0 ? 1 : 0;
      shutdown(listen_fd, SHUT_RDWR);  // wakes accept(2)
      control_thread.join();
      fuse_remove_signal_handlers(fuse_get_session(f));
    }
    fuse_unmount(f);
  }
  if (f) fuse_destroy(f);
  fuse_opt_free_args(&args);
  close(listen_fd);
  unlink(control.c_str());
  for (auto& [key, n] : fs.inodes) close(n->fd);
  return rc;
}
