// Prompt-to-Prompt controllers and token helpers (see prompt_to_prompt.h).
#include "extensions/prompt_to_prompt.h"

#include <algorithm>
#include <array>
#include <cmath>

#include "core/text.h"
#include "core/utf8.h"
#include "dmx/error.h"

namespace dmx::extensions {

namespace {
size_t py_len(const std::string& s) { return utf8_length(s); }  // len() of the Python str

std::vector<int64_t> word_inds_at(const models::CLIPTokenizer& tok, const std::string& text,
                                  const std::vector<int>& word_place) {
  std::vector<int64_t> out;
  if (word_place.empty()) return out;
  const std::vector<std::string> split_text = split(text, ' ');
  const std::vector<std::string> words_encode = token_texts(tok, text);
  size_t cur_len = 0, ptr = 0;
  for (size_t i = 0; i < words_encode.size() && ptr < split_text.size(); ++i) {
    cur_len += py_len(words_encode[i]);
    if (std::find(word_place.begin(), word_place.end(), static_cast<int>(ptr)) != word_place.end())
      out.push_back(static_cast<int64_t>(i) + 1);
    if (cur_len >= py_len(split_text[ptr])) {
      ++ptr;
      cur_len = 0;
    }
  }
  return out;
}

std::vector<int64_t> checked_word_inds(const models::CLIPTokenizer& tok, const std::string& text, int word_place,
                                       int max_len) {
  std::vector<int64_t> inds = get_word_inds(tok, text, word_place);
  DMX_CHECK_ARG(!inds.empty(), "prompt \"", text, "\": word ", word_place, " has no tokens");
  for (int64_t i : inds)
    DMX_CHECK_ARG(i < max_len, "prompt \"", text, "\": word ", word_place, " lies beyond the ", max_len,
                  "-token context (token ", i, ")");
  return inds;
}

at::Tensor replacement_mapper(const std::string& x, const std::string& y, const models::CLIPTokenizer& tok,
                              int max_len) {
  const auto words_x = split(x, ' '), words_y = split(y, ' ');
  DMX_CHECK_ARG(words_x.size() == words_y.size(),
                "replace edits need prompts with the same number of words, but the prompt has ", words_x.size(),
                " words and the edit prompt has ", words_y.size(), " (\"", x, "\" vs \"", y,
                "\"); use --mode refine to add words");
  std::vector<int> inds_replace;
  for (size_t i = 0; i < words_y.size(); ++i)
    if (words_y[i] != words_x[i]) inds_replace.push_back(static_cast<int>(i));
  std::vector<std::vector<int64_t>> src, tgt;
  for (int i : inds_replace) {
    src.push_back(checked_word_inds(tok, x, i, max_len));
    tgt.push_back(checked_word_inds(tok, y, i, max_len));
  }
  std::vector<double> m(static_cast<size_t>(max_len) * max_len, 0.0);
  auto at_ = [&](int64_t r, int64_t c) -> double& { return m[static_cast<size_t>(r * max_len + c)]; };
  int64_t i = 0, j = 0;
  size_t cur = 0;
  while (i < max_len && j < max_len) {
    if (cur < src.size() && src[cur][0] == i) {
      const auto& s = src[cur];
      const auto& t = tgt[cur];
      if (s.size() == t.size()) {
        for (size_t k = 0; k < s.size(); ++k) at_(s[k], t[k]) = 1;
      } else {
        const double ratio = 1.0 / static_cast<double>(t.size());
        for (int64_t it : t)
          for (int64_t is : s) at_(is, it) = ratio;
      }
      ++cur;
      i += static_cast<int64_t>(s.size());
      j += static_cast<int64_t>(t.size());
    } else if (cur < src.size()) {
      at_(i, j) = 1;
      ++i;
      ++j;
    } else {
      at_(j, j) = 1;  // the reference writes (j, j) once all swaps are placed
      ++i;
      ++j;
    }
  }
  return at::tensor(m, at::kDouble).view({max_len, max_len}).to(at::kFloat);
}

// seq_aligner.global_align + get_aligned_sequences: for each y token, the aligned x position or -1.
std::vector<int64_t> align_y_to_x(const std::vector<int64_t>& x, const std::vector<int64_t>& y) {
  const size_t nx = x.size(), ny = y.size();
  const int gap = 0, match = 1, mismatch = -1;
  std::vector<std::vector<int>> mat(nx + 1, std::vector<int>(ny + 1, 0)), tb(nx + 1, std::vector<int>(ny + 1, 0));
  for (size_t j = 1; j <= ny; ++j) mat[0][j] = static_cast<int>(j) * gap, tb[0][j] = 1;
  for (size_t i = 1; i <= nx; ++i) mat[i][0] = static_cast<int>(i) * gap, tb[i][0] = 2;
  tb[0][0] = 4;
  for (size_t i = 1; i <= nx; ++i)
    for (size_t j = 1; j <= ny; ++j) {
      const int left = mat[i][j - 1] + gap;
      const int up = mat[i - 1][j] + gap;
      const int diag = mat[i - 1][j - 1] + (x[i - 1] != y[j - 1] ? mismatch : match);
      mat[i][j] = std::max({left, up, diag});
      tb[i][j] = mat[i][j] == left ? 1 : mat[i][j] == up ? 2 : 3;
    }
  std::vector<std::pair<int64_t, int64_t>> pairs;
  size_t i = nx, j = ny;
  while (i > 0 || j > 0) {
    const int t = tb[i][j];
    if (t == 3) {
      --i, --j;
      pairs.emplace_back(static_cast<int64_t>(j), static_cast<int64_t>(i));
    } else if (t == 1) {
      --j;
      pairs.emplace_back(static_cast<int64_t>(j), -1);
    } else if (t == 2) {
      --i;
    } else {
      break;
    }
  }
  std::reverse(pairs.begin(), pairs.end());
  std::vector<int64_t> out;
  for (const auto& p : pairs) out.push_back(p.second);
  return out;
}
}  // namespace

// ---------------------------------------------------------------------------------------------------
std::vector<std::string> token_texts(const models::CLIPTokenizer& tok, const std::string& text) {
  std::vector<std::string> out;
  for (const std::string& t : tok.tokenize(text)) {
    // tokenizer.decode([id]) (stripped), then the reference's strip("#").
    std::string s = tok.convert_tokens_to_string({t});
    const size_t b = s.find_first_not_of('#');
    s = b == std::string::npos ? "" : s.substr(b, s.find_last_not_of('#') - b + 1);
    out.push_back(s);
  }
  return out;
}

std::vector<int64_t> get_word_inds(const models::CLIPTokenizer& tok, const std::string& text, const std::string& word) {
  std::vector<int> places;
  const auto split_text = split(text, ' ');
  for (size_t i = 0; i < split_text.size(); ++i)
    if (split_text[i] == word) places.push_back(static_cast<int>(i));
  return word_inds_at(tok, text, places);
}

std::vector<int64_t> get_word_inds(const models::CLIPTokenizer& tok, const std::string& text, int word_place) {
  return word_inds_at(tok, text, {word_place});
}

at::Tensor get_replacement_mapper(const std::vector<std::string>& prompts, const models::CLIPTokenizer& tok,
                                  int max_len) {
  DMX_CHECK_ARG(prompts.size() >= 2, "Prompt-to-Prompt needs a source and at least one edit prompt, got ",
                prompts.size(), " prompts");
  std::vector<at::Tensor> mappers;
  for (size_t i = 1; i < prompts.size(); ++i)
    mappers.push_back(replacement_mapper(prompts[0], prompts[i], tok, max_len));
  return at::stack(mappers);
}

std::pair<at::Tensor, at::Tensor> get_refinement_mapper(const std::vector<std::string>& prompts,
                                                        const models::CLIPTokenizer& tok, int max_len) {
  DMX_CHECK_ARG(prompts.size() >= 2, "Prompt-to-Prompt needs a source and at least one edit prompt, got ",
                prompts.size(), " prompts");
  const std::vector<int64_t> x = tok.encode(prompts[0]);
  std::vector<at::Tensor> mappers, alphas;
  for (size_t p = 1; p < prompts.size(); ++p) {
    const std::vector<int64_t> y = tok.encode(prompts[p]);
    DMX_CHECK_ARG(static_cast<int>(y.size()) <= max_len && static_cast<int>(x.size()) <= max_len,
                  "refine edits need prompts of at most ", max_len, " tokens, got ", x.size(), " and ", y.size());
    const std::vector<int64_t> base = align_y_to_x(x, y);  // one entry per y token
    at::Tensor mapper = at::zeros({max_len}, at::kLong);
    at::Tensor alpha = at::ones({max_len}, at::kFloat);
    auto mp = mapper.accessor<int64_t, 1>();
    auto ap = alpha.accessor<float, 1>();
    const int64_t n = static_cast<int64_t>(base.size());
    for (int64_t k = 0; k < n; ++k) {
      mp[k] = base[k];
      ap[k] = base[k] != -1 ? 1.f : 0.f;
    }
    for (int64_t k = n; k < max_len; ++k) mp[k] = static_cast<int64_t>(y.size()) + (k - n);
    mappers.push_back(mapper);
    alphas.push_back(alpha);
  }
  return {at::stack(mappers), at::stack(alphas)};
}

at::Tensor get_equalizer(const std::string& text, const std::vector<std::pair<std::string, double>>& word_scales,
                         const models::CLIPTokenizer& tok, int max_len) {
  at::Tensor eq = at::ones({1, max_len}, at::kFloat);
  for (const auto& ws : word_scales) {
    DMX_CHECK_ARG(std::isfinite(ws.second), "reweight scale of \"", ws.first, "\" must be finite, got ", ws.second);
    const std::vector<int64_t> inds = get_word_inds(tok, text, ws.first);
    DMX_CHECK_ARG(!inds.empty(), "reweight word \"", ws.first, "\" is not a word of the prompt \"", text,
                  "\" (words are split at spaces)");
    for (int64_t i : inds) {
      DMX_CHECK_ARG(i < max_len, "reweight word \"", ws.first, "\" lies beyond the ", max_len, "-token context");
      eq[0][i] = static_cast<float>(ws.second);
    }
  }
  return eq;
}

at::Tensor get_time_words_attention_alpha(int num_prompts, int num_steps, double cross_replace_steps, int max_len) {
  DMX_CHECK_ARG(std::isfinite(cross_replace_steps) && cross_replace_steps >= 0 && cross_replace_steps <= 1,
                "cross_replace_steps must be in [0, 1], got ", cross_replace_steps);
  at::Tensor alpha = at::zeros({num_steps + 1, num_prompts - 1, max_len}, at::kFloat);
  const int end = static_cast<int>(cross_replace_steps * (num_steps + 1));
  if (end > 0) alpha.narrow(0, 0, std::min(end, num_steps + 1)).fill_(1);
  return alpha.reshape({num_steps + 1, num_prompts - 1, 1, 1, max_len});
}

std::vector<int64_t> conditional_rows(const nn::AttentionContext& ctx, int num_prompts) {
  std::vector<int64_t> rows(static_cast<size_t>(num_prompts), -1);
  for (size_t i = 0; i < ctx.rows.size(); ++i) {
    const auto& r = ctx.rows[i];
    if (!r.conditional) continue;
    DMX_CHECK_ARG(r.prompt >= 0 && r.prompt < num_prompts, "attention context: row ", i, " carries prompt ", r.prompt,
                  " but the controller has ", num_prompts, " prompts");
    DMX_CHECK_ARG(rows[static_cast<size_t>(r.prompt)] < 0, "attention context: prompt ", r.prompt,
                  " has two conditional rows");
    rows[static_cast<size_t>(r.prompt)] = static_cast<int64_t>(i);
  }
  for (int p = 0; p < num_prompts; ++p)
    DMX_CHECK_ARG(rows[static_cast<size_t>(p)] >= 0, "attention context: prompt ", p,
                  " has no conditional row (set the per-call context with ScopedAttentionContext)");
  return rows;
}

// ---------------------------------------------------------------------------------------------------
at::Tensor AttentionStore::on_probs(const nn::AttentionSite& site, const nn::AttentionContext& ctx,
                                    const at::Tensor& probs) {
  if (probs.size(2) > max_query_tokens_) return probs;
  std::vector<int64_t> rows;
  for (const auto& r : ctx.rows)
    if (r.conditional) rows.push_back(r.prompt);
  int num_prompts = static_cast<int>(rows.size());
  if (num_prompts == 0) return probs;
  const auto idx = conditional_rows(ctx, num_prompts);
  at::NoGradGuard no_grad;
  // [P, H, Nq, Nk], kept on the CPU in float32
  at::Tensor cond =
      probs.detach().index_select(0, at::tensor(idx, at::kLong).to(probs.device())).to(at::kCPU, at::kFloat);
  auto it = entries_.find(site.index);
  if (it == entries_.end())
    entries_[site.index] = Entry{site, cond.clone()};
  else
    it->second.sum.add_(cond);
  steps_.insert(ctx.step);
  return probs;
}

at::Tensor AttentionStore::average(int site_index) const {
  auto it = entries_.find(site_index);
  DMX_CHECK_ARG(it != entries_.end(), "AttentionStore: nothing stored for site ", site_index);
  return it->second.sum / static_cast<double>(std::max(1, num_steps()));
}

void AttentionStore::reset() {
  entries_.clear();
  steps_.clear();
}

// ---------------------------------------------------------------------------------------------------
LocalBlend::LocalBlend(const std::vector<std::string>& prompts, const std::vector<std::vector<std::string>>& words,
                       const models::CLIPTokenizer& tok, double threshold, int max_len)
    : threshold_(threshold) {
  DMX_CHECK_ARG(words.size() == prompts.size(), "local blend needs one word list per prompt, got ", words.size(),
                " lists for ", prompts.size(), " prompts");
  alpha_layers_ = at::zeros({static_cast<int64_t>(prompts.size()), max_len}, at::kFloat);
  for (size_t p = 0; p < prompts.size(); ++p)
    for (const std::string& w : words[p]) {
      const auto inds = get_word_inds(tok, prompts[p], w);
      DMX_CHECK_ARG(!inds.empty(), "local blend word \"", w, "\" is not a word of the prompt \"", prompts[p], "\"");
      for (int64_t i : inds)
        if (i < max_len) alpha_layers_[static_cast<int64_t>(p)][i] = 1;
    }
}

at::Tensor LocalBlend::operator()(const at::Tensor& x_t, const AttentionStore& store) const {
  at::NoGradGuard no_grad;
  const int64_t P = alpha_layers_.size(0), L = alpha_layers_.size(1);
  DMX_CHECK_ARG(x_t.dim() == 4 && x_t.size(0) == P, "local blend: latents must be [", P, ", C, h, w], got ",
                x_t.sizes());
  // The reference's maps: down and up cross sites at 16x16 for 64x64 latents (a quarter of the latent
  // side); a smaller model uses the stored cross resolution closest to that.
  const int64_t target = (x_t.size(2) / 4) * (x_t.size(3) / 4);
  int64_t best = -1;
  for (const auto& e : store.entries()) {
    const auto& s = e.second.site;
    if (!s.is_cross || s.place == nn::AttentionPlace::Mid || s.place == nn::AttentionPlace::Other) continue;
    const int64_t nq = e.second.sum.size(2);
    if (best < 0 || std::llabs(nq - target) < std::llabs(best - target) ||
        (std::llabs(nq - target) == std::llabs(best - target) && nq > best))
      best = nq;
  }
  DMX_CHECK_ARG(best > 0, "local blend: no cross-attention maps were stored");
  const int64_t r = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(best))));
  DMX_CHECK_ARG(r * r == best, "local blend: cross-attention maps of ", best, " tokens are not square");
  std::vector<at::Tensor> maps;
  for (const auto& e : store.entries()) {
    const auto& s = e.second.site;
    if (!s.is_cross || s.place == nn::AttentionPlace::Mid || s.place == nn::AttentionPlace::Other) continue;
    if (e.second.sum.size(2) != best) continue;
    DMX_CHECK_ARG(e.second.sum.size(3) == L, "local blend: maps have ", e.second.sum.size(3), " tokens, expected ", L);
    maps.push_back(e.second.sum.reshape({P, -1, 1, r, r, L}));
  }
  at::Tensor m = at::cat(maps, 1);                                   // [P, S*H, 1, r, r, L]
  m = (m * alpha_layers_.view({P, 1, 1, 1, 1, L})).sum(-1).mean(1);  // [P, 1, r, r]
  at::Tensor mask = at::max_pool2d(m, {3, 3}, {1, 1}, {1, 1});
  mask = at::upsample_nearest2d(mask, {x_t.size(2), x_t.size(3)});  // [P, 1, h, w]
  mask = mask / std::get<0>(std::get<0>(mask.max(2, true)).max(3, true));
  mask = mask.gt(threshold_);
  mask = at::logical_or(mask.narrow(0, 0, 1), mask.narrow(0, 1, P - 1)).to(at::kFloat);  // [P-1, 1, h, w]
  last_mask_ = mask;
  const at::Tensor x0 = x_t.narrow(0, 0, 1);
  at::Tensor full = at::cat({at::zeros_like(mask.narrow(0, 0, 1)), mask}, 0).to(x_t.scalar_type());
  return x0 + full * (x_t - x0);
}

