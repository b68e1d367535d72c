// CLIP byte-level BPE tokenizer. Mirrors transformers 4.37 CLIPTokenizer (tokenization_clip.py) and the
// parts of PreTrainedTokenizer.tokenize / BasicTokenizer it runs through when ftfy is not installed.
#include "models/clip_tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>

#include "core/fs.h"
#include "core/text.h"
#include "core/utf8.h"
#include "dmx/error.h"
#include "models/clip_unicode.h"

namespace dmx::models {
namespace u = unicode;

struct CLIPTokenizer::Cache {
  std::mutex mutex;
  std::unordered_map<std::string, std::vector<std::string>> words;
};

namespace {

// transformers reads merges.txt lines [1, 49152 - 256 - 2 + 1): the first line (the "#version" header)
// is skipped whatever it holds, and at most 48894 merges are used.
constexpr size_t kMaxMerges = 49152 - 256 - 2;
// Bound on the BPE word cache, so a long-running server does not grow without limit.
constexpr size_t kMaxCacheEntries = 1 << 16;

}  // namespace

// bytes_to_unicode(): printable bytes map to themselves, the others to U+0100 + n, as UTF-8 strings.
const std::vector<std::string>& clip_byte_symbols() {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      append_utf8(&t[static_cast<size_t>(b)], printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++));
    }
    return t;
  }();
  return table;
}

namespace {
const std::vector<std::string>& byte_symbols() { return clip_byte_symbols(); }

std::string printable_prompt(const std::string& text) {
  std::string out;
  for (size_t i = 0; i < text.size() && i < 80; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7F) {
      out.push_back(static_cast<char>(c));
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02X", c);
      out += buf;
    }
  }
  if (text.size() > 80) out += "...";
  return out;
}

std::u32string decode_prompt(const std::string& text) {
  std::u32string out;
  size_t bad = 0;
  if (!decode_utf8(text, &out, &bad)) {
    char buf[8];
    std::snprintf(buf, sizeof(buf), "0x%02X", static_cast<unsigned char>(text[bad]));
    throw InvalidArgument(detail::concat("prompt must be valid UTF-8, got byte ", buf, " at offset ", bad, " in \"",
                                         printable_prompt(text), "\""));
  }
  return out;
}

