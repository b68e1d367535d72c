// Prompt-to-Prompt controllers (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention
// Control"), mirroring diffusers' community examples/community/pipeline_prompt2prompt.py (v0.27.2) and
// google/prompt-to-prompt (ptp_utils.py, seq_aligner.py): AttentionStore, AttentionReplace (word swap),
// AttentionRefine (added words, token alignment), AttentionReweight (per-word scale), LocalBlend, and the
// token helpers (get_word_inds, replacement / refinement mappers, equalizer, time-word alphas).
//
// They run on the attention seam (nn/attention_seam.h): rows are found from the per-call context (the
// conditional row of each prompt), not from batch halves, and steps come from the context, not from
// counting calls. Prompt 0 is the source; prompts 1.. are edits. Unconditional rows are left alone, as
// in the reference.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "models/clip_tokenizer.h"
#include "nn/attention_seam.h"

namespace dmx::extensions {

// ---------------------------------------------------------------------------------------------------
// Token helpers (ptp_utils.get_word_inds and seq_aligner). Positions are in the padded id sequence
// (BOS at 0, so the first word's first token is 1).

// The decoded text of each token of tokenizer.encode(text) without BOS/EOS (tokenizer.decode([id]).strip("#")).
std::vector<std::string> token_texts(const models::CLIPTokenizer& tok, const std::string& text);
// Token positions of every occurrence of `word` among text.split(" "), or of the word at index word_place.
std::vector<int64_t> get_word_inds(const models::CLIPTokenizer& tok, const std::string& text, const std::string& word);
std::vector<int64_t> get_word_inds(const models::CLIPTokenizer& tok, const std::string& text, int word_place);

// Word swap: [P-1, L, L] float32 maps the source's token positions onto each edit's. Prompts must have the
// same number of words (InvalidArgument naming both counts otherwise).
at::Tensor get_replacement_mapper(const std::vector<std::string>& prompts, const models::CLIPTokenizer& tok,
                                  int max_len = 77);
// Refinement: global alignment of the token ids (gap 0, match 1, mismatch -1). mapper [P-1, L] int64 (the
// source position of each edit token, -1 for inserted ones), alphas [P-1, L] float32 (0 for inserted tokens).
std::pair<at::Tensor, at::Tensor> get_refinement_mapper(const std::vector<std::string>& prompts,
                                                        const models::CLIPTokenizer& tok, int max_len = 77);
// Re-weighting: [1, L] ones with each word's tokens set to its scale (words looked up in `text`). A word not
// in text: InvalidArgument naming it and the prompt.
at::Tensor get_equalizer(const std::string& text, const std::vector<std::pair<std::string, double>>& word_scales,
                         const models::CLIPTokenizer& tok, int max_len = 77);
// [num_steps + 1, P-1, 1, 1, L]: 1 where cross attention is replaced (steps [0, int(cross_replace_steps *
// (num_steps + 1))) as the reference computes it), 0 after.
at::Tensor get_time_words_attention_alpha(int num_prompts, int num_steps, double cross_replace_steps, int max_len = 77);

// ---------------------------------------------------------------------------------------------------
// Sums the conditional rows' attention probabilities over steps, per site (the reference's AttentionStore,
// keyed by site instead of by call order). Observes only; stores sites with at most max_query_tokens queries
// (the reference's 32**2), and only cross attention unless store_self (local blend and the maps use cross
// attention only; the reference also keeps self attention).
class AttentionStore : public nn::AttentionController {
 public:
  explicit AttentionStore(int64_t max_query_tokens = 32 * 32, bool store_self = false)
      : max_query_tokens_(max_query_tokens), store_self_(store_self) {}
  bool wants_call(const nn::AttentionSite& site, const nn::AttentionContext& ctx, int64_t num_queries) const override {
    return (site.is_cross || store_self_) && num_queries <= max_query_tokens_;
  }
  at::Tensor on_probs(const nn::AttentionSite& site, const nn::AttentionContext& ctx, const at::Tensor& probs) override;

  struct Entry {
    nn::AttentionSite site;
    at::Tensor sum;  // [P, heads, Nq, Nk] float32, summed over the steps seen
  };
  const std::map<int, Entry>& entries() const { return entries_; }  // by site index (forward order)
  int num_steps() const { return static_cast<int>(steps_.size()); }
  // Average over steps of one site: [P, heads, Nq, Nk].
  at::Tensor average(int site_index) const;
  void reset();

