#include <ATen/ATen.h>

#include <chrono>
#include <future>
#include <map>
#include <optional>
#include <sstream>

#include "api/blended.h"
#include "api/generate_core.h"
#include "api/layout.h"
#include "api/model_hash.h"
#include "api/options_util.h"
#include "api/unclip.h"
#include "api/upscale_stage.h"
#include "core/canny.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/phase_timer.h"
#include "core/runtime.h"
#include "core/utf8.h"
#include "dmx/dmx.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "loaders/hypernetwork_loader.h"
#include "loaders/lora_loader.h"
#include "loaders/model_bundle.h"
#include "loaders/scene.h"
#include "loaders/spatext.h"
#include "loaders/t2i_adapter_loader.h"
#include "loaders/upscale.h"
#include "pipelines/controlnet.h"
#include "pipelines/scene.h"
#include "pipelines/stable_diffusion.h"
#include "pipelines/t2i_adapter_provider.h"
#include "pipelines/upscale.h"
#include "schedulers/registry.h"

namespace dmx {

std::string version() { return "0.1.0"; }

std::vector<std::string> scheduler_names() { return schedulers::sampler_names(); }

void install_signal_cleanup() { install_temp_file_cleanup(); }

namespace {

using api::parse_dtype;

// ControlNet options: count rules and ranges, checked before anything is loaded.
void check_controlnet_options(const GenerateOptions& o) {
  const size_t n = o.controlnets.size();
  // Each net is a model of its own in memory (docs/limits.md).
  DMX_CHECK_ARG(n <= 8, "--controlnet may be given at most 8 times, got ", n);
  if (n == 0) {
    DMX_CHECK_ARG(o.control_images.empty(), "--control-image needs --controlnet (got ", o.control_images.size(),
                  " image(s) and no net)");
    DMX_CHECK_ARG(o.control_scales.empty() && o.control_starts.empty() && o.control_ends.empty() &&
                      o.control_preprocess.empty() && o.save_control_image.empty(),
                  "--control-scale/--control-start/--control-end/--control-preprocess/--save-control-image need "
                  "--controlnet");
    DMX_CHECK_ARG(!o.guess_mode, "--guess-mode needs --controlnet");
    return;
  }
  DMX_CHECK_ARG(o.control_images.size() == n, "--control-image must be given once per --controlnet (", n,
                " net(s)), got ", o.control_images.size());
  auto count = [&](size_t k, const char* name, bool one_for_all) {
    DMX_CHECK_ARG(k == 0 || k == n || (one_for_all && k == 1), name, " must be given once per --controlnet (", n,
                  " net(s))", one_for_all ? ", once for all, " : " ", "or not at all, got ", k);
  };
  count(o.control_scales.size(), "--control-scale", false);
  count(o.control_starts.size(), "--control-start", false);
  count(o.control_ends.size(), "--control-end", false);
  count(o.control_preprocess.size(), "--control-preprocess", true);
  for (double v : o.control_scales)
    DMX_CHECK_ARG(std::isfinite(v) && v >= -100 && v <= 100, "--control-scale must be in [-100, 100], got ", v);
  for (double v : o.control_starts) DMX_CHECK_ARG(v >= 0 && v <= 1, "--control-start must be in [0, 1], got ", v);
  for (double v : o.control_ends) DMX_CHECK_ARG(v >= 0 && v <= 1, "--control-end must be in [0, 1], got ", v);
  for (const auto& m : o.control_preprocess)
    DMX_CHECK_ARG(m == "none" || m == "canny", "--control-preprocess must be one of none, canny, got '", m, "'");
  DMX_CHECK_ARG(o.init_image.empty(), "--controlnet with --init-image (ControlNet img2img) is not supported yet");
}

// T2I-Adapter options (docs/t2i-adapter.md): count rules and ranges, checked before anything is loaded.
void check_adapter_options(const GenerateOptions& o) {
  const size_t n = o.adapters.size();
  DMX_CHECK_ARG(n <= 8, "--adapter may be given at most 8 times, got ", n);
  if (n == 0) {
    DMX_CHECK_ARG(o.adapter_images.empty(), "--adapter-image needs --adapter (got ", o.adapter_images.size(),
                  " image(s) and no adapter)");
    DMX_CHECK_ARG(o.adapter_scales.empty() && o.adapter_ends.empty() && o.adapter_preprocess.empty(),
                  "--adapter-scale/--adapter-end/--adapter-preprocess need --adapter");
    return;
  }
  DMX_CHECK_ARG(o.adapter_images.size() == n, "--adapter-image must be given once per --adapter (", n,
                " adapter(s)), got ", o.adapter_images.size());
  DMX_CHECK_ARG(o.adapter_scales.empty() || o.adapter_scales.size() == n,
                "--adapter-scale must be given once per --adapter (", n, " adapter(s)) or not at all, got ",
                o.adapter_scales.size());
  auto count = [&](size_t k, const char* name) {
    DMX_CHECK_ARG(k == 0 || k == 1 || k == n, name, " must be given once per --adapter (", n,
                  " adapter(s)), once for all, or not at all, got ", k);
  };
  count(o.adapter_ends.size(), "--adapter-end");
  count(o.adapter_preprocess.size(), "--adapter-preprocess");
  for (double v : o.adapter_scales)
    DMX_CHECK_ARG(std::isfinite(v) && v >= -100 && v <= 100, "--adapter-scale must be in [-100, 100], got ", v);
  for (double v : o.adapter_ends)
    DMX_CHECK_ARG(std::isfinite(v) && v > 0 && v <= 1, "--adapter-end must be in (0, 1], got ", v);
  for (const auto& m : o.adapter_preprocess)
    DMX_CHECK_ARG(m == "none" || m == "canny", "--adapter-preprocess must be one of none, canny, got '", m, "'");
  DMX_CHECK_ARG(o.init_image.empty(),
                "--adapter with --init-image (T2I-Adapter img2img) is not supported "
                "(diffusers 0.27.2 has no adapter img2img pipeline)");
}

// A malformed or hostile file named by an option: the message starts with the option (the loaders name the file).
template <typename F>
auto with_option(const std::string& option, F&& load) -> decltype(load()) {
  auto prefixed = [&](const std::string& what) { return what.rfind(option, 0) == 0 ? what : option + ": " + what; };
  try {
    return load();
  } catch (const FormatError& e) {
    throw FormatError(prefixed(e.what()));
  } catch (const Unsupported& e) {
    throw Unsupported(prefixed(e.what()));
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(prefixed(e.what()));
  }
}

// The i-th entry of a per-adapter list that may also hold one value for all, or nothing.
template <typename T>
T per_adapter(const std::vector<T>& v, size_t i, const T& fallback) {
  return v.empty() ? fallback : v.size() == 1 ? v[0] : v[i];
}

// Loads, preprocesses (Canny) each control image; sizes are settled once the model is known.
std::vector<Image> load_control_maps(const GenerateOptions& o) {
  std::vector<Image> maps;
  for (size_t i = 0; i < o.control_images.size(); ++i) {
    Image rgb = to_rgb(load_image(o.control_images[i], "--control-image"));
    const std::string mode = o.control_preprocess.empty()       ? "none"
                             : o.control_preprocess.size() == 1 ? o.control_preprocess[0]
                                                                : o.control_preprocess[i];
    if (mode == "canny") rgb = canny_edges(rgb, o.canny_low, o.canny_high);
    maps.push_back(std::move(rgb));
  }
  return maps;
}

}  // namespace

GenerateResult generate(const GenerateOptions& o) { return api::generate_core(o, nullptr); }

namespace api {
GenerateResult generate_core(const GenerateOptions& o, GenerateSink* sink) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.verbose ? LogLevel::kVerbose : o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  check_text(o.prompt, "--prompt");
  check_text(o.negative_prompt, "--negative-prompt");
  // Check every cheap input before loading anything.
  DMX_CHECK_ARG(!o.model.empty(), "--model is required");
  DMX_CHECK_ARG(path_exists(o.model), "--model: path not found: ", o.model);
  api::check_layout_options(o);
  // Stable unCLIP folders: text -> prior -> image embedding -> decoder (api/unclip.cpp, docs/unclip.md).
  if (!api::unclip_pipeline_class(o.model).empty()) {
    DMX_CHECK_SUPPORTED(o.layout_path.empty(), "--layout with a Stable unCLIP folder is not supported");
    DMX_CHECK_SUPPORTED(!sink, "model ", o.model, ": Stable unCLIP folders are not served yet (use dmx generate)");
    return api::generate_unclip(o);
  }
  // SpaText folders (docs/spatext.md): the SpaText UNet, with the map of --layout-method spatext or without a map.
  const bool spatext_folder = loaders::is_spatext_folder(o.model);
  if (spatext_folder) {
    DMX_CHECK_SUPPORTED(!sink, "model ", o.model, ": SpaText folders are not served yet (use dmx generate)");
    DMX_CHECK_SUPPORTED(o.init_image.empty() && o.mask.empty() && o.controlnets.empty() && o.adapters.empty(),
                        "--model ", o.model,
                        " is a SpaText folder: it generates from noise, without --init-image, "
                        "--mask, --controlnet or --adapter");
  }
  // Scene folders (docs/scene.md): the scene model's UNet, with the tokens of --layout-method scene or the dropped
  // scene's.
  const bool scene_folder = loaders::is_scene_folder(o.model);
  if (scene_folder) {
    DMX_CHECK_SUPPORTED(!sink, "model ", o.model, ": scene folders are not served yet (use dmx generate)");
    DMX_CHECK_SUPPORTED(o.init_image.empty() && o.mask.empty() && o.controlnets.empty() && o.adapters.empty(),
                        "--model ", o.model,
                        " is a scene folder: it generates from noise, without --init-image, --mask, --controlnet or "
                        "--adapter");
    DMX_CHECK_SUPPORTED(o.layout_path.empty() || o.layout_method == "scene", "--layout-method ", o.layout_method,
                        " on the scene folder ", o.model,
                        ": its UNet reads scene tokens in every cross-attention; use --layout-method scene");
  }
  if (sink) {  // in memory: no file is named, none is written
    DMX_CHECK_ARG(o.output.empty() && o.save_latents.empty() && o.save_control_image.empty(),
                  "a session run writes no file: output, save_latents and save_control_image must be empty");
    DMX_CHECK_ARG(o.upscale_model.empty(), "a session run does not run the upscaler cascade (upscale_model)");
  }
  api::check_no_unclip_options(o);
  DMX_CHECK_ARG(o.config_dir.empty() || !is_directory(o.model),
                "--config applies to a single-file checkpoint; --model ", o.model,
                " is a diffusers folder with its own configs (leave --config out)");
  api::check_device(o.device);
  const at::ScalarType dtype = parse_dtype(o.dtype, o.device);
  if (!o.scheduler.empty()) {
    auto names = schedulers::sampler_names();
    if (std::find(names.begin(), names.end(), o.scheduler) == names.end()) {
      std::string list;
      for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
      throw InvalidArgument("--scheduler must be one of " + list + ", got '" + o.scheduler + "'");
    }
  }
  check_controlnet_options(o);
  check_adapter_options(o);
  api::check_blended_options(o);
  // Cascade: the upscaler's options and folder kind before anything is loaded.
  api::UpscaleStageOptions up_stage;
  loaders::UpscaleFolderInfo up_info;
  if (!o.upscale_model.empty()) {
    DMX_CHECK_SUPPORTED(o.mask.empty(),
                        "--upscale-model with --mask is not supported (upscale the edited picture "
                        "with dmx upscale)");
    up_stage.model = o.upscale_model;
    up_stage.noise_level = o.upscale_noise_level;
    up_stage.steps = o.upscale_steps;
    up_stage.guidance_scale = o.upscale_guidance_scale;
    up_stage.flag_prefix = "--upscale-";
    up_info = api::check_upscale_stage(up_stage);
  }
  if (!o.control_preprocess.empty() || !o.adapter_preprocess.empty() || o.canny_low != 100.0 || o.canny_high != 200.0) {
    DMX_CHECK_ARG(std::isfinite(o.canny_low) && o.canny_low >= 0 && o.canny_low <= 2040,
                  "--canny-low must be in [0, 2040], got ", o.canny_low);
    DMX_CHECK_ARG(std::isfinite(o.canny_high) && o.canny_high >= 0 && o.canny_high <= 2040,
                  "--canny-high must be in [0, 2040], got ", o.canny_high);
    DMX_CHECK_ARG(o.canny_low <= o.canny_high, "--canny-low (", o.canny_low, ") must be <= --canny-high (",
                  o.canny_high, ")");
  }
  // LoRA: --lora entries, then the prompts' <lora:NAME:WEIGHT> tags (removed from the text encoded).
  loaders::LoRAApplyOptions lora_opts;
  lora_opts.mode = loaders::parse_lora_mode(o.lora_mode);
  lora_opts.allow_unmatched = o.lora_allow_unmatched;
  std::vector<loaders::LoRASpec> lora_specs;
  for (const auto& l : o.loras) lora_specs.push_back(loaders::parse_lora_arg(l));
  std::vector<loaders::LoRASpec> tagged;
  const std::string lora_prompt = loaders::extract_prompt_loras(o.prompt, tagged);
  const std::string lora_negative_prompt = loaders::extract_prompt_loras(o.negative_prompt, tagged);
  for (auto& t : tagged) {
    t.path = loaders::resolve_lora_name(o.lora_dir, t.path);
    lora_specs.push_back(t);
  }
  for (const auto& l : lora_specs) DMX_CHECK_ARG(path_exists(l.path), "--lora: file not found: ", l.path);
  DMX_CHECK_ARG(lora_specs.size() <= 64, "at most 64 LoRAs (--lora and <lora:...> tags together), got ",
                lora_specs.size());
  // Hypernetworks: --hypernetwork entries, then the prompts' <hypernet:NAME:MULT> tags (removed from the text
  // encoded), chained in that order as A1111 chains them.
  std::vector<loaders::HypernetworkSpec> hn_specs;
  for (const auto& h : o.hypernetworks) hn_specs.push_back(loaders::parse_hypernetwork_arg(h));
  std::vector<loaders::HypernetworkSpec> hn_tagged;
  const std::string prompt = loaders::extract_prompt_hypernetworks(lora_prompt, hn_tagged);
  const std::string negative_prompt = loaders::extract_prompt_hypernetworks(lora_negative_prompt, hn_tagged);
  for (auto& t : hn_tagged) {
    t.path = loaders::resolve_hypernetwork_name(o.hypernetwork_dir, t.path);
    hn_specs.push_back(t);
  }
  for (const auto& h : hn_specs)
    DMX_CHECK_ARG(path_exists(h.path) && !is_directory(h.path), "--hypernetwork: file not found: ", h.path);
  DMX_CHECK_ARG(hn_specs.size() <= 16,
                "at most 16 hypernetworks (--hypernetwork and <hypernet:...> tags together), got ", hn_specs.size());
  // Every output, derived ones included, against every input and each other, before any work.
  const std::vector<std::string> image_paths =
      sink ? std::vector<std::string>{} : api::numbered_paths(o.output, o.num_images);
  const std::vector<std::string> control_paths =
      o.save_control_image.empty() ? std::vector<std::string>{}
                                   : api::numbered_paths(o.save_control_image, static_cast<int>(o.controlnets.size()));
  {
    api::OutputPlan plan(o.overwrite);
    api::add_model_inputs(plan, o);
    plan.input(o.from, "--from");
    plan.input(o.init_image, "--init-image");
    plan.input(o.mask, "--mask");
    plan.input(o.init_latents, "--init-latents");
    plan.input(o.lora_dir, "--lora-dir");
    plan.input(o.upscale_model, "--upscale-model");
    plan.input(o.layout_path, "--layout");
    for (const auto& l : lora_specs) plan.input(l.path, "--lora");
    for (const auto& c : o.controlnets) plan.input(c, "--controlnet");
    for (const auto& c : o.control_images) plan.input(c, "--control-image");
    for (const auto& a : o.adapters) plan.input(a, "--adapter");
    for (const auto& a : o.adapter_images) plan.input(a, "--adapter-image");
    plan.input(o.hypernetwork_dir, "--hypernetwork-dir");
    for (const auto& h : hn_specs) plan.input(h.path, "--hypernetwork");
    for (const auto& path : image_paths) plan.file(path, "--output", ".png");
    if (!o.save_latents.empty()) plan.file(o.save_latents, "--save-latents", ".safetensors");
    for (const auto& path : control_paths) plan.file(path, "--save-control-image", ".png");
    plan.prepare();
  }
  const std::vector<Image> control_maps = load_control_maps(o);
  const Image layout_map = o.layout_path.empty() ? Image() : api::load_layout_map(o);
  std::vector<Image> adapter_maps;  // decoded (and Canny-preprocessed) before any model is loaded
  for (size_t i = 0; i < o.adapter_images.size(); ++i) {
    Image img = load_image(o.adapter_images[i], "--adapter-image");
    if (per_adapter(o.adapter_preprocess, i, std::string("none")) == "canny")
      img = canny_edges(to_rgb(img), o.canny_low, o.canny_high);
    adapter_maps.push_back(std::move(img));
  }
  // Adapters and hypernetworks are small: loaded (and a malformed or hostile file refused) before the model.
  std::vector<pipelines::T2IAdapterUnit> adapter_units;
  for (size_t i = 0; i < o.adapters.size(); ++i) {
    pipelines::T2IAdapterUnit u;
    u.name = o.adapters[i];
    u.model = with_option("--adapter", [&] { return loaders::load_t2i_adapter(o.adapters[i], dtype); });
    u.image = adapter_maps[i];
    u.scale = o.adapter_scales.empty() ? 1.0 : o.adapter_scales[i];
    u.end = per_adapter(o.adapter_ends, i, 1.0);
    adapter_units.push_back(std::move(u));
  }
  std::vector<std::pair<models::Hypernetwork, double>> hypernetworks;
  for (const auto& h : hn_specs)
    hypernetworks.emplace_back(with_option("--hypernetwork", [&] { return loaders::load_hypernetwork(h.path); }),
                               h.multiplier);
  configure_threads(o.threads);

