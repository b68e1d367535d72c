// `dmx eval`: scores of a text-to-image emoji model measured with the emoji classifier (docs/evaluation.md),
// and the editing metrics on image files (--mask-iou, --background-error, --edge-f1).
#include <cstdio>
#include <string>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/eval.h"

namespace dmx::cli {

int cmd_eval(int argc, char** argv) {
  Args a("eval", {
      {"model", "DIR", "diffusers folder of the text-to-image model (required unless a file metric is asked)"},
      {"prompts", "FILE", "one prompt per line, each starting with a lower-cased emoji name (default: built-in 300)"},
      {"json", "", "print one JSON object on one line"},
      {"classifier", "DIR", "emoji classifier folder (default models/emoji-classifier)"},
      {"data", "DIR", "`dmx data emoji` folder (default $DMX_EMOJI_DATA, ~/.cache/dmx/emoji-data, /tmp/emoji_ds)"},
      {"steps", "N", "denoising steps (default 25)"},
      {"guidance-scale", "G", "classifier-free guidance scale (default 3)"},
      {"scheduler", "NAME", "a sampler of dmx generate --scheduler (default: the model's)"},
      {"seed", "N", "prompt i uses seed + i (default 0)"},
      {"limit", "N", "score only the first N prompts"},
      {"threads", "N", "CPU threads (default: all cores)"},
      {"out", "DIR", "write the generated images and grids here"},
      {"controlnet", "DIR", "also score this Canny ControlNet: edge F1 with and without it"},
      {"lora", "FILE", "also score this style LoRA: share of images classified twitter, with and without it"},
      {"lora-scale", "S", "scale of --lora (default 1)"},
      {"aux-prompts", "N", "prompts used for --controlnet and --lora: the first N (default 50)"},
      {"dreambooth", "FILE", "also score this DreamBooth LoRA: subject similarity with and without it"},
      {"dreambooth-prompt", "TEXT", "prompt with the identifier, e.g. 'sks emoji'"},
      {"dreambooth-concept", "NAME", "the emoji name of the subject (its real image is the reference)"},
      {"dreambooth-images", "N", "images generated with and without the DreamBooth LoRA (default 8)"},
      {"mask-iou", "MASK", "print the IoU of MASK and --reference MASK (white = inside), then exit"},
      {"background-error", "IMAGE", "print the mean |IMAGE - --reference| outside --mask (in [0, 1]), then exit"},
      {"edge-f1", "IMAGE", "print the edge F1 of Canny(IMAGE) against the edge map --reference, then exit"},
      {"reference", "FILE", "second file of --mask-iou, --background-error, --edge-f1"},
      {"mask", "MASK", "mask of --background-error (white = edited region, left out)"},
      {"quiet", "", "no progress output"},
      {"verbose", "", "stack traces"},
      {"help", "", "show this help"},
  });
  a.parse(argc, argv, 2);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  const bool json = a.has("json");
  auto print_metric = [&](const char* name, double v) {
    if (json)
      std::printf("{\"%s\": %.9g}\n", name, v);
    else
      std::printf("%s %.6f\n", name, v);
    return 0;
  };
  const int file_metrics = a.has("mask-iou") + a.has("background-error") + a.has("edge-f1");
  DMX_CHECK_ARG(file_metrics <= 1, "give one of --mask-iou, --background-error, --edge-f1 at a time");
  if (file_metrics == 1) {
    DMX_CHECK_ARG(a.has("reference"), "--mask-iou/--background-error/--edge-f1 need --reference FILE");
    DMX_CHECK_ARG(!a.has("model"), "--model does not apply to --mask-iou/--background-error/--edge-f1");
    if (a.has("mask-iou")) return print_metric("mask_iou", mask_iou(a.str("mask-iou"), a.str("reference")));
    if (a.has("edge-f1")) return print_metric("edge_f1", edge_f1_files(a.str("edge-f1"), a.str("reference")));
    DMX_CHECK_ARG(a.has("mask"), "--background-error needs --mask MASK");
    return print_metric("background_error", background_error(a.str("background-error"), a.str("reference"), a.str("mask")));
  }
  DMX_CHECK_ARG(!a.has("reference") && !a.has("mask"), "--reference/--mask apply to --mask-iou, --background-error, --edge-f1");
  DMX_CHECK_ARG(a.has("model"), "--model is required (a diffusers folder)");
  EvalOptions o;
  o.model = a.str("model");
  o.prompts_file = a.str("prompts");
  o.classifier = a.str("classifier", o.classifier);
  o.data = a.str("data");
  o.steps = static_cast<int>(a.integer("steps", o.steps, 1, 1000));
  o.guidance_scale = a.real("guidance-scale", o.guidance_scale, 0, 100);
  o.scheduler = a.str("scheduler");
  if (a.has("seed")) o.seed = a.u64("seed");
  o.limit = static_cast<int>(a.integer("limit", 0, 1, 1 << 20));
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.out_dir = a.str("out");
  o.controlnet = a.str("controlnet");
  o.lora = a.str("lora");
  o.lora_scale = a.real("lora-scale", o.lora_scale, -100, 100);
  o.aux_prompts = static_cast<int>(a.integer("aux-prompts", o.aux_prompts, 1, 1 << 20));
  o.dreambooth = a.str("dreambooth");
  o.dreambooth_prompt = a.str("dreambooth-prompt");
  o.dreambooth_concept = a.str("dreambooth-concept");
  o.dreambooth_images = static_cast<int>(a.integer("dreambooth-images", o.dreambooth_images, 2, 10000));
  o.progress = !a.has("quiet");
  const EvalResult r = evaluate(o);
  if (json) {
    std::printf("%s\n", r.to_json().c_str());
    return 0;
  }
  std::printf("prompts scored        %d\n", r.n);
  std::printf("top-1 accuracy        %.4f\n", r.top1);
  std::printf("top-5 accuracy        %.4f\n", r.top5);
  std::printf("frechet (gen vs real) %.4f\n", r.frechet);
  std::printf("frechet (real, real)  %.4f  (ratio %.2f)\n", r.frechet_real,
              r.frechet_real > 0 ? r.frechet / r.frechet_real : 0.0);
  std::printf("classified twitter    %.4f\n", r.twitter_fraction);
  if (r.controlnet_n > 0)
    std::printf("edge F1 (%d prompts)  %.4f with ControlNet, %.4f without; empty prompts: %.4f with, %.4f without "
                "(tolerance %d px)\n", r.controlnet_n, r.edge_f1, r.edge_f1_without, r.edge_f1_empty,
                r.edge_f1_empty_without, r.edge_tolerance);
  if (r.lora_n > 0)
    std::printf("LoRA style accuracy   %.4f with the LoRA, %.4f without (%d prompts)\n", r.lora_style_accuracy,
                r.lora_style_accuracy_without, r.lora_n);
  if (r.dreambooth_n > 0)
    std::printf("DreamBooth similarity %.4f with, %.4f without; recognised (top-5) %.4f with, %.4f without (%d images)\n",
                r.dreambooth_similarity, r.dreambooth_similarity_without, r.dreambooth_top5,
                r.dreambooth_top5_without, r.dreambooth_n);
  std::printf("seconds               %.1f\n", r.seconds);
  return 0;
}
}  // namespace dmx::cli
