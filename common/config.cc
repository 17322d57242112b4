#include "common/config.h"

#include <cctype>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#define TOML_EXCEPTIONS 1
#include <toml++/toml.h>

#include "common/toml_guard.h"
#include "common/units.h"

namespace siterep {
namespace {

namespace fs = std::filesystem;

// Reads one table, remembering which keys were used so unknown keys can be refused.
class TableReader {
 public:
  TableReader(const toml::table& table, std::string where)
      : table_(table), where_(std::move(where)) {}

  std::string Key(std::string_view key) const {
    return where_.empty() ? std::string(key) : where_ + "." + std::string(key);
  }

  Status String(std::string_view key, std::string* out, bool required) {
    used_.insert(std::string(key));
    const toml::node* node = table_.get(key);
    if (node == nullptr) {
      return required ? Status::Invalid(Key(key) + ": required key is missing") : Status::Ok();
    }
    auto value = node->value<std::string>();
    if (!value) return Status::Invalid(Key(key) + ": must be a string");
    if (value->empty()) return Status::Invalid(Key(key) + ": must not be empty");
    *out = *value;
    return Status::Ok();
  }

  Status Bool(std::string_view key, bool* out) {
    used_.insert(std::string(key));
    const toml::node* node = table_.get(key);
    if (node == nullptr) return Status::Ok();
    auto value = node->value_exact<bool>();
    if (!value) return Status::Invalid(Key(key) + ": must be true or false");
    *out = *value;
    return Status::Ok();
  }

  Status Int(std::string_view key, int64_t* out, int64_t min, int64_t max) {
    used_.insert(std::string(key));
    const toml::node* node = table_.get(key);
    if (node == nullptr) return Status::Ok();
    auto value = node->value_exact<int64_t>();
    if (!value) return Status::Invalid(Key(key) + ": must be an integer");
    if (*value < min || *value > max) {
      return Status::Invalid(Key(key) + ": must be between " + std::to_string(min) + " and " +
                             std::to_string(max));
    }
    *out = *value;
    return Status::Ok();
  }

  // A size in bytes, written as an integer or as a string with a unit ("50MiB").
  Status Size(std::string_view key, uint64_t* out) {
    used_.insert(std::string(key));
    const toml::node* node = table_.get(key);
    if (node == nullptr) return Status::Ok();
    if (auto i = node->value_exact<int64_t>()) {
      if (*i < 0) return Status::Invalid(Key(key) + ": must not be negative");
      *out = static_cast<uint64_t>(*i);
      return Status::Ok();
    }
    auto text = node->value<std::string>();
    if (!text) return Status::Invalid(Key(key) + ": must be a size (an integer or e.g. \"50MiB\")");
    auto size = ParseSize(*text);
    if (!size.ok()) return size.status().WithContext(Key(key));
    *out = *size;
    return Status::Ok();
  }

  const toml::table* SubTable(std::string_view key, Status* status) {
    used_.insert(std::string(key));
    const toml::node* node = table_.get(key);
    if (node == nullptr) return nullptr;
    if (!node->is_table())
      *status = Status::Invalid(Key(key) + ": must be a table ([" + Key(key) + "])");
    return node->as_table();
  }

  const toml::array* Array(std::string_view key, Status* status) {
    used_.insert(std::string(key));
    const toml::node* node = table_.get(key);
    if (node == nullptr) return nullptr;
    if (!node->is_array()) {
      *status = Status::Invalid(Key(key) + ": must be an array of tables ([[" + Key(key) + "]])");
    }
    return node->as_array();
  }

  Status CheckNoUnknownKeys() const {
    for (const auto& [k, v] : table_) {
      if (!used_.contains(std::string(k.str()))) {
        return Status::Invalid(Key(k.str()) + ": unknown key");
      }
    }
    return Status::Ok();
  }

 private:
  const toml::table& table_;
  std::string where_;
  std::set<std::string> used_;
};

fs::path Resolve(const fs::path& base, const std::string& p) {
  fs::path path(p);
  return path.is_absolute() ? path : (base / path).lexically_normal();
}

bool ValidName(const std::string& name) {
  if (name.empty() || name.size() > 64 || name == "." || name == "..") return false;
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) {
      return false;
    }
  }
  return true;
}

