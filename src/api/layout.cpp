// Layouts for `dmx generate` (see layout.h, docs/regional.md).
#include "api/layout.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <map>

#include "core/fs.h"
#include "core/text.h"
#include "pipelines/regional.h"
#include "pipelines/scene.h"
#include "pipelines/spatext.h"

namespace dmx::api {

namespace {

std::string color_text(uint32_t key) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", (key >> 16) & 0xff, (key >> 8) & 0xff, key & 0xff);
  return buf;
}

uint32_t color_key(const std::array<uint8_t, 3>& c) { return (uint32_t(c[0]) << 16) | (uint32_t(c[1]) << 8) | c[2]; }

std::string region_name(const LayoutRegion& r) { return "--region " + r.color; }

struct LayoutInputs {
  const GenerateOptions& o;
  const Image& map;
  const loaders::StableDiffusionModels& models;
  const std::string& prompt;
  int width, height;
  loaders::SpaTextModel* spatext;
  uint64_t seed;
  loaders::SceneModel* scene;
};

// regional: DenseDiffusion's attention modulation (pipelines/regional.h), weights scaled by --layout-guidance-scale.
LayoutRun build_regional(const LayoutInputs& in) {
  std::vector<std::string> texts, names;
  for (const auto& r : in.o.regions) {
    texts.push_back(r.text);
    names.push_back(region_name(r));
  }
  pipelines::RegionalCaption caption = pipelines::regional_caption(*in.models.tokenizer, in.prompt, texts, "--region");
  LayoutRun run;
  run.prompt = caption.caption;
  pipelines::RegionalLayout layout{layout_segments(in.map, in.o.regions, in.width, in.height), texts, names};
  pipelines::check_regions_cover_latents(layout, in.models.vae_scale_factor());
  if (in.o.layout_guidance_scale == 0) return run;  // no effect: the text-only run of the same caption
  extensions::DenseDiffusionConfig config;
  config.cross_weight *= in.o.layout_guidance_scale;
  config.self_weight *= in.o.layout_guidance_scale;
  auto provider = std::make_shared<pipelines::RegionalPromptProvider>(std::move(layout), std::move(caption), config,
                                                                      in.o.clip_skip);
  run.processor = provider->processor();
  run.provider = provider;
  return run;
}

// spatext: the regions' texts through the folder's prior to unit image embeddings, painted into the regions at the
// latent size (pipelines/spatext.h); guidance eps_0 + s_g (eps(c_g, 0) - eps_0) + s_l (eps(0, c_l) - eps_0) with
// s_l = --layout-guidance-scale x --guidance-scale.
LayoutRun build_spatext(const LayoutInputs& in) {
  DMX_CHECK_ARG(in.spatext != nullptr,
                "--layout-method spatext needs a SpaText model folder (written by dmx train "
                "spatext, with spatext.json), got --model ",
                in.o.model);
  std::vector<std::string> texts, names;
  for (const auto& r : in.o.regions) {
    texts.push_back(r.text);
    names.push_back(region_name(r));
  }
  const at::Tensor segs = layout_segments(in.map, in.o.regions, in.width, in.height)
                              .narrow(0, 0, static_cast<int64_t>(in.o.regions.size()));
  LayoutRun run;
  run.prompt = in.prompt;
  run.provider = pipelines::make_spatext_provider(*in.spatext, segs, texts, names, in.seed,
                                                  in.o.layout_guidance_scale * in.o.guidance_scale);
  return run;
}

// scene: each region's category (--region COLOR=CATEGORY) painted into a category map, the regions' borders as the
// edge channel, VQ-SEG's codes as scene tokens after the text (pipelines/scene.h); --scene-guidance picks what the
// unconditional row drops. --layout-guidance-scale 0 is the model's text-only run; it takes no other scale than 1.
LayoutRun build_scene(const LayoutInputs& in) {
  DMX_CHECK_ARG(in.scene != nullptr,
                "--layout-method scene needs a scene model folder (written by dmx train scene, with scene.json), got "
                "--model ",
                in.o.model);
  DMX_CHECK_ARG(in.o.layout_guidance_scale == 0 || in.o.layout_guidance_scale == 1,
                "--layout-guidance-scale: --layout-method scene takes 1 (the scene) or 0 (text only), got ",
                in.o.layout_guidance_scale, "; --scene-guidance sets what guidance drops");
  const pipelines::SceneGuidance guidance = pipelines::parse_scene_guidance(in.o.scene_guidance);
  LayoutRun run;
  run.prompt = in.prompt;
  if (in.o.layout_guidance_scale == 0) {
    run.provider = pipelines::make_scene_provider(*in.scene, at::Tensor(), at::Tensor(), guidance);
    return run;
  }
  const at::Tensor segs = layout_segments(in.map, in.o.regions, in.width, in.height);
  at::Tensor labels = at::zeros({in.height, in.width}, at::kLong), regions = labels.clone();
  for (size_t r = 0; r < in.o.regions.size(); ++r) {
    const int cat = pipelines::parse_scene_category(in.o.regions[r].text, region_name(in.o.regions[r]));
    labels.masked_fill_(segs[static_cast<int64_t>(r)], cat);
    regions.masked_fill_(segs[static_cast<int64_t>(r)], static_cast<int64_t>(r) + 1);
  }
  run.provider = pipelines::make_scene_provider(*in.scene, labels, regions, guidance);
  return run;
}

// The layout methods (--layout-method). A method lands as a row with its builder; a row without one is refused
// as not built yet.
struct LayoutMethod {
  const char* name;
  const char* what;
  LayoutRun (*build)(const LayoutInputs&);
};
const LayoutMethod kLayoutMethods[] = {
    {"regional", "DenseDiffusion's training-free attention modulation, any SD 1.x/2.x model", &build_regional},
    {"spatext", "SpaText's spatio-textual map (a SpaText folder, dmx train spatext)", &build_spatext},
    {"scene", "Make-A-Scene's scene tokens as diffusion (a scene folder, dmx train scene)", &build_scene},
};

const LayoutMethod& layout_method(const std::string& name) {
  for (const auto& m : kLayoutMethods)
    if (name == m.name) {
      DMX_CHECK_SUPPORTED(m.build != nullptr, "--layout-method ", name, " (", m.what,
                          ") is not built yet; use --layout-method regional");
      return m;
    }
  std::string list;
  for (const auto& m : kLayoutMethods) list += (list.empty() ? "" : ", ") + std::string(m.name);
  throw InvalidArgument("--layout-method must be one of " + list + ", got '" + name + "'");
}
}  // namespace

