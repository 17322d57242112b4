// ActivityLog: which extents of a disk may hold writes that a host power loss can leave
// out of the changed-block map, as DRBD's activity log does; and the marker that tells a
// clean stop, a kill -9 and a host crash apart.
//
// Why: the map is a memory-mapped file. A guest write marks it and then changes the image;
// both reach the disk whenever the kernel writes them back, independently, so after a
// power loss an image block may be durable while its bit is not. Before the first write
// into an extent (64 MiB) that is not in the log, the log is rewritten durably with that
// extent in it (one write of a few KiB with O_DSYNC); a write into an extent already in
// the log costs a load of one byte. Extents leave only in Trim, which runs with no change
// in flight (the VM lock exclusive: at every cut, and every cycle period while cuts are
// paced): it msyncs the map, so the leaving extents' bits are durable, and keeps the
// kSlots most recently used (clock). Between two trims the log may hold more. After a
// host crash the union of the log's extents, the map and the unreleased cuts covers
// every block that may differ from the replica.
//
// "<log dir>/activity.log", little-endian, 64 + 4 x (extents of the disk) bytes rounded
// up to 4 KiB:
//   0 4 magic "SRAL"   4 4 version (1)   8 8 generation   16 8 disk size
//   24 4 extent shift  28 4 extents in the log (n)       32 4 CRC32C of the header (this
//   field zero) and the n extent numbers   36 28 zero    64 .. n x uint32 extent numbers
//
// "<log dir>/running": the boot id (/proc/sys/kernel/random/boot_id) of the host while a
// tracker has the folder open, written (synced) at open and deleted at a clean stop.
// Found at open with the same boot id: a kill -9 (the page cache kept everything); with
// another one: the host went down with the tracker running. Tests simulate a reboot with
// the environment variable SITEREP_BOOT_ID, read instead of the kernel's.
//
// Thread-safety: Touch from any number of threads (the write path); the rest from one
// thread at a time (open, stop).
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "tracker/vm_tracker.h"

namespace siterep::tracker {

inline constexpr std::string_view kActivityLogFileName = "activity.log";
inline constexpr std::string_view kRunningFileName = "running";

class ActivityLog {
 public:
  static constexpr unsigned kExtentShift = 26;  // 64 MiB
  static constexpr uint32_t kSlots = 64;        // extents kept by Trim

  // What a previous run left, read at open before anything is written.
  struct Previous {
    // The tracker did not stop cleanly ("running" was there).
    bool unclean = false;
    // ... and the host went down with it (another boot id): the page cache was lost.
    bool host_crashed = false;
    std::string boot_id;  // of that run, when unclean
    // The extents of the activity log, as byte ranges; nullopt when the log is missing,
    // torn or of another disk size (then nothing narrower than the disk is known).
    std::optional<std::vector<ByteRange>> extents;
  };

  // Reads the marker and the log of log_dir.
  static Result<Previous> ReadPrevious(const std::filesystem::path& log_dir, uint64_t disk_size);

  // Starts a fresh, empty log (the caller made every earlier change durable in the map)
  // and writes the marker. sync_map makes the map durable before an extent leaves.
  static Result<std::unique_ptr<ActivityLog>> Start(std::filesystem::path log_dir,
                                                    uint64_t disk_size,
                                                    std::function<Status()> sync_map);
  ~ActivityLog();
  ActivityLog(const ActivityLog&) = delete;
  ActivityLog& operator=(const ActivityLog&) = delete;

  // Before a change of [offset, offset + length): makes sure its extents are in the log.
  // Never fails the change: a log that cannot be written is deleted (a host crash then
  // compares every block) and error() says why.
  // The caller holds the VM lock shared.
  void Touch(uint64_t offset, uint64_t length) {
    const uint64_t first = offset >> kExtentShift;
    const uint64_t last = length == 0 ? first : (offset + length - 1) >> kExtentShift;
    for (uint64_t e = first; e <= last && e < extents_; ++e) {
      const uint8_t s = state_[e].load(std::memory_order_acquire);
      if (s == kActiveReferenced) continue;
      if (s == kActive) {
        state_[e].store(kActiveReferenced, std::memory_order_relaxed);  // for the clock
        continue;
      }
      Miss(e);
    }
  }

  // Keeps at most kSlots extents (see above). The caller holds the VM lock exclusively.
  void Trim();
  // The log holds more than kSlots extents (Trim would shrink it).
  bool over() const;

  // A clean stop: deletes the marker (the caller synced map and image first).
  Status MarkClean();

  uint64_t writes() const { return writes_.load(std::memory_order_relaxed); }
  std::string error() const;

 private:
  // Per extent: not in the log, in it, in it and used since Trim's clock passed.
  static constexpr uint8_t kOut = 0;
  static constexpr uint8_t kActive = 1;
  static constexpr uint8_t kActiveReferenced = 2;

  ActivityLog(std::filesystem::path log_dir, uint64_t disk_size, std::function<Status()> sync_map);
  void Miss(uint64_t extent);
  // Writes the slots durably (mu_ held).
  Status WriteLocked();

  const std::filesystem::path log_dir_;
  const uint64_t disk_size_;
  const uint64_t extents_;
  const std::function<Status()> sync_map_;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;  // per extent
  std::atomic<uint64_t> writes_{0};

  mutable std::mutex mu_;        // a leaf: held while the log is written
  UniqueFd fd_;                  // activity.log, O_DSYNC; invalid once it failed
  std::vector<uint32_t> slots_;  // the extents in the log, in the order they came
  size_t hand_ = 0;              // clock hand over slots_
  uint64_t generation_ = 0;
  std::string error_;
};

}  // namespace siterep::tracker
