// Original (CompVis/LDM, Stability-AI) single-file checkpoints: key-name tables (ldm_tables.cpp, with the
// shared machinery in ldm_tables.h), config detection (ldm_detect.cpp), the LDM .yaml subset (ldm_yaml.cpp) and
// ControlNet single files (ldm_controlnet.cpp).
// Mirrors diffusers 0.27.2 pipelines/stable_diffusion/convert_from_ckpt.py (convert_ldm_unet_checkpoint,
// convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint,
// create_unet_diffusers_config, create_vae_diffusers_config) and loaders/single_file_utils.py.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "io/safetensors.h"

namespace dmx::io {

// Component prefixes of an original single-file checkpoint.
inline constexpr const char* kLdmUnetPrefix = "model.diffusion_model.";
inline constexpr const char* kLdmVaePrefix = "first_stage_model.";
inline constexpr const char* kLdmClipPrefix = "cond_stage_model.transformer.";  // SD1: transformers CLIPTextModel
inline constexpr const char* kLdmOpenClipPrefix = "cond_stage_model.model.";    // SD2: OpenCLIP ViT-H text tower
inline constexpr const char* kLdmControlNetPrefix = "control_model.";           // cldm ControlNet 1.0 / 1.1

enum class LdmTextEncoder { None, Clip, OpenClip };
// Which text encoder layout the checkpoint carries (SD1 family: Clip; SD2 family: OpenClip).
LdmTextEncoder ldm_text_encoder_kind(const TensorMap& ckpt);

// Keys that carry nothing inference needs and are dropped on purpose: EMA copies (model_ema.*), the DDPM
// schedule buffers (betas, alphas_cumprod, ...), the VAE training loss, CLIP position_ids, OpenCLIP
// text_projection / logit_scale / attn_mask.
bool is_ignorable_ldm_key(const std::string& key);

// Key conversions (original -> diffusers) for each component; input keys carry their prefixes
// (model.diffusion_model., first_stage_model., cond_stage_model.transformer. / cond_stage_model.model.).
TensorMap convert_ldm_unet(const TensorMap& ckpt, const nlohmann::json& unet_config);
TensorMap convert_ldm_vae(const TensorMap& ckpt, const nlohmann::json& vae_config);
TensorMap convert_ldm_clip(const TensorMap& ckpt, const nlohmann::json& text_config);

// Config detection from tensor shapes, in diffusers config.json form. ldm_yaml is the parsed LDM .yaml
// (parse_ldm_yaml) or null; when given, unet_config.params num_heads / num_head_channels, scale_factor,
// parameterization and the beta schedule are read from it.
nlohmann::json detect_ldm_unet_config(const TensorMap& ckpt, const nlohmann::json& ldm_yaml = nullptr);
nlohmann::json detect_ldm_vae_config(const TensorMap& ckpt, const nlohmann::json& ldm_yaml = nullptr);
// num_attention_heads 0: hidden / 64 (standard widths); a width that is not a multiple of 64 then throws
// InvalidArgument asking for `--config DIR`.
nlohmann::json detect_ldm_clip_config(const TensorMap& ckpt, int64_t num_attention_heads = 0);
// The SD default PNDMScheduler config; v_prediction for yaml parameterization "v" (or, with no yaml,
// an SD2-family checkpoint, as diffusers then assumes v2-inference-v.yaml).
nlohmann::json ldm_scheduler_config(const TensorMap& ckpt, const nlohmann::json& ldm_yaml = nullptr);

// A small YAML subset, enough for LDM configs: block mappings and sequences by indentation, `key: value`,
// flow lists `[a, b]` and maps `{a: 1}`, quoted strings, numbers, booleans, null, `#` comments.
// Anything else is a FormatError naming `what` and the line.
nlohmann::json parse_ldm_yaml(const std::string& text, const std::string& what);
// ControlNet single files (ControlNet 1.0 / 1.1 `control_model.*`, or the same keys without the prefix, as
// diffusers' convert_controlnet_checkpoint accepts). The prefix in use ("control_model." or ""); FormatError
// when the file holds no ControlNet.
std::string ldm_controlnet_prefix(const TensorMap& ckpt);
// diffusers ControlNetModel config.json from tensor shapes (hint-encoder widths included); heads and
// global_average_pooling from the .yaml's control_stage_config when given.
nlohmann::json detect_ldm_controlnet_config(const TensorMap& ckpt, const nlohmann::json& ldm_yaml = nullptr);
// control_model.* -> diffusers ControlNetModel names (tables; unmatched keys are a FormatError).
TensorMap convert_ldm_controlnet(const TensorMap& ckpt, const nlohmann::json& controlnet_config);
// The inverse: diffusers ControlNetModel names -> control_model.* (ControlNet 1.0 / 1.1, as A1111 loads), from
// the same tables. Every key must map (FormatError listing those that do not).
TensorMap convert_controlnet_to_ldm(const TensorMap& diffusers, const nlohmann::json& controlnet_config);
}  // namespace dmx::io
