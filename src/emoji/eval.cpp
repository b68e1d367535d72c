// `dmx eval` and `dmx train classifier` (include/dmx/eval.h, docs/evaluation.md): scores of generated emoji
// measured with the emoji classifier (emoji/emoji_classifier.h).
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "core/canny.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/output_plan.h"
#include "core/progress.h"
#include "core/runtime.h"
#include "core/text.h"
#include "core/utf8.h"
#include "dmx/eval.h"
#include "emoji/emoji_classifier.h"
#include "emoji/emoji_classifier_train.h"
#include "emoji/emoji_data.h"
#include "io/checkpoint.h"
#include "loaders/hypernetwork_loader.h"
#include "loaders/lora_loader.h"
#include "loaders/model_bundle.h"
#include "loaders/t2i_adapter_loader.h"
#include "loaders/unclip.h"
#include "metrics/metrics.h"
#include "pipelines/controlnet.h"
#include "pipelines/stable_diffusion.h"
#include "pipelines/stable_unclip.h"
#include "pipelines/t2i_adapter_provider.h"

namespace dmx {

namespace {

// An image (any channels) -> [H, W] bool of the first channel > 127.
at::Tensor binary_map(const Image& img) {
  at::Tensor t = at::from_blob(const_cast<uint8_t*>(img.data.data()), {img.height, img.width, img.channels}, at::kByte);
  return t.select(2, 0).gt(127).clone();
}

// Canny(100, 200) of an RGB image [3, H, W] in [0, 1] -> [H, W] bool (the thresholds of `dmx data emoji`).
at::Tensor canny_of(const at::Tensor& chw01) {
  const Image rgb = tensor_to_image(chw01.permute({1, 2, 0}).contiguous());
  return binary_map(canny_edges(rgb, 100.0, 200.0));
}

// The concept a prompt names: the longest concept name equal to the prompt or followed by ", ". -1 if none.
int prompt_concept(const std::string& prompt, const emoji::EmojiData& data) {
  int best = data.index_of(prompt);
  if (best >= 0) return best;
  size_t best_len = 0;
  for (size_t pos = prompt.find(", "); pos != std::string::npos; pos = prompt.find(", ", pos + 1)) {
    const int i = data.index_of(prompt.substr(0, pos));
    if (i >= 0 && pos > best_len) {
      best = i;
      best_len = pos;
    }
  }
  return best;
}

std::string resolve_data_dir(const std::string& data) {
  if (!data.empty()) return data;
  const std::string d = default_emoji_data_dir();
  DMX_CHECK_ARG(!d.empty(),
                "--data: no emoji data found ($DMX_EMOJI_DATA, ~/.cache/dmx/emoji-data, /tmp/emoji_ds); "
                "build it with `dmx data emoji --out ~/.cache/dmx/emoji-data` or pass --data DIR");
  return d;
}

void write_grid(const std::string& path, const std::vector<at::Tensor>& images) {  // [3, H, W] in [0, 1]
  if (images.empty()) return;
  const int64_t n = static_cast<int64_t>(images.size());
  const int64_t cols = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n))));
  const int64_t rows = (n + cols - 1) / cols;
  const int64_t H = images[0].size(1), W = images[0].size(2);
  at::Tensor grid = at::ones({3, rows * H, cols * W});
  for (int64_t i = 0; i < n; ++i)
    grid.slice(1, (i / cols) * H, (i / cols + 1) * H).slice(2, (i % cols) * W, (i % cols + 1) * W).copy_(images[i]);
  save_png(path, tensor_to_image(grid.permute({1, 2, 0}).contiguous()));
}

}  // namespace

std::string default_emoji_data_dir() {
  std::vector<std::string> c;
  if (const char* e = std::getenv("DMX_EMOJI_DATA")) c.push_back(e);
  if (const char* h = std::getenv("HOME")) c.push_back(std::string(h) + "/.cache/dmx/emoji-data");
  c.push_back("/tmp/emoji_ds");
  for (const auto& d : c)
    if (!d.empty() && path_exists(join_path(d, "concepts.json"))) return d;
  return "";
}

std::vector<std::string> default_eval_prompts(const std::string& data_dir, int count) {
  const emoji::EmojiData data(resolve_data_dir(data_dir), "--data");
  std::vector<const emoji::EmojiConcept*> train;
  for (const auto& c : data.concepts())
    if (c.split == "train") train.push_back(&c);
  DMX_CHECK_ARG(count >= 1 && static_cast<int>(train.size()) >= count, "the built-in prompt list needs ", count,
                " train concepts; ", data.root(), " has ", train.size(), " (give --prompts FILE)");
  const size_t k = train.size() / static_cast<size_t>(count);
  std::vector<std::string> out;
  for (int j = 0; j < count; ++j) {
    const auto& c = *train[static_cast<size_t>(j) * k];
    out.push_back(j % 5 == 4 ? c.name + ", " + to_lower_ascii(c.category) + ", google style" : c.name);
  }
  return out;
}