std::array<uint8_t, 3> parse_layout_color(const std::string& color, const std::string& param) {
  auto hex = [](char c) {
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
  };
  bool ok = color.size() == 7 && color[0] == '#';
  for (size_t i = 1; ok && i < 7; ++i) ok = hex(color[i]) >= 0;
  DMX_CHECK_ARG(ok, param, ": the colour must be #rrggbb (six hex digits), got '", color, "'");
  std::array<uint8_t, 3> c{};
  for (int i = 0; i < 3; ++i) c[i] = static_cast<uint8_t>(hex(color[1 + 2 * i]) * 16 + hex(color[2 + 2 * i]));
  return c;
}

void check_layout_options(const GenerateOptions& o) {
  (void)pipelines::parse_scene_guidance(o.scene_guidance);
  const bool any = !o.layout_path.empty() || !o.regions.empty();
  if (!any) {
    DMX_CHECK_ARG(o.layout_method == "regional" && o.layout_guidance_scale == 1.0,
                  "--layout-method/--layout-guidance-scale need --layout");
    return;
  }
  DMX_CHECK_ARG(!o.layout_path.empty(), "--region needs --layout (the map its colours are read from)");
  DMX_CHECK_ARG(!o.regions.empty(), "--layout needs at least one --region COLOR=TEXT");
  layout_method(o.layout_method);
  DMX_CHECK_ARG(o.regions.size() <= kMaxLayoutRegions, "--region may be given at most ", kMaxLayoutRegions,
                " times, got ", o.regions.size());
  DMX_CHECK_ARG(std::isfinite(o.layout_guidance_scale) && o.layout_guidance_scale >= 0 && o.layout_guidance_scale <= 10,
                "--layout-guidance-scale must be in [0, 10], got ", o.layout_guidance_scale);
  std::map<uint32_t, std::string> seen;
  for (const auto& r : o.regions) {
    const uint32_t key = color_key(parse_layout_color(r.color, "--region"));
    DMX_CHECK_ARG(seen.emplace(key, r.color).second, "--region: each colour may be listed once, got ", r.color,
                  " twice (as ", seen[key], ")");
    DMX_CHECK_ARG(!trim(r.text).empty(), region_name(r), ": the region text must not be empty");
  }
  DMX_CHECK_SUPPORTED(o.init_image.empty() && o.mask.empty(),
                      "--layout with --init-image or --mask is not supported (layouts generate from noise)");
}

