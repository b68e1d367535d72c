// Stable unCLIP text-to-image and image variations (stable_unclip.h), in the order of diffusers 0.27.2's
// pipeline_stable_unclip.py and pipeline_stable_unclip_img2img.py.
#include "pipelines/stable_unclip.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/phase_timer.h"
#include "core/progress.h"
#include "dmx/error.h"
#include "pipelines/stable_diffusion.h"
#include "pipelines/unclip_steps.h"

namespace dmx::pipelines {

// ---- the decoder's class labels ---------------------------------------------------------------------------

ImageEmbeddingConditioning::ImageEmbeddingConditioning(at::Tensor noised_image_embeds)
    : noised_(std::move(noised_image_embeds)) {
  DMX_CHECK_ARG(noised_.defined() && noised_.dim() == 2, "noised_image_embeds must be [batch, 2 x embedding_dim]");
}

void ImageEmbeddingConditioning::check(const ResidualRun& run) const {
  const auto& cfg = run.models.unet->config();
  DMX_CHECK_ARG(cfg.class_embedding_kind() == "projection", "the decoder UNet of ", run.models.source_path,
                " has class embedding '", cfg.class_embedding_kind(),
                "'; Stable unCLIP needs class_embed_type \"projection\"");
  DMX_CHECK_ARG(cfg.projection_class_embeddings_input_dim == noised_.size(1),
                "the decoder UNet's class embedding takes ", cfg.projection_class_embeddings_input_dim,
                " values, the noised image embedding has ", noised_.size(1));
  DMX_CHECK_ARG(noised_.size(0) == run.batch, "noised_image_embeds has ", noised_.size(0), " rows, the run makes ",
                run.batch, " image(s)");
}

void ImageEmbeddingConditioning::prepare(const ResidualRun& run) {
  // diffusers: image_embeds = cat([zeros_like(image_embeds), image_embeds]) when guided.
  const at::Tensor e = noised_.to(at::kFloat);
  labels_ = (run.guided ? at::cat({at::zeros_like(e), e}, 0) : e).to(run.models.device, run.models.dtype);
}

void ImageEmbeddingConditioning::apply(const ResidualStep&, models::UNetInputs& in) { in.class_labels = labels_; }

void check_noise_level(int noise_level, const schedulers::Scheduler& image_noising_scheduler, const std::string& name) {
  const int T = image_noising_scheduler.config().num_train_timesteps;
  DMX_CHECK_ARG(noise_level >= 0 && noise_level < T, name, " must be in [0, ", T - 1,
                "] (the image_noising_scheduler's num_train_timesteps - 1), got ", noise_level);
}

// ---- the pipeline -------------------------------------------------------------------------------------------

StableUnCLIPPipeline::StableUnCLIPPipeline(std::shared_ptr<loaders::StableDiffusionModels> decoder,
                                           std::shared_ptr<loaders::UnCLIPComponents> unclip)
    : m_(std::move(decoder)), unclip_(std::move(unclip)) {
  DMX_CHECK_ARG(m_ != nullptr && unclip_ != nullptr, "StableUnCLIPPipeline: models must not be null");
  DMX_CHECK_ARG(unclip_->has_prior() || unclip_->has_image_encoder(),
                "StableUnCLIPPipeline: the folder has neither a prior nor an image encoder");
  const auto& ncfg = unclip_->image_noising_scheduler_config;
  noising_ = schedulers::create_scheduler(ncfg.at("_class_name").get<std::string>(), ncfg);
}

void StableUnCLIPPipeline::check_params(const StableUnCLIPParams& p) const {
  const int n = p.num_images_per_prompt;
  check_output_size(*m_, p.width, p.height, n, p.guided());
  check_generation_params(p, *m_);
  check_noise_level(p.noise_level, *noising_);
  const int64_t E = unclip_->image_normalizer->config().embedding_dim;
  if (text_to_image()) {
    check_num_inference_steps(p.prior_num_inference_steps, "prior_num_inference_steps");
    check_guidance_scale(p.prior_guidance_scale, "prior_guidance_scale");
    DMX_CHECK_ARG(p.image.data.empty() && !p.image_embeds.defined(), unclip_->pipeline_class,
                  " makes pictures from text: an image is not an input (image variations need a "
                  "StableUnCLIPImg2ImgPipeline folder)");
  } else {
    DMX_CHECK_ARG(!p.image.data.empty() || p.image_embeds.defined(),
                  "image variations need the picture (image) or its CLIP embedding (image_embeds)");
    DMX_CHECK_ARG(!p.image_embeds.defined() ||
                      (p.image_embeds.dim() == 2 && p.image_embeds.size(0) == 1 && p.image_embeds.size(1) == E),
                  "image_embeds must be [1, ", E, "], got ", p.image_embeds.sizes());
    DMX_CHECK_ARG(p.prior_latents.defined() == false && p.prior_step_noises.empty(),
                  "prior_latents / prior_step_noises: image variations run no prior");
  }
  const int64_t rows = text_to_image() ? n : 1;
  DMX_CHECK_ARG(!p.embedding_noise.defined() || (p.embedding_noise.dim() == 2 && p.embedding_noise.size(0) == rows &&
                                                 p.embedding_noise.size(1) == E),
                "embedding_noise must be [", rows, ", ", E, "], got ", p.embedding_noise.sizes());
}

at::Tensor StableUnCLIPPipeline::prior(const StableUnCLIPParams& p, std::vector<double>* timesteps) {
  at::NoGradGuard no_grad;
  DMX_CHECK_ARG(text_to_image(), "the prior needs a StableUnCLIPPipeline folder");
  const auto& cfg = unclip_->prior_scheduler_config;
  auto scheduler = schedulers::create_scheduler(cfg.at("_class_name").get<std::string>(), cfg);
  // 3. Encode the prompt for the prior: [uncond ("") x n; prompt x n] when guided.
  PriorRunParams prior;
  prior.prompt = encode_prior_prompt(*unclip_->prior_tokenizer, unclip_->prior_text_encoder, {p.prompt},
                                     p.prior_guidance_scale > 1.0, p.num_images_per_prompt);
  // 4.-7. Timesteps, latents, the denoising loop; post-processed with the prior's CLIP statistics.
  prior.num_inference_steps = p.prior_num_inference_steps;
  prior.guidance_scale = p.prior_guidance_scale;
  prior.latents = p.prior_latents;
  prior.generator = p.generator;
  prior.step_noises = p.prior_step_noises;
  ProgressBar bar("prior", p.prior_num_inference_steps, p.show_progress);
  prior.on_step_end = [&](int i, double t, const at::Tensor&, const at::Tensor& latents) {
    if (timesteps) timesteps->push_back(t);
    if (p.on_prior_step_end) p.on_prior_step_end(i, t, latents);
    bar.tick();
  };
  at::Tensor image_embeds = run_prior(unclip_->prior, *scheduler, prior);
  bar.finish();
  return image_embeds;
}

at::Tensor StableUnCLIPPipeline::encode_image(const Image& image, const std::string& param) {
  DMX_CHECK_ARG(unclip_->has_image_encoder(),
                "the picture's CLIP embedding needs a StableUnCLIPImg2ImgPipeline "
                "folder (feature_extractor + image_encoder)");
  return clip_image_embeds(unclip_->feature_extractor, unclip_->image_encoder, image, param);
}

at::Tensor StableUnCLIPPipeline::noise_image_embeddings(const at::Tensor& image_embeds, int noise_level,
                                                        const at::Tensor& noise, at::Generator* generator) {
  return pipelines::noise_image_embeddings(unclip_->image_normalizer, *noising_, image_embeds, noise_level, noise,
                                           generator);
}

StableUnCLIPOutput StableUnCLIPPipeline::decode(const StableUnCLIPParams& p, const at::Tensor& noised_image_embeds) {
  // 8.-13. The decoder: the Stable Diffusion loop (prompt and negative prompt, latents from the generator, the
  // scheduler, CFG) with the noised image embedding as class labels.
  StableDiffusionParams sd;
  static_cast<GenerationParams&>(sd) = p;
  sd.width = p.width;
  sd.height = p.height;
  sd.latents = p.latents;
  sd.residual_providers = {std::make_shared<ImageEmbeddingConditioning>(noised_image_embeds)};
  StableDiffusionPipeline pipe(m_);
  StableDiffusionOutput d = pipe.run(sd);
  StableUnCLIPOutput out;
  out.images = d.images;
  out.latents = d.latents;
  out.timesteps = d.timesteps;
  out.noised_image_embeds = noised_image_embeds;
  return out;
}

StableUnCLIPOutput StableUnCLIPPipeline::run(const StableUnCLIPParams& p_in) {
  at::NoGradGuard no_grad;
  StableUnCLIPParams p = p_in;
  // 0. Default size: unet.sample_size x VAE factor.
  if (p.width == 0) p.width = m_->default_sample_size();
  if (p.height == 0) p.height = m_->default_sample_size();
  // 1. Check inputs.
  check_params(p);
  const int n = p.num_images_per_prompt;
  at::Tensor image_embeds, noised;
  std::vector<double> prior_timesteps;
  if (text_to_image()) {
    // 3.-7. The prior: text -> CLIP image embedding [n, E].
    PhaseTimer t("prior");
    image_embeds = prior(p, &prior_timesteps);
    // 9. Noise augmentation of the n embeddings (n noise rows).
    noised = noise_image_embeddings(image_embeds, p.noise_level, p.embedding_noise, p.generator);
  } else {
    // _encode_image: the picture's embedding, noised once, then repeated for the n images.
    PhaseTimer t("image encode");
    image_embeds = p.image_embeds.defined() ? p.image_embeds : encode_image(p.image);
    noised = noise_image_embeddings(image_embeds, p.noise_level, p.embedding_noise, p.generator).repeat({n, 1});
  }
  StableUnCLIPOutput out = decode(p, noised);
  out.prior_timesteps = prior_timesteps;
  out.image_embeds = image_embeds;
  return out;
}
}  // namespace dmx::pipelines
