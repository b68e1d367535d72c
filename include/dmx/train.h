// dmx public training API (docs/training.md). Torch-free: the CLI's `dmx train <recipe>` is a thin layer on it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "dmx/error.h"
#include "dmx/options.h"

namespace dmx {

// model (a diffusers folder for finetune / full DreamBooth, else also a single-file checkpoint), config_dir and
// tokenizer_dir (for a single-file model): the ModelOptions group of dmx/options.h.
struct TrainOptions : ModelOptions {
  // lora | finetune | dreambooth | controlnet | adapter | vae | palette | hypernetwork | clip | prior | unclip |
  // spatext
  std::string recipe;
  std::string data;  // lora / finetune: image-caption folder (name.png + name.txt, or metadata.jsonl)
  // lora: FILE.safetensors; finetune / full DreamBooth: a diffusers folder; hypernetwork: FILE.pt (A1111's
  // torch.save layout) or FILE.safetensors
  std::string output;
  std::string output_dir;  // checkpoints, train_log.jsonl, validation images ("" = <output>.train)
  // Replace an existing --output, and start over in an --output-dir that holds an earlier run (its checkpoints,
  // log and validation images are deleted; other files kept). README "Outputs and overwriting".
  bool overwrite = false;

  // Data
  int resolution = 512;
  bool center_crop = true;
  bool random_flip = false;
  std::string image_column = "file_name";
  std::string caption_column = "text";
  bool skip_bad_rows = false;  // report bad dataset rows and leave them out instead of failing

  // Loop
  int64_t steps = 100;
  int batch_size = 1;  // per process
  int gradient_accumulation_steps = 1;
  double learning_rate = 0;  // 0 = the recipe's default (lora 1e-4, finetune 1e-4, dreambooth 5e-6 / LoRA 5e-4)
  std::string lr_scheduler = "constant";  // constant | constant_with_warmup | linear | cosine
  int64_t lr_warmup_steps = 0;
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_weight_decay = 1e-2, adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;
  uint64_t seed = 0;
  std::string prediction_type;  // "" = the scheduler's
  double snr_gamma = 0;
  double noise_offset = 0;
  double proportion_empty_prompts = 0;  // share of captions replaced by "" (classifier-free guidance)
  bool use_ema = false;
  double ema_decay = 0.9999;
  std::string mixed_precision = "no";  // no | bf16 (frozen parts in bf16, trained weights float32)
  bool gradient_checkpointing = false;
  bool cache_latents = false;    // encode each image once (needs center crop and no random flip)
  int64_t checkpoint_every = 0;  // 0: only the final checkpoint
  int checkpoints_total_limit = 0;
  std::string resume;  // a checkpoint folder or an output_dir (its newest checkpoint)
  int64_t validation_steps = 0;
  std::string validation_prompt;
  int num_validation_images = 1;
  int threads = 0;
  bool quiet = false;

  // LoRA (lora, and dreambooth with lora_rank > 0)
  int rank = 4;
  double alpha = 0;                        // 0 = rank
  std::string lora_targets = "attention";  // attention | all
  std::string save_format = "diffusers";   // diffusers | peft | kohya
  std::string lora_init = "kaiming";       // kaiming | gaussian
  bool train_text_encoder = false;

  // ControlNet (metadata.jsonl rows also name a conditioning image); output: a diffusers folder plus
  // controlnet_original.safetensors
  std::string controlnet;  // start from this ControlNet instead of a fresh copy of the UNet encoder
  std::string conditioning_column = "conditioning_image";
  // Conditioning image of the validation images (at its own size rounded down to a multiple of 8, as
  // diffusers' log_validation); "" = the first dataset row's, as training sees it (--resolution, center crop).
  std::string validation_image;

  // T2I-Adapter (recipe adapter; metadata.jsonl rows name a conditioning image, as for controlnet; output: a
  // diffusers T2IAdapter folder). A fresh adapter unless `adapter` names one to continue from (then the
  // architecture options are not used). Architecture as diffusers' T2IAdapter config:
  std::string adapter;                        // start from this adapter (diffusers folder or TencentARC file)
  std::string adapter_type = "full_adapter";  // full_adapter | light_adapter
  std::vector<int> adapter_channels;          // empty: the UNet's down-block widths (light: all but the last)
  int adapter_num_res_blocks = 2;
  int adapter_downscale_factor = 0;         // 0: the VAE's scale factor (the first feature at the latent size)
  int adapter_in_channels = 3;              // 1: the luma of the control picture (TencentARC's sketch / canny), 3: RGB
  std::string timestep_sampling = "cubic";  // cubic (the T2I-Adapter paper's) | uniform