  pipelines::StableDiffusionParams p;
  p.prompt = prompt;
  p.negative_prompt = negative_prompt;
  p.width = o.width;
  p.height = o.height;
  p.num_inference_steps = o.steps;
  p.guidance_scale = o.guidance_scale;
  p.scheduler = o.scheduler;
  p.eta = o.eta;
  p.num_images_per_prompt = o.num_images;
  p.clip_skip = o.clip_skip;
  p.strength = o.strength;
  p.show_progress = o.progress;
  DMX_CHECK_ARG(o.width >= 0 && o.height >= 0, "--width/--height must be positive, got ", o.width, "x", o.height);
  const uint64_t seed = api::resolve_seed(o.seed);
  at::Generator generator = pipelines::make_generator(seed);  // every draw of the run
  p.generator = &generator;
  Image init_rgb;
  if (!o.init_image.empty()) {
    init_rgb = to_rgb(load_image(o.init_image, "--init-image"));
    if ((o.width || o.height) && o.mask.empty()) {  // with --mask they resize (resize_inpaint_inputs)
      DMX_CHECK_ARG(o.width == init_rgb.width && o.height == init_rgb.height, "--width/--height (", o.width, "x",
                    o.height, ") must match the --init-image size (", init_rgb.width, "x", init_rgb.height,
                    ") or be left out");
    }
    p.init_image = image_to_tensor(init_rgb);
  }
  Image mask = o.mask.empty() ? Image() : api::load_mask(o, init_rgb);
  if (!o.init_latents.empty()) {
    io::TensorMap lat;
    try {
      lat = io::load_safetensors(o.init_latents);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(std::string("--init-latents: ") + e.what());
    }
    DMX_CHECK_ARG(lat.count("latents") == 1, "--init-latents: ", o.init_latents, " has no tensor named 'latents'");
    p.latents = lat["latents"].to(at::kFloat);
    DMX_CHECK_ARG(at::isfinite(p.latents).all().item<bool>(), "--init-latents: ", o.init_latents,
                  ": 'latents' holds non-finite values (NaN or Inf), which give a black picture");
  }

