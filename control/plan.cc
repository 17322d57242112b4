#include "control/plan.h"

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <utility>

#define TOML_EXCEPTIONS 1
#include <toml++/toml.h>

#include "common/file_util.h"
#include "common/toml_guard.h"
#include "common/units.h"

namespace siterep::control {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using std::chrono::milliseconds;

// Every problem found in one plan, "<key>: <reason>", in the order found.
class Problems {
 public:
  void Add(std::string key, std::string_view reason) {
    key += ": ";
    key += reason;
    lines_.push_back(std::move(key));
  }
  bool empty() const { return lines_.empty(); }
  // One line per problem, each "<prefix>: <key>: <reason>". Needs !empty().
  Status ToStatus(std::string_view prefix) const {
    std::string message;
    for (const std::string& line : lines_) {
      if (!message.empty()) message += '\n';
      message += prefix;
      message += ": ";
      message += line;
    }
    return Status::Invalid(std::move(message));
  }

 private:
  std::vector<std::string> lines_;
};

enum class Need { kOptional, kRequired };

std::string Indexed(std::string_view key, size_t i) {
  return std::string(key) + "[" + std::to_string(i) + "]";
}

// "groups[1].pre" -> "groups.pre": how TOML names an array of tables in [[...]].
std::string TomlName(std::string_view key) {
  std::string out;
  bool in_index = false;
  for (char c : key) {
    if (c == '[') in_index = true;
    if (!in_index) out += c;
    if (c == ']') in_index = false;
  }
  return out;
}

// The two readers below share one interface, so ReadPlan checks a TOML file and the JSON
// from the CLI with the same code. A reader reports what is wrong with its own table (a
// missing required key, a wrong type, an empty string, a bad timeout, an unknown key) and
// goes on; a value that is wrong is returned as nullopt (or "" inside a list, so that the
// indices of the others stay right). Keys are remembered as they are read so that
// CheckNoUnknownKeys refuses the rest.

class TomlTable {
 public:
  TomlTable(const toml::table& table, std::string where, Problems* problems)
      : table_(table), where_(std::move(where)), problems_(problems) {}

  std::string Key(std::string_view key) const {
    return where_.empty() ? std::string(key) : where_ + "." + std::string(key);
  }
  void Report(std::string_view key, std::string_view reason) { problems_->Add(Key(key), reason); }

  std::optional<std::string> String(std::string_view key, Need need) {
    const toml::node* node = Use(key);
    if (node == nullptr) {
      if (need == Need::kRequired) Report(key, "required key is missing");
      return std::nullopt;
    }
    std::optional<std::string> value = node->value<std::string>();
    if (!value) {
      Report(key, "must be a string");
    } else if (value->empty()) {
      Report(key, "must not be empty");
      value.reset();
    }
    return value;
  }

  // An array of non-empty strings; empty when missing, nullopt when not an array.
  std::optional<std::vector<std::string>> Strings(std::string_view key) {
    const toml::node* node = Use(key);
    if (node == nullptr) return std::vector<std::string>{};
    const toml::array* array = node->as_array();
    if (array == nullptr) {
      Report(key, "must be an array of strings");
      return std::nullopt;
    }
    std::vector<std::string> out;
    for (size_t i = 0; i < array->size(); ++i) {
      std::optional<std::string> value = (*array)[i].value<std::string>();
      if (!value) problems_->Add(Indexed(Key(key), i), "must be a string");
      if (value && value->empty()) problems_->Add(Indexed(Key(key), i), "must not be empty");
      out.push_back(value.value_or(""));
    }
    return out;
  }

  // "timeout": a positive duration such as "60s"; nullopt when missing or wrong.
  std::optional<milliseconds> Timeout() {
    std::optional<std::string> text = String("timeout", Need::kOptional);
    if (!text) return std::nullopt;
    Result<milliseconds> duration = ParseDuration(*text);
    if (!duration.ok()) {
      Report("timeout", duration.status().message());
      return std::nullopt;
    }
    if (duration->count() <= 0) {
      Report("timeout", "must be positive");
      return std::nullopt;
    }
    return *duration;
  }