Image load_layout_map(const GenerateOptions& o) {
  DMX_CHECK_ARG(path_exists(o.layout_path) && !is_directory(o.layout_path),
                "--layout: file not found: ", o.layout_path);
  const Image img = load_image(o.layout_path, "--layout");
  Image rgb;
  rgb.width = img.width;
  rgb.height = img.height;
  rgb.channels = 3;
  const size_t n = static_cast<size_t>(img.width) * img.height;
  rgb.data.resize(3 * n);
  for (size_t i = 0; i < n; ++i)  // gray (+ alpha): the gray repeated; RGB (+ alpha): the colour; alpha dropped
    for (int c = 0; c < 3; ++c) rgb.data[3 * i + c] = img.data[img.channels * i + (img.channels >= 3 ? c : 0)];
  std::map<uint32_t, int64_t> counts;
  for (size_t i = 0; i < n; ++i)
    ++counts[(uint32_t(rgb.data[3 * i]) << 16) | (uint32_t(rgb.data[3 * i + 1]) << 8) | rgb.data[3 * i + 2]];
  for (const auto& r : o.regions) {
    if (counts.count(color_key(parse_layout_color(r.color, "--region")))) continue;
    std::string list;
    int shown = 0;
    for (const auto& [key, count] : counts) {
      if (++shown > 8) {
        list += ", ... (" + std::to_string(counts.size()) + " colours)";
        break;
      }
      list += (list.empty() ? "" : ", ") + color_text(key);
    }
    throw InvalidArgument(region_name(r) + ": the colour is not in the layout map " + o.layout_path +
                          " (its colours: " + list + ")");
  }
  return rgb;
}

at::Tensor layout_segments(const Image& map, const std::vector<LayoutRegion>& regions, int width, int height) {
  DMX_CHECK_ARG(map.channels == 3 && map.width > 0 && map.height > 0, "--layout: the map must be RGB");
  DMX_CHECK_ARG(width > 0 && height > 0, "--layout: the output size must be positive, got ", width, "x", height);
  std::map<uint32_t, int64_t> label_of;
  for (size_t r = 0; r < regions.size(); ++r)
    label_of[color_key(parse_layout_color(regions[r].color, "--region"))] = static_cast<int64_t>(r);
  const int64_t R = static_cast<int64_t>(regions.size());
  const int mw = map.width, mh = map.height;
  auto label = [&](int x, int y) {
    const uint8_t* p = &map.data[3 * (static_cast<size_t>(y) * mw + x)];
    const auto it = label_of.find((uint32_t(p[0]) << 16) | (uint32_t(p[1]) << 8) | p[2]);
    return it == label_of.end() ? R : it->second;  // R = background
  };
  const std::string rule = detail::concat(
      "--layout: the map is ", mw, "x", mh, " and the output ", width, "x", height,
      "; the map must have the output size or an integer multiple or fraction of it, the same factor for width and "
      "height (resized exactly: nearest-neighbour upscaling, or downscaling where each k x k block lies in one "
      "region)");
  std::vector<int64_t> labels(static_cast<size_t>(width) * height);
  if (mw >= width) {
    const int k = mw / width;
    DMX_CHECK_ARG(mw % width == 0 && mh % height == 0 && mh / height == k, rule);
    for (int y = 0; y < height; ++y)
      for (int x = 0; x < width; ++x) {
        const int64_t l = label(x * k, y * k);
        for (int dy = 0; dy < k; ++dy)
          for (int dx = 0; dx < k; ++dx)
            DMX_CHECK_ARG(label(x * k + dx, y * k + dy) == l, rule, ": the ", k, "x", k, " block at pixel (", x * k,
                          ", ", y * k, ") of the map holds pixels of several regions");
        labels[static_cast<size_t>(y) * width + x] = l;
      }
  } else {
    const int k = width / mw;
    DMX_CHECK_ARG(width % mw == 0 && height % mh == 0 && height / mh == k, rule);
    for (int y = 0; y < height; ++y)
      for (int x = 0; x < width; ++x) labels[static_cast<size_t>(y) * width + x] = label(x / k, y / k);
  }
  const at::Tensor lab = at::tensor(labels, at::kLong).reshape({height, width});
  const bool background = lab.eq(R).any().item<bool>();
  std::vector<at::Tensor> segs;
  for (int64_t r = 0; r < R + (background ? 1 : 0); ++r) segs.push_back(lab.eq(r));
  return at::stack(segs, 0);
}

LayoutRun make_layout_run(const GenerateOptions& o, const Image& map, const loaders::StableDiffusionModels& m,
                          const std::string& prompt, int width, int height, loaders::SpaTextModel* spatext,
                          uint64_t seed, loaders::SceneModel* scene) {
  return layout_method(o.layout_method).build(LayoutInputs{o, map, m, prompt, width, height, spatext, seed, scene});
}

std::shared_ptr<pipelines::ResidualProvider> spatext_text_only_provider(loaders::SpaTextModel& s) {
  return pipelines::make_spatext_provider(s, at::Tensor(), {}, {}, 0, 0.0);
}
}  // namespace dmx::api

namespace dmx {
std::vector<std::string> layout_method_names() {
  std::vector<std::string> out;
  for (const auto& m : api::kLayoutMethods) out.push_back(m.name);
  return out;
}
}  // namespace dmx
