// SpaText model folders (spatext.h).
#include "loaders/spatext.h"

#include <ATen/ATen.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/state_dict.h"

namespace dmx::loaders {

bool is_spatext_folder(const std::string& path) {
  return is_directory(path) && path_exists(join_path(path, kSpaTextConfigFile));
}

SpaTextConfig read_spatext_config(const std::string& dir) {
  const std::string file = join_path(dir, kSpaTextConfigFile);
  SpaTextConfig c;
  try {
    const nlohmann::json j = nlohmann::json::parse(read_text_file(file, "spatext.json", kMaxJsonFileBytes));
    DMX_CHECK_FORMAT(j.value("format", "") == "dmx-spatext-1", file, ": format must be dmx-spatext-1, got '",
                     j.value("format", ""), "'");
    c.embedding_dim = j.at("embedding_dim").get<int>();
    c.map_channels = j.at("map_channels").get<int>();
    c.resolution = j.at("resolution").get<int>();
    c.lora_rank = j.value("lora_rank", 0);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(file + ": " + e.what());
  }
  DMX_CHECK_FORMAT(c.embedding_dim >= 1 && c.embedding_dim <= 4096, file, ": embedding_dim must be in [1, 4096], got ",
                   c.embedding_dim);
  DMX_CHECK_FORMAT(c.map_channels >= 1 && c.map_channels <= 60, file, ": map_channels must be in [1, 60], got ",
                   c.map_channels);
  DMX_CHECK_FORMAT(c.resolution >= 8 && c.resolution <= 4096, file, ": resolution must be in [8, 4096], got ",
                   c.resolution);
  DMX_CHECK_FORMAT(c.lora_rank >= 0 && c.lora_rank <= 1024, file, ": lora_rank must be in [0, 1024], got ",
                   c.lora_rank);
  return c;
}

models::UNet2DConditionModel widen_unet_input(const models::UNet2DConditionModel& base, int extra) {
  DMX_CHECK_ARG(extra >= 1, "widen_unet_input: extra channels must be >= 1, got ", extra);
  models::UNet2DConditionConfig cfg = base->config();
  cfg.in_channels += extra;
  models::UNet2DConditionModel unet(cfg);
  const auto p0 = base->parameters().front();
  unet->to(p0.device(), p0.scalar_type());
  // The base's state with conv_in's weight widened by zero input channels, loaded strictly.
  at::NoGradGuard no_grad;
  io::TensorMap state = io::module_state(*base);
  const at::Tensor w = state.at("conv_in.weight");
  at::Tensor wide = at::zeros({w.size(0), w.size(1) + extra, w.size(2), w.size(3)}, w.options());
  wide.narrow(1, 0, w.size(1)).copy_(w);
  state["conv_in.weight"] = wide;
  io::load_state_dict(*unet, state, "widen_unet_input");
  return unet;
}

void load_widened_conv_in(models::UNet2DConditionModel& unet, const io::TensorMap& tensors, const std::string& file,
                          const std::string& prefix, int base_in, int extra) {
  at::NoGradGuard no_grad;
  auto params = unet->named_parameters(true);
  for (const char* k : {"conv_in.weight", "conv_in.bias"}) {
    const auto it = tensors.find(prefix + k);
    DMX_CHECK_FORMAT(it != tensors.end(), file, ": no ", prefix, k);
    at::Tensor* p = params.find(k);
    DMX_CHECK_FORMAT(p != nullptr && it->second.sizes().equals(p->sizes()), file, ": ", prefix, k, " has shape ",
                     it->second.sizes(), ", the UNet (", base_in, " + ", extra, " input channels) needs ",
                     p ? p->sizes() : at::IntArrayRef{});
    p->copy_(it->second);
  }
}

int merge_unet_lora(models::UNet2DConditionModel& unet, const io::TensorMap& tensors) {
  const std::string prefix = "unet.", down_suffix = ".lora.down.weight", up_suffix = ".lora.up.weight";
  auto params = unet->named_parameters(true);
  at::NoGradGuard no_grad;
  int merged = 0;
  for (const auto& [key, down] : tensors) {
    if (!starts_with(key, prefix) || !ends_with(key, down_suffix)) continue;
    const std::string module = key.substr(prefix.size(), key.size() - prefix.size() - down_suffix.size());
    const auto up_it = tensors.find(prefix + module + up_suffix);
    DMX_CHECK_FORMAT(up_it != tensors.end(), "LoRA pair ", key, " has no ", prefix + module + up_suffix);
    at::Tensor* w = params.find(module + ".weight");
    DMX_CHECK_FORMAT(w != nullptr, "LoRA pair ", key, ": the UNet has no layer ", module);
    const at::Tensor& up = up_it->second;
    const bool conv = w->dim() == 4;
    DMX_CHECK_FORMAT(
        down.dim() == w->dim() && up.dim() == w->dim() && up.size(1) == down.size(0) && up.size(0) == w->size(0) &&
            down.size(1) == w->size(1) &&
            (!conv || (down.size(2) == w->size(2) && down.size(3) == w->size(3) && up.size(2) == 1 && up.size(3) == 1)),
        "LoRA pair ", key, ": down ", down.sizes(), " and up ", up.sizes(), " do not fit ", module, ".weight ",
        w->sizes());
    const at::Tensor d = down.to(at::kFloat).flatten(1);  // [r, in * kh * kw]
    const at::Tensor u = up.to(at::kFloat).flatten(1);    // [out, r]
    w->add_(at::matmul(u, d).view(w->sizes()).to(w->scalar_type()));
    ++merged;
  }
  return merged;
}

std::shared_ptr<SpaTextModel> load_spatext(const std::string& dir, const LoadOptions& opts) {
  DMX_CHECK_ARG(is_spatext_folder(dir), "--model: ", dir, " is not a SpaText folder (no ", kSpaTextConfigFile, ")");
  auto out = std::make_shared<SpaTextModel>();
  out->config = read_spatext_config(dir);
  const int D = out->config.embedding_dim, M = out->config.map_channels;
  LoadOptions base_opts = opts;
  base_opts.dtype = at::kFloat;  // widened and merged in float32, then cast
  out->models = load_stable_diffusion(dir, base_opts);
  auto& m = *out->models;
  out->base_in_channels = m.unet->config().in_channels;
  const std::string wfile = join_path(dir, kSpaTextWeightsFile);
  DMX_CHECK_FORMAT(path_exists(wfile), dir, ": no ", kSpaTextWeightsFile, " (the SpaText UNet's conv_in and LoRA)");
  const io::TensorMap t = io::load_safetensors(wfile);
  m.unet = widen_unet_input(m.unet, M);
  {
    const auto it = t.find("spatext.projection.weight");
    DMX_CHECK_FORMAT(it != t.end() && it->second.dim() == 2 && it->second.size(0) == M && it->second.size(1) == D,
                     wfile, ": spatext.projection.weight must be [", M, ", ", D, "]");
    out->projection = it->second.to(at::kFloat).contiguous();
  }
  load_widened_conv_in(m.unet, t, wfile, "unet.", out->base_in_channels, M);
  const int merged = merge_unet_lora(m.unet, t);
  DMX_CHECK_FORMAT(out->config.lora_rank == 0 || merged > 0, wfile, ": spatext.json says lora_rank ",
                   out->config.lora_rank, " but the file has no LoRA pair");
  if (opts.dtype != at::kFloat) {
    m.unet->to(opts.dtype);
    m.text_encoder->to(opts.dtype);
    m.vae->to(opts.dtype);
    m.dtype = opts.dtype;
  }
  out->prior = load_unclip_prior(dir, LoadOptions{}, D);
  m.source_path = dir;
  return out;
}
}  // namespace dmx::loaders
