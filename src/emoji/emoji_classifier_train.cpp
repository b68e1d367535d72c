// Training of the emoji classifier (see the header).
#include "emoji/emoji_classifier_train.h"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cmath>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/runtime.h"
#include "emoji/emoji_classifier.h"
#include "emoji/emoji_data.h"
#include "training/trainer.h"

namespace dmx::emoji {

namespace {

// Separable Gaussian blur with a per-image sigma (sigma 0 = identity): x [B, C, H, W].
at::Tensor gaussian_blur(const at::Tensor& x, const at::Tensor& sigma) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int r = 2;
  at::Tensor taps = at::arange(-r, r + 1, x.options()).view({1, 2 * r + 1});  // [1, 5]
  at::Tensor s = sigma.view({B, 1}).clamp_min(1e-3);
  at::Tensor k = at::exp(-(taps * taps) / (2 * s * s));  // [B, 5]
  k = k / k.sum(1, true);
  k = k.repeat_interleave(C, 0);                                                    // [B*C, 5]
  at::Tensor y = at::replication_pad2d(x.reshape({1, B * C, H, W}), {r, r, r, r});  // [1, B*C, H+4, W+4]
  const std::vector<int64_t> one = {1, 1}, zero = {0, 0};
  const c10::optional<at::Tensor> no_bias;
  y = at::conv2d(y, k.view({B * C, 1, 1, 2 * r + 1}), no_bias, one, zero, one, B * C);  // along W
  y = at::conv2d(y, k.view({B * C, 1, 2 * r + 1, 1}), no_bias, one, zero, one, B * C);  // along H
  return y.view({B, C, H, W});
}

}  // namespace

at::Tensor augment_emoji_batch(const at::Tensor& x, at::Generator& gen) {
  const int64_t B = x.size(0);
  auto u = [&](double lo, double hi) { return at::rand({B}, gen, x.options()) * (hi - lo) + lo; };
  // 1. Random affine (output -> input sampling grid); sampled on the inverted image so the zero padding of
  //    grid_sampler is the white background.
  at::Tensor scale = u(0.85, 1.15), angle = u(-10.0, 10.0) * (M_PI / 180.0);
  at::Tensor tx = u(-0.2, 0.2), ty = u(-0.2, 0.2);  // normalized coordinates span 2: 10% of the side
  at::Tensor c = at::cos(angle) / scale, s = at::sin(angle) / scale;
  at::Tensor theta = at::stack({at::stack({c, -s, tx}, 1), at::stack({s, c, ty}, 1)}, 1);  // [B, 2, 3]
  at::Tensor grid = at::affine_grid_generator(theta, x.sizes(), false);                    // [B, H, W, 2]
  at::Tensor y = 1.0 - at::grid_sampler(1.0 - x, grid, 0, 0, false);
  // 2. Blur on half the images.
  at::Tensor blur_on = (at::rand({B}, gen, x.options()) < 0.5).to(x.scalar_type());
  at::Tensor sigma = u(0.3, 1.2) * blur_on;
  y = at::where(blur_on.view({B, 1, 1, 1}) > 0, gaussian_blur(y, sigma), y);
  // 3. Colour jitter: brightness, contrast (around the image mean), saturation (around the gray value).
  at::Tensor bright = u(-0.08, 0.08).view({B, 1, 1, 1});
  at::Tensor contrast = u(0.85, 1.15).view({B, 1, 1, 1});
  at::Tensor sat = u(0.85, 1.15).view({B, 1, 1, 1});
  at::Tensor gray = (0.299 * y.select(1, 0) + 0.587 * y.select(1, 1) + 0.114 * y.select(1, 2)).unsqueeze(1);
  y = gray + (y - gray) * sat;
  at::Tensor mean = y.mean({1, 2, 3}, true);
  y = mean + (y - mean) * contrast + bright;
  // 4. Noise.
  at::Tensor noise_sigma = u(0.0, 0.04).view({B, 1, 1, 1});
  y = y + at::randn(y.sizes(), gen, y.options()) * noise_sigma;
  return y.clamp(0.0, 1.0);
}

