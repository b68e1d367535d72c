// The unCLIP decoder recipe (see unclip_train.h): Stable unCLIP's decoder fine-tuned from a text-to-image model.
#include "training/unclip_train.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <filesystem>
#include <set>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "nn/layers.h"
#include "training/finetune.h"
#include "training/folder_copy.h"
#include "training/lora_train.h"

namespace dmx::training {

namespace fs = std::filesystem;

nlohmann::json stable_unclip_noising_scheduler_config() {
  return {{"_class_name", "DDPMScheduler"},
          {"_diffusers_version", "0.27.2"},
          {"beta_end", 0.02},
          {"beta_schedule", "squaredcos_cap_v2"},
          {"beta_start", 0.0001},
          {"clip_sample", true},
          {"clip_sample_range", 1.0},
          {"num_train_timesteps", 1000},
          {"prediction_type", "epsilon"},
          {"trained_betas", nullptr},
          {"variance_type", "fixed_small"}};
}

at::Tensor clip_image_embeddings(const models::CLIPImageProcessorConfig& feature_extractor,
                                 models::CLIPVisionModelWithProjection& image_encoder,
                                 const std::vector<std::string>& paths) {
  DMX_CHECK_ARG(!paths.empty(), "clip_image_embeddings: no pictures");
  at::NoGradGuard no_grad;
  image_encoder->eval();
  const auto p0 = image_encoder->parameters().front();
  std::vector<at::Tensor> rows;
  rows.reserve(paths.size());
  for (const auto& path : paths) {
    const Image picture = to_rgb(load_image(path, "--data"));  // as dmx variations reads --image
    const at::Tensor px = models::clip_preprocess(feature_extractor, picture, "--data");
    rows.push_back(image_encoder->forward(px.to(p0.device(), p0.scalar_type())).image_embeds.to(at::kFloat));
  }
  return at::cat(rows, 0).cpu();  // [N, E]
}

at::Tensor noise_image_embeddings_per_row(models::StableUnCLIPImageNormalizer& normalizer,
                                          const schedulers::Scheduler& noising, const at::Tensor& image_embeds,
                                          const at::Tensor& levels, const at::Tensor& noise) {
  DMX_CHECK_ARG(image_embeds.dim() == 2 && levels.dim() == 1 && levels.size(0) == image_embeds.size(0) &&
                    noise.sizes().equals(image_embeds.sizes()),
                "noise_image_embeddings_per_row: image_embeds [B, E], levels [B] and noise [B, E] expected, got ",
                image_embeds.sizes(), ", ", levels.sizes(), ", ", noise.sizes());
  const at::Tensor lv = levels.to(at::kLong).cpu();
  // The steps of pipelines::noise_image_embeddings, one row at a time (the scheduler adds noise at one level).
  const at::Tensor scaled = normalizer->scale(image_embeds);
  std::vector<at::Tensor> noised;
  for (int64_t i = 0; i < image_embeds.size(0); ++i)
    noised.push_back(noising.add_noise_at_timestep(scaled.narrow(0, i, 1), noise.narrow(0, i, 1).to(scaled.dtype()),
                                                   lv[i].item<int64_t>()));
  const at::Tensor e = normalizer->unscale(at::cat(noised, 0));
  const at::Tensor level_embedding = nn::get_timestep_embedding(lv, e.size(1), /*flip_sin_to_cos=*/true, /*shift=*/0.0)
                                         .to(e.device(), e.scalar_type());
  return at::cat({e, level_embedding}, 1);  // [B, 2E]
}

nlohmann::json unclip_unet_config(const nlohmann::json& unet_config, int embedding_dim) {
  nlohmann::json c = unet_config;
  const auto type = c.value("class_embed_type", nlohmann::json());
  const auto dim = c.value("projection_class_embeddings_input_dim", nlohmann::json());
  if (type.is_string() && type.get<std::string>() == "projection") {
    DMX_CHECK_ARG(dim.is_number_integer() && dim.get<int64_t>() == 2 * embedding_dim,
                  "--model: the UNet's projection class embedding takes ", dim.dump(), " inputs, the image tower's ",
                  "embeddings need 2 x ", embedding_dim, " = ", 2 * embedding_dim);
    return c;
  }
  const auto n = c.value("num_class_embeds", nlohmann::json());
  DMX_CHECK_ARG(type.is_null() && (n.is_null() || (n.is_number_integer() && n.get<int64_t>() == 0)),
                "--model: the UNet already has a class embedding (class_embed_type ", type.dump(),
                ", num_class_embeds ", n.dump(), "); dmx train unclip adds a \"projection\" one to a UNet without");
  c["class_embed_type"] = "projection";
  c["projection_class_embeddings_input_dim"] = 2 * embedding_dim;
  return c;
}

models::UNet2DConditionModel add_image_embedding_class(const models::UNet2DConditionModel& base,
                                                       const nlohmann::json& decoder_unet_config) {
  const auto cfg = models::UNet2DConditionConfig::from_json(decoder_unet_config);
  DMX_CHECK_ARG(cfg.class_embed_type == "projection",
                "add_image_embedding_class: the config has no projection class "
                "embedding");
  models::UNet2DConditionModel unet(cfg);  // linear_1 drawn here, as diffusers' constructor draws it
  const auto p0 = base->parameters().front();
  unet->to(p0.device(), p0.scalar_type());
  at::NoGradGuard no_grad;
  const auto from_params = base->named_parameters(true);
  const auto from_buffers = base->named_buffers(true);
  size_t copied = 0;
  for (auto& p : unet->named_parameters(true)) {
    if (starts_with(p.key(), "class_embedding.")) continue;
    const at::Tensor* b = from_params.find(p.key());
    DMX_CHECK_FORMAT(b != nullptr && b->sizes().equals(p.value().sizes()), "--model: the UNet has no parameter '",
                     p.key(), "' of shape ", p.value().sizes(), " (the decoder's config differs from the model's)");
    p.value().copy_(*b);
    ++copied;
  }
  DMX_CHECK_FORMAT(copied == from_params.size(), "--model: the UNet has ", from_params.size(),
                   " parameters, the decoder took ", copied);
  for (auto& b : unet->named_buffers(true))
    if (const at::Tensor* f = from_buffers.find(b.key())) b.value().copy_(*f);
  // The last linear of the class embedding at zero: the embedding adds 0 to the time embedding at first.
  auto params = unet->named_parameters(true);
  for (const char* k : {"class_embedding.linear_2.weight", "class_embedding.linear_2.bias"}) {
    at::Tensor* t = params.find(k);
    DMX_CHECK_FORMAT(t != nullptr, "add_image_embedding_class: the UNet has no ", k);
    t->zero_();
  }
  return unet;
}

// ---------------------------------------------------------------------------------------------------

UnCLIPDecoderRecipe::UnCLIPDecoderRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, UnCLIPImageTower tower,
                                         std::vector<std::string> image_paths, double image_embedding_dropout)
    : Recipe(std::move(m)),
      tower_(std::move(tower)),
      paths_(std::move(image_paths)),
      dropout_(image_embedding_dropout) {
  auto& md = models();
  DMX_CHECK_ARG(!tower_.image_encoder.is_empty(), "dmx train unclip needs an image encoder (--clip)");
  DMX_CHECK_ARG(dropout_ >= 0 && dropout_ <= 1, "--image-embedding-dropout must be in [0, 1], got ", dropout_);
  DMX_CHECK_ARG(!paths_.empty(), "dmx train unclip: the data has no pictures");
  DMX_CHECK_SUPPORTED(is_directory(md.source_path) && path_exists(join_path(md.source_path, "unet/config.json")),
                      "dmx train unclip writes a diffusers folder and needs one as --model, got ", md.source_path);
  const int E = tower_.image_encoder->config().projection_dim;
  const nlohmann::json base_cfg = nlohmann::json::parse(
      read_text_file(join_path(md.source_path, "unet/config.json"), "unet config", kMaxJsonFileBytes));
  unet_config_ = unclip_unet_config(base_cfg, E);
  if (md.unet->config().class_embed_type != "projection") md.unet = add_image_embedding_class(md.unet, unet_config_);
  DMX_CHECK_ARG(md.unet->config().projection_class_embeddings_input_dim == 2 * E, "--model: the UNet's class ",
                "embedding takes ", md.unet->config().projection_class_embeddings_input_dim, " inputs, not 2 x ", E);
  noising_config_ = tower_.image_noising_scheduler_config.is_null() ? stable_unclip_noising_scheduler_config()
                                                                    : tower_.image_noising_scheduler_config;
  noising_ = schedulers::create_scheduler(noising_config_.at("_class_name").get<std::string>(), noising_config_);
  if (!tower_.image_normalizer.is_empty()) {
    normalizer_ = tower_.image_normalizer;
    DMX_CHECK_ARG(normalizer_->config().embedding_dim == E, "--model: image_normalizer embedding_dim ",
                  normalizer_->config().embedding_dim, " != the image encoder's projection_dim ", E);
  } else {
    models::StableUnCLIPImageNormalizerConfig nc;
    nc.embedding_dim = E;
    normalizer_ = models::StableUnCLIPImageNormalizer(nc);
    new_normalizer_ = true;
  }
  for (auto& p : normalizer_->parameters()) p.set_requires_grad(false);
  for (auto& p : tower_.image_encoder->parameters()) p.set_requires_grad(false);
}

