// Applying LoRA files to a loaded Stable Diffusion model: diffusers 0.27.2 load_lora_weights /
// fuse_lora / unfuse_lora with the peft 0.10 backend (every layer an adapter names gets
// `W x + scale * alpha / r * B A x`, the scale acting on the UNet and the text encoder alike), plus the
// kohya/A1111 and LyCORIS layouts (LoCon, LoHa, LoKr, DoRA) of the same files, and the A1111 prompt syntax
// `<lora:NAME:WEIGHT>`. Every key must land on a layer: unmatched keys are an error (or, when allowed, a
// counted warning), never ignored silently.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "loaders/model_bundle.h"

namespace dmx::loaders {

enum class LoRAMode {
  Runtime,  // adapted layers compute W x + b + scale * B A x; weights untouched
  Merged,   // weights patched in float32, restored bit for bit on removal
};
LoRAMode parse_lora_mode(const std::string& s);  // "runtime" | "merged"; InvalidArgument naming --lora-mode

struct LoRASpec {
  std::string path;
  double unet_scale = 1.0;
  double text_encoder_scale = 1.0;
};

struct LoRAApplyOptions {
  LoRAMode mode = LoRAMode::Merged;
  bool allow_unmatched = false;  // unmatched keys: a counted warning instead of a FormatError
};

struct LoRAReport {
  std::string source;
  std::string format;                              // diffusers | peft | kohya (the first adapter's)
  int unet_tensors = 0, text_encoder_tensors = 0;  // tensors of the file that landed on each component
  int unet_layers = 0, text_encoder_layers = 0;    // layers adapted
  std::vector<std::string> unmatched;              // keys that matched no layer (only with allow_unmatched)
  std::string summary() const;                     // "applied N tensors to UNet, M to text encoder" (+ unmatched count)
};

// "FILE[:SCALE]" as given to --lora: the part after the last ':' is the scale when it is a number and the
// whole argument is not an existing file. InvalidArgument naming --lora for an empty path.
LoRASpec parse_lora_arg(const std::string& arg);

// A1111 extra-network syntax: removes every `<lora:NAME>`, `<lora:NAME:W>` or `<lora:NAME:W_TE:W_UNET>`
// tag from `prompt` (appending them to `out`, names only, path = NAME) and returns the cleaned prompt.
// A malformed weight is an InvalidArgument naming the tag.
std::string extract_prompt_loras(const std::string& prompt, std::vector<LoRASpec>& out);
// DIR/NAME.safetensors (NAME may carry the extension); InvalidArgument naming NAME when --lora-dir is
// empty or the file does not exist.
std::string resolve_lora_name(const std::string& lora_dir, const std::string& name);

// Applies one adapter file already in memory (tests use synthetic ones). peft_config: a PEFT
// adapter_config.json (lora_alpha / r) or null. The adapters are attached in runtime form; call
// set_lora_mode(Merged) (apply_loras does) to merge. Every check runs before anything is attached.
LoRAReport apply_lora_tensors(StableDiffusionModels& m, const io::TensorMap& tensors, const LoRASpec& spec,
                              bool allow_unmatched, const nlohmann::json& peft_config = nullptr,
                              const std::string& source = "");
// Loads and applies every file (adapter_config.json beside a PEFT file supplies its alpha), then sets the
// mode. Reports one entry per file.
std::vector<LoRAReport> apply_loras(StableDiffusionModels& m, const std::vector<LoRASpec>& specs,
                                    const LoRAApplyOptions& o);
// Merges (Merged) or unmerges (Runtime) every adapted layer.
void set_lora_mode(StableDiffusionModels& m, LoRAMode mode);
// Unmerges and detaches every adapter: the model is exactly as loaded.
void remove_loras(StableDiffusionModels& m);
// Number of layers with adapters attached (UNet + text encoder).
int count_lora_layers(const StableDiffusionModels& m);

// Applies on construction; on destruction restores exactly the state it found: the adapters it attached are
// detached, adapters attached before the scope stay (in their order and mode, merged weights bit for bit).
class ScopedLoRAs {
 public:
  ScopedLoRAs(std::shared_ptr<StableDiffusionModels> m, const std::vector<LoRASpec>& specs, const LoRAApplyOptions& o);
  ~ScopedLoRAs();
  ScopedLoRAs(const ScopedLoRAs&) = delete;
  ScopedLoRAs& operator=(const ScopedLoRAs&) = delete;
  const std::vector<LoRAReport>& reports() const { return reports_; }

 private:
  struct Saved;  // every LoRA-capable layer's adapters and mode before the scope
  std::shared_ptr<StableDiffusionModels> m_;
  std::shared_ptr<Saved> saved_;
  std::vector<LoRAReport> reports_;
};
}  // namespace dmx::loaders
