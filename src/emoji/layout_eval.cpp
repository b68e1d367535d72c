// `dmx eval --layouts` (include/dmx/scenes.h, docs/layouts.md): per region, whether the emoji classifier
// recognises the region's concept in its crop and how well the foreground of the picture covers the region; per
// set, the Fréchet distance of classifier features against the real canvases.
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/output_plan.h"
#include "core/progress.h"
#include "core/runtime.h"
#include "dmx/error.h"
#include "dmx/scenes.h"
#include "emoji/emoji_classifier.h"
#include "emoji/emoji_data.h"
#include "emoji/layout_metrics.h"
#include "loaders/clip.h"
#include "loaders/model_bundle.h"
#include "loaders/scene.h"
#include "loaders/spatext.h"
#include "metrics/metrics.h"
#include "models/clip_image_processor.h"
#include "nn/attention_seam.h"
#include "pipelines/regional.h"
#include "pipelines/scene.h"
#include "pipelines/spatext.h"
#include "pipelines/stable_diffusion.h"

namespace dmx {
namespace emoji {

at::Tensor foreground_mask(const at::Tensor& chw01, double background, double threshold) {
  DMX_CHECK_ARG(chw01.dim() == 3 && chw01.size(0) == 3, "foreground_mask needs a [3, H, W] picture, got ",
                chw01.sizes());
  const at::Tensor bg_like = (chw01.to(at::kFloat) - background).abs().amax(0).le(threshold).contiguous();  // [H, W]
  const int64_t H = bg_like.size(0), W = bg_like.size(1);
  const bool* b = bg_like.data_ptr<bool>();
  at::Tensor fg = at::ones({H, W}, at::kBool);
  bool* f = fg.data_ptr<bool>();
  std::deque<int64_t> queue;
  auto seed = [&](int64_t p) {
    if (b[p] && f[p]) {
      f[p] = false;
      queue.push_back(p);
    }
  };
  for (int64_t x = 0; x < W; ++x) seed(x), seed((H - 1) * W + x);
  for (int64_t y = 0; y < H; ++y) seed(y * W), seed(y * W + W - 1);
  while (!queue.empty()) {  // flood fill of the background from the border
    const int64_t p = queue.front();
    queue.pop_front();
    const int64_t y = p / W, x = p % W;
    if (x > 0) seed(p - 1);
    if (x + 1 < W) seed(p + 1);
    if (y > 0) seed(p - W);
    if (y + 1 < H) seed(p + W);
  }
  return fg;
}

double region_iou(const at::Tensor& region, const at::Tensor& others, const at::Tensor& foreground) {
  DMX_CHECK_ARG(region.sizes() == foreground.sizes() && others.sizes() == foreground.sizes(),
                "region_iou: masks of different sizes: ", region.sizes(), ", ", others.sizes(), ", ",
                foreground.sizes());
  const at::Tensor r = region.to(at::kBool),
                   f = foreground.to(at::kBool).logical_and(others.to(at::kBool).logical_not());
  const double inter = r.logical_and(f).sum().item<double>();
  const double uni = r.logical_or(f).sum().item<double>();
  return uni > 0 ? inter / uni : 1.0;
}

at::Tensor region_crop(const at::Tensor& chw01, const at::Tensor& region, int side) {
  DMX_CHECK_ARG(region.any().item<bool>(), "region_crop: the region is empty");
  const at::Tensor nz = region.nonzero();  // [K, 2] (y, x)
  const int64_t y0 = nz.select(1, 0).min().item<int64_t>(), y1 = nz.select(1, 0).max().item<int64_t>() + 1;
  const int64_t x0 = nz.select(1, 1).min().item<int64_t>(), x1 = nz.select(1, 1).max().item<int64_t>() + 1;
  const int64_t s = std::max(y1 - y0, x1 - x0);
  const int64_t top = y0 - (s - (y1 - y0)) / 2, left = x0 - (s - (x1 - x0)) / 2;
  const int64_t H = chw01.size(1), W = chw01.size(2);
  const at::Tensor only = at::where(region.unsqueeze(0), chw01.to(at::kFloat), at::ones({1}, at::kFloat));  // [3, H, W]
  at::Tensor crop = at::ones({3, s, s}, chw01.options().dtype(at::kFloat));
  const int64_t sy0 = std::max<int64_t>(top, 0), sy1 = std::min<int64_t>(top + s, H);
  const int64_t sx0 = std::max<int64_t>(left, 0), sx1 = std::min<int64_t>(left + s, W);
  crop.slice(1, sy0 - top, sy1 - top)
      .slice(2, sx0 - left, sx1 - left)
      .copy_(only.slice(1, sy0, sy1).slice(2, sx0, sx1));
  if (s == side) return crop;
  return at::upsample_bilinear2d(crop.unsqueeze(0), {side, side}, false).squeeze(0).clamp(0, 1);
}

int64_t label_rank(const at::Tensor& logits, int64_t label) {
  DMX_CHECK_ARG(logits.dim() == 1 && label >= 0 && label < logits.size(0), "label_rank: label ", label, " outside [0, ",
                logits.size(0), ")");
  return logits.gt(logits[label]).sum().item<int64_t>();
}
}  // namespace emoji

namespace {

struct Region {
  int instance = 0;
  std::string color, text;
  int64_t label = -1;
  int category = 0;  // the scene category id (scenes.json)
};
struct Canvas {
  std::string image, instances, prompt;
  std::vector<Region> regions;
};

at::Tensor load01(const std::string& path, const std::string& what) {
  return emoji::image_to_tensor01(to_rgb(load_image(path, what)));
}
}  // namespace

const std::vector<LayoutMethodInfo>& layout_methods() {
  static const std::vector<LayoutMethodInfo> m = {
      {"text", "the global caption only, plain text-to-image (the baseline)", true, true},
      {"real", "no generation: the scene set's own canvases (the measures' sanity check)", true, false},
      {"regional", "training-free regional prompts (DenseDiffusion's attention modulation, the paper's weights)", true,
       true},
      {"spatext", "SpaText's spatio-textual map (a SpaText folder, dmx train spatext)", true, true},
      {"scene", "Make-A-Scene's scene tokens as diffusion (a scene folder, dmx train scene)", true, true},
  };
  return m;
}

std::string LayoutEvalResult::to_json() const {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& r : per_region)
    rows.push_back({{"canvas", r.canvas},
                    {"color", r.color},
                    {"text", r.text},
                    {"top1", r.top1},
                    {"top5", r.top5},
                    {"predicted", r.predicted},
                    {"iou", r.iou}});
  return nlohmann::json{{"method", method},
                        {"canvases", canvases},
                        {"regions", regions},
                        {"top1", top1},
                        {"top5", top5},
                        {"region_iou", region_iou},
                        {"layout_iou", layout_iou},
                        {"frechet", frechet},
                        {"clip_similarity", clip_similarity},
                        {"seconds_per_image", seconds_per_image},
                        {"seconds", seconds},
                        {"per_region", rows}}
      .dump();
}

