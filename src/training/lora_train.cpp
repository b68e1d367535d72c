// Trainable LoRA adapters and the LoRA recipe (see lora_train.h): peft 0.10 tuners/lora/layer.py
// (reset_lora_parameters), diffusers 0.27.2 train_text_to_image_lora.py / utils/state_dict_utils.py
// (convert_state_dict_to_diffusers) and kohya sd-scripts networks/lora.py (names, alpha).
#include "training/lora_train.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "models/unet_2d_condition.h"
#include "training/finetune.h"

namespace dmx::training {

void LoRATrainOptions::validate() const {
  DMX_CHECK_ARG(rank > 0 && rank <= kMaxLoRARank, "--rank must be in [1, ", kMaxLoRARank, "], got ", rank);
  DMX_CHECK_ARG(std::isfinite(alpha) && alpha >= 0 && alpha <= 1e6, "--alpha must be in [0, 1e6] (0 = rank), got ",
                alpha);
  DMX_CHECK_ARG(targets == "attention" || targets == "all", "--lora-targets must be attention or all, got '", targets,
                "'");
  DMX_CHECK_ARG(text_encoder_targets == "attention" || text_encoder_targets == "all",
                "--text-encoder-targets must be attention or all, got '", text_encoder_targets, "'");
  DMX_CHECK_ARG(init == "kaiming" || init == "gaussian", "--lora-init must be kaiming or gaussian, got '", init, "'");
}

LoRASaveFormat parse_lora_save_format(const std::string& s) {
  if (s == "diffusers") return LoRASaveFormat::Diffusers;
  if (s == "peft") return LoRASaveFormat::PEFT;
  if (s == "kohya") return LoRASaveFormat::Kohya;
  throw InvalidArgument("--save-format must be one of diffusers, peft, kohya, got '" + s + "'");
}

void freeze(torch::nn::Module& m) {
  for (auto& p : m.parameters()) p.set_requires_grad(false);
}

void cast_frozen_for_mixed_precision(loaders::StableDiffusionModels& m, bool unet, bool text_encoder) {
  if (!m.vae.is_empty()) m.vae->to(at::kBFloat16);
  if (text_encoder && !m.text_encoder.is_empty()) m.text_encoder->to(at::kBFloat16);
  if (unet && !m.unet.is_empty()) m.unet->to(at::kBFloat16);
}

at::ScalarType freeze_base_models(loaders::StableDiffusionModels& m, const TrainConfig& cfg) {
  freeze(*m.unet);
  if (!m.vae.is_empty()) freeze(*m.vae);
  if (!m.text_encoder.is_empty()) freeze(*m.text_encoder);
  if (cfg.mixed_precision != MixedPrecision::BF16) return at::kFloat;
  cast_frozen_for_mixed_precision(m, /*unet=*/true, /*text_encoder=*/true);
  return at::kBFloat16;
}

std::unique_ptr<LoRANetwork> frozen_base_with_lora(loaders::StableDiffusionModels& m, const TrainConfig& cfg,
                                                   const LoRATrainOptions& o, bool& autocast_bf16) {
  freeze(*m.vae);
  freeze(*m.text_encoder);
  freeze(*m.unet);
  autocast_bf16 = cfg.mixed_precision == MixedPrecision::BF16;
  if (autocast_bf16) cast_frozen_for_mixed_precision(m, /*unet=*/false, /*text_encoder=*/true);
  if (cfg.gradient_checkpointing) m.unet->set_gradient_checkpointing(true);
  return std::make_unique<LoRANetwork>(m, o, cfg.seed);
}

at::Tensor unet_forward_autocast(models::UNet2DConditionModel& unet, const models::UNetInputs& in, bool autocast_bf16) {
  if (!autocast_bf16) return unet->forward(in);
  AutocastBF16 scope(in.sample.device());
  return unet->forward(in).to(at::kFloat);
}

namespace {

bool unet_selected(const std::string& path, const std::string& targets) {
  if (targets == "attention")
    return ends_with(path, ".to_q") || ends_with(path, ".to_k") || ends_with(path, ".to_v") ||
           ends_with(path, ".to_out.0");
  // kohya LoCon: every Linear / Conv2d inside the down / mid / up blocks (transformers, resnets, samplers).
  return path.rfind("down_blocks.", 0) == 0 || path.rfind("mid_block.", 0) == 0 || path.rfind("up_blocks.", 0) == 0;
}

bool text_encoder_selected(const std::string& path, const std::string& targets) {
  const bool attn = ends_with(path, ".q_proj") || ends_with(path, ".k_proj") || ends_with(path, ".v_proj") ||
                    ends_with(path, ".out_proj");
  if (targets == "attention") return attn;
  return attn || ends_with(path, ".mlp.fc1") || ends_with(path, ".mlp.fc2");
}

nn::LoRAState* state_of(const std::shared_ptr<torch::nn::Module>& mod) {
  if (auto l = std::dynamic_pointer_cast<nn::LoRALinearImpl>(mod)) return &l->lora;
  if (auto c = std::dynamic_pointer_cast<nn::LoRAConv2dImpl>(mod)) return &c->lora;
  return nullptr;
}

at::Tensor& weight_of(const std::shared_ptr<torch::nn::Module>& mod) {
  if (auto l = std::dynamic_pointer_cast<nn::LoRALinearImpl>(mod)) return l->weight;
  return std::dynamic_pointer_cast<nn::LoRAConv2dImpl>(mod)->weight;
}

const char* component_prefix(loaders::LoRAComponent c) {
  return c == loaders::LoRAComponent::UNet ? "unet" : "text_encoder";
}

}  // namespace

LoRANetwork::LoRANetwork(loaders::StableDiffusionModels& m, const LoRATrainOptions& o, uint64_t seed)
    : m_(&m), rank_(o.rank), alpha_(o.alpha > 0 ? o.alpha : o.rank), o_(o) {
  o.validate();
  DMX_CHECK_ARG(!m.unet.is_empty(), "LoRA training needs a UNet");
  DMX_CHECK_ARG(!o.train_text_encoder || !m.text_encoder.is_empty(), "--train-text-encoder needs a text encoder");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto add = [&](torch::nn::Module& root, loaders::LoRAComponent comp, const std::string& targets) {
    for (const auto& item : root.named_modules("", /*include_self=*/false)) {
      nn::LoRAState* s = state_of(item.value());
      if (!s) continue;
      const bool sel = comp == loaders::LoRAComponent::UNet ? unet_selected(item.key(), targets)
                                                            : text_encoder_selected(item.key(), targets);
      if (!sel) continue;
      DMX_CHECK_ARG(s->adapters.empty(), "LoRA training: layer '", item.key(),
                    "' already carries an adapter (train on a model without --lora)");
      TrainableLoRALayer L;
      L.component = comp;
      L.module = item.key();
      const at::Tensor& w = weight_of(item.value());
      L.conv = w.dim() == 4;
      L.out = w.size(0);
      L.in = w.size(1);
      if (L.conv) {
        L.kh = w.size(2);
        L.kw = w.size(3);
      }
      const int64_t fan_in = L.in * L.kh * L.kw;
      // [r, in] or [r, in, kh, kw]
      std::vector<int64_t> dshape =
          L.conv ? std::vector<int64_t>{rank_, L.in, L.kh, L.kw} : std::vector<int64_t>{rank_, L.in};
      std::vector<int64_t> ushape =
          L.conv ? std::vector<int64_t>{L.out, rank_, 1, 1} : std::vector<int64_t>{L.out, rank_};
      at::Tensor down = at::empty(dshape, f32);
      if (o.init == "kaiming") {
        const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));  // kaiming_uniform_(a=sqrt(5))
        down.uniform_(-bound, bound, gen);
      } else {
        down.normal_(0.0, 1.0 / rank_, gen);
      }
      L.down = down.set_requires_grad(true);
      L.up = at::zeros(ushape, f32).set_requires_grad(true);
      L.adapter = std::make_shared<nn::LoRAAdapter>();
      L.adapter->source = "training";
      L.adapter->alpha_scale = alpha_ / rank_;
      L.adapter->down = L.down;
      L.adapter->up = L.up;
      nn::lora_attach(*s, weight_of(item.value()), L.adapter);
      layers_.push_back(std::move(L));
    }
  };
  add(*m.unet, loaders::LoRAComponent::UNet, o.targets);
  attached_ = true;
  if (o.train_text_encoder) add(*m.text_encoder, loaders::LoRAComponent::TextEncoder, o.text_encoder_targets);
  DMX_CHECK_ARG(!layers_.empty(), "LoRA training: no layer of the model matches --lora-targets ", o.targets);
}

