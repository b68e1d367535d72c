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

// An extra classifier-free guidance branch (multi-conditional guidance, e.g. SpaText's): N more UNet rows after
// [uncond (N); cond (N)], whose prompt embeddings are the unconditional ones (text = false) or the conditional ones
// (text = true); the provider's apply() gives each row its own conditioning. The guided prediction becomes
//   eps_u + guidance_scale (eps_c - eps_u) + sum_k scale_k (eps_k - eps_u)        (guided_noise_prediction)
struct GuidanceBranch {
  bool text = false;
  double scale = 0.0;
};

// One UNet evaluation of the loop.
struct ResidualStep {
  int index = 0;          // position in the scheduler's timesteps()
  int num_timesteps = 0;  // scheduler.timesteps().size()
  double t = 0.0;
  const at::Tensor& latents;         // [N, C, h, w] float32: the loop's latents, before scaling and batching
  schedulers::Scheduler& scheduler;  // for a provider that needs its own scaled input
  bool guided = false;               // as ResidualRun::guided
  int branches = 0;                  // the UNet batch's groups of N rows: 1 unguided, 2 + extra branches guided
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
  // Extra guidance branches this provider asks for (only when the run is guided); none by default. A run whose
  // providers ask for any runs no other provider (their conditioning is batched for [uncond; cond]).
  virtual std::vector<GuidanceBranch> guidance_branches() const { return {}; }
  // Channels this provider concatenates to the UNet's sample (SpaText's map): the latents the loop draws have the
  // UNet's in_channels less the providers' extra channels.
  virtual int extra_input_channels() const { return 0; }
};

using ResidualProviders = std::vector<std::shared_ptr<ResidualProvider>>;

// Adds residuals to the UNet inputs: the first provider's are taken as they are, later ones are summed
// element by element in provider order (diffusers' MultiControlNetModel sums its nets' outputs so).
void add_unet_residuals(models::UNetInputs& in, const std::vector<at::Tensor>& down, const at::Tensor& mid);
}  // namespace dmx::pipelines
