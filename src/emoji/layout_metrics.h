// The measures of a picture made from a layout (docs/layouts.md), on tensors: the foreground mask of an emoji
// picture, the IoU of a region against it, and the square crop of a region the emoji classifier reads.
// Internal header of the emoji module.
#pragma once
#include <ATen/core/Tensor.h>

namespace dmx::emoji {

// The foreground of an emoji picture [3, H, W] in [0, 1] on a plain background of gray level `background`
// (1 = white, the emoji set's default): a pixel is background-coloured when every channel is within
// `threshold` of it; the background is the background-coloured pixels 4-connected to the picture's border, and
// the foreground everything else (so white eyes and teeth inside an emoji count as foreground). [H, W] bool.
at::Tensor foreground_mask(const at::Tensor& chw01, double background = 1.0, double threshold = 0.1);

// The IoU of region k against the foreground where other regions do not claim it:
//   |R ∩ F| / |R ∪ (F \ O)|,  R the region, O the union of the other regions, F the foreground ([H, W] bool).
// Foreground in the layout's background counts against every region; an object drawn over another region counts
// against neither. 1 when R and F \ O are both empty.
double region_iou(const at::Tensor& region, const at::Tensor& others, const at::Tensor& foreground);

// What the classifier reads for a region: the picture with every pixel outside the region set to white (the
// background), cut to the square around the region's bounding box (side = the box's longer side, centred on the
// box; beyond the picture white), resized bilinearly to side x side: [3, side, side] in [0, 1]. Neighbours and
// occluders are left out; an object drawn beyond its region loses what lies outside. InvalidArgument for an empty
// region.
at::Tensor region_crop(const at::Tensor& chw01, const at::Tensor& region, int side = 64);

// The rank of `label` in one row of logits [C] (0 = the top-1).
int64_t label_rank(const at::Tensor& logits, int64_t label);
}  // namespace dmx::emoji
