// The training loop shared by every recipe (fine-tune, LoRA, DreamBooth, ControlNet), one explicit loop as
// in diffusers 0.27.2 examples/text_to_image/train_text_to_image.py (+ _lora.py, dreambooth/, controlnet/):
//   latents = vae.encode(pixels).sample() * scaling_factor
//   noise   = randn_like(latents) [+ noise_offset * randn(B, C, 1, 1)]
//   t       = randint(0, num_train_timesteps, (B,))
//   noisy   = DDPM add_noise(latents, noise, t)
//   target  = noise (epsilon) or sqrt(a_t) noise - sqrt(1 - a_t) latents (v_prediction, get_velocity)
//   loss    = mean MSE(pred, target), optionally min-SNR-gamma weighted (Hang et al. 2023, "Efficient
//             Diffusion Training via Min-SNR Weighting Strategy"; diffusers training_utils.compute_snr)
//   AdamW (torch.optim.AdamW formula) on the recipe's parameters, gradient accumulation (loss / accum),
//   gradient clipping (torch.nn.utils.clip_grad_norm_), LR schedule per optimizer step (diffusers
//   optimization.get_scheduler), EMA (diffusers training_utils.EMAModel), checkpoints and exact resume.
//
// Randomness: one CPU generator seeded with `seed`; per micro-step, in this order, for the GLOBAL batch
// (world_size * train_batch_size rows, every rank drawing the same numbers and keeping its own rows):
//   1. VAE posterior noise  [G, 4, h, w]
//   2. noise                [G, 4, h, w]
//   3. offset noise         [G, 4, 1, 1]   (only when noise_offset > 0)
//   4. timesteps            [G]            (int64; Recipe::sample_timesteps: randint by default, the T2I-Adapter
//                                           recipe's cubic draw with rand, cubic_timesteps)
//   4b. caption dropout     [G]            (rand, only when proportion_empty_prompts > 0)
//   5. whatever the recipe's hooks draw, from the same generator (Recipe::draw_conditioning: the unCLIP decoder's
//      noise levels, embedding noise and embedding dropout; the other built-in recipes draw nothing)
// The generator state, AdamW state, LR step, EMA weights and the step counters go into every checkpoint,
// so a resumed run equals an uninterrupted one bit for bit (same machine and thread count).
// Internal header of the training layer.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/image.h"
#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "models/controlnet.h"
#include "models/t2i_adapter.h"
#include "training/dataset.h"

namespace dmx::training {

class Distributed;

enum class LRSchedule { Constant, ConstantWithWarmup, Linear, Cosine };
LRSchedule parse_lr_schedule(const std::string& s);  // constant | constant_with_warmup | linear | cosine
const char* lr_schedule_name(LRSchedule s);
enum class MixedPrecision { No, BF16 };
MixedPrecision parse_mixed_precision(const std::string& s);  // no | fp32 | bf16

// Size limits of a training step (docs/limits.md), checked with the options before anything loads: the
// per-process batch of --batch-size images at --resolution^2 pixels holds at most kMaxBatchPixels pixels
// (16 images at 512, 1024 at 64); larger effective batches come from --gradient-accumulation-steps.
constexpr int kMaxBatchSize = 1024;
constexpr int64_t kMaxBatchPixels = 2048ll * 2048;
// InvalidArgument naming --batch-size, the rule and the limits.
void check_batch_size(int64_t batch_size, int64_t resolution);

// Text-to-image for validation images and DreamBooth's class images. Training never runs a pipeline itself:
// the caller passes this callback (api/train.cpp: the Stable Diffusion pipeline), so the training layer
// depends on loaders and models only.
struct SampleRequest {
  std::string prompt;
  int width = 0, height = 0;  // 0 = the model's default size
  int num_inference_steps = 20;
  int num_images = 1;
  double guidance_scale = 7.5;
  uint64_t seed = 0;
  // Optional ControlNet at scale 1 on control_image ([1, C, H, W] float32 in [0, 1], the output size).
  models::ControlNetModel controlnet{nullptr};
  at::Tensor control_image;
  // Optional T2I-Adapter at scale 1 on adapter_image (8 bits, resized to the output size if it differs).
  models::T2IAdapter adapter{nullptr};
  Image adapter_image;
};
// Returns the images: [N, H, W, 3] float32 in [0, 1].
using SampleImages =
    std::function<at::Tensor(std::shared_ptr<loaders::StableDiffusionModels> models, const SampleRequest& request)>;

struct TrainConfig {
  // Where the recipe writes its result (file or folder) and where checkpoints, the JSONL log and
  // validation images go (default: "<output>.train"). At the start, rank 0 removes what killed runs left there
  // (checkpoint-N.tmp.<pid> of dead processes) and, on resume, cuts train_log.jsonl back to the resumed step.
  // Whether output and output_dir may be written at all is the caller's check (api::OutputPlan).
  std::string output;
  std::string output_dir;

