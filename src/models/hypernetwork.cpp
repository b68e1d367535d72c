// AUTOMATIC1111 hypernetworks (see hypernetwork.h).
#include "models/hypernetwork.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "core/text.h"
#include "dmx/error.h"
#include "io/state_dict.h"
#include "nn/layers.h"

namespace dmx::models {

namespace {
const char* kWhat = "hypernetwork";

// A1111's activation_dict with torch 1.13's default arguments (torch.nn.modules.activation).
struct ActivationRow {
  const char* name;        // as a file names it
  const char* class_name;  // the torch.nn class A1111 builds
  at::Tensor (*fn)(const at::Tensor&);
};
const std::vector<ActivationRow>& activation_table() {
  static const std::vector<ActivationRow> rows = {
      {"linear", "Identity", [](const at::Tensor& x) { return x; }},
      {"relu", "ReLU", [](const at::Tensor& x) { return at::relu(x); }},
      {"leakyrelu", "LeakyReLU", [](const at::Tensor& x) { return at::leaky_relu(x, 0.01); }},
      {"elu", "ELU", [](const at::Tensor& x) { return at::elu(x, 1.0); }},
      // A1111's "swish" is torch.nn.Hardswish
      {"swish", "Hardswish", [](const at::Tensor& x) { return at::hardswish(x); }},
      {"hardswish", "Hardswish", [](const at::Tensor& x) { return at::hardswish(x); }},
      {"tanh", "Tanh", [](const at::Tensor& x) { return at::tanh(x); }},
      {"sigmoid", "Sigmoid", [](const at::Tensor& x) { return at::sigmoid(x); }},
      {"silu", "SiLU", [](const at::Tensor& x) { return at::silu(x); }},
      {"mish", "Mish", [](const at::Tensor& x) { return at::mish(x); }},
      {"gelu", "GELU", [](const at::Tensor& x) { return at::gelu(x); }},
      {"celu", "CELU", [](const at::Tensor& x) { return at::celu(x, 1.0); }},
      {"selu", "SELU", [](const at::Tensor& x) { return at::selu(x); }},
      {"relu6", "ReLU6", [](const at::Tensor& x) { return at::hardtanh(x, 0.0, 6.0); }},
      {"hardtanh", "Hardtanh", [](const at::Tensor& x) { return at::hardtanh(x, -1.0, 1.0); }},
      {"hardsigmoid", "Hardsigmoid", [](const at::Tensor& x) { return at::hardsigmoid(x); }},
      {"logsigmoid", "LogSigmoid", [](const at::Tensor& x) { return at::log_sigmoid(x); }},
      {"softplus", "Softplus", [](const at::Tensor& x) { return at::softplus(x, 1.0, 20.0); }},
      {"softsign", "Softsign", [](const at::Tensor& x) { return x / (x.abs() + 1); }},
      {"tanhshrink", "Tanhshrink", [](const at::Tensor& x) { return x - at::tanh(x); }},
      {"hardshrink", "Hardshrink", [](const at::Tensor& x) { return at::hardshrink(x, 0.5); }},
      {"softshrink", "Softshrink", [](const at::Tensor& x) { return at::softshrink(x, 0.5); }},
      // RReLU in eval mode: a leaky ReLU with the mean slope (lower + upper) / 2 = (1/8 + 1/3) / 2.
      {"rrelu", "RReLU", [](const at::Tensor& x) { return at::leaky_relu(x, (1.0 / 8.0 + 1.0 / 3.0) / 2.0); }},
      {"prelu", "PReLU", nullptr},  // a learned slope: a layer with a parameter (PReLUImpl)
  };
  return rows;
}

const ActivationRow* find_activation(const std::string& name) {
  for (const auto& r : activation_table())
    if (name == r.name) return &r;
  return nullptr;
}

// torch.nn.PReLU(): one learned slope, initialised to 0.25.
class PReLUImpl : public torch::nn::Module {
 public:
  PReLUImpl() { weight = register_parameter("weight", at::full({1}, 0.25)); }
  at::Tensor forward(const at::Tensor& x) { return at::prelu(x, weight); }
  at::Tensor weight;
};
TORCH_MODULE(PReLU);

template <typename T>
T field(const nlohmann::json& j, const char* key, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  try {
    return it->template get<T>();
  } catch (const nlohmann::json::exception&) {
    throw FormatError(std::string(kWhat) + ": field '" + key + "' has the wrong type (" + it->type_name() +
                      "): " + it->dump());
  }
}

// Python truthiness of a stored flag (A1111 files hold bools; ints appear in hand-made ones).
bool flag(const nlohmann::json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (it->is_boolean()) return it->get<bool>();
  if (it->is_number()) return it->get<double>() != 0;
  throw FormatError(std::string(kWhat) + ": field '" + key + "' must be a boolean, got " + it->dump());
}

std::vector<double> numbers(const nlohmann::json& j, const char* key, std::vector<double> fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  DMX_CHECK_FORMAT(it->is_array(), kWhat, ": field '", key, "' must be a list of numbers, got ", it->dump());
  std::vector<double> out;
  for (const auto& v : *it) {
    DMX_CHECK_FORMAT(v.is_number(), kWhat, ": field '", key, "' must be a list of numbers, got ", it->dump());
    out.push_back(v.get<double>());
  }
  return out;
}

// The parameters of one module of width dim (HypernetworkModuleImpl's layers, counted without building them).
double module_parameters(int64_t dim, const HypernetworkConfig& cfg) {
  const auto& ls = cfg.layer_structure;
  double total = 0;
  for (size_t i = 0; i + 1 < ls.size(); ++i) {
    const double in = std::trunc(static_cast<double>(dim) * ls[i]),
                 out = std::trunc(static_cast<double>(dim) * ls[i + 1]);
    total += in * out + out;                  // Linear
    if (cfg.is_layer_norm) total += 2 * out;  // LayerNorm
    if (cfg.activation_func == "prelu" && !(i + 2 >= ls.size() && !cfg.activate_output)) total += 1;
  }
  return total;
}

std::string list_string(const std::vector<double>& v) { return nlohmann::json(v).dump(); }
}  // namespace

// ---------------------------------------------------------------------------------------------------
HypernetworkConfig HypernetworkConfig::from_json(const nlohmann::json& j) {
  DMX_CHECK_FORMAT(j.is_object(), kWhat, ": the fields must be a JSON object, got ", j.type_name());
  HypernetworkConfig c;
  c.layer_structure = numbers(j, "layer_structure", c.layer_structure);
  c.activation_func = field<std::string>(j, "activation_func", "");
  c.is_layer_norm = flag(j, "is_layer_norm", false);
  c.activate_output = flag(j, "activate_output", true);
  c.dropout_structure = numbers(j, "dropout_structure", {});
  // Hypernetwork.load: use_dropout is true when a stored dropout_structure has a non-zero entry.
  const bool any_dropout =
      std::any_of(c.dropout_structure.begin(), c.dropout_structure.end(), [](double d) { return d != 0; });
  c.use_dropout = any_dropout ? true : flag(j, "use_dropout", false);
  c.last_layer_dropout = flag(j, "last_layer_dropout", false);
  c.name = field<std::string>(j, "name", "");
  if (j.contains("step") && j.at("step").is_number()) c.step = static_cast<int64_t>(j.at("step").get<double>());
  c.weight_initialization = field<std::string>(j, "weight_initialization", "Normal");
  c.sd_checkpoint = field<std::string>(j, "sd_checkpoint", "");
  c.sd_checkpoint_name = field<std::string>(j, "sd_checkpoint_name", "");
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(e.what());
  }
  return c;
}