  // VAE (recipe vae): L1 + mse_weight * L2 + kl_weight * KL per pixel value; random crops of vae_crop px
  double kl_weight = 1e-6, mse_weight = 0;
  int vae_crop = 0;

  // Palette (recipe palette; docs/palette.md): image-to-image diffusion in pixel space on --data's pictures at
  // --resolution; --model optional (a Palette folder to continue from; else a new denoiser). Output: a Palette folder.
  std::string task;           // colorize | inpaint | uncrop | jpeg (required)
  std::string loss = "l2";    // l1 | l2
  int palette_channels = 64;  // first block width of a new denoiser (multiple of 32)
  // Hypernetwork (recipe hypernetwork, docs/hypernetworks.md): A1111's options, its defaults
  std::string layer_structure = "1,2,1";  // comma-separated multiples of the width, first and last 1
  std::string activation = "linear";      // A1111's activation names
  std::string weight_init = "Normal";     // Normal | XavierUniform | XavierNormal | KaimingUniform | KaimingNormal
  bool layer_norm = false;                // LayerNorm after every Linear
  bool use_dropout = false;               // without --dropout-structure: 0.3 between hidden layers
  std::string dropout_structure;          // comma-separated, one per layer_structure entry ("" = from use_dropout)
  bool last_layer_dropout = false;        // with use_dropout: also before the last Linear
  bool activate_output = false;           // the activation after the last Linear too
  std::string hypernetwork_widths;        // comma-separated ("" = every attention width of the UNet)

  // CLIP (recipe clip, docs/training.md "CLIP"): a new CLIP trained contrastively on the image-caption folders of
  // clip_data (--data, repeatable, concatenated), or one continued from --model (a CLIP folder; then the architecture
  // fields are not used). --config: a CLIP folder whose architecture (text_encoder/, image_encoder/ config.json) a new
  // model takes. --tokenizer: the text tower's tokenizer (default: --config's or --model's tokenizer/). Output: a
  // CLIP folder (text_encoder/, image_encoder/, tokenizer/, feature_extractor/) for dmx embed and dmx eval --clip.
  std::vector<std::string> clip_data;
  int clip_image_size = 32;  // the image tower's input side; the pictures are resized to it
  int clip_patch_size = 4;
  int clip_width = 128;  // hidden size of both towers (MLP 4x)
  int clip_layers = 4;
  int clip_heads = 4;
  int clip_projection_dim = 128;

  // Prior (recipe prior, docs/unclip.md "Training the prior"): a new diffusers PriorTransformer trained on the
  // image-caption folders of clip_data (--data, repeatable) to predict the CLIP image embedding of a caption's picture,
  // conditioned on the frozen CLIP's text tower (prior_clip: a `dmx train clip` folder; "" = models/emoji-clip when it
  // exists). Output: the prior half of a StableUnCLIPPipeline folder (prior/, prior_scheduler/, prior_text_encoder/,
  // prior_tokenizer/).
  std::string prior_clip;
  int prior_layers = 6;
  int prior_heads = 4;
  int prior_head_dim = 32;       // the prior's inner width is heads x head_dim
  double prior_text_drop = 0.1;  // share of rows given the empty prompt (classifier-free guidance)
  // unCLIP decoder (recipe unclip, docs/unclip.md "Training the decoder"): --model (a text-to-image diffusers folder,
  // or a StableUnCLIPImg2ImgPipeline folder to continue) fine-tuned with the noise-augmented CLIP image embedding of
  // each picture of clip_data (--data, repeatable) as its projection class embedding. Output: a
  // StableUnCLIPImg2ImgPipeline folder for dmx variations.
  std::string clip;                              // the image tower's folder ("" = models/emoji-clip, or --model's own)
  double image_embedding_dropout = 0.1;          // share of image embeddings replaced by zeros (guidance)
  double unclip_proportion_empty_prompts = 0.5;  // share of captions replaced by "" (--proportion-empty-prompts)

