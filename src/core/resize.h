// Image resizing exactly as Pillow's Image.resize(size, Image.LANCZOS) computes it for 8-bit images
// (libImaging/Resample.c: separable convolution, double-precision coefficients normalised per output pixel,
// then 22-bit fixed point with rounding, horizontal pass first, clipped to uint8 after each pass).
// diffusers' VaeImageProcessor (resample="lanczos") resizes ControlNet images this way.
#pragma once
#include "core/image.h"

namespace dmx {
// Returns a copy when the size is unchanged (as PIL does). width, height >= 1.
Image resize_lanczos(const Image& img, int width, int height);
// The same with Pillow's BILINEAR filter (a triangle widened by the scale when shrinking, i.e. antialiased),
// which torchvision's transforms.Resize(interpolation=BILINEAR) calls on PIL images in diffusers' train scripts.
Image resize_bilinear(const Image& img, int width, int height);
}  // namespace dmx