  // Calls each(index, child) for every table of the array of tables `key`. Returns the
  // number of elements: 0 when the key is missing, -1 when it is not an array.
  template <typename F>
  int Tables(std::string_view key, F&& each) {
    const toml::node* node = Use(key);
    if (node == nullptr) return 0;
    const toml::array* array = node->as_array();
    if (array == nullptr) {
      Report(key, "must be an array of tables ([[" + TomlName(Key(key)) + "]])");
      return -1;
    }
    for (size_t i = 0; i < array->size(); ++i) {
      const toml::table* table = (*array)[i].as_table();
      if (table == nullptr) {
        problems_->Add(Indexed(Key(key), i), "must be a table");
        continue;
      }
      TomlTable child(*table, Indexed(Key(key), i), problems_);
      each(i, child);
    }
    return static_cast<int>(array->size());
  }

  void CheckNoUnknownKeys() {
    for (const auto& [key, value] : table_) {
      if (!used_.contains(std::string(key.str()))) Report(key.str(), "unknown key");
    }
  }

 private:
  const toml::node* Use(std::string_view key) {
    used_.insert(std::string(key));
    return table_.get(key);
  }

  const toml::table& table_;
  std::string where_;
  Problems* problems_;
  std::set<std::string> used_;
};

class JsonTable {
 public:
  // table must be an object.
  JsonTable(const json& table, std::string where, Problems* problems)
      : table_(table), where_(std::move(where)), problems_(problems) {}

  std::string Key(std::string_view key) const {
    return where_.empty() ? std::string(key) : where_ + "." + std::string(key);
  }
  void Report(std::string_view key, std::string_view reason) { problems_->Add(Key(key), reason); }

  std::optional<std::string> String(std::string_view key, Need need) {
    const json* node = Use(key);
    if (node == nullptr) {
      if (need == Need::kRequired) Report(key, "required key is missing");
      return std::nullopt;
    }
    if (!node->is_string()) {
      Report(key, "must be a string");
      return std::nullopt;
    }
    std::string value = node->get<std::string>();
    if (value.empty()) {
      Report(key, "must not be empty");
      return std::nullopt;
    }
    return value;
  }

  // A string that may be empty or missing (""); nullopt when of another type.
  std::optional<std::string> AnyString(std::string_view key) {
    const json* node = Use(key);
    if (node == nullptr) return std::string();
    if (!node->is_string()) {
      Report(key, "must be a string");
      return std::nullopt;
    }
    return node->get<std::string>();
  }

  std::optional<std::vector<std::string>> Strings(std::string_view key) {
    const json* node = Use(key);
    if (node == nullptr) return std::vector<std::string>{};
    if (!node->is_array()) {
      Report(key, "must be an array of strings");
      return std::nullopt;
    }
    std::vector<std::string> out;
    for (size_t i = 0; i < node->size(); ++i) {
      const json& element = (*node)[i];
      std::string value = element.is_string() ? element.get<std::string>() : std::string();
      if (!element.is_string()) problems_->Add(Indexed(Key(key), i), "must be a string");
      if (element.is_string() && value.empty()) {
        problems_->Add(Indexed(Key(key), i), "must not be empty");
      }
      out.push_back(std::move(value));
    }
    return out;
  }

  // "timeout_ms": a positive integer number of milliseconds.
  std::optional<milliseconds> Timeout() {
    const json* node = Use("timeout_ms");
    if (node == nullptr) return std::nullopt;
    if (!node->is_number_integer()) {
      Report("timeout_ms", "must be an integer (milliseconds)");
      return std::nullopt;
    }
    if (node->is_number_unsigned() &&
        node->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      Report("timeout_ms", "is out of range");
      return std::nullopt;
    }
    const int64_t ms = node->get<int64_t>();
    if (ms <= 0) {
      Report("timeout_ms", "must be positive");
      return std::nullopt;
    }
    return milliseconds(ms);
  }

  template <typename F>
  int Tables(std::string_view key, F&& each) {
    const json* node = Use(key);
    if (node == nullptr) return 0;
    if (!node->is_array()) {
      Report(key, "must be an array of objects");
      return -1;
    }
    for (size_t i = 0; i < node->size(); ++i) {
      const json& element = (*node)[i];
      if (!element.is_object()) {
        problems_->Add(Indexed(Key(key), i), "must be an object");
        continue;
      }
      JsonTable child(element, Indexed(Key(key), i), problems_);
      each(i, child);
    }
    return static_cast<int>(node->size());
  }

  void CheckNoUnknownKeys() {
    for (const auto& [key, value] : table_.items()) {
      if (!used_.contains(key)) Report(key, "unknown key");
    }
  }

