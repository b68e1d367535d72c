// UTF-8 well-formedness per RFC 3629, section 4 (the table of valid byte sequences).
#include "core/utf8.h"

#include <cstdio>

#include "dmx/error.h"

namespace dmx {

size_t find_invalid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // > U+10FFFF
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    i += len;
  }
  return std::string::npos;
}

void check_text(const std::string& s, const std::string& param) {
  const size_t nul = s.find('\0');
  DMX_CHECK_ARG(nul == std::string::npos, param, " must not contain NUL bytes; found one at offset ", nul);
  const size_t bad = find_invalid_utf8(s);
  if (bad != std::string::npos) {
    char byte[8];
    std::snprintf(byte, sizeof(byte), "0x%02x", static_cast<unsigned char>(s[bad]));
    throw InvalidArgument(detail::concat(param, " must be valid UTF-8 text; invalid byte ", byte, " at offset ", bad));
  }
}
}  // namespace dmx