// ---------------------------------------------------------------------------------------------------
AttentionEdit::AttentionEdit(int num_prompts, int num_steps, double cross_replace_steps,
                             std::pair<double, double> self_replace_steps, int max_len)
    : num_prompts_(num_prompts), num_steps_(num_steps) {
  DMX_CHECK_ARG(num_prompts >= 2, "Prompt-to-Prompt needs a source and at least one edit prompt, got ", num_prompts);
  DMX_CHECK_ARG(num_steps >= 1, "num_inference_steps must be >= 1, got ", num_steps);
  DMX_CHECK_ARG(std::isfinite(self_replace_steps.second) && self_replace_steps.first >= 0 &&
                    self_replace_steps.second <= 1 && self_replace_steps.first <= self_replace_steps.second,
                "self_replace_steps must be in [0, 1], got ", self_replace_steps.second);
  cross_replace_alpha_ = get_time_words_attention_alpha(num_prompts, num_steps, cross_replace_steps, max_len);
  num_self_replace_ = {static_cast<int>(num_steps * self_replace_steps.first),
                       static_cast<int>(num_steps * self_replace_steps.second)};
}

bool AttentionEdit::wants_call(const nn::AttentionSite& site, const nn::AttentionContext& ctx,
                               int64_t num_queries) const {
  if (site.is_cross) return true;
  return num_self_replace_.first <= ctx.step && ctx.step < num_self_replace_.second &&
         num_queries <= self_replace_max_tokens_;
}

