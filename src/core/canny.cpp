#include "core/canny.h"

#include <cmath>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include "dmx/error.h"

namespace dmx {

Image canny_edges(const Image& rgb, double low, double high) {
  DMX_CHECK_ARG(std::isfinite(low) && low >= 0 && low <= 2040, "--canny-low must be in [0, 2040], got ", low);
  DMX_CHECK_ARG(std::isfinite(high) && high >= 0 && high <= 2040, "--canny-high must be in [0, 2040], got ", high);
  DMX_CHECK_ARG(low <= high, "--canny-low (", low, ") must be <= --canny-high (", high, ")");
  DMX_CHECK_ARG(rgb.channels == 3 && rgb.width > 0 && rgb.height > 0 &&
                    rgb.data.size() == static_cast<size_t>(rgb.width) * rgb.height * 3,
                "canny: expected a 3-channel RGB image, got ", rgb.width, "x", rgb.height, "x", rgb.channels);
  // OpenCV does not modify the input: wrap the bytes without a copy.
  const cv::Mat in(rgb.height, rgb.width, CV_8UC3, const_cast<uint8_t*>(rgb.data.data()));
  cv::Mat edges;
  cv::Canny(in, edges, low, high);  // apertureSize 3, L2gradient false: cv2.Canny's defaults
  Image out;
  out.width = rgb.width;
  out.height = rgb.height;
  out.channels = 3;
  out.data.resize(static_cast<size_t>(rgb.width) * rgb.height * 3);
  for (int y = 0; y < rgb.height; ++y) {
    const uint8_t* row = edges.ptr<uint8_t>(y);
    for (int x = 0; x < rgb.width; ++x)
      for (int c = 0; c < 3; ++c) out.data[(static_cast<size_t>(y) * rgb.width + x) * 3 + c] = row[x];
  }
  return out;
}
}  // namespace dmx
