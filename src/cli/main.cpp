// dmx command-line tool. Sees only the public API (include/dmx).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

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
    "  generate   text-to-image and image-to-image with a Stable Diffusion model\n"
    "  info       print the generation parameters stored in a PNG\n"
    "  bench      time text encoding, a denoising step and VAE decoding (random weights)\n"
    "  data       build training folders (dmx data emoji: the emoji set from npm; dmx data scenes: emoji\n"
    "             scenes with layouts; dmx data tokenizer)\n"
    "  init       a diffusers folder with fresh weights from configs (to train from scratch)\n"
    "  convert    store a model's weights as fp16/bf16/fp32; a .ckpt/.pt/.pth/.bin pickle as .safetensors\n"
    "  p2p        Prompt-to-Prompt editing of a generated or real image\n"
    "  diffedit   edit a real image from a source and a target prompt (DiffEdit)\n"
    "  upscale    x4 super-resolution of a picture with Stable Diffusion's x4 upscaler\n"
    "  restore    colorize, inpaint, uncrop or de-JPEG a picture with a Palette model (dmx train palette)\n"
    "  variations image variations with a Stable unCLIP (StableUnCLIPImg2ImgPipeline) folder\n"
    "  embed      CLIP embeddings of pictures and texts, and their cosine similarities\n"
    "  serve      an HTTP server speaking AUTOMATIC1111's API, with a web page (docs/serve.md)\n"
    "  train      train LoRA, fine-tune, DreamBooth, ControlNet, a CLIP, ... (dmx train "
    "<lora|finetune|dreambooth|controlnet|adapter|vae|palette|hypernetwork|clip|classifier|bench>)\n"
    "  eval       score an emoji model with the emoji classifier (dmx train classifier), or a CLIP (--clip)\n"
    "  version    print the version\n\n"
    "Run 'dmx <command> --help' for the options of a command.\n";

// The commands: name -> function (src/cli/cmd_<name>.cpp; the emoji module's in src/emoji/cli/).
struct Entry {
  const char* name;
  int (*run)(int, char**);
};
const Entry kCommands[] = {
    {"generate", dmx::cli::cmd_generate}, {"info", dmx::cli::cmd_info},
    {"bench", dmx::cli::cmd_bench},       {"data", dmx::cli::cmd_data},
    {"init", dmx::cli::cmd_init},         {"convert", dmx::cli::cmd_convert},
    {"p2p", dmx::cli::cmd_p2p},           {"diffedit", dmx::cli::cmd_diffedit},
    {"train", dmx::cli::cmd_train},       {"eval", dmx::cli::cmd_eval},
    {"upscale", dmx::cli::cmd_upscale},   {"variations", dmx::cli::cmd_variations},
    {"embed", dmx::cli::cmd_embed},       {"restore", dmx::cli::cmd_restore},
    {"serve", dmx::cli::cmd_serve},
};

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
    for (const Entry& e : kCommands)
      if (cmd == e.name) return e.run(argc, argv);
    if (cmd == "version" || cmd == "--version") {
      std::printf("dmx %s\n", dmx::version().c_str());
      return 0;
    }
    std::fprintf(stderr, "error: unknown command '%s'\n%s", dmx::terminal_safe(cmd).c_str(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    // Invalid input (arguments, paths, malformed model files, unreadable images) exits 2; failures the input did
    // not cause exit 1: a full disk, a quota, an I/O error (SystemError; IoError: a file that cannot be written or
    // read, while a missing or unreadable input path is an InvalidArgument), anything else. dmx errors print
    // whole; others their first line unless --verbose.
    const bool invalid_input = dynamic_cast<const dmx::InvalidArgument*>(&e) ||
                               dynamic_cast<const dmx::FormatError*>(&e) || dynamic_cast<const dmx::Unsupported*>(&e);
    const bool dmx_error =
        invalid_input || dynamic_cast<const dmx::SystemError*>(&e) || dynamic_cast<const dmx::IoError*>(&e);
    const std::string what = e.what();
    const std::string shown = dmx_error || g_verbose ? what : what.substr(0, what.find('\n'));
    std::fprintf(stderr, "error: %s\n", dmx::terminal_safe(shown).c_str());
    return invalid_input ? 2 : 1;
  }
}
