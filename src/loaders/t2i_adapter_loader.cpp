// Loading T2I-Adapters (see t2i_adapter_loader.h).
#include "loaders/t2i_adapter_loader.h"

#include <algorithm>

#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/state_dict.h"
#include "io/t2i_adapter_names.h"
#include "io/torch_pickle.h"

namespace dmx::loaders {

models::T2IAdapter t2i_adapter_from_state_dict(const io::TensorMap& state, const std::string& what,
                                               const nlohmann::json& config, int num_res_blocks) {
  nlohmann::json cfg = config;
  io::TensorMap weights;
  // TencentARC's get_adapters strips an "adapter." prefix from original keys (training checkpoints carry it).
  io::TensorMap unprefixed;
  const io::TensorMap* src = &state;
  io::T2IAdapterLayout layout = io::t2i_adapter_layout(state);
  if (layout == io::T2IAdapterLayout::None && !state.empty() &&
      std::all_of(state.begin(), state.end(), [](const auto& kv) { return starts_with(kv.first, "adapter."); })) {
    for (const auto& [k, t] : state) unprefixed.emplace(k.substr(8), t);
    layout = io::t2i_adapter_layout(unprefixed);
    if (layout == io::T2IAdapterLayout::OriginalFull || layout == io::T2IAdapterLayout::OriginalLight)
      src = &unprefixed;
    else
      layout = io::T2IAdapterLayout::None;
  }
  switch (layout) {
    case io::T2IAdapterLayout::Diffusers:
      DMX_CHECK_FORMAT(!cfg.is_null(), what, ": diffusers T2IAdapter weights need their config.json");
      weights = state;
      break;
    case io::T2IAdapterLayout::OriginalFull:
    case io::T2IAdapterLayout::OriginalLight:
      if (cfg.is_null()) cfg = io::detect_original_t2i_adapter_config(*src, num_res_blocks);
      weights = io::convert_original_t2i_adapter(*src, cfg);
      break;
    case io::T2IAdapterLayout::None:
      throw FormatError(what +
                        ": not a T2I-Adapter (neither diffusers' adapter.* names nor TencentARC's conv_in / "
                        "body.<n>.* names)");
  }
  models::T2IAdapterConfig c;
  try {
    c = models::T2IAdapterConfig::from_json(cfg);
  } catch (const FormatError& e) {
    throw FormatError(what + ": " + e.what());
  }
  // The config must not describe much more than the weights hold (a hostile config.json could otherwise make
  // the model's construction allocate without bound); anything else wrong is the strict load's report.
  double held = 0;
  for (const auto& kv : weights) held += static_cast<double>(kv.second.numel());
  DMX_CHECK_FORMAT(c.num_parameters() <= held + io::kLoadSlackParameters, what, ": the config (", c.adapter_type,
                   ", in_channels ", c.in_channels, ", channels ", nlohmann::json(c.channels).dump(),
                   ", num_res_blocks ", c.num_res_blocks, ", downscale_factor ", c.downscale_factor, ") describes ",
                   static_cast<int64_t>(std::min(c.num_parameters(), 9e18)), " parameters, but the weights hold ",
                   static_cast<int64_t>(held));
  models::T2IAdapter adapter(c);
  io::load_state_dict(*adapter, weights, what);
  adapter->eval();
  return adapter;
}

models::T2IAdapter load_t2i_adapter(const std::string& path, at::ScalarType dtype, int num_res_blocks) {
  DMX_CHECK_ARG(!path.empty(), "--adapter: no path given");
  DMX_CHECK_ARG(path_exists(path), "--adapter: path not found: ", path);
  models::T2IAdapter adapter{nullptr};
  if (is_directory(path)) {
    const std::string config = join_path(path, "config.json");
    DMX_CHECK_ARG(path_exists(config), "--adapter: ", path, " is not a diffusers T2IAdapter folder (no config.json)");
    std::string dir = path;
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    const size_t slash = dir.find_last_of('/');
    const std::string parent = slash == std::string::npos ? "." : dir.substr(0, std::max<size_t>(slash, 1));
    const std::string name = slash == std::string::npos ? dir : dir.substr(slash + 1);
    adapter = t2i_adapter_from_state_dict(io::load_diffusers_component(parent, name), path,
                                          io::load_json_file(config, "T2IAdapter config"), num_res_blocks);
  } else if (ends_with(to_lower_ascii(path), ".safetensors")) {
    adapter = t2i_adapter_from_state_dict(io::load_safetensors(path), path, nullptr, num_res_blocks);
  } else {
    // TencentARC's .pth (and any torch.save state dict): read by the weights-only reader, nothing in it runs.
    const std::string lower = to_lower_ascii(path);
    const bool pickle_name =
        ends_with(lower, ".pth") || ends_with(lower, ".pt") || ends_with(lower, ".bin") || ends_with(lower, ".ckpt");
    DMX_CHECK_ARG(pickle_name || io::looks_like_torch_file(path), "--adapter: ", path,
                  " is neither a diffusers T2IAdapter folder nor a .safetensors / .pth adapter checkpoint");
    adapter =
        t2i_adapter_from_state_dict(io::torch_state_dict(*io::load_torch_file(path)), path, nullptr, num_res_blocks);
  }
  adapter->to(dtype);
  return adapter;
}
}  // namespace dmx::loaders
