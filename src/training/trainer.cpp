// The training loop (see trainer.h): diffusers 0.27.2 examples/text_to_image/train_text_to_image.py,
// training_utils.py (compute_snr, EMAModel), optimization.py (get_scheduler), torch 1.13 optim/adamw.py and
// nn/utils/clip_grad.py.
#include "training/trainer.h"

#include <unistd.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "dmx/error.h"
#include "schedulers/scheduler.h"
#include "training/distributed.h"

namespace dmx::training {

namespace fs = std::filesystem;

LRSchedule parse_lr_schedule(const std::string& s) {
  if (s == "constant") return LRSchedule::Constant;
  if (s == "constant_with_warmup") return LRSchedule::ConstantWithWarmup;
  if (s == "linear") return LRSchedule::Linear;
  if (s == "cosine") return LRSchedule::Cosine;
  throw InvalidArgument("--lr-scheduler must be one of constant, constant_with_warmup, linear, cosine, got '" + s +
                        "'");
}

const char* lr_schedule_name(LRSchedule s) {
  switch (s) {
    case LRSchedule::Constant:
      return "constant";
    case LRSchedule::ConstantWithWarmup:
      return "constant_with_warmup";
    case LRSchedule::Linear:
      return "linear";
    case LRSchedule::Cosine:
      return "cosine";
  }
  return "?";
}

MixedPrecision parse_mixed_precision(const std::string& s) {
  if (s == "no" || s == "fp32") return MixedPrecision::No;
  if (s == "bf16") return MixedPrecision::BF16;
  throw InvalidArgument("--mixed-precision must be no, fp32 or bf16, got '" + s + "'");
}

// ---------------------------------------------------------------------------------------------------
// Batches

DatasetBatchSource::DatasetBatchSource(std::shared_ptr<ImageCaptionDataset> ds, int batch_size_per_rank, int rank,
                                       int world_size, uint64_t seed, bool shuffle)
    : ds_(std::move(ds)),
      sampler_(ds_->size(), batch_size_per_rank, rank, world_size, seed, shuffle),
      batch_size_(batch_size_per_rank),
      rank_(rank) {}

Batch DatasetBatchSource::get(int64_t micro_step) {
  return ds_->collate(sampler_.indices(micro_step),
                      sampler_.augment_seed(micro_step) + static_cast<uint64_t>(rank_) * batch_size_);
}

// ---------------------------------------------------------------------------------------------------
// Recipe defaults

at::Tensor Recipe::encode_prompt(const Batch& batch) {
  auto& m = models();
  DMX_CHECK_ARG(m.tokenizer != nullptr && !m.text_encoder.is_empty(), "training needs a tokenizer and a text encoder");
  const int n = m.tokenizer->model_max_length();
  std::vector<int64_t> ids;
  for (const auto& c : batch.captions) {
    const auto one = m.tokenizer->encode_padded(c, n);
    ids.insert(ids.end(), one.begin(), one.end());
  }
  const at::Tensor input_ids =
      at::tensor(ids, at::kLong).reshape({static_cast<int64_t>(batch.captions.size()), n});  // [B, 77]
  if (text_encoder_trainable()) return m.text_encoder->forward(input_ids).last_hidden_state;
  at::NoGradGuard no_grad;
  return m.text_encoder->forward(input_ids).last_hidden_state;  // [B, 77, D]
}

std::pair<at::Tensor, at::Tensor> Recipe::encode_images(const Batch& batch) {
  at::NoGradGuard no_grad;
  auto& vae = models().vae;
  const at::ScalarType dt = vae->parameters().front().scalar_type();
  const models::DiagonalGaussian d = vae->encode(batch.pixel_values.to(dt));
  return {d.mean.to(at::kFloat), d.std.to(at::kFloat)};
}

at::Tensor Recipe::reduce_loss(const at::Tensor& per_example, const Batch&) { return per_example.mean(); }

void Recipe::validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir) {
  if (cfg.validation_prompt.empty()) return;
  save_validation_images(sample_validation_images(models_, cfg), cfg, step, out_dir);
}

at::Tensor sample_validation_images(const std::shared_ptr<loaders::StableDiffusionModels>& models,
                                    const TrainConfig& cfg, const models::ControlNetModel& controlnet,
                                    const at::Tensor& control_image) {
  DMX_CHECK_ARG(cfg.sample_images != nullptr,
                "validation images need a text-to-image callback (TrainConfig::sample_images)");
  at::NoGradGuard no_grad;
  SampleRequest r;
  r.prompt = cfg.validation_prompt;
  r.num_inference_steps = cfg.validation_inference_steps;
  r.num_images = cfg.num_validation_images;
  r.seed = cfg.seed;
  r.controlnet = controlnet;
  r.control_image = control_image;
  return cfg.sample_images(models, r);
}

void save_validation_images(const at::Tensor& images, const TrainConfig& cfg, int64_t step,
                            const std::string& out_dir) {
  for (int64_t i = 0; i < images.size(0); ++i) {
    char name[96];
    std::snprintf(name, sizeof name, "validation-%06lld-%lld.png", static_cast<long long>(step),
                  static_cast<long long>(i));
    save_png(join_path(out_dir, name), tensor_to_image(images[i]), {{"parameters", cfg.validation_prompt}});
  }
}

namespace {
// Validation with --mixed-precision bf16: the pipelines run one dtype (the models' float32), so the modules
// cast to bf16 for training (text encoder, VAE, UNet) are float32 for the life of the scope and bf16 again
// afterwards. bf16 -> float32 -> bf16 is exact: training continues bit for bit.
class Float32Scope {
 public:
  explicit Float32Scope(loaders::StableDiffusionModels& m) {
    for (torch::nn::Module* mod : {as_module(m.text_encoder), as_module(m.vae), as_module(m.unet)}) {
      if (!mod || mod->parameters().empty()) continue;
      const at::ScalarType dt = mod->parameters().front().scalar_type();
      if (dt == at::kFloat) continue;
      mod->to(at::kFloat);
      cast_.emplace_back(mod, dt);
    }
  }
  ~Float32Scope() {
    for (auto& [mod, dt] : cast_) {
      try {
        mod->to(dt);
      } catch (const std::exception& e) {
        log_warn(std::string("could not cast a module back to its training dtype after validation: ") + e.what());
      }
    }
  }
  Float32Scope(const Float32Scope&) = delete;
  Float32Scope& operator=(const Float32Scope&) = delete;

