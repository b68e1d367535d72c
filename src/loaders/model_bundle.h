// A loaded Stable Diffusion model: tokenizer, text encoder, VAE, UNet and scheduler config,
// from a diffusers folder or an original single-file checkpoint.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "models/autoencoder_kl.h"
#include "models/clip_text_model.h"
#include "models/clip_tokenizer.h"
#include "models/unet_2d_condition.h"

namespace dmx::loaders {

struct LoadOptions {
  std::string config_dir;     // diffusers folder supplying configs (and tokenizer) for a single file
  std::string tokenizer_dir;  // folder with vocab.json + merges.txt
  at::ScalarType dtype = at::kFloat;
  std::string device = "cpu";
};

struct StableDiffusionModels {
  std::string name;         // folder or file stem
  std::string source_path;  // what was loaded
  std::shared_ptr<models::CLIPTokenizer> tokenizer;
  models::CLIPTextModel text_encoder{nullptr};
  models::AutoencoderKL vae{nullptr};
  models::UNet2DConditionModel unet{nullptr};
  nlohmann::json scheduler_config;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  int vae_scale_factor() const;
  int default_sample_size() const;  // unet.sample_size * vae_scale_factor
};

// fp16 runs on CUDA only: libtorch 1.13 has no float16 CPU kernels for convolution, matmul, softmax, GroupNorm,
// LayerNorm or SiLU (every layer of the model), so upcasting a few ops would not make it work, and computing in
// float32 from fp16 storage is what --dtype fp32 does. Unsupported naming --dtype and the alternatives otherwise.
void check_dtype_device(at::ScalarType dtype, const std::string& device);

// path: a diffusers folder (model_index.json) or a .safetensors single file.
std::shared_ptr<StableDiffusionModels> load_stable_diffusion(const std::string& path, const LoadOptions& opts = {});
}  // namespace dmx::loaders
