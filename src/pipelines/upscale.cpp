// The x4 upscale pipeline (upscale.h).
#include "pipelines/upscale.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/phase_timer.h"
#include "core/progress.h"
#include "core/resize.h"
#include "dmx/error.h"
#include "pipelines/stable_diffusion.h"

namespace dmx::pipelines {

std::pair<int, int> low_res_size(int width, int height, int f) { return {width - width % f, height - height % f}; }

at::Tensor preprocess_low_res(const Image& rgb, int f) {
  DMX_CHECK_ARG(rgb.channels == 3, "--image: expected an RGB picture, got ", rgb.channels, " channel(s)");
  const auto [w, h] = low_res_size(rgb.width, rgb.height, f);
  DMX_CHECK_ARG(w >= f && h >= f, "--image: width and height must be at least ", f,
                " (the VAE factor of this upscaler), got ", rgb.width, "x", rgb.height);
  // VaeImageProcessor.resize: PIL's resize to the rounded size, a copy when unchanged.
  const Image sized = (w == rgb.width && h == rgb.height) ? rgb : resize_bicubic(rgb, w, h);
  return image_to_tensor(sized);
}

// ---- LowResConditioning ---------------------------------------------------------------------------------

LowResConditioning::LowResConditioning(at::Tensor noised_image, int noise_level)
    : image_(std::move(noised_image)), noise_level_(noise_level) {
  DMX_CHECK_ARG(image_.defined() && image_.dim() == 4 && image_.size(0) == 1,
                "LowResConditioning: the picture must be [1, C, h, w], got ",
                image_.defined() ? image_.sizes() : at::IntArrayRef{});
}

void LowResConditioning::check(const ResidualRun& run) const {
  const auto& unet = run.models.unet->config();
  const int64_t f = run.models.vae_scale_factor();
  const int64_t latent_c = run.models.vae->config().latent_channels;
  DMX_CHECK_ARG(latent_c + image_.size(1) == unet.in_channels, "the UNet takes ", unet.in_channels,
                " input channels, the latents (", latent_c, ") and the picture (", image_.size(1), ") make ",
                latent_c + image_.size(1));
  DMX_CHECK_ARG(image_.size(2) * f == run.height && image_.size(3) * f == run.width, "the low-res picture (",
                image_.size(3), "x", image_.size(2), ") must have the latents' size for a ", run.width, "x", run.height,
                " output");
}

void LowResConditioning::prepare(const ResidualRun& run) {
  // diffusers: image = cat([image] * batch_multiplier * num_images_per_prompt); noise_level repeated to match.
  const int64_t rows = static_cast<int64_t>(run.batch) * (run.guided ? 2 : 1);
  batch_image_ = image_.repeat({rows, 1, 1, 1}).to(run.models.device, run.models.dtype);
  batch_labels_ = at::full({rows}, noise_level_, at::TensorOptions().dtype(at::kLong)).to(run.models.device);
}

void LowResConditioning::apply(const ResidualStep&, models::UNetInputs& in) {
  DMX_CHECK_ARG(batch_image_.defined() && batch_image_.size(0) == in.sample.size(0),
                "LowResConditioning: prepared for ", batch_image_.defined() ? batch_image_.size(0) : 0,
                " rows, the UNet batch has ", in.sample.size(0));
  // latents first, then the picture (diffusers: cat([scale_model_input(latents), image], dim=1)).
  in.sample = at::cat({in.sample, batch_image_}, 1);
  in.class_labels = batch_labels_;
}

MemoryEstimate estimate_upscale_memory(const loaders::UpscaleModels& m, int low_w, int low_h, int num_images,
                                       bool guided, const VaeTiling& tiling) {
  const auto& sd = *m.sd;
  const int f = sd.vae_scale_factor();
  const int out_w = low_w * f, out_h = low_h * f;
  MemoryEstimate e = estimate_memory(sd, out_w, out_h, num_images, guided);
  const int sample = tiling.tile_sample_size > 0 ? tiling.tile_sample_size : sd.vae->config().sample_size;
  if (tiling.enabled && (out_w > sample || out_h > sample)) {
    // One tile decoded at a time; the decoded tiles of the whole picture are kept for blending (3 channels).
    const MemoryEstimate tile = estimate_memory(sd, sample, sample, 1, false);
    const double elem = static_cast<double>(c10::elementSize(sd.dtype));
    e.vae = tile.vae + 2.0 * out_w * out_h * 3 * elem;
  }
  return e;
}

// ---- UpscalePipeline --------------------------------------------------------------------------------------

UpscalePipeline::UpscalePipeline(std::shared_ptr<loaders::UpscaleModels> models) : m_(std::move(models)) {
  DMX_CHECK_ARG(m_ != nullptr && m_->sd != nullptr, "UpscalePipeline: models must not be null");
}

void UpscalePipeline::check_params(const UpscaleParams& p) const {
  const auto& sd = *m_->sd;
  check_generation_params(p, sd);
  DMX_CHECK_ARG(p.noise_level >= 0 && p.noise_level <= m_->max_noise_level, "noise_level must be in [0, ",
                m_->max_noise_level, "] (the model's max_noise_level), got ", p.noise_level);
  const int f = sd.vae_scale_factor();
  DMX_CHECK_ARG(
      p.image.defined() && p.image.dim() == 4 && p.image.size(0) == 1 && p.image.size(1) == m_->image_channels(),
      "image must be [1, ", m_->image_channels(), ", h, w], got ",
      p.image.defined() ? p.image.sizes() : at::IntArrayRef{});
  DMX_CHECK_ARG(p.image.size(2) >= 1 && p.image.size(3) >= 1, "image must not be empty");
  DMX_CHECK_ARG(at::isfinite(p.image).all().item<bool>(), "image holds non-finite values");
  const int64_t h = p.image.size(2), w = p.image.size(3);
  // The output is f x the picture (the latents keep the picture's size), at most 4096 on each side as every output.
  DMX_CHECK_ARG(w * f <= 4096 && h * f <= 4096, "the output (", f, "x the ", w, "x", h,
                " picture) must be at most 4096x4096: the picture's sides at most ", 4096 / f);
  const int64_t c = sd.vae->config().latent_channels;
  if (p.latents.defined())
    DMX_CHECK_ARG(p.latents.dim() == 4 && p.latents.size(0) == p.num_images_per_prompt && p.latents.size(1) == c &&
                      p.latents.size(2) == h && p.latents.size(3) == w,
                  "latents must have shape [", p.num_images_per_prompt, ", ", c, ", ", h, ", ", w, "], got ",
                  p.latents.sizes());
  if (p.image_noise.defined())
    DMX_CHECK_ARG(p.image_noise.sizes().equals(p.image.sizes()), "image_noise must have shape ", p.image.sizes(),
                  ", got ", p.image_noise.sizes());
  DMX_CHECK_ARG(p.tiling.tile_sample_size == 0 || p.tiling.tile_sample_size >= 2 * f,
                "tile size must be 0 (the VAE's sample_size) or at least ", 2 * f, ", got ", p.tiling.tile_sample_size);
  DMX_CHECK_ARG(std::isfinite(p.tiling.overlap) && p.tiling.overlap >= 0 && p.tiling.overlap < 1,
                "tile overlap must be in [0, 1), got ", p.tiling.overlap);
}

at::Tensor UpscalePipeline::noise_image(const at::Tensor& image, const at::Tensor& noise, int noise_level) const {
  DMX_CHECK_ARG(noise_level >= 0 && noise_level <= m_->max_noise_level, "noise_level must be in [0, ",
                m_->max_noise_level, "] (the model's max_noise_level), got ", noise_level);
  const auto low_res = m_->make_low_res_scheduler();
  return low_res->add_noise_at_timestep(image.to(at::kFloat), noise.to(at::kFloat), noise_level);
}

at::Tensor UpscalePipeline::decode_raw(const at::Tensor& z_in, const VaeTiling& tiling) {
  const auto& sd = *m_->sd;
  models::AutoencoderKL vae = sd.vae;  // shared handle (forward is non-const)
  const at::Tensor z = z_in.to(sd.device, sd.dtype);
  const int f = sd.vae_scale_factor();
  const int sample = tiling.tile_sample_size > 0 ? tiling.tile_sample_size : sd.vae->config().sample_size;
  const int64_t tile_latent = sample / f;  // diffusers: int(sample_size / 2 ** (levels - 1))
  if (!tiling.enabled || (z.size(2) <= tile_latent && z.size(3) <= tile_latent))
    return vae->decode(z).to(at::kFloat).to(at::kCPU);
  // diffusers' AutoencoderKL.tiled_decode, step for step: overlapping latent tiles decoded alone; each tile blended
  // in place with the (already blended) tile above and the one to its left, then cropped to row_limit.
  const int64_t step = static_cast<int64_t>(tile_latent * (1 - tiling.overlap));
  const int64_t blend = static_cast<int64_t>(sample * tiling.overlap);
  const int64_t row_limit = sample - blend;
  DMX_CHECK_ARG(step >= 1, "tile overlap ", tiling.overlap, " leaves no step between tiles of ", tile_latent,
                " latents");
  std::vector<std::vector<at::Tensor>> rows;
  for (int64_t i = 0; i < z.size(2); i += step) {
    std::vector<at::Tensor> row;
    for (int64_t j = 0; j < z.size(3); j += step) {
      const at::Tensor tile =
          z.slice(2, i, std::min(i + tile_latent, z.size(2))).slice(3, j, std::min(j + tile_latent, z.size(3)));
      row.push_back(vae->decode(tile).to(at::kFloat).to(at::kCPU).contiguous());
    }
    rows.push_back(std::move(row));
  }
  auto blend_v = [](const at::Tensor& a, at::Tensor& b, int64_t extent) {
    extent = std::min({a.size(2), b.size(2), extent});
    for (int64_t y = 0; y < extent; ++y) {
      const double w = static_cast<double>(y) / static_cast<double>(extent);
      b.select(2, y).copy_(a.select(2, a.size(2) - extent + y) * (1 - w) + b.select(2, y) * w);
    }
  };
  auto blend_h = [](const at::Tensor& a, at::Tensor& b, int64_t extent) {
    extent = std::min({a.size(3), b.size(3), extent});
    for (int64_t x = 0; x < extent; ++x) {
      const double w = static_cast<double>(x) / static_cast<double>(extent);
      b.select(3, x).copy_(a.select(3, a.size(3) - extent + x) * (1 - w) + b.select(3, x) * w);
    }
  };
  std::vector<at::Tensor> result_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<at::Tensor> result_row;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      at::Tensor& tile = rows[i][j];
      if (i > 0) blend_v(rows[i - 1][j], tile, blend);
      if (j > 0) blend_h(rows[i][j - 1], tile, blend);
      result_row.push_back(tile.slice(2, 0, row_limit).slice(3, 0, row_limit));
    }
    result_rows.push_back(at::cat(result_row, 3));
  }
  return at::cat(result_rows, 2);
}

