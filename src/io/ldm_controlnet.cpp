// ControlNet single files (cldm.cldm.ControlNet, `control_model.*`; diffusers convert_controlnet_checkpoint):
// detection from tensor shapes and the conversion both ways, by the UNet encoder's tables plus the hint encoder,
// the zero convolutions and middle_block_out.
#include <ATen/ATen.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/text.h"
#include "dmx/error.h"
#include "io/ldm_names.h"
#include "io/ldm_tables.h"

namespace dmx::io {

using namespace ldm;

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
  DMX_CHECK_FORMAT(v.size() >= 2 && v.size() % 2 == 0,
                   "ControlNet: input_hint_block must hold conv_in, pairs of "
                   "(conv, strided conv) and conv_out, got ",
                   v.size(), " convolutions");
  return v;
}
}  // namespace

json detect_ldm_controlnet_config(const TensorMap& ckpt, const json& yaml) {
  const char* what = "ControlNet";
  const std::string p = ldm_controlnet_prefix(ckpt);
  auto s = [](auto v) { return std::to_string(v); };
  const at::Tensor& conv_in = need(ckpt, p + "input_blocks.0.0.weight", what);  // [C0, in, 3, 3]
  DMX_CHECK_FORMAT(conv_in.dim() == 4, "ControlNet: conv_in weight must be 4-D, got ", conv_in.sizes());
  InputBlocks in = input_blocks(ckpt, p, what);
  const int64_t M = in.M, L = in.L;
  const bool layout_ok = in.layout_ok && contiguous_from(indices(ckpt, p + "zero_convs."), 0, M + 1);
  DMX_CHECK_FORMAT(layout_ok, "ControlNet: unrecognised input_blocks/zero_convs layout (", M, " input blocks, ",
                   in.ops.size(), " downsamplers)");

  json block_out = std::move(in.block_out), down = std::move(in.down);
  std::vector<int64_t> channels = std::move(in.channels), depth = std::move(in.depth);

  DMX_CHECK_FORMAT(has(ckpt, p + "middle_block.1.proj_in.weight"),
                   "ControlNet: checkpoint has no mid-block "
                   "attention (",
                   p, "middle_block.1.*)");
  if (depth.empty())
    depth.push_back(static_cast<int64_t>(indices(ckpt, p + "middle_block.1.transformer_blocks.").size()));
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
      DMX_CHECK_ARG(c % 64 == 0, "ControlNet: a block of ", c,
                    " channels is not a multiple of the SD2 head size 64;"
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
  DMX_CHECK_FORMAT(down_types.size() == nb,
                   "ControlNet config: down_block_types needs one entry per "
                   "block_out_channels entry");
  DMX_CHECK_FORMAT(L >= 1, "ControlNet config: layers_per_block must be >= 1, got ", L);
  auto s = [](auto v) { return std::to_string(v); };

  BlockTable t;
  add_unet_encoder_blocks(t, L, nb, down_types);
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
  return finish(convert_with(
                    ckpt, p, t, [](const std::string&) { return false; }, [](std::string k) { return k; }),
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
  return finish(convert_with(
                    diffusers, "", inverse, [](const std::string&) { return false; }, [](std::string k) { return k; }),
                what);
}

}  // namespace dmx::io
