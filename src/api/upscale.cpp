// dmx::upscale: checks the options, loads a StableDiffusionUpscalePipeline folder and runs the x4 upscaler with one
// seeded CPU generator (diffusers: torch.Generator("cpu").manual_seed(seed) passed to the pipeline).
#include "dmx/upscale.h"

#include <unistd.h>

#include <algorithm>

#include <chrono>
#include <cmath>
#include <sstream>

#include "api/model_hash.h"
#include "api/options_util.h"
#include "api/upscale_stage.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/phase_timer.h"
#include "core/runtime.h"
#include "core/utf8.h"
#include "dmx/dmx.h"
#include "io/safetensors.h"
#include "loaders/upscale.h"
#include "pipelines/upscale.h"
#include "schedulers/registry.h"

namespace dmx {
namespace {

std::string fmt_number(double v) {
  std::ostringstream os;
  os.precision(10);
  os << v;
  return os.str();
}

void check_scheduler_name(const std::string& name) {
  if (name.empty()) return;
  const auto names = schedulers::sampler_names();
  if (std::find(names.begin(), names.end(), name) != names.end()) return;
  std::string list;
  for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
  throw InvalidArgument("--scheduler must be one of " + list + ", got '" + name + "'");
}

api::UpscaleStageOptions stage_options(const UpscaleOptions& o) {
  api::UpscaleStageOptions s;
  s.model = o.model;
  s.noise_level = o.noise_level;
  s.steps = o.steps;
  s.guidance_scale = o.guidance_scale;
  s.scheduler = o.scheduler;
  s.eta = o.eta;
  s.vae_tiling = o.vae_tiling;
  s.vae_tile_size = o.vae_tile_size;
  s.memory_limit_mb = o.memory_limit_mb;
  return s;
}

double physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 0.0;
}

// Every check that needs no file, then the output plan: bad input fails before anything is loaded or written.
void check_options(const UpscaleOptions& o) {
  DMX_CHECK_ARG(!o.model.empty(), "--model is required (a StableDiffusionUpscalePipeline folder)");
  DMX_CHECK_ARG(path_exists(o.model), "--model: path not found: ", o.model);
  DMX_CHECK_ARG(!o.image.empty(), "--image is required (the low-resolution picture)");
  DMX_CHECK_ARG(!o.output.empty(), "--output is required (a .png path)");
  check_text(o.prompt, "--prompt");
  check_text(o.negative_prompt, "--negative-prompt");
  DMX_CHECK_ARG(o.noise_level >= 0, "--noise-level must be >= 0, got ", o.noise_level);
  pipelines::check_num_images(o.num_images, "--num-images");
  api::check_device(o.device);
  api::parse_dtype(o.dtype, o.device);
  api::OutputPlan plan(o.overwrite);
  plan.input(o.model, "--model");
  plan.input(o.tokenizer_dir, "--tokenizer");
  plan.input(o.image, "--image");
  plan.input(o.from, "--from");
  for (const auto& path : api::numbered_paths(o.output, o.num_images)) plan.file(path, "--output", ".png");
  if (!o.save_latents.empty()) plan.file(o.save_latents, "--save-latents", ".safetensors");
  plan.prepare();
}
}  // namespace

std::string format_upscale_parameters(const UpscaleOptions& o, uint64_t seed, int width, int height, int low_res_width,
                                      int low_res_height, const std::string& sampler, const std::string& model_name,
                                      const std::string& model_hash) {
  std::ostringstream os;
  os << o.prompt << "\n";
  if (!o.negative_prompt.empty()) os << "Negative prompt: " << o.negative_prompt << "\n";
  std::string label = schedulers::sampler_label(sampler);
  if (label.empty()) label = sampler;
  os << "Steps: " << o.steps;
  if (!label.empty()) os << ", Sampler: " << label;
  os << ", CFG scale: " << fmt_number(o.guidance_scale) << ", Seed: " << seed << ", Size: " << width << "x" << height;
  if (!model_hash.empty()) os << ", Model hash: " << model_hash;
  if (!model_name.empty()) os << ", Model: " << model_name;
  if (o.eta != 0) os << ", Eta: " << fmt_number(o.eta);
  if (o.num_images > 1) os << ", Batch size: " << o.num_images;
  // The cascade's field name (metadata.cpp): parse_parameters reads it back as upscale_noise_level (--from).
  os << ", Upscale noise level: " << o.noise_level << ", Upscale source size: " << low_res_width << "x"
     << low_res_height << ", Version: dmx " << version();
  return os.str();
}

