// Loading T2I-Adapters (models/t2i_adapter.h): diffusers folders and original TencentARC checkpoints.
#pragma once
#include <ATen/core/Tensor.h>

#include <nlohmann/json.hpp>
#include <string>

#include "io/safetensors.h"
#include "models/t2i_adapter.h"

namespace dmx::loaders {

// path: a diffusers T2IAdapter folder (config.json + diffusion_pytorch_model.safetensors, what
// T2IAdapter.save_pretrained writes), or one file with an original TencentARC state dict (conv_in /
// body.<n>.block1 ...: converted at load, config detected from shapes; num_res_blocks splits a full adapter's
// flat body, 2 for TencentARC's releases): their own .pth (a torch.save pickle, read by the weights-only reader
// of io/torch_pickle.h, nothing in it runs) or a .safetensors copy. The model is in eval mode, in `dtype`.
models::T2IAdapter load_t2i_adapter(const std::string& path, at::ScalarType dtype = at::kFloat, int num_res_blocks = 2);

// The seam for any source of an adapter state dict: diffusers names (adapter.*, needs `config`, the folder's
// config.json) or original names (converted; config detected unless given; an "adapter." prefix on every key,
// as TencentARC's training checkpoints have, is dropped as their loader drops it). Strict loading.
models::T2IAdapter t2i_adapter_from_state_dict(const io::TensorMap& state, const std::string& what,
                                               const nlohmann::json& config = nullptr, int num_res_blocks = 2);
}  // namespace dmx::loaders