ClassifierTrainResult train_emoji_classifier(const ClassifierTrainOptions& o) {
  DMX_CHECK_ARG(!o.data.empty(), "--data is required (a `dmx data emoji` folder)");
  DMX_CHECK_ARG(!o.output.empty(), "--output is required (a folder for config.json + model.safetensors)");
  DMX_CHECK_ARG(o.steps >= 1, "--steps must be >= 1, got ", o.steps);
  DMX_CHECK_ARG(o.batch_size >= 1 && o.batch_size <= 4096, "--batch-size must be in [1, 4096], got ", o.batch_size);
  DMX_CHECK_ARG(std::isfinite(o.learning_rate) && o.learning_rate > 0 && o.learning_rate < 1,
                "--learning-rate must be in (0, 1), got ", o.learning_rate);
  DMX_CHECK_ARG(!path_exists(o.output) || is_directory(o.output), "--output must be a folder, got the file ", o.output);
  configure_threads(o.threads);
  set_log_level(o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  EmojiData data(o.data, "--data");

  // 1. Every real image of every style (train + heldout): X [N, 3, S, S] in [0, 1], concept and style labels.
  EmojiClassifierConfig cfg;
  for (const auto& c : data.concepts()) {
    cfg.class_names.push_back(c.name);
    cfg.class_categories.push_back(c.category);
    cfg.class_splits.push_back(c.split);
  }
  std::vector<at::Tensor> xs;
  std::vector<int64_t> yc, ys;
  for (size_t si = 0; si < cfg.styles.size(); ++si)
    for (int ci = 0; ci < static_cast<int>(data.concepts().size()); ++ci)
      if (data.has(cfg.styles[si], ci)) {
        at::Tensor img = data.image01(cfg.styles[si], ci);
        if (img.size(1) != cfg.image_size || img.size(2) != cfg.image_size)
          img = at::upsample_bilinear2d(img.unsqueeze(0), {cfg.image_size, cfg.image_size}, false).squeeze(0);
        xs.push_back(img);
        yc.push_back(ci);
        ys.push_back(static_cast<int64_t>(si));
      }
  DMX_CHECK_ARG(!xs.empty(), "--data: ", o.data, " has no google or twitter images");
  const at::Tensor X = at::stack(xs);  // [N, 3, S, S]
  const at::Tensor Yc = at::tensor(yc, at::kLong), Ys = at::tensor(ys, at::kLong);
  const int64_t N = X.size(0);
  log_info("classifier: " + std::to_string(N) + " images, " + std::to_string(cfg.class_names.size()) + " concepts, " +
           std::to_string(o.steps) + " steps of batch " + std::to_string(o.batch_size));

  // 2. Model, optimizer, generator (every random draw comes from it: initialisation included).
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  at::manual_seed(o.seed);  // torch::nn's default initialisers draw from the global generator
  EmojiClassifier model(cfg);
  std::vector<training::NamedParameter> params;
  for (const auto& kv : model->named_parameters()) params.push_back({kv.key(), kv.value()});
  training::AdamWOptions ao;
  ao.lr = o.learning_rate;
  ao.weight_decay = o.weight_decay;
  training::AdamW opt(params, ao);
  const int64_t warmup = std::min<int64_t>(100, o.steps / 10);

  // 3. Loop: epochs of a seeded permutation.
  ClassifierTrainResult r;
  model->train();
  at::Tensor perm = at::randperm(N, gen);
  int64_t pos = 0;
  const auto t0 = std::chrono::steady_clock::now();
  ProgressBar bar("train classifier", static_cast<int>(o.steps));
  double loss_ema = 0;
  for (int64_t step = 0; step < o.steps; ++step) {
    if (pos + o.batch_size > N) {
      perm = at::randperm(N, gen);
      pos = 0;
    }
    const int64_t b = std::min<int64_t>(o.batch_size, N);
    at::Tensor idx = perm.slice(0, pos, pos + b);
    pos += b;
    at::Tensor x = augment_emoji_batch(X.index_select(0, idx), gen) * 2.0 - 1.0;  // [B, 3, S, S] in [-1, 1]
    EmojiClassifierOutput out = model->forward(x);
    at::Tensor loss =
        at::cross_entropy_loss(out.concept_logits, Yc.index_select(0, idx), {}, at::Reduction::Mean, -100, 0.1) +
        0.5 * at::cross_entropy_loss(out.style_logits, Ys.index_select(0, idx));
    opt.zero_grad();
    loss.backward();
    training::clip_grad_norm(params, 1.0);
    opt.step(o.learning_rate * training::lr_lambda(training::LRSchedule::Cosine, step, warmup, o.steps));
    const double l = loss.item<double>();
    DMX_CHECK_T(Error, std::isfinite(l), "classifier training diverged at step ", step, " (loss ", l,
                "); lower --learning-rate");
    loss_ema = step == 0 ? l : 0.98 * loss_ema + 0.02 * l;
    bar.tick();
  }
  bar.finish();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.steps = o.steps;
  r.final_loss = loss_ema;
  r.num_classes = static_cast<int>(cfg.class_names.size());
  r.num_images = static_cast<int>(N);

  // 4. Accuracy on the clean images, per style.
  model->eval();
  EmojiClassifierOutput all = classify(model, X * 2.0 - 1.0, 128);
  const at::Tensor top5 = std::get<1>(all.concept_logits.topk(std::min<int64_t>(5, all.concept_logits.size(1)), 1));
  const at::Tensor hit1 = top5.select(1, 0).eq(Yc);
  const at::Tensor hit5 = top5.eq(Yc.unsqueeze(1)).any(1);
  const at::Tensor style_hit = all.style_logits.argmax(1).eq(Ys);
  for (size_t si = 0; si < cfg.styles.size(); ++si) {
    const at::Tensor m = Ys.eq(static_cast<int64_t>(si));
    const double cnt = m.sum().item<double>();
    if (cnt == 0) continue;
    r.styles.push_back(cfg.styles[si]);
    r.top1.push_back(hit1.logical_and(m).sum().item<double>() / cnt);
    r.top5.push_back(hit5.logical_and(m).sum().item<double>() / cnt);
    r.style_accuracy.push_back(style_hit.logical_and(m).sum().item<double>() / cnt);
  }
  // Both files or neither: written into a temporary folder and renamed.
  write_directory_atomic(o.output, "the emoji classifier",
                         [&](const std::string& tmp) { save_emoji_classifier(model, tmp, true); });
  return r;
}
}  // namespace dmx::emoji
