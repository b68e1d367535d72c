// Public training API (include/dmx/train.h): options -> TrainConfig + recipe + batch source -> Trainer.
#include "dmx/train.h"

#include <unistd.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "api/options_util.h"
#include "api/presets.h"
#include "api/train_sampler.h"
#include "api/unclip.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/runtime.h"
#include "core/text.h"
#include "core/utf8.h"
#include "io/checkpoint.h"
#include "loaders/model_bundle.h"
#include "loaders/scene.h"
#include "loaders/spatext.h"
#include "loaders/t2i_adapter_loader.h"
#include "loaders/unclip.h"
#include "pipelines/controlnet.h"
#include "pipelines/stable_diffusion.h"
#include "pipelines/t2i_adapter_provider.h"
#include "training/adapter_train.h"
#include "training/clip_train.h"
#include "training/controlnet_init.h"
#include "training/controlnet_train.h"
#include "training/dataset.h"
#include "training/distributed.h"
#include "training/dreambooth.h"
#include "training/finetune.h"
#include "training/hypernetwork_train.h"
#include "training/lora_train.h"
#include "training/palette_train.h"
#include "training/prior_train.h"
#include "training/scene_train.h"
#include "training/spatext_train.h"
#include "training/trainer.h"
#include "training/unclip_train.h"
#include "training/vae_train.h"

