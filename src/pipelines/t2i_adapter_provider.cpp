#include "pipelines/t2i_adapter_provider.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/resize.h"
#include "dmx/error.h"

namespace dmx::pipelines {

at::Tensor prepare_adapter_image(const Image& img, int in_channels, int width, int height) {
  DMX_CHECK_ARG(width >= 1 && height >= 1, "adapter image size must be positive, got ", width, "x", height);
  DMX_CHECK_ARG(in_channels == 1 || in_channels == 3, "adapter in_channels must be 1 or 3, got ", in_channels);
  DMX_CHECK_ARG(img.width >= 1 && img.height >= 1 && !img.data.empty(), "--adapter-image: empty picture");
  Image x = in_channels == 1 ? to_gray(img) : to_rgb(img);
  if (x.width != width || x.height != height) x = resize_lanczos(x, width, height);
  at::Tensor t = at::from_blob(x.data.data(), {x.height, x.width, x.channels}, at::kByte).clone();
  return (t.to(at::kFloat) / 255.0).permute({2, 0, 1}).unsqueeze(0).contiguous();  // [1, C, H, W]
}

std::pair<int, int> default_adapter_size(const Image& img, int downscale_factor) {
  const int f = std::max(1, downscale_factor);
  return {img.width / f * f, img.height / f * f};
}

bool adapter_keep(int i, int n, double tau) {
  const int index = n - i - 1;
  return index >= static_cast<int>((1.0 - tau) * n);  // Python's int() truncates toward zero, as here
}

T2IAdapterProvider::T2IAdapterProvider(std::vector<T2IAdapterUnit> units) : units_(std::move(units)) {}

std::string T2IAdapterProvider::what(size_t i) const {
  const std::string& n = units_[i].name;
  return "adapter[" + std::to_string(i) + "]" + (n.empty() ? "" : " (" + n + ")");
}

std::string T2IAdapterProvider::name() const {
  std::string s = units_.size() == 1 ? what(0) : "MultiAdapter of " + std::to_string(units_.size());
  return s;
}

void T2IAdapterProvider::check(const ResidualRun& run) const {
  DMX_CHECK_ARG(!units_.empty(), "T2I-Adapter provider without adapters");
  DMX_CHECK_SUPPORTED(!run.img2img,
                      "T2I-Adapters with an init image (img2img) are not supported "
                      "(diffusers 0.27.2 has no adapter img2img pipeline)");
  const auto& ucfg = run.models.unet->config();
  const int vae_f = run.models.vae_scale_factor();
  const auto& first = units_[0].model->config();
  for (size_t i = 0; i < units_.size(); ++i) {
    const T2IAdapterUnit& u = units_[i];
    const std::string w = what(i);
    DMX_CHECK_ARG(static_cast<bool>(u.model), w, ": no model loaded");
    DMX_CHECK_ARG(std::isfinite(u.scale), w, ": --adapter-scale must be finite, got ", u.scale);
    DMX_CHECK_ARG(u.end > 0 && u.end <= 1, w, ": --adapter-end must be in (0, 1], got ", u.end);
    DMX_CHECK_ARG(u.image.width >= 1 && u.image.height >= 1, w, ": no --adapter-image");
    const auto& c = u.model->config();
    models::check_t2i_adapter_matches_unet(c, ucfg, vae_f, w);
    if (i > 0) {  // MultiAdapter's rules
      DMX_CHECK_ARG(
          c.downscale_factor == first.downscale_factor && c.total_downscale_factor() == first.total_downscale_factor(),
          "--adapter: every adapter must downscale alike (MultiAdapter); ", what(0), " has downscale_factor ",
          first.downscale_factor, " (total ", first.total_downscale_factor(), "), ", w, " has ", c.downscale_factor,
          " (total ", c.total_downscale_factor(), ")");
      DMX_CHECK_ARG(c.num_features() == first.num_features(), "--adapter: every adapter must give as many features; ",
                    what(0), " gives ", first.num_features(), ", ", w, " gives ", c.num_features());
    }
  }
  DMX_CHECK_ARG(run.width % first.downscale_factor == 0 && run.height % first.downscale_factor == 0, "the output size ",
                run.width, "x", run.height, " must be a multiple of the adapter's downscale_factor ",
                first.downscale_factor);
}

void T2IAdapterProvider::prepare(const ResidualRun& run) {
  at::NoGradGuard no_grad;
  features_.clear();
  for (size_t i = 0; i < units_.size(); ++i) {
    T2IAdapterUnit& u = units_[i];
    models::T2IAdapter net = u.model;
    const at::Tensor p = net->parameters().empty() ? at::Tensor() : net->parameters().front();
    const at::Tensor x =
        prepare_adapter_image(u.image, u.model->config().in_channels, run.width, run.height)
            .to(p.defined() ? p.device() : at::Device(at::kCPU), p.defined() ? p.scalar_type() : at::kFloat);
    std::vector<at::Tensor> f = net->forward(x);
    // One adapter: v * adapter_conditioning_scale. MultiAdapter: w_i * features with w = torch.tensor(scales)
    // (float32), summed in order in apply(); both multiply in the features' dtype by the float32 scale.
    const at::Tensor w = at::scalar_tensor(u.scale, at::kFloat);
    for (auto& t : f) {
      t = w.to(t.scalar_type()) * t;
      if (run.batch > 1) t = t.repeat({run.batch, 1, 1, 1});
      if (run.guided) t = at::cat({t, t}, 0);
      t = t.to(run.models.device);
    }
    features_.push_back(std::move(f));
  }
}

void T2IAdapterProvider::apply(const ResidualStep& step, models::UNetInputs& in) {
  DMX_CHECK_ARG(features_.size() == units_.size(), name(), ": prepare() was not called for this run");
  std::vector<at::Tensor> sum;
  for (size_t i = 0; i < units_.size(); ++i) {
    if (!adapter_keep(step.index, step.num_timesteps, units_[i].end)) continue;
    const auto& f = features_[i];
    if (sum.empty()) {
      sum = f;
    } else {
      for (size_t k = 0; k < f.size(); ++k) sum[k] = sum[k] + f[k];
    }
  }
  if (sum.empty()) return;
  auto& dst = in.down_intrablock_additional_residuals;
  if (dst.empty()) {
    dst = std::move(sum);
    return;
  }
  DMX_CHECK_ARG(dst.size() == sum.size(), name(), ": ", sum.size(), " adapter features but ", dst.size(),
                " already given by an earlier provider");
  for (size_t k = 0; k < sum.size(); ++k) dst[k] = dst[k] + sum[k];
}

std::optional<std::pair<int, int>> T2IAdapterProvider::default_size() const {
  if (units_.empty() || !units_[0].model || units_[0].image.width < 1) return std::nullopt;
  return default_adapter_size(units_[0].image, units_[0].model->config().downscale_factor);
}
}  // namespace dmx::pipelines
