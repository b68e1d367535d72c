// dmx public API: Prompt-to-Prompt editing (Hertz et al. 2022) of generated or real images (null-text
// inversion, Mokady et al. 2022). Torch-free. See docs/editing-p2p.md.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dmx/error.h"
#include "dmx/options.h"

namespace dmx {

// The model, sampling and run settings are the shared groups of dmx/options.h.
struct P2POptions : ModelOptions, SamplingOptions, RunOptions {
  std::string prompt;            // the source prompt
  std::string edit_prompt;       // the edited prompt
  std::string mode = "replace";  // replace | refine | reweight
  double cross_replace_steps = 0.4;
  double self_replace_steps = 0.4;
  std::vector<std::string> reweight;     // "WORD=SCALE" entries (words of the edit prompt); mode reweight
  std::vector<std::string> local_blend;  // words whose attention bounds the edited region ("" = none)
  double local_blend_threshold = 0.3;
  int width = 0;  // 0 = the model's default size (or the --image size)
  int height = 0;
  // Real images: DDIM-invert this image under `prompt` (guidance 1); with null_text_inversion, then optimise
  // the per-step unconditional embeddings so the guided source reconstructs it.
  std::string image;
  bool null_text_inversion = false;
  int null_text_inner_steps = 10;
  std::string save_attention_maps;  // PNG grid of per-token cross-attention maps (both prompts)
  std::string output;               // OUT.png: source | edit side by side; also OUT-source.png, OUT-edit.png
};

struct P2PResult {
  std::string output, source, edit, attention_maps;  // written files ("" when not written)
  uint64_t seed = 0;
  double seconds = 0.0;              // whole call
  double edit_seconds = 0.0;         // the Prompt-to-Prompt denoising + decoding
  double inversion_seconds = 0.0;    // DDIM / null-text inversion, when --image was given
  double reconstruction_psnr = 0.0;  // PSNR (dB) of the source image against --image, when given
};

// Validates every input before loading anything, then loads, edits and writes atomically.
P2PResult p2p(const P2POptions& opts);

// "WORD=SCALE" -> (WORD, SCALE); InvalidArgument naming --reweight, the rule and the value otherwise.
std::pair<std::string, double> parse_reweight(const std::string& arg);
}  // namespace dmx
