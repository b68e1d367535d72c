// UTF-8 well-formedness per RFC 3629, section 4 (the table of valid byte sequences).
#include "core/utf8.h"

#include <cstdint>
#include <cstdio>

#include "core/text.h"
#include "dmx/error.h"

namespace dmx {

namespace {
// The well-formed sequence at s[i]: its length and code point; or 0 and, in *bad_len, the length of the maximal
// ill-formed subpart there (the lead byte and the continuation bytes that could still have completed it).
size_t sequence_at(const unsigned char* p, size_t n, size_t i, char32_t* cp, size_t* bad_len) {
  const unsigned char c = p[i];
  if (c < 0x80) {
    *cp = c;
    return 1;
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
    *bad_len = 1;
    return 0;
  }
  char32_t v = c & (len == 2 ? 0x1F : len == 3 ? 0x0F : 0x07);
  for (size_t k = 1; k < len; ++k) {
    const unsigned char b = i + k < n ? p[i + k] : 0;
    const bool ok = i + k < n && (k == 1 ? b >= lo && b <= hi : b >= 0x80 && b <= 0xBF);
    if (!ok) {
      *bad_len = k;
      return 0;
    }
    v = (v << 6) | (b & 0x3F);
  }
  *cp = v;
  return len;
}
}  // namespace

size_t find_invalid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  char32_t cp;
  size_t bad;
  for (size_t i = 0; i < s.size();) {
    const size_t len = sequence_at(p, s.size(), i, &cp, &bad);
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
  char32_t cp;
  size_t bad;
  size_t i = 0;
  while (i < n) {
    const size_t len = sequence_at(p, n, i, &cp, &bad);
    if (len == 0) {  // not UTF-8: the byte, escaped
      std::snprintf(buf, sizeof(buf), "\\x%02X", p[i]);
      out += buf;
      ++i;
      continue;
    }
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

bool decode_utf8(const std::string& in, std::u32string* out, size_t* bad_offset) {
  out->clear();
  out->reserve(in.size());
  const auto* p = reinterpret_cast<const unsigned char*>(in.data());
  char32_t cp;
  size_t bad;
  for (size_t i = 0; i < in.size();) {
    const size_t len = sequence_at(p, in.size(), i, &cp, &bad);
    if (len == 0) {
      *bad_offset = i;
      return false;
    }
    out->push_back(cp);
    i += len;
  }
  return true;
}

std::u32string decode_utf8_replace(const std::string& in) {
  std::u32string out;
  out.reserve(in.size());
  const auto* p = reinterpret_cast<const unsigned char*>(in.data());
  char32_t cp;
  size_t bad;
  for (size_t i = 0; i < in.size();) {
    const size_t len = sequence_at(p, in.size(), i, &cp, &bad);
    out.push_back(len ? cp : U'\uFFFD');
    i += len ? len : bad;
  }
  return out;
}

void append_utf8(std::string* out, char32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string encode_utf8(const std::u32string& in) {
  std::string out;
  out.reserve(in.size());
  for (char32_t cp : in) append_utf8(&out, cp);
  return out;
}

size_t utf8_length(const std::string& s) {
  size_t n = 0;
  for (const char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80 ? 1 : 0;
  return n;
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
