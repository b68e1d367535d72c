// VQ-SEG and scene folders (scene.h).
#include "loaders/scene.h"

#include <ATen/ATen.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <cmath>

#include "core/fs.h"
#include "core/tensor_util.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "loaders/spatext.h"

namespace dmx::loaders {

at::Tensor scene_map_tensor(const at::Tensor& labels, const at::Tensor& edges, int categories) {
  DMX_CHECK_ARG(labels.dim() == 2 && edges.dim() == 2 && labels.sizes().equals(edges.sizes()),
                "scene map: labels and edges must be [H, W] of one size, got ", shape_string(labels), " and ",
                shape_string(edges));
  DMX_CHECK_ARG(categories >= 2 && categories <= 255, "scene map: categories must be in [2, 255], got ", categories);
  const at::Tensor l = labels.to(at::kLong);
  if (l.numel() > 0) {
    const int64_t lo = l.min().item<int64_t>(), hi = l.max().item<int64_t>();
    DMX_CHECK_ARG(lo >= 0 && hi < categories, "scene map: labels must be in [0, ", categories, "), got [", lo, ", ", hi,
                  "]");
  }
  const at::Tensor onehot = at::one_hot(l, categories).permute({2, 0, 1}).to(at::kFloat);
  return at::cat({onehot, edges.ne(0).to(at::kFloat).unsqueeze(0)}, 0).contiguous();
}

at::Tensor scene_edges(const at::Tensor& instances) {
  DMX_CHECK_ARG(instances.dim() == 2, "scene_edges: [H, W] expected, got ", shape_string(instances));
  const at::Tensor m = instances.to(at::kLong);
  const int64_t H = m.size(0), W = m.size(1);
  at::Tensor e = at::zeros({H, W}, at::kBool);
  if (W > 1) {
    const at::Tensor d = m.narrow(1, 1, W - 1).ne(m.narrow(1, 0, W - 1));  // pixel x differs from x + 1
    e.narrow(1, 0, W - 1).logical_or_(d);
    e.narrow(1, 1, W - 1).logical_or_(d);
  }
  if (H > 1) {
    const at::Tensor d = m.narrow(0, 1, H - 1).ne(m.narrow(0, 0, H - 1));
    e.narrow(0, 0, H - 1).logical_or_(d);
    e.narrow(0, 1, H - 1).logical_or_(d);
  }
  return e.logical_and(m.ne(0));
}

bool is_vqseg_folder(const std::string& path) {
  return is_directory(path) && path_exists(join_path(path, kVQSegConfigFile));
}

VQSeg load_vqseg(const std::string& dir) {
  const std::string meta = join_path(dir, kVQSegConfigFile), cfg_file = join_path(dir, "config.json");
  DMX_CHECK_ARG(is_vqseg_folder(dir), "VQ-SEG: ", dir, " is not a VQ-SEG folder (no ", kVQSegConfigFile,
                "; dmx train vqseg writes one)");
  VQSeg v;
  try {
    const nlohmann::json j = nlohmann::json::parse(read_text_file(meta, "vqseg.json", kMaxJsonFileBytes));
    DMX_CHECK_FORMAT(j.value("format", "") == "dmx-vqseg-1", meta, ": format must be dmx-vqseg-1, got '",
                     j.value("format", ""), "'");
    v.categories = j.at("categories").get<int>();
    v.resolution = j.at("resolution").get<int>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(meta + ": " + e.what());
  }
  DMX_CHECK_FORMAT(v.categories >= 2 && v.categories <= 255, meta, ": categories must be in [2, 255], got ",
                   v.categories);
  DMX_CHECK_FORMAT(v.resolution >= 8 && v.resolution <= 4096, meta, ": resolution must be in [8, 4096], got ",
                   v.resolution);
  DMX_CHECK_FORMAT(path_exists(cfg_file), dir, ": no config.json (a diffusers VQModel)");
  const models::VQModelConfig c = models::VQModelConfig::from_json(io::load_json_file(cfg_file, "VQModel config"));
  DMX_CHECK_FORMAT(c.coder.in_channels == v.categories + 1 && c.coder.out_channels == v.categories + 1, cfg_file,
                   ": a VQ-SEG of ", v.categories, " categories needs in_channels = out_channels = ", v.categories + 1,
                   ", got ", c.coder.in_channels, " and ", c.coder.out_channels);
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  const size_t slash = d.find_last_of('/');
  const std::string parent = slash == std::string::npos ? "." : d.substr(0, std::max<size_t>(slash, 1));
  const std::string name = slash == std::string::npos ? d : d.substr(slash + 1);
  const io::TensorMap weights = io::load_diffusers_component(parent, name);
  io::check_weights_cover_config(c.parameter_count(), weights, "VQ-SEG " + dir);
  v.model = models::VQModel(c);
  io::load_state_dict(*v.model, weights, "VQ-SEG " + dir);
  v.model->eval();
  return v;
}

bool is_scene_folder(const std::string& path) {
  return is_directory(path) && path_exists(join_path(path, kSceneConfigFile));
}

SceneConfig read_scene_config(const std::string& dir) {
  const std::string file = join_path(dir, kSceneConfigFile);
  SceneConfig c;
  try {
    const nlohmann::json j = nlohmann::json::parse(read_text_file(file, "scene.json", kMaxJsonFileBytes));
    DMX_CHECK_FORMAT(j.value("format", "") == "dmx-scene-1", file, ": format must be dmx-scene-1, got '",
                     j.value("format", ""), "'");
    c.grid = j.at("grid").get<int>();
    c.codes = j.at("codes").get<int>();
    c.resolution = j.at("resolution").get<int>();
    c.lora_rank = j.value("lora_rank", 0);
    const std::string attention = j.value("attention", "all");
    DMX_CHECK_FORMAT(attention == "cell" || attention == "all", file, ": attention must be cell or all, got '",
                     attention, "'");
    c.cell_attention = attention == "cell";
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(file + ": " + e.what());
  }
  DMX_CHECK_FORMAT(c.grid >= 1 && c.grid <= 64, file, ": grid must be in [1, 64], got ", c.grid);
  DMX_CHECK_FORMAT(c.codes >= 1 && c.codes <= (1 << 20), file, ": codes must be in [1, 2^20], got ", c.codes);
  DMX_CHECK_FORMAT(c.resolution >= 8 && c.resolution <= 4096, file, ": resolution must be in [8, 4096], got ",
                   c.resolution);
  DMX_CHECK_FORMAT(c.lora_rank >= 0 && c.lora_rank <= 1024, file, ": lora_rank must be in [0, 1024], got ",
                   c.lora_rank);
  return c;
}

std::shared_ptr<SceneModel> load_scene(const std::string& dir, const LoadOptions& opts) {
  DMX_CHECK_ARG(is_scene_folder(dir), "--model: ", dir, " is not a scene folder (no ", kSceneConfigFile, ")");
  auto out = std::make_shared<SceneModel>();
  out->config = read_scene_config(dir);
  const SceneConfig& c = out->config;
  LoadOptions base_opts = opts;
  base_opts.dtype = at::kFloat;  // merged in float32, then cast
  out->models = load_stable_diffusion(dir, base_opts);
  auto& m = *out->models;
  out->vqseg = load_vqseg(join_path(dir, "vqseg"));
  DMX_CHECK_FORMAT(out->vqseg.model->config().num_vq_embeddings == c.codes, dir, ": scene.json says ", c.codes,
                   " codes, vqseg/ has ", out->vqseg.model->config().num_vq_embeddings);
  DMX_CHECK_FORMAT(c.resolution / out->vqseg.model->config().downscale_factor() == c.grid &&
                       c.resolution % out->vqseg.model->config().downscale_factor() == 0,
                   dir, ": scene.json's grid ", c.grid, " is not resolution ", c.resolution, " / the VQ-SEG factor ",
                   out->vqseg.model->config().downscale_factor());
  const std::string wfile = join_path(dir, kSceneWeightsFile);
  DMX_CHECK_FORMAT(path_exists(wfile), dir, ": no ", kSceneWeightsFile, " (the scene embeddings and LoRA)");
  const io::TensorMap t = io::load_safetensors(wfile);
  const int64_t D = m.unet->config().cross_attention_dim;
  auto table = [&](const char* key, int64_t rows) {
    const auto it = t.find(key);
    DMX_CHECK_FORMAT(it != t.end() && it->second.dim() == 2 && it->second.size(0) == rows && it->second.size(1) == D,
                     wfile, ": ", key, " must be [", rows, ", ", D, "]",
                     it == t.end() ? std::string(" (missing)") : ", got " + shape_string(it->second));
    return it->second.to(at::kFloat).contiguous();
  };
  out->code_embedding = table("scene.code_embedding.weight", c.codes + 1);
  out->row_embedding = table("scene.row_embedding.weight", c.grid);
  out->col_embedding = table("scene.col_embedding.weight", c.grid);
  out->base_in_channels = m.unet->config().in_channels;
  m.unet = widen_unet_input(m.unet, kSceneCoordChannels);
  load_widened_conv_in(m.unet, t, wfile, "unet.", out->base_in_channels, kSceneCoordChannels);
  const int merged = merge_unet_lora(m.unet, t);
  DMX_CHECK_FORMAT(c.lora_rank == 0 || merged > 0, wfile, ": scene.json says lora_rank ", c.lora_rank,
                   " but the file has no LoRA pair");
  if (c.cell_attention) install_scene_cell_attention(m.unet, c.grid);
  if (opts.dtype != at::kFloat) {
    m.unet->to(opts.dtype);
    m.text_encoder->to(opts.dtype);
    m.vae->to(opts.dtype);
    m.dtype = opts.dtype;
  }
  m.source_path = dir;
  return out;
}

at::Tensor scene_cell_mask(int64_t h, int64_t w, int64_t grid) {
  DMX_CHECK_ARG(h >= 1 && w >= 1 && grid >= 1, "scene_cell_mask: sides must be >= 1, got ", h, "x", w, " and grid ",
                grid);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  // Row i of n overlaps cell r of grid when r n < (i + 1) grid and i grid < (r + 1) n (integers, no rounding).
  auto overlap = [&](int64_t n) {
    const at::Tensor i = at::arange(n, i64).view({n, 1}), r = at::arange(grid, i64).view({1, grid});
    return (r * n).lt((i + 1) * grid).logical_and((i * grid).lt((r + 1) * n));  // [n, grid]
  };
  const at::Tensor rows = overlap(h), cols = overlap(w);
  // [h, 1, grid, 1] and [1, w, 1, grid] -> [h, w, grid, grid]
  return rows.view({h, 1, grid, 1}).logical_and(cols.view({1, w, 1, grid})).reshape({h * w, grid * grid});
}

SceneCellAttention::SceneCellAttention(int64_t grid) : grid_(grid) {
  DMX_CHECK_ARG(grid >= 1 && grid <= 64, "scene cell attention: grid must be in [1, 64], got ", grid);
}

at::Tensor SceneCellAttention::forward(const nn::AttentionSite& site, const nn::AttentionContext&, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v, double scale, bool upcast) {
  const int64_t N = q.size(2), M = k.size(2), T = grid_ * grid_;
  const auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(N))));
  DMX_CHECK_ARG(side * side == N, "scene cell attention at ", site.path, ": ", N,
                " queries are not a square map (a scene model makes square pictures)");
  DMX_CHECK_ARG(M > T, "scene cell attention at ", site.path, ": ", M, " keys, fewer than the text and the ", T,
                " scene tokens");
  // The text's attention, as the layer computes it without a scene (no seam: its own fast path or, with autograd,
  // the explicit one).
  const at::Tensor text =
      nn::attention_through_seam(site, nullptr, q, k.narrow(2, 0, M - T), v.narrow(2, 0, M - T), scale, upcast);
  // The scene's: a softmax of its own over the tokens of the query's cells.
  const at::Tensor ks = k.narrow(2, M - T, T), vs = v.narrow(2, M - T, T);
  at::Tensor& cached = hidden_[side];  // one mask per attention resolution, built at its first call
  if (!cached.defined() || cached.device() != q.device())
    cached = scene_cell_mask(side, side, grid_).logical_not().to(q.device());
  const at::Tensor& hidden = cached;
  const at::Tensor qq = upcast ? q.to(at::kFloat) : q;
  const at::Tensor kk = upcast ? ks.to(at::kFloat) : ks;
  const at::Tensor scores = at::matmul(qq, kk.transpose(-1, -2)).mul(scale).masked_fill(hidden, -INFINITY);
  at::Tensor probs = scores.softmax(-1);
  if (probs.scalar_type() != vs.scalar_type()) probs = probs.to(vs.scalar_type());
  return text + at::matmul(probs, vs).to(text.scalar_type());
}