LoRANetwork::~LoRANetwork() {
  try {
    detach();
  } catch (...) {
  }
}

void LoRANetwork::detach() {
  if (!attached_) return;
  for (auto* root : {static_cast<torch::nn::Module*>(m_->unet.is_empty() ? nullptr : m_->unet.get()),
                     static_cast<torch::nn::Module*>(m_->text_encoder.is_empty() ? nullptr : m_->text_encoder.get())}) {
    if (!root) continue;
    for (const auto& item : root->named_modules("", false)) {
      nn::LoRAState* s = state_of(item.value());
      if (!s || s->adapters.empty()) continue;
      auto& ad = s->adapters;
      ad.erase(std::remove_if(ad.begin(), ad.end(),
                              [&](const std::shared_ptr<const nn::LoRAAdapter>& a) {
                                for (const auto& L : layers_)
                                  if (L.adapter.get() == a.get()) return true;
                                return false;
                              }),
               ad.end());
      s->runtime_weights.clear();
    }
  }
  attached_ = false;
}

std::vector<NamedParameter> LoRANetwork::parameters() const {
  std::vector<NamedParameter> v;
  for (const auto& L : layers_) {
    const std::string base = std::string(component_prefix(L.component)) + "." + L.module;
    v.push_back({base + ".lora_down", L.down});
    v.push_back({base + ".lora_up", L.up});
  }
  return v;
}

