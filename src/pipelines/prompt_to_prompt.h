// Prompt-to-Prompt editing (Hertz et al. 2022), following diffusers' community Prompt2PromptPipeline
// (examples/community/pipeline_prompt2prompt.py, v0.27.2): the source and the edit prompt are denoised
// together from the same latents, with classifier-free guidance (negative prompt "" by default), while a
// controller (replace / refine / reweight, optional local blend) edits the conditional rows' attention.
// With per-step unconditional embeddings from null-text inversion (Mokady et al. 2022) and the inverted
// latents, the source row reconstructs a real image and the edit row edits it.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "extensions/prompt_to_prompt.h"
#include "loaders/model_bundle.h"
#include "pipelines/generation.h"
#include "pipelines/stable_diffusion.h"

namespace dmx::pipelines {

// The shared parameters (GenerationParams: prompt = the source prompt, negative prompt, steps, guidance,
// scheduler DDIM, eta, clip skip, generator, on_step_end with latents [2, 4, h, w] after each step and after
// the local blend) and the edit's. One image per prompt.
struct PromptToPromptParams : GenerationParams {
  PromptToPromptParams() { scheduler = "ddim"; }
  std::string edit_prompt;           // the edited prompt
  std::string mode = "replace";      // replace (word swap) | refine (added words) | reweight (per-word scale)
  double cross_replace_steps = 0.4;  // fraction of steps whose cross attention follows the source
  double self_replace_steps = 0.4;   // fraction of steps whose self attention (<= 16x16 maps) is the source's
  // reweight: (word of the edit prompt, scale); several words each get their own scale.
  std::vector<std::pair<std::string, double>> reweight;
  // Local blend: words whose cross-attention maps bound the edited region; each is looked up in every prompt
  // that contains it (at least one must). Empty = edit the whole image.
  std::vector<std::string> local_blend_words;
  double local_blend_threshold = 0.3;
  int width = 0;  // 0 = model default
  int height = 0;
  at::Tensor latents;  // initial noise [1, 4, h, w] shared by both prompts (before init_noise_sigma)
  // Null-text inversion: one unconditional embedding [1, 77, D] per step, replacing the negative prompt's.
  std::vector<at::Tensor> uncond_embeddings;
  bool store_attention = false;  // keep the averaged cross-attention maps (output.store)
};

struct PromptToPromptOutput {
  at::Tensor images;   // [2, H, W, 3] float32 in [0, 1]: source, edit
  at::Tensor latents;  // [2, 4, h, w] after the last step
  std::vector<double> timesteps;
  std::vector<std::string> prompts;                   // {prompt, edit_prompt}
  std::shared_ptr<extensions::AttentionStore> store;  // when store_attention or local blend
  at::Tensor local_blend_mask;                        // [1, 1, h, w] last local-blend mask, when used
};

class PromptToPromptPipeline {
 public:
  explicit PromptToPromptPipeline(std::shared_ptr<loaders::StableDiffusionModels> models);
  PromptToPromptOutput run(const PromptToPromptParams& p);
  // InvalidArgument naming the parameter for bad modes, steps, words, scales or prompt shapes.
  void check_params(const PromptToPromptParams& p) const;
  // The controller run() installs (exposed for tests and other pipelines).
  std::shared_ptr<extensions::AttentionEdit> make_controller(const PromptToPromptParams& p) const;

 private:
  std::shared_ptr<loaders::StableDiffusionModels> m_;
};
}  // namespace dmx::pipelines