bool is_control(char32_t c) {  // transformers' _is_control
  if (c == '\t' || c == '\n' || c == '\r') return false;
  return u::uclass(c) == u::UClass::C;
}
bool is_whitespace(char32_t c) {  // transformers' _is_whitespace
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || u::uclass(c) == u::UClass::Zs;
}
bool is_chinese_char(char32_t c) {  // BasicTokenizer._is_chinese_char
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

// BasicTokenizer(do_lower_case=True, strip_accents=False, do_split_on_punc=False).tokenize joined by " ".
std::u32string basic_clean(const std::u32string& text) {
  std::u32string cleaned;
  cleaned.reserve(text.size());
  for (char32_t c : text) {
    if (c == 0 || c == 0xFFFD || is_control(c)) continue;
    if (is_whitespace(c)) {
      cleaned.push_back(' ');
    } else if (is_chinese_char(c)) {
      cleaned.push_back(' ');
      cleaned.push_back(c);
      cleaned.push_back(' ');
    } else {
      cleaned.push_back(c);
    }
  }
  const std::u32string normalized = u::nfc(cleaned);
  std::u32string out;
  out.reserve(normalized.size());
  size_t i = 0;
  while (i < normalized.size()) {
    while (i < normalized.size() && u::py_isspace(normalized[i])) ++i;
    size_t j = i;
    while (j < normalized.size() && !u::py_isspace(normalized[j])) ++j;
    if (j > i) {
      if (!out.empty()) out.push_back(' ');
      out += u::py_lower(normalized.substr(i, j - i));
    }
    i = j;
  }
  return out;
}

// Case-insensitive literal match, as the `regex` module's IGNORECASE (simple case folding) sees ASCII.
bool ci_equal(char32_t c, char lit) {
  if (c == static_cast<char32_t>(lit)) return true;
  if (lit >= 'a' && lit <= 'z' && c == static_cast<char32_t>(lit - 32)) return true;
  return (lit == 's' && c == 0x17F) || (lit == 'k' && c == 0x212A);
}

size_t match_literal(const std::u32string& s, size_t pos, const char* lit) {
  size_t k = 0;
  for (; lit[k]; ++k)
    if (pos + k >= s.size() || !ci_equal(s[pos + k], lit[k])) return 0;
  return k;
}

// Characters that match none of the split pattern's classes. Under IGNORECASE the `regex` module puts a
// character in a class when any of its case variants is in it, so U+0345 COMBINING GREEK YPOGEGRAMMENI
// (a mark whose case variant is the letter iota) is excluded from [^\s\p{L}\p{N}] yet not in [\p{L}]:
// like whitespace it is never part of a match. (Checked over all code points against the regex module.)
bool split_skips(char32_t c) { return c == 0x345 || u::re_space(c); }

// re.findall(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
// text, re.IGNORECASE): the first alternative that matches at a position wins.
// Calls emit(piece) for each match in order; stops early when emit returns false.
template <typename Emit>
void clip_split(const std::u32string& s, Emit&& emit) {
  static const char* const kLiterals[] = {
      "<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
  size_t pos = 0;
  while (pos < s.size()) {
    size_t len = 0;
    for (const char* lit : kLiterals)
      if ((len = match_literal(s, pos, lit)) != 0) break;
    if (len == 0) {
      const char32_t c = s[pos];
      if (u::is_letter(c)) {
        len = 1;
        while (pos + len < s.size() && u::is_letter(s[pos + len])) ++len;
      } else if (u::is_number(c)) {
        len = 1;
      } else if (!split_skips(c)) {
        len = 1;
        while (pos + len < s.size()) {
          const char32_t d = s[pos + len];
          if (split_skips(d) || u::is_letter(d) || u::is_number(d)) break;
          ++len;
        }
      }
    }
    if (len == 0) {
      ++pos;  // whitespace (or U+0345): not part of any match
      continue;
    }
    if (!emit(s.substr(pos, len))) return;
    pos += len;
  }
}

std::u32string py_strip(const std::u32string& s, bool left, bool right) {
  size_t b = 0, e = s.size();
  if (left)
    while (b < e && u::py_isspace(s[b])) ++b;
  if (right)
    while (e > b && u::py_isspace(s[e - 1])) --e;
  return s.substr(b, e - b);
}

std::string strip_utf8(const std::string& s, bool left, bool right) {
  std::u32string w;
  size_t bad = 0;
  if (!decode_utf8(s, &w, &bad)) return s;
  return encode_utf8(py_strip(w, left, right));
}

// ---- files ----

nlohmann::json parse_json_file(const std::string& path, const std::string& what) {
  const std::string text = read_text_file(path, what, kMaxJsonFileBytes);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(detail::concat(what, ": malformed JSON in ", path, ": ", e.what()));
  }
}

// A special token in tokenizer_config.json / special_tokens_map.json: a string or an AddedToken dict.
bool parse_added_token(const nlohmann::json& v, CLIPAddedToken* tok, const std::string& where) {
  if (v.is_null()) return false;
  if (v.is_string()) {
    tok->content = v.get<std::string>();
    return true;
  }
  DMX_CHECK_FORMAT(v.is_object() && v.contains("content") && v["content"].is_string(), where,
                   " must be a string or an object with a string \"content\", got ", v.dump());
  tok->content = v["content"].get<std::string>();
  auto flag = [&](const char* key) {
    if (!v.contains(key) || v[key].is_null()) return false;
    DMX_CHECK_FORMAT(v[key].is_boolean(), where, ".", key, " must be a boolean, got ", v[key].dump());
    return v[key].get<bool>();
  };
  tok->lstrip = flag("lstrip");
  tok->rstrip = flag("rstrip");
  tok->single_word = flag("single_word");
  return true;
}
}  // namespace

