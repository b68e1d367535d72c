// The emoji folders written by `dmx data emoji` (src/emoji/data_emoji.cpp), read back for the emoji classifier
// and `dmx eval`: concepts.json (every concept, the class order of the classifier) and, per style and split,
// metadata.jsonl rows {file_name, conditioning_image, mask, name, ...}. Internal header.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

#include "core/image.h"

namespace dmx::emoji {

struct EmojiConcept {
  std::string name;  // lower-cased emoji name (the prompt), unique
  std::string short_name, category, subcategory;
  std::string split;  // train | heldout
};

struct EmojiFiles {  // absolute paths of one concept in one style
  std::string image, edges, mask;
};

class EmojiData {
 public:
  // root: the folder with concepts.json and google/, twitter/. InvalidArgument naming `param` when it is
  // missing, FormatError for malformed files.
  explicit EmojiData(const std::string& root, const std::string& param = "--data");
  const std::string& root() const { return root_; }
  const std::vector<EmojiConcept>& concepts() const { return concepts_; }
  int index_of(const std::string& name) const;  // -1 when unknown
  std::vector<std::string> styles() const;      // styles with a folder, sorted (google, twitter)
  bool has(const std::string& style, int concept) const;
  const EmojiFiles& files(const std::string& style, int concept) const;  // InvalidArgument when absent
  // RGB image of a concept: [3, H, W] float32 in [0, 1] (cached).
  at::Tensor image01(const std::string& style, int concept) const;

 private:
  std::string root_;
  std::vector<EmojiConcept> concepts_;
  std::map<std::string, int> index_;
  std::map<std::string, std::map<int, EmojiFiles>> files_;  // style -> concept -> files
  mutable std::map<std::pair<std::string, int>, at::Tensor> cache_;
};

// RGB image -> [3, H, W] float32 in [0, 1].
at::Tensor image_to_tensor01(const Image& rgb);
}  // namespace dmx::emoji
