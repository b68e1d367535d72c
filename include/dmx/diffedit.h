// dmx public API: DiffEdit (Couairon et al. 2022) text-driven editing of a real image, as diffusers 0.27.2
// StableDiffusionDiffEditPipeline runs it (generate_mask, invert, __call__ with one generator). Torch-free.
// See docs/editing-diffedit.md.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "dmx/error.h"
#include "dmx/options.h"

namespace dmx {

// The model, device, sampling and run settings are the shared groups of dmx/options.h: negative_prompt (""
// = none, the reference default) is used by the mask (both prompts), the edit and, when inversion_guidance_scale
// > 1, the inversion; steps are num_inference_steps of all three phases; guidance_scale is generate_mask's and
// the edit's.
struct DiffEditOptions : ModelOptions, DeviceOptions, SamplingOptions, RunOptions {
  std::string image;                      // the image to edit (PNG/JPEG); width and height multiples of 8
  std::string source_prompt;              // what the image shows (mask + inversion)
  std::string target_prompt;              // what it should show (mask + edit)
  std::string output;                     // edited image, PNG
  std::string mask_output;                // optional PNG of the mask at image size (white = edited)
  std::string save_latents;               // optional .safetensors with "latents" after the last edit step
  double encode_ratio = 0.8;              // inpaint_strength of invert and edit, in (0, 1]
  double mask_threshold = 3.0;            // mask_thresholding_ratio, > 0
  int num_maps = 10;                      // num_maps_per_mask
  double mask_encode_strength = 0.5;      // in (0, 1]
  double inversion_guidance_scale = 7.5;  // invert: diffusers' default (its conditional and unconditional branches)
};

struct DiffEditResult {
  std::string image;  // written files
  std::string mask;
  std::string latents;
  uint64_t seed = 0;
  double mask_fraction = 0;                                       // share of latent pixels the mask edits
  double mask_seconds = 0, invert_seconds = 0, edit_seconds = 0;  // the three phases (with decode in edit)
  double seconds = 0;                                             // the whole call, loading included
};

// Validates every input first (InvalidArgument naming the option), then loads, runs the three phases and
// writes the outputs atomically.
DiffEditResult diffedit(const DiffEditOptions& opts);

// The PNG "parameters" text (A1111 layout: target prompt, "Negative prompt:", then fields, with the DiffEdit
// settings as extra fields that A1111-style readers ignore).
std::string format_diffedit_parameters(const DiffEditOptions& o, uint64_t seed, int width, int height,
                                       const std::string& model_name, const std::string& model_hash = "");
}  // namespace dmx