std::vector<double> HypernetworkConfig::effective_dropout_structure() const {
  if (!dropout_structure.empty()) return dropout_structure;
  // parse_dropout_structure
  const size_t n = layer_structure.size();
  if (!use_dropout) return std::vector<double>(n, 0.0);
  std::vector<double> d{0.0};
  for (size_t i = 0; i + 3 < n; ++i) d.push_back(0.3);
  d.push_back(last_layer_dropout ? 0.3 : 0.0);
  d.push_back(0.0);
  return d;
}

void HypernetworkConfig::validate() const {
  DMX_CHECK_ARG(layer_structure.size() >= 2, kWhat, ": layer_structure needs at least 2 entries, got ",
                list_string(layer_structure));
  DMX_CHECK_ARG(layer_structure.front() == 1.0 && layer_structure.back() == 1.0, kWhat,
                ": layer_structure must start and end with 1 (A1111's rule), got ", list_string(layer_structure));
  for (double l : layer_structure)
    DMX_CHECK_ARG(std::isfinite(l) && l > 0 && l <= 64, kWhat, ": layer_structure entries must be in (0, 64], got ",
                  list_string(layer_structure));
  const std::vector<double> d = effective_dropout_structure();
  DMX_CHECK_ARG(d.size() >= layer_structure.size(), kWhat,
                ": dropout_structure needs one entry per layer_structure "
                "entry (",
                layer_structure.size(), "), got ", list_string(d));
  for (double p : d)
    DMX_CHECK_ARG(std::isfinite(p) && p >= 0 && p < 1, kWhat, ": dropout_structure entries must be in [0, 1), got ",
                  list_string(d));
}