CLIPTokenizer CLIPTokenizer::from_folder(const std::string& dir) {
  const std::string vocab_path = join_path(dir, "vocab.json");
  const std::string merges_path = join_path(dir, "merges.txt");

  const nlohmann::json vj = parse_json_file(vocab_path, "CLIP tokenizer vocabulary");
  DMX_CHECK_FORMAT(vj.is_object(), "CLIP tokenizer vocabulary ", vocab_path, " must be a JSON object {token: id}");
  std::unordered_map<std::string, int64_t> vocab;
  vocab.reserve(vj.size());
  for (auto it = vj.begin(); it != vj.end(); ++it) {
    DMX_CHECK_FORMAT(it.value().is_number_integer(), "CLIP tokenizer vocabulary ", vocab_path, ": id of token \"",
                     it.key(), "\" must be an integer, got ", it.value().dump());
    vocab[it.key()] = it.value().get<int64_t>();
  }

  // merges.txt as Python reads it: universal newlines, strip(), split("\n"), lines [1, 1 + kMaxMerges).
  const std::string raw = read_text_file(merges_path, "CLIP tokenizer merges", kMaxJsonFileBytes);
  std::u32string text;
  size_t bad = 0;
  DMX_CHECK_FORMAT(decode_utf8(raw, &text, &bad), "CLIP tokenizer merges ", merges_path,
                   " is not valid UTF-8 (byte offset ", bad, ")");
  text = py_strip(text, true, true);
  std::vector<std::pair<std::string, std::string>> merges;
  size_t line_no = 0, pos = 0;
  while (pos <= text.size() && merges.size() < kMaxMerges) {
    size_t end = pos;
    while (end < text.size() && text[end] != '\n' && text[end] != '\r') ++end;
    if (line_no++ > 0) {
      std::vector<std::u32string> parts;
      size_t i = pos;
      while (i < end) {
        while (i < end && u::py_isspace(text[i])) ++i;
        size_t j = i;
        while (j < end && !u::py_isspace(text[j])) ++j;
        if (j > i) parts.push_back(text.substr(i, j - i));
        i = j;
      }
      // A line that is not exactly two symbols still takes a rank in transformers but can never match.
      if (parts.size() == 2)
        merges.emplace_back(encode_utf8(parts[0]), encode_utf8(parts[1]));
      else
        merges.emplace_back(std::string(), std::string());
    }
    if (end >= text.size()) break;
    pos = end + ((text[end] == '\r' && end + 1 < text.size() && text[end + 1] == '\n') ? 2 : 1);
  }
  DMX_CHECK_FORMAT(line_no > 0 && !text.empty(), "CLIP tokenizer merges ", merges_path, " is empty");

  // Special tokens and added tokens, resolved as PreTrainedTokenizerBase._from_pretrained does: with an
  // added_tokens_decoder the config's special tokens refer to its entries; without one (legacy files)
  // special_tokens_map.json overrides the config.
  CLIPTokenizerOptions opt;
  const std::string config_path = join_path(dir, "tokenizer_config.json");
  const std::string map_path = join_path(dir, "special_tokens_map.json");
  nlohmann::json cfg = nlohmann::json::object();
  if (path_exists(config_path)) cfg = parse_json_file(config_path, "CLIP tokenizer config");
  DMX_CHECK_FORMAT(cfg.is_object(), "CLIP tokenizer config ", config_path, " must be a JSON object");
  const bool has_decoder = cfg.contains("added_tokens_decoder") && !cfg["added_tokens_decoder"].is_null();
  if (!has_decoder && path_exists(map_path)) {
    const nlohmann::json m = parse_json_file(map_path, "CLIP special tokens map");
    DMX_CHECK_FORMAT(m.is_object(), "CLIP special tokens map ", map_path, " must be a JSON object");
    for (auto it = m.begin(); it != m.end(); ++it) cfg[it.key()] = it.value();
  }
  if (has_decoder) {
    const nlohmann::json& dec = cfg["added_tokens_decoder"];
    DMX_CHECK_FORMAT(dec.is_object(), config_path, ": added_tokens_decoder must be an object {id: token}");
    for (auto it = dec.begin(); it != dec.end(); ++it) {
      CLIPAddedToken tok;
      const std::string where = config_path + ": added_tokens_decoder[" + it.key() + "]";
      parse_added_token(it.value(), &tok, where);
      try {
        size_t used = 0;
        tok.id = std::stoll(it.key(), &used);
        DMX_CHECK_FORMAT(used == it.key().size() && tok.id >= 0, where, ": key must be a token id");
      } catch (const std::logic_error&) {
        throw FormatError(where + ": key must be a token id");
      }
      opt.added_tokens.push_back(tok);
    }
  }
  auto special = [&](const char* key, CLIPAddedToken* tok) {
    if (!cfg.contains(key)) return;
    CLIPAddedToken t;
    if (!parse_added_token(cfg[key], &t, config_path + ": " + key)) return;
    for (const auto& a : opt.added_tokens)
      if (a.content == t.content) t = a;  // flags (and id) from added_tokens_decoder
    *tok = t;
  };
  special("bos_token", &opt.bos_token);
  special("eos_token", &opt.eos_token);
  special("pad_token", &opt.pad_token);
  special("unk_token", &opt.unk_token);
  if (cfg.contains("model_max_length") && !cfg["model_max_length"].is_null()) {
    const auto& v = cfg["model_max_length"];
    DMX_CHECK_FORMAT(v.is_number() && v.get<double>() >= 2, config_path,
                     ": model_max_length must be a number >= 2, got ", v.dump());
    const double d = v.get<double>();
    opt.model_max_length = d >= std::numeric_limits<int>::max() ? std::numeric_limits<int>::max() : static_cast<int>(d);
  }
  try {
    return CLIPTokenizer(std::move(vocab), std::move(merges), std::move(opt));
  } catch (const FormatError& e) {
    throw FormatError(detail::concat("CLIP tokenizer in ", dir, ": ", e.what()));
  }
}

