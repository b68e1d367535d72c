// Make-A-Scene as diffusion: VQ-SEG and the scene recipe (see scene_train.h).
#include "training/scene_train.h"

#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <sstream>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "loaders/spatext.h"
#include "training/finetune.h"
#include "training/folder_copy.h"

namespace dmx::training {

namespace fs = std::filesystem;

namespace {
std::string normal(const std::string& p) { return fs::path(p).lexically_normal().string(); }

at::Tensor gray_tensor(const std::string& path, const std::string& what, int side) {
  const Image g = to_gray(load_image(path, what));
  DMX_CHECK_FORMAT(g.width == side && g.height == side, path, ": ", g.width, "x", g.height, ", the scene folder's ",
                   what, " must be ", side, "x", side);
  return at::from_blob(const_cast<uint8_t*>(g.data.data()), {side, side}, at::kByte).to(at::kLong);
}
}  // namespace

std::vector<SceneCanvas> read_scene_canvases(const std::string& dir) {
  DMX_CHECK_ARG(path_exists(join_path(dir, "scenes.json")), "--data: ", dir,
                " is not a scene folder (no scenes.json); make one with `dmx data scenes --out DIR`");
  const std::string meta = join_path(dir, "metadata.jsonl");
  std::istringstream in(read_text_file(meta, "--data metadata.jsonl", kMaxMetadataFileBytes));
  std::vector<SceneCanvas> out;
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    SceneCanvas c;
    try {
      const nlohmann::json r = nlohmann::json::parse(line);
      const std::string file = r.at("file_name").get<std::string>(), cat = r.at("category_map").get<std::string>(),
                        edges = r.at("edges").get<std::string>();
      for (const auto* p : {&file, &cat, &edges})
        DMX_CHECK_FORMAT(p->find("..") == std::string::npos && !p->empty() && (*p)[0] != '/', meta, ":", line_no,
                         ": a path leaves the folder");
      c.image = normal(join_path(dir, file));
      c.categories = join_path(dir, cat);
      c.edges = join_path(dir, edges);
      c.caption = r.at("text").get<std::string>();
    } catch (const nlohmann::json::exception& e) {
      throw FormatError(meta + ":" + std::to_string(line_no) + ": " + e.what());
    }
    out.push_back(std::move(c));
  }
  DMX_CHECK_ARG(!out.empty(), "--data: ", meta, " has no canvases");
  return out;
}

std::vector<SceneCanvas> scene_canvases_of(const std::string& dir, const std::vector<DatasetRow>& rows) {
  std::map<std::string, SceneCanvas> by_image;
  for (auto& c : read_scene_canvases(dir)) by_image[c.image] = c;
  std::vector<SceneCanvas> out;
  out.reserve(rows.size());
  for (const auto& row : rows) {
    const auto it = by_image.find(normal(row.image));
    DMX_CHECK_FORMAT(it != by_image.end(), "--data: ", row.image, " (", row.origin, ") is not a canvas of ",
                     join_path(dir, "metadata.jsonl"));
    out.push_back(it->second);
  }
  return out;
}

at::Tensor load_scene_map(const SceneCanvas& c, int categories, int side) {
  const at::Tensor labels = gray_tensor(c.categories, "category map", side);
  const int64_t hi = labels.max().item<int64_t>();
  DMX_CHECK_FORMAT(hi < categories, c.categories, ": category id ", hi, " is outside [0, ", categories, ")");
  return loaders::scene_map_tensor(labels, gray_tensor(c.edges, "edge map", side), categories);
}

