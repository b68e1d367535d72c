// Checkpoint formats: original single-file (CompVis/LDM) checkpoints against the diffusers conversion
// of the same weights (golden), config detection, the YAML subset, diffusers folders, and errors.
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <set>
#include <tuple>

#include "core/fs.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/ldm_names.h"
#include "test_util.h"

namespace dmx::io {
namespace {

using nlohmann::json;

std::string tmp_path(const std::string& name) { return dmx::test::temp_dir() + "/" + name; }
std::string sd15() { return dmx::test::fixture_model("sd15"); }
std::string sd15_ldm() { return sd15() + "/ldm/sd15.safetensors"; }

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

void copy_prefix(const std::string& from, const std::string& to, size_t max_bytes) {
  std::ifstream in(from, std::ios::binary);
  std::vector<char> buf((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (buf.size() > max_bytes) buf.resize(max_bytes);
  std::ofstream out(to, std::ios::binary | std::ios::trunc);
  out.write(buf.data(), static_cast<std::streamsize>(buf.size()));
}

template <typename E, typename F>
void expect_error(F&& f, const std::vector<std::string>& needles, const char* what) {
  try {
    f();
    ADD_FAILURE() << what << ": expected an exception";
  } catch (const E& e) {
    for (const auto& n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << what << ": " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": wrong exception type: " << e.what();
  }
}

// Same key set (minus `ignore`), shapes, dtypes and bits.
void expect_same_tensors(const TensorMap& got, const TensorMap& want, const std::string& what,
                         const std::set<std::string>& ignore = {}) {
  std::vector<std::string> missing, extra, different;
  for (const auto& [k, t] : want) {
    if (ignore.count(k)) continue;
    auto it = got.find(k);
    if (it == got.end()) {
      missing.push_back(k);
    } else if (it->second.sizes() != t.sizes() || it->second.scalar_type() != t.scalar_type() ||
               !at::equal(it->second, t)) {
      different.push_back(k);
    }
  }
  for (const auto& [k, t] : got)
    if (!ignore.count(k) && !want.count(k)) extra.push_back(k);
  std::printf("[check] %-14s %zu tensors converted, %zu reference; missing %zu, extra %zu, different %zu\n",
              what.c_str(), got.size(), want.size(), missing.size(), extra.size(), different.size());
  EXPECT_TRUE(missing.empty()) << what << " missing e.g. " << (missing.empty() ? "" : missing.front());
  EXPECT_TRUE(extra.empty()) << what << " extra e.g. " << (extra.empty() ? "" : extra.front());
  EXPECT_TRUE(different.empty()) << what << " differs e.g. " << (different.empty() ? "" : different.front());
}

void expect_fields(const json& got, const json& want, const std::vector<std::string>& fields, const char* what) {
  for (const auto& f : fields) {
    ASSERT_TRUE(want.contains(f)) << what << ": reference has no " << f;
    ASSERT_TRUE(got.contains(f)) << what << ": detected config has no " << f;
    EXPECT_EQ(got[f], want[f]) << what << "." << f << ": detected " << got[f].dump() << ", diffusers "
                               << want[f].dump();
  }
}

const std::vector<std::string> kUnetFields = {"block_out_channels",
                                              "layers_per_block",
                                              "cross_attention_dim",
                                              "attention_head_dim",
                                              "use_linear_projection",
                                              "down_block_types",
                                              "up_block_types",
                                              "in_channels",
                                              "out_channels",
                                              "mid_block_type",
                                              "transformer_layers_per_block",
                                              "norm_num_groups",
                                              "norm_eps",
                                              "act_fn",
                                              "flip_sin_to_cos",
                                              "freq_shift",
                                              "downsample_padding",
                                              "center_input_sample",
                                              "mid_block_scale_factor",
                                              "upcast_attention",
                                              "only_cross_attention",
                                              "dual_cross_attention",
                                              "class_embed_type"};
const std::vector<std::string> kVaeFields = {
    "block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels", "down_block_types",
    "up_block_types",     "scaling_factor",   "norm_num_groups", "act_fn",      "force_upcast"};
const std::vector<std::string> kTextFields = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
    "vocab_size",  "hidden_act",        "layer_norm_eps",    "bos_token_id",        "eos_token_id",
    "pad_token_id"};

// ---------------------------------------------------------------------------------------------
// Golden: the tiny sd15 single-file checkpoint converts to exactly the diffusers folder's tensors.

TEST(CheckpointGolden, Sd15SingleFileEqualsDiffusersFolder) {
  DMX_REQUIRE_FIXTURES();
  const SingleFileCheckpoint ck = load_single_file(sd15_ldm(), sd15());
  EXPECT_EQ(ck.family, "sd1");
  expect_same_tensors(ck.unet, load_diffusers_component(sd15(), "unet"), "unet");
  expect_same_tensors(ck.vae, load_diffusers_component(sd15(), "vae"), "vae");
  expect_same_tensors(ck.text_encoder, load_diffusers_component(sd15(), "text_encoder"), "text_encoder",
                      {"text_model.embeddings.position_ids"});
  // With config_dir, its configs win.
  EXPECT_EQ(ck.unet_config, load_json_file(sd15() + "/unet/config.json", "unet config"));
  EXPECT_EQ(ck.vae_config, load_json_file(sd15() + "/vae/config.json", "vae config"));
  EXPECT_EQ(ck.text_encoder_config, load_json_file(sd15() + "/text_encoder/config.json", "text config"));
  EXPECT_EQ(ck.scheduler_config, load_json_file(sd15() + "/scheduler/scheduler_config.json", "scheduler config"));
}

TEST(CheckpointGolden, Sd15DetectedConfigsMatchDiffusers) {
  DMX_REQUIRE_FIXTURES();
  const TensorMap ckpt = load_safetensors(sd15_ldm());
  const json yaml = parse_ldm_yaml(read_text_file(sd15() + "/ldm/sd15-inference.yaml", "yaml", dmx::kMaxJsonFileBytes),
                                   "sd15-inference.yaml");
  const json unet_ref = load_json_file(sd15() + "/unet/config.json", "unet config");
  const json vae_ref = load_json_file(sd15() + "/vae/config.json", "vae config");
  const json text_ref = load_json_file(sd15() + "/text_encoder/config.json", "text config");
  const json sched_ref = load_json_file(sd15() + "/scheduler/scheduler_config.json", "scheduler config");

  // With the .yaml (num_heads 8) and without it (SD1 default: 8 heads).
  for (const json& y : {yaml, json(nullptr)}) {
    const json unet = detect_ldm_unet_config(ckpt, y);
    expect_fields(unet, unet_ref, kUnetFields, y.is_null() ? "unet (no yaml)" : "unet");
    // diffusers' from_single_file takes image_size 512 for non-v models: sample_size 512 / 8.
    EXPECT_EQ(unet["sample_size"], 64);
    const json vae = detect_ldm_vae_config(ckpt, y);
    expect_fields(vae, vae_ref, kVaeFields, "vae");
    EXPECT_EQ(vae["sample_size"], 512);
    json sched = ldm_scheduler_config(ckpt, y);
    json want = sched_ref;
    want.erase("_diffusers_version");
    EXPECT_EQ(sched, want) << sched.dump() << "\nvs\n" << want.dump();
  }
  // Width 32 is not a multiple of 64: heads must come from a config (here: given explicitly).
  expect_fields(detect_ldm_clip_config(ckpt, 4), text_ref, kTextFields, "text_encoder");
  expect_error<InvalidArgument>([&] { detect_ldm_clip_config(ckpt); }, {"non-standard text encoder width", "--config"},
                                "text width");
}

TEST(CheckpointGolden, Sd15WithoutConfigDirNeedsConfigForTextWidth) {
  DMX_REQUIRE_FIXTURES();
  expect_error<InvalidArgument>([] { load_single_file(sd15_ldm()); },
                                {"non-standard text encoder width", "hidden 32", "--config DIR"}, "no config dir");
  // Only the text encoder config is needed: a config folder holding just that one is enough.
  const std::string dir = tmp_path("text_only_config");
  ::mkdir(dir.c_str(), 0755);
  ::mkdir((dir + "/text_encoder").c_str(), 0755);
  write_text(dir + "/text_encoder/config.json",
             read_text_file(sd15() + "/text_encoder/config.json", "text config", dmx::kMaxJsonFileBytes));
  const SingleFileCheckpoint ck = load_single_file(sd15_ldm(), dir);
  expect_same_tensors(ck.unet, load_diffusers_component(sd15(), "unet"), "unet (detected)");
  expect_fields(ck.unet_config, load_json_file(sd15() + "/unet/config.json", "unet"), kUnetFields, "unet");
  EXPECT_EQ(ck.scheduler_config["prediction_type"], "epsilon");
}

TEST(CheckpointGolden, TextEncoderWithoutTextModelLevel) {
  DMX_REQUIRE_FIXTURES();
  // Older transformers versions saved CLIPTextModel without the `text_model.` level.
  const TensorMap ckpt = load_safetensors(sd15_ldm());
  TensorMap old;
  const std::string p = kLdmClipPrefix;
  for (const auto& [k, t] : ckpt) {
    if (k.compare(0, p.size() + 11, p + "text_model.") == 0)
      old[p + k.substr(p.size() + 11)] = t;
    else
      old[k] = t;
  }
  const json cfg = load_json_file(sd15() + "/text_encoder/config.json", "text config");
  expect_same_tensors(convert_ldm_clip(old, cfg), load_diffusers_component(sd15(), "text_encoder"), "text (old)",
                      {"text_model.embeddings.position_ids"});
  expect_fields(detect_ldm_clip_config(old, 4), cfg, kTextFields, "text (old)");
}

// sd15.ckpt is torch.save of the same weights as sd15.safetensors: the weights-only unpickler must give
// every component bit for bit, with or without the extension (the zip magic gives it away).
TEST(CheckpointGolden, PickleCheckpointMatchesSafetensors) {
  DMX_REQUIRE_FIXTURES();
  const SingleFileCheckpoint st = load_single_file(sd15_ldm(), sd15());
  const std::string renamed = tmp_path("sd15_renamed_model");
  copy_prefix(sd15() + "/ldm/sd15.ckpt", renamed, 1 << 30);
  for (const std::string& path : {sd15() + "/ldm/sd15.ckpt", renamed}) {
    const SingleFileCheckpoint pk = load_single_file(path, sd15());
    EXPECT_EQ(pk.family, st.family);
    EXPECT_EQ(pk.unet_config, st.unet_config);
    EXPECT_EQ(pk.vae_config, st.vae_config);
    EXPECT_EQ(pk.text_encoder_config, st.text_encoder_config);
    for (const auto& [a, b, what] :
         {std::make_tuple(&pk.unet, &st.unet, "unet"), std::make_tuple(&pk.vae, &st.vae, "vae"),
          std::make_tuple(&pk.text_encoder, &st.text_encoder, "text_encoder")}) {
      ASSERT_EQ(a->size(), b->size()) << what;
      for (const auto& [k, t] : *b) {
        ASSERT_TRUE(a->count(k)) << what << ": " << k;
        EXPECT_EQ(a->at(k).scalar_type(), t.scalar_type()) << k;
        EXPECT_TRUE(a->at(k).equal(t)) << what << ": " << k << " differs";
      }
    }
  }
}

TEST(CheckpointGolden, TruncatedCheckpointIsAFormatError) {
  DMX_REQUIRE_FIXTURES();
  struct stat st;
  ASSERT_EQ(::stat(sd15_ldm().c_str(), &st), 0);
  const std::string half = tmp_path("truncated.safetensors");
  copy_prefix(sd15_ldm(), half, static_cast<size_t>(st.st_size) / 2);
  expect_error<FormatError>([&] { load_single_file(half, sd15()); }, {"outside the data area", half}, "truncated");
  const std::string header_cut = tmp_path("truncated_header.safetensors");
  copy_prefix(sd15_ldm(), header_cut, 100);
  expect_error<FormatError>([&] { load_single_file(header_cut, sd15()); }, {"past the end"}, "header cut");
}

TEST(CheckpointGolden, UnknownKeysAreReportedIgnorableOnesDropped) {
  DMX_REQUIRE_FIXTURES();
  const TensorMap ckpt = load_safetensors(sd15_ldm());
  {
    TensorMap m = ckpt;
    m["model.diffusion_model.input_blocks.1.1.mystery.weight"] = at::zeros({2});
    save_safetensors(tmp_path("extra_unet.safetensors"), m);
    expect_error<FormatError>([&] { load_single_file(tmp_path("extra_unet.safetensors"), sd15()); },
                              {"UNet", "model.diffusion_model.input_blocks.1.1.mystery.weight"}, "extra unet key");
  }
  {
    TensorMap m = ckpt;
    m["first_stage_model.decoder.up.7.block.0.conv1.weight"] = at::zeros({2});
    save_safetensors(tmp_path("extra_vae.safetensors"), m);
    expect_error<FormatError>([&] { load_single_file(tmp_path("extra_vae.safetensors"), sd15()); },
                              {"VAE", "first_stage_model.decoder.up.7.block.0.conv1.weight"}, "extra vae key");
  }
  {
    TensorMap m = ckpt;
    m["cond_stage_model.transformer.text_model.encoder.layers.4.mlp.fc1.weight"] = at::zeros({2});
    save_safetensors(tmp_path("extra_text.safetensors"), m);
    expect_error<FormatError>([&] { load_single_file(tmp_path("extra_text.safetensors"), sd15()); },
                              {"text encoder", "layers.4.mlp.fc1.weight"}, "extra text layer");
  }
  {
    TensorMap m = ckpt;
    m["some_adapter.proj.weight"] = at::zeros({2});
    save_safetensors(tmp_path("extra_top.safetensors"), m);
    expect_error<FormatError>([&] { load_single_file(tmp_path("extra_top.safetensors"), sd15()); },
                              {"some_adapter.proj.weight", "no known component"}, "extra top-level key");
  }
  {
    TensorMap m = ckpt;
    m["model_ema.decay"] = at::ones({});
    m["model_ema.diffusion_modelinput_blocks00weight"] = at::zeros({2});
    m["alphas_cumprod"] = at::ones({1000});
    m["betas"] = at::ones({1000});
    m["cond_stage_model.transformer.text_model.embeddings.position_ids"] = at::arange(77).unsqueeze(0);
    save_safetensors(tmp_path("ignorable.safetensors"), m);
    const SingleFileCheckpoint ck = load_single_file(tmp_path("ignorable.safetensors"), sd15());
    expect_same_tensors(ck.unet, load_diffusers_component(sd15(), "unet"), "unet (ignorable)");
    EXPECT_EQ(ck.text_encoder.count("text_model.embeddings.position_ids"), 0u);
  }
  {
    TensorMap m;
    for (const auto& [k, t] : ckpt)
      if (k.rfind(kLdmUnetPrefix, 0) == 0) m[k] = t;
    save_safetensors(tmp_path("unet_only.safetensors"), m);
    expect_error<FormatError>([&] { load_single_file(tmp_path("unet_only.safetensors"), sd15()); },
                              {"first_stage_model", "cond_stage_model", "not a complete"}, "unet only");
    TensorMap none;
    none["foo"] = at::zeros({1});
    save_safetensors(tmp_path("nothing.safetensors"), none);
    expect_error<FormatError>([&] { load_single_file(tmp_path("nothing.safetensors")); },
                              {"model.diffusion_model", "first_stage_model"}, "no components");
  }
  {
    TensorMap m = ckpt;
    m["control_model.zero_convs.0.0.weight"] = at::zeros({2});
    save_safetensors(tmp_path("with_control.safetensors"), m);
    expect_error<Unsupported>([&] { load_single_file(tmp_path("with_control.safetensors"), sd15()); },
                              {"control_model"}, "control_model");
  }
  // A bad input path is invalid input (exit 2); IoError is for reads and writes that fail.
  expect_error<InvalidArgument>([] { load_single_file(tmp_path("no_such.safetensors")); }, {"not found"},
                                "missing file");
  expect_error<InvalidArgument>([] { load_single_file(dmx::test::temp_dir()); }, {"directory"}, "directory");
  expect_error<InvalidArgument>([] { load_single_file(sd15_ldm(), tmp_path("no_such_config_dir")); }, {"--config"},
                                "missing config dir");
}

TEST(CheckpointGolden, ConfigMismatchIsCaughtByTheTables) {
  DMX_REQUIRE_FIXTURES();
  const TensorMap ckpt = load_safetensors(sd15_ldm());
  json cfg = load_json_file(sd15() + "/unet/config.json", "unet config");
  cfg["layers_per_block"] = 1;
  expect_error<FormatError>([&] { convert_ldm_unet(ckpt, cfg); }, {"match no known layer name"}, "layers_per_block");
  cfg = load_json_file(sd15() + "/unet/config.json", "unet config");
  cfg["down_block_types"][0] = "DownBlock2D";  // but the checkpoint has attention there
  expect_error<FormatError>([&] { convert_ldm_unet(ckpt, cfg); }, {"input_blocks.1.1."}, "block types");
}

// ---------------------------------------------------------------------------------------------
// Diffusers folders and JSON.

TEST(CheckpointUnit, DiffusersComponentLookup) {
  const std::string dir = tmp_path("folder");
  ::mkdir(dir.c_str(), 0755);
  ::mkdir((dir + "/unet").c_str(), 0755);
  // A folder without its weights is a malformed model (FormatError); a missing folder a bad path (InvalidArgument).
  expect_error<FormatError>([&] { load_diffusers_component(dir, "unet"); },
                            {"diffusion_pytorch_model.safetensors", "model.safetensors", dir + "/unet"},
                            "empty folder");
  expect_error<FormatError>([&] { load_diffusers_component(dir, "vae"); }, {"vae", "not found"}, "no component folder");
  expect_error<InvalidArgument>([&] { load_diffusers_component(tmp_path("nowhere"), "unet"); }, {"not found"},
                                "no dir");
  write_text(dir + "/unet/diffusion_pytorch_model.bin", "pickle");
  expect_error<FormatError>([&] { load_diffusers_component(dir, "unet"); },
                            {"diffusion_pytorch_model.bin", "not a torch.save file"}, "only a broken .bin");

  TensorMap a, b;
  a["x"] = at::ones({2});
  b["y"] = at::zeros({3});
  // fp16 variant when it is the only file.
  save_safetensors(dir + "/unet/diffusion_pytorch_model.fp16.safetensors", a);
  EXPECT_EQ(load_diffusers_component(dir, "unet").count("x"), 1u);
  // The plain file wins over the variant.
  save_safetensors(dir + "/unet/diffusion_pytorch_model.safetensors", b);
  EXPECT_EQ(load_diffusers_component(dir, "unet").count("y"), 1u);

  // Sharded weights.
  ::mkdir((dir + "/text_encoder").c_str(), 0755);
  save_safetensors(dir + "/text_encoder/model-00001-of-00002.safetensors", a);
  save_safetensors(dir + "/text_encoder/model-00002-of-00002.safetensors", b);
  write_text(dir + "/text_encoder/model.safetensors.index.json",
             R"({"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                 "y": "model-00002-of-00002.safetensors"}})");
  const TensorMap merged = load_diffusers_component(dir, "text_encoder");
  EXPECT_EQ(merged.size(), 2u);
  write_text(dir + "/text_encoder/model.safetensors.index.json",
             R"({"weight_map": {"x": "model-00002-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}})");
  expect_error<FormatError>([&] { load_diffusers_component(dir, "text_encoder"); }, {"'x'", "not stored there"},
                            "bad index");
}

