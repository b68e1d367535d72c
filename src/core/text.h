// Small string helpers shared by the layers (no torch): the one copy of each.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace dmx {
// Prompts and captions: at most 256 KiB of text (docs/limits.md). The CLIP tokenizer refuses longer texts and
// stops reading a text once the tokens the text encoder keeps (77) are produced.
constexpr size_t kMaxPromptBytes = 256 << 10;

// Python's s.split(sep) with an explicit separator: every separator splits, so consecutive ones give empty
// fields ("a..b" -> {"a", "", "b"}), and "" -> {""}.
std::vector<std::string> split(const std::string& s, char sep);
// sep.join(items).
std::string join(const std::vector<std::string>& items, const std::string& sep);
// The first `max` items joined with ", ", then ", ... (N in all)" when there are more: lists in messages.
std::string join_abbreviated(const std::vector<std::string>& items, size_t max = 8);
bool starts_with(const std::string& s, const std::string& prefix);
bool ends_with(const std::string& s, const std::string& suffix);
// ASCII lower case (A-Z only, whatever the locale): file extensions, names, keys.
std::string to_lower_ascii(std::string s);
// Without leading and trailing ASCII white space (space, \t, \n, \v, \f, \r).
std::string trim(const std::string& s);
}  // namespace dmx
