// Small string helpers shared by the layers (no torch).
#pragma once
#include <string>
#include <vector>

namespace dmx {
// Python's s.split(sep) with an explicit separator: every separator splits, so consecutive ones give empty
// fields ("a..b" -> {"a", "", "b"}), and "" -> {""}.
std::vector<std::string> split(const std::string& s, char sep);
}  // namespace dmx