CLIPTokenizer::CLIPTokenizer(std::unordered_map<std::string, int64_t> vocab,
                             std::vector<std::pair<std::string, std::string>> merges, CLIPTokenizerOptions options)
    : vocab_(std::move(vocab)), model_max_length_(options.model_max_length), cache_(std::make_shared<Cache>()) {
  DMX_CHECK_FORMAT(!vocab_.empty(), "CLIP tokenizer vocabulary is empty");
  for (const auto& [token, id] : vocab_) tokens_by_id_.emplace(id, token);
  DMX_CHECK_ARG(options.model_max_length >= 2, "model_max_length must be >= 2 (BOS + EOS), got ",
                options.model_max_length);
  ranks_.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    if (merges[i].first.empty() || merges[i].second.empty()) continue;
    ranks_[merges[i].first + " " + merges[i].second] = static_cast<int>(i);  // a later duplicate wins, as in dict()
  }
  for (auto& a : options.added_tokens) {
    DMX_CHECK_FORMAT(!a.content.empty() && a.id >= 0, "added token \"", a.content, "\" needs content and an id >= 0");
    no_split_.push_back(a);
  }
  // Special tokens are added tokens too (PreTrainedTokenizer.__init__), with their vocabulary ids.
  auto resolve = [&](CLIPAddedToken tok, const char* name, bool required) -> int64_t {
    for (const auto& a : no_split_)
      if (a.content == tok.content) return a.id;
    if (tok.id < 0) {
      auto it = vocab_.find(tok.content);
      if (it == vocab_.end()) {
        DMX_CHECK_FORMAT(!required, name, " \"", tok.content, "\" is not in the vocabulary");
        return -1;
      }
      tok.id = it->second;
    }
    if (!tok.content.empty()) no_split_.push_back(tok);
    return tok.id;
  };
  bos_id_ = resolve(options.bos_token, "bos_token", true);
  eos_id_ = resolve(options.eos_token, "eos_token", true);
  unk_id_ = resolve(options.unk_token, "unk_token", false);
  pad_id_ = resolve(options.pad_token, "pad_token", true);
}

