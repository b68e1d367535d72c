// Stable unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", on a
// Stable Diffusion 2 decoder): diffusers 0.27.2's StableUnCLIPPipeline (text -> prior -> CLIP image embedding ->
// decoder) and StableUnCLIPImg2ImgPipeline (picture -> CLIP image embedding -> decoder: image variations).
// The prior's loop, the CLIP image embedding and the noise augmentation are the shared steps of unclip_steps.h;
// the decoder is the generation core's Stable Diffusion loop with the noised image embedding as the UNet's class
// labels (a residual provider: zeros for the unconditional half, as diffusers).
//
// RNG: one generator for the whole run, in diffusers' order. Text to image: the prior latents [B, E], one DDPM
// variance noise per prior step with t > 0, the embedding noise [B, E] (drawn even at noise_level 0), the decoder
// latents [B, 4, h, w], then the decoder scheduler's own draws. Variations: the embedding noise [1, E] (one
// picture: it is noised once and repeated for the images), the decoder latents, the scheduler's draws.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/image.h"
#include "loaders/model_bundle.h"
#include "loaders/unclip.h"
#include "pipelines/generation.h"
#include "pipelines/residual_provider.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

struct StableUnCLIPParams : GenerationParams {
  StableUnCLIPParams() {  // diffusers' __call__ defaults (both pipelines)
    num_inference_steps = 20;
    guidance_scale = 10.0;
  }
  int width = 0;  // 0 = unet.sample_size x VAE factor
  int height = 0;
  int noise_level = 0;  // the image embedding's noise augmentation, in [0, image_noising_scheduler's T - 1]
  // Text to image (StableUnCLIPPipeline): the prior.
  int prior_num_inference_steps = 25;
  double prior_guidance_scale = 4.0;
  at::Tensor prior_latents;                   // replay: the prior's initial latents [B, E]
  std::vector<at::Tensor> prior_step_noises;  // replay: the prior scheduler's draws
  // After each prior step: index, timestep, the new prior latents [B, E].
  std::function<void(int step, double t, const at::Tensor& latents)> on_prior_step_end;
  // Variations (StableUnCLIPImg2ImgPipeline): the picture (any size, RGB), or its CLIP image embedding [1, E].
  Image image;
  at::Tensor image_embeds;
  // Both: replays of the embedding noise and of the decoder's initial latents (before init_noise_sigma).
  at::Tensor embedding_noise;
  at::Tensor latents;
};

struct StableUnCLIPOutput {
  at::Tensor images;              // [N, H, W, 3] float32 in [0, 1]
  at::Tensor latents;             // [N, 4, h, w] after the last decoder step
  std::vector<double> timesteps;  // the decoder's
  std::vector<double> prior_timesteps;
  at::Tensor image_embeds;         // the prior's output or the picture's CLIP embedding, before the noise [B, E]
  at::Tensor noised_image_embeds;  // the decoder's class labels (conditional half) [N, 2E]
};

// The decoder UNet's class labels: the noised image embedding [N, 2E] for the conditional rows, zeros for the
// unconditional ones (guided runs), moved to the UNet's device and dtype. check() requires a "projection" class
// embedding of width 2E.
class ImageEmbeddingConditioning : public ResidualProvider {
 public:
  explicit ImageEmbeddingConditioning(at::Tensor noised_image_embeds);
  std::string name() const override { return "unclip image embedding"; }
  void check(const ResidualRun& run) const override;
  void prepare(const ResidualRun& run) override;
  void apply(const ResidualStep& step, models::UNetInputs& in) override;

 private:
  at::Tensor noised_, labels_;
};

// noise_level within the image-noising scheduler's range: InvalidArgument naming `name`.
void check_noise_level(int noise_level, const schedulers::Scheduler& image_noising_scheduler,
                       const std::string& name = "noise_level");

class StableUnCLIPPipeline {
 public:
  // decoder: load_stable_diffusion of the folder; unclip: load_unclip_components of the same folder.
  StableUnCLIPPipeline(std::shared_ptr<loaders::StableDiffusionModels> decoder,
                       std::shared_ptr<loaders::UnCLIPComponents> unclip);
  // StableUnCLIPPipeline.__call__ on a StableUnCLIPPipeline folder, StableUnCLIPImg2ImgPipeline.__call__ on an
  // image-variation folder (p.image or p.image_embeds required there, refused on the other).
  StableUnCLIPOutput run(const StableUnCLIPParams& p);
  // Every rule on p, before anything is drawn (sizes, counts, scales, noise level, which inputs the folder takes).
  void check_params(const StableUnCLIPParams& p) const;
  bool text_to_image() const { return unclip_->has_prior(); }

  // Phases.
  // Prior: prompt -> image_embeds [n, E] (n = num_images_per_prompt), from p.generator (or the replays).
  at::Tensor prior(const StableUnCLIPParams& p, std::vector<double>* timesteps = nullptr);
  // The picture's CLIP image embedding [1, E] (CLIPImageProcessor + the image encoder).
  at::Tensor encode_image(const Image& image, const std::string& param = "image");
  // noise_image_embeddings with the folder's normalizer and image-noising scheduler -> [B, 2E].
  at::Tensor noise_image_embeddings(const at::Tensor& image_embeds, int noise_level, const at::Tensor& noise,
                                    at::Generator* generator);

 private:
  StableUnCLIPOutput decode(const StableUnCLIPParams& p, const at::Tensor& noised_image_embeds);
  std::shared_ptr<loaders::StableDiffusionModels> m_;
  std::shared_ptr<loaders::UnCLIPComponents> unclip_;
  std::unique_ptr<schedulers::Scheduler> noising_;
};
}  // namespace dmx::pipelines