  int64_t max_train_steps = 100;  // optimizer steps
  int train_batch_size = 1;       // per rank and micro-step
  int gradient_accumulation_steps = 1;
  uint64_t seed = 0;

  // AdamW (diffusers' defaults).
  double learning_rate = 1e-4;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_weight_decay = 1e-2;
  double adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;  // <= 0: no clipping
  LRSchedule lr_scheduler = LRSchedule::Constant;
  int64_t lr_warmup_steps = 0;

  // Loss.
  std::string prediction_type;  // "" = the scheduler config's; epsilon | v_prediction
  double snr_gamma = 0.0;       // > 0: min-SNR-gamma weighting
  double noise_offset = 0.0;    // > 0: noise += noise_offset * randn(B, C, 1, 1)
  // > 0: each caption is replaced by "" with this probability (diffusers' --proportion_empty_prompts), so the
  // model also learns the unconditional prediction classifier-free guidance needs. Drawn after the timesteps.
  double proportion_empty_prompts = 0.0;

  // EMA of the trainable parameters (the saved result uses the EMA weights).
  bool use_ema = false;
  double ema_decay = 0.9999;
  double ema_min_decay = 0.0;
  int64_t ema_update_after_step = 0;

  MixedPrecision mixed_precision = MixedPrecision::No;
  bool gradient_checkpointing = false;
  // Encode each training image with the VAE once and keep its posterior (mean, std) in memory; the posterior
  // sample is still drawn every step. Needs a source whose examples never change (center crop, no flip).
  bool cache_latents = false;

  int64_t checkpointing_steps = 0;  // 0: only the final checkpoint
  int checkpoints_total_limit = 0;  // > 0: keep the newest N checkpoints
  bool save_final_checkpoint = true;
  // A checkpoint folder (".../checkpoint-N") or an output_dir (its newest checkpoint); "" = fresh start.
  std::string resume_from_checkpoint;
  // > 0: stop after this many optimizer steps (with the final checkpoint, without writing `output`), as an
  // interrupted run would; the LR schedule still spans max_train_steps. For tests and time-boxed runs.
  int64_t stop_at_step = 0;

  int64_t validation_steps = 0;  // 0: no validation images
  std::string validation_prompt;
  int num_validation_images = 1;
  int validation_inference_steps = 20;
  // Draws the validation images of the recipes that sample (all but the VAE's reconstructions).
  SampleImages sample_images;

  bool quiet = false;
  bool write_log = true;  // <output_dir>/train_log.jsonl, one line per optimizer step
};

// One trainable tensor with a stable name (checkpoint key). The tensor is the leaf the optimizer updates
// (float32 master weights); recipes may run their forward on lower-precision copies of it.
struct NamedParameter {
  std::string name;
  at::Tensor tensor;
};

// Where the examples of a micro-step come from: this rank's share of the global batch. Must be a pure
// function of micro_step (resume restarts at any step without data-loader state).
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual Batch get(int64_t micro_step) = 0;
  virtual size_t size() const = 0;  // examples in one epoch (for messages)
  // True when Batch::indices name fixed examples (same pixels every time), so latents can be cached.
  virtual bool latents_cacheable() const { return false; }
};

