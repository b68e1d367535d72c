// Stable unCLIP in the api: `generate` on a StableUnCLIPPipeline folder, `variations`, `embed` (docs/unclip.md).
// Every input and output is checked before any work; one seeded CPU generator per run draws everything in
// diffusers' order (pipelines/stable_unclip.h).
#include "api/unclip.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "api/model_hash.h"
#include "api/options_util.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/phase_timer.h"
#include "core/runtime.h"
#include "core/utf8.h"
#include "dmx/unclip.h"
#include "io/safetensors.h"
#include "loaders/clip.h"
#include "loaders/model_bundle.h"
#include "loaders/unclip.h"
#include "pipelines/generation.h"
#include "pipelines/stable_unclip.h"
#include "pipelines/unclip_steps.h"
#include "schedulers/registry.h"

namespace dmx {
namespace api {

std::string unclip_pipeline_class(const std::string& model) {
  if (!is_directory(model)) return "";
  const std::string index = join_path(model, "model_index.json");
  if (!path_exists(index)) return "";
  try {
    const auto j = nlohmann::json::parse(read_text_file(index, "model_index.json", kMaxJsonFileBytes));
    const auto it = j.find("_class_name");
    if (it == j.end() || !it->is_string()) return "";
    const std::string cls = it->get<std::string>();
    return cls == "StableUnCLIPPipeline" || cls == "StableUnCLIPImg2ImgPipeline" ? cls : "";
  } catch (const std::exception&) {
    return "";  // a malformed index: the loader reports it
  }
}

void check_no_unclip_options(const GenerateOptions& o) {
  const char* given = o.prior_steps            ? "--prior-steps"
                      : o.prior_guidance_scale ? "--prior-guidance-scale"
                      : o.noise_level          ? "--noise-level"
                                               : nullptr;
  if (!given) return;
  throw InvalidArgument(detail::concat(given, " applies to Stable unCLIP folders (model_index.json ",
                                       "StableUnCLIPPipeline); --model ", o.model, " is not one"));
}

namespace {

void check_scheduler_name(const std::string& name) {
  if (name.empty()) return;
  const auto names = schedulers::sampler_names();
  if (std::find(names.begin(), names.end(), name) != names.end()) return;
  std::string list;
  for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
  throw InvalidArgument("--scheduler must be one of " + list + ", got '" + name + "'");
}

// The options of `dmx generate` that a Stable unCLIP run does not take (the prior and the image embedding
// replace them, or diffusers' StableUnCLIPPipeline has no such input).
void refuse_non_unclip_options(const GenerateOptions& o) {
  std::vector<std::string> given;
  if (!o.init_image.empty()) given.push_back("--init-image");
  if (!o.mask.empty()) given.push_back("--mask");
  if (!o.controlnets.empty() || !o.control_images.empty()) given.push_back("--controlnet/--control-image");
  if (!o.save_control_image.empty()) given.push_back("--save-control-image");
  if (o.guess_mode) given.push_back("--guess-mode");
  if (!o.loras.empty() || !o.lora_dir.empty()) given.push_back("--lora/--lora-dir");
  if (!o.init_latents.empty()) given.push_back("--init-latents");
  if (!o.config_dir.empty()) given.push_back("--config");
  if (!o.tokenizer_dir.empty()) given.push_back("--tokenizer");
  if (o.rank) given.push_back("--rank");
  if (!o.upscale_model.empty()) given.push_back("--upscale-model");
  if (!o.adapters.empty() || !o.adapter_images.empty()) given.push_back("--adapter/--adapter-image");
  if (!o.hypernetworks.empty() || !o.hypernetwork_dir.empty()) given.push_back("--hypernetwork/--hypernetwork-dir");
  if (given.empty()) return;
  std::string list;
  for (const auto& g : given) list += (list.empty() ? "" : ", ") + g;
  throw InvalidArgument(detail::concat(list, " cannot be used with a Stable unCLIP folder (", o.model,
                                       "): StableUnCLIPPipeline makes the picture from the prompt through its prior "
                                       "(image variations: dmx variations)"));
}

// --noise-level against the folder's image_noising_scheduler before anything is loaded (a real folder takes a while
// to load); a missing or malformed config is left to the loader, which names it.
void check_noise_level_early(const std::string& model, int noise_level) {
  nlohmann::json cfg;
  try {
    cfg = schedulers::parse_scheduler_config(
        read_text_file(join_path(join_path(model, "image_noising_scheduler"), "scheduler_config.json"),
                       "scheduler config", kMaxJsonFileBytes));
    if (!cfg.contains("_class_name") || !cfg.at("_class_name").is_string()) return;
  } catch (const std::exception&) {
    return;
  }
  std::unique_ptr<schedulers::Scheduler> noising;
  try {
    noising = schedulers::create_scheduler(cfg.at("_class_name").get<std::string>(), cfg);
  } catch (const std::exception&) {
    return;
  }
  pipelines::check_noise_level(noise_level, *noising, "--noise-level");
}

struct UnCLIPModels {
  std::shared_ptr<loaders::UnCLIPComponents> unclip;
  std::shared_ptr<loaders::StableDiffusionModels> decoder;
};

UnCLIPModels load_unclip(const std::string& model, at::ScalarType dtype, const std::string& device) {
  loaders::LoadOptions lo;
  lo.dtype = dtype;
  lo.device = device;
  PhaseTimer t("load");
  UnCLIPModels m;
  m.unclip = loaders::load_unclip_components(model, lo);  // first: a folder missing a component says which
  m.decoder = loaders::load_stable_diffusion(model, lo);
  return m;
}

std::vector<PendingFile> output_files(const std::vector<std::string>& image_paths, const std::string& save_latents,
                                      const pipelines::StableUnCLIPOutput& out, const TextChunks& text) {
  std::vector<PendingFile> files;
  if (!save_latents.empty())
    files.push_back(
        {save_latents, io::serialize_safetensors({{"latents", out.latents.to(at::kFloat).contiguous()}}, {})});
  for (size_t i = 0; i < image_paths.size(); ++i)
    files.push_back({image_paths[i], encode_png(tensor_to_image(out.images[static_cast<int64_t>(i)]), text)});
  return files;
}

// Spherical interpolation of two image embeddings [1, E] at t in [0, 1], as diffusers' UnCLIPImageInterpolationPipeline
// (community): the angle between the normalised embeddings, the weights applied to the embeddings themselves, so
// t = 0 and t = 1 give a and b exactly. Parallel embeddings (no angle) interpolate linearly.
at::Tensor slerp_embeddings(const at::Tensor& a, const at::Tensor& b, double t) {
  const at::Tensor an = a / a.norm(), bn = b / b.norm();
  const double omega = std::acos(std::clamp((an * bn).sum().item<double>(), -1.0, 1.0));
  const double so = std::sin(omega);
  if (so < 1e-6) return a * (1.0 - t) + b * t;
  return a * (std::sin((1.0 - t) * omega) / so) + b * (std::sin(t * omega) / so);
}

// The pictures side by side, left to right (the interpolation strip).
Image strip_of(const std::vector<Image>& frames) {
  Image o;
  o.height = frames.front().height;
  o.channels = frames.front().channels;
  for (const auto& f : frames) o.width += f.width;
  o.data.assign(static_cast<size_t>(o.width) * o.height * o.channels, 0);
  int x0 = 0;
  for (const auto& f : frames) {
    for (int y = 0; y < f.height; ++y)
      std::copy_n(&f.data[static_cast<size_t>(y) * f.width * f.channels], static_cast<size_t>(f.width) * f.channels,
                  &o.data[(static_cast<size_t>(y) * o.width + x0) * o.channels]);
    x0 += f.width;
  }
  return o;
}

}  // namespace

GenerateResult generate_unclip(const GenerateOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.verbose ? LogLevel::kVerbose : o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  check_text(o.prompt, "--prompt");
  check_text(o.negative_prompt, "--negative-prompt");
  const std::string cls = unclip_pipeline_class(o.model);
  DMX_CHECK_ARG(cls == "StableUnCLIPPipeline", "--model ", o.model, " is a ", cls,
                " folder (image variations): use `dmx variations --model ... --image ...`; `dmx generate` needs a "
                "StableUnCLIPPipeline folder (with a prior)");
  refuse_non_unclip_options(o);
  api::check_device(o.device);
  const at::ScalarType dtype = parse_dtype(o.dtype, o.device);
  check_scheduler_name(o.scheduler);
  DMX_CHECK_ARG(o.width >= 0 && o.height >= 0, "--width/--height must be positive, got ", o.width, "x", o.height);
  pipelines::check_num_inference_steps(o.steps, "--steps");
  pipelines::check_guidance_scale(o.guidance_scale, "--guidance-scale");
  pipelines::check_eta(o.eta, "--eta");
  pipelines::check_num_images(o.num_images, "--num-images");
  const int prior_steps = o.prior_steps.value_or(25);
  const double prior_guidance = o.prior_guidance_scale.value_or(4.0);
  const int noise_level = o.noise_level.value_or(0);
  pipelines::check_num_inference_steps(prior_steps, "--prior-steps");
  pipelines::check_guidance_scale(prior_guidance, "--prior-guidance-scale");
  DMX_CHECK_ARG(noise_level >= 0,
                "--noise-level must be >= 0 (and below the image_noising_scheduler's "
                "num_train_timesteps), got ",
                noise_level);
  check_noise_level_early(o.model, noise_level);
  const std::vector<std::string> image_paths = numbered_paths(o.output, o.num_images);
  {
    OutputPlan plan(o.overwrite);
    plan.input(o.model, "--model");
    plan.input(o.from, "--from");
    for (const auto& path : image_paths) plan.file(path, "--output", ".png");
    if (!o.save_latents.empty()) plan.file(o.save_latents, "--save-latents", ".safetensors");
    plan.prepare();
  }
  configure_threads(o.threads);
  const UnCLIPModels m = load_unclip(o.model, dtype, o.device);
  BackgroundModelHash hash(o.model);
  pipelines::StableUnCLIPPipeline pipe(m.decoder, m.unclip);

  pipelines::StableUnCLIPParams p;
  p.prompt = o.prompt;
  p.negative_prompt = o.negative_prompt;
  p.width = o.width;
  p.height = o.height;
  p.num_inference_steps = o.steps;
  p.guidance_scale = o.guidance_scale;
  p.scheduler = o.scheduler;
  p.eta = o.eta;
  p.num_images_per_prompt = o.num_images;
  p.clip_skip = o.clip_skip;
  p.show_progress = o.progress;
  p.prior_num_inference_steps = prior_steps;
  p.prior_guidance_scale = prior_guidance;
  p.noise_level = noise_level;
  {  // the folder's rules with the options' names, before anything is drawn
    const auto& ncfg = m.unclip->image_noising_scheduler_config;
    auto noising = schedulers::create_scheduler(ncfg.at("_class_name").get<std::string>(), ncfg);
    pipelines::check_noise_level(noise_level, *noising, "--noise-level");
    pipelines::check_clip_skip(o.clip_skip, *m.decoder, "--clip-skip");
  }
  const uint64_t seed = resolve_seed(o.seed);
  at::Generator generator = pipelines::make_generator(seed);  // every draw of the run
  p.generator = &generator;
  const pipelines::StableUnCLIPOutput out = pipe.run(p);

  GenerateResult r;
  r.seed = seed;
  const int w = static_cast<int>(out.images.size(2)), h = static_cast<int>(out.images.size(1));
  GenerateOptions meta = o;
  if (meta.scheduler.empty()) meta.scheduler = schedulers::scheduler_name_for_config(m.decoder->scheduler_config);
  meta.prior_steps = prior_steps;
  meta.prior_guidance_scale = prior_guidance;
  meta.noise_level = noise_level;
  const TextChunks text = {{"parameters", format_parameters(meta, seed, w, h, m.decoder->name, hash.get())}};
  PhaseTimer write_timer("write");
  write_files_atomic(output_files(image_paths, o.save_latents, out, text));
  r.images = image_paths;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace api

bool is_unclip_model(const std::string& model) { return !api::unclip_pipeline_class(model).empty(); }

VariationsResult variations(const VariationsOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.verbose ? LogLevel::kVerbose : o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  DMX_CHECK_ARG(!o.model.empty(), "--model is required (a StableUnCLIPImg2ImgPipeline folder)");
  DMX_CHECK_ARG(path_exists(o.model), "--model: path not found: ", o.model);
  const std::string cls = api::unclip_pipeline_class(o.model);
  DMX_CHECK_ARG(
      cls == "StableUnCLIPImg2ImgPipeline", "--model ", o.model,
      " must be a diffusers "
      "StableUnCLIPImg2ImgPipeline folder (feature_extractor + image_encoder), got ",
      cls.empty() ? std::string("another kind of model") : "a " + cls + " folder (text to image: dmx generate)");
  DMX_CHECK_ARG(!o.image.empty(), "--image is required (the picture to make variations of)");
  DMX_CHECK_ARG(!o.output.empty(), "--output is required (a .png path)");
  check_text(o.prompt, "--prompt");
  check_text(o.negative_prompt, "--negative-prompt");
  api::check_device(o.device);
  const at::ScalarType dtype = api::parse_dtype(o.dtype, o.device);
  api::check_scheduler_name(o.scheduler);
  DMX_CHECK_ARG(o.width >= 0 && o.height >= 0, "--width/--height must be positive, got ", o.width, "x", o.height);
  pipelines::check_num_inference_steps(o.steps, "--steps");
  pipelines::check_guidance_scale(o.guidance_scale, "--guidance-scale");
  pipelines::check_eta(o.eta, "--eta");
  pipelines::check_num_images(o.num_images, "--num-images");
  DMX_CHECK_ARG(o.noise_level >= 0,
                "--noise-level must be >= 0 (and below the image_noising_scheduler's "
                "num_train_timesteps), got ",
                o.noise_level);
  api::check_noise_level_early(o.model, o.noise_level);
  const bool interpolate = !o.interpolate_to.empty();
  DMX_CHECK_ARG(!interpolate || o.num_images >= 2, "--interpolate-to needs --num-images N >= 2 (the pictures along ",
                "the interpolation, both ends included), got ", o.num_images);
  const std::vector<std::string> image_paths = api::numbered_paths(o.output, o.num_images);
  {
    api::OutputPlan plan(o.overwrite);
    plan.input(o.model, "--model");
    plan.input(o.image, "--image");
    plan.input(o.interpolate_to, "--interpolate-to");
    for (const auto& path : image_paths) plan.file(path, "--output", ".png");
    if (interpolate) plan.file(o.output, "--output (the interpolation strip)", ".png");
    if (!o.save_latents.empty()) plan.file(o.save_latents, "--save-latents", ".safetensors");
    plan.prepare();
  }
  const Image picture = to_rgb(load_image(o.image, "--image"));
  const Image picture_to = interpolate ? to_rgb(load_image(o.interpolate_to, "--interpolate-to")) : Image();
  configure_threads(o.threads);
  const api::UnCLIPModels m = api::load_unclip(o.model, dtype, o.device);
  BackgroundModelHash hash(o.model);
  pipelines::StableUnCLIPPipeline pipe(m.decoder, m.unclip);
  pipelines::StableUnCLIPParams p;
  p.prompt = o.prompt;
  p.negative_prompt = o.negative_prompt;
  p.width = o.width;
  p.height = o.height;
  p.num_inference_steps = o.steps;
  p.guidance_scale = o.guidance_scale;
  p.scheduler = o.scheduler;
  p.eta = o.eta;
  p.num_images_per_prompt = o.num_images;
  p.show_progress = o.progress;
  p.noise_level = o.noise_level;
  p.image = picture;
  {
    const auto& ncfg = m.unclip->image_noising_scheduler_config;
    auto noising = schedulers::create_scheduler(ncfg.at("_class_name").get<std::string>(), ncfg);
    pipelines::check_noise_level(o.noise_level, *noising, "--noise-level");
  }
  const uint64_t seed = api::resolve_seed(o.seed);
  pipelines::StableUnCLIPOutput out;
  std::vector<double> interpolation;  // t of each picture
  if (!interpolate) {
    at::Generator generator = pipelines::make_generator(seed);
    p.generator = &generator;
    out = pipe.run(p);
  } else {
    // One picture per point of the slerp, each run with the same seed (the same embedding noise and latents): the
    // first picture is `dmx variations --image A --seed S`, the last the same of B.
    const at::Tensor from = pipe.encode_image(picture, "--image"),
                     to = pipe.encode_image(picture_to, "--interpolate-to");
    p.image = Image();
    p.num_images_per_prompt = 1;
    std::vector<at::Tensor> images, latents;
    for (int k = 0; k < o.num_images; ++k) {
      const double t = static_cast<double>(k) / (o.num_images - 1);
      interpolation.push_back(t);
      p.image_embeds = api::slerp_embeddings(from, to, t);
      at::Generator generator = pipelines::make_generator(seed);
      p.generator = &generator;
      const pipelines::StableUnCLIPOutput one = pipe.run(p);
      images.push_back(one.images);
      latents.push_back(one.latents);
    }
    out.images = at::cat(images, 0);
    out.latents = at::cat(latents, 0);
  }

  VariationsResult r;
  r.seed = seed;
  GenerateOptions meta;
  meta.prompt = o.prompt;
  meta.negative_prompt = o.negative_prompt;
  meta.steps = o.steps;
  meta.guidance_scale = o.guidance_scale;
  meta.scheduler =
      o.scheduler.empty() ? schedulers::scheduler_name_for_config(m.decoder->scheduler_config) : o.scheduler;
  meta.eta = o.eta;
  meta.num_images = o.num_images;
  meta.noise_level = o.noise_level;
  const int w = static_cast<int>(out.images.size(2)), h = static_cast<int>(out.images.size(1));
  const std::string parameters = format_parameters(meta, seed, w, h, m.decoder->name, hash.get());
  const TextChunks text = {{"parameters", parameters}};
  std::vector<PendingFile> files = api::output_files(image_paths, o.save_latents, out, text);
  r.images = image_paths;
  if (interpolate) {  // each picture says where it lies; the strip of all of them is --output
    std::vector<Image> frames;
    for (size_t k = 0; k < image_paths.size(); ++k) {
      frames.push_back(tensor_to_image(out.images[static_cast<int64_t>(k)]));
      char t[64];
      std::snprintf(t, sizeof t, ", Interpolation: %.4g", interpolation[k]);
      for (auto& f : files)
        if (f.path == image_paths[k]) f.bytes = encode_png(frames.back(), {{"parameters", parameters + t}});
    }
    files.push_back(
        {o.output, encode_png(api::strip_of(frames), {{"parameters", parameters + ", Interpolation: strip"}})});
    r.images.push_back(o.output);
  }
  write_files_atomic(files);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

// ---- embed ------------------------------------------------------------------------------------------------

EmbedResult embed(const EmbedOptions& o) {
  set_log_level(o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  DMX_CHECK_ARG(!o.models.empty() && o.models.size() <= 2,
                "--model must be given once or twice (Stable unCLIP or CLIP folders), got ", o.models.size());
  DMX_CHECK_ARG(!o.images.empty() || !o.prompts.empty(), "give at least one --image or --prompt");
  DMX_CHECK_ARG(o.images.size() + o.prompts.size() <= 256, "at most 256 --image and --prompt together, got ",
                o.images.size() + o.prompts.size());
  api::check_device(o.device);
  for (const auto& m : o.models) {
    DMX_CHECK_ARG(path_exists(m), "--model: path not found: ", m);
    DMX_CHECK_ARG(loaders::is_clip_folder(m) || !api::unclip_pipeline_class(m).empty(), "--model ", m,
                  " is not a Stable unCLIP folder (model_index.json StableUnCLIPPipeline or "
                  "StableUnCLIPImg2ImgPipeline) or a CLIP folder (CLIPModel, as dmx train clip writes)");
  }
  for (const auto& t : o.prompts) check_text(t, "--prompt");
  std::string ext;
  if (!o.output.empty()) {
    const auto dot = o.output.rfind('.');
    ext = dot == std::string::npos ? "" : o.output.substr(dot);
    DMX_CHECK_ARG(ext == ".safetensors" || ext == ".json", "--output must end in .safetensors or .json, got '",
                  o.output, "'");
  }
  {
    api::OutputPlan plan(o.overwrite);
    for (const auto& m : o.models) plan.input(m, "--model");
    for (const auto& i : o.images) plan.input(i, "--image");
    if (!o.output.empty()) plan.file(o.output, "--output", ext);
    plan.prepare();
  }
  std::vector<Image> pictures;
  for (const auto& i : o.images) pictures.push_back(to_rgb(load_image(i, "--image")));
  configure_threads(o.threads);
  loaders::LoadOptions lo;
  lo.device = o.device;
  // The image tower (feature extractor + image encoder) and the text tower (tokenizer + text encoder with
  // projection): the first --model that has each. A CLIP folder has both.
  const models::CLIPImageProcessorConfig* feature_extractor = nullptr;
  models::CLIPVisionModelWithProjection image_encoder{nullptr};
  const models::CLIPTokenizer* tokenizer = nullptr;
  models::CLIPTextModel text_encoder{nullptr};
  std::vector<std::shared_ptr<void>> keep;  // the loaded components the pointers above point into
  for (const auto& m : o.models) {
    if (loaders::is_clip_folder(m)) {
      auto c = loaders::load_clip(m, lo);
      keep.push_back(c);
      if (!feature_extractor) {
        feature_extractor = &c->feature_extractor;
        image_encoder = c->image_encoder;
      }
      if (!tokenizer) {
        tokenizer = c->tokenizer.get();
        text_encoder = c->text_encoder;
      }
      continue;
    }
    auto c = loaders::load_unclip_components(m, lo);
    keep.push_back(c);
    if (c->has_image_encoder() && !feature_extractor) {
      feature_extractor = &c->feature_extractor;
      image_encoder = c->image_encoder;
    }
    if (c->has_prior() && !tokenizer) {
      tokenizer = c->prior_tokenizer.get();
      text_encoder = c->prior_text_encoder;
    }
  }
  DMX_CHECK_ARG(o.images.empty() || feature_extractor,
                "--image needs a StableUnCLIPImg2ImgPipeline folder (image_encoder) or a CLIP folder "
                "among --model");
  DMX_CHECK_ARG(o.prompts.empty() || tokenizer,
                "--prompt needs a StableUnCLIPPipeline folder (prior_text_encoder) or a CLIP folder "
                "among --model");
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> rows;
  EmbedResult r;
  at::Tensor image_embeds, text_embeds;
  if (!o.images.empty()) {
    std::vector<at::Tensor> e;
    for (size_t i = 0; i < pictures.size(); ++i)
      e.push_back(
          pipelines::clip_image_embeds(*feature_extractor, image_encoder, pictures[i], "--image " + o.images[i]));
    image_embeds = at::cat(e, 0).to(at::kFloat).to(at::kCPU);
    for (const auto& i : o.images) r.labels.push_back("image:" + i);
  }
  if (!o.prompts.empty()) {
    text_embeds = pipelines::encode_prior_prompt(*tokenizer, text_encoder, o.prompts, false)
                      .text_embeds.to(at::kFloat)
                      .to(at::kCPU);
    for (const auto& t : o.prompts) r.labels.push_back("text:" + t);
  }
  at::Tensor all = image_embeds.defined() && text_embeds.defined() ? at::cat({image_embeds, text_embeds}, 0)
                   : image_embeds.defined()                        ? image_embeds
                                                                   : text_embeds;
  DMX_CHECK_ARG(!(image_embeds.defined() && text_embeds.defined()) || image_embeds.size(1) == text_embeds.size(1),
                "the image embeddings are ", image_embeds.size(1), " wide, the text embeddings ",
                text_embeds.defined() ? text_embeds.size(1) : 0, ": not one CLIP space");
  const at::Tensor unit = all.to(at::kDouble) / all.to(at::kDouble).norm(2, 1, true).clamp_min(1e-12);
  const at::Tensor cosine = unit.matmul(unit.t()).contiguous();
  const int64_t n = all.size(0);
  const at::Tensor allc = all.contiguous();
  for (int64_t i = 0; i < n; ++i) {
    const float* row = allc[i].data_ptr<float>();
    r.embeddings.emplace_back(row, row + allc.size(1));
    std::vector<double> c(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) c[static_cast<size_t>(j)] = cosine[i][j].item<double>();
    r.cosine.push_back(c);
  }
  if (!o.output.empty()) {
    std::vector<uint8_t> bytes;
    if (ext == ".json") {
      nlohmann::json j;
      j["labels"] = r.labels;
      j["embeddings"] = r.embeddings;
      j["cosine"] = r.cosine;
      j["models"] = o.models;
      const std::string s = j.dump(1);
      bytes.assign(s.begin(), s.end());
    } else {
      io::TensorMap t;
      if (image_embeds.defined()) t["image_embeds"] = image_embeds.contiguous();
      if (text_embeds.defined()) t["text_embeds"] = text_embeds.contiguous();
      t["cosine"] = cosine.to(at::kFloat).contiguous();
      nlohmann::json labels = r.labels;
      bytes = io::serialize_safetensors(t, {{"labels", labels.dump()}});
    }
    write_files_atomic({{o.output, std::move(bytes)}});
    r.output = o.output;
  }
  return r;
}

std::string embed_table(const EmbedResult& r) {
  std::ostringstream os;
  const size_t n = r.labels.size();
  os << "cosine similarity (CLIP embeddings, " << (r.embeddings.empty() ? 0 : r.embeddings[0].size()) << " wide)\n";
  for (size_t i = 0; i < n; ++i) os << "  [" << i << "] " << terminal_safe(r.labels[i]) << "\n";
  os << "     ";
  for (size_t j = 0; j < n; ++j) {
    char b[16];
    std::snprintf(b, sizeof b, " %7s", ("[" + std::to_string(j) + "]").c_str());
    os << b;
  }
  os << "\n";
  for (size_t i = 0; i < n; ++i) {
    char b[16];
    std::snprintf(b, sizeof b, "%5s", ("[" + std::to_string(i) + "]").c_str());
    os << b;
    for (size_t j = 0; j < n; ++j) {
      std::snprintf(b, sizeof b, " %7.4f", r.cosine[i][j]);
      os << b;
    }
    os << "\n";
  }
  return os.str();
}
}  // namespace dmx