Status CheckName(const TableReader& r, std::string_view key, const std::string& name) {
  if (!ValidName(name)) {
    return Status::Invalid(r.Key(key) + ": '" + name +
                           "' is not a valid name (letters, digits, '-', '_', '.'; at most 64)");
  }
  return Status::Ok();
}

Status ParseDisk(const toml::table& t, const std::string& where, const fs::path& base,
                 DiskConfig* disk) {
  TableReader r(t, where);
  std::string image;
  SR_RETURN_IF_ERROR(r.String("name", &disk->name, true));
  SR_RETURN_IF_ERROR(CheckName(r, "name", disk->name));
  SR_RETURN_IF_ERROR(r.String("image", &image, true));
  disk->image = Resolve(base, image);
  return r.CheckNoUnknownKeys();
}

// A duration key ("60s", "5m"); positive.
Status Duration(TableReader& r, std::string_view key, std::chrono::milliseconds* out) {
  std::string text;
  SR_RETURN_IF_ERROR(r.String(key, &text, false));
  if (text.empty()) return Status::Ok();
  auto d = ParseDuration(text);
  if (!d.ok()) return d.status().WithContext(r.Key(key));
  if (d->count() <= 0) return Status::Invalid(r.Key(key) + ": must be positive");
  *out = *d;
  return Status::Ok();
}

// pre_failover, post_failover and the timeout key (hook_timeout in [[vms]], timeout in
// [[hooks]]).
Status ParseHooks(TableReader& r, std::string_view timeout_key, FailoverHooks* hooks) {
  SR_RETURN_IF_ERROR(r.String("pre_failover", &hooks->pre_failover, false));
  SR_RETURN_IF_ERROR(r.String("post_failover", &hooks->post_failover, false));
  return Duration(r, timeout_key, &hooks->timeout);
}

