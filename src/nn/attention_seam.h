// The attention seam (docs/architecture.md section 3): what extensions such as Prompt-to-Prompt (Hertz et al. 2022,
// "Prompt-to-Prompt Image Editing with Cross Attention Control") need from attention layers, without counting
// calls or assuming batch halves. It plays the role of diffusers' attention processors
// (models/attention_processor.py, set_attn_processor) and of the community pipeline_prompt2prompt.py's
// P2PCrossAttnProcessor, split in two:
//   - an AttentionSite per layer, fixed after construction by assign_attention_sites() from the module path;
//   - an AttentionContext per UNet call (step, timestep, which batch rows are conditional and which prompt
//     each row carries), set by the pipeline;
//   - AttentionControllers observe or edit the attention probabilities of the sites they want;
//   - an AttentionProcessor replaces the whole q, k, v -> output computation of the sites it wants;
//   - AttentionInputHooks transform what the key and value projections read (AUTOMATIC1111 hypernetworks:
//     k = to_k(f_k(c)), v = to_v(f_v(c))), chained in installation order; queries never change;
//   - RAII guards install them on one model and restore the previous state, also on exceptions.
// With nothing installed the layers take the fast path (nn::attention) unchanged. The seam belongs to one
// model: guards on a model assume one run at a time on it (as the model's forward itself does).
// Internal header of the nn layer.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dmx::nn {

enum class AttentionPlace { Down, Mid, Up, Other };
const char* place_name(AttentionPlace place);  // "down" | "mid" | "up" | "other"

struct AttentionSite {
  std::string path;  // diffusers module path, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
  AttentionPlace place = AttentionPlace::Other;
  int block = -1;              // index in down_blocks / up_blocks; 0 for the mid block; -1 otherwise
  int layer = -1;              // attentions.<layer> inside the block
  int transformer_block = -1;  // transformer_blocks.<n> inside Transformer2DModel
  bool is_cross = false;       // attends to the encoder states (attn2), not to itself
  int64_t heads = 0;
  int index = -1;  // position among the model's attention sites, in module registration order
  bool assigned() const { return !path.empty(); }
};

// What one batch row of a UNet call carries.
struct AttentionRow {
  bool conditional = false;  // false: the unconditional (negative prompt) branch of classifier-free guidance
  int prompt = 0;            // which prompt of the pipeline (0 = source in Prompt-to-Prompt)
};

struct AttentionContext {
  int step = -1;  // denoising step index, 0-based; -1 = unknown
  int num_steps = 0;
  double timestep = 0;
  std::vector<AttentionRow> rows;  // one per batch row; empty = unknown
  // Indices of the rows with the given `conditional` flag, in batch order.
  std::vector<int64_t> rows_where(bool conditional) const;
};

class AttentionController {
 public:
  virtual ~AttentionController() = default;
  virtual bool wants(const AttentionSite& site) const { return true; }
  // Per call: whether this call (its context and number of queries) needs the probabilities. When no
  // controller wants a call the layer keeps the memory-lean fast path (the probabilities of a 64x64 latent's
  // self attention at batch 4 would take 2 GB). Default: wants(site).
  virtual bool wants_call(const AttentionSite& site, const AttentionContext& ctx, int64_t num_queries) const {
    return wants(site);
  }
  // probs: [B, heads, Nq, Nk] after the softmax, in the dtype diffusers casts them to. Returns the
  // probabilities to use (probs itself to only observe). Must not edit probs in place when it requires grad.
  virtual at::Tensor on_probs(const AttentionSite& site, const AttentionContext& ctx, const at::Tensor& probs) = 0;
};

class AttentionProcessor {
 public:
  virtual ~AttentionProcessor() = default;
  virtual bool wants(const AttentionSite& site) const { return true; }
  // q: [B, heads, Nq, d], k and v: [B, heads, Nk, d] -> [B, heads, Nq, d]. scale multiplies q.k; upcast:
  // the layer's upcast_attention / upcast_softmax. Controllers are not consulted for the sites it handles
  // (it may call attention_with_probs itself).
  virtual at::Tensor forward(const AttentionSite& site, const AttentionContext& ctx, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, double scale, bool upcast) = 0;
};

// The inputs of an attention layer's key and value projections: [B, M, C] each (to_k reads `key`, to_v reads
// `value`). Before any hook both are the layer's context: the encoder states for cross-attention (attn2, and
// attn1 in only_cross_attention blocks), the layer's own normalised input for self-attention.
struct KeyValueInputs {
  at::Tensor key;
  at::Tensor value;
};