std::vector<std::string> read_eval_prompts(const std::string& path, const std::string& data_dir) {
  DMX_CHECK_ARG(path_exists(path) && !is_directory(path), "--prompts: file not found: ", path);
  const emoji::EmojiData data(resolve_data_dir(data_dir), "--data");
  std::istringstream in(read_text_file(path, "--prompts", kMaxMetadataFileBytes));
  std::vector<std::string> out;
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    const std::string p = trim(line);
    if (p.empty() || p[0] == '#') continue;
    check_text(p, "--prompts line " + std::to_string(line_no));
    DMX_CHECK_ARG(prompt_concept(p, data) >= 0, "--prompts: ", path, ":", line_no, ": '", p,
                  "' does not start with an emoji name of ", join_path(data.root(), "concepts.json"),
                  " (lower-cased `name`, e.g. 'slice of pizza', optionally followed by ', ...')");
    out.push_back(p);
  }
  DMX_CHECK_ARG(!out.empty(), "--prompts: ", path, " has no prompts");
  return out;
}

double mask_iou(const std::string& a, const std::string& b) {
  const Image ia = load_image(a, "--mask-iou"), ib = load_image(b, "--mask-iou");
  check_image_size("--mask-iou", ib, ia.width, ia.height);
  return metrics::mask_iou(binary_map(to_rgb(ia)), binary_map(to_rgb(ib)));
}

double background_error(const std::string& image_a, const std::string& image_b, const std::string& mask) {
  const Image a = to_rgb(load_image(image_a, "--background-error")),
              b = to_rgb(load_image(image_b, "--background-error"));
  const Image m = to_rgb(load_image(mask, "--background-error mask"));
  check_image_size("--background-error", b, a.width, a.height);
  check_image_size("--background-error mask", m, a.width, a.height);
  const at::Tensor ta = emoji::image_to_tensor01(a), tb = emoji::image_to_tensor01(b);
  const at::Tensor outside = binary_map(m).logical_not();  // [H, W]
  const double n = outside.sum().item<double>();
  DMX_CHECK_ARG(n > 0, "--background-error: the mask ", mask, " covers the whole image (no background to compare)");
  return (ta - tb).abs().mean(0).masked_select(outside).sum().item<double>() / n;
}

double edge_f1_files(const std::string& image, const std::string& edge_map) {
  const Image img = to_rgb(load_image(image, "--edge-f1"));
  const Image e = load_image(edge_map, "--edge-f1");
  check_image_size("--edge-f1", e, img.width, img.height);
  return metrics::edge_f1(binary_map(canny_edges(img, 100.0, 200.0)), binary_map(to_rgb(e)),
                          metrics::edge_tolerance(img.height, img.width));
}

ClassifierTrainResult train_classifier(const ClassifierTrainOptions& o) {
  if (!o.output.empty()) {
    OutputPlan plan(o.overwrite);
    plan.input(o.data, "--data");
    std::string out = o.output;
    while (out.size() > 1 && out.back() == '/') out.pop_back();
    plan.folder(out, "--output", {"config.json", "model.safetensors"}, "emoji classifier folder");
    plan.prepare();
  }
  return emoji::train_emoji_classifier(o);
}

namespace {
// Shares of rows whose top-1 / top-5 concept (of logits [N, C]) is the row's label [N]; returns the top-5 indices.
at::Tensor top_shares(const at::Tensor& logits, const at::Tensor& labels, double& top1, double& top5) {
  const at::Tensor t5 = std::get<1>(logits.topk(std::min<int64_t>(5, logits.size(1)), 1));
  top1 = t5.select(1, 0).eq(labels).to(at::kDouble).mean().item<double>();
  top5 = t5.eq(labels.unsqueeze(1)).any(1).to(at::kDouble).mean().item<double>();
  return t5;
}

// model_index.json's _class_name of a diffusers folder ("" when there is none).
std::string pipeline_class_of(const std::string& model) {
  const std::string index = join_path(model, "model_index.json");
  if (!is_directory(model) || !path_exists(index)) return "";
  const nlohmann::json j = io::load_json_file(index, "--model model_index.json");
  return j.contains("_class_name") && j["_class_name"].is_string() ? j["_class_name"].get<std::string>() : "";
}
}  // namespace

