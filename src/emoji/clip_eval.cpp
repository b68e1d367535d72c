// `dmx eval --clip`: zero-shot classification and retrieval of a CLIP folder on the emoji (include/dmx/eval.h).
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

namespace dmx {

namespace {

at::Tensor normalized(const at::Tensor& x) { return x / x.norm(2, {1}, true); }

// Recall@1 and @5 of queries q [N, E] against keys k [M, E] (both normalised), the right key of query i being
// truth[i].
std::pair<double, double> recall(const at::Tensor& q, const at::Tensor& k, const at::Tensor& truth) {
  const at::Tensor sim = at::matmul(q, k.t());  // [N, M]
  const int64_t top = std::min<int64_t>(5, k.size(0));
  const at::Tensor idx = std::get<1>(sim.topk(top, 1));  // [N, top]
  const at::Tensor hit = idx.eq(truth.unsqueeze(1));
  const double n = static_cast<double>(q.size(0));
  return {hit.select(1, 0).sum().item<double>() / n, hit.any(1).sum().item<double>() / n};
}
}  // namespace

std::string ClipEvalResult::to_json() const {
  nlohmann::json j;
  j["logit_scale"] = logit_scale;
  j["seconds"] = seconds;
  for (const auto& s : styles) {
    const std::string p = s.style + "_";
    j[p + "heldout"] = s.heldout;
    j[p + "train"] = s.train;
    j[p + "zero_shot_top1"] = s.zero_shot_top1;
    j[p + "zero_shot_top5"] = s.zero_shot_top5;
    j[p + "zero_shot_all_top1"] = s.zero_shot_all_top1;
    j[p + "zero_shot_all_top5"] = s.zero_shot_all_top5;
    j[p + "heldout_i2t_r1"] = s.heldout_i2t_r1;
    j[p + "heldout_i2t_r5"] = s.heldout_i2t_r5;
    j[p + "heldout_t2i_r1"] = s.heldout_t2i_r1;
    j[p + "heldout_t2i_r5"] = s.heldout_t2i_r5;
    j[p + "train_i2t_r1"] = s.train_i2t_r1;
    j[p + "train_i2t_r5"] = s.train_i2t_r5;
    j[p + "train_t2i_r1"] = s.train_t2i_r1;
    j[p + "train_t2i_r5"] = s.train_t2i_r5;
  }
  return j.dump();
}

ClipEvalResult evaluate_clip(const EvalOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  DMX_CHECK_ARG(!o.clip.empty(), "--clip must name a CLIP folder (dmx train clip)");
  DMX_CHECK_ARG(is_directory(o.clip), "--clip: no such folder: ", o.clip);
  DMX_CHECK_ARG(loaders::is_clip_folder(o.clip), "--clip ", o.clip,
                " is not a CLIP folder (model_index.json with _class_name CLIPModel, as dmx train clip writes)");
  const std::string data_dir = o.data.empty() ? default_emoji_data_dir() : o.data;
  DMX_CHECK_ARG(!data_dir.empty(),
                "--data is required (a `dmx data emoji` folder): none of the default places has one");
  const emoji::EmojiData data(data_dir, "--data");
  configure_threads(o.threads);
  const auto clip = loaders::load_clip(o.clip);
  at::NoGradGuard no_grad;
  ClipEvalResult r;
  r.logit_scale = clip->logit_scale;

  // Every concept's name through the text tower: [C, E], normalised.
  const auto& concepts = data.concepts();
  const int L = clip->tokenizer->model_max_length();
  std::vector<at::Tensor> text_parts;
  for (size_t i = 0; i < concepts.size(); i += 256) {
    const size_t n = std::min<size_t>(256, concepts.size() - i);
    std::vector<int64_t> ids;
    for (size_t k = 0; k < n; ++k) {
      const auto one = clip->tokenizer->encode_padded(concepts[i + k].name, L);
      ids.insert(ids.end(), one.begin(), one.end());
    }
    const at::Tensor input_ids = at::tensor(ids, at::kLong).reshape({static_cast<int64_t>(n), L});
    text_parts.push_back(clip->text_encoder->forward(input_ids).text_embeds.to(at::kFloat));
  }
  const at::Tensor text = normalized(at::cat(text_parts, 0));  // [C, E]

  for (const std::string& style : data.styles()) {
    // The style's images, through the feature extractor (as dmx embed reads a picture), in batches.
    std::vector<int64_t> concept_of;
    std::vector<at::Tensor> pixels, image_parts;
    auto flush = [&] {
      if (pixels.empty()) return;
      image_parts.push_back(clip->image_encoder->forward(at::cat(pixels, 0)).image_embeds.to(at::kFloat));
      pixels.clear();
    };
    for (int ci = 0; ci < static_cast<int>(concepts.size()); ++ci) {
      if (!data.has(style, ci)) continue;
      const std::string& path = data.files(style, ci).image;
      pixels.push_back(models::clip_preprocess(clip->feature_extractor, to_rgb(load_image(path, "--data")), path));
      concept_of.push_back(ci);
      if (pixels.size() == 256) flush();
    }
    flush();
    if (concept_of.empty()) continue;
    const at::Tensor images = normalized(at::cat(image_parts, 0));  // [N, E]
    const at::Tensor owner = at::tensor(concept_of, at::kLong);     // [N]
    std::vector<int64_t> held_rows, train_rows, held_concepts, train_concepts;
    for (size_t k = 0; k < concept_of.size(); ++k) {
      const bool held = concepts[static_cast<size_t>(concept_of[k])].split == "heldout";
      (held ? held_rows : train_rows).push_back(static_cast<int64_t>(k));
      (held ? held_concepts : train_concepts).push_back(concept_of[k]);
    }
    ClipEvalStyle s;
    s.style = style;
    s.heldout = static_cast<int>(held_rows.size());
    s.train = static_cast<int>(train_rows.size());
    // Pairs of one split: image k <-> the name of its concept; the truth of each is its position.
    auto split_recalls = [&](const std::vector<int64_t>& rows, const std::vector<int64_t>& cs, double* i2t1,
                             double* i2t5, double* t2i1, double* t2i5) {
      if (rows.empty()) return;
      const at::Tensor im = images.index_select(0, at::tensor(rows, at::kLong));
      const at::Tensor tx = text.index_select(0, at::tensor(cs, at::kLong));
      const at::Tensor truth = at::arange(static_cast<int64_t>(rows.size()), at::kLong);
      std::tie(*i2t1, *i2t5) = recall(im, tx, truth);
      std::tie(*t2i1, *t2i5) = recall(tx, im, truth);
    };
    split_recalls(held_rows, held_concepts, &s.heldout_i2t_r1, &s.heldout_i2t_r5, &s.heldout_t2i_r1, &s.heldout_t2i_r5);
    split_recalls(train_rows, train_concepts, &s.train_i2t_r1, &s.train_i2t_r5, &s.train_t2i_r1, &s.train_t2i_r5);
    s.zero_shot_top1 = s.heldout_i2t_r1;
    s.zero_shot_top5 = s.heldout_i2t_r5;
    if (!held_rows.empty()) {  // the held-out images against every concept's name
      const at::Tensor rows = at::tensor(held_rows, at::kLong);
      std::tie(s.zero_shot_all_top1, s.zero_shot_all_top5) =
          recall(images.index_select(0, rows), text, owner.index_select(0, rows));
    }
    r.styles.push_back(s);
  }
  DMX_CHECK_ARG(!r.styles.empty(), "--data: ", data_dir, " has no images");
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace dmx