std::string CLIPTokenizer::id_to_token(int64_t id) const {
  for (const auto& a : no_split_)
    if (a.id == id) return a.content;
  auto it = tokens_by_id_.find(id);
  DMX_CHECK_ARG(it != tokens_by_id_.end(), "token id ", id, " is not in the CLIP tokenizer's vocabulary (",
                vocab_.size(), " tokens)");
  return it->second;
}

std::string CLIPTokenizer::convert_tokens_to_string(const std::vector<std::string>& tokens) const {
  static const std::unordered_map<char32_t, unsigned char> byte_of = [] {
    std::unordered_map<char32_t, unsigned char> m;
    const auto& sym = clip_byte_symbols();
    for (size_t b = 0; b < sym.size(); ++b) m[decode_utf8_replace(sym[b]).at(0)] = static_cast<unsigned char>(b);
    return m;
  }();
  std::string bytes;
  for (const std::string& t : tokens)
    for (char32_t c : decode_utf8_replace(t)) {
      auto it = byte_of.find(c);
      if (it != byte_of.end()) bytes += static_cast<char>(it->second);  // a symbol outside the table: dropped
    }
  for (size_t pos; (pos = bytes.find("</w>")) != std::string::npos;) bytes.replace(pos, 4, " ");
  return encode_utf8(py_strip(decode_utf8_replace(bytes), true, true));
}

std::string CLIPTokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  for (int64_t id : ids) {
    if (skip_special_tokens && (id == bos_id_ || id == eos_id_ || id == pad_id_ || id == unk_id_)) continue;
    tokens.push_back(id_to_token(id));
  }
  return convert_tokens_to_string(tokens);
}

int64_t CLIPTokenizer::token_to_id(const std::string& token) const {
  for (const auto& a : no_split_)
    if (a.content == token) return a.id;
  auto it = vocab_.find(token);
  return it == vocab_.end() ? -1 : it->second;
}

int64_t CLIPTokenizer::id_of(const std::string& token) const {
  const int64_t id = token_to_id(token);
  if (id >= 0) return id;
  DMX_CHECK_FORMAT(unk_id_ >= 0, "CLIP tokenizer: token \"", token,
                   "\" is not in the vocabulary and there is no unk_token");
  return unk_id_;
}

std::vector<std::string> CLIPTokenizer::bpe(const std::string& token) const {
  // transformers pre-seeds its cache with these two, so they never get the end-of-word marker.
  if (token == "<|startoftext|>" || token == "<|endoftext|>") return {token};
  {
    std::lock_guard<std::mutex> lock(cache_->mutex);
    auto it = cache_->words.find(token);
    if (it != cache_->words.end()) return it->second;
  }
  std::vector<std::string> word = bpe_merge(token, /*linear_scan=*/false);
  if (token.size() > 1024) return word;  // long words (a hostile prompt) are not worth a cache entry
  std::lock_guard<std::mutex> lock(cache_->mutex);
  if (cache_->words.size() >= kMaxCacheEntries) cache_->words.clear();
  cache_->words.emplace(token, word);
  return word;
}

