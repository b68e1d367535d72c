// dmx public evaluation API (docs/evaluation.md): the emoji classifier (`dmx train classifier`) and the
// scores of a text-to-image model, its ControlNet, LoRA and DreamBooth adapters and of edits (`dmx eval`).
// Torch-free.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmx/error.h"

namespace dmx {

// ---------------------------------------------------------------------------------------------------
// `dmx train classifier`: trains the emoji classifier on the real images of every style (train + heldout
// splits) of a `dmx data emoji` folder, with augmentations (random affine, blur, noise, colour jitter).
struct ClassifierTrainOptions {
  std::string data;        // `dmx data emoji` folder (concepts.json, google/, twitter/)
  std::string output;      // folder: config.json + model.safetensors (fp16)
  bool overwrite = false;  // replace an existing classifier folder (README "Outputs and overwriting")
  int64_t steps = 2000;
  int batch_size = 64;
  double learning_rate = 2e-3;  // AdamW peak; 100 warm-up steps, cosine decay to 0
  double weight_decay = 0.05;
  uint64_t seed = 0;
  int threads = 0;  // 0 = all cores
  bool progress = true;
};

struct ClassifierTrainResult {
  int64_t steps = 0;
  int num_classes = 0;
  int num_images = 0;
  double seconds = 0;  // training loop wall time
  double final_loss = 0;
  // Accuracy on the clean (un-augmented) real images, per style, after training.
  std::vector<std::string> styles;
  std::vector<double> top1, top5, style_accuracy;
};

ClassifierTrainResult train_classifier(const ClassifierTrainOptions& o);

// ---------------------------------------------------------------------------------------------------
// `dmx eval`: generates one image per prompt (seed + i for prompt i) and scores it with the classifier.
struct EvalOptions {
  std::string model;         // diffusers folder of the text-to-image model
  std::string prompts_file;  // one prompt per line; "" = default_eval_prompts()
  std::string classifier = "models/emoji-classifier";
  std::string data;  // `dmx data emoji` folder; "" = default_emoji_data_dir()
  int steps = 25;
  double guidance_scale = 3.0;  // picked for the bundled emoji model on prompts disjoint from the built-in list
  std::string scheduler;        // "" = the model's own
  uint64_t seed = 0;
  int limit = 0;  // > 0: score only the first `limit` prompts
  int threads = 0;
  std::string out_dir;  // when set: generated images (and grids) are written here
  // ControlNet: edge F1 with and without the net (same prompts and seeds), on the first aux_prompts prompts.
  std::string controlnet;
  // T2I-Adapter: the same edge F1 with the adapter (scale adapter_scale) instead of the ControlNet, same prompts,
  // seeds and control maps (converted to the adapter's channels as generate does).
  std::string adapter;
  double adapter_scale = 1.0;
  // LoRA: style accuracy (share classified twitter) with and without the LoRA, first aux_prompts prompts.
  std::string lora;
  double lora_scale = 1.0;
  // Hypernetwork (FILE[:MULT], docs/hypernetworks.md): style accuracy with and without it, as for the LoRA.
  std::string hypernetwork;
  int aux_prompts = 50;
  // DreamBooth LoRA: subject similarity of `dreambooth_images` images of dreambooth_prompt, with and without
  // the LoRA, to the real image(s) of dreambooth_concept.
  std::string dreambooth;
  std::string dreambooth_prompt;
  std::string dreambooth_concept;
  int dreambooth_images = 8;
  // `dmx eval --layouts DIR` (include/dmx/scenes.h, docs/layouts.md): scores the pictures made from the layouts of a
  // `dmx data scenes` folder instead of the prompts; the fields above that apply (model, classifier, steps,
  // guidance_scale, scheduler, seed, limit, threads, out_dir, progress) are passed on.
  std::string layouts;
  std::string layout_method = "text";
  double layout_guidance_scale = 1.0;   // spatext: the map's guidance scale over guidance_scale
  std::string scene_guidance = "text";  // scene: what guidance's unconditional row drops (text | all)
  // `dmx eval --clip DIR`: measures a CLIP folder (dmx train clip) on the emoji of `data` instead (evaluate_clip);
  // the fields that apply are data, threads and progress.
  std::string clip;
  // Stable unCLIP (docs/unclip.md): `model` may be a StableUnCLIPPipeline folder; its base images then go text ->
  // prior -> decoder with these settings (the other sets, ControlNet/adapter/LoRA/hypernetwork/DreamBooth, do not
  // apply). `variations` (a StableUnCLIPImg2ImgPipeline folder) also scores variations of real emoji:
  // variations_per_image pictures, without a prompt, of the real google picture of the first aux_prompts prompts'
  // concepts and of every held-out concept.
  int prior_steps = 25;
  double prior_guidance_scale = 4.0;
  int noise_level = 0;
  std::string variations;
  int variations_per_image = 4;
  bool progress = true;
};

struct EvalResult {
  int n = 0;        // prompts scored
  double top1 = 0;  // fraction of images whose top-1 concept is the prompt's
  double top5 = 0;
  double frechet = 0;           // classifier-feature Fréchet distance: generated vs real (google) of the same concepts
  double frechet_real = 0;      // the same between real images of those concepts and of a disjoint set
  double twitter_fraction = 0;  // share of the base images the style head calls twitter
  // ControlNet (when EvalOptions::controlnet is set; -1 otherwise)
  int controlnet_n = 0;
  // Each prompt's concept's edge map as control; with the prompt, and again with an empty prompt (the map alone
  // carries the shape), each with the ControlNet and without it (same seeds).
  double edge_f1 = -1, edge_f1_without = -1;
  double edge_f1_empty = -1, edge_f1_empty_without = -1;
  int edge_tolerance = -1;  // pixels of tolerance used (BSDS's 0.0075 of the image diagonal, rounded)
  // T2I-Adapter (when EvalOptions::adapter is set; -1 otherwise): as the ControlNet's, "without" the same images.
  int adapter_n = 0;
  double adapter_edge_f1 = -1, adapter_edge_f1_empty = -1;
  // Wall seconds per generated picture (mean over the images of each set, same steps and threads): the base images,
  // with the ControlNet, with the adapter (-1 when not run). Timing of whole pictures, the adapter's one pass included.
  double seconds_per_image = -1, controlnet_seconds_per_image = -1, adapter_seconds_per_image = -1;
  // LoRA
  int lora_n = 0;
  double lora_style_accuracy = -1, lora_style_accuracy_without = -1;
  // Hypernetwork
  int hypernetwork_n = 0;
  double hypernetwork_style_accuracy = -1, hypernetwork_style_accuracy_without = -1;
  // DreamBooth
  int dreambooth_n = 0;
  double dreambooth_similarity = -1, dreambooth_similarity_without = -1;
  double dreambooth_top5 = -1, dreambooth_top5_without = -1;  // share recognised as the concept (top-5)
  bool through_prior = false;  // the base images came from a StableUnCLIPPipeline folder (text -> prior -> decoder)
  // Variations (EvalOptions::variations), over the sources of the prompts' concepts (train) and the held-out ones:
  // share of the variation pictures whose top-1 / top-5 classifier concept is the source's; mean SSIM between the
  // variations of one source, pairwise (lower = more diverse), and between each variation and its source.
  int variations_n = 0, variations_heldout_n = 0;  // source pictures
  double variations_top1 = -1, variations_top5 = -1;
  double variations_heldout_top1 = -1, variations_heldout_top5 = -1;
  double variations_pairwise_ssim = -1, variations_source_ssim = -1;
  double seconds = 0;
  std::vector<std::string> prompts;     // the prompts scored
  std::vector<std::string> top1_names;  // the classifier's top-1 concept for each
  std::string to_json() const;          // one line: every field above except the per-prompt lists
};

EvalResult evaluate(const EvalOptions& o);

// `dmx eval --clip DIR` (docs/evaluation.md "CLIP"): per style of `data`, every real image embedded with the CLIP's
// image tower (through its feature extractor, as dmx embed does) and every concept's name with its text tower;
// cosine similarities rank them.
struct ClipEvalStyle {
  std::string style;
  int heldout = 0, train = 0;  // concepts with an image in this style, per split
  // Zero-shot classification of the held-out images (concepts no training row showed), prompts = the names:
  // among the held-out names, and among every concept's name (held-out and train).
  double zero_shot_top1 = 0, zero_shot_top5 = 0;
  double zero_shot_all_top1 = 0, zero_shot_all_top5 = 0;
  // Retrieval recall@1 / @5 over the held-out pairs (image -> text is the zero-shot figure among held-out names) and
  // over the train pairs.
  double heldout_i2t_r1 = 0, heldout_i2t_r5 = 0, heldout_t2i_r1 = 0, heldout_t2i_r5 = 0;
  double train_i2t_r1 = 0, train_i2t_r5 = 0, train_t2i_r1 = 0, train_t2i_r5 = 0;
};
struct ClipEvalResult {
  std::vector<ClipEvalStyle> styles;
  double logit_scale = 0;  // the model's learned log temperature
  double seconds = 0;
  std::string to_json() const;
};
// InvalidArgument naming --clip / --data when a folder is missing or not what it should be.
ClipEvalResult evaluate_clip(const EvalOptions& o);

// `dmx eval --prior DIR` (docs/unclip.md "Training the prior"): a diffusion prior (dmx train prior, or a
// StableUnCLIPPipeline folder's prior half) measured as Ramesh et al. 2022 do: the CLIP image embedding sampled from
// each concept's name (the prior's whole sampling loop: its scheduler, prior_steps steps, classifier-free guidance
// prior_guidance_scale, one generator seeded with `seed` for the whole batch of prompts) against the true image
// embedding of the concept's picture (the CLIP's image tower through its feature extractor), per style and split
// (held-out concepts: all; train concepts: at most train_limit, every k-th), with the text embedding itself as the
// baseline.
struct PriorEvalOptions {
  std::string prior;     // the prior folder (prior/, prior_scheduler/, prior_text_encoder/, prior_tokenizer/)
  std::string clip;      // the CLIP folder of the image tower; "" = models/emoji-clip when it exists
  std::string data;      // `dmx data emoji` folder; "" = default_emoji_data_dir()
  int prior_steps = 25;  // StableUnCLIPPipeline's default
  double prior_guidance_scale = 4.0;  // StableUnCLIPPipeline's default; <= 1: no guidance
  uint64_t seed = 0;
  int train_limit = 200;
  int threads = 0;
  bool progress = true;
};
struct PriorEvalSplit {
  std::string style, split;  // google | twitter, heldout | train
  int n = 0;                 // concepts with a picture in this style
  // Mean cosine similarity to the true image embedding: the sampled embedding (guided; and unguided, -1 when the
  // guided run is unguided), and the baseline, the prompt's text embedding.
  double cos_sampled = 0, cos_unguided = -1, cos_text = 0;
  // Retrieval among the n pictures' true embeddings of this style and split: top-1 / top-5 of the sampled
  // embedding (guided, unguided) and of the text embedding (CLIP's text -> image recall).
  double top1_sampled = 0, top5_sampled = 0, top1_unguided = -1, top5_unguided = -1, top1_text = 0, top5_text = 0;
  // Mean L2 norms: of the true image embeddings, the sampled ones (guided) and the text embeddings (the decoder is
  // trained on image embeddings: how far a conditioning vector is from their scale).
  double norm_true = 0, norm_sampled = 0, norm_text = 0;
};
struct PriorEvalResult {
  std::vector<PriorEvalSplit> splits;
  int prior_steps = 0;
  double prior_guidance_scale = 0;
  double seconds = 0;
  std::string to_json() const;
};
// InvalidArgument naming --prior / --clip / --data when a folder is missing or not what it should be.
PriorEvalResult evaluate_prior(const PriorEvalOptions& o);

// The built-in prompt list: 300 prompts from the *train* concepts of data's concepts.json (never a
// held-out concept), picked deterministically (every k-th train concept in concepts.json order, k =
// floor(#train / 300)); one in five (i % 5 == 4) is "composed": "<name>, <category lower-cased>, google style",
// the others the bare name. Throws InvalidArgument when fewer than 300 train concepts exist.
std::vector<std::string> default_eval_prompts(const std::string& data_dir, int count = 300);

// $DMX_EMOJI_DATA, else ~/.cache/dmx/emoji-data, else /tmp/emoji_ds: the first that holds concepts.json
// ("" when none does).
std::string default_emoji_data_dir();

// Reads a prompt file: one prompt per line (blank lines and lines starting with '#' skipped). Each must start
// with a concept name of concepts.json, optionally followed by ", <category>" and/or ", <style> style".
// InvalidArgument naming the file, the line number and the text when a line names no known concept.
std::vector<std::string> read_eval_prompts(const std::string& path, const std::string& data_dir);

// Editing metrics on 8-bit images (paths). IoU of two masks thresholded at 128 (gray or RGB; white = inside).
double mask_iou(const std::string& mask_a, const std::string& mask_b);
// Mean absolute difference in [0, 1] of two RGB images over the pixels where `mask` is black (outside the
// edited region).
double background_error(const std::string& image_a, const std::string& image_b, const std::string& mask);
// Edge F1 between Canny(image, 100, 200) and an edge map (white = edge), with a 1-pixel tolerance.
double edge_f1_files(const std::string& image, const std::string& edge_map);
}  // namespace dmx
