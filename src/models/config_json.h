// Reading diffusers config.json fields with typed, named errors (internal to models/).
#pragma once
#include <cstdint>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "dmx/error.h"

namespace dmx::models::cfgjson {

// Size limits of model configs (docs/limits.md): every integer field is range-checked by the config's
// validate(), and the parameter count a config describes is computed from the config alone and bounded
// before any module is built (a 2-billion-parameter model is 8 GB in float32; SD 2.x's UNet has 0.87
// billion). Loaders also compare the count with the weights found on disk before building.
constexpr double kMaxModelParameters = 2e9;

// An integer of type T read exactly: a JSON integer (not 1e9 or 320.0, which JSON stores as floating point)
// within T's range. FormatError naming the field otherwise (nlohmann's get<int> would truncate 2^33 to 0).
template <typename T>
T exact_int(const nlohmann::json& v, const std::string& what, const std::string& key) {
  static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>);
  bool ok = v.is_number_integer();
  if (ok && v.is_number_unsigned())
    ok = v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
  else if (ok)
    ok = v.get<int64_t>() >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
         (std::is_unsigned_v<T> || v.get<int64_t>() <= static_cast<int64_t>(std::numeric_limits<T>::max()));
  if (!ok)
    throw FormatError(what + ": field '" + key + "' must be an integer in [" +
                      std::to_string(std::numeric_limits<T>::min()) + ", " +
                      std::to_string(std::numeric_limits<T>::max()) + "], got " + v.dump());
  return v.is_number_unsigned() ? static_cast<T>(v.get<uint64_t>()) : static_cast<T>(v.get<int64_t>());
}

// Assigns j[key] to out when present and not null; a wrong type is a FormatError naming the field. Integers
// (and lists of integers) are read with exact_int.
template <typename T>
void get(const nlohmann::json& j, const std::string& what, const char* key, T& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    out = exact_int<T>(*it, what, key);
  } else if constexpr (std::is_same_v<T, std::vector<int>>) {
    if (!it->is_array())
      throw FormatError(what + ": field '" + key + "' must be a list of integers, got " + it->dump());
    std::vector<int> v;
    for (size_t i = 0; i < it->size(); ++i)
      v.push_back(exact_int<int>((*it)[i], what, std::string(key) + "[" + std::to_string(i) + "]"));
    out = v;
  } else {
    try {
      out = it->template get<T>();
    } catch (const nlohmann::json::exception& e) {
      throw FormatError(what + ": field '" + key + "' has the wrong type (" + it->type_name() + "): " + e.what());
    }
  }
}

// An int or a list of ints (diffusers accepts both for per-block settings): returns the list, with a
// single int repeated n times. Returns false when absent or null.
inline bool get_int_or_list(const nlohmann::json& j, const std::string& what, const char* key, size_t n,
                            std::vector<int>& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return false;
  if (it->is_number()) {
    out.assign(n, exact_int<int>(*it, what, key));
    return true;
  }
  if (it->is_array()) {
    std::vector<int> v;
    for (size_t i = 0; i < it->size(); ++i)
      v.push_back(exact_int<int>((*it)[i], what, std::string(key) + "[" + std::to_string(i) + "]"));
    out = v;
    return true;
  }
  throw FormatError(what + ": field '" + key + "' must be an int or a list of ints, got " + it->dump());
}

// validate() helpers: InvalidArgument "field must be in [lo, hi], got v" (from_json turns it into a
// FormatError naming the config).
inline void check_range(const std::string& field, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi)
    throw InvalidArgument(field + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                          std::to_string(v) + " (limits: docs/limits.md)");
}
// "1.23 billion" / "45.6 million" / "7890".
inline std::string format_count(double n) {
  char buf[48];
  if (n >= 1e9)
    std::snprintf(buf, sizeof(buf), "%.3g billion", n / 1e9);
  else if (n >= 1e6)
    std::snprintf(buf, sizeof(buf), "%.3g million", n / 1e6);
  else
    std::snprintf(buf, sizeof(buf), "%.0f", n);
  return buf;
}
// The parameter count a config describes against kMaxModelParameters (InvalidArgument stating both and the
// memory it would take).
inline void check_parameter_count(const std::string& what, double params) {
  if (params <= kMaxModelParameters) return;
  char gb[32];
  std::snprintf(gb, sizeof(gb), "%.1f GB", params * 4 / 1e9);
  throw InvalidArgument(what + " describes " + format_count(params) + " parameters (" + gb +
                        " in float32), more than the limit of " + format_count(kMaxModelParameters) +
                        " parameters per model (docs/limits.md)");
}

// A field that must be absent, null or equal to `expected` (features dmx does not implement).
inline void require_default(const nlohmann::json& j, const std::string& what, const char* key,
                            const nlohmann::json& expected) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null() || *it == expected) return;
  throw Unsupported(what + ": " + key + " = " + it->dump() + " is not supported (only " +
                    (expected.is_null() ? std::string("null") : expected.dump()) + ")");
}
}  // namespace dmx::models::cfgjson
