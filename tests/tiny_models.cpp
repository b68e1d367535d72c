#include "tiny_models.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <map>
#include <mutex>
#include <tuple>

#include "core/fs.h"
#include "dmx/error.h"
#include "dmx/train.h"
#include "test_util.h"
#include "training/controlnet_init.h"
#include "training/lora_train.h"

namespace dmx::test {
namespace {
std::mutex g_mutex;

std::string data_dir() { return std::string(DMX_SOURCE_DIR) + "/tests/data"; }
}  // namespace

std::string tiny_tokenizer_dir() { return data_dir() + "/tiny-tokenizer"; }

const models::CLIPTokenizer& tiny_tokenizer() {
  static const models::CLIPTokenizer tok = models::CLIPTokenizer::from_folder(tiny_tokenizer_dir());
  return tok;
}

std::string tiny_config_dir(const std::string& variant) {
  const std::string dir = data_dir() + "/tiny-sd/" + variant;
  if (!is_directory(dir)) throw InvalidArgument("no tiny model variant '" + variant + "' in tests/data/tiny-sd");
  return dir;
}

std::string tiny_model_dir(const std::string& variant, uint64_t seed) {
  note_use(kUsedTinyModel);
  std::lock_guard<std::mutex> lock(g_mutex);
  static std::map<std::pair<std::string, uint64_t>, std::string> made;
  std::string& dir = made[{variant, seed}];
  if (dir.empty()) {
    InitModelOptions o;
    o.config = tiny_config_dir(variant);
    o.tokenizer = tiny_tokenizer_dir();
    o.output = temp_dir() + "/tiny-" + variant + "-" + std::to_string(seed);
    o.seed = seed;
    init_model(o);
    dir = o.output;
  }
  return dir;
}

std::shared_ptr<loaders::StableDiffusionModels> load_tiny_model(const std::string& variant) {
  return loaders::load_stable_diffusion(tiny_model_dir(variant));
}

std::shared_ptr<loaders::StableDiffusionModels> shared_tiny_model(const std::string& variant) {
  note_use(kUsedTinyModel);
  static std::map<std::string, std::shared_ptr<loaders::StableDiffusionModels>> cache;
  auto& m = cache[variant];
  if (!m) m = load_tiny_model(variant);
  return m;
}

std::string tiny_controlnet_dir(const std::string& variant, uint64_t seed) {
  note_use(kUsedTinyModel);
  const std::string model_dir = tiny_model_dir(variant);
  std::lock_guard<std::mutex> lock(g_mutex);
  static std::map<std::pair<std::string, uint64_t>, std::string> made;
  std::string& dir = made[{variant, seed}];
  if (dir.empty()) {
    auto m = loaders::load_stable_diffusion(model_dir);
    models::ControlNetModel net = training::controlnet_from_unet(m->unet, 3, m->vae_scale_factor());
    at::NoGradGuard no_grad;
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
    for (auto& p : net->named_parameters(true)) {
      const std::string& k = p.key();
      if (k.rfind("controlnet_down_blocks.", 0) == 0 || k.rfind("controlnet_mid_block.", 0) == 0 ||
          k.rfind("controlnet_cond_embedding.conv_out.", 0) == 0)
        p.value().copy_(at::randn(p.value().sizes(), g, p.value().options()) * 0.02);
    }
    const std::string out = temp_dir() + "/tiny-controlnet-" + variant + "-" + std::to_string(seed);
    training::save_controlnet_diffusers(net, out);
    training::save_controlnet_original(net, out + ".safetensors");
    dir = out;
  }
  return dir;
}

std::string tiny_controlnet_file(const std::string& variant, uint64_t seed) {
  return tiny_controlnet_dir(variant, seed) + ".safetensors";
}

std::string tiny_lora_file(const std::string& variant, const std::string& format, uint64_t seed) {
  note_use(kUsedTinyModel);
  const std::string model_dir = tiny_model_dir(variant);
  std::lock_guard<std::mutex> lock(g_mutex);
  static std::map<std::tuple<std::string, std::string, uint64_t>, std::string> made;
  std::string& path = made[{variant, format, seed}];
  if (path.empty()) {
    auto m = loaders::load_stable_diffusion(model_dir);
    training::LoRATrainOptions o;
    o.train_text_encoder = true;
    training::LoRANetwork net(*m, o, seed);
    at::NoGradGuard no_grad;
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
    for (const auto& l : net.layers()) {
      at::Tensor up = l.up;
      up.copy_(at::randn(up.sizes(), g, up.options()) * 0.1);
    }
    const std::string dir = temp_dir() + "/tiny-lora-" + variant + "-" + std::to_string(seed);
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    const std::string out = dir + "/lora_" + format + ".safetensors";
    net.save(out, training::parse_lora_save_format(format));
    path = out;
  }
  return path;
}
}  // namespace dmx::test
