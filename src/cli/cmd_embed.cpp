// dmx embed: CLIP embeddings of pictures and texts with a Stable unCLIP folder's encoders, and the cosine
// similarity of every pair (docs/unclip.md).
#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/unclip.h"

namespace dmx::cli {

int cmd_embed(int argc, char** argv) {
  Args a("embed", {
      {"model", "DIR", "Stable unCLIP folder; give it twice to take the image encoder from a "
                       "StableUnCLIPImg2ImgPipeline folder and the text encoder from a StableUnCLIPPipeline one",
       true},
      {"image", "IMG", "a picture (PNG/JPEG) to embed with the image encoder (repeatable)", true},
      {"prompt", "TEXT", "a text to embed with the prior's text encoder (repeatable)", true},
      {"output", "F", "also write the embeddings and the matrix: .safetensors (image_embeds, text_embeds, cosine) "
                      "or .json"},
      {"threads", "N", "CPU threads (default: all cores)"},
      {"device", "D", "cpu|cuda (default cpu)"},
      {"overwrite", "", "replace --output if it exists"},
      {"quiet", "", "print nothing (with --output)"},
      {"verbose", "", "stack traces"},
      {"help", "", "show this help"},
  });
  a.parse(argc, argv, 2);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  EmbedOptions o;
  DMX_CHECK_ARG(a.has("model"), "--model is required (a Stable unCLIP folder)");
  o.models = a.all("model");
  o.images = a.all("image");
  o.prompts = a.all("prompt");
  o.output = a.str("output");
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.device = a.str("device", o.device);
  o.overwrite = a.has("overwrite");
  o.progress = !a.has("quiet");
  const EmbedResult r = embed(o);
  if (o.progress) {
    std::printf("%s", embed_table(r).c_str());
    if (!r.output.empty()) std::fprintf(stderr, "wrote %s\n", r.output.c_str());
  }
  return 0;
}
}  // namespace dmx::cli