class AttentionInputHook {
 public:
  virtual ~AttentionInputHook() = default;
  virtual bool wants(const AttentionSite& site) const { return true; }
  // Returns the inputs to use (same shapes); `in` holds the previous hook's outputs.
  virtual KeyValueInputs on_key_value_inputs(const AttentionSite& site, const AttentionContext& ctx,
                                             KeyValueInputs in) = 0;
};

// The state shared by the attention layers of one model.
struct AttentionSeam {
  std::vector<std::shared_ptr<AttentionController>> controllers;  // applied in installation order
  std::shared_ptr<AttentionProcessor> processor;
  std::vector<std::shared_ptr<AttentionInputHook>> input_hooks;  // chained in installation order
  AttentionContext context;
  // Whether the score computation leaves the fast path (input hooks do not need that).
  bool active() const { return !controllers.empty() || processor != nullptr; }
};

// The key / value inputs after every input hook of `seam` that wants the site (seam may be null).
KeyValueInputs apply_input_hooks(const AttentionSite& site, const AttentionSeam* seam, const at::Tensor& context);

// Walks root's sub-modules once and gives every attention layer its site (from its path) and root's shared
// seam; idempotent. UNet2DConditionModel calls it at the end of its constructor. Returns the seam.
std::shared_ptr<AttentionSeam> assign_attention_sites(torch::nn::Module& root);
// root's sites in registration order (assigning them first if needed).
std::vector<AttentionSite> attention_sites(torch::nn::Module& root);

// The explicit computation the seam uses (diffusers' get_attention_scores + bmm): scores = scale q k^T in
// float32 when upcast, softmax, cast to v's dtype, then each controller of `seam` that wants the call, then
// probs @ v. Differentiable. q [B, H, Nq, d], k, v [B, H, Nk, d] -> [B, H, Nq, d].
at::Tensor attention_with_probs(const AttentionSite& site, const AttentionSeam* seam, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, double scale, bool upcast);

// What an attention layer runs when a seam is active or autograd needs a graph (seam may be null): the
// processor when one wants the site; else attention_with_probs when a controller wants the call or gradients
// are needed; else the fast path nn::attention.
at::Tensor attention_through_seam(const AttentionSite& site, const AttentionSeam* seam, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, double scale, bool upcast);

// Installs a controller on root's attention layers for the guard's lifetime (after those already there).
class ScopedAttentionController {
 public:
  ScopedAttentionController(torch::nn::Module& root, std::shared_ptr<AttentionController> controller);
  ~ScopedAttentionController();
  ScopedAttentionController(const ScopedAttentionController&) = delete;
  ScopedAttentionController& operator=(const ScopedAttentionController&) = delete;

 private:
  std::shared_ptr<AttentionSeam> seam_;
  std::shared_ptr<AttentionController> controller_;
};

// Sets root's processor for the guard's lifetime; the previous one comes back after.
class ScopedAttentionProcessor {
 public:
  ScopedAttentionProcessor(torch::nn::Module& root, std::shared_ptr<AttentionProcessor> processor);
  ~ScopedAttentionProcessor();
  ScopedAttentionProcessor(const ScopedAttentionProcessor&) = delete;
  ScopedAttentionProcessor& operator=(const ScopedAttentionProcessor&) = delete;

 private:
  std::shared_ptr<AttentionSeam> seam_;
  std::shared_ptr<AttentionProcessor> previous_;
};

// Installs an input hook on root's attention layers for the guard's lifetime (after those already there).
class ScopedAttentionInputHook {
 public:
  ScopedAttentionInputHook(torch::nn::Module& root, std::shared_ptr<AttentionInputHook> hook);
  ~ScopedAttentionInputHook();
  ScopedAttentionInputHook(const ScopedAttentionInputHook&) = delete;
  ScopedAttentionInputHook& operator=(const ScopedAttentionInputHook&) = delete;

 private:
  std::shared_ptr<AttentionSeam> seam_;
  std::shared_ptr<AttentionInputHook> hook_;
};

// Sets the per-call context for the guard's lifetime (one UNet call); the previous one comes back after.
class ScopedAttentionContext {
 public:
  ScopedAttentionContext(torch::nn::Module& root, AttentionContext context);
  ~ScopedAttentionContext();
  ScopedAttentionContext(const ScopedAttentionContext&) = delete;
  ScopedAttentionContext& operator=(const ScopedAttentionContext&) = delete;

 private:
  std::shared_ptr<AttentionSeam> seam_;
  AttentionContext previous_;
};
}  // namespace dmx::nn
