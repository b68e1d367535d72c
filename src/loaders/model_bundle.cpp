#include "loaders/model_bundle.h"

#include "core/fs.h"
#include "core/log.h"
#include "core/memory.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/releasing_load.h"
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

// Modules are built in the dtype they will run in and loaded tensor by tensor, each cast into its parameter and its
// mapped file pages released once copied (io::load_state_dict_releasing): a bf16 model never exists in float32 and
// the file is never resident as a whole, so loading costs the model's own size plus one tensor (it cost the
// float32 model plus the file, 6 GB for SD 1.5 in bf16: docs/performance.md). float16 (CUDA only) is built in
// float32 as before and cast by finish(): libtorch's CPU initialisers have no float16 kernels.
at::ScalarType build_dtype(const LoadOptions& opts) { return opts.dtype == at::kHalf ? at::kFloat : opts.dtype; }

template <class Module, class Config>
Module build_and_load(const Config& config, io::TensorMap& weights, const LoadOptions& opts, const std::string& what) {
  Module mod{nullptr};
  {
    DefaultDtypeGuard guard(build_dtype(opts));
    mod = Module(config);
  }
  io::load_state_dict_releasing(*mod, weights, what);
  weights.clear();  // the last views of the file: it is unmapped here
  return mod;
}

void finish(StableDiffusionModels& m, const LoadOptions& opts) {
  // Prompts are padded to the tokenizer's model_max_length: it must fit the text encoder's positions (a
  // tokenizer_config.json saying 1e30 would otherwise ask for a padded prompt of 2^31 ids).
  DMX_CHECK_FORMAT(m.tokenizer->model_max_length() <= m.text_encoder->config().max_position_embeddings,
                   "the tokenizer's model_max_length ", m.tokenizer->model_max_length(),
                   " exceeds the text encoder's max_position_embeddings ",
                   m.text_encoder->config().max_position_embeddings, " (", m.source_path, ")");
  // The pipelines read the scheduler's class from it (a field of another type was a raw JSON error).
  const auto cls = m.scheduler_config.find("_class_name");
  DMX_CHECK_FORMAT(m.scheduler_config.is_object() && (cls == m.scheduler_config.end() || cls->is_string()),
                   "scheduler config of ", m.source_path, ": '_class_name' must be a string");
  m.device = at::Device(opts.device);
  m.dtype = opts.dtype;
  for (torch::nn::Module* mod :
       {static_cast<torch::nn::Module*>(m.text_encoder.get()), static_cast<torch::nn::Module*>(m.vae.get()),
        static_cast<torch::nn::Module*>(m.unet.get())}) {
    mod->eval();
    mod->to(m.device, m.dtype);
  }
}

}  // namespace

void check_dtype_device(at::ScalarType dtype, const std::string& device) {
  DMX_CHECK_SUPPORTED(dtype != at::kHalf || device.rfind("cuda", 0) == 0,
                      "--dtype fp16 needs --device cuda: libtorch 1.13 has no float16 CPU kernels (convolution, "
                      "matmul, softmax, GroupNorm, LayerNorm); on the CPU use --dtype bf16 (the same memory) or fp32");
}

std::shared_ptr<StableDiffusionModels> load_stable_diffusion(const std::string& path, const LoadOptions& opts) {
  check_dtype_device(opts.dtype, opts.device);
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
        read_text_file(join_path(path, "scheduler/scheduler_config.json"), "scheduler config", kMaxJsonFileBytes));
    // Configs are parsed and bounded (from_json), the weights mapped and counted against them, and only then
    // are the modules built: a config that does not match its weights costs nothing.
    const auto unet_config = models::UNet2DConditionConfig::from_json(unet_cfg);
    const auto vae_config = models::AutoencoderKLConfig::from_json(vae_cfg);
    const auto text_config = models::CLIPTextConfig::from_json(text_cfg);
    io::TensorMap unet_w = io::load_diffusers_component(path, "unet");
    io::TensorMap vae_w = io::load_diffusers_component(path, "vae");
    io::TensorMap te = io::load_diffusers_component(path, "text_encoder");
    models::clean_clip_state_dict(te);
    io::check_weights_cover_config(unet_config.parameter_count(), unet_w, path + "/unet");
    io::check_weights_cover_config(vae_config.parameter_count(), vae_w, path + "/vae");
    io::check_weights_cover_config(text_config.parameter_count(), te, path + "/text_encoder");
    m->unet = build_and_load<models::UNet2DConditionModel>(unet_config, unet_w, opts, path + "/unet");
    m->vae = build_and_load<models::AutoencoderKL>(vae_config, vae_w, opts, path + "/vae");
    m->text_encoder = build_and_load<models::CLIPTextModel>(text_config, te, opts, path + "/text_encoder");
    std::string tok = !opts.tokenizer_dir.empty() ? opts.tokenizer_dir : join_path(path, "tokenizer");
    m->tokenizer = load_tokenizer(tok, opts.tokenizer_dir.empty() ? "--model" : "--tokenizer");
  } else {
    m->name = file_stem(path);
    io::SingleFileCheckpoint ck = io::load_single_file(path, opts.config_dir);
    const auto unet_config = models::UNet2DConditionConfig::from_json(ck.unet_config);
    const auto vae_config = models::AutoencoderKLConfig::from_json(ck.vae_config);
    const auto text_config = models::CLIPTextConfig::from_json(ck.text_encoder_config);
    models::clean_clip_state_dict(ck.text_encoder);
    io::check_weights_cover_config(unet_config.parameter_count(), ck.unet, path + " (unet)");
    io::check_weights_cover_config(vae_config.parameter_count(), ck.vae, path + " (vae)");
    io::check_weights_cover_config(text_config.parameter_count(), ck.text_encoder, path + " (text encoder)");
    m->scheduler_config = ck.scheduler_config;
    m->unet = build_and_load<models::UNet2DConditionModel>(unet_config, ck.unet, opts, path + " (unet)");
    m->vae = build_and_load<models::AutoencoderKL>(vae_config, ck.vae, opts, path + " (vae)");
    m->text_encoder =
        build_and_load<models::CLIPTextModel>(text_config, ck.text_encoder, opts, path + " (text encoder)");
    std::string tok = opts.tokenizer_dir;
    if (tok.empty() && !opts.config_dir.empty()) tok = join_path(opts.config_dir, "tokenizer");
    DMX_CHECK_ARG(!tok.empty(),
                  "--model: a single-file checkpoint carries no tokenizer; pass --config DIR (a "
                  "diffusers folder with a tokenizer/ subfolder) or --tokenizer DIR (a folder with vocab.json and "
                  "merges.txt)");
    m->tokenizer = load_tokenizer(tok, opts.tokenizer_dir.empty() ? "--config" : "--tokenizer");
  }
  finish(*m, opts);
  return m;
}
}  // namespace dmx::loaders