 private:
  template <class Holder>
  static torch::nn::Module* as_module(Holder& h) {
    return h.is_empty() ? nullptr : h.get();
  }
  std::vector<std::pair<torch::nn::Module*, at::ScalarType>> cast_;
};
}  // namespace

// ---------------------------------------------------------------------------------------------------
// Math pieces

double lr_lambda(LRSchedule s, int64_t step, int64_t warmup, int64_t total) {
  const double st = static_cast<double>(step);
  if (s == LRSchedule::Constant) return 1.0;
  if (step < warmup) return st / static_cast<double>(std::max<int64_t>(1, warmup));
  switch (s) {
    case LRSchedule::ConstantWithWarmup:
      return 1.0;
    case LRSchedule::Linear:
      return std::max(0.0,
                      static_cast<double>(total - step) / static_cast<double>(std::max<int64_t>(1, total - warmup)));
    case LRSchedule::Cosine: {  // num_cycles = 0.5
      const double progress =
          static_cast<double>(step - warmup) / static_cast<double>(std::max<int64_t>(1, total - warmup));
      return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * 0.5 * 2.0 * progress)));
    }
    default:
      return 1.0;
  }
}

AdamW::AdamW(std::vector<NamedParameter> params, AdamWOptions o) : params_(std::move(params)), o_(o) {
  for (const auto& p : params_) {
    exp_avg_.push_back(at::zeros_like(p.tensor, at::MemoryFormat::Preserve));
    exp_avg_sq_.push_back(at::zeros_like(p.tensor, at::MemoryFormat::Preserve));
    param_steps_.push_back(0);
  }
}

void AdamW::zero_grad() {
  for (auto& p : params_) {
    at::Tensor& g = p.tensor.mutable_grad();
    if (g.defined()) g = at::Tensor();  // set_to_none, as torch 2.x's default
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor param = params_[i].tensor;
    const at::Tensor& grad = param.grad();
    if (!grad.defined()) continue;
    const int64_t step = ++param_steps_[i];
    param.mul_(1.0 - lr * o_.weight_decay);
    exp_avg_[i].mul_(o_.beta1).add_(grad, 1.0 - o_.beta1);
    exp_avg_sq_[i].mul_(o_.beta2).addcmul_(grad, grad, 1.0 - o_.beta2);
    const double bias_correction1 = 1.0 - std::pow(o_.beta1, static_cast<double>(step));
    const double bias_correction2 = 1.0 - std::pow(o_.beta2, static_cast<double>(step));
    const double step_size = lr / bias_correction1;
    const at::Tensor denom = (exp_avg_sq_[i].sqrt() / std::sqrt(bias_correction2)).add_(o_.eps);
    param.addcdiv_(exp_avg_[i], denom, -step_size);
  }
  ++step_;
}

io::TensorMap AdamW::state_dict() const {
  io::TensorMap s;
  for (size_t i = 0; i < params_.size(); ++i) {
    s["exp_avg." + params_[i].name] = exp_avg_[i];
    s["exp_avg_sq." + params_[i].name] = exp_avg_sq_[i];
    s["step." + params_[i].name] = at::tensor({param_steps_[i]}, at::kLong);
  }
  s["optimizer.step"] = at::tensor({step_}, at::kLong);
  return s;
}

namespace {
const at::Tensor& need_entry(const io::TensorMap& s, const std::string& key, const std::string& what) {
  auto it = s.find(key);
  DMX_CHECK_FORMAT(it != s.end(), what, ": checkpoint entry '", key, "' is missing");
  return it->second;
}
}  // namespace

void AdamW::load_state_dict(const io::TensorMap& s) {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& n = params_[i].name;
    const at::Tensor& a = need_entry(s, "exp_avg." + n, "optimizer state");
    const at::Tensor& b = need_entry(s, "exp_avg_sq." + n, "optimizer state");
    DMX_CHECK_FORMAT(a.sizes() == exp_avg_[i].sizes() && b.sizes() == exp_avg_sq_[i].sizes(), "optimizer state: '", n,
                     "' has shape ", a.sizes(), ", the parameter ", exp_avg_[i].sizes());
    exp_avg_[i].copy_(a);
    exp_avg_sq_[i].copy_(b);
    param_steps_[i] = need_entry(s, "step." + n, "optimizer state").item<int64_t>();
  }
  step_ = need_entry(s, "optimizer.step", "optimizer state").item<int64_t>();
}

double clip_grad_norm(const std::vector<NamedParameter>& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> norms;
  for (const auto& p : params)
    if (p.tensor.grad().defined()) norms.push_back(p.tensor.grad().norm(2));
  if (norms.empty()) return 0.0;
  const at::Tensor total = at::stack(norms).norm(2);
  const double total_norm = total.item<double>();
  if (max_norm > 0) {
    const at::Tensor coef = at::clamp(max_norm / (total + 1e-6), c10::nullopt, 1.0);
    for (const auto& p : params)
      if (p.tensor.grad().defined()) p.tensor.grad().mul_(coef);
  }
  return total_norm;
}

EMAModel::EMAModel(const std::vector<NamedParameter>& params, double decay, double min_decay, int64_t update_after_step)
    : decay_(decay), min_decay_(min_decay), update_after_step_(update_after_step) {
  for (const auto& p : params) {
    names_.push_back(p.name);
    shadow_.push_back(p.tensor.detach().clone());
  }
}

double EMAModel::current_decay() const {
  const int64_t step = std::max<int64_t>(0, optimization_step_ - update_after_step_ - 1);
  if (step <= 0) return 0.0;
  double d = (1.0 + static_cast<double>(step)) / (10.0 + static_cast<double>(step));
  d = std::min(d, decay_);
  return std::max(d, min_decay_);
}

void EMAModel::step(const std::vector<NamedParameter>& params) {
  at::NoGradGuard no_grad;
  ++optimization_step_;
  const double one_minus_decay = 1.0 - current_decay();
  for (size_t i = 0; i < shadow_.size(); ++i) shadow_[i].sub_((shadow_[i] - params[i].tensor) * one_minus_decay);
}

