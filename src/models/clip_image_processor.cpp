// transformers 4.44 CLIPImageProcessor.preprocess (see clip_image_processor.h), step by step.
#include "models/clip_image_processor.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/resize.h"
#include "dmx/error.h"
#include "models/config_json.h"

namespace dmx::models {

namespace {
const char* kWhat = "CLIP image processor config";

// An int field of a size dict (FormatError naming it otherwise).
int size_field(const nlohmann::json& d, const char* param, const char* key) {
  const auto& v = d.at(key);
  DMX_CHECK_FORMAT(v.is_number_integer(), kWhat, ": ", param, ".", key, " must be an integer, got ", v.dump());
  return v.get<int>();
}

int floordiv(int a, int b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0)) ? 1 : 0); }

// transformers' center_crop along one axis of length n, crop c: the source index of output 0, top = (n - c) // 2.
// Inside the picture that is all. When the crop is larger, transformers (4.44, since PR #30934) pads the picture
// with zeros to c, centred at ceil((c - n) / 2), and slices [top + pad, top + pad + c) = [0, c): output y is source
// y + top again, zeros outside. (Before that fix the pad was (c - n) // 2 and an odd shortfall gave c - 1 rows.)
int center_crop_offset(int n, int c) { return floordiv(n - c, 2); }

// image_mean / image_std: a number (every channel) or a list of 3.
std::array<double, 3> channel_values(const nlohmann::json& j, const char* key, std::array<double, 3> fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (it->is_number()) return {it->get<double>(), it->get<double>(), it->get<double>()};
  DMX_CHECK_FORMAT(it->is_array() && it->size() == 3, kWhat, ": ", key,
                   " must be a number or a list of 3 numbers (one per RGB channel), got ", it->dump());
  std::array<double, 3> out{};
  for (size_t c = 0; c < 3; ++c) {
    DMX_CHECK_FORMAT((*it)[c].is_number(), kWhat, ": ", key, " must hold numbers, got ", it->dump());
    out[c] = (*it)[c].get<double>();
  }
  return out;
}
}  // namespace

CLIPImageProcessorConfig CLIPImageProcessorConfig::from_json(const nlohmann::json& j) {
  DMX_CHECK_FORMAT(j.is_object(), kWhat, " must be a JSON object");
  for (const char* type_key : {"image_processor_type", "feature_extractor_type"}) {
    auto it = j.find(type_key);
    if (it == j.end() || it->is_null()) continue;
    DMX_CHECK_FORMAT(it->is_string(), kWhat, ": ", type_key, " must be a string, got ", it->dump());
    const std::string type = it->get<std::string>();
    if (type != "CLIPImageProcessor" && type != "CLIPFeatureExtractor")
      throw Unsupported(std::string(kWhat) + ": " + type_key + " = \"" + type +
                        "\" is not supported (only CLIPImageProcessor / CLIPFeatureExtractor)");
  }
  CLIPImageProcessorConfig c;
  cfgjson::get(j, kWhat, "do_resize", c.do_resize);
  cfgjson::get(j, kWhat, "resample", c.resample);
  cfgjson::get(j, kWhat, "do_center_crop", c.do_center_crop);
  cfgjson::get(j, kWhat, "do_rescale", c.do_rescale);
  cfgjson::get(j, kWhat, "rescale_factor", c.rescale_factor);
  cfgjson::get(j, kWhat, "do_normalize", c.do_normalize);
  cfgjson::get(j, kWhat, "do_convert_rgb", c.do_convert_rgb);
  c.image_mean = channel_values(j, "image_mean", c.image_mean);
  c.image_std = channel_values(j, "image_std", c.image_std);
  // size: get_size_dict(size, default_to_square=False): an int is {"shortest_edge": int}.
  if (auto it = j.find("size"); it != j.end() && !it->is_null()) {
    if (it->is_number_integer()) {
      c.shortest_edge = it->get<int>();
    } else if (it->is_object() && it->contains("shortest_edge")) {
      c.shortest_edge = size_field(*it, "size", "shortest_edge");
    } else if (it->is_object() && it->contains("height") && it->contains("width")) {
      c.shortest_edge = 0;
      c.size_height = size_field(*it, "size", "height");
      c.size_width = size_field(*it, "size", "width");
    } else {
      throw FormatError(std::string(kWhat) +
                        ": size must be an integer, {\"shortest_edge\": N} or "
                        "{\"height\": H, \"width\": W}, got " +
                        it->dump());
    }
  }
  // use_square_size (an old kwarg transformers still honours when true): size becomes shortest_edge x shortest_edge.
  if (auto it = j.find("use_square_size");
      it != j.end() && it->is_boolean() && it->get<bool>() && c.shortest_edge > 0) {
    c.size_height = c.size_width = c.shortest_edge;
    c.shortest_edge = 0;
  }
  // crop_size: get_size_dict(crop_size, default_to_square=True): an int is a square.
  if (auto it = j.find("crop_size"); it != j.end() && !it->is_null()) {
    if (it->is_number_integer()) {
      c.crop_height = c.crop_width = it->get<int>();
    } else if (it->is_object() && it->contains("height") && it->contains("width")) {
      c.crop_height = size_field(*it, "crop_size", "height");
      c.crop_width = size_field(*it, "crop_size", "width");
    } else {
      throw FormatError(std::string(kWhat) + ": crop_size must be an integer or {\"height\": H, \"width\": W}, got " +
                        it->dump());
    }
  }
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(e.what());
  }
  return c;
}

