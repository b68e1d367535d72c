// dmx::diffedit: checks the options, loads the model and runs DiffEditPipeline's three phases with one
// seeded CPU generator (diffusers: the same torch.Generator passed to generate_mask, invert and __call__).
#include "dmx/diffedit.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <future>
#include <sstream>

#include "api/model_hash.h"
#include "api/options_util.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/phase_timer.h"
#include "core/runtime.h"
#include "core/utf8.h"
#include "dmx/dmx.h"
#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "pipelines/diffedit.h"
#include "pipelines/generation.h"

namespace dmx {
namespace {

using api::fmt_number;

// Every check that needs no model, so bad input fails before anything is loaded or written.
void check_options(const DiffEditOptions& o) {
  DMX_CHECK_ARG(!o.model.empty(), "--model is required");
  DMX_CHECK_ARG(path_exists(o.model), "--model: path not found: ", o.model);
  DMX_CHECK_ARG(!o.image.empty(), "--image is required");
  DMX_CHECK_ARG(!o.source_prompt.empty(), "--source-prompt is required (what the image shows)");
  DMX_CHECK_ARG(!o.target_prompt.empty(), "--target-prompt is required (what the edited image should show)");
  check_text(o.source_prompt, "--source-prompt");
  check_text(o.target_prompt, "--target-prompt");
  check_text(o.negative_prompt, "--negative-prompt");
  DMX_CHECK_ARG(!o.output.empty(), "--output is required (a .png path)");
  pipelines::check_num_inference_steps(o.steps, "--steps");
  DMX_CHECK_ARG(std::isfinite(o.encode_ratio) && o.encode_ratio > 0 && o.encode_ratio <= 1,
                "--encode-ratio must be in (0, 1], got ", o.encode_ratio);
  DMX_CHECK_ARG(static_cast<int>(o.steps * o.encode_ratio) >= 1, "--encode-ratio ", o.encode_ratio, " with --steps ",
                o.steps, " runs no step (int(steps * encode_ratio) must be >= 1)");
  DMX_CHECK_ARG(std::isfinite(o.mask_threshold) && o.mask_threshold > 0, "--mask-threshold must be > 0, got ",
                o.mask_threshold);
  DMX_CHECK_ARG(o.num_maps >= 1 && o.num_maps <= 1000, "--num-maps must be in [1, 1000], got ", o.num_maps);
  DMX_CHECK_ARG(std::isfinite(o.mask_encode_strength) && o.mask_encode_strength > 0 && o.mask_encode_strength <= 1,
                "--mask-encode-strength must be in (0, 1], got ", o.mask_encode_strength);
  DMX_CHECK_ARG(static_cast<int>(o.steps * o.mask_encode_strength) >= 1, "--mask-encode-strength ",
                o.mask_encode_strength, " with --steps ", o.steps,
                " leaves no timestep (int(steps * strength) must be >= 1)");
  pipelines::check_guidance_scale(o.guidance_scale, "--guidance-scale");
  pipelines::check_guidance_scale(o.inversion_guidance_scale, "--inversion-guidance-scale");
  api::check_device(o.device);
  api::parse_dtype(o.dtype, o.device);
  // The outputs, written together or not at all, against the inputs and each other.
  api::OutputPlan plan(o.overwrite);
  api::add_model_inputs(plan, o);
  plan.input(o.image, "--image");
  plan.file(o.output, "--output", ".png");
  if (!o.mask_output.empty()) plan.file(o.mask_output, "--mask-output", ".png");
  if (!o.save_latents.empty()) plan.file(o.save_latents, "--save-latents", ".safetensors");
  plan.prepare();
}

}  // namespace

std::string format_diffedit_parameters(const DiffEditOptions& o, uint64_t seed, int width, int height,
                                       const std::string& model_name, const std::string& model_hash) {
  std::ostringstream os;
  os << o.target_prompt << "\n";
  if (!o.negative_prompt.empty()) os << "Negative prompt: " << o.negative_prompt << "\n";
  os << "Steps: " << o.steps << ", Sampler: DDIM, CFG scale: " << fmt_number(o.guidance_scale) << ", Seed: " << seed
     << ", Size: " << width << "x" << height;
  if (!model_hash.empty()) os << ", Model hash: " << model_hash;
  if (!model_name.empty()) os << ", Model: " << model_name;
  os << ", Denoising strength: " << fmt_number(o.encode_ratio)
     << ", DiffEdit source prompt: " << api::quoted(o.source_prompt)
     << ", DiffEdit mask threshold: " << fmt_number(o.mask_threshold) << ", DiffEdit noise maps: " << o.num_maps
     << ", DiffEdit mask encode strength: " << fmt_number(o.mask_encode_strength)
     << ", DiffEdit inversion CFG scale: " << fmt_number(o.inversion_guidance_scale) << ", Version: dmx " << version();
  return os.str();
}

DiffEditResult diffedit(const DiffEditOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.verbose ? LogLevel::kVerbose : o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  check_options(o);
  const Image rgb = to_rgb(load_image(o.image, "--image"));
  DMX_CHECK_ARG(rgb.width % 8 == 0 && rgb.height % 8 == 0,
                "--image: width and height must be multiples of 8 (resize or crop it), got ", rgb.width, "x",
                rgb.height);
  DMX_CHECK_ARG(rgb.width <= 4096 && rgb.height <= 4096, "--image: width and height must be at most 4096, got ",
                rgb.width, "x", rgb.height);
  configure_threads(o.threads);
  const uint64_t seed = api::resolve_seed(o.seed);

  loaders::LoadOptions lo;
  lo.config_dir = o.config_dir;
  lo.tokenizer_dir = o.tokenizer_dir;
  lo.dtype = api::parse_dtype(o.dtype);
  lo.device = o.device;
  PhaseTimer load_timer("load");
  auto models = loaders::load_stable_diffusion(o.model, lo);
  load_timer.stop();
  const int f = models->vae_scale_factor();
  DMX_CHECK_ARG(rgb.width % f == 0 && rgb.height % f == 0, "--image: width and height must be multiples of ", f,
                " for this model's VAE, got ", rgb.width, "x", rgb.height);
  BackgroundModelHash hash(o.model);

  const at::Tensor image = image_to_tensor(rgb);
  at::Generator gen = pipelines::make_generator(seed);  // every draw of the three phases
  pipelines::DiffEditPipeline pipe(models);
  DiffEditResult r;
  r.seed = seed;

  // 1. Mask (the source and target prompts share the negative prompt).
  const auto t_mask = std::chrono::steady_clock::now();
  pipelines::DiffEditMaskParams mp;
  mp.image = image;
  mp.source_prompt = o.source_prompt;
  mp.target_prompt = o.target_prompt;
  mp.source_negative_prompt = o.negative_prompt;
  mp.target_negative_prompt = o.negative_prompt;
  mp.num_maps_per_mask = o.num_maps;
  mp.mask_encode_strength = o.mask_encode_strength;
  mp.mask_thresholding_ratio = o.mask_threshold;
  mp.num_inference_steps = o.steps;
  mp.guidance_scale = o.guidance_scale;
  mp.generator = &gen;
  const at::Tensor mask = pipe.generate_mask(mp).mask;  // [1, h, w]
  r.mask_fraction = mask.mean().item<double>();
  const auto t_inv = std::chrono::steady_clock::now();
  r.mask_seconds = std::chrono::duration<double>(t_inv - t_mask).count();

  // 2. Inversion under the source prompt.
  pipelines::DiffEditInvertParams ip;
  ip.image = image;
  ip.prompt = o.source_prompt;
  ip.negative_prompt = o.negative_prompt;
  ip.num_inference_steps = o.steps;
  ip.inpaint_strength = o.encode_ratio;
  ip.guidance_scale = o.inversion_guidance_scale;
  ip.generator = &gen;
  ip.show_progress = o.progress;
  const auto inv = pipe.invert(ip);
  const auto t_edit = std::chrono::steady_clock::now();
  r.invert_seconds = std::chrono::duration<double>(t_edit - t_inv).count();

  // 3. Edit under the target prompt.
  pipelines::DiffEditParams ep;
  ep.prompt = o.target_prompt;
  ep.negative_prompt = o.negative_prompt;
  ep.mask_image = mask;
  ep.image_latents = inv.latents;
  ep.inpaint_strength = o.encode_ratio;
  ep.num_inference_steps = o.steps;
  ep.guidance_scale = o.guidance_scale;
  ep.generator = &gen;
  ep.show_progress = o.progress;
  const auto out = pipe.run(ep);
  r.edit_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_edit).count();

