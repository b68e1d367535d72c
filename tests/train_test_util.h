// Helpers shared by the training tests (test_train, test_controlnet_recipe, test_adapter_recipe,
// test_hypernetwork_train, test_outputs): an in-memory batch source, the loss of a fixed draw and a synthetic picture.
#pragma once
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/image.h"
#include "loaders/model_bundle.h"
#include "schedulers/scheduler.h"
#include "training/trainer.h"

namespace dmx::test {

// A small fixed set of random images in [-1, 1] with captions, `batch_size` rows per micro-step in order.
struct MemorySource : training::BatchSource {
  at::Tensor pixels;  // [N, 3, R, R]
  std::vector<std::string> captions;
  int batch;
  MemorySource(int n, int res, int batch_size, uint64_t seed = 7) : batch(batch_size) {
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
    pixels = at::rand({n, 3, res, res}, g, at::TensorOptions().dtype(at::kFloat)) * 2 - 1;
    const char* words[] = {"a red square", "a blue circle", "a green cat", "a photo of a dog"};
    for (int i = 0; i < n; ++i) captions.push_back(words[i % 4]);
  }
  training::Batch get(int64_t step) override {
    training::Batch b;
    std::vector<at::Tensor> rows;
    for (int k = 0; k < batch; ++k) {
      const int64_t i = (step * batch + k) % pixels.size(0);
      rows.push_back(pixels[i]);
      b.captions.push_back(captions[static_cast<size_t>(i)]);
      b.indices.push_back(i);
    }
    b.pixel_values = at::stack(rows);
    return b;
  }
  size_t size() const override { return static_cast<size_t>(pixels.size(0)); }
};

// Mean denoising loss of 4 fixed draws (latent sample, noise, and the recipe's own timestep draw) on one batch,
// without grad: a few training steps must lower it.
inline double fixed_draw_loss(training::Recipe& r, const training::Batch& b, uint64_t seed) {
  at::NoGradGuard no_grad;
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto& m = r.models();
  const auto scfg = schedulers::SchedulerConfig::for_class("DDPMScheduler", m.scheduler_config);
  const at::Tensor ac = at::cumprod(1.0 - schedulers::make_betas(scfg), 0);
  auto [mean, stdv] = r.encode_images(b);
  double total = 0;
  for (int rep = 0; rep < 4; ++rep) {
    const at::Tensor lat = (mean + stdv * at::randn(mean.sizes(), g, mean.options())) * m.vae->config().scaling_factor;
    const at::Tensor noise = at::randn(lat.sizes(), g, lat.options());
    const at::Tensor t = r.sample_timesteps(g, lat.size(0), 1000);
    const at::Tensor pred = r.predict(training::ddpm_add_noise(ac, lat, noise, t), t, r.encode_prompt(b), b);
    total += (pred - noise).pow(2).mean().item<double>();
  }
  return total / 4;
}

// An RGB checkerboard of 4-pixel squares whose colours depend on seed.
inline Image checker_image(int w, int h, int seed) {
  Image img;
  img.width = w;
  img.height = h;
  img.channels = 3;
  img.data.resize(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c)
        img.data[(static_cast<size_t>(y) * w + x) * 3 + c] =
            static_cast<uint8_t>(((x / 4 + y / 4 + seed) % 2) * 180 + c * 20 + seed * 7);
  return img;
}

}  // namespace dmx::test