Status ParseVm(const toml::table& t, const std::string& where, const fs::path& base, VmConfig* vm) {
  TableReader r(t, where);
  SR_RETURN_IF_ERROR(r.String("name", &vm->name, true));
  SR_RETURN_IF_ERROR(CheckName(r, "name", vm->name));

  std::string freq;
  SR_RETURN_IF_ERROR(r.String("frequency", &freq, false));
  if (!freq.empty()) {
    vm->frequency_text = freq;
    if (freq == "continuous") {
      vm->frequency = std::chrono::seconds(1);
    } else if (freq == "30s" || freq == "5m" || freq == "15m") {
      vm->frequency = ParseDuration(freq).value();
    } else {
      return Status::Invalid(r.Key("frequency") + ": '" + freq +
                             "' is not one of continuous, 30s, 5m, 15m");
    }
  }

  int64_t points = vm->recovery_points;
  SR_RETURN_IF_ERROR(r.Int("recovery_points", &points, 0, 24 * 365));
  vm->recovery_points = static_cast<int>(points);

  SR_RETURN_IF_ERROR(Duration(r, "recovery_point_interval", &vm->recovery_point_interval));

  std::string budget;
  SR_RETURN_IF_ERROR(r.String("log_budget", &budget, false));
  if (!budget.empty()) {
    // Named rather than refused as unknown: configurations written for the data log have it.
    return Status::Invalid(r.Key("log_budget") +
                           ": no longer used (changed-block tracking keeps no data log, and a "
                           "slow link makes cycles longer instead of filling a log): remove it");
  }

  std::string tracking;
  SR_RETURN_IF_ERROR(r.String("tracking", &tracking, false));
  if (tracking == "off")
    vm->tracking = TrackingMode::kOff;
  else if (tracking.empty() || tracking == "log")
    vm->tracking = TrackingMode::kLog;
  else
    return Status::Invalid(r.Key("tracking") + ": '" + tracking + "' is not one of log, off");

  std::string cache;
  SR_RETURN_IF_ERROR(r.String("image_cache", &cache, false));
  if (cache == "none")
    vm->image_cache = ImageCache::kNone;
  else if (cache.empty() || cache == "writeback")
    vm->image_cache = ImageCache::kWriteback;
  else
    return Status::Invalid(r.Key("image_cache") + ": '" + cache +
                           "' is not one of writeback, none");

  SR_RETURN_IF_ERROR(r.Size("cow_limit", &vm->cow_limit));

  std::string resync;
  SR_RETURN_IF_ERROR(r.String("resync", &resync, false));
  if (resync == "manual")
    vm->auto_resync = false;
  else if (resync.empty() || resync == "auto")
    vm->auto_resync = true;
  else
    return Status::Invalid(r.Key("resync") + ": '" + resync + "' is not one of auto, manual");

  std::string window;
  SR_RETURN_IF_ERROR(r.String("resync_window", &window, false));
  if (!window.empty()) {
    // "HH:MM-HH:MM"; the end may be 24:00.
    auto minutes = [](std::string_view t) -> int {
      if (t.size() != 5 || t[2] != ':' || !isdigit(t[0]) || !isdigit(t[1]) || !isdigit(t[3]) ||
          !isdigit(t[4])) {
        return -1;
      }
      const int h = (t[0] - '0') * 10 + (t[1] - '0');
      const int m = (t[3] - '0') * 10 + (t[4] - '0');
      if (m > 59 || h > 24 || (h == 24 && m != 0)) return -1;
      return h * 60 + m;
    };
    const size_t dash = window.find('-');
    const int start = dash == std::string::npos ? -1 : minutes(window.substr(0, dash));
    const int end = dash == std::string::npos ? -1 : minutes(window.substr(dash + 1));
    if (start < 0 || end < 0 || start == end || start == 24 * 60) {
      return Status::Invalid(r.Key("resync_window") + ": '" + window +
                             "' is not a daily window such as 18:30-06:00 or 00:00-24:00");
    }
    vm->resync_window_start = start;
    vm->resync_window_end = end;
  }

  SR_RETURN_IF_ERROR(ParseHooks(r, "hook_timeout", &vm->hooks));
  SR_RETURN_IF_ERROR(r.String("consistency_group", &vm->consistency_group, false));
  if (!vm->consistency_group.empty()) {
    SR_RETURN_IF_ERROR(CheckName(r, "consistency_group", vm->consistency_group));
  }

  Status status;
  const toml::array* disks = r.Array("disks", &status);
  SR_RETURN_IF_ERROR(status);
  if (disks == nullptr || disks->empty()) {
    return Status::Invalid(r.Key("disks") + ": a VM needs at least one [[vms.disks]]");
  }
  std::set<std::string> names;
  for (size_t i = 0; i < disks->size(); ++i) {
    std::string w = r.Key("disks") + "[" + std::to_string(i) + "]";
    const toml::table* dt = (*disks)[i].as_table();
    if (dt == nullptr) return Status::Invalid(w + ": must be a table");
    DiskConfig disk;
    SR_RETURN_IF_ERROR(ParseDisk(*dt, w, base, &disk));
    if (!names.insert(disk.name).second) {
      return Status::Invalid(w + ".name: disk '" + disk.name + "' appears twice in VM '" +
                             vm->name + "'");
    }
    vm->disks.push_back(std::move(disk));
  }
  return r.CheckNoUnknownKeys();
}

}  // namespace

const VmConfig* SiteConfig::FindVm(std::string_view vm_name) const {
  for (const auto& vm : vms) {
    if (vm.name == vm_name) return &vm;
  }
  return nullptr;
}

FailoverHooks SiteConfig::HooksFor(std::string_view vm_name) const {
  if (const VmConfig* vm = FindVm(vm_name)) return vm->hooks;
  for (const HookConfig& h : hooks) {
    if (h.vm == vm_name) return h.hooks;
  }
  return {};
}

std::string FrequencyName(std::chrono::milliseconds frequency) {
  switch (frequency.count()) {
    case 1000:
      return "continuous";
    case 30000:
      return "30s";
    case 300000:
      return "5m";
    case 900000:
      return "15m";
    default:
      return std::to_string(frequency.count() / 1000) + "s";
  }
}

std::string_view TrackingModeName(TrackingMode mode) {
  return mode == TrackingMode::kOff ? "off" : "log";
}

