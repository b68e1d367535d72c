// Make-A-Scene as diffusion (docs/scene.md): VQModel against diffusers, the scene map and its edges, the scene tokens,
// the provider's guidance rows, the category names, and `dmx train vqseg` + `dmx train scene` + `dmx generate
// --layout-method scene`:
//   VQModelRefUnit  diffusers 0.27.2's VQModel (tests/ref/make_vq_refs.py): encode, the codes, decode
//   SceneUnit       the one-hot map and dmx data scenes' edge rule by hand; token = code + row + column; the
//                   provider's context per guidance mode; category names; the cell mask and the decoupled cell
//                   attention by hand
//   SceneCli        a few steps of both recipes on a tiny model write folders that dmx generate runs with and without
//                   a layout (layout scale 0 = the text-only run, bit for bit); resume is exact; bad input exits 2
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "loaders/scene.h"
#include "models/vq_model.h"
#include "pipelines/scene.h"
#include "schedulers/scheduler.h"
#include "test_ref_cases.h"
#include "test_util.h"
#include "tiny_models.h"
#include "training/scene_train.h"

namespace dmx::test {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------------------------
// VQModel against diffusers.

TEST(VQModelRefUnit, EncodeQuantizeDecodeMatchDiffusers) {
  const RefCase r = load_ref_file(repo_ref_dir() + "/vq_model_refs");
  const models::VQModelConfig cfg = models::VQModelConfig::from_json(r.meta);
  EXPECT_EQ(cfg.embed_dim(), 4);
  EXPECT_EQ(cfg.downscale_factor(), 2);
  models::VQModel m(cfg);
  io::TensorMap w;
  for (const auto& [k, v] : r.tensors)
    if (k.rfind("model.", 0) == 0) w[k.substr(6)] = v;
  io::load_state_dict(*m, w, "vq_model_refs");
  m->eval();
  double n = 0;
  for (const auto& p : m->parameters()) n += static_cast<double>(p.numel());
  EXPECT_EQ(n, cfg.parameter_count());
  at::NoGradGuard no_grad;
  const at::Tensor h = m->encode(r["x"]);
  EXPECT_LT(check_close("VQModel encode", h, r["h"], 1e-5), 1e-5);
  const models::VQQuantized q = m->quantize(r["h"]);
  EXPECT_TRUE(at::equal(q.indices, r["indices"])) << "the codes differ from diffusers'";
  EXPECT_LT(check_close("VQModel quantize", q.quantized, r["quant"], 1e-6), 1e-6);
  EXPECT_LT(check_close("VQModel decode", m->decode(r["h"]), r["dec"], 1e-5), 1e-5);
  EXPECT_LT(check_close("VQModel decode (not quantized)", m->decode(r["h"], true), r["dec_nq"], 1e-5), 1e-5);
  EXPECT_LT(check_close("VQModel decode_indices", m->decode_indices(r["indices"]), r["dec"], 1e-5), 1e-5);
  // The config written back reads the same.
  const models::VQModelConfig again = models::VQModelConfig::from_json(cfg.to_json());
  EXPECT_EQ(again.to_json(), cfg.to_json());
}

TEST(VQModelRefUnit, RefusesWhatItDoesNotImplement) {
  nlohmann::json j = load_ref_file(repo_ref_dir() + "/vq_model_refs").meta;
  j["norm_type"] = "spatial";
  EXPECT_THROW(models::VQModelConfig::from_json(j), Unsupported);
  j["norm_type"] = "group";
  j["num_vq_embeddings"] = 0;
  EXPECT_THROW(models::VQModelConfig::from_json(j), FormatError);
}

// ---------------------------------------------------------------------------------------------------------------
// The scene map, tokens and provider.

TEST(SceneUnit, MapIsTheOneHotCategoriesAndTheEdgesOfTheRegions) {
  // Two regions on a 6 x 6 background: region 1 (category 3) at rows 1-3, cols 1-2; region 2 (category 5) at rows
  // 1-3, col 3 (touching region 1).
  at::Tensor regions = at::zeros({6, 6}, at::kLong), labels = at::zeros({6, 6}, at::kLong);
  regions.narrow(0, 1, 3).narrow(1, 1, 2).fill_(1);
  regions.narrow(0, 1, 3).narrow(1, 3, 1).fill_(2);
  labels.masked_fill_(regions.eq(1), 3);
  labels.masked_fill_(regions.eq(2), 5);
  const at::Tensor e = loaders::scene_edges(regions);
  // By hand: every pixel of both regions borders the background or the other region, except none (3 x 2 and 3 x 1).
  // Row 2, col 1 borders the background on the left; row 2, col 2 borders region 2 on the right.
  EXPECT_TRUE(e.index({2, 1}).item<bool>());
  EXPECT_TRUE(e.index({2, 2}).item<bool>());
  EXPECT_TRUE(e.index({2, 3}).item<bool>());
  EXPECT_FALSE(e.index({0, 0}).item<bool>()) << "background pixels are never edges";
  EXPECT_EQ(e.sum().item<int64_t>(), 9);
  // A 4 x 4 block: only its ring is edge.
  at::Tensor block = at::zeros({6, 6}, at::kLong);
  block.narrow(0, 1, 4).narrow(1, 1, 4).fill_(7);
  EXPECT_EQ(loaders::scene_edges(block).sum().item<int64_t>(), 12);
  const at::Tensor m = loaders::scene_map_tensor(labels, e, loaders::kSceneCategories);
  ASSERT_EQ(m.sizes(), (std::vector<int64_t>{loaders::kSceneCategories + 1, 6, 6}));
  EXPECT_TRUE(at::equal(m.narrow(0, 0, loaders::kSceneCategories).sum(0), at::ones({6, 6})));
  EXPECT_TRUE(at::equal(m.narrow(0, 0, loaders::kSceneCategories).argmax(0), labels));
  EXPECT_TRUE(at::equal(m[loaders::kSceneCategories], e.to(at::kFloat)));
  EXPECT_THROW(loaders::scene_map_tensor(labels + 20, e, loaders::kSceneCategories), InvalidArgument);
}

TEST(SceneUnit, TokenIsCodePlusRowPlusColumnEmbedding) {
  const at::Tensor code = at::randn({5, 3}), row = at::randn({2, 3}), col = at::randn({2, 3});
  const at::Tensor codes = at::tensor(std::vector<int64_t>{4, 0, 2, 1}).view({1, 2, 2});
  const at::Tensor t = loaders::scene_token_embeddings(codes, code, row, col);
  ASSERT_EQ(t.sizes(), (std::vector<int64_t>{1, 4, 3}));
  for (int y = 0; y < 2; ++y)
    for (int x = 0; x < 2; ++x) {
      const at::Tensor want = code[codes[0][y][x].item<int64_t>()] + row[y] + col[x];
      EXPECT_TRUE(at::allclose(t[0][y * 2 + x], want)) << y << "," << x;
    }
  EXPECT_THROW(loaders::scene_token_embeddings(codes.view({1, 4, 1}), code, row, col), InvalidArgument);
}

TEST(SceneUnit, ProviderAppendsTheTokensGuidanceModeDecidesTheUnconditionalRows) {
  const at::Tensor scene = at::full({4, 3}, 1.0), dropped = at::full({4, 3}, -1.0);
  const at::Tensor lat = at::zeros({1, 4, 2, 2});
  auto context_of = [&](pipelines::SceneGuidance g, bool with_scene, int groups) {
    pipelines::SceneTokensProvider p(with_scene ? scene : at::Tensor(), dropped, g, 16);
    models::UNetInputs in;
    in.encoder_hidden_states = at::zeros({groups, 77, 3});
    in.sample = at::zeros({groups, 4, 2, 2});
    std::unique_ptr<schedulers::Scheduler> sched =
        schedulers::create_scheduler("DDIMScheduler", nlohmann::json::object());
    pipelines::ResidualStep step{0, 1, 1.0, lat, *sched, groups > 1, groups};
    p.apply(step, in);
    return in.encoder_hidden_states;  // [groups, 81, 3]
  };
  const at::Tensor keep = context_of(pipelines::SceneGuidance::KeepScene, true, 2);
  ASSERT_EQ(keep.sizes(), (std::vector<int64_t>{2, 81, 3}));
  EXPECT_TRUE(at::equal(keep.narrow(1, 0, 77), at::zeros({2, 77, 3}))) << "the text's tokens stay first";
  EXPECT_EQ(keep[0].narrow(0, 77, 4).min().item<double>(), 1.0) << "text mode: the unconditional row keeps the scene";
  EXPECT_EQ(keep[1].narrow(0, 77, 4).min().item<double>(), 1.0);
  const at::Tensor all = context_of(pipelines::SceneGuidance::DropAll, true, 2);
  EXPECT_EQ(all[0].narrow(0, 77, 4).max().item<double>(), -1.0) << "all mode: the unconditional row drops the scene";
  EXPECT_EQ(all[1].narrow(0, 77, 4).min().item<double>(), 1.0);
  const at::Tensor text_only = context_of(pipelines::SceneGuidance::KeepScene, false, 2);
  EXPECT_EQ(text_only.narrow(1, 77, 4).max().item<double>(), -1.0) << "no layout: every row the dropped scene";
  const at::Tensor unguided = context_of(pipelines::SceneGuidance::DropAll, true, 1);
  EXPECT_EQ(unguided[0].narrow(0, 77, 4).min().item<double>(), 1.0);
  // Every row's sample gets the coordinate channels after the latents.
  pipelines::SceneTokensProvider p(scene, dropped, pipelines::SceneGuidance::KeepScene, 16);
  EXPECT_EQ(p.extra_input_channels(), loaders::kSceneCoordChannels);
  std::unique_ptr<schedulers::Scheduler> sched =
      schedulers::create_scheduler("DDIMScheduler", nlohmann::json::object());
  models::UNetInputs in;
  in.encoder_hidden_states = at::zeros({2, 77, 3});
  in.sample = at::randn({2, 4, 2, 2});
  const at::Tensor x = in.sample.clone();
  p.apply(pipelines::ResidualStep{0, 1, 1.0, lat, *sched, true, 2}, in);
  ASSERT_EQ(in.sample.sizes(), (std::vector<int64_t>{2, 6, 2, 2}));
  EXPECT_TRUE(in.sample.narrow(1, 0, 4).equal(x));
  EXPECT_TRUE(in.sample[1].narrow(0, 4, 2).equal(loaders::scene_coordinates(2, 2)));
}

TEST(SceneUnit, CoordinatesAreTheCellCentresInMinusOneToOne) {
  const at::Tensor c = loaders::scene_coordinates(2, 4);
  ASSERT_EQ(c.sizes(), (std::vector<int64_t>{2, 2, 4}));
  const std::vector<float> xs = {-0.75f, -0.25f, 0.25f, 0.75f};
  for (int j = 0; j < 4; ++j) {
    EXPECT_FLOAT_EQ(c[0][0][j].item<float>(), xs[static_cast<size_t>(j)]);
    EXPECT_FLOAT_EQ(c[0][1][j].item<float>(), xs[static_cast<size_t>(j)]);
  }
  EXPECT_FLOAT_EQ(c[1][0][2].item<float>(), -0.5f);
  EXPECT_FLOAT_EQ(c[1][1][2].item<float>(), 0.5f);
}

TEST(SceneUnit, CellMaskIsTheFootprintOverlap) {
  // 4 x 4 queries over a 4 x 4 grid: each query sees its own cell only.
  const at::Tensor same = loaders::scene_cell_mask(4, 4, 4);
  ASSERT_EQ(same.sizes(), (std::vector<int64_t>{16, 16}));
  EXPECT_TRUE(same.equal(at::eye(16, at::kBool)));
  // 2 x 2 queries over a 4 x 4 grid: query (0, 1) covers rows 0-1 and columns 2-3.
  const at::Tensor coarse = loaders::scene_cell_mask(2, 2, 4);
  ASSERT_EQ(coarse.sizes(), (std::vector<int64_t>{4, 16}));
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t c = 0; c < 4; ++c) EXPECT_EQ(coarse[1][r * 4 + c].item<bool>(), r < 2 && c >= 2) << r << "," << c;
  EXPECT_EQ(coarse.sum().item<int64_t>(), 16);  // each cell under one query
  // 3 x 2 queries over a grid of 2 (the middle row's footprint [1/3, 2/3) straddles both grid rows): by hand.
  const at::Tensor odd = loaders::scene_cell_mask(3, 2, 2);
  ASSERT_EQ(odd.sizes(), (std::vector<int64_t>{6, 4}));
  const std::vector<std::vector<bool>> want = {{true, false}, {true, true}, {false, true}};
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t r = 0; r < 2; ++r) {
      EXPECT_EQ(odd[i * 2][r * 2].item<bool>(), want[i][r]) << i << "," << r;  // query (i, 0), cell (r, 0)
      EXPECT_FALSE(odd[i * 2][r * 2 + 1].item<bool>()) << i << "," << r;       // never cell (r, 1)
    }
  EXPECT_THROW(loaders::scene_cell_mask(0, 2, 2), InvalidArgument);
}

