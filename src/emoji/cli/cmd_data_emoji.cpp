// `dmx data emoji`: the emoji training set (include/dmx/emoji_data.h). A command of the emoji module, built into
// the dmx command line.
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/emoji_data.h"
#include "dmx/error.h"

namespace dmx::cli {

int cmd_data_emoji(int argc, char** argv) {
  EmojiDataOptions o;
  const std::optional<Args> a = parse_options(kDataEmoji, argc, argv, o, {{"out", "the folder to create"}});
  if (!a) return 0;  // --help
  const EmojiDataReport r = build_emoji_dataset(o);
  if (o.progress) {
    std::fprintf(stderr, "wrote %s: %d concepts, %d training images, %d held-out images (%zu held-out concepts)\n",
                 r.out.c_str(), r.concepts, r.train_images, r.heldout_images, r.heldout.size());
  }
  return 0;
}
}  // namespace dmx::cli