std::vector<std::string> CLIPTokenizer::bpe_merge(const std::string& token, bool linear_scan) const {
  // One symbol per byte-level character; the last one carries "</w>".
  std::vector<std::string> word;
  for (size_t i = 0; i < token.size();) {
    size_t len = 1;
    const auto c = static_cast<unsigned char>(token[i]);
    if (c >= 0xF0)
      len = 4;
    else if (c >= 0xE0)
      len = 3;
    else if (c >= 0xC0)
      len = 2;
    word.push_back(token.substr(i, len));
    i += len;
  }
  if (word.empty()) return {};
  word.back() += "</w>";
  std::string key;
  auto rank_of = [&](const std::string& a, const std::string& b) {
    key.assign(a).append(" ").append(b);
    auto it = ranks_.find(key);
    return it == ranks_.end() ? std::numeric_limits<int>::max() : it->second;
  };
  if (linear_scan || word.size() <= 64) {
    // transformers' loop: the pair with the lowest merge rank; all its occurrences merge left to right.
    // O(n^2) in the word's length, so only for ordinary words.
    while (word.size() > 1) {
      int best = std::numeric_limits<int>::max();
      size_t best_i = 0;
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        const int r = rank_of(word[i], word[i + 1]);
        if (r < best) best = r, best_i = i;
      }
      if (best == std::numeric_limits<int>::max()) break;
      const std::string first = word[best_i], second = word[best_i + 1];
      std::vector<std::string> merged;
      merged.reserve(word.size());
      for (size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
          merged.push_back(first + second);
          i += 2;
        } else {
          merged.push_back(word[i]);
          ++i;
        }
      }
      word.swap(merged);
    }
    return word;
  }
  // The same merges in O(n log n) for long words: a linked list of symbols and a heap of (rank, position) of
  // adjacent pairs. Each round takes every occurrence of the lowest-ranked pair (one pair has one rank) and
  // merges them left to right before any pair the round creates is considered, which is what the loop above
  // does (a merged symbol first+second can never form the same pair again within the round).
  const int n = static_cast<int>(word.size());
  std::vector<int> next(n), prev(n);
  std::vector<char> alive(n, 1);
  for (int i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
  }
  using Entry = std::pair<int, int>;  // (rank, left position)
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  auto push = [&](int left) {
    if (left < 0 || next[left] < 0) return;
    const int r = rank_of(word[left], word[next[left]]);
    if (r != std::numeric_limits<int>::max()) heap.emplace(r, left);
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  std::vector<int> round;
  while (!heap.empty()) {
    const int r = heap.top().first;
    round.clear();
    while (!heap.empty() && heap.top().first == r) {
      round.push_back(heap.top().second);
      heap.pop();
    }
    std::sort(round.begin(), round.end());
    round.erase(std::unique(round.begin(), round.end()), round.end());
    std::vector<int> touched;
    for (int left : round) {
      if (!alive[left] || next[left] < 0 || rank_of(word[left], word[next[left]]) != r) continue;  // stale
      const int right = next[left];
      word[left] += word[right];
      alive[right] = 0;
      next[left] = next[right];
      if (next[right] >= 0) prev[next[right]] = left;
      touched.push_back(left);
    }
    for (int left : touched) {
      if (!alive[left]) continue;
      push(prev[left]);
      push(left);
    }
  }
  std::vector<std::string> out;
  for (int i = 0; i >= 0; i = next[i]) out.push_back(std::move(word[i]));
  return out;
}

void CLIPTokenizer::tokenize_chunk(const std::string& chunk, std::vector<std::string>* out, size_t limit) const {
  const std::u32string text = basic_clean(decode_prompt(chunk));
  const auto& sym = byte_symbols();
  // Pieces are tokenized one at a time, in order: once `limit` tokens are out the rest of the text is never
  // looked at (truncation keeps only the first ones; a piece's tokens do not depend on the pieces after it).
  clip_split(text, [&](const std::u32string& piece) {
    std::string bytes = encode_utf8(piece), mapped;
    for (unsigned char b : bytes) mapped += sym[b];
    for (auto& t : bpe(mapped)) out->push_back(std::move(t));
    return out->size() < limit;
  });
}

