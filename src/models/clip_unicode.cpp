// Python-compatible Unicode helpers for the CLIP tokenizer (see clip_unicode.h).
#include "models/clip_unicode.h"

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace dmx::models::unicode {
namespace {

struct PropRun {
  uint32_t first;
  uint8_t props;  // bits 0-2 UClass, bit 3 cased (not case-ignorable), bit 4 case-ignorable
};
struct LowerRun {
  uint32_t first;
  int32_t count;
  int32_t delta;
  int32_t stride;
};
struct CccRun {
  uint32_t first;
  uint8_t ccc;
};
struct Decomp {
  uint32_t cp, first, second;  // second == 0: singleton decomposition
  uint8_t composes;            // 1: primary composite (NFC recomposes first+second into cp)
};

#include "models/clip_unicode_tables.inc"

template <typename Run, size_t N>
const Run& find_run(const Run (&runs)[N], char32_t cp) {
  // Last run whose first code point is <= cp (runs[0].first == 0).
  auto it = std::upper_bound(std::begin(runs), std::end(runs), static_cast<uint32_t>(cp),
                             [](uint32_t v, const Run& r) { return v < r.first; });
  return *(it - 1);
}

uint8_t props(char32_t cp) {
  if (cp > 0x10FFFF) return static_cast<uint8_t>(UClass::C);
  return find_run(kPropRuns, cp).props;
}

char32_t simple_lower(char32_t cp) {
  if (cp < 0x80) return (cp >= 'A' && cp <= 'Z') ? cp + 32 : cp;
  auto it = std::upper_bound(std::begin(kLowerRuns), std::end(kLowerRuns), static_cast<uint32_t>(cp),
                             [](uint32_t v, const LowerRun& r) { return v < r.first; });
  if (it == std::begin(kLowerRuns)) return cp;
  const LowerRun& r = *(it - 1);
  const uint32_t off = static_cast<uint32_t>(cp) - r.first;
  if (off % static_cast<uint32_t>(r.stride) != 0) return cp;
  if (off / static_cast<uint32_t>(r.stride) >= static_cast<uint32_t>(r.count)) return cp;
  return static_cast<char32_t>(static_cast<int64_t>(cp) + r.delta);
}

// Hangul syllable constants (Unicode chapter 3.12).
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr int kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

const Decomp* find_decomp(char32_t cp) {
  auto it = std::lower_bound(std::begin(kDecomps), std::end(kDecomps), static_cast<uint32_t>(cp),
                             [](const Decomp& d, uint32_t v) { return d.cp < v; });
  if (it == std::end(kDecomps) || it->cp != cp) return nullptr;
  return &*it;
}

void decompose(char32_t cp, std::u32string* out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const int s = static_cast<int>(cp - kSBase);
    out->push_back(kLBase + s / kNCount);
    out->push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out->push_back(kTBase + s % kTCount);
    return;
  }
  const Decomp* d = find_decomp(cp);
  if (!d) {
    out->push_back(cp);
    return;
  }
  decompose(d->first, out);
  if (d->second) decompose(d->second, out);
}

const std::unordered_map<uint64_t, char32_t>& composition_map() {
  static const std::unordered_map<uint64_t, char32_t> map = [] {
    std::unordered_map<uint64_t, char32_t> m;
    for (const Decomp& d : kDecomps)
      if (d.composes) m[(static_cast<uint64_t>(d.first) << 32) | d.second] = d.cp;
    return m;
  }();
  return map;
}

// Primary composite of (a, b), or 0.
char32_t compose(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto& m = composition_map();
  auto it = m.find((static_cast<uint64_t>(a) << 32) | b);
  return it == m.end() ? 0 : it->second;
}
}  // namespace

UClass uclass(char32_t cp) { return static_cast<UClass>(props(cp) & 7); }
bool is_cased(char32_t cp) { return (props(cp) & 8) != 0; }
bool is_case_ignorable(char32_t cp) { return (props(cp) & 16) != 0; }
const char* unicode_version() { return kUnicodeVersion; }

int combining_class(char32_t cp) {
  if (cp < 0x300 || cp > 0x10FFFF) return 0;
  return find_run(kCccRuns, cp).ccc;
}

bool py_isspace(char32_t cp) {
  // Characters with bidirectional type WS, B or S, or category Zs (CPython's _PyUnicode_IsWhitespace).
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

bool re_space(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

std::u32string py_lower(const std::u32string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    const char32_t c = s[i];
    if (c == 0x130) {  // the one multi-character lowercase mapping (SpecialCasing.txt)
      out.push_back(0x69);
      out.push_back(0x307);
    } else if (c == 0x3A3) {
      // Final_Sigma: \p{cased}\p{case-ignorable}* SIGMA !(\p{case-ignorable}* \p{cased}), as CPython does.
      size_t j = i;
      bool final_sigma = false;
      while (j > 0 && is_case_ignorable(s[j - 1])) --j;
      if (j > 0 && is_cased(s[j - 1])) {
        size_t k = i + 1;
        while (k < s.size() && is_case_ignorable(s[k])) ++k;
        final_sigma = k == s.size() || !is_cased(s[k]);
      }
      out.push_back(final_sigma ? 0x3C2 : 0x3C3);
    } else {
      out.push_back(simple_lower(c));
    }
  }
  return out;
}

std::u32string nfc(const std::u32string& s) {
  // Strings below U+0300 are already in NFC: nothing there decomposes into, or composes with, a mark.
  if (std::all_of(s.begin(), s.end(), [](char32_t c) { return c < 0x300; })) return s;

  // 1. Full canonical decomposition.
  std::u32string d;
  d.reserve(s.size() + 8);
  for (char32_t c : s) decompose(c, &d);
  // 2. Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < d.size();) {
    if (combining_class(d[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && combining_class(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + static_cast<std::ptrdiff_t>(i), d.begin() + static_cast<std::ptrdiff_t>(j),
                     [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  // 3. Canonical composition (UAX #15).
  if (d.empty()) return d;
  size_t starter_pos = 0;
  int last_class = combining_class(d[0]);
  if (last_class != 0) last_class = 256;  // a leading non-starter cannot be composed into
  size_t out_pos = 1;
  for (size_t i = 1; i < d.size(); ++i) {
    const char32_t ch = d[i];
    const int ch_class = combining_class(ch);
    const char32_t composite = compose(d[starter_pos], ch);
    if (composite != 0 && (last_class < ch_class || last_class == 0)) {
      d[starter_pos] = composite;
      continue;
    }
    if (ch_class == 0) starter_pos = out_pos;
    last_class = ch_class;
    d[out_pos++] = ch;
  }
  d.resize(out_pos);
  return d;
}
}  // namespace dmx::models::unicode
