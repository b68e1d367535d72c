// The generation core: what every sampling pipeline (txt2img/img2img + residual providers, Blended Latent
// Diffusion, DiffEdit, Prompt-to-Prompt) shares, written once, as diffusers' pipelines share their mixins:
// the run's parameters and their checks, the one RNG convention, prompt encoding with classifier-free
// guidance batching, the scheduler, the timesteps for a strength, the random draws (initial noise, image
// latents), and the one guided noise prediction every denoising loop calls. Each pipeline keeps its own
// numbered steps and its loop; the loops differ only in what they do around this.
//
// RNG: a run draws every random tensor (initial noise, VAE posterior samples, scheduler noise) from ONE
// CPU generator, in the reference's order (diffusers' `generator` argument). The api creates it once per
// run from the seed (make_generator) and passes its address; nullptr = the global generator. No pipeline
// takes a bare seed.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "loaders/model_bundle.h"
#include "pipelines/residual_provider.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

// Per-step callback after the scheduler step: may edit the latents in place (latent blending, DiffEdit's
// background, recording). `step` counts the steps this run made (0-based), t is the step's timestep.
using StepCallback = std::function<void(int step, double t, at::Tensor& latents)>;

// What every sampling pipeline shares (diffusers' __call__ arguments of the same names).
struct GenerationParams {
  std::string prompt;
  std::string negative_prompt;  // "" = unconditional
  int num_inference_steps = 50;
  double guidance_scale = 7.5;  // classifier-free guidance; <= 1 runs the conditional batch only
  std::string scheduler;        // a registry name (ddim, euler_a, ...) or diffusers class; "" = the model's own
  double eta = 0.0;             // DDIM's eta (its draws come from `generator`)
  int num_images_per_prompt = 1;
  int clip_skip = 0;
  at::Generator* generator = nullptr;  // every draw of the run, in the reference's order; nullptr = global
  // Replay of recorded per-step scheduler noise (DDIM eta > 0, DDPM, Euler, Euler a), in loop order; a step
  // past its end draws from `generator`.
  std::vector<at::Tensor> step_noises;
  StepCallback on_step_end;
  bool show_progress = true;

  bool guided() const { return guidance_scale > 1.0; }
};

// One CPU generator seeded like torch.Generator().manual_seed(seed): create it once per run.
at::Generator make_generator(uint64_t seed);

// ---- checks -------------------------------------------------------------------------------------------
// Each shared rule is written once; `name` is how the message names the parameter (the pipelines' field
// name by default; the api passes its option, "--guidance-scale").
void check_num_inference_steps(int steps, const std::string& name = "steps");
void check_guidance_scale(double guidance_scale, const std::string& name = "guidance_scale");
void check_eta(double eta, const std::string& name = "eta");
void check_num_images(int num_images, const std::string& name = "num_images");
void check_clip_skip(int clip_skip, const loaders::StableDiffusionModels& m, const std::string& name = "clip_skip");
// Every rule above on a run's parameters: called once, at the start of a pipeline's run (check_params).
void check_generation_params(const GenerationParams& p, const loaders::StableDiffusionModels& m);

// ---- steps of a run -------------------------------------------------------------------------------------
// One prompt: tokenize (padded to the tokenizer's length), encode with clip_skip. -> [1, L, D] on the device.
at::Tensor encode_prompt(const loaders::StableDiffusionModels& m, const std::string& prompt, int clip_skip = 0);
// The run's prompt embeddings (diffusers' encode_prompt + the CFG cat): the prompt's, repeated per image,
// and with guidance the negative prompt's before them. -> [N, L, D], or [2N, L, D] unconditional rows first.
at::Tensor encode_prompts(const loaders::StableDiffusionModels& m, const GenerationParams& p);

// The run's scheduler: `name` ("" = the model's own class) from the model's scheduler config, with the
// timesteps of num_inference_steps set.
std::unique_ptr<schedulers::Scheduler> make_scheduler(const loaders::StableDiffusionModels& m, const std::string& name,
                                                      int num_inference_steps);

// diffusers' get_timesteps: t_start = steps - min(int(steps * strength), steps), the number of schedule
// entries an image-to-image run skips (its loop starts at t_start * scheduler order).
int strength_start_index(int num_inference_steps, double strength);
// The first loop index of a run from an image at `strength` (t_start * order; by_order = false: t_start, as
// the legacy inpaint pipeline slices). InvalidArgument ("leaves no denoising step") when no step would run.
int strength_first_step(const schedulers::Scheduler& sched, int num_inference_steps, double strength,
                        bool by_order = true);

// diffusers' randn_tensor on the CPU: float32 standard normal of `shape` from `generator` (nullptr = global).
at::Tensor randn_tensor(at::IntArrayRef shape, at::Generator* generator);
// Image latents as the reference pipelines prepare them (retrieve_latents(vae.encode(image)).sample(generator)
// * scaling_factor): image [1, 3, H, W] in [-1, 1] -> [batch, 4, H/f, W/f] float32 on the CPU, the image
// repeated `batch` times before the one posterior draw. The posterior noise is `noise` when given (replay),
// else one draw of that shape from `generator`.
at::Tensor encode_image_latents(const loaders::StableDiffusionModels& m, const at::Tensor& image,
                                at::Generator* generator, const at::Tensor& noise = {}, int64_t batch = 1);

// ---- the UNet -------------------------------------------------------------------------------------------
// One UNet evaluation: sample [B, C, h, w] and embeds [B, L, D] moved to the model's device and dtype, the
// timestep as a float scalar, the residual providers applied; -> the prediction [B, C, h, w] float32 on the
// CPU. `step` is what the providers see (may be null when there are none).
at::Tensor predict_noise(const loaders::StableDiffusionModels& m, const at::Tensor& sample, double t,
                         const at::Tensor& embeds, const ResidualProviders& residuals = {},
                         const ResidualStep* step = nullptr);
// The guided noise prediction of one denoising step (classifier-free guidance, Ho & Salimans 2022), used by
// every denoising loop: the latents [N, C, h, w] doubled when guided ([uncond; cond], one UNet batch, as
// embeds), scaled by the scheduler for timesteps()[index], the UNet with the residual providers, then
// eps_u + guidance_scale * (eps_c - eps_u). Unguided (guidance_scale <= 1): the conditional prediction.
// Providers that ask for extra guidance branches (ResidualProvider::guidance_branches) add N rows each to the
// batch and their terms to the sum (combine_guidance). -> [N, C, h, w] float32 on the CPU.
at::Tensor guided_noise_prediction(const loaders::StableDiffusionModels& m, schedulers::Scheduler& sched,
                                   const at::Tensor& latents, int index, const at::Tensor& embeds,
                                   double guidance_scale, const ResidualProviders& residuals = {});
// The guidance sum on a UNet batch of groups [uncond; cond; extra_1; ...] of N rows each:
// eps_u + guidance_scale (eps_c - eps_u) + sum_k branches[k].scale (eps_k - eps_u).
at::Tensor combine_guidance(const at::Tensor& noise_pred, double guidance_scale,
                            const std::vector<GuidanceBranch>& branches);
}  // namespace dmx::pipelines
