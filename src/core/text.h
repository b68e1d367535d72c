// Small string helpers shared by the layers (no torch).
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
}  // namespace dmx