  loaders::LoadOptions lo;
  lo.config_dir = o.config_dir;
  lo.tokenizer_dir = o.tokenizer_dir;
  lo.dtype = dtype;
  lo.device = o.device;
  PhaseTimer load_timer("load");
  std::string session_hash;
  std::shared_ptr<loaders::SpaTextModel> spatext;
  std::shared_ptr<loaders::SceneModel> scene;
  std::shared_ptr<loaders::StableDiffusionModels> models;
  if (scene_folder) {
    scene = loaders::load_scene(o.model, lo);
    models = scene->models;
    if (p.width == 0) p.width = scene->config.resolution;  // the only size its token grid fits
    if (p.height == 0) p.height = scene->config.resolution;
  } else if (spatext_folder) {
    spatext = loaders::load_spatext(o.model, lo);
    models = spatext->models;
    if (p.width == 0) p.width = spatext->config.resolution;  // the size it was trained at
    if (p.height == 0) p.height = spatext->config.resolution;
  } else {
    models = sink ? sink->load(o.model, lo, &session_hash) : loaders::load_stable_diffusion(o.model, lo);
  }
  load_timer.stop();
  std::optional<BackgroundModelHash> hash;
  if (!sink) hash.emplace(o.model);
  if (!o.mask.empty() && (o.width || o.height)) {
    api::resize_inpaint_inputs(o, models->vae_scale_factor(), init_rgb, mask);
    p.init_image = image_to_tensor(init_rgb);
  }
  std::unique_ptr<loaders::ScopedLoRAs> loras;
  if (!lora_specs.empty()) {
    loras = std::make_unique<loaders::ScopedLoRAs>(models, lora_specs, lora_opts);
    if (o.progress)
      for (const auto& r : loras->reports()) log_info("lora: " + r.summary() + " (" + r.source + ")");
  }
  std::vector<pipelines::ControlNetUnit> units;  // kept for --save-control-image
  if (!o.controlnets.empty()) {
    // Output size: --width/--height, else the first map's size rounded down to the VAE factor and at least 8
    // (diffusers' VaeImageProcessor); every map is resized to it with PIL's Lanczos, as the reference does. Given sizes
    // are rounded down to the VAE factor too (get_default_height_width), as diffusers does.
    const int f = pipelines::control_size_multiple(models->vae_scale_factor());
    int w = o.width - o.width % f, h = o.height - o.height % f;
    if (o.width == 0 || o.height == 0) {
      const auto d = pipelines::default_control_size(control_maps[0], f);
      if (o.width == 0) w = d.first;
      if (o.height == 0) h = d.second;
    }
    DMX_CHECK_ARG(w > 0 && h > 0, "--control-image: the image is smaller than ", f, " pixels; give --width/--height");
    p.width = w;
    p.height = h;
    for (size_t i = 0; i < o.controlnets.size(); ++i) {
      pipelines::ControlNetUnit u;
      u.name = o.controlnets[i];
      u.model = pipelines::load_controlnet(o.controlnets[i], lo, "--controlnet");
      u.image = pipelines::prepare_control_image(control_maps[i], w, h);
      u.scale = o.control_scales.empty() ? 1.0 : o.control_scales[i];
      u.start = o.control_starts.empty() ? 0.0 : o.control_starts[i];
      u.end = o.control_ends.empty() ? 1.0 : o.control_ends[i];
      DMX_CHECK_ARG(u.start < u.end, "--control-start/--control-end of net ", i, ": control start (", u.start,
                    ") must be smaller than control end (", u.end, ")");
      units.push_back(u);
    }
    p.residual_providers = pipelines::controlnet_providers(units, o.guess_mode);
  }
  if (!o.adapters.empty()) {
    // Sizes: --width/--height (or the ControlNet's), else the first picture's rounded down to the adapter's
    // downscale factor (the pipeline's _default_height_width); every picture is resized to it with Lanczos.
    for (auto& u : adapter_units) u.model->to(models->device, dtype);
    p.residual_providers.push_back(std::make_shared<pipelines::T2IAdapterProvider>(std::move(adapter_units)));
  }
  if (!p.residual_providers.empty()) {
    for (const auto& r : p.residual_providers) {  // the size a provider implies, as run() settles it
      const auto size = r->default_size();
      if (!size) continue;
      if (p.width == 0) p.width = size->first;
      if (p.height == 0) p.height = size->second;
      break;
    }
    DMX_CHECK_ARG(p.width > 0 && p.height > 0,
                  "--adapter-image: the picture is smaller than the adapter's downscale "
                  "factor; give --width/--height");
    pipelines::StableDiffusionPipeline(models).check_params(p);
  }
  // Layout (docs/regional.md): the method's parts, its provider first (a ControlNet then reads the same text
  // conditioning as the UNet), its attention processor on the UNet for the run.
  std::unique_ptr<nn::ScopedAttentionProcessor> layout_guard;
  if (!o.layout_path.empty()) {
    if (p.width == 0) p.width = models->default_sample_size();
    if (p.height == 0) p.height = models->default_sample_size();
    pipelines::check_output_size(*models, p.width, p.height, p.num_images_per_prompt, p.guided());
    api::LayoutRun layout =
        api::make_layout_run(o, layout_map, *models, p.prompt, p.width, p.height, spatext.get(), seed, scene.get());
    p.prompt = layout.prompt;
    if (layout.provider) p.residual_providers.insert(p.residual_providers.begin(), layout.provider);
    pipelines::StableDiffusionPipeline(models).check_params(p);
    if (layout.processor)
      layout_guard = std::make_unique<nn::ScopedAttentionProcessor>(*models->unet, layout.processor);
  }
  if (spatext && (o.layout_path.empty() || o.layout_method != "spatext"))  // no map: the text-only run (+ regional)
    p.residual_providers.insert(p.residual_providers.begin(), api::spatext_text_only_provider(*spatext));
  if (scene && o.layout_path.empty())  // no layout: every row gets the dropped scene (the model's text-only run)
    p.residual_providers.insert(p.residual_providers.begin(),
                                pipelines::make_scene_provider(*scene, at::Tensor(), at::Tensor(),
                                                               pipelines::parse_scene_guidance(o.scene_guidance)));
  // Cascade: the base picture's size is known now; the upscaler is loaded and its memory planned before any work.
  std::shared_ptr<loaders::UpscaleModels> upscaler;
  pipelines::VaeTiling up_tiling;
  if (!o.upscale_model.empty()) {
    const int bw = p.init_image.defined() ? static_cast<int>(p.init_image.size(3))
                                          : (p.width ? p.width : models->default_sample_size());
    const int bh = p.init_image.defined() ? static_cast<int>(p.init_image.size(2))
                                          : (p.height ? p.height : models->default_sample_size());
    const int f = up_info.vae_scale_factor;
    api::check_upscale_size(bw, bh, f, "--upscale-model", "the base picture");
    loaders::LoadOptions up_lo;  // its own tokenizer and configs; the base's --config/--tokenizer are not its
    up_lo.dtype = lo.dtype;
    up_lo.device = lo.device;
    upscaler = loaders::load_upscale(o.upscale_model, up_lo);
    const auto [lw, lh] = pipelines::low_res_size(bw, bh, f);
    up_tiling = api::plan_upscale_memory(*upscaler, up_stage, lw, lh, 1, o.device == "cpu", "--upscale-model");
  }
  for (auto& h : hypernetworks) h.first->to(models->device);
  std::unique_ptr<models::ScopedHypernetworks> hn_guard;
  if (!hypernetworks.empty()) hn_guard = std::make_unique<models::ScopedHypernetworks>(*models->unet, hypernetworks);
  if (sink && sink->on_step) {
    p.on_step_end = [&, models](int step, double t, at::Tensor& latents) { sink->on_step(*models, step, t, latents); };
    p.show_progress = false;
  }
  pipelines::StableDiffusionOutput out;
  GenerateResult r;
  if (!o.mask.empty()) {
    api::BlendedRun b = api::run_blended(models, p, o, mask, seed);  // best first with --rank
    out.images = b.images;
    out.latents = b.latents;
    r.scores = b.scores;
    r.samples = b.samples;
  } else {
    // One run per process: the text encoder and the UNet are freed once done (the decode does not hold them),
    // except under LoRA or hypernetwork scopes, which restore those models' layers when they end.
    p.release_models = !loras && !hn_guard && !sink;  // a Session (dmx serve) keeps its models
    pipelines::StableDiffusionPipeline pipe(models);
    out = pipe.run(p);
  }
  layout_guard.reset();
  hn_guard.reset();
  loras.reset();