Result<SiteConfig> ParseConfig(std::string_view text, const fs::path& base_dir,
                               std::string_view source) {
  if (Status s = CheckTomlText(text, source); !s.ok()) return s;
  toml::table root;
  try {
    root = toml::parse(text, std::string(source));
  } catch (const toml::parse_error& e) {
    std::ostringstream msg;
    msg << source << ":" << e.source().begin.line << ":" << e.source().begin.column << ": "
        << e.description();
    return Status::Invalid(msg.str());
  }
  auto fail = [&](const Status& s) { return s.WithContext(source); };

  SiteConfig cfg;
  TableReader top(root, "");
  Status status;
  const toml::table* site = top.SubTable("site", &status);
  if (!status.ok()) return fail(status);
  if (site == nullptr) return fail(Status::Invalid("site: the [site] table is missing"));
  {
    TableReader r(*site, "site");
    std::string state_dir, mountpoint, socket;
    Status s = r.String("name", &cfg.name, true);
    if (s.ok()) s = CheckName(r, "name", cfg.name);
    if (s.ok()) s = r.String("state_dir", &state_dir, true);
    if (s.ok()) s = r.String("mountpoint", &mountpoint, true);
    if (s.ok()) s = r.String("control_socket", &socket, false);
    if (s.ok()) s = r.String("control_group", &cfg.control_group, false);
    if (s.ok()) s = r.String("listen", &cfg.listen, false);
    if (s.ok()) s = Duration(r, "peer_wait", &cfg.peer_wait);
    if (s.ok()) s = r.CheckNoUnknownKeys();
    if (!s.ok()) return fail(s);
    cfg.state_dir = Resolve(base_dir, state_dir);
    cfg.mountpoint = Resolve(base_dir, mountpoint);
    cfg.control_socket =
        socket.empty() ? cfg.state_dir / "control.sock" : Resolve(base_dir, socket);
  }

  const toml::table* tls = top.SubTable("tls", &status);
  if (!status.ok()) return fail(status);
  if (tls != nullptr) {
    TableReader r(*tls, "tls");
    std::string ca, cert, key;
    Status s = r.String("ca", &ca, true);
    if (s.ok()) s = r.String("cert", &cert, true);
    if (s.ok()) s = r.String("key", &key, true);
    if (s.ok()) s = r.CheckNoUnknownKeys();
    if (!s.ok()) return fail(s);
    cfg.tls = {Resolve(base_dir, ca), Resolve(base_dir, cert), Resolve(base_dir, key)};
  }

  const toml::array* peers = top.Array("peers", &status);
  if (!status.ok()) return fail(status);
  if (peers != nullptr) {
    std::set<std::string> names;
    for (size_t i = 0; i < peers->size(); ++i) {
      std::string w = "peers[" + std::to_string(i) + "]";
      const toml::table* pt = (*peers)[i].as_table();
      if (pt == nullptr) return fail(Status::Invalid(w + ": must be a table"));
      TableReader r(*pt, w);
      PeerConfig peer;
      Status s = r.String("name", &peer.name, true);
      if (s.ok()) s = CheckName(r, "name", peer.name);
      if (s.ok()) s = r.String("address", &peer.address, true);
      if (s.ok()) s = r.Size("bandwidth_limit", &peer.bandwidth_limit);
      std::string compression;
      if (s.ok()) s = r.String("compression", &compression, false);
      if (s.ok() && compression == "none")
        peer.compress = false;
      else if (s.ok() && !compression.empty() && compression != "zstd") {
        s = Status::Invalid(r.Key("compression") + ": '" + compression +
                            "' is not one of zstd, none");
      }
      if (s.ok()) s = r.Bool("allow_plan_actions", &peer.allow_plan_actions);
      if (s.ok()) s = r.CheckNoUnknownKeys();
      if (!s.ok()) return fail(s);
      if (peer.name == cfg.name) {
        return fail(Status::Invalid(w + ".name: a site cannot be its own peer"));
      }
      if (!names.insert(peer.name).second) {
        return fail(Status::Invalid(w + ".name: peer '" + peer.name + "' appears twice"));
      }
      cfg.peers.push_back(std::move(peer));
    }
  }

  const toml::array* vms = top.Array("vms", &status);
  if (!status.ok()) return fail(status);
  if (vms != nullptr) {
    std::set<std::string> names;
    std::set<fs::path> images;
    for (size_t i = 0; i < vms->size(); ++i) {
      std::string w = "vms[" + std::to_string(i) + "]";
      const toml::table* vt = (*vms)[i].as_table();
      if (vt == nullptr) return fail(Status::Invalid(w + ": must be a table"));
      VmConfig vm;
      Status s = ParseVm(*vt, w, base_dir, &vm);
      if (!s.ok()) return fail(s);
      if (!names.insert(vm.name).second) {
        return fail(Status::Invalid(w + ".name: VM '" + vm.name + "' appears twice"));
      }
      for (size_t d = 0; d < vm.disks.size(); ++d) {
        if (!images.insert(vm.disks[d].image).second) {
          return fail(Status::Invalid(w + ".disks[" + std::to_string(d) + "].image: " +
                                      vm.disks[d].image.string() + " is used by two disks"));
        }
      }
      cfg.vms.push_back(std::move(vm));
    }
    // A consistency group is cut as one: its VMs share one frequency and track changes.
    std::map<std::string, const VmConfig*> first_of;
    for (size_t i = 0; i < cfg.vms.size(); ++i) {
      const VmConfig& vm = cfg.vms[i];
      if (vm.consistency_group.empty()) continue;
      const std::string w = "vms[" + std::to_string(i) + "].consistency_group";
      if (vm.tracking == TrackingMode::kOff) {
        return fail(Status::Invalid(w + ": VM '" + vm.name +
                                    "' has tracking = \"off\"; a "
                                    "consistency group needs its change logs"));
      }
      auto [it, added] = first_of.emplace(vm.consistency_group, &vm);
      if (!added && it->second->frequency != vm.frequency) {
        return fail(Status::Invalid(w + ": VM '" + vm.name + "' replicates every " +
                                    vm.frequency_text + ", but VM '" + it->second->name +
                                    "' of consistency group '" + vm.consistency_group + "' every " +
                                    it->second->frequency_text + "; a group has one frequency"));
      }
    }
  }
  const toml::array* hooks = top.Array("hooks", &status);
  if (!status.ok()) return fail(status);
  if (hooks != nullptr) {
    std::set<std::string> names;
    for (size_t i = 0; i < hooks->size(); ++i) {
      std::string w = "hooks[" + std::to_string(i) + "]";
      const toml::table* ht = (*hooks)[i].as_table();
      if (ht == nullptr) return fail(Status::Invalid(w + ": must be a table"));
      TableReader r(*ht, w);
      HookConfig h;
      Status s = r.String("vm", &h.vm, true);
      if (s.ok()) s = CheckName(r, "vm", h.vm);
      if (s.ok()) s = ParseHooks(r, "timeout", &h.hooks);
      if (s.ok()) s = r.CheckNoUnknownKeys();
      if (!s.ok()) return fail(s);
      if (cfg.FindVm(h.vm) != nullptr) {
        return fail(Status::Invalid(w + ".vm: VM '" + h.vm +
                                    "' is in [[vms]]; put its hooks there (pre_failover, "
                                    "post_failover, hook_timeout)"));
      }
      if (!names.insert(h.vm).second) {
        return fail(Status::Invalid(w + ".vm: VM '" + h.vm + "' has hooks twice"));
      }
      cfg.hooks.push_back(std::move(h));
    }
  }
  Status s = top.CheckNoUnknownKeys();
  if (!s.ok()) return fail(s);
  // Replication runs over mutual TLS only: a site that talks to peers needs certificates.
  if (tls == nullptr && (!cfg.listen.empty() || !cfg.peers.empty())) {
    return fail(Status::Invalid(
        "tls: the [tls] table (ca, cert, key) is required when the site has a listen address "
        "or peers; make certificates with siterep-certs"));
  }
  return cfg;
}

Result<SiteConfig> LoadConfig(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::FromErrno(errno, "cannot read config " + path.string());
  std::stringstream buf;
  buf << in.rdbuf();
  fs::path abs = fs::absolute(path);
  auto cfg = ParseConfig(buf.str(), abs.parent_path(), path.string());
  if (cfg.ok()) cfg->source = abs;
  return cfg;
}

bool InResyncWindow(const VmConfig& vm, int minute_of_day) {
  const int a = vm.resync_window_start, b = vm.resync_window_end;
  if (a < b) return minute_of_day >= a && minute_of_day < b;
  return minute_of_day >= a || minute_of_day < b;  // wraps past midnight
}

}  // namespace siterep
