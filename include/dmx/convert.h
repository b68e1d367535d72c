// `dmx convert`: stores the weights of a model (a diffusers folder, a ControlNet folder or a single
// .safetensors file such as a LoRA) in another floating-point type, e.g. fp16 to halve what a model takes on
// disk. Integer tensors and metadata are kept; other files of a folder are copied as they are. dmx and
// diffusers load fp16-stored weights into float32 models. Written into a temporary path and renamed.
// A torch.save pickle (.ckpt, .pt, .pth, .bin) is read by the weights-only loader (docs/pickle.md: nothing
// in it is executed) and written as one .safetensors file: the state dict's tensors under their names
// (the dict under "state_dict" in .ckpt files), other tensors under their '.'-joined path, and every other
// value as JSON text in the metadata.
#pragma once
#include <cstdint>
#include <string>

namespace dmx {
struct ConvertOptions {
  std::string input, output;
  std::string dtype = "fp16";  // fp16 | bf16 | fp32 | keep
  bool overwrite = false;
};
struct ConvertReport {
  int files = 0;        // .safetensors files converted
  int64_t tensors = 0;  // floating tensors cast
  int64_t tensors_written = 0;
  int metadata_entries = 0;              // non-tensor values of a pickle, stored as JSON metadata
  std::string source_format;             // a pickle's container: "zip" | "legacy"
  uint64_t bytes_in = 0, bytes_out = 0;  // total size of the input and output weight files
};
ConvertReport convert_weights(const ConvertOptions& o);
}  // namespace dmx