at::Tensor AttentionEdit::on_probs(const nn::AttentionSite& site, const nn::AttentionContext& ctx,
                                   const at::Tensor& probs) {
  const int step = ctx.step;
  const bool cross = site.is_cross;
  if (!cross && !(num_self_replace_.first <= step && step < num_self_replace_.second)) return probs;
  DMX_CHECK_ARG(step >= 0 && step <= num_steps_, "Prompt-to-Prompt: the attention context's step must be in [0, ",
                num_steps_, "], got ", step, " (set it with ScopedAttentionContext)");
  const std::vector<int64_t> rows = conditional_rows(ctx, num_prompts_);
  const at::Tensor idx = at::tensor(rows, at::kLong).to(probs.device());
  at::Tensor attn = probs.index_select(0, idx);  // [P, H, Nq, Nk]
  const at::Tensor base = attn[0];               // [H, Nq, Nk]
  const at::Tensor edit = attn.narrow(0, 1, num_prompts_ - 1);
  at::Tensor edited;
  if (cross) {
    const at::Tensor alpha_words =
        cross_replace_alpha_[step].to(probs.device(), probs.scalar_type());  // [P-1, 1, 1, L]
    DMX_CHECK_ARG(probs.size(3) == alpha_words.size(3), "Prompt-to-Prompt: cross attention over ", probs.size(3),
                  " tokens, but the controller was built for ", alpha_words.size(3));
    edited = replace_cross_attention(base, edit) * alpha_words + (1 - alpha_words) * edit;
  } else {
    if (edit.size(2) > self_replace_max_tokens_) return probs;
    edited = base.unsqueeze(0).expand(edit.sizes());
  }
  return probs.index_copy(0, idx.narrow(0, 1, num_prompts_ - 1), edited.to(probs.scalar_type()));
}

