// `dmx init` (include/dmx/train.h): a diffusers folder with freshly initialised weights.
#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "api/options_util.h"
#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "dmx/train.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text_model.h"
#include "models/clip_tokenizer.h"
#include "models/config_json.h"
#include "models/unet_2d_condition.h"
#include "schedulers/scheduler.h"

namespace dmx {
namespace fs = std::filesystem;
namespace {

int64_t count(torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

// transformers' CLIPPreTrainedModel._init_weights for the text tower (initializer_factor 1): embeddings
// N(0, 0.02); attention q/k/v N(0, d^-0.5 (2L)^-0.5), out_proj N(0, d^-0.5); MLP fc1 N(0, (2d)^-0.5), fc2
// N(0, d^-0.5 (2L)^-0.5); biases 0; layer norms weight 1, bias 0.
void init_clip_text(models::CLIPTextModel& te, const models::CLIPTextConfig& c) {
  at::NoGradGuard no_grad;
  const double d = c.hidden_size, L = c.num_hidden_layers;
  const double in_std = std::pow(d, -0.5) * std::pow(2 * L, -0.5), out_std = std::pow(d, -0.5),
               fc_std = std::pow(2 * d, -0.5);
  for (auto& p : te->named_parameters(true)) {
    const std::string& k = p.key();
    at::Tensor v = p.value();
    if (ends_with(k, "token_embedding.weight") || ends_with(k, "position_embedding.weight")) {
      v.normal_(0, 0.02);
    } else if (k.find("layer_norm") != std::string::npos) {
      ends_with(k, ".weight") ? v.fill_(1) : v.zero_();
    } else if (ends_with(k, ".bias")) {
      v.zero_();
    } else if (k.find("q_proj") != std::string::npos || k.find("k_proj") != std::string::npos ||
               k.find("v_proj") != std::string::npos || k.find("fc2") != std::string::npos) {
      v.normal_(0, in_std);
    } else if (k.find("out_proj") != std::string::npos) {
      v.normal_(0, out_std);
    } else if (k.find("fc1") != std::string::npos) {
      v.normal_(0, fc_std);
    }
  }
}

}  // namespace

InitModelReport init_model(const InitModelOptions& o) {
  DMX_CHECK_ARG(!o.config.empty(), "--config is required (a folder of diffusers configs)");
  DMX_CHECK_ARG(is_directory(o.config), "--config: not a folder: '", o.config, "'");
  DMX_CHECK_ARG(!o.output.empty(), "--output is required (the diffusers folder to create)");
  for (const char* f : {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                        "scheduler/scheduler_config.json"})
    DMX_CHECK_ARG(path_exists(join_path(o.config, f)), "--config: '", o.config, "' has no ", f);
  const std::string tok_dir = o.tokenizer.empty() ? join_path(o.config, "tokenizer") : o.tokenizer;
  {
    api::OutputPlan plan(o.overwrite);
    plan.input(o.config, "--config");
    plan.input(tok_dir, "--tokenizer");
    std::string out = o.output;
    while (out.size() > 1 && out.back() == '/') out.pop_back();
    plan.folder(out, "--output", {"model_index.json"}, "diffusers folder");
    plan.prepare();
  }
  DMX_CHECK_ARG(path_exists(join_path(tok_dir, "vocab.json")), "--tokenizer: '", tok_dir,
                "' has no vocab.json (build one with dmx data tokenizer)");

  const auto unet_cfg = models::UNet2DConditionConfig::from_json(
      io::load_json_file(join_path(o.config, "unet/config.json"), "unet config"));
  const auto vae_cfg =
      models::AutoencoderKLConfig::from_json(io::load_json_file(join_path(o.config, "vae/config.json"), "vae config"));
  const auto text_cfg = models::CLIPTextConfig::from_json(
      io::load_json_file(join_path(o.config, "text_encoder/config.json"), "text encoder config"));
  (void)schedulers::parse_scheduler_config(
      read_text_file(join_path(o.config, "scheduler/scheduler_config.json"), "scheduler config", kMaxJsonFileBytes));
  const auto tok = models::CLIPTokenizer::from_folder(tok_dir);
  DMX_CHECK_ARG(static_cast<int64_t>(tok.vocab_size()) <= text_cfg.vocab_size, "text_encoder/config.json: vocab_size ",
                text_cfg.vocab_size, " is smaller than the tokenizer's ", tok.vocab_size(), " tokens");
  DMX_CHECK_ARG(tok.model_max_length() <= text_cfg.max_position_embeddings,
                "text_encoder/config.json: "
                "max_position_embeddings ",
                text_cfg.max_position_embeddings,
                " is smaller than the tokenizer's "
                "model_max_length ",
                tok.model_max_length());
  DMX_CHECK_ARG(unet_cfg.cross_attention_dim == text_cfg.hidden_size, "unet/config.json: cross_attention_dim ",
                unet_cfg.cross_attention_dim, " must equal the text encoder's hidden_size ", text_cfg.hidden_size);
  DMX_CHECK_ARG(unet_cfg.in_channels == vae_cfg.latent_channels, "unet/config.json: in_channels ", unet_cfg.in_channels,
                " must equal the VAE's latent_channels ", vae_cfg.latent_channels);

  // Each config is bounded by from_json; the three together too, before anything is allocated.
  models::cfgjson::check_parameter_count(
      "--config: the UNet, VAE and text encoder configs together",
      unet_cfg.parameter_count() + vae_cfg.parameter_count() + text_cfg.parameter_count());

  // Seeded construction: each module in a fixed order from the global generator.
  torch::manual_seed(o.seed);
  models::UNet2DConditionModel unet(unet_cfg);
  models::AutoencoderKL vae(vae_cfg);
  models::CLIPTextModel te(text_cfg);
  init_clip_text(te, text_cfg);

  write_directory_atomic(o.output, "the model folder", [&](const std::string& tmp) {
    for (const char* sub : {"unet", "vae", "text_encoder", "scheduler", "tokenizer"})
      fs::create_directories(join_path(tmp, sub));
    for (const char* f : {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                          "scheduler/scheduler_config.json"})
      fs::copy_file(join_path(o.config, f), join_path(tmp, f));
    for (const auto& e : fs::directory_iterator(tok_dir))
      if (e.is_regular_file()) fs::copy_file(e.path(), fs::path(join_path(tmp, "tokenizer")) / e.path().filename());
    io::save_safetensors(join_path(tmp, "unet/diffusion_pytorch_model.safetensors"), io::module_state(*unet),
                         {{"format", "pt"}});
    io::save_safetensors(join_path(tmp, "vae/diffusion_pytorch_model.safetensors"), io::module_state(*vae),
                         {{"format", "pt"}});
    io::save_safetensors(join_path(tmp, "text_encoder/model.safetensors"), io::module_state(*te), {{"format", "pt"}});
  });
  InitModelReport r;
  r.unet_parameters = count(*unet);
  r.vae_parameters = count(*vae);
  r.text_encoder_parameters = count(*te);
  return r;
}
}  // namespace dmx
