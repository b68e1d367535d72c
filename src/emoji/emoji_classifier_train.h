// Training of the emoji classifier (emoji/emoji_classifier.h) on real emoji images: cross-entropy on the
// concept (label smoothing 0.1) + 0.5 x cross-entropy on the style, AdamW (training/trainer.h) with linear
// warm-up and cosine decay, gradient clipping at 1. Augmentations make it robust to generated images.
// Internal header.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "dmx/eval.h"

namespace dmx::emoji {

// x: [B, 3, H, W] in [0, 1] on a white background. Per image, from `gen`: random affine (scale 0.85-1.15,
// shift up to 10% of the side, rotation up to 10 degrees; the uncovered border is white), Gaussian blur
// (half the images, sigma up to 1.2), colour jitter (brightness +-0.08, contrast and saturation 0.85-1.15),
// Gaussian noise (sigma up to 0.04). Returns [B, 3, H, W] in [0, 1].
at::Tensor augment_emoji_batch(const at::Tensor& x, at::Generator& gen);

ClassifierTrainResult train_emoji_classifier(const ClassifierTrainOptions& o);
}  // namespace dmx::emoji