AttentionReplace::AttentionReplace(const std::vector<std::string>& prompts, const models::CLIPTokenizer& tok,
                                   int num_steps, double cross_replace_steps, double self_replace_steps, int max_len)
    : AttentionEdit(static_cast<int>(prompts.size()), num_steps, cross_replace_steps, {0.0, self_replace_steps},
                    max_len),
      mapper_(get_replacement_mapper(prompts, tok, max_len)) {}

at::Tensor AttentionReplace::replace_cross_attention(const at::Tensor& base, const at::Tensor& edit) const {
  return at::einsum("hpw,bwn->bhpn", {base, mapper_.to(base.device(), base.scalar_type())});
}

AttentionRefine::AttentionRefine(const std::vector<std::string>& prompts, const models::CLIPTokenizer& tok,
                                 int num_steps, double cross_replace_steps, double self_replace_steps, int max_len)
    : AttentionEdit(static_cast<int>(prompts.size()), num_steps, cross_replace_steps, {0.0, self_replace_steps},
                    max_len) {
  auto ma = get_refinement_mapper(prompts, tok, max_len);
  // torch reads index -1 as the last position; its value is multiplied by alpha 0.
  mapper_ = at::where(ma.first.lt(0), ma.first + max_len, ma.first);
  alphas_ = ma.second.reshape({ma.second.size(0), 1, 1, ma.second.size(1)});
}