void EMAModel::copy_to(const std::vector<NamedParameter>& params) const {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < shadow_.size(); ++i) params[i].tensor.copy_(shadow_[i]);
}

io::TensorMap EMAModel::state_dict() const {
  io::TensorMap s;
  for (size_t i = 0; i < shadow_.size(); ++i) s["ema." + names_[i]] = shadow_[i];
  s["ema.optimization_step"] = at::tensor({optimization_step_}, at::kLong);
  return s;
}

void EMAModel::load_state_dict(const io::TensorMap& s) {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < shadow_.size(); ++i) shadow_[i].copy_(need_entry(s, "ema." + names_[i], "EMA state"));
  optimization_step_ = need_entry(s, "ema.optimization_step", "EMA state").item<int64_t>();
}

namespace {
// a[t] reshaped to broadcast over x: [B, 1, 1, 1].
at::Tensor gather_t(const at::Tensor& ac, const at::Tensor& t, const at::Tensor& like) {
  at::Tensor v = ac.to(like.scalar_type()).index_select(0, t.to(at::kLong));
  std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
  shape[0] = v.size(0);
  return v.reshape(shape);
}
}  // namespace

at::Tensor Recipe::sample_timesteps(at::Generator& gen, int64_t global_rows, int64_t num_train_timesteps) {
  return uniform_timesteps(gen, global_rows, num_train_timesteps);
}

at::Tensor uniform_timesteps(at::Generator& gen, int64_t n, int64_t num_train_timesteps) {
  return at::randint(num_train_timesteps, {n}, gen, at::TensorOptions().dtype(at::kLong));
}

at::Tensor cubic_timesteps(at::Generator& gen, int64_t n, int64_t num_train_timesteps) {
  const at::Tensor u = at::rand({n}, gen, at::TensorOptions().dtype(at::kFloat));  // [n] in [0, 1)
  // (1 - u^3) * T in float32 as the script computes it, then .long() (truncation toward zero) and the clamp.
  const at::Tensor t = ((1 - u.pow(3)) * static_cast<double>(num_train_timesteps)).to(at::kLong);
  return t.clamp(0, num_train_timesteps - 1);
}

at::Tensor compute_snr(const at::Tensor& ac, const at::Tensor& timesteps) {
  const at::Tensor sqrt_ac = ac.pow(0.5);
  const at::Tensor sqrt_1m = (1.0 - ac).pow(0.5);
  const at::Tensor alpha = sqrt_ac.index_select(0, timesteps.to(at::kLong)).to(at::kFloat);
  const at::Tensor sigma = sqrt_1m.index_select(0, timesteps.to(at::kLong)).to(at::kFloat);
  return (alpha / sigma).pow(2);
}

at::Tensor min_snr_weights(const at::Tensor& snr, double gamma, const std::string& prediction_type) {
  at::Tensor w = std::get<0>(at::stack({snr, gamma * at::ones_like(snr)}, 1).min(1));
  if (prediction_type == "epsilon") return w / snr;
  if (prediction_type == "v_prediction") return w / (snr + 1);
  throw Unsupported("min-SNR weighting needs prediction_type epsilon or v_prediction, got '" + prediction_type + "'");
}

at::Tensor ddpm_add_noise(const at::Tensor& ac, const at::Tensor& x0, const at::Tensor& noise,
                          const at::Tensor& timesteps) {
  const at::Tensor a = gather_t(ac, timesteps, x0);
  return a.pow(0.5) * x0 + (1 - a).pow(0.5) * noise;
}

at::Tensor ddpm_velocity(const at::Tensor& ac, const at::Tensor& x0, const at::Tensor& noise,
                         const at::Tensor& timesteps) {
  const at::Tensor a = gather_t(ac, timesteps, x0);
  return a.pow(0.5) * noise - (1 - a).pow(0.5) * x0;
}

size_t peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) {
      std::istringstream ss(line.substr(6));
      size_t kb = 0;
      ss >> kb;
      return kb * 1024;
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------
// Checkpoints

void check_batch_size(int64_t batch_size, int64_t resolution) {
  DMX_CHECK_ARG(batch_size >= 1 && batch_size <= kMaxBatchSize, "--batch-size must be in [1, ", kMaxBatchSize,
                "], got ", batch_size, " (use --gradient-accumulation-steps for larger batches)");
  const int64_t pixels = batch_size * resolution * resolution;
  DMX_CHECK_ARG(pixels <= kMaxBatchPixels, "--batch-size x --resolution^2 must be at most ", kMaxBatchPixels,
                " pixels per step (e.g. 16 images at 512, 1024 at 64), got ", batch_size, " x ", resolution,
                "^2 = ", pixels, " (use --gradient-accumulation-steps for larger batches)");
}

std::string find_latest_checkpoint(const std::string& path) {
  DMX_CHECK_ARG(is_directory(path), "--resume: no such folder: ", path);
  if (path_exists(join_path(path, "trainer_state.json"))) return path;
  int64_t best = -1;
  std::string best_path;
  for (const auto& e : fs::directory_iterator(path)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("checkpoint-", 0) != 0 || !e.is_directory()) continue;
    char* end = nullptr;
    const long long v = std::strtoll(n.c_str() + 11, &end, 10);
    if (*end != '\0' || !path_exists(join_path(e.path().string(), "trainer_state.json"))) continue;
    if (v > best) {
      best = v;
      best_path = e.path().string();
    }
  }
  DMX_CHECK_ARG(best >= 0, "--resume: ", path, " holds no checkpoint-N folder with trainer_state.json");
  return best_path;
}

int64_t checkpoint_global_step(const std::string& ck) {
  const std::string path = join_path(ck, "trainer_state.json");
  const std::string text = read_text_file(path, "--resume", kMaxJsonFileBytes);
  nlohmann::json js;
  try {
    js = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError("--resume: " + path + " is not valid JSON: " + e.what());
  }
  DMX_CHECK_FORMAT(js.is_object(), "--resume: ", path, " must be a JSON object");
  const auto it = js.find("global_step");
  DMX_CHECK_FORMAT(it != js.end(), "--resume: ", path, " has no 'global_step'");
  // The same rule as Trainer::run's reading of the file.
  DMX_CHECK_FORMAT(it->is_number_integer() &&
                       (it->is_number_unsigned() ? it->get<uint64_t>() <= (uint64_t(1) << 40)
                                                 : it->get<int64_t>() >= 0 && it->get<int64_t>() <= (int64_t(1) << 40)),
                   "--resume: ", path, ": 'global_step' must be an integer in [0, ", int64_t(1) << 40, "], got ",
                   it->dump());
  return it->get<int64_t>();
}

