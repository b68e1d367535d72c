// dmx train prior and dmx eval --prior (training/prior_train.h, docs/unclip.md "Training the prior"):
//   PriorTrainUnit    the prior's config from a CLIP's sizes, and the sizes that do not fit
//   PriorTrainTiny    the dropped text is exactly the pipeline's unconditional branch; the features are the
//                     pipeline's; a few steps lower a fixed-draw loss; the saved folder loads (load_unclip_prior) with
//                     the trained weights and the data statistics, and samples
//   PriorTrainCli     stop at step 2 + resume to 4 = 4 in one go; bad input exits 2 and writes nothing; dmx eval
//                     --prior measures a trained folder
//   PriorTrainGolden  the folder beside the fixtures' tiny decoder is a StableUnCLIPPipeline folder that the unCLIP
//                     loader loads and dmx generate runs
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "loaders/clip.h"
#include "loaders/unclip.h"
#include "pipelines/generation.h"
#include "pipelines/unclip_steps.h"
#include "schedulers/scheduler.h"
#include "test_util.h"
#include "tiny_models.h"
#include "training/clip_train.h"
#include "training/prior_train.h"

namespace dmx::test {
namespace {

namespace fs = std::filesystem;

const char* const kWords[] = {"red", "green", "blue", "yellow", "cat", "dog", "sun", "moon"};

// A tiny CLIP (both towers 32 wide, 32-wide embeddings: the fixtures' Stable unCLIP width) saved as a CLIP folder.
std::string tiny_clip_folder(const std::string& name, int projection_dim = 32) {
  training::CLIPArchitecture a;
  a.width = 32;
  a.layers = 1;
  a.heads = 2;
  a.patch_size = 4;
  a.projection_dim = projection_dim;
  a.image_size = 16;
  at::manual_seed(3);
  auto m = training::new_clip_model(a, tiny_tokenizer_dir());
  const std::string dir = temp_subdir(name) + "/clip";
  loaders::save_clip(dir, *m);
  return dir;
}

// n pictures (16 px, a coloured square at a different place and colour each), captioned with kWords.
std::vector<std::string> tiny_pictures(const std::string& dir, int n) {
  std::vector<std::string> files;
  for (int i = 0; i < n; ++i) {
    Image img;
    img.width = img.height = 16;
    img.channels = 3;
    img.data.assign(16 * 16 * 3, 255);
    const int y0 = (i * 5) % 10, x0 = (i * 3) % 10;
    for (int y = y0; y < y0 + 6; ++y)
      for (int x = x0; x < x0 + 6; ++x) {
        uint8_t* p = &img.data[static_cast<size_t>((y * 16 + x) * 3)];
        p[0] = static_cast<uint8_t>(255 * (i & 1));
        p[1] = static_cast<uint8_t>(255 * ((i >> 1) & 1));
        p[2] = static_cast<uint8_t>(255 * ((i >> 2) & 1));
      }
    const std::string file = "p" + std::to_string(i) + ".png";
    save_png(dir + "/" + file, img);
    files.push_back(file);
  }
  return files;
}

std::string tiny_caption_folder(const std::string& name, int n) {
  const std::string dir = temp_subdir(name);
  const auto files = tiny_pictures(dir, n);
  std::ofstream meta(dir + "/metadata.jsonl");
  for (int i = 0; i < n; ++i)
    meta << nlohmann::json{{"file_name", files[static_cast<size_t>(i)]}, {"text", kWords[i % 8]}}.dump() << "\n";
  return dir;
}

void expect_close(const at::Tensor& a, const at::Tensor& b, double tol, const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const double d = (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
  EXPECT_LE(d, tol) << what << ": max |diff| " << d;
}

// ---------------------------------------------------------------------------------------------------------------

TEST(PriorTrainUnit, ConfigFollowsTheClipAndRefusesSizesThatDoNotFit) {
  models::CLIPTextConfig t;
  t.hidden_size = 48;
  t.projection_dim = 48;
  t.max_position_embeddings = 24;
  models::CLIPVisionConfig v;
  v.projection_dim = 48;
  training::PriorArchitecture a;
  a.layers = 3;
  a.heads = 2;
  a.head_dim = 16;
  const auto c = training::prior_config_for_clip(a, t, v, 24);
  EXPECT_EQ(c.embedding_dim, 48);
  EXPECT_EQ(c.num_embeddings, 24);
  EXPECT_EQ(c.inner_dim(), 32);
  EXPECT_EQ(c.num_layers, 3);
  EXPECT_EQ(c.resolved_clip_embed_dim(), 48);
  // The config round-trips through diffusers' JSON.
  const auto back = models::PriorTransformerConfig::from_json(training::prior_config_json(c));
  EXPECT_EQ(back.parameter_count(), c.parameter_count());
  EXPECT_EQ(back.num_embeddings, 24);
  auto refused = [&](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  models::CLIPTextConfig wide = t;
  wide.projection_dim = 32;
  refused([&] { training::prior_config_for_clip(a, wide, v, 24); }, "hidden_size 48, text projection_dim 32");
  models::CLIPVisionConfig other = v;
  other.projection_dim = 16;
  refused([&] { training::prior_config_for_clip(a, t, other, 24); }, "image projection_dim 16");
  refused([&] { training::prior_config_for_clip(a, t, v, 30); }, "model_max_length 30");
  training::PriorArchitecture bad = a;
  bad.layers = 0;
  refused([&] { bad.validate(); }, "--layers");
  bad = a;
  bad.head_dim = 2;
  refused([&] { bad.validate(); }, "--attention-head-dim must be in [4, 256], got 2");
  // The scheduler config is Stable unCLIP's.
  const auto s = training::stable_unclip_prior_scheduler_config();
  EXPECT_EQ(s.at("prediction_type"), "sample");
  EXPECT_EQ(s.at("beta_schedule"), "squaredcos_cap_v2");
  EXPECT_EQ(s.at("variance_type"), "fixed_small_log");
  EXPECT_EQ(s.at("clip_sample_range"), 5.0);
}

// ---------------------------------------------------------------------------------------------------------------

struct TinySetup {
  std::string clip_dir, data_dir;
  std::shared_ptr<loaders::CLIPComponents> clip;
  std::vector<std::string> paths, captions;
};

TinySetup tiny_setup(const std::string& name, int n) {
  note_use(kUsedTinyModel);
  TinySetup s;
  s.clip_dir = tiny_clip_folder(name + "-clip");
  s.data_dir = temp_subdir(name + "-data");
  const auto files = tiny_pictures(s.data_dir, n);
  for (int i = 0; i < n; ++i) {
    s.paths.push_back(s.data_dir + "/" + files[static_cast<size_t>(i)]);
    s.captions.push_back(kWords[i % 8]);
  }
  s.clip = loaders::load_clip(s.clip_dir);
  return s;
}

TEST(PriorTrainTiny, FeaturesAndTheDroppedTextAreWhatThePipelineFeeds) {
  TinySetup s = tiny_setup("prior-features", 3);
  const auto f = training::compute_prior_features(*s.clip, s.paths, s.captions, "--data");
  ASSERT_EQ(f.size(), 3u);
  // The pipeline's prior prompt with guidance: [uncond (""); cond].
  const auto pp =
      pipelines::encode_prior_prompt(*s.clip->tokenizer, s.clip->text_encoder, {s.captions[1]}, /*cfg=*/true);
  EXPECT_TRUE(f.uncond_hidden_state.equal(pp.last_hidden_state.narrow(0, 0, 1)));
  EXPECT_TRUE(f.uncond_text_embeds.equal(pp.text_embeds.narrow(0, 0, 1)));
  EXPECT_TRUE(f.uncond_attention_mask.equal(pp.attention_mask.narrow(0, 0, 1)));
  EXPECT_EQ(f.uncond_attention_mask.sum().item<int64_t>(), 2) << "BOS and EOS";
  expect_close(f.last_hidden_state.narrow(0, 1, 1), pp.last_hidden_state.narrow(0, 1, 1), 1e-5, "hidden states");
  expect_close(f.text_embeds.narrow(0, 1, 1), pp.text_embeds.narrow(0, 1, 1), 1e-5, "text_embeds");
  EXPECT_TRUE(f.attention_mask.narrow(0, 1, 1).equal(pp.attention_mask.narrow(0, 1, 1)));
  // The targets are the image embeddings the img2img pipeline computes for the picture.
  const at::Tensor ie = pipelines::clip_image_embeds(s.clip->feature_extractor, s.clip->image_encoder,
                                                     to_rgb(load_image(s.paths[2], "t")));
  expect_close(f.image_embeds.narrow(0, 2, 1), ie, 1e-5, "image_embeds");

  // With the drop probability 1 every row's conditioning is the empty prompt's: the loss equals the loss of rows
  // whose features are the empty prompt's.
  auto features = std::make_shared<training::PriorFeatures>(f);
  auto with_uncond = std::make_shared<training::PriorFeatures>(f);
  with_uncond->last_hidden_state = f.uncond_hidden_state.expand_as(f.last_hidden_state).clone();
  with_uncond->text_embeds = f.uncond_text_embeds.expand_as(f.text_embeds).clone();
  with_uncond->attention_mask = f.uncond_attention_mask.expand_as(f.attention_mask).clone();
  training::PriorArchitecture a;
  a.layers = 1;
  a.heads = 2;
  a.head_dim = 8;
  const auto cfg = training::prior_config_for_clip(a, s.clip->text_encoder->config(), s.clip->image_encoder->config(),
                                                   s.clip->tokenizer->model_max_length());
  at::manual_seed(5);
  models::PriorTransformer p1(cfg);
  models::PriorTransformer p2(cfg);
  {
    at::NoGradGuard ng;
    auto a1 = p1->named_parameters(true);
    auto a2 = p2->named_parameters(true);
    for (const auto& kv : a1) a2[kv.key()].copy_(kv.value());
  }
  training::PriorRecipe dropped(p1, features, s.clip_dir, 1.0);
  training::PriorRecipe uncond(p2, with_uncond, s.clip_dir, 0.5);  // 0.5: the same draws, no matter what is drawn
  training::Batch b;
  b.indices = {0, 1, 2};
  at::Generator g1 = pipelines::make_generator(9), g2 = pipelines::make_generator(9);
  const at::Tensor l1 = dropped.custom_loss(b, g1, 0, 3), l2 = uncond.custom_loss(b, g2, 0, 3);
  EXPECT_TRUE(l1.equal(l2)) << l1 << l2;
  // And not the conditional rows' loss.
  training::PriorRecipe kept(p1, features, s.clip_dir, 1e-9);
  at::Generator g3 = pipelines::make_generator(9);
  EXPECT_FALSE(kept.custom_loss(b, g3, 0, 3).equal(l1));
}

TEST(PriorTrainTiny, AFewStepsLowerAFixedDrawLossAndTheFolderLoadsAndSamples) {
  TinySetup s = tiny_setup("prior-run", 4);
  auto f = std::make_shared<training::PriorFeatures>(
      training::compute_prior_features(*s.clip, s.paths, s.captions, "--data"));
  training::PriorArchitecture a;
  a.layers = 2;
  a.heads = 2;
  a.head_dim = 16;
  at::manual_seed(0);
  models::PriorTransformer prior(training::prior_config_for_clip(
      a, s.clip->text_encoder->config(), s.clip->image_encoder->config(), s.clip->tokenizer->model_max_length()));
  auto recipe = std::make_shared<training::PriorRecipe>(prior, f, s.clip_dir, 0.1);
  auto fixed_loss = [&] {
    at::NoGradGuard ng;
    recipe->prior()->eval();
    double total = 0;
    for (uint64_t seed = 0; seed < 8; ++seed) {
      at::Generator g = pipelines::make_generator(100 + seed);
      training::Batch b;
      b.indices = {0, 1, 2, 3};
      total += recipe->custom_loss(b, g, 0, 4).mean().item<double>();
    }
    return total / 8;
  };
  const double before = fixed_loss();
  training::TrainConfig cfg;
  const std::string out = temp_subdir("prior-run-out");
  cfg.output = out + "/prior";
  cfg.output_dir = out + "/prior.train";
  cfg.max_train_steps = 60;
  cfg.train_batch_size = 4;
  cfg.learning_rate = 2e-3;
  cfg.quiet = true;
  auto source = std::make_shared<training::FeatureBatchSource>(s.captions, 4, 0, 1, 0);
  training::Trainer trainer(cfg, recipe, source);
  const auto r = trainer.run();
  ASSERT_TRUE(r.wrote_output);
  const double after = fixed_loss();
  EXPECT_LT(after, 0.5 * before) << "before " << before << ", after " << after;

  // The folder: the prior half of a StableUnCLIPPipeline folder.
  for (const char* file :
       {"prior/config.json", "prior/diffusion_pytorch_model.safetensors", "prior_scheduler/scheduler_config.json",
        "prior_text_encoder/config.json", "prior_text_encoder/model.safetensors", "prior_tokenizer/vocab.json",
        "prior_tokenizer/merges.txt"})
    EXPECT_TRUE(path_exists(cfg.output + "/" + file)) << file;
  const auto loaded = loaders::load_unclip_prior(cfg.output);
  const auto mine = recipe->prior()->named_parameters(true);
  for (const auto& kv : loaded->prior->named_parameters(true))
    EXPECT_TRUE(kv.value().equal(mine[kv.key()])) << kv.key();
  const auto lp = loaded->prior->named_parameters(true);
  expect_close(lp["clip_mean"], f->image_embeds.mean(0, true), 1e-6, "clip_mean");
  expect_close(lp["clip_std"], f->image_embeds.std(0, true, true), 1e-6, "clip_std");
  EXPECT_EQ(loaded->prior_scheduler_config.at("prediction_type"), "sample");
  // It samples with the pipeline's loop, and the samples sit nearer their own picture's embedding than the
  // others do, on this tiny overfit set (guided).
  const auto pp = pipelines::encode_prior_prompt(*loaded->prior_tokenizer, loaded->prior_text_encoder,
                                                 {s.captions.begin(), s.captions.end()}, true);
  auto sch = schedulers::create_scheduler("DDPMScheduler", loaded->prior_scheduler_config);
  at::Generator g = pipelines::make_generator(1);
  pipelines::PriorRunParams p;
  p.prompt = pp;
  p.num_inference_steps = 10;
  p.guidance_scale = 4.0;
  p.generator = &g;
  const at::Tensor e = pipelines::run_prior(loaded->prior, *sch, p);
  ASSERT_EQ(e.sizes(), at::IntArrayRef({4, 32}));
  EXPECT_TRUE(e.isfinite().all().item<bool>());
  // A folder missing a part is refused, naming it.
  fs::remove_all(cfg.output + "/prior_scheduler");
  try {
    (void)loaders::load_unclip_prior(cfg.output);
    ADD_FAILURE() << "loaded a prior folder without prior_scheduler/";
  } catch (const FormatError& err) {
    EXPECT_NE(std::string(err.what()).find("prior_scheduler/"), std::string::npos) << err.what();
  }
}

// ---------------------------------------------------------------------------------------------------------------

std::vector<std::string> prior_args(const std::string& data, const std::string& clip, const std::string& out,
                                    const std::string& steps,
                                    const std::vector<std::pair<std::string, std::string>>& set = {}) {
  std::vector<std::pair<std::string, std::string>> o = {
      {"--data", data},      {"--clip", clip},           {"--output", out},
      {"--layers", "1"},     {"--heads", "2"},           {"--attention-head-dim", "8"},
      {"--batch-size", "4"}, {"--steps", steps},         {"--seed", "3"},
      {"--threads", "1"},    {"--learning-rate", "1e-3"}};
  for (const auto& [k, v] : set) {
    auto it = std::find_if(o.begin(), o.end(), [&](const auto& kv) { return kv.first == k; });
    if (it != o.end())
      it->second = v;
    else
      o.emplace_back(k, v);
  }
  std::vector<std::string> args = {"train", "prior", "--quiet"};
  for (const auto& [k, v] : o)
    if (v != "-") args.insert(args.end(), {k, v});
  return args;
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

TEST(PriorTrainCli, StopAtTwoAndResumeToFourEqualsFourInOneGo) {
  const std::string clip = tiny_clip_folder("prior-cli-clip");
  const std::string data = tiny_caption_folder("prior-cli-data", 6);
  const std::string dir = temp_subdir("prior-cli");
  auto with_ema = [&](std::vector<std::string> args) {
    args.insert(args.end(), {"--use-ema", "--ema-decay", "0.9"});
    return args;
  };
  const CliRun a = dmx_run(with_ema(prior_args(data, clip, dir + "/a", "4")));
  ASSERT_EQ(a.code, 0) << a.output;
  const CliRun b1 = dmx_run(with_ema(prior_args(data, clip, dir + "/b", "2")));
  ASSERT_EQ(b1.code, 0) << b1.output;
  auto b2 = with_ema(prior_args(data, clip, dir + "/b", "4"));
  b2.insert(b2.end(), {"--resume", dir + "/b.train", "--overwrite"});
  const CliRun b = dmx_run(b2);
  ASSERT_EQ(b.code, 0) << b.output;
  const std::string w = "/prior/diffusion_pytorch_model.safetensors";
  const io::TensorMap wa = io::load_safetensors(dir + "/a" + w), wb = io::load_safetensors(dir + "/b" + w);
  const io::TensorMap w2 = io::load_safetensors(dir + "/b.train/checkpoint-2/trainable.safetensors");
  ASSERT_EQ(wa.size(), wb.size());
  for (const auto& [k, v] : wa) EXPECT_TRUE(v.equal(wb.at(k))) << k;
  // ... and training moved the weights between step 2 and step 4.
  int moved = 0;
  for (const auto& [k, v] : w2)
    if (k.rfind("prior.", 0) == 0 && wa.count(k.substr(6)) && !v.equal(wa.at(k.substr(6)))) ++moved;
  EXPECT_GT(moved, 0);
  // The copies of the CLIP's text encoder and tokenizer are byte for byte the CLIP's files.
  for (const auto& [from, to] :
       {std::pair<std::string, std::string>{"text_encoder/model.safetensors", "prior_text_encoder/model.safetensors"},
        {"tokenizer/vocab.json", "prior_tokenizer/vocab.json"}})
    EXPECT_EQ(file_bytes(clip + "/" + from), file_bytes(dir + "/a/" + to)) << to;
  EXPECT_EQ(nlohmann::json::parse(read_text_file(dir + "/a/prior/config.json", "t", 1 << 20)).at("num_layers"), 1);
}

TEST(PriorTrainCli, BadInputExitsTwoAndWritesNothing) {
  const std::string clip = tiny_clip_folder("prior-bad-clip");
  const std::string narrow = tiny_clip_folder("prior-bad-narrow", 16);  // text 32 wide, embeddings 16
  const std::string no_text = temp_subdir("prior-bad-notext") + "/clip";
  fs::copy(clip, no_text, fs::copy_options::recursive);
  fs::remove_all(no_text + "/text_encoder");
  const std::string data = tiny_caption_folder("prior-bad-data", 2);
  const std::string out = temp_subdir("prior-bad-out");
  const std::string target = out + "/p";
  struct Case {
    std::vector<std::pair<std::string, std::string>> set;
    const char* message;
  };
  const std::vector<Case> cases = {
      {{{"--data", "-"}}, "--data must be given"},
      {{{"--data", out + "/none"}}, "--data: no such folder"},
      {{{"--clip", out + "/none"}}, "--clip: no such folder"},
      {{{"--clip", data}}, "is not a CLIP folder"},
      {{{"--clip", no_text}}, "has no text_encoder/config.json"},
      {{{"--clip", narrow}}, "hidden_size 32, text projection_dim 16, image projection_dim 16"},
      {{{"--layers", "0"}}, "--layers must be in [1, 48], got 0"},
      {{{"--heads", "0"}}, "--heads must be in [1, 64], got 0"},
      {{{"--attention-head-dim", "2"}}, "--attention-head-dim must be in [4, 256], got 2"},
      {{{"--proportion-empty-prompts", "1.5"}}, "--proportion-empty-prompts must be in [0, 1], got 1.5"},
      {{{"--steps", "0"}}, "--steps must be > 0"},
      {{{"--batch-size", "0"}}, "--batch-size must be in [1, 1024], got 0"},
      {{{"--snr-gamma", "5"}}, "unknown option --snr-gamma"},
      {{{"--width", "64"}}, "unknown option --width"},
      {{{"--tokenizer", data}}, "--tokenizer is not taken by dmx train prior"},
      {{{"--model", data}}, "is not a prior folder (no prior/config.json"},
      {{{"--model", clip}, {"--config", clip}}, "--model (continue a prior folder) and --config"},
  };
  for (const auto& c : cases) {
    const CliRun r = dmx_run(prior_args(data, clip, target, "1", c.set));
    EXPECT_EQ(r.code, 2) << c.message << ": " << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.message << ": " << r.output;
  }
  // Without --clip, where models/emoji-clip is not: the option is required.
  const CliRun r = dmx_run_in(out, prior_args(data, clip, target, "1", {{"--clip", "-"}}));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--clip must be given"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::is_empty(out));
  // dmx eval --prior refuses a folder that is not a prior.
  const CliRun ev = dmx_run({"eval", "--prior", data, "--clip", clip, "--data", data});
  EXPECT_EQ(ev.code, 2) << ev.output;
}

// A `dmx data emoji`-shaped folder: concepts.json, google/{train,heldout}/metadata.jsonl, 6 train + 2 held-out.
std::string tiny_emoji_folder(const std::string& name) {
  const std::string root = temp_subdir(name);
  nlohmann::json concepts = nlohmann::json::array();
  for (int i = 0; i < 8; ++i) concepts.push_back({{"name", kWords[i]}, {"split", i >= 6 ? "heldout" : "train"}});
  std::ofstream(root + "/concepts.json") << concepts.dump();
  for (const std::string split : {"train", "heldout"}) {
    const std::string dir = root + "/google/" + split;
    fs::create_directories(dir + "/images");
    const auto files = tiny_pictures(dir + "/images", 8);
    std::ofstream meta(dir + "/metadata.jsonl");
    for (int i = 0; i < 8; ++i)
      if ((i >= 6) == (split == "heldout"))
        meta << nlohmann::json{{"file_name", "images/" + files[static_cast<size_t>(i)]},
                               {"name", kWords[i]},
                               {"text", std::string(kWords[i]) + ", google style"}}
                    .dump()
             << "\n";
  }
  return root;
}

TEST(PriorTrainCli, EvalPriorMeasuresATrainedFolder) {
  const std::string clip = tiny_clip_folder("prior-eval-clip");
  const std::string emoji = tiny_emoji_folder("prior-eval-emoji");
  const std::string dir = temp_subdir("prior-eval");
  const CliRun t = dmx_run(prior_args(emoji + "/google/train", clip, dir + "/p", "3",
                                      {{"--caption-column", "name"}, {"--batch-size", "3"}}));
  ASSERT_EQ(t.code, 0) << t.output;
  const CliRun e = dmx_run({"eval", "--prior", dir + "/p", "--clip", clip, "--data", emoji, "--steps", "3", "--threads",
                            "1", "--json", "--quiet"});
  ASSERT_EQ(e.code, 0) << e.output;
  const nlohmann::json j = nlohmann::json::parse(e.output.substr(e.output.find('{')));
  EXPECT_EQ(j.at("google_heldout_n"), 2);
  EXPECT_EQ(j.at("google_train_n"), 6);
  EXPECT_EQ(j.at("prior_steps"), 3);
  EXPECT_EQ(j.at("prior_guidance_scale"), 4.0);
  for (const char* k : {"google_heldout_cos_sampled", "google_heldout_cos_unguided", "google_heldout_cos_text",
                        "google_train_cos_sampled"}) {
    const double v = j.at(k).get<double>();
    EXPECT_TRUE(v >= -1.0 && v <= 1.0 && v != 0.0) << k << " " << v;
  }
  EXPECT_EQ(j.at("google_heldout_top5_text"), 1.0) << "2 pictures: the right one is always in the top 5";
  for (const char* k : {"google_heldout_norm_true", "google_heldout_norm_sampled", "google_train_norm_text"})
    EXPECT_GT(j.at(k).get<double>(), 0.0) << k;
  const double top1 = j.at("google_train_top1_text").get<double>();
  EXPECT_TRUE(top1 >= 0 && top1 <= 1);
  // --guidance-scale 1: no unguided second run.
  const CliRun u = dmx_run({"eval", "--prior", dir + "/p", "--clip", clip, "--data", emoji, "--steps", "2",
                            "--guidance-scale", "1", "--threads", "1", "--json", "--quiet"});
  ASSERT_EQ(u.code, 0) << u.output;
  EXPECT_EQ(nlohmann::json::parse(u.output.substr(u.output.find('{'))).at("google_heldout_cos_unguided"), -1.0);
}

// ---------------------------------------------------------------------------------------------------------------

TEST(PriorTrainGolden, BesideTheFixtureDecoderItIsAStableUnCLIPFolderThatGenerates) {
  DMX_REQUIRE_FIXTURES();
  const std::string clip = tiny_clip_folder("prior-golden-clip");
  const std::string data = tiny_caption_folder("prior-golden-data", 4);
  const std::string dir = temp_subdir("prior-golden");
  const CliRun t = dmx_run(prior_args(data, clip, dir + "/p", "2"));
  ASSERT_EQ(t.code, 0) << t.output;
  // The fixtures' tiny Stable unCLIP with its prior half replaced by ours.
  const fs::path full = fs::path(dir) / "unclip";
  fs::copy(fixture_model("unclip"), full, fs::copy_options::recursive);
  fs::permissions(full, fs::perms::owner_write, fs::perm_options::add);
  for (const auto& e : fs::recursive_directory_iterator(full))
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  for (const char* part : {"prior", "prior_scheduler", "prior_text_encoder", "prior_tokenizer"}) {
    fs::remove_all(full / part);
    fs::copy(fs::path(dir) / "p" / part, full / part, fs::copy_options::recursive);
  }
  const auto m = loaders::load_unclip_components(full.string());
  ASSERT_TRUE(m->has_prior());
  EXPECT_EQ(m->prior->config().num_layers, 1);
  const io::TensorMap w = io::load_safetensors(dir + "/p/prior/diffusion_pytorch_model.safetensors");
  for (const auto& kv : m->prior->named_parameters(true)) EXPECT_TRUE(kv.value().equal(w.at(kv.key()))) << kv.key();
  const CliRun g = dmx_run({"generate", "--model", full.string(), "--prompt", "red", "--prior-steps", "3", "--steps",
                            "2", "--seed", "1", "--output", dir + "/out.png", "--threads", "1", "--quiet"});
  ASSERT_EQ(g.code, 0) << g.output;
  const Image img = load_image(dir + "/out.png", "t");
  EXPECT_GT(img.width, 0);
}

}  // namespace
}  // namespace dmx::test