TEST(CheckpointUnit, JsonFiles) {
  expect_error<InvalidArgument>([] { load_json_file(tmp_path("none.json"), "unet config"); },
                                {"unet config", "not found"}, "missing json");
  write_text(tmp_path("bad.json"), "{\"a\": 1,");
  expect_error<FormatError>([] { load_json_file(tmp_path("bad.json"), "unet config"); },
                            {"unet config", tmp_path("bad.json"), "not valid JSON"}, "bad json");
  write_text(tmp_path("good.json"), "{\"a\": [1, 2]}");
  EXPECT_EQ(load_json_file(tmp_path("good.json"), "x")["a"][1], 2);
}

// ---------------------------------------------------------------------------------------------
// YAML subset.

TEST(CheckpointUnit, LdmYamlSubset) {
  const std::string text = R"(# comment
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion   # trailing comment
  params:
    parameterization: "v"
    linear_end: 0.0120
    first_stage_key: 'jpg # not a comment'
    use_ema: False
    monitor: val/loss_simple_ema
    unet_config:
      params:
        attention_resolutions: [ 4, 2, 1 ]
        nested: [[1, 2], [3]]
        flow_map: {a: 1, b: [x, y]}
        num_heads: -1
        empty:
        transformer_depth: 1
    list_block:
      - 1
      - name: a
        value: 2.5
      -
        - deep
    after: ~
)";
  const json y = parse_ldm_yaml(text, "test.yaml");
  const json& p = y["model"]["params"];
  EXPECT_EQ(y["model"]["base_learning_rate"], 1.0e-4);
  EXPECT_EQ(y["model"]["target"], "ldm.models.diffusion.ddpm.LatentDiffusion");
  EXPECT_EQ(p["parameterization"], "v");
  EXPECT_EQ(p["linear_end"], 0.012);
  EXPECT_EQ(p["first_stage_key"], "jpg # not a comment");
  EXPECT_EQ(p["use_ema"], false);
  EXPECT_EQ(p["monitor"], "val/loss_simple_ema");
  const json& u = p["unet_config"]["params"];
  EXPECT_EQ(u["attention_resolutions"], json({4, 2, 1}));
  EXPECT_EQ(u["nested"], json::parse("[[1,2],[3]]"));
  EXPECT_EQ(u["flow_map"], json::parse(R"({"a":1,"b":["x","y"]})"));
  EXPECT_EQ(u["num_heads"], -1);
  EXPECT_TRUE(u["empty"].is_null());
  EXPECT_EQ(u["transformer_depth"], 1);
  EXPECT_EQ(p["list_block"], json::parse(R"([1, {"name": "a", "value": 2.5}, ["deep"]])"));
  EXPECT_TRUE(p["after"].is_null());

  expect_error<FormatError>([] { parse_ldm_yaml("a:\n  b: 1\n c: 2\n", "bad.yaml"); }, {"bad.yaml", "line 3"},
                            "bad indentation");
  expect_error<FormatError>([] { parse_ldm_yaml("a: [1, 2\n", "bad.yaml"); }, {"line 1", "]"}, "unclosed list");
  expect_error<FormatError>([] { parse_ldm_yaml("just text\n", "bad.yaml"); }, {"key: value"}, "no colon");
  expect_error<FormatError>([] { parse_ldm_yaml("a:\n\tb: 1\n", "bad.yaml"); }, {"tabs"}, "tabs");
}