namespace {

std::string checkpoint_name(int64_t step) { return "checkpoint-" + std::to_string(step); }

// "<prefix><digits><suffix>" -> digits (-1 when the name is not of that form).
int64_t step_in_name(const std::string& n, const std::string& prefix, const std::string& suffix) {
  if (n.size() <= prefix.size() + suffix.size() || n.compare(0, prefix.size(), prefix) != 0 ||
      n.compare(n.size() - suffix.size(), suffix.size(), suffix) != 0)
    return -1;
  const std::string digits = n.substr(prefix.size(), n.size() - prefix.size() - suffix.size());
  if (digits.empty() || digits.size() > 18 || digits.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoll(digits);
}

int64_t checkpoint_step_of(const std::string& n) { return step_in_name(n, "checkpoint-", ""); }

// Step of a validation picture: validation-<step>-<i>.png or reconstruction-<step>.png (-1 otherwise).
int64_t picture_step_of(const std::string& n) {
  if (const int64_t s = step_in_name(n, "reconstruction-", ".png"); s >= 0) return s;
  if (n.rfind("validation-", 0) != 0) return -1;
  const size_t dash = n.find('-', 11);
  if (dash == std::string::npos || step_in_name(n.substr(dash), "-", ".png") < 0) return -1;
  return step_in_name(n.substr(0, dash), "validation-", "");
}

// Removes a folder by renaming it to a registered temporary first: interrupted, it leaves a temporary that the
// next start removes, never a half-deleted checkpoint.
void remove_folder_via_temporary(const std::string& dir) {
  const std::string tmp = temp_path_for(dir);
  ScopedTemporary registration(tmp, true);
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::rename(dir, tmp, ec);
  fs::remove_all(ec ? dir : tmp, ec);
}

void prune_checkpoints(const std::string& dir, int keep) {
  if (keep <= 0) return;
  std::vector<int64_t> steps = checkpoint_steps(dir);
  for (size_t i = 0; i + static_cast<size_t>(keep) < steps.size(); ++i)
    remove_folder_via_temporary(join_path(dir, checkpoint_name(steps[i])));
}

// After a resume at `step`, the log keeps the lines of steps <= step (and no torn last line), so that no step
// appears twice when the run goes on.
void truncate_log(const std::string& path, int64_t step) {
  if (!path_exists(path)) return;
  // Read line by line (the log grows with the run: no whole-file read and no size cap here).
  write_file_atomic(path, [&](const std::string& tmp) {
    std::ifstream in(path, std::ios::binary);
    DMX_CHECK_IO(in.good(), "train_log.jsonl: cannot open ", path, ": ", std::strerror(errno));
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    DMX_CHECK_IO(out.good(), "train_log.jsonl: cannot write ", tmp, ": ", std::strerror(errno));
    std::string line;
    while (std::getline(in, line)) {
      if (in.eof()) break;  // no newline: a line torn by a kill
      try {
        const nlohmann::json j = nlohmann::json::parse(line);
        if (j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= step)
          out << line << '\n';
      } catch (const nlohmann::json::exception&) {
      }
    }
    out.flush();
    if (!out.good()) throw_write_error("cannot write " + tmp, errno);
  });
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const long long t = static_cast<long long>(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", t / 3600, (t / 60) % 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", t / 60, t % 60);
  return buf;
}

}  // namespace

std::vector<int64_t> checkpoint_steps(const std::string& dir) {
  std::vector<int64_t> steps;
  std::error_code ec;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const int64_t s = checkpoint_step_of(it->path().filename().string());
    if (s >= 0 && it->is_directory(ec)) steps.push_back(s);
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

bool is_training_entry(const std::string& name) {
  std::string n = name;
  const size_t t = n.rfind(".tmp.");
  if (t != std::string::npos && t > 0 && n.find_first_not_of("0123456789", t + 5) == std::string::npos &&
      n.size() > t + 5)
    n = n.substr(0, t);
  return n == "train_log.jsonl" || checkpoint_step_of(n) >= 0 || picture_step_of(n) >= 0;
}

void remove_training_entries(const std::string& dir, int64_t after_step) {
  std::vector<std::string> names;
  std::error_code ec;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec))
    names.push_back(it->path().filename().string());
  for (const auto& n : names) {
    const std::string path = join_path(dir, n);
    if (const int64_t s = checkpoint_step_of(n); s >= 0 && s > after_step && is_directory(path)) {
      remove_folder_via_temporary(path);
    } else if (const int64_t p = picture_step_of(n); p >= 0 && p > after_step) {
      fs::remove(path, ec);
    } else if (n == "train_log.jsonl" && after_step < 0) {
      fs::remove(path, ec);
    }
  }
}

struct Trainer::State {
  int rank = 0, world = 1;
  bool main = true;  // rank 0: writes checkpoints, the log, validation images and the result
  std::vector<NamedParameter> params;
  std::unique_ptr<AdamW> opt;
  std::unique_ptr<EMAModel> ema;
  at::Generator gen;
  at::Tensor alphas_cumprod;
  std::string prediction_type;
  int num_train_timesteps = 1000;
  double scaling_factor = 0.18215;
  int64_t global_step = 0;
  int64_t first_step = 0;    // optimizer steps done before this run (resume)
  std::string resumed_from;  // the checkpoint resumed from ("" = a fresh run)
  std::ofstream log;         // <output_dir>/train_log.jsonl (rank 0)
  bool tty = false;          // progress line on stderr
  std::chrono::steady_clock::time_point t_loop;
  // Latent cache: row index -> VAE posterior (mean, std), each row encoded alone so that the values do not
  // depend on which batch first met the row (a resumed run computes the same values).
  std::map<int64_t, std::pair<at::Tensor, at::Tensor>> latent_cache;
};

