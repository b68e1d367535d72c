// `dmx p2p`: Prompt-to-Prompt editing (include/dmx/p2p.h, docs/editing-p2p.md).
#include <cstdio>
#include <string>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/p2p.h"

namespace dmx::cli {

int cmd_p2p(int argc, char** argv) {
  Args a(
      "p2p",
      {
          {"model", "PATH", "diffusers folder or single-file checkpoint (.safetensors, or a .ckpt pickle read weights-only) (required)"},
          {"prompt", "A", "the source prompt (required; with --image: what the image shows)"},
          {"edit-prompt", "B", "the edited prompt (required)"},
          {"mode", "MODE", "replace (swap words; same word count) | refine (add words) | reweight (default replace)"},
          {"cross-replace-steps", "X",
           "fraction of steps whose cross attention follows the source, [0, 1] (default 0.4)"},
          {"self-replace-steps", "Y", "fraction of steps whose self attention is the source's, [0, 1] (default 0.4)"},
          {"reweight", "WORD=SCALE", "mode reweight: scale the attention to a word of the edit prompt (repeatable)",
           true},
          {"local-blend", "WORDS", "comma-separated words whose attention maps bound the edited region"},
          {"local-blend-threshold", "T", "local blend mask threshold in [0, 1] (default 0.3)"},
          {"negative-prompt", "TEXT", "negative prompt (default: empty)"},
          {"width", "W", "image width, a multiple of 8 (default: the model's size, or the --image size)"},
          {"height", "H", "image height, a multiple of 8 (default: the model's size, or the --image size)"},
          {"steps", "N", "DDIM steps (default 50)"},
          {"guidance-scale", "G", "classifier-free guidance scale (default 7.5)"},
          {"seed", "N", "random seed of the shared initial noise (default: random)"},
          {"image", "IMG", "edit this real image: DDIM-invert it under --prompt first"},
          {"null-text-inversion", "", "with --image: null-text inversion (Mokady et al.) for a faithful source"},
          {"null-text-inner-steps", "N", "Adam iterations per step for null-text inversion (default 10)"},
          {"save-attention-maps", "MAPS.png", "write per-token cross-attention maps of both prompts as one grid"},
          {"output", "OUT.png",
           "writes OUT.png (source | edit side by side), OUT-source.png and OUT-edit.png (required)"},
          {"config", "DIR", "diffusers folder supplying configs and tokenizer for a single-file checkpoint"},
          {"tokenizer", "DIR", "folder with vocab.json and merges.txt"},
          {"threads", "N", "CPU threads (default: all cores)"},
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
  P2POptions o;
  DMX_CHECK_ARG(a.has("model"), "--model is required (a diffusers folder or a single-file .safetensors or .ckpt checkpoint)");
  DMX_CHECK_ARG(a.has("prompt"), "--prompt is required");
  DMX_CHECK_ARG(a.has("edit-prompt"), "--edit-prompt is required");
  DMX_CHECK_ARG(a.has("output"), "--output is required (a .png path)");
  o.model = a.str("model");
  o.prompt = a.str("prompt");
  o.edit_prompt = a.str("edit-prompt");
  o.output = a.str("output");
  o.mode = a.str("mode", o.mode);
  o.cross_replace_steps = a.real("cross-replace-steps", o.cross_replace_steps, 0.0, 1.0);
  o.self_replace_steps = a.real("self-replace-steps", o.self_replace_steps, 0.0, 1.0);
  o.reweight = a.all("reweight");
  if (a.has("local-blend")) {
    const std::string words = a.str("local-blend");
    size_t start = 0;
    while (true) {
      const size_t comma = words.find(',', start);
      std::string w = words.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      DMX_CHECK_ARG(!w.empty(), "--local-blend must be comma-separated words, got '", words, "'");
      o.local_blend.push_back(w);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  o.local_blend_threshold = a.real("local-blend-threshold", o.local_blend_threshold, 0.0, 1.0);
  o.negative_prompt = a.str("negative-prompt");
  o.width = static_cast<int>(a.integer("width", 0, 8, 1 << 20));
  o.height = static_cast<int>(a.integer("height", 0, 8, 1 << 20));
  o.steps = static_cast<int>(a.integer("steps", o.steps, 1, 1000));
  o.guidance_scale = a.real("guidance-scale", o.guidance_scale, 0, 100);
  if (a.has("seed")) o.seed = a.u64("seed");
  o.image = a.str("image");
  o.null_text_inversion = a.has("null-text-inversion");
  o.null_text_inner_steps = static_cast<int>(a.integer("null-text-inner-steps", o.null_text_inner_steps, 1, 1000));
  o.save_attention_maps = a.str("save-attention-maps");
  o.config_dir = a.str("config");
  o.tokenizer_dir = a.str("tokenizer");
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.progress = !a.has("quiet");
  o.verbose = a.has("verbose");
  o.overwrite = a.has("overwrite");
  const P2PResult r = p2p(o);
  std::printf("wrote %s (source | edit), %s, %s", r.output.c_str(), r.source.c_str(), r.edit.c_str());
  if (!r.attention_maps.empty()) std::printf(", %s", r.attention_maps.c_str());
  std::printf("\nseed %llu, edit %.2f s", static_cast<unsigned long long>(r.seed), r.edit_seconds);
  if (!o.image.empty())
    std::printf(", inversion %.2f s, source reconstruction PSNR %.2f dB", r.inversion_seconds, r.reconstruction_psnr);
  std::printf("\n");
  return 0;
}
}  // namespace dmx::cli
