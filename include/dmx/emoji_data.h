// The emoji dataset builder of the emoji module (`dmx data emoji`, src/emoji/data_emoji.cpp). Torch-free public
// API.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dmx {

// `dmx data emoji`: a training folder from the npm packages emoji-datasource-google and
// emoji-datasource-twitter (64-px PNGs + emoji.json; Google's emoji are Apache-2.0, Twemoji CC-BY 4.0).
struct EmojiDataOptions {
  std::string source;  // folder holding emoji-datasource-<style>/package/; "" = default_emoji_source()
  std::string out;     // output folder (must not exist, unless overwrite)
  std::vector<std::string> styles{"google", "twitter"};
  int size = 64;                   // output side in pixels, 8..1024 (Lanczos from the 64-px PNGs)
  int background = 255;            // gray level of the plain background, 0..255
  double heldout_fraction = 0.02;  // share of concepts never seen in training, in [0, 0.05]
  std::string caption_format =
      "{name}, {category}, {style} style";  // {name} {short_name} {category} {subcategory} {style}
  // Each adds one more metadata row per image, with the caption this format gives (e.g. "{name}").
  std::vector<std::string> extra_caption_formats;
  double canny_low = 100, canny_high = 200;  // edge maps for ControlNet
  // Only these concepts (emoji.json short_name, e.g. "grinning", "pizza"); empty = all. Held-out concepts
  // stay held out (the split is chosen on the full list), so a subset has the same layout as a full build.
  std::vector<std::string> only;
  bool overwrite = false;
  bool progress = true;
};

struct EmojiDataReport {
  int concepts = 0;  // emoji concepts with an image in at least one style
  int train_images = 0, heldout_images = 0;
  std::vector<std::string> heldout;  // held-out concept names (lower case)
  std::string out;
};

// $DMX_EMOJI_DIR, else $XDG_CACHE_HOME/dmx/emoji, else $HOME/.cache/dmx/emoji (where scripts/setup.sh
// installs the packages).
std::string default_emoji_source();

// Writes, for each style S:
//   out/S/train/metadata.jsonl and out/S/heldout/metadata.jsonl, rows
//     {"file_name": "images/x.png", "text": caption, "conditioning_image": "edges/x.png", "mask": "masks/x.png",
//      "name": ..., "short_name": ..., "category": ..., "subcategory": ...}
//   images/ (RGB on the plain background), edges/ (Canny of the image), masks/ (alpha >= 128 -> 255)
// plus out/concepts.json (every concept, its split and styles) and out/README.md (sources, licences).
// The folder is built under out + ".tmp.<pid>" and renamed at the end. Held-out concepts are the same for every
// style, chosen deterministically (every k-th concept in emoji.json's sort order, k = round(1 / fraction)).
EmojiDataReport build_emoji_dataset(const EmojiDataOptions& o);
}  // namespace dmx
