// dmx command-line tool. Sees only the public API (include/dmx).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/dmx.h"

namespace {

bool g_verbose = false;

// OpenMP reads its environment when the runtime loads, before main: set the policy dmx chose
// (passive waiting: spin-waiting between libtorch's and OpenBLAS's thread pools cost up to 50x on
// small models) and re-execute once. A value the user set explicitly is kept.
void ensure_openmp_policy(char** argv) {
  if (std::getenv("DMX_OMP_CONFIGURED")) return;
  setenv("DMX_OMP_CONFIGURED", "1", 1);
  if (std::getenv("OMP_WAIT_POLICY")) return;
  setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
  execv("/proc/self/exe", argv);
  // If re-execution fails, carry on with the inherited policy.
}

const char* kUsage =
    "usage: dmx <command> [options]\n\n"
    "commands:\n"
    "  generate   text-to-image and image-to-image with a Stable Diffusion model (or Stable unCLIP)\n"
    "  info       print the generation parameters stored in a PNG\n"
    "  bench      time text encoding, a denoising step and VAE decoding (random weights)\n"
    "  data       build training folders (dmx data emoji: the emoji set from npm; dmx data tokenizer)\n"
    "  init       a diffusers folder with fresh weights from configs (to train from scratch)\n"
    "  convert    store a model's weights as fp16/bf16/fp32; a .ckpt/.pt/.pth/.bin pickle as .safetensors\n"
    "  p2p        Prompt-to-Prompt editing of a generated or real image\n"
    "  diffedit   edit a real image from a source and a target prompt (DiffEdit)\n"
    "  variations image variations with a Stable unCLIP (StableUnCLIPImg2ImgPipeline) folder\n"
    "  embed      CLIP embeddings of pictures and texts, and their cosine similarities\n"
    "  upscale    x4 super-resolution of a picture with Stable Diffusion's x4 upscaler\n"
    "  train      train LoRA, fine-tune, DreamBooth or ControlNet (dmx train <lora|finetune|dreambooth|controlnet|bench>)\n"
    "  eval       score an emoji model with the emoji classifier (dmx train classifier)\n"
    "  version    print the version\n\n"
    "Run 'dmx <command> --help' for the options of a command.\n";

// "ddim|ddpm|...": the scheduler registry's samplers.
std::string scheduler_choices() {
  std::string s;
  for (const auto& n : dmx::scheduler_names()) s += (s.empty() ? "" : "|") + n;
  return s;
}

int cmd_generate(int argc, char** argv) {
  using dmx::cli::OptionSpec;
  dmx::cli::Args a("generate", {
      {"model", "PATH", "diffusers folder or single-file checkpoint (.safetensors, or a .ckpt pickle read weights-only) (required)"},
      {"prompt", "TEXT", "what to draw (required)"},
      {"output", "OUT.png", "output PNG; with --num-images N: OUT-0.png ... (required)"},
      {"negative-prompt", "TEXT", "what to steer away from (default: empty)"},
      {"width", "W", "image width, a multiple of 8 (default: the model's size)"},
      {"height", "H", "image height, a multiple of 8 (default: the model's size)"},
      {"steps", "N", "denoising steps (default 50)"},
      {"guidance-scale", "G", "classifier-free guidance scale; <= 1 disables guidance (default 7.5)"},
      {"scheduler", "NAME", scheduler_choices() + " (default: the model's)"},
      {"eta", "E", "DDIM eta in [0, 1] (default 0)"},
      {"seed", "N", "random seed, any 64-bit value; same seed = same image as diffusers (default: random)"},
      {"num-images", "N", "images per prompt (default 1)"},
      {"init-image", "IMG", "start from this image (img2img)"},
      {"strength", "S", "img2img: how much to change the image, in [0, 1] (default 0.8; with --mask 1.0)"},
      {"mask", "MASK", "edit only inside this mask of --init-image (8-bit gray/RGB, white = edit): blended latents"},
      {"background", "MODE", "with --mask: latent|pixel|poisson|optimize-latents|finetune-decoder (default latent)"},
      {"blend-start", "F", "with --mask: fraction of steps before blending starts, in [0, 1) (default 0)"},
      {"mask-dilation", "N", "with --mask: progressive mask shrinking from N dilations (default 0)"},
      {"blend-variant", "V", "with --mask: inpaint (diffusers' inpaint) | legacy (InpaintPipelineLegacy)"},
      {"rank", "", "with --mask: write the samples best first by a diffusion-classifier score"},
      {"init-latents", "F.safetensors", "initial noise (tensor 'latents', before init_noise_sigma)"},
      {"save-latents", "F.safetensors", "write the final latents (tensor 'latents')"},
      {"config", "DIR", "diffusers folder supplying configs and tokenizer for a single-file checkpoint"},
      {"tokenizer", "DIR", "folder with vocab.json and merges.txt"},
      {"clip-skip", "N", "skip the last N text-encoder layers (default 0)"},
      {"threads", "N", "CPU threads (default: all cores)"},
      {"dtype", "T", "fp32|bf16|fp16 (fp16: CUDA only; default fp32)"},
      {"device", "D", "cpu|cuda (default cpu)"},
      {"lora", "FILE[:SCALE]", "apply a LoRA (diffusers, PEFT, kohya/A1111, LyCORIS); repeatable; scale default 1", true},
      {"lora-mode", "MODE", "runtime|merged (default merged; both give the same result)"},
      {"lora-dir", "DIR", "folder for <lora:NAME:WEIGHT> tags in the prompt (NAME.safetensors)"},
      {"lora-allow-unmatched", "", "skip LoRA keys that match no layer (counted warning) instead of failing"},
      {"controlnet", "PATH", "ControlNet: diffusers folder or control_model.* .safetensors (repeatable)", true},
      {"control-image", "IMG", "conditioning map for the n-th --controlnet (repeatable, one per net)", true},
      {"control-scale", "X", "conditioning scale per net (repeatable; default 1.0)", true},
      {"control-start", "A", "fraction of steps before which the net is off (repeatable; default 0)", true},
      {"control-end", "B", "fraction of steps after which the net is off (repeatable; default 1)", true},
      {"control-preprocess", "MODE", "none|canny: turn --control-image into the map (once, or per net)", true},
      {"canny-low", "L", "Canny low threshold (default 100)"},
      {"canny-high", "H", "Canny high threshold (default 200)"},
      {"guess-mode", "", "ControlNet guess mode (nets see the conditional half only)"},
      {"save-control-image", "OUT.png", "write the prepared control map(s) (several nets: OUT-0.png ...)"},
      // Stable unCLIP (docs/unclip.md): --model a StableUnCLIPPipeline folder.
      {"prior-steps", "N", "unCLIP: prior denoising steps (default 25)"},
      {"prior-guidance-scale", "G", "unCLIP: the prior's classifier-free guidance; <= 1 disables it (default 4)"},
      {"noise-level", "N", "unCLIP: noise added to the image embedding, in [0, T-1] of its scheduler (default 0)"},
      // Cascade: the x4 upscaler after the base model (docs/upscale.md).
      {"upscale-model", "DIR", "then upscale each picture 4x with this StableDiffusionUpscalePipeline folder (same prompts, same seed)"},
      {"upscale-noise-level", "N", "with --upscale-model: noise added to the base picture (default 20)"},
      {"upscale-steps", "N", "with --upscale-model: the upscaler's steps (default 75)"},
      {"upscale-guidance-scale", "G", "with --upscale-model: the upscaler's guidance (default 9)"},
      // T2I-Adapters and hypernetworks (issue 17): docs/t2i-adapter.md, docs/hypernetworks.md.
      {"adapter", "PATH", "T2I-Adapter: diffusers folder, TencentARC .pth or .safetensors (repeatable)", true},
      {"adapter-image", "IMG", "control picture of the n-th --adapter (repeatable, one per adapter)", true},
      {"adapter-scale", "X", "scale per adapter (repeatable; default 1; several: sum of scale x features)", true},
      {"adapter-end", "F", "cond_tau: features only during the first fraction F of the steps (default 1)", true},
      {"adapter-preprocess", "MODE", "none|canny: turn --adapter-image into the map (once, or per adapter)", true},
      {"hypernetwork", "FILE[:MULT]", "A1111 hypernetwork (.pt or .safetensors); repeatable, chained in order", true},
      {"hypernetwork-dir", "DIR", "folder for <hypernet:NAME:MULT> tags in the prompt (NAME.pt / .safetensors)"},
      {"from", "IMAGE", "re-run the parameters stored in a PNG made by dmx (or A1111); flags given override"},
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
  g_verbose = a.has("verbose");
  dmx::GenerateOptions o;
  if (a.has("from")) {
    o = dmx::parse_parameters(dmx::read_image_parameters(a.str("from")));
    o.from = a.str("from");
  }
  DMX_CHECK_ARG(a.has("model"), "--model is required (a diffusers folder or a single-file .safetensors or .ckpt checkpoint)");
  DMX_CHECK_ARG(a.has("prompt") || a.has("from"), "--prompt is required");
  DMX_CHECK_ARG(a.has("output"), "--output is required (a .png path)");
  o.model = a.str("model");
  // Stable unCLIP: diffusers' StableUnCLIPPipeline defaults (20 steps, guidance 10) and its own options.
  if (!a.has("from") && dmx::is_unclip_model(o.model)) {
    o.steps = dmx::kUnCLIPSteps;
    o.guidance_scale = dmx::kUnCLIPGuidanceScale;
  }
  if (a.has("prior-steps")) o.prior_steps = static_cast<int>(a.integer("prior-steps", 25, 1, 1000));
  if (a.has("prior-guidance-scale")) o.prior_guidance_scale = a.real("prior-guidance-scale", 4.0, 0, 100);
  if (a.has("noise-level")) o.noise_level = static_cast<int>(a.integer("noise-level", 0, -1000000, 1000000));
  o.prompt = a.str("prompt", o.prompt);
  o.output = a.str("output");
  o.negative_prompt = a.str("negative-prompt", o.negative_prompt);
  o.width = static_cast<int>(a.integer("width", o.width, 8, 1 << 20));
  o.height = static_cast<int>(a.integer("height", o.height, 8, 1 << 20));
  o.steps = static_cast<int>(a.integer("steps", o.steps, 1, 1000));
  o.guidance_scale = a.real("guidance-scale", o.guidance_scale, 0, 100);
  o.scheduler = a.str("scheduler", o.scheduler);
  o.eta = a.real("eta", o.eta, 0.0, 1.0);
  if (a.has("seed")) o.seed = a.u64("seed");
  o.num_images = static_cast<int>(a.integer("num-images", o.num_images, 1, 64));
  o.init_image = a.str("init-image", o.init_image);
  // Blended latent diffusion (docs/editing-blended.md). Without --mask, settings read by --from are dropped.
  o.mask = a.str("mask");
  if (o.mask.empty()) {  // settings read by --from apply only with a mask
    const dmx::GenerateOptions d;
    o.background = d.background;
    o.blend_start = d.blend_start;
    o.mask_dilation = d.mask_dilation;
    o.rank = d.rank;
    o.blend_variant = d.blend_variant;
  }
  if (a.has("mask") && !a.has("strength") && !a.has("from")) o.strength = 1.0;  // diffusers' inpaint default
  DMX_CHECK_ARG(!a.has("mask") || a.has("init-image") || !o.init_image.empty(), "--mask needs --init-image");
  for (const char* f : {"background", "blend-start", "mask-dilation", "rank", "blend-variant"})
    DMX_CHECK_ARG(!a.has(f) || a.has("mask"), "--", f, " needs --mask");
  o.background = a.str("background", o.background);
  o.blend_start = a.real("blend-start", o.blend_start, 0.0, 1.0);
  DMX_CHECK_ARG(o.blend_start < 1.0, "--blend-start must be in [0, 1), got ", o.blend_start);
  o.mask_dilation = static_cast<int>(a.integer("mask-dilation", o.mask_dilation, 0, 64));
  o.blend_variant = a.str("blend-variant", o.blend_variant);
  if (a.has("rank")) o.rank = true;
  o.strength = a.real("strength", o.strength, 0.0, 1.0);
  DMX_CHECK_ARG(!a.has("strength") || a.has("init-image"), "--strength needs --init-image");
  o.init_latents = a.str("init-latents");
  o.save_latents = a.str("save-latents");
  // Cascade (docs/upscale.md).
  o.upscale_model = a.str("upscale-model");
  o.upscale_noise_level = static_cast<int>(a.integer("upscale-noise-level", o.upscale_noise_level, 0, 1 << 30));
  o.upscale_steps = static_cast<int>(a.integer("upscale-steps", o.upscale_steps, 1, 1000));
  o.upscale_guidance_scale = a.real("upscale-guidance-scale", o.upscale_guidance_scale, 0, 100);
  DMX_CHECK_ARG(a.has("upscale-model") || !(a.has("upscale-noise-level") || a.has("upscale-steps") ||
                                            a.has("upscale-guidance-scale")),
                "--upscale-noise-level/--upscale-steps/--upscale-guidance-scale need --upscale-model");
  o.config_dir = a.str("config");
  o.tokenizer_dir = a.str("tokenizer");
  o.clip_skip = static_cast<int>(a.integer("clip-skip", o.clip_skip, 0, 64));
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.dtype = a.str("dtype", "fp32");
  o.device = a.str("device", "cpu");
  o.progress = !a.has("quiet");
  for (const auto& l : a.all("lora")) o.loras.push_back(l);
  o.lora_mode = a.str("lora-mode", o.lora_mode);
  o.lora_dir = a.str("lora-dir", o.lora_dir);
  o.lora_allow_unmatched = a.has("lora-allow-unmatched");
  o.controlnets = a.all("controlnet");
  o.control_images = a.all("control-image");
  auto reals = [&](const std::string& name) {
    std::vector<double> out;
    for (const std::string& s : a.all(name)) out.push_back(dmx::parse_number(s, "--" + name));
    return out;
  };
  o.control_scales = reals("control-scale");
  o.control_starts = reals("control-start");
  o.control_ends = reals("control-end");
  o.control_preprocess = a.all("control-preprocess");
  o.canny_low = a.real("canny-low", 100.0, 0, 2040);
  o.canny_high = a.real("canny-high", 200.0, 0, 2040);
  o.guess_mode = a.has("guess-mode");
  o.save_control_image = a.str("save-control-image");
  // T2I-Adapters and hypernetworks (issue 17).
  o.adapters = a.all("adapter");
  o.adapter_images = a.all("adapter-image");
  o.adapter_scales = reals("adapter-scale");
  o.adapter_ends = reals("adapter-end");
  o.adapter_preprocess = a.all("adapter-preprocess");
  for (const auto& h : a.all("hypernetwork")) o.hypernetworks.push_back(h);
  o.hypernetwork_dir = a.str("hypernetwork-dir", o.hypernetwork_dir);
  o.verbose = a.has("verbose");
  o.overwrite = a.has("overwrite");
  DMX_CHECK_ARG(!(o.progress == false && o.verbose), "--quiet and --verbose cannot be used together");
  dmx::GenerateResult r = dmx::generate(o);
  if (!a.has("quiet")) {
    for (size_t i = 0; i < r.images.size(); ++i) {
      if (i < r.scores.size())
        std::fprintf(stderr, "rank %zu: sample %d, score %.6g: ", i + 1, r.samples[i], r.scores[i]);
      std::fprintf(stderr, "wrote %s\n", r.images[i].c_str());
    }
    std::fprintf(stderr, "seed %llu, %.2f s\n", static_cast<unsigned long long>(r.seed), r.seconds);
  }
  return 0;
}

int cmd_bench(int argc, char** argv) {
  dmx::cli::Args a(
      "bench",
      {
          {"preset", "NAME", "sd15|sd21|tiny: architecture to build with random weights (default sd15)"},
          {"width", "W", "image width (default: the preset's size)"},
          {"height", "H", "image height (default: the preset's size)"},
          {"dtype", "T", "fp32|bf16|fp16 (fp16: CUDA only; default fp32)"},
          {"device", "D", "cpu|cuda[:N] (default cpu)"},
          {"threads", "N", "CPU threads (default: all cores)"},
          {"runs", "N", "timed runs per stage after one warm-up; the median is reported (default 3)"},
          {"json", "", "print one JSON object on one line"},
          {"nchw", "", "run convolutions NCHW instead of the default channels-last (for comparison)"},
          {"profile", "PREFIX", "also write op traces of one step and one decode: PREFIX.unet.json, PREFIX.vae.json"},
          {"overwrite", "", "replace existing --profile traces"},
          {"verbose", "", "stack traces"},
          {"help", "", "show this help"},
      });
  a.parse(argc, argv, 2);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  dmx::BenchOptions o;
  o.preset = a.str("preset", o.preset);
  o.width = static_cast<int>(a.integer("width", 0, 8, 1 << 14));
  o.height = static_cast<int>(a.integer("height", 0, 8, 1 << 14));
  o.dtype = a.str("dtype", o.dtype);
  o.device = a.str("device", o.device);
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.runs = static_cast<int>(a.integer("runs", o.runs, 1, 1000));
  o.profile = a.str("profile");
  o.overwrite = a.has("overwrite");
  o.channels_last = !a.has("nchw");
  const dmx::BenchResult r = dmx::bench(o);
  if (a.has("json"))
    std::printf("%s\n", dmx::bench_json(r).c_str());
  else
    std::printf("%s", dmx::bench_table(r).c_str());
  return 0;
}

int cmd_info(int argc, char** argv) {
  DMX_CHECK_ARG(argc == 3, "usage: dmx info IMAGE.png");
  // The text comes from a file: control characters are escaped, never sent to the terminal.
  std::printf("%s\n", dmx::terminal_safe(dmx::read_image_parameters(argv[2])).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ensure_openmp_policy(argv);
  dmx::install_signal_cleanup();
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    std::printf("%s", kUsage);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  for (int i = 2; i < argc; ++i)
    if (!std::strcmp(argv[i], "--verbose")) g_verbose = true;
  try {
    if (cmd == "generate") return cmd_generate(argc, argv);
    if (cmd == "info") return cmd_info(argc, argv);
    if (cmd == "bench") return cmd_bench(argc, argv);
    if (cmd == "data") return dmx::cli::cmd_data(argc, argv);
    if (cmd == "init") return dmx::cli::cmd_init(argc, argv);
    if (cmd == "convert") return dmx::cli::cmd_convert(argc, argv);
    if (cmd == "p2p") return dmx::cli::cmd_p2p(argc, argv);
    if (cmd == "diffedit") return dmx::cli::cmd_diffedit(argc, argv);
    if (cmd == "variations") return dmx::cli::cmd_variations(argc, argv);
    if (cmd == "embed") return dmx::cli::cmd_embed(argc, argv);
    if (cmd == "upscale") return dmx::cli::cmd_upscale(argc, argv);
    if (cmd == "train") return dmx::cli::cmd_train(argc, argv);
    if (cmd == "eval") return dmx::cli::cmd_eval(argc, argv);
    if (cmd == "version" || cmd == "--version") {
      std::printf("dmx %s\n", dmx::version().c_str());
      return 0;
    }
    std::fprintf(stderr, "error: unknown command '%s'\n%s", dmx::terminal_safe(cmd).c_str(), kUsage);
    return 2;
  } catch (const dmx::SystemError& e) {  // a full disk, a quota, an I/O error: not the input's fault
    std::fprintf(stderr, "error: %s\n", dmx::terminal_safe(e.what()).c_str());
    return 1;
  } catch (const dmx::InvalidArgument& e) {
    std::fprintf(stderr, "error: %s\n", dmx::terminal_safe(e.what()).c_str());
    return 2;
  } catch (const dmx::FormatError& e) {
    std::fprintf(stderr, "error: %s\n", dmx::terminal_safe(e.what()).c_str());
    return 2;
  } catch (const dmx::Unsupported& e) {
    std::fprintf(stderr, "error: %s\n", dmx::terminal_safe(e.what()).c_str());
    return 2;
  } catch (const dmx::IoError& e) {
    // A file that cannot be written or read (a full disk, an I/O error) is not the input's fault: 1, like
    // every other failure. A missing or unreadable input path is an InvalidArgument (2).
    std::fprintf(stderr, "error: %s\n", dmx::terminal_safe(e.what()).c_str());
    return 1;
  } catch (const std::exception& e) {
    const std::string what = e.what();
    std::fprintf(stderr, "error: %s\n", dmx::terminal_safe(g_verbose ? what : what.substr(0, what.find('\n'))).c_str());
    return 1;
  }
}