// ---------------------------------------------------------------------------------------------
// Synthetic SD2 (OpenCLIP) text encoder.

TensorMap fake_open_clip(int64_t width, int64_t layers, int64_t vocab = 100, int64_t ctx = 77) {
  at::manual_seed(7);
  const std::string p = kLdmOpenClipPrefix;
  TensorMap m;
  m[p + "token_embedding.weight"] = at::randn({vocab, width});
  m[p + "positional_embedding"] = at::randn({ctx, width});
  m[p + "ln_final.weight"] = at::randn({width});
  m[p + "ln_final.bias"] = at::randn({width});
  m[p + "text_projection"] = at::randn({width, width});
  m[p + "logit_scale"] = at::ones({});
  for (int64_t i = 0; i < layers; ++i) {
    const std::string l = p + "transformer.resblocks." + std::to_string(i) + ".";
    m[l + "attn.in_proj_weight"] = at::randn({3 * width, width});
    m[l + "attn.in_proj_bias"] = at::randn({3 * width});
    m[l + "attn.out_proj.weight"] = at::randn({width, width});
    m[l + "attn.out_proj.bias"] = at::randn({width});
    m[l + "ln_1.weight"] = at::randn({width});
    m[l + "ln_1.bias"] = at::randn({width});
    m[l + "ln_2.weight"] = at::randn({width});
    m[l + "ln_2.bias"] = at::randn({width});
    m[l + "mlp.c_fc.weight"] = at::randn({4 * width, width});
    m[l + "mlp.c_fc.bias"] = at::randn({4 * width});
    m[l + "mlp.c_proj.weight"] = at::randn({width, 4 * width});
    m[l + "mlp.c_proj.bias"] = at::randn({width});
  }
  return m;
}