 private:
  const json* Use(std::string_view key) {
    used_.insert(std::string(key));
    auto it = table_.find(std::string(key));
    return it == table_.end() ? nullptr : &*it;
  }

  const json& table_;
  std::string where_;
  Problems* problems_;
  std::set<std::string> used_;
};

// As the site config's names: they become folder names and command arguments.
bool ValidName(std::string_view name) {
  if (name.empty() || name.size() > 64 || name == "." || name == "..") return false;
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) {
      return false;
    }
  }
  return true;
}

template <typename Table>
bool CheckName(Table& t, std::string_view key, const std::string& name) {
  if (ValidName(name)) return true;
  t.Report(key, "'" + name + "' is not a valid name (letters, digits, '-', '_', '.'; at most 64)");
  return false;
}

// The plan's two sites; known only when both are valid names.
struct Sites {
  bool known = false;
  std::string from, to;
};

template <typename Table>
void ReadAction(Table& t, const Sites& sites, PlanAction* action) {
  if (std::optional<std::string> site = t.String("site", Need::kRequired)) {
    action->site = *site;
    if (CheckName(t, "site", *site) && sites.known && *site != sites.from && *site != sites.to) {
      t.Report("site", "'" + *site + "' is neither the plan's from ('" + sites.from +
                           "') nor its to ('" + sites.to + "')");
    }
  }
  if (std::optional<std::string> run = t.String("run", Need::kRequired)) action->run = *run;
  if (std::optional<milliseconds> timeout = t.Timeout()) action->timeout = *timeout;
  t.CheckNoUnknownKeys();
}

template <typename Table>
void ReadGroup(Table& t, const Sites& sites, PlanGroup* group) {
  if (std::optional<std::string> name = t.String("name", Need::kRequired)) {
    group->name = *name;
    CheckName(t, "name", *name);
  }
  if (std::optional<std::vector<std::string>> vms = t.Strings("vms")) {
    if (vms->empty()) t.Report("vms", "a group needs at least one VM (vms = [\"...\"])");
    std::set<std::string> seen;
    for (size_t i = 0; i < vms->size(); ++i) {
      const std::string& vm = (*vms)[i];
      if (vm.empty()) continue;  // reported by Strings
      const std::string key = Indexed("vms", i);
      if (!CheckName(t, key, vm)) continue;
      if (!seen.insert(vm).second) {
        t.Report(key, "VM '" + vm + "' appears twice in the group");
      }
    }
    group->vms = std::move(*vms);
  }
  // (Not a structured binding: clang 14 cannot capture one in a lambda.)
  for (const auto& entry : {std::pair{"pre", &group->pre}, std::pair{"post", &group->post}}) {
    std::vector<PlanAction>* list = entry.second;
    t.Tables(entry.first, [&](size_t, Table& a) {
      PlanAction action;
      ReadAction(a, sites, &action);
      list->push_back(std::move(action));
    });
  }
  t.Tables("manual", [&](size_t, Table& m) {
    PlanManual manual;
    if (std::optional<std::string> message = m.String("message", Need::kRequired)) {
      manual.message = *message;
    }
    m.CheckNoUnknownKeys();
    group->manual.push_back(std::move(manual));
  });
  t.CheckNoUnknownKeys();
}

