// UTF-8, the one codec of the project: RFC 3629 well-formedness (no overlong forms, no surrogates, nothing
// above U+10FFFF), strict and lossy (Python's errors="replace") decoding, encoding, and the validation of user
// text (prompts: well-formed, no NUL bytes).
#pragma once
#include <cstddef>
#include <string>

namespace dmx {
// Returns the byte offset of the first invalid sequence, or std::string::npos if s is valid.
size_t find_invalid_utf8(const std::string& s);
// Strict decoding: false, with *bad_offset at the first invalid sequence (find_invalid_utf8's offset), unless
// every sequence is well-formed.
bool decode_utf8(const std::string& in, std::u32string* out, size_t* bad_offset);
// Python's bytes.decode("utf-8", errors="replace"): each maximal ill-formed subpart (Unicode's "U+FFFD
// substitution of maximal subparts", what CPython does) becomes one U+FFFD.
std::u32string decode_utf8_replace(const std::string& in);
void append_utf8(std::string* out, char32_t cp);
std::string encode_utf8(const std::u32string& in);
// Code points of well-formed UTF-8 (Python's len() of the str).
size_t utf8_length(const std::string& s);
// InvalidArgument naming `param`, the rule, the offset and the offending byte, e.g.
// "--prompt must be valid UTF-8 text; invalid byte 0xff at offset 3". Longer than kMaxPromptBytes
// (core/text.h): InvalidArgument stating the limit.
void check_text(const std::string& s, const std::string& param);
}  // namespace dmx