namespace dmx {

namespace tr = dmx::training;

training::SampleImages api::pipeline_sampler() {
  return [](std::shared_ptr<loaders::StableDiffusionModels> models, const tr::SampleRequest& r) {
    pipelines::StableDiffusionPipeline pipe(std::move(models));
    pipelines::StableDiffusionParams p;
    p.prompt = r.prompt;
    p.width = r.width;
    p.height = r.height;
    p.num_inference_steps = r.num_inference_steps;
    p.num_images_per_prompt = r.num_images;
    p.guidance_scale = r.guidance_scale;
    at::Generator generator = pipelines::make_generator(r.seed);
    p.generator = &generator;
    p.show_progress = false;
    if (!r.controlnet.is_empty()) {
      pipelines::ControlNetUnit u;
      u.model = r.controlnet;
      u.image = r.control_image;
      u.name = "validation image";
      p.residual_providers = pipelines::controlnet_providers({u});
    }
    if (!r.adapter.is_empty()) {
      pipelines::T2IAdapterUnit u;
      u.model = r.adapter;
      u.image = r.adapter_image;
      u.name = "validation image";
      p.residual_providers.push_back(std::make_shared<pipelines::T2IAdapterProvider>(std::vector{u}));
    }
    return pipe.run(p).images;
  };
}

namespace {

bool has_parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos || slash == 0 || is_directory(path.substr(0, slash));
}

std::string strip_slashes(std::string p) {
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

std::string output_dir_of(const TrainOptions& o) {
  return o.output_dir.empty() ? strip_slashes(o.output) + ".train" : o.output_dir;
}

// The checkpoint --resume names and its step, and whether it lies in the output dir (the run goes on there).
struct ResumePoint {
  std::string checkpoint;
  int64_t step = -1;
  bool in_output_dir = false;
};

ResumePoint resume_point(const TrainOptions& o) {
  ResumePoint r;
  if (o.resume.empty() || !is_directory(o.resume)) return r;
  r.checkpoint = tr::find_latest_checkpoint(o.resume);
  r.step = tr::checkpoint_global_step(r.checkpoint);
  const std::string out_dir = output_dir_of(o);
  r.in_output_dir =
      is_directory(out_dir) && path_within(identify_path(r.checkpoint, true), identify_path(out_dir, true));
  return r;
}

bool lora_output(const TrainOptions& o);

// dmx train prior: --clip, or models/emoji-clip when it is a CLIP folder ("" when neither).
std::string prior_clip_dir(const TrainOptions& o) {
  if (!o.prior_clip.empty()) return strip_slashes(o.prior_clip);
  return loaders::is_clip_folder("models/emoji-clip") ? "models/emoji-clip" : "";
}

// dmx train spatext: the image tower's CLIP folder and the prior folder copied into the output.
std::string spatext_clip_dir(const TrainOptions& o) {
  return o.clip.empty() ? "models/emoji-clip" : strip_slashes(o.clip);
}
std::string spatext_prior_dir(const TrainOptions& o) {
  return o.spatext_prior.empty() ? "models/emoji-unclip" : strip_slashes(o.spatext_prior);
}

// Every path a training run writes, checked against its inputs before anything is loaded (README "Outputs and
// overwriting"): the result (a LoRA file, with adapter_config.json beside it for PEFT, or a folder), the training
// folder (--output-dir: checkpoints, log, validation images) and DreamBooth's class images.
api::OutputPlan train_output_plan(const TrainOptions& o, const ResumePoint& resume) {
  api::OutputPlan plan(o.overwrite);
  api::add_model_inputs(plan, o);
  plan.input(o.data, "--data");
  for (const auto& d : o.clip_data) plan.input(d, "--data");
  if (o.recipe == "prior") plan.input(prior_clip_dir(o), "--clip");
  plan.input(o.instance_data, "--instance-data");
  plan.input(o.controlnet, "--controlnet");
  plan.input(o.adapter, "--adapter");
  plan.input(o.clip, "--clip");
  plan.input(o.validation_image, "--validation-image");
  plan.input(o.resume, "--resume", /*may_be_in_work_folder=*/true);
  if (o.recipe == "hypernetwork") {
    const std::string lower = to_lower_ascii(o.output);
    plan.file(o.output, "--output",
              ends_with(lower, ".safetensors") ? ".safetensors"
              : ends_with(lower, ".pth")       ? ".pth"
                                               : ".pt");
  } else if (lora_output(o)) {
    plan.file(o.output, "--output", ".safetensors");
    if (o.save_format == "peft") {
      const size_t slash = o.output.find_last_of('/');
      const std::string dir = slash == std::string::npos ? "" : o.output.substr(0, slash + 1);
      plan.file(dir + "adapter_config.json", "--output (its adapter_config.json, --save-format peft)");
    }
  } else if (o.recipe == "controlnet") {
    plan.folder(strip_slashes(o.output), "--output", {"config.json", "controlnet_original.safetensors"},
                "ControlNet folder");
  } else if (o.recipe == "palette") {
    plan.folder(strip_slashes(o.output), "--output", {"palette.json"}, "Palette folder");
  } else if (o.recipe == "adapter") {
    plan.folder(strip_slashes(o.output), "--output", {"config.json"}, "T2I-Adapter folder");
  } else if (o.recipe == "clip") {
    plan.folder(strip_slashes(o.output), "--output", {"model_index.json"}, "CLIP folder");
  } else if (o.recipe == "prior") {
    plan.folder(strip_slashes(o.output), "--output", {"prior/config.json"}, "prior folder");
  } else if (o.recipe == "vqseg") {
    plan.folder(strip_slashes(o.output), "--output", {loaders::kVQSegConfigFile}, "VQ-SEG folder");
  } else if (o.recipe == "scene") {
    plan.input(o.vqseg, "--vqseg");
    plan.folder(strip_slashes(o.output), "--output", {loaders::kSceneConfigFile}, "scene folder");
  } else if (o.recipe == "spatext") {
    plan.input(spatext_prior_dir(o), "--prior");
    plan.folder(strip_slashes(o.output), "--output", {loaders::kSpaTextConfigFile}, "SpaText folder");
  } else {
    plan.folder(strip_slashes(o.output), "--output", {"model_index.json"}, "diffusers folder");
  }
  const bool overwrite = o.overwrite;
  plan.work_folder(output_dir_of(o), o.output_dir.empty() ? "--output-dir (default <output>.train)" : "--output-dir",
                   [resume, overwrite](const std::string& dir) -> std::string {
                     std::string earlier;
                     std::error_code ec;
                     for (auto it = std::filesystem::directory_iterator(dir, ec);
                          !ec && it != std::filesystem::directory_iterator() && earlier.empty(); it.increment(ec))
                       if (tr::is_training_entry(it->path().filename().string()))
                         earlier = it->path().filename().string();
                     if (earlier.empty()) return "";
                     if (resume.in_output_dir) {
                       const auto steps = tr::checkpoint_steps(dir);
                       if (!steps.empty() && steps.back() > resume.step && !overwrite)
                         return detail::concat("holds checkpoint-", steps.back(), ", newer than the resumed step ",
                                               resume.step, ": resume from the newest (--resume ", dir,
                                               "), or pass --overwrite to delete the newer checkpoints");
                       return "";
                     }
                     if (overwrite) return "";
                     return "holds the checkpoints and log of an earlier run (" + earlier + "): pass --resume " + dir +
                            " to continue it, or --overwrite to start over (its checkpoints, train_log.jsonl and "
                            "validation images are deleted; other files are kept)";
                   });
  if (!o.class_data.empty()) plan.work_folder(o.class_data, "--class-data", nullptr);  // class images are added
  return plan;
}

double default_lr(const TrainOptions& o) {
  if (o.learning_rate > 0) return o.learning_rate;
  if (o.recipe == "dreambooth") return o.lora_rank > 0 ? 5e-4 : 5e-6;
  if (o.recipe == "controlnet") return 5e-6;  // train_controlnet.py's default
  if (o.recipe == "palette") return 1e-4;
  if (o.recipe == "clip") return 5e-4;
  if (o.recipe == "prior") return 1e-4;  // diffusers' examples/kandinsky2_2/text_to_image/train_text_to_image_prior.py
  if (o.recipe == "adapter") return 5e-6;       // train_t2i_adapter_sdxl.py's default
  if (o.recipe == "hypernetwork") return 1e-5;  // A1111's "Hypernetwork Learning rate" default
  if (o.recipe == "spatext") return 2e-4;       // LoRA adapters and a new conv_in: a LoRA-like rate
  if (o.recipe == "scene") return 2e-4;         // LoRA adapters and new token tables: as spatext
  if (o.recipe == "vqseg") return 1e-3;         // a small autoencoder from scratch
  return 1e-4;
}

bool lora_output(const TrainOptions& o) { return o.recipe == "lora" || (o.recipe == "dreambooth" && o.lora_rank > 0); }

void check_captions(const TrainOptions& o) {
  check_text(o.instance_prompt, "--instance-prompt");
  check_text(o.class_prompt, "--class-prompt");
  check_text(o.validation_prompt, "--validation-prompt");
}

tr::TrainConfig make_config(const TrainOptions& o) {
  tr::TrainConfig c;
  c.output = strip_slashes(o.output);
  c.output_dir = output_dir_of(o);
  c.max_train_steps = o.steps;
  c.train_batch_size = o.batch_size;
  c.gradient_accumulation_steps = o.gradient_accumulation_steps;
  c.seed = o.seed;
  c.learning_rate = default_lr(o);
  c.adam_beta1 = o.adam_beta1;
  c.adam_beta2 = o.adam_beta2;
  c.adam_weight_decay = o.adam_weight_decay;
  c.adam_epsilon = o.adam_epsilon;
  c.max_grad_norm = o.max_grad_norm;
  c.lr_scheduler = tr::parse_lr_schedule(o.lr_scheduler);
  c.lr_warmup_steps = o.lr_warmup_steps;
  c.prediction_type = o.prediction_type;
  c.snr_gamma = o.snr_gamma;
  c.noise_offset = o.noise_offset;
  c.proportion_empty_prompts = o.recipe == "unclip" ? o.unclip_proportion_empty_prompts : o.proportion_empty_prompts;
  c.use_ema = o.use_ema;
  c.ema_decay = o.ema_decay;
  c.mixed_precision = tr::parse_mixed_precision(o.mixed_precision);
  c.gradient_checkpointing = o.gradient_checkpointing;
  c.cache_latents = o.cache_latents;
  c.checkpointing_steps = o.checkpoint_every;
  c.checkpoints_total_limit = o.checkpoints_total_limit;
  c.resume_from_checkpoint = o.resume;
  c.validation_steps = o.validation_steps;
  c.validation_prompt = o.validation_prompt;
  // The VAE's validation pictures are reconstructions: no prompt needed.
  if (o.recipe == "vae" && c.validation_prompt.empty()) c.validation_prompt = "(reconstructions)";
  if (o.recipe == "palette" && c.validation_prompt.empty()) c.validation_prompt = "(restorations)";
  c.num_validation_images = o.num_validation_images;
  c.sample_images = api::pipeline_sampler();
  c.quiet = o.quiet;
  return c;
}

// --adapter-type / --adapter-channels / --adapter-num-res-blocks / --adapter-downscale-factor /
// --adapter-in-channels as diffusers' T2IAdapter config, checked (InvalidArgument naming the flag). Left to the
// model (unet_channels and vae_factor; absent when checking the options before loading): empty channels = the UNet's
// down-block widths (a light adapter: all but the last, its extra block repeats the last), downscale factor 0 = the
// VAE's scale factor.
models::T2IAdapterConfig adapter_config(const TrainOptions& o, const std::vector<int>& unet_channels = {},
                                        int vae_factor = 0) {
  models::T2IAdapterConfig c;
  c.adapter_type = o.adapter_type;
  c.num_res_blocks = o.adapter_num_res_blocks;
  c.in_channels = o.adapter_in_channels;
  DMX_CHECK_ARG(c.adapter_type == "full_adapter" || c.adapter_type == "light_adapter",
                "--adapter-type must be full_adapter or light_adapter, got '", c.adapter_type, "'");
  DMX_CHECK_ARG(c.in_channels == 1 || c.in_channels == 3, "--adapter-in-channels must be 1 or 3, got ", c.in_channels);
  DMX_CHECK_ARG(o.adapter_num_res_blocks >= 1 && o.adapter_num_res_blocks <= 64,
                "--adapter-num-res-blocks must be in [1, 64], got ", o.adapter_num_res_blocks);
  DMX_CHECK_ARG(o.adapter_downscale_factor >= 0 && o.adapter_downscale_factor <= 64,
                "--adapter-downscale-factor must be in [0, 64] (0: the VAE's), got ", o.adapter_downscale_factor);
  DMX_CHECK_ARG(o.adapter_channels.size() <= 16, "--adapter-channels must have at most 16 entries, got ",
                o.adapter_channels.size());
  for (size_t i = 0; i < o.adapter_channels.size(); ++i)
    DMX_CHECK_ARG(o.adapter_channels[i] >= 4 && o.adapter_channels[i] <= 16384, "--adapter-channels entry ", i,
                  " must be in [4, 16384], got ", o.adapter_channels[i]);
  c.channels = o.adapter_channels;
  if (c.channels.empty()) {
    c.channels = unet_channels.empty() ? std::vector<int>{64, 128, 192} : unet_channels;
    if (c.adapter_type == "light_adapter" && c.channels.size() > 1) c.channels.pop_back();
  }
  c.downscale_factor = o.adapter_downscale_factor > 0 ? o.adapter_downscale_factor : vae_factor > 0 ? vae_factor : 8;
  c.validate();
  return c;
}

// "1, 2, 1": comma-separated numbers (spaces allowed, as A1111's create_hypernetwork parses them with float()).
std::vector<double> number_list(const std::string& text, const char* flag) {
  std::vector<double> out;
  if (text.empty()) return out;
  size_t i = 0;
  while (i <= text.size()) {
    size_t j = text.find(',', i);
    if (j == std::string::npos) j = text.size();
    std::string item = text.substr(i, j - i);
    while (!item.empty() && item.front() == ' ') item.erase(item.begin());
    while (!item.empty() && item.back() == ' ') item.pop_back();
    char* end = nullptr;
    const double v = item.empty() ? 0 : std::strtod(item.c_str(), &end);
    DMX_CHECK_ARG(!item.empty() && end == item.c_str() + item.size() && std::isfinite(v), flag,
                  " must be comma-separated numbers, got '", text, "'");
    DMX_CHECK_ARG(out.size() < 64, flag, " takes at most 64 numbers, got '", text.substr(0, 200), "'");
    out.push_back(v);
    i = j + 1;
  }
  return out;
}

tr::HypernetworkTrainOptions hypernetwork_options(const TrainOptions& o) {
  tr::HypernetworkTrainOptions h;
  h.layer_structure = number_list(o.layer_structure, "--layer-structure");
  h.activation = o.activation;
  h.weight_init = o.weight_init;
  h.layer_norm = o.layer_norm;
  h.use_dropout = o.use_dropout;
  h.dropout_structure = number_list(o.dropout_structure, "--dropout-structure");
  h.last_layer_dropout = o.last_layer_dropout;
  h.activate_output = o.activate_output;
  for (double w : number_list(o.hypernetwork_widths, "--hypernetwork-widths")) {
    DMX_CHECK_ARG(w == std::floor(w) && w >= 1 && w <= static_cast<double>(tr::kMaxHypernetworkWidth),
                  "--hypernetwork-widths entries must be whole numbers in [1, ", tr::kMaxHypernetworkWidth, "], got '",
                  o.hypernetwork_widths, "'");
    h.widths.push_back(static_cast<int64_t>(w));
  }
  return h;
}

tr::LoRATrainOptions lora_options(const TrainOptions& o) {
  tr::LoRATrainOptions l;
  l.rank = o.recipe == "dreambooth" ? o.lora_rank : o.rank;
  l.alpha = o.alpha;
  l.targets = o.lora_targets;
  l.train_text_encoder = o.train_text_encoder;
  l.init = o.lora_init;
  return l;
}

tr::CLIPArchitecture clip_architecture(const TrainOptions& o) {
  tr::CLIPArchitecture a;
  a.width = o.clip_width;
  a.layers = o.clip_layers;
  a.heads = o.clip_heads;
  a.patch_size = o.clip_patch_size;
  a.projection_dim = o.clip_projection_dim;
  a.image_size = o.clip_image_size;
  return a;
}

// dmx train clip: --data folders, where the model comes from (--model, --config, --tokenizer), the architecture.
void check_clip_options(const TrainOptions& o) {
  DMX_CHECK_ARG(o.task.empty(), "--task is for dmx train palette only, got it for clip");
  DMX_CHECK_ARG(!o.clip_data.empty(), "--data must be given (an image-caption folder; repeatable)");
  DMX_CHECK_ARG(o.clip_data.size() <= 64, "--data may be given at most 64 times, got ", o.clip_data.size());
  for (const auto& d : o.clip_data) DMX_CHECK_ARG(is_directory(d), "--data: no such folder: ", d);
  DMX_CHECK_ARG(o.model.empty() || o.config_dir.empty(),
                "--model (continue a CLIP folder) and --config (the architecture of a new one) exclude each other");
  DMX_CHECK_ARG(o.model.empty() || is_directory(o.model), "--model: no such CLIP folder: ", o.model);
  DMX_CHECK_ARG(o.model.empty() || loaders::is_clip_folder(o.model), "--model ", o.model,
                " is not a CLIP folder (model_index.json with _class_name CLIPModel, as dmx train clip writes)");
  DMX_CHECK_ARG(o.config_dir.empty() || is_directory(o.config_dir), "--config: no such folder: ", o.config_dir);
  DMX_CHECK_ARG(!o.model.empty() || !o.config_dir.empty() || !o.tokenizer_dir.empty(),
                "--tokenizer must be given for a new CLIP (a folder with vocab.json and merges.txt, e.g. "
                "models/emoji/tokenizer)");
  DMX_CHECK_ARG(o.tokenizer_dir.empty() || is_directory(o.tokenizer_dir),
                "--tokenizer: no such folder: ", o.tokenizer_dir);
  DMX_CHECK_ARG(o.tokenizer_dir.empty() || o.model.empty(),
                "--tokenizer applies to a new CLIP; --model continues with its own tokenizer/");
  clip_architecture(o).validate();
}

// The CLIP a run trains: --model's, or a new one (--config's architecture, else the --width ... options), seeded.
std::shared_ptr<loaders::CLIPComponents> clip_model(const TrainOptions& o) {
  if (!o.model.empty()) return loaders::load_clip(o.model);
  torch::manual_seed(o.seed);  // the new towers' initialisation
  if (o.config_dir.empty()) return tr::new_clip_model(clip_architecture(o), o.tokenizer_dir);
  const auto text = models::CLIPTextConfig::from_json(
      io::load_json_file(join_path(o.config_dir, "text_encoder/config.json"), "--config text_encoder config"));
  const auto vision = models::CLIPVisionConfig::from_json(
      io::load_json_file(join_path(o.config_dir, "image_encoder/config.json"), "--config image_encoder config"));
  return tr::new_clip_model(text, vision,
                            o.tokenizer_dir.empty() ? join_path(o.config_dir, "tokenizer") : o.tokenizer_dir);
}

tr::PriorArchitecture prior_architecture(const TrainOptions& o) {
  tr::PriorArchitecture a;
  a.layers = o.prior_layers;
  a.heads = o.prior_heads;
  a.head_dim = o.prior_head_dim;
  return a;
}

// The prior's config: --model's or --config's prior/config.json checked against the CLIP, else a new one of the
// --layers, --heads, --attention-head-dim architecture.
models::PriorTransformerConfig prior_config(const TrainOptions& o, const models::CLIPTextConfig& text,
                                            const models::CLIPVisionConfig& vision, int model_max_length) {
  const std::string from = !o.model.empty() ? o.model : o.config_dir;
  if (from.empty()) return tr::prior_config_for_clip(prior_architecture(o), text, vision, model_max_length);
  const auto c = models::PriorTransformerConfig::from_json(io::load_json_file(
      join_path(from, "prior/config.json"), (o.model.empty() ? "--config" : "--model") + std::string(" prior config")));
  tr::PriorArchitecture a;
  a.layers = c.num_layers;
  a.heads = c.num_attention_heads;
  a.head_dim = c.attention_head_dim;
  const auto want = tr::prior_config_for_clip(a, text, vision, model_max_length);
  DMX_CHECK_ARG(c.embedding_dim == want.embedding_dim && c.num_embeddings == want.num_embeddings &&
                    c.resolved_embedding_proj_dim() == want.embedding_dim &&
                    c.resolved_clip_embed_dim() == want.embedding_dim,
                from, "/prior/config.json does not fit --clip: embedding_dim ", c.embedding_dim, ", num_embeddings ",
                c.num_embeddings, " against the CLIP's width ", want.embedding_dim, " and tokenizer length ",
                want.num_embeddings);
  return c;
}

// dmx train prior: --data folders, the CLIP (a folder with both towers and a tokenizer whose sizes fit a Stable unCLIP
// prior), the architecture. Reads only configs.
void check_prior_options(const TrainOptions& o) {
  DMX_CHECK_ARG(o.task.empty(), "--task is for dmx train palette only, got it for prior");
  DMX_CHECK_ARG(!o.clip_data.empty(), "--data must be given (an image-caption folder; repeatable)");
  DMX_CHECK_ARG(o.clip_data.size() <= 64, "--data may be given at most 64 times, got ", o.clip_data.size());
  for (const auto& d : o.clip_data) DMX_CHECK_ARG(is_directory(d), "--data: no such folder: ", d);
  const std::string clip = prior_clip_dir(o);
  DMX_CHECK_ARG(!clip.empty(),
                "--clip must be given (a CLIP folder written by dmx train clip; the default models/emoji-clip is not "
                "there)");
  DMX_CHECK_ARG(is_directory(clip), "--clip: no such folder: ", clip);
  DMX_CHECK_ARG(loaders::is_clip_folder(clip), "--clip ", clip,
                " is not a CLIP folder (model_index.json with _class_name CLIPModel, as dmx train clip writes)");
  for (const char* part : {"text_encoder/config.json", "image_encoder/config.json", "tokenizer/vocab.json"})
    DMX_CHECK_ARG(path_exists(join_path(clip, part)), "--clip ", clip, " has no ", part,
                  " (the prior needs the CLIP's text encoder, image encoder and tokenizer)");
  DMX_CHECK_ARG(std::isfinite(o.prior_text_drop) && o.prior_text_drop >= 0 && o.prior_text_drop <= 1,
                "--proportion-empty-prompts must be in [0, 1], got ", o.prior_text_drop);
  const auto text = models::CLIPTextConfig::from_json(
      io::load_json_file(join_path(clip, "text_encoder/config.json"), "--clip text_encoder config"));
  const auto vision = models::CLIPVisionConfig::from_json(
      io::load_json_file(join_path(clip, "image_encoder/config.json"), "--clip image_encoder config"));
  const auto tok = models::CLIPTokenizer::from_folder(join_path(clip, "tokenizer"));
  DMX_CHECK_ARG(o.tokenizer_dir.empty(),
                "--tokenizer is not taken by dmx train prior: it tokenizes with the CLIP's own tokenizer/ (--clip ",
                clip, ")");
  DMX_CHECK_ARG(o.model.empty() || o.config_dir.empty(),
                "--model (continue a prior folder) and --config (the architecture of a new one) exclude each other");
  for (const auto& [flag, dir] :
       {std::pair<const char*, const std::string&>{"--model", o.model}, {"--config", o.config_dir}})
    DMX_CHECK_ARG(dir.empty() || path_exists(join_path(dir, "prior/config.json")), flag, " ", dir,
                  " is not a prior folder (no prior/config.json; dmx train prior writes one)");
  (void)prior_config(o, text, vision, tok.model_max_length());
}

// dmx train unclip: the image tower's folder: --clip, or --model's own when it is an unCLIP decoder, or the bundled
// models/emoji-clip.
std::string unclip_tower_dir(const TrainOptions& o) {
  if (!o.clip.empty()) return o.clip;
  if (api::unclip_pipeline_class(o.model) == "StableUnCLIPImg2ImgPipeline") return o.model;
  return "models/emoji-clip";
}

// --data of the recipes that read a scene folder's maps (spatext, vqseg, scene): a scene folder whose size is
// --resolution, whole pictures.
void check_scene_data(const TrainOptions& o) {
  DMX_CHECK_ARG(is_directory(o.data) && path_exists(join_path(o.data, "scenes.json")), "--data ", o.data,
                " must be a scene folder (scenes.json; make one with `dmx data scenes --out DIR`)");
  int size = 0;
  try {
    size =
        nlohmann::json::parse(read_text_file(join_path(o.data, "scenes.json"), "--data scenes.json", kMaxJsonFileBytes))
            .at("size")
            .get<int>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(join_path(o.data, "scenes.json") + ": " + e.what());
  }
  DMX_CHECK_ARG(o.resolution == size, "--resolution must be the scene folder's size ", size,
                " (the maps are read at that size), got ", o.resolution);
  DMX_CHECK_ARG(o.center_crop && !o.random_flip, "dmx train ", o.recipe,
                " reads each canvas's maps as they are: random crops and flips are not taken");
}

// --model of the recipes that train a layout method on a text-to-image model (spatext, scene).
void check_layout_base_model(const TrainOptions& o) {
  DMX_CHECK_ARG(is_directory(o.model) && path_exists(join_path(o.model, "unet/config.json")), "--model ", o.model,
                " must be a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)");
  DMX_CHECK_SUPPORTED(!loaders::is_spatext_folder(o.model) && !loaders::is_scene_folder(o.model), "--model ", o.model,
                      " is a ", loaders::is_spatext_folder(o.model) ? "SpaText" : "scene", " folder; dmx train ",
                      o.recipe, " starts from a text-to-image model");
  DMX_CHECK_ARG(api::unclip_pipeline_class(o.model).empty(), "--model ", o.model,
                " is a Stable unCLIP folder; dmx train ", o.recipe, " starts from a text-to-image model");
}

void check_vqseg_options(const TrainOptions& o) {
  DMX_CHECK_ARG(o.tokenizer_dir.empty(), "--tokenizer is not taken by dmx train vqseg (it reads scene maps, no text)");
  DMX_CHECK_ARG(o.model.empty() || loaders::is_vqseg_folder(o.model), "--model ", o.model,
                " must be a VQ-SEG folder to continue (vqseg.json; dmx train vqseg writes one)");
  DMX_CHECK_ARG(o.model.empty() || o.config_dir.empty(), "--config names the architecture of a new VQ-SEG; --model ",
                o.model, " brings its own");
  DMX_CHECK_ARG(o.config_dir.empty() || path_exists(join_path(o.config_dir, "config.json")), "--config ", o.config_dir,
                " must be a folder with a VQModel config.json");
  check_scene_data(o);
  (void)tr::vqseg_config(loaders::kSceneCategories, o.resolution, o.vq_factor, o.codebook_size);
}

// dmx train vqseg's model: --model continued, a new one of --config's architecture, or vqseg_config's.
models::VQModel vqseg_model(const TrainOptions& o) {
  if (!o.model.empty()) {
    loaders::VQSeg v = loaders::load_vqseg(strip_slashes(o.model));
    DMX_CHECK_ARG(v.categories == loaders::kSceneCategories && v.resolution == o.resolution, "--model ", o.model,
                  " is a VQ-SEG of ", v.categories, " categories at ", v.resolution, " px; --data's maps have ",
                  loaders::kSceneCategories, " at ", o.resolution);
    return v.model;
  }
  torch::manual_seed(o.seed);
  if (o.config_dir.empty())
    return models::VQModel(tr::vqseg_config(loaders::kSceneCategories, o.resolution, o.vq_factor, o.codebook_size));
  const models::VQModelConfig c = models::VQModelConfig::from_json(
      io::load_json_file(join_path(o.config_dir, "config.json"), "--config VQModel config"));
  DMX_CHECK_ARG(
      c.coder.in_channels == loaders::kSceneCategories + 1 && c.coder.out_channels == loaders::kSceneCategories + 1,
      "--config ", o.config_dir, ": a VQ-SEG takes and gives ", loaders::kSceneCategories + 1,
      " channels, the config has in_channels ", c.coder.in_channels, " and out_channels ", c.coder.out_channels);
  DMX_CHECK_ARG(o.resolution % c.downscale_factor() == 0, "--resolution ", o.resolution,
                " must be a multiple of the config's factor ", c.downscale_factor());
  return models::VQModel(c);
}

void check_scene_options(const TrainOptions& o) {
  check_layout_base_model(o);
  check_scene_data(o);
  DMX_CHECK_ARG(!o.vqseg.empty(), "--vqseg must be given (a VQ-SEG folder: dmx train vqseg)");
  DMX_CHECK_ARG(loaders::is_vqseg_folder(o.vqseg), "--vqseg ", o.vqseg,
                " must be a VQ-SEG folder (vqseg.json; dmx train vqseg writes one)");
  DMX_CHECK_ARG(o.rank >= 1 && o.rank <= tr::kMaxLoRARank, "--rank must be in [1, ", tr::kMaxLoRARank, "], got ",
                o.rank);
  DMX_CHECK_ARG(std::isfinite(o.layout_dropout) && o.layout_dropout >= 0 && o.layout_dropout <= 1,
                "--layout-dropout must be in [0, 1], got ", o.layout_dropout);
}

void check_spatext_options(const TrainOptions& o) {
  check_layout_base_model(o);
  check_scene_data(o);
  const std::string clip = spatext_clip_dir(o), prior = spatext_prior_dir(o);
  DMX_CHECK_ARG(loaders::is_clip_folder(clip), "--clip ", clip,
                " must be a CLIP folder (model_index.json CLIPModel, as dmx train clip writes)",
                o.clip.empty() ? " (the default; give --clip DIR)" : "");
  DMX_CHECK_ARG(path_exists(join_path(prior, "prior/config.json")), "--prior ", prior,
                " must be a prior folder (prior/config.json; dmx train prior writes one)",
                o.spatext_prior.empty() ? " (the default; give --prior DIR)" : "");
  DMX_CHECK_ARG(o.rank >= 1 && o.rank <= tr::kMaxLoRARank, "--rank must be in [1, ", tr::kMaxLoRARank, "], got ",
                o.rank);
  DMX_CHECK_ARG(std::isfinite(o.layout_dropout) && o.layout_dropout >= 0 && o.layout_dropout <= 1,
                "--layout-dropout must be in [0, 1], got ", o.layout_dropout);
}

void check_unclip_options(const TrainOptions& o) {
  DMX_CHECK_ARG(!o.clip_data.empty(), "--data must be given (an image-caption folder; repeatable)");
  DMX_CHECK_ARG(o.clip_data.size() <= 64, "--data may be given at most 64 times, got ", o.clip_data.size());
  for (const auto& d : o.clip_data) DMX_CHECK_ARG(is_directory(d), "--data: no such folder: ", d);
  DMX_CHECK_ARG(is_directory(o.model) && path_exists(join_path(o.model, "unet/config.json")), "--model ", o.model,
                " must be a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)");
  const std::string cls = api::unclip_pipeline_class(o.model);
  DMX_CHECK_ARG(cls.empty() || cls == "StableUnCLIPImg2ImgPipeline", "--model ", o.model, " is a ", cls,
                " folder; dmx train unclip starts from a text-to-image model or continues a "
                "StableUnCLIPImg2ImgPipeline folder");
  DMX_CHECK_ARG(cls.empty() || o.clip.empty(), "--clip: --model ", o.model,
                " is an unCLIP decoder and keeps its own image encoder; leave --clip out");
  const std::string tower = unclip_tower_dir(o);
  DMX_CHECK_ARG(is_directory(tower), "--clip: no such folder: ", tower,
                o.clip.empty() ? " (the default; give --clip DIR, a CLIP folder)" : "");
  DMX_CHECK_ARG(loaders::is_clip_folder(tower) || api::unclip_pipeline_class(tower) == "StableUnCLIPImg2ImgPipeline",
                "--clip ", tower,
                " must be a CLIP folder (model_index.json CLIPModel, as dmx train clip writes) or a "
                "StableUnCLIPImg2ImgPipeline folder (feature_extractor + image_encoder)");
  DMX_CHECK_ARG(o.center_crop && !o.random_flip,
                "dmx train unclip embeds each whole picture once: random crops and flips are not taken");
}

// The image tower of dmx train unclip (unclip_tower_dir): a CLIP folder's, or an unCLIP folder's (with its
// normalizer and noising scheduler when it is --model, the decoder continued).
tr::UnCLIPImageTower unclip_image_tower(const TrainOptions& o) {
  tr::UnCLIPImageTower t;
  t.source_dir = unclip_tower_dir(o);
  if (loaders::is_clip_folder(t.source_dir)) {
    const auto c = loaders::load_clip(t.source_dir);
    t.feature_extractor = c->feature_extractor;
    t.image_encoder = c->image_encoder;
    return t;
  }
  const auto c = loaders::load_unclip_components(t.source_dir);
  t.feature_extractor = c->feature_extractor;
  t.image_encoder = c->image_encoder;
  if (t.source_dir == o.model) {
    t.image_normalizer = c->image_normalizer;
    t.image_noising_scheduler_config = c->image_noising_scheduler_config;
  }
  return t;
}

}  // namespace

void validate_train_options(const TrainOptions& o) {
  DMX_CHECK_ARG(o.recipe == "lora" || o.recipe == "finetune" || o.recipe == "dreambooth" || o.recipe == "controlnet" ||
                    o.recipe == "vae" || o.recipe == "adapter" || o.recipe == "palette" || o.recipe == "hypernetwork" ||
                    o.recipe == "clip" || o.recipe == "prior" || o.recipe == "unclip" || o.recipe == "spatext" ||
                    o.recipe == "vqseg" || o.recipe == "scene",
                "recipe must be lora, finetune, dreambooth, controlnet, adapter, vae, palette, hypernetwork, clip, "
                "prior, unclip, spatext, vqseg or scene, got '",
                o.recipe, "'");
  if (o.recipe == "palette") {
    DMX_CHECK_ARG(!o.task.empty(), "--task must be given (colorize, inpaint, uncrop or jpeg)");
    (void)degrade::parse_task(o.task);
    DMX_CHECK_ARG(o.loss == "l1" || o.loss == "l2", "--loss must be l1 or l2, got '", o.loss, "'");
    DMX_CHECK_ARG(o.resolution >= 8 && o.resolution <= 256 && o.resolution % 8 == 0,
                  "--resolution must be a multiple of 8 in [8, 256] for Palette (pixel space), got ", o.resolution);
    DMX_CHECK_ARG(o.palette_channels >= 32 && o.palette_channels <= 512 && o.palette_channels % 32 == 0,
                  "--palette-channels must be a multiple of 32 in [32, 512], got ", o.palette_channels);
    DMX_CHECK_ARG(o.model.empty() || is_directory(o.model), "--model: no such Palette folder: ", o.model);
  } else if (o.recipe == "clip") {
    check_clip_options(o);
  } else if (o.recipe == "prior") {
    check_prior_options(o);
  } else if (o.recipe == "vqseg") {
    DMX_CHECK_ARG(o.task.empty(), "--task is for dmx train palette only, got it for vqseg");
  } else {
    DMX_CHECK_ARG(o.task.empty(), "--task is for dmx train palette only, got it for ", o.recipe);
    DMX_CHECK_ARG(!o.model.empty(), "--model must be given");
    DMX_CHECK_ARG(path_exists(o.model), "--model: path not found: ", o.model);
    if (o.recipe == "unclip") check_unclip_options(o);
  }
  DMX_CHECK_ARG(!o.output.empty(), "--output must be given");
  DMX_CHECK_ARG(has_parent_dir(o.output), "--output: the folder of ", o.output, " does not exist");
  if (o.recipe == "dreambooth") {
    DMX_CHECK_ARG(!o.instance_data.empty(), "--instance-data must be given");
    DMX_CHECK_ARG(is_directory(o.instance_data), "--instance-data: no such folder: ", o.instance_data);
    DMX_CHECK_ARG(!o.instance_prompt.empty(), "--instance-prompt must be given (e.g. \"a photo of sks dog\")");
    DMX_CHECK_ARG(o.class_data.empty() == o.class_prompt.empty(),
                  "--class-data and --class-prompt go together (prior preservation), got ",
                  o.class_data.empty() ? "--class-prompt only" : "--class-data only");
    DMX_CHECK_ARG(std::isfinite(o.prior_loss_weight) && o.prior_loss_weight >= 0,
                  "--prior-loss-weight must be >= 0, got ", o.prior_loss_weight);
    DMX_CHECK_ARG(o.num_class_images > 0, "--num-class-images must be > 0, got ", o.num_class_images);
    DMX_CHECK_ARG(o.class_inference_steps > 0, "--class-inference-steps must be > 0, got ", o.class_inference_steps);
    DMX_CHECK_ARG(o.lora_rank >= 0 && o.lora_rank <= tr::kMaxLoRARank, "--lora-rank must be in [0, ", tr::kMaxLoRARank,
                  "] (0 = full fine-tuning), got ", o.lora_rank);
  } else if (o.recipe != "clip" && o.recipe != "prior" && o.recipe != "unclip") {
    DMX_CHECK_ARG(!o.data.empty(), "--data must be given (a folder of images with captions)");
    DMX_CHECK_ARG(is_directory(o.data), "--data: no such folder: ", o.data);
  }
  if (o.recipe == "spatext") check_spatext_options(o);
  if (o.recipe == "vqseg") check_vqseg_options(o);
  if (o.recipe == "scene") check_scene_options(o);
  if (o.recipe == "lora")
    DMX_CHECK_ARG(o.rank > 0 && o.rank <= tr::kMaxLoRARank, "--rank must be in [1, ", tr::kMaxLoRARank, "], got ",
                  o.rank);
  if (o.recipe == "controlnet" || o.recipe == "adapter") {
    DMX_CHECK_ARG(!path_exists(o.output) || is_directory(o.output), "--output must be a folder, got the file '",
                  o.output, "'");
    DMX_CHECK_ARG(o.controlnet.empty() || path_exists(o.controlnet), "--controlnet: path not found: ", o.controlnet);
    DMX_CHECK_ARG(o.validation_image.empty() || path_exists(o.validation_image),
                  "--validation-image: file not found: ", o.validation_image);
  } else {
    DMX_CHECK_ARG(o.validation_image.empty(),
                  "--validation-image is for dmx train controlnet and adapter only, got it for ", o.recipe);
  }
  if (o.recipe == "adapter") {
    DMX_CHECK_ARG(o.adapter.empty() || path_exists(o.adapter), "--adapter: path not found: ", o.adapter);
    (void)tr::parse_timestep_sampling(o.timestep_sampling);
    (void)adapter_config(o);
  }
  if (lora_output(o)) {
    (void)tr::parse_lora_save_format(o.save_format);
    lora_options(o).validate();
  }
  if (o.recipe == "hypernetwork") {
    const std::string lower = to_lower_ascii(o.output);
    DMX_CHECK_ARG(ends_with(lower, ".pt") || ends_with(lower, ".pth") || ends_with(lower, ".safetensors"),
                  "--output: a hypernetwork is written as A1111's FILE.pt (or .pth) or as FILE.safetensors, got '",
                  o.output, "'");
    hypernetwork_options(o).validate();
  }
  DMX_CHECK_ARG(o.steps > 0, "--steps must be > 0, got ", o.steps);
  DMX_CHECK_ARG(o.resolution >= 8 && o.resolution % 8 == 0 && o.resolution <= 4096,
                "--resolution must be a multiple of 8 in [8, 4096], got ", o.resolution);
  tr::check_batch_size(o.batch_size, o.recipe == "clip"    ? o.clip_image_size
                                     : o.recipe == "prior" ? 8  // no pictures in the loop: embeddings
                                                           : o.resolution);
  DMX_CHECK_ARG(o.gradient_accumulation_steps > 0, "--gradient-accumulation-steps must be > 0, got ",
                o.gradient_accumulation_steps);
  DMX_CHECK_ARG(std::isfinite(o.learning_rate) && o.learning_rate >= 0,
                "--learning-rate must be > 0 (0 = the recipe's default), got ", o.learning_rate);
  DMX_CHECK_ARG(std::isfinite(o.max_grad_norm), "--max-grad-norm must be a number, got ", o.max_grad_norm);
  DMX_CHECK_ARG(o.checkpoint_every >= 0, "--checkpoint-every must be >= 0, got ", o.checkpoint_every);
  DMX_CHECK_ARG(o.resume.empty() || is_directory(o.resume), "--resume: no such folder: ", o.resume);
  check_captions(o);
  // Outputs against inputs and each other, existing ones, writability and name lengths; resuming past --steps.
  const ResumePoint resume = resume_point(o);
  DMX_CHECK_ARG(resume.step <= o.steps, "--resume: ", resume.checkpoint, " is at step ", resume.step, ", past --steps ",
                o.steps, "; give --steps ", resume.step, " or more");
  train_output_plan(o, resume).check();
  (void)tr::parse_lr_schedule(o.lr_scheduler);
  (void)tr::parse_mixed_precision(o.mixed_precision);
  // The remaining numeric rules are the trainer's (same messages).
  tr::TrainConfig c = make_config(o);
  c.output_dir = "-";  // no side effects: only the checks of the constructor run
  struct NullSource : tr::BatchSource {
    tr::Batch get(int64_t) override { return {}; }
    size_t size() const override { return 0; }
  };
  struct NullRecipe : tr::Recipe {
    NullRecipe() : Recipe(nullptr) {}
    std::string name() const override { return "check"; }
    std::vector<tr::NamedParameter> trainable_parameters() override { return {}; }
    at::Tensor predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const tr::Batch&) override {
      return {};
    }
    void save(const std::string&) override {}
  };
  tr::Trainer check(c, std::make_shared<NullRecipe>(), std::make_shared<NullSource>());
}

