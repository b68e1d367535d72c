// dmx::train_controlnet: dataset, data-parallel setup, ControlNet recipe, the shared training loop.
#include "dmx/train_controlnet.h"

#include <ATen/Parallel.h>

#include "core/fs.h"
#include "pipelines/controlnet.h"
#include "pipelines/model_bundle.h"
#include "training/controlnet_init.h"
#include "training/controlnet_train.h"
#include "training/dataset.h"
#include "training/distributed.h"
#include "training/trainer.h"

namespace dmx {

void validate(const TrainControlNetOptions& o) {
  DMX_CHECK_ARG(!o.model.empty(), "--model is required (the base Stable Diffusion model)");
  DMX_CHECK_ARG(!o.data.empty(), "--data is required (a folder with metadata.jsonl and conditioning images)");
  DMX_CHECK_ARG(!o.output.empty(), "--output is required (the folder the ControlNet is written to)");
  DMX_CHECK_ARG(o.steps >= 1, "--steps must be >= 1, got ", o.steps);
  DMX_CHECK_ARG(o.batch_size >= 1, "--batch-size must be >= 1, got ", o.batch_size);
  DMX_CHECK_ARG(o.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be >= 1, got ",
                o.gradient_accumulation_steps);
  DMX_CHECK_ARG(o.learning_rate > 0 && std::isfinite(o.learning_rate), "--learning-rate must be > 0, got ",
                o.learning_rate);
  DMX_CHECK_ARG(o.resolution >= 8 && o.resolution % 8 == 0, "--resolution must be a positive multiple of 8, got ",
                o.resolution);
  DMX_CHECK_ARG(o.checkpointing_steps >= 0, "--checkpointing-steps must be >= 0, got ", o.checkpointing_steps);
  DMX_CHECK_ARG(o.adam_beta1 >= 0 && o.adam_beta1 < 1, "--adam-beta1 must be in [0, 1), got ", o.adam_beta1);
  DMX_CHECK_ARG(o.adam_beta2 >= 0 && o.adam_beta2 < 1, "--adam-beta2 must be in [0, 1), got ", o.adam_beta2);
  DMX_CHECK_ARG(o.adam_weight_decay >= 0, "--adam-weight-decay must be >= 0, got ", o.adam_weight_decay);
  DMX_CHECK_ARG(o.adam_epsilon > 0, "--adam-epsilon must be > 0, got ", o.adam_epsilon);
  DMX_CHECK_ARG(o.lr_warmup_steps >= 0, "--lr-warmup-steps must be >= 0, got ", o.lr_warmup_steps);
  DMX_CHECK_ARG(!path_exists(o.output) || is_directory(o.output), "--output must be a folder, got the file '",
                o.output, "'");
  DMX_CHECK_ARG(path_exists(o.model), "--model: path not found: ", o.model);
  if (!o.controlnet.empty()) DMX_CHECK_ARG(path_exists(o.controlnet), "--controlnet: path not found: ", o.controlnet);
  training::parse_lr_schedule(o.lr_scheduler);
}

TrainControlNetResult train_controlnet(const TrainControlNetOptions& o) {
  validate(o);
  if (o.threads > 0) at::set_num_threads(o.threads);
  // 1. Ranks (torchrun variables; a single process without them).
  const training::DistributedEnv env = training::DistributedEnv::from_environment();
  // 2. Data, checked before anything heavy is loaded.
  training::DatasetOptions d;
  d.dir = o.data;
  d.resolution = o.resolution;
  d.center_crop = true;  // train_controlnet.py: Resize + CenterCrop, no flip
  d.random_flip = false;
  d.require_captions = true;
  d.require_conditioning = true;
  d.bad_rows = o.skip_bad_rows ? training::BadRows::Skip : training::BadRows::Reject;
  auto ds = std::make_shared<training::ImageCaptionDataset>(d);
  if (!o.quiet && env.rank == 0)
    for (const std::string& s : ds->skipped()) std::fprintf(stderr, "warning: --data: skipped %s\n", s.c_str());
  auto dist = training::Distributed::create(env, o.device);
  // 3. Models: the frozen base, the ControlNet to train.
  pipelines::LoadOptions lo;
  lo.device = o.device;
  auto models = pipelines::load_stable_diffusion(o.model, lo);
  models::ControlNetModel cn{nullptr};
  if (!o.controlnet.empty()) {
    cn = pipelines::load_controlnet(o.controlnet, lo);
  } else {
    torch::manual_seed(o.seed);  // the hint encoder's fresh convolutions (rank 0's are broadcast anyway)
    cn = training::controlnet_from_unet(models->unet);
  }
  auto recipe = std::make_shared<training::ControlNetRecipe>(models, cn);
  // 4. The loop.
  training::TrainConfig cfg;
  cfg.output = o.output;
  cfg.output_dir = o.output_dir;
  cfg.max_train_steps = o.steps;
  cfg.train_batch_size = o.batch_size;
  cfg.gradient_accumulation_steps = o.gradient_accumulation_steps;
  cfg.seed = o.seed;
  cfg.learning_rate = o.learning_rate;
  cfg.lr_scheduler = training::parse_lr_schedule(o.lr_scheduler);
  cfg.lr_warmup_steps = o.lr_warmup_steps;
  cfg.max_grad_norm = o.max_grad_norm;
  cfg.adam_beta1 = o.adam_beta1;
  cfg.adam_beta2 = o.adam_beta2;
  cfg.adam_weight_decay = o.adam_weight_decay;
  cfg.adam_epsilon = o.adam_epsilon;
  cfg.checkpointing_steps = o.checkpointing_steps;
  cfg.resume_from_checkpoint = o.resume_from_checkpoint;
  cfg.quiet = o.quiet || env.rank != 0;
  auto source = std::make_shared<training::DatasetBatchSource>(ds, o.batch_size, env.rank, env.world_size, o.seed);
  training::Trainer trainer(cfg, recipe, source, dist);
  const training::TrainResult r = trainer.run();
  TrainControlNetResult out;
  out.steps = r.steps;
  out.final_loss = r.history.empty() ? 0.0 : r.history.back().loss;
  out.seconds = r.seconds;
  out.world_size = env.world_size;
  out.rank = env.rank;
  out.dataset_rows = ds->size();
  out.skipped_rows = ds->skipped().size();
  out.output = o.output;
  return out;
}
}  // namespace dmx