void UnCLIPDecoderRecipe::setup(const TrainConfig& cfg) {
  auto& m = models();
  embeds_ = clip_image_embeddings(tower_.feature_extractor, tower_.image_encoder, paths_);  // [N, E]
  if (new_normalizer_) {  // the statistics of the training embeddings (population std), as the normalizer holds
    at::NoGradGuard no_grad;
    normalizer_->mean.copy_(embeds_.mean(0, /*keepdim=*/true));
    normalizer_->std.copy_(embeds_.std(0, /*unbiased=*/false, /*keepdim=*/true).clamp_min(1e-6));
  }
  freeze(*m.vae);
  freeze(*m.text_encoder);
  for (auto& p : m.unet->parameters()) p.set_requires_grad(true);
  if (cfg.mixed_precision == MixedPrecision::BF16) {  // as the fine-tune: frozen parts bf16, the UNet under autocast
    cast_frozen_for_mixed_precision(m, /*unet=*/false, /*text_encoder=*/true);
    autocast_bf16_ = true;
  }
  if (cfg.gradient_checkpointing) m.unet->set_gradient_checkpointing(true);
}

std::vector<NamedParameter> UnCLIPDecoderRecipe::trainable_parameters() {
  std::vector<NamedParameter> v;
  for (const auto& p : models().unet->named_parameters(true)) v.push_back({"unet." + p.key(), p.value()});
  return v;
}

