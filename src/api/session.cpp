// dmx::Session (include/dmx/session.h): dmx::generate's run (api/generate_core.h) with the model kept in memory and
// the pictures returned as PNG bytes; the samplers and the models folder lists a server shows.
#include "dmx/session.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "api/generate_core.h"
#include "api/model_hash.h"
#include "api/options_util.h"
#include "api/unclip.h"
#include "core/canny.h"
#include "core/image.h"
#include "core/log.h"
#include "core/progress.h"
#include "loaders/lora_formats.h"
#include "loaders/model_bundle.h"
#include "models/autoencoder_kl.h"
#include "schedulers/registry.h"

namespace dmx {

struct Session::Impl {
  // What identifies a loaded model: its path and how it was loaded.
  std::string key, model;
  std::shared_ptr<loaders::StableDiffusionModels> models;
  std::string hash;
  int loads = 0;
  double last_load_seconds = 0.0;

  static std::string key_of(const std::string& model, const loaders::LoadOptions& lo) {
    return model + "\n" + lo.config_dir + "\n" + lo.tokenizer_dir + "\n" + std::to_string(static_cast<int>(lo.dtype)) +
           "\n" + lo.device;
  }
  std::shared_ptr<loaders::StableDiffusionModels> get(const std::string& path, const loaders::LoadOptions& lo,
                                                      std::string* h) {
    last_load_seconds = 0.0;
    const std::string k = key_of(path, lo);
    if (models && k == key) {
      if (h) *h = hash;
      return models;
    }
    const std::string previous = model;
    models.reset();  // the old model's memory goes before the new one is loaded
    key.clear();
    model.clear();
    const auto t0 = std::chrono::steady_clock::now();
    auto m = loaders::load_stable_diffusion(path, lo);
    std::string new_hash = dmx::model_hash(path);
    last_load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++loads;
    log_info("session: loaded " + path + (previous.empty() ? "" : " (replacing " + previous + ")") + " in " +
             std::to_string(last_load_seconds) + " s");
    models = m;
    key = k;
    model = path;
    hash = new_hash;
    if (h) *h = hash;
    return models;
  }
};

Session::Session() : impl_(std::make_unique<Impl>()) {}
Session::~Session() = default;

std::string Session::loaded_model() const { return impl_->model; }
int Session::loads() const { return impl_->loads; }

double Session::load(const GenerateOptions& o) {
  DMX_CHECK_ARG(!o.model.empty(), "model is required");
  DMX_CHECK_ARG(path_exists(o.model), "model: path not found: ", o.model);
  api::check_device(o.device);
  loaders::LoadOptions lo;
  lo.config_dir = o.config_dir;
  lo.tokenizer_dir = o.tokenizer_dir;
  lo.dtype = api::parse_dtype(o.dtype, o.device);
  lo.device = o.device;
  impl_->get(o.model, lo, nullptr);
  return impl_->last_load_seconds;
}

SessionResult Session::generate(const GenerateOptions& o, const SessionHooks& hooks) {
  api::GenerateSink sink;
  sink.load = [this](const std::string& path, const loaders::LoadOptions& lo, std::string* h) {
    return impl_->get(path, lo, h);
  };
  // The steps this run makes: img2img and blended edits start at the strength's step (diffusers' get_timesteps).
  const bool from_image = !o.init_image.empty();
  const int total =
      from_image ? std::max(1, std::min(static_cast<int>(o.steps * o.strength), o.steps)) : std::max(1, o.steps);
  if (hooks.on_step || hooks.want_preview) {
    sink.on_step = [&](loaders::StableDiffusionModels& m, int step, double, const at::Tensor& latents) {
      if (hooks.want_preview && hooks.on_preview && hooks.want_preview()) {
        // The first picture's current latents through the VAE (no finiteness check: a preview, not a result).
        at::NoGradGuard no_grad;
        const at::Tensor z = (latents.narrow(0, 0, 1) / m.vae->config().scaling_factor).to(m.device, m.dtype);
        const at::Tensor x = m.vae->decode(z).to(at::kFloat).to(at::kCPU);  // [1, 3, H, W] in [-1, 1]
        const at::Tensor img = (x[0] / 2 + 0.5).clamp(0, 1).permute({1, 2, 0}).contiguous();
        const std::vector<uint8_t> png = encode_png(tensor_to_image(img));
        hooks.on_preview(std::string(png.begin(), png.end()));
      }
      if (hooks.on_step) hooks.on_step(std::min(step + 1, total), total);
    };
  }
  api::generate_core(o, &sink);
  sink.result.load_seconds = impl_->last_load_seconds;
  return std::move(sink.result);
}

StepObserver::StepObserver(Callback cb) : cb_(std::move(cb)), previous_(set_step_observer(&cb_)) {}
StepObserver::~StepObserver() { set_step_observer(previous_); }
bool StepObserver::active() { return step_observer() != nullptr; }

std::string control_map_png(const std::string& image_path, const std::string& preprocess, double low, double high) {
  DMX_CHECK_ARG(preprocess == "canny" || preprocess == "none", "--control-preprocess must be canny or none, got '",
                preprocess, "'");
  Image rgb = to_rgb(load_image(image_path, "--control-image"));
  if (preprocess == "canny") rgb = canny_edges(rgb, low, high);
  const std::vector<uint8_t> png = encode_png(rgb);
  return std::string(png.begin(), png.end());
}

std::vector<SamplerInfo> samplers() {
  std::vector<SamplerInfo> out;
  for (const auto& n : schedulers::sampler_names()) out.push_back({n, schedulers::sampler_label(n)});
  return out;
}

std::string sampler_for_label(const std::string& label_or_name) { return schedulers::sampler_for_label(label_or_name); }

namespace {
namespace fs = std::filesystem;

std::vector<fs::path> sorted_entries(const std::string& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) out.push_back(it->path());
  std::sort(out.begin(), out.end());
  return out;
}

// The tensor names of a .safetensors header (at most 64 MiB of header), without reading any tensor.
std::vector<std::string> safetensors_names(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  uint8_t len_bytes[8];
  if (!f.read(reinterpret_cast<char*>(len_bytes), 8)) return {};
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n == 0 || n > (64u << 20)) return {};
  std::string header(n, '\0');
  if (!f.read(header.data(), static_cast<std::streamsize>(n))) return {};
  const auto j = nlohmann::json::parse(header, nullptr, false);
  if (!j.is_object()) return {};
  std::vector<std::string> names;
  for (auto it = j.begin(); it != j.end(); ++it)
    if (it.key() != "__metadata__") names.push_back(it.key());
  return names;
}
// The "_class_name" of a parsed config ("" when it has none or it is not a string).
std::string class_name(const nlohmann::json& j) {
  if (!j.is_object()) return "";
  const auto it = j.find("_class_name");
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}
}  // namespace

