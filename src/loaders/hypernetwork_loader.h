// Loading AUTOMATIC1111 hypernetworks (models/hypernetwork.h).
#pragma once
#include <map>
#include <string>

#include "io/safetensors.h"
#include "models/hypernetwork.h"

namespace dmx::loaders {

// path: a .safetensors hypernetwork (FIXTURES.md's layout: tensors "<dim>.k.linear.<i>.*" / "<dim>.v.*", A1111's
// other fields JSON-encoded in the metadata; also what `dmx convert` makes of a .pt, "<dim>.0.*" / "<dim>.1.*").
// A1111's own .pt files are torch.save pickles: they load through the weights-only reader, flattened into the
// same two parts (tensors and fields), then hypernetwork_from_flat (until that reader is in, Unsupported
// naming the file). The name is the file's stem unless the file names itself ("name" field).
models::Hypernetwork load_hypernetwork(const std::string& path);

// The seam for any source: tensors named "<dim>.<k|v|0|1>.<module key>" and the other fields of A1111's dict
// as JSON text by key (safetensors metadata, or a flattened torch.save). A field that is not JSON is a
// FormatError naming it; "format" (the safetensors file's own tag) is skipped.
models::Hypernetwork hypernetwork_from_flat(const io::TensorMap& tensors,
                                            const std::map<std::string, std::string>& fields, const std::string& what,
                                            const std::string& default_name);
}  // namespace dmx::loaders
