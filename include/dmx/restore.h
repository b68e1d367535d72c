// dmx public API: `dmx restore`, image-to-image restoration with a Palette model (Saharia et al. 2022;
// docs/palette.md): colorization, inpainting, uncropping and JPEG restoration in pixel space. Torch-free.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmx/error.h"
#include "dmx/options.h"

namespace dmx {

// RunOptions: threads, progress, verbose, overwrite.
struct RestoreOptions : RunOptions {
  std::string model;  // a Palette folder (dmx train palette)
  std::string task;   // "" = the model's; else it must be the model's (colorize | inpaint | uncrop | jpeg)
  std::string image;  // the picture to restore (PNG/JPEG), sides multiples of 8, at most 512
  // inpaint / uncrop: the region to fill, white (>= 128 after conversion to gray) = unknown; the picture's size.
  // "" = a centred box of half the sides (inpaint) or the right half (uncrop).
  std::string mask;
  int jpeg_quality = 0;  // jpeg: > 0 compresses --image at this quality (1..100) first; 0 = it already is
  int steps = 100;       // sampling steps: the model's test schedule respaced to this many (its n_timestep = exact)
  std::optional<uint64_t> seed;
  int num_images = 1;
  std::string output;      // PNG; with num_images > 1: <stem>-<i>.png
  std::string save_input;  // optional PNG of the degraded picture the model is conditioned on
};

struct RestoreResult {
  std::vector<std::string> images;
  std::string task;
  uint64_t seed = 0;
  int width = 0, height = 0, steps = 0;
  double seconds = 0;
};

// Checks every input first (exit-2 errors naming the option; nothing written), loads the model, samples, writes the
// outputs atomically (all or nothing).
RestoreResult restore(const RestoreOptions& o);
}  // namespace dmx