models::VQModelConfig vqseg_config(int categories, int resolution, int factor, int codebook_size) {
  DMX_CHECK_ARG(factor == 2 || factor == 4 || factor == 8 || factor == 16, "--vq-factor must be 2, 4, 8 or 16, got ",
                factor);
  DMX_CHECK_ARG(resolution % factor == 0, "--resolution ", resolution, " must be a multiple of --vq-factor ", factor);
  DMX_CHECK_ARG(codebook_size >= 2 && codebook_size <= 16384, "--codebook-size must be in [2, 16384], got ",
                codebook_size);
  models::VQModelConfig c;
  models::AutoencoderKLConfig& a = c.coder;
  const int levels = static_cast<int>(std::lround(std::log2(factor))) + 1;
  a.in_channels = a.out_channels = categories + 1;
  a.down_block_types.assign(static_cast<size_t>(levels), "DownEncoderBlock2D");
  a.up_block_types.assign(static_cast<size_t>(levels), "UpDecoderBlock2D");
  a.block_out_channels.assign(static_cast<size_t>(levels), 64);
  for (int i = 0; i < std::min(levels, 2); ++i) a.block_out_channels[static_cast<size_t>(i)] = 16 << i;  // 16, 32
  a.layers_per_block = 1;
  a.latent_channels = 32;
  a.norm_num_groups = 8;
  a.sample_size = resolution;
  a.scaling_factor = 1.0;
  c.num_vq_embeddings = codebook_size;
  c.vq_embed_dim = 16;
  c.validate();
  return c;
}

CodebookUsage measure_codebook(models::VQModel& model, const std::vector<at::Tensor>& maps, int categories) {
  at::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  CodebookUsage u;
  u.size = model->config().num_vq_embeddings;
  at::Tensor counts = at::zeros({u.size}, at::kLong);
  double right = 0, pixels = 0, obj_right = 0, obj_pixels = 0, tp = 0, fp = 0, fn = 0;
  for (size_t i = 0; i < maps.size(); i += 64) {
    std::vector<at::Tensor> part(maps.begin() + static_cast<int64_t>(i),
                                 maps.begin() + static_cast<int64_t>(std::min(maps.size(), i + 64)));
    const at::Tensor x = at::stack(part, 0);
    const models::VQQuantized q = model->quantize(model->encode(x));
    counts += at::bincount(q.indices.flatten(), {}, u.size);
    const at::Tensor logits = model->decode(q.quantized, /*force_not_quantize=*/true);
    const at::Tensor truth = x.narrow(1, 0, categories).argmax(1), pred = logits.narrow(1, 0, categories).argmax(1);
    const at::Tensor ok = pred.eq(truth), obj = truth.ne(0);
    right += ok.sum().item<double>();
    pixels += static_cast<double>(truth.numel());
    obj_right += ok.logical_and(obj).sum().item<double>();
    obj_pixels += obj.sum().item<double>();
    const at::Tensor e_true = x.select(1, categories).gt(0.5), e_pred = logits.select(1, categories).gt(0);
    tp += e_true.logical_and(e_pred).sum().item<double>();
    fp += e_pred.logical_and(e_true.logical_not()).sum().item<double>();
    fn += e_true.logical_and(e_pred.logical_not()).sum().item<double>();
  }
  model->train(was_training);
  u.used = counts.gt(0).sum().item<int64_t>();
  const at::Tensor p = counts.to(at::kDouble) / std::max<double>(1.0, counts.sum().item<double>());
  u.perplexity = std::exp(-(p * at::log(p.clamp_min(1e-300))).sum().item<double>());
  u.pixel_accuracy = pixels > 0 ? right / pixels : 0;
  u.object_accuracy = obj_pixels > 0 ? obj_right / obj_pixels : 0;
  u.edge_f1 = tp > 0 ? 2 * tp / (2 * tp + fp + fn) : 0;
  return u;
}

// ---------------------------------------------------------------------------------------------------
// VQ-SEG

namespace {
std::shared_ptr<loaders::StableDiffusionModels> empty_bundle(const std::string& name) {
  auto b = std::make_shared<loaders::StableDiffusionModels>();
  b->name = name;
  b->scheduler_config = {{"_class_name", "DDPMScheduler"}, {"num_train_timesteps", 1000}};
  return b;
}
}  // namespace