std::vector<ModelEntry> list_models(const std::string& dir) {
  std::vector<ModelEntry> out;
  for (const auto& p : sorted_entries(dir)) {
    std::error_code ec;
    if (!fs::is_directory(p, ec) || !fs::is_regular_file(p / "model_index.json", ec)) continue;
    std::ifstream f(p / "model_index.json");
    const auto j = nlohmann::json::parse(f, nullptr, false);
    if (!j.is_object() || !j.contains("unet") || !j.contains("vae")) continue;  // a Stable Diffusion folder
    if (!api::unclip_pipeline_class(p.string()).empty()) continue;              // Stable unCLIP: list_pipelines
    if (class_name(j) == "StableDiffusionUpscalePipeline") continue;            // an upscaler: list_pipelines
    out.push_back({p.filename().string(), p.string()});
  }
  return out;
}

namespace {
// The folders directly inside `dir` whose `file` (config.json, model_index.json) parses, with its _class_name.
std::vector<std::pair<fs::path, std::string>> folders_by_class(const std::string& dir, const char* file) {
  std::vector<std::pair<fs::path, std::string>> out;
  for (const auto& p : sorted_entries(dir)) {
    std::error_code ec;
    if (!fs::is_directory(p, ec) || !fs::is_regular_file(p / file, ec)) continue;
    std::ifstream f(p / file);
    out.emplace_back(p, class_name(nlohmann::json::parse(f, nullptr, false)));
  }
  return out;
}
}  // namespace

std::vector<ModelEntry> list_controlnets(const std::string& dir) {
  std::vector<ModelEntry> out;
  for (const auto& [p, cls] : folders_by_class(dir, "config.json"))
    if (cls == "ControlNetModel") out.push_back({p.filename().string(), p.string()});
  return out;
}

std::vector<ModelEntry> list_adapters(const std::string& dir) {
  std::vector<ModelEntry> out;
  for (const auto& [p, cls] : folders_by_class(dir, "config.json"))
    if (cls == "T2IAdapter" || cls == "MultiAdapter") out.push_back({p.filename().string(), p.string()});
  return out;
}

std::vector<PipelineEntry> list_pipelines(const std::string& dir) {
  std::vector<PipelineEntry> out;
  for (const auto& [p, cls] : folders_by_class(dir, "model_index.json")) {
    const std::string kind = cls == "StableDiffusionUpscalePipeline" ? "upscaler"
                             : cls == "StableUnCLIPPipeline"         ? "unclip"
                             : cls == "StableUnCLIPImg2ImgPipeline"  ? "unclip-img2img"
                                                                     : "";
    if (!kind.empty()) out.push_back({p.filename().string(), p.string(), kind});
  }
  return out;
}

std::vector<ModelEntry> list_loras(const std::string& dir) {
  std::vector<ModelEntry> out;
  for (const auto& p : sorted_entries(dir)) {
    std::error_code ec;
    if (p.extension() != ".safetensors" || !fs::is_regular_file(p, ec)) continue;
    const auto names = safetensors_names(p);
    const bool lora = !names.empty() && std::all_of(names.begin(), names.end(), [](const std::string& k) {
      return loaders::parse_lora_key(k).has_value();
    });
    if (lora) out.push_back({p.stem().string(), p.string()});
  }
  return out;
}
}  // namespace dmx