TrainReport train(const TrainOptions& o) {
  validate_train_options(o);
  loaders::PaletteConfig palette_config;
  configure_threads(o.threads);
  if (o.quiet) set_log_level(LogLevel::kQuiet);
  const tr::DistributedEnv env = tr::DistributedEnv::from_environment();
  std::shared_ptr<tr::Distributed> dist;
  if (env.world_size > 1) dist = tr::Distributed::create(env, "cpu");
  const int rank = dist ? dist->rank() : 0, world = dist ? dist->world_size() : 1;

  loaders::LoadOptions lo;
  lo.config_dir = o.config_dir;
  lo.tokenizer_dir = o.tokenizer_dir;
  std::shared_ptr<loaders::StableDiffusionModels> models;
  if (o.recipe == "palette") {
    loaders::PaletteModel pm;
    if (!o.model.empty()) {
      pm = loaders::load_palette(o.model);
      DMX_CHECK_ARG(pm.config.task == o.task, "--task ", o.task, " differs from the task of --model ", o.model, " (",
                    pm.config.task, ")");
      pm.config.loss = o.loss;
      pm.config.resolution = o.resolution;
    } else {
      pm.config.task = o.task;
      pm.config.loss = o.loss;
      pm.config.resolution = o.resolution;
      torch::manual_seed(o.seed);  // the new denoiser's initialisation (rank 0's is broadcast anyway)
      pm.unet = models::UNet2DConditionModel(loaders::palette_unet_config(o.resolution, o.palette_channels));
    }
    models = tr::palette_bundle(pm);
    palette_config = pm.config;
  } else if (o.recipe == "clip") {
    DMX_CHECK_SUPPORTED(world == 1,
                        "dmx train clip runs in one process (its loss takes every row of the batch as a "
                        "negative), got WORLD_SIZE ",
                        world);
    models = tr::clip_bundle(o.model);
  } else if (o.recipe == "prior") {
    models = tr::prior_bundle(prior_clip_dir(o));
  } else if (o.recipe == "vqseg") {
    DMX_CHECK_SUPPORTED(world == 1,
                        "dmx train vqseg runs in one process (its codebook restarts read the local batch), got "
                        "WORLD_SIZE ",
                        world);
  } else {
    models = loaders::load_stable_diffusion(o.model, lo);
  }

  tr::TrainConfig cfg = make_config(o);
  std::shared_ptr<tr::Recipe> recipe;
  std::shared_ptr<tr::BatchSource> source;
  const auto fmt = lora_output(o) ? tr::parse_lora_save_format(o.save_format) : tr::LoRASaveFormat::Diffusers;
  auto dataset_options = [&](const std::string& dir, bool captions) {
    tr::DatasetOptions d;
    d.dir = dir;
    d.resolution = o.resolution;
    d.center_crop = o.center_crop;
    d.random_flip = o.random_flip;
    d.require_captions = captions;
    d.image_column = o.image_column;
    d.caption_column = o.caption_column;
    d.conditioning_column = o.conditioning_column;
    d.require_conditioning = o.recipe == "controlnet" || o.recipe == "adapter";
    d.bad_rows = o.skip_bad_rows ? tr::BadRows::Skip : tr::BadRows::Reject;
    return d;
  };
  int64_t skipped_rows = 0;  // --skip-bad-rows: the dataset warns with the rows; the report counts them
  auto open_dataset = [&](const std::string& dir, bool captions) {
    auto ds = std::make_shared<tr::ImageCaptionDataset>(dataset_options(dir, captions));
    skipped_rows += static_cast<int64_t>(ds->skipped().size());
    return ds;
  };
  if (o.recipe == "clip") {
    auto clip = clip_model(o);
    std::vector<std::shared_ptr<tr::ImageCaptionDataset>> folders;
    for (const auto& d : o.clip_data) {
      tr::DatasetOptions dop = dataset_options(d, true);
      dop.resolution = clip->image_encoder->config().image_size;  // the pictures at the image tower's size
      dop.center_crop = true;
      dop.random_flip = false;
      auto ds = std::make_shared<tr::ImageCaptionDataset>(dop);
      skipped_rows += static_cast<int64_t>(ds->skipped().size());
      folders.push_back(ds);
    }
    source = std::make_shared<tr::ConcatBatchSource>(folders, o.batch_size, o.seed);
    recipe = std::make_shared<tr::CLIPRecipe>(clip);
  } else if (o.recipe == "prior") {
    // The frozen CLIP's features of every row, once; then a new prior (PyTorch's default initialisation, as
    // diffusers' PriorTransformer constructor), seeded.
    const std::string clip_dir = prior_clip_dir(o);
    auto clip = loaders::load_clip(clip_dir);
    std::vector<std::string> paths, captions;
    for (const auto& d : o.clip_data) {
      auto ds = open_dataset(d, true);
      for (const auto& row : ds->rows()) {
        paths.push_back(row.image);
        captions.push_back(row.caption);
      }
    }
    auto features = std::make_shared<tr::PriorFeatures>(tr::compute_prior_features(*clip, paths, captions, "--data"));
    torch::manual_seed(o.seed);
    models::PriorTransformer prior(prior_config(o, clip->text_encoder->config(), clip->image_encoder->config(),
                                                clip->tokenizer->model_max_length()));
    if (!o.model.empty()) prior = loaders::load_unclip_prior(o.model)->prior;
    source = std::make_shared<tr::FeatureBatchSource>(captions, o.batch_size, rank, world, o.seed);
    recipe = std::make_shared<tr::PriorRecipe>(prior, features, clip_dir, o.prior_text_drop);
  } else if (o.recipe == "unclip") {
    std::vector<std::shared_ptr<tr::ImageCaptionDataset>> folders;
    for (const auto& d : o.clip_data) folders.push_back(open_dataset(d, true));
    auto concat = std::make_shared<tr::ConcatBatchSource>(folders, o.batch_size, o.seed, rank, world);
    tr::UnCLIPImageTower tower = unclip_image_tower(o);
    torch::manual_seed(o.seed);  // the class embedding's linear_1 (rank 0's is broadcast anyway)
    recipe = std::make_shared<tr::UnCLIPDecoderRecipe>(models, std::move(tower), concat->image_paths(),
                                                       o.image_embedding_dropout);
    source = concat;
  } else if (o.recipe == "spatext") {
    auto ds = open_dataset(o.data, true);
    source = std::make_shared<tr::DatasetBatchSource>(ds, o.batch_size, rank, world, o.seed);
    const auto clip = loaders::load_clip(spatext_clip_dir(o));
    tr::SpaTextTrainOptions so;
    so.lora.rank = o.rank;
    so.lora.alpha = o.alpha;
    so.lora.targets = "all";
    so.map_dropout = o.layout_dropout;
    so.prior_dir = spatext_prior_dir(o);
    so.image_tower_dir = spatext_clip_dir(o);
    torch::manual_seed(o.seed);  // the widened UNet's construction (its weights are then copied)
    recipe = std::make_shared<tr::SpaTextRecipe>(models, so, clip->feature_extractor, clip->image_encoder,
                                                 tr::read_spatext_canvases(o.data, ds->rows()));
  } else if (o.recipe == "vqseg") {
    // Every canvas's map once (small: [11 + 1, R, R] each); then a new VQ-SEG, seeded.
    const std::vector<tr::SceneCanvas> canvases = tr::read_scene_canvases(o.data);
    std::vector<std::string> captions;
    std::vector<at::Tensor> maps;
    for (const auto& c : canvases) {
      captions.push_back(c.caption);
      maps.push_back(tr::load_scene_map(c, loaders::kSceneCategories, o.resolution));
    }
    models::VQModel vq = vqseg_model(o);
    source = std::make_shared<tr::FeatureBatchSource>(captions, o.batch_size, rank, world, o.seed);
    recipe = std::make_shared<tr::VQSegRecipe>(vq, std::move(maps), loaders::kSceneCategories, o.resolution,
                                               /*new_codebook=*/o.model.empty());
  } else if (o.recipe == "scene") {
    auto ds = open_dataset(o.data, true);
    source = std::make_shared<tr::DatasetBatchSource>(ds, o.batch_size, rank, world, o.seed);
    loaders::VQSeg vqseg = loaders::load_vqseg(strip_slashes(o.vqseg));
    DMX_CHECK_ARG(vqseg.resolution == o.resolution, "--vqseg ", o.vqseg, " was trained on ", vqseg.resolution,
                  "-px maps, --data's are ", o.resolution);
    tr::SceneTrainOptions so;
    so.lora.rank = o.rank;
    so.lora.alpha = o.alpha;
    so.lora.targets = "all";
    so.scene_dropout = o.layout_dropout;
    so.vqseg_dir = strip_slashes(o.vqseg);
    torch::manual_seed(o.seed);  // the token tables
    recipe = std::make_shared<tr::SceneRecipe>(models, so, std::move(vqseg), tr::scene_canvases_of(o.data, ds->rows()));
  } else if (o.recipe == "controlnet") {
    auto ds = open_dataset(o.data, true);
    source = std::make_shared<tr::DatasetBatchSource>(ds, o.batch_size, rank, world, o.seed);
    models::ControlNetModel cn{nullptr};
    if (!o.controlnet.empty()) {
      cn = pipelines::load_controlnet(o.controlnet, lo);
    } else {
      torch::manual_seed(o.seed);  // the hint encoder's fresh convolutions (rank 0's are broadcast anyway)
      cn = tr::controlnet_from_unet(models->unet, 3, models->vae_scale_factor());
    }
    auto cn_recipe = std::make_shared<tr::ControlNetRecipe>(models, cn);
    if (o.validation_steps > 0) {
      at::Tensor image;  // [1, 3, H, W] in [0, 1]
      if (!o.validation_image.empty()) {
        const Image img = load_image(o.validation_image, "--validation-image");
        const auto [w, h] = pipelines::default_control_size(img, models->vae_scale_factor());
        DMX_CHECK_ARG(w > 0 && h > 0, "--validation-image must be at least ",
                      pipelines::control_size_multiple(models->vae_scale_factor()), " pixels on each side, got ",
                      img.width, "x", img.height);
        image = pipelines::prepare_control_image(img, w, h);
      } else {
        image = ds->get(0, 0).conditioning.unsqueeze(0);
      }
      cn_recipe->set_validation_image(image);
    }
    recipe = cn_recipe;
  } else if (o.recipe == "palette") {
    auto ds = open_dataset(o.data, false);
    source = std::make_shared<tr::DatasetBatchSource>(ds, o.batch_size, rank, world, o.seed);
    recipe = std::make_shared<tr::PaletteRecipe>(models, palette_config);
  } else if (o.recipe == "adapter") {
    auto ds = open_dataset(o.data, true);
    source = std::make_shared<tr::DatasetBatchSource>(ds, o.batch_size, rank, world, o.seed);
    models::T2IAdapter adapter{nullptr};
    if (!o.adapter.empty()) {
      adapter = loaders::load_t2i_adapter(o.adapter);
    } else {
      // PyTorch's default initialisation (diffusers' T2IAdapter constructor), seeded (rank 0's is broadcast anyway).
      torch::manual_seed(o.seed);
      adapter =
          models::T2IAdapter(adapter_config(o, models->unet->config().block_out_channels, models->vae_scale_factor()));
    }
    auto ad_recipe =
        std::make_shared<tr::AdapterRecipe>(models, adapter, tr::parse_timestep_sampling(o.timestep_sampling));
    if (o.validation_steps > 0) {
      if (!o.validation_image.empty()) {
        ad_recipe->set_validation_image(load_image(o.validation_image, "--validation-image"));
      } else {                                            // the first row's control picture, as training sees it
        const at::Tensor c = ds->get(0, 0).conditioning;  // [3, H, W] in [0, 1]
        ad_recipe->set_validation_image(tensor_to_image(c.permute({1, 2, 0}).contiguous()));
      }
    }
    recipe = ad_recipe;
  } else if (o.recipe == "vae") {
    auto ds = open_dataset(o.data, false);
    source = std::make_shared<tr::DatasetBatchSource>(ds, o.batch_size, rank, world, o.seed);
    tr::VAETrainOptions vo;
    vo.kl_weight = o.kl_weight;
    vo.mse_weight = o.mse_weight;
    vo.crop = o.vae_crop;
    recipe = std::make_shared<tr::VAERecipe>(models, vo);
  } else if (o.recipe == "lora" || o.recipe == "finetune" || o.recipe == "hypernetwork") {
    auto ds = open_dataset(o.data, true);
    source = std::make_shared<tr::DatasetBatchSource>(ds, o.batch_size, rank, world, o.seed);
    if (o.recipe == "hypernetwork")
      recipe = std::make_shared<tr::HypernetworkRecipe>(models, hypernetwork_options(o));
    else if (o.recipe == "lora")
      recipe = std::make_shared<tr::LoRARecipe>(models, lora_options(o), fmt);
    else
      recipe = std::make_shared<tr::FinetuneRecipe>(models, o.train_text_encoder);
  } else {
    const bool prior = !o.class_data.empty();
    std::shared_ptr<tr::ImageCaptionDataset> cls;
    if (prior) {
      if (rank == 0) {
        tr::ClassImageOptions ci;
        ci.dir = o.class_data;
        ci.prompt = o.class_prompt;
        ci.num_class_images = o.num_class_images;
        ci.resolution = o.resolution;
        ci.num_inference_steps = o.class_inference_steps;
        ci.seed = o.seed;
        tr::generate_class_images(models, ci, api::pipeline_sampler());
      }
      if (dist) dist->barrier();
      cls = open_dataset(o.class_data, false);
    }
    auto inst = open_dataset(o.instance_data, false);
    source = std::make_shared<tr::DreamBoothBatchSource>(inst, o.instance_prompt, cls, o.class_prompt, o.batch_size,
                                                         rank, world, o.seed);
    std::shared_ptr<tr::Recipe> inner;
    if (o.lora_rank > 0)
      inner = std::make_shared<tr::LoRARecipe>(models, lora_options(o), fmt);
    else
      inner = std::make_shared<tr::FinetuneRecipe>(models, o.train_text_encoder);
    recipe = std::make_shared<tr::DreamBoothRecipe>(inner, prior, o.prior_loss_weight);
  }
  if (rank == 0) {
    // Just before the first write: what killed runs left of these outputs, then what --overwrite discards of an
    // earlier run in the output dir (all of it, or the checkpoints after the resumed step).
    const ResumePoint resume = resume_point(o);
    train_output_plan(o, resume).prepare();
    if (o.overwrite && is_directory(cfg.output_dir))
      tr::remove_training_entries(cfg.output_dir, resume.in_output_dir ? resume.step : -1);
  }
  if (dist) dist->barrier();
  tr::Trainer trainer(cfg, recipe, source, dist);
  const tr::TrainResult r = trainer.run();
  TrainReport rep;
  rep.steps = r.steps;
  rep.first_step = r.first_step;
  if (!r.history.empty()) {
    rep.first_loss = r.history.front().loss;
    rep.final_loss = r.history.back().loss;
  }
  rep.samples_per_s = r.samples_per_s;
  rep.seconds = r.seconds;
  rep.peak_rss_bytes = r.peak_rss_bytes;
  for (const auto& p : recipe->trainable_parameters()) rep.trainable_parameters += p.tensor.numel();
  rep.output = r.wrote_output ? o.output : "";
  rep.last_checkpoint = r.last_checkpoint;
  rep.skipped_rows = skipped_rows;
  return rep;
}

