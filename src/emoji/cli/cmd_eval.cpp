// `dmx eval`: scores of a text-to-image emoji model measured with the emoji classifier (docs/evaluation.md),
// and the editing metrics on image files (--mask-iou, --background-error, --edge-f1).
#include <cmath>
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/eval.h"
#include "dmx/scenes.h"

namespace dmx::cli {
namespace {
// `dmx eval --layouts DIR`: the layout measures (docs/layouts.md), from the eval options that apply.
int eval_layouts(const Args& a, EvalOptions& o) {
  for (const char* other :
       {"prompts", "controlnet", "adapter", "lora", "hypernetwork", "dreambooth", "data", "variations"})
    DMX_CHECK_ARG(!a.has(other), "--", other, " does not apply to --layouts");
  apply_options(a, target(kEval, o));
  LayoutEvalOptions l;
  l.layouts = o.layouts;
  l.model = o.model;
  l.method = o.layout_method;
  l.classifier = o.classifier;
  if (!o.clip.empty()) l.clip = o.clip;  // the global CLIP similarity's towers (default models/emoji-clip)
  l.steps = o.steps;
  l.guidance_scale = o.guidance_scale;
  l.layout_guidance_scale = o.layout_guidance_scale;
  l.scene_guidance = o.scene_guidance;
  l.scheduler = o.scheduler;
  l.seed = o.seed;
  l.limit = o.limit;
  l.threads = o.threads;
  l.out_dir = o.out_dir;
  l.progress = o.progress;
  const LayoutEvalResult r = evaluate_layouts(l);
  if (a.has("json")) {
    std::printf("%s\n", r.to_json().c_str());
    return 0;
  }
  std::printf("method                %s\n", r.method.c_str());
  std::printf("canvases, regions     %d, %d\n", r.canvases, r.regions);
  std::printf("region top-1 / top-5  %.4f / %.4f\n", r.top1, r.top5);
  std::printf("region IoU            %.4f (layout IoU %.4f)\n", r.region_iou, r.layout_iou);
  std::printf("frechet (vs real)     %.4f\n", r.frechet);
  if (r.clip_similarity > -2) std::printf("CLIP similarity       %.4f\n", r.clip_similarity);
  std::printf("seconds per picture   %.3f\n", r.seconds_per_image);
  std::printf("seconds               %.1f\n", r.seconds);
  return 0;
}

// `dmx eval --clip DIR`: zero-shot classification and retrieval of a CLIP folder on the emoji of --data.
int eval_clip(const Args& a, EvalOptions& o) {
  for (const char* other :
       {"model", "prompts", "controlnet", "adapter", "lora", "hypernetwork", "dreambooth", "layouts", "layout-method",
        "steps", "guidance-scale", "scheduler", "limit", "out", "variations"})
    DMX_CHECK_ARG(!a.has(other), "--", other, " does not apply to --clip");
  apply_options(a, target(kEval, o));
  const ClipEvalResult r = evaluate_clip(o);
  if (a.has("json")) {
    std::printf("%s\n", r.to_json().c_str());
    return 0;
  }
  std::printf("logit scale           %.4f (temperature 1/%.2f)\n", r.logit_scale, std::exp(r.logit_scale));
  for (const auto& s : r.styles) {
    std::printf("%s: %d held-out concepts, %d train concepts\n", s.style.c_str(), s.heldout, s.train);
    std::printf("  zero-shot top-1 / top-5, among held-out names  %.4f / %.4f\n", s.zero_shot_top1, s.zero_shot_top5);
    std::printf("  zero-shot top-1 / top-5, among every name      %.4f / %.4f\n", s.zero_shot_all_top1,
                s.zero_shot_all_top5);
    std::printf("  held-out image->text R@1 / R@5  %.4f / %.4f, text->image R@1 / R@5  %.4f / %.4f\n", s.heldout_i2t_r1,
                s.heldout_i2t_r5, s.heldout_t2i_r1, s.heldout_t2i_r5);
    std::printf("  train    image->text R@1 / R@5  %.4f / %.4f, text->image R@1 / R@5  %.4f / %.4f\n", s.train_i2t_r1,
                s.train_i2t_r5, s.train_t2i_r1, s.train_t2i_r5);
  }
  std::printf("seconds               %.1f\n", r.seconds);
  return 0;
}

// `dmx eval --prior DIR`: a diffusion prior's sampled image embeddings against the true ones (docs/unclip.md).
int eval_prior(const Args& a, EvalOptions& o) {
  for (const char* other : {"model", "prompts", "controlnet", "adapter", "lora", "hypernetwork", "dreambooth",
                            "layouts", "layout-method", "scheduler", "limit", "out"})
    DMX_CHECK_ARG(!a.has(other), "--", other, " does not apply to --prior");
  apply_options(a, target(kEval, o));
  PriorEvalOptions p;
  p.prior = a.str("prior");
  p.clip = o.clip;
  p.data = o.data;
  if (a.has("steps")) p.prior_steps = o.steps;
  if (a.has("guidance-scale")) p.prior_guidance_scale = o.guidance_scale;
  p.seed = o.seed;
  p.threads = o.threads;
  p.progress = o.progress;
  const PriorEvalResult r = evaluate_prior(p);
  if (a.has("json")) {
    std::printf("%s\n", r.to_json().c_str());
    return 0;
  }
  std::printf(
      "prior steps %d, guidance %.2f; cosine to the true image embedding and top-1 / top-5 among the split's\n"
      "pictures: sampled (guided), sampled (unguided), the text embedding itself\n",
      r.prior_steps, r.prior_guidance_scale);
  for (const auto& s : r.splits)
    std::printf("%-8s %-8s n %4d  cos %.4f / %.4f / %.4f   top-1 %.3f / %.3f / %.3f   top-5 %.3f / %.3f / %.3f\n",
                s.style.c_str(), s.split.c_str(), s.n, s.cos_sampled, s.cos_unguided, s.cos_text, s.top1_sampled,
                s.top1_unguided, s.top1_text, s.top5_sampled, s.top5_unguided, s.top5_text);
  for (const auto& s : r.splits)
    std::printf("%-8s %-8s mean norm: true %.3f, sampled %.3f, text %.3f\n", s.style.c_str(), s.split.c_str(),
                s.norm_true, s.norm_sampled, s.norm_text);
  std::printf("seconds               %.1f\n", r.seconds);
  return 0;
}
}  // namespace

int cmd_eval(int argc, char** argv) {
  EvalOptions o;
  const std::optional<Args> parsed = parse_args(kEval, argc, argv, target(kEval, o));
  if (!parsed) return 0;  // --help
  const Args& a = *parsed;
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
    return print_metric("background_error",
                        background_error(a.str("background-error"), a.str("reference"), a.str("mask")));
  }
  DMX_CHECK_ARG(!a.has("reference") && !a.has("mask"),
                "--reference/--mask apply to --mask-iou, --background-error, --edge-f1");
  if (a.has("prior")) return eval_prior(a, o);
  if (a.has("layouts")) return eval_layouts(a, o);  // --clip there names the CLIP of the global similarity
  if (a.has("clip")) return eval_clip(a, o);
  DMX_CHECK_ARG(!a.has("layout-method"), "--layout-method applies to --layouts DIR");
  DMX_CHECK_ARG(a.has("model"), "--model is required (a diffusers folder)");
  apply_options(a, target(kEval, o));
  const EvalResult r = evaluate(o);
  if (json) {
    std::printf("%s\n", r.to_json().c_str());
    return 0;
  }
  std::printf("prompts scored        %d%s\n", r.n, r.through_prior ? " (text -> prior -> decoder)" : "");
  std::printf("top-1 accuracy        %.4f\n", r.top1);
  std::printf("top-5 accuracy        %.4f\n", r.top5);
  std::printf("frechet (gen vs real) %.4f\n", r.frechet);
  std::printf("frechet (real, real)  %.4f  (ratio %.2f)\n", r.frechet_real,
              r.frechet_real > 0 ? r.frechet / r.frechet_real : 0.0);
  std::printf("classified twitter    %.4f\n", r.twitter_fraction);
  if (r.controlnet_n > 0)
    std::printf(
        "edge F1 (%d prompts)  %.4f with ControlNet, %.4f without; empty prompts: %.4f with, %.4f without "
        "(tolerance %d px)\n",
        r.controlnet_n, r.edge_f1, r.edge_f1_without, r.edge_f1_empty, r.edge_f1_empty_without, r.edge_tolerance);
  if (r.adapter_n > 0)
    std::printf(
        "edge F1 (%d prompts)  %.4f with the T2I-Adapter, %.4f without; empty prompts: %.4f with, %.4f without "
        "(tolerance %d px)\n",
        r.adapter_n, r.adapter_edge_f1, r.edge_f1_without, r.adapter_edge_f1_empty, r.edge_f1_empty_without,
        r.edge_tolerance);
  std::printf("seconds per picture   %.3f base", r.seconds_per_image);
  if (r.controlnet_n > 0) std::printf(", %.3f with the ControlNet", r.controlnet_seconds_per_image);
  if (r.adapter_n > 0) std::printf(", %.3f with the T2I-Adapter", r.adapter_seconds_per_image);
  std::printf("\n");
  if (r.lora_n > 0)
    std::printf("LoRA style accuracy   %.4f with the LoRA, %.4f without (%d prompts)\n", r.lora_style_accuracy,
                r.lora_style_accuracy_without, r.lora_n);
  if (r.hypernetwork_n > 0)
    std::printf("hypernetwork style accuracy %.4f with the hypernetwork, %.4f without (%d prompts)\n",
                r.hypernetwork_style_accuracy, r.hypernetwork_style_accuracy_without, r.hypernetwork_n);
  if (r.dreambooth_n > 0)
    std::printf(
        "DreamBooth similarity %.4f with, %.4f without; recognised (top-5) %.4f with, %.4f without (%d images)\n",
        r.dreambooth_similarity, r.dreambooth_similarity_without, r.dreambooth_top5, r.dreambooth_top5_without,
        r.dreambooth_n);
  if (r.variations_n > 0) {
    std::printf("variations top-1/top-5 %.4f / %.4f of %d train emoji, %.4f / %.4f of %d held-out\n", r.variations_top1,
                r.variations_top5, r.variations_n, r.variations_heldout_top1, r.variations_heldout_top5,
                r.variations_heldout_n);
    std::printf("variations SSIM       %.4f pairwise (lower = more diverse), %.4f to the source\n",
                r.variations_pairwise_ssim, r.variations_source_ssim);
  }
  std::printf("seconds               %.1f\n", r.seconds);
  return 0;
}
}  // namespace dmx::cli