// Reads and checks a whole plan from its top-level table, reporting every problem.
template <typename Table>
void ReadPlan(Table& top, RecoveryPlan* plan) {
  if (std::optional<std::string> name = top.String("name", Need::kRequired)) {
    plan->name = *name;
    CheckName(top, "name", *name);
  }
  std::optional<std::string> from = top.String("from", Need::kRequired);
  std::optional<std::string> to = top.String("to", Need::kRequired);
  const bool from_ok = from && CheckName(top, "from", *from);
  const bool to_ok = to && CheckName(top, "to", *to);
  if (from_ok && to_ok && *from == *to) {
    top.Report("to", "'" + *to + "' is also the plan's from; a plan moves VMs to another site");
  }
  plan->from = from.value_or("");
  plan->to = to.value_or("");
  const Sites sites{from_ok && to_ok, plan->from, plan->to};

  // For the checks across groups: where each group name and each VM was first seen, and
  // how to name a group in a message.
  std::map<std::string, size_t> group_by_name;
  std::map<std::string, size_t> group_by_vm;
  std::map<size_t, std::string> labels;
  const int groups = top.Tables("groups", [&](size_t i, Table& g) {
    PlanGroup group;
    ReadGroup(g, sites, &group);
    labels[i] = ValidName(group.name) ? "group '" + group.name + "'" : Indexed("groups", i);
    if (!group.name.empty()) {
      auto [it, inserted] = group_by_name.emplace(group.name, i);
      if (!inserted) {
        g.Report("name", "group '" + group.name + "' appears twice (also " +
                             Indexed("groups", it->second) + ")");
      }
    }
    for (size_t v = 0; v < group.vms.size(); ++v) {
      const std::string& vm = group.vms[v];
      if (!ValidName(vm)) continue;  // reported by ReadGroup
      auto [it, inserted] = group_by_vm.emplace(vm, i);
      if (!inserted && it->second != i) {
        std::string first = labels[it->second], second = labels[i];
        if (first == second) {  // two groups of the same name: tell them apart
          first += " (" + Indexed("groups", it->second) + ")";
          second += " (" + Indexed("groups", i) + ")";
        }
        g.Report(Indexed("vms", v), "VM '" + vm + "' is in " + first + " and in " + second +
                                        "; a VM belongs to one group of a plan");
      }
    }
    plan->groups.push_back(std::move(group));
  });
  if (groups == 0) top.Report("groups", "a plan needs at least one group ([[groups]])");
  top.CheckNoUnknownKeys();
}

json ActionsToJson(const std::vector<PlanAction>& actions) {
  json out = json::array();
  for (const PlanAction& a : actions) {
    out.push_back({{"site", a.site}, {"run", a.run}, {"timeout_ms", a.timeout.count()}});
  }
  return out;
}

}  // namespace

Result<RecoveryPlan> ParsePlan(std::string_view text, std::string_view source) {
  if (Status s = CheckTomlText(text, source); !s.ok()) return s;
  toml::table root;
  try {
    root = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    std::ostringstream message;
    message << source << ":" << e.source().begin.line << ":" << e.source().begin.column << ": "
            << e.description();
    return Status::Invalid(message.str());
  }
  RecoveryPlan plan;
  plan.source = fs::path(source);
  Problems problems;
  TomlTable top(root, "", &problems);
  ReadPlan(top, &plan);
  if (!problems.empty()) return problems.ToStatus(source);
  return plan;
}

Result<RecoveryPlan> LoadPlan(const fs::path& path) {
  Result<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status().WithContext("cannot read plan");
  Result<RecoveryPlan> plan = ParsePlan(*text, path.string());
  if (plan.ok()) plan->source = fs::absolute(path);
  return plan;
}

json PlanToJson(const RecoveryPlan& plan) {
  json groups = json::array();
  for (const PlanGroup& g : plan.groups) {
    json manual = json::array();
    for (const PlanManual& m : g.manual) manual.push_back({{"message", m.message}});
    groups.push_back({{"name", g.name},
                      {"vms", g.vms},
                      {"pre", ActionsToJson(g.pre)},
                      {"post", ActionsToJson(g.post)},
                      {"manual", std::move(manual)}});
  }
  return {{"name", plan.name},
          {"from", plan.from},
          {"to", plan.to},
          {"source", plan.source.string()},
          {"groups", std::move(groups)}};
}

Result<RecoveryPlan> PlanFromJson(const json& j) {
  if (!j.is_object()) {
    return Status::Invalid(std::string("plan JSON: must be an object, not ") + j.type_name());
  }
  Problems problems;
  JsonTable top(j, "", &problems);
  RecoveryPlan plan;
  std::optional<std::string> source = top.AnyString("source");
  if (source) plan.source = fs::path(*source);
  ReadPlan(top, &plan);
  if (!problems.empty()) {
    return problems.ToStatus(source && !source->empty() ? "plan JSON from " + *source
                                                        : std::string("plan JSON"));
  }
  return plan;
}

// --- Run reports -------------------------------------------------------------------------

namespace {

std::string Text(const nlohmann::json& j, const char* key, const std::string& none = "-") {
  if (!j.is_object() || !j.contains(key) || j[key].is_null()) return none;
  if (j[key].is_string()) return j[key].get<std::string>().empty() ? none : j[key].get<std::string>();
  if (j[key].is_number_float()) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f", j[key].get<double>());
    return buf;
  }
  return j[key].dump();
}

std::string LastLine(const std::string& output) {
  std::string s = output;
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  const size_t nl = s.rfind('\n');
  std::string line = nl == std::string::npos ? s : s.substr(nl + 1);
  if (line.size() > 100) line = line.substr(0, 97) + "...";
  return line;
}