void CLIPImageProcessorConfig::validate() const {
  if (do_resize) {
    if (shortest_edge > 0) {
      DMX_CHECK_ARG(shortest_edge <= kMaxImageSide, kWhat, ": size.shortest_edge must be in [1, ", kMaxImageSide,
                    "], got ", shortest_edge);
    } else {
      DMX_CHECK_ARG(size_height >= 1 && size_width >= 1 && size_height <= kMaxImageSide && size_width <= kMaxImageSide,
                    kWhat, ": size.height and size.width must be in [1, ", kMaxImageSide, "], got ", size_height, "x",
                    size_width);
    }
    DMX_CHECK_SUPPORTED(resample >= 1 && resample <= 5, kWhat, ": resample = ", resample,
                        " is not supported (Pillow's 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX or 5 HAMMING)");
  }
  if (do_center_crop)
    DMX_CHECK_ARG(crop_height >= 1 && crop_width >= 1 && crop_height <= kMaxImageSide && crop_width <= kMaxImageSide,
                  kWhat, ": crop_size must be in [1, ", kMaxImageSide, "] a side, got ", crop_height, "x", crop_width);
  if (do_rescale)
    DMX_CHECK_ARG(std::isfinite(rescale_factor), kWhat, ": rescale_factor must be finite, got ", rescale_factor);
  if (do_normalize)
    for (int ch = 0; ch < 3; ++ch) {
      DMX_CHECK_ARG(std::isfinite(image_mean[ch]), kWhat, ": image_mean must be finite, got ", image_mean[ch]);
      DMX_CHECK_ARG(std::isfinite(image_std[ch]) && image_std[ch] != 0, kWhat,
                    ": image_std must be finite and non-zero, got ", image_std[ch]);
    }
}

std::array<int, 2> clip_resize_output_size(const CLIPImageProcessorConfig& cfg, int width, int height) {
  if (cfg.shortest_edge <= 0) return {cfg.size_height, cfg.size_width};
  // get_resize_output_image_size(default_to_square=False): Python's int(new_short * long / short).
  const bool portrait = width <= height;
  const int64_t short_side = portrait ? width : height, long_side = portrait ? height : width;
  const double new_long_d =
      static_cast<double>(int64_t{cfg.shortest_edge} * long_side) / static_cast<double>(short_side);
  DMX_CHECK_ARG(new_long_d <= kMaxImageSide, "CLIP preprocessing: resizing a ", width, "x", height,
                " picture's shorter side to ", cfg.shortest_edge, " makes the longer side ",
                static_cast<int64_t>(new_long_d), " pixels, more than ", kMaxImageSide,
                "; crop the picture to a less extreme aspect ratio");
  const int new_long = static_cast<int>(new_long_d);
  return portrait ? std::array<int, 2>{new_long, cfg.shortest_edge} : std::array<int, 2>{cfg.shortest_edge, new_long};
}

at::Tensor clip_preprocess(const CLIPImageProcessorConfig& cfg, const Image& image, const std::string& param) {
  DMX_CHECK_ARG(image.width >= 1 && image.height >= 1 && image.width <= kMaxImageSide &&
                    image.height <= kMaxImageSide &&
                    (image.channels == 1 || image.channels == 3 || image.channels == 4) &&
                    image.data.size() == static_cast<size_t>(image.width) * image.height * image.channels,
                param, ": malformed picture ", image.width, "x", image.height, "x", image.channels);
  // 1. convert_to_rgb: PIL's convert("RGB") (alpha dropped, gray replicated).
  DMX_CHECK_ARG(cfg.do_convert_rgb || image.channels == 3, param,
                " must be an RGB picture when do_convert_rgb is false, ", "got ", image.channels, " channels");
  Image img = to_rgb(image);
  // 2. resize with Pillow on the uint8 picture (a copy when the size is unchanged, as Pillow returns).
  if (cfg.do_resize) {
    const auto hw = clip_resize_output_size(cfg, img.width, img.height);
    img = resize_pil(img, hw[1], hw[0], cfg.resample);
  }
  // 3. center crop on uint8 (image_transforms.center_crop): crop_size, zeros where it reaches past the picture.
  int H = img.height, W = img.width, top = 0, left = 0;
  if (cfg.do_center_crop) {
    H = cfg.crop_height, top = center_crop_offset(img.height, cfg.crop_height);
    W = cfg.crop_width, left = center_crop_offset(img.width, cfg.crop_width);
  }
  // 4-5. rescale (uint8 * factor in float64, stored float32) and normalise in float32, HWC -> CHW.
  std::vector<float> px(static_cast<size_t>(3) * H * W, 0.0f);
  float mean[3], stdv[3];
  for (int c = 0; c < 3; ++c) {
    mean[c] = static_cast<float>(cfg.image_mean[c]);
    stdv[c] = static_cast<float>(cfg.image_std[c]);
  }
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      const int sy = top + y, sx = left + x;
      const bool inside = sy >= 0 && sy < img.height && sx >= 0 && sx < img.width;
      for (int c = 0; c < 3; ++c) {
        const uint8_t u = inside ? img.data[(static_cast<size_t>(sy) * img.width + sx) * 3 + c] : 0;
        float v = cfg.do_rescale ? static_cast<float>(u * cfg.rescale_factor) : static_cast<float>(u);
        if (cfg.do_normalize) v = (v - mean[c]) / stdv[c];
        px[(static_cast<size_t>(c) * H + y) * W + x] = v;
      }
    }
  return at::tensor(px, at::kFloat).view({1, 3, H, W});
}
}  // namespace dmx::models