  // 4. Outputs.
  PhaseTimer write_timer("write");
  const int w = static_cast<int>(out.images.size(2)), h = static_cast<int>(out.images.size(1));
  const TextChunks text = {{"parameters", format_diffedit_parameters(o, seed, w, h, models->name, hash.get())}};
  std::vector<PendingFile> files;
  if (!o.save_latents.empty()) {
    files.push_back(
        {o.save_latents, io::serialize_safetensors({{"latents", out.latents.to(at::kFloat).contiguous()}}, {})});
    r.latents = o.save_latents;
  }
  if (!o.mask_output.empty()) {
    // Latent-size mask scaled up by the VAE factor (nearest), i.e. at the image size; white = edited.
    at::Tensor up = mask[0].repeat_interleave(f, 0).repeat_interleave(f, 1);  // [H, W]
    Image m;
    m.width = static_cast<int>(up.size(1));
    m.height = static_cast<int>(up.size(0));
    m.channels = 1;
    at::Tensor u8 = (up * 255).to(at::kByte).contiguous();
    m.data.assign(u8.data_ptr<uint8_t>(), u8.data_ptr<uint8_t>() + u8.numel());
    files.push_back({o.mask_output, encode_png(m, text)});
    r.mask = o.mask_output;
  }
  files.push_back({o.output, encode_png(tensor_to_image(out.images[0]), text)});
  write_files_atomic(files);  // all or nothing
  r.image = o.output;
  write_timer.stop();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace dmx
