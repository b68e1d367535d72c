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

// Image size limits (docs/limits.md), checked on the header before anything is decoded.
constexpr int kMaxImageSide = 16384;
// Pictures a pipeline takes at the output size (init images, masks, control maps, edits): 4096 x 4096.
constexpr int64_t kMaxImagePixels = 4096ll * 4096;
// Training images (resized to --resolution after decoding): 8192 x 8192, so that camera photos load.
constexpr int64_t kMaxDatasetImagePixels = 8192ll * 8192;

// What the header says, before decoding: size and the channels the decoder will produce.
struct ImageHeader {
  std::string format;  // "PNG" | "JPEG"
  int width = 0, height = 0;
  int channels = 0;  // decoded channels (PNG: 1, 2, 3 or 4; JPEG: 1 or 3)
  uint64_t decoded_bytes() const { return static_cast<uint64_t>(width) * height * channels; }
};
// Reads the PNG IHDR or the JPEG frame header (SOFn) without decoding pixel data. Not PNG/JPEG, or a
// corrupt header: InvalidArgument naming `param`. The path form reads only the header bytes, from a
// regular file (core/fs.h open_regular_file).
ImageHeader read_image_header(const uint8_t* bytes, size_t size, const std::string& param);
ImageHeader read_image_header(const std::string& path, const std::string& param);
// Sides in [1, kMaxImageSide] and width x height <= max_pixels, else InvalidArgument stating the limit and
// the memory decoding would take.
void check_image_header(const ImageHeader& h, const std::string& param, int64_t max_pixels);

// Decodes PNG or JPEG (by content, not extension). `param` names the option in errors
// ("--init-image"). The header is checked against max_pixels first (check_image_header); unreadable,
// corrupt, oversized or unsupported files are InvalidArgument. The file must be a regular file of at
// most kMaxImageFileBytes (core/fs.h).
Image load_image(const std::string& path, const std::string& param, int64_t max_pixels = kMaxImagePixels);
Image decode_image(const uint8_t* bytes, size_t size, const std::string& param, int64_t max_pixels = kMaxImagePixels);
// Masks, control images and init images must have the size of the output: InvalidArgument naming
// `param`, the rule and both sizes otherwise ("--mask-image must be 512x512 to match the output size,
// got 640x480").
void check_image_size(const std::string& param, const Image& img, int expected_width, int expected_height);
// Keeps RGB (drops alpha as PIL's convert("RGB") does; replicates gray).
Image to_rgb(const Image& img);
Image to_gray(const Image& img);

// Baseline JPEG of a gray or RGB image at quality 1..100 (libjpeg's jpeg_set_quality, 4:2:0 chroma subsampling
// for RGB, as libjpeg's defaults and PIL's save(quality=...) do).
std::vector<uint8_t> encode_jpeg(const Image& img, int quality);

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
