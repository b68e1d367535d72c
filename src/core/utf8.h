// UTF-8 validation for user text (prompts): RFC 3629 well-formedness (no overlong forms, no
// surrogates, nothing above U+10FFFF) and no NUL bytes.
#pragma once
#include <cstddef>
#include <string>

namespace dmx {
// Returns the byte offset of the first invalid sequence, or std::string::npos if s is valid.
size_t find_invalid_utf8(const std::string& s);
// InvalidArgument naming `param`, the rule, the offset and the offending byte, e.g.
// "--prompt must be valid UTF-8 text; invalid byte 0xff at offset 3". Longer than kMaxPromptBytes
// (core/text.h): InvalidArgument stating the limit.
void check_text(const std::string& s, const std::string& param);
}  // namespace dmx