TEST(CheckpointUnit, OpenClipTextEncoderSplitAndNames) {
  const int64_t W = 128, N = 3;
  const TensorMap ckpt = fake_open_clip(W, N);
  EXPECT_EQ(ldm_text_encoder_kind(ckpt), LdmTextEncoder::OpenClip);
  const json cfg = detect_ldm_clip_config(ckpt);
  EXPECT_EQ(cfg["hidden_size"], W);
  EXPECT_EQ(cfg["num_attention_heads"], 2);    // 128 / 64
  EXPECT_EQ(cfg["num_hidden_layers"], N - 1);  // penultimate layer, as diffusers' 23-layer SD2 encoder
  EXPECT_EQ(cfg["intermediate_size"], 4 * W);
  EXPECT_EQ(cfg["vocab_size"], 100);
  EXPECT_EQ(cfg["max_position_embeddings"], 77);
  EXPECT_EQ(cfg["hidden_act"], "gelu");

  const TensorMap out = convert_ldm_clip(ckpt, cfg);
  std::set<std::string> want = {"text_model.embeddings.token_embedding.weight",
                                "text_model.embeddings.position_embedding.weight", "text_model.final_layer_norm.weight",
                                "text_model.final_layer_norm.bias"};
  for (int64_t i = 0; i < N - 1; ++i) {
    const std::string l = "text_model.encoder.layers." + std::to_string(i) + ".";
    for (const char* s : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                          "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"}) {
      want.insert(l + s + ".weight");
      want.insert(l + s + ".bias");
    }
  }
  std::set<std::string> got;
  for (const auto& kv : out) got.insert(kv.first);
  EXPECT_EQ(got, want);

  const std::string p = kLdmOpenClipPrefix;
  for (int64_t i = 0; i < N - 1; ++i) {
    const std::string src = p + "transformer.resblocks." + std::to_string(i) + ".";
    const std::string dst = "text_model.encoder.layers." + std::to_string(i) + ".";
    const at::Tensor& w = ckpt.at(src + "attn.in_proj_weight");
    const at::Tensor& b = ckpt.at(src + "attn.in_proj_bias");
    const char* names[3] = {"q_proj", "k_proj", "v_proj"};
    for (int k = 0; k < 3; ++k) {
      const at::Tensor& ow = out.at(dst + "self_attn." + names[k] + ".weight");
      const at::Tensor& ob = out.at(dst + "self_attn." + names[k] + ".bias");
      EXPECT_EQ(ow.sizes().vec(), std::vector<int64_t>({W, W}));
      EXPECT_TRUE(at::equal(ow, w.slice(0, k * W, (k + 1) * W))) << names[k];
      EXPECT_TRUE(at::equal(ob, b.slice(0, k * W, (k + 1) * W))) << names[k];
    }
    EXPECT_TRUE(at::equal(out.at(dst + "layer_norm1.weight"), ckpt.at(src + "ln_1.weight")));
    EXPECT_TRUE(at::equal(out.at(dst + "layer_norm2.bias"), ckpt.at(src + "ln_2.bias")));
    EXPECT_TRUE(at::equal(out.at(dst + "mlp.fc1.weight"), ckpt.at(src + "mlp.c_fc.weight")));
    EXPECT_TRUE(at::equal(out.at(dst + "mlp.fc2.bias"), ckpt.at(src + "mlp.c_proj.bias")));
    EXPECT_TRUE(at::equal(out.at(dst + "self_attn.out_proj.weight"), ckpt.at(src + "attn.out_proj.weight")));
  }
  EXPECT_TRUE(
      at::equal(out.at("text_model.embeddings.position_embedding.weight"), ckpt.at(p + "positional_embedding")));
  EXPECT_TRUE(at::equal(out.at("text_model.final_layer_norm.weight"), ckpt.at(p + "ln_final.weight")));

  // A config keeping every layer converts all of them; other layer counts are rejected.
  json all = cfg;
  all["num_hidden_layers"] = N;
  EXPECT_EQ(convert_ldm_clip(ckpt, all).count("text_model.encoder.layers.2.mlp.fc1.weight"), 1u);
  json fewer = cfg;
  fewer["num_hidden_layers"] = 1;
  expect_error<FormatError>([&] { convert_ldm_clip(ckpt, fewer); }, {"num_hidden_layers"}, "layer count");
  // An unknown key inside the tower is reported.
  TensorMap odd = ckpt;
  odd[p + "transformer.resblocks.0.attn.extra"] = at::zeros({1});
  expect_error<FormatError>([&] { convert_ldm_clip(odd, cfg); }, {"resblocks.0.attn.extra"}, "odd key");
  // Non-standard width without a config.
  expect_error<InvalidArgument>([] { detect_ldm_clip_config(fake_open_clip(96, 2)); },
                                {"non-standard text encoder width", "--config"}, "width 96");
}

