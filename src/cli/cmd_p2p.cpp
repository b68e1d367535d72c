// `dmx p2p`: Prompt-to-Prompt editing (include/dmx/p2p.h, docs/editing-p2p.md).
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/p2p.h"

namespace dmx::cli {

int cmd_p2p(int argc, char** argv) {
  P2POptions o;
  const std::optional<Args> a =
      parse_options(kP2P, argc, argv, o, {kModelRequired, {"prompt"}, {"edit-prompt"}, kPngOutputRequired});
  if (!a) return 0;  // --help
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
