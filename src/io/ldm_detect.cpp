// Config detection for original single-file checkpoints: diffusers config.json of the UNet, VAE and text encoder
// from tensor shapes (and the LDM .yaml when given), and the scheduler config. Mirrors diffusers 0.27.2
// pipelines/stable_diffusion/convert_from_ckpt.py (create_unet_diffusers_config, create_vae_diffusers_config)
// and loaders/single_file_utils.py.
#include <ATen/ATen.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "core/text.h"
#include "dmx/error.h"
#include "io/ldm_names.h"
#include "io/ldm_tables.h"

namespace dmx::io {

using namespace ldm;

json detect_ldm_unet_config(const TensorMap& ckpt, const json& yaml) {
  const char* what = "UNet";
  const std::string p = kLdmUnetPrefix;
  auto s = [](auto v) { return std::to_string(v); };
  const at::Tensor& conv_in = need(ckpt, p + "input_blocks.0.0.weight", what);  // [C0, in, 3, 3]
  const at::Tensor& conv_out = need(ckpt, p + "out.2.weight", what);            // [out, C0, 3, 3]
  DMX_CHECK_FORMAT(conv_in.dim() == 4 && conv_out.dim() == 4, "UNet: conv_in/conv_out weights must be 4-D, got ",
                   conv_in.sizes(), " and ", conv_out.sizes());

  // Layout: input_blocks 1..M are nb blocks of L layers, with a downsampler (…0.op) after all but the last.
  InputBlocks in = input_blocks(ckpt, p, what);
  const int64_t M = in.M, L = in.L, nb = in.nb;
  const std::set<int64_t> outputs = indices(ckpt, p + "output_blocks.");
  const bool layout_ok = in.layout_ok && contiguous_from(outputs, 0, nb * (L + 1));
  DMX_CHECK_FORMAT(layout_ok, "UNet: unrecognised input_blocks/output_blocks layout (", M, " input blocks, ",
                   in.ops.size(), " downsamplers, ", outputs.size(), " output blocks)");

  json block_out = std::move(in.block_out), down = std::move(in.down), up = json::array();
  std::vector<int64_t> channels = std::move(in.channels);
  std::vector<int64_t> depth = std::move(in.depth);  // transformer blocks per attention block
  for (int64_t u = 0; u < nb; ++u)
    up.push_back(has(ckpt, p + "output_blocks." + s(u * (L + 1)) + ".1.proj_in.weight") ? "CrossAttnUpBlock2D"
                                                                                        : "UpBlock2D");
  DMX_CHECK_FORMAT(has(ckpt, p + "middle_block.1.proj_in.weight"), "UNet: checkpoint has no mid-block attention (", p,
                   "middle_block.1.*): not an SD 1.x/2.x UNet");
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
      DMX_CHECK_FORMAT(c % d == 0, "UNet: the .yaml gives num_head_channels ", d, ", which does not divide the ", c,
                       " channels of a UNet block");
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

  // Per-block only_cross_attention (the LDM yaml's disable_self_attentions): from the yaml when given, else from
  // the shapes: attn1 reading another width than its block's (the text's) attends to the text. A block whose
  // width equals the text's cannot be told apart by shape and counts as self-attention.
  json only_cross = false;
  const json* dsa = up_params ? yaml_at(*up_params, {"disable_self_attentions"}) : nullptr;
  if (dsa && dsa->is_array()) {
    DMX_CHECK_FORMAT(dsa->size() == static_cast<size_t>(nb) &&
                         std::all_of(dsa->begin(), dsa->end(), [](const json& v) { return v.is_boolean(); }),
                     "UNet: the .yaml's disable_self_attentions must be one boolean per level (", nb, "), got ",
                     dsa->dump());
    only_cross = *dsa;
  } else {
    json flags = json::array();
    bool any = false;
    for (int64_t b = 0; b < nb; ++b) {
      const std::string k = p + "input_blocks." + s(1 + b * (L + 1)) + ".1.transformer_blocks.0.attn1.to_k.weight";
      const bool cross = has(ckpt, k) && ckpt.at(k).dim() == 2 && ckpt.at(k).size(1) != channels[b];
      any = any || cross;
      flags.push_back(cross);
    }
    if (any) only_cross = flags;
  }

  // Class conditioning (openaimodel.py's label_emb): an nn.Embedding for an int num_classes (the x4 upscaler's
  // noise level), or "sequential" Linear-SiLU-Linear over adm_in_channels (Stable unCLIP: class_embed_type
  // projection; SDXL's, with a 2048/1280-wide text, is addition_embed_type text_time, as diffusers reads it).
  json class_embed_type = nullptr, num_class_embeds = nullptr, projection_dim = nullptr;
  json addition_embed_type = nullptr, addition_time_embed_dim = nullptr;
  if (has(ckpt, p + "label_emb.weight")) {
    const at::Tensor& e = ckpt.at(p + "label_emb.weight");  // [num_classes, time_embed_dim]
    DMX_CHECK_FORMAT(e.dim() == 2, "UNet: label_emb.weight must be a 2-D embedding table, got ", e.sizes());
    num_class_embeds = e.size(0);
  } else if (has(ckpt, p + "label_emb.0.0.weight")) {
    const at::Tensor& w = ckpt.at(p + "label_emb.0.0.weight");  // [time_embed_dim, adm_in_channels]
    DMX_CHECK_FORMAT(w.dim() == 2, "UNet: label_emb.0.0.weight must be a 2-D linear weight, got ", w.sizes());
    projection_dim = w.size(1);
    if (cross_dim == 2048 || cross_dim == 1280) {
      addition_embed_type = "text_time";
      addition_time_embed_dim = 256;
    } else {
      class_embed_type = "projection";
    }
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
      {"addition_embed_type", addition_embed_type},
      {"addition_time_embed_dim", addition_time_embed_dim},
      {"class_embed_type", class_embed_type},
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
      {"num_class_embeds", num_class_embeds},
      {"only_cross_attention", only_cross},
      {"out_channels", conv_out.size(0)},
      {"projection_class_embeddings_input_dim", projection_dim},
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

}  // namespace dmx::io
