// dmx public API: the option groups several commands share, each declared once. A command's options struct
// embeds the groups it uses as base classes (GenerateOptions : ModelOptions, DeviceOptions, SamplingOptions,
// RunOptions), so `o.model`, `o.steps` and `o.threads` read as before, and code that needs only a group takes
// it by reference (api::add_model_inputs(plan, o)). The CLI's option table (src/cli/options.cpp) writes into
// these groups and reads its help defaults from them. Torch-free.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

namespace dmx {

// Where the model comes from.
struct ModelOptions {
  std::string model;          // diffusers folder or single-file .safetensors / .ckpt
  std::string config_dir;     // diffusers folder with component configs (+ tokenizer) for a single file
  std::string tokenizer_dir;  // folder with vocab.json + merges.txt
};

// Where and in what precision it runs.
struct DeviceOptions {
  std::string dtype = "fp32";  // fp32 | bf16 | fp16 (fp16: CUDA only)
  std::string device = "cpu";  // cpu | cuda[:N]
};

// What every sampling pipeline (generate, p2p, diffedit) shares: diffusers' names.
struct SamplingOptions {
  std::string negative_prompt;
  int steps = 50;                // num_inference_steps
  double guidance_scale = 7.5;   // classifier-free guidance; <= 1 disables it
  std::optional<uint64_t> seed;  // none = a random seed, reported in the result
};

// How a run behaves: threads, progress and outputs.
struct RunOptions {
  int threads = 0;       // 0 = all cores
  bool progress = true;  // progress and summaries on stderr (--quiet: false)
  bool verbose = false;  // per-phase timings on stderr
  // Replace outputs that already exist (README "Outputs and overwriting"); without it an existing output is an
  // error found before any work. Outputs are never allowed to be, or lie inside, an input.
  bool overwrite = false;
};

}  // namespace dmx
