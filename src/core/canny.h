// Canny edge map for ControlNet (Canny 1986), computed with OpenCV's cv::Canny exactly as diffusers'
// ControlNet documentation prepares it: cv2.Canny(np.array(rgb_image), low, high) on the 8-bit RGB array
// (OpenCV takes the strongest channel gradient), then the single-channel map repeated to 3 channels.
#pragma once
#include "core/image.h"

namespace dmx {
// rgb: 3-channel image. Thresholds: 0 <= low <= high <= 2040 (the largest L1 Sobel magnitude of 8-bit data),
// else InvalidArgument naming --canny-low / --canny-high. Returns a 3-channel image of 0 / 255.
Image canny_edges(const Image& rgb, double low_threshold, double high_threshold);
}  // namespace dmx
