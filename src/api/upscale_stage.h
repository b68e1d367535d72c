// The x4 upscaler as a stage of a command (`dmx upscale`, and `dmx generate --upscale-model` after the base model):
// the checks of its options, the memory plan of a picture, and the run on pictures as the base model wrote them.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/image.h"
#include "loaders/upscale.h"
#include "pipelines/upscale.h"

namespace dmx::api {

struct UpscaleStageOptions {
  std::string model;
  int noise_level = 20;
  int steps = 75;
  double guidance_scale = 9.0;
  std::string scheduler;  // "" = the folder's own
  double eta = 0.0;
  std::string vae_tiling = "auto";  // auto | on | off
  int vae_tile_size = 0;
  int64_t memory_limit_mb = 0;  // 0 = physical memory
  // How messages name the options: "--" for dmx upscale (--noise-level), "--upscale-" for generate's stage.
  std::string flag_prefix = "--";
};

// Every check that needs no weights: the folder is an upscaler (inspect_upscale_folder), the noise level is within
// its max_noise_level, steps, guidance, eta, scheduler name and tiling options are valid. Returns what the folder says.
loaders::UpscaleFolderInfo check_upscale_stage(const UpscaleStageOptions& o);
// The output of a low_w x low_h picture must stay within 4096 x 4096 (InvalidArgument naming `param`).
void check_upscale_size(int low_w, int low_h, int f, const std::string& param, const std::string& what);
// The tiling for a run on low_w x low_h pictures, refused (InvalidArgument naming `param`, the sizes and the memory
// it would need) when even that exceeds the budget; "auto" tiles only when the whole decode would not fit.
pipelines::VaeTiling plan_upscale_memory(const loaders::UpscaleModels& m, const UpscaleStageOptions& o, int low_w,
                                         int low_h, int num_images, bool cpu, const std::string& param);
}  // namespace dmx::api