at::Tensor UpscalePipeline::decode_latents(const at::Tensor& latents, const VaeTiling& tiling, bool show_progress) {
  at::NoGradGuard no_grad;
  const auto& sd = *m_->sd;
  check_finite_output(sd, latents, "the denoised latents");
  std::vector<at::Tensor> out;
  ProgressBar bar("decode", latents.size(0) > 1 ? static_cast<int>(latents.size(0)) : 0, show_progress);
  for (int64_t i = 0; i < latents.size(0); ++i) {
    const at::Tensor x = decode_raw(latents.narrow(0, i, 1) / m_->vae_scaling_factor, tiling);
    check_finite_output(sd, x, "the decoded image");  // before the clamp, which would hide an Inf
    out.push_back((x / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1}));
    bar.tick();
  }
  bar.finish();
  return at::cat(out, 0).contiguous();
}

UpscaleOutput UpscalePipeline::run(const UpscaleParams& p) {
  at::NoGradGuard no_grad;
  auto& sd = m_->sd;
  const int f = sd->vae_scale_factor();
  // 1. Check inputs.
  check_params(p);
  const int n = p.num_images_per_prompt;
  const int64_t h = p.image.size(2), w = p.image.size(3);
  const int64_t c = sd->vae->config().latent_channels;

  // 2. Encode the prompts: [negative; prompt] with guidance.
  PhaseTimer encode_timer("text encode");
  const at::Tensor embeds = encode_prompts(*sd, p);
  encode_timer.stop();

  // 3. Timesteps.
  auto sched = make_scheduler(*sd, p.scheduler, p.num_inference_steps);

  // 4. Noise augmentation of the picture: the run's first draw.
  const at::Tensor noise =
      p.image_noise.defined() ? p.image_noise.to(at::kFloat) : randn_tensor(p.image.sizes(), p.generator);
  UpscaleOutput out;
  out.noised_image = noise_image(p.image, noise, p.noise_level);

  // 5. Latents at the low-res size: the second draw.
  at::Tensor latents = p.latents.defined() ? p.latents.to(at::kFloat) : randn_tensor({n, c, h, w}, p.generator);
  latents = latents * sched->init_noise_sigma();

  // 6. Denoising loop: the generation core's, with the picture and the noise level given to the UNet.
  auto cond = std::make_shared<LowResConditioning>(out.noised_image, p.noise_level);
  const ResidualRun run{*sd, static_cast<int>(w * f), static_cast<int>(h * f), n, p.guided(), false};
  cond->check(run);
  cond->prepare(run);
  PhaseTimer denoise_timer("denoise");
  StableDiffusionPipeline core(sd);
  latents = core.denoise(*sched, latents, 0, embeds, p, {cond});
  denoise_timer.stop();

  // 7. Decode latents / 0.08333: f x the picture's size.
  PhaseTimer decode_timer("decode");
  out.latents = latents.contiguous();
  out.timesteps = sched->timesteps();
  out.images = decode_latents(latents, p.tiling, p.show_progress);
  return out;
}
}  // namespace dmx::pipelines