  r.seed = seed;
  // The metadata's Size is the base run's (what --from re-runs); the cascade's fields say the rest.
  const int w = static_cast<int>(out.images.size(2)), h = static_cast<int>(out.images.size(1));
  at::Tensor upscale_latents;
  if (upscaler) {
    // Each picture as the base model wrote it (8-bit, as a PIL picture handed to the upscale pipeline), in order,
    // with the run's generator: its draws follow the base run's (picture noise, then latents, per picture).
    PhaseTimer upscale_timer("upscale");
    pipelines::UpscalePipeline up(upscaler);
    std::vector<at::Tensor> images, latents;
    for (int64_t i = 0; i < out.images.size(0); ++i) {
      pipelines::UpscaleParams q;
      q.prompt = prompt;
      q.negative_prompt = negative_prompt;
      q.noise_level = o.upscale_noise_level;
      q.num_inference_steps = o.upscale_steps;
      q.guidance_scale = o.upscale_guidance_scale;
      q.generator = &generator;
      q.show_progress = o.progress;
      q.tiling = up_tiling;
      q.image = pipelines::preprocess_low_res(tensor_to_image(out.images[i]), upscaler->sd->vae_scale_factor());
      const auto res = up.run(q);
      images.push_back(res.images);
      latents.push_back(res.latents);
    }
    out.images = at::cat(images, 0);
    upscale_latents = at::cat(latents, 0).contiguous();
  }
  GenerateOptions meta = o;
  if (meta.scheduler.empty()) meta.scheduler = schedulers::scheduler_name_for_config(models->scheduler_config);
  const std::string model_hash = sink ? session_hash : hash->get();
  const std::string parameters = format_parameters(meta, seed, w, h, models->name, model_hash);
  const TextChunks text = {{"parameters", parameters}};
  if (sink) {
    SessionResult& s = sink->result;
    s.pngs.clear();
    for (int64_t i = 0; i < out.images.size(0); ++i) {
      const std::vector<uint8_t> png = encode_png(tensor_to_image(out.images[i]), text);
      s.pngs.emplace_back(png.begin(), png.end());
    }
    s.parameters = parameters;
    s.seed = seed;
    s.width = w;
    s.height = h;
    s.model_name = models->name;
    s.model_hash = model_hash;
    s.scheduler = meta.scheduler;
    r.seed = seed;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    s.seconds = r.seconds;
    return r;
  }
  PhaseTimer write_timer("write");
  // All outputs or none (a full disk at the third image leaves nothing).
  std::vector<PendingFile> files;
  for (size_t i = 0; i < control_paths.size(); ++i)
    files.push_back({control_paths[i], encode_png(tensor_to_image(units[i].image[0].permute({1, 2, 0})))});
  if (!o.save_latents.empty()) {
    io::TensorMap saved = {{"latents", out.latents.to(at::kFloat).contiguous()}};
    if (upscale_latents.defined()) saved["upscale_latents"] = upscale_latents;
    files.push_back({o.save_latents, io::serialize_safetensors(saved, {})});
  }
  for (size_t i = 0; i < image_paths.size(); ++i)
    files.push_back({image_paths[i], encode_png(tensor_to_image(out.images[static_cast<int64_t>(i)]), text)});
  write_files_atomic(files);
  r.images = image_paths;
  write_timer.stop();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace api

bool is_lcm_distilled_model(const std::string& model) {
  const std::string cfg = join_path(model, "unet/config.json");
  if (model.empty() || !is_directory(model) || !path_exists(cfg)) return false;
  try {
    const nlohmann::json j = io::load_json_file(cfg, "unet config");
    const auto it = j.find("time_cond_proj_dim");
    return it != j.end() && it->is_number_integer() && it->get<int64_t>() > 0;
  } catch (const Error&) {
    return false;  // the loader says what is wrong with the file
  }
}
}  // namespace dmx
