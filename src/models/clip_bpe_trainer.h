// Learning a CLIP byte-level BPE vocabulary from captions (Sennrich et al. 2016, "Neural Machine Translation
// of Rare Words with Subword Units", as OpenAI's CLIP vocabulary was built): the same pre-tokenization as
// CLIPTokenizer (clean-up, lower-case, the CLIP split regex, bytes as symbols, '</w>' on the last symbol of
// a word), then repeatedly merge the most frequent adjacent pair. The files it writes load in dmx's
// CLIPTokenizer and in transformers' CLIPTokenizer: vocab.json (256 byte symbols, the same with '</w>',
// one token per merge, then <|startoftext|> and <|endoftext|>), merges.txt ("#version: 0.2" + one merge
// per line), tokenizer_config.json and special_tokens_map.json.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dmx::models {

struct BPETrainOptions {
  int vocab_size = 4096;  // total tokens including the 512 byte symbols and the 2 special tokens
  int min_frequency = 1;  // a pair must occur at least this often (counting word frequencies) to merge
  int model_max_length = 77;
};

struct BPEVocabulary {
  std::vector<std::string> tokens;                          // id order
  std::vector<std::pair<std::string, std::string>> merges;  // rank order
};

// Deterministic: ties between equally frequent pairs go to the lexicographically smallest pair.
// InvalidArgument when vocab_size < 514 or there are no texts.
BPEVocabulary learn_clip_bpe(const std::vector<std::string>& texts, const BPETrainOptions& o);

// Writes the four tokenizer files into `dir` (created; each file written atomically).
void save_clip_tokenizer(const BPEVocabulary& v, const std::string& dir, int model_max_length);
}  // namespace dmx::models
