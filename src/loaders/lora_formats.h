// LoRA file key names: the one table-driven conversion for every common layout.
//   diffusers  (loaders/lora.py, 0.27.2): unet.<module>.lora.{down,up}.weight,
//              text_encoder.<module>.lora_linear_layer.{down,up}.weight, the older attention-processor names
//              (...attn1.processor.to_q_lora.down.weight, ...self_attn.to_q_lora.down.weight), optional
//              <module>.alpha (network alphas)
//   PEFT       (peft 0.10 tuners/lora): [unet.|text_encoder.|base_model.model.]<module>.lora_{A,B}.weight,
//              <module>.lora_magnitude_vector[.weight] (DoRA)
//   kohya/A1111 (sd-scripts networks/lora.py, LyCORIS): lora_unet_<module with _>, lora_te_<module with _>,
//              .lora_down / .lora_up / .lora_mid .weight, .alpha, LoHa .hada_w{1,2}_{a,b} / .hada_t{1,2},
//              LoKr .lokr_w{1,2}[_a|_b] / .lokr_t2, .diff, DoRA .dora_scale; UNet modules by diffusers names
//              (lora_unet_down_blocks_0_...) or original LDM names (lora_unet_input_blocks_1_1_...).
// Canonical names are diffusers module paths. kohya's names join the path with '_', which is ambiguous
// without the model: the loader resolves them against the model's own module list (kohya_flatten).
#pragma once
#include <optional>
#include <string>

namespace dmx::io {

enum class LoRAComponent { UNet, TextEncoder };
enum class LoRAKeyFormat { Diffusers, PEFT, Kohya };

enum class LoRARole {
  Down, Up, Mid, Alpha,                                        // LoRA / LoCon
  HadaW1A, HadaW1B, HadaW2A, HadaW2B, HadaT1, HadaT2,          // LoHa
  LokrW1, LokrW1A, LokrW1B, LokrW2, LokrW2A, LokrW2B, LokrT2,  // LoKr
  Diff,                                                        // full weight difference
  DoraScale,                                                   // LyCORIS / kohya DoRA magnitude
  Magnitude,                                                   // PEFT DoRA magnitude
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

// Parses one tensor name; nullopt when no rule of the table matches (the loader reports it as unmatched).
// Recognised layouts dmx cannot apply throw dmx::Unsupported naming the key: SDXL (lora_te1_/lora_te2_,
// text_encoder_2.), bias differences (.diff_b), LyCORIS norm / bias adapters.
std::optional<LoRAKeyInfo> parse_lora_key(const std::string& key);

// kohya's flattening of a module path: "down_blocks.0.attentions.0.proj_in" -> "down_blocks_0_attentions_0_proj_in".
std::string kohya_flatten(const std::string& module_path);

// Original LDM UNet module path from kohya's flattened LDM name ("input_blocks_1_1_proj_in" ->
// "input_blocks.1.1.proj_in"); empty when the name does not start with an LDM block name.
std::string unflatten_ldm_unet_name(const std::string& flat);

const char* lora_role_name(LoRARole r);      // the key suffix, e.g. "lora_down.weight"
const char* lora_format_name(LoRAKeyFormat f);  // "diffusers", "peft", "kohya"
}  // namespace dmx::io
