#include "loaders/model_bundle.h"

#include "core/fs.h"
#include "core/log.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/state_dict.h"
#include "schedulers/scheduler.h"

namespace dmx::loaders {

int StableDiffusionModels::vae_scale_factor() const { return vae->config().downscale_factor(); }
int StableDiffusionModels::default_sample_size() const { return unet->config().sample_size * vae_scale_factor(); }

namespace {

std::shared_ptr<models::CLIPTokenizer> load_tokenizer(const std::string& dir, const std::string& how) {
  DMX_CHECK_ARG(is_directory(dir), how, ": tokenizer folder not found: ", dir);
  return std::make_shared<models::CLIPTokenizer>(models::CLIPTokenizer::from_folder(dir));
}

void finish(StableDiffusionModels& m, const LoadOptions& opts) {
  m.device = at::Device(opts.device);
  m.dtype = opts.dtype;
  for (torch::nn::Module* mod : {static_cast<torch::nn::Module*>(m.text_encoder.get()),
                                 static_cast<torch::nn::Module*>(m.vae.get()),
                                 static_cast<torch::nn::Module*>(m.unet.get())}) {
    mod->eval();
    mod->to(m.device, m.dtype);
  }
}

}  // namespace

std::shared_ptr<StableDiffusionModels> load_stable_diffusion(const std::string& path, const LoadOptions& opts) {
  DMX_CHECK_ARG(!path.empty(), "--model: no model path given");
  DMX_CHECK_ARG(path_exists(path), "--model: path not found: ", path);
  auto m = std::make_shared<StableDiffusionModels>();
  m->source_path = path;
  if (is_directory(path)) {
    DMX_CHECK_ARG(path_exists(join_path(path, "model_index.json")) || path_exists(join_path(path, "unet/config.json")),
                  "--model: ", path, " is not a diffusers folder (no model_index.json)");
    std::string p = path;
    while (p.size() > 1 && p.back() == '/') p.pop_back();
    m->name = p.substr(p.find_last_of('/') + 1);
    auto unet_cfg = io::load_json_file(join_path(path, "unet/config.json"), "unet config");
    auto vae_cfg = io::load_json_file(join_path(path, "vae/config.json"), "vae config");
    auto text_cfg = io::load_json_file(join_path(path, "text_encoder/config.json"), "text encoder config");
    // diffusers writes -Infinity into some scheduler configs: parse them with the tolerant reader.
    m->scheduler_config = schedulers::parse_scheduler_config(
        read_text_file(join_path(path, "scheduler/scheduler_config.json"), "scheduler config"));
    m->unet = models::UNet2DConditionModel(models::UNet2DConditionConfig::from_json(unet_cfg));
    m->vae = models::AutoencoderKL(models::AutoencoderKLConfig::from_json(vae_cfg));
    m->text_encoder = models::CLIPTextModel(models::CLIPTextConfig::from_json(text_cfg));
    io::load_state_dict(*m->unet, io::load_diffusers_component(path, "unet"), path + "/unet");
    io::load_state_dict(*m->vae, io::load_diffusers_component(path, "vae"), path + "/vae");
    auto te = io::load_diffusers_component(path, "text_encoder");
    models::clean_clip_state_dict(te);
    io::load_state_dict(*m->text_encoder, te, path + "/text_encoder");
    std::string tok = !opts.tokenizer_dir.empty() ? opts.tokenizer_dir : join_path(path, "tokenizer");
    m->tokenizer = load_tokenizer(tok, opts.tokenizer_dir.empty() ? "--model" : "--tokenizer");
  } else {
    m->name = file_stem(path);
    io::SingleFileCheckpoint ck = io::load_single_file(path, opts.config_dir);
    m->unet = models::UNet2DConditionModel(models::UNet2DConditionConfig::from_json(ck.unet_config));
    m->vae = models::AutoencoderKL(models::AutoencoderKLConfig::from_json(ck.vae_config));
    m->text_encoder = models::CLIPTextModel(models::CLIPTextConfig::from_json(ck.text_encoder_config));
    m->scheduler_config = ck.scheduler_config;
    io::load_state_dict(*m->unet, ck.unet, path + " (unet)");
    io::load_state_dict(*m->vae, ck.vae, path + " (vae)");
    models::clean_clip_state_dict(ck.text_encoder);
    io::load_state_dict(*m->text_encoder, ck.text_encoder, path + " (text encoder)");
    std::string tok = opts.tokenizer_dir;
    if (tok.empty() && !opts.config_dir.empty()) tok = join_path(opts.config_dir, "tokenizer");
    DMX_CHECK_ARG(!tok.empty(), "--model: a single-file checkpoint carries no tokenizer; pass --config DIR (a "
                  "diffusers folder with a tokenizer/ subfolder) or --tokenizer DIR (a folder with vocab.json and "
                  "merges.txt)");
    m->tokenizer = load_tokenizer(tok, opts.tokenizer_dir.empty() ? "--config" : "--tokenizer");
  }
  finish(*m, opts);
  return m;
}
}  // namespace dmx::loaders
