// Loading AUTOMATIC1111 hypernetworks (see hypernetwork_loader.h).
#include "loaders/hypernetwork_loader.h"

#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"

namespace dmx::loaders {

models::Hypernetwork hypernetwork_from_flat(const io::TensorMap& tensors,
                                            const std::map<std::string, std::string>& fields, const std::string& what,
                                            const std::string& default_name) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [key, text] : fields) {
    if (key == "format") continue;
    try {
      j[key] = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception&) {
      throw FormatError(what + ": field '" + key + "' is not JSON: " + text.substr(0, 80));
    }
  }
  models::HypernetworkConfig cfg;
  try {
    cfg = models::HypernetworkConfig::from_json(j);
  } catch (const FormatError& e) {
    throw FormatError(what + ": " + e.what());
  }
  if (cfg.name.empty()) cfg.name = default_name;
  return models::hypernetwork_from_state_dict(tensors, cfg, what);
}

models::Hypernetwork load_hypernetwork(const std::string& path) {
  DMX_CHECK_ARG(!path.empty(), "--hypernetwork: no path given");
  DMX_CHECK_ARG(path_exists(path) && !is_directory(path), "--hypernetwork: file not found: ", path);
  const std::string lower = to_lower_ascii(path);
  if (ends_with(lower, ".safetensors")) {
    auto f = io::SafeTensorsFile::open(path);
    return hypernetwork_from_flat(f->load_all(), f->metadata(), path, file_stem(path));
  }
  // .pt: A1111's torch.save of {dim: (k_sd, v_sd), 'layer_structure': ...}. Through the weights-only reader
  // (io/torch_pickle.h, being written): flat = io::flatten_torch_file(*io::load_torch_file(path));
  // hypernetwork_from_flat(flat.tensors, flat.metadata, path, file_stem(path)).
  throw Unsupported("--hypernetwork " + path +
                    ": A1111 .pt files are pickles and need dmx's weights-only torch.save reader, which this build "
                    "does not have yet; use a .safetensors copy");
}
}  // namespace dmx::loaders
