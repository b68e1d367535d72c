// Palette's degradations (Saharia et al. 2022, "Palette: Image-to-Image Diffusion Models"; the masks follow the
// unofficial code, Janspiry/Palette-Image-to-Image-Diffusion-Models data/util/mask.py, scaled to any size):
// grayscale (colorization), hole masks of several shapes (inpainting), half-image borders (uncropping) and a JPEG
// round trip through libjpeg (JPEG restoration). Pictures are tensors [3, H, W] (or [B, 3, H, W]) in [-1, 1]; masks
// are [1, H, W] float32 with 1 = unknown (to fill), 0 = known. Random draws come from the caller's generator, so a
// training step is reproducible and every rank draws alike. docs/palette.md.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace dmx::degrade {

enum class Task { Colorize, Inpaint, Uncrop, Jpeg };
// colorize | inpaint | uncrop | jpeg; InvalidArgument naming `param` otherwise.
Task parse_task(const std::string& s, const std::string& param = "--task");
const char* task_name(Task t);
// Inpainting and uncropping take a mask; the known region is pasted back while sampling.
inline bool task_has_mask(Task t) { return t == Task::Inpaint || t == Task::Uncrop; }

// The qualities of JPEG restoration's training inputs, as the paper (5, 10, 20), drawn uniformly.
constexpr int kJpegQualities[3] = {5, 10, 20};

// Luma by ITU-R 601-2 (PIL's convert("L")): 0.299 R + 0.587 G + 0.114 B, replicated to the 3 channels.
at::Tensor grayscale(const at::Tensor& rgb);
// Quantises to 8 bits (round((x + 1) * 127.5)), encodes a baseline JPEG at `quality` (1..100) with libjpeg and
// decodes it back: [3, H, W] in [-1, 1].
at::Tensor jpeg_roundtrip(const at::Tensor& rgb, int quality);

// Masks [1, h, w] (1 = hole).
// A box in the middle: rows [h/4, h/4 + h/2), columns [w/4, w/4 + w/2) (Palette's "center" test mask).
at::Tensor center_mask(int64_t h, int64_t w);
// A random box (mask.py random_bbox scaled from 256 px: largest box h/2 x w/2, shrunk by up to h/8 (w/8), at least
// h/16 (w/16) from the borders).
at::Tensor box_mask(int64_t h, int64_t w, at::Generator& gen);
// Free-form brush strokes (mask.py brush_stroke_mask, DeepFill v2's: 1 to 4 strokes of 4 to 12 vertices, random
// angles, segment lengths up to h/4 and widths from h/21 to h/6.4, i.e. 12..40 px at 256).
at::Tensor free_form_mask(int64_t h, int64_t w, at::Generator& gen);
// box_mask | free_form_mask (mask.py's "hybrid", the training masks of Palette's inpainting configs).
at::Tensor hybrid_mask(int64_t h, int64_t w, at::Generator& gen);
// Uncropping (mask.py random_cropping_bbox "onedirection"): side 0 = left half unknown, 1 = top, 2 = bottom,
// 3 = right.
at::Tensor uncrop_mask(int64_t h, int64_t w, int side);
// One training mask of the task: inpaint draws box, free-form or hybrid with equal odds, then that mask; uncrop a
// side (0..3). InvalidArgument for the tasks without a mask.
at::Tensor random_mask(Task t, int64_t h, int64_t w, at::Generator& gen);

// An integer drawn uniformly from [lo, hi) with `gen` (lo < hi).
int64_t rand_int(at::Generator& gen, int64_t lo, int64_t hi);

// The condition of one training example x ([3, H, W]), drawn with gen: grayscale; JPEG at a quality drawn from
// kJpegQualities; for the masked tasks x outside the mask and Gaussian noise inside it (the unofficial code's
// cond_image = x (1 - m) + m n). `mask` receives the mask of the masked tasks (undefined otherwise).
at::Tensor make_condition(Task t, const at::Tensor& x, at::Generator& gen, at::Tensor* mask);
}  // namespace dmx::degrade
