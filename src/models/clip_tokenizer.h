// CLIP byte-level BPE tokenizer, matching transformers' CLIPTokenizer (the slow one SD pipelines load,
// transformers 4.37, without ftfy installed): added/special tokens split out first, then
// BasicTokenizer(strip_accents=False, do_split_on_punc=False) clean-up (control characters removed,
// whitespace normalised, CJK ideographs spaced, NFC, lower-case), the CLIP split regex, byte-level BPE
// with merges.txt and the '</w>' end-of-word marker, BOS/EOS, truncation and padding to
// model_max_length (77).
//
// Unicode: classification, lower-casing and NFC come from tables generated from Python's unicodedata
// (clip_unicode_gen.py); no ICU. Prompts must be valid UTF-8: anything else is an InvalidArgument naming
// the prompt and the offending byte (rather than silently replacing or dropping characters).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dmx::models {

// CLIP's bytes_to_unicode(): the symbol (UTF-8) that stands for each byte in vocab.json and merges.txt.
const std::vector<std::string>& clip_byte_symbols();

// An added token (tokenizer_config.json "added_tokens_decoder", or a special token), never split by BPE.
struct CLIPAddedToken {
  std::string content;
  bool lstrip = false;  // eats the whitespace on its left
  bool rstrip = false;  // eats the whitespace on its right
  bool single_word = false;
  int64_t id = -1;  // -1: look the content up in the vocabulary
};

struct CLIPTokenizerOptions {
  CLIPAddedToken bos_token{"<|startoftext|>"};
  CLIPAddedToken eos_token{"<|endoftext|>"};
  CLIPAddedToken pad_token{"<|endoftext|>"};  // SD 2.x tokenizers use "!"
  CLIPAddedToken unk_token{"<|endoftext|>"};
  int model_max_length = 77;
  std::vector<CLIPAddedToken> added_tokens;  // ids must be given (added_tokens_decoder keys)
};

class CLIPTokenizer {
 public:
  // dir holds vocab.json and merges.txt; tokenizer_config.json / special_tokens_map.json are optional
  // (special tokens, model_max_length, added_tokens_decoder). Missing files: IoError; malformed: FormatError.
  static CLIPTokenizer from_folder(const std::string& dir);
  // merges in rank order, without the "#version" header line.
  CLIPTokenizer(std::unordered_map<std::string, int64_t> vocab, std::vector<std::pair<std::string, std::string>> merges,
                CLIPTokenizerOptions options = {});

  // BPE token strings (no BOS/EOS), e.g. {"a</w>", "photograp", "h</w>"}.
  std::vector<std::string> tokenize(const std::string& text) const;
  // Ids with BOS and EOS, no truncation or padding.
  std::vector<int64_t> encode(const std::string& text) const;
  // Ids truncated to max_length (keeping EOS last) and padded with pad_id: what SD pipelines feed
  // (tokenizer(text, padding="max_length", max_length=..., truncation=True)).
  std::vector<int64_t> encode_padded(const std::string& text, int max_length = 77) const;
  // The same, with the tokenizer's attention_mask: 1 for the encoded tokens (BOS, words, EOS), 0 for the padding.
  std::vector<int64_t> encode_padded(const std::string& text, int max_length,
                                     std::vector<int64_t>* attention_mask) const;

  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int64_t unk_id() const { return unk_id_; }
  int model_max_length() const { return model_max_length_; }
  size_t vocab_size() const { return vocab_.size(); }
  int64_t token_to_id(const std::string& token) const;  // -1 if absent
  // The token string of an id (vocabulary or added token); InvalidArgument naming the id when there is none.
  std::string id_to_token(int64_t id) const;
  // transformers' CLIPTokenizer.convert_tokens_to_string: the tokens' bytes (the inverse of bytes_to_unicode)
  // decoded as UTF-8 with errors="replace", "</w>" -> " ", then str.strip(). A token that splits a character
  // decodes to U+FFFD, as in Python.
  std::string convert_tokens_to_string(const std::vector<std::string>& tokens) const;
  // The text of ids: convert_tokens_to_string of their tokens (skip_special_tokens drops BOS, EOS, PAD and UNK).
  // Added tokens are decoded like the others; no clean_up_tokenization_spaces.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = false) const;

  // The BPE merges of one byte-mapped word. transformers' loop (linear_scan) is quadratic in the word's length;
  // words longer than 64 symbols use an equivalent heap-based loop (O(n log n)). Public for the test that
  // compares the two.
  std::vector<std::string> bpe_merge(const std::string& word, bool linear_scan) const;

 private:
  struct Cache;
  std::vector<std::string> bpe(const std::string& word) const;
  // Stop once `limit` tokens are out (truncation): the rest of the text is never scanned.
  void tokenize_chunk(const std::string& chunk, std::vector<std::string>* out, size_t limit) const;
  // Texts longer than kMaxPromptBytes (core/text.h) are an InvalidArgument stating the limit.
  std::vector<std::string> tokenize_checked(const std::string& text, size_t limit) const;
  int64_t id_of(const std::string& token) const;

  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<int64_t, std::string> tokens_by_id_;  // vocab_ inverted
  std::unordered_map<std::string, int> ranks_;             // "first second" -> merge rank
  std::vector<CLIPAddedToken> no_split_;                   // added and special tokens, ids resolved
  int64_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1, unk_id_ = -1;
  int model_max_length_ = 77;
  std::shared_ptr<Cache> cache_;
};
}  // namespace dmx::models
