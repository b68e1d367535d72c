// Original (CompVis/LDM) -> diffusers key names, as tables, plus config detection from tensor shapes.
// Mirrors diffusers 0.27.2 pipelines/stable_diffusion/convert_from_ckpt.py (convert_ldm_unet_checkpoint,
// convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint,
// create_unet_diffusers_config, create_vae_diffusers_config) and loaders/single_file_utils.py.
//
// How the tables work: a component's keys are first matched to a *block* (the longest dotted prefix
// listed in that component's block table, e.g. `input_blocks.4.1` -> `down_blocks.1.attentions.0`,
// built from the layout in the config), then the rest of the key is matched against the block's *leaf*
// table (e.g. `in_layers.0` -> `norm1`, `attn.in_proj_weight` -> q/k/v). A key that matches no block or
// no leaf is reported, never dropped. Other layouts (ControlNet's control_model.*: zero_convs,
// input_hint_block, middle_block_out) add block entries with the same leaf tables.
#include "io/ldm_names.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <set>
#include <sstream>
#include <string_view>
#include <vector>

#include "dmx/error.h"

namespace dmx::io {
namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
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

// A block that is one layer: only its weight and bias (conv_in, downsamplers, time_embed.0, ...).
const LeafTable kParamsOnly = {{"", ""}};

// ResBlock (openaimodel.py) -> ResnetBlock2D.
const LeafTable kUnetResnet = {
    {"in_layers.0", "norm1"},   {"in_layers.2", "conv1"},          {"out_layers.0", "norm2"},
    {"out_layers.3", "conv2"},  {"emb_layers.1", "time_emb_proj"}, {"skip_connection", "conv_shortcut"},
};

// SpatialTransformer (attention.py) -> Transformer2DModel: same names.
const LeafTable kUnetTransformer = {
    {"norm", "norm"},
    {"proj_in", "proj_in"},
    {"proj_out", "proj_out"},
    {"transformer_blocks.#.norm1", "transformer_blocks.#.norm1"},
    {"transformer_blocks.#.norm2", "transformer_blocks.#.norm2"},
    {"transformer_blocks.#.norm3", "transformer_blocks.#.norm3"},
    {"transformer_blocks.#.attn1.to_q", "transformer_blocks.#.attn1.to_q"},
    {"transformer_blocks.#.attn1.to_k", "transformer_blocks.#.attn1.to_k"},
    {"transformer_blocks.#.attn1.to_v", "transformer_blocks.#.attn1.to_v"},
    {"transformer_blocks.#.attn1.to_out.0", "transformer_blocks.#.attn1.to_out.0"},
    {"transformer_blocks.#.attn2.to_q", "transformer_blocks.#.attn2.to_q"},
    {"transformer_blocks.#.attn2.to_k", "transformer_blocks.#.attn2.to_k"},
    {"transformer_blocks.#.attn2.to_v", "transformer_blocks.#.attn2.to_v"},
    {"transformer_blocks.#.attn2.to_out.0", "transformer_blocks.#.attn2.to_out.0"},
    {"transformer_blocks.#.ff.net.0.proj", "transformer_blocks.#.ff.net.0.proj"},
    {"transformer_blocks.#.ff.net.2", "transformer_blocks.#.ff.net.2"},
};

// taming/ldm ResnetBlock -> ResnetBlock2D.
const LeafTable kVaeResnet = {
    {"norm1", "norm1"}, {"conv1", "conv1"}, {"norm2", "norm2"}, {"conv2", "conv2"}, {"nin_shortcut", "conv_shortcut"},
};

// AttnBlock (1x1 convs) -> Attention (linears).
const LeafTable kVaeAttention = {
    {"norm", "group_norm"},
    {"q", "to_q", Op::ConvToLinear},
    {"k", "to_k", Op::ConvToLinear},
    {"v", "to_v", Op::ConvToLinear},
    {"proj_out", "to_out.0", Op::ConvToLinear},
};

// transformers CLIPTextModel (SD1): same names.
const LeafTable kClipEmbeddings = {
    {"token_embedding", "token_embedding"},
    {"position_embedding", "position_embedding"},
};
const LeafTable kClipLayer = {
    {"self_attn.q_proj", "self_attn.q_proj"},     {"self_attn.k_proj", "self_attn.k_proj"},
    {"self_attn.v_proj", "self_attn.v_proj"},     {"self_attn.out_proj", "self_attn.out_proj"},
    {"layer_norm1", "layer_norm1"},               {"layer_norm2", "layer_norm2"},
    {"mlp.fc1", "mlp.fc1"},                       {"mlp.fc2", "mlp.fc2"},
};

// OpenCLIP text tower (SD2) -> CLIPTextModel.
const LeafTable kOpenClipRoot = {
    {"token_embedding", "text_model.embeddings.token_embedding"},
    {"positional_embedding", "text_model.embeddings.position_embedding.weight", Op::Copy, true},
    {"ln_final", "text_model.final_layer_norm"},
};
const LeafTable kOpenClipLayer = {
    {"attn.in_proj_weight", "self_attn.q_proj.weight,self_attn.k_proj.weight,self_attn.v_proj.weight",
     Op::SplitQKV, true},
    {"attn.in_proj_bias", "self_attn.q_proj.bias,self_attn.k_proj.bias,self_attn.v_proj.bias", Op::SplitQKV,
     true},
    {"attn.out_proj", "self_attn.out_proj"},
    {"ln_1", "layer_norm1"},
    {"ln_2", "layer_norm2"},
    {"mlp.c_fc", "mlp.fc1"},
    {"mlp.c_proj", "mlp.fc2"},
};

// ---------------------------------------------------------------------------------------------
// Block tables and the converter.

struct Block {
  std::string to;
  const LeafTable* leaves;
};
using BlockTable = std::map<std::string, Block>;  // dotted original prefix ("" = component root)

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  if (s.empty()) return out;
  size_t start = 0;
  while (true) {
    size_t p = s.find(sep, start);
    out.push_back(s.substr(start, p == std::string::npos ? std::string::npos : p - start));
    if (p == std::string::npos) break;
    start = p + 1;
  }
  return out;
}

std::string join(const std::vector<std::string>& segs, size_t begin, size_t end) {
  std::string out;
  for (size_t i = begin; i < end; ++i) {
    if (i > begin) out += '.';
    out += segs[i];
  }
  return out;
}

