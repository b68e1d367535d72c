// `dmx train <recipe>`: LoRA, full fine-tuning and DreamBooth (docs/training.md), and `dmx train bench`.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/train.h"

namespace dmx::cli {

namespace {

const char* kTrainUsage =
    "usage: dmx train <recipe> [options]\n\n"
    "recipes:\n"
    "  lora        LoRA adapters on the UNet (optionally the text encoder); writes a LoRA file\n"
    "  finetune    full fine-tuning of the UNet (optionally the text encoder); writes a diffusers folder\n"
    "  dreambooth  subject-driven fine-tuning with prior preservation, full or LoRA (--lora-rank)\n"
    "  controlnet  a ControlNet initialised from the UNet, base locked; writes a diffusers folder\n"
    "              plus controlnet_original.safetensors (control_model.*)\n"
    "  vae         the autoencoder (encoder and decoder) of a diffusers folder; writes a diffusers folder\n"
    "  classifier  the emoji classifier of `dmx eval` (docs/evaluation.md)\n"
    "  bench       training throughput on random weights (samples/s, peak memory)\n\n"
    "Run 'dmx train <recipe> --help' for the options.\n";

std::vector<OptionSpec> common_specs() {
  return {
      {"model", "PATH", "diffusers folder (or single-file checkpoint for lora) to start from (required)"},
      {"output", "PATH", "lora: FILE.safetensors; finetune / full dreambooth: a diffusers folder (required)"},
      {"output-dir", "DIR", "checkpoints, train_log.jsonl, validation images (default: <output>.train)"},
      {"overwrite", "", "replace an existing --output; start over in an --output-dir holding an earlier run"},
      {"config", "DIR", "diffusers folder supplying configs and tokenizer for a single-file --model"},
      {"tokenizer", "DIR", "folder with vocab.json and merges.txt"},
      {"resolution", "PX", "training resolution, a multiple of 8 (default 512)"},
      {"random-crop", "", "random instead of center crops"},
      {"random-flip", "", "random horizontal flips"},
      {"caption-column", "NAME", "metadata.jsonl caption field (default text)"},
      {"image-column", "NAME", "metadata.jsonl image field (default file_name)"},
      {"skip-bad-rows", "", "report bad dataset rows and leave them out instead of failing"},
      {"steps", "N", "optimizer steps (default 100)"},
      {"batch-size", "B", "examples per process and micro-step (default 1)"},
      {"gradient-accumulation-steps", "N", "micro-steps per optimizer step (default 1)"},
      {"learning-rate", "LR", "AdamW learning rate (default: lora 1e-4, finetune 1e-4, dreambooth 5e-6 / LoRA 5e-4)"},
      {"lr-scheduler", "NAME", "constant|constant_with_warmup|linear|cosine (default constant)"},
      {"lr-warmup-steps", "N", "warm-up steps (default 0)"},
      {"adam-beta1", "B", "AdamW beta1 (default 0.9)"},
      {"adam-beta2", "B", "AdamW beta2 (default 0.999)"},
      {"adam-weight-decay", "W", "AdamW weight decay (default 1e-2)"},
      {"adam-epsilon", "E", "AdamW epsilon (default 1e-8)"},
      {"max-grad-norm", "N", "gradient clipping norm; <= 0 disables (default 1.0)"},
      {"seed", "N", "seed of every random draw (default 0)"},
      {"prediction-type", "T", "epsilon|v_prediction (default: the model's scheduler)"},
      {"snr-gamma", "G", "min-SNR-gamma loss weighting, e.g. 5 (default off)"},
      {"noise-offset", "X", "noise offset (default 0)"},
      {"proportion-empty-prompts", "P", "share of captions replaced by \"\" (for guidance; default 0)"},
      {"use-ema", "", "keep an EMA of the trained weights and save it"},
      {"ema-decay", "D", "EMA decay (default 0.9999)"},
      {"mixed-precision", "P",
       "no|bf16: frozen parts in bf16, trained weights float32 masters (finetune: the UNet runs under bf16 autocast) "
       "(default no)"},
      {"gradient-checkpointing", "", "recompute UNet block activations in backward (less memory)"},
      {"cache-latents", "", "encode each image with the VAE once (needs center crop, no --random-flip)"},
      {"checkpoint-every", "N", "write a checkpoint every N steps (default: only at the end)"},
      {"checkpoints-total-limit", "N", "keep only the newest N checkpoints"},
      {"resume", "DIR", "continue from a checkpoint folder, or the newest checkpoint of an output dir"},
      {"validation-steps", "N", "write validation images every N steps"},
      {"validation-prompt", "TEXT", "prompt of the validation images"},
      {"num-validation-images", "N", "validation images per run (default 1)"},
      {"threads", "N", "CPU threads (default: all cores)"},
      {"quiet", "", "no progress bar"},
      {"verbose", "", "stack traces"},
      {"help", "", "show this help"},
  };
}

void add(std::vector<OptionSpec>& v, std::vector<OptionSpec> more) { v.insert(v.end(), more.begin(), more.end()); }

std::vector<OptionSpec> lora_specs(bool dreambooth) {
  std::vector<OptionSpec> v = {
      {"save-format", "F", "diffusers|peft|kohya (default diffusers)"},
      {"alpha", "A", "LoRA alpha; scale = alpha / rank (default: rank)"},
      {"lora-targets", "T",
       "attention (to_q/k/v/out.0) | all (every linear and conv of the blocks) (default attention)"},
      {"lora-init", "I", "kaiming (peft / kohya default) | gaussian (default kaiming)"},
      {"train-text-encoder", "", "also train the text encoder (LoRA on q/k/v/out_proj, or fully)"},
  };
  if (!dreambooth) v.push_back({"rank", "R", "LoRA rank (default 4)"});
  return v;
}

int run_bench(int argc, char** argv) {
  Args a("train bench", {
                            {"preset", "NAME", "tiny|sd15|sd21 architecture with random weights (default tiny)"},
                            {"resolution", "PX", "image side (default 256)"},
                            {"batch-size", "B", "examples per step (default 1)"},
                            {"steps", "N", "timed steps after one warm-up step (default 3)"},
                            {"rank", "R", "LoRA rank (default 4)"},
                            {"dtype", "T", "fp32|bf16 (default fp32)"},
                            {"gradient-checkpointing", "", "recompute UNet block activations in backward"},
                            {"threads", "N", "CPU threads (default: all cores)"},
                            {"verbose", "", "stack traces"},
                            {"help", "", "show this help"},
                        });
  a.parse(argc, argv, 3);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  TrainBenchOptions o;
  o.preset = a.str("preset", o.preset);
  o.resolution = static_cast<int>(a.integer("resolution", o.resolution, 8, 4096));
  o.batch_size = static_cast<int>(a.integer("batch-size", o.batch_size, 1, 4096));
  o.steps = static_cast<int>(a.integer("steps", o.steps, 1, 100000));
  o.rank = static_cast<int>(a.integer("rank", o.rank, 1, 4096));
  o.dtype = a.str("dtype", o.dtype);
  DMX_CHECK_ARG(o.dtype == "fp32" || o.dtype == "bf16", "--dtype must be fp32 or bf16, got '", o.dtype, "'");
  o.gradient_checkpointing = a.has("gradient-checkpointing");
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  std::printf("%s\n", train_bench_json(train_bench(o)).c_str());
  return 0;
}

}  // namespace

int cmd_train(int argc, char** argv) {
  if (argc < 3 || !std::strcmp(argv[2], "--help") || !std::strcmp(argv[2], "-h")) {
    std::printf("%s", kTrainUsage);
    return argc < 3 ? 2 : 0;
  }
  const std::string recipe = argv[2];
  if (recipe == "classifier") return cmd_train_classifier(argc, argv);  // the emoji classifier (dmx eval)
  if (recipe == "bench") return run_bench(argc, argv);
  DMX_CHECK_ARG(recipe == "lora" || recipe == "finetune" || recipe == "dreambooth" || recipe == "controlnet" ||
                    recipe == "vae",
                "dmx train: recipe must be lora, finetune, dreambooth, controlnet, vae or bench, got '", recipe, "'");
  std::vector<OptionSpec> specs = common_specs();
  if (recipe == "lora") {
    add(specs, {{"data", "DIR", "images with captions: name.png + name.txt, or metadata.jsonl (required)"}});
    add(specs, lora_specs(false));
  } else if (recipe == "controlnet") {
    add(specs,
        {{"data", "DIR", "metadata.jsonl rows {file_name, text, conditioning_image} (required)"},
         {"controlnet", "PATH", "start from this ControlNet instead of a copy of the UNet encoder"},
         {"conditioning-column", "NAME", "metadata.jsonl conditioning image field (default conditioning_image)"},
         {"validation-image", "PATH",
          "conditioning image of the validation images (default: the first row's, at --resolution)"}});
  } else if (recipe == "vae") {
    add(specs, {{"data", "DIR", "images (captions are not used): metadata.jsonl or a folder of images (required)"},
                {"kl-weight", "W", "weight of the KL term per pixel value (default 1e-6)"},
                {"mse-weight", "W", "weight of an added squared-error term (default 0)"},
                {"vae-crop", "PX", "train on random crops of this side (default 0: whole images)"}});
  } else if (recipe == "finetune") {
    add(specs, {{"data", "DIR", "images with captions: name.png + name.txt, or metadata.jsonl (required)"},
                {"train-text-encoder", "", "also train the text encoder"}});
  } else {
    add(specs, {{"instance-data", "DIR", "images of the subject (required)"},
                {"instance-prompt", "TEXT", "prompt with the identifier, e.g. \"a photo of sks dog\" (required)"},
                {"class-data", "DIR", "class images for prior preservation (generated when short)"},
                {"class-prompt", "TEXT", "prompt of the class images, e.g. \"a photo of a dog\""},
                {"prior-loss-weight", "W", "weight of the prior-preservation loss (default 1.0)"},
                {"num-class-images", "N", "class images wanted in --class-data (default 100)"},
                {"class-inference-steps", "N", "denoising steps of generated class images (default 50)"},
                {"lora-rank", "R", "train LoRA adapters of this rank instead of the full UNet (default 0: full)"}});
    add(specs, lora_specs(true));
  }
  Args a("train " + recipe, specs);
  a.parse(argc, argv, 3);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  TrainOptions o;
  o.recipe = recipe;
  o.model = a.str("model");
  o.output = a.str("output");
  o.output_dir = a.str("output-dir");
  o.overwrite = a.has("overwrite");
  o.config_dir = a.str("config");
  o.tokenizer_dir = a.str("tokenizer");
  o.data = a.str("data");
  o.skip_bad_rows = a.has("skip-bad-rows");
  o.controlnet = a.str("controlnet");
  o.conditioning_column = a.str("conditioning-column", o.conditioning_column);
  o.validation_image = a.str("validation-image");
  o.resolution = static_cast<int>(a.integer("resolution", o.resolution, 8, 4096));
  o.center_crop = !a.has("random-crop");
  o.random_flip = a.has("random-flip");
  o.caption_column = a.str("caption-column", o.caption_column);
  o.image_column = a.str("image-column", o.image_column);
  o.steps = a.integer("steps", o.steps, INT64_MIN, INT64_MAX);
  o.batch_size = static_cast<int>(a.integer("batch-size", o.batch_size, INT32_MIN, INT32_MAX));
  o.gradient_accumulation_steps =
      static_cast<int>(a.integer("gradient-accumulation-steps", o.gradient_accumulation_steps, 1, 1 << 20));
  o.learning_rate = a.real("learning-rate", o.learning_rate, 0, 1e6);
  o.lr_scheduler = a.str("lr-scheduler", o.lr_scheduler);
  o.lr_warmup_steps = a.integer("lr-warmup-steps", o.lr_warmup_steps, 0, INT64_MAX);
  o.adam_beta1 = a.real("adam-beta1", o.adam_beta1, 0, 1);
  o.adam_beta2 = a.real("adam-beta2", o.adam_beta2, 0, 1);
  o.adam_weight_decay = a.real("adam-weight-decay", o.adam_weight_decay, 0, 1e6);
  o.adam_epsilon = a.real("adam-epsilon", o.adam_epsilon, 0, 1);
  o.max_grad_norm = a.real("max-grad-norm", o.max_grad_norm, -1e30, 1e30);
  if (a.has("seed")) o.seed = a.u64("seed");
  o.prediction_type = a.str("prediction-type");
  o.snr_gamma = a.real("snr-gamma", o.snr_gamma, 0, 1e6);
  o.noise_offset = a.real("noise-offset", o.noise_offset, 0, 1e3);
  o.proportion_empty_prompts = a.real("proportion-empty-prompts", o.proportion_empty_prompts, 0, 1);
  o.kl_weight = a.real("kl-weight", o.kl_weight, 0, 1e6);
  o.mse_weight = a.real("mse-weight", o.mse_weight, 0, 1e6);
  o.vae_crop = static_cast<int>(a.integer("vae-crop", o.vae_crop, 0, 4096));
  o.use_ema = a.has("use-ema");
  o.ema_decay = a.real("ema-decay", o.ema_decay, 0, 1);
  o.mixed_precision = a.str("mixed-precision", o.mixed_precision);
  o.gradient_checkpointing = a.has("gradient-checkpointing");
  o.cache_latents = a.has("cache-latents");
  o.checkpoint_every = a.integer("checkpoint-every", 0, 0, INT64_MAX);
  o.checkpoints_total_limit = static_cast<int>(a.integer("checkpoints-total-limit", 0, 0, 1 << 20));
  o.resume = a.str("resume");
  o.validation_steps = a.integer("validation-steps", 0, 0, INT64_MAX);
  o.validation_prompt = a.str("validation-prompt");
  o.num_validation_images = static_cast<int>(a.integer("num-validation-images", 1, 1, 64));
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.quiet = a.has("quiet");
  o.save_format = a.str("save-format", o.save_format);
  o.alpha = a.real("alpha", o.alpha, 0, 1e9);
  o.lora_targets = a.str("lora-targets", o.lora_targets);
  o.lora_init = a.str("lora-init", o.lora_init);
  o.train_text_encoder = a.has("train-text-encoder");
  o.rank = static_cast<int>(a.integer("rank", o.rank, INT32_MIN, INT32_MAX));
  o.instance_data = a.str("instance-data");
  o.instance_prompt = a.str("instance-prompt");
  o.class_data = a.str("class-data");
  o.class_prompt = a.str("class-prompt");
  o.prior_loss_weight = a.real("prior-loss-weight", o.prior_loss_weight, 0, 1e6);
  o.num_class_images = static_cast<int>(a.integer("num-class-images", o.num_class_images, 1, 1 << 20));
  o.class_inference_steps = static_cast<int>(a.integer("class-inference-steps", o.class_inference_steps, 1, 10000));
  o.lora_rank = static_cast<int>(a.integer("lora-rank", o.lora_rank, INT32_MIN, INT32_MAX));
  const TrainReport r = train(o);
  if (!r.output.empty() && r.steps == r.first_step)
    std::printf("resumed %s at step %lld, which is --steps: nothing left to train; wrote %s\n", recipe.c_str(),
                static_cast<long long>(r.steps), r.output.c_str());
  else if (!r.output.empty())
    std::printf("trained %s: %lld steps, loss %.4f -> %.4f, %.3f samples/s, peak RSS %.0f MiB; wrote %s\n",
                recipe.c_str(), static_cast<long long>(r.steps), r.first_loss, r.final_loss, r.samples_per_s,
                static_cast<double>(r.peak_rss_bytes) / (1024.0 * 1024.0), r.output.c_str());
  return 0;
}

}  // namespace dmx::cli
