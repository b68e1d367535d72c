// Original (CompVis/LDM) -> diffusers key names as tables (see ldm_tables.h): the leaf tables, the converter, and
// the UNet, VAE and text-encoder conversions. Detection: ldm_detect.cpp; YAML: ldm_yaml.cpp; ControlNet:
// ldm_controlnet.cpp.
// Mirrors diffusers 0.27.2 pipelines/stable_diffusion/convert_from_ckpt.py (convert_ldm_unet_checkpoint,
// convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint,
// create_unet_diffusers_config, create_vae_diffusers_config) and loaders/single_file_utils.py.
#include "io/ldm_tables.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <set>
#include <vector>

#include "core/text.h"
#include "dmx/error.h"
#include "io/ldm_names.h"

namespace dmx::io {

namespace ldm {

// A block that is one layer: only its weight and bias (conv_in, downsamplers, time_embed.0, ...).
const LeafTable kParamsOnly = {{"", ""}};

// ResBlock (openaimodel.py) -> ResnetBlock2D.
const LeafTable kUnetResnet = {
    {"in_layers.0", "norm1"},  {"in_layers.2", "conv1"},          {"out_layers.0", "norm2"},
    {"out_layers.3", "conv2"}, {"emb_layers.1", "time_emb_proj"}, {"skip_connection", "conv_shortcut"},
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
    {"self_attn.q_proj", "self_attn.q_proj"},
    {"self_attn.k_proj", "self_attn.k_proj"},
    {"self_attn.v_proj", "self_attn.v_proj"},
    {"self_attn.out_proj", "self_attn.out_proj"},
    {"layer_norm1", "layer_norm1"},
    {"layer_norm2", "layer_norm2"},
    {"mlp.fc1", "mlp.fc1"},
    {"mlp.fc2", "mlp.fc2"},
};

// OpenCLIP text tower (SD2) -> CLIPTextModel.
const LeafTable kOpenClipRoot = {
    {"token_embedding", "text_model.embeddings.token_embedding"},
    {"positional_embedding", "text_model.embeddings.position_embedding.weight", Op::Copy, true},
    {"ln_final", "text_model.final_layer_norm"},
};
const LeafTable kOpenClipLayer = {
    {"attn.in_proj_weight", "self_attn.q_proj.weight,self_attn.k_proj.weight,self_attn.v_proj.weight", Op::SplitQKV,
     true},
    {"attn.in_proj_bias", "self_attn.q_proj.bias,self_attn.k_proj.bias,self_attn.v_proj.bias", Op::SplitQKV, true},
    {"attn.out_proj", "self_attn.out_proj"},
    {"ln_1", "layer_norm1"},
    {"ln_2", "layer_norm2"},
    {"mlp.c_fc", "mlp.fc1"},
    {"mlp.c_proj", "mlp.fc2"},
};

std::vector<std::string> split_segments(const std::string& s, char sep) {
  return s.empty() ? std::vector<std::string>{} : split(s, sep);
}

std::string join_segments(const std::vector<std::string>& segs, size_t begin, size_t end) {
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
  const std::vector<std::string> from = split_segments(rule.from, '.');
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
  std::vector<std::string> to = split_segments(rule.to, '.');
  size_t n = 0;
  for (auto& seg : to)
    if (seg == "#") seg = numbers.at(n++);
  *out = dotted(join_segments(to, 0, to.size()), param);
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

void put(TensorMap* out, const std::string& name, const at::Tensor& t, const std::string& src) {
  DMX_CHECK_FORMAT(out->emplace(name, t).second, "checkpoint: '", src, "' converts to '", name,
                   "', which another key already produced");
}

TensorMap finish(Converted c, const char* component) {
  DMX_CHECK_FORMAT(c.unmatched.empty(), component, ": ", c.unmatched.size(),
                   " checkpoint key(s) match no known layer name (not an SD 1.x/2.x layout, or the config "
                   "does not match the weights): ",
                   join_abbreviated(c.unmatched));
  return std::move(c.out);
}

void add_unet_encoder_blocks(BlockTable& t, int64_t L, size_t nb, const std::vector<std::string>& down_types) {
  auto s = [](auto v) { return std::to_string(v); };
  t["time_embed.0"] = {"time_embedding.linear_1", &kParamsOnly};
  t["time_embed.2"] = {"time_embedding.linear_2", &kParamsOnly};
  t["input_blocks.0.0"] = {"conv_in", &kParamsOnly};
  // input_blocks 1.. hold, per down block, L (resnet[, attention]) pairs and then a downsampler.
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
}

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
    const std::string n =
        it->first.substr(prefix.size(), dot == std::string::npos ? std::string::npos : dot - prefix.size());
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

InputBlocks input_blocks(const TensorMap& ckpt, const std::string& p, const char* component) {
  auto s = [](int64_t v) { return std::to_string(v); };
  InputBlocks b;
  std::set<int64_t> inputs = indices(ckpt, p + "input_blocks.");
  inputs.erase(0);
  DMX_CHECK_FORMAT(!inputs.empty(), component, ": checkpoint has no ", p, "input_blocks.1.*");
  b.M = *inputs.rbegin();
  for (int64_t i : inputs)
    if (has(ckpt, p + "input_blocks." + s(i) + ".0.op.weight")) b.ops.push_back(i);
  b.L = b.ops.empty() ? b.M : b.ops[0] - 1;
  b.nb = static_cast<int64_t>(b.ops.size()) + 1;
  b.layout_ok = b.L >= 1 && b.M == b.nb * (b.L + 1) - 1 && contiguous_from(inputs, 1, b.M);
  for (size_t k = 0; b.layout_ok && k < b.ops.size(); ++k)
    b.layout_ok = b.ops[k] == static_cast<int64_t>(k + 1) * (b.L + 1);
  if (!b.layout_ok) return b;
  for (int64_t k = 0; k < b.nb; ++k) {
    const std::string first = "input_blocks." + s(1 + k * (b.L + 1));
    const int64_t c = need(ckpt, p + first + ".0.out_layers.3.weight", component).size(0);
    b.channels.push_back(c);
    b.block_out.push_back(c);
    const bool attn = has(ckpt, p + first + ".1.proj_in.weight");
    b.down.push_back(attn ? "CrossAttnDownBlock2D" : "DownBlock2D");
    if (attn) b.depth.push_back(static_cast<int64_t>(indices(ckpt, p + first + ".1.transformer_blocks.").size()));
  }
  return b;
}

}  // namespace ldm

using namespace ldm;

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
      "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
      "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
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
  add_unet_encoder_blocks(t, L, nb, down_types);
  // Class conditioning: openaimodel.py's label_emb (nn.Embedding, or Sequential(Sequential(Linear, SiLU,
  // Linear))) -> class_embedding (convert_ldm_unet_checkpoint).
  auto is_set = [&](const char* key) { return cfg.contains(key) && !cfg[key].is_null(); };
  const std::string class_type = is_set("class_embed_type") && cfg["class_embed_type"].is_string()
                                     ? cfg["class_embed_type"].get<std::string>()
                                     : "";
  if (class_type == "timestep" || class_type == "projection") {
    t["label_emb.0.0"] = {"class_embedding.linear_1", &kParamsOnly};
    t["label_emb.0.2"] = {"class_embedding.linear_2", &kParamsOnly};
  } else if (class_type.empty() && is_set("num_class_embeds")) {
    t["label_emb"] = {"class_embedding", &kParamsOnly};
  }
  t["out.0"] = {"conv_norm_out", &kParamsOnly};
  t["out.2"] = {"conv_out", &kParamsOnly};
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
  return finish(convert_with(
                    ckpt, kLdmUnetPrefix, t, [](const std::string&) { return false; }, [](std::string k) { return k; }),
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
      t["encoder.down." + s(i) + ".block." + s(j)] = {"encoder.down_blocks." + s(i) + ".resnets." + s(j), &kVaeResnet};
    if (i + 1 < nb)
      t["encoder.down." + s(i) + ".downsample.conv"] = {"encoder.down_blocks." + s(i) + ".downsamplers.0.conv",
                                                        &kParamsOnly};
    // The decoder's up.N run from the lowest resolution at N = nb - 1: diffusers numbers them in
    // the order they are applied.
    const size_t u = nb - 1 - i;
    for (int64_t j = 0; j <= L; ++j)
      t["decoder.up." + s(i) + ".block." + s(j)] = {"decoder.up_blocks." + s(u) + ".resnets." + s(j), &kVaeResnet};
    if (i > 0)
      t["decoder.up." + s(i) + ".upsample.conv"] = {"decoder.up_blocks." + s(u) + ".upsamplers.0.conv", &kParamsOnly};
  }
  return finish(convert_with(
                    ckpt, kLdmVaePrefix, t, [](const std::string&) { return false; }, [](std::string k) { return k; }),
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
      return finish(convert_with(
                        ckpt, kLdmClipPrefix, t, [](const std::string&) { return false; },
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
      return finish(convert_with(
                        ckpt, kLdmOpenClipPrefix, t,
                        [&](const std::string& k) { return layers < total && starts_with(k, dropped); },
                        [](std::string k) { return k; }),
                    what);
    }
    case LdmTextEncoder::None:
      break;
  }
  throw FormatError(detail::concat("text encoder: checkpoint has no ", kLdmClipPrefix, "* (SD1 CLIP) or ",
                                   kLdmOpenClipPrefix, "* (SD2 OpenCLIP) weights"));
}

}  // namespace dmx::io