// ImageCaptionDataset + BatchSampler (the CLI's source).
class DatasetBatchSource : public BatchSource {
 public:
  DatasetBatchSource(std::shared_ptr<ImageCaptionDataset> ds, int batch_size_per_rank, int rank, int world_size,
                     uint64_t seed, bool shuffle = true);
  Batch get(int64_t micro_step) override;
  size_t size() const override { return ds_->size(); }
  bool latents_cacheable() const override { return ds_->options().center_crop && !ds_->options().random_flip; }

 private:
  std::shared_ptr<ImageCaptionDataset> ds_;
  BatchSampler sampler_;
  int batch_size_, rank_;
};

// What a recipe provides to the loop. The default hooks do what train_text_to_image.py does.
class Recipe {
 public:
  explicit Recipe(std::shared_ptr<loaders::StableDiffusionModels> models) : models_(std::move(models)) {}
  virtual ~Recipe() = default;
  virtual std::string name() const = 0;
  loaders::StableDiffusionModels& models() { return *models_; }
  std::shared_ptr<loaders::StableDiffusionModels> models_ptr() { return models_; }

  // Called once before the loop: freeze what is frozen, cast frozen parts for mixed precision, enable
  // gradient checkpointing, create adapters.
  virtual void setup(const TrainConfig& cfg) {}
  // The tensors the optimizer updates, in a fixed order (the same on every rank).
  virtual std::vector<NamedParameter> trainable_parameters() = 0;
  // Sets train / eval mode of the trained modules.
  virtual void train_mode(bool on) {}
  // Text conditioning of a batch: [B, 77, D]. Default: CLIP tokenizer (padded to max_length) + text
  // encoder last hidden state, with grad only when text_encoder_trainable().
  virtual at::Tensor encode_prompt(const Batch& batch);
  virtual bool text_encoder_trainable() const { return false; }
  // Latent distribution moments of the batch's pixels ([B, 4, h, w] mean and std, float32, no grad).
  // Default: the frozen VAE.
  virtual std::pair<at::Tensor, at::Tensor> encode_images(const Batch& batch);
  // Draw 4 of the documented order: the timesteps of the global batch, [global_rows] int64 in
  // [0, num_train_timesteps), from `gen` (the trainer keeps this rank's rows). Default: uniform,
  // randint(0, num_train_timesteps, (G,)) as train_text_to_image.py.
  virtual at::Tensor sample_timesteps(at::Generator& gen, int64_t global_rows, int64_t num_train_timesteps);
  // Draw 5 of the documented order, after the caption dropout and before predict: what the recipe draws for its own
  // conditioning of this micro-step, for the global batch (global_rows) from `gen`; this rank keeps rows
  // [r0, r0 + rows of `batch`). Default: nothing drawn (the unCLIP decoder draws its class labels here).
  virtual void draw_conditioning(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) {}
  // The model prediction: [B, 4, h, w] (float32 for the loss).
  virtual at::Tensor predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                             const at::Tensor& encoder_hidden_states, const Batch& batch) = 0;
  // Recipes that do not denoise (the VAE) compute their own per-example loss [rows] here; the default returns an
  // undefined tensor and the loop runs the diffusion loss. Random draws come from `gen` and cover the global
  // batch (global_rows = rows * world size; this rank keeps rows [r0, r0 + rows)), like the loop's own draws.
  virtual at::Tensor custom_loss(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) { return {}; }
  // Reduces per-example losses [B] (already min-SNR weighted) to the scalar to minimise. Default: mean.
  // DreamBooth's prior preservation overrides this.
  virtual at::Tensor reduce_loss(const at::Tensor& per_example, const Batch& batch);
  // Writes the result (called on rank 0 only; with EMA the EMA weights are in place during the call).
  virtual void save(const std::string& path) = 0;
  // Validation images into out_dir (rank 0 only). Default: txt2img of cfg.validation_prompt through
  // cfg.sample_images. Runs in float32:
  // with --mixed-precision bf16 the trainer casts the frozen bf16 modules to float32 around the call.
  virtual void validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir);
  // Recipe state beyond the trainable parameters for checkpoints (none for the built-in recipes).
  virtual io::TensorMap extra_state() { return {}; }
  virtual void load_extra_state(const io::TensorMap& s) {}

 protected:
  std::shared_ptr<loaders::StableDiffusionModels> models_;
};

