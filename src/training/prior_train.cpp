// The diffusion prior's training recipe (see prior_train.h).
#include "training/prior_train.h"

#include <ATen/ATen.h>

#include <filesystem>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "models/clip_image_processor.h"
#include "schedulers/scheduler.h"
#include "training/finetune.h"

namespace dmx::training {

void PriorArchitecture::validate() const {
  DMX_CHECK_ARG(layers >= 1 && layers <= 48, "--layers (the prior's transformer blocks) must be in [1, 48], got ",
                layers);
  DMX_CHECK_ARG(heads >= 1 && heads <= 64, "--heads must be in [1, 64], got ", heads);
  DMX_CHECK_ARG(head_dim >= 4 && head_dim <= 256, "--attention-head-dim must be in [4, 256], got ", head_dim);
}

nlohmann::json stable_unclip_prior_scheduler_config() {
  return {{"_class_name", "DDPMScheduler"},
          {"_diffusers_version", "0.27.2"},
          {"beta_end", 0.02},
          {"beta_schedule", "squaredcos_cap_v2"},
          {"beta_start", 0.0001},
          {"clip_sample", true},
          {"clip_sample_range", 5.0},
          {"dynamic_thresholding_ratio", 0.995},
          {"num_train_timesteps", 1000},
          {"prediction_type", "sample"},
          {"rescale_betas_zero_snr", false},
          {"sample_max_value", 1.0},
          {"steps_offset", 0},
          {"thresholding", false},
          {"timestep_spacing", "leading"},
          {"trained_betas", nullptr},
          {"variance_type", "fixed_small_log"}};
}

models::PriorTransformerConfig prior_config_for_clip(const PriorArchitecture& arch, const models::CLIPTextConfig& text,
                                                     const models::CLIPVisionConfig& vision, int model_max_length) {
  arch.validate();
  DMX_CHECK_ARG(text.hidden_size == text.projection_dim && vision.projection_dim == text.projection_dim,
                "--clip: a Stable unCLIP prior needs the text tower's hidden_size and both towers' projection_dim "
                "equal (the text states, the text embedding and the image embedding share the prior's "
                "embedding_dim), got hidden_size ",
                text.hidden_size, ", text projection_dim ", text.projection_dim, ", image projection_dim ",
                vision.projection_dim);
  DMX_CHECK_ARG(model_max_length >= 1 && model_max_length <= text.max_position_embeddings,
                "--clip: the tokenizer's model_max_length ", model_max_length,
                " must be in [1, the text tower's max_position_embeddings ", text.max_position_embeddings, "]");
  models::PriorTransformerConfig c;
  c.num_attention_heads = arch.heads;
  c.attention_head_dim = arch.head_dim;
  c.num_layers = arch.layers;
  c.embedding_dim = text.hidden_size;
  c.num_embeddings = model_max_length;
  c.additional_embeddings = 4;
  c.dropout = 0.0;
  c.time_embed_act_fn = "silu";
  c.encoder_hid_proj_type = "linear";
  c.added_emb_type = "prd";
  c.validate();
  return c;
}

nlohmann::json prior_config_json(const models::PriorTransformerConfig& c) {
  auto or_null = [](int v) { return v > 0 ? nlohmann::json(v) : nlohmann::json(nullptr); };
  auto str_or_null = [](const std::string& s) { return s.empty() ? nlohmann::json(nullptr) : nlohmann::json(s); };
  return {{"_class_name", "PriorTransformer"},
          {"_diffusers_version", "0.27.2"},
          {"added_emb_type", str_or_null(c.added_emb_type)},
          {"additional_embeddings", c.additional_embeddings},
          {"attention_head_dim", c.attention_head_dim},
          {"clip_embed_dim", or_null(c.clip_embed_dim)},
          {"dropout", c.dropout},
          {"embedding_dim", c.embedding_dim},
          {"embedding_proj_dim", or_null(c.embedding_proj_dim)},
          {"embedding_proj_norm_type", str_or_null(c.embedding_proj_norm_type)},
          {"encoder_hid_proj_type", str_or_null(c.encoder_hid_proj_type)},
          {"norm_in_type", str_or_null(c.norm_in_type)},
          {"num_attention_heads", c.num_attention_heads},
          {"num_embeddings", c.num_embeddings},
          {"num_layers", c.num_layers},
          {"time_embed_act_fn", c.time_embed_act_fn},
          {"time_embed_dim", or_null(c.time_embed_dim)}};
}

// ---------------------------------------------------------------------------------------------------

void encode_prior_texts(loaders::CLIPComponents& clip, const std::vector<std::string>& texts, at::Tensor& hidden,
                        at::Tensor& text_embeds, at::Tensor& mask) {
  DMX_CHECK_ARG(!texts.empty(), "encode_prior_texts: no texts");
  at::NoGradGuard no_grad;
  clip.text_encoder->eval();
  const int L = clip.tokenizer->model_max_length();
  std::vector<at::Tensor> hs, te, ms;
  for (size_t i = 0; i < texts.size(); i += 256) {
    const size_t n = std::min<size_t>(256, texts.size() - i);
    std::vector<int64_t> ids, masks;
    for (size_t k = 0; k < n; ++k) {
      std::vector<int64_t> m;
      const auto row = clip.tokenizer->encode_padded(texts[i + k], L, &m);
      ids.insert(ids.end(), row.begin(), row.end());
      masks.insert(masks.end(), m.begin(), m.end());
    }
    const int64_t rows = static_cast<int64_t>(n);
    const auto out = clip.text_encoder->forward(at::tensor(ids, at::kLong).view({rows, L}));
    hs.push_back(out.last_hidden_state.to(at::kFloat));
    te.push_back(out.text_embeds.to(at::kFloat));
    ms.push_back(at::tensor(masks, at::kLong).view({rows, L}).to(at::kBool));
  }
  hidden = at::cat(hs, 0);
  text_embeds = at::cat(te, 0);
  mask = at::cat(ms, 0);
}

at::Tensor encode_prior_images(loaders::CLIPComponents& clip, const std::vector<std::string>& image_paths,
                               const std::string& param) {
  DMX_CHECK_ARG(!image_paths.empty(), "encode_prior_images: no pictures");
  at::NoGradGuard no_grad;
  clip.image_encoder->eval();
  std::vector<at::Tensor> parts, pixels;
  auto flush = [&] {
    if (pixels.empty()) return;
    parts.push_back(clip.image_encoder->forward(at::cat(pixels, 0)).image_embeds.to(at::kFloat));
    pixels.clear();
  };
  for (const auto& path : image_paths) {
    pixels.push_back(models::clip_preprocess(clip.feature_extractor, to_rgb(load_image(path, param)), path));
    if (pixels.size() == 256) flush();
  }
  flush();
  return at::cat(parts, 0);
}

PriorFeatures compute_prior_features(loaders::CLIPComponents& clip, const std::vector<std::string>& image_paths,
                                     const std::vector<std::string>& captions, const std::string& param) {
  DMX_CHECK_ARG(image_paths.size() == captions.size() && !captions.empty(),
                "compute_prior_features: one caption per picture is needed, got ", image_paths.size(), " pictures and ",
                captions.size(), " captions");
  PriorFeatures f;
  f.captions = captions;
  encode_prior_texts(clip, captions, f.last_hidden_state, f.text_embeds, f.attention_mask);
  encode_prior_texts(clip, {""}, f.uncond_hidden_state, f.uncond_text_embeds, f.uncond_attention_mask);
  f.image_embeds = encode_prior_images(clip, image_paths, param);
  return f;
}

// ---------------------------------------------------------------------------------------------------

FeatureBatchSource::FeatureBatchSource(std::vector<std::string> captions, int batch_size_per_rank, int rank,
                                       int world_size, uint64_t seed)
    : captions_(std::move(captions)), sampler_(captions_.size(), batch_size_per_rank, rank, world_size, seed) {}

Batch FeatureBatchSource::get(int64_t micro_step) {
  Batch b;
  for (size_t i : sampler_.indices(micro_step)) {
    b.indices.push_back(static_cast<int64_t>(i));
    b.captions.push_back(captions_[i]);
  }
  b.pixel_values = at::zeros({static_cast<int64_t>(b.indices.size()), 1, 1, 1});
  return b;
}

// ---------------------------------------------------------------------------------------------------

std::shared_ptr<loaders::StableDiffusionModels> prior_bundle(const std::string& source) {
  auto b = std::make_shared<loaders::StableDiffusionModels>();
  b->name = "prior";
  b->source_path = source;
  b->scheduler_config = {{"_class_name", "DDPMScheduler"}, {"num_train_timesteps", 1000}};
  return b;
}

PriorRecipe::PriorRecipe(models::PriorTransformer prior, std::shared_ptr<const PriorFeatures> features,
                         std::string clip_dir, double text_drop)
    : Recipe(prior_bundle(clip_dir)),
      prior_(std::move(prior)),
      f_(std::move(features)),
      clip_dir_(std::move(clip_dir)),
      text_drop_(text_drop) {
  DMX_CHECK_ARG(!prior_.is_empty() && f_ && f_->size() > 0, "dmx train prior: a prior and training rows are needed");
  DMX_CHECK_ARG(text_drop_ >= 0 && text_drop_ <= 1, "--proportion-empty-prompts must be in [0, 1], got ", text_drop_);
  const auto& c = prior_->config();
  const int64_t E = c.embedding_dim, L = c.num_embeddings, N = static_cast<int64_t>(f_->size());
  DMX_CHECK_ARG(f_->image_embeds.sizes() == at::IntArrayRef({N, E}) &&
                    f_->text_embeds.sizes() == at::IntArrayRef({N, E}) &&
                    f_->last_hidden_state.sizes() == at::IntArrayRef({N, L, E}) &&
                    f_->attention_mask.sizes() == at::IntArrayRef({N, L}),
                "dmx train prior: the CLIP features do not fit the prior (embedding_dim ", E, ", num_embeddings ", L,
                "): image_embeds ", f_->image_embeds.sizes(), ", last_hidden_state ", f_->last_hidden_state.sizes());
  const auto scfg = schedulers::SchedulerConfig::for_class("DDPMScheduler", stable_unclip_prior_scheduler_config());
  alphas_cumprod_ = at::cumprod(1.0 - schedulers::make_betas(scfg), 0).to(at::kFloat);
  // The normalisation the prior's post_process_latents undoes: statistics of the training images' embeddings.
  at::NoGradGuard no_grad;
  const at::Tensor mean = f_->image_embeds.mean(0, true);
  const at::Tensor std = N > 1 ? f_->image_embeds.std(0, /*unbiased=*/true, true) : at::ones_like(mean);
  mean_ = mean.to(at::kFloat);
  std_ = std.clamp_min(1e-6).to(at::kFloat);
  for (auto& p : prior_->named_parameters(true)) {
    if (p.key() == "clip_mean") p.value().copy_(mean_);
    if (p.key() == "clip_std") p.value().copy_(std_);
  }
}

void PriorRecipe::setup(const TrainConfig& cfg) {
  DMX_CHECK_SUPPORTED(!cfg.cache_latents && cfg.snr_gamma == 0 && cfg.noise_offset == 0 &&
                          cfg.proportion_empty_prompts == 0 && cfg.prediction_type.empty(),
                      "dmx train prior predicts the clean image embedding: --cache-latents, --snr-gamma, "
                      "--noise-offset and --prediction-type do not apply");
  prior_->to(at::kFloat);
  for (auto& p : prior_->named_parameters(true))
    p.value().set_requires_grad(p.key() != "clip_mean" && p.key() != "clip_std");
  autocast_bf16_ = cfg.mixed_precision == MixedPrecision::BF16;
}

std::vector<NamedParameter> PriorRecipe::trainable_parameters() {
  std::vector<NamedParameter> v;
  for (const auto& p : prior_->named_parameters(true))
    if (p.key() != "clip_mean" && p.key() != "clip_std") v.push_back({"prior." + p.key(), p.value()});
  return v;
}

void PriorRecipe::train_mode(bool on) { prior_->train(on); }

at::Tensor PriorRecipe::custom_loss(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) {
  const int64_t rows = static_cast<int64_t>(batch.indices.size());
  DMX_CHECK_ARG(rows > 0, "dmx train prior: the batch names no rows");
  const int64_t E = prior_->config().embedding_dim, T = alphas_cumprod_.size(0);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // The draws of the global batch, in the documented order; this rank keeps rows [r0, r0 + rows).
  const at::Tensor t = at::randint(0, T, {global_rows}, gen, at::TensorOptions().dtype(at::kLong)).narrow(0, r0, rows);
  const at::Tensor noise = at::randn({global_rows, E}, gen, f32).narrow(0, r0, rows);
  at::Tensor drop;  // [rows] bool
  if (text_drop_ > 0) drop = at::rand({global_rows}, gen, f32).narrow(0, r0, rows).lt(text_drop_);

  const at::Tensor idx = at::tensor(batch.indices, at::kLong);
  at::Tensor hidden = f_->last_hidden_state.index_select(0, idx);  // [B, L, E]
  at::Tensor text = f_->text_embeds.index_select(0, idx);          // [B, E]
  at::Tensor mask = f_->attention_mask.index_select(0, idx);       // [B, L]
  if (drop.defined()) {
    hidden = at::where(drop.view({rows, 1, 1}), f_->uncond_hidden_state.expand_as(hidden), hidden);
    text = at::where(drop.view({rows, 1}), f_->uncond_text_embeds.expand_as(text), text);
    mask = at::where(drop.view({rows, 1}), f_->uncond_attention_mask.expand_as(mask), mask);
  }
  const at::Tensor x0 = (f_->image_embeds.index_select(0, idx) - mean_) / std_;  // [B, E], normalised
  const at::Tensor a = alphas_cumprod_.index_select(0, t).view({rows, 1});
  const at::Tensor noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise;  // DDPM add_noise

  models::PriorTransformerInputs in;
  in.hidden_states = noisy;
  in.timestep = t;
  in.proj_embedding = text;
  in.encoder_hidden_states = hidden;
  in.attention_mask = mask;
  at::Tensor pred;
  if (autocast_bf16_) {
    AutocastBF16 scope(noisy.device());
    pred = prior_->forward(in);
  } else {
    pred = prior_->forward(in);
  }
  return (pred.to(at::kFloat) - x0).pow(2).mean(1);  // [B]
}

at::Tensor PriorRecipe::predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Batch&) {
  throw Unsupported("the prior recipe computes its own loss (custom_loss)");
}