// ---------------------------------------------------------------------------------------------------
// Throughput on random weights.

namespace {

// Random pixels and fixed token ids (no tokenizer needed).
struct RandomSource : tr::BatchSource {
  int b, res;
  RandomSource(int b_, int res_) : b(b_), res(res_) {}
  tr::Batch get(int64_t step) override {
    tr::Batch x;
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(step));
    x.pixel_values = at::rand({b, 3, res, res}, g, at::TensorOptions().dtype(at::kFloat)) * 2 - 1;
    x.captions.assign(static_cast<size_t>(b), "bench");
    for (int i = 0; i < b; ++i) x.indices.push_back(i);
    return x;
  }
  size_t size() const override { return static_cast<size_t>(b); }
};

struct BenchRecipe : tr::Recipe {
  std::shared_ptr<tr::Recipe> inner;
  explicit BenchRecipe(std::shared_ptr<tr::Recipe> r) : Recipe(r->models_ptr()), inner(std::move(r)) {}
  std::string name() const override { return inner->name(); }
  void setup(const tr::TrainConfig& c) override { inner->setup(c); }
  std::vector<tr::NamedParameter> trainable_parameters() override { return inner->trainable_parameters(); }
  void train_mode(bool on) override { inner->train_mode(on); }
  at::Tensor encode_prompt(const tr::Batch& b) override {
    at::NoGradGuard no_grad;
    const at::Tensor ids = at::zeros({static_cast<int64_t>(b.captions.size()), 77}, at::kLong);
    return models().text_encoder->forward(ids).last_hidden_state;
  }
  at::Tensor predict(const at::Tensor& x, const at::Tensor& t, const at::Tensor& e, const tr::Batch& b) override {
    return inner->predict(x, t, e, b);
  }
  void save(const std::string&) override {}
};

}  // namespace

