// LoRA key tables (see lora_names.h): diffusers 0.27.2 loaders/lora.py + lora_conversion_utils.py
// (_convert_kohya_lora_to_diffusers), peft 0.10 save layout, kohya sd-scripts networks/lora.py and LyCORIS.
#include "io/lora_names.h"

#include <array>
#include <vector>

#include "core/text.h"
#include "dmx/error.h"

namespace dmx::io {

namespace {

struct PrefixRule {
  const char* prefix;
  LoRAComponent component;
  bool flat;          // kohya '_'-joined module names
  bool by_module;     // PEFT base_model.model.: the component follows from the module path
  const char* unsupported;  // non-null: a recognised layout dmx cannot apply
};

const PrefixRule kPrefixes[] = {
    {"lora_unet_", LoRAComponent::UNet, true, false, nullptr},
    {"lora_te_", LoRAComponent::TextEncoder, true, false, nullptr},
    {"lora_te1_", LoRAComponent::TextEncoder, true, false, "SDXL text encoder 1 (lora_te1_)"},
    {"lora_te2_", LoRAComponent::TextEncoder, true, false, "SDXL text encoder 2 (lora_te2_)"},
    {"unet.", LoRAComponent::UNet, false, false, nullptr},
    {"text_encoder.", LoRAComponent::TextEncoder, false, false, nullptr},
    {"text_encoder_2.", LoRAComponent::TextEncoder, false, false, "SDXL text encoder 2 (text_encoder_2.)"},
    {"base_model.model.", LoRAComponent::UNet, false, true, nullptr},
};

struct SuffixRule {
  const char* suffix;
  LoRARole role;
  LoRAKeyFormat format;
};

// Longest match wins.
const SuffixRule kSuffixes[] = {
    {".lora_down.weight", LoRARole::Down, LoRAKeyFormat::Kohya},
    {".lora_up.weight", LoRARole::Up, LoRAKeyFormat::Kohya},
    {".lora_mid.weight", LoRARole::Mid, LoRAKeyFormat::Kohya},
    {".alpha", LoRARole::Alpha, LoRAKeyFormat::Kohya},
    {".lora.down.weight", LoRARole::Down, LoRAKeyFormat::Diffusers},
    {".lora.up.weight", LoRARole::Up, LoRAKeyFormat::Diffusers},
    {".lora_linear_layer.down.weight", LoRARole::Down, LoRAKeyFormat::Diffusers},
    {".lora_linear_layer.up.weight", LoRARole::Up, LoRAKeyFormat::Diffusers},
    {"_lora.down.weight", LoRARole::Down, LoRAKeyFormat::Diffusers},  // attention-processor names
    {"_lora.up.weight", LoRARole::Up, LoRAKeyFormat::Diffusers},
    {".lora_A.weight", LoRARole::Down, LoRAKeyFormat::PEFT},
    {".lora_B.weight", LoRARole::Up, LoRAKeyFormat::PEFT},
    {".lora_magnitude_vector", LoRARole::Magnitude, LoRAKeyFormat::PEFT},
    {".lora_magnitude_vector.weight", LoRARole::Magnitude, LoRAKeyFormat::PEFT},
    {".dora_scale", LoRARole::DoraScale, LoRAKeyFormat::Kohya},
    {".hada_w1_a", LoRARole::HadaW1A, LoRAKeyFormat::Kohya},
    {".hada_w1_b", LoRARole::HadaW1B, LoRAKeyFormat::Kohya},
    {".hada_w2_a", LoRARole::HadaW2A, LoRAKeyFormat::Kohya},
    {".hada_w2_b", LoRARole::HadaW2B, LoRAKeyFormat::Kohya},
    {".hada_t1", LoRARole::HadaT1, LoRAKeyFormat::Kohya},
    {".hada_t2", LoRARole::HadaT2, LoRAKeyFormat::Kohya},
    {".lokr_w1", LoRARole::LokrW1, LoRAKeyFormat::Kohya},
    {".lokr_w1_a", LoRARole::LokrW1A, LoRAKeyFormat::Kohya},
    {".lokr_w1_b", LoRARole::LokrW1B, LoRAKeyFormat::Kohya},
    {".lokr_w2", LoRARole::LokrW2, LoRAKeyFormat::Kohya},
    {".lokr_w2_a", LoRARole::LokrW2A, LoRAKeyFormat::Kohya},
    {".lokr_w2_b", LoRARole::LokrW2B, LoRAKeyFormat::Kohya},
    {".lokr_t2", LoRARole::LokrT2, LoRAKeyFormat::Kohya},
    {".diff", LoRARole::Diff, LoRAKeyFormat::Kohya},
};

// Suffixes of layouts recognised but not applied.
const std::pair<const char*, const char*> kUnsupportedSuffixes[] = {
    {".diff_b", "bias differences (.diff_b)"},
    {".bias_indices", "LyCORIS bias adapters"},
    {".bias_values", "LyCORIS bias adapters"},
    {".w_norm", "LyCORIS norm adapters"},
    {".b_norm", "LyCORIS norm adapters"},
    {".oft_blocks", "OFT / BOFT adapters"},
    {".oft_diag", "OFT / BOFT adapters"},
    {".lora_embedding_A", "embedding LoRA"},
    {".lora_embedding_B", "embedding LoRA"},
};

// diffusers' attention-processor module names -> layer paths (module path before "_lora").
const std::pair<const char*, const char*> kProcessorRewrites[] = {
    {".processor.to_q", ".to_q"},   {".processor.to_k", ".to_k"},       {".processor.to_v", ".to_v"},
    {".processor.to_out", ".to_out.0"},
    {".self_attn.to_q", ".self_attn.q_proj"}, {".self_attn.to_k", ".self_attn.k_proj"},
    {".self_attn.to_v", ".self_attn.v_proj"}, {".self_attn.to_out", ".self_attn.out_proj"},
};

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// Compound LDM name parts that contain '_' themselves.
const char* const kLdmCompounds[] = {"input_blocks", "middle_block",    "output_blocks", "transformer_blocks",
                                     "proj_in",      "proj_out",        "to_q",          "to_k",
                                     "to_v",         "to_out",          "in_layers",     "out_layers",
                                     "emb_layers",   "skip_connection", "time_embed"};

}  // namespace

std::optional<LoRAKeyInfo> parse_lora_key(const std::string& key) {
  for (const auto& [suffix, what] : kUnsupportedSuffixes)
    DMX_CHECK_SUPPORTED(!ends_with(key, suffix), "LoRA key '", key, "': ", what, " are not supported");
  const PrefixRule* pre = nullptr;
  for (const auto& r : kPrefixes)
    if (starts_with(key, r.prefix) && (!pre || std::string(r.prefix).size() > std::string(pre->prefix).size()))
      pre = &r;
  if (!pre) return std::nullopt;
  DMX_CHECK_SUPPORTED(pre->unsupported == nullptr, "LoRA key '", key, "': ", pre->unsupported,
                      " is not supported (dmx runs SD 1.x / 2.x)");
  const SuffixRule* suf = nullptr;
  for (const auto& r : kSuffixes)
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
    case LoRARole::Down: return "lora_down.weight";
    case LoRARole::Up: return "lora_up.weight";
    case LoRARole::Mid: return "lora_mid.weight";
    case LoRARole::Alpha: return "alpha";
    case LoRARole::HadaW1A: return "hada_w1_a";
    case LoRARole::HadaW1B: return "hada_w1_b";
    case LoRARole::HadaW2A: return "hada_w2_a";
    case LoRARole::HadaW2B: return "hada_w2_b";
    case LoRARole::HadaT1: return "hada_t1";
    case LoRARole::HadaT2: return "hada_t2";
    case LoRARole::LokrW1: return "lokr_w1";
    case LoRARole::LokrW1A: return "lokr_w1_a";
    case LoRARole::LokrW1B: return "lokr_w1_b";
    case LoRARole::LokrW2: return "lokr_w2";
    case LoRARole::LokrW2A: return "lokr_w2_a";
    case LoRARole::LokrW2B: return "lokr_w2_b";
    case LoRARole::LokrT2: return "lokr_t2";
    case LoRARole::Diff: return "diff";
    case LoRARole::DoraScale: return "dora_scale";
    case LoRARole::Magnitude: return "lora_magnitude_vector";
  }
  return "?";
}

const char* lora_format_name(LoRAKeyFormat f) {
  switch (f) {
    case LoRAKeyFormat::Diffusers: return "diffusers";
    case LoRAKeyFormat::PEFT: return "peft";
    case LoRAKeyFormat::Kohya: return "kohya";
  }
  return "?";
}

}  // namespace dmx::io
