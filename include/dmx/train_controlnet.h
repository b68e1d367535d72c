// dmx public API: training a ControlNet (`dmx train controlnet`; docs/distributed.md for data-parallel runs).
// Torch-free. Mirrors diffusers 0.27.2 examples/controlnet/train_controlnet.py.
#pragma once
#include <cstdint>
#include <string>

#include "dmx/error.h"

namespace dmx {

struct TrainControlNetOptions {
  std::string model;       // base Stable Diffusion model (diffusers folder or single file); frozen
  std::string data;        // folder with metadata.jsonl rows {file_name, text, conditioning_image}
  std::string output;      // output folder: diffusers layout + controlnet_original.safetensors
  std::string output_dir;  // checkpoints and train_log.jsonl ("" = <output>.train)
  std::string controlnet;  // start from this ControlNet instead of a fresh copy of the UNet encoder
  int64_t steps = 1000;    // optimizer steps (max_train_steps)
  int batch_size = 4;      // per process (train_batch_size); the global batch is batch_size * WORLD_SIZE
  int gradient_accumulation_steps = 1;
  double learning_rate = 5e-6;  // train_controlnet.py's default
  std::string lr_scheduler = "constant";
  int64_t lr_warmup_steps = 0;
  double max_grad_norm = 1.0;
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_weight_decay = 1e-2, adam_epsilon = 1e-8;  // the script's
  int resolution = 512;
  uint64_t seed = 0;
  int64_t checkpointing_steps = 0;     // 0: only the final checkpoint
  std::string resume_from_checkpoint;  // checkpoint folder or output_dir ("" = fresh)
  bool skip_bad_rows = false;          // report bad dataset rows and leave them out instead of failing
  std::string device = "cpu";          // cpu (Gloo when WORLD_SIZE > 1) | cuda (NCCL)
  int threads = 0;                     // 0 = all cores
  bool quiet = false;
};

struct TrainControlNetResult {
  int64_t steps = 0;
  double final_loss = 0;
  double seconds = 0;
  int world_size = 1;
  int rank = 0;
  size_t dataset_rows = 0;
  size_t skipped_rows = 0;
  std::string output;  // what was written (rank 0)
};

// Checks every option before reading the model or writing anything (InvalidArgument naming the option).
void validate(const TrainControlNetOptions& o);
TrainControlNetResult train_controlnet(const TrainControlNetOptions& o);
}  // namespace dmx
