// `dmx train controlnet`: train a ControlNet on a folder of images, captions and conditioning images.
#include <cstdio>
#include <string>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/train_controlnet.h"

namespace dmx::cli {

int cmd_train_controlnet(int argc, char** argv) {
  Args a("train controlnet", {
      {"model", "PATH", "base Stable Diffusion model, diffusers folder or single file; frozen (required)"},
      {"data", "DIR", "metadata.jsonl rows {file_name, text, conditioning_image}, paths relative to DIR (required)"},
      {"output", "DIR", "ControlNet folder to write: config.json + diffusion_pytorch_model.safetensors, and "
                        "controlnet_original.safetensors (control_model.* keys) (required)"},
      {"controlnet", "PATH", "start from this ControlNet (default: a copy of the UNet encoder with zero convolutions)"},
      {"steps", "N", "optimizer steps (default 1000)"},
      {"batch-size", "B", "examples per process and micro-step; global batch = B x WORLD_SIZE (default 4)"},
      {"gradient-accumulation-steps", "N", "micro-steps per optimizer step (default 1)"},
      {"learning-rate", "LR", "AdamW learning rate (default 5e-6)"},
      {"lr-scheduler", "NAME", "constant|constant_with_warmup|linear|cosine (default constant)"},
      {"lr-warmup-steps", "N", "warm-up steps (default 0)"},
      {"max-grad-norm", "X", "clip the gradient norm; 0 = no clipping (default 1)"},
      {"adam-beta1", "B", "AdamW beta1 (default 0.9)"},
      {"adam-beta2", "B", "AdamW beta2 (default 0.999)"},
      {"adam-weight-decay", "W", "AdamW weight decay (default 1e-2)"},
      {"adam-epsilon", "E", "AdamW epsilon (default 1e-8)"},
      {"resolution", "PX", "training size, a multiple of 8 (default 512)"},
      {"seed", "N", "random seed (default 0)"},
      {"checkpointing-steps", "N", "write a resumable checkpoint every N steps (default: only at the end)"},
      {"output-dir", "DIR", "checkpoints and train_log.jsonl (default <output>.train)"},
      {"resume-from-checkpoint", "PATH", "a checkpoint folder, or the checkpoint dir (its newest checkpoint)"},
      {"skip-bad-rows", "", "report bad dataset rows and leave them out instead of failing"},
      {"device", "D", "cpu|cuda (default cpu); with WORLD_SIZE > 1: Gloo on cpu, NCCL on cuda"},
      {"threads", "N", "CPU threads per process (default: all cores)"},
      {"quiet", "", "no progress output"},
      {"verbose", "", "stack traces"},
      {"help", "", "show this help"},
  });
  a.parse(argc, argv, 3);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    std::printf("\nData-parallel: launch one process per rank with the torchrun variables (MASTER_ADDR, MASTER_PORT,\n"
                "RANK, WORLD_SIZE, LOCAL_RANK) and the same arguments everywhere; see docs/distributed.md.\n");
    return 0;
  }
  TrainControlNetOptions o;
  o.model = a.str("model");
  o.data = a.str("data");
  o.output = a.str("output");
  o.controlnet = a.str("controlnet");
  o.steps = a.integer("steps", o.steps, 1, int64_t(1) << 40);
  o.batch_size = static_cast<int>(a.integer("batch-size", o.batch_size, 1, 1 << 16));
  o.gradient_accumulation_steps =
      static_cast<int>(a.integer("gradient-accumulation-steps", o.gradient_accumulation_steps, 1, 1 << 16));
  o.learning_rate = a.real("learning-rate", o.learning_rate, 1e-12, 10.0);
  o.lr_scheduler = a.str("lr-scheduler", o.lr_scheduler);
  o.lr_warmup_steps = a.integer("lr-warmup-steps", 0, 0, int64_t(1) << 40);
  o.max_grad_norm = a.real("max-grad-norm", o.max_grad_norm, 0.0, 1e12);
  o.adam_beta1 = a.real("adam-beta1", o.adam_beta1, 0.0, 0.999999);
  o.adam_beta2 = a.real("adam-beta2", o.adam_beta2, 0.0, 0.999999);
  o.adam_weight_decay = a.real("adam-weight-decay", o.adam_weight_decay, 0.0, 1e6);
  o.adam_epsilon = a.real("adam-epsilon", o.adam_epsilon, 1e-30, 1e6);
  o.resolution = static_cast<int>(a.integer("resolution", o.resolution, 8, 16384));
  if (a.has("seed")) o.seed = a.u64("seed");
  o.checkpointing_steps = a.integer("checkpointing-steps", 0, 0, int64_t(1) << 40);
  o.output_dir = a.str("output-dir");
  o.resume_from_checkpoint = a.str("resume-from-checkpoint");
  o.skip_bad_rows = a.has("skip-bad-rows");
  o.device = a.str("device", o.device);
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.quiet = a.has("quiet");
  const TrainControlNetResult r = train_controlnet(o);
  if (!o.quiet && r.rank == 0)
    std::printf("trained ControlNet: %lld steps, final loss %.6g, %.1f s, %d process%s, %zu rows (%zu skipped) -> %s\n",
                static_cast<long long>(r.steps), r.final_loss, r.seconds, r.world_size, r.world_size == 1 ? "" : "es",
                r.dataset_rows, r.skipped_rows, r.output.c_str());
  return 0;
}
}  // namespace dmx::cli
