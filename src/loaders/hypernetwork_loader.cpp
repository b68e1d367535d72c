// Loading AUTOMATIC1111 hypernetworks (see hypernetwork_loader.h).
#include "loaders/hypernetwork_loader.h"

#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/torch_pickle.h"

namespace dmx::loaders {

namespace {
std::string a_kind(const io::PickleValue& v) {
  const std::string k = v.kind_name();
  return (k == "int" || k == "OrderedDict" ? "an " : "a ") + k;
}

// The fields (A1111's dict minus the modules) and the tensors: the config, then the modules.
models::Hypernetwork from_fields(const io::TensorMap& tensors, const nlohmann::json& fields, const std::string& what,
                                 const std::string& default_name) {
  models::HypernetworkConfig cfg;
  try {
    cfg = models::HypernetworkConfig::from_json(fields);
  } catch (const FormatError& e) {
    throw FormatError(what + ": " + e.what());
  }
  if (cfg.name.empty()) cfg.name = default_name;
  return models::hypernetwork_from_state_dict(tensors, cfg, what);
}
}  // namespace

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
  return from_fields(tensors, j, what, default_name);
}

models::Hypernetwork hypernetwork_from_torch_file(const io::TorchFile& file, const std::string& default_name) {
  // Hypernetwork.load: every int key is a width holding (k state dict, v state dict); the str keys are the fields.
  using Kind = io::PickleValue::Kind;
  const io::PickleValue root = file.root();
  DMX_CHECK_FORMAT(root.is_dict(), root.where(),
                   " must be an A1111 hypernetwork dict ({width: (k_state_dict, v_state_dict), 'layer_structure': "
                   "..., ...}), got ",
                   a_kind(root));
  io::TensorMap tensors;
  nlohmann::json fields = nlohmann::json::object();
  for (const auto& [key, value] : root.items()) {
    if (key.kind() == Kind::Int) {  // type(size) == int (a bool is not)
      const int64_t width = key.as_int();
      DMX_CHECK_FORMAT(width > 0, value.where(), ": a module width must be > 0, got ", width);
      DMX_CHECK_FORMAT(value.is_sequence() && value.size() == 2, value.where(),
                       " must be a pair (k state dict, v state dict), got ", a_kind(value),
                       value.is_sequence() ? " of " + std::to_string(value.size()) : std::string());
      for (size_t i = 0; i < 2; ++i) {
        const io::PickleValue sd = value[i];
        DMX_CHECK_FORMAT(sd.is_dict(), sd.where(), " must be a state dict, got ", a_kind(sd));
        for (const auto& [name, t] : sd.items()) {
          DMX_CHECK_FORMAT(name.is_string(), sd.where(), ": state dict keys must be strings, got ", a_kind(name));
          const std::string full = std::to_string(width) + (i == 0 ? ".k." : ".v.") + name.as_string();
          DMX_CHECK_FORMAT(tensors.emplace(full, t.as_tensor()).second, t.where(), ": given twice");
        }
      }
    } else if (key.is_string()) {
      fields[key.as_string()] = value.to_json();
    }
    // Keys of other kinds: Hypernetwork.load reads none of them.
  }
  return from_fields(tensors, fields, file.what(), default_name);
}

models::Hypernetwork load_hypernetwork(const std::string& path) {
  DMX_CHECK_ARG(!path.empty(), "--hypernetwork: no path given");
  DMX_CHECK_ARG(path_exists(path) && !is_directory(path), "--hypernetwork: file not found: ", path);
  if (ends_with(to_lower_ascii(path), ".safetensors")) {
    auto f = io::SafeTensorsFile::open(path);
    return hypernetwork_from_flat(f->load_all(), f->metadata(), path, file_stem(path));
  }
  // A1111's own .pt: a torch.save pickle, read by the weights-only reader (nothing in it runs).
  const std::string lower = to_lower_ascii(path);
  const bool pickle_name =
      ends_with(lower, ".pt") || ends_with(lower, ".pth") || ends_with(lower, ".bin") || ends_with(lower, ".ckpt");
  DMX_CHECK_ARG(pickle_name || io::looks_like_torch_file(path), "--hypernetwork ", path,
                ": neither a .safetensors file nor a torch.save file (A1111's .pt)");
  return hypernetwork_from_torch_file(*io::load_torch_file(path), file_stem(path));
}
}  // namespace dmx::loaders
