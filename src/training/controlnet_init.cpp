// A fresh ControlNet from a UNet (diffusers 0.27.2 ControlNetModel.from_unet) and writing ControlNets in the
// diffusers folder layout and the original control_model.* single-file layout. See controlnet_init.h.
#include "training/controlnet_init.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/ldm_names.h"
#include "io/safetensors.h"

namespace dmx::training {

namespace {

// The blocks from_unet copies (time_proj has no weights).
const char* const kCopiedPrefixes[] = {"conv_in.", "time_embedding.", "down_blocks.", "mid_block."};
bool is_copied(const std::string& name) {
  for (const char* p : kCopiedPrefixes)
    if (starts_with(name, p)) return true;
  return false;
}
// The zero convolutions and the hint encoder's last convolution (zero_module in ControlNetModel.__init__).
bool is_zeroed(const std::string& name) {
  return starts_with(name, "controlnet_down_blocks.") || starts_with(name, "controlnet_mid_block.") ||
         starts_with(name, "controlnet_cond_embedding.conv_out.");
}

// diffusers writes an int/list field as the user gave it; dmx keeps lists, so a uniform list is written as its
// single value (as in every SD config.json).
nlohmann::json int_or_list(const std::vector<int>& v) {
  if (!v.empty() && std::all_of(v.begin(), v.end(), [&](int x) { return x == v.front(); })) return v.front();
  return v;
}

nlohmann::json number(double v) {
  if (std::floor(v) == v && std::abs(v) < 1e15) return static_cast<int64_t>(v);
  return v;
}

io::TensorMap state_dict(torch::nn::Module& m) {
  io::TensorMap out;
  for (const auto& p : m.named_parameters(true)) out.emplace(p.key(), p.value().detach().contiguous());
  for (const auto& b : m.named_buffers(true)) out.emplace(b.key(), b.value().detach().contiguous());
  return out;
}
}  // namespace

nlohmann::json controlnet_config_json(const models::ControlNetConfig& c) {
  using nlohmann::json;
  json j = json::object();
  j["_class_name"] = "ControlNetModel";
  j["_diffusers_version"] = "0.27.2";
  j["act_fn"] = c.act_fn;
  j["addition_embed_type"] = nullptr;
  j["addition_embed_type_num_heads"] = 64;
  j["addition_time_embed_dim"] = nullptr;
  j["attention_head_dim"] = int_or_list(c.attention_head_dim);
  j["block_out_channels"] = c.block_out_channels;
  j["class_embed_type"] = nullptr;
  j["conditioning_channels"] = c.conditioning_channels;
  j["conditioning_embedding_out_channels"] = c.conditioning_embedding_out_channels;
  j["controlnet_conditioning_channel_order"] = c.controlnet_conditioning_channel_order;
  j["cross_attention_dim"] = c.cross_attention_dim;
  j["down_block_types"] = c.down_block_types;
  j["downsample_padding"] = c.downsample_padding;
  j["encoder_hid_dim"] = nullptr;
  j["encoder_hid_dim_type"] = nullptr;
  j["flip_sin_to_cos"] = c.flip_sin_to_cos;
  j["freq_shift"] = c.freq_shift;
  j["global_pool_conditions"] = c.global_pool_conditions;
  j["in_channels"] = c.in_channels;
  j["layers_per_block"] = c.layers_per_block;
  j["mid_block_scale_factor"] = number(c.mid_block_scale_factor);
  j["mid_block_type"] = "UNetMidBlock2DCrossAttn";
  j["norm_eps"] = c.norm_eps;
  j["norm_num_groups"] = c.norm_num_groups;
  j["num_attention_heads"] = c.num_attention_heads.empty() ? json(nullptr) : int_or_list(c.num_attention_heads);
  j["num_class_embeds"] = nullptr;
  j["only_cross_attention"] = c.only_cross_attention;
  j["projection_class_embeddings_input_dim"] = nullptr;
  j["resnet_time_scale_shift"] = "default";
  j["transformer_layers_per_block"] = c.transformer_layers_per_block;
  j["upcast_attention"] = c.upcast_attention;
  j["use_linear_projection"] = c.use_linear_projection;
  return j;
}

models::ControlNetModel controlnet_from_unet(models::UNet2DConditionModel& unet, int conditioning_channels,
                                             int vae_scale_factor) {
  const models::UNet2DConditionConfig& u = unet->config();
  DMX_CHECK_ARG(conditioning_channels >= 1, "conditioning_channels must be >= 1, got ", conditioning_channels);
  DMX_CHECK_SUPPORTED(u.mid_block_type == "UNetMidBlock2DCrossAttn", "ControlNet from a UNet with mid_block_type '",
                      u.mid_block_type, "' (dmx's ControlNet has UNetMidBlock2DCrossAttn)");
  DMX_CHECK_SUPPORTED(u.resnet_time_scale_shift == "default", "ControlNet from a UNet with resnet_time_scale_shift '",
                      u.resnet_time_scale_shift, "'");
  DMX_CHECK_SUPPORTED(u.class_embedding_kind().empty(), "ControlNet from a UNet with a class embedding ('",
                      u.class_embedding_kind(), "'): dmx's ControlNet has none");
  const bool only_cross = u.only_cross_attention_at(0);
  for (size_t i = 0; i < u.down_block_types.size(); ++i)
    DMX_CHECK_SUPPORTED(
        u.only_cross_attention_at(i) == only_cross,
        "ControlNet from a UNet with per-block only_cross_attention (dmx's ControlNet takes one value)");
  models::ControlNetConfig c;
  c.in_channels = u.in_channels;
  c.conditioning_channels = conditioning_channels;
  c.flip_sin_to_cos = u.flip_sin_to_cos;
  c.freq_shift = u.freq_shift;
  c.down_block_types = u.down_block_types;
  c.only_cross_attention = only_cross;
  c.block_out_channels = u.block_out_channels;
  c.layers_per_block = u.layers_per_block;
  c.downsample_padding = u.downsample_padding;
  c.mid_block_scale_factor = u.mid_block_scale_factor;
  c.act_fn = u.act_fn;
  c.norm_num_groups = u.norm_num_groups;
  c.norm_eps = u.norm_eps;
  c.cross_attention_dim = u.cross_attention_dim;
  c.transformer_layers_per_block = u.transformer_layers_per_block;
  c.attention_head_dim = u.attention_head_dim;
  c.num_attention_heads = u.num_attention_heads;
  c.use_linear_projection = u.use_linear_projection;
  c.upcast_attention = u.upcast_attention;
  c.controlnet_conditioning_channel_order = "rgb";
  // from_unet's default (16, 32, 96, 256) downsamples the control image 8x, as far as SD's VAE; a VAE with
  // another factor keeps the first log2(factor) + 1 widths so the hint lands on the latent grid.
  DMX_CHECK_ARG(vae_scale_factor == 2 || vae_scale_factor == 4 || vae_scale_factor == 8,
                "ControlNet from a UNet: the VAE factor must be 2, 4 or 8, got ", vae_scale_factor);
  c.conditioning_embedding_out_channels = {16, 32, 96, 256};
  c.conditioning_embedding_out_channels.resize(vae_scale_factor == 8 ? 4 : vae_scale_factor == 4 ? 3 : 2);
  c.validate();

  models::ControlNetModel net(c);
  at::NoGradGuard no_grad;
  const at::Tensor ref = unet->parameters().empty() ? at::Tensor() : unet->parameters().front();
  if (ref.defined()) net->to(ref.device(), ref.scalar_type());
  auto unet_params = unet->named_parameters(true);
  std::vector<std::string> missing;
  size_t copied = 0;
  for (auto& p : net->named_parameters(true)) {
    const std::string& name = p.key();
    if (is_zeroed(name)) {
      p.value().zero_();
    } else if (is_copied(name)) {
      const at::Tensor* src = unet_params.find(name);
      if (!src || !src->sizes().equals(p.value().sizes())) {
        missing.push_back(name);
        continue;
      }
      p.value().copy_(*src);
      ++copied;
    }
  }
  // Every UNet weight of the copied blocks must have found its place too.
  for (const auto& p : unet_params)
    if (is_copied(p.key()) && !net->named_parameters(true).find(p.key())) missing.push_back("unet " + p.key());
  DMX_CHECK_FORMAT(
      missing.empty(), "controlnet_from_unet: ", missing.size(),
      " weight(s) of the UNet encoder have no same-shaped counterpart in the ControlNet, first: ", missing.front());
  DMX_CHECK_FORMAT(copied > 0, "controlnet_from_unet: no weight copied from the UNet");
  return net;
}

void save_controlnet_diffusers(models::ControlNetModel& net, const std::string& dir) {
  DMX_CHECK_ARG(!dir.empty(), "ControlNet output folder must not be empty");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  DMX_CHECK_IO(!ec && is_directory(dir), "cannot create ControlNet output folder '", dir, "': ", ec.message());
  io::TensorMap sd = state_dict(*net);
  for (auto& [k, v] : sd) v = v.to(at::kCPU);
  io::save_safetensors(join_path(dir, "diffusion_pytorch_model.safetensors"), sd);
  const std::string text = controlnet_config_json(net->config()).dump(2) + "\n";
  write_bytes_atomic(join_path(dir, "config.json"), text.data(), text.size());
}

void save_controlnet_original(models::ControlNetModel& net, const std::string& file) {
  DMX_CHECK_ARG(!file.empty(), "ControlNet output file must not be empty");
  io::TensorMap sd = state_dict(*net);
  for (auto& [k, v] : sd) v = v.to(at::kCPU);
  const io::TensorMap ldm = io::convert_controlnet_to_ldm(sd, controlnet_config_json(net->config()));
  io::save_safetensors(file, ldm);
}
}  // namespace dmx::training