UpscaleResult upscale(const UpscaleOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.verbose ? LogLevel::kVerbose : o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  check_options(o);
  // The folder's kind, max_noise_level and VAE factor before any weight: a text-to-image folder, a noise level
  // above the model's maximum or a picture whose output would be too large fail here.
  const api::UpscaleStageOptions stage = stage_options(o);
  const loaders::UpscaleFolderInfo info = api::check_upscale_stage(stage);
  const int f = info.vae_scale_factor;
  // Pixel limit on the picture: its output (f x each side) must stay within the output limit of 4096 x 4096.
  const Image rgb = to_rgb(load_image(o.image, "--image", kMaxImagePixels / (static_cast<int64_t>(f) * f)));
  const auto [low_w, low_h] = pipelines::low_res_size(rgb.width, rgb.height, f);
  DMX_CHECK_ARG(low_w >= f && low_h >= f, "--image: width and height must be at least ", f,
                " (the upscaler's VAE factor), got ", rgb.width, "x", rgb.height);
  api::check_upscale_size(rgb.width, rgb.height, f, "--image", "the picture");
  configure_threads(o.threads);
  const uint64_t seed = api::resolve_seed(o.seed);

  loaders::LoadOptions lo;
  lo.tokenizer_dir = o.tokenizer_dir;
  lo.dtype = api::parse_dtype(o.dtype, o.device);
  lo.device = o.device;
  PhaseTimer load_timer("load");
  auto models = loaders::load_upscale(o.model, lo);
  load_timer.stop();

  // Memory: refused before any work when the run cannot fit; "auto" tiles the VAE decode when that makes it fit.
  const pipelines::VaeTiling tiling =
      api::plan_upscale_memory(*models, stage, low_w, low_h, o.num_images, o.device == "cpu", "--image");
  BackgroundModelHash hash(o.model);

  pipelines::UpscaleParams p;
  p.prompt = o.prompt;
  p.negative_prompt = o.negative_prompt;
  p.image = pipelines::preprocess_low_res(rgb, f);
  p.noise_level = o.noise_level;
  p.num_inference_steps = o.steps;
  p.guidance_scale = o.guidance_scale;
  p.scheduler = o.scheduler;
  p.eta = o.eta;
  p.num_images_per_prompt = o.num_images;
  p.show_progress = o.progress;
  p.tiling = tiling;
  at::Generator generator = pipelines::make_generator(seed);  // every draw of the run: picture noise, latents, steps
  p.generator = &generator;
  pipelines::UpscalePipeline pipe(models);
  const pipelines::UpscaleOutput out = pipe.run(p);

  UpscaleResult r;
  r.seed = seed;
  r.tiled = tiling.enabled;
  r.width = static_cast<int>(out.images.size(2));
  r.height = static_cast<int>(out.images.size(1));
  r.low_res_width = low_w;
  r.low_res_height = low_h;
  const std::string sampler =
      o.scheduler.empty() ? schedulers::scheduler_name_for_config(models->sd->scheduler_config) : o.scheduler;
  const TextChunks text = {{"parameters", format_upscale_parameters(o, seed, r.width, r.height, low_w, low_h, sampler,
                                                                    models->sd->name, hash.get())}};
  PhaseTimer write_timer("write");
  const std::vector<std::string> image_paths = api::numbered_paths(o.output, o.num_images);
  std::vector<PendingFile> files;
  if (!o.save_latents.empty()) {
    files.push_back({o.save_latents, io::serialize_safetensors({{"latents", out.latents.contiguous()}}, {})});
    r.latents = o.save_latents;
  }
  for (size_t i = 0; i < image_paths.size(); ++i)
    files.push_back({image_paths[i], encode_png(tensor_to_image(out.images[static_cast<int64_t>(i)]), text)});
  write_files_atomic(files);  // all or nothing
  r.images = image_paths;
  write_timer.stop();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace dmx

namespace dmx::api {

loaders::UpscaleFolderInfo check_upscale_stage(const UpscaleStageOptions& o) {
  const std::string& pre = o.flag_prefix;
  const std::string model_flag = pre == "--" ? "--model" : pre + "model";
  DMX_CHECK_ARG(!o.model.empty(), model_flag, " is required (a StableDiffusionUpscalePipeline folder)");
  DMX_CHECK_ARG(o.noise_level >= 0, pre, "noise-level must be >= 0, got ", o.noise_level);
  pipelines::check_num_inference_steps(o.steps, pre + "steps");
  pipelines::check_guidance_scale(o.guidance_scale, pre + "guidance-scale");
  pipelines::check_eta(o.eta, pre + "eta");
  check_scheduler_name(o.scheduler);
  DMX_CHECK_ARG(o.vae_tiling == "auto" || o.vae_tiling == "on" || o.vae_tiling == "off", pre,
                "vae-tiling must be auto, on or off, got '", o.vae_tiling, "'");
  DMX_CHECK_ARG(o.vae_tile_size == 0 || (o.vae_tile_size >= 16 && o.vae_tile_size <= 4096), pre,
                "vae-tile-size must be 0 (the VAE's sample_size) or in [16, 4096], got ", o.vae_tile_size);
  DMX_CHECK_ARG(o.memory_limit_mb >= 0 && o.memory_limit_mb <= (int64_t{1} << 30),
                "--memory-limit must be in [0, 2^30] MiB, got ", o.memory_limit_mb);
  loaders::UpscaleFolderInfo info;
  try {
    info = loaders::inspect_upscale_folder(o.model);
  } catch (const InvalidArgument& e) {  // the loader names --model; the stage of generate is --upscale-model
    std::string msg = e.what();
    if (model_flag != "--model" && msg.rfind("--model", 0) == 0) msg = model_flag + msg.substr(7);
    throw InvalidArgument(msg);
  }
  DMX_CHECK_ARG(o.noise_level <= info.max_noise_level, pre, "noise-level must be in [0, ", info.max_noise_level,
                "] (max_noise_level of ", o.model, "/model_index.json), got ", o.noise_level);
  return info;
}

void check_upscale_size(int low_w, int low_h, int f, const std::string& param, const std::string& what) {
  const auto [w, h] = pipelines::low_res_size(low_w, low_h, f);
  DMX_CHECK_ARG(w * f <= 4096 && h * f <= 4096, param, ": the upscaler's output is ", f, "x ", what,
                ", at most 4096x4096: width and height must be at most ", 4096 / f, ", got ", low_w, "x", low_h);
}

pipelines::VaeTiling plan_upscale_memory(const loaders::UpscaleModels& m, const UpscaleStageOptions& o, int low_w,
                                         int low_h, int num_images, bool cpu, const std::string& param) {
  pipelines::VaeTiling tiling;
  tiling.tile_sample_size = o.vae_tile_size;
  tiling.enabled = o.vae_tiling == "on";
  if (!cpu) return tiling;  // the budget is the host's memory
  const int f = m.sd->vae_scale_factor();
  const bool guided = o.guidance_scale > 1.0;
  const double budget =
      o.memory_limit_mb > 0 ? static_cast<double>(o.memory_limit_mb) * (1 << 20) : physical_memory_bytes();
  if (budget <= 0) return tiling;
  auto need = pipelines::estimate_upscale_memory(m, low_w, low_h, num_images, guided, tiling);
  if (need.total() > budget && o.vae_tiling == "auto") {
    pipelines::VaeTiling tiled = tiling;
    tiled.enabled = true;
    const auto need_tiled = pipelines::estimate_upscale_memory(m, low_w, low_h, num_images, guided, tiled);
    if (need_tiled.total() < need.total()) {
      tiling = tiled;
      need = need_tiled;
      log_info("vae: decoding in tiles (the whole " + std::to_string(low_w * f) + "x" + std::to_string(low_h * f) +
               " picture at once would exceed the memory budget)");
    }
  }
  if (need.total() > budget)
    throw InvalidArgument(detail::concat(
        param, ": upscaling ", low_w, "x", low_h, " to ", low_w * f, "x", low_h * f, " would need about ",
        pipelines::format_bytes(need.total()), " of memory (weights ", pipelines::format_bytes(need.weights),
        ", UNet activations ", pipelines::format_bytes(need.unet), ", VAE decode ", pipelines::format_bytes(need.vae),
        tiling.enabled ? " in tiles" : "", "), more than the ", pipelines::format_bytes(budget),
        o.memory_limit_mb > 0 ? " of --memory-limit" : " of this machine",
        tiling.enabled || o.vae_tiling == "off" ? "" : "; try --vae-tiling on", "; or give a smaller picture"));
  return tiling;
}
}  // namespace dmx::api