VQSegRecipe::VQSegRecipe(models::VQModel model, std::vector<at::Tensor> maps, int categories, int resolution,
                         bool new_codebook)
    : Recipe(empty_bundle("vqseg")),
      model_(std::move(model)),
      maps_(std::move(maps)),
      categories_(categories),
      resolution_(resolution),
      new_codebook_(new_codebook) {
  DMX_CHECK_ARG(!maps_.empty(), "dmx train vqseg: the data has no canvases");
  DMX_CHECK_ARG(model_->config().coder.in_channels == categories + 1, "dmx train vqseg: the model takes ",
                model_->config().coder.in_channels, " channels, the maps have ", categories + 1);
  counts_ = at::zeros({model_->config().num_vq_embeddings}, at::kLong);
}

void VQSegRecipe::setup(const TrainConfig& cfg) {
  DMX_CHECK_SUPPORTED(cfg.mixed_precision == MixedPrecision::No,
                      "dmx train vqseg trains in float32 only (--mixed-precision no), got bf16");
  DMX_CHECK_SUPPORTED(!cfg.cache_latents && cfg.snr_gamma == 0 && cfg.noise_offset == 0 &&
                          cfg.proportion_empty_prompts == 0 && cfg.prediction_type.empty(),
                      "dmx train vqseg trains an autoencoder: --cache-latents, --snr-gamma, --noise-offset, "
                      "--proportion-empty-prompts and --prediction-type do not apply");
  for (auto& p : model_->parameters()) p.set_requires_grad(true);
}

std::vector<NamedParameter> VQSegRecipe::trainable_parameters() {
  std::vector<NamedParameter> v;
  for (const auto& p : model_->named_parameters(true)) v.push_back({"vqseg." + p.key(), p.value()});
  return v;
}

void VQSegRecipe::train_mode(bool on) { model_->train(on); }

at::Tensor VQSegRecipe::custom_loss(const Batch& batch, at::Generator& gen, int64_t, int64_t) {
  const int64_t rows = static_cast<int64_t>(batch.indices.size());
  DMX_CHECK_ARG(rows > 0, "dmx train vqseg: the batch source gives no row indices");
  std::vector<at::Tensor> xs;
  for (int64_t i : batch.indices) {
    DMX_CHECK_ARG(i >= 0 && i < static_cast<int64_t>(maps_.size()), "dmx train vqseg: row index ", i, " outside the ",
                  maps_.size(), " canvases");
    xs.push_back(maps_[static_cast<size_t>(i)]);
  }
  const at::Tensor x = at::stack(xs, 0);
  const at::Tensor h = model_->encode(x);  // [B, E, g, g]
  const int64_t K = model_->config().num_vq_embeddings;
  {
    // The codebook from encoder outputs: all of it at the first call, the unused codes every kVQSegRestartEvery.
    at::NoGradGuard no_grad;
    const at::Tensor flat = h.detach().permute({0, 2, 3, 1}).reshape({-1, h.size(1)});
    at::Tensor w = model_->codebook_weight();
    at::Tensor targets;
    if (calls_ == 0 && new_codebook_)
      targets = at::arange(K, at::kLong);
    else if (calls_ > 0 && calls_ % kVQSegRestartEvery == 0)
      targets = counts_.eq(0).nonzero().squeeze(1);
    if (targets.defined()) {
      if (targets.numel() > 0) {
        const at::Tensor pick = at::randint(0, flat.size(0), {targets.numel()}, gen, at::kLong);
        w.index_copy_(0, targets, flat.index_select(0, pick) + 1e-3 * at::randn({targets.numel(), flat.size(1)}, gen));
        if (calls_ > 0) log_info(detail::concat("vqseg: restarted ", targets.numel(), " unused codes of ", K));
      }
      counts_.zero_();
    }
  }
  const models::VQQuantized q = model_->quantize(h);
  const at::Tensor logits = model_->decode(q.quantized, /*force_not_quantize=*/true);
  const at::Tensor labels = x.narrow(1, 0, categories_).argmax(1);
  // Object pixels weigh kVQSegObjectWeight, edge pixels kVQSegEdgeWeight: the background is most of a canvas.
  const at::Tensor wpix = 1.0 + (kVQSegObjectWeight - 1.0) * labels.ne(0).to(at::kFloat);
  const at::Tensor ce =
      (at::cross_entropy_loss(logits.narrow(1, 0, categories_), labels, {}, at::Reduction::None) * wpix)
          .mean(std::vector<int64_t>{1, 2});
  const at::Tensor bce =
      at::binary_cross_entropy_with_logits(logits.select(1, categories_), x.select(1, categories_), {},
                                           at::scalar_tensor(kVQSegEdgeWeight), at::Reduction::None)
          .mean(std::vector<int64_t>{1, 2});
  {
    at::NoGradGuard no_grad;
    counts_ += at::bincount(q.indices.flatten(), {}, K);
  }
  ++calls_;
  return ce + bce + q.codebook + kVQSegBeta * q.commitment;
}

