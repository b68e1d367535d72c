// Loading AUTOMATIC1111 hypernetworks (models/hypernetwork.h).
#pragma once
#include <map>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "models/hypernetwork.h"

namespace dmx::io {
class TorchFile;
class PyValue;
}  // namespace dmx::io

namespace dmx::loaders {

// path: A1111's own .pt (a torch.save of {width: (k_state_dict, v_state_dict), 'layer_structure': ..., ...},
// read by the weights-only torch.save reader: nothing in the file runs), or a .safetensors copy (FIXTURES.md's
// layout: tensors "<dim>.k.linear.<i>.*" / "<dim>.v.*", A1111's other fields JSON-encoded in the metadata; also
// what `dmx convert` makes of a .pt, "<dim>.0.*" / "<dim>.1.*"). The name is the file's stem unless the file
// names itself ("name" field). Malformed or hostile files: FormatError naming the key or value.
models::Hypernetwork load_hypernetwork(const std::string& path);

// A1111's dict as the torch.save reader returns it (Hypernetwork.load): int keys are widths holding a (k, v) pair
// of state dicts, str keys the fields; keys of other kinds are ignored, as A1111 does.
models::Hypernetwork hypernetwork_from_torch_file(const io::TorchFile& file, const std::string& default_name);

// The seam for any flat source: tensors named "<dim>.<k|v|0|1>.<module key>" and the other fields of A1111's dict
// as JSON text by key (safetensors metadata, or a flattened torch.save). A field that is not JSON is a
// FormatError naming it; "format" (the safetensors file's own tag) is skipped.
models::Hypernetwork hypernetwork_from_flat(const io::TensorMap& tensors,
                                            const std::map<std::string, std::string>& fields, const std::string& what,
                                            const std::string& default_name);

// Writing (what `dmx train hypernetwork` saves), by the extension of `path`:
//   .pt / .pth   A1111's own file: torch.save (io/torch_save.h) of the dict Hypernetwork.save writes,
//                {width: (k_state_dict, v_state_dict) in hn's width order, 'step', 'name', 'layer_structure',
//                'activation_func', 'is_layer_norm', 'weight_initialization', 'sd_checkpoint', 'sd_checkpoint_name',
//                'activate_output', 'use_dropout', 'dropout_structure', 'last_layer_dropout', 'optional_info'},
//                state dicts as OrderedDicts of float tensors "linear.<i>.weight" / "linear.<i>.bias";
//   .safetensors tensors "<width>.k.linear.<i>.*" / "<width>.v.linear.<i>.*", the same fields JSON-encoded in the
//                metadata (plus "format": "a1111-hypernetwork").
// Written to a temporary and renamed. InvalidArgument naming --output for another extension.
void save_hypernetwork(const models::Hypernetwork& hn, const std::string& path);
// The dict A1111's Hypernetwork.save hands to torch.save, and its non-module fields (the .safetensors metadata).
io::PyValue hypernetwork_torch_value(const models::Hypernetwork& hn);
std::map<std::string, std::string> hypernetwork_metadata(const models::Hypernetwork& hn);
// Whether `path` names a file save_hypernetwork writes as a torch.save pickle (.pt / .pth), or as .safetensors.
bool hypernetwork_pickle_output(const std::string& path);

// One hypernetwork of a run: the file and its multiplier (A1111's "strength").
struct HypernetworkSpec {
  std::string path;
  double multiplier = 1.0;
  std::string name;  // the tag's NAME, or the file's stem (metadata)
};

// "--hypernetwork FILE[:MULT]": MULT a finite number (default 1); a path that exists as given keeps its colons.
// InvalidArgument naming --hypernetwork and the value otherwise.
HypernetworkSpec parse_hypernetwork_arg(const std::string& arg);

// A1111's extra-network syntax: removes every `<hypernet:NAME>` or `<hypernet:NAME:MULT>` tag from `prompt`
// (appending them to `out` in order, path = NAME, multiplier default 1) and returns the cleaned prompt; other
// tags (LoRA) stay. A malformed multiplier or a tag without a name: InvalidArgument naming the tag.
std::string extract_prompt_hypernetworks(const std::string& prompt, std::vector<HypernetworkSpec>& out);

// DIR/NAME.pt, else DIR/NAME.safetensors (NAME may carry either extension), confined to the folder: no absolute
// name, no '.' or '..' component, no symlink leading out (prompts also come from --from, i.e. any PNG).
// InvalidArgument naming NAME when --hypernetwork-dir is empty, the file is missing or lies outside.
std::string resolve_hypernetwork_name(const std::string& dir, const std::string& name);
}  // namespace dmx::loaders
