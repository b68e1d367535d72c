// LoRA file layouts: one table (lora_formats.cpp, kLoRALayouts) with a row per layout dmx reads, each with its
// detection (key prefixes and tensor-name suffixes, and the role of each) and its conversion (the layer's
// tensors -> an nn::LoRAAdapter):
//   diffusers  (loaders/lora.py, 0.27.2): unet.<module>.lora.{down,up}.weight,
//              text_encoder.<module>.lora_linear_layer.{down,up}.weight, the older attention-processor names
//              (...attn1.processor.to_q_lora.down.weight, ...self_attn.to_q_lora.down.weight), optional
//              <module>.alpha (network alphas)
//   PEFT       (peft 0.10 tuners/lora): [unet.|text_encoder.|base_model.model.]<module>.lora_{A,B}.weight
//   kohya/A1111 LoRA and LoCon (sd-scripts networks/lora.py): lora_unet_<module with _>, lora_te_<module with _>,
//              .lora_down / .lora_up / .lora_mid .weight, .alpha; UNet modules by diffusers names
//              (lora_unet_down_blocks_0_...) or original LDM names (lora_unet_input_blocks_1_1_...)
//   LyCORIS    LoHa .hada_w{1,2}_{a,b} / .hada_t{1,2}, LoKr .lokr_w{1,2}[_a|_b] / .lokr_t2, full .diff
//   DoRA       PEFT <module>.lora_magnitude_vector[.weight]; LyCORIS / kohya .dora_scale
// plus rows for layouts recognised and refused (SDXL names, bias / norm / OFT / embedding adapters).
// Canonical names are diffusers module paths. kohya's names join the path with '_', which is ambiguous
// without the model: the loader resolves them against the model's own module list (kohya_flatten).
//
// Adding a layout: its row (and, for a new kind of weight update, the kind in nn/lora.h), its test.
// Internal header of the loaders layer.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "nn/lora.h"

namespace dmx::loaders {

enum class LoRAComponent { UNet, TextEncoder };
enum class LoRAKeyFormat { Diffusers, PEFT, Kohya };  // how module names are written

enum class LoRARole {
  Down,
  Up,
  Mid,
  Alpha,  // LoRA / LoCon
  HadaW1A,
  HadaW1B,
  HadaW2A,
  HadaW2B,
  HadaT1,
  HadaT2,  // LoHa
  LokrW1,
  LokrW1A,
  LokrW1B,
  LokrW2,
  LokrW2A,
  LokrW2B,
  LokrT2,     // LoKr
  Diff,       // full weight difference
  DoraScale,  // LyCORIS / kohya DoRA magnitude
  Magnitude,  // PEFT DoRA magnitude
};

struct LoRAKeyInfo {
  LoRAComponent component = LoRAComponent::UNet;
  LoRAKeyFormat format = LoRAKeyFormat::Diffusers;
  // The diffusers module path (unet-relative / text-encoder-relative), or with `flat` kohya's
  // '_'-joined name to resolve against the model. With `ldm`, flat is an original LDM UNet name.
  std::string module;
  bool flat = false;
  LoRARole role = LoRARole::Down;
};

// Parses one tensor name; nullopt when no row of the table matches (the loader reports it as unmatched).
// Recognised layouts dmx cannot apply throw dmx::Unsupported naming the key: SDXL (lora_te1_/lora_te2_,
// text_encoder_2.), bias differences (.diff_b), LyCORIS norm / bias adapters, OFT, embedding LoRA.
std::optional<LoRAKeyInfo> parse_lora_key(const std::string& key);

// kohya's flattening of a module path: "down_blocks.0.attentions.0.proj_in" -> "down_blocks_0_attentions_0_proj_in".
std::string kohya_flatten(const std::string& module_path);

// Original LDM UNet module path from kohya's flattened LDM name ("input_blocks_1_1_proj_in" ->
// "input_blocks.1.1.proj_in"); empty when the name does not start with an LDM block name.
std::string unflatten_ldm_unet_name(const std::string& flat);

const char* lora_role_name(LoRARole r);         // the key suffix, e.g. "lora_down.weight"
const char* lora_format_name(LoRAKeyFormat f);  // "diffusers", "peft", "kohya"

// The tensors of one file that land on one layer, by role.
struct LoRALayerTensors {
  LoRAComponent component = LoRAComponent::UNet;
  LoRAKeyFormat format = LoRAKeyFormat::Diffusers;
  std::string path;                                          // the layer's module path
  std::map<LoRARole, std::pair<std::string, at::Tensor>> t;  // role -> (key, tensor)
  bool has(LoRARole r) const { return t.count(r) != 0; }
  const at::Tensor& get(LoRARole r) const { return t.at(r).second; }
  std::string first_key() const { return t.begin()->second.first; }
};

// The conversion: the adapter of one layer (weight shape [out, in] or [out, in, kh, kw], in its dtype and
// device) from its tensors, by the rows of the table they belong to. Every shape is checked (FormatError naming
// the key and the layer) before anything is attached. scale: the user's multiplier of this component;
// peft_config: adapter_config.json beside a PEFT file (lora_alpha / r), or null.
std::shared_ptr<nn::LoRAAdapter> build_lora_adapter(const LoRALayerTensors& g, const at::Tensor& weight, bool conv,
                                                    double scale, const nlohmann::json& peft_config,
                                                    const std::string& source);

// The rows of the table (name and the reference it follows), for documentation and tests.
struct LoRALayoutInfo {
  std::string name;
  std::string reference;
  bool supported = true;
};
std::vector<LoRALayoutInfo> lora_layouts();
}  // namespace dmx::loaders