Trainer::Trainer(TrainConfig cfg, std::shared_ptr<Recipe> recipe, std::shared_ptr<BatchSource> data,
                 std::shared_ptr<Distributed> dist)
    : cfg_(std::move(cfg)), recipe_(std::move(recipe)), data_(std::move(data)), dist_(std::move(dist)) {
  DMX_CHECK_ARG(recipe_ != nullptr, "Trainer: recipe must not be null");
  DMX_CHECK_ARG(data_ != nullptr, "Trainer: batch source must not be null");
  DMX_CHECK_ARG(cfg_.max_train_steps > 0, "--steps must be > 0, got ", cfg_.max_train_steps);
  DMX_CHECK_ARG(cfg_.train_batch_size > 0, "--batch-size must be > 0, got ", cfg_.train_batch_size);
  DMX_CHECK_ARG(cfg_.gradient_accumulation_steps > 0, "--gradient-accumulation-steps must be > 0, got ",
                cfg_.gradient_accumulation_steps);
  DMX_CHECK_ARG(std::isfinite(cfg_.learning_rate) && cfg_.learning_rate > 0, "--learning-rate must be > 0, got ",
                cfg_.learning_rate);
  DMX_CHECK_ARG(cfg_.lr_warmup_steps >= 0, "--lr-warmup-steps must be >= 0, got ", cfg_.lr_warmup_steps);
  DMX_CHECK_ARG(cfg_.snr_gamma >= 0, "--snr-gamma must be >= 0, got ", cfg_.snr_gamma);
  DMX_CHECK_ARG(cfg_.noise_offset >= 0, "--noise-offset must be >= 0, got ", cfg_.noise_offset);
  DMX_CHECK_ARG(cfg_.proportion_empty_prompts >= 0 && cfg_.proportion_empty_prompts <= 1,
                "--proportion-empty-prompts must be in [0, 1], got ", cfg_.proportion_empty_prompts);
  DMX_CHECK_ARG(cfg_.checkpointing_steps >= 0, "--checkpoint-every must be >= 0, got ", cfg_.checkpointing_steps);
  DMX_CHECK_ARG(cfg_.ema_decay >= 0 && cfg_.ema_decay <= 1, "--ema-decay must be in [0, 1], got ", cfg_.ema_decay);
  DMX_CHECK_ARG(
      cfg_.prediction_type.empty() || cfg_.prediction_type == "epsilon" || cfg_.prediction_type == "v_prediction",
      "--prediction-type must be epsilon or v_prediction, got '", cfg_.prediction_type, "'");
  DMX_CHECK_ARG(cfg_.validation_steps == 0 || !cfg_.validation_prompt.empty(),
                "--validation-steps needs --validation-prompt");
  DMX_CHECK_ARG(!cfg_.output.empty() || !cfg_.output_dir.empty(), "--output must be given");
  if (cfg_.output_dir.empty()) cfg_.output_dir = cfg_.output + ".train";
}

Trainer::~Trainer() = default;

// The loop, in named steps: prepare (parameters, noise schedule, optimizer, EMA, generator), resume, then per
// optimizer step the micro-steps (data, draws, loss, backward), the update, the report, checkpoints and
// validation; at the end the final checkpoint and the result.
TrainResult Trainer::run() {
  State st;
  prepare(st);
  TrainResult res;
  resume(st);
  res.first_step = st.first_step = st.global_step;
  open_log(st, res.first_step > 0);
  recipe_->train_mode(true);
  DMX_CHECK_ARG(!cfg_.cache_latents || data_->latents_cacheable(),
                "--cache-latents needs a dataset whose images never change: center crop and no random flip "
                "(and not DreamBooth's mixed instance/class batches)");
  std::string last_ck;
  const int64_t end_step =
      cfg_.stop_at_step > 0 ? std::min(cfg_.stop_at_step, cfg_.max_train_steps) : cfg_.max_train_steps;
  st.t_loop = std::chrono::steady_clock::now();
  for (int64_t step = st.global_step; step < end_step; ++step) {
    const StepRecord rec = optimizer_step(st, step);
    res.history.push_back(rec);
    report(st, rec);
    const bool last = st.global_step == end_step;
    if (cfg_.checkpointing_steps > 0 && st.global_step % cfg_.checkpointing_steps == 0 && !last)
      last_ck = save_checkpoint(st, st.global_step);
    if (cfg_.validation_steps > 0 && st.global_step % cfg_.validation_steps == 0 && st.main) validate(st);
  }
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - st.t_loop).count();
  res.steps = st.global_step;
  const double samples = static_cast<double>((res.steps - res.first_step) * cfg_.train_batch_size * st.world *
                                             cfg_.gradient_accumulation_steps);
  res.samples_per_s = res.seconds > 0 ? samples / res.seconds : 0.0;
  recipe_->train_mode(false);
  st.opt->zero_grad();
  // A resumed run that had no step left to do keeps the checkpoint it resumed from (not rewritten).
  if (cfg_.save_final_checkpoint && st.global_step > res.first_step) last_ck = save_checkpoint(st, st.global_step);
  if (last_ck.empty() && st.global_step == res.first_step) last_ck = st.resumed_from;
  res.last_checkpoint = last_ck;
  if (st.main && !cfg_.output.empty() && st.global_step == cfg_.max_train_steps) {
    save_result(st);
    res.wrote_output = true;
  }
  if (dist_) dist_->barrier();
  res.peak_rss_bytes = peak_rss_bytes();
  return res;
}