void ActionLines(const nlohmann::json& actions, const char* stage, std::string* out) {
  if (!actions.is_array()) return;
  for (const nlohmann::json& a : actions) {
    std::string line = std::string("    ") + stage + "  at " + Text(a, "site") + ": " +
                       Text(a, "run") + "  " + Text(a, "state");
    if (a.contains("exit_code")) line += ", exit " + Text(a, "exit_code");
    if (a.value("timed_out", false)) line += ", timed out";
    if (a.contains("seconds")) line += ", " + Text(a, "seconds") + " s";
    if (a.contains("note")) line += " (" + Text(a, "note") + ")";
    *out += line + "\n";
    const std::string last = LastLine(a.value("output", std::string()));
    if (!last.empty()) *out += "          output: " + last + "\n";
    if (a.contains("error") && a.value("state", "") == "failed") {
      *out += "          error: " + Text(a, "error") + "\n";
    }
  }
}

}  // namespace

std::string PlanRunText(const nlohmann::json& run) {
  std::string out;
  const nlohmann::json plan = run.value("plan", nlohmann::json::object());
  out += "plan " + Text(plan, "name") + ": " + Text(run, "kind") + " run, " + Text(plan, "from") +
         " -> " + Text(plan, "to") + ", at " + Text(run, "site") + ": " + Text(run, "state") + "\n";
  out += "  started " + Text(run, "started") +
         (run.contains("ended") && !run["ended"].is_null() ? ", ended " + Text(run, "ended") : "") +
         (run.contains("seconds") ? " (" + Text(run, "seconds") + " s)" : "") + "\n";
  if (run.contains("consistency") && run["consistency"].is_object()) {
    for (const auto& [g, c] : run["consistency"].items()) {
      std::string members;
      for (const auto& m : c.value("members", nlohmann::json::array())) {
        members += (members.empty() ? "" : ", ") + m.get<std::string>();
      }
      out += "  consistency group " + g + " (" + members + "): instant " + Text(c, "time") + "\n";
    }
  }
  for (const nlohmann::json& g : run.value("groups", nlohmann::json::array())) {
    out += "  group " + Text(g, "name") + ": " + Text(g, "state");
    if (g.contains("seconds")) out += ", " + Text(g, "seconds") + " s";
    out += "\n";
    ActionLines(g.value("pre", nlohmann::json::array()), "pre ", &out);
    for (const nlohmann::json& v : g.value("vms", nlohmann::json::array())) {
      std::string line = "    vm    " + Text(v, "vm") + "  " + Text(v, "state");
      if (v.contains("rto_seconds")) line += ", RTO " + Text(v, "rto_seconds") + " s";
      if (v.contains("point") && v["point"].is_object()) {
        if (v["point"].value("every_change", false)) {
          line += ", every change shipped (through cycle " + Text(v["point"], "id") + ")";
        } else {
          line += ", point " + Text(v["point"], "id");
          if (v["point"].contains("time")) line += " (" + Text(v["point"], "time") + ")";
        }
      }
      if (v.contains("data_loss_window_seconds")) {
        line += ", data loss " + Text(v, "data_loss_window_seconds", "unknown") +
                (v["data_loss_window_seconds"].is_null() ? "" : " s");
      }
      if (v.contains("path")) line += ", at " + Text(v, "path");
      if (v.contains("note")) line += " (" + Text(v, "note") + ")";
      out += line + "\n";
      if (v.contains("hooks") && v["hooks"].is_object()) {
        for (const auto& [name, h] : v["hooks"].items()) {
          out += "          " + name + ": exit " + Text(h, "exit_code") +
                 (h.value("timed_out", false) ? ", timed out" : "") + "\n";
        }
      }
      if (v.contains("error") && v.value("state", "") == "failed") {
        out += "          error: " + Text(v, "error") + "\n";
      }
    }
    ActionLines(g.value("post", nlohmann::json::array()), "post", &out);
    for (const nlohmann::json& m : g.value("manual", nlohmann::json::array())) {
      out += "    manual \"" + Text(m, "message") + "\"  " + Text(m, "state");
      if (m.contains("confirmed_by")) out += " by " + Text(m, "confirmed_by");
      out += "\n";
    }
  }
  if (!run.value("message", std::string()).empty()) out += Text(run, "message") + "\n";
  return out;
}

}  // namespace siterep::control