std::string EvalResult::to_json() const {
  nlohmann::json j = {{"n", n},
                      {"top1", top1},
                      {"top5", top5},
                      {"frechet", frechet},
                      {"frechet_real", frechet_real},
                      {"frechet_ratio", frechet_real > 0 ? frechet / frechet_real : 0.0},
                      {"twitter_fraction", twitter_fraction},
                      {"seconds", seconds}};
  if (controlnet_n > 0) {
    j["controlnet_n"] = controlnet_n;
    j["edge_f1"] = edge_f1;
    j["edge_f1_without"] = edge_f1_without;
    j["edge_f1_empty"] = edge_f1_empty;
    j["edge_f1_empty_without"] = edge_f1_empty_without;
    j["edge_tolerance"] = edge_tolerance;
    j["controlnet_seconds_per_image"] = controlnet_seconds_per_image;
  }
  if (adapter_n > 0) {
    j["adapter_n"] = adapter_n;
    j["adapter_edge_f1"] = adapter_edge_f1;
    j["adapter_edge_f1_empty"] = adapter_edge_f1_empty;
    j["edge_f1_without"] = edge_f1_without;
    j["edge_f1_empty_without"] = edge_f1_empty_without;
    j["edge_tolerance"] = edge_tolerance;
    j["adapter_seconds_per_image"] = adapter_seconds_per_image;
  }
  j["seconds_per_image"] = seconds_per_image;
  if (lora_n > 0) {
    j["lora_n"] = lora_n;
    j["lora_style_accuracy"] = lora_style_accuracy;
    j["lora_style_accuracy_without"] = lora_style_accuracy_without;
  }
  if (hypernetwork_n > 0) {
    j["hypernetwork_n"] = hypernetwork_n;
    j["hypernetwork_style_accuracy"] = hypernetwork_style_accuracy;
    j["hypernetwork_style_accuracy_without"] = hypernetwork_style_accuracy_without;
  }
  if (dreambooth_n > 0) {
    j["dreambooth_n"] = dreambooth_n;
    j["dreambooth_similarity"] = dreambooth_similarity;
    j["dreambooth_similarity_without"] = dreambooth_similarity_without;
    j["dreambooth_top5"] = dreambooth_top5;
    j["dreambooth_top5_without"] = dreambooth_top5_without;
  }
  if (through_prior) j["through_prior"] = true;
  if (variations_n > 0) {
    j["variations_n"] = variations_n;
    j["variations_top1"] = variations_top1;
    j["variations_top5"] = variations_top5;
    j["variations_heldout_n"] = variations_heldout_n;
    j["variations_heldout_top1"] = variations_heldout_top1;
    j["variations_heldout_top5"] = variations_heldout_top5;
    j["variations_pairwise_ssim"] = variations_pairwise_ssim;
    j["variations_source_ssim"] = variations_source_ssim;
  }
  return j.dump();
}

