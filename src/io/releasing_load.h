// Loading weights without keeping the file resident: a model is loaded with its own size plus one tensor in
// memory, not plus the whole weights file (docs/performance.md, "Peak memory").
#pragma once
#include <cstddef>
#include <string>

#include "io/state_dict.h"

namespace dmx::io {

// Returns to the OS the resident pages of a tensor that is a view of a mapped safetensors file
// (SafeTensorsFile::get without a copy), once it has been read: mapped pages that were read count in the
// process's RSS until they are released or unmapped. Only whole pages inside the tensor's data (its storage's,
// when it is not contiguous) are released;
// read again, they come back from the file. The data must not have been written (a write to the private mapping
// would be dropped): loaders use it on tensors they only read. Returns the bytes released, 0 for a tensor that is
// not such a view (heap memory is never touched).
size_t release_mapped_pages(const at::Tensor& t);

// load_state_dict (strict), for a loader that needs the tensors no more: each is copied into its parameter (cast
// there: a float16 file loaded into bf16 parameters never exists in float32), then dropped from `state` and, where
// it is a view of a mapped safetensors file, its pages released. A tensor larger than chunk_bytes is copied and
// released in slices of its first dimension of about that size, so that a large float32 tensor (SD's 145 MiB token
// embedding) is never resident whole beside its bf16 copy. `state` keeps only what was not loaded.
LoadReport load_state_dict_releasing(torch::nn::Module& module, TensorMap& state, const std::string& what,
                                     size_t chunk_bytes = 16u << 20);
}  // namespace dmx::io
