// CLIP BPE vocabulary learning (see clip_bpe_trainer.h).
#include "models/clip_bpe_trainer.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <unordered_map>

#include "core/fs.h"
#include "dmx/error.h"
#include "models/clip_tokenizer.h"

namespace dmx::models {
namespace {
const char* kBos = "<|startoftext|>";
const char* kEos = "<|endoftext|>";

// A tokenizer with only the byte symbols and no merges splits text into words exactly as the final
// tokenizer will (its pre-tokenization), one symbol per byte and '</w>' on each word's last symbol.
CLIPTokenizer byte_tokenizer() {
  std::unordered_map<std::string, int64_t> vocab;
  const auto& bytes = clip_byte_symbols();
  for (const auto& b : bytes) vocab.emplace(b, static_cast<int64_t>(vocab.size()));
  for (const auto& b : bytes) vocab.emplace(b + "</w>", static_cast<int64_t>(vocab.size()));
  vocab.emplace(kBos, static_cast<int64_t>(vocab.size()));
  vocab.emplace(kEos, static_cast<int64_t>(vocab.size()));
  CLIPTokenizerOptions opt;
  opt.model_max_length = 1 << 20;
  return CLIPTokenizer(std::move(vocab), {}, opt);
}

bool ends_word(const std::string& s) { return s.size() >= 4 && s.compare(s.size() - 4, 4, "</w>") == 0; }
}  // namespace

BPEVocabulary learn_clip_bpe(const std::vector<std::string>& texts, const BPETrainOptions& o) {
  DMX_CHECK_ARG(o.vocab_size >= 514,
                "--vocab-size must be >= 514 (256 byte symbols, the same ending a word, "
                "and 2 special tokens), got ",
                o.vocab_size);
  DMX_CHECK_ARG(!texts.empty(), "learning a BPE vocabulary needs at least one text");
  DMX_CHECK_ARG(o.min_frequency >= 1, "--min-frequency must be >= 1, got ", o.min_frequency);
  // Word frequencies, each word as its symbol sequence.
  const CLIPTokenizer bytes = byte_tokenizer();
  std::map<std::vector<std::string>, int64_t> counts;
  for (const auto& t : texts) {
    std::vector<std::string> word;
    for (auto& s : bytes.tokenize(t)) {
      const bool last = ends_word(s);
      word.push_back(std::move(s));
      if (last) {
        ++counts[word];
        word.clear();
      }
    }
    if (!word.empty()) ++counts[word];
  }
  std::vector<std::pair<std::vector<std::string>, int64_t>> words(counts.begin(), counts.end());

  // CLIP's vocabulary order: bytes_to_unicode()'s insertion order (the printable bytes, then the others).
  std::vector<std::string> byte_order;
  for (int pass = 0; pass < 2; ++pass)
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      if (printable == (pass == 0)) byte_order.push_back(clip_byte_symbols()[static_cast<size_t>(b)]);
    }
  BPEVocabulary v;
  for (const auto& b : byte_order) v.tokens.push_back(b);
  for (const auto& b : byte_order) v.tokens.push_back(b + "</w>");
  const size_t max_merges = static_cast<size_t>(o.vocab_size) - 514;
  while (v.merges.size() < max_merges) {
    std::map<std::pair<std::string, std::string>, int64_t> pairs;
    for (const auto& [w, n] : words)
      for (size_t i = 0; i + 1 < w.size(); ++i) pairs[{w[i], w[i + 1]}] += n;
    const std::pair<std::string, std::string>* best = nullptr;
    int64_t best_n = 0;
    for (const auto& [p, n] : pairs)  // map order: the first of equally frequent pairs is the smallest
      if (n > best_n) best = &p, best_n = n;
    if (!best || best_n < o.min_frequency) break;
    const auto merged = *best;
    const std::string joined = merged.first + merged.second;
    v.merges.push_back(merged);
    v.tokens.push_back(joined);
    for (auto& [w, n] : words) {
      std::vector<std::string> out;
      out.reserve(w.size());
      for (size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == merged.first && w[i + 1] == merged.second) {
          out.push_back(joined);
          ++i;
        } else {
          out.push_back(w[i]);
        }
      }
      w.swap(out);
    }
  }
  v.tokens.push_back(kBos);
  v.tokens.push_back(kEos);
  return v;
}

void save_clip_tokenizer(const BPEVocabulary& v, const std::string& dir, int model_max_length) {
  DMX_CHECK_ARG(model_max_length >= 2, "--model-max-length must be >= 2 (BOS + EOS), got ", model_max_length);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  DMX_CHECK_IO(!ec, "cannot create the tokenizer folder ", dir, ": ", ec.message());
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  for (size_t i = 0; i < v.tokens.size(); ++i) vocab[v.tokens[i]] = static_cast<int64_t>(i);
  std::string merges = "#version: 0.2\n";
  for (const auto& [a, b] : v.merges) merges += a + " " + b + "\n";
  const int64_t bos = static_cast<int64_t>(v.tokens.size()) - 2, eos = bos + 1;
  auto special = [](const char* content) {
    return nlohmann::ordered_json{
        {"content", content}, {"lstrip", false}, {"normalized", true}, {"rstrip", false}, {"single_word", false}};
  };
  nlohmann::ordered_json added = nlohmann::ordered_json::object();
  added[std::to_string(bos)] = special(kBos);
  added[std::to_string(bos)]["special"] = true;
  added[std::to_string(eos)] = special(kEos);
  added[std::to_string(eos)]["special"] = true;
  const nlohmann::ordered_json cfg = {{"add_prefix_space", false}, {"added_tokens_decoder", added},
                                      {"bos_token", kBos},         {"clean_up_tokenization_spaces", true},
                                      {"do_lower_case", true},     {"eos_token", kEos},
                                      {"errors", "replace"},       {"model_max_length", model_max_length},
                                      {"pad_token", kEos},         {"tokenizer_class", "CLIPTokenizer"},
                                      {"unk_token", kEos}};
  const nlohmann::ordered_json smap = {
      {"bos_token", special(kBos)}, {"eos_token", special(kEos)}, {"pad_token", kEos}, {"unk_token", special(kEos)}};
  const std::string vj = vocab.dump(2) + "\n", cj = cfg.dump(2) + "\n", sj = smap.dump(2) + "\n";
  write_bytes_atomic(join_path(dir, "vocab.json"), vj.data(), vj.size());
  write_bytes_atomic(join_path(dir, "merges.txt"), merges.data(), merges.size());
  write_bytes_atomic(join_path(dir, "tokenizer_config.json"), cj.data(), cj.size());
  write_bytes_atomic(join_path(dir, "special_tokens_map.json"), sj.data(), sj.size());
}
}  // namespace dmx::models