at::Tensor AttentionRefine::replace_cross_attention(const at::Tensor& base, const at::Tensor& edit) const {
  // base[:, :, mapper] -> [H, Nq, P-1, L] -> [P-1, H, Nq, L]
  const int64_t B = mapper_.size(0), L = mapper_.size(1);
  at::Tensor gathered =
      base.index_select(2, mapper_.reshape({-1}).to(base.device())).reshape({base.size(0), base.size(1), B, L});
  gathered = gathered.permute({2, 0, 1, 3});
  const at::Tensor a = alphas_.to(base.device(), base.scalar_type());
  return gathered * a + edit * (1 - a);
}

AttentionReweight::AttentionReweight(int num_prompts, int num_steps, double cross_replace_steps,
                                     double self_replace_steps, at::Tensor equalizer,
                                     std::shared_ptr<AttentionEdit> prev, int max_len)
    : AttentionEdit(num_prompts, num_steps, cross_replace_steps, {0.0, self_replace_steps}, max_len),
      equalizer_(std::move(equalizer)),
      prev_(std::move(prev)) {
  DMX_CHECK_ARG(equalizer_.dim() == 2 && equalizer_.size(1) == max_len &&
                    (equalizer_.size(0) == 1 || equalizer_.size(0) == num_prompts - 1),
                "reweight: equalizer must be [1 or ", num_prompts - 1, ", ", max_len, "], got ", equalizer_.sizes());
}

at::Tensor AttentionReweight::replace_cross_attention(const at::Tensor& base, const at::Tensor& edit) const {
  const at::Tensor eq = equalizer_.to(base.device(), base.scalar_type());
  const at::Tensor w = eq.view({eq.size(0), 1, 1, eq.size(1)});      // [1 or P-1, 1, 1, L]
  if (prev_) return prev_->replace_cross_attention(base, edit) * w;  // [P-1, H, Nq, L]
  return base.unsqueeze(0) * w;
}
}  // namespace dmx::extensions
