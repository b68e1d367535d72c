// LoRA application (see lora_loader.h): diffusers 0.27.2 loaders/lora.py (load_lora_weights, fuse_lora): keys
// are sorted onto the model's layers, and each layer's tensors become an adapter by the layout table of
// lora_formats.h (diffusers, PEFT, kohya, LyCORIS, DoRA).
#include "loaders/lora_loader.h"

#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <sstream>

#include "core/fs.h"
#include "core/log.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/ldm_names.h"
#include "loaders/lora_formats.h"
#include "nn/lora.h"

namespace dmx::loaders {

namespace {

// One LoRA-capable layer of the model.
struct Target {
  std::shared_ptr<nn::LoRALinearImpl> linear;
  std::shared_ptr<nn::LoRAConv2dImpl> conv;
  nn::LoRAState& state() const { return linear ? linear->lora : conv->lora; }
  at::Tensor& weight() const { return linear ? linear->weight : conv->weight; }
};

struct ComponentIndex {
  std::map<std::string, Target> by_path;
  std::map<std::string, std::string> by_flat;  // kohya-flattened name -> path ("" when ambiguous)
};

ComponentIndex index_of(const torch::nn::Module& root) {
  ComponentIndex ix;
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    Target t;
    t.linear = std::dynamic_pointer_cast<nn::LoRALinearImpl>(item.value());
    if (!t.linear) t.conv = std::dynamic_pointer_cast<nn::LoRAConv2dImpl>(item.value());
    if (!t.linear && !t.conv) continue;
    ix.by_path.emplace(item.key(), t);
    const std::string flat = kohya_flatten(item.key());
    auto it = ix.by_flat.find(flat);
    if (it == ix.by_flat.end()) {
      ix.by_flat.emplace(flat, item.key());
    } else {
      it->second = "";  // two layers flatten alike: kohya's name cannot pick one
    }
  }
  return ix;
}

std::vector<const torch::nn::Module*> roots(const StableDiffusionModels& m) {
  std::vector<const torch::nn::Module*> r;
  if (!m.unet.is_empty()) r.push_back(m.unet.get());
  if (!m.text_encoder.is_empty()) r.push_back(m.text_encoder.get());
  return r;
}

nlohmann::json unet_ldm_config(const models::UNet2DConditionConfig& c) {
  return {{"layers_per_block", c.layers_per_block},
          {"block_out_channels", c.block_out_channels},
          {"down_block_types", c.down_block_types},
          {"up_block_types", c.up_block_types},
          {"mid_block_type", c.mid_block_type}};
}

// kohya names written with original LDM UNet module names (lora_unet_input_blocks_1_1_...).
std::string resolve_ldm(const std::string& flat, const nlohmann::json& cfg) {
  const std::string ldm = unflatten_ldm_unet_name(flat);
  if (ldm.empty()) return "";
  io::TensorMap one{{std::string(io::kLdmUnetPrefix) + ldm + ".weight", at::zeros({1})}};
  try {
    io::TensorMap conv = io::convert_ldm_unet(one, cfg);
    if (conv.size() != 1) return "";
    const std::string k = conv.begin()->first;
    return k.size() > 7 && k.compare(k.size() - 7, 7, ".weight") == 0 ? k.substr(0, k.size() - 7) : "";
  } catch (const std::exception&) {
    return "";
  }
}

}  // namespace

LoRAMode parse_lora_mode(const std::string& s) {
  if (s == "runtime") return LoRAMode::Runtime;
  if (s == "merged") return LoRAMode::Merged;
  throw InvalidArgument("--lora-mode must be runtime or merged, got '" + s + "'");
}

std::string LoRAReport::summary() const {
  std::string s = "applied " + std::to_string(unet_tensors) + " tensors to UNet, " +
                  std::to_string(text_encoder_tensors) + " to text encoder";
  if (!unmatched.empty()) s += "; " + std::to_string(unmatched.size()) + " unmatched key(s) skipped";
  return s;
}

LoRASpec parse_lora_arg(const std::string& arg) {
  LoRASpec s;
  s.path = arg;
  const size_t colon = arg.find_last_of(':');
  if (colon != std::string::npos && !path_exists(arg)) {
    const std::string num = arg.substr(colon + 1);
    char* end = nullptr;
    const double v = std::strtod(num.c_str(), &end);
    if (!num.empty() && end == num.c_str() + num.size()) {
      s.path = arg.substr(0, colon);
      s.unet_scale = s.text_encoder_scale = v;
    }
  }
  DMX_CHECK_ARG(!s.path.empty(), "--lora needs FILE[:SCALE], got '", arg, "'");
  DMX_CHECK_ARG(std::isfinite(s.unet_scale), "--lora scale must be a finite number, got '", arg, "'");
  return s;
}

