// Images: PNG and JPEG decoding with strict validation, PNG encoding with text chunks (written
// atomically), and conversion to/from tensors the way diffusers' VaeImageProcessor does.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace dmx {

struct Image {
  int width = 0;
  int height = 0;
  int channels = 0;           // 1 (gray), 3 (RGB) or 4 (RGBA)
  std::vector<uint8_t> data;  // HWC, row-major
};

constexpr int kMaxImageSide = 16384;

// Decodes PNG or JPEG (by content, not extension). `param` names the option in errors
// ("--init-image"). Unreadable, corrupt or unsupported files are InvalidArgument.
Image load_image(const std::string& path, const std::string& param);
Image decode_image(const uint8_t* bytes, size_t size, const std::string& param);
// Masks, control images and init images must have the size of the output: InvalidArgument naming
// `param`, the rule and both sizes otherwise ("--mask-image must be 512x512 to match the output size,
// got 640x480").
void check_image_size(const std::string& param, const Image& img, int expected_width, int expected_height);
// Keeps RGB (drops alpha as PIL's convert("RGB") does; replicates gray).
Image to_rgb(const Image& img);
Image to_gray(const Image& img);

using TextChunks = std::vector<std::pair<std::string, std::string>>;
std::vector<uint8_t> encode_png(const Image& img, const TextChunks& text = {});
void save_png(const std::string& path, const Image& img, const TextChunks& text = {});  // atomic
TextChunks read_png_text(const std::string& path);
// The same on bytes in memory; `what` names the source in errors. Corrupt PNGs are InvalidArgument.
TextChunks read_png_text(const uint8_t* bytes, size_t size, const std::string& what);

// RGB image -> [1, 3, H, W] float32 in [-1, 1] (x / 255 * 2 - 1).
at::Tensor image_to_tensor(const Image& rgb);
// [H, W, 3] float in [0, 1] -> RGB image with round(x * 255) (numpy's round half to even).
Image tensor_to_image(const at::Tensor& hwc01);
}  // namespace dmx
