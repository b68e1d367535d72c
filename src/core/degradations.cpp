// Palette's degradations (see degradations.h).
#include "core/degradations.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/image.h"
#include "dmx/error.h"

namespace dmx::degrade {

namespace {
constexpr double kPi = 3.14159265358979323846;

double rand_uniform(at::Generator& gen, double lo, double hi) {
  return lo + (hi - lo) * at::rand({1}, gen, at::TensorOptions().dtype(at::kDouble)).item<double>();
}
double rand_normal(at::Generator& gen, double mean, double stdv) {
  return mean + stdv * at::randn({1}, gen, at::TensorOptions().dtype(at::kDouble)).item<double>();
}
at::Tensor box(int64_t h, int64_t w, int64_t top, int64_t left, int64_t bh, int64_t bw) {
  at::Tensor m = at::zeros({1, h, w}, at::kFloat);
  if (bh > 0 && bw > 0) m.narrow(1, top, bh).narrow(2, left, bw).fill_(1.0);
  return m;
}
void check_size(int64_t h, int64_t w) {
  DMX_CHECK_ARG(h >= 8 && w >= 8 && h <= 16384 && w <= 16384, "mask size must be in [8, 16384] on each side, got ", w,
                "x", h);
}
}  // namespace

int64_t rand_int(at::Generator& gen, int64_t lo, int64_t hi) {
  DMX_CHECK_ARG(lo < hi, "rand_int: empty range [", lo, ", ", hi, ")");
  return at::randint(lo, hi, {1}, gen, at::TensorOptions().dtype(at::kLong)).item<int64_t>();
}

Task parse_task(const std::string& s, const std::string& param) {
  if (s == "colorize") return Task::Colorize;
  if (s == "inpaint") return Task::Inpaint;
  if (s == "uncrop") return Task::Uncrop;
  if (s == "jpeg") return Task::Jpeg;
  throw InvalidArgument(detail::concat(param, " must be colorize, inpaint, uncrop or jpeg, got '", s, "'"));
}

const char* task_name(Task t) {
  switch (t) {
    case Task::Colorize:
      return "colorize";
    case Task::Inpaint:
      return "inpaint";
    case Task::Uncrop:
      return "uncrop";
    case Task::Jpeg:
      return "jpeg";
  }
  return "?";
}

at::Tensor grayscale(const at::Tensor& rgb) {
  DMX_CHECK_ARG(rgb.dim() >= 3 && rgb.size(-3) == 3, "grayscale: expected [..., 3, H, W], got ", rgb.sizes());
  const at::Tensor x = rgb.to(at::kFloat);
  const at::Tensor l = 0.299 * x.select(-3, 0) + 0.587 * x.select(-3, 1) + 0.114 * x.select(-3, 2);
  return at::stack({l, l, l}, -3);
}

at::Tensor jpeg_roundtrip(const at::Tensor& rgb, int quality) {
  DMX_CHECK_ARG(rgb.dim() == 3 && rgb.size(0) == 3, "jpeg_roundtrip: expected [3, H, W], got ", rgb.sizes());
  DMX_CHECK_ARG(quality >= 1 && quality <= 100, "JPEG quality must be in [1, 100], got ", quality);
  const at::Tensor u8 =
      ((rgb.to(at::kFloat).clamp(-1, 1) + 1) * 127.5).round().to(at::kByte).permute({1, 2, 0}).contiguous();
  Image img;
  img.height = static_cast<int>(u8.size(0));
  img.width = static_cast<int>(u8.size(1));
  img.channels = 3;
  img.data.assign(u8.data_ptr<uint8_t>(), u8.data_ptr<uint8_t>() + u8.numel());
  const std::vector<uint8_t> bytes = encode_jpeg(img, quality);
  const Image back = to_rgb(decode_image(bytes.data(), bytes.size(), "JPEG round trip"));
  return image_to_tensor(back).squeeze(0);
}

at::Tensor center_mask(int64_t h, int64_t w) {
  check_size(h, w);
  return box(h, w, h / 4, w / 4, h / 2, w / 2);
}

at::Tensor box_mask(int64_t h, int64_t w, at::Generator& gen) {
  check_size(h, w);
  // mask.py random_bbox at 256 px: max box 128, delta 40, margin 20; here the same fractions of the size.
  const int64_t max_h = h / 2, max_w = w / 2;
  const int64_t delta_h = std::max<int64_t>(2, h * 40 / 256), delta_w = std::max<int64_t>(2, w * 40 / 256);
  const int64_t margin_h = std::max<int64_t>(1, h * 20 / 256), margin_w = std::max<int64_t>(1, w * 20 / 256);
  int64_t top = rand_int(gen, margin_h, std::max(margin_h + 1, h - margin_h - max_h));
  int64_t left = rand_int(gen, margin_w, std::max(margin_w + 1, w - margin_w - max_w));
  const int64_t dt = rand_int(gen, 0, delta_h / 2 + 1), dl = rand_int(gen, 0, delta_w / 2 + 1);
  top += dt;
  left += dl;
  const int64_t bh = std::min(max_h - dt, h - top), bw = std::min(max_w - dl, w - left);
  return box(h, w, top, left, bh, bw);
}

at::Tensor free_form_mask(int64_t h, int64_t w, at::Generator& gen) {
  check_size(h, w);
  const double scale = static_cast<double>(std::min(h, w)) / 256.0;
  const int64_t min_width = std::max<int64_t>(1, std::lround(12 * scale));
  const int64_t max_width = std::max<int64_t>(min_width + 1, std::lround(40 * scale));
  const double mean_angle = 2 * kPi / 5, angle_range = 2 * kPi / 15;
  const double avg_r = std::sqrt(static_cast<double>(h * h + w * w)) / 8;
  std::vector<float> m(static_cast<size_t>(h * w), 0.f);
  auto paint_segment = [&](double x0, double y0, double x1, double y1, double radius) {
    const double dx = x1 - x0, dy = y1 - y0, len2 = dx * dx + dy * dy;
    const int64_t ylo = std::max<int64_t>(0, static_cast<int64_t>(std::floor(std::min(y0, y1) - radius)));
    const int64_t yhi = std::min<int64_t>(h - 1, static_cast<int64_t>(std::ceil(std::max(y0, y1) + radius)));
    const int64_t xlo = std::max<int64_t>(0, static_cast<int64_t>(std::floor(std::min(x0, x1) - radius)));
    const int64_t xhi = std::min<int64_t>(w - 1, static_cast<int64_t>(std::ceil(std::max(x0, x1) + radius)));
    for (int64_t y = ylo; y <= yhi; ++y)
      for (int64_t x = xlo; x <= xhi; ++x) {
        double t = len2 > 0 ? ((x - x0) * dx + (y - y0) * dy) / len2 : 0.0;
        t = std::clamp(t, 0.0, 1.0);
        const double ex = x - (x0 + t * dx), ey = y - (y0 + t * dy);
        if (ex * ex + ey * ey <= radius * radius) m[static_cast<size_t>(y * w + x)] = 1.f;
      }
  };
  const int64_t loops = rand_int(gen, 1, 4);
  for (int64_t l = 0; l < loops; ++l) {
    const int64_t nv = rand_int(gen, 4, 12);
    const double amin = mean_angle - rand_uniform(gen, 0, angle_range);
    const double amax = mean_angle + rand_uniform(gen, 0, angle_range);
    double x = static_cast<double>(rand_int(gen, 0, w)), y = static_cast<double>(rand_int(gen, 0, h));
    const double radius = static_cast<double>(rand_int(gen, min_width, max_width)) / 2.0;
    paint_segment(x, y, x, y, radius);
    for (int64_t i = 0; i < nv; ++i) {
      double a = rand_uniform(gen, amin, amax);
      if (i % 2 == 0) a = 2 * kPi - a;
      const double r = std::clamp(rand_normal(gen, avg_r, std::floor(avg_r / 2)), 0.0, 2 * avg_r);
      const double nx = std::floor(std::clamp(x + r * std::cos(a), 0.0, static_cast<double>(w)));
      const double ny = std::floor(std::clamp(y + r * std::sin(a), 0.0, static_cast<double>(h)));
      paint_segment(x, y, nx, ny, radius);
      x = nx;
      y = ny;
    }
  }
  at::Tensor out = at::from_blob(m.data(), {1, h, w}, at::kFloat).clone();
  if (rand_int(gen, 0, 2) == 1) out = out.flip({2});
  if (rand_int(gen, 0, 2) == 1) out = out.flip({1});
  return out.contiguous();
}

at::Tensor hybrid_mask(int64_t h, int64_t w, at::Generator& gen) {
  const at::Tensor b = box_mask(h, w, gen);
  return at::maximum(b, free_form_mask(h, w, gen));
}

at::Tensor uncrop_mask(int64_t h, int64_t w, int side) {
  check_size(h, w);
  switch (side) {
    case 0:
      return box(h, w, 0, 0, h, w / 2);
    case 1:
      return box(h, w, 0, 0, h / 2, w);
    case 2:
      return box(h, w, h / 2, 0, h - h / 2, w);
    case 3:
      return box(h, w, 0, w / 2, h, w - w / 2);
    default:
      throw InvalidArgument(
          detail::concat("uncrop side must be 0 (left), 1 (top), 2 (bottom) or 3 (right), got ", side));
  }
}

at::Tensor random_mask(Task t, int64_t h, int64_t w, at::Generator& gen) {
  if (t == Task::Uncrop) return uncrop_mask(h, w, static_cast<int>(rand_int(gen, 0, 4)));
  DMX_CHECK_ARG(t == Task::Inpaint, "random_mask: task ", task_name(t), " has no mask");
  switch (rand_int(gen, 0, 3)) {
    case 0:
      return box_mask(h, w, gen);
    case 1:
      return free_form_mask(h, w, gen);
    default:
      return hybrid_mask(h, w, gen);
  }
}

at::Tensor make_condition(Task t, const at::Tensor& x, at::Generator& gen, at::Tensor* mask) {
  DMX_CHECK_ARG(x.dim() == 3 && x.size(0) == 3, "make_condition: expected [3, H, W], got ", x.sizes());
  if (mask) *mask = at::Tensor();
  switch (t) {
    case Task::Colorize:
      return grayscale(x);
    case Task::Jpeg:
      return jpeg_roundtrip(x, kJpegQualities[rand_int(gen, 0, 3)]);
    case Task::Inpaint:
    case Task::Uncrop: {
      const at::Tensor m = random_mask(t, x.size(1), x.size(2), gen);
      const at::Tensor n = at::randn(x.sizes(), gen, at::TensorOptions().dtype(at::kFloat));
      if (mask) *mask = m;
      return x.to(at::kFloat) * (1 - m) + m * n;
    }
  }
  return {};
}
}  // namespace dmx::degrade
