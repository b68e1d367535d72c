// `dmx eval --prior`: a diffusion prior's sampled CLIP image embeddings against the true ones (include/dmx/eval.h).
#include <ATen/ATen.h>

#include <chrono>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/runtime.h"
#include "dmx/eval.h"
#include "emoji/emoji_data.h"
#include "loaders/clip.h"
#include "loaders/unclip.h"
#include "pipelines/generation.h"
#include "pipelines/unclip_steps.h"
#include "schedulers/scheduler.h"

namespace dmx {

namespace {

at::Tensor normalized(const at::Tensor& x) { return x / x.norm(2, {1}, true); }

// Top-1 / top-5 of queries q [N, E] among keys k [N, E] (both normalised), the right key of query i being key i.
std::pair<double, double> topk(const at::Tensor& q, const at::Tensor& k) {
  const at::Tensor sim = at::matmul(q, k.t());  // [N, N]
  const int64_t top = std::min<int64_t>(5, k.size(0));
  const at::Tensor idx = std::get<1>(sim.topk(top, 1));  // [N, top]
  const at::Tensor hit = idx.eq(at::arange(q.size(0), at::kLong).unsqueeze(1));
  const double n = static_cast<double>(q.size(0));
  return {hit.select(1, 0).sum().item<double>() / n, hit.any(1).sum().item<double>() / n};
}
}  // namespace

std::string PriorEvalResult::to_json() const {
  nlohmann::json j;
  j["prior_steps"] = prior_steps;
  j["prior_guidance_scale"] = prior_guidance_scale;
  j["seconds"] = seconds;
  for (const auto& s : splits) {
    const std::string p = s.style + "_" + s.split + "_";
    j[p + "n"] = s.n;
    j[p + "cos_sampled"] = s.cos_sampled;
    j[p + "cos_unguided"] = s.cos_unguided;
    j[p + "cos_text"] = s.cos_text;
    j[p + "top1_sampled"] = s.top1_sampled;
    j[p + "top5_sampled"] = s.top5_sampled;
    j[p + "top1_unguided"] = s.top1_unguided;
    j[p + "top5_unguided"] = s.top5_unguided;
    j[p + "top1_text"] = s.top1_text;
    j[p + "top5_text"] = s.top5_text;
    j[p + "norm_true"] = s.norm_true;
    j[p + "norm_sampled"] = s.norm_sampled;
    j[p + "norm_text"] = s.norm_text;
  }
  return j.dump();
}

PriorEvalResult evaluate_prior(const PriorEvalOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  DMX_CHECK_ARG(!o.prior.empty(), "--prior must name a prior folder (dmx train prior)");
  DMX_CHECK_ARG(is_directory(o.prior), "--prior: no such folder: ", o.prior);
  const std::string clip_dir = !o.clip.empty()                                ? o.clip
                               : loaders::is_clip_folder("models/emoji-clip") ? std::string("models/emoji-clip")
                                                                              : std::string();
  DMX_CHECK_ARG(!clip_dir.empty(),
                "--clip must name the CLIP folder whose image tower gives the true embeddings "
                "(the default models/emoji-clip is not there)");
  DMX_CHECK_ARG(is_directory(clip_dir), "--clip: no such folder: ", clip_dir);
  DMX_CHECK_ARG(loaders::is_clip_folder(clip_dir), "--clip ", clip_dir,
                " is not a CLIP folder (model_index.json with _class_name CLIPModel, as dmx train clip writes)");
  DMX_CHECK_ARG(o.prior_steps >= 1 && o.prior_steps <= 1000, "--steps (the prior's) must be in [1, 1000], got ",
                o.prior_steps);
  DMX_CHECK_ARG(o.train_limit >= 0, "the train limit must be >= 0, got ", o.train_limit);
  const std::string data_dir = o.data.empty() ? default_emoji_data_dir() : o.data;
  DMX_CHECK_ARG(!data_dir.empty(),
                "--data is required (a `dmx data emoji` folder): none of the default places has one");
  const emoji::EmojiData data(data_dir, "--data");
  configure_threads(o.threads);
  const auto prior = loaders::load_unclip_prior(o.prior);
  const auto clip = loaders::load_clip(clip_dir);
  DMX_CHECK_ARG(clip->image_encoder->config().projection_dim == prior->prior->config().resolved_clip_embed_dim(),
                "--clip ", clip_dir, " embeds pictures in ", clip->image_encoder->config().projection_dim,
                " dimensions, the prior ", o.prior, " predicts ", prior->prior->config().resolved_clip_embed_dim());
  at::NoGradGuard no_grad;
  PriorEvalResult r;
  r.prior_steps = o.prior_steps;
  r.prior_guidance_scale = o.prior_guidance_scale;

  // The concepts measured: every held-out one, and every k-th train one (at most train_limit).
  const auto& concepts = data.concepts();
  std::vector<int> held, train_all, train;
  for (int i = 0; i < static_cast<int>(concepts.size()); ++i)
    (concepts[static_cast<size_t>(i)].split == "heldout" ? held : train_all).push_back(i);
  if (o.train_limit > 0 && !train_all.empty()) {
    const size_t k = std::max<size_t>(1, train_all.size() / static_cast<size_t>(o.train_limit));
    for (size_t i = 0; i < train_all.size() && train.size() < static_cast<size_t>(o.train_limit); i += k)
      train.push_back(train_all[i]);
  }

  // Text embeddings and sampled image embeddings of every measured concept's name, in one batch each.
  auto sample = [&](const std::vector<int>& cs, double guidance, at::Tensor* text_embeds) {
    std::vector<std::string> prompts;
    for (int c : cs) prompts.push_back(concepts[static_cast<size_t>(c)].name);
    auto pp =
        pipelines::encode_prior_prompt(*prior->prior_tokenizer, prior->prior_text_encoder, prompts, guidance > 1.0);
    if (text_embeds)
      *text_embeds = guidance > 1.0 ? pp.text_embeds.narrow(0, pp.text_embeds.size(0) / 2, pp.text_embeds.size(0) / 2)
                                    : pp.text_embeds;
    auto scheduler = schedulers::create_scheduler(prior->prior_scheduler_config.at("_class_name").get<std::string>(),
                                                  prior->prior_scheduler_config);
    at::Generator gen = pipelines::make_generator(o.seed);
    pipelines::PriorRunParams p;
    p.prompt = pp;
    p.num_inference_steps = o.prior_steps;
    p.guidance_scale = guidance;
    p.generator = &gen;
    return pipelines::run_prior(prior->prior, *scheduler, p).to(at::kFloat);
  };

  for (const auto& [split, cs] : {std::pair<std::string, const std::vector<int>&>{"heldout", held}, {"train", train}}) {
    if (cs.empty()) continue;
    at::Tensor text;
    const at::Tensor guided = sample(cs, o.prior_guidance_scale, &text);  // [C, E]
    const at::Tensor unguided = o.prior_guidance_scale > 1.0 ? sample(cs, 1.0, nullptr) : at::Tensor();
    for (const std::string& style : data.styles()) {
      std::vector<int64_t> rows;
      std::vector<at::Tensor> pixels;
      for (size_t k = 0; k < cs.size(); ++k) {
        if (!data.has(style, cs[k])) continue;
        const std::string& path = data.files(style, cs[k]).image;
        pixels.push_back(models::clip_preprocess(clip->feature_extractor, to_rgb(load_image(path, "--data")), path));
        rows.push_back(static_cast<int64_t>(k));
      }
      if (rows.empty()) continue;
      std::vector<at::Tensor> parts;
      for (size_t i = 0; i < pixels.size(); i += 256) {
        const size_t n = std::min<size_t>(256, pixels.size() - i);
        parts.push_back(clip->image_encoder
                            ->forward(at::cat(std::vector<at::Tensor>(pixels.begin() + static_cast<int64_t>(i),
                                                                      pixels.begin() + static_cast<int64_t>(i + n)),
                                              0))
                            .image_embeds.to(at::kFloat));
      }
      const at::Tensor raw = at::cat(parts, 0);  // [n, E]
      const at::Tensor truth = normalized(raw);
      const at::Tensor sel = at::tensor(rows, at::kLong);
      PriorEvalSplit s;
      s.style = style;
      s.split = split;
      s.n = static_cast<int>(rows.size());
      auto score = [&](const at::Tensor& q, double* cos, double* top1, double* top5) {
        const at::Tensor qn = normalized(q.index_select(0, sel));
        *cos = (qn * truth).sum(1).mean().item<double>();
        std::tie(*top1, *top5) = topk(qn, truth);
      };
      score(guided, &s.cos_sampled, &s.top1_sampled, &s.top5_sampled);
      if (unguided.defined()) score(unguided, &s.cos_unguided, &s.top1_unguided, &s.top5_unguided);
      score(text, &s.cos_text, &s.top1_text, &s.top5_text);
      s.norm_true = raw.norm(2, {1}).mean().item<double>();
      s.norm_sampled = guided.index_select(0, sel).norm(2, {1}).mean().item<double>();
      s.norm_text = text.index_select(0, sel).norm(2, {1}).mean().item<double>();
      r.splits.push_back(s);
    }
  }
  DMX_CHECK_ARG(!r.splits.empty(), "--data: ", data_dir, " has no images");
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace dmx
