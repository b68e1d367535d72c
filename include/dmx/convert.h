// `dmx convert`: stores the weights of a model (a diffusers folder, a ControlNet folder or a single
// .safetensors file such as a LoRA) in another floating-point type, e.g. fp16 to halve what a model takes on
// disk. Integer tensors and metadata are kept; other files of a folder are copied as they are. dmx and
// diffusers load fp16-stored weights into float32 models. Written into a temporary path and renamed.
#pragma once
#include <cstdint>
#include <string>

namespace dmx {
struct ConvertOptions {
  std::string input, output;
  std::string dtype = "fp16";  // fp16 | bf16 | fp32
  bool overwrite = false;
};
struct ConvertReport {
  int files = 0;             // .safetensors files converted
  int64_t tensors = 0;       // floating tensors cast
  uint64_t bytes_in = 0, bytes_out = 0;  // total size of the .safetensors files
};
ConvertReport convert_weights(const ConvertOptions& o);
}  // namespace dmx
