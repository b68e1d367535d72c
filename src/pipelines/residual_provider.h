// Residual providers: anything that adds residuals or features to the UNet's inputs at each evaluation
// (ControlNet today: pipelines/controlnet.h; T2I-Adapter, GLIGEN-style and layout conditioners next). The
// generation core's guided_noise_prediction runs every provider of a run, in order, on the UNet inputs it has
// built, so the denoising loops hold no provider-specific code and several providers compose in one run
// (MultiControlNet = one provider per net; their residuals add up).
//
// A provider's life in a run: check() once before anything is drawn, prepare() once before the loop,
// apply() at every UNet evaluation. A provider may be reused by later runs (prepare() starts each one).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loaders/model_bundle.h"
#include "models/unet_2d_condition.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

// What a provider knows of the run.
struct ResidualRun {
  const loaders::StableDiffusionModels& models;
  int width = 0;  // output size in pixels
  int height = 0;
  int batch = 1;         // images per prompt (N): the latents are [N, C, h, w]
  bool guided = false;   // classifier-free guidance: the UNet batch is [uncond (N); cond (N)]
  bool img2img = false;  // the run starts from an image (strength < 1 schedules)
};

// One UNet evaluation of the loop.
struct ResidualStep {
  int index = 0;          // position in the scheduler's timesteps()
  int num_timesteps = 0;  // scheduler.timesteps().size()
  double t = 0.0;
  const at::Tensor& latents;         // [N, C, h, w] float32: the loop's latents, before scaling and batching
  schedulers::Scheduler& scheduler;  // for a provider that needs its own scaled input
  bool guided = false;               // as ResidualRun::guided
};

class ResidualProvider {
 public:
  virtual ~ResidualProvider() = default;
  // For messages ("controlnet[0] (PATH)").
  virtual std::string name() const = 0;
  // Rules against the run (sizes, model compatibility, unsupported combinations): InvalidArgument or
  // Unsupported naming the provider. Called before anything is drawn.
  virtual void check(const ResidualRun& run) const = 0;
  // Once per run, before the loop (batch the conditioning for the run's images and guidance).
  virtual void prepare(const ResidualRun& run) = 0;
  // At each UNet evaluation: `in` holds the sample, timestep and encoder_hidden_states the UNet will see; the
  // provider adds its residuals (summed with those already there) or features.
  virtual void apply(const ResidualStep& step, models::UNetInputs& in) = 0;
  // The output size this provider implies when the run gives none (ControlNet: its image's), as {w, h}.
  virtual std::optional<std::pair<int, int>> default_size() const { return std::nullopt; }
};

using ResidualProviders = std::vector<std::shared_ptr<ResidualProvider>>;

// Adds residuals to the UNet inputs: the first provider's are taken as they are, later ones are summed
// element by element in provider order (diffusers' MultiControlNetModel sums its nets' outputs so).
void add_unet_residuals(models::UNetInputs& in, const std::vector<at::Tensor>& down, const at::Tensor& mid);
}  // namespace dmx::pipelines