int64_t LoRANetwork::num_parameters() const {
  int64_t n = 0;
  for (const auto& L : layers_) n += L.down.numel() + L.up.numel();
  return n;
}

int64_t lora_parameter_formula(const std::vector<TrainableLoRALayer>& layers, int rank) {
  int64_t n = 0;
  for (const auto& L : layers) n += L.conv ? rank * (L.in * L.kh * L.kw + L.out) : rank * (L.in + L.out);
  return n;
}

void LoRANetwork::refresh(at::ScalarType unet_dtype, at::ScalarType te_dtype) {
  for (auto& L : layers_) {
    const at::ScalarType dt = L.component == loaders::LoRAComponent::UNet ? unet_dtype : te_dtype;
    if (dt == at::kFloat) {
      L.adapter->down = L.down;
      L.adapter->up = L.up;
    } else {  // differentiable low-precision copies; gradients reach the float32 masters
      L.adapter->down = L.down.to(dt);
      L.adapter->up = L.up.to(dt);
    }
  }
}

io::TensorMap LoRANetwork::state_dict(LoRASaveFormat f) const {
  io::TensorMap t;
  const double scale = alpha_ / rank_;
  for (const auto& L : layers_) {
    const at::Tensor down = L.down.detach().clone();
    const at::Tensor up = L.up.detach().clone();
    const bool unet = L.component == loaders::LoRAComponent::UNet;
    switch (f) {
      case LoRASaveFormat::Diffusers: {
        const std::string base =
            unet ? "unet." + L.module + ".lora." : "text_encoder." + L.module + ".lora_linear_layer.";
        t[base + "down.weight"] = down;
        t[base + "up.weight"] = scale == 1.0 ? up : up * scale;
        break;
      }
      case LoRASaveFormat::PEFT: {
        const std::string base = std::string(component_prefix(L.component)) + "." + L.module + ".";
        t[base + "lora_A.weight"] = down;
        t[base + "lora_B.weight"] = scale == 1.0 ? up : up * scale;
        break;
      }
      case LoRASaveFormat::Kohya: {
        const std::string base = std::string(unet ? "lora_unet_" : "lora_te_") + loaders::kohya_flatten(L.module);
        t[base + ".lora_down.weight"] = down;
        t[base + ".lora_up.weight"] = up;
        t[base + ".alpha"] = at::scalar_tensor(alpha_, at::kFloat);
        break;
      }
    }
  }
  return t;
}

