// dmx upscale: text-guided x4 super-resolution with Stable Diffusion's x4 upscaler (docs/upscale.md).
#include <cstdio>
#include <limits>
#include <string>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/dmx.h"
#include "dmx/upscale.h"

namespace dmx::cli {

int cmd_upscale(int argc, char** argv) {
  std::string samplers;
  for (const auto& n : scheduler_names()) samplers += (samplers.empty() ? "" : "|") + n;
  Args a("upscale", {
      {"model", "DIR", "a diffusers StableDiffusionUpscalePipeline folder (stabilityai/stable-diffusion-x4-upscaler) (required)"},
      {"image", "LOW.png", "the low-resolution picture, PNG or JPEG; the output is 4x its size (required)"},
      {"prompt", "TEXT", "what the picture shows (required)"},
      {"output", "OUT.png", "output PNG; with --num-images N: OUT-0.png ... (required)"},
      {"negative-prompt", "TEXT", "what to steer away from (default: empty)"},
      {"noise-level", "N", "noise added to the picture before upscaling, 0 .. the model's max_noise_level (default 20)"},
      {"steps", "N", "denoising steps (default 75, as diffusers)"},
      {"guidance-scale", "G", "classifier-free guidance (default 9, as diffusers)"},
      {"scheduler", "NAME", samplers + " (default: the folder's own scheduler)"},
      {"eta", "E", "DDIM eta in [0, 1] (default 0)"},
      {"seed", "N", "random seed; draws like diffusers with torch.Generator(seed): picture noise, then latents (default: random)"},
      {"num-images", "N", "pictures to make from the one low-res picture (default 1)"},
      {"save-latents", "F.safetensors", "write the final latents (tensor 'latents')"},
      {"vae-tiling", "MODE", "auto|on|off: decode the output in overlapping tiles (diffusers' enable_vae_tiling); auto = when the whole picture would not fit in memory (default auto)"},
      {"vae-tile-size", "PX", "output pixels per tile (default: the VAE's sample_size)"},
      {"memory-limit", "MIB", "memory the run may plan for, MiB (default: the machine's physical memory)"},
      {"tokenizer", "DIR", "folder with vocab.json and merges.txt"},
      {"threads", "N", "CPU threads (default: all cores)"},
      {"dtype", "T", "fp32|bf16|fp16 (fp16: CUDA only; default fp32)"},
      {"device", "D", "cpu|cuda (default cpu)"},
      {"from", "IMAGE", "re-run the settings stored in a PNG made by dmx upscale (prompts, steps, sampler, guidance, seed, noise level); flags given override"},
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
  UpscaleOptions o;
  if (a.has("from")) {  // the settings of an earlier run; the picture and the model are given again
    const GenerateOptions g = parse_parameters(read_image_parameters(a.str("from")));
    o.from = a.str("from");
    o.prompt = g.prompt;
    o.negative_prompt = g.negative_prompt;
    o.steps = g.steps;
    o.guidance_scale = g.guidance_scale;
    o.scheduler = g.scheduler;
    o.eta = g.eta;
    o.seed = g.seed;
    o.num_images = g.num_images;
    o.noise_level = g.upscale_noise_level;
  }
  DMX_CHECK_ARG(a.has("model"), "--model is required (a StableDiffusionUpscalePipeline folder)");
  DMX_CHECK_ARG(a.has("image"), "--image is required (the low-resolution picture)");
  DMX_CHECK_ARG(a.has("prompt") || a.has("from"), "--prompt is required (what the picture shows)");
  DMX_CHECK_ARG(a.has("output"), "--output is required (a .png path)");
  o.model = a.str("model");
  o.image = a.str("image");
  o.prompt = a.str("prompt", o.prompt);
  o.output = a.str("output");
  o.negative_prompt = a.str("negative-prompt", o.negative_prompt);
  // The upper bound is the model's max_noise_level, checked against model_index.json before anything loads.
  o.noise_level = static_cast<int>(a.integer("noise-level", o.noise_level, 0, std::numeric_limits<int>::max()));
  o.steps = static_cast<int>(a.integer("steps", o.steps, 1, 1000));
  o.guidance_scale = a.real("guidance-scale", o.guidance_scale, 0, 100);
  o.scheduler = a.str("scheduler", o.scheduler);
  o.eta = a.real("eta", o.eta, 0, 1);
  if (a.has("seed")) o.seed = a.u64("seed");
  o.num_images = static_cast<int>(a.integer("num-images", o.num_images, 1, 64));
  o.save_latents = a.str("save-latents");
  o.vae_tiling = a.str("vae-tiling", o.vae_tiling);
  o.vae_tile_size = static_cast<int>(a.integer("vae-tile-size", 0, 16, 4096));
  o.memory_limit_mb = a.integer("memory-limit", 0, 1, int64_t{1} << 30);
  o.tokenizer_dir = a.str("tokenizer");
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.dtype = a.str("dtype", o.dtype);
  o.device = a.str("device", o.device);
  o.progress = !a.has("quiet");
  o.verbose = a.has("verbose");
  o.overwrite = a.has("overwrite");
  DMX_CHECK_ARG(!(a.has("quiet") && o.verbose), "--quiet and --verbose cannot be used together");
  const UpscaleResult r = upscale(o);
  if (o.progress) {
    for (const auto& p : r.images) std::fprintf(stderr, "wrote %s\n", p.c_str());
    if (!r.latents.empty()) std::fprintf(stderr, "wrote %s\n", r.latents.c_str());
    std::fprintf(stderr, "seed %llu, %dx%d -> %dx%d%s, %.2f s\n", static_cast<unsigned long long>(r.seed),
                 r.low_res_width, r.low_res_height, r.width, r.height, r.tiled ? " (VAE in tiles)" : "", r.seconds);
  }
  return 0;
}
}  // namespace dmx::cli
