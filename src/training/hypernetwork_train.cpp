// `dmx train hypernetwork` (see hypernetwork_train.h).
#include "training/hypernetwork_train.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "loaders/hypernetwork_loader.h"
#include "training/lora_train.h"

namespace dmx::training {

namespace {
std::string list_text(const std::vector<double>& v) {
  std::string s;
  for (double x : v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", x);
    s += (s.empty() ? "" : ",") + std::string(buf);
  }
  return s;
}

const std::vector<std::string>& weight_inits() {
  static const std::vector<std::string> v = {"Normal", "XavierUniform", "XavierNormal", "KaimingUniform",
                                             "KaimingNormal"};
  return v;
}
}  // namespace

models::HypernetworkConfig HypernetworkTrainOptions::config() const {
  models::HypernetworkConfig c;
  c.layer_structure = layer_structure;
  c.activation_func = activation;
  c.is_layer_norm = layer_norm;
  c.activate_output = activate_output;
  c.weight_initialization = weight_init;
  c.last_layer_dropout = last_layer_dropout;
  c.dropout_structure = dropout_structure;
  const bool any = std::any_of(dropout_structure.begin(), dropout_structure.end(), [](double d) { return d != 0; });
  c.use_dropout = dropout_structure.empty() ? use_dropout : any;
  // Hypernetwork.__init__ without a structure: parse_dropout_structure(layer_structure, use_dropout,
  // last_layer_dropout); stored explicitly, as Hypernetwork.save does.
  if (c.dropout_structure.empty()) c.dropout_structure = c.effective_dropout_structure();
  return c;
}

void HypernetworkTrainOptions::validate() const {
  const std::string ls = list_text(layer_structure);
  DMX_CHECK_ARG(layer_structure.size() >= 2 && layer_structure.size() <= 32,
                "--layer-structure needs 2 to 32 numbers, got '", ls, "'");
  DMX_CHECK_ARG(layer_structure.front() == 1.0 && layer_structure.back() == 1.0,
                "--layer-structure must start and end with 1 (A1111's rule), got '", ls, "'");
  for (double l : layer_structure)
    DMX_CHECK_ARG(std::isfinite(l) && l > 0 && l <= 64, "--layer-structure entries must be in (0, 64], got '", ls, "'");
  const auto acts = models::hypernetwork_activation_names();
  DMX_CHECK_ARG(std::find(acts.begin(), acts.end(), activation) != acts.end(), "--activation must be one of ",
                join(acts, ", "), ", got '", activation, "'");
  DMX_CHECK_ARG(std::find(weight_inits().begin(), weight_inits().end(), weight_init) != weight_inits().end(),
                "--weight-init must be one of ", join(weight_inits(), ", "), " (A1111's names), got '", weight_init,
                "'");
  if (!dropout_structure.empty()) {
    const std::string ds = list_text(dropout_structure);
    DMX_CHECK_ARG(dropout_structure.size() == layer_structure.size(),
                  "--dropout-structure needs one probability per --layer-structure entry (", layer_structure.size(),
                  "), got '", ds, "'");
    for (double p : dropout_structure)
      DMX_CHECK_ARG(std::isfinite(p) && p >= 0 && p < 1, "--dropout-structure entries must be in [0, 1), got '", ds,
                    "'");
    DMX_CHECK_ARG(dropout_structure.front() == 0 && dropout_structure.back() == 0,
                  "--dropout-structure must start and end with 0 (dropout only between layers), got '", ds, "'");
  }
  DMX_CHECK_ARG(widths.size() <= kMaxHypernetworkWidths, "--hypernetwork-widths: at most ", kMaxHypernetworkWidths,
                " widths, got ", widths.size());
  std::set<int64_t> seen;
  for (int64_t w : widths) {
    DMX_CHECK_ARG(w > 0 && w <= kMaxHypernetworkWidth, "--hypernetwork-widths entries must be in [1, ",
                  kMaxHypernetworkWidth, "], got ", w);
    DMX_CHECK_ARG(seen.insert(w).second, "--hypernetwork-widths: width ", w, " is given twice");
    for (double l : layer_structure)
      DMX_CHECK_ARG(static_cast<int64_t>(static_cast<double>(w) * l) > 0, "--layer-structure '", ls,
                    "' gives an empty layer at width ", w);
  }
}

std::vector<int64_t> attention_widths(torch::nn::Module& unet) {
  std::vector<int64_t> cross;
  std::set<int64_t> self;
  for (const auto& item : unet.named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    if (!ends_with(name, ".to_k.weight") || item.value().dim() != 2) continue;
    const int64_t w = item.value().size(1);
    if (name.find(".attn2.") != std::string::npos) {
      if (std::find(cross.begin(), cross.end(), w) == cross.end()) cross.push_back(w);
    } else {
      self.insert(w);
    }
  }
  std::vector<int64_t> out = cross;
  for (int64_t w : self)
    if (std::find(out.begin(), out.end(), w) == out.end()) out.push_back(w);
  return out;
}

void init_hypernetwork(models::Hypernetwork& hn, const std::string& weight_init, at::Generator& gen) {
  DMX_CHECK_ARG(std::find(weight_inits().begin(), weight_inits().end(), weight_init) != weight_inits().end(),
                "hypernetwork: weight initialization '", weight_init, "' is not defined (", join(weight_inits(), ", "),
                ")");
  at::NoGradGuard no_grad;
  for (int64_t w : hn->width_order()) {
    for (auto* mod : {&hn->k(w), &hn->v(w)}) {
      for (const auto& child : (*mod)->modules(/*include_self=*/false)) {
        auto* linear = dynamic_cast<torch::nn::LinearImpl*>(child.get());
        auto* norm = dynamic_cast<torch::nn::LayerNormImpl*>(child.get());
        if (!linear && !norm) continue;
        at::Tensor weight = linear ? linear->weight : norm->weight;
        at::Tensor bias = linear ? linear->bias : norm->bias;
        if (weight_init == "Normal" || norm) {
          weight.normal_(0.0, 0.01, gen);
        } else {
          const double fan_out = static_cast<double>(weight.size(0)), fan_in = static_cast<double>(weight.size(1));
          const double gain = std::sqrt(2.0);  // calculate_gain('relu') = calculate_gain('leaky_relu', 0)
          if (weight_init == "XavierUniform") {
            const double bound = std::sqrt(6.0 / (fan_in + fan_out));
            weight.uniform_(-bound, bound, gen);
          } else if (weight_init == "XavierNormal") {
            weight.normal_(0.0, std::sqrt(2.0 / (fan_in + fan_out)), gen);
          } else if (weight_init == "KaimingUniform") {
            const double bound = gain * std::sqrt(3.0 / fan_in);
            weight.uniform_(-bound, bound, gen);
          } else {  // KaimingNormal
            weight.normal_(0.0, gain / std::sqrt(fan_in), gen);
          }
        }
        bias.zero_();
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
HypernetworkRecipe::HypernetworkRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, HypernetworkTrainOptions o)
    : Recipe(std::move(m)), o_(std::move(o)) {
  o_.validate();
  // The widths against the model, before anything is written (a module no layer reads would never train).
  DMX_CHECK_ARG(models_ && !models_->unet.is_empty(), "hypernetwork training needs a UNet");
  const std::vector<int64_t> model_widths = attention_widths(*models_->unet);
  DMX_CHECK_ARG(!model_widths.empty(), "hypernetwork training: the UNet has no attention layers");
  if (o_.widths.empty()) o_.widths = model_widths;
  for (int64_t w : o_.widths)
    DMX_CHECK_ARG(std::find(model_widths.begin(), model_widths.end(), w) != model_widths.end(),
                  "--hypernetwork-widths: no attention layer of the model reads width ", w,
                  " (its widths: ", nlohmann::json(model_widths).dump(), ")");
  o_.validate();
}

HypernetworkRecipe::~HypernetworkRecipe() = default;

void HypernetworkRecipe::setup(const TrainConfig& cfg) {
  auto& m = models();
  unet_dtype_ = freeze_base_models(m, cfg);  // the modules stay float32: the hook casts (A1111's cond_cast_float)
  if (cfg.gradient_checkpointing) m.unet->set_gradient_checkpointing(true);
  hn_ = models::Hypernetwork(o_.config(), o_.widths);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(cfg.seed);
  init_hypernetwork(hn_, o_.weight_init, gen);
  for (auto& p : hn_->parameters()) p.set_requires_grad(true);
  dropout_gen_ = at::make_generator<at::CPUGeneratorImpl>(cfg.seed + 1);
  hn_->set_dropout_generator(&dropout_gen_);
  hn_->train(true);
  steps_ = cfg.max_train_steps;
  guard_ = std::make_unique<models::ScopedHypernetworks>(
      *m.unet, std::vector<std::pair<models::Hypernetwork, double>>{{hn_, 1.0}});
}

std::vector<NamedParameter> HypernetworkRecipe::trainable_parameters() {
  std::vector<NamedParameter> v;
  for (const auto& item : hn_->named_parameters(/*recurse=*/true))
    v.push_back({"hypernetwork." + item.key(), item.value()});
  return v;
}

void HypernetworkRecipe::train_mode(bool on) {
  models().unet->train(on);
  hn_->train(on);
}

at::Tensor HypernetworkRecipe::predict(const at::Tensor& noisy, const at::Tensor& t, const at::Tensor& ehs,
                                       const Batch&) {
  models::UNetInputs in;
  in.sample = noisy.to(unet_dtype_);
  in.timestep = t;
  in.encoder_hidden_states = ehs.to(unet_dtype_);
  return models().unet->forward(in).to(at::kFloat);
}

void HypernetworkRecipe::save(const std::string& path) {
  hn_->set_record(file_stem(path), steps_, file_stem(models().name.empty() ? std::string() : models().name));
  const bool was_training = hn_->is_training();
  hn_->train(false);
  loaders::save_hypernetwork(hn_, path);
  hn_->train(was_training);
}

io::TensorMap HypernetworkRecipe::extra_state() { return {{"dropout_rng_state", dropout_gen_.get_state()}}; }

void HypernetworkRecipe::load_extra_state(const io::TensorMap& s) {
  auto it = s.find("dropout_rng_state");
  DMX_CHECK_FORMAT(it != s.end(),
                   "--resume: the checkpoint has no recipe.dropout_rng_state (not a hypernetwork "
                   "checkpoint)");
  dropout_gen_.set_state(it->second);
}
}  // namespace dmx::training