void install_scene_cell_attention(models::UNet2DConditionModel& unet, int64_t grid) {
  nn::assign_attention_sites(*unet)->processor = std::make_shared<SceneCellAttention>(grid);
}

at::Tensor scene_coordinates(int64_t h, int64_t w) {
  DMX_CHECK_ARG(h >= 1 && w >= 1, "scene_coordinates: sides must be >= 1, got ", h, "x", w);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor x = (at::arange(w, f32) * 2 + 1) / static_cast<double>(w) - 1;
  const at::Tensor y = (at::arange(h, f32) * 2 + 1) / static_cast<double>(h) - 1;
  return at::stack({x.view({1, w}).expand({h, w}), y.view({h, 1}).expand({h, w})}, 0).contiguous();
}

at::Tensor scene_token_embeddings(const at::Tensor& codes, const at::Tensor& code_embedding,
                                  const at::Tensor& row_embedding, const at::Tensor& col_embedding) {
  DMX_CHECK_ARG(codes.dim() == 3 && codes.size(1) == row_embedding.size(0) && codes.size(2) == col_embedding.size(0),
                "scene tokens: codes must be [B, ", row_embedding.size(0), ", ", col_embedding.size(0), "], got ",
                shape_string(codes));
  const int64_t B = codes.size(0), g = codes.size(1), gw = codes.size(2);
  const at::Tensor e = at::embedding(code_embedding, codes.to(at::kLong));         // [B, g, gw, D]
  const at::Tensor pos = row_embedding.unsqueeze(1) + col_embedding.unsqueeze(0);  // [g, gw, D]
  return (e + pos.unsqueeze(0)).reshape({B, g * gw, code_embedding.size(1)});
}

at::Tensor scene_codes(VQSeg& vqseg, const at::Tensor& map) {
  at::NoGradGuard no_grad;
  const auto p0 = vqseg.model->parameters().front();
  const at::Tensor h = vqseg.model->encode(map.to(p0.device(), p0.scalar_type()));
  return vqseg.model->quantize(h).indices.cpu();
}
}  // namespace dmx::loaders