at::Tensor VQSegRecipe::predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Batch&) {
  throw Unsupported("dmx train vqseg computes its own loss (custom_loss)");
}

io::TensorMap VQSegRecipe::extra_state() {
  return {{"vqseg.counts", counts_.clone()}, {"vqseg.calls", at::tensor(std::vector<int64_t>{calls_})}};
}

void VQSegRecipe::load_extra_state(const io::TensorMap& s) {
  const auto c = s.find("vqseg.counts"), n = s.find("vqseg.calls");
  DMX_CHECK_FORMAT(c != s.end() && n != s.end() && c->second.numel() == counts_.numel() && n->second.numel() == 1,
                   "--resume: the checkpoint has no VQ-SEG state (vqseg.counts, vqseg.calls)");
  counts_ = c->second.to(at::kLong).clone();
  calls_ = n->second.to(at::kLong).item<int64_t>();
}

void VQSegRecipe::save(const std::string& dir) {
  usage_ = measure_codebook(model_, maps_, categories_);
  log_info(detail::concat("vqseg: ", usage_.used, " of ", usage_.size, " codes used, perplexity ", usage_.perplexity,
                          "; pixel accuracy ", usage_.pixel_accuracy, ", on objects ", usage_.object_accuracy,
                          ", edge F1 ", usage_.edge_f1));
  io::TensorMap weights = io::module_state(*model_);
  for (auto& [k, v] : weights) v = v.detach().to(at::kFloat).contiguous();
  write_directory_atomic(dir, "the VQ-SEG folder", [&](const std::string& tmp) {
    write_json_file(join_path(tmp, "config.json"), model_->config().to_json());
    io::save_safetensors(join_path(tmp, "diffusion_pytorch_model.safetensors"), weights, {{"format", "pt"}});
    write_json_file(join_path(tmp, loaders::kVQSegConfigFile), {{"format", "dmx-vqseg-1"},
                                                                {"_dmx_writer", "dmx train vqseg"},
                                                                {"categories", categories_},
                                                                {"resolution", resolution_},
                                                                {"codebook_usage",
                                                                 {{"used", usage_.used},
                                                                  {"size", usage_.size},
                                                                  {"perplexity", usage_.perplexity},
                                                                  {"pixel_accuracy", usage_.pixel_accuracy},
                                                                  {"object_accuracy", usage_.object_accuracy},
                                                                  {"edge_f1", usage_.edge_f1},
                                                                  {"canvases", maps_.size()}}}});
  });
}

// ---------------------------------------------------------------------------------------------------
// The scene recipe

