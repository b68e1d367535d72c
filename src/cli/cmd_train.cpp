// `dmx train <recipe>`: LoRA, full fine-tuning and DreamBooth (docs/training.md), and `dmx train bench`.
#include <cstdio>
#include <cstring>
#include <string>

#include "cli/commands.h"
#include "cli/options.h"
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
    "  adapter     a T2I-Adapter (fresh or continued), base locked, cubic timestep sampling; writes a\n"
    "              diffusers T2IAdapter folder\n"
    "  vae         the autoencoder (encoder and decoder) of a diffusers folder; writes a diffusers folder\n"
    "  palette     Palette image-to-image diffusion (--task colorize|inpaint|uncrop|jpeg) in pixel space;\n"
    "              writes a Palette folder for dmx restore\n"
    "  hypernetwork  an AUTOMATIC1111 hypernetwork on the frozen model; writes A1111's .pt or a .safetensors\n"
    "  clip        a small CLIP (image and text towers, contrastive loss) from scratch; writes a CLIP folder\n"
    "              for dmx embed and dmx eval --clip\n"
    "  prior       a diffusion prior (PriorTransformer) from a CLIP's text to its image embedding; writes the\n"
    "              prior half of a StableUnCLIPPipeline folder (dmx eval --prior measures it)\n"
    "  unclip      the unCLIP decoder: the UNet fine-tuned on noise-augmented CLIP image embeddings; writes a\n"
    "              StableUnCLIPImg2ImgPipeline folder for dmx variations\n"
    "  spatext     SpaText: the UNet given a spatio-textual map of a `dmx data scenes` folder (conv_in widened,\n"
    "              LoRA on the blocks); writes a SpaText folder for dmx generate --layout-method spatext\n"
    "  vqseg       VQ-SEG: a VQ autoencoder (diffusers VQModel) of a scene folder's category and edge maps\n"
    "  scene       Make-A-Scene as diffusion: the UNet given VQ-SEG's scene tokens after the text (LoRA on the\n"
    "              blocks); writes a scene folder for dmx generate --layout-method scene\n"
    "  classifier  the emoji classifier of `dmx eval` (docs/evaluation.md)\n"
    "  bench       training throughput on random weights (samples/s, peak memory)\n\n"
    "Run 'dmx train <recipe> --help' for the options.\n";

int run_bench(int argc, char** argv) {
  TrainBenchOptions o;
  if (!parse_options(kTrainBench, argc, argv, o)) return 0;  // --help
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
  const CommandInfo* c = find_command("train " + recipe);
  DMX_CHECK_ARG(
      c != nullptr,
      "dmx train: recipe must be lora, finetune, dreambooth, controlnet, adapter, vae, palette, hypernetwork, clip, "
      "prior, unclip, spatext, vqseg, scene, classifier or bench, got '",
      recipe, "'");
  TrainOptions o;
  o.recipe = recipe;
  if (!parse_options(c->id, argc, argv, o)) return 0;  // --help
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
