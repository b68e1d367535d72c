// LoRA layouts (see lora_formats.h): diffusers 0.27.2 loaders/lora.py + lora_conversion_utils.py
// (_convert_kohya_lora_to_diffusers), peft 0.10 tuners/lora (scaling = lora_alpha / r), kohya sd-scripts
// networks/lora.py (alpha / rank) and LyCORIS (LoHa, LoKr, full, DoRA).
#include "loaders/lora_formats.h"

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <set>
#include <sstream>
#include <vector>

#include "core/text.h"
#include "dmx/error.h"

namespace dmx::loaders {

namespace {

struct PrefixRule {
  const char* prefix;
  LoRAComponent component;
  bool flat;              // kohya '_'-joined module names
  bool by_module;         // PEFT base_model.model.: the component follows from the module path
  const char* what = "";  // for a refused layout: what it is
};

struct SuffixRule {
  const char* suffix;
  LoRARole role;
  LoRAKeyFormat format;
  const char* what = "";  // for a refused layout: what it is
};

// What the conversion of a layer works with.
struct BuildContext {
  std::vector<int64_t> ws;  // the layer's weight shape
  int64_t out = 0, in = 0;
  bool conv = false;
  at::TensorOptions opts;
  std::string where;  // "LoRA <file>: layer '<path>'"
  std::optional<double> alpha;
  const nlohmann::json* peft_config = nullptr;
  at::Tensor cast(const at::Tensor& t) const { return t.to(opts.dtype()).to(opts.device()).contiguous(); }
  const at::Tensor& need(const LoRALayerTensors& g, LoRARole r) const {
    DMX_CHECK_FORMAT(g.has(r), where, ": '", lora_role_name(r), "' is missing (first key '", g.first_key(), "')");
    return g.get(r);
  }
};
using BuildFn = void (*)(const LoRALayerTensors&, const BuildContext&, nn::LoRAAdapter&);

// One layout: how its keys are recognised (prefixes of module names, suffixes of tensor names and their
// roles) and how its tensors become an adapter (`build` for the weights of one kind of update, at most one per
// layer; `modify` applied on top). A refused layout has no conversion: its keys are an Unsupported error.
struct Layout {
  const char* name;
  const char* reference;
  std::vector<PrefixRule> prefixes;
  std::vector<SuffixRule> suffixes;
  BuildFn build = nullptr;
  BuildFn modify = nullptr;
  bool refused = false;
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

// ---- Conversions ----

// LoRA / LoCon: up @ down (+ Tucker mid for convolutions); alpha / rank (PEFT: lora_alpha / r).
void build_low_rank(const LoRALayerTensors& g, const BuildContext& c, nn::LoRAAdapter& a) {
  a.kind = nn::LoRAKind::LoRA;
  const at::Tensor down = c.need(g, LoRARole::Down), up = c.need(g, LoRARole::Up);
  DMX_CHECK_FORMAT(down.dim() >= 1 && down.size(0) >= 1, c.where, ": '", g.t.at(LoRARole::Down).first, "' has shape ",
                   down.sizes(), ": the rank (its first dimension) must be at least 1");
  const int64_t r = down.size(0);
  const std::string kd = g.t.at(LoRARole::Down).first, ku = g.t.at(LoRARole::Up).first;
  if (!c.conv) {
    DMX_CHECK_FORMAT(!g.has(LoRARole::Mid), c.where, ": lora_mid (Tucker) needs a convolution layer");
    a.down = c.cast(fit(down, {r, c.in}, kd, g.path));
    a.up = c.cast(fit(up, {c.out, r}, ku, g.path));
  } else if (g.has(LoRARole::Mid)) {
    a.down = c.cast(fit(down, {r, c.in, 1, 1}, kd, g.path));
    a.mid = c.cast(fit(g.get(LoRARole::Mid), {r, r, c.ws[2], c.ws[3]}, g.t.at(LoRARole::Mid).first, g.path));
    a.up = c.cast(fit(up, {c.out, r, 1, 1}, ku, g.path));
  } else {
    DMX_CHECK_FORMAT(down.dim() == 4 || (c.ws[2] == 1 && c.ws[3] == 1), "LoRA key '", kd, "' has shape ", down.sizes(),
                     ", layer '", g.path, "' is a ", c.ws[2], "x", c.ws[3], " convolution (needs [r, in, kh, kw])");
    a.down = c.cast(fit(down, {r, c.in, c.ws[2], c.ws[3]}, kd, g.path));
    a.up = c.cast(fit(up, {c.out, r, 1, 1}, ku, g.path));
  }
  if (c.alpha) {
    a.alpha_scale = *c.alpha / static_cast<double>(r);
  } else if (g.format == LoRAKeyFormat::PEFT && c.peft_config && !c.peft_config->is_null()) {
    // adapter_config.json is user input: numbers are checked, not cast (a string raised a raw JSON error).
    auto number = [&](const char* key) {
      auto it = c.peft_config->find(key);
      if (it == c.peft_config->end() || it->is_null()) return static_cast<double>(r);
      DMX_CHECK_FORMAT(it->is_number() && std::isfinite(it->get<double>()), c.where, ": adapter_config.json '", key,
                       "' must be a finite number, got ", it->dump());
      return it->get<double>();
    };
    const double la = number("lora_alpha");
    const double pr = number("r");
    DMX_CHECK_FORMAT(pr == static_cast<double>(r), c.where, ": adapter_config.json says r = ", pr,
                     " but the weights have rank ", r);
    a.alpha_scale = la / pr;
  }
}

// LoHa: (w1a @ w1b) * (w2a @ w2b), optional Tucker cores; alpha / rank of w1b.
void build_loha(const LoRALayerTensors& g, const BuildContext& c, nn::LoRAAdapter& a) {
  a.kind = nn::LoRAKind::LoHa;
  a.w1a = c.cast(c.need(g, LoRARole::HadaW1A));
  a.w1b = c.cast(c.need(g, LoRARole::HadaW1B));
  a.w2a = c.cast(c.need(g, LoRARole::HadaW2A));
  a.w2b = c.cast(c.need(g, LoRARole::HadaW2B));
  DMX_CHECK_FORMAT(g.has(LoRARole::HadaT1) == g.has(LoRARole::HadaT2), c.where,
                   ": hada_t1 and hada_t2 (Tucker cores) come together");
  if (g.has(LoRARole::HadaT1)) {
    a.t1 = c.cast(g.get(LoRARole::HadaT1));
    a.t2 = c.cast(g.get(LoRARole::HadaT2));
  }
  DMX_CHECK_FORMAT(a.w1b.dim() >= 1 && a.w1b.size(0) >= 1, c.where, ": hada_w1_b has shape ", a.w1b.sizes(),
                   ": the rank must be at least 1");
  if (c.alpha) a.alpha_scale = *c.alpha / static_cast<double>(a.w1b.size(0));
}

// LoKr: kron(w1, w2), each full or factorised; alpha / the factorised rank (unused when both are full).
void build_lokr(const LoRALayerTensors& g, const BuildContext& c, nn::LoRAAdapter& a) {
  a.kind = nn::LoRAKind::LoKr;
  std::optional<int64_t> dim;
  if (g.has(LoRARole::LokrW1)) {
    a.w1a = c.cast(g.get(LoRARole::LokrW1));
  } else {
    a.w1a = c.cast(c.need(g, LoRARole::LokrW1A));
    a.w1b = c.cast(c.need(g, LoRARole::LokrW1B));
    dim = a.w1b.size(0);
  }
  if (g.has(LoRARole::LokrW2)) {
    a.w2a = c.cast(g.get(LoRARole::LokrW2));
  } else {
    a.w2a = c.cast(c.need(g, LoRARole::LokrW2A));
    a.w2b = c.cast(c.need(g, LoRARole::LokrW2B));
    if (g.has(LoRARole::LokrT2)) a.t2 = c.cast(g.get(LoRARole::LokrT2));
    dim = a.w2b.size(0);
  }
  DMX_CHECK_FORMAT(!dim || *dim >= 1, c.where, ": a LoKr factor has rank 0 (its first dimension must be at least 1)");
  if (c.alpha && dim) a.alpha_scale = *c.alpha / static_cast<double>(*dim);  // both full: alpha is unused
}

// A full weight difference.
void build_full(const LoRALayerTensors& g, const BuildContext& c, nn::LoRAAdapter& a) {
  a.kind = nn::LoRAKind::Full;
  a.diff = c.cast(g.get(LoRARole::Diff));
}

// DoRA magnitude, PEFT: one entry per output feature.
void dora_peft(const LoRALayerTensors& g, const BuildContext& c, nn::LoRAAdapter& a) {
  a.dora = nn::DoRAStyle::PEFT;
  a.magnitude = c.cast(g.get(LoRARole::Magnitude));
  DMX_CHECK_FORMAT(a.magnitude.numel() == c.out, c.where, ": lora_magnitude_vector has shape ", a.magnitude.sizes(),
                   ", needs ", c.out, " entries (one per output feature)");
}

// DoRA magnitude, LyCORIS / kohya: [out, 1, ...] or [1, in, ...].
void dora_lycoris(const LoRALayerTensors& g, const BuildContext& c, nn::LoRAAdapter& a) {
  a.dora = nn::DoRAStyle::LyCORIS;
  a.magnitude = c.cast(g.get(LoRARole::DoraScale));
  const auto& m = a.magnitude;
  const bool on_out = m.size(0) == c.out && m.numel() == c.out;
  const bool on_in = m.dim() >= 2 && m.size(0) == 1 && m.size(1) == c.in && m.numel() == c.in;
  DMX_CHECK_FORMAT(on_out || on_in, c.where, ": dora_scale has shape ", m.sizes(), ", needs [", c.out,
                   ", 1, ...] or [1, ", c.in, ", ...]");
}

// ---- The table ----

constexpr LoRAComponent kUNet = LoRAComponent::UNet;
constexpr LoRAComponent kTE = LoRAComponent::TextEncoder;
constexpr LoRAKeyFormat kDiffusers = LoRAKeyFormat::Diffusers;
constexpr LoRAKeyFormat kPEFT = LoRAKeyFormat::PEFT;
constexpr LoRAKeyFormat kKohya = LoRAKeyFormat::Kohya;

const std::vector<Layout>& layouts() {
  static const std::vector<Layout> rows = {
      {"diffusers LoRA",
       "diffusers 0.27.2 loaders/lora.py (network alphas: <module>.alpha)",
       {{"unet.", kUNet, false, false}, {"text_encoder.", kTE, false, false}},
       {{".lora.down.weight", LoRARole::Down, kDiffusers},
        {".lora.up.weight", LoRARole::Up, kDiffusers},
        {".lora_linear_layer.down.weight", LoRARole::Down, kDiffusers},
        {".lora_linear_layer.up.weight", LoRARole::Up, kDiffusers},
        {"_lora.down.weight", LoRARole::Down, kDiffusers},  // attention-processor names
        {"_lora.up.weight", LoRARole::Up, kDiffusers}},
       build_low_rank},
      {"PEFT LoRA",
       "peft 0.10 tuners/lora (alpha: lora_alpha / r of adapter_config.json)",
       {{"base_model.model.", kUNet, false, true}},
       {{".lora_A.weight", LoRARole::Down, kPEFT}, {".lora_B.weight", LoRARole::Up, kPEFT}},
       build_low_rank},
      {"kohya/A1111 LoRA and LoCon",
       "kohya sd-scripts networks/lora.py (alpha / rank; LoCon: convolutions, Tucker lora_mid)",
       {{"lora_unet_", kUNet, true, false}, {"lora_te_", kTE, true, false}},
       {{".lora_down.weight", LoRARole::Down, kKohya},
        {".lora_up.weight", LoRARole::Up, kKohya},
        {".lora_mid.weight", LoRARole::Mid, kKohya},
        {".alpha", LoRARole::Alpha, kKohya}},
       build_low_rank},
      {"LyCORIS LoHa",
       "LyCORIS modules/loha.py (alpha / rank of hada_w1_b)",
       {},
       {{".hada_w1_a", LoRARole::HadaW1A, kKohya},
        {".hada_w1_b", LoRARole::HadaW1B, kKohya},
        {".hada_w2_a", LoRARole::HadaW2A, kKohya},
        {".hada_w2_b", LoRARole::HadaW2B, kKohya},
        {".hada_t1", LoRARole::HadaT1, kKohya},
        {".hada_t2", LoRARole::HadaT2, kKohya}},
       build_loha},
      {"LyCORIS LoKr",
       "LyCORIS modules/lokr.py (alpha / rank of the factorised side)",
       {},
       {{".lokr_w1", LoRARole::LokrW1, kKohya},
        {".lokr_w1_a", LoRARole::LokrW1A, kKohya},
        {".lokr_w1_b", LoRARole::LokrW1B, kKohya},
        {".lokr_w2", LoRARole::LokrW2, kKohya},
        {".lokr_w2_a", LoRARole::LokrW2A, kKohya},
        {".lokr_w2_b", LoRARole::LokrW2B, kKohya},
        {".lokr_t2", LoRARole::LokrT2, kKohya}},
       build_lokr},
      {"LyCORIS full",
       "LyCORIS modules/full.py (a weight difference)",
       {},
       {{".diff", LoRARole::Diff, kKohya}},
       build_full},
      {"DoRA (PEFT)",
       "peft 0.10 tuners/lora/layer.py DoRA: m / ||W + s dW|| (W + s dW)",
       {},
       {{".lora_magnitude_vector", LoRARole::Magnitude, kPEFT},
        {".lora_magnitude_vector.weight", LoRARole::Magnitude, kPEFT}},
       nullptr,
       dora_peft},
      {"DoRA (LyCORIS / kohya)",
       "LyCORIS weight-decomposed update: dora_scale",
       {},
       {{".dora_scale", LoRARole::DoraScale, kKohya}},
       nullptr,
       dora_lycoris},
      {"SDXL text encoders",
       "kohya / diffusers SDXL names",
       {{"lora_te1_", kTE, true, false, "SDXL text encoder 1 (lora_te1_)"},
        {"lora_te2_", kTE, true, false, "SDXL text encoder 2 (lora_te2_)"},
        {"text_encoder_2.", kTE, false, false, "SDXL text encoder 2 (text_encoder_2.)"}},
       {},
       nullptr,
       nullptr,
       true},
      {"bias, norm, OFT and embedding adapters",
       "LyCORIS / peft",
       {},
       {{".diff_b", LoRARole::Diff, kKohya, "bias differences (.diff_b)"},
        {".bias_indices", LoRARole::Diff, kKohya, "LyCORIS bias adapters"},
        {".bias_values", LoRARole::Diff, kKohya, "LyCORIS bias adapters"},
        {".w_norm", LoRARole::Diff, kKohya, "LyCORIS norm adapters"},
        {".b_norm", LoRARole::Diff, kKohya, "LyCORIS norm adapters"},
        {".oft_blocks", LoRARole::Diff, kKohya, "OFT / BOFT adapters"},
        {".oft_diag", LoRARole::Diff, kKohya, "OFT / BOFT adapters"},
        {".lora_embedding_A", LoRARole::Diff, kPEFT, "embedding LoRA"},
        {".lora_embedding_B", LoRARole::Diff, kPEFT, "embedding LoRA"}},
       nullptr,
       nullptr,
       true},
  };
  return rows;
}

// diffusers' attention-processor module names -> layer paths (module path before "_lora").
const std::pair<const char*, const char*> kProcessorRewrites[] = {
    {".processor.to_q", ".to_q"},
    {".processor.to_k", ".to_k"},
    {".processor.to_v", ".to_v"},
    {".processor.to_out", ".to_out.0"},
    {".self_attn.to_q", ".self_attn.q_proj"},
    {".self_attn.to_k", ".self_attn.k_proj"},
    {".self_attn.to_v", ".self_attn.v_proj"},
    {".self_attn.to_out", ".self_attn.out_proj"},
};

// Compound LDM name parts that contain '_' themselves.
const char* const kLdmCompounds[] = {"input_blocks", "middle_block",    "output_blocks", "transformer_blocks",
                                     "proj_in",      "proj_out",        "to_q",          "to_k",
                                     "to_v",         "to_out",          "in_layers",     "out_layers",
                                     "emb_layers",   "skip_connection", "time_embed"};

bool has_role_of(const LoRALayerTensors& g, const Layout& l) {
  for (const auto& s : l.suffixes)
    if (s.role != LoRARole::Alpha && g.has(s.role)) return true;
  return false;
}

}  // namespace

std::optional<LoRAKeyInfo> parse_lora_key(const std::string& key) {
  for (const Layout& l : layouts())
    if (l.refused)
      for (const SuffixRule& r : l.suffixes)
        DMX_CHECK_SUPPORTED(!ends_with(key, r.suffix), "LoRA key '", key, "': ", r.what, " are not supported");
  const PrefixRule* pre = nullptr;
  bool pre_refused = false;
  for (const Layout& l : layouts())
    for (const PrefixRule& r : l.prefixes)
      if (starts_with(key, r.prefix) && (!pre || std::string(r.prefix).size() > std::string(pre->prefix).size())) {
        pre = &r;
        pre_refused = l.refused;
      }
  if (!pre) return std::nullopt;
  DMX_CHECK_SUPPORTED(!pre_refused, "LoRA key '", key, "': ", pre->what, " is not supported (dmx runs SD 1.x / 2.x)");
  const SuffixRule* suf = nullptr;
  for (const Layout& l : layouts())
    if (!l.refused)
      for (const SuffixRule& r : l.suffixes)
        if (ends_with(key, r.suffix) && (!suf || std::string(r.suffix).size() > std::string(suf->suffix).size()))
          suf = &r;
  if (!suf) return std::nullopt;
  const size_t begin = std::string(pre->prefix).size(), end = key.size() - std::string(suf->suffix).size();
  if (end <= begin) return std::nullopt;
  LoRAKeyInfo info;
  info.component = pre->component;
  info.flat = pre->flat;
  info.role = suf->role;
  info.module = key.substr(begin, end - begin);
  // The format follows the naming: kohya prefixes are kohya whatever the suffix; otherwise the suffix says.
  info.format = pre->flat ? LoRAKeyFormat::Kohya : suf->format;
  if (!pre->flat && suf->format == LoRAKeyFormat::Kohya) info.format = LoRAKeyFormat::Diffusers;  // unet.x.alpha
  if (pre->by_module) {
    info.format = LoRAKeyFormat::PEFT;
    if (starts_with(info.module, "text_model.")) info.component = LoRAComponent::TextEncoder;
  }
  if (starts_with(suf->suffix, "_lora.")) {
    bool rewritten = false;
    for (const auto& [from, to] : kProcessorRewrites)
      if (ends_with(info.module, from)) {
        info.module = info.module.substr(0, info.module.size() - std::string(from).size()) + to;
        rewritten = true;
        break;
      }
    if (!rewritten) return std::nullopt;
  }
  return info;
}

std::shared_ptr<nn::LoRAAdapter> build_lora_adapter(const LoRALayerTensors& g, const at::Tensor& w, bool conv,
                                                    double scale, const nlohmann::json& peft_config,
                                                    const std::string& source) {
  auto a = std::make_shared<nn::LoRAAdapter>();
  a->source = source;
  a->scale = scale;
  BuildContext c;
  c.ws.assign(w.sizes().begin(), w.sizes().end());
  c.out = c.ws[0];
  c.in = c.ws[1];
  c.conv = conv;
  c.opts = w.options().requires_grad(false);
  c.where = "LoRA " + source + ": layer '" + g.path + "'";
  c.peft_config = &peft_config;
  if (g.has(LoRARole::Alpha)) {
    DMX_CHECK_FORMAT(g.get(LoRARole::Alpha).numel() == 1, c.where, ": alpha must be a scalar, got shape ",
                     g.get(LoRARole::Alpha).sizes());
    c.alpha = g.get(LoRARole::Alpha).to(at::kDouble).item<double>();
    DMX_CHECK_FORMAT(std::isfinite(*c.alpha), c.where, ": alpha ('", g.t.at(LoRARole::Alpha).first,
                     "') must be finite, got ", *c.alpha);
  }
  // Every weight of the layer must be finite: one NaN would turn the whole picture black.
  for (const auto& [role, kt] : g.t) {
    if (role == LoRARole::Alpha || kt.second.numel() == 0) continue;
    DMX_CHECK_FORMAT(at::isfinite(kt.second).all().item<bool>(), c.where, ": '", kt.first,
                     "' holds non-finite values (NaN or Inf)");
  }
  // Detection: the rows whose tensors the layer holds; exactly one kind of weight update.
  std::set<BuildFn> kinds;
  for (const Layout& l : layouts())
    if (l.build && has_role_of(g, l)) kinds.insert(l.build);
  DMX_CHECK_FORMAT(kinds.size() == 1, c.where,
                   kinds.empty() ? ": has no weights (only alpha / DoRA scale), first key '"
                                 : ": mixes LoRA / LoHa / LoKr / diff weights, first key '",
                   g.first_key(), "'");
  (*kinds.begin())(g, c, *a);
  for (const Layout& l : layouts())
    if (l.modify && has_role_of(g, l)) {
      l.modify(g, c, *a);
      break;  // one magnitude (PEFT's first)
    }
  DMX_CHECK_FORMAT(std::isfinite(a->alpha_scale), c.where, ": alpha / rank = ", a->alpha_scale, " is not finite");
  DMX_CHECK_ARG(std::isfinite(a->scale * a->alpha_scale), c.where, ": scale ", a->scale, " x alpha / rank ",
                a->alpha_scale, " is not finite");
  // The full weight difference must have the layer's shape (checked here, before anything is attached).
  if (a->kind != nn::LoRAKind::LoRA) (void)nn::lora_delta_weight(*a, w.sizes());
  return a;
}

std::vector<LoRALayoutInfo> lora_layouts() {
  std::vector<LoRALayoutInfo> out;
  for (const Layout& l : layouts()) out.push_back({l.name, l.reference, !l.refused});
  return out;
}

std::string kohya_flatten(const std::string& module_path) {
  std::string s = module_path;
  for (char& c : s)
    if (c == '.') c = '_';
  return s;
}

std::string unflatten_ldm_unet_name(const std::string& flat) {
  const std::vector<std::string> tok = split(flat, '_');
  std::vector<std::string> parts;
  for (size_t i = 0; i < tok.size(); ++i) {
    bool merged = false;
    if (i + 1 < tok.size()) {
      const std::string two = tok[i] + "_" + tok[i + 1];
      for (const char* c : kLdmCompounds)
        if (two == c) {
          parts.push_back(two);
          ++i;
          merged = true;
          break;
        }
    }
    if (!merged) parts.push_back(tok[i]);
  }
  if (parts.empty()) return "";
  const std::string& head = parts[0];
  if (head != "input_blocks" && head != "middle_block" && head != "output_blocks" && head != "time_embed" &&
      head != "out")
    return "";
  std::string path;
  for (const auto& p : parts) path += (path.empty() ? "" : ".") + p;
  return path;
}

const char* lora_role_name(LoRARole r) {
  switch (r) {
    case LoRARole::Down:
      return "lora_down.weight";
    case LoRARole::Up:
      return "lora_up.weight";
    case LoRARole::Mid:
      return "lora_mid.weight";
    case LoRARole::Alpha:
      return "alpha";
    case LoRARole::HadaW1A:
      return "hada_w1_a";
    case LoRARole::HadaW1B:
      return "hada_w1_b";
    case LoRARole::HadaW2A:
      return "hada_w2_a";
    case LoRARole::HadaW2B:
      return "hada_w2_b";
    case LoRARole::HadaT1:
      return "hada_t1";
    case LoRARole::HadaT2:
      return "hada_t2";
    case LoRARole::LokrW1:
      return "lokr_w1";
    case LoRARole::LokrW1A:
      return "lokr_w1_a";
    case LoRARole::LokrW1B:
      return "lokr_w1_b";
    case LoRARole::LokrW2:
      return "lokr_w2";
    case LoRARole::LokrW2A:
      return "lokr_w2_a";
    case LoRARole::LokrW2B:
      return "lokr_w2_b";
    case LoRARole::LokrT2:
      return "lokr_t2";
    case LoRARole::Diff:
      return "diff";
    case LoRARole::DoraScale:
      return "dora_scale";
    case LoRARole::Magnitude:
      return "lora_magnitude_vector";
  }
  return "?";
}

const char* lora_format_name(LoRAKeyFormat f) {
  switch (f) {
    case LoRAKeyFormat::Diffusers:
      return "diffusers";
    case LoRAKeyFormat::PEFT:
      return "peft";
    case LoRAKeyFormat::Kohya:
      return "kohya";
  }
  return "?";
}

}  // namespace dmx::loaders