// ---- pieces of the loop, exposed for tests and other recipes ----

// cfg.sample_images with the validation settings (InvalidArgument when the callback is missing).
at::Tensor sample_validation_images(const std::shared_ptr<loaders::StableDiffusionModels>& models,
                                    const TrainConfig& cfg, const models::ControlNetModel& controlnet = nullptr,
                                    const at::Tensor& control_image = {});
// Writes images ([N, H, W, 3] in [0, 1]) as <out_dir>/validation-<step>-<i>.png with the prompt as metadata.
void save_validation_images(const at::Tensor& images, const TrainConfig& cfg, int64_t step, const std::string& out_dir);

// Timestep draws (Recipe::sample_timesteps). uniform_timesteps: randint(0, T, (n,)). cubic_timesteps: the T2I-Adapter
// paper's cubic sampling (Mou et al. 2023, section 3.4; diffusers 0.27.2 examples/t2i_adapter/
// train_t2i_adapter_sdxl.py): u = rand(n) (float32), t = long((1 - u^3) * T) (truncation), clamped to [0, T - 1],
// so late (noisy) timesteps, where the structure of the picture is decided, are drawn more often.
at::Tensor uniform_timesteps(at::Generator& gen, int64_t n, int64_t num_train_timesteps);
at::Tensor cubic_timesteps(at::Generator& gen, int64_t n, int64_t num_train_timesteps);

// diffusers get_scheduler multipliers of the base learning rate at optimizer step `step` (0-based).
double lr_lambda(LRSchedule s, int64_t step, int64_t warmup_steps, int64_t total_steps);

// torch.optim.AdamW (decoupled weight decay, bias-corrected, PyTorch 1.13 single-tensor formula).
struct AdamWOptions {
  double lr = 1e-4, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 1e-2;
};
class AdamW {
 public:
  AdamW(std::vector<NamedParameter> params, AdamWOptions o);
  void step(double lr);  // parameters without a gradient are skipped, like PyTorch
  void zero_grad();
  int64_t steps() const { return step_; }
  io::TensorMap state_dict() const;              // exp_avg.<name>, exp_avg_sq.<name>, step.<name>
  void load_state_dict(const io::TensorMap& s);  // FormatError naming a missing / mis-shaped entry
  const std::vector<NamedParameter>& params() const { return params_; }

 private:
  std::vector<NamedParameter> params_;
  AdamWOptions o_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  std::vector<int64_t> param_steps_;
  int64_t step_ = 0;
};

// torch.nn.utils.clip_grad_norm_ (L2): returns the total norm before clipping.
double clip_grad_norm(const std::vector<NamedParameter>& params, double max_norm);

// diffusers training_utils.EMAModel (no warm-up): decay_t = min(decay, (1 + s) / (10 + s)) with
// s = optimization_step - update_after_step - 1 (0 before), floored at min_decay;
// shadow -= (1 - decay_t) * (shadow - param).
class EMAModel {
 public:
  EMAModel(const std::vector<NamedParameter>& params, double decay, double min_decay, int64_t update_after_step);
  void step(const std::vector<NamedParameter>& params);
  double current_decay() const;
  void copy_to(const std::vector<NamedParameter>& params) const;
  io::TensorMap state_dict() const;  // ema.<name> + ema.optimization_step
  void load_state_dict(const io::TensorMap& s);

 private:
  std::vector<std::string> names_;
  std::vector<at::Tensor> shadow_;
  double decay_, min_decay_;
  int64_t update_after_step_;
  int64_t optimization_step_ = 0;
};