SceneRecipe::SceneRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, SceneTrainOptions o, loaders::VQSeg vqseg,
                         std::vector<SceneCanvas> canvases)
    : Recipe(std::move(m)), o_(std::move(o)), vqseg_(std::move(vqseg)), canvases_(std::move(canvases)) {
  auto& md = models();
  DMX_CHECK_ARG(!vqseg_.model.is_empty(), "dmx train scene needs a VQ-SEG (--vqseg)");
  DMX_CHECK_ARG(o_.scene_dropout >= 0 && o_.scene_dropout <= 1, "--layout-dropout must be in [0, 1], got ",
                o_.scene_dropout);
  DMX_CHECK_ARG(!canvases_.empty(), "dmx train scene: the data has no canvases");
  DMX_CHECK_SUPPORTED(is_directory(md.source_path) && path_exists(join_path(md.source_path, "unet/config.json")),
                      "dmx train scene writes a scene folder beside the base model's parts and needs a diffusers "
                      "folder as --model, got ",
                      md.source_path);
  o_.lora.validate();
  base_in_ = md.unet->config().in_channels;
  md.unet = loaders::widen_unet_input(md.unet, loaders::kSceneCoordChannels);
  K_ = vqseg_.model->config().num_vq_embeddings;
  resolution_ = vqseg_.resolution;
  grid_ = resolution_ / vqseg_.model->config().downscale_factor();
  const int64_t D = md.unet->config().cross_attention_dim;
  // The tables start at zero: a zero token's value is zero (to_v has no bias), so the decoupled scene attention
  // (loaders::SceneCellAttention) adds nothing and the first forward is the base model's. They are trained as
  // kSceneTableGain x a raw tensor: AdamW moves each raw entry by about the learning rate a step, so the tables move
  // kSceneTableGain times faster than the LoRA. At the LoRA's rate they stayed below 0.1 in norm after 400 steps,
  // beside text states of norm 11, and the scene barely changed the loss (docs/scene.md).
  code_embedding_ = at::zeros({K_ + 1, D}).set_requires_grad(true);
  row_embedding_ = at::zeros({grid_, D}).set_requires_grad(true);
  col_embedding_ = at::zeros({grid_, D}).set_requires_grad(true);
  for (auto& p : vqseg_.model->parameters()) p.set_requires_grad(false);
}

void SceneRecipe::setup(const TrainConfig& cfg) {
  auto& m = models();
  {
    at::NoGradGuard no_grad;
    vqseg_.model->eval();
    ProgressBar bar("scene tokens", static_cast<int>(canvases_.size()), log_level() != LogLevel::kQuiet);
    for (size_t i = 0; i < canvases_.size(); i += 64) {
      std::vector<at::Tensor> maps;
      for (size_t j = i; j < std::min(canvases_.size(), i + 64); ++j) {
        maps.push_back(load_scene_map(canvases_[j], vqseg_.categories, resolution_));
        bar.tick();
      }
      const at::Tensor codes = loaders::scene_codes(vqseg_, at::stack(maps, 0));
      for (int64_t b = 0; b < codes.size(0); ++b) codes_.push_back(codes[b].clone());
    }
  }
  net_ = frozen_base_with_lora(m, cfg, o_.lora, autocast_bf16_);
  loaders::install_scene_cell_attention(m.unet, grid_);
  for (auto& p : m.unet->named_parameters(true))
    if (starts_with(p.key(), "conv_in.")) p.value().set_requires_grad(true);
}

std::vector<NamedParameter> SceneRecipe::trainable_parameters() {
  std::vector<NamedParameter> v = net_->parameters();
  for (const auto& p : models().unet->named_parameters(true))
    if (starts_with(p.key(), "conv_in.")) v.push_back({"unet." + p.key(), p.value()});
  v.push_back({"scene.code_embedding.raw", code_embedding_});
  v.push_back({"scene.row_embedding.raw", row_embedding_});
  v.push_back({"scene.col_embedding.raw", col_embedding_});
  return v;
}

void SceneRecipe::train_mode(bool on) { models().unet->train(on); }