std::string extract_prompt_loras(const std::string& prompt, std::vector<LoRASpec>& out) {
  std::string cleaned;
  size_t i = 0;
  while (i < prompt.size()) {
    const size_t lt = prompt.find('<', i);
    if (lt == std::string::npos) break;
    const size_t gt = prompt.find('>', lt);
    if (gt == std::string::npos) break;
    const std::string body = prompt.substr(lt + 1, gt - lt - 1);  // lora:NAME[:W...]
    const size_t c = body.find(':');
    const std::string type = c == std::string::npos ? "" : body.substr(0, c);
    if (type != "lora" && type != "lyco") {
      cleaned += prompt.substr(i, lt + 1 - i);
      i = lt + 1;
      continue;
    }
    std::vector<std::string> parts;
    std::stringstream ss(body.substr(c + 1));
    for (std::string p; std::getline(ss, p, ':');) parts.push_back(p);
    const std::string tag = "<" + body + ">";
    DMX_CHECK_ARG(!parts.empty() && !parts[0].empty(), "prompt: LoRA tag ", tag, " has no name");
    LoRASpec s;
    s.path = parts[0];
    std::optional<double> te, unet;
    size_t positional = 0;
    for (size_t k = 1; k < parts.size(); ++k) {
      std::string v = parts[k], key;
      const size_t eq = v.find('=');
      if (eq != std::string::npos) {
        key = v.substr(0, eq);
        v = v.substr(eq + 1);
      } else {
        key = positional++ == 0 ? "te" : "unet";
      }
      char* end = nullptr;
      const double x = std::strtod(v.c_str(), &end);
      DMX_CHECK_ARG(!v.empty() && end == v.c_str() + v.size() && std::isfinite(x), "prompt: LoRA tag ", tag,
                    ": weight '", parts[k], "' is not a number");
      if (key == "te") {
        te = x;
      } else if (key == "unet") {
        unet = x;
      } else {
        throw InvalidArgument("prompt: LoRA tag " + tag + ": unknown argument '" + key + "' (te=, unet=)");
      }
    }
    s.text_encoder_scale = te.value_or(1.0);
    s.unet_scale = unet.value_or(s.text_encoder_scale);  // A1111: the UNet weight defaults to the text encoder's
    out.push_back(s);
    cleaned += prompt.substr(i, lt - i);
    i = gt + 1;
  }
  if (i < prompt.size()) cleaned += prompt.substr(i);
  return cleaned;
}

std::string resolve_lora_name(const std::string& lora_dir, const std::string& name) {
  DMX_CHECK_ARG(!lora_dir.empty(), "prompt: <lora:", name, ":...> needs --lora-dir (the folder holding ", name,
                ".safetensors)");
  // A tag names a file inside --lora-dir (prompts also come from --from metadata, i.e. from any PNG): no
  // absolute path, no '..' component, and no symlink that leads outside the folder.
  DMX_CHECK_ARG(!name.empty() && name[0] != '/' && name.find('\\') == std::string::npos, "prompt: LoRA name '", name,
                "' must be a relative name inside --lora-dir (no absolute path)");
  for (const std::string& part : split(name, '/'))
    DMX_CHECK_ARG(part != ".." && part != ".", "prompt: LoRA name '", name,
                  "' must stay inside --lora-dir (no '.' or '..' components)");
  const bool has_ext = name.size() > 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0;
  const std::string path = join_path(lora_dir, has_ext ? name : name + ".safetensors");
  DMX_CHECK_ARG(path_exists(path), "prompt: LoRA '", name, "' not found: no file ", path);
  char dir_real[PATH_MAX], file_real[PATH_MAX];
  DMX_CHECK_ARG(::realpath(lora_dir.c_str(), dir_real) != nullptr, "--lora-dir: cannot resolve ", lora_dir, ": ",
                std::strerror(errno));
  DMX_CHECK_ARG(::realpath(path.c_str(), file_real) != nullptr, "prompt: LoRA '", name, "': cannot resolve ", path,
                ": ", std::strerror(errno));
  const std::string d = dir_real, f = file_real;
  DMX_CHECK_ARG(f.size() > d.size() && f.compare(0, d.size(), d) == 0 && (d == "/" || f[d.size()] == '/'),
                "prompt: LoRA '", name, "' resolves to ", f, ", outside --lora-dir ", d, " (a symlink leads out)");
  return path;
}

