// Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"), as
// torch.utils.checkpoint(use_reentrant=True) does it: the forward runs without recording a graph; backward
// runs it again with grad enabled and backpropagates through the recomputed graph, accumulating into the
// parameters it uses. The wrapped function must be deterministic (the blocks of the UNet are: no dropout).
// libtorch 1.13's C++ API has no torch.utils.checkpoint, hence this autograd::Function.
// Internal header of the nn layer.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

namespace dmx::nn {

using CheckpointFn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

// Returns fn(inputs); undefined inputs are passed through as undefined. When grad mode is off this is
// simply fn(inputs).
std::vector<at::Tensor> checkpoint(CheckpointFn fn, const std::vector<at::Tensor>& inputs);
}  // namespace dmx::nn