TEST(SceneUnit, CellAttentionIsTheTextsPlusItsOwnCellsScene) {
  // One attention call by hand: 4 queries (2 x 2), 3 text keys + 4 scene keys (grid 2).
  at::manual_seed(3);
  const at::Tensor q = at::randn({1, 2, 4, 5}), k = at::randn({1, 2, 7, 5}), v = at::randn({1, 2, 7, 5});
  nn::AttentionSite site;
  site.path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2";
  site.is_cross = true;
  loaders::SceneCellAttention proc(2);
  EXPECT_TRUE(proc.wants(site));
  const at::Tensor out = proc.forward(site, {}, q, k, v, 0.5, true);
  const at::Tensor text_k = k.narrow(2, 0, 3), text_v = v.narrow(2, 0, 3);
  for (int64_t i = 0; i < 4; ++i) {
    // Query i: a softmax over the 3 text keys, plus the value of its own cell's scene key (a softmax of one).
    const at::Tensor qi = q.select(2, i).unsqueeze(2);
    const at::Tensor text = at::matmul((at::matmul(qi, text_k.transpose(-1, -2)) * 0.5).softmax(-1), text_v);
    const at::Tensor want = (text + v.narrow(2, 3 + i, 1)).squeeze(2);
    EXPECT_TRUE(at::allclose(out.select(2, i), want, 1e-5, 1e-6)) << i;
  }
  // Zero scene values add nothing: the layer's output without a scene.
  const at::Tensor vz = v.clone();
  vz.narrow(2, 3, 4).zero_();
  const at::Tensor plain = at::matmul((at::matmul(q, text_k.transpose(-1, -2)) * 0.5).softmax(-1), text_v);
  EXPECT_TRUE(at::allclose(proc.forward(site, {}, q, k, vz, 0.5, true), plain, 1e-5, 1e-6));
  site.is_cross = false;
  EXPECT_FALSE(proc.wants(site));
  site.is_cross = true;
  EXPECT_THROW(proc.forward(site, {}, at::randn({1, 2, 3, 5}), k, v, 0.5, true), InvalidArgument);  // not square
  EXPECT_THROW(proc.forward(site, {}, q, k.narrow(2, 0, 4), v.narrow(2, 0, 4), 0.5, true), InvalidArgument);
}

