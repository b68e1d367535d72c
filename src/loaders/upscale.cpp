// Strict loading of a StableDiffusionUpscalePipeline folder (upscale.h).
#include "loaders/upscale.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "core/fs.h"
#include "core/log.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/checkpoint.h"

namespace dmx::loaders {

namespace {

constexpr const char* kPipelineClass = "StableDiffusionUpscalePipeline";
// What __call__ uses; safety_checker, feature_extractor and watermarker are optional in diffusers and unused.
const char* const kComponents[] = {"tokenizer", "text_encoder", "unet", "vae", "scheduler", "low_res_scheduler"};

std::string trimmed(std::string p) {
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

nlohmann::json read_index(const std::string& path) {
  const std::string index_path = join_path(path, "model_index.json");
  DMX_CHECK_ARG(path_exists(index_path), "--model: ", path,
                " is not a diffusers pipeline folder (no model_index.json); an upscaler is a ", kPipelineClass,
                " folder such as stabilityai/stable-diffusion-x4-upscaler");
  const nlohmann::json index = io::load_json_file(index_path, "model_index.json");
  DMX_CHECK_FORMAT(index.is_object(), index_path, " must be a JSON object, got ", index.type_name());
  return index;
}

std::string class_of(const nlohmann::json& index) {
  const auto it = index.find("_class_name");
  return it != index.end() && it->is_string() ? it->get<std::string>() : std::string();
}

void check_components(const std::string& path, const nlohmann::json& index) {
  std::vector<std::string> missing;
  for (const char* c : kComponents) {
    const auto it = index.find(c);
    const bool listed = it != index.end() && it->is_array() && it->size() == 2 && (*it)[1].is_string();
    if (!listed)
      missing.push_back(std::string(c) + "/ (not in model_index.json)");
    else if (!is_directory(join_path(path, c)))
      missing.push_back(std::string(c) + "/ (no such folder)");
  }
  if (!missing.empty()) throw FormatError(path + " is a " + kPipelineClass + " folder missing " + join(missing, ", "));
}

int read_max_noise_level(const std::string& path, const nlohmann::json& index) {
  const auto it = index.find("max_noise_level");
  if (it == index.end() || it->is_null()) return 350;  // StableDiffusionUpscalePipeline.__init__'s default
  DMX_CHECK_FORMAT(it->is_number_integer(), path, "/model_index.json: max_noise_level must be an integer, got ",
                   it->dump());
  const int64_t v = it->get<int64_t>();
  DMX_CHECK_FORMAT(v >= 0 && v <= 100000, path, "/model_index.json: max_noise_level must be in [0, 100000], got ", v);
  return static_cast<int>(v);
}
}  // namespace

int UpscaleModels::image_channels() const { return sd->unet->config().in_channels - sd->vae->config().latent_channels; }

std::unique_ptr<schedulers::Scheduler> UpscaleModels::make_low_res_scheduler() const {
  const std::string cls = low_res_scheduler_config.value("_class_name", std::string());
  return schedulers::create_scheduler(cls, low_res_scheduler_config);
}

bool is_upscale_folder(const std::string& path) {
  try {
    if (!is_directory(path) || !path_exists(join_path(path, "model_index.json"))) return false;
    return class_of(io::load_json_file(join_path(path, "model_index.json"), "model_index.json")) == kPipelineClass;
  } catch (const std::exception&) {
    return false;
  }
}

UpscaleFolderInfo inspect_upscale_folder(const std::string& path_in) {
  DMX_CHECK_ARG(!path_in.empty(), "--model: no model path given");
  DMX_CHECK_ARG(path_exists(path_in), "--model: path not found: ", path_in);
  DMX_CHECK_ARG(is_directory(path_in), "--model: an upscaler is a diffusers ", kPipelineClass,
                " folder, got a file: ", path_in);
  const std::string path = trimmed(path_in);
  const nlohmann::json index = read_index(path);
  const std::string cls = class_of(index);
  DMX_CHECK_ARG(cls == kPipelineClass, "--model: ", path, " must be a ", kPipelineClass,
                " folder (model_index.json _class_name), got ",
                cls.empty() ? std::string("no _class_name") : "\"" + cls + "\"",
                cls == "StableDiffusionPipeline" ? " (a text-to-image model: use dmx generate)" : "");
  check_components(path, index);
  UpscaleFolderInfo info;
  info.max_noise_level = read_max_noise_level(path, index);
  const auto vae = models::AutoencoderKLConfig::from_json(io::load_json_file(path + "/vae/config.json", "vae config"));
  info.vae_scale_factor = vae.downscale_factor();
  return info;
}

std::shared_ptr<UpscaleModels> load_upscale(const std::string& path_in, const LoadOptions& opts) {
  const UpscaleFolderInfo info = inspect_upscale_folder(path_in);
  const std::string path = trimmed(path_in);
  auto m = std::make_shared<UpscaleModels>();
  m->max_noise_level = info.max_noise_level;

  // The low-res scheduler: built once so that a config no class accepts fails here, naming the file; it must noise
  // at a training timestep (the noise level), which the DDPM family does.
  const std::string lr_file = path + "/low_res_scheduler/scheduler_config.json";
  m->low_res_scheduler_config =
      schedulers::parse_scheduler_config(read_text_file(lr_file, "low_res_scheduler config", kMaxJsonFileBytes));
  DMX_CHECK_FORMAT(m->low_res_scheduler_config.is_object(), lr_file, " must be a JSON object");
  const auto lr_cls = m->low_res_scheduler_config.find("_class_name");
  DMX_CHECK_FORMAT(lr_cls != m->low_res_scheduler_config.end() && lr_cls->is_string(), lr_file,
                   " has no _class_name (StableDiffusionUpscalePipeline's low_res_scheduler is a DDPMScheduler)");
  int lr_train_steps = 0;
  try {
    const auto low_res = m->make_low_res_scheduler();
    lr_train_steps = low_res->config().num_train_timesteps;
    (void)low_res->add_noise_at_timestep(at::zeros({1}), at::zeros({1}), 0);
  } catch (const InvalidArgument& e) {
    throw FormatError(lr_file + ": " + e.what());
  } catch (const Unsupported& e) {
    throw FormatError(lr_file + ": the low_res_scheduler must noise the picture at a noise level: " + e.what());
  }

  m->sd = load_stable_diffusion(path, opts);
  const auto& unet = m->sd->unet->config();
  const auto& vae = m->sd->vae->config();
  // 4 latent channels + the 3 channels of the picture, latents first (diffusers' check in __call__, made at load).
  DMX_CHECK_FORMAT(unet.in_channels == vae.latent_channels + 3, path, ": unet/config.json in_channels ",
                   unet.in_channels, " must be the VAE's latent_channels (", vae.latent_channels,
                   ") + 3 (the RGB picture) for an upscaler");
  DMX_CHECK_FORMAT(unet.out_channels == vae.latent_channels, path, ": unet/config.json out_channels ",
                   unet.out_channels, " must equal the VAE's latent_channels ", vae.latent_channels);
  // The noise level is the class label: an nn.Embedding (num_class_embeds, as the x4 upscaler) or the
  // "timestep" projection.
  const std::string kind = unet.class_embedding_kind();
  DMX_CHECK_FORMAT(kind == "embedding" || kind == "timestep", path,
                   ": the upscaler's UNet takes the noise level as a class label: unet/config.json needs "
                   "num_class_embeds (or class_embed_type \"timestep\"), got ",
                   kind.empty() ? std::string("no class embedding") : "class_embed_type \"" + kind + "\"");
  int limit = lr_train_steps - 1;
  if (kind == "embedding") limit = std::min(limit, unet.num_class_embeds - 1);
  DMX_CHECK_FORMAT(
      m->max_noise_level <= limit, path, "/model_index.json: max_noise_level ", m->max_noise_level, " must be at most ",
      limit, " (the low_res_scheduler has ", lr_train_steps, " training timesteps",
      kind == "embedding" ? ", the UNet " + std::to_string(unet.num_class_embeds) + " class embeddings" : std::string(),
      ")");
  if (vae.scaling_factor != kUpscaleVaeScalingFactor)
    log_warn("vae/config.json of " + path + " has scaling_factor " + std::to_string(vae.scaling_factor) +
             "; the upscale pipeline uses 0.08333, as diffusers' StableDiffusionUpscalePipeline sets it");
  m->vae_scaling_factor = kUpscaleVaeScalingFactor;
  return m;
}
}  // namespace dmx::loaders
