#include "core/text.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "dmx/error.h"

namespace dmx {
std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t at = s.find(sep, start);
    parts.push_back(s.substr(start, at == std::string::npos ? std::string::npos : at - start));
    if (at == std::string::npos) break;
    start = at + 1;
  }
  return parts;
}

namespace {
std::string shown(const std::string& text) {
  return "'" + terminal_safe(text.substr(0, 64)) + (text.size() > 64 ? "...'" : "'");
}
}  // namespace

int64_t parse_integer(const std::string& text, const std::string& what, int64_t min, int64_t max) {
  const size_t first = !text.empty() && text[0] == '-' ? 1 : 0;
  bool digits = first < text.size() && text.size() <= 24;
  for (size_t k = first; k < text.size(); ++k) digits = digits && text[k] >= '0' && text[k] <= '9';
  DMX_CHECK_ARG(digits, what, " must be an integer, got ", shown(text));
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  DMX_CHECK_ARG(errno == 0 && end == text.c_str() + text.size() && v >= min && v <= max, what, " must be in [", min,
                ", ", max, "], got ", text);
  return v;
}

uint64_t parse_unsigned(const std::string& text, const std::string& what) {
  bool ok = !text.empty() && text.size() <= 20;
  for (char c : text) ok = ok && c >= '0' && c <= '9';
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = ok ? std::strtoull(text.c_str(), &end, 10) : 0;
  if (!ok || errno != 0 || end != text.c_str() + text.size())
    throw InvalidArgument(detail::concat(what, " must be an integer in [0, 2^64-1], got ", shown(text)));
  return v;
}

double parse_number(const std::string& text, const std::string& what) {
  // Decimal only: strtod would also take hex floats, "inf", "nan" and leading spaces.
  bool ok = !text.empty() && text.size() <= 64;
  for (char c : text) ok = ok && ((c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E');
  errno = 0;
  char* end = nullptr;
  const double v = ok ? std::strtod(text.c_str(), &end) : 0.0;
  if (!ok || end != text.c_str() + text.size() || !std::isfinite(v) || (errno == ERANGE && std::fabs(v) > 1.0))
    throw InvalidArgument(detail::concat(what, " must be a number, got ", shown(text)));
  return v;
}

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::string join_abbreviated(const std::vector<std::string>& items, size_t max) {
  std::string out;
  for (size_t i = 0; i < items.size() && i < max; ++i) out += (i ? ", " : "") + items[i];
  if (items.size() > max) out += ", ... (" + std::to_string(items.size()) + " in all)";
  return out;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string to_lower_ascii(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

std::string trim(const std::string& s) {
  const char* ws = " \t\n\v\f\r";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}
}  // namespace dmx