EvalResult evaluate(const EvalOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  // 1. Check every cheap input before loading anything.
  DMX_CHECK_ARG(!o.model.empty(), "--model is required (a diffusers folder)");
  DMX_CHECK_ARG(path_exists(o.model), "--model: path not found: ", o.model);
  pipelines::check_num_inference_steps(o.steps, "--steps");
  pipelines::check_guidance_scale(o.guidance_scale, "--guidance-scale");
  DMX_CHECK_ARG(o.limit >= 0, "--limit must be >= 0, got ", o.limit);
  DMX_CHECK_ARG(o.aux_prompts >= 1, "--aux-prompts must be >= 1, got ", o.aux_prompts);
  DMX_CHECK_ARG(o.dreambooth_images >= 2, "--dreambooth-images must be >= 2, got ", o.dreambooth_images);
  DMX_CHECK_ARG(o.controlnet.empty() || path_exists(o.controlnet), "--controlnet: path not found: ", o.controlnet);
  DMX_CHECK_ARG(o.adapter.empty() || path_exists(o.adapter), "--adapter: path not found: ", o.adapter);
  DMX_CHECK_ARG(std::isfinite(o.adapter_scale), "--adapter-scale must be finite, got ", o.adapter_scale);
  DMX_CHECK_ARG(o.lora.empty() || path_exists(o.lora), "--lora: file not found: ", o.lora);
  DMX_CHECK_ARG(std::isfinite(o.lora_scale), "--lora-scale must be finite, got ", o.lora_scale);
  loaders::HypernetworkSpec hn_spec;
  if (!o.hypernetwork.empty()) {
    hn_spec = loaders::parse_hypernetwork_arg(o.hypernetwork);
    DMX_CHECK_ARG(path_exists(hn_spec.path) && !is_directory(hn_spec.path),
                  "--hypernetwork: file not found: ", hn_spec.path);
  }
  if (!o.dreambooth.empty()) {
    DMX_CHECK_ARG(path_exists(o.dreambooth), "--dreambooth: file not found: ", o.dreambooth);
    DMX_CHECK_ARG(!o.dreambooth_prompt.empty(), "--dreambooth needs --dreambooth-prompt (e.g. 'sks emoji')");
    DMX_CHECK_ARG(!o.dreambooth_concept.empty(), "--dreambooth needs --dreambooth-concept (the emoji name)");
  } else {
    DMX_CHECK_ARG(o.dreambooth_prompt.empty() && o.dreambooth_concept.empty(),
                  "--dreambooth-prompt/--dreambooth-concept need --dreambooth");
  }
  // Stable unCLIP: a text-to-image folder is scored through its prior; an image-variation folder is --variations.
  const std::string model_class = pipeline_class_of(o.model);
  DMX_CHECK_ARG(model_class != "StableUnCLIPImg2ImgPipeline", "--model ", o.model,
                " is a StableUnCLIPImg2ImgPipeline folder (image variations): give it as --variations DIR, with a "
                "text-to-image --model");
  const bool through_prior = model_class == "StableUnCLIPPipeline";
  if (through_prior) {
    const std::pair<const char*, const std::string*> others[] = {{"--controlnet", &o.controlnet},
                                                                 {"--adapter", &o.adapter},
                                                                 {"--lora", &o.lora},
                                                                 {"--hypernetwork", &o.hypernetwork},
                                                                 {"--dreambooth", &o.dreambooth}};
    for (const auto& [flag, value] : others)
      DMX_CHECK_ARG(value->empty(), flag, " does not apply to a Stable unCLIP --model (", o.model,
                    "): its base images go text -> prior -> decoder");
  }
  pipelines::check_num_inference_steps(o.prior_steps, "--prior-steps");
  pipelines::check_guidance_scale(o.prior_guidance_scale, "--prior-guidance-scale");
  DMX_CHECK_ARG(o.noise_level >= 0,
                "--noise-level must be >= 0 (and below the image_noising_scheduler's "
                "num_train_timesteps), got ",
                o.noise_level);
  if (!o.variations.empty()) {
    DMX_CHECK_ARG(path_exists(o.variations), "--variations: path not found: ", o.variations);
    const std::string cls = pipeline_class_of(o.variations);
    DMX_CHECK_ARG(cls == "StableUnCLIPImg2ImgPipeline", "--variations ", o.variations,
                  " must be a StableUnCLIPImg2ImgPipeline folder (feature_extractor + image_encoder), got ",
                  cls.empty() ? std::string("another kind of folder") : "a " + cls + " folder");
  }
  DMX_CHECK_ARG(o.variations_per_image >= 2 && o.variations_per_image <= 64,
                "--variations-per-image must be in [2, 64] (pairwise diversity needs two), got ",
                o.variations_per_image);
  {
    // --out holds what dmx eval writes (a folder per image set and its grid); an existing one may hold nothing
    // else, so an earlier evaluation is all that is replaced.
    OutputPlan plan(false);
    plan.input(o.model, "--model");
    plan.input(o.classifier, "--classifier");
    plan.input(o.data, "--data");
    plan.input(o.prompts_file, "--prompts");
    plan.input(o.controlnet, "--controlnet");
    plan.input(o.adapter, "--adapter");
    plan.input(o.lora, "--lora");
    plan.input(hn_spec.path, "--hypernetwork");
    plan.input(o.dreambooth, "--dreambooth");
    plan.input(o.variations, "--variations");
    if (!o.out_dir.empty())
      plan.work_folder(o.out_dir, "--out", [](const std::string& dir) -> std::string {
        static const std::vector<std::string> sets = {"base",
                                                      "controlnet",
                                                      "controlnet-empty-prompt",
                                                      "adapter",
                                                      "adapter-empty-prompt",
                                                      "empty-prompt",
                                                      "lora",
                                                      "hypernetwork",
                                                      "dreambooth",
                                                      "dreambooth_without",
                                                      "variations",
                                                      "variations-heldout"};
        std::error_code ec;
        for (auto it = std::filesystem::directory_iterator(dir, ec); !ec && it != std::filesystem::directory_iterator();
             it.increment(ec)) {
          const std::string n = it->path().filename().string();
          bool ours = false;
          for (const auto& s : sets) ours = ours || n == s || n == s + "_grid.png";
          if (!ours)
            return "holds '" + n +
                   "', which dmx eval does not write: give a new or empty folder, or one an earlier "
                   "dmx eval wrote";
        }
        return "";
      });
    plan.prepare();
  }
  if (!o.out_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(o.out_dir, ec);
    DMX_CHECK_ARG(is_directory(o.out_dir), "--out: cannot create the folder ", o.out_dir, ": ", ec.message());
  }
  DMX_CHECK_ARG(is_directory(o.classifier), "--classifier: not a folder: ", o.classifier,
                " (train one with `dmx train classifier --data DIR --output DIR`)");
  const std::string data_dir = resolve_data_dir(o.data);
  const emoji::EmojiData data(data_dir, "--data");
  std::vector<std::string> prompts =
      o.prompts_file.empty() ? default_eval_prompts(data_dir) : read_eval_prompts(o.prompts_file, data_dir);
  if (o.limit > 0 && static_cast<int>(prompts.size()) > o.limit) prompts.resize(static_cast<size_t>(o.limit));
  std::vector<int> concept_of;
  for (const auto& p : prompts) concept_of.push_back(prompt_concept(p, data));
  int db_concept = -1;
  if (!o.dreambooth.empty()) {
    db_concept = data.index_of(o.dreambooth_concept);
    DMX_CHECK_ARG(db_concept >= 0, "--dreambooth-concept: '", o.dreambooth_concept, "' is not an emoji name of ",
                  join_path(data_dir, "concepts.json"));
  }
  emoji::EmojiClassifier clf = emoji::load_emoji_classifier(o.classifier);
  const auto& names = clf->config().class_names;
  DMX_CHECK_FORMAT(names.size() == data.concepts().size(), "--classifier ", o.classifier, " knows ", names.size(),
                   " concepts, --data ", data_dir, " has ", data.concepts().size(), "; train it on that data");
  for (size_t i = 0; i < names.size(); ++i)
    DMX_CHECK_FORMAT(names[i] == data.concepts()[i].name, "--classifier ", o.classifier, ": class ", i, " is '",
                     names[i], "', --data has '", data.concepts()[i].name, "'; train it on that data");
  const int64_t twitter =
      std::find(clf->config().styles.begin(), clf->config().styles.end(), "twitter") - clf->config().styles.begin();
  DMX_CHECK_FORMAT(twitter < static_cast<int64_t>(clf->config().styles.size()), "--classifier ", o.classifier,
                   " has no 'twitter' style");
  configure_threads(o.threads);

  // 2. The model and one generation helper (prompt i always gets seed + i).
  // A malformed or hostile hypernetwork file is refused before the model loads.
  models::Hypernetwork hypernetwork{nullptr};
  if (!o.hypernetwork.empty()) hypernetwork = loaders::load_hypernetwork(hn_spec.path);
  std::shared_ptr<loaders::UnCLIPComponents> unclip_parts;
  if (through_prior) unclip_parts = loaders::load_unclip_components(o.model);  // a missing part says which
  auto models = loaders::load_stable_diffusion(o.model);
  pipelines::StableDiffusionPipeline pipe(models);
  std::unique_ptr<pipelines::StableUnCLIPPipeline> unclip_pipe;
  if (through_prior) unclip_pipe = std::make_unique<pipelines::StableUnCLIPPipeline>(models, unclip_parts);
  const int n = static_cast<int>(prompts.size());
  const int n_aux = std::min(n, o.aux_prompts);
  std::vector<int> heldout;  // variation sources besides the prompts' concepts: every held-out concept
  if (!o.variations.empty())
    for (int c = 0; c < static_cast<int>(data.concepts().size()); ++c)
      if (data.concepts()[static_cast<size_t>(c)].split == "heldout" && data.has("google", c)) heldout.push_back(c);
  int total = n + (o.variations.empty() ? 0 : n_aux + static_cast<int>(heldout.size())) +
              (o.controlnet.empty() ? 0 : 3 * n_aux) +
              (o.adapter.empty() ? 0 : (o.controlnet.empty() ? 3 : 2) * n_aux) + (o.lora.empty() ? 0 : n_aux) +
              (o.hypernetwork.empty() ? 0 : n_aux) + (o.dreambooth.empty() ? 0 : 2 * o.dreambooth_images);
  ProgressBar bar("eval", total);
  // Wall time of the pictures made with each kind of control (timed_base, timed_cn, timed_ad: [seconds, pictures]).
  std::pair<double, int> timed_base{0, 0}, timed_cn{0, 0}, timed_ad{0, 0};
  auto generate = [&](const std::string& prompt, uint64_t seed, const std::vector<pipelines::ControlNetUnit>& cn,
                      const pipelines::T2IAdapterUnit* adapter = nullptr) {
    const auto g0 = std::chrono::steady_clock::now();
    if (unclip_pipe) {  // text -> prior -> decoder (the other sets are refused above)
      pipelines::StableUnCLIPParams q;
      q.prompt = prompt;
      q.num_inference_steps = o.steps;
      q.guidance_scale = o.guidance_scale;
      q.scheduler = o.scheduler;
      q.prior_num_inference_steps = o.prior_steps;
      q.prior_guidance_scale = o.prior_guidance_scale;
      q.noise_level = o.noise_level;
      at::Generator generator = pipelines::make_generator(seed);
      q.generator = &generator;
      q.show_progress = false;
      at::Tensor img = unclip_pipe->run(q).images[0].permute({2, 0, 1}).contiguous();
      timed_base.first += std::chrono::duration<double>(std::chrono::steady_clock::now() - g0).count();
      timed_base.second += 1;
      bar.tick();
      return img;
    }
    pipelines::StableDiffusionParams p;
    p.prompt = prompt;
    p.num_inference_steps = o.steps;
    p.guidance_scale = o.guidance_scale;
    p.scheduler = o.scheduler;
    at::Generator generator = pipelines::make_generator(seed);
    p.generator = &generator;
    p.show_progress = false;
    p.residual_providers = pipelines::controlnet_providers(cn);
    if (adapter) p.residual_providers.push_back(std::make_shared<pipelines::T2IAdapterProvider>(std::vector{*adapter}));
    at::Tensor img = pipe.run(p).images[0].permute({2, 0, 1}).contiguous();  // [3, H, W] in [0, 1]
    auto& timed = adapter ? timed_ad : cn.empty() ? timed_base : timed_cn;
    timed.first += std::chrono::duration<double>(std::chrono::steady_clock::now() - g0).count();
    timed.second += 1;
    bar.tick();
    return img;
  };
  auto save_all = [&](const std::string& sub, const std::vector<at::Tensor>& imgs) {
    if (o.out_dir.empty()) return;
    const std::string dir = join_path(o.out_dir, sub);
    std::filesystem::create_directories(dir);
    for (size_t i = 0; i < imgs.size(); ++i) {
      char name[32];
      std::snprintf(name, sizeof(name), "%04zu.png", i);
      save_png(join_path(dir, name), tensor_to_image(imgs[i].permute({1, 2, 0}).contiguous()));
    }
    write_grid(join_path(o.out_dir, sub + "_grid.png"), imgs);
  };
  auto features = [&](const std::vector<at::Tensor>& imgs) {
    return emoji::classify(clf, at::stack(imgs) * 2.0 - 1.0, 64);
  };
  auto twitter_share = [&](const at::Tensor& style_logits) {
    return style_logits.argmax(1).eq(twitter).to(at::kDouble).mean().item<double>();
  };

  EvalResult r;
  r.n = n;
  r.prompts = prompts;
  r.through_prior = through_prior;
  // 3. Base images: prompt accuracy, Fréchet distances, style.
  std::vector<at::Tensor> base;
  for (int i = 0; i < n; ++i)
    base.push_back(generate(prompts[static_cast<size_t>(i)], o.seed + static_cast<uint64_t>(i), {}));
  save_all("base", base);
  const emoji::EmojiClassifierOutput out = features(base);
  const at::Tensor labels = at::tensor(std::vector<int64_t>(concept_of.begin(), concept_of.end()), at::kLong);
  const at::Tensor top5 = top_shares(out.concept_logits, labels, r.top1, r.top5);
  for (int i = 0; i < n; ++i) r.top1_names.push_back(names[static_cast<size_t>(top5[i][0].item<int64_t>())]);
  r.twitter_fraction = twitter_share(out.style_logits);
  // Real reference: the google image of each prompt's concept (A), and of as many other train concepts (B),
  // drawn with a fixed seed and disjoint from the prompt concepts.
  std::vector<at::Tensor> real_a, real_b;
  for (int c : concept_of) real_a.push_back(data.image01("google", c));
  std::vector<int> others;
  for (int c = 0; c < static_cast<int>(data.concepts().size()); ++c)
    if (data.concepts()[static_cast<size_t>(c)].split == "train" && data.has("google", c) &&
        std::find(concept_of.begin(), concept_of.end(), c) == concept_of.end())
      others.push_back(c);
  std::mt19937_64 rng(1234);
  for (size_t i = others.size(); i > 1; --i) std::swap(others[i - 1], others[rng() % i]);  // Fisher-Yates
  for (size_t i = 0; i < others.size() && static_cast<int>(real_b.size()) < n; ++i)
    real_b.push_back(data.image01("google", others[i]));
  DMX_CHECK_ARG(n >= 2 && real_b.size() >= 2,
                "the Fréchet distance needs at least 2 prompts and 2 other train "
                "concepts, got ",
                n, " prompt(s) and ", real_b.size(), " other concept(s)");
  const at::Tensor fa = features(real_a).features, fb = features(real_b).features;
  r.frechet = metrics::frechet_distance(out.features, fa);
  r.frechet_real = metrics::frechet_distance(fb, fa);

  // 4. ControlNet and T2I-Adapter: edge F1 of Canny(output) against the control map, with and without the
  // control; with the prompt, and with an empty prompt (where only the control map can carry the concept's shape).
  // Both use the same prompts, seeds and maps; the empty-prompt pictures without control are made once.
  struct EdgeScores {
    double f1 = 0, f1_without = 0, f1_empty = 0, f1_empty_without = 0;
    int tol = 0;
  };
  std::vector<at::Tensor> imgs_empty_without;  // empty prompt, no control (shared by ControlNet and adapter)
  // `with_control(prompt, seed, map)` makes one picture with the control on `map` (an RGB map of the output size).
  auto edge_scores = [&](const std::string& set,
                         const std::function<at::Tensor(const std::string&, uint64_t, const Image&)>& with_control) {
    EdgeScores s;
    std::vector<at::Tensor> imgs, imgs_empty;
    const bool have_without = !imgs_empty_without.empty();
    const int64_t H = base[0].size(1), W = base[0].size(2);
    s.tol = metrics::edge_tolerance(H, W);
    for (int i = 0; i < n_aux; ++i) {
      const int c = concept_of[static_cast<size_t>(i)];
      const uint64_t seed = o.seed + static_cast<uint64_t>(i);
      const Image map = to_rgb(load_image(data.files("google", c).edges, "control map"));
      DMX_CHECK_SUPPORTED(map.width == W && map.height == H, "edge F1 needs control maps of the output size (", W, "x",
                          H, "), got ", map.width, "x", map.height);
      imgs.push_back(with_control(prompts[static_cast<size_t>(i)], seed, map));
      imgs_empty.push_back(with_control("", seed, map));
      if (!have_without) imgs_empty_without.push_back(generate("", seed, {}));
      const at::Tensor target = binary_map(map);
      s.f1 += metrics::edge_f1(canny_of(imgs.back()), target, s.tol);
      s.f1_without += metrics::edge_f1(canny_of(base[static_cast<size_t>(i)]), target, s.tol);
      s.f1_empty += metrics::edge_f1(canny_of(imgs_empty.back()), target, s.tol);
      s.f1_empty_without += metrics::edge_f1(canny_of(imgs_empty_without[static_cast<size_t>(i)]), target, s.tol);
    }
    save_all(set, imgs);
    save_all(set + "-empty-prompt", imgs_empty);
    if (!have_without) save_all("empty-prompt", imgs_empty_without);
    for (double* v : {&s.f1, &s.f1_without, &s.f1_empty, &s.f1_empty_without}) *v /= n_aux;
    r.edge_tolerance = s.tol;
    r.edge_f1_without = s.f1_without;
    r.edge_f1_empty_without = s.f1_empty_without;
    return s;
  };
  if (!o.controlnet.empty()) {
    pipelines::ControlNetUnit unit;
    unit.name = o.controlnet;
    unit.model = pipelines::load_controlnet(o.controlnet, {}, "--controlnet");
    const EdgeScores s = edge_scores("controlnet", [&](const std::string& prompt, uint64_t seed, const Image& map) {
      unit.image = pipelines::prepare_control_image(map, map.width, map.height);
      return generate(prompt, seed, {unit});
    });
    r.controlnet_n = n_aux;
    r.edge_f1 = s.f1;
    r.edge_f1_empty = s.f1_empty;
  }
  if (!o.adapter.empty()) {
    pipelines::T2IAdapterUnit unit;
    unit.name = o.adapter;
    unit.model = loaders::load_t2i_adapter(o.adapter);
    unit.scale = o.adapter_scale;
    const EdgeScores s = edge_scores("adapter", [&](const std::string& prompt, uint64_t seed, const Image& map) {
      unit.image = map;
      return generate(prompt, seed, {}, &unit);
    });
    r.adapter_n = n_aux;
    r.adapter_edge_f1 = s.f1;
    r.adapter_edge_f1_empty = s.f1_empty;
  }
  auto per_image = [](const std::pair<double, int>& t) { return t.second > 0 ? t.first / t.second : -1.0; };
  r.seconds_per_image = per_image(timed_base);
  r.controlnet_seconds_per_image = per_image(timed_cn);
  r.adapter_seconds_per_image = per_image(timed_ad);

  // 5. LoRA: share of images the style head calls twitter, with and without (the base images).
  if (!o.lora.empty()) {
    std::vector<at::Tensor> imgs;
    {
      loaders::LoRASpec spec{o.lora, o.lora_scale, o.lora_scale};
      loaders::ScopedLoRAs scoped(models, {spec}, loaders::LoRAApplyOptions{});
      for (int i = 0; i < n_aux; ++i)
        imgs.push_back(generate(prompts[static_cast<size_t>(i)], o.seed + static_cast<uint64_t>(i), {}));
    }
    save_all("lora", imgs);
    r.lora_n = n_aux;
    r.lora_style_accuracy = twitter_share(features(imgs).style_logits);
    r.lora_style_accuracy_without = twitter_share(out.style_logits.slice(0, 0, n_aux));
  }

  // 5b. Hypernetwork: the same, with the hypernetwork on every attention layer of the UNet at its multiplier.
  if (!hypernetwork.is_empty()) {
    std::vector<at::Tensor> imgs;
    {
      hypernetwork->to(models->device);
      models::ScopedHypernetworks scoped(*models->unet, {{hypernetwork, hn_spec.multiplier}});
      for (int i = 0; i < n_aux; ++i)
        imgs.push_back(generate(prompts[static_cast<size_t>(i)], o.seed + static_cast<uint64_t>(i), {}));
    }
    save_all("hypernetwork", imgs);
    r.hypernetwork_n = n_aux;
    r.hypernetwork_style_accuracy = twitter_share(features(imgs).style_logits);
    r.hypernetwork_style_accuracy_without = twitter_share(out.style_logits.slice(0, 0, n_aux));
  }

  // 6. DreamBooth: cosine similarity of classifier features to the real subject, with and without the LoRA.
  if (!o.dreambooth.empty()) {
    std::vector<at::Tensor> real;
    for (const auto& s : data.styles())
      if (s == "google" && data.has(s, db_concept)) real.push_back(data.image01(s, db_concept));
    if (real.empty())
      for (const auto& s : data.styles())
        if (data.has(s, db_concept)) real.push_back(data.image01(s, db_concept));
    auto normalize = [](const at::Tensor& x) { return x / x.norm(2, {1}, true).clamp_min(1e-12); };
    const at::Tensor ref = normalize(features(real).features.mean(0, true));  // [1, D]
    auto score = [&](const std::vector<at::Tensor>& imgs, double& sim, double& top5_share) {
      const emoji::EmojiClassifierOutput f = features(imgs);
      const at::Tensor fn = normalize(f.features);
      sim = at::matmul(fn, ref.t()).mean().item<double>();
      const at::Tensor t5 = std::get<1>(f.concept_logits.topk(std::min<int64_t>(5, f.concept_logits.size(1)), 1));
      top5_share = t5.eq(db_concept).any(1).to(at::kDouble).mean().item<double>();
    };
    const uint64_t db_seed = o.seed + 100000;
    std::vector<at::Tensor> without, with;
    for (int k = 0; k < o.dreambooth_images; ++k)
      without.push_back(generate(o.dreambooth_prompt, db_seed + static_cast<uint64_t>(k), {}));
    {
      loaders::ScopedLoRAs scoped(models, {loaders::LoRASpec{o.dreambooth, 1.0, 1.0}}, loaders::LoRAApplyOptions{});
      for (int k = 0; k < o.dreambooth_images; ++k)
        with.push_back(generate(o.dreambooth_prompt, db_seed + static_cast<uint64_t>(k), {}));
    }
    save_all("dreambooth", with);
    save_all("dreambooth_without", without);
    r.dreambooth_n = o.dreambooth_images;
    score(with, r.dreambooth_similarity, r.dreambooth_top5);
    score(without, r.dreambooth_similarity_without, r.dreambooth_top5_without);
  }
  // 7. Variations (Stable unCLIP image variations): per source picture, variations_per_image pictures without a
  // prompt from one seed; does the classifier see the source's concept, and how alike are they?
  if (!o.variations.empty()) {
    const auto vparts = loaders::load_unclip_components(o.variations);
    const auto vmodels = loaders::load_stable_diffusion(o.variations);
    pipelines::StableUnCLIPPipeline vpipe(vmodels, vparts);
    const int k = o.variations_per_image;
    double pair_ssim = 0, src_ssim = 0;
    int pairs = 0, compared = 0;
    auto score = [&](const std::vector<int>& sources, const std::string& set, double& top1, double& top5) {
      std::vector<at::Tensor> imgs;
      std::vector<int64_t> labels;
      for (size_t i = 0; i < sources.size(); ++i) {
        const int c = sources[i];
        pipelines::StableUnCLIPParams q;
        q.image = to_rgb(load_image(data.files("google", c).image, "--data picture"));
        q.num_images_per_prompt = k;
        q.num_inference_steps = o.steps;
        q.guidance_scale = o.guidance_scale;
        q.scheduler = o.scheduler;
        q.noise_level = o.noise_level;
        at::Generator generator = pipelines::make_generator(o.seed + 200000 + (set == "variations" ? 0 : 100000) + i);
        q.generator = &generator;
        q.show_progress = false;
        const at::Tensor out = vpipe.run(q).images.permute({0, 3, 1, 2}).contiguous();  // [k, 3, H, W]
        const at::Tensor src = data.image01("google", c);
        for (int a = 0; a < k; ++a) {
          imgs.push_back(out[a]);
          labels.push_back(c);
          if (src.sizes() == out[a].sizes()) {
            src_ssim += metrics::ssim(out[a], src);
            ++compared;
          }
          for (int b = a + 1; b < k; ++b, ++pairs) pair_ssim += metrics::ssim(out[a], out[b]);
        }
        bar.tick();
      }
      if (sources.empty()) return;
      save_all(set, imgs);
      top_shares(features(imgs).concept_logits, at::tensor(labels, at::kLong), top1, top5);
    };
    const std::vector<int> train_sources(concept_of.begin(), concept_of.begin() + n_aux);
    score(train_sources, "variations", r.variations_top1, r.variations_top5);
    score(heldout, "variations-heldout", r.variations_heldout_top1, r.variations_heldout_top5);
    r.variations_n = n_aux;
    r.variations_heldout_n = static_cast<int>(heldout.size());
    r.variations_pairwise_ssim = pairs > 0 ? pair_ssim / pairs : -1;
    r.variations_source_ssim = compared > 0 ? src_ssim / compared : -1;
  }
  bar.finish();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace dmx
