#include "common/units.h"

#include <cctype>
#include <charconv>
#include <cstdio>

namespace siterep {
namespace {

std::string_view Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Splits "12.5GiB" into 12.5 and "GiB".
bool SplitNumber(std::string_view text, double* number, std::string_view* unit) {
  text = Trim(text);
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
    ++i;
  }
  if (i == 0) return false;
  std::string digits(text.substr(0, i));
  char* end = nullptr;
  *number = std::strtod(digits.c_str(), &end);
  if (end != digits.c_str() + digits.size()) return false;
  *unit = Trim(text.substr(i));
  return true;
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace

Result<uint64_t> ParseSize(std::string_view text) {
  double number = 0;
  std::string_view unit;
  if (!SplitNumber(text, &number, &unit)) {
    return Status::Invalid("'" + std::string(text) + "' is not a size (e.g. 4GiB, 512M, 65536)");
  }
  const std::string u = Lower(unit);
  double mult = 0;
  if (u.empty() || u == "b") mult = 1;
  else if (u == "k" || u == "kb" || u == "kib") mult = 1024.0;
  else if (u == "m" || u == "mb" || u == "mib") mult = 1024.0 * 1024;
  else if (u == "g" || u == "gb" || u == "gib") mult = 1024.0 * 1024 * 1024;
  else if (u == "t" || u == "tb" || u == "tib") mult = 1024.0 * 1024 * 1024 * 1024;
  else return Status::Invalid("'" + std::string(text) + "' has an unknown size unit '" +
                              std::string(unit) + "'");
  // At most 1 EiB: beyond that the conversion to an integer is undefined.
  const double bytes = number * mult;
  if (!(bytes >= 0) || bytes > 1024.0 * 1024 * 1024 * 1024 * 1024 * 1024) {
    return Status::Invalid("'" + std::string(text) + "' is out of range (at most 1 EiB)");
  }
  return static_cast<uint64_t>(bytes);
}

Result<std::chrono::milliseconds> ParseDuration(std::string_view text) {
  double number = 0;
  std::string_view unit;
  if (!SplitNumber(text, &number, &unit) || unit.empty()) {
    return Status::Invalid("'" + std::string(text) +
                           "' is not a duration (e.g. 30s, 5m, 1h, 250ms)");
  }
  const std::string u = Lower(unit);
  double ms = 0;
  if (u == "ms") ms = number;
  else if (u == "s") ms = number * 1000;
  else if (u == "m" || u == "min") ms = number * 60'000;
  else if (u == "h") ms = number * 3'600'000;
  else if (u == "d") ms = number * 86'400'000;
  else return Status::Invalid("'" + std::string(text) + "' has an unknown duration unit '" +
                              std::string(unit) + "'");
  // At most 100 years: beyond that the conversion to an integer is undefined.
  constexpr double kMaxMs = 100.0 * 365 * 86'400'000;
  if (!(ms >= 0) || ms > kMaxMs) {
    return Status::Invalid("'" + std::string(text) + "' is out of range (0 to 100 years)");
  }
  return std::chrono::milliseconds(static_cast<int64_t>(ms));
}

std::string FormatSize(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int i = 0;
  while (v >= 1024 && i < 4) {
    v /= 1024;
    ++i;
  }
  char buf[32];
  if (i == 0) std::snprintf(buf, sizeof(buf), "%llu B", static_cast<unsigned long long>(bytes));
  else std::snprintf(buf, sizeof(buf), "%.1f %s", v, kUnits[i]);
  return buf;
}

}  // namespace siterep
