// dmx diffedit: DiffEdit editing of a real image (docs/editing-diffedit.md).
#include <cstdio>
#include <limits>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/diffedit.h"

namespace dmx::cli {

int cmd_diffedit(int argc, char** argv) {
  Args a("diffedit", {
      {"model", "PATH", "diffusers folder or single-file checkpoint (.safetensors, or a .ckpt pickle read weights-only) (required)"},
      {"image", "IMG", "the image to edit, PNG or JPEG, sides multiples of 8 (required)"},
      {"source-prompt", "TEXT", "what the image shows (required)"},
      {"target-prompt", "TEXT", "what the edited image should show (required)"},
      {"output", "OUT.png", "edited image (required)"},
      {"mask-output", "MASK.png", "also write the mask, at image size (latent size x VAE factor); white = edited"},
      {"steps", "N", "DDIM steps of the mask, inversion and edit schedules (default 50)"},
      {"encode-ratio", "R", "share of the schedule inverted and re-generated, in (0, 1] (default 0.8)"},
      {"mask-threshold", "T", "mask_thresholding_ratio: clip the difference map at T x its mean, > 0 (default 3)"},
      {"seed", "N", "random seed; draws like diffusers with torch.Generator(seed) through the 3 phases (default: random)"},
      {"save-latents", "F.safetensors", "write the latents after the last edit step (tensor 'latents')"},
      {"negative-prompt", "TEXT", "negative prompt of the mask and the edit (default: none)"},
      {"guidance-scale", "G", "guidance of the mask and the edit (default 7.5)"},
      {"inversion-guidance-scale", "G", "guidance of the inversion (default 7.5 as diffusers' invert; 1: cond. only)"},
      {"num-maps", "N", "num_maps_per_mask: noise maps averaged for the mask (default 10)"},
      {"mask-encode-strength", "S", "noise level of the mask estimate, in (0, 1] (default 0.5)"},
      {"config", "DIR", "diffusers folder supplying configs and tokenizer for a single-file checkpoint"},
      {"tokenizer", "DIR", "folder with vocab.json and merges.txt"},
      {"threads", "N", "CPU threads (default: all cores)"},
      {"dtype", "T", "fp32|bf16|fp16 (fp16: CUDA only; default fp32)"},
      {"device", "D", "cpu|cuda (default cpu)"},
      {"overwrite", "", "replace outputs that already exist (never an input)"},
      {"quiet", "", "no progress output"},
      {"verbose", "", "timings and stack traces"},
      {"help", "", "show this help"},
  });
  a.parse(argc, argv, 2);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  DiffEditOptions o;
  DMX_CHECK_ARG(a.has("model"), "--model is required (a diffusers folder or a single-file .safetensors or .ckpt checkpoint)");
  DMX_CHECK_ARG(a.has("image"), "--image is required (the image to edit)");
  DMX_CHECK_ARG(a.has("source-prompt"), "--source-prompt is required (what the image shows)");
  DMX_CHECK_ARG(a.has("target-prompt"), "--target-prompt is required (what the edited image should show)");
  DMX_CHECK_ARG(a.has("output"), "--output is required (a .png path)");
  o.model = a.str("model");
  o.image = a.str("image");
  o.source_prompt = a.str("source-prompt");
  o.target_prompt = a.str("target-prompt");
  o.output = a.str("output");
  o.mask_output = a.str("mask-output");
  o.save_latents = a.str("save-latents");
  o.negative_prompt = a.str("negative-prompt");
  o.steps = static_cast<int>(a.integer("steps", o.steps, 1, 1000));
  // Open bounds: parsed as any number, then checked with the rule in the message.
  const double any = std::numeric_limits<double>::max();
  o.encode_ratio = a.real("encode-ratio", o.encode_ratio, -any, any);
  DMX_CHECK_ARG(o.encode_ratio > 0 && o.encode_ratio <= 1, "--encode-ratio must be in (0, 1], got ", o.encode_ratio);
  o.mask_threshold = a.real("mask-threshold", o.mask_threshold, -any, any);
  DMX_CHECK_ARG(o.mask_threshold > 0, "--mask-threshold must be > 0, got ", o.mask_threshold);
  if (a.has("seed")) o.seed = a.u64("seed");
  o.guidance_scale = a.real("guidance-scale", o.guidance_scale, 0, 100);
  o.inversion_guidance_scale = a.real("inversion-guidance-scale", o.inversion_guidance_scale, 0, 100);
  o.num_maps = static_cast<int>(a.integer("num-maps", o.num_maps, 1, 1000));
  o.mask_encode_strength = a.real("mask-encode-strength", o.mask_encode_strength, -any, any);
  DMX_CHECK_ARG(o.mask_encode_strength > 0 && o.mask_encode_strength <= 1,
                "--mask-encode-strength must be in (0, 1], got ", o.mask_encode_strength);
  o.config_dir = a.str("config");
  o.tokenizer_dir = a.str("tokenizer");
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.dtype = a.str("dtype", o.dtype);
  o.device = a.str("device", o.device);
  o.progress = !a.has("quiet");
  o.verbose = a.has("verbose");
  o.overwrite = a.has("overwrite");
  DMX_CHECK_ARG(!(a.has("quiet") && o.verbose), "--quiet and --verbose cannot be used together");
  const DiffEditResult r = diffedit(o);
  if (o.progress) {
    for (const std::string& p : {r.image, r.mask, r.latents})
      if (!p.empty()) std::fprintf(stderr, "wrote %s\n", p.c_str());
    std::fprintf(stderr, "seed %llu, mask %.1f%% of the image, %.2f s (mask %.2f s, inversion %.2f s, edit %.2f s)\n",
                 static_cast<unsigned long long>(r.seed), 100.0 * r.mask_fraction, r.seconds, r.mask_seconds,
                 r.invert_seconds, r.edit_seconds);
  }
  return 0;
}
}  // namespace dmx::cli
