// The site configuration (DESIGN.md section 4): one TOML file per site, read once at
// start-up by siterepd and by the CLI (to find the control socket).
//
// LoadConfig checks every key it knows: a missing required key, a key of the wrong type,
// an unknown key, a bad unit, or a duplicate name is refused with a message naming the
// key ("vms[1].disks[0].image: ...") and the file. Relative paths are resolved against
// the folder of the config file.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace siterep {

enum class TrackingMode { kLog, kOff };

// How siterepd does I/O on a VM's images, named as qemu's cache modes: kWriteback goes
// through the host page cache (fast on hosts where every direct request costs a device
// doorbell); kNone opens the images O_DIRECT too, for requests aligned to 4 KiB, so guest
// data is not cached twice. Either way a guest flush makes everything before it durable.
enum class ImageCache { kWriteback, kNone };

struct DiskConfig {
  std::string name;
  std::filesystem::path image;
};

// Commands run around a failover (sh -c, with SITEREP_VM, SITEREP_SITE, SITEREP_EVENT
// and SITEREP_MOUNTPOINT set): pre_failover at the site giving up the VM (e.g. shutting it
// down), post_failover at the site taking it over (e.g. starting it). Empty: none.
struct FailoverHooks {
  std::string pre_failover;
  std::string post_failover;
  std::chrono::milliseconds timeout{300'000};
};

struct VmConfig {
  std::string name;
  std::string frequency_text = "5m";             // as written: continuous | 30s | 5m | 15m
  std::chrono::milliseconds frequency{300'000};  // continuous == 1 s
  int recovery_points = 0;
  std::chrono::milliseconds recovery_point_interval{3'600'000};
  TrackingMode tracking = TrackingMode::kLog;
  ImageCache image_cache = ImageCache::kWriteback;
  // Bytes that each disk's copy-on-write (the blocks of cycles not yet acknowledged that
  // the guest overwrote, saved in "<image>.srlog/<n>.cow") may hold; past it the disk
  // falls back to a resync of those cycles' blocks. 0 (default): the file system's space.
  uint64_t cow_limit = 0;
  // Automatic resynchronisation of a disk that needs it ("resync = auto"), only within
  // the daily window [resync_window_start, resync_window_end) of local time, minutes
  // after midnight (a window may wrap past midnight; 0-1440 is always). "manual": only
  // `siterep resync VM`.
  bool auto_resync = true;
  int resync_window_start = 0;
  int resync_window_end = 24 * 60;
  FailoverHooks hooks;
  // VMs of one consistency group are cut at the same instants (all disks of all of them),
  // so their replicas share recovery points; "" = none.
  std::string consistency_group;
  std::vector<DiskConfig> disks;
};

// [[hooks]]: the hooks of a VM whose primary is another site (vm names it).
struct HookConfig {
  std::string vm;
  FailoverHooks hooks;
};

// Whether minute_of_day (0..1439) is inside the VM's resync window.
bool InResyncWindow(const VmConfig& vm, int minute_of_day);

struct PeerConfig {
  std::string name;
  std::string address;           // host:port
  uint64_t bandwidth_limit = 0;  // bytes/s on the link to this peer; 0: unlimited
  bool compress = true;          // "compression": zstd (default) or none
  // Recovery plans run at this peer may run their pre/post actions here (sh -c, as root).
  bool allow_plan_actions = false;
};

struct TlsConfig {
  std::filesystem::path ca;
  std::filesystem::path cert;
  std::filesystem::path key;
};

struct SiteConfig {
  std::filesystem::path source;  // the file this came from
  std::string name;
  std::filesystem::path state_dir;
  std::filesystem::path mountpoint;
  std::filesystem::path control_socket;
  // A group (name or number) whose members may use the control socket besides root;
  // empty: root only.
  std::string control_group;
  std::string listen;
  TlsConfig tls;
  std::vector<PeerConfig> peers;
  std::vector<VmConfig> vms;
  std::vector<HookConfig> hooks;
  // How long a restarted primary holds guest writes while it asks its peer whether a
  // newer epoch took over (then they go on, with a warning, if the peer did not answer).
  std::chrono::milliseconds peer_wait{10'000};

  const VmConfig* FindVm(std::string_view name) const;
  // The VM's hooks: from its [[vms]] entry, else from [[hooks]]; none when neither.
  FailoverHooks HooksFor(std::string_view vm) const;
};

// Reads and validates the file at path.
Result<SiteConfig> LoadConfig(const std::filesystem::path& path);
// Parses text; base_dir resolves relative paths; source names the text in messages.
Result<SiteConfig> ParseConfig(std::string_view text, const std::filesystem::path& base_dir,
                               std::string_view source);

std::string_view TrackingModeName(TrackingMode mode);
// A frequency as the config writes it: "continuous", "30s", "5m", "15m" (others in seconds).
std::string FrequencyName(std::chrono::milliseconds frequency);

}  // namespace siterep
