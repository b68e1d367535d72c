// Blended Latent Diffusion (Avrahami, Fried & Lischinski, SIGGRAPH 2023): a text-guided edit inside a mask
// on a normal 4-channel Stable Diffusion model. With the defaults it is diffusers 0.27.2's
// StableDiffusionInpaintPipeline with a 4-channel UNet (masked latent blending, the same seeded draws);
// variant kLegacy is the deprecated StableDiffusionInpaintPipelineLegacy. On top: the paper's blending start,
// progressive mask shrinking, background reconstruction and several ranked samples. The denoising is
// StableDiffusionPipeline's loop with the blend as its step callback.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "extensions/latent_blend.h"
#include "loaders/model_bundle.h"
#include "pipelines/generation.h"
#include "pipelines/stable_diffusion.h"

namespace dmx::pipelines {

enum class BlendVariant {
  kInpaint,  // StableDiffusionInpaintPipeline (4-ch UNet): binarised mask, torch-nearest, next-timestep blend
  kLegacy,   // StableDiffusionInpaintPipelineLegacy: soft mask L/255, PIL-nearest, same-timestep blend + final
};

// Diffusion-classifier ranking (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier"):
// for each sample z0 and each t in `timesteps`, z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps with one fixed seeded
// eps shared by all samples; score = mean_t [ ||eps_uncond - eps||^2_m - ||eps_prompt - eps||^2_m ], the
// squared errors averaged over the latent mask. Higher = the edited region is better explained by the prompt.
// The scores are a function of the latents: their noise comes from their own generator seeded with `seed`
// (the api passes the run's seed), not from the run's, so rank_scores gives the same scores when called again.
struct RankOptions {
  std::vector<int> timesteps = {100, 250, 400, 550, 700};
  uint64_t seed = 0;
};

struct BlendedLatentDiffusionParams : GenerationParams {
  at::Tensor init_image;     // [1, 3, H, W] in [-1, 1]
  at::Tensor mask;           // [1, 1, H, W] in [0, 1] (L / 255), 1 = edit
  double strength = 1.0;     // diffusers' inpaint default
  double blend_start = 0.0;  // fraction of the run's steps before blending starts, in [0, 1)
  int mask_dilation = 0;     // progressive mask shrinking: dilated masks first, the mask itself last
  BlendVariant variant = BlendVariant::kInpaint;
  extensions::Background background = extensions::Background::kLatent;
  extensions::ReconstructionOptions reconstruction;
  bool rank = false;
  RankOptions rank_options;
  // on_step_end (GenerationParams) runs after the blend of each step.
  // Replay of draws (tests): the VAE posterior noise of the image; the initial noise (kInpaint: diffusers'
  // `latents` argument, start = latents * init_noise_sigma whatever the strength; kLegacy: the noise that
  // add_noise uses); GenerationParams::step_noises replays the scheduler's.
  at::Tensor posterior_noise;
  at::Tensor latents;
};

struct BlendedLatentDiffusionOutput {
  at::Tensor images;       // [N, H, W, 3] in [0, 1], after background reconstruction, in sample order
  at::Tensor decoded;      // [N, H, W, 3] the plain decode of `latents`
  at::Tensor latents;      // [N, 4, h, w] after the final blend
  at::Tensor original;     // [H, W, 3] the input image in [0, 1]
  at::Tensor pixel_mask;   // [H, W] binarised mask, 1 = edit
  at::Tensor latent_mask;  // [1, 1, h, w] the mask the final blend used
  std::vector<double> timesteps;
  std::vector<double> scores;  // rank scores per sample (empty without rank)
  std::vector<int> order;      // sample indices best first (identity without rank)
};

class BlendedLatentDiffusionPipeline {
 public:
  explicit BlendedLatentDiffusionPipeline(std::shared_ptr<loaders::StableDiffusionModels> models);
  BlendedLatentDiffusionOutput run(const BlendedLatentDiffusionParams& p);

  void check_params(const BlendedLatentDiffusionParams& p) const;
  // The mask at latent size for a variant (kInpaint: binarised >= 0.5 then torch-nearest; kLegacy: L / 255,
  // PIL-nearest). mask: [1, 1, H, W]. -> [1, 1, h, w]
  at::Tensor prepare_latent_mask(const at::Tensor& mask, BlendVariant variant) const;
  // Diffusion-classifier scores of latents [N, 4, h, w] within latent_mask [1, 1, h, w].
  std::vector<double> rank_scores(const at::Tensor& latents, const at::Tensor& latent_mask, const std::string& prompt,
                                  int clip_skip, const RankOptions& o);

 private:
  std::shared_ptr<loaders::StableDiffusionModels> m_;
  StableDiffusionPipeline sd_;
};
}  // namespace dmx::pipelines
