// CLIP's image preprocessing as transformers 4.44 CLIPImageProcessor.preprocess computes it (image_processing_clip.py,
// image_transforms.py): convert to RGB, resize the shortest side to size.shortest_edge (the longer side to
// int(shortest_edge * long / short)) with Pillow's resampling on the uint8 picture (core/resize.h: bicubic by
// default, exactly), center crop crop_size at top = (h - ch) // 2, left = (w - cw) // 2 (zeros where the
// picture is smaller), rescale (x * rescale_factor in double, stored float32), normalise (x - mean) / std in
// float32 per channel. A float bicubic instead of Pillow's moves CLIP embeddings measurably (FIXTURES.md).
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <nlohmann/json.hpp>
#include <string>

#include "core/image.h"

namespace dmx::models {

// preprocessor_config.json fields, with transformers' CLIPImageProcessor defaults.
struct CLIPImageProcessorConfig {
  bool do_resize = true;
  int shortest_edge = 224;  // size {"shortest_edge": N} (or a bare int, transformers' old form)
  int size_height = 0;      // size {"height": H, "width": W}: an exact resize instead (then shortest_edge = 0)
  int size_width = 0;
  int resample = 3;  // Pillow's constant: 3 BICUBIC (also 1 LANCZOS, 2 BILINEAR, 4 BOX, 5 HAMMING)
  bool do_center_crop = true;
  int crop_height = 224;
  int crop_width = 224;
  bool do_rescale = true;
  double rescale_factor = 1.0 / 255.0;
  bool do_normalize = true;
  std::array<double, 3> image_mean = {0.48145466, 0.4578275, 0.40821073};  // OPENAI_CLIP_MEAN
  std::array<double, 3> image_std = {0.26862954, 0.26130258, 0.27577711};  // OPENAI_CLIP_STD
  bool do_convert_rgb = true;

  // A preprocessor_config.json (CLIPImageProcessor or the older CLIPFeatureExtractor); FormatError naming the field
  // on malformed values, Unsupported for another processor type or resampling filter.
  static CLIPImageProcessorConfig from_json(const nlohmann::json& j);
  void validate() const;  // InvalidArgument naming the field
};

// The resized (before cropping) size (height, width) of a width x height picture.
std::array<int, 2> clip_resize_output_size(const CLIPImageProcessorConfig& cfg, int width, int height);

// One picture -> pixel_values [1, 3, H, W] float32 (H, W = the crop size, or the resized size without cropping).
// InvalidArgument naming `param` for a malformed picture, one that is not RGB when do_convert_rgb is false, or a
// resize beyond 16384 pixels a side.
at::Tensor clip_preprocess(const CLIPImageProcessorConfig& cfg, const Image& image, const std::string& param = "image");
}  // namespace dmx::models
