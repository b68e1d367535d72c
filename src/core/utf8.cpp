// UTF-8 well-formedness per RFC 3629, section 4 (the table of valid byte sequences).
#include "core/utf8.h"

#include <cstdint>
#include <cstdio>

#include "core/text.h"
#include "dmx/error.h"

namespace dmx {

namespace {
// Length of the well-formed sequence at p[i] (1 for ASCII), or 0 when it is not well formed.
size_t sequence_length(const unsigned char* p, size_t n, size_t i) {
  const unsigned char c = p[i];
  if (c < 0x80) return 1;
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
    return 0;
  }
  if (i + len > n) return 0;
  if (p[i + 1] < lo || p[i + 1] > hi) return 0;
  for (size_t k = 2; k < len; ++k)
    if (p[i + k] < 0x80 || p[i + k] > 0xBF) return 0;
  return len;
}
}  // namespace

size_t find_invalid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const size_t len = sequence_length(p, n, i);
    if (len == 0) return i;
    i += len;
  }
  return std::string::npos;
}

std::string terminal_safe(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  std::string out;
  out.reserve(n);
  char buf[16];
  size_t i = 0;
  while (i < n) {
    const size_t len = sequence_length(p, n, i);
    if (len == 0) {  // not UTF-8: the byte, escaped
      std::snprintf(buf, sizeof(buf), "\\x%02X", p[i]);
      out += buf;
      ++i;
      continue;
    }
    uint32_t cp = p[i];
    if (len == 2) cp = ((p[i] & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu);
    if (len == 3) cp = ((p[i] & 0x0Fu) << 12) | ((p[i + 1] & 0x3Fu) << 6) | (p[i + 2] & 0x3Fu);
    if (len == 4) cp = ((p[i] & 0x07u) << 18) | ((p[i + 1] & 0x3Fu) << 12) | ((p[i + 2] & 0x3Fu) << 6) | (p[i + 3] & 0x3Fu);
    // C0 controls but tab and newline (ESC starts terminal sequences, CR rewrites the line), DEL, C1
    // controls (U+009B is CSI) and the bidirectional overrides/isolates (text that reads differently).
    const bool control = (cp < 0x20 && cp != '\n' && cp != '\t') || (cp >= 0x7F && cp <= 0x9F) ||
                         (cp >= 0x202A && cp <= 0x202E) || (cp >= 0x2066 && cp <= 0x2069);
    if (control) {
      std::snprintf(buf, sizeof(buf), cp < 0x100 ? "\\x%02X" : "\\u%04X", static_cast<unsigned>(cp));
      out += buf;
    } else {
      out.append(s, i, len);
    }
    i += len;
  }
  return out;
}

void check_text(const std::string& s, const std::string& param) {
  DMX_CHECK_ARG(s.size() <= kMaxPromptBytes, param, " is ", s.size(), " bytes, more than the ", kMaxPromptBytes / 1024,
                " KiB limit for prompts and captions (the text encoder reads only the first 77 tokens)");
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
