// dmx public C++ API. Torch-free: include this, link dmx, and generate.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmx/error.h"
#include "dmx/options.h"

namespace dmx {

std::string version();

// One region of a layout map (`--region COLOR=TEXT`): the pixels of `color` ("#rrggbb") carry `text`.
struct LayoutRegion {
  std::string color;
  std::string text;
};

// The layout methods `--layout-method` names (docs/regional.md), in order; the built ones first.
std::vector<std::string> layout_method_names();

// The model, device, sampling and run settings are the shared groups of dmx/options.h.
struct GenerateOptions : ModelOptions, DeviceOptions, SamplingOptions, RunOptions {
  std::string prompt;
  int width = 0;  // 0 = the model's default size
  int height = 0;
  std::string scheduler;  // "" = the model's own (scheduler/scheduler_config.json)
  double eta = 0.0;
  int num_images = 1;
  int clip_skip = 0;
  std::string init_image;  // img2img when set
  double strength = 0.8;
  std::string init_latents;  // safetensors with one tensor "latents" (initial noise)
  std::string save_latents;  // write the final latents here
  std::string output;        // PNG path; with num_images > 1: <stem>-<i>.png
  std::string from;          // the PNG the parameters were read from (`--from`): an input, never written
  // LoRA (docs/lora.md): "FILE[:SCALE]" entries, the scale acting on the UNet and the text encoder alike
  // (default 1); `<lora:NAME:WEIGHT>` tags in the prompts load lora_dir/NAME.safetensors and are removed.
  std::vector<std::string> loras;
  std::string lora_mode = "merged";  // runtime | merged (weights patched, restored after the run)
  std::string lora_dir;
  bool lora_allow_unmatched = false;  // unmatched LoRA keys: a counted warning instead of an error
  // ControlNet (txt2img; diffusers' StableDiffusionControlNetPipeline). The n-th control image, scale, start,
  // end and preprocess belong to the n-th net; scales/starts/ends/preprocess are either one per net or empty
  // (defaults 1.0 / 0.0 / 1.0 / none); a single preprocess value applies to every image.
  std::vector<std::string> controlnets;         // diffusers ControlNet folder or control_model.* .safetensors
  std::vector<std::string> control_images;      // the maps (edges, depth, segmentation, pose drawn as an image)
  std::vector<double> control_scales;           // controlnet_conditioning_scale
  std::vector<double> control_starts;           // control_guidance_start, in [0, 1)
  std::vector<double> control_ends;             // control_guidance_end, in (0, 1]
  std::vector<std::string> control_preprocess;  // "none" | "canny"
  double canny_low = 100.0;                     // cv2.Canny thresholds (diffusers' docs use 100 / 200)
  double canny_high = 200.0;
  bool guess_mode = false;
  std::string save_control_image;  // PNG of the prepared map(s); with several nets: <stem>-<i>.png
  // T2I-Adapters (docs/t2i-adapter.md; diffusers' StableDiffusionAdapterPipeline, txt2img). The n-th image,
  // scale, end and preprocess belong to the n-th adapter; scales are one per adapter or empty (1.0 each);
  // ends and preprocess one per adapter, one for all, or empty (1.0 / none). Several adapters: feature_k =
  // sum_i scale_i * adapter_i(image_i)_k (the pipeline's scale list is MultiAdapter's adapter_weights).
  std::vector<std::string> adapters;            // diffusers T2IAdapter folder, TencentARC .pth or .safetensors
  std::vector<std::string> adapter_images;      // the control pictures (gray or RGB)
  std::vector<double> adapter_scales;           // adapter_conditioning_scale
  std::vector<double> adapter_ends;             // cond_tau: fraction of the steps the features apply, in (0, 1]
  std::vector<std::string> adapter_preprocess;  // "none" | "canny" (--canny-low / --canny-high)
  // A1111 hypernetworks (docs/hypernetworks.md): "FILE[:MULT]" entries applied in order, then the prompts'
  // `<hypernet:NAME:MULT>` tags (hypernetwork_dir/NAME.pt or .safetensors), removed from the text encoded.
  std::vector<std::string> hypernetworks;
  std::string hypernetwork_dir;
  // Blended latent diffusion (docs/editing-blended.md): a text-guided edit of --init-image inside --mask
  // (8-bit gray or RGB PNG/JPEG of the image's size, white = edit) on a normal 4-channel model. With the
  // defaults it reproduces diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet.
  std::string mask;
  std::string background = "latent";      // latent | pixel | poisson | optimize-latents | finetune-decoder
  double blend_start = 0.0;               // fraction of the steps before blending starts, in [0, 1)
  int mask_dilation = 0;                  // progressive mask shrinking: dilated masks first, in [0, 64]
  bool rank = false;                      // write samples best first by their diffusion-classifier score
  std::string blend_variant = "inpaint";  // inpaint (diffusers 0.27.2) | legacy (StableDiffusionInpaintPipelineLegacy)
  // Stable unCLIP (docs/unclip.md): --model a StableUnCLIPPipeline folder (text -> prior -> CLIP image embedding ->
  // decoder). Unset = diffusers' defaults (25 prior steps, prior guidance 4, noise level 0); set for another model:
  // InvalidArgument. The decoder's own defaults there are kUnCLIPSteps and kUnCLIPGuidanceScale.
  std::optional<int> prior_steps;
  std::optional<double> prior_guidance_scale;
  std::optional<int> noise_level;  // in [0, the image_noising_scheduler's num_train_timesteps - 1]
  // Cascade (docs/upscale.md): after the base model, Stable Diffusion's x4 upscaler (a StableDiffusionUpscalePipeline
  // folder) on each picture with the same prompts, drawing from the same generator after the base run. The PNG
  // and --save-latents hold the upscaled result ("upscale_latents"; "latents" stays the base run's).
  std::string upscale_model;
  int upscale_noise_level = 20;  // in [0, the upscaler's max_noise_level]
  int upscale_steps = 75;        // diffusers' defaults for the upscaler
  double upscale_guidance_scale = 9.0;
  // Layout (docs/regional.md): an RGB PNG whose listed colours are regions, each with its own text; the other
  // colours are background. The map has the output size or an integer multiple or fraction of it (the same
  // factor both ways; a downscale only where every block is one colour). txt2img only.
  std::string layout_path;
  std::vector<LayoutRegion> regions;
  std::string layout_method = "regional";  // regional | spatext (a SpaText folder) | scene (a scene folder)
  // regional: multiplies DenseDiffusion's modulation weights (w^c = 1.0 S, w^s = 0.3 S); 0 = the text-only run of
  // the same caption, bit for bit.
  double layout_guidance_scale = 1.0;
  // scene (docs/scene.md): what the unconditional row of classifier-free guidance drops: "text" (the text only,
  // Make-A-Scene's) or "all" (the text and the scene).
  std::string scene_guidance = "text";
};

// StableUnCLIPPipeline.__call__'s decoder defaults (num_inference_steps, guidance_scale), which `dmx generate`
// uses on an unCLIP folder when --steps / --guidance-scale are not given.
constexpr int kUnCLIPSteps = 20;
constexpr double kUnCLIPGuidanceScale = 10.0;
// Whether `model` is a diffusers Stable unCLIP folder (model_index.json's _class_name StableUnCLIPPipeline or
// StableUnCLIPImg2ImgPipeline); false for anything else, unreadable folders included (the loaders say why).
bool is_unclip_model(const std::string& model);
// LatentConsistencyModelPipeline.__call__'s defaults, which `dmx generate` uses on a diffusers folder whose UNet is
// LCM-distilled (time_cond_proj_dim set: docs/lcm.md) when --steps / --guidance-scale are not given.
constexpr int kLCMSteps = 4;
constexpr double kLCMGuidanceScale = 8.5;
// Whether `model` is a diffusers folder whose unet/config.json sets time_cond_proj_dim; false for anything else.
bool is_lcm_distilled_model(const std::string& model);

struct GenerateResult {
  std::vector<std::string> images;  // written files
  uint64_t seed = 0;
  double seconds = 0.0;
  std::vector<double> scores;  // with GenerateOptions::rank: the score of each written image, best first
  std::vector<int> samples;    // with rank: the sample index (in generation order) of each written image
};

// Validates everything first, then loads, generates and writes atomically.
GenerateResult generate(const GenerateOptions& opts);

// Generation metadata in the A1111 "parameters" layout:
//   <prompt>\nNegative prompt: <neg>\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ...
std::string format_parameters(const GenerateOptions& opts, uint64_t seed, int width, int height,
                              const std::string& model_name, const std::string& model_hash = "");
// Parses that text; fields it does not know are ignored. Throws InvalidArgument on unparsable text.
GenerateOptions parse_parameters(const std::string& text, const GenerateOptions& base);
GenerateOptions parse_parameters(const std::string& text);  // on a default GenerateOptions
// The "parameters" text chunk of a PNG (InvalidArgument if the file has none).
std::string read_image_parameters(const std::string& png_path);

// A1111's "Model hash": the first 10 hex digits of the SHA-256 of the checkpoint file; for a diffusers
// folder, of unet/diffusion_pytorch_model.safetensors. "" when there is no such file (sharded UNet).
// Streams the file. model_hash_file names the file hashed.
std::string model_hash(const std::string& model);
std::string model_hash_file(const std::string& model);

// Programs (the CLI) call this once: SIGINT/SIGTERM/SIGHUP then delete any output temporary (file or folder)
// being written before the process ends, so an interrupted run leaves no partial or temporary file; SIGXFSZ is
// ignored, so a write past `ulimit -f` fails like a full disk (SystemError) instead of killing the process.
void install_signal_cleanup();

// Names accepted by GenerateOptions::scheduler: the samplers of the scheduler registry
// (src/schedulers/registry.cpp), in its order.
std::vector<std::string> scheduler_names();

// ---------------------------------------------------------------------------------------------------
// Benchmark (`dmx bench`): models built from a preset with random weights in memory (no download), timed
// after warm-up; medians of `runs` runs. See docs/performance.md.
struct BenchOptions : DeviceOptions {  // dtype fp32 | bf16 | fp16 (CUDA only), device cpu | cuda[:N]
  std::string preset = "sd15";         // sd15 | sd21 | tiny
  int width = 0;                       // 0 = the preset's native size (sd15 512, sd21 768, tiny 64)
  int height = 0;
  int threads = 0;  // 0 = all cores
  int runs = 3;     // timed runs per stage (after one warm-up run)
  int warmup = 1;
  bool measure_peak = true;   // time a 2048^3 GEMM in the dtype for the "share of peak" column
  bool channels_last = true;  // activations in NHWC (the product's default; false: NCHW, for comparison)
  std::string profile;        // when set: op traces of one UNet step and one decode, <profile>.{unet,vae}.json
  bool overwrite = false;     // replace existing trace files
  // The whole-picture figure: `dmx generate` run in-process on a model folder (or single file), each run timed
  // from loading the model to the written PNG (load, text encoding, every step, decode, PNG). "" = not measured.
  std::string picture_model;
  std::string picture_scheduler = "lcm";  // a sampler of the scheduler registry
  int picture_steps = 4;
  double picture_guidance = 1.0;  // LCM pictures: 1 (no classifier-free guidance branch)
  std::string picture_lora;       // FILE[:SCALE] applied to the picture's model (an LCM-LoRA); "" = none
  std::string picture_prompt = "a smiling face with sunglasses";
  // A ControlNet or a T2I-Adapter (or both) on picture_control_image, at scale 1: the price of a conditioned picture.
  std::string picture_controlnet;
  std::string picture_adapter;
  std::string picture_control_image;  // required with picture_controlnet / picture_adapter
};

// Analytic FLOP counts (multiply-add = 2 FLOP; convolutions, linears and attention products only).
struct BenchFlops {
  double text_encode = 0;  // CLIP text encoder, batch 2 (prompt + negative prompt), 77 tokens
  double unet_pass = 0;    // one UNet forward at batch 1
  double unet_step = 0;    // one guided denoising step: UNet at batch 2
  double vae_decode = 0;   // VAE decoder (post_quant_conv + decoder), batch 1
};
BenchFlops bench_flops(const std::string& preset, int width, int height);

struct BenchResult {
  std::string preset, dtype, device;
  int width = 0, height = 0, threads = 0, runs = 0;
  bool channels_last = true;                                    // NHWC activations were used (bf16/fp16 only)
  std::string omp_wait_policy, omp_proc_bind;                   // as the process saw them ("" = unset)
  double text_encode_s = 0, unet_step_s = 0, vae_decode_s = 0;  // medians, seconds
  double text_encode_cpu_s = 0, unet_step_cpu_s = 0, vae_decode_cpu_s = 0;  // medians of process CPU seconds
  BenchFlops flops;
  double matmul_peak_gflops = 0;  // 0 when not measured
  double build_s = 0;             // building the random-weight models
  double peak_rss_mb = 0;         // VmHWM of the process (models and inference), MiB
  // Whole picture (BenchOptions::picture_model); picture_s = 0 when not measured.
  std::string picture_model, picture_scheduler, picture_lora, picture_controlnet, picture_adapter;
  int picture_steps = 0, picture_width = 0, picture_height = 0;
  double picture_guidance = 0;
  double picture_s = 0, picture_cpu_s = 0;  // medians of `runs` runs after `warmup`: load -> PNG written
};

BenchResult bench(const BenchOptions& opts);
std::string bench_table(const BenchResult& r);  // human-readable table
std::string bench_json(const BenchResult& r);   // one JSON object on one line
}  // namespace dmx
