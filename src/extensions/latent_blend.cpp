#include "extensions/latent_blend.h"

#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
#include <opencv2/photo.hpp>

#include <cmath>
#include <cstring>

#include "core/progress.h"
#include "dmx/error.h"

namespace dmx::extensions {

at::Tensor mask_to_tensor(const Image& mask) {
  DMX_CHECK_ARG(mask.width > 0 && mask.height > 0 && !mask.data.empty(), "mask: empty image");
  const Image gray = to_gray(mask);
  at::Tensor u8 = at::from_blob(const_cast<uint8_t*>(gray.data.data()), {1, 1, gray.height, gray.width}, at::kByte);
  return u8.to(at::kFloat) / 255.0f;  // [1, 1, H, W]
}

at::Tensor binarize_mask(const at::Tensor& mask) { return (mask >= 0.5).to(at::kFloat); }

at::Tensor resize_mask_nearest(const at::Tensor& mask, int64_t h, int64_t w, NearestMode mode) {
  DMX_CHECK_ARG(mask.defined() && mask.dim() == 4, "mask must be [B, C, H, W], got ",
                mask.defined() ? mask.sizes() : at::IntArrayRef{});
  DMX_CHECK_ARG(h >= 1 && w >= 1, "mask target size must be positive, got ", w, "x", h);
  if (mode == NearestMode::kTorch) return at::upsample_nearest2d(mask.to(at::kFloat), {h, w});
  // PIL: ImagingScaleAffine with a = in / out, positions accumulated from a * 0.5 in double.
  auto indices = [](int64_t in, int64_t out) {
    const double a = static_cast<double>(in) / static_cast<double>(out);
    std::vector<int64_t> idx;
    double pos = a * 0.5;
    for (int64_t i = 0; i < out; ++i, pos += a) idx.push_back(std::min<int64_t>(static_cast<int64_t>(pos), in - 1));
    return at::tensor(idx, at::kLong);
  };
  return mask.to(at::kFloat).index_select(2, indices(mask.size(2), h)).index_select(3, indices(mask.size(3), w));
}

std::vector<at::Tensor> progressive_masks(const at::Tensor& mask, int dilation) {
  DMX_CHECK_ARG(dilation >= 0 && dilation <= 64, "mask dilation must be in [0, 64], got ", dilation);
  std::vector<at::Tensor> out;
  const at::Tensor m = mask.to(at::kFloat);
  for (int i = dilation - 1; i >= 0; --i) {
    const int64_t k = 3 + 2 * i;  // scipy binary_dilation with a k x k square, zeros outside the image
    out.push_back((at::max_pool2d(m, {k, k}, {1, 1}, {k / 2, k / 2}) > 0).to(at::kFloat));
  }
  out.push_back(m);
  return out;
}

int progressive_mask_index(int step, int total_steps, int num_masks) {
  if (num_masks <= 1) return 0;
  return std::min(step / (total_steps / num_masks + 1), num_masks - 1);
}

LatentBlend::LatentBlend(const schedulers::Scheduler& scheduler, LatentBlendConfig cfg)
    : sched_(scheduler), cfg_(std::move(cfg)) {
  DMX_CHECK_ARG(!cfg_.masks.empty(), "latent blend: no mask");
  DMX_CHECK_ARG(
      cfg_.image_latents.defined() && cfg_.noise.defined() && cfg_.image_latents.sizes().equals(cfg_.noise.sizes()),
      "latent blend: image latents and noise must have the same shape");
  if (!cfg_.final_mask.defined()) cfg_.final_mask = cfg_.masks.back();
}

const at::Tensor& LatentBlend::mask_at(int step) const {
  return cfg_
      .masks[static_cast<size_t>(progressive_mask_index(step, cfg_.num_steps, static_cast<int>(cfg_.masks.size())))];
}

at::Tensor LatentBlend::blend(const at::Tensor& background, const at::Tensor& latents, const at::Tensor& m) const {
  // The two references' own operation orders (equal for binary masks, not for soft ones).
  if (cfg_.schedule == BlendSchedule::kNextTimestep) return (1 - m) * background + m * latents;
  const at::Tensor keep = 1 - m;
  return background * keep + latents * (1 - keep);
}

void LatentBlend::on_step_end(int step, at::Tensor& latents) const {
  if (step < cfg_.blend_start_step) return;
  const bool last = step == cfg_.num_steps - 1;
  if (cfg_.schedule == BlendSchedule::kNextTimestep) {
    if (last) {
      latents = blend(cfg_.image_latents, latents, cfg_.final_mask);
    } else {
      latents =
          blend(sched_.add_noise(cfg_.image_latents, cfg_.noise, cfg_.start_index + step + 1), latents, mask_at(step));
    }
    return;
  }
  latents = blend(sched_.add_noise(cfg_.image_latents, cfg_.noise, cfg_.start_index + step), latents, mask_at(step));
}

at::Tensor LatentBlend::final_blend(const at::Tensor& latents) const {
  // diffusers' 4-channel inpaint blends the last step with z_init already (on_step_end).
  if (cfg_.schedule == BlendSchedule::kNextTimestep) return latents;
  return blend(cfg_.image_latents, latents, cfg_.final_mask);
}

// ---- background reconstruction ------------------------------------------------------------------------

std::vector<std::string> background_names() {
  return {"latent", "pixel", "poisson", "optimize-latents", "finetune-decoder"};
}

Background parse_background(const std::string& name) {
  const auto names = background_names();
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return static_cast<Background>(i);
  std::string list;
  for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
  throw InvalidArgument("background must be one of " + list + ", got '" + name + "'");
}

std::string background_name(Background b) { return background_names().at(static_cast<size_t>(b)); }

namespace {
void check_images(const at::Tensor& edited, const at::Tensor& original, const at::Tensor& mask) {
  DMX_CHECK_ARG(edited.dim() == 3 && edited.size(2) == 3 && original.sizes().equals(edited.sizes()),
                "background reconstruction: images must be [H, W, 3] of one size, got ", edited.sizes(), " and ",
                original.sizes());
  DMX_CHECK_ARG(mask.dim() == 2 && mask.size(0) == edited.size(0) && mask.size(1) == edited.size(1),
                "background reconstruction: mask must be [H, W] = [", edited.size(0), ", ", edited.size(1), "], got ",
                mask.sizes());
}

cv::Mat to_u8_mat(const at::Tensor& hwc01) {
  at::Tensor u8 = (hwc01.to(at::kFloat) * 255).round().clamp(0, 255).to(at::kByte).contiguous();
  cv::Mat m(static_cast<int>(u8.size(0)), static_cast<int>(u8.size(1)), u8.dim() == 3 ? CV_8UC3 : CV_8UC1);
  std::memcpy(m.data, u8.data_ptr<uint8_t>(), static_cast<size_t>(u8.numel()));
  return m;
}

// [H, W, 3] in [0, 1] -> [1, 3, H, W] in [-1, 1]
at::Tensor to_model_space(const at::Tensor& hwc01) { return hwc01.permute({2, 0, 1}).unsqueeze(0) * 2 - 1; }
at::Tensor from_model_space(const at::Tensor& x) {
  return (x / 2 + 0.5).clamp(0, 1).squeeze(0).permute({1, 2, 0}).contiguous();
}

// The VAE's device; its weights must be float32 (Adam on half-precision weights is not supported).
at::Device vae_device(models::AutoencoderKL& vae, const char* what) {
  const auto params = vae->parameters();
  DMX_CHECK_ARG(!params.empty(), what, ": the VAE has no parameters");
  DMX_CHECK_SUPPORTED(params[0].scalar_type() == at::kFloat, what, " needs float32 VAE weights (--dtype fp32), got ",
                      params[0].scalar_type());
  return params[0].device();
}

at::Tensor reconstruction_loss(const at::Tensor& x, const at::Tensor& edited, const at::Tensor& original,
                               const at::Tensor& m, double lambda) {
  return at::mse_loss(x * m, edited * m) + at::mse_loss(x * (1 - m), original * (1 - m)) * lambda;
}
}  // namespace

at::Tensor pixel_stitch(const at::Tensor& edited, const at::Tensor& original, const at::Tensor& mask) {
  check_images(edited, original, mask);
  const at::Tensor m = mask.to(at::kFloat).unsqueeze(-1);
  return (edited * m + original * (1 - m)).contiguous();
}

at::Tensor poisson_blend(const at::Tensor& edited, const at::Tensor& original, const at::Tensor& mask) {
  check_images(edited, original, mask);
  cv::Mat src = to_u8_mat(edited), dst = to_u8_mat(original);
  cv::Mat m = to_u8_mat(mask >= 0.5);
  // seamlessClone zeroes the mask's outer 1-pixel frame itself; doing it first gives the same bounding box
  // it computes, so the clone lands where it came from (p = the box's centre, as OpenCV places it).
  m.row(0).setTo(0);
  m.row(m.rows - 1).setTo(0);
  m.col(0).setTo(0);
  m.col(m.cols - 1).setTo(0);
  const cv::Rect box = cv::boundingRect(m);
  if (box.empty()) return original.contiguous();
  m.setTo(255, m > 0);
  cv::Mat out;
  cv::seamlessClone(src, dst, m, cv::Point(box.x + box.width / 2, box.y + box.height / 2), out, cv::NORMAL_CLONE);
  at::Tensor cloned = at::from_blob(out.data, {out.rows, out.cols, 3}, at::kByte).to(at::kFloat) / 255.0f;
  // The Poisson solve runs over the mask's bounding box, nudging pixels outside the mask inside the box; keep
  // the original there, so only the edited region changes (and its colours follow the surroundings).
  return pixel_stitch(cloned, original, (mask >= 0.5).to(at::kFloat));
}

at::Tensor optimize_latents(models::AutoencoderKL& vae, const at::Tensor& latents, const at::Tensor& edited,
                            const at::Tensor& original, const at::Tensor& mask, const ReconstructionOptions& o) {
  check_images(edited, original, mask);
  DMX_CHECK_ARG(o.steps >= 1 && o.steps <= 10000, "optimization steps must be in [1, 10000], got ", o.steps);
  const at::Device dev = vae_device(vae, "optimize-latents");
  at::AutoGradMode grad(true);
  const double sf = vae->config().scaling_factor;
  const at::Tensor fg = to_model_space(edited).to(dev), bg = to_model_space(original).to(dev);
  const at::Tensor m = mask.to(at::kFloat).unsqueeze(0).unsqueeze(0).to(dev);  // [1, 1, H, W]
  // The scaled latent is the variable, as in the BLD code (Adam's step size is in its units).
  at::Tensor z = latents.detach().to(dev, at::kFloat).clone().set_requires_grad(true);
  torch::optim::Adam opt({z}, torch::optim::AdamOptions(o.latents_lr));
  ProgressBar bar("optimize latents", o.steps, o.show_progress);
  for (int i = 0; i < o.steps; ++i) {
    opt.zero_grad();
    at::Tensor loss = reconstruction_loss(vae->decode(z / sf), fg, bg, m, o.background_weight);
    loss.backward();
    opt.step();
    bar.tick();
  }
  bar.finish();
  at::NoGradGuard no_grad;
  return from_model_space(vae->decode(z.detach() / sf).to(at::kCPU));
}

at::Tensor finetune_decoder(models::AutoencoderKL& vae, const at::Tensor& latents, const at::Tensor& edited,
                            const at::Tensor& original, const at::Tensor& mask, const ReconstructionOptions& o) {
  check_images(edited, original, mask);
  DMX_CHECK_ARG(o.steps >= 1 && o.steps <= 10000, "optimization steps must be in [1, 10000], got ", o.steps);
  const at::Device dev = vae_device(vae, "finetune-decoder");
  // The decoder's own weights (not post_quant_conv), as the BLD code; everything else frozen. Every weight
  // and flag is restored on the way out, exceptions included.
  struct Saved {
    at::Tensor param, copy;
    bool requires_grad;
  };
  std::vector<Saved> saved;
  std::vector<at::Tensor> trainable;
  for (auto& kv : vae->named_parameters(true)) {
    at::Tensor p = kv.value();
    const bool dec = kv.key().rfind("decoder.", 0) == 0;
    saved.push_back({p, dec ? p.detach().clone() : at::Tensor(), p.requires_grad()});
    p.set_requires_grad(dec);
    if (dec) trainable.push_back(p);
  }
  struct Restore {
    std::vector<Saved>& s;
    ~Restore() {
      at::NoGradGuard ng;
      for (auto& e : s) {
        if (e.copy.defined()) e.param.copy_(e.copy);
        e.param.mutable_grad() = at::Tensor();
        e.param.set_requires_grad(e.requires_grad);
      }
    }
  } restore{saved};
  DMX_CHECK_ARG(!trainable.empty(), "finetune-decoder: the VAE has no decoder parameters");

  at::AutoGradMode grad(true);
  const double sf = vae->config().scaling_factor;
  const at::Tensor fg = to_model_space(edited).to(dev), bg = to_model_space(original).to(dev);
  const at::Tensor m = mask.to(at::kFloat).unsqueeze(0).unsqueeze(0).to(dev);  // [1, 1, H, W]
  const at::Tensor z = latents.detach().to(dev, at::kFloat) / sf;              // [1, 4, h, w] unscaled
  torch::optim::Adam opt(trainable, torch::optim::AdamOptions(o.decoder_lr));
  ProgressBar bar("fine-tune decoder", o.steps, o.show_progress);
  for (int i = 0; i < o.steps; ++i) {
    opt.zero_grad();
    at::Tensor loss = reconstruction_loss(vae->decode(z), fg, bg, m, o.background_weight);
    loss.backward();
    opt.step();
    bar.tick();
  }
  bar.finish();
  at::NoGradGuard no_grad;
  return from_model_space(vae->decode(z).to(at::kCPU));
}

// ---- measurements ---------------------------------------------------------------------------------------

double error_outside_mask(const at::Tensor& result, const at::Tensor& original, const at::Tensor& mask) {
  check_images(result, original, mask);
  const at::Tensor outside = (mask < 0.5).to(at::kFloat).unsqueeze(-1);  // [H, W, 1]
  const double n = outside.sum().item<double>() * 3;
  if (n == 0) return 0.0;
  return ((result.to(at::kDouble) - original.to(at::kDouble)).abs() * outside).sum().item<double>() / n * 255.0;
}

double seam_visibility(const at::Tensor& result, const at::Tensor& original, const at::Tensor& mask) {
  check_images(result, original, mask);
  const at::Tensor m = (mask >= 0.5);
  // Boundary: a pixel with a 4-neighbour on the other side of the mask edge.
  at::Tensor b = at::zeros_like(m);
  const int64_t H = m.size(0), W = m.size(1);
  b.narrow(0, 0, H - 1).logical_or_(m.narrow(0, 0, H - 1) != m.narrow(0, 1, H - 1));
  b.narrow(0, 1, H - 1).logical_or_(m.narrow(0, 0, H - 1) != m.narrow(0, 1, H - 1));
  b.narrow(1, 0, W - 1).logical_or_(m.narrow(1, 0, W - 1) != m.narrow(1, 1, W - 1));
  b.narrow(1, 1, W - 1).logical_or_(m.narrow(1, 0, W - 1) != m.narrow(1, 1, W - 1));
  const double nb = b.sum().item<double>();
  if (nb == 0) return 1.0;
  auto grad_mag = [&](const at::Tensor& img) {  // central differences, replicated edges; mean over channels
    at::Tensor x = img.to(at::kDouble).permute({2, 0, 1}).unsqueeze(0);
    at::Tensor p = at::replication_pad2d(x, {1, 1, 1, 1});
    at::Tensor gx = (p.narrow(3, 2, W) - p.narrow(3, 0, W)).narrow(2, 1, H) / 2;
    at::Tensor gy = (p.narrow(2, 2, H) - p.narrow(2, 0, H)).narrow(3, 1, W) / 2;
    return (gx * gx + gy * gy).sqrt().mean(1).squeeze(0);  // [H, W]
  };
  const at::Tensor bf = b.to(at::kDouble);
  const double gr = (grad_mag(result) * bf).sum().item<double>() / nb;
  const double go = (grad_mag(original) * bf).sum().item<double>() / nb;
  return gr / std::max(go, 1e-6);
}
}  // namespace dmx::extensions