LoRAReport apply_lora_tensors(StableDiffusionModels& m, const io::TensorMap& tensors, const LoRASpec& spec,
                              bool allow_unmatched, const nlohmann::json& peft_config, const std::string& source) {
  const std::string src = source.empty() ? spec.path : source;
  LoRAReport rep;
  rep.source = src;
  DMX_CHECK_FORMAT(!tensors.empty(), "LoRA ", src, ": the file holds no tensors");
  ComponentIndex ix[2] = {m.unet.is_empty() ? ComponentIndex{} : index_of(*m.unet),
                          m.text_encoder.is_empty() ? ComponentIndex{} : index_of(*m.text_encoder)};
  nlohmann::json ldm_cfg;
  if (!m.unet.is_empty()) ldm_cfg = unet_ldm_config(m.unet->config());

  std::map<std::pair<int, std::string>, LoRALayerTensors> groups;
  std::vector<std::string> unmatched;
  for (const auto& [key, t] : tensors) {
    const auto info = parse_lora_key(key);
    if (!info) {
      unmatched.push_back(key);
      continue;
    }
    const int c = info->component == LoRAComponent::UNet ? 0 : 1;
    std::string path;
    if (info->flat) {
      auto it = ix[c].by_flat.find(info->module);
      if (it != ix[c].by_flat.end()) {
        DMX_CHECK_FORMAT(!it->second.empty(), "LoRA ", src, ": key '", key,
                         "' names a layer that two modules of the model flatten to");
        path = it->second;
      } else if (c == 0) {
        path = resolve_ldm(info->module, ldm_cfg);
      }
    } else {
      path = info->module;
    }
    if (path.empty() || ix[c].by_path.count(path) == 0) {
      unmatched.push_back(key);
      continue;
    }
    LoRALayerTensors& g = groups[{c, path}];
    if (g.t.empty()) {
      g.component = info->component;
      g.path = path;
      g.format = info->format;
    } else if (info->role != LoRARole::Alpha && g.format != info->format) {
      if (g.has(LoRARole::Alpha) && g.t.size() == 1) g.format = info->format;
    }
    DMX_CHECK_FORMAT(g.t.count(info->role) == 0, "LoRA ", src, ": keys '", g.t[info->role].first, "' and '", key,
                     "' both give the ", lora_role_name(info->role), " of layer '", path, "'");
    g.t[info->role] = {key, t};
  }
  if (!unmatched.empty()) {
    std::string first;
    for (size_t i = 0; i < unmatched.size() && i < 5; ++i) first += (i ? ", " : "") + unmatched[i];
    if (unmatched.size() > 5) first += ", ...";
    DMX_CHECK_FORMAT(allow_unmatched, "LoRA ", src, ": ", unmatched.size(), " of ", tensors.size(),
                     " key(s) match no layer of the model: ", first,
                     " (wrong base model or unsupported layout; --lora-allow-unmatched skips them)");
    log_warn(detail::concat("lora: ", src, ": ", unmatched.size(), " key(s) match no layer and are skipped: ", first));
    rep.unmatched = unmatched;
  }
  // Build and check every adapter before attaching any.
  std::vector<std::pair<Target, std::shared_ptr<nn::LoRAAdapter>>> todo;
  for (const auto& [id, g] : groups) {
    const Target& target = ix[id.first].by_path.at(id.second);
    if (todo.empty()) rep.format = lora_format_name(g.format);
    const double scale = g.component == LoRAComponent::UNet ? spec.unet_scale : spec.text_encoder_scale;
    todo.emplace_back(target, build_lora_adapter(g, target.weight(), target.conv != nullptr, scale,
                                                 g.format == LoRAKeyFormat::PEFT ? peft_config : nullptr, src));
    if (id.first == 0) {
      rep.unet_tensors += static_cast<int>(g.t.size());
      ++rep.unet_layers;
    } else {
      rep.text_encoder_tensors += static_cast<int>(g.t.size());
      ++rep.text_encoder_layers;
    }
  }
  for (auto& [target, a] : todo) nn::lora_attach(target.state(), target.weight(), a);
  return rep;
}