// 1. The recipe's trainable parameters (the same on every rank), the noise schedule (DDPMScheduler from the
// model's scheduler config), AdamW, EMA and the one generator every draw comes from.
void Trainer::prepare(State& st) {
  st.rank = dist_ ? dist_->rank() : 0;
  st.world = dist_ ? dist_->world_size() : 1;
  st.main = st.rank == 0;
  recipe_->setup(cfg_);
  st.params = recipe_->trainable_parameters();
  DMX_CHECK_ARG(!st.params.empty(), "recipe ", recipe_->name(), " has no trainable parameters");
  for (const auto& p : st.params)
    DMX_CHECK_ARG(p.tensor.is_leaf() && p.tensor.requires_grad() && p.tensor.scalar_type() == at::kFloat,
                  "trainable parameter '", p.name, "' must be a float32 leaf that requires grad");
  if (dist_)
    dist_->broadcast([&] {
      std::vector<at::Tensor> v;
      for (auto& p : st.params) v.push_back(p.tensor.detach());
      return v;
    }());

  auto& m = recipe_->models();
  const auto scfg = schedulers::SchedulerConfig::for_class("DDPMScheduler", m.scheduler_config);
  st.alphas_cumprod = at::cumprod(1.0 - schedulers::make_betas(scfg), 0);  // float32 [T]
  st.num_train_timesteps = scfg.num_train_timesteps;
  st.prediction_type = cfg_.prediction_type.empty() ? scfg.prediction_type : cfg_.prediction_type;
  DMX_CHECK_SUPPORTED(st.prediction_type == "epsilon" || st.prediction_type == "v_prediction",
                      "training supports prediction_type epsilon or v_prediction, got '", st.prediction_type, "'");
  if (!m.vae.is_empty()) st.scaling_factor = m.vae->config().scaling_factor;

  AdamWOptions ao;
  ao.lr = cfg_.learning_rate;
  ao.beta1 = cfg_.adam_beta1;
  ao.beta2 = cfg_.adam_beta2;
  ao.eps = cfg_.adam_epsilon;
  ao.weight_decay = cfg_.adam_weight_decay;
  st.opt = std::make_unique<AdamW>(st.params, ao);
  if (cfg_.use_ema)
    st.ema = std::make_unique<EMAModel>(st.params, cfg_.ema_decay, cfg_.ema_min_decay, cfg_.ema_update_after_step);
  st.gen = at::make_generator<at::CPUGeneratorImpl>(cfg_.seed);
}

// 2. --resume: parameters, optimizer, EMA, recipe state, generator state and the step counter of a checkpoint.
void Trainer::resume(State& st) {
  if (cfg_.resume_from_checkpoint.empty()) return;
  const std::string ck = find_latest_checkpoint(cfg_.resume_from_checkpoint);
  const std::string state_path = join_path(ck, "trainer_state.json");
  nlohmann::json js;
  try {
    js = nlohmann::json::parse(read_text_file(state_path, "--resume", kMaxJsonFileBytes));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(detail::concat("--resume: ", state_path, " is not valid JSON: ", e.what()));
  }
  DMX_CHECK_FORMAT(js.is_object(), "--resume: ", state_path, " must be a JSON object");
  // Every field read is checked for its type and range: a malformed file is a FormatError naming it.
  auto integer = [&](const char* key, int64_t def, int64_t lo, int64_t hi) -> int64_t {
    auto it = js.find(key);
    if (it == js.end()) {
      DMX_CHECK_FORMAT(def >= lo, "--resume: ", state_path, " has no '", key, "'");
      return def;
    }
    DMX_CHECK_FORMAT(
        it->is_number_integer() && (it->is_number_unsigned() ? it->get<uint64_t>() <= uint64_t(hi)
                                                             : it->get<int64_t>() >= lo && it->get<int64_t>() <= hi),
        "--resume: ", state_path, ": '", key, "' must be an integer in [", lo, ", ", hi, "], got ", it->dump());
    return it->get<int64_t>();
  };
  auto text = [&](const char* key) -> std::string {
    auto it = js.find(key);
    if (it == js.end()) return "";
    DMX_CHECK_FORMAT(it->is_string(), "--resume: ", state_path, ": '", key, "' must be a string, got ", it->dump());
    return it->get<std::string>();
  };
  DMX_CHECK_FORMAT(text("recipe") == recipe_->name(), "--resume: ", ck, " is a checkpoint of recipe '", text("recipe"),
                   "', this run is '", recipe_->name(), "'");
  const int64_t ck_world = integer("world_size", 1, 1, 1 << 20), ck_batch = integer("train_batch_size", 1, 1, 1 << 20);
  DMX_CHECK_FORMAT(ck_world * ck_batch == st.world * cfg_.train_batch_size, "--resume: ", ck,
                   " was trained with a global batch of ", ck_world * ck_batch, ", this run has ",
                   st.world * cfg_.train_batch_size);
  // The random stream continues from the checkpoint: another seed would match neither run.
  if (auto it = js.find("seed"); it != js.end()) {
    DMX_CHECK_FORMAT(it->is_number_unsigned() || (it->is_number_integer() && it->get<int64_t>() >= 0),
                     "--resume: ", state_path, ": 'seed' must be an integer >= 0, got ", it->dump());
    const uint64_t ck_seed = it->get<uint64_t>();
    DMX_CHECK_ARG(ck_seed == cfg_.seed, "--resume: ", ck, " was trained with --seed ", ck_seed,
                  ", this run has --seed ", cfg_.seed, ": resume with --seed ", ck_seed,
                  " (a resumed run continues the checkpoint's random "
                  "stream; another seed would match neither run)");
  }
  const int64_t ck_step = integer("global_step", -1, 0, int64_t(1) << 40);
  DMX_CHECK_ARG(ck_step <= cfg_.max_train_steps, "--resume: ", ck, " is at step ", ck_step, ", past --steps ",
                cfg_.max_train_steps, "; give --steps ", ck_step, " or more");
  const io::TensorMap tp = io::load_safetensors(join_path(ck, "trainable.safetensors"));
  {
    at::NoGradGuard no_grad;
    for (auto& p : st.params) {
      const at::Tensor& v = need_entry(tp, p.name, "--resume " + ck);
      DMX_CHECK_FORMAT(v.sizes() == p.tensor.sizes(), "--resume: '", p.name, "' has shape ", v.sizes(),
                       " in the checkpoint, ", p.tensor.sizes(), " in the model");
      p.tensor.copy_(v);
    }
  }
  const io::TensorMap os = io::load_safetensors(join_path(ck, "optimizer.safetensors"));
  st.opt->load_state_dict(os);
  if (st.ema) st.ema->load_state_dict(os);
  io::TensorMap extra;
  for (const auto& [k, v] : os)
    if (k.rfind("recipe.", 0) == 0) extra[k.substr(7)] = v;
  recipe_->load_extra_state(extra);
  st.gen.set_state(need_entry(os, "rng_state", "--resume " + ck));
  st.global_step = ck_step;
  st.resumed_from = ck;
  if (st.main) log_info("resumed from " + ck + " at step " + std::to_string(st.global_step));
}