void UnCLIPDecoderRecipe::train_mode(bool on) { models().unet->train(on); }

void UnCLIPDecoderRecipe::draw_conditioning(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) {
  const int64_t rows = static_cast<int64_t>(batch.indices.size());
  DMX_CHECK_ARG(rows > 0 && rows == batch.pixel_values.size(0),
                "dmx train unclip: the batch source gives no row indices (the image embeddings are per row)");
  const int64_t E = embeds_.size(1), T = noising_->config().num_train_timesteps;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor levels =
      at::randint(T, {global_rows}, gen, at::TensorOptions().dtype(at::kLong)).narrow(0, r0, rows);  // [B]
  const at::Tensor noise = at::randn({global_rows, E}, gen, f32).narrow(0, r0, rows);                // [B, E]
  const at::Tensor u = at::rand({global_rows}, gen, f32).narrow(0, r0, rows);                        // [B]
  std::vector<int64_t> idx(batch.indices.begin(), batch.indices.end());
  for (int64_t i : idx)
    DMX_CHECK_ARG(i >= 0 && i < embeds_.size(0), "dmx train unclip: row index ", i, " outside the ", embeds_.size(0),
                  " pictures");
  at::NoGradGuard no_grad;
  const at::Tensor e = embeds_.index_select(0, at::tensor(idx, at::kLong));  // [B, E]
  const at::Tensor labels = noise_image_embeddings_per_row(normalizer_, *noising_, e, levels, noise);
  const at::Tensor keep = (u >= dropout_).to(at::kFloat).unsqueeze(1);  // [B, 1]: 0 = the unconditional zeros
  labels_ = labels * keep;
}

