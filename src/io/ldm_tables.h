// Internal header of the LDM name tables (ldm_tables.cpp, ldm_detect.cpp, ldm_controlnet.cpp): the leaf and
// block tables, the table-driven converter and the config / tensor-shape helpers they share. ldm_names.h is
// the public side. Internal header of the io layer.
//
// How the tables work: a component's keys are first matched to a *block* (the longest dotted prefix
// listed in that component's block table, e.g. `input_blocks.4.1` -> `down_blocks.1.attentions.0`,
// built from the layout in the config), then the rest of the key is matched against the block's *leaf*
// table (e.g. `in_layers.0` -> `norm1`, `attn.in_proj_weight` -> q/k/v). A key that matches no block or
// no leaf is reported, never dropped. Other layouts (ControlNet's control_model.*: zero_convs,
// input_hint_block, middle_block_out) add block entries with the same leaf tables.
#pragma once
#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "dmx/error.h"
#include "io/ldm_names.h"
#include "io/safetensors.h"

namespace dmx::io::ldm {

using nlohmann::json;

// Leaf tables: names inside one block.

enum class Op {
  Copy,
  ConvToLinear,  // 1x1 conv weight [O, I, 1, 1] (or conv1d [O, I, 1]) -> linear [O, I]
  SplitQKV,      // fused in-projection [3C, ...] -> three [C, ...] tensors (to = "q,k,v" names)
};

// `from` names a sub-module (the key continues with .weight / .bias) or, with param = true, a whole
// parameter. A "#" segment matches one number and is substituted, in order, into `to`.
struct LeafRule {
  const char* from;
  const char* to;
  Op op = Op::Copy;
  bool param = false;
};
using LeafTable = std::vector<LeafRule>;

// The leaf tables (ldm_tables.cpp).
extern const LeafTable kParamsOnly;
extern const LeafTable kUnetResnet;
extern const LeafTable kUnetTransformer;
extern const LeafTable kVaeResnet;
extern const LeafTable kVaeAttention;
extern const LeafTable kClipEmbeddings;
extern const LeafTable kClipLayer;
extern const LeafTable kOpenClipRoot;
extern const LeafTable kOpenClipLayer;

// Block tables and the converter.

struct Block {
  std::string to;
  const LeafTable* leaves;
};
using BlockTable = std::map<std::string, Block>;  // dotted original prefix ("" = component root)

// The UNet encoder's blocks (time embedding, conv_in, input_blocks, middle_block), which the UNet and the
// ControlNet (a copy of that encoder) share.
void add_unet_encoder_blocks(BlockTable& t, int64_t layers_per_block, size_t num_blocks,
                             const std::vector<std::string>& down_block_types);

// Dotted names: "a.b.c" -> {"a", "b", "c"} ("" -> {}), and back for segs[begin, end).
std::vector<std::string> split_segments(const std::string& s, char sep);
std::string join_segments(const std::vector<std::string>& segs, size_t begin, size_t end);
bool is_number(const std::string& s);
std::string dotted(const std::string& a, const std::string& b);
// Matches `rest` (the key below its block) against one leaf rule; on success *out is the new rest
// (for SplitQKV, the comma-separated list of three).
bool match_leaf(const std::vector<std::string>& rest, const LeafRule& rule, std::string* out);
at::Tensor conv_to_linear(const std::string& key, const at::Tensor& t);
void put(TensorMap* out, const std::string& name, const at::Tensor& t, const std::string& src);

struct Converted {
  TensorMap out;
  std::vector<std::string> unmatched;
};

// Converts every key of `ckpt` under `prefix` (rest normalised by `normalize`) through `blocks`,
// skipping keys for which `skip` is true.
template <typename Skip, typename Normalize>
Converted convert_with(const TensorMap& ckpt, const std::string& prefix, const BlockTable& blocks, Skip skip,
                       Normalize normalize) {
  Converted c;
  for (auto it = ckpt.lower_bound(prefix); it != ckpt.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    const std::string& key = it->first;
    if (is_ignorable_ldm_key(key) || skip(key)) continue;
    const std::vector<std::string> segs = split_segments(normalize(key.substr(prefix.size())), '.');
    bool done = false;
    for (size_t len = segs.size(); len-- > 0 && !done;) {  // longest block prefix first, down to the root
      auto b = blocks.find(join_segments(segs, 0, len));
      if (b == blocks.end()) continue;
      const std::vector<std::string> rest(segs.begin() + static_cast<std::ptrdiff_t>(len), segs.end());
      for (const LeafRule& rule : *b->second.leaves) {
        std::string new_rest;
        if (!match_leaf(rest, rule, &new_rest)) continue;
        if (rule.op == Op::SplitQKV) {
          const at::Tensor& t = it->second;
          const std::vector<std::string> names = split_segments(new_rest, ',');
          DMX_CHECK_FORMAT(t.dim() >= 1 && t.size(0) % 3 == 0, "checkpoint tensor '", key,
                           "' is a fused q/k/v projection and needs a first dimension divisible by 3, got ", t.sizes());
          const int64_t c3 = t.size(0) / 3;  // [3C, ...] -> 3 x [C, ...]
          for (int64_t k = 0; k < 3; ++k) put(&c.out, dotted(b->second.to, names[k]), t.narrow(0, k * c3, c3), key);
        } else {
          const at::Tensor t = rule.op == Op::ConvToLinear ? conv_to_linear(key, it->second) : it->second;
          put(&c.out, dotted(b->second.to, new_rest), t, key);
        }
        done = true;
        break;
      }
      break;  // the longest matching block decides
    }
    if (!done) c.unmatched.push_back(key);
  }
  return c;
}

// FormatError listing the unmatched keys, else the converted tensors.
TensorMap finish(Converted c, const char* component);

// Config access (FormatError naming the component and the field).
int64_t cfg_int(const json& cfg, const char* key, const char* component);
std::vector<std::string> cfg_strings(const json& cfg, const char* key, const char* component);
size_t cfg_list_size(const json& cfg, const char* key, const char* component);
const json* yaml_at(const json& root, std::initializer_list<const char*> path);

// Tensor-shape helpers of the detection.
bool has(const TensorMap& m, const std::string& key);
const at::Tensor& need(const TensorMap& m, const std::string& key, const char* component);
// The numbers N of keys "<prefix>N.…".
std::set<int64_t> indices(const TensorMap& m, const std::string& prefix);
bool contiguous_from(const std::set<int64_t>& s, int64_t first, int64_t count);
bool yaml_says_v(const json& yaml);
// diffusers: v-parameterised models are taken as 768-pixel models; everything else as 512.
bool is_v_model(const TensorMap& ckpt, const json& yaml);
int64_t image_size(const TensorMap& ckpt, const json& yaml);

// The down path of an LDM UNet or ControlNet under `prefix`: input_blocks 1..M are nb blocks of L layers, with a
// downsampler (…0.op) after all but the last; per block its channels and whether it has attention (and its
// transformer depth). `layout_ok` says whether the input_blocks follow that layout (callers add their own
// output/zero-conv checks and the error).
struct InputBlocks {
  int64_t M = 0, L = 0, nb = 0;
  std::vector<int64_t> ops;
  bool layout_ok = false;
  json block_out = json::array(), down = json::array();
  std::vector<int64_t> channels, depth;
};
InputBlocks input_blocks(const TensorMap& ckpt, const std::string& prefix, const char* component);

inline constexpr std::string_view kConfigHint =
    " Pass `--config DIR`, a diffusers folder whose <component>/config.json describes this model.";

}  // namespace dmx::io::ldm
