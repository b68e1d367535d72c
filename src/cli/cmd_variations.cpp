// dmx variations: image variations with a Stable unCLIP folder (docs/unclip.md).
#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/dmx.h"
#include "dmx/unclip.h"

namespace dmx::cli {

int cmd_variations(int argc, char** argv) {
  std::string schedulers;
  for (const auto& n : scheduler_names()) schedulers += (schedulers.empty() ? "" : "|") + n;
  Args a("variations", {
      {"model", "DIR", "a diffusers StableUnCLIPImg2ImgPipeline folder (feature_extractor + image_encoder) (required)"},
      {"image", "IMG", "the picture to make variations of, PNG or JPEG, any size (required)"},
      {"output", "OUT.png", "output PNG; with --num-images N: OUT-0.png ... (required)"},
      {"prompt", "TEXT", "text to steer the variations (default: empty, as diffusers)"},
      {"negative-prompt", "TEXT", "what to steer away from (default: empty)"},
      {"noise-level", "N", "noise added to the image embedding, in [0, T-1] of its scheduler (default 0)"},
      {"num-images", "N", "variations to make (default 1)"},
      {"width", "W", "image width, a multiple of 8 (default: the model's size)"},
      {"height", "H", "image height, a multiple of 8 (default: the model's size)"},
      {"steps", "N", "denoising steps (default 20, as diffusers)"},
      {"guidance-scale", "G", "classifier-free guidance scale; <= 1 disables guidance (default 10, as diffusers)"},
      {"scheduler", "NAME", schedulers + " (default: the model's)"},
      {"eta", "E", "DDIM eta in [0, 1] (default 0)"},
      {"seed", "N", "random seed; same seed = same image as diffusers (default: random)"},
      {"save-latents", "F.safetensors", "write the final latents (tensor 'latents')"},
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
  VariationsOptions o;
  DMX_CHECK_ARG(a.has("model"), "--model is required (a StableUnCLIPImg2ImgPipeline folder)");
  DMX_CHECK_ARG(a.has("image"), "--image is required (the picture to make variations of)");
  DMX_CHECK_ARG(a.has("output"), "--output is required (a .png path)");
  o.model = a.str("model");
  o.image = a.str("image");
  o.output = a.str("output");
  o.prompt = a.str("prompt");
  o.negative_prompt = a.str("negative-prompt");
  o.noise_level = static_cast<int>(a.integer("noise-level", o.noise_level, -1000000, 1000000));
  o.num_images = static_cast<int>(a.integer("num-images", o.num_images, 1, 64));
  o.width = static_cast<int>(a.integer("width", o.width, 8, 1 << 20));
  o.height = static_cast<int>(a.integer("height", o.height, 8, 1 << 20));
  o.steps = static_cast<int>(a.integer("steps", o.steps, 1, 1000));
  o.guidance_scale = a.real("guidance-scale", o.guidance_scale, 0, 100);
  o.scheduler = a.str("scheduler");
  o.eta = a.real("eta", o.eta, 0.0, 1.0);
  if (a.has("seed")) o.seed = a.u64("seed");
  o.save_latents = a.str("save-latents");
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.dtype = a.str("dtype", o.dtype);
  o.device = a.str("device", o.device);
  o.progress = !a.has("quiet");
  o.verbose = a.has("verbose");
  o.overwrite = a.has("overwrite");
  DMX_CHECK_ARG(!(a.has("quiet") && o.verbose), "--quiet and --verbose cannot be used together");
  const VariationsResult r = variations(o);
  if (o.progress) {
    for (const auto& p : r.images) std::fprintf(stderr, "wrote %s\n", p.c_str());
    std::fprintf(stderr, "seed %llu, %.2f s\n", static_cast<unsigned long long>(r.seed), r.seconds);
  }
  return 0;
}
}  // namespace dmx::cli
