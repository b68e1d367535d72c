// Reading diffusers config.json fields with typed, named errors (internal to models/).
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dmx/error.h"

namespace dmx::models::cfgjson {

// Assigns j[key] to out when present and not null; a wrong type is a FormatError naming the field.
template <typename T>
void get(const nlohmann::json& j, const std::string& what, const char* key, T& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  try {
    out = it->template get<T>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(what + ": field '" + key + "' has the wrong type (" + it->type_name() + "): " + e.what());
  }
}

// An int or a list of ints (diffusers accepts both for per-block settings): returns the list, with a
// single int repeated n times. Returns false when absent or null.
inline bool get_int_or_list(const nlohmann::json& j, const std::string& what, const char* key, size_t n,
                            std::vector<int>& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return false;
  if (it->is_number_integer()) {
    out.assign(n, it->get<int>());
    return true;
  }
  if (it->is_array()) {
    std::vector<int> v;
    for (const auto& e : *it) {
      if (!e.is_number_integer())
        throw FormatError(what + ": field '" + key + "' must be an int or a list of ints, got " + it->dump());
      v.push_back(e.get<int>());
    }
    out = v;
    return true;
  }
  throw FormatError(what + ": field '" + key + "' must be an int or a list of ints, got " + it->dump());
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