bool is_number(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

std::string dotted(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (b.empty()) return a;
  return a + "." + b;
}

// Matches `rest` (the key below its block) against one leaf rule; on success *out is the new rest
// (for SplitQKV, the comma-separated list of three).
bool match_leaf(const std::vector<std::string>& rest, const LeafRule& rule, std::string* out) {
  const std::vector<std::string> from = split(rule.from, '.');
  std::string param;
  if (rule.param) {
    if (rest.size() != from.size()) return false;
  } else {
    if (rest.size() != from.size() + 1) return false;
    param = rest.back();
    if (param != "weight" && param != "bias") return false;
  }
  std::vector<std::string> numbers;
  for (size_t i = 0; i < from.size(); ++i) {
    if (from[i] == "#") {
      if (!is_number(rest[i])) return false;
      numbers.push_back(rest[i]);
    } else if (from[i] != rest[i]) {
      return false;
    }
  }
  std::vector<std::string> to = split(rule.to, '.');
  size_t n = 0;
  for (auto& seg : to)
    if (seg == "#") seg = numbers.at(n++);
  *out = dotted(join(to, 0, to.size()), param);
  return true;
}

at::Tensor conv_to_linear(const std::string& key, const at::Tensor& t) {
  if (t.dim() == 4) {
    DMX_CHECK_FORMAT(t.size(2) == 1 && t.size(3) == 1, "checkpoint tensor '", key,
                     "' should be a 1x1 convolution weight [O, I, 1, 1], got ", t.sizes());
    return t.reshape({t.size(0), t.size(1)});
  }
  if (t.dim() == 3) {
    DMX_CHECK_FORMAT(t.size(2) == 1, "checkpoint tensor '", key, "' should be a conv1d weight [O, I, 1], got ",
                     t.sizes());
    return t.reshape({t.size(0), t.size(1)});
  }
  return t;
}

struct Converted {
  TensorMap out;
  std::vector<std::string> unmatched;
};

void put(TensorMap* out, const std::string& name, const at::Tensor& t, const std::string& src) {
  DMX_CHECK_FORMAT(out->emplace(name, t).second, "checkpoint: '", src, "' converts to '", name,
                   "', which another key already produced");
}

// Converts every key of `ckpt` under `prefix` (rest normalised by `normalize`) through `blocks`,
// skipping keys for which `skip` is true.
template <typename Skip, typename Normalize>
Converted convert_with(const TensorMap& ckpt, const std::string& prefix, const BlockTable& blocks, Skip skip,
                       Normalize normalize) {
  Converted c;
  for (auto it = ckpt.lower_bound(prefix); it != ckpt.end() && it->first.compare(0, prefix.size(), prefix) == 0;
       ++it) {
    const std::string& key = it->first;
    if (is_ignorable_ldm_key(key) || skip(key)) continue;
    const std::vector<std::string> segs = split(normalize(key.substr(prefix.size())), '.');
    bool done = false;
    for (size_t len = segs.size(); len-- > 0 && !done;) {  // longest block prefix first, down to the root
      auto b = blocks.find(join(segs, 0, len));
      if (b == blocks.end()) continue;
      const std::vector<std::string> rest(segs.begin() + static_cast<std::ptrdiff_t>(len), segs.end());
      for (const LeafRule& rule : *b->second.leaves) {
        std::string new_rest;
        if (!match_leaf(rest, rule, &new_rest)) continue;
        if (rule.op == Op::SplitQKV) {
          const at::Tensor& t = it->second;
          const std::vector<std::string> names = split(new_rest, ',');
          DMX_CHECK_FORMAT(t.dim() >= 1 && t.size(0) % 3 == 0, "checkpoint tensor '", key,
                           "' is a fused q/k/v projection and needs a first dimension divisible by 3, got ",
                           t.sizes());
          const int64_t c3 = t.size(0) / 3;  // [3C, ...] -> 3 x [C, ...]
          for (int64_t k = 0; k < 3; ++k)
            put(&c.out, dotted(b->second.to, names[k]), t.narrow(0, k * c3, c3), key);
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

std::string list_keys(const std::vector<std::string>& keys, size_t max = 8) {
  std::ostringstream os;
  for (size_t i = 0; i < keys.size() && i < max; ++i) os << (i ? ", " : "") << keys[i];
  if (keys.size() > max) os << ", ... (" << keys.size() << " in all)";
  return os.str();
}

TensorMap finish(Converted c, const char* component) {
  DMX_CHECK_FORMAT(c.unmatched.empty(), component, ": ", c.unmatched.size(),
                   " checkpoint key(s) match no known layer name (not an SD 1.x/2.x layout, or the config "
                   "does not match the weights): ",
                   list_keys(c.unmatched));
  return std::move(c.out);
}

// ---------------------------------------------------------------------------------------------
// Config access.

int64_t cfg_int(const json& cfg, const char* key, const char* component) {
  DMX_CHECK_FORMAT(cfg.contains(key) && cfg[key].is_number_integer(), component, " config: '", key,
                   "' must be an integer");
  return cfg[key].get<int64_t>();
}

std::vector<std::string> cfg_strings(const json& cfg, const char* key, const char* component) {
  DMX_CHECK_FORMAT(cfg.contains(key) && cfg[key].is_array(), component, " config: '", key, "' must be a list");
  std::vector<std::string> out;
  for (const auto& v : cfg[key]) {
    DMX_CHECK_FORMAT(v.is_string(), component, " config: '", key, "' must be a list of strings");
    out.push_back(v.get<std::string>());
  }
  return out;
}

size_t cfg_list_size(const json& cfg, const char* key, const char* component) {
  DMX_CHECK_FORMAT(cfg.contains(key) && cfg[key].is_array() && !cfg[key].empty(), component, " config: '", key,
                   "' must be a non-empty list");
  return cfg[key].size();
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

const json* yaml_at(const json& root, std::initializer_list<const char*> path) {
  const json* j = &root;
  for (const char* p : path) {
    if (!j->is_object() || !j->contains(p)) return nullptr;
    j = &(*j)[p];
  }
  return j;
}

bool has(const TensorMap& m, const std::string& key) { return m.count(key) != 0; }

const at::Tensor& need(const TensorMap& m, const std::string& key, const char* component) {
  auto it = m.find(key);
  DMX_CHECK_FORMAT(it != m.end(), component, ": checkpoint has no tensor '", key,
                   "', needed to detect the model layout");
  return it->second;
}

// The numbers N of keys "<prefix>N.…".
std::set<int64_t> indices(const TensorMap& m, const std::string& prefix) {
  std::set<int64_t> out;
  for (auto it = m.lower_bound(prefix); it != m.end() && starts_with(it->first, prefix); ++it) {
    const size_t dot = it->first.find('.', prefix.size());
    const std::string n = it->first.substr(prefix.size(), dot == std::string::npos ? std::string::npos
                                                                                   : dot - prefix.size());
    if (is_number(n) && n.size() < 10) out.insert(std::stoll(n));
  }
  return out;
}

bool contiguous_from(const std::set<int64_t>& s, int64_t first, int64_t count) {
  if (static_cast<int64_t>(s.size()) != count) return false;
  int64_t expect = first;
  for (int64_t v : s)
    if (v != expect++) return false;
  return true;
}

bool yaml_says_v(const json& yaml) {
  const json* p = yaml_at(yaml, {"model", "params", "parameterization"});
  return p && p->is_string() && p->get<std::string>() == "v";
}

// diffusers: v-parameterised models are taken as 768-pixel models; everything else as 512.
bool is_v_model(const TensorMap& ckpt, const json& yaml) {
  if (!yaml.is_null()) return yaml_says_v(yaml);
  return ldm_text_encoder_kind(ckpt) == LdmTextEncoder::OpenClip;
}

int64_t image_size(const TensorMap& ckpt, const json& yaml) { return is_v_model(ckpt, yaml) ? 768 : 512; }

constexpr std::string_view kConfigHint =
    " Pass `--config DIR`, a diffusers folder whose <component>/config.json describes this model.";

}  // namespace

// ---------------------------------------------------------------------------------------------
// Ignorable keys and text encoder kind.

LdmTextEncoder ldm_text_encoder_kind(const TensorMap& ckpt) {
  auto any = [&](const std::string& p) {
    auto it = ckpt.lower_bound(p);
    return it != ckpt.end() && starts_with(it->first, p);
  };
  if (any(kLdmClipPrefix)) return LdmTextEncoder::Clip;
  if (any(kLdmOpenClipPrefix)) return LdmTextEncoder::OpenClip;
  return LdmTextEncoder::None;
}

bool is_ignorable_ldm_key(const std::string& key) {
  static const std::set<std::string> exact = {
      // LatentDiffusion / DDPM buffers: the schedule lives in the scheduler config.
      "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
      "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
      "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
      "logvar", "lvlb_weights",
      // CLIP position ids (a constant arange buffer).
      "cond_stage_model.transformer.text_model.embeddings.position_ids",
      "cond_stage_model.transformer.embeddings.position_ids",
      // OpenCLIP parts CLIPTextModel does not have.
      "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",
      "cond_stage_model.model.attn_mask"};
  static const char* const prefixes[] = {"model_ema.", "first_stage_model.loss."};
  if (exact.count(key)) return true;
  for (const char* p : prefixes)
    if (starts_with(key, p)) return true;
  return false;
}

// ---------------------------------------------------------------------------------------------
// UNet.

TensorMap convert_ldm_unet(const TensorMap& ckpt, const json& cfg) {
  const char* what = "UNet";
  const int64_t L = cfg_int(cfg, "layers_per_block", what);
  const size_t nb = cfg_list_size(cfg, "block_out_channels", what);
  const auto down_types = cfg_strings(cfg, "down_block_types", what);
  const auto up_types = cfg_strings(cfg, "up_block_types", what);
  DMX_CHECK_FORMAT(down_types.size() == nb && up_types.size() == nb,
                   "UNet config: down_block_types and up_block_types need one entry per block_out_channels entry");
  DMX_CHECK_FORMAT(L >= 1, "UNet config: layers_per_block must be >= 1, got ", L);
  if (cfg.contains("mid_block_type") && !cfg["mid_block_type"].is_null())
    DMX_CHECK_SUPPORTED(cfg["mid_block_type"] == "UNetMidBlock2DCrossAttn",
                        "UNet: single-file conversion supports mid_block_type UNetMidBlock2DCrossAttn, got ",
                        cfg["mid_block_type"]);
  auto cross = [](const std::string& t) { return starts_with(t, "CrossAttn"); };
  auto s = [](auto v) { return std::to_string(v); };

  BlockTable t;
  t["time_embed.0"] = {"time_embedding.linear_1", &kParamsOnly};
  t["time_embed.2"] = {"time_embedding.linear_2", &kParamsOnly};
  t["input_blocks.0.0"] = {"conv_in", &kParamsOnly};
  t["out.0"] = {"conv_norm_out", &kParamsOnly};
  t["out.2"] = {"conv_out", &kParamsOnly};
  // input_blocks 1.. hold, per down block, L (resnet[, attention]) pairs and then a downsampler.
  for (size_t b = 0; b < nb; ++b) {
    for (int64_t j = 0; j < L; ++j) {
      const std::string in = "input_blocks." + s(1 + b * (L + 1) + j);
      t[in + ".0"] = {"down_blocks." + s(b) + ".resnets." + s(j), &kUnetResnet};
      if (cross(down_types[b])) t[in + ".1"] = {"down_blocks." + s(b) + ".attentions." + s(j), &kUnetTransformer};
    }
    if (b + 1 < nb)
      t["input_blocks." + s(1 + b * (L + 1) + L) + ".0.op"] = {"down_blocks." + s(b) + ".downsamplers.0.conv",
                                                                &kParamsOnly};
  }
  t["middle_block.0"] = {"mid_block.resnets.0", &kUnetResnet};
  t["middle_block.1"] = {"mid_block.attentions.0", &kUnetTransformer};
  t["middle_block.2"] = {"mid_block.resnets.1", &kUnetResnet};
  // output_blocks hold, per up block, L + 1 (resnet[, attention]) pairs; the last one also the
  // upsampler, after the attention when there is one.
  for (size_t u = 0; u < nb; ++u) {
    for (int64_t j = 0; j <= L; ++j) {
      const std::string out = "output_blocks." + s(u * (L + 1) + j);
      t[out + ".0"] = {"up_blocks." + s(u) + ".resnets." + s(j), &kUnetResnet};
      if (cross(up_types[u])) t[out + ".1"] = {"up_blocks." + s(u) + ".attentions." + s(j), &kUnetTransformer};
      if (j == L && u + 1 < nb)
        t[out + (cross(up_types[u]) ? ".2" : ".1") + ".conv"] = {"up_blocks." + s(u) + ".upsamplers.0.conv",
                                                                 &kParamsOnly};
    }
  }
  return finish(convert_with(ckpt, kLdmUnetPrefix, t, [](const std::string&) { return false; },
                             [](std::string k) { return k; }),
                what);
}

// ---------------------------------------------------------------------------------------------
// VAE.

TensorMap convert_ldm_vae(const TensorMap& ckpt, const json& cfg) {
  const char* what = "VAE";
  const int64_t L = cfg_int(cfg, "layers_per_block", what);
  const size_t nb = cfg_list_size(cfg, "block_out_channels", what);
  auto s = [](auto v) { return std::to_string(v); };

  BlockTable t;
  for (const char* part : {"encoder", "decoder"}) {
    const std::string p = part;
    t[p + ".conv_in"] = {p + ".conv_in", &kParamsOnly};
    t[p + ".conv_out"] = {p + ".conv_out", &kParamsOnly};
    t[p + ".norm_out"] = {p + ".conv_norm_out", &kParamsOnly};
    t[p + ".mid.block_1"] = {p + ".mid_block.resnets.0", &kVaeResnet};
    t[p + ".mid.block_2"] = {p + ".mid_block.resnets.1", &kVaeResnet};
    t[p + ".mid.attn_1"] = {p + ".mid_block.attentions.0", &kVaeAttention};
  }
  t["quant_conv"] = {"quant_conv", &kParamsOnly};
  t["post_quant_conv"] = {"post_quant_conv", &kParamsOnly};
  for (size_t i = 0; i < nb; ++i) {
    for (int64_t j = 0; j < L; ++j)
      t["encoder.down." + s(i) + ".block." + s(j)] = {"encoder.down_blocks." + s(i) + ".resnets." + s(j),
                                                      &kVaeResnet};
    if (i + 1 < nb)
      t["encoder.down." + s(i) + ".downsample.conv"] = {"encoder.down_blocks." + s(i) + ".downsamplers.0.conv",
                                                         &kParamsOnly};
    // The decoder's up.N run from the lowest resolution at N = nb - 1: diffusers numbers them in
    // the order they are applied.
    const size_t u = nb - 1 - i;
    for (int64_t j = 0; j <= L; ++j)
      t["decoder.up." + s(i) + ".block." + s(j)] = {"decoder.up_blocks." + s(u) + ".resnets." + s(j), &kVaeResnet};
    if (i > 0)
      t["decoder.up." + s(i) + ".upsample.conv"] = {"decoder.up_blocks." + s(u) + ".upsamplers.0.conv",
                                                     &kParamsOnly};
  }
  return finish(convert_with(ckpt, kLdmVaePrefix, t, [](const std::string&) { return false; },
                             [](std::string k) { return k; }),
                what);
}

// ---------------------------------------------------------------------------------------------
// Text encoder.

TensorMap convert_ldm_clip(const TensorMap& ckpt, const json& cfg) {
  const char* what = "text encoder";
  const int64_t layers = cfg_int(cfg, "num_hidden_layers", what);
  auto s = [](auto v) { return std::to_string(v); };
  BlockTable t;
  switch (ldm_text_encoder_kind(ckpt)) {
    case LdmTextEncoder::Clip: {
      // Transformers CLIPTextModel keys; older transformers versions had no `text_model.` level.
      t["text_model.embeddings"] = {"text_model.embeddings", &kClipEmbeddings};
      t["text_model.final_layer_norm"] = {"text_model.final_layer_norm", &kParamsOnly};
      for (int64_t i = 0; i < layers; ++i)
        t["text_model.encoder.layers." + s(i)] = {"text_model.encoder.layers." + s(i), &kClipLayer};
      return finish(convert_with(ckpt, kLdmClipPrefix, t, [](const std::string&) { return false; },
                                 [](std::string k) { return starts_with(k, "text_model.") ? k : "text_model." + k; }),
                    what);
    }
    case LdmTextEncoder::OpenClip: {
      // SD2 conditions on the penultimate layer, so diffusers' CLIPTextModel has one layer fewer than
      // the OpenCLIP tower (23 of 24) and the last resblock is not converted.
      const std::string rb = std::string(kLdmOpenClipPrefix) + "transformer.resblocks.";
      const int64_t total = static_cast<int64_t>(indices(ckpt, rb).size());
      DMX_CHECK_FORMAT(layers == total || layers == total - 1, what, " config: num_hidden_layers is ", layers,
                       " but the OpenCLIP checkpoint has ", total, " layers (expected ", total - 1,
                       ", the penultimate layer SD2 uses, or ", total, ")");
      t[""] = {"", &kOpenClipRoot};
      for (int64_t i = 0; i < layers; ++i)
        t["transformer.resblocks." + s(i)] = {"text_model.encoder.layers." + s(i), &kOpenClipLayer};
      const std::string dropped = rb + s(layers) + ".";
      return finish(convert_with(ckpt, kLdmOpenClipPrefix, t,
                                 [&](const std::string& k) { return layers < total && starts_with(k, dropped); },
                                 [](std::string k) { return k; }),
                    what);
    }
    case LdmTextEncoder::None: break;
  }
  throw FormatError(detail::concat("text encoder: checkpoint has no ", kLdmClipPrefix, "* (SD1 CLIP) or ",
                                   kLdmOpenClipPrefix, "* (SD2 OpenCLIP) weights"));
}

// ---------------------------------------------------------------------------------------------
// Config detection.

json detect_ldm_unet_config(const TensorMap& ckpt, const json& yaml) {
  const char* what = "UNet";
  const std::string p = kLdmUnetPrefix;
  auto s = [](auto v) { return std::to_string(v); };
  const at::Tensor& conv_in = need(ckpt, p + "input_blocks.0.0.weight", what);  // [C0, in, 3, 3]
  const at::Tensor& conv_out = need(ckpt, p + "out.2.weight", what);             // [out, C0, 3, 3]
  DMX_CHECK_FORMAT(conv_in.dim() == 4 && conv_out.dim() == 4, "UNet: conv_in/conv_out weights must be 4-D, got ",
                   conv_in.sizes(), " and ", conv_out.sizes());

  // Layout: input_blocks 1..M are nb blocks of L layers, with a downsampler (…0.op) after all but the last.
  std::set<int64_t> inputs = indices(ckpt, p + "input_blocks.");
  inputs.erase(0);
  DMX_CHECK_FORMAT(!inputs.empty(), "UNet: checkpoint has no ", p, "input_blocks.1.*");
  const int64_t M = *inputs.rbegin();
  std::vector<int64_t> ops;
  for (int64_t i : inputs)
    if (has(ckpt, p + "input_blocks." + s(i) + ".0.op.weight")) ops.push_back(i);
  const int64_t L = ops.empty() ? M : ops[0] - 1;
  const int64_t nb = static_cast<int64_t>(ops.size()) + 1;
  bool layout_ok = L >= 1 && M == nb * (L + 1) - 1 && contiguous_from(inputs, 1, M);
  for (size_t k = 0; layout_ok && k < ops.size(); ++k) layout_ok = ops[k] == static_cast<int64_t>(k + 1) * (L + 1);
  const std::set<int64_t> outputs = indices(ckpt, p + "output_blocks.");
  layout_ok = layout_ok && contiguous_from(outputs, 0, nb * (L + 1));
  DMX_CHECK_FORMAT(layout_ok, "UNet: unrecognised input_blocks/output_blocks layout (", M, " input blocks, ",
                   ops.size(), " downsamplers, ", outputs.size(), " output blocks)");

  json block_out = json::array(), down = json::array(), up = json::array();
  std::vector<int64_t> channels;
  std::vector<int64_t> depth;  // transformer blocks per attention, per down block with attention
  for (int64_t b = 0; b < nb; ++b) {
    const std::string first = "input_blocks." + s(1 + b * (L + 1));
    const int64_t c = need(ckpt, p + first + ".0.out_layers.3.weight", what).size(0);
    channels.push_back(c);
    block_out.push_back(c);
    const bool attn = has(ckpt, p + first + ".1.proj_in.weight");
    down.push_back(attn ? "CrossAttnDownBlock2D" : "DownBlock2D");
    if (attn) depth.push_back(static_cast<int64_t>(indices(ckpt, p + first + ".1.transformer_blocks.").size()));
  }
  for (int64_t u = 0; u < nb; ++u)
    up.push_back(has(ckpt, p + "output_blocks." + s(u * (L + 1)) + ".1.proj_in.weight") ? "CrossAttnUpBlock2D"
                                                                                        : "UpBlock2D");
  DMX_CHECK_FORMAT(has(ckpt, p + "middle_block.1.proj_in.weight"),
                   "UNet: checkpoint has no mid-block attention (", p, "middle_block.1.*): not an SD 1.x/2.x UNet");
  if (depth.empty())
    depth.push_back(static_cast<int64_t>(indices(ckpt, p + "middle_block.1.transformer_blocks.").size()));

  // Cross-attention width and projection kind, from the first attention.
  int64_t cross_dim = -1;
  bool linear = false;
  for (auto it = ckpt.lower_bound(p); it != ckpt.end() && starts_with(it->first, p); ++it) {
    if (cross_dim < 0 && it->first.size() > 18 &&
        it->first.compare(it->first.size() - 18, 18, ".attn2.to_k.weight") == 0)
      cross_dim = it->second.size(1);  // [inner, cross_attention_dim]
  }
  linear = need(ckpt, p + "middle_block.1.proj_in.weight", what).dim() == 2;  // Linear vs 1x1 Conv2d
  DMX_CHECK_FORMAT(cross_dim > 0, "UNet: checkpoint has no cross-attention (attn2.to_k) weights");

  // Heads. diffusers' "attention_head_dim" holds the number of heads for these models.
  const bool sd2 = ldm_text_encoder_kind(ckpt) == LdmTextEncoder::OpenClip ||
                   (ldm_text_encoder_kind(ckpt) == LdmTextEncoder::None && cross_dim == 1024);
  json heads;
  const json* up_params = yaml.is_null() ? nullptr : yaml_at(yaml, {"model", "params", "unet_config", "params"});
  const json* nh = up_params ? yaml_at(*up_params, {"num_heads"}) : nullptr;
  const json* nhc = up_params ? yaml_at(*up_params, {"num_head_channels"}) : nullptr;
  if (nh && nh->is_number_integer() && nh->get<int64_t>() > 0) {
    heads = nh->get<int64_t>();
  } else if (nhc && nhc->is_number_integer() && nhc->get<int64_t>() > 0) {
    const int64_t d = nhc->get<int64_t>();
    heads = json::array();
    for (int64_t c : channels) {
      DMX_CHECK_FORMAT(c % d == 0, "UNet: the .yaml gives num_head_channels ", d, ", which does not divide the ",
                       c, " channels of a UNet block");
      heads.push_back(c / d);
    }
  } else if (sd2) {
    heads = json::array();
    for (int64_t c : channels) {
      DMX_CHECK_ARG(c % 64 == 0, "UNet: this SD2-family checkpoint has a block of ", c,
                    " channels, not a multiple of the standard head size 64, so the number of heads is unknown.",
                    kConfigHint);
      heads.push_back(c / 64);
    }
  } else {
    for (int64_t c : channels)
      DMX_CHECK_ARG(c % 8 == 0, "UNet: this SD1-family checkpoint has a block of ", c,
                    " channels, not divisible into the standard 8 heads.", kConfigHint);
    heads = 8;
  }

  json depth_json = depth[0];
  if (std::any_of(depth.begin(), depth.end(), [&](int64_t d) { return d != depth[0]; }))
    depth_json = depth;  // per down block (diffusers accepts a list)

  const int64_t vae_blocks = static_cast<int64_t>(indices(ckpt, std::string(kLdmVaePrefix) + "encoder.down.").size());
  const int64_t vae_scale = int64_t{1} << std::max<int64_t>(0, (vae_blocks > 0 ? vae_blocks : 4) - 1);

  return json{
      {"_class_name", "UNet2DConditionModel"},
      {"act_fn", "silu"},
      {"attention_head_dim", heads},
      {"block_out_channels", block_out},
      {"center_input_sample", false},
      {"class_embed_type", nullptr},
      {"cross_attention_dim", cross_dim},
      {"down_block_types", down},
      {"downsample_padding", 1},
      {"dual_cross_attention", false},
      {"flip_sin_to_cos", true},
      {"freq_shift", 0},
      {"in_channels", conv_in.size(1)},
      {"layers_per_block", L},
      {"mid_block_scale_factor", 1},
      {"mid_block_type", "UNetMidBlock2DCrossAttn"},
      {"norm_eps", 1e-5},
      {"norm_num_groups", 32},
      {"num_attention_heads", nullptr},
      {"only_cross_attention", false},
      {"out_channels", conv_out.size(0)},
      {"sample_size", image_size(ckpt, yaml) / vae_scale},
      {"transformer_layers_per_block", depth_json},
      {"up_block_types", up},
      {"upcast_attention", false},
      {"use_linear_projection", linear},
  };
}

json detect_ldm_vae_config(const TensorMap& ckpt, const json& yaml) {
  const char* what = "VAE";
  const std::string p = kLdmVaePrefix;
  auto s = [](auto v) { return std::to_string(v); };
  const std::set<int64_t> downs = indices(ckpt, p + "encoder.down.");
  DMX_CHECK_FORMAT(!downs.empty() && contiguous_from(downs, 0, static_cast<int64_t>(downs.size())),
                   "VAE: checkpoint has no (or non-contiguous) ", p, "encoder.down.N.* blocks");
  const std::set<int64_t> layers = indices(ckpt, p + "encoder.down.0.block.");
  DMX_CHECK_FORMAT(!layers.empty(), "VAE: checkpoint has no ", p, "encoder.down.0.block.N.*");
  json block_out = json::array(), down_types = json::array(), up_types = json::array();
  for (int64_t i : downs) {
    block_out.push_back(need(ckpt, p + "encoder.down." + s(i) + ".block.0.conv1.weight", what).size(0));
    down_types.push_back("DownEncoderBlock2D");
    up_types.push_back("UpDecoderBlock2D");
  }
  double scaling = 0.18215;
  if (const json* sf = yaml.is_null() ? nullptr : yaml_at(yaml, {"model", "params", "scale_factor"}))
    if (sf->is_number()) scaling = sf->get<double>();
  return json{
      {"_class_name", "AutoencoderKL"},
      {"act_fn", "silu"},
      {"block_out_channels", block_out},
      {"down_block_types", down_types},
      {"force_upcast", true},
      {"in_channels", need(ckpt, p + "encoder.conv_in.weight", what).size(1)},
      {"latent_channels", need(ckpt, p + "decoder.conv_in.weight", what).size(1)},
      {"layers_per_block", static_cast<int64_t>(layers.size())},
      {"norm_num_groups", 32},
      {"out_channels", need(ckpt, p + "decoder.conv_out.weight", what).size(0)},
      {"sample_size", image_size(ckpt, yaml)},
      {"scaling_factor", scaling},
      {"up_block_types", up_types},
  };
}

json detect_ldm_clip_config(const TensorMap& ckpt, int64_t num_attention_heads) {
  const char* what = "text encoder";
  int64_t hidden = 0, vocab = 0, positions = 0, layers = 0, intermediate = 0;
  std::string act;
  switch (ldm_text_encoder_kind(ckpt)) {
    case LdmTextEncoder::Clip: {
      // With or without the `text_model.` level.
      std::string p = std::string(kLdmClipPrefix) + "text_model.";
      if (!has(ckpt, p + "embeddings.token_embedding.weight")) p = kLdmClipPrefix;
      const at::Tensor& tok = need(ckpt, p + "embeddings.token_embedding.weight", what);  // [vocab, hidden]
      vocab = tok.size(0);
      hidden = tok.size(1);
      positions = need(ckpt, p + "embeddings.position_embedding.weight", what).size(0);
      layers = static_cast<int64_t>(indices(ckpt, p + "encoder.layers.").size());
      intermediate = need(ckpt, p + "encoder.layers.0.mlp.fc1.weight", what).size(0);
      act = "quick_gelu";
      break;
    }
    case LdmTextEncoder::OpenClip: {
      const std::string p = kLdmOpenClipPrefix;
      const at::Tensor& tok = need(ckpt, p + "token_embedding.weight", what);
      vocab = tok.size(0);
      hidden = tok.size(1);
      positions = need(ckpt, p + "positional_embedding", what).size(0);
      const int64_t total = static_cast<int64_t>(indices(ckpt, p + "transformer.resblocks.").size());
      DMX_CHECK_FORMAT(total >= 2, "text encoder: the OpenCLIP tower needs at least 2 layers, got ", total);
      layers = total - 1;  // SD2 uses the penultimate layer
      intermediate = need(ckpt, p + "transformer.resblocks.0.mlp.c_fc.weight", what).size(0);
      act = "gelu";
      break;
    }
    case LdmTextEncoder::None:
      throw FormatError(detail::concat("text encoder: checkpoint has no ", kLdmClipPrefix, "* (SD1 CLIP) or ",
                                       kLdmOpenClipPrefix, "* (SD2 OpenCLIP) weights"));
  }
  DMX_CHECK_FORMAT(layers >= 1, "text encoder: checkpoint has no encoder layers");
  if (num_attention_heads <= 0) {
    DMX_CHECK_ARG(hidden % 64 == 0, "text encoder: this checkpoint has a non-standard text encoder width (hidden ",
                  hidden, ", not a multiple of the head size 64), so its number of attention heads is unknown.",
                  kConfigHint);
    num_attention_heads = hidden / 64;
  }
  DMX_CHECK_ARG(hidden % num_attention_heads == 0, "text encoder: num_attention_heads ", num_attention_heads,
                " does not divide the hidden size ", hidden);
  return json{
      {"architectures", {"CLIPTextModel"}},
      {"attention_dropout", 0.0},
      {"bos_token_id", 0},
      {"eos_token_id", 2},
      {"hidden_act", act},
      {"hidden_size", hidden},
      {"initializer_factor", 1.0},
      {"initializer_range", 0.02},
      {"intermediate_size", intermediate},
      {"layer_norm_eps", 1e-5},
      {"max_position_embeddings", positions},
      {"model_type", "clip_text_model"},
      {"num_attention_heads", num_attention_heads},
      {"num_hidden_layers", layers},
      {"pad_token_id", 1},
      {"projection_dim", act == "gelu" ? 512 : hidden},
      {"vocab_size", vocab},
  };
}

json ldm_scheduler_config(const TensorMap& ckpt, const json& yaml) {
  double beta_start = 0.00085, beta_end = 0.012;
  int64_t timesteps = 1000;
  if (!yaml.is_null()) {
    if (const json* v = yaml_at(yaml, {"model", "params", "linear_start"}); v && v->is_number())
      beta_start = v->get<double>();
    if (const json* v = yaml_at(yaml, {"model", "params", "linear_end"}); v && v->is_number())
      beta_end = v->get<double>();
    if (const json* v = yaml_at(yaml, {"model", "params", "timesteps"}); v && v->is_number_integer())
      timesteps = v->get<int64_t>();
  }
  return json{
      {"_class_name", "PNDMScheduler"},
      {"beta_end", beta_end},
      {"beta_schedule", "scaled_linear"},
      {"beta_start", beta_start},
      {"clip_sample", false},
      {"num_train_timesteps", timesteps},
      {"prediction_type", is_v_model(ckpt, yaml) ? "v_prediction" : "epsilon"},
      {"set_alpha_to_one", false},
      {"skip_prk_steps", true},
      {"steps_offset", 1},
      {"timestep_spacing", "leading"},
      {"trained_betas", nullptr},
  };
}

// ---------------------------------------------------------------------------------------------
// YAML subset.

namespace {

struct YamlLine {
  int indent;
  std::string text;
  int number;
};

class YamlReader {
 public:
  YamlReader(const std::string& text, const std::string& what) : what_(what) {
    std::istringstream in(text);
    std::string line;
    int number = 0;
    while (std::getline(in, line)) {
      ++number;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      line = strip_comment(line);
      size_t indent = 0;
      while (indent < line.size() && line[indent] == ' ') ++indent;
      if (indent < line.size() && line[indent] == '\t') fail(number, "tabs are not allowed for indentation");
      std::string body = trim(line.substr(indent));
      if (body.empty() || body == "---" || body == "...") continue;
      lines_.push_back({static_cast<int>(indent), body, number});
    }
  }

  json parse() {
    if (lines_.empty()) return json::object();
    size_t pos = 0;
    json j = node(pos, lines_[0].indent);
    if (pos < lines_.size()) fail(lines_[pos].number, "unexpected indentation");
    return j;
  }

 private:
  [[noreturn]] void fail(int line, const std::string& why) const {
    throw FormatError(detail::concat(what_, ": line ", line, ": ", why, " (dmx reads a YAML subset)"));
  }

  static std::string trim(const std::string& s) {
    size_t b = 0, e = s.size();
    while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
    while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
    return s.substr(b, e - b);
  }

  // A '#' at the start or after a space, outside quotes, starts a comment.
  static std::string strip_comment(const std::string& s) {
    char quote = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      const char c = s[i];
      if (quote) {
        if (c == quote) quote = 0;
      } else if (c == '"' || c == '\'') {
        quote = c;
      } else if (c == '#' && (i == 0 || s[i - 1] == ' ' || s[i - 1] == '\t')) {
        return s.substr(0, i);
      }
    }
    return s;
  }

  // Position of the ':' that ends a mapping key (followed by a space or the end), outside quotes and
  // brackets; npos when the text is not `key: value`.
  static size_t key_colon(const std::string& s) {
    char quote = 0;
    int depth = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      const char c = s[i];
      if (quote) {
        if (c == quote) quote = 0;
      } else if (c == '"' || c == '\'') {
        quote = c;
      } else if (c == '[' || c == '{') {
        ++depth;
      } else if (c == ']' || c == '}') {
        --depth;
      } else if (c == ':' && depth == 0 && (i + 1 == s.size() || s[i + 1] == ' ')) {
        return i;
      }
    }
    return std::string::npos;
  }

  static bool is_seq_item(const std::string& s) { return s == "-" || s.compare(0, 2, "- ") == 0; }

  json node(size_t& pos, int indent) {
    return is_seq_item(lines_[pos].text) ? sequence(pos, indent) : mapping(pos, indent);
  }

  // The value of a key (or sequence item) whose text after ':' / '-' is empty: a nested block or null.
  json nested(size_t& pos, int parent_indent, bool allow_same_indent_seq) {
    if (pos < lines_.size() && lines_[pos].indent > parent_indent) return node(pos, lines_[pos].indent);
    if (allow_same_indent_seq && pos < lines_.size() && lines_[pos].indent == parent_indent &&
        is_seq_item(lines_[pos].text))
      return sequence(pos, parent_indent);
    return nullptr;
  }

  json mapping(size_t& pos, int indent) {
    json obj = json::object();
    while (pos < lines_.size() && lines_[pos].indent == indent && !is_seq_item(lines_[pos].text)) {
      const YamlLine& ln = lines_[pos];
      const size_t colon = key_colon(ln.text);
      if (colon == std::string::npos) fail(ln.number, "expected 'key: value', got '" + ln.text + "'");
      std::string key = trim(ln.text.substr(0, colon));
      if (key.size() >= 2 && (key[0] == '"' || key[0] == '\'') && key.back() == key[0])
        key = key.substr(1, key.size() - 2);
      const std::string value = trim(ln.text.substr(colon + 1));
      const int number = ln.number;
      ++pos;
      obj[key] = value.empty() ? nested(pos, indent, true) : scalar_or_flow(value, number);
    }
    if (pos < lines_.size() && lines_[pos].indent > indent) fail(lines_[pos].number, "unexpected indentation");
    return obj;
  }

  json sequence(size_t& pos, int indent) {
    json arr = json::array();
    while (pos < lines_.size() && lines_[pos].indent == indent && is_seq_item(lines_[pos].text)) {
      YamlLine& ln = lines_[pos];
      const std::string item = trim(ln.text.substr(1));
      if (item.empty()) {
        ++pos;
        arr.push_back(nested(pos, indent, false));
      } else if (key_colon(item) != std::string::npos) {
        // "- key: value" opens a mapping whose keys line up with `key`.
        const size_t offset = ln.text.find(item);
        ln.indent = indent + static_cast<int>(offset);
        ln.text = item;
        arr.push_back(mapping(pos, ln.indent));
      } else {
        arr.push_back(scalar_or_flow(item, ln.number));
        ++pos;
      }
    }
    return arr;
  }

  json scalar_or_flow(const std::string& text, int number) {
    size_t i = 0;
    json v = flow(text, i, number, /*top=*/true);
    while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
    if (i != text.size()) fail(number, "unexpected text after a value: '" + text.substr(i) + "'");
    return v;
  }

  // Parses one value starting at text[i]; inside brackets, plain scalars end at ',' ']' '}'.
  json flow(const std::string& text, size_t& i, int number, bool top) {
    while (i < text.size() && text[i] == ' ') ++i;
    if (i >= text.size()) return nullptr;
    const char c = text[i];
    if (c == '[' || c == '{') {
      const bool list = c == '[';
      const char close = list ? ']' : '}';
      json out = list ? json::array() : json::object();
      ++i;
      while (true) {
        while (i < text.size() && text[i] == ' ') ++i;
        if (i >= text.size()) fail(number, std::string("missing '") + close + "'");
        if (text[i] == close) {
          ++i;
          break;
        }
        if (list) {
          out.push_back(flow(text, i, number, false));
        } else {
          json key = flow(text, i, number, false);
          while (i < text.size() && text[i] == ' ') ++i;
          if (i >= text.size() || text[i] != ':') fail(number, "expected ':' in a flow mapping");
          ++i;
          out[key.is_string() ? key.get<std::string>() : key.dump()] = flow(text, i, number, false);
        }
        while (i < text.size() && text[i] == ' ') ++i;
        if (i < text.size() && text[i] == ',') ++i;
        else if (i >= text.size() || text[i] != close) fail(number, std::string("expected ',' or '") + close + "'");
      }
      return out;
    }
    if (c == '"' || c == '\'') {
      std::string s;
      ++i;
      while (true) {
        if (i >= text.size()) fail(number, "unterminated string");
        const char d = text[i++];
        if (d == c) {
          if (c == '\'' && i < text.size() && text[i] == '\'') {  // '' is a quote in single quotes
            s += '\'';
            ++i;
            continue;
          }
          break;
        }
        if (c == '"' && d == '\\' && i < text.size()) {
          const char e = text[i++];
          s += e == 'n' ? '\n' : e == 't' ? '\t' : e;
          continue;
        }
        s += d;
      }
      return s;
    }
    size_t end = i;
    if (top) {
      end = text.size();
    } else {
      while (end < text.size() && text[end] != ',' && text[end] != ']' && text[end] != '}' &&
             !(text[end] == ':' && (end + 1 == text.size() || text[end + 1] == ' ')))
        ++end;
    }
    const std::string plain = trim(text.substr(i, end - i));
    i = end;
    return plain_scalar(plain);
  }

  static json plain_scalar(const std::string& s) {
    if (s == "true" || s == "True" || s == "TRUE") return true;
    if (s == "false" || s == "False" || s == "FALSE") return false;
    if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return nullptr;
    // Integers and decimals (1.0e-04, 0.0120, -3, .5).
    size_t k = 0;
    if (s[k] == '+' || s[k] == '-') ++k;
    size_t digits = 0, frac = 0;
    while (k < s.size() && std::isdigit(static_cast<unsigned char>(s[k]))) ++k, ++digits;
    bool is_float = false;
    if (k < s.size() && s[k] == '.') {
      is_float = true;
      ++k;
      while (k < s.size() && std::isdigit(static_cast<unsigned char>(s[k]))) ++k, ++frac;
    }
    if (digits + frac > 0 && k < s.size() && (s[k] == 'e' || s[k] == 'E')) {
      size_t e = k + 1;
      if (e < s.size() && (s[e] == '+' || s[e] == '-')) ++e;
      size_t ed = 0;
      while (e < s.size() && std::isdigit(static_cast<unsigned char>(s[e]))) ++e, ++ed;
      if (ed > 0) {
        is_float = true;
        k = e;
      }
    }
    if (digits + frac > 0 && k == s.size()) {
      try {
        if (!is_float) return std::stoll(s);
        return std::stod(s);
      } catch (const std::exception&) {
        return s;  // out of range: keep the text
      }
    }
    return s;
  }

  std::string what_;
  std::vector<YamlLine> lines_;
};

}  // namespace

json parse_ldm_yaml(const std::string& text, const std::string& what) { return YamlReader(text, what).parse(); }


// ---------------------------------------------------------------------------------------------
// ControlNet (cldm.cldm.ControlNet, `control_model.*`; diffusers convert_controlnet_checkpoint): the UNet's
// encoder tables plus the hint encoder, the zero convolutions and middle_block_out.

std::string ldm_controlnet_prefix(const TensorMap& ckpt) {
  if (has(ckpt, std::string(kLdmControlNetPrefix) + "input_blocks.0.0.weight")) return kLdmControlNetPrefix;
  if (has(ckpt, "input_blocks.0.0.weight") && has(ckpt, "input_hint_block.0.weight")) return "";
  throw FormatError(
      "ControlNet: not an original ControlNet checkpoint (no control_model.input_blocks.0.0.weight and no "
      "input_blocks.0.0.weight + input_hint_block.0.weight)");
}

namespace {
// The input_hint_block conv indices (Conv2d, SiLU, Conv2d, ... : even numbers), in order.
std::vector<int64_t> hint_convs(const TensorMap& ckpt, const std::string& p) {
  const std::set<int64_t> idx = indices(ckpt, p + "input_hint_block.");
  std::vector<int64_t> v(idx.begin(), idx.end());
  DMX_CHECK_FORMAT(v.size() >= 2 && v.size() % 2 == 0, "ControlNet: input_hint_block must hold conv_in, pairs of "
                   "(conv, strided conv) and conv_out, got ", v.size(), " convolutions");
  return v;
}
}  // namespace

json detect_ldm_controlnet_config(const TensorMap& ckpt, const json& yaml) {
  const char* what = "ControlNet";
  const std::string p = ldm_controlnet_prefix(ckpt);
  auto s = [](auto v) { return std::to_string(v); };
  const at::Tensor& conv_in = need(ckpt, p + "input_blocks.0.0.weight", what);  // [C0, in, 3, 3]
  DMX_CHECK_FORMAT(conv_in.dim() == 4, "ControlNet: conv_in weight must be 4-D, got ", conv_in.sizes());
  std::set<int64_t> inputs = indices(ckpt, p + "input_blocks.");
  inputs.erase(0);
  DMX_CHECK_FORMAT(!inputs.empty(), "ControlNet: checkpoint has no ", p, "input_blocks.1.*");
  const int64_t M = *inputs.rbegin();
  std::vector<int64_t> ops;
  for (int64_t i : inputs)
    if (has(ckpt, p + "input_blocks." + s(i) + ".0.op.weight")) ops.push_back(i);
  const int64_t L = ops.empty() ? M : ops[0] - 1;
  const int64_t nb = static_cast<int64_t>(ops.size()) + 1;
  bool layout_ok = L >= 1 && M == nb * (L + 1) - 1 && contiguous_from(inputs, 1, M);
  for (size_t k = 0; layout_ok && k < ops.size(); ++k) layout_ok = ops[k] == static_cast<int64_t>(k + 1) * (L + 1);
  layout_ok = layout_ok && contiguous_from(indices(ckpt, p + "zero_convs."), 0, M + 1);
  DMX_CHECK_FORMAT(layout_ok, "ControlNet: unrecognised input_blocks/zero_convs layout (", M, " input blocks, ",
                   ops.size(), " downsamplers)");

  json block_out = json::array(), down = json::array();
  std::vector<int64_t> channels, depth;
  for (int64_t b = 0; b < nb; ++b) {
    const std::string first = "input_blocks." + s(1 + b * (L + 1));
    const int64_t c = need(ckpt, p + first + ".0.out_layers.3.weight", what).size(0);
    channels.push_back(c);
    block_out.push_back(c);
    const bool attn = has(ckpt, p + first + ".1.proj_in.weight");
    down.push_back(attn ? "CrossAttnDownBlock2D" : "DownBlock2D");
    if (attn) depth.push_back(static_cast<int64_t>(indices(ckpt, p + first + ".1.transformer_blocks.").size()));
  }
  DMX_CHECK_FORMAT(has(ckpt, p + "middle_block.1.proj_in.weight"), "ControlNet: checkpoint has no mid-block "
                   "attention (", p, "middle_block.1.*)");
  if (depth.empty()) depth.push_back(static_cast<int64_t>(indices(ckpt, p + "middle_block.1.transformer_blocks.").size()));
  int64_t cross_dim = -1;
  for (auto it = ckpt.lower_bound(p); it != ckpt.end() && starts_with(it->first, p) && cross_dim < 0; ++it)
    if (it->first.size() > 18 && it->first.compare(it->first.size() - 18, 18, ".attn2.to_k.weight") == 0)
      cross_dim = it->second.size(1);
  DMX_CHECK_FORMAT(cross_dim > 0, "ControlNet: checkpoint has no cross-attention (attn2.to_k) weights");
  const bool linear = need(ckpt, p + "middle_block.1.proj_in.weight", what).dim() == 2;

  // Heads: the .yaml's control_stage_config (num_heads / num_head_channels), else SD1's 8 heads or SD2's
  // 64-wide heads (cross_attention_dim 1024), as diffusers' create_unet_diffusers_config assumes.
  const json* cp = yaml.is_null() ? nullptr : yaml_at(yaml, {"model", "params", "control_stage_config", "params"});
  const json* nh = cp ? yaml_at(*cp, {"num_heads"}) : nullptr;
  const json* nhc = cp ? yaml_at(*cp, {"num_head_channels"}) : nullptr;
  json heads;
  if (nh && nh->is_number_integer() && nh->get<int64_t>() > 0) {
    heads = nh->get<int64_t>();
  } else if (nhc && nhc->is_number_integer() && nhc->get<int64_t>() > 0) {
    heads = json::array();
    for (int64_t c : channels) {
      DMX_CHECK_FORMAT(c % nhc->get<int64_t>() == 0, "ControlNet: the .yaml's num_head_channels ", *nhc,
                       " does not divide a block of ", c, " channels");
      heads.push_back(c / nhc->get<int64_t>());
    }
  } else if (cross_dim == 1024) {
    heads = json::array();
    for (int64_t c : channels) {
      DMX_CHECK_ARG(c % 64 == 0, "ControlNet: a block of ", c, " channels is not a multiple of the SD2 head size 64;"
                    " give a .yaml beside the checkpoint with control_stage_config num_heads");
      heads.push_back(c / 64);
    }
  } else {
    heads = 8;
  }
  bool global_pool = false;
  if (cp) {
    const json* gp = yaml_at(*cp, {"global_average_pooling"});
    if (gp && gp->is_boolean()) global_pool = gp->get<bool>();
  }

  // Hint encoder widths from the tensors (they vary between checkpoints).
  const std::vector<int64_t> hc = hint_convs(ckpt, p);
  const at::Tensor& hint_in = need(ckpt, p + "input_hint_block." + s(hc.front()) + ".weight", what);
  json emb = json::array({hint_in.size(0)});
  for (size_t k = 2; k + 1 < hc.size(); k += 2)  // the strided conv of each pair
    emb.push_back(need(ckpt, p + "input_hint_block." + s(hc[k]) + ".weight", what).size(0));

  json depth_json = depth[0];
  if (std::any_of(depth.begin(), depth.end(), [&](int64_t d) { return d != depth[0]; })) depth_json = depth;
  return json{{"_class_name", "ControlNetModel"},
              {"act_fn", "silu"},
              {"attention_head_dim", heads},
              {"block_out_channels", block_out},
              {"conditioning_channels", hint_in.size(1)},
              {"conditioning_embedding_out_channels", emb},
              {"controlnet_conditioning_channel_order", "rgb"},
              {"cross_attention_dim", cross_dim},
              {"down_block_types", down},
              {"downsample_padding", 1},
              {"flip_sin_to_cos", true},
              {"freq_shift", 0},
              {"global_pool_conditions", global_pool},
              {"in_channels", conv_in.size(1)},
              {"layers_per_block", L},
              {"mid_block_scale_factor", 1},
              {"norm_eps", 1e-5},
              {"norm_num_groups", 32},
              {"only_cross_attention", false},
              {"transformer_layers_per_block", depth_json},
              {"upcast_attention", false},
              {"use_linear_projection", linear}};
}

namespace {
// control_model.* blocks -> diffusers ControlNetModel blocks. hc: the input_hint_block indices of the convolutions.
BlockTable controlnet_table(const json& cfg, const std::vector<int64_t>& hc) {
  const char* what = "ControlNet";
  const int64_t L = cfg_int(cfg, "layers_per_block", what);
  const size_t nb = cfg_list_size(cfg, "block_out_channels", what);
  const auto down_types = cfg_strings(cfg, "down_block_types", what);
  DMX_CHECK_FORMAT(down_types.size() == nb, "ControlNet config: down_block_types needs one entry per "
                   "block_out_channels entry");
  DMX_CHECK_FORMAT(L >= 1, "ControlNet config: layers_per_block must be >= 1, got ", L);
  auto s = [](auto v) { return std::to_string(v); };

  BlockTable t;
  t["time_embed.0"] = {"time_embedding.linear_1", &kParamsOnly};
  t["time_embed.2"] = {"time_embedding.linear_2", &kParamsOnly};
  t["input_blocks.0.0"] = {"conv_in", &kParamsOnly};
  for (size_t b = 0; b < nb; ++b) {
    for (int64_t j = 0; j < L; ++j) {
      const std::string in = "input_blocks." + s(1 + b * (L + 1) + j);
      t[in + ".0"] = {"down_blocks." + s(b) + ".resnets." + s(j), &kUnetResnet};
      if (starts_with(down_types[b], "CrossAttn"))
        t[in + ".1"] = {"down_blocks." + s(b) + ".attentions." + s(j), &kUnetTransformer};
    }
    if (b + 1 < nb)
      t["input_blocks." + s(1 + b * (L + 1) + L) + ".0.op"] = {"down_blocks." + s(b) + ".downsamplers.0.conv",
                                                                &kParamsOnly};
  }
  t["middle_block.0"] = {"mid_block.resnets.0", &kUnetResnet};
  t["middle_block.1"] = {"mid_block.attentions.0", &kUnetTransformer};
  t["middle_block.2"] = {"mid_block.resnets.1", &kUnetResnet};
  // One zero conv per skip connection (conv_in, every layer, every downsampler), and one after the mid block.
  const int64_t n_res = 1 + static_cast<int64_t>(nb) * (L + 1) - 1;
  for (int64_t i = 0; i < n_res; ++i) t["zero_convs." + s(i) + ".0"] = {"controlnet_down_blocks." + s(i), &kParamsOnly};
  t["middle_block_out.0"] = {"controlnet_mid_block", &kParamsOnly};
  // input_hint_block: Conv2d, SiLU, (Conv2d, SiLU, strided Conv2d, SiLU) ..., Conv2d (zero conv).
  t["input_hint_block." + s(hc.front())] = {"controlnet_cond_embedding.conv_in", &kParamsOnly};
  for (size_t k = 1; k + 1 < hc.size(); ++k)
    t["input_hint_block." + s(hc[k])] = {"controlnet_cond_embedding.blocks." + s(k - 1), &kParamsOnly};
  t["input_hint_block." + s(hc.back())] = {"controlnet_cond_embedding.conv_out", &kParamsOnly};
  return t;
}
}  // namespace

TensorMap convert_ldm_controlnet(const TensorMap& ckpt, const json& cfg) {
  const std::string p = ldm_controlnet_prefix(ckpt);
  const BlockTable t = controlnet_table(cfg, hint_convs(ckpt, p));
  return finish(convert_with(ckpt, p, t, [](const std::string&) { return false; }, [](std::string k) { return k; }),
                "ControlNet");
}

TensorMap convert_controlnet_to_ldm(const TensorMap& diffusers, const json& cfg) {
  const char* what = "ControlNet";
  // The hint encoder has conv_in, two convolutions per channel step and conv_out, at even indices of the
  // original nn.Sequential (a SiLU follows each but the last).
  const size_t steps = cfg_list_size(cfg, "conditioning_embedding_out_channels", what);
  DMX_CHECK_FORMAT(steps >= 1, "ControlNet config: conditioning_embedding_out_channels must not be empty");
  std::vector<int64_t> hc;
  for (size_t k = 0; k < 2 + 2 * (steps - 1); ++k) hc.push_back(static_cast<int64_t>(2 * k));
  // The same tables read backwards: diffusers block -> original block, leaf rules with from and to swapped.
  std::map<const LeafTable*, LeafTable> reversed_leaves;
  BlockTable inverse;
  for (const auto& [from, block] : controlnet_table(cfg, hc)) {
    auto it = reversed_leaves.find(block.leaves);
    if (it == reversed_leaves.end()) {
      LeafTable r;
      for (const LeafRule& rule : *block.leaves) {
        DMX_CHECK_FORMAT(rule.op == Op::Copy, "ControlNet: a leaf rule that is not a plain copy cannot be inverted");
        r.push_back({rule.to, rule.from, Op::Copy, rule.param});
      }
      it = reversed_leaves.emplace(block.leaves, std::move(r)).first;
    }
    inverse[block.to] = {std::string(kLdmControlNetPrefix) + from, &it->second};
  }
  return finish(convert_with(diffusers, "", inverse, [](const std::string&) { return false; },
                             [](std::string k) { return k; }),
                what);
}

}  // namespace dmx::io
