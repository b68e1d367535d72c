// Checkpoint formats: diffusers folders and original single-file checkpoints.
// Mirrors diffusers 0.27.2 FromSingleFileMixin.from_single_file (loaders/single_file.py) for what is
// loaded and ModelMixin / transformers from_pretrained for the folder layout (weights file names,
// fp16 variants, sharded *.safetensors.index.json). The name tables live in ldm_names.cpp.
#include "io/checkpoint.h"

#include <cctype>
#include <cstdio>
#include <functional>
#include <set>
#include <vector>

#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/ldm_names.h"
#include "io/torch_pickle.h"

namespace dmx::io {
namespace {

using nlohmann::json;

std::string lower_extension(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  const size_t dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return "";
  std::string ext = path.substr(dot);
  for (char& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return ext;
}

std::string directory_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// The LDM .yaml beside a checkpoint: <stem>.yaml or <stem>-inference.yaml.
json find_ldm_yaml(const std::string& path) {
  const std::string base = join_path(directory_of(path), file_stem(path));
  for (const std::string& candidate : {base + ".yaml", base + "-inference.yaml"}) {
    if (path_exists(candidate) && !is_directory(candidate))
      return parse_ldm_yaml(read_text_file(candidate, "LDM config", kMaxJsonFileBytes), candidate);
  }
  return nullptr;
}

TensorMap load_sharded(const std::string& folder, const std::string& index_path, const std::string& component) {
  const json index = load_json_file(index_path, component + " weight index");
  DMX_CHECK_FORMAT(index.contains("weight_map") && index["weight_map"].is_object(), index_path,
                   ": a sharded weight index needs a \"weight_map\" object");
  std::map<std::string, std::set<std::string>> by_file;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    DMX_CHECK_FORMAT(it.value().is_string(), index_path, ": weight_map[\"", it.key(), "\"] must be a file name");
    const std::string file = it.value().get<std::string>();
    DMX_CHECK_FORMAT(file.find('/') == std::string::npos && file != ".." && !file.empty(), index_path,
                     ": shard name must be a plain file name, got '", file, "'");
    by_file[file].insert(it.key());
  }
  TensorMap out;
  for (const auto& [file, names] : by_file) {
    TensorMap shard = load_weights_file(join_path(folder, file));
    for (const auto& name : names) {
      auto t = shard.find(name);
      DMX_CHECK_FORMAT(t != shard.end(), index_path, ": '", name, "' is listed in ", file, " but not stored there");
      out[name] = t->second;
    }
    for (const auto& kv : shard)
      DMX_CHECK_FORMAT(names.count(kv.first), index_path, ": ", file, " holds '", kv.first,
                       "', which the weight map does not list");
  }
  return out;
}

// A component config: config_dir/<component>/<file> when present, else the detected one.
json component_config(const std::string& config_dir, const std::string& component, const std::string& file,
                      const std::function<json()>& detect) {
  if (!config_dir.empty()) {
    const std::string p = join_path(join_path(config_dir, component), file);
    if (path_exists(p)) return load_json_file(p, component + " config");
  }
  return detect();
}

}  // namespace

TensorMap load_weights_file(const std::string& path) {
  DMX_CHECK_ARG(path_exists(path), "weights file not found: ", path);
  DMX_CHECK_ARG(!is_directory(path), "expected a weights file, got a directory: ", path);
  const std::string ext = lower_extension(path);
  if (ext == ".safetensors") return load_safetensors(path);
  if (ext == ".ckpt" || ext == ".pt" || ext == ".pth" || ext == ".bin" || ext == ".pkl" || looks_like_torch_file(path))
    return torch_state_dict(*load_torch_file(path));
  return load_safetensors(path);
}

json load_json_file(const std::string& path, const std::string& what) {
  const std::string text = read_text_file(path, what, kMaxJsonFileBytes);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw FormatError(detail::concat(what, ": ", path, " is not valid JSON: ", e.what()));
  }
}

TensorMap load_diffusers_component(const std::string& dir, const std::string& component) {
  DMX_CHECK_ARG(is_directory(dir), component, ": diffusers model folder not found: ", dir);
  const std::string folder = join_path(dir, component);
  DMX_CHECK_FORMAT(is_directory(folder), component, ": folder not found: ", folder,
                   " (expected a diffusers layout with ", component, "/ inside ", dir, ")");
  // Plain weights first; sharded; then the fp16 variant when it is the only one there; then the same as
  // torch.save pickles (read by the weights-only loader), as diffusers falls back to them.
  const std::vector<std::string> candidates = {
      "diffusion_pytorch_model.safetensors",
      "model.safetensors",
      "diffusion_pytorch_model.safetensors.index.json",
      "model.safetensors.index.json",
      "diffusion_pytorch_model.fp16.safetensors",
      "model.fp16.safetensors",
      "diffusion_pytorch_model.bin",
      "pytorch_model.bin",
      "diffusion_pytorch_model.bin.index.json",
      "pytorch_model.bin.index.json",
      "diffusion_pytorch_model.fp16.bin",
      "pytorch_model.fp16.bin",
  };
  for (const auto& name : candidates) {
    const std::string p = join_path(folder, name);
    if (!path_exists(p)) continue;
    if (name.size() > 11 && name.compare(name.size() - 11, 11, ".index.json") == 0)
      return load_sharded(folder, p, component);
    return load_weights_file(p);
  }
  // A folder without its weights is a malformed model (invalid input), not an I/O failure.
  throw FormatError(
      detail::concat(component, ": no weights found in ", folder, ": looked for ", join_abbreviated(candidates, 99)));
}