TrainBenchResult train_bench(const TrainBenchOptions& o) {
  DMX_CHECK_SUPPORTED(o.recipe == "lora", "train bench measures the LoRA recipe (--recipe lora), got '", o.recipe, "'");
  DMX_CHECK_ARG(o.resolution >= 8 && o.resolution % 8 == 0 && o.resolution <= 4096,
                "--resolution must be a multiple of 8 in [8, 4096], got ", o.resolution);
  DMX_CHECK_ARG(o.steps > 0, "--steps must be > 0, got ", o.steps);
  tr::check_batch_size(o.batch_size, o.resolution);
  DMX_CHECK_ARG(o.rank > 0 && o.rank <= tr::kMaxLoRARank, "--rank must be in [1, ", tr::kMaxLoRARank, "], got ",
                o.rank);
  const ModelPreset p = model_preset(o.preset);
  configure_threads(o.threads);
  auto m = std::make_shared<loaders::StableDiffusionModels>();
  at::manual_seed(0);
  m->name = o.preset;
  m->text_encoder = models::CLIPTextModel(p.text);
  m->unet = models::UNet2DConditionModel(p.unet);
  m->vae = models::AutoencoderKL(p.vae);
  m->scheduler_config = {{"_class_name", "PNDMScheduler"}, {"beta_schedule", "scaled_linear"},
                         {"beta_start", 0.00085},          {"beta_end", 0.012},
                         {"num_train_timesteps", 1000},    {"prediction_type", "epsilon"}};
  tr::LoRATrainOptions lo;
  lo.rank = o.rank;
  std::shared_ptr<tr::Recipe> inner = std::make_shared<tr::LoRARecipe>(m, lo, tr::LoRASaveFormat::Diffusers);
  auto recipe = std::make_shared<BenchRecipe>(inner);
  tr::TrainConfig c;
  c.output_dir = (std::filesystem::temp_directory_path() / ("dmx-train-bench-" + std::to_string(getpid()))).string();
  c.max_train_steps = o.steps + 1;
  c.train_batch_size = o.batch_size;
  c.mixed_precision = tr::parse_mixed_precision(o.dtype == "fp32" ? "no" : o.dtype);
  c.gradient_checkpointing = o.gradient_checkpointing;
  c.save_final_checkpoint = false;
  c.write_log = false;
  c.quiet = true;
  tr::Trainer trainer(c, recipe, std::make_shared<RandomSource>(o.batch_size, o.resolution));
  const tr::TrainResult r = trainer.run();
  std::error_code ec;
  std::filesystem::remove_all(c.output_dir, ec);
  TrainBenchResult b;
  b.preset = o.preset;
  b.recipe = o.recipe;
  b.dtype = o.dtype;
  b.resolution = o.resolution;
  b.batch_size = o.batch_size;
  b.steps = o.steps;
  b.threads = runtime_threads();
  for (const auto& q : recipe->trainable_parameters()) b.trainable_parameters += q.tensor.numel();
  double timed = 0;  // steps after the first (warm-up)
  for (size_t i = 1; i < r.history.size(); ++i) timed += r.history[i].seconds;
  b.seconds_per_step = timed / o.steps;
  b.samples_per_s = o.batch_size / b.seconds_per_step;
  b.peak_rss_bytes = r.peak_rss_bytes;
  return b;
}

std::string train_bench_json(const TrainBenchResult& r) {
  nlohmann::json j;
  j["preset"] = r.preset;
  j["recipe"] = r.recipe;
  j["dtype"] = r.dtype;
  j["resolution"] = r.resolution;
  j["batch_size"] = r.batch_size;
  j["steps"] = r.steps;
  j["threads"] = r.threads;
  j["trainable_parameters"] = r.trainable_parameters;
  j["seconds_per_step"] = r.seconds_per_step;
  j["samples_per_s"] = r.samples_per_s;
  j["peak_rss_mib"] = static_cast<double>(r.peak_rss_bytes) / (1024.0 * 1024.0);
  return j.dump();
}

}  // namespace dmx