std::vector<LoRAReport> apply_loras(StableDiffusionModels& m, const std::vector<LoRASpec>& specs,
                                    const LoRAApplyOptions& o) {
  std::vector<LoRAReport> reps;
  for (const auto& s : specs) {
    DMX_CHECK_ARG(path_exists(s.path), "--lora: file not found: ", s.path);
    io::TensorMap t;
    try {
      t = io::load_safetensors(s.path);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(std::string("--lora: ") + e.what());
    }
    nlohmann::json peft_config;
    const size_t slash = s.path.find_last_of('/');
    const std::string cfg =
        join_path(slash == std::string::npos ? "." : s.path.substr(0, slash), "adapter_config.json");
    if (path_exists(cfg)) {
      peft_config = io::load_json_file(cfg, "PEFT adapter config");
      for (const char* k : {"rank_pattern", "alpha_pattern"})
        DMX_CHECK_SUPPORTED(!peft_config.contains(k) || peft_config[k].is_null() || peft_config[k].empty(), "LoRA ",
                            s.path, ": ", cfg, " uses ", k, ", which is not supported");
    }
    reps.push_back(apply_lora_tensors(m, t, s, o.allow_unmatched, peft_config, s.path));
  }
  set_lora_mode(m, o.mode);
  return reps;
}

void set_lora_mode(StableDiffusionModels& m, LoRAMode mode) {
  for (const auto* root : roots(m))
    for (auto& [path, t] : index_of(*root).by_path) {
      if (mode == LoRAMode::Merged) {
        const bool adapted = !t.state().adapters.empty() && !t.state().merged();
        nn::lora_merge(t.state(), t.weight());
        // A huge scale or alpha overflows the patched weight: say so here rather than draw a black picture.
        if (adapted && !at::isfinite(t.weight()).all().item<bool>()) {
          std::string srcs;
          for (const auto& a : t.state().adapters)
            srcs += detail::concat(srcs.empty() ? "" : ", ", a->source, " (scale ", a->scale, ", alpha / rank ",
                                   a->alpha_scale, ")");
          throw InvalidArgument(detail::concat("LoRA: merging ", srcs, " into layer '", path,
                                               "' gives non-finite weights (overflow): lower the LoRA scale"));
        }
      } else {
        nn::lora_unmerge(t.state(), t.weight());
      }
    }
}

void remove_loras(StableDiffusionModels& m) {
  for (const auto* root : roots(m))
    for (auto& [path, t] : index_of(*root).by_path) nn::lora_clear(t.state(), t.weight());
}

int count_lora_layers(const StableDiffusionModels& m) {
  int n = 0;
  for (const auto* root : roots(m))
    for (const auto& [path, t] : index_of(*root).by_path) n += t.state().adapters.empty() ? 0 : 1;
  return n;
}

struct ScopedLoRAs::Saved {
  struct Layer {
    Target target;
    std::vector<std::shared_ptr<const nn::LoRAAdapter>> adapters;
    bool merged = false;
  };
  std::vector<Layer> layers;

  explicit Saved(const StableDiffusionModels& m) {
    for (const auto* root : roots(m))
      for (auto& [path, t] : index_of(*root).by_path) layers.push_back({t, t.state().adapters, t.state().merged()});
  }
  // Every layer the scope changed gets its adapters and mode back. Unmerging restores the original weight bit
  // for bit; merging the same adapters again computes the same merged weight.
  void restore() const {
    for (const Layer& l : layers) {
      nn::LoRAState& s = l.target.state();
      if (s.adapters == l.adapters && s.merged() == l.merged) continue;
      nn::lora_clear(s, l.target.weight());
      for (const auto& a : l.adapters) nn::lora_attach(s, l.target.weight(), a);
      if (l.merged) nn::lora_merge(s, l.target.weight());
    }
  }
};

ScopedLoRAs::ScopedLoRAs(std::shared_ptr<StableDiffusionModels> m, const std::vector<LoRASpec>& specs,
                         const LoRAApplyOptions& o)
    : m_(std::move(m)), saved_(std::make_shared<Saved>(*m_)) {
  try {
    reports_ = apply_loras(*m_, specs, o);
  } catch (...) {
    saved_->restore();
    throw;
  }
}

ScopedLoRAs::~ScopedLoRAs() {
  try {
    saved_->restore();
  } catch (...) {
  }
}

}  // namespace dmx::loaders