std::vector<std::string> CLIPTokenizer::tokenize_checked(const std::string& text, size_t limit) const {
  DMX_CHECK_ARG(text.size() <= kMaxPromptBytes, "prompt is ", text.size(), " bytes, more than the ",
                kMaxPromptBytes / 1024, " KiB limit for prompts and captions (the text encoder reads the first ",
                model_max_length_, " tokens only)");
  decode_prompt(text);  // reject invalid UTF-8 up front, naming the whole prompt

  // Split out added/special tokens (leftmost, longest), as PreTrainedTokenizer.tokenize does with its trie.
  struct Piece {
    std::string text;
    const CLIPAddedToken* added;
  };
  std::vector<Piece> pieces;
  size_t start = 0, pos = 0;
  while (pos < text.size()) {
    const CLIPAddedToken* best = nullptr;
    for (const auto& a : no_split_)
      if (text.compare(pos, a.content.size(), a.content) == 0 && (!best || a.content.size() > best->content.size()))
        best = &a;
    if (!best) {
      ++pos;
      continue;
    }
    pieces.push_back({text.substr(start, pos - start), nullptr});
    pieces.push_back({best->content, best});
    pos += best->content.size();
    start = pos;
  }
  pieces.push_back({text.substr(start), nullptr});
  for (size_t i = 0; i < pieces.size(); ++i) {
    const CLIPAddedToken* a = pieces[i].added;
    if (!a) continue;
    Piece* left = i > 0 ? &pieces[i - 1] : nullptr;
    Piece* right = i + 1 < pieces.size() ? &pieces[i + 1] : nullptr;
    if (a->rstrip && right && !right->text.empty()) right->text = strip_utf8(right->text, true, false);
    if (a->lstrip && left && !left->text.empty()) left->text = strip_utf8(left->text, false, true);
    if (a->single_word && left && !left->text.empty() && left->text.back() != ' ') {
      left->text += pieces[i].text;
      left->added = nullptr;
      pieces[i].text.clear();
    } else if (a->single_word && right && !right->text.empty() && right->text.front() != ' ') {
      pieces[i].text += right->text;
      pieces[i].added = nullptr;
      right->text.clear();
    }
  }
  std::vector<std::string> out;
  for (const auto& p : pieces) {
    if (out.size() >= limit) break;
    if (p.text.empty()) continue;
    if (p.added)
      out.push_back(p.text);
    else
      tokenize_chunk(p.text, &out, limit);
  }
  if (out.size() > limit) out.resize(limit);
  return out;
}

std::vector<std::string> CLIPTokenizer::tokenize(const std::string& text) const {
  return tokenize_checked(text, std::numeric_limits<size_t>::max());
}

std::vector<int64_t> CLIPTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids{bos_id_};
  for (const auto& t : tokenize_checked(text, std::numeric_limits<size_t>::max())) ids.push_back(id_of(t));
  ids.push_back(eos_id_);
  return ids;
}

std::vector<int64_t> CLIPTokenizer::encode_padded(const std::string& text, int max_length) const {
  return encode_padded(text, max_length, nullptr);
}

std::vector<int64_t> CLIPTokenizer::encode_padded(const std::string& text, int max_length,
                                                  std::vector<int64_t>* attention_mask) const {
  DMX_CHECK_ARG(max_length >= 2, "max_length must be >= 2 (BOS + EOS), got ", max_length);
  // Only the tokens that survive truncation are produced (max_length - 2 between BOS and EOS); one more
  // tells that the text was truncated.
  std::vector<int64_t> ids{bos_id_};
  for (const auto& t : tokenize_checked(text, static_cast<size_t>(max_length) - 1)) ids.push_back(id_of(t));
  ids.push_back(eos_id_);
  if (ids.size() > static_cast<size_t>(max_length)) {
    ids.resize(static_cast<size_t>(max_length));
    ids.back() = eos_id_;
  }
  if (attention_mask) {
    attention_mask->assign(static_cast<size_t>(max_length), 0);
    std::fill(attention_mask->begin(), attention_mask->begin() + static_cast<std::ptrdiff_t>(ids.size()), 1);
  }
  ids.resize(static_cast<size_t>(max_length), pad_id_);
  return ids;
}
}  // namespace dmx::models
