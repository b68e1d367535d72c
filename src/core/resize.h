// Image resizing exactly as Pillow's Image.resize(size, filter) computes it for 8-bit images
// (libImaging/Resample.c, Pillow 9/10: separable convolution with the filter widened by the scale when
// shrinking, double-precision coefficients normalised per output pixel, then 22-bit fixed point with rounding,
// horizontal pass first, clipped to uint8 after each pass). diffusers' VaeImageProcessor (resample="lanczos")
// resizes ControlNet images this way; transformers' CLIPImageProcessor resizes with BICUBIC (resample 3).
// Channels are filtered independently (Pillow premultiplies RGBA by alpha first: convert to RGB before).
#pragma once
#include "core/image.h"

namespace dmx {
// Returns a copy when the size is unchanged (as PIL does). width, height >= 1.
Image resize_lanczos(const Image& img, int width, int height);
// The same with Pillow's BILINEAR filter (a triangle widened by the scale when shrinking, i.e. antialiased),
// which torchvision's transforms.Resize(interpolation=BILINEAR) calls on PIL images in diffusers' train scripts.
Image resize_bilinear(const Image& img, int width, int height);
// Pillow's BICUBIC: Keys' cubic convolution with a = -0.5, support 2.
Image resize_bicubic(const Image& img, int width, int height);
// Pillow's BOX (support 0.5) and HAMMING (support 1) filters.
Image resize_box(const Image& img, int width, int height);
Image resize_hamming(const Image& img, int width, int height);
// By Pillow's resampling constant, as image-processor configs store it ("resample": 3): 1 LANCZOS,
// 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING. 0 (NEAREST) and anything else: Unsupported naming the value.
Image resize_pil(const Image& img, int width, int height, int resample);
}  // namespace dmx
