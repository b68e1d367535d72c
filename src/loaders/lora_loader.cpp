// LoRA application (see lora_loader.h): diffusers 0.27.2 loaders/lora.py (load_lora_weights, fuse_lora),
// peft 0.10 tuners/lora (scaling = lora_alpha / r, scaled by the user's scale), kohya sd-scripts
// networks/lora.py (alpha / rank) and LyCORIS (LoHa, LoKr, DoRA).
#include "loaders/lora_loader.h"

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <sstream>

#include "core/fs.h"
#include "core/log.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/ldm_names.h"
#include "io/lora_names.h"
#include "nn/lora.h"

namespace dmx::loaders {

namespace {

using io::LoRAComponent;
using io::LoRAKeyFormat;
using io::LoRARole;

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
    const std::string flat = io::kohya_flatten(item.key());
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
  const std::string ldm = io::unflatten_ldm_unet_name(flat);
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

struct Group {
  LoRAComponent component = LoRAComponent::UNet;
  LoRAKeyFormat format = LoRAKeyFormat::Diffusers;
  std::string path;
  std::map<LoRARole, std::pair<std::string, at::Tensor>> t;  // role -> (key, tensor)
  bool has(LoRARole r) const { return t.count(r) != 0; }
  const at::Tensor& get(LoRARole r) const { return t.at(r).second; }
  std::string first_key() const { return t.begin()->second.first; }
};

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

// Reshapes a low-rank factor to `shape` when only trailing 1-sized dims differ (conv 1x1 vs linear).
at::Tensor fit(const at::Tensor& t, std::vector<int64_t> shape, const std::string& key, const std::string& layer) {
  DMX_CHECK_FORMAT(
      t.numel() == c10::multiply_integers(shape) && t.size(0) == shape[0] && (t.dim() < 2 || t.size(1) == shape[1]),
      "LoRA key '", key, "' has shape ", t.sizes(), ", layer '", layer, "' needs ", shape_str(shape));
  return t.reshape(shape);
}

std::shared_ptr<nn::LoRAAdapter> build_adapter(const Group& g, const Target& target, const LoRASpec& spec,
                                               const nlohmann::json& peft_config, const std::string& source) {
  auto a = std::make_shared<nn::LoRAAdapter>();
  a->source = source;
  a->scale = g.component == LoRAComponent::UNet ? spec.unet_scale : spec.text_encoder_scale;
  const at::Tensor& w = target.weight();
  const auto opts = w.options().requires_grad(false);
  auto cast = [&](const at::Tensor& t) { return t.to(opts.dtype()).to(opts.device()).contiguous(); };
  const std::vector<int64_t> ws(w.sizes().begin(), w.sizes().end());
  const int64_t out = ws[0], in = ws[1];
  const bool conv = target.conv != nullptr;
  const std::string where = "LoRA " + source + ": layer '" + g.path + "'";
  std::optional<double> alpha;
  if (g.has(LoRARole::Alpha)) {
    DMX_CHECK_FORMAT(g.get(LoRARole::Alpha).numel() == 1, where, ": alpha must be a scalar, got shape ",
                     g.get(LoRARole::Alpha).sizes());
    alpha = g.get(LoRARole::Alpha).to(at::kDouble).item<double>();
  }
  const bool lora = g.has(LoRARole::Down) || g.has(LoRARole::Up) || g.has(LoRARole::Mid);
  const bool loha = g.has(LoRARole::HadaW1A) || g.has(LoRARole::HadaW1B) || g.has(LoRARole::HadaW2A) ||
                    g.has(LoRARole::HadaW2B) || g.has(LoRARole::HadaT1) || g.has(LoRARole::HadaT2);
  const bool lokr = g.has(LoRARole::LokrW1) || g.has(LoRARole::LokrW1A) || g.has(LoRARole::LokrW1B) ||
                    g.has(LoRARole::LokrW2) || g.has(LoRARole::LokrW2A) || g.has(LoRARole::LokrW2B) ||
                    g.has(LoRARole::LokrT2);
  const bool full = g.has(LoRARole::Diff);
  DMX_CHECK_FORMAT(int(lora) + int(loha) + int(lokr) + int(full) == 1, where,
                   lora + loha + lokr + full == 0 ? ": has no weights (only alpha / DoRA scale), first key '"
                                                  : ": mixes LoRA / LoHa / LoKr / diff weights, first key '",
                   g.first_key(), "'");
  auto need = [&](LoRARole r) {
    DMX_CHECK_FORMAT(g.has(r), where, ": '", io::lora_role_name(r), "' is missing (first key '", g.first_key(), "')");
    return g.get(r);
  };
  if (lora) {
    a->kind = nn::LoRAKind::LoRA;
    const at::Tensor down = need(LoRARole::Down), up = need(LoRARole::Up);
    const int64_t r = down.size(0);
    const std::string kd = g.t.at(LoRARole::Down).first, ku = g.t.at(LoRARole::Up).first;
    if (!conv) {
      DMX_CHECK_FORMAT(!g.has(LoRARole::Mid), where, ": lora_mid (Tucker) needs a convolution layer");
      a->down = cast(fit(down, {r, in}, kd, g.path));
      a->up = cast(fit(up, {out, r}, ku, g.path));
    } else if (g.has(LoRARole::Mid)) {
      a->down = cast(fit(down, {r, in, 1, 1}, kd, g.path));
      a->mid = cast(fit(g.get(LoRARole::Mid), {r, r, ws[2], ws[3]}, g.t.at(LoRARole::Mid).first, g.path));
      a->up = cast(fit(up, {out, r, 1, 1}, ku, g.path));
    } else {
      DMX_CHECK_FORMAT(down.dim() == 4 || (ws[2] == 1 && ws[3] == 1), "LoRA key '", kd, "' has shape ", down.sizes(),
                       ", layer '", g.path, "' is a ", ws[2], "x", ws[3], " convolution (needs [r, in, kh, kw])");
      a->down = cast(fit(down, {r, in, ws[2], ws[3]}, kd, g.path));
      a->up = cast(fit(up, {out, r, 1, 1}, ku, g.path));
    }
    if (alpha) {
      a->alpha_scale = *alpha / static_cast<double>(r);
    } else if (g.format == LoRAKeyFormat::PEFT && !peft_config.is_null()) {
      const double la = peft_config.value("lora_alpha", static_cast<double>(r));
      const double pr = peft_config.value("r", static_cast<double>(r));
      DMX_CHECK_FORMAT(pr == static_cast<double>(r), where, ": adapter_config.json says r = ", pr,
                       " but the weights have rank ", r);
      a->alpha_scale = la / pr;
    }
  } else if (loha) {
    a->kind = nn::LoRAKind::LoHa;
    a->w1a = cast(need(LoRARole::HadaW1A));
    a->w1b = cast(need(LoRARole::HadaW1B));
    a->w2a = cast(need(LoRARole::HadaW2A));
    a->w2b = cast(need(LoRARole::HadaW2B));
    DMX_CHECK_FORMAT(g.has(LoRARole::HadaT1) == g.has(LoRARole::HadaT2), where,
                     ": hada_t1 and hada_t2 (Tucker cores) come together");
    if (g.has(LoRARole::HadaT1)) {
      a->t1 = cast(g.get(LoRARole::HadaT1));
      a->t2 = cast(g.get(LoRARole::HadaT2));
    }
    if (alpha) a->alpha_scale = *alpha / static_cast<double>(a->w1b.size(0));
  } else if (lokr) {
    a->kind = nn::LoRAKind::LoKr;
    std::optional<int64_t> dim;
    if (g.has(LoRARole::LokrW1)) {
      a->w1a = cast(g.get(LoRARole::LokrW1));
    } else {
      a->w1a = cast(need(LoRARole::LokrW1A));
      a->w1b = cast(need(LoRARole::LokrW1B));
      dim = a->w1b.size(0);
    }
    if (g.has(LoRARole::LokrW2)) {
      a->w2a = cast(g.get(LoRARole::LokrW2));
    } else {
      a->w2a = cast(need(LoRARole::LokrW2A));
      a->w2b = cast(need(LoRARole::LokrW2B));
      if (g.has(LoRARole::LokrT2)) a->t2 = cast(g.get(LoRARole::LokrT2));
      dim = a->w2b.size(0);
    }
    if (alpha && dim) a->alpha_scale = *alpha / static_cast<double>(*dim);  // both full: alpha is unused
  } else {
    a->kind = nn::LoRAKind::Full;
    a->diff = cast(g.get(LoRARole::Diff));
  }
  if (g.has(LoRARole::Magnitude)) {
    a->dora = nn::DoRAStyle::PEFT;
    a->magnitude = cast(g.get(LoRARole::Magnitude));
    DMX_CHECK_FORMAT(a->magnitude.numel() == out, where, ": lora_magnitude_vector has shape ", a->magnitude.sizes(),
                     ", needs ", out, " entries (one per output feature)");
  } else if (g.has(LoRARole::DoraScale)) {
    a->dora = nn::DoRAStyle::LyCORIS;
    a->magnitude = cast(g.get(LoRARole::DoraScale));
    const auto& m = a->magnitude;
    const bool on_out = m.size(0) == out && m.numel() == out;
    const bool on_in = m.dim() >= 2 && m.size(0) == 1 && m.size(1) == in && m.numel() == in;
    DMX_CHECK_FORMAT(on_out || on_in, where, ": dora_scale has shape ", m.sizes(), ", needs [", out,
                     ", 1, ...] or [1, ", in, ", ...]");
  }
  // The full weight difference must have the layer's shape (checked here, before anything is attached).
  if (a->kind != nn::LoRAKind::LoRA) (void)nn::lora_delta_weight(*a, w.sizes());
  return a;
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
  const bool has_ext = name.size() > 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0;
  const std::string path = join_path(lora_dir, has_ext ? name : name + ".safetensors");
  DMX_CHECK_ARG(path_exists(path), "prompt: LoRA '", name, "' not found: no file ", path);
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

  std::map<std::pair<int, std::string>, Group> groups;
  std::vector<std::string> unmatched;
  for (const auto& [key, t] : tensors) {
    const auto info = io::parse_lora_key(key);
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
    Group& g = groups[{c, path}];
    if (g.t.empty()) {
      g.component = info->component;
      g.path = path;
      g.format = info->format;
    } else if (info->role != LoRARole::Alpha && g.format != info->format) {
      if (g.has(LoRARole::Alpha) && g.t.size() == 1) g.format = info->format;
    }
    DMX_CHECK_FORMAT(g.t.count(info->role) == 0, "LoRA ", src, ": keys '", g.t[info->role].first, "' and '", key,
                     "' both give the ", io::lora_role_name(info->role), " of layer '", path, "'");
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
    if (todo.empty()) rep.format = io::lora_format_name(g.format);
    todo.emplace_back(target,
                      build_adapter(g, target, spec, g.format == LoRAKeyFormat::PEFT ? peft_config : nullptr, src));
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
    } catch (const IoError& e) {
      throw FormatError(std::string("--lora: ") + e.what());
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
        nn::lora_merge(t.state(), t.weight());
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

ScopedLoRAs::ScopedLoRAs(std::shared_ptr<StableDiffusionModels> m, const std::vector<LoRASpec>& specs,
                         const LoRAApplyOptions& o)
    : m_(std::move(m)) {
  try {
    reports_ = apply_loras(*m_, specs, o);
  } catch (...) {
    remove_loras(*m_);
    throw;
  }
}

ScopedLoRAs::~ScopedLoRAs() {
  try {
    remove_loras(*m_);
  } catch (...) {
  }
}

}  // namespace dmx::loaders