TEST(SceneUnit, CategoriesByNameNumberOrGroup) {
  EXPECT_EQ(pipelines::parse_scene_category("Animals & Nature", "--region"), 3);
  EXPECT_EQ(pipelines::parse_scene_category("  food & drink ", "--region"), 4);
  EXPECT_EQ(pipelines::parse_scene_category("9", "--region"), 9);
  EXPECT_EQ(pipelines::parse_scene_category("face", "--region"), 1);
  EXPECT_EQ(pipelines::parse_scene_category("human", "--region"), 2);
  try {
    pipelines::parse_scene_category("unicorn", "--region #ff0000");
    ADD_FAILURE() << "unicorn accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--region #ff0000"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("Smileys & Emotion"), std::string::npos) << e.what();
  }
  EXPECT_THROW(pipelines::parse_scene_category("0", "--region"), InvalidArgument);
  EXPECT_THROW(pipelines::parse_scene_guidance("both"), InvalidArgument);
}

// ---------------------------------------------------------------------------------------------------------------
// The commands.

constexpr int kSide = 32;  // the tiny model's default size

// A scene folder as `dmx data scenes` writes it (the parts dmx train vqseg / scene read): n 32-px canvases, each with
// two squares (categories 3 and 4) on white, their category and edge maps, captions, and layouts/0000.png.
std::string scene_folder(const std::string& name, int n) {
  const std::string dir = temp_subdir(name);
  for (const char* sub : {"images", "categories", "edges", "layouts"}) fs::create_directories(dir + "/" + sub);
  static const char* kWords[] = {"red", "green", "blue", "yellow", "cat", "dog", "sun", "moon"};
  std::ofstream meta(dir + "/metadata.jsonl");
  for (int i = 0; i < n; ++i) {
    Image img, cat, edges, layout;
    img.width = img.height = cat.width = cat.height = edges.width = edges.height = layout.width = layout.height = kSide;
    img.channels = layout.channels = 3;
    cat.channels = edges.channels = 1;
    img.data.assign(kSide * kSide * 3, 255);
    layout.data.assign(kSide * kSide * 3, 0);
    at::Tensor inst = at::zeros({kSide, kSide}, at::kLong);
    for (int k = 1; k <= 2; ++k) {
      const int y0 = (i * 5 + k * 9) % 20, x0 = (i * 3 + k * 13) % 20;
      inst.narrow(0, y0, 10).narrow(1, x0, 10).fill_(k);
      for (int y = y0; y < y0 + 10; ++y)
        for (int x = x0; x < x0 + 10; ++x) {
          uint8_t* p = &img.data[static_cast<size_t>((y * kSide + x) * 3)];
          p[0] = static_cast<uint8_t>(255 * ((i + k) & 1));
          p[1] = static_cast<uint8_t>(255 * (((i + k) >> 1) & 1));
          p[2] = 128;
          uint8_t* q = &layout.data[static_cast<size_t>((y * kSide + x) * 3)];
          q[0] = k == 1 ? 255 : 0;
          q[1] = k == 2 ? 255 : 0;
        }
    }
    const at::Tensor e = loaders::scene_edges(inst);
    cat.data.resize(kSide * kSide);
    edges.data.resize(kSide * kSide);
    for (int p = 0; p < kSide * kSide; ++p) {
      const int64_t id = inst.view(-1)[p].item<int64_t>();
      cat.data[static_cast<size_t>(p)] = static_cast<uint8_t>(id == 0 ? 0 : 2 + id);
      edges.data[static_cast<size_t>(p)] = e.view(-1)[p].item<bool>() ? 255 : 0;
    }
    char stem[16];
    std::snprintf(stem, sizeof stem, "%04d", i);
    save_png(dir + "/images/" + stem + ".png", img);
    save_png(dir + "/categories/" + stem + ".png", cat);
    save_png(dir + "/edges/" + stem + ".png", edges);
    if (i == 0) save_png(dir + "/layouts/0000.png", layout);
    meta << nlohmann::json{{"file_name", std::string("images/") + stem + ".png"},
                           {"text", std::string(kWords[i % 8]) + " and " + kWords[(i + 3) % 8]},
                           {"category_map", std::string("categories/") + stem + ".png"},
                           {"edges", std::string("edges/") + stem + ".png"}}
                .dump()
         << "\n";
  }
  std::ofstream(dir + "/scenes.json") << nlohmann::json{{"format", "dmx-scenes-1"}, {"size", kSide}}.dump() << "\n";
  return dir;
}

