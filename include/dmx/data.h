// Dataset builders (torch-free public API): `dmx data tokenizer`. The emoji set (`dmx data emoji`) belongs to
// the emoji module: dmx/emoji_data.h.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dmx {
// `dmx data tokenizer`: learns a CLIP byte-level BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json,
// special_tokens_map.json) from the captions of image-caption folders (metadata.jsonl rows or name.txt files).
struct TokenizerTrainOptions {
  std::vector<std::string> data;  // folders with metadata.jsonl (caption_column) or *.txt captions
  std::string output;             // tokenizer folder to write (written whole, then renamed)
  bool overwrite = false;         // replace an existing tokenizer folder
  std::string caption_column = "text";
  int vocab_size = 4096;  // >= 514
  int min_frequency = 1;
  int model_max_length = 77;
};
struct TokenizerTrainReport {
  size_t texts = 0;
  size_t vocab_size = 0, merges = 0;
  size_t longest_tokens = 0;  // most tokens of any caption, with BOS and EOS
  std::string longest;        // that caption
  size_t truncated = 0;       // captions longer than model_max_length
};
TokenizerTrainReport train_tokenizer(const TokenizerTrainOptions& o);
}  // namespace dmx
