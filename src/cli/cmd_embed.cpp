// dmx embed: CLIP embeddings of pictures and texts with a Stable unCLIP folder's encoders, and the cosine
// similarity of every pair (docs/unclip.md). Its options are rows of the option table (cli/options.cpp).
#include <cstdio>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/unclip.h"

namespace dmx::cli {

int cmd_embed(int argc, char** argv) {
  EmbedOptions o;
  if (!parse_options(kEmbed, argc, argv, o, {{"model", "a Stable unCLIP or CLIP folder"}})) return 0;  // --help
  const EmbedResult r = embed(o);
  if (o.progress) {
    std::printf("%s", embed_table(r).c_str());
    if (!r.output.empty()) std::fprintf(stderr, "wrote %s\n", r.output.c_str());
  }
  return 0;
}
}  // namespace dmx::cli