  // SpaText (recipe spatext, docs/spatext.md): --model (a text-to-image diffusers folder) trained on --data (a
  // `dmx data scenes` folder) with the spatio-textual map as extra input channels: conv_in whole, LoRA adapters of
  // rank `rank` on every linear and conv of the blocks. The segments' embeddings come from --clip's image tower ("" =
  // models/emoji-clip); the prior copied for inference from spatext_prior ("" = models/emoji-unclip). Output: a
  // SpaText folder for dmx generate --layout-method spatext.
  std::string spatext_prior;
  double layout_dropout = 0.2;  // share of rows without the map (the caption is dropped independently)

  // Make-A-Scene as diffusion (docs/scene.md). vqseg: VQ-SEG, a VQModel of --data's scene maps (category one-hot +
  // edges), codebook_size codes, vq_factor the downscale factor. scene: --model trained on --data with the scene
  // tokens of the VQ-SEG folder `vqseg` appended to the text (LoRA of rank `rank` on the blocks, the token tables
  // whole); layout_dropout is the share of rows with the dropped scene.
  std::string vqseg;
  int codebook_size = 256;
  int vq_factor = 8;

  // DreamBooth
  std::string instance_data, instance_prompt, class_data, class_prompt;
  double prior_loss_weight = 1.0;
  int num_class_images = 100;
  int class_inference_steps = 50;
  int lora_rank = 0;  // > 0: DreamBooth LoRA (output a LoRA file), 0: full fine-tuning (output a folder)
};

struct TrainReport {
  int64_t steps = 0;       // optimizer steps done
  int64_t first_step = 0;  // steps done before this run (resume)
  double first_loss = 0, final_loss = 0;
  double samples_per_s = 0;
  double seconds = 0;
  size_t peak_rss_bytes = 0;
  int64_t trainable_parameters = 0;
  std::string output;  // what was written ("" when nothing was: ranks other than 0, a run stopped early)
  std::string last_checkpoint;
  int64_t skipped_rows = 0;  // bad dataset rows left out (--skip-bad-rows; each is named in a warning)
};

// Validates every option first (InvalidArgument naming the flag, the rule and the value: nothing is written),
// then loads the model and data, trains and writes the result atomically. With torchrun's variables
// (WORLD_SIZE > 1) every process runs this with the same options; rank 0 writes.
TrainReport train(const TrainOptions& o);
void validate_train_options(const TrainOptions& o);

// Training throughput on a model built with random weights (dmx bench's presets: tiny, sd15, sd21): LoRA
// (rank 4, attention) at batch_size x resolution^2, fp32 or bf16, `steps` timed steps after one warm-up.
struct TrainBenchOptions {
  std::string preset = "tiny";
  std::string recipe = "lora";  // lora | finetune
  int resolution = 256;
  int batch_size = 1;
  int steps = 3;
  int rank = 4;
  std::string dtype = "fp32";  // fp32 | bf16
  bool gradient_checkpointing = false;
  int threads = 0;
};
struct TrainBenchResult {
  std::string preset, recipe, dtype;
  int resolution = 0, batch_size = 0, steps = 0, threads = 0;
  int64_t trainable_parameters = 0;
  double seconds_per_step = 0;
  double samples_per_s = 0;
  size_t peak_rss_bytes = 0;
};
TrainBenchResult train_bench(const TrainBenchOptions& o);

// `dmx init`: a diffusers folder with freshly initialised weights (the start of training from scratch), built
// from a folder of configs (model_index.json, unet/, vae/, text_encoder/ config.json, scheduler/) and a
// tokenizer folder. UNet and VAE get PyTorch's default initialisation (what diffusers' constructors do); the
// CLIP text encoder gets transformers' CLIPPreTrainedModel._init_weights. Seeded: the same seed gives the same
// weights. The tokenizer's ids must fit the text encoder's vocab_size and its model_max_length its
// max_position_embeddings (InvalidArgument naming the field otherwise). Written into a temporary folder and
// renamed.
struct InitModelOptions {
  std::string config;     // folder of configs
  std::string tokenizer;  // tokenizer folder ("" = <config>/tokenizer)
  std::string output;     // diffusers folder to create
  uint64_t seed = 0;
  bool overwrite = false;
};
struct InitModelReport {
  int64_t unet_parameters = 0, vae_parameters = 0, text_encoder_parameters = 0;
};
InitModelReport init_model(const InitModelOptions& o);
std::string train_bench_json(const TrainBenchResult& r);
}  // namespace dmx