std::vector<std::string> hypernetwork_activation_names() {
  std::vector<std::string> names;
  for (const auto& r : activation_table()) names.push_back(r.name);
  return names;
}

// ---------------------------------------------------------------------------------------------------
HypernetworkModuleImpl::HypernetworkModuleImpl(int64_t dim, const HypernetworkConfig& cfg) : dim_(dim) {
  cfg.validate();
  DMX_CHECK_ARG(dim > 0, kWhat, ": module width must be > 0, got ", dim);
  const auto& ls = cfg.layer_structure;
  const size_t n = ls.size();
  const std::vector<double> dropout = cfg.effective_dropout_structure();
  const std::string& act = cfg.activation_func;
  auto seq = nn::make_container(*this, "linear");
  auto add = [&](const std::string& kind, std::shared_ptr<torch::nn::Module> m) {
    if (m) seq->register_module(std::to_string(kinds_.size()), m);
    kinds_.push_back(kind);
    layers_.push_back(std::move(m));
    fns_.push_back(nullptr);
    dropout_p_.push_back(0.0);
  };
  for (size_t i = 0; i + 1 < n; ++i) {
    // Python's int(dim * ls[i]): truncation of the float product.
    const auto in = static_cast<int64_t>(static_cast<double>(dim) * ls[i]);
    const auto out = static_cast<int64_t>(static_cast<double>(dim) * ls[i + 1]);
    DMX_CHECK_ARG(in > 0 && out > 0, kWhat, ": layer_structure ", list_string(ls), " gives an empty layer at width ",
                  dim);
    add("Linear", torch::nn::Linear(torch::nn::LinearOptions(in, out)).ptr());
    const bool skip = act.empty() || act == "linear" || (i + 2 >= n && !cfg.activate_output);
    if (!skip) {
      const ActivationRow* row = find_activation(act);
      DMX_CHECK_SUPPORTED(row != nullptr, kWhat, ": activation_func '", act,
                          "' is not supported (supported: ", join(hypernetwork_activation_names(), ", "), ")");
      add(row->class_name, row->fn ? nullptr : PReLU().ptr());
      fns_.back() = row->fn;
    }
    if (cfg.is_layer_norm) add("LayerNorm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({out}).eps(1e-5)).ptr());
    if (dropout[i + 1] > 0) {  // off at inference; it still takes an index
      add("Dropout", nullptr);
      dropout_p_.back() = dropout[i + 1];
    }
  }
  eval();  // inference unless a trainer asks for train mode (A1111's Hypernetwork.__init__ ends in eval())
}

at::Tensor HypernetworkModuleImpl::forward(const at::Tensor& x, double multiplier) {
  DMX_CHECK_ARG(x.dim() >= 1 && x.size(-1) == dim_, kWhat, ": module of width ", dim_, " got input ", x.sizes());
  at::Tensor h = x;
  for (size_t i = 0; i < kinds_.size(); ++i) {
    const std::string& kind = kinds_[i];
    if (kind == "Linear")
      h = std::dynamic_pointer_cast<torch::nn::LinearImpl>(layers_[i])->forward(h);
    else if (kind == "LayerNorm")
      h = std::dynamic_pointer_cast<torch::nn::LayerNormImpl>(layers_[i])->forward(h);
    else if (kind == "PReLU")
      h = std::dynamic_pointer_cast<PReLUImpl>(layers_[i])->forward(h);
    else if (fns_[i])
      h = fns_[i](h);
    else if (kind == "Dropout" && is_training()) {  // off at inference
      const double p = dropout_p_[i];
      c10::optional<at::Generator> gen;
      if (dropout_gen_) gen = *dropout_gen_;
      h = h * at::empty_like(h).bernoulli_(1.0 - p, gen).div_(1.0 - p);
    }
  }
  return x + h * (is_training() ? 1.0 : multiplier);
}

// ---------------------------------------------------------------------------------------------------
HypernetworkImpl::HypernetworkImpl(const HypernetworkConfig& cfg, const std::vector<int64_t>& widths) : cfg_(cfg) {
  cfg_.validate();
  DMX_CHECK_ARG(!widths.empty(), kWhat, ": no module widths");
  for (int64_t d : widths) {
    DMX_CHECK_ARG(!modules_.count(d), kWhat, ": width ", d, " given twice");
    auto pair = register_module(std::to_string(d), std::make_shared<torch::nn::Module>());
    HypernetworkModule k = pair->register_module("k", HypernetworkModule(d, cfg_));
    HypernetworkModule v = pair->register_module("v", HypernetworkModule(d, cfg_));
    modules_.emplace(d, std::make_pair(k, v));
    order_.push_back(d);
  }
  eval();
}

void HypernetworkImpl::set_record(const std::string& name, int64_t step, const std::string& sd_checkpoint_name) {
  cfg_.name = name;
  cfg_.step = step;
  cfg_.sd_checkpoint_name = sd_checkpoint_name;
}

void HypernetworkImpl::set_dropout_generator(at::Generator* gen) {
  for (auto& kv : modules_) {
    kv.second.first->set_dropout_generator(gen);
    kv.second.second->set_dropout_generator(gen);
  }
}

std::vector<int64_t> HypernetworkImpl::widths() const {
  std::vector<int64_t> w;
  for (const auto& kv : modules_) w.push_back(kv.first);
  return w;
}

HypernetworkModule& HypernetworkImpl::k(int64_t dim) {
  auto it = modules_.find(dim);
  DMX_CHECK_ARG(it != modules_.end(), kWhat, ": no module pair for width ", dim);
  return it->second.first;
}

HypernetworkModule& HypernetworkImpl::v(int64_t dim) {
  auto it = modules_.find(dim);
  DMX_CHECK_ARG(it != modules_.end(), kWhat, ": no module pair for width ", dim);
  return it->second.second;
}

nn::KeyValueInputs HypernetworkImpl::apply(nn::KeyValueInputs in, double multiplier) {
  // apply_single_hypernetwork: chosen by context_k.shape[2] alone.
  auto it = modules_.find(in.key.size(-1));
  if (it == modules_.end()) return in;
  return {it->second.first->forward(in.key, multiplier), it->second.second->forward(in.value, multiplier)};
}

// ---------------------------------------------------------------------------------------------------
Hypernetwork hypernetwork_from_state_dict(const io::TensorMap& tensors, const HypernetworkConfig& cfg,
                                          const std::string& what) {
  io::TensorMap state;
  std::set<int64_t> widths;
  std::vector<std::string> bad;
  for (const auto& [name, t] : tensors) {
    const std::vector<std::string> parts = split(name, '.');
    const bool width_ok = parts.size() >= 3 && !parts[0].empty() && parts[0].size() < 7 &&
                          std::all_of(parts[0].begin(), parts[0].end(), [](char c) { return c >= '0' && c <= '9'; });
    const std::string& kv = parts.size() >= 2 ? parts[1] : "";
    if (!width_ok || !(kv == "k" || kv == "v" || kv == "0" || kv == "1")) {
      bad.push_back(name);
      continue;
    }
    const int64_t width = std::stoll(parts[0]);
    widths.insert(width);
    std::string key = join(std::vector<std::string>(parts.begin() + 2, parts.end()), ".");
    // fix_old_state_dict: NovelAI's linear1 / linear2.
    if (starts_with(key, "linear1.")) key = "linear.0." + key.substr(8);
    if (starts_with(key, "linear2.")) key = "linear.1." + key.substr(8);
    const std::string out = parts[0] + "." + (kv == "k" || kv == "0" ? "k" : "v") + "." + key;
    DMX_CHECK_FORMAT(state.emplace(out, t).second, what, ": tensor '", name, "' names the same parameter as another (",
                     out, ")");
  }
  DMX_CHECK_FORMAT(bad.empty(), what, ": ", bad.size(),
                   " tensor name(s) are not of a hypernetwork (<width>.k.<key> / <width>.v.<key>, or <width>.0 / "
                   "<width>.1): ",
                   join_abbreviated(bad));
  DMX_CHECK_FORMAT(!widths.empty(), what, ": no hypernetwork modules (no <width>.k.* tensors)");
  // The modules the fields describe must not be much larger than what the file holds (a hostile width or
  // layer_structure could otherwise make their construction allocate without bound); the strict load names
  // anything else that differs, a missing tensor included.
  double described = 0, held = 0;
  for (int64_t w : widths) {
    DMX_CHECK_FORMAT(w > 0, what, ": module width must be > 0, got ", w);
    described += 2 * module_parameters(w, cfg);
  }
  for (const auto& kv : state) held += static_cast<double>(kv.second.numel());
  DMX_CHECK_FORMAT(
      described <= held + io::kLoadSlackParameters, what, ": layer_structure ", list_string(cfg.layer_structure),
      " at widths ", nlohmann::json(std::vector<int64_t>(widths.begin(), widths.end())).dump(), " describes ",
      static_cast<int64_t>(std::min(described, 9e18)), " parameters, but the file holds ", static_cast<int64_t>(held));
  Hypernetwork hn(cfg, std::vector<int64_t>(widths.begin(), widths.end()));
  io::load_state_dict(*hn, state, what);
  hn->eval();
  return hn;
}

// ---------------------------------------------------------------------------------------------------
HypernetworkHook::HypernetworkHook(Hypernetwork hypernetwork, double multiplier)
    : hn_(std::move(hypernetwork)), multiplier_(multiplier) {
  DMX_CHECK_ARG(!hn_.is_empty(), "HypernetworkHook: no hypernetwork");
  DMX_CHECK_ARG(std::isfinite(multiplier), "hypernetwork multiplier must be finite, got ", multiplier);
}

nn::KeyValueInputs HypernetworkHook::on_key_value_inputs(const nn::AttentionSite&, const nn::AttentionContext&,
                                                         nn::KeyValueInputs in) {
  if (!hn_->has_width(in.key.size(-1))) return in;
  // A1111 runs the modules in float (devices.cond_cast_float) and casts back (cond_cast_unet).
  const at::ScalarType dtype = in.key.scalar_type();
  const at::Tensor w = hn_->parameters().front();  // by value: parameters() returns a temporary vector
  const at::ScalarType own = w.scalar_type();
  if (dtype == own && in.key.device() == w.device()) return hn_->apply(std::move(in), multiplier_);
  nn::KeyValueInputs cast{in.key.to(w.device(), own), in.value.to(w.device(), own)};
  nn::KeyValueInputs out = hn_->apply(std::move(cast), multiplier_);
  return {out.key.to(in.key.device(), dtype), out.value.to(in.value.device(), dtype)};
}

ScopedHypernetworks::ScopedHypernetworks(torch::nn::Module& root,
                                         const std::vector<std::pair<Hypernetwork, double>>& hypernetworks) {
  for (const auto& [hn, multiplier] : hypernetworks)
    guards_.push_back(
        std::make_unique<nn::ScopedAttentionInputHook>(root, std::make_shared<HypernetworkHook>(hn, multiplier)));
}
}  // namespace dmx::models