SingleFileCheckpoint load_single_file(const std::string& path, const std::string& config_dir) {
  DMX_CHECK_ARG(path_exists(path), "checkpoint not found: ", path);
  DMX_CHECK_ARG(!is_directory(path), "expected a single-file checkpoint, got a directory: ", path,
                " (a diffusers folder is loaded as a folder, not with a single-file loader)");
  if (!config_dir.empty())
    DMX_CHECK_ARG(is_directory(config_dir), "--config must be a diffusers model folder, not found: ", config_dir);

  // .safetensors, or a torch.save pickle (.ckpt/.pt/.pth/.bin) through the weights-only loader.
  const TensorMap ckpt = load_weights_file(path);

  // Sort every key into a component, or report it.
  size_t n_unet = 0, n_vae = 0, n_text = 0;
  std::vector<std::string> unknown, control, sdxl;
  for (const auto& kv : ckpt) {
    const std::string& k = kv.first;
    if (is_ignorable_ldm_key(k)) continue;
    if (starts_with(k, kLdmUnetPrefix))
      ++n_unet;
    else if (starts_with(k, kLdmVaePrefix))
      ++n_vae;
    else if (starts_with(k, kLdmClipPrefix) || starts_with(k, kLdmOpenClipPrefix))
      ++n_text;
    else if (starts_with(k, "control_model."))
      control.push_back(k);
    else if (starts_with(k, "conditioner."))
      sdxl.push_back(k);
    else
      unknown.push_back(k);
  }
  DMX_CHECK_SUPPORTED(sdxl.empty(), path, ": SDXL single-file checkpoints (conditioner.* keys) are not supported");
  DMX_CHECK_SUPPORTED(control.empty(), path,
                      ": this checkpoint carries ControlNet weights (control_model.*); original-layout ControlNet "
                      "checkpoints are not loaded as a Stable Diffusion model");
  std::vector<std::string> missing;
  if (!n_unet) missing.push_back(std::string("UNet (") + kLdmUnetPrefix + "*)");
  if (!n_vae) missing.push_back(std::string("VAE (") + kLdmVaePrefix + "*)");
  if (!n_text) missing.push_back(std::string("text encoder (") + kLdmClipPrefix + "* or " + kLdmOpenClipPrefix + "*)");
  DMX_CHECK_FORMAT(missing.empty(), path, ": not a complete Stable Diffusion 1.x/2.x single-file checkpoint: no ",
                   join_abbreviated(missing), " weights");
  DMX_CHECK_FORMAT(unknown.empty(), path, ": ", unknown.size(),
                   " key(s) belong to no known component (model.diffusion_model, first_stage_model, "
                   "cond_stage_model): ",
                   join_abbreviated(unknown));

  // The .yaml is read only when some component config is detected (config_dir may supply all of them).
  json yaml_cache;
  bool yaml_read = false;
  auto yaml = [&]() -> const json& {
    if (!yaml_read) yaml_cache = find_ldm_yaml(path);
    yaml_read = true;
    return yaml_cache;
  };
  SingleFileCheckpoint out;
  out.family = ldm_text_encoder_kind(ckpt) == LdmTextEncoder::OpenClip ? "sd2" : "sd1";
  // Text encoder first: its width check gives the clearest error when --config is needed.
  out.text_encoder_config =
      component_config(config_dir, "text_encoder", "config.json", [&] { return detect_ldm_clip_config(ckpt); });
  out.unet_config =
      component_config(config_dir, "unet", "config.json", [&] { return detect_ldm_unet_config(ckpt, yaml()); });
  out.vae_config =
      component_config(config_dir, "vae", "config.json", [&] { return detect_ldm_vae_config(ckpt, yaml()); });
  out.scheduler_config = component_config(config_dir, "scheduler", "scheduler_config.json",
                                          [&] { return ldm_scheduler_config(ckpt, yaml()); });
  out.unet = convert_ldm_unet(ckpt, out.unet_config);
  out.vae = convert_ldm_vae(ckpt, out.vae_config);
  out.text_encoder = convert_ldm_clip(ckpt, out.text_encoder_config);
  return out;
}
}  // namespace dmx::io