void PriorRecipe::save(const std::string& dir) { save_prior_folder(dir, prior_, clip_dir_); }

void save_prior_folder(const std::string& dir, models::PriorTransformer& prior, const std::string& clip_dir) {
  namespace fs = std::filesystem;
  DMX_CHECK_ARG(is_directory(join_path(clip_dir, "text_encoder")) && is_directory(join_path(clip_dir, "tokenizer")),
                "save_prior_folder: ", clip_dir, " has no text_encoder/ and tokenizer/ to copy");
  write_directory_atomic(dir, "the prior folder", [&](const std::string& tmp) {
    auto write_json = [](const std::string& path, const nlohmann::json& j) {
      const std::string text = j.dump(2) + "\n";
      write_bytes_atomic(path, text.data(), text.size());
    };
    fs::create_directories(fs::path(tmp) / "prior");
    fs::create_directories(fs::path(tmp) / "prior_scheduler");
    write_json(join_path(tmp, "prior/config.json"), prior_config_json(prior->config()));
    io::TensorMap weights;
    for (const auto& p : prior->named_parameters(true))
      weights[p.key()] = p.value().detach().to(at::kFloat).to(at::kCPU).contiguous();
    io::save_safetensors(join_path(tmp, "prior/diffusion_pytorch_model.safetensors"), weights, {{"format", "pt"}});
    write_json(join_path(tmp, "prior_scheduler/scheduler_config.json"), stable_unclip_prior_scheduler_config());
    for (const auto& [from, to] : {std::pair<const char*, const char*>{"text_encoder", "prior_text_encoder"},
                                   {"tokenizer", "prior_tokenizer"}}) {
      fs::create_directories(fs::path(tmp) / to);
      for (const auto& e : fs::directory_iterator(fs::path(clip_dir) / from))
        if (e.is_regular_file()) fs::copy_file(e.path(), fs::path(tmp) / to / e.path().filename());
    }
  });
}
}  // namespace dmx::training
