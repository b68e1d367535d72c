// `dmx data emoji`: the emoji training set (include/dmx/emoji_data.h). A command of the emoji module, built into
// the dmx command line.
#include <cstdio>
#include <string>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/emoji_data.h"
#include "dmx/error.h"

namespace dmx::cli {

int cmd_data_emoji(int argc, char** argv) {
  Args a("data emoji",
         {
             {"out", "DIR", "folder to create (required)"},
             {"source", "DIR",
              "folder with emoji-datasource-<style>/package (default: $DMX_EMOJI_DIR or ~/.cache/dmx/emoji)"},
             {"style", "NAME", "google|twitter|apple|facebook; repeatable (default: google and twitter)", true},
             {"size", "PX", "output side in pixels, 8..1024 (default 64)"},
             {"background", "GRAY", "gray level of the plain background, 0..255 (default 255)"},
             {"heldout-fraction", "F", "share of concepts kept out of training, 0..0.05 (default 0.02)"},
             {"caption-format", "FMT", "caption template with {name} {short_name} {category} {subcategory} {style}"},
             {"extra-caption-format", "FMT", "one more row per image with this caption; repeatable", true},
             {"canny-low", "L", "Canny low threshold for the edge maps (default 100)"},
             {"canny-high", "H", "Canny high threshold (default 200)"},
             {"only", "NAMES", "build only these concepts: comma-separated short names (e.g. grinning,pizza,cat)"},
             {"overwrite", "", "replace --out if it exists"},
             {"quiet", "", "no progress output"},
             {"verbose", "", "stack traces"},
             {"help", "", "show this help"},
         });
  a.parse(argc, argv, 3);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  EmojiDataOptions o;
  DMX_CHECK_ARG(a.has("out"), "--out is required (the folder to create)");
  o.out = a.str("out");
  o.source = a.str("source");
  if (a.has("style")) o.styles = a.all("style");
  o.size = static_cast<int>(a.integer("size", o.size, 8, 1024));
  o.background = static_cast<int>(a.integer("background", o.background, 0, 255));
  o.heldout_fraction = a.real("heldout-fraction", o.heldout_fraction, 0.0, 0.05);
  o.caption_format = a.str("caption-format", o.caption_format);
  if (a.has("extra-caption-format")) o.extra_caption_formats = a.all("extra-caption-format");
  o.canny_low = a.real("canny-low", o.canny_low, 0, 2040);
  o.canny_high = a.real("canny-high", o.canny_high, 0, 2040);
  if (a.has("only")) {
    const std::string list = a.str("only");
    for (size_t i = 0; i <= list.size();) {
      size_t j = list.find(',', i);
      if (j == std::string::npos) j = list.size();
      o.only.push_back(list.substr(i, j - i));
      i = j + 1;
    }
  }
  o.overwrite = a.has("overwrite");
  o.progress = !a.has("quiet");
  const EmojiDataReport r = build_emoji_dataset(o);
  if (o.progress) {
    std::fprintf(stderr, "wrote %s: %d concepts, %d training images, %d held-out images (%zu held-out concepts)\n",
                 r.out.c_str(), r.concepts, r.train_images, r.heldout_images, r.heldout.size());
  }
  return 0;
}
}  // namespace dmx::cli
