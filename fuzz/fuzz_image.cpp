// libFuzzer target for the image loader (src/core/image.cpp): decode_image (PNG via libpng's
// simplified API, JPEG via libjpeg) and the PNG text-chunk reader behind `dmx info` and `--from`.
// Contract: corrupt or unsupported input throws dmx::InvalidArgument; anything else (another
// exception, a crash, a leak, UB, an image whose buffer does not match its size) is a bug.
#include <cstdint>
#include <cstdlib>

#include "core/image.h"
#include "dmx/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    dmx::Image img = dmx::decode_image(data, size, "--fuzz");
    if (img.width <= 0 || img.height <= 0 || img.width > dmx::kMaxImageSide || img.height > dmx::kMaxImageSide)
      std::abort();
    if (img.channels != 1 && img.channels != 3 && img.channels != 4) std::abort();
    if (img.data.size() != static_cast<size_t>(img.width) * img.height * img.channels) std::abort();
    dmx::Image rgb = dmx::to_rgb(img);
    dmx::Image gray = dmx::to_gray(rgb);
    if (gray.data.size() != static_cast<size_t>(img.width) * img.height) std::abort();
  } catch (const dmx::InvalidArgument&) {
  }
  try {
    dmx::TextChunks text = dmx::read_png_text(data, size, "--fuzz");
    for (const auto& kv : text)
      if (kv.first.empty()) std::abort();
  } catch (const dmx::InvalidArgument&) {
  }
  return 0;
}
