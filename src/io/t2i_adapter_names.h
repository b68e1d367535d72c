// Original TencentARC T2I-Adapter checkpoints (github.com/TencentARC/T2I-Adapter, ldm/modules/encoders/
// adapter.py: `Adapter` with conv_in + body.<n>.{in_conv, block1, block2}, `Adapter_light` with
// body.<k>.{in_conv, body.<j>.{block1, block2}, out_conv}) -> diffusers T2IAdapter names, as diffusers 0.27.2's
// scripts/convert_original_t2i_adapter.py converts them, written as tables (t2i_adapter_tables.cpp) and done at
// load. Inputs are state dicts (name -> tensor): what a .safetensors copy holds, or what the weights-only
// torch.save reader returns for a .pth.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "io/safetensors.h"

namespace dmx::io {

enum class T2IAdapterLayout { None, Diffusers, OriginalFull, OriginalLight };
// Which layout a state dict has, from its key names.
T2IAdapterLayout t2i_adapter_layout(const TensorMap& state);

// diffusers T2IAdapter config.json of an original checkpoint, from tensor shapes: in_channels (conv_in / the
// first in_conv read in_channels x 64 unshuffled channels), channels, num_res_blocks, adapter_type. A full
// adapter's body is a flat list of levels x num_res_blocks blocks, which its shapes cannot split: TencentARC's
// released full adapters use 2 blocks per level (nums_rb=2), the default here. Variants diffusers' T2IAdapter
// cannot express (sk=False `skep` convolutions, use_conv=True `down_opt.op` downsamplers, ksize 3 block2) are
// Unsupported; anything else malformed is a FormatError.
nlohmann::json detect_original_t2i_adapter_config(const TensorMap& state, int num_res_blocks = 2);

// Original names -> diffusers names (adapter.conv_in, adapter.body.<k>.in_conv / resnets.<j>.block1 / block2 /
// out_conv) for the given (detected) config. Every key must map (FormatError listing those that do not).
TensorMap convert_original_t2i_adapter(const TensorMap& state, const nlohmann::json& adapter_config);
}  // namespace dmx::io