void Trainer::open_log(State& st, bool append) {
  const std::string log_path = join_path(cfg_.output_dir, "train_log.jsonl");
  if (st.main) {
    fs::create_directories(cfg_.output_dir);
    // What killed runs left (checkpoint-N.tmp.<pid> of processes that no longer run), then the log cut back to
    // the resumed step.
    for (const auto& p : remove_stale_temporaries(cfg_.output_dir, is_training_entry))
      log_info("removed " + p + " (left by an interrupted run)");
    if (cfg_.write_log && append) truncate_log(log_path, st.first_step);
  }
  if (st.main && cfg_.write_log) {
    st.log.open(log_path, append ? std::ios::app : std::ios::trunc);
    if (!st.log.is_open()) throw_write_error("cannot open " + log_path, errno);
  }
  st.tty = isatty(STDERR_FILENO) && !cfg_.quiet && log_level() != LogLevel::kQuiet && st.main;
}

// A checkpoint of the state after `step` optimizer steps: written into a temporary folder and renamed, so a
// checkpoint is complete or absent (rank 0; every rank meets at the barrier).
std::string Trainer::save_checkpoint(State& st, int64_t step) {
  if (dist_) dist_->barrier();
  if (!st.main) return "";
  const std::string final_dir = join_path(cfg_.output_dir, checkpoint_name(step));
  // Written into checkpoint-N.tmp.<pid> (registered: SIGINT/SIGTERM remove the whole folder, not only the file
  // being written) and renamed into place, so a checkpoint is complete or absent.
  write_directory_atomic(final_dir, "the checkpoint", [&](const std::string& tmp) {
    io::TensorMap tp;
    for (const auto& p : st.params) tp[p.name] = p.tensor.detach();
    io::save_safetensors(join_path(tmp, "trainable.safetensors"), tp);
    io::TensorMap os = st.opt->state_dict();
    if (st.ema)
      for (auto& [k, v] : st.ema->state_dict()) os[k] = v;
    for (auto& [k, v] : recipe_->extra_state()) os["recipe." + k] = v;
    os["rng_state"] = st.gen.get_state();
    io::save_safetensors(join_path(tmp, "optimizer.safetensors"), os);
    nlohmann::json js;
    js["recipe"] = recipe_->name();
    js["global_step"] = step;
    js["micro_step"] = step * cfg_.gradient_accumulation_steps;
    js["max_train_steps"] = cfg_.max_train_steps;
    js["seed"] = cfg_.seed;
    js["train_batch_size"] = cfg_.train_batch_size;
    js["world_size"] = st.world;
    js["gradient_accumulation_steps"] = cfg_.gradient_accumulation_steps;
    js["learning_rate"] = cfg_.learning_rate;
    js["lr_scheduler"] = lr_schedule_name(cfg_.lr_scheduler);
    js["lr_step"] = step;
    js["prediction_type"] = st.prediction_type;
    js["use_ema"] = cfg_.use_ema;
    const std::string text = js.dump(2) + "\n";
    write_bytes_atomic(join_path(tmp, "trainer_state.json"), text.data(), text.size());
  });
  prune_checkpoints(cfg_.output_dir, cfg_.checkpoints_total_limit);
  return final_dir;
}

// The VAE posterior of a batch from the latent cache (each new row encoded alone).
std::pair<at::Tensor, at::Tensor> Trainer::cached_posterior(State& st, const Batch& batch) {
  std::vector<at::Tensor> means, stds;
  for (size_t i = 0; i < batch.indices.size(); ++i) {
    auto it = st.latent_cache.find(batch.indices[i]);
    if (it == st.latent_cache.end()) {
      Batch one;
      one.pixel_values = batch.pixel_values.narrow(0, static_cast<int64_t>(i), 1);
      if (batch.conditioning.defined()) one.conditioning = batch.conditioning.narrow(0, static_cast<int64_t>(i), 1);
      one.captions = {batch.captions.at(i)};
      one.indices = {batch.indices[i]};
      at::NoGradGuard no_grad;
      auto [m, s] = recipe_->encode_images(one);
      it = st.latent_cache.emplace(batch.indices[i], std::make_pair(m.detach().clone(), s.detach().clone())).first;
    }
    means.push_back(it->second.first);
    stds.push_back(it->second.second);
  }
  return std::make_pair(at::cat(means, 0), at::cat(stds, 0));
}