std::vector<std::string> plus(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<std::string> vqseg_args(const std::string& data, const std::string& out, int steps) {
  return {"train",           "vqseg", "--data",       data, "--output", out, "--steps",   std::to_string(steps),
          "--batch-size",    "2",     "--resolution", "32", "--seed",   "4", "--threads", "1",
          "--codebook-size", "16",    "--quiet"};
}

std::vector<std::string> scene_args(const std::string& data, const std::string& vqseg, const std::string& out) {
  return {"train",
          "scene",
          "--model",
          tiny_model_dir("test"),
          "--vqseg",
          vqseg,
          "--data",
          data,
          "--output",
          out,
          "--steps",
          "2",
          "--batch-size",
          "2",
          "--rank",
          "2",
          "--resolution",
          "32",
          "--seed",
          "3",
          "--learning-rate",
          "1e-3",
          "--proportion-empty-prompts",
          "0.2",
          "--threads",
          "1",
          "--quiet"};
}

TEST(SceneCli, VQSegTrainsReportsItsCodebookAndResumesExactly) {
  const std::string data = scene_folder("scene-cli-vq-data", 4);
  const std::string dir = temp_subdir("scene-cli-vq");
  const CliRun whole = dmx_run(vqseg_args(data, dir + "/v4", 4));
  ASSERT_EQ(whole.code, 0) << whole.output;
  const loaders::VQSeg v = loaders::load_vqseg(dir + "/v4");
  EXPECT_EQ(v.categories, loaders::kSceneCategories);
  EXPECT_EQ(v.resolution, kSide);
  EXPECT_EQ(v.model->config().num_vq_embeddings, 16);
  const nlohmann::json meta = nlohmann::json::parse(read_text_file(dir + "/v4/vqseg.json", "vqseg.json", 1 << 20));
  const auto& u = meta.at("codebook_usage");
  EXPECT_GE(u.at("used").get<int>(), 1);
  EXPECT_LE(u.at("used").get<int>(), 16);
  EXPECT_EQ(u.at("canvases").get<int>(), 4);
  // Stopped at 2 and resumed to 4: the same weights as 4 in one go.
  const CliRun a = dmx_run(vqseg_args(data, dir + "/v2", 2));
  ASSERT_EQ(a.code, 0) << a.output;
  const CliRun b = dmx_run(plus(vqseg_args(data, dir + "/v2", 4), {"--resume", dir + "/v2.train", "--overwrite"}));
  ASSERT_EQ(b.code, 0) << b.output;
  const io::TensorMap w4 = io::load_safetensors(dir + "/v4/diffusion_pytorch_model.safetensors");
  const io::TensorMap w2 = io::load_safetensors(dir + "/v2/diffusion_pytorch_model.safetensors");
  ASSERT_EQ(w4.size(), w2.size());
  for (const auto& [k, t] : w4) EXPECT_TRUE(at::equal(t, w2.at(k))) << k;
  // Continued with --model: the codebook it brings is kept (one step moves it a little, not to new encoder outputs).
  const CliRun c = dmx_run(plus(vqseg_args(data, dir + "/vc", 1), {"--model", dir + "/v4"}));
  ASSERT_EQ(c.code, 0) << c.output;
  const io::TensorMap wc = io::load_safetensors(dir + "/vc/diffusion_pytorch_model.safetensors");
  EXPECT_LT((wc.at("quantize.embedding.weight") - w4.at("quantize.embedding.weight")).abs().max().item<double>(), 0.05);
}

TEST(SceneCli, FewStepsWriteAFolderThatDmxGenerateRunsWithAndWithoutALayout) {
  const std::string data = scene_folder("scene-cli-data", 4);
  const std::string dir = temp_subdir("scene-cli");
  ASSERT_EQ(dmx_run(vqseg_args(data, dir + "/vq", 2)).code, 0);
  const CliRun t = dmx_run(scene_args(data, dir + "/vq", dir + "/sc"));
  ASSERT_EQ(t.code, 0) << t.output;
  const loaders::SceneConfig cfg = loaders::read_scene_config(dir + "/sc");
  EXPECT_EQ(cfg.grid, kSide / 8);
  EXPECT_EQ(cfg.codes, 16);
  EXPECT_EQ(cfg.lora_rank, 2);
  EXPECT_TRUE(cfg.cell_attention);
  const auto sc = loaders::load_scene(dir + "/sc");
  EXPECT_EQ(sc->code_embedding.size(0), 17);
  EXPECT_EQ(sc->base_in_channels, 4);
  EXPECT_EQ(sc->models->unet->config().in_channels, 4 + loaders::kSceneCoordChannels);
  EXPECT_NE(
      std::dynamic_pointer_cast<loaders::SceneCellAttention>(nn::assign_attention_sites(*sc->models->unet)->processor),
      nullptr)
      << "a scene UNet runs with its cell attention";
  // The coordinate channels' weights moved off zero (two steps at 1e-3).
  const io::TensorMap w = io::load_safetensors(dir + "/sc/scene.safetensors");
  EXPECT_GT(w.at("unet.conv_in.weight").narrow(1, 4, loaders::kSceneCoordChannels).abs().max().item<double>(), 0.0);
  // The tables start at zero (the first forward is the base model's) and were trained.
  for (const char* t : {"scene.code_embedding.weight", "scene.row_embedding.weight", "scene.col_embedding.weight"})
    EXPECT_GT(w.at(t).abs().max().item<double>(), 0.0) << t;
  EXPECT_TRUE(loaders::is_vqseg_folder(dir + "/sc/vqseg"));

  const std::vector<std::string> common = {"generate", "--model", dir + "/sc", "--prompt", "red and cat",
                                           "--steps",  "2",       "--seed",    "5",        "--quiet"};
  const std::vector<std::string> layout = {
      "--layout",     data + "/layouts/0000.png", "--region", "#ff0000=Animals & Nature", "--region",
      "#00ff00=face", "--layout-method",          "scene"};
  const CliRun g = dmx_run(plus(common, plus(layout, {"--output", dir + "/l.png"})));
  ASSERT_EQ(g.code, 0) << g.output;
  EXPECT_EQ(load_image(dir + "/l.png", "l").width, kSide);  // the size it was trained at
  const CliRun plain = dmx_run(plus(common, {"--output", dir + "/p.png"}));
  ASSERT_EQ(plain.code, 0) << plain.output;
  const CliRun zero = dmx_run(plus(common, plus(layout, {"--layout-guidance-scale", "0", "--output", dir + "/z.png"})));
  ASSERT_EQ(zero.code, 0) << zero.output;
  const CliRun all = dmx_run(plus(common, plus(layout, {"--scene-guidance", "all", "--output", dir + "/a.png"})));
  ASSERT_EQ(all.code, 0) << all.output;
  EXPECT_EQ(load_image(dir + "/z.png", "z").data, load_image(dir + "/p.png", "p").data)
      << "layout scale 0 is the text-only run";
  EXPECT_NE(load_image(dir + "/l.png", "l").data, load_image(dir + "/p.png", "p").data) << "the scene changes nothing";
  EXPECT_NE(load_image(dir + "/l.png", "l").data, load_image(dir + "/a.png", "a").data)
      << "the guidance mode changes nothing";

  // scene.json's attention: cell or all, nothing else.
  {
    nlohmann::json j = nlohmann::json::parse(read_text_file(dir + "/sc/scene.json", "scene.json", 1 << 20));
    EXPECT_EQ(j.value("attention", ""), "cell");
    j["attention"] = "diagonal";
    std::ofstream(dir + "/sc/scene.json") << j.dump();
    EXPECT_THROW(loaders::read_scene_config(dir + "/sc"), FormatError);
    j["attention"] = "cell";
    std::ofstream(dir + "/sc/scene.json") << j.dump();
  }

  // Bad input: exit 2, nothing written.
  auto refused = [&](const std::vector<std::string>& args, const std::string& what) {
    const CliRun r = dmx_run(args);
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_NE(r.output.find(what), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(dir + "/bad.png"));
    EXPECT_FALSE(fs::exists(dir + "/bad"));
  };
  refused(plus(common, {"--layout", data + "/layouts/0000.png", "--region", "#ff0000=unicorn", "--layout-method",
                        "scene", "--output", dir + "/bad.png"}),
          "scene category");
  refused(plus(common, plus(layout, {"--width", "64", "--height", "64", "--output", dir + "/bad.png"})),
          "a scene model");
  refused(
      plus(common, {"--layout", data + "/layouts/0000.png", "--region", "#ff0000=red", "--output", dir + "/bad.png"}),
      "use --layout-method scene");
  refused(plus(common, plus(layout, {"--scene-guidance", "both", "--output", dir + "/bad.png"})), "--scene-guidance");
  refused({"generate", "--model", tiny_model_dir("test"), "--prompt", "red", "--steps", "2", "--layout",
           data + "/layouts/0000.png", "--region", "#ff0000=face", "--layout-method", "scene", "--output",
           dir + "/bad.png", "--quiet"},
          "needs a scene model folder");
  refused(scene_args(data, data, dir + "/bad"), "must be a VQ-SEG folder");
  refused(plus(vqseg_args(data, dir + "/bad", 2), {"--vq-factor", "3"}), "--vq-factor");
  refused(plus(vqseg_args(data, dir + "/bad", 2), {"--model", tiny_model_dir("test")}), "--model");
}
}  // namespace
}  // namespace dmx::test