// diffusers training_utils.compute_snr: (sqrt(a_t) / sqrt(1 - a_t))^2 for each timestep ([B] float32).
at::Tensor compute_snr(const at::Tensor& alphas_cumprod, const at::Tensor& timesteps);
// Per-example min-SNR weights ([B]): min(snr, gamma) / snr (epsilon) or / (snr + 1) (v_prediction).
at::Tensor min_snr_weights(const at::Tensor& snr, double gamma, const std::string& prediction_type);
// DDPMScheduler.add_noise and get_velocity at integer timesteps [B].
at::Tensor ddpm_add_noise(const at::Tensor& alphas_cumprod, const at::Tensor& x0, const at::Tensor& noise,
                          const at::Tensor& timesteps);
at::Tensor ddpm_velocity(const at::Tensor& alphas_cumprod, const at::Tensor& x0, const at::Tensor& noise,
                         const at::Tensor& timesteps);

struct StepRecord {
  int64_t step = 0;  // optimizer steps done
  double loss = 0;   // mean over the accumulated micro-steps (and ranks)
  double lr = 0;     // the learning rate used by this step
  double grad_norm = 0;
  double seconds = 0;  // wall time of the step
};

struct TrainResult {
  int64_t first_step = 0;  // optimizer steps done before this run (resume)
  int64_t steps = 0;       // optimizer steps done at the end
  std::vector<StepRecord> history;
  double seconds = 0;         // wall time of the loop
  double samples_per_s = 0;   // global examples per second over the loop
  size_t peak_rss_bytes = 0;  // VmHWM of this process
  std::string last_checkpoint;
  bool wrote_output = false;  // cfg.output was written (rank 0, all steps done)
};

// A checkpoint folder's files: trainable.safetensors (parameters), optimizer.safetensors (AdamW + EMA +
// recipe state + RNG state), trainer_state.json (counters, config summary). Written into a temporary
// folder and renamed, so a checkpoint is complete or absent.
std::string find_latest_checkpoint(const std::string& dir_or_checkpoint);  // InvalidArgument when none
// The global step a checkpoint folder records (FormatError naming the file when trainer_state.json is malformed).
int64_t checkpoint_global_step(const std::string& checkpoint_dir);

// ---- the training folder (output_dir) ----
// Steps of the checkpoint-N folders of dir, ascending (complete or not).
std::vector<int64_t> checkpoint_steps(const std::string& dir);
// Whether a name in a training folder is one the trainer writes: checkpoint-N, train_log.jsonl,
// validation-<step>-<i>.png, reconstruction-<step>.png, or a temporary of one of these ("<name>.tmp.<pid>").
bool is_training_entry(const std::string& name);
// Removes the trainer's own entries of dir that belong to steps after `after_step`; with after_step < 0 all of
// them, train_log.jsonl included. Anything else in dir is left alone. A folder is renamed to a temporary first,
// so an interruption leaves a temporary (removed at the next start) and never a half-deleted checkpoint.
void remove_training_entries(const std::string& dir, int64_t after_step);

class Trainer {
 public:
  // dist may be null (single process).
  Trainer(TrainConfig cfg, std::shared_ptr<Recipe> recipe, std::shared_ptr<BatchSource> data,
          std::shared_ptr<Distributed> dist = nullptr);
  ~Trainer();
  TrainResult run();
  // Optional observer after each optimizer step (progress reporting, tests).
  std::function<void(const StepRecord&)> on_step;

  const TrainConfig& config() const { return cfg_; }

 private:
  struct State;
  // The steps of run(), in order (trainer.cpp).
  void prepare(State& st);
  void resume(State& st);
  void open_log(State& st, bool append);
  StepRecord optimizer_step(State& st, int64_t step);
  double micro_step(State& st, int64_t micro);
  std::pair<at::Tensor, at::Tensor> cached_posterior(State& st, const Batch& batch);
  void report(State& st, const StepRecord& rec);
  void validate(State& st);
  std::string save_checkpoint(State& st, int64_t step);
  void save_result(State& st);

  TrainConfig cfg_;
  std::shared_ptr<Recipe> recipe_;
  std::shared_ptr<BatchSource> data_;
  std::shared_ptr<Distributed> dist_;
};

// Peak resident set size of this process (VmHWM), 0 when unknown.
size_t peak_rss_bytes();
}  // namespace dmx::training