void SceneRecipe::draw_conditioning(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) {
  const int64_t rows = static_cast<int64_t>(batch.indices.size());
  DMX_CHECK_ARG(rows > 0 && rows == batch.pixel_values.size(0),
                "dmx train scene: the batch source gives no row indices (the tokens are per canvas)");
  const at::Tensor u = at::rand({global_rows}, gen, at::TensorOptions().dtype(at::kFloat)).narrow(0, r0, rows);
  std::vector<at::Tensor> codes;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = batch.indices[static_cast<size_t>(r)];
    DMX_CHECK_ARG(i >= 0 && i < static_cast<int64_t>(codes_.size()), "dmx train scene: row index ", i, " outside the ",
                  codes_.size(), " canvases");
    codes.push_back(u[r].item<float>() < o_.scene_dropout ? at::full({grid_, grid_}, K_, at::kLong)
                                                          : codes_[static_cast<size_t>(i)]);
  }
  drawn_ = at::stack(codes, 0);
}

at::Tensor SceneRecipe::predict(const at::Tensor& noisy, const at::Tensor& t, const at::Tensor& ehs, const Batch&) {
  DMX_CHECK_ARG(drawn_.defined() && drawn_.size(0) == noisy.size(0), "dmx train scene: no scene tokens drawn");
  DMX_CHECK_ARG(noisy.size(2) * models().vae_scale_factor() == resolution_, "dmx train scene: the latents ",
                noisy.sizes(), " are not of the VQ-SEG's ", resolution_, "-px maps (train at --resolution ",
                resolution_, ")");
  net_->refresh(at::kFloat, at::kFloat);
  const at::Tensor tokens = loaders::scene_token_embeddings(
      drawn_, code_embedding_ * kSceneTableGain, row_embedding_ * kSceneTableGain, col_embedding_ * kSceneTableGain);
  models::UNetInputs in;
  const at::Tensor coords = loaders::scene_coordinates(noisy.size(2), noisy.size(3))
                                .to(noisy.device(), noisy.scalar_type())
                                .unsqueeze(0)
                                .expand({noisy.size(0), loaders::kSceneCoordChannels, noisy.size(2), noisy.size(3)});
  in.sample = at::cat({noisy, coords}, 1);
  in.timestep = t;
  in.encoder_hidden_states = at::cat({ehs.to(at::kFloat), tokens.to(noisy.device())}, 1);
  return unet_forward_autocast(models().unet, in, autocast_bf16_);
}

void SceneRecipe::save(const std::string& dir) {
  io::TensorMap weights = net_->state_dict(LoRASaveFormat::Diffusers);
  for (const auto& p : models().unet->named_parameters(true))
    if (starts_with(p.key(), "conv_in.")) weights["unet." + p.key()] = p.value().detach().to(at::kFloat).clone();
  weights["scene.code_embedding.weight"] = code_embedding_.detach() * kSceneTableGain;
  weights["scene.row_embedding.weight"] = row_embedding_.detach() * kSceneTableGain;
  weights["scene.col_embedding.weight"] = col_embedding_.detach() * kSceneTableGain;
  for (auto& [k, v] : weights) v = v.to(at::kFloat).contiguous();
  write_directory_atomic(dir, "the scene folder", [&](const std::string& tmp) {
    copy_text_to_image_parts(models().source_path, tmp);
    copy_folder(o_.vqseg_dir, join_path(tmp, "vqseg"));
    io::save_safetensors(join_path(tmp, loaders::kSceneWeightsFile), weights, {{"format", "pt"}});
    write_json_file(join_path(tmp, loaders::kSceneConfigFile), {{"format", "dmx-scene-1"},
                                                                {"_dmx_writer", "dmx train scene"},
                                                                {"grid", grid_},
                                                                {"codes", K_},
                                                                {"categories", vqseg_.categories},
                                                                {"resolution", resolution_},
                                                                {"base_in_channels", base_in_},
                                                                {"coord_channels", loaders::kSceneCoordChannels},
                                                                {"lora_rank", net_->rank()},
                                                                {"lora_alpha", net_->alpha()},
                                                                {"lora_targets", o_.lora.targets},
                                                                {"attention", "cell"},
                                                                {"layout_dropout", o_.scene_dropout}});
  });
}
}  // namespace dmx::training