void LoRANetwork::save(const std::string& path, LoRASaveFormat f) const {
  std::map<std::string, std::string> meta;
  if (f == LoRASaveFormat::Kohya) {
    meta["ss_network_module"] = "networks.lora";
    meta["ss_network_dim"] = std::to_string(rank_);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g", alpha_);
    meta["ss_network_alpha"] = buf;
    meta["ss_training_comment"] = "dmx train";
  } else {
    meta["format"] = "pt";
  }
  // The weights and (PEFT) adapter_config.json beside them are written together or not at all.
  std::vector<PendingFile> files = {{path, io::serialize_safetensors(state_dict(f), meta)}};
  if (f == LoRASaveFormat::PEFT) {
    nlohmann::json cfg;
    std::set<std::string> targets;
    for (const auto& L : layers_) {
      const size_t dot = L.module.rfind('.');
      std::string leaf = dot == std::string::npos ? L.module : L.module.substr(dot + 1);
      if (ends_with(L.module, ".to_out.0")) leaf = "to_out.0";
      targets.insert(leaf);
    }
    cfg["peft_type"] = "LORA";
    cfg["r"] = rank_;
    cfg["lora_alpha"] = rank_;  // alpha / r is folded into lora_B
    cfg["target_modules"] = std::vector<std::string>(targets.begin(), targets.end());
    cfg["init_lora_weights"] = o_.init == "gaussian" ? nlohmann::json("gaussian") : nlohmann::json(true);
    cfg["lora_dropout"] = 0.0;
    cfg["bias"] = "none";
    const size_t slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
    const std::string text = cfg.dump(2) + "\n";
    files.push_back({join_path(dir, "adapter_config.json"), std::vector<uint8_t>(text.begin(), text.end())});
  }
  write_files_atomic(files);
}

// ---------------------------------------------------------------------------------------------------

LoRARecipe::LoRARecipe(std::shared_ptr<loaders::StableDiffusionModels> m, LoRATrainOptions o, LoRASaveFormat fmt)
    : Recipe(std::move(m)), o_(std::move(o)), fmt_(fmt) {
  o_.validate();
}

void LoRARecipe::setup(const TrainConfig& cfg) {
  auto& m = models();
  unet_dtype_ = te_dtype_ = freeze_base_models(m, cfg);
  if (cfg.gradient_checkpointing) m.unet->set_gradient_checkpointing(true);
  checkpointing_ = cfg.gradient_checkpointing;
  net_ = std::make_unique<LoRANetwork>(m, o_, cfg.seed);
}

std::vector<NamedParameter> LoRARecipe::trainable_parameters() { return net_->parameters(); }

void LoRARecipe::train_mode(bool on) {
  auto& m = models();
  m.unet->train(on);
  if (o_.train_text_encoder) m.text_encoder->train(on);
}

at::Tensor LoRARecipe::encode_prompt(const Batch& batch) {
  net_->refresh(unet_dtype_, te_dtype_);
  return Recipe::encode_prompt(batch);
}

at::Tensor LoRARecipe::predict(const at::Tensor& noisy, const at::Tensor& t, const at::Tensor& ehs, const Batch&) {
  net_->refresh(unet_dtype_, te_dtype_);
  models::UNetInputs in;
  in.sample = noisy.to(unet_dtype_);
  in.timestep = t;
  in.encoder_hidden_states = ehs.to(unet_dtype_);
  return models().unet->forward(in).to(at::kFloat);
}

void LoRARecipe::save(const std::string& path) { net_->save(path, fmt_); }

void LoRARecipe::validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir) {
  net_->refresh(at::kFloat, at::kFloat);  // predict / encode_prompt refresh to the training dtypes again
  Recipe::validate(cfg, step, out_dir);
}

}  // namespace dmx::training
