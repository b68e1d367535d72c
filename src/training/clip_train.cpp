// CLIP training recipe (see clip_train.h).
#include "training/clip_train.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/text.h"
#include "dmx/error.h"
#include "training/finetune.h"

namespace dmx::training {

at::Tensor clip_contrastive_loss(const at::Tensor& image_embeds, const at::Tensor& text_embeds,
                                 const at::Tensor& logit_scale) {
  DMX_CHECK_ARG(image_embeds.dim() == 2 && text_embeds.dim() == 2 && image_embeds.sizes() == text_embeds.sizes() &&
                    image_embeds.size(0) > 0,
                "clip_contrastive_loss: image_embeds and text_embeds must both be [B, E], got ", image_embeds.sizes(),
                " and ", text_embeds.sizes());
  const at::Tensor img = image_embeds.to(at::kFloat);
  const at::Tensor txt = text_embeds.to(at::kFloat);
  const at::Tensor i = img / img.norm(2, {1}, true);
  const at::Tensor t = txt / txt.norm(2, {1}, true);
  const at::Tensor scale = at::clamp_max(logit_scale.to(at::kFloat), loaders::kCLIPLogitScaleMax).exp();
  const at::Tensor logits = scale * at::matmul(i, t.t());  // [B, B] logits_per_image; its transpose per text
  const at::Tensor labels = at::arange(img.size(0), at::TensorOptions().dtype(at::kLong).device(img.device()));
  const at::Tensor i2t = at::cross_entropy_loss(logits, labels, {}, at::Reduction::None);
  const at::Tensor t2i = at::cross_entropy_loss(logits.t(), labels, {}, at::Reduction::None);
  return 0.5 * (i2t + t2i);  // [B]
}

void CLIPArchitecture::validate() const {
  DMX_CHECK_ARG(width >= 8 && width <= 4096, "--width (the towers' hidden size) must be in [8, 4096], got ", width);
  DMX_CHECK_ARG(layers >= 1 && layers <= 48, "--layers must be in [1, 48], got ", layers);
  DMX_CHECK_ARG(heads >= 1 && heads <= 64 && width % heads == 0, "--heads must be in [1, 64] and divide --width ",
                width, ", got ", heads);
  DMX_CHECK_ARG(projection_dim >= 2 && projection_dim <= 4096, "--projection-dim must be in [2, 4096], got ",
                projection_dim);
  DMX_CHECK_ARG(image_size >= 8 && image_size <= 512 && image_size % 8 == 0,
                "--image-size must be a multiple of 8 in [8, 512], got ", image_size);
  DMX_CHECK_ARG(patch_size >= 1 && patch_size <= image_size && image_size % patch_size == 0,
                "--patch-size must divide --image-size ", image_size, ", got ", patch_size);
  DMX_CHECK_ARG((image_size / patch_size) * (image_size / patch_size) <= 4096, "--patch-size ", patch_size, " makes ",
                (image_size / patch_size) * (image_size / patch_size),
                " patches of a --image-size picture; at most 4096");
}

void init_clip_weights(torch::nn::Module& tower, int hidden_size, int num_layers) {
  at::NoGradGuard no_grad;
  const double d = hidden_size, L = num_layers, range = 0.02;
  const double in_std = std::pow(d, -0.5) * std::pow(2 * L, -0.5), out_std = std::pow(d, -0.5),
               fc_std = std::pow(2 * d, -0.5);
  auto has = [](const std::string& k, const char* part) { return k.find(part) != std::string::npos; };
  for (auto& p : tower.named_parameters(true)) {
    const std::string& k = p.key();
    at::Tensor v = p.value();
    if (ends_with(k, "class_embedding")) {
      v.normal_(0, std::pow(d, -0.5));
    } else if (has(k, "token_embedding") || has(k, "position_embedding") || has(k, "patch_embedding")) {
      v.normal_(0, range);
    } else if (has(k, "layer_norm") || has(k, "layrnorm") || has(k, "layernorm")) {
      ends_with(k, ".weight") ? v.fill_(1) : v.zero_();
    } else if (ends_with(k, ".bias")) {
      v.zero_();
    } else if (has(k, "q_proj") || has(k, "k_proj") || has(k, "v_proj") || has(k, "fc2")) {
      v.normal_(0, in_std);
    } else if (has(k, "out_proj") || has(k, "text_projection") || has(k, "visual_projection")) {
      v.normal_(0, out_std);
    } else if (has(k, "fc1")) {
      v.normal_(0, fc_std);
    }
  }
}

std::shared_ptr<loaders::CLIPComponents> new_clip_model(const CLIPArchitecture& arch,
                                                        const std::string& tokenizer_dir) {
  arch.validate();
  const models::CLIPTokenizer tok = models::CLIPTokenizer::from_folder(tokenizer_dir);
  models::CLIPTextConfig t;
  t.vocab_size = static_cast<int>(tok.vocab_size());
  t.hidden_size = arch.width;
  t.intermediate_size = 4 * arch.width;
  t.num_hidden_layers = arch.layers;
  t.num_attention_heads = arch.heads;
  t.max_position_embeddings = tok.model_max_length();
  t.projection_dim = arch.projection_dim;
  t.hidden_act = "quick_gelu";
  // transformers' legacy eos_token_id 2: the pooled token is the largest id, the EOS of CLIP vocabularies.
  t.bos_token_id = 0;
  t.eos_token_id = 2;
  t.pad_token_id = 1;
  models::CLIPVisionConfig v;
  v.hidden_size = arch.width;
  v.intermediate_size = 4 * arch.width;
  v.num_hidden_layers = arch.layers;
  v.num_attention_heads = arch.heads;
  v.projection_dim = arch.projection_dim;
  v.image_size = arch.image_size;
  v.patch_size = arch.patch_size;
  return new_clip_model(t, v, tokenizer_dir);
}

std::shared_ptr<loaders::CLIPComponents> new_clip_model(const models::CLIPTextConfig& t,
                                                        const models::CLIPVisionConfig& v,
                                                        const std::string& tokenizer_dir) {
  t.validate();
  v.validate();
  auto m = std::make_shared<loaders::CLIPComponents>();
  m->tokenizer_dir = tokenizer_dir;
  m->tokenizer = std::make_shared<models::CLIPTokenizer>(models::CLIPTokenizer::from_folder(tokenizer_dir));
  DMX_CHECK_ARG(m->tokenizer->vocab_size() <= static_cast<size_t>(t.vocab_size), "--tokenizer ", tokenizer_dir, " has ",
                m->tokenizer->vocab_size(), " tokens, more than the text tower's vocab_size ", t.vocab_size);
  DMX_CHECK_ARG(m->tokenizer->model_max_length() <= t.max_position_embeddings, "--tokenizer ", tokenizer_dir,
                " has model_max_length ", m->tokenizer->model_max_length(),
                ", more than the text tower's max_position_embeddings ", t.max_position_embeddings);
  DMX_CHECK_ARG(t.projection_dim == v.projection_dim, "the text tower's projection_dim ", t.projection_dim,
                " differs from the image tower's ", v.projection_dim);
  m->text_encoder = models::CLIPTextModel(t, /*with_projection=*/true);
  init_clip_weights(*m->text_encoder, t.hidden_size, t.num_hidden_layers);
  m->image_encoder = models::CLIPVisionModelWithProjection(v);
  init_clip_weights(*m->image_encoder, v.hidden_size, v.num_hidden_layers);
  auto& fe = m->feature_extractor;
  fe.shortest_edge = v.image_size;
  fe.crop_height = fe.crop_width = v.image_size;
  fe.image_mean = {0.5, 0.5, 0.5};
  fe.image_std = {0.5, 0.5, 0.5};
  fe.validate();
  m->logit_scale = loaders::kCLIPLogitScaleInit;
  return m;
}

// ---------------------------------------------------------------------------------------------------

ConcatBatchSource::ConcatBatchSource(std::vector<std::shared_ptr<ImageCaptionDataset>> datasets, int batch_size,
                                     uint64_t seed, int rank, int world_size)
    : ds_(std::move(datasets)),
      total_([&] {
        size_t n = 0;
        for (const auto& d : ds_) n += d->size();
        return n;
      }()),
      sampler_(total_, batch_size, rank, world_size, seed),
      batch_size_(batch_size),
      rank_(rank) {}

bool ConcatBatchSource::latents_cacheable() const {
  for (const auto& d : ds_)
    if (!d->options().center_crop || d->options().random_flip) return false;
  return true;
}

std::vector<std::string> ConcatBatchSource::image_paths() const {
  std::vector<std::string> out;
  out.reserve(total_);
  for (const auto& d : ds_)
    for (const auto& r : d->rows()) out.push_back(r.image);
  return out;
}

Batch ConcatBatchSource::get(int64_t micro_step) {
  const std::vector<size_t> idx = sampler_.indices(micro_step);
  const uint64_t seed = sampler_.augment_seed(micro_step) + static_cast<uint64_t>(rank_) * batch_size_;
  Batch b;
  std::vector<at::Tensor> px;
  for (size_t k = 0; k < idx.size(); ++k) {
    size_t i = idx[k], d = 0;
    while (i >= ds_[d]->size()) i -= ds_[d++]->size();
    Example ex = ds_[d]->get(i, seed + k);
    px.push_back(ex.pixel_values);
    b.captions.push_back(std::move(ex.caption));
    b.indices.push_back(static_cast<int64_t>(idx[k]));
  }
  b.pixel_values = at::stack(px);  // [B, 3, R, R] in [-1, 1]
  return b;
}

// ---------------------------------------------------------------------------------------------------

std::shared_ptr<loaders::StableDiffusionModels> clip_bundle(const std::string& source) {
  auto b = std::make_shared<loaders::StableDiffusionModels>();
  b->name = "clip";
  b->source_path = source;
  b->scheduler_config = {{"_class_name", "DDPMScheduler"}, {"num_train_timesteps", 1000}};
  return b;
}

CLIPRecipe::CLIPRecipe(std::shared_ptr<loaders::CLIPComponents> clip)
    : Recipe(clip_bundle("")), clip_(std::move(clip)) {
  DMX_CHECK_ARG(clip_ && !clip_->text_encoder.is_empty() && !clip_->image_encoder.is_empty() && clip_->tokenizer,
                "dmx train clip: the model needs a text encoder, an image encoder and a tokenizer");
  DMX_CHECK_ARG(clip_->text_encoder->has_projection(), "dmx train clip: the text encoder needs its text_projection");
  const auto& fe = clip_->feature_extractor;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  mean_ = at::tensor(std::vector<double>(fe.image_mean.begin(), fe.image_mean.end()), f32).view({1, 3, 1, 1});
  std_ = at::tensor(std::vector<double>(fe.image_std.begin(), fe.image_std.end()), f32).view({1, 3, 1, 1});
  logit_scale_ = at::scalar_tensor(clip_->logit_scale, f32).set_requires_grad(true);
}

void CLIPRecipe::setup(const TrainConfig& cfg) {
  DMX_CHECK_SUPPORTED(!cfg.cache_latents && cfg.snr_gamma == 0 && cfg.noise_offset == 0 &&
                          cfg.proportion_empty_prompts == 0 && cfg.prediction_type.empty(),
                      "dmx train clip trains with the contrastive loss: --cache-latents, --snr-gamma, --noise-offset, "
                      "--proportion-empty-prompts and --prediction-type do not apply");
  for (torch::nn::Module* m : {static_cast<torch::nn::Module*>(clip_->text_encoder.get()),
                               static_cast<torch::nn::Module*>(clip_->image_encoder.get())}) {
    m->to(at::kFloat);
    for (auto& p : m->parameters()) p.set_requires_grad(true);
  }
  autocast_bf16_ = cfg.mixed_precision == MixedPrecision::BF16;
}

std::vector<NamedParameter> CLIPRecipe::trainable_parameters() {
  std::vector<NamedParameter> v;
  for (const auto& p : clip_->text_encoder->named_parameters(true)) v.push_back({"text_encoder." + p.key(), p.value()});
  for (const auto& p : clip_->image_encoder->named_parameters(true))
    v.push_back({"image_encoder." + p.key(), p.value()});
  v.push_back({"logit_scale", logit_scale_});
  return v;
}

void CLIPRecipe::train_mode(bool on) {
  clip_->text_encoder->train(on);
  clip_->image_encoder->train(on);
}

at::Tensor CLIPRecipe::custom_loss(const Batch& batch, at::Generator&, int64_t, int64_t global_rows) {
  const int64_t rows = batch.pixel_values.size(0);
  DMX_CHECK_SUPPORTED(global_rows == rows,
                      "dmx train clip runs in one process (its loss takes every row of the batch as a negative)");
  // Pixels in [-1, 1] -> [0, 1] -> the feature extractor's normalisation (identity for mean = std = 0.5).
  const at::Tensor x01 = (batch.pixel_values.to(at::kFloat) + 1.0) * 0.5;
  const at::Tensor pixels = (x01 - mean_) / std_;  // [B, 3, S, S]
  const int L = clip_->tokenizer->model_max_length();
  std::vector<int64_t> ids;
  ids.reserve(static_cast<size_t>(rows * L));
  for (const auto& c : batch.captions) {
    const auto one = clip_->tokenizer->encode_padded(c, L);
    ids.insert(ids.end(), one.begin(), one.end());
  }
  const at::Tensor input_ids = at::tensor(ids, at::kLong).reshape({rows, L});
  at::Tensor image_embeds, text_embeds;
  if (autocast_bf16_) {
    AutocastBF16 scope(pixels.device());
    image_embeds = clip_->image_encoder->forward(pixels).image_embeds;
    text_embeds = clip_->text_encoder->forward(input_ids).text_embeds;
  } else {
    image_embeds = clip_->image_encoder->forward(pixels).image_embeds;
    text_embeds = clip_->text_encoder->forward(input_ids).text_embeds;
  }
  return clip_contrastive_loss(image_embeds, text_embeds, logit_scale_);
}

at::Tensor CLIPRecipe::predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Batch&) {
  throw Unsupported("the CLIP recipe computes its own loss (custom_loss)");
}

double CLIPRecipe::logit_scale() const { return logit_scale_.item<double>(); }

void CLIPRecipe::save(const std::string& dir) {
  clip_->logit_scale = std::min(logit_scale(), loaders::kCLIPLogitScaleMax);
  loaders::save_clip(dir, *clip_);
}
}  // namespace dmx::training
