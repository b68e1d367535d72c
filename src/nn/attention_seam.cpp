// The attention seam (see attention_seam.h).
#include "nn/attention_seam.h"

#include <algorithm>
#include <cstdlib>

#include "core/text.h"
#include "dmx/error.h"
#include "nn/attention.h"
#include "nn/layers.h"

namespace dmx::nn {

const char* place_name(AttentionPlace place) {
  switch (place) {
    case AttentionPlace::Down:
      return "down";
    case AttentionPlace::Mid:
      return "mid";
    case AttentionPlace::Up:
      return "up";
    case AttentionPlace::Other:
      break;
  }
  return "other";
}

std::vector<int64_t> AttentionContext::rows_where(bool conditional) const {
  std::vector<int64_t> r;
  for (size_t i = 0; i < rows.size(); ++i)
    if (rows[i].conditional == conditional) r.push_back(static_cast<int64_t>(i));
  return r;
}

namespace {
int index_after(const std::vector<std::string>& parts, const std::string& name) {
  for (size_t i = 0; i + 1 < parts.size(); ++i)
    if (parts[i] == name) return std::atoi(parts[i + 1].c_str());
  return -1;
}

AttentionSite site_from_path(const std::string& path, const AttentionImpl& attn, int index) {
  AttentionSite s;
  s.path = path;
  const auto parts = split(path, '.');
  if (!parts.empty() && parts[0] == "down_blocks") {
    s.place = AttentionPlace::Down;
    s.block = index_after(parts, "down_blocks");
  } else if (!parts.empty() && parts[0] == "up_blocks") {
    s.place = AttentionPlace::Up;
    s.block = index_after(parts, "up_blocks");
  } else if (!parts.empty() && parts[0] == "mid_block") {
    s.place = AttentionPlace::Mid;
    s.block = 0;
  }
  s.layer = index_after(parts, "attentions");
  s.transformer_block = index_after(parts, "transformer_blocks");
  const AttentionOptions& o = attn.options();
  // attn1 of an only_cross_attention block attends to the text too, even when the text has the block's width.
  s.is_cross = parts.back() == "attn2" || attn.is_cross_attention();
  s.heads = o.heads;
  s.index = index;
  return s;
}

std::vector<std::pair<std::string, AttentionImpl*>> attention_layers(torch::nn::Module& root) {
  std::vector<std::pair<std::string, AttentionImpl*>> out;
  // include_self = false: usable from a constructor (no shared_from_this).
  for (const auto& item : root.named_modules("", /*include_self=*/false))
    if (auto* a = dynamic_cast<AttentionImpl*>(item.value().get())) out.emplace_back(item.key(), a);
  return out;
}

std::shared_ptr<AttentionSeam> seam_of(torch::nn::Module& root) {
  auto seam = assign_attention_sites(root);
  DMX_CHECK_ARG(seam != nullptr, "attention seam: the module has no attention layers to install on");
  return seam;
}
}  // namespace

std::shared_ptr<AttentionSeam> assign_attention_sites(torch::nn::Module& root) {
  const auto layers = attention_layers(root);
  if (layers.empty()) return nullptr;
  // Reuse the seam already shared by the layers when every one has it; otherwise one new seam for all.
  std::shared_ptr<AttentionSeam> seam = layers.front().second->seam();
  for (const auto& l : layers)
    if (!seam || l.second->seam() != seam || !l.second->site().assigned()) {
      seam = nullptr;
      break;
    }
  if (seam) return seam;
  seam = std::make_shared<AttentionSeam>();
  for (size_t i = 0; i < layers.size(); ++i)
    layers[i].second->set_site(site_from_path(layers[i].first, *layers[i].second, static_cast<int>(i)), seam);
  return seam;
}

std::vector<AttentionSite> attention_sites(torch::nn::Module& root) {
  assign_attention_sites(root);
  std::vector<AttentionSite> sites;
  for (const auto& l : attention_layers(root)) sites.push_back(l.second->site());
  return sites;
}

at::Tensor attention_with_probs(const AttentionSite& site, const AttentionSeam* seam, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, double scale, bool upcast) {
  // diffusers' Attention.get_attention_scores: scores in float32 when upcasting, softmax, probs back to the
  // compute dtype, then (P2PCrossAttnProcessor) the controller, then probs @ v.
  const at::ScalarType dtype = v.scalar_type();
  const at::Tensor qq = upcast ? q.to(at::kFloat) : q;
  const at::Tensor kk = upcast ? k.to(at::kFloat) : k;
  at::Tensor scores = at::matmul(qq, kk.transpose(-1, -2)).mul(scale);  // [B, H, Nq, Nk]
  at::Tensor probs = scores.softmax(-1);
  if (probs.scalar_type() != dtype) probs = probs.to(dtype);
  if (seam) {
    for (const auto& c : seam->controllers)
      if (c->wants_call(site, seam->context, q.size(2))) probs = c->on_probs(site, seam->context, probs);
  }
  return at::matmul(probs, v);  // [B, H, Nq, d]
}

at::Tensor attention_through_seam(const AttentionSite& site, const AttentionSeam* seam, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, double scale, bool upcast) {
  if (seam && seam->processor && seam->processor->wants(site))
    return seam->processor->forward(site, seam->context, q, k, v, scale, upcast);
  bool wanted = false;
  if (seam)
    for (const auto& c : seam->controllers) wanted = wanted || c->wants_call(site, seam->context, q.size(2));
  const bool grad = at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  if (wanted || grad) return attention_with_probs(site, wanted ? seam : nullptr, q, k, v, scale, upcast);
  return attention(q, k, v, scale, /*causal=*/false, upcast);
}

ScopedAttentionController::ScopedAttentionController(torch::nn::Module& root,
                                                     std::shared_ptr<AttentionController> controller)
    : seam_(seam_of(root)), controller_(std::move(controller)) {
  DMX_CHECK_ARG(controller_ != nullptr, "ScopedAttentionController: controller must not be null");
  seam_->controllers.push_back(controller_);
}

ScopedAttentionController::~ScopedAttentionController() {
  auto& cs = seam_->controllers;
  auto it = std::find(cs.rbegin(), cs.rend(), controller_);
  if (it != cs.rend()) cs.erase(std::next(it).base());
}

KeyValueInputs apply_input_hooks(const AttentionSite& site, const AttentionSeam* seam, const at::Tensor& context) {
  KeyValueInputs kv{context, context};
  if (!seam) return kv;
  for (const auto& h : seam->input_hooks) {
    if (!h->wants(site)) continue;
    KeyValueInputs out = h->on_key_value_inputs(site, seam->context, kv);
    DMX_CHECK_ARG(out.key.defined() && out.value.defined() && out.key.sizes().equals(kv.key.sizes()) &&
                      out.value.sizes().equals(kv.value.sizes()),
                  "attention input hook at ", site.path, ": must return key and value inputs of the shapes it got (",
                  kv.key.sizes(), ")");
    kv = std::move(out);
  }
  return kv;
}

ScopedAttentionInputHook::ScopedAttentionInputHook(torch::nn::Module& root, std::shared_ptr<AttentionInputHook> hook)
    : seam_(seam_of(root)), hook_(std::move(hook)) {
  DMX_CHECK_ARG(hook_ != nullptr, "ScopedAttentionInputHook: hook must not be null");
  seam_->input_hooks.push_back(hook_);
}

ScopedAttentionInputHook::~ScopedAttentionInputHook() {
  auto& hs = seam_->input_hooks;
  auto it = std::find(hs.rbegin(), hs.rend(), hook_);
  if (it != hs.rend()) hs.erase(std::next(it).base());
}

ScopedAttentionProcessor::ScopedAttentionProcessor(torch::nn::Module& root,
                                                   std::shared_ptr<AttentionProcessor> processor)
    : seam_(seam_of(root)) {
  previous_ = seam_->processor;
  seam_->processor = std::move(processor);
}

ScopedAttentionProcessor::~ScopedAttentionProcessor() { seam_->processor = previous_; }

ScopedAttentionContext::ScopedAttentionContext(torch::nn::Module& root, AttentionContext context)
    : seam_(seam_of(root)) {
  previous_ = std::move(seam_->context);
  seam_->context = std::move(context);
}

ScopedAttentionContext::~ScopedAttentionContext() { seam_->context = std::move(previous_); }
}  // namespace dmx::nn