// 3. One micro-step: the batch, the draws (in the documented order), the loss and its backward. Returns the
// loss (backward ran on loss / accumulation steps).
double Trainer::micro_step(State& st, int64_t micro) {
  const int accum = cfg_.gradient_accumulation_steps;
  const Batch batch = data_->get(micro);
  // Rows of this rank's batch: train_batch_size, or more when the recipe's source adds rows (DreamBooth's
  // class images). The draws cover the rows of every rank.
  DMX_CHECK_ARG(batch.pixel_values.defined() && batch.pixel_values.dim() == 4 && batch.pixel_values.size(0) > 0 &&
                    batch.pixel_values.size(0) == static_cast<int64_t>(batch.captions.size()),
                "batch of micro-step ", micro, ": pixel_values must be [B, 3, H, W] with one caption per row");
  const int64_t rows = batch.pixel_values.size(0);
  const int64_t G = rows * st.world, r0 = st.rank * rows;
  const at::Tensor custom = recipe_->custom_loss(batch, st.gen, r0, G);
  if (custom.defined()) {
    at::Tensor loss = recipe_->reduce_loss(custom, batch);
    const double value = loss.item<double>();
    DMX_CHECK_ARG(std::isfinite(value), "training loss is not finite (", value, ") at micro-step ", micro,
                  "; lower --learning-rate or check the data");
    (loss / static_cast<double>(accum)).backward();
    return value;
  }
  DMX_CHECK_ARG(!cfg_.cache_latents || batch.indices.size() == batch.captions.size(),
                "--cache-latents: the batch source gives no row indices");
  auto [mean, stdv] = cfg_.cache_latents ? cached_posterior(st, batch) : recipe_->encode_images(batch);  // [B, 4, h, w]
  std::vector<int64_t> gshape(mean.sizes().begin(), mean.sizes().end());
  gshape[0] = G;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor post = at::randn(gshape, st.gen, f32).narrow(0, r0, rows);
  const at::Tensor latents = (mean + stdv * post) * st.scaling_factor;
  at::Tensor noise = at::randn(gshape, st.gen, f32).narrow(0, r0, rows);
  if (cfg_.noise_offset > 0)
    noise = noise + cfg_.noise_offset * at::randn({G, gshape[1], 1, 1}, st.gen, f32).narrow(0, r0, rows);
  const at::Tensor tg = recipe_->sample_timesteps(st.gen, G, st.num_train_timesteps);
  DMX_CHECK_ARG(tg.defined() && tg.dim() == 1 && tg.size(0) == G && tg.scalar_type() == at::kLong, "recipe ",
                recipe_->name(), ": sample_timesteps must return [", G, "] int64 timesteps");
  DMX_CHECK_ARG(tg.min().item<int64_t>() >= 0 && tg.max().item<int64_t>() < st.num_train_timesteps, "recipe ",
                recipe_->name(), ": sample_timesteps must return timesteps in [0, ", st.num_train_timesteps, ")");
  const at::Tensor t = tg.narrow(0, r0, rows);
  const at::Tensor noisy = ddpm_add_noise(st.alphas_cumprod, latents, noise, t);
  at::Tensor ehs;
  if (cfg_.proportion_empty_prompts > 0) {
    const at::Tensor u = at::rand({G}, st.gen, f32).narrow(0, r0, rows);
    Batch dropped = batch;
    for (int64_t i = 0; i < rows; ++i)
      if (u[i].item<double>() < cfg_.proportion_empty_prompts) dropped.captions[static_cast<size_t>(i)].clear();
    ehs = recipe_->encode_prompt(dropped);
  } else {
    ehs = recipe_->encode_prompt(batch);
  }
  recipe_->draw_conditioning(batch, st.gen, r0, G);
  const at::Tensor target =
      st.prediction_type == "epsilon" ? noise : ddpm_velocity(st.alphas_cumprod, latents, noise, t);
  const at::Tensor pred = recipe_->predict(noisy, t, ehs, batch).to(at::kFloat);
  at::Tensor per = (pred - target).pow(2).mean(std::vector<int64_t>{1, 2, 3});  // [B]
  if (cfg_.snr_gamma > 0)
    per = per * min_snr_weights(compute_snr(st.alphas_cumprod, t), cfg_.snr_gamma, st.prediction_type);
  at::Tensor loss = recipe_->reduce_loss(per, batch);
  const double value = loss.item<double>();
  DMX_CHECK_ARG(std::isfinite(value), "training loss is not finite (", value, ") at micro-step ", micro,
                "; lower --learning-rate or check the data");
  (loss / static_cast<double>(accum)).backward();
  return value;
}

// 4. One optimizer step: the accumulated micro-steps, the mean over ranks, clipping, the LR schedule, AdamW and
// EMA.
StepRecord Trainer::optimizer_step(State& st, int64_t step) {
  const auto t0 = std::chrono::steady_clock::now();
  const int accum = cfg_.gradient_accumulation_steps;
  st.opt->zero_grad();
  double loss_sum = 0;
  for (int k = 0; k < accum; ++k) loss_sum += micro_step(st, step * accum + k);
  double loss = loss_sum / accum;
  if (dist_) {
    dist_->all_reduce_mean_gradients([&] {
      std::vector<at::Tensor> v;
      for (auto& p : st.params) v.push_back(p.tensor);
      return v;
    }());
    loss = dist_->all_reduce_mean(loss);
  }
  const double grad_norm = clip_grad_norm(st.params, cfg_.max_grad_norm);
  const double lr = cfg_.learning_rate * lr_lambda(cfg_.lr_scheduler, step, cfg_.lr_warmup_steps, cfg_.max_train_steps);
  st.opt->step(lr);
  if (st.ema) st.ema->step(st.params);
  st.global_step = step + 1;

  StepRecord rec;
  rec.step = st.global_step;
  rec.loss = loss;
  rec.lr = lr;
  rec.grad_norm = grad_norm;
  rec.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rec;
}

// 5. The log line, the progress line and the on_step observer.
void Trainer::report(State& st, const StepRecord& rec) {
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - st.t_loop).count();
  const double its = static_cast<double>(st.global_step - st.first_step) / std::max(elapsed, 1e-9);
  if (st.log.is_open()) {
    nlohmann::json j;
    j["step"] = rec.step;
    j["loss"] = rec.loss;
    j["lr"] = rec.lr;
    j["grad_norm"] = rec.grad_norm;
    j["step_seconds"] = rec.seconds;
    j["samples_per_s"] = its * static_cast<double>(cfg_.train_batch_size * st.world * cfg_.gradient_accumulation_steps);
    j["elapsed_s"] = elapsed;
    st.log << j.dump() << "\n";
    st.log.flush();
    if (!st.log.good()) throw_write_error("cannot write " + join_path(cfg_.output_dir, "train_log.jsonl"), errno);
  }
  if (st.tty) {
    const int64_t done = st.global_step, total = cfg_.max_train_steps;
    const int width = 24;
    const int filled = static_cast<int>(width * done / total);
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(width, '.');
    std::fprintf(stderr, "\rtrain %s [%s] %lld/%lld loss %.4f lr %.2e %.2f it/s ETA %s   ", recipe_->name().c_str(),
                 bar.c_str(), static_cast<long long>(done), static_cast<long long>(total), rec.loss, rec.lr, its,
                 format_duration(static_cast<double>(total - done) / its).c_str());
    if (done == total) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }
  if (on_step) on_step(rec);
}

// 6. Validation images (rank 0), in eval mode and, with --mixed-precision bf16, in float32.
void Trainer::validate(State& st) {
  recipe_->train_mode(false);
  {
    std::unique_ptr<Float32Scope> fp32;
    if (cfg_.mixed_precision == MixedPrecision::BF16) fp32 = std::make_unique<Float32Scope>(recipe_->models());
    recipe_->validate(cfg_, st.global_step, cfg_.output_dir);
  }
  recipe_->train_mode(true);
}

// 7. The result (rank 0). With EMA it carries the EMA weights; the live weights are put back afterwards.
void Trainer::save_result(State& st) {
  if (!st.ema) {
    recipe_->save(cfg_.output);
    return;
  }
  std::vector<at::Tensor> live;
  for (auto& p : st.params) live.push_back(p.tensor.detach().clone());
  st.ema->copy_to(st.params);
  recipe_->save(cfg_.output);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < live.size(); ++i) st.params[i].tensor.copy_(live[i]);
}

}  // namespace dmx::training