// A whole SD2-style file: the tiny UNet with linear projections, the tiny VAE, an OpenCLIP text
// encoder, and an LDM .yaml beside it (num_head_channels, parameterization v).
TEST(CheckpointGolden, Sd2StyleSingleFileWithYaml) {
  DMX_REQUIRE_FIXTURES();
  TensorMap m;
  for (const auto& [k, t] : load_safetensors(sd15_ldm())) {
    if (k.rfind("cond_stage_model.", 0) == 0) continue;
    const bool proj = k.find(".proj_in.weight") != std::string::npos || k.find(".proj_out.weight") != std::string::npos;
    m[k] = proj && t.dim() == 4 ? t.reshape({t.size(0), t.size(1)}) : t;
  }
  for (const auto& kv : fake_open_clip(64, 3, 1000)) m[kv.first] = kv.second;
  const std::string path = tmp_path("sd2fake.safetensors");
  save_safetensors(path, m);
  // No yaml: SD2 family -> head size 64, which does not divide the 32-channel block.
  expect_error<InvalidArgument>([&] { load_single_file(path); }, {"SD2-family", "32 channels", "--config"},
                                "sd2 heads");

  write_text(tmp_path("sd2fake.yaml"), R"(model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      params:
        num_head_channels: 16 # need to fix for flash-attn
        use_linear_in_transformer: True
        channel_mult: [ 1, 2, 2, 2 ]
)");
  const SingleFileCheckpoint ck = load_single_file(path);
  EXPECT_EQ(ck.family, "sd2");
  EXPECT_EQ(ck.unet_config["use_linear_projection"], true);
  EXPECT_EQ(ck.unet_config["attention_head_dim"], json({2, 4, 4, 4}));
  EXPECT_EQ(ck.unet_config["sample_size"], 96);  // a v model is a 768-pixel model for diffusers
  EXPECT_EQ(ck.scheduler_config["prediction_type"], "v_prediction");
  EXPECT_EQ(ck.text_encoder_config["num_hidden_layers"], 2);
  EXPECT_EQ(ck.text_encoder_config["num_attention_heads"], 1);
  EXPECT_EQ(ck.unet.at("down_blocks.0.attentions.0.proj_in.weight").dim(), 2);
  EXPECT_EQ(ck.text_encoder.count("text_model.encoder.layers.2.mlp.fc1.weight"), 0u);
  // Apart from the projections' shape, the UNet is the diffusers one.
  TensorMap unet = load_diffusers_component(sd15(), "unet");
  for (auto& [k, t] : unet)
    if (t.dim() == 4 && (k.find(".proj_in.") != std::string::npos || k.find(".proj_out.") != std::string::npos))
      t = t.reshape({t.size(0), t.size(1)});
  expect_same_tensors(ck.unet, unet, "unet (sd2 style)");
}

}  // namespace
}  // namespace dmx::io