at::Tensor UnCLIPDecoderRecipe::predict(const at::Tensor& noisy, const at::Tensor& t, const at::Tensor& ehs,
                                        const Batch&) {
  DMX_CHECK_ARG(labels_.defined() && labels_.size(0) == noisy.size(0),
                "dmx train unclip: no class labels drawn for this batch (draw_conditioning)");
  models::UNetInputs in;
  in.sample = noisy;
  in.timestep = t;
  in.encoder_hidden_states = ehs.to(at::kFloat);
  in.class_labels = labels_.to(noisy.device());
  if (!autocast_bf16_) return models().unet->forward(in);
  AutocastBF16 scope(noisy.device());
  return models().unet->forward(in);
}

io::TensorMap UnCLIPDecoderRecipe::extra_state() {
  return {{"image_normalizer.mean", normalizer_->mean.detach().clone()},
          {"image_normalizer.std", normalizer_->std.detach().clone()}};
}

void UnCLIPDecoderRecipe::load_extra_state(const io::TensorMap& s) {
  at::NoGradGuard no_grad;
  for (const char* k : {"image_normalizer.mean", "image_normalizer.std"}) {
    const auto it = s.find(k);
    DMX_CHECK_FORMAT(it != s.end(), "--resume: the checkpoint has no ", k, " (not a dmx train unclip checkpoint)");
    at::Tensor& dst = std::string(k) == "image_normalizer.mean" ? normalizer_->mean : normalizer_->std;
    DMX_CHECK_FORMAT(it->second.sizes().equals(dst.sizes()), "--resume: ", k, " has shape ", it->second.sizes(),
                     ", the normalizer ", dst.sizes());
    dst.copy_(it->second);
  }
}

void copy_folder(const std::string& from_dir, const std::string& to_dir) {
  const fs::path from(from_dir), to(to_dir);
  fs::create_directories(to);
  for (auto it = fs::recursive_directory_iterator(from, fs::directory_options::follow_directory_symlink);
       it != fs::recursive_directory_iterator(); ++it) {
    const fs::path rel = fs::relative(it->path(), from);
    if (it->is_directory()) {
      fs::create_directories(to / rel);
    } else if (it->is_regular_file()) {
      fs::copy_file(it->path(), to / rel, fs::copy_options::overwrite_existing);
    }
  }
}

void copy_text_to_image_parts(const std::string& model_dir, const std::string& to) {
  const fs::path src(model_dir);
  for (const char* part : {"tokenizer", "text_encoder", "vae", "scheduler", "unet"}) {
    DMX_CHECK_FORMAT(fs::is_directory(src / part), "--model ", src.string(), " has no ", part, "/");
    copy_folder((src / part).string(), join_path(to, part));
  }
  fs::copy_file(src / "model_index.json", fs::path(to) / "model_index.json");
}

void write_json_file(const std::string& path, const nlohmann::json& j) {
  const std::string text = j.dump(2) + "\n";
  write_bytes_atomic(path, text.data(), text.size());
}

