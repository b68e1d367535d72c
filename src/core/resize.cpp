// Pillow's resampling filters (libImaging/Resample.c, Pillow 9/10), reimplemented for dmx::Image.
#include "core/resize.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "dmx/error.h"

namespace dmx {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= M_PI;
  return std::sin(x) / x;
}
double lanczos(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3.0) : 0.0; }
// Pillow's bilinear_filter (a triangle of support 1).
double bilinear(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Pillow's bicubic_filter: Keys' cubic convolution kernel with a = -0.5.
double bicubic(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}
// Pillow's box_filter.
double box(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }
// Pillow's hamming_filter.
double hamming(double x) {
  if (x < 0.0) x = -x;
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * M_PI;
  return std::sin(x) / x * (0.54 + 0.46 * std::cos(x));
}

struct Filter {
  double (*fn)(double);
  double support;
};
constexpr Filter kLanczos{lanczos, 3.0};
constexpr Filter kBilinear{bilinear, 1.0};
constexpr Filter kBicubic{bicubic, 2.0};
constexpr Filter kBox{box, 0.5};
constexpr Filter kHamming{hamming, 1.0};

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // per output: xmin, count
  std::vector<int> k;       // fixed point, ksize per output
};

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for the whole input range.
Coeffs precompute(int in_size, int out_size, const Filter& f) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = f.support * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(static_cast<size_t>(out_size) * 2);
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> w(static_cast<size_t>(c.ksize));
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[static_cast<size_t>(x)] = f.fn((x + xmin - center + 0.5) * ss);
      ww += w[static_cast<size_t>(x)];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? w[static_cast<size_t>(x)] / ww : w[static_cast<size_t>(x)];
      c.k[static_cast<size_t>(xx) * c.ksize + x] = v < 0 ? static_cast<int>(-0.5 + v * (1 << kPrecisionBits))
                                                         : static_cast<int>(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[static_cast<size_t>(xx) * 2] = xmin;
    c.bounds[static_cast<size_t>(xx) * 2 + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int v) {
  const int s = v >> kPrecisionBits;  // arithmetic shift, as Pillow
  return static_cast<uint8_t>(std::clamp(s, 0, 255));
}

// One separable pass along x (horizontal) or y (vertical).
Image pass(const Image& in, int out_w, int out_h, bool horizontal, const Filter& f) {
  const Coeffs c = precompute(horizontal ? in.width : in.height, horizontal ? out_w : out_h, f);
  Image out;
  out.width = out_w;
  out.height = out_h;
  out.channels = in.channels;
  out.data.resize(static_cast<size_t>(out_w) * out_h * in.channels);
  const int C = in.channels;
  for (int y = 0; y < out_h; ++y) {
    for (int x = 0; x < out_w; ++x) {
      const int o = horizontal ? x : y;
      const int start = c.bounds[static_cast<size_t>(o) * 2], count = c.bounds[static_cast<size_t>(o) * 2 + 1];
      const int* k = &c.k[static_cast<size_t>(o) * c.ksize];
      for (int ch = 0; ch < C; ++ch) {
        int ss = 1 << (kPrecisionBits - 1);
        for (int j = 0; j < count; ++j) {
          const int sx = horizontal ? start + j : x, sy = horizontal ? y : start + j;
          ss += in.data[(static_cast<size_t>(sy) * in.width + sx) * C + ch] * k[j];
        }
        out.data[(static_cast<size_t>(y) * out_w + x) * C + ch] = clip8(ss);
      }
    }
  }
  return out;
}

Image resize_with(const Image& img, int width, int height, const Filter& f) {
  DMX_CHECK_ARG(width >= 1 && height >= 1, "resize: size must be at least 1x1, got ", width, "x", height);
  DMX_CHECK_ARG(img.width >= 1 && img.height >= 1 && img.channels >= 1 &&
                    img.data.size() == static_cast<size_t>(img.width) * img.height * img.channels,
                "resize: malformed image ", img.width, "x", img.height, "x", img.channels);
  Image cur = img;
  if (width != img.width) cur = pass(cur, width, cur.height, true, f);
  if (height != img.height) cur = pass(cur, width, height, false, f);
  return cur;
}
}  // namespace

Image resize_lanczos(const Image& img, int width, int height) { return resize_with(img, width, height, kLanczos); }
Image resize_bilinear(const Image& img, int width, int height) { return resize_with(img, width, height, kBilinear); }
Image resize_bicubic(const Image& img, int width, int height) { return resize_with(img, width, height, kBicubic); }
Image resize_box(const Image& img, int width, int height) { return resize_with(img, width, height, kBox); }
Image resize_hamming(const Image& img, int width, int height) { return resize_with(img, width, height, kHamming); }

Image resize_pil(const Image& img, int width, int height, int resample) {
  switch (resample) {
    case 1:
      return resize_lanczos(img, width, height);
    case 2:
      return resize_bilinear(img, width, height);
    case 3:
      return resize_bicubic(img, width, height);
    case 4:
      return resize_box(img, width, height);
    case 5:
      return resize_hamming(img, width, height);
    default:
      throw Unsupported("resample = " + std::to_string(resample) +
                        " is not supported (Pillow's 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX or 5 HAMMING; "
                        "0 NEAREST is not implemented)");
  }
}
}  // namespace dmx