LayoutEvalResult evaluate_layouts(const LayoutEvalOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  // 1. Every cheap rule before loading anything.
  const LayoutMethodInfo* method = nullptr;
  std::string known;
  for (const auto& m : layout_methods()) {
    known += (known.empty() ? "" : ", ") + m.name;
    if (m.name == o.method) method = &m;
  }
  DMX_CHECK_ARG(method, "--layout-method must be one of ", known, ", got '", o.method, "'");
  DMX_CHECK_SUPPORTED(method->available, "--layout-method ", o.method, " (", method->description,
                      ") is not available in this build");
  const std::string scenes_json = join_path(o.layouts, "scenes.json");
  DMX_CHECK_ARG(is_directory(o.layouts) && path_exists(scenes_json), "--layouts: ", o.layouts,
                " is not a scene data folder (no scenes.json); build one with `dmx data scenes --out DIR`");
  if (method->needs_model) {
    DMX_CHECK_ARG(!o.model.empty(), "--model is required for --layout-method ", o.method, " (a diffusers folder)");
    DMX_CHECK_ARG(path_exists(o.model), "--model: path not found: ", o.model);
    DMX_CHECK_ARG(o.method != "scene" || loaders::is_scene_folder(o.model),
                  "--layout-method scene needs a scene folder (dmx train scene), got --model ", o.model);
    pipelines::check_num_inference_steps(o.steps, "--steps");
    pipelines::check_guidance_scale(o.guidance_scale, "--guidance-scale");
  } else {
    DMX_CHECK_ARG(o.model.empty(), "--model does not apply to --layout-method ", o.method,
                  " (it scores the scene set's own canvases)");
  }
  DMX_CHECK_ARG(o.limit >= 0, "--limit must be >= 0, got ", o.limit);
  DMX_CHECK_ARG(o.clip.empty() || o.clip == "models/emoji-clip" || loaders::is_clip_folder(o.clip), "--clip ", o.clip,
                " is not a CLIP folder (dmx train clip writes one)");
  DMX_CHECK_ARG(is_directory(o.classifier), "--classifier: not a folder: ", o.classifier,
                " (train one with `dmx train classifier --data DIR --output DIR`)");
  const std::string set_name = "layouts-" + o.method;
  {
    OutputPlan plan(false);
    plan.input(o.layouts, "--layouts");
    plan.input(o.model, "--model");
    plan.input(o.classifier, "--classifier");
    if (!o.out_dir.empty())
      plan.work_folder(o.out_dir, "--out", [](const std::string& dir) -> std::string {
        std::error_code ec;
        for (auto it = std::filesystem::directory_iterator(dir, ec); !ec && it != std::filesystem::directory_iterator();
             it.increment(ec)) {
          const std::string n = it->path().filename().string();
          if (n.rfind("layouts-", 0) != 0)
            return "holds '" + n + "', which dmx eval --layouts does not write: give a new or empty folder";
        }
        return "";
      });
    plan.prepare();
  }

  // 2. The canvases: metadata.jsonl rows, region texts mapped to the classifier's classes.
  emoji::EmojiClassifier clf = emoji::load_emoji_classifier(o.classifier);
  const auto& names = clf->config().class_names;
  int size = 0;
  try {
    size = nlohmann::json::parse(read_text_file(scenes_json, "--layouts scenes.json", kMaxJsonFileBytes))
               .at("size")
               .get<int>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(scenes_json + ": " + e.what());
  }
  DMX_CHECK_FORMAT(size >= 64 && size <= 1024, scenes_json, ": size must be in [64, 1024], got ", size);
  std::vector<Canvas> canvases;
  {
    const std::string meta = join_path(o.layouts, "metadata.jsonl");
    std::istringstream in(read_text_file(meta, "--layouts metadata.jsonl", kMaxMetadataFileBytes));
    std::string line;
    int line_no = 0;
    while (std::getline(in, line) && (o.limit == 0 || static_cast<int>(canvases.size()) < o.limit)) {
      ++line_no;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      Canvas c;
      try {
        const nlohmann::json r = nlohmann::json::parse(line);
        c.image = join_path(o.layouts, r.at("file_name").get<std::string>());
        c.instances = join_path(o.layouts, r.at("instance_map").get<std::string>());
        c.prompt = r.at("text").get<std::string>();
        for (const auto& ob : r.at("objects")) {
          Region g;
          g.instance = ob.at("instance").get<int>();
          g.color = ob.at("color").get<std::string>();
          g.text = ob.at("text").get<std::string>();
          g.category = ob.at("category_id").get<int>();
          DMX_CHECK_FORMAT(g.category >= 1 && g.category < loaders::kSceneCategories, meta, ":", line_no,
                           ": category_id must be in [1, ", loaders::kSceneCategories - 1, "], got ", g.category);
          const auto it = std::find(names.begin(), names.end(), g.text);
          DMX_CHECK_FORMAT(it != names.end(), meta, ":", line_no, ": region text '", g.text,
                           "' is not a concept of the classifier ", o.classifier);
          g.label = it - names.begin();
          c.regions.push_back(g);
        }
      } catch (const nlohmann::json::exception& e) {
        throw FormatError(meta + ":" + std::to_string(line_no) + ": " + e.what());
      }
      for (const std::string* p : {&c.image, &c.instances})
        DMX_CHECK_FORMAT(p->find("..") == std::string::npos, meta, ":", line_no, ": path leaves the folder: ", *p);
      canvases.push_back(std::move(c));
    }
    DMX_CHECK_ARG(!canvases.empty(), "--layouts: ", meta, " lists no canvases");
  }
  configure_threads(o.threads);

  // 3. The pictures: made by the method, or the canvases themselves.
  std::shared_ptr<loaders::StableDiffusionModels> models;
  std::shared_ptr<loaders::SpaTextModel> spatext;  // a SpaText folder: every method runs its UNet with a map or none
  std::shared_ptr<loaders::SceneModel> scene;      // a scene folder: its UNet with the layout's tokens or the dropped
  std::shared_ptr<pipelines::StableDiffusionPipeline> pipe;
  const pipelines::SceneGuidance scene_guidance = pipelines::parse_scene_guidance(o.scene_guidance);
  if (method->needs_model) {
    if (loaders::is_scene_folder(o.model)) {
      DMX_CHECK_ARG(o.method == "scene" || o.method == "text", "--layout-method ", o.method, " on the scene folder ",
                    o.model, ": its UNet reads scene tokens; use scene or text");
      scene = loaders::load_scene(o.model);
      models = scene->models;
    } else if (loaders::is_spatext_folder(o.model)) {
      DMX_CHECK_ARG(o.method != "scene", "--layout-method scene needs a scene folder (dmx train scene), got --model ",
                    o.model);
      spatext = loaders::load_spatext(o.model);
      models = spatext->models;
    } else {
      DMX_CHECK_ARG(o.method != "scene", "--layout-method scene needs a scene folder (dmx train scene), got --model ",
                    o.model);
      DMX_CHECK_ARG(o.method != "spatext", "--layout-method spatext needs a SpaText folder (dmx train spatext), ",
                    "got --model ", o.model);
      models = loaders::load_stable_diffusion(o.model);
    }
    pipe = std::make_shared<pipelines::StableDiffusionPipeline>(models);
  }
  if (!o.out_dir.empty()) std::filesystem::create_directories(join_path(o.out_dir, set_name));
  LayoutEvalResult r;
  r.method = o.method;
  ProgressBar bar("layouts", static_cast<int>(canvases.size()), o.progress);
  std::vector<at::Tensor> pictures, reals, crops;
  std::vector<int64_t> labels;
  double gen_seconds = 0;
  for (size_t i = 0; i < canvases.size(); ++i) {
    const Canvas& c = canvases[i];
    const at::Tensor real = load01(c.image, "--layouts image");
    DMX_CHECK_FORMAT(real.size(1) == size && real.size(2) == size, c.image, ": ", real.size(2), "x", real.size(1),
                     ", scenes.json says ", size);
    const Image inst_img = load_image(c.instances, "--layouts instance map");
    check_image_size("--layouts instance map", inst_img, size, size);
    const at::Tensor inst =
        at::from_blob(const_cast<uint8_t*>(to_gray(inst_img).data.data()), {size, size}, at::kByte).clone();
    at::Tensor picture = real;
    if (method->needs_model) {
      const auto g0 = std::chrono::steady_clock::now();
      pipelines::StableDiffusionParams p;
      p.prompt = c.prompt;
      p.num_inference_steps = o.steps;
      p.guidance_scale = o.guidance_scale;
      p.scheduler = o.scheduler;
      p.width = p.height = size;
      at::Generator generator = pipelines::make_generator(o.seed + i);
      p.generator = &generator;
      p.show_progress = false;
      std::unique_ptr<nn::ScopedAttentionProcessor> regional_guard;
      if (o.method == "regional") {
        // The same parts `dmx generate --layout-method regional` builds (api/layout.cpp), with the regions taken
        // straight from the instance map (each object's pixels; the rest is the background segment).
        std::vector<std::string> texts, names;
        std::vector<at::Tensor> segs;
        for (const auto& g : c.regions) {
          texts.push_back(g.text);
          names.push_back("region " + g.color + " (" + g.text + ")");
          segs.push_back(inst.eq(g.instance));
        }
        const at::Tensor any = at::stack(segs, 0).any(0);
        if (!any.all().item<bool>()) segs.push_back(any.logical_not());
        pipelines::RegionalCaption caption =
            pipelines::regional_caption(*models->tokenizer, c.prompt, texts, "--layouts region");
        p.prompt = caption.caption;
        pipelines::RegionalLayout layout{at::stack(segs, 0), texts, names};
        pipelines::check_regions_cover_latents(layout, models->vae_scale_factor());
        auto provider = std::make_shared<pipelines::RegionalPromptProvider>(std::move(layout), std::move(caption),
                                                                            extensions::DenseDiffusionConfig{});
        p.residual_providers.insert(p.residual_providers.begin(), provider);
        regional_guard = std::make_unique<nn::ScopedAttentionProcessor>(*models->unet, provider->processor());
      }
      if (spatext) {  // the provider `dmx generate` builds (pipelines::make_spatext_provider), from the objects
        std::vector<std::string> texts, names;
        std::vector<at::Tensor> segs;
        for (const auto& g : c.regions) {
          texts.push_back(g.text);
          names.push_back("region " + g.color);
          segs.push_back(inst.eq(g.instance));
        }
        const bool with_map = o.method == "spatext";
        p.residual_providers.insert(
            p.residual_providers.begin(),
            pipelines::make_spatext_provider(*spatext, with_map ? at::stack(segs, 0) : at::Tensor(), texts, names,
                                             o.seed + i, o.layout_guidance_scale * o.guidance_scale));
      }
      if (scene) {  // the provider `dmx generate` builds (pipelines::make_scene_provider): categories of the objects
        at::Tensor labels, regions;
        if (o.method == "scene") {
          labels = at::zeros({size, size}, at::kLong);
          regions = at::zeros({size, size}, at::kLong);
          for (const auto& g : c.regions) {
            labels.masked_fill_(inst.eq(g.instance), g.category);
            regions.masked_fill_(inst.eq(g.instance), g.instance);
          }
        }
        p.residual_providers.insert(p.residual_providers.begin(),
                                    pipelines::make_scene_provider(*scene, labels, regions, scene_guidance));
      }
      picture = pipe->run(p).images[0].permute({2, 0, 1}).contiguous();  // [3, H, W] in [0, 1]
      gen_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - g0).count();
    }
    if (!o.out_dir.empty()) {
      char name[32];
      std::snprintf(name, sizeof name, "%04zu.png", i);
      save_png(join_path(join_path(o.out_dir, set_name), name),
               tensor_to_image(picture.permute({1, 2, 0}).contiguous()));
    }
    // 4. Per region: its crop for the classifier, its IoU against the foreground.
    const at::Tensor fg = emoji::foreground_mask(picture);
    at::Tensor any_region = at::zeros({size, size}, at::kBool);
    for (const auto& g : c.regions) any_region.logical_or_(inst.eq(g.instance));
    for (const auto& g : c.regions) {
      const at::Tensor region = inst.eq(g.instance);
      DMX_CHECK_FORMAT(region.any().item<bool>(), c.instances, ": instance ", g.instance, " (", g.text,
                       ") has no pixel");
      LayoutRegionScore s;
      s.canvas = static_cast<int>(i);
      s.color = g.color;
      s.text = g.text;
      s.iou = emoji::region_iou(region, any_region.logical_and(region.logical_not()), fg);
      r.per_region.push_back(s);
      crops.push_back(emoji::region_crop(picture, region, clf->config().image_size));
      labels.push_back(g.label);
    }
    const at::Tensor none = at::zeros({size, size}, at::kBool);
    r.layout_iou += emoji::region_iou(any_region, none, fg);
    pictures.push_back(picture);
    reals.push_back(real);
    bar.tick();
  }
  bar.finish();
  const emoji::EmojiClassifierOutput out = emoji::classify(clf, at::stack(crops) * 2.0 - 1.0, 64);
  for (size_t k = 0; k < r.per_region.size(); ++k) {
    const at::Tensor row = out.concept_logits[static_cast<int64_t>(k)];
    const int64_t rank = emoji::label_rank(row, labels[k]);
    auto& s = r.per_region[k];
    s.top1 = rank == 0;
    s.top5 = rank < 5;
    s.predicted = names[static_cast<size_t>(row.argmax().item<int64_t>())];
    r.top1 += s.top1;
    r.top5 += s.top5;
    r.region_iou += s.iou;
  }
  r.canvases = static_cast<int>(canvases.size());
  r.regions = static_cast<int>(r.per_region.size());
  r.top1 /= r.regions;
  r.top5 /= r.regions;
  r.region_iou /= r.regions;
  r.layout_iou /= r.canvases;
  if (r.canvases >= 2) {
    const at::Tensor fg_feat = emoji::classify(clf, at::stack(pictures) * 2.0 - 1.0, 64).features;
    const at::Tensor real_feat = emoji::classify(clf, at::stack(reals) * 2.0 - 1.0, 64).features;
    r.frechet = std::max(0.0, metrics::frechet_distance(fg_feat, real_feat));  // d^2 >= 0 (round-off)
  }
  // Global CLIP similarity: each picture against its caption, through the CLIP folder's two towers.
  if (!o.clip.empty() && loaders::is_clip_folder(o.clip)) {
    at::NoGradGuard no_grad;
    const auto clip = loaders::load_clip(o.clip);
    clip->text_encoder->eval();
    clip->image_encoder->eval();
    const int L = clip->tokenizer->model_max_length();
    double sum = 0;
    for (size_t i = 0; i < canvases.size(); ++i) {
      const auto ids = clip->tokenizer->encode_padded(canvases[i].prompt, L);
      const at::Tensor t = clip->text_encoder->forward(at::tensor(ids, at::kLong).reshape({1, L})).text_embeds;
      const Image pic = tensor_to_image(pictures[i].permute({1, 2, 0}).contiguous());
      const at::Tensor v =
          clip->image_encoder->forward(models::clip_preprocess(clip->feature_extractor, pic, "--layouts picture"))
              .image_embeds;
      sum += at::cosine_similarity(t.to(at::kFloat), v.to(at::kFloat), 1).item<double>();
    }
    r.clip_similarity = sum / static_cast<double>(canvases.size());
  }
  r.seconds_per_image = method->needs_model ? gen_seconds / r.canvases : 0.0;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace dmx