namespace {
io::TensorMap float32_state(torch::nn::Module& m) {
  io::TensorMap t = io::module_state(m);
  for (auto& [k, v] : t)
    if (at::isFloatingType(v.scalar_type())) v = v.detach().to(at::kFloat).contiguous();
  return t;
}
}  // namespace

void UnCLIPDecoderRecipe::save(const std::string& dir) {
  const fs::path src(models().source_path);
  nlohmann::json src_index;
  try {
    src_index = nlohmann::json::parse(
        read_text_file((src / "model_index.json").string(), "model_index.json", kMaxJsonFileBytes));
  } catch (const nlohmann::json::exception&) {
    src_index = nlohmann::json::object();
  }
  write_directory_atomic(dir, "the unCLIP decoder folder", [&](const std::string& tmp) {
    // The decoder's text side, VAE and sampling scheduler as the source folder has them.
    for (const char* part : {"tokenizer", "text_encoder", "vae", "scheduler"}) {
      DMX_CHECK_FORMAT(fs::is_directory(src / part), "--model ", src.string(), " has no ", part, "/");
      copy_folder((src / part).string(), (fs::path(tmp) / part).string());
    }
    // The image tower, byte for byte from where the embeddings came from.
    for (const char* part : {"feature_extractor", "image_encoder"})
      copy_folder((fs::path(tower_.source_dir) / part).string(), (fs::path(tmp) / part).string());
    fs::create_directories(fs::path(tmp) / "unet");
    write_json_file(join_path(tmp, "unet/config.json"), unet_config_);
    io::save_safetensors(join_path(tmp, "unet/diffusion_pytorch_model.safetensors"), float32_state(*models().unet),
                         {{"format", "pt"}});
    fs::create_directories(fs::path(tmp) / "image_normalizer");
    write_json_file(join_path(tmp, "image_normalizer/config.json"),
                    {{"_class_name", "StableUnCLIPImageNormalizer"},
                     {"_diffusers_version", "0.27.2"},
                     {"embedding_dim", normalizer_->config().embedding_dim}});
    io::save_safetensors(join_path(tmp, "image_normalizer/diffusion_pytorch_model.safetensors"),
                         float32_state(*normalizer_), {{"format", "pt"}});
    fs::create_directories(fs::path(tmp) / "image_noising_scheduler");
    write_json_file(join_path(tmp, "image_noising_scheduler/scheduler_config.json"), noising_config_);
    const nlohmann::json scheduler_entry = src_index.contains("scheduler") && src_index["scheduler"].is_array()
                                               ? src_index["scheduler"]
                                               : nlohmann::json::array({"diffusers", "DDIMScheduler"});
    write_json_file(join_path(tmp, "model_index.json"),
                    {{"_class_name", "StableUnCLIPImg2ImgPipeline"},
                     {"_diffusers_version", "0.27.2"},
                     {"_dmx_writer", "dmx train unclip"},
                     {"feature_extractor", nlohmann::json::array({"transformers", "CLIPImageProcessor"})},
                     {"image_encoder", nlohmann::json::array({"transformers", "CLIPVisionModelWithProjection"})},
                     {"image_noising_scheduler",
                      nlohmann::json::array({"diffusers", noising_config_.value("_class_name", "DDPMScheduler")})},
                     {"image_normalizer", nlohmann::json::array({"stable_diffusion", "StableUnCLIPImageNormalizer"})},
                     {"scheduler", scheduler_entry},
                     {"text_encoder", nlohmann::json::array({"transformers", "CLIPTextModel"})},
                     {"tokenizer", nlohmann::json::array({"transformers", "CLIPTokenizer"})},
                     {"unet", nlohmann::json::array({"diffusers", "UNet2DConditionModel"})},
                     {"vae", nlohmann::json::array({"diffusers", "AutoencoderKL"})}});
  });
}
}  // namespace dmx::training