 private:
  int64_t max_query_tokens_;
  bool store_self_;
  std::map<int, Entry> entries_;
  std::set<int> steps_;
};

// The conditional row of each prompt, in prompt order (InvalidArgument when a prompt has none or two).
std::vector<int64_t> conditional_rows(const nn::AttentionContext& ctx, int num_prompts);

// LocalBlend: after each step, keep the source's latents outside a mask made from the cross-attention
// maps of chosen words (down and up sites at a quarter of the latent size, the reference's 16x16 maps of a
// 64x64 latent; mean over sites and heads, 3x3 max-pool, nearest resize, / max, > threshold, union over the
// prompts).
class LocalBlend {
 public:
  // words[p]: the words of prompt p whose maps make the mask (looked up with get_word_inds).
  LocalBlend(const std::vector<std::string>& prompts, const std::vector<std::vector<std::string>>& words,
             const models::CLIPTokenizer& tok, double threshold = 0.3, int max_len = 77);
  // x_t: [P, C, h, w] latents after the scheduler step -> blended latents.
  at::Tensor operator()(const at::Tensor& x_t, const AttentionStore& store) const;
  // The last mask computed ([P-1, 1, h, w] float32), for pictures and tests.
  const at::Tensor& last_mask() const { return last_mask_; }

 private:
  at::Tensor alpha_layers_;  // [P, L]
  double threshold_;
  mutable at::Tensor last_mask_;
};

// ---------------------------------------------------------------------------------------------------
// The reference's AttentionControlEdit: on conditional rows only, cross attention of edits is
// replace_cross_attention(base, edit) * alpha[step] + (1 - alpha[step]) * edit, and self attention of
// edits is the source's at steps [int(num_steps * self_replace_steps.first), int(num_steps *
// self_replace_steps.second)) for sites with at most 16x16 queries.
class AttentionEdit : public nn::AttentionController {
 public:
  AttentionEdit(int num_prompts, int num_steps, double cross_replace_steps,
                std::pair<double, double> self_replace_steps, int max_len);
  // Every cross-attention call; self attention only where it is replaced.
  bool wants_call(const nn::AttentionSite& site, const nn::AttentionContext& ctx, int64_t num_queries) const override;
  at::Tensor on_probs(const nn::AttentionSite& site, const nn::AttentionContext& ctx, const at::Tensor& probs) override;
  // base: [H, Nq, L] source probs; edit: [P-1, H, Nq, L] -> [P-1, H, Nq, L].
  virtual at::Tensor replace_cross_attention(const at::Tensor& base, const at::Tensor& edit) const = 0;
  int num_prompts() const { return num_prompts_; }

 protected:
  int num_prompts_;
  int num_steps_;
  at::Tensor cross_replace_alpha_;  // [num_steps + 1, P-1, 1, 1, L]
  std::pair<int, int> num_self_replace_;
  int64_t self_replace_max_tokens_ = 16 * 16;
};

class AttentionReplace : public AttentionEdit {
 public:
  AttentionReplace(const std::vector<std::string>& prompts, const models::CLIPTokenizer& tok, int num_steps,
                   double cross_replace_steps, double self_replace_steps, int max_len = 77);
  at::Tensor replace_cross_attention(const at::Tensor& base, const at::Tensor& edit) const override;

 private:
  at::Tensor mapper_;  // [P-1, L, L]
};

class AttentionRefine : public AttentionEdit {
 public:
  AttentionRefine(const std::vector<std::string>& prompts, const models::CLIPTokenizer& tok, int num_steps,
                  double cross_replace_steps, double self_replace_steps, int max_len = 77);
  at::Tensor replace_cross_attention(const at::Tensor& base, const at::Tensor& edit) const override;

 private:
  at::Tensor mapper_;  // [P-1, L] int64, -1 read as the last position (multiplied by alpha 0)
  at::Tensor alphas_;  // [P-1, 1, 1, L]
};

// Scales the source's cross attention to the words of the last prompt by `equalizer` ([1 or P-1, L]); with a
// previous edit (replace / refine), scales that edit's result instead.
class AttentionReweight : public AttentionEdit {
 public:
  AttentionReweight(int num_prompts, int num_steps, double cross_replace_steps, double self_replace_steps,
                    at::Tensor equalizer, std::shared_ptr<AttentionEdit> prev = nullptr, int max_len = 77);
  at::Tensor replace_cross_attention(const at::Tensor& base, const at::Tensor& edit) const override;

 private:
  at::Tensor equalizer_;
  std::shared_ptr<AttentionEdit> prev_;
};
}  // namespace dmx::extensions
