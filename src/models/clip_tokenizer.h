// CLIP byte-level BPE tokenizer, matching transformers' CLIPTokenizer (the slow one SD pipelines load):
// text clean-up and lower-casing, the CLIP split regex, byte-level BPE with merges.txt, BOS/EOS,
// truncation and padding to model_max_length (77).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace dmx::models {

class CLIPTokenizer {
 public:
  // dir holds vocab.json and merges.txt (tokenizer_config.json / special_tokens_map.json optional).
  static CLIPTokenizer from_folder(const std::string& dir);
  CLIPTokenizer(std::unordered_map<std::string, int64_t> vocab, std::vector<std::pair<std::string, std::string>> merges);

  // BPE token strings (no BOS/EOS), e.g. {"a</w>", "photograp", "h</w>"}.
  std::vector<std::string> tokenize(const std::string& text) const;
  // Ids with BOS and EOS, no truncation or padding.
  std::vector<int64_t> encode(const std::string& text) const;
  // Ids truncated to max_length (keeping EOS last) and padded with pad_id: what SD pipelines feed.
  std::vector<int64_t> encode_padded(const std::string& text, int max_length = 77) const;

  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int model_max_length() const { return model_max_length_; }
  int64_t token_to_id(const std::string& token) const;  // -1 if absent

 private:
  std::vector<std::string> bpe(const std::string& word) const;
  std::unordered_map<std::string, int64_t> vocab_;
  std::map<std::pair<std::string, std::string>, int> ranks_;
  int64_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1, unk_id_ = -1;
  int model_max_length_ = 77;
  mutable std::shared_ptr<std::unordered_map<std::string, std::vector<std::string>>> cache_;
};
}  // namespace dmx::models
