// LoRA: golden tests against diffusers 0.27.2 + peft 0.10 (ref/<variant>/lora: diffusers, PEFT and kohya
// files at scales 0.5 and 1.0, runtime and merged), LoHa / LoKr / DoRA against their formulas on real layers
// of tiny random models, key tables, unmatched keys, prompt syntax, and dmx::generate with LoRAs (what the CLI
// runs) on a tiny random model.
#include <sys/wait.h>

#include <ATen/CPUGeneratorImpl.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>

#include "core/fs.h"
#include "dmx/dmx.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "loaders/lora_formats.h"
#include "loaders/lora_loader.h"
#include "loaders/model_bundle.h"
#include "nn/lora.h"
#include "pipelines/stable_diffusion.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {

using loaders::LoRAMode;
using loaders::LoRASpec;
using loaders::StableDiffusionModels;

std::shared_ptr<StableDiffusionModels> load_model(const std::string& variant) {
  static std::map<std::string, std::shared_ptr<StableDiffusionModels>> cache;
  auto& m = cache[variant];
  if (!m) m = loaders::load_stable_diffusion(fixture_model(variant));
  return m;
}

std::string lora_file(const std::string& variant, const std::string& format) {
  return fixture_model(variant) + "/lora/lora_" + format + ".safetensors";
}

std::string scale_name(double s) { return s == 0.5 ? "0.5" : "1.0"; }

io::TensorMap snapshot(const StableDiffusionModels& m) {
  io::TensorMap s;
  for (const auto& p : m.unet->named_parameters()) s["unet." + p.key()] = p.value().detach().clone();
  for (const auto& p : m.text_encoder->named_parameters()) s["te." + p.key()] = p.value().detach().clone();
  return s;
}

// Bitwise equality of every parameter with a snapshot; returns the number of differing tensors.
int count_changed(const StableDiffusionModels& m, const io::TensorMap& snap) {
  int n = 0;
  for (const auto& p : m.unet->named_parameters()) n += at::equal(p.value(), snap.at("unet." + p.key())) ? 0 : 1;
  for (const auto& p : m.text_encoder->named_parameters()) n += at::equal(p.value(), snap.at("te." + p.key())) ? 0 : 1;
  return n;
}

struct Outputs {
  at::Tensor te, unet;
};

// Text encoder on the reference ids; UNet on the reference sample with the reference's own text-encoder
// output of that scale (as the fixture defines unet_out).
Outputs run_components(StableDiffusionModels& m, const RefCase& ref, const std::string& scale_key) {
  at::NoGradGuard ng;
  Outputs o;
  o.te = m.text_encoder->forward(ref["input.input_ids"]).last_hidden_state;
  models::UNetInputs in;
  in.sample = ref["input.sample"];
  in.timestep = ref["input.timestep"];
  in.encoder_hidden_states = ref[scale_key + ".text_encoder_out"];
  o.unet = m.unet->forward(in);
  return o;
}

// The same components on fixed inputs of our own (a prompt's ids, a seeded sample and text embedding).
struct ComponentInputs {
  at::Tensor input_ids, sample, timestep, encoder_hidden_states;
};

ComponentInputs component_inputs(const StableDiffusionModels& m) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(5);
  ComponentInputs in;
  in.input_ids =
      at::tensor(m.tokenizer->encode_padded("a photograph of an astronaut riding a horse"), at::kLong).unsqueeze(0);
  in.sample = at::randn({1, 4, 16, 16}, g, at::TensorOptions().dtype(at::kFloat));
  in.timestep = at::tensor({500}, at::kLong);
  in.encoder_hidden_states =
      at::randn({1, 77, m.unet->config().cross_attention_dim}, g, at::TensorOptions().dtype(at::kFloat));
  return in;
}

Outputs run_components(StableDiffusionModels& m, const ComponentInputs& in) {
  at::NoGradGuard ng;
  Outputs o;
  o.te = m.text_encoder->forward(in.input_ids).last_hidden_state;
  models::UNetInputs u;
  u.sample = in.sample;
  u.timestep = in.timestep;
  u.encoder_hidden_states = in.encoder_hidden_states;
  o.unet = m.unet->forward(u);
  return o;
}

pipelines::StableDiffusionOutput run_txt2img(std::shared_ptr<StableDiffusionModels> m, const RefCase& ref,
                                             const std::string& s, std::vector<at::Tensor>* steps) {
  const auto& meta = ref.meta["txt2img_scale" + s];
  pipelines::StableDiffusionPipeline pipe(m);
  pipelines::StableDiffusionParams p;
  p.prompt = meta["prompt"].get<std::string>();
  p.negative_prompt = meta["negative_prompt"].get<std::string>();
  p.num_inference_steps = meta["steps"].get<int>();
  p.guidance_scale = 7.5;
  p.scheduler = "ddim";
  p.show_progress = false;
  p.latents = ref["scale" + s + ".txt2img.input.latents"];
  if (steps) p.on_step_end = [steps](int, double, at::Tensor& lat) { steps->push_back(lat.clone()); };
  return pipe.run(p);
}

void check_txt2img(std::shared_ptr<StableDiffusionModels> m, const RefCase& ref, const std::string& s,
                   const std::string& what) {
  std::vector<at::Tensor> steps;
  auto out = run_txt2img(m, ref, s, &steps);
  double worst = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    const std::string key = "scale" + s + ".txt2img.step." + std::to_string(i) + ".latents";
    worst = std::max(worst, check_close(what + " " + key, steps[i], ref[key], 1e-4));
  }
  EXPECT_LE(worst, 1e-4) << what << " latents";
  DMX_EXPECT_CLOSE(what + " txt2img image", out.images, ref["scale" + s + ".txt2img.image"], 1e-3);
}

// ------------------------------------------------------------------------------------------ golden

class LoRAGolden : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(LoRAGolden, MatchesReferenceInBothModes) {
  DMX_REQUIRE_FIXTURES();
  const auto [variant, format] = GetParam();
  RefCase ref = load_ref(variant, "lora");
  auto m = load_model(variant);
  const io::TensorMap before = snapshot(*m);
  {  // no LoRA: the reference's scale-0 outputs
    Outputs o = run_components(*m, ref, "scale0");
    DMX_EXPECT_CLOSE(variant + " no-lora text_encoder_out", o.te, ref["scale0.text_encoder_out"], 1e-5);
    DMX_EXPECT_CLOSE(variant + " no-lora unet_out", o.unet, ref["scale0.unet_out"], 1e-5);
  }
  const int ntargets = static_cast<int>(ref.meta["lora_info"]["unet_targets"].size() +
                                        ref.meta["lora_info"]["text_encoder_targets"].size());
  for (double s : {0.5, 1.0}) {
    const std::string sk = "scale" + scale_name(s);
    Outputs mode_out[2];
    for (LoRAMode mode : {LoRAMode::Runtime, LoRAMode::Merged}) {
      const bool merged = mode == LoRAMode::Merged;
      const std::string what = variant + "/" + format + " " + sk + (merged ? " merged" : " runtime");
      loaders::LoRAApplyOptions o;
      o.mode = mode;
      auto reps = loaders::apply_loras(*m, {{lora_file(variant, format), s, s}}, o);
      ASSERT_EQ(reps.size(), 1u);
      EXPECT_EQ(reps[0].unet_layers + reps[0].text_encoder_layers, ntargets) << what;
      EXPECT_EQ(reps[0].format, format == "peft" ? "peft" : format) << what;
      EXPECT_EQ(loaders::count_lora_layers(*m), ntargets);
      EXPECT_EQ(count_changed(*m, before) > 0, merged) << what << ": weights patched only when merged";
      Outputs out = run_components(*m, ref, sk);
      DMX_EXPECT_CLOSE(what + " text_encoder_out", out.te, ref[sk + ".text_encoder_out"], 1e-5);
      DMX_EXPECT_CLOSE(what + " unet_out", out.unet, ref[sk + ".unet_out"], 1e-5);
      if (format == "kohya" || (format == "diffusers" && merged)) check_txt2img(m, ref, scale_name(s), what);
      mode_out[merged ? 1 : 0] = out;
      loaders::remove_loras(*m);
      EXPECT_EQ(count_changed(*m, before), 0) << what << ": removal restores every weight bit for bit";
      EXPECT_EQ(loaders::count_lora_layers(*m), 0);
    }
    DMX_EXPECT_CLOSE(variant + "/" + format + " " + sk + " runtime vs merged text_encoder_out", mode_out[0].te,
                     mode_out[1].te, 1e-5);
    DMX_EXPECT_CLOSE(variant + "/" + format + " " + sk + " runtime vs merged unet_out", mode_out[0].unet,
                     mode_out[1].unet, 1e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, LoRAGolden,
                         ::testing::Combine(::testing::Values("sd15", "test"),
                                            ::testing::Values("diffusers", "peft", "kohya")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

// Two files at once, with their own scales: diffusers at 0.3 + kohya at 0.7 = the reference at 1.0.
TEST(LoRAMultiGolden, TwoFilesScalesAdd) {
  DMX_REQUIRE_FIXTURES();
  for (const std::string variant : {"sd15", "test"}) {
    RefCase ref = load_ref(variant, "lora");
    auto m = load_model(variant);
    const io::TensorMap before = snapshot(*m);
    for (LoRAMode mode : {LoRAMode::Runtime, LoRAMode::Merged}) {
      const std::string what =
          variant + " diffusers@0.3+kohya@0.7" + (mode == LoRAMode::Merged ? " merged" : " runtime");
      loaders::LoRAApplyOptions o;
      o.mode = mode;
      loaders::apply_loras(*m, {{lora_file(variant, "diffusers"), 0.3, 0.3}, {lora_file(variant, "kohya"), 0.7, 0.7}},
                           o);
      Outputs out = run_components(*m, ref, "scale1.0");
      DMX_EXPECT_CLOSE(what + " text_encoder_out", out.te, ref["scale1.0.text_encoder_out"], 1e-5);
      DMX_EXPECT_CLOSE(what + " unet_out", out.unet, ref["scale1.0.unet_out"], 1e-5);
      loaders::remove_loras(*m);
      EXPECT_EQ(count_changed(*m, before), 0) << what;
    }
  }
}

// ScopedLoRAs restores exactly the state it found: adapters attached before the scope are still attached after
// it, in their mode (merged weights bit for bit, runtime ones untouched), and compute what they computed before;
// only the scope's own adapters are gone. (It used to detach every adapter of the model.)
TEST(LoRAScopedTiny, AdaptersActiveBeforeTheScopeAreActiveAfterIt) {
  auto m = load_tiny_model("test");
  const ComponentInputs inputs = component_inputs(*m);
  const io::TensorMap loaded = snapshot(*m);
  for (LoRAMode before_mode : {LoRAMode::Runtime, LoRAMode::Merged})
    for (LoRAMode scope_mode : {LoRAMode::Runtime, LoRAMode::Merged}) {
      const std::string what = std::string("before ") + (before_mode == LoRAMode::Merged ? "merged" : "runtime") +
                               ", scope " + (scope_mode == LoRAMode::Merged ? "merged" : "runtime");
      loaders::LoRAApplyOptions before_o;
      before_o.mode = before_mode;
      loaders::apply_loras(*m, {{tiny_lora_file("test", "diffusers"), 0.5, 0.5}}, before_o);
      const int layers = loaders::count_lora_layers(*m);
      ASSERT_GT(layers, 0) << what;
      const io::TensorMap weights = snapshot(*m);
      const Outputs out = run_components(*m, inputs);
      {
        loaders::LoRAApplyOptions o;
        o.mode = scope_mode;
        loaders::ScopedLoRAs scoped(m, {{tiny_lora_file("test", "kohya"), 0.7, 0.7}}, o);
        const Outputs inside = run_components(*m, inputs);
        EXPECT_FALSE(at::equal(inside.unet, out.unet)) << what << ": the scope's LoRA acts inside it";
      }
      EXPECT_EQ(loaders::count_lora_layers(*m), layers) << what;
      EXPECT_EQ(count_changed(*m, weights), 0) << what << ": weights as before the scope";
      const Outputs after = run_components(*m, inputs);
      EXPECT_TRUE(at::equal(after.te, out.te)) << what;
      EXPECT_TRUE(at::equal(after.unet, out.unet)) << what;
      loaders::remove_loras(*m);
      EXPECT_EQ(count_changed(*m, loaded), 0) << what << ": only the earlier adapter was left to remove";
    }
  // A scope whose file fails to load leaves the earlier adapters as they were too.
  loaders::apply_loras(*m, {{tiny_lora_file("test", "diffusers"), 1.0, 1.0}}, {});
  const int layers = loaders::count_lora_layers(*m);
  EXPECT_THROW(
      loaders::ScopedLoRAs(m, {{tiny_lora_file("test", "kohya"), 1, 1}, {"/nonexistent.safetensors", 1, 1}}, {}),
      InvalidArgument);
  EXPECT_EQ(loaders::count_lora_layers(*m), layers);
  loaders::remove_loras(*m);
  EXPECT_EQ(count_changed(*m, loaded), 0);
}

// kohya keys written with the original LDM UNet names (lora_unet_input_blocks_1_1_...) land on the same layers.
TEST(LoRAMultiGolden, KohyaWithLdmNames) {
  DMX_REQUIRE_FIXTURES();
  RefCase ref = load_ref("sd15", "lora");
  auto m = load_model("sd15");
  // sd15 tiny: 4 blocks, layers_per_block 2; down block b attention j = input_blocks.(1 + 3b + j).1,
  // up block u attention j = output_blocks.(3u + j).1, mid attention = middle_block.1.
  std::vector<std::pair<std::string, std::string>> ren;
  for (int b = 0; b < 3; ++b)
    for (int j = 0; j < 2; ++j)
      ren.push_back({"lora_unet_down_blocks_" + std::to_string(b) + "_attentions_" + std::to_string(j) + "_",
                     "lora_unet_input_blocks_" + std::to_string(1 + 3 * b + j) + "_1_"});
  for (int u = 1; u < 4; ++u)
    for (int j = 0; j < 3; ++j)
      ren.push_back({"lora_unet_up_blocks_" + std::to_string(u) + "_attentions_" + std::to_string(j) + "_",
                     "lora_unet_output_blocks_" + std::to_string(3 * u + j) + "_1_"});
  ren.push_back({"lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_"});
  io::TensorMap ldm;
  int renamed = 0;
  for (const auto& [k, v] : io::load_safetensors(lora_file("sd15", "kohya"))) {
    std::string key = k;
    for (const auto& [from, to] : ren)
      if (key.rfind(from, 0) == 0) {
        key = to + key.substr(from.size());
        ++renamed;
        break;
      }
    ldm[key] = v;
  }
  EXPECT_EQ(renamed, 576);
  auto rep = loaders::apply_lora_tensors(*m, ldm, {"ldm-named kohya", 1.0, 1.0}, false);
  EXPECT_EQ(rep.unet_tensors, 576);
  EXPECT_EQ(rep.text_encoder_tensors, 72);
  Outputs out = run_components(*m, ref, "scale1.0");
  loaders::remove_loras(*m);
  DMX_EXPECT_CLOSE("sd15 kohya-ldm scale1.0 runtime unet_out", out.unet, ref["scale1.0.unet_out"], 1e-5);
  DMX_EXPECT_CLOSE("sd15 kohya-ldm scale1.0 runtime text_encoder_out", out.te, ref["scale1.0.text_encoder_out"], 1e-5);
}

// ------------------------------------------------------------------------ LoHa / LoKr / DoRA formulas

at::Tensor param(const torch::nn::Module& m, const std::string& name) {
  for (const auto& p : m.named_parameters())
    if (p.key() == name) return p.value();
  throw std::runtime_error("no parameter " + name);
}

at::Tensor row_norm(const at::Tensor& w) {  // per output row, shaped for broadcasting
  std::vector<int64_t> shape(static_cast<size_t>(w.dim()), 1);
  shape[0] = w.size(0);
  return w.reshape({w.size(0), -1}).norm(2, {1}).reshape(shape);
}

struct Expected {
  std::string component;  // "unet" | "te"
  std::string param;      // weight name
  at::Tensor weight;      // the formula's adapted weight
};

TEST(LoRAFormulasTiny, LoHaLoKrDoRAMergedEqualsFormulaAndRuntimeEqualsMerged) {
  auto m = load_tiny_model("test");
  const io::TensorMap before = snapshot(*m);
  const ComponentInputs inputs = component_inputs(*m);
  const Outputs base = run_components(*m, inputs);
  at::manual_seed(7);
  io::TensorMap t;
  std::vector<Expected> ex;
  const double s = 0.8;  // user scale
  auto W = [&](const std::string& comp, const std::string& name) {
    return param(comp == "unet" ? static_cast<torch::nn::Module&>(*m->unet) : *m->text_encoder, name).detach().clone();
  };
  {  // LoHa on a linear layer: dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r
    const std::string k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q";
    at::Tensor w0 = W("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight");
    const int64_t r = 3, out = w0.size(0), in = w0.size(1);
    at::Tensor w1a = at::randn({out, r}) * 0.1, w1b = at::randn({r, in}) * 0.1, w2a = at::randn({out, r}) * 0.1,
               w2b = at::randn({r, in}) * 0.1;
    t[k + ".hada_w1_a"] = w1a, t[k + ".hada_w1_b"] = w1b, t[k + ".hada_w2_a"] = w2a, t[k + ".hada_w2_b"] = w2b;
    t[k + ".alpha"] = at::scalar_tensor(1.5);
    ex.push_back({"unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                  w0 + s * (1.5 / r) * at::matmul(w1a, w1b) * at::matmul(w2a, w2b)});
  }
  {  // LoHa on a 3x3 convolution
    const std::string k = "lora_unet_down_blocks_1_resnets_0_conv1";
    at::Tensor w0 = W("unet", "down_blocks.1.resnets.0.conv1.weight");
    const int64_t r = 2, out = w0.size(0), in = w0.size(1);
    at::Tensor w1a = at::randn({out, r}) * 0.1, w1b = at::randn({r, in * 9}) * 0.1, w2a = at::randn({out, r}) * 0.1,
               w2b = at::randn({r, in * 9}) * 0.1;
    t[k + ".hada_w1_a"] = w1a, t[k + ".hada_w1_b"] = w1b, t[k + ".hada_w2_a"] = w2a, t[k + ".hada_w2_b"] = w2b;
    t[k + ".alpha"] = at::scalar_tensor(2.0);
    ex.push_back({"unet", "down_blocks.1.resnets.0.conv1.weight",
                  w0 + s * (2.0 / r) * (at::matmul(w1a, w1b) * at::matmul(w2a, w2b)).reshape(w0.sizes())});
  }
  {  // LoKr on a linear layer, w1 full, w2 factorised: dW = kron(w1, w2a @ w2b) * alpha / r
    const std::string k = "lora_te_text_model_encoder_layers_0_mlp_fc1";
    at::Tensor w0 = W("te", "text_model.encoder.layers.0.mlp.fc1.weight");  // [37, 32] in the test variant
    const int64_t out = w0.size(0), in = w0.size(1);
    int64_t a = 1;
    for (int64_t d = 2; d <= 8; ++d)
      if (out % d == 0) a = d;
    const int64_t b = 4, r = 2;
    ASSERT_EQ(in % b, 0);
    at::Tensor w1 = at::randn({a, b}) * 0.3, w2a = at::randn({out / a, r}) * 0.3, w2b = at::randn({r, in / b}) * 0.3;
    t[k + ".lokr_w1"] = w1, t[k + ".lokr_w2_a"] = w2a, t[k + ".lokr_w2_b"] = w2b;
    t[k + ".alpha"] = at::scalar_tensor(1.0);
    ex.push_back(
        {"te", "text_model.encoder.layers.0.mlp.fc1.weight", w0 + s * (1.0 / r) * at::kron(w1, at::matmul(w2a, w2b))});
  }
  {  // LoKr on a 3x3 convolution, both factors full (alpha unused): dW = kron(w1, w2[c, d, 3, 3])
    const std::string k = "lora_unet_up_blocks_0_resnets_1_conv2";
    at::Tensor w0 = W("unet", "up_blocks.0.resnets.1.conv2.weight");
    const int64_t out = w0.size(0), in = w0.size(1);
    at::Tensor w1 = at::randn({4, 2}) * 0.1, w2 = at::randn({out / 4, in / 2, 3, 3}) * 0.1;
    t[k + ".lokr_w1"] = w1, t[k + ".lokr_w2"] = w2;
    t[k + ".alpha"] = at::scalar_tensor(7.0);
    ex.push_back({"unet", "up_blocks.0.resnets.1.conv2.weight", w0 + s * at::kron(w1.unsqueeze(2).unsqueeze(3), w2)});
  }
  {  // kohya/LyCORIS DoRA: W' = W + s * ((W + dW) * m / (||W + dW||_row + eps) - W), dW = alpha/r up @ down
    const std::string k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v";
    at::Tensor w0 = W("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight");
    const int64_t r = 4, out = w0.size(0), in = w0.size(1);
    at::Tensor down = at::randn({r, in}) * 0.2, up = at::randn({out, r}) * 0.2;
    at::Tensor mag = (row_norm(w0) * (1.0 + 0.1 * at::rand({out, 1})));
    t[k + ".lora_down.weight"] = down, t[k + ".lora_up.weight"] = up, t[k + ".alpha"] = at::scalar_tensor(2.0);
    t[k + ".dora_scale"] = mag;
    at::Tensor wc = w0 + 0.5 * at::matmul(up, down);
    at::Tensor merged = wc * (mag / (row_norm(wc) + std::numeric_limits<float>::epsilon()));
    ex.push_back({"unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight", w0 + s * (merged - w0)});
  }
  {  // LoCon on a 3x3 convolution: dW[o, i, h, w] = sum_r up[o, r] down[r, i, h, w] * alpha / r
    const std::string k = "lora_unet_down_blocks_0_resnets_1_conv2";
    at::Tensor w0 = W("unet", "down_blocks.0.resnets.1.conv2.weight");
    const int64_t r = 4, out = w0.size(0), in = w0.size(1);
    at::Tensor down = at::randn({r, in, 3, 3}) * 0.1, up = at::randn({out, r, 1, 1}) * 0.1;
    t[k + ".lora_down.weight"] = down, t[k + ".lora_up.weight"] = up, t[k + ".alpha"] = at::scalar_tensor(4.0);
    ex.push_back(
        {"unet", "down_blocks.0.resnets.1.conv2.weight", w0 + s * at::einsum("or,rihw->oihw", {up.flatten(1), down})});
  }
  auto rep = loaders::apply_lora_tensors(*m, t, {"synthetic", s, s}, false);
  EXPECT_EQ(rep.unet_tensors + rep.text_encoder_tensors, static_cast<int>(t.size()));
  EXPECT_EQ(rep.text_encoder_layers, 1);
  EXPECT_EQ(rep.unet_layers, 5);

  // A PEFT DoRA adapter (lora_magnitude_vector) on a text-encoder layer, in its own file.
  io::TensorMap tp;
  Expected peft_ex;
  {
    const std::string k = "text_encoder.text_model.encoder.layers.1.self_attn.q_proj";
    at::Tensor w0 = W("te", "text_model.encoder.layers.1.self_attn.q_proj.weight");
    const int64_t r = 4, out = w0.size(0), in = w0.size(1);
    at::Tensor A = at::randn({r, in}) * 0.2, B = at::randn({out, r}) * 0.2;
    at::Tensor mag = row_norm(w0).flatten() * (1.0 + 0.1 * at::rand({out}));
    tp[k + ".lora_A.weight"] = A, tp[k + ".lora_B.weight"] = B, tp[k + ".lora_magnitude_vector"] = mag;
    // peft: lora_alpha 8, r 4 from adapter_config.json -> scaling 2, times the user scale
    at::Tensor wc = w0 + s * 2.0 * at::matmul(B, A);
    peft_ex = {"te", "text_model.encoder.layers.1.self_attn.q_proj.weight", (mag.unsqueeze(1) / row_norm(wc)) * wc};
  }
  auto rep2 = loaders::apply_lora_tensors(*m, tp, {"synthetic-peft", s, s}, false, {{"lora_alpha", 8}, {"r", 4}});
  EXPECT_EQ(rep2.format, "peft");
  EXPECT_EQ(rep2.text_encoder_tensors, 3);
  ex.push_back(peft_ex);

  // Runtime outputs, then merged weights against the formulas, then merged outputs against runtime.
  Outputs rt = run_components(*m, inputs);
  loaders::set_lora_mode(*m, LoRAMode::Merged);
  for (const auto& e : ex) {
    at::Tensor got =
        param(e.component == "unet" ? static_cast<torch::nn::Module&>(*m->unet) : *m->text_encoder, e.param);
    DMX_EXPECT_CLOSE("formula " + e.param, got, e.weight, 1e-6);
  }
  Outputs mg = run_components(*m, inputs);
  DMX_EXPECT_CLOSE("LoHa/LoKr/DoRA runtime vs merged unet_out", rt.unet, mg.unet, 1e-5);
  DMX_EXPECT_CLOSE("LoHa/LoKr/DoRA runtime vs merged text_encoder_out", rt.te, mg.te, 1e-5);
  EXPECT_GT(at::abs(mg.unet - base.unet).max().item<double>(), 1e-4) << "the adapters change the UNet";
  loaders::remove_loras(*m);
  EXPECT_EQ(count_changed(*m, before), 0) << "unmerge restores the weights bit for bit";
}

// Tucker forms: LoCon with lora_mid (runtime is the conv chain down -> mid -> up, merged the einsum) and
// LoHa with hada_t1 / hada_t2 (LyCORIS: w = einsum("ijkl,jr,ip->prkl", t, w_b, w_a)).
TEST(LoRAFormulasTiny, TuckerLoConAndLoHa) {
  auto m = load_tiny_model("test");
  const io::TensorMap before = snapshot(*m);
  at::manual_seed(11);
  const double s = 0.6;
  io::TensorMap t;
  const std::string k1 = "lora_unet_up_blocks_1_resnets_0_conv1", p1 = "up_blocks.1.resnets.0.conv1.weight";
  const std::string k2 = "lora_unet_down_blocks_1_resnets_1_conv2", p2 = "down_blocks.1.resnets.1.conv2.weight";
  at::Tensor w01 = param(*m->unet, p1).detach().clone(), w02 = param(*m->unet, p2).detach().clone();
  const int64_t r = 3;
  at::Tensor down = at::randn({r, w01.size(1), 1, 1}) * 0.1, mid = at::randn({r, r, 3, 3}) * 0.1,
             up = at::randn({w01.size(0), r, 1, 1}) * 0.1;
  t[k1 + ".lora_down.weight"] = down, t[k1 + ".lora_mid.weight"] = mid, t[k1 + ".lora_up.weight"] = up;
  t[k1 + ".alpha"] = at::scalar_tensor(1.0);
  at::Tensor e1 = w01 + s * (1.0 / r) * at::einsum("or,rqhw,qi->oihw", {up.flatten(1), mid, down.flatten(1)});
  at::Tensor t1 = at::randn({r, r, 3, 3}) * 0.3, t2 = at::randn({r, r, 3, 3}) * 0.3;
  at::Tensor a1 = at::randn({r, w02.size(0)}) * 0.3, b1 = at::randn({r, w02.size(1)}) * 0.3;
  at::Tensor a2 = at::randn({r, w02.size(0)}) * 0.3, b2 = at::randn({r, w02.size(1)}) * 0.3;
  t[k2 + ".hada_w1_a"] = a1, t[k2 + ".hada_w1_b"] = b1, t[k2 + ".hada_t1"] = t1;
  t[k2 + ".hada_w2_a"] = a2, t[k2 + ".hada_w2_b"] = b2, t[k2 + ".hada_t2"] = t2;
  t[k2 + ".alpha"] = at::scalar_tensor(2.0);
  at::Tensor e2 =
      w02 + s * (2.0 / r) * at::einsum("ijkl,jr,ip->prkl", {t1, b1, a1}) * at::einsum("ijkl,jr,ip->prkl", {t2, b2, a2});
  auto rep = loaders::apply_lora_tensors(*m, t, {"tucker", s, s}, false);
  EXPECT_EQ(rep.unet_tensors, static_cast<int>(t.size()));
  const ComponentInputs inputs = component_inputs(*m);
  Outputs rt = run_components(*m, inputs);
  loaders::set_lora_mode(*m, LoRAMode::Merged);
  DMX_EXPECT_CLOSE("formula LoCon Tucker " + p1, param(*m->unet, p1), e1, 1e-6);
  DMX_EXPECT_CLOSE("formula LoHa Tucker " + p2, param(*m->unet, p2), e2, 1e-6);
  Outputs mg = run_components(*m, inputs);
  DMX_EXPECT_CLOSE("Tucker runtime vs merged unet_out", rt.unet, mg.unet, 1e-5);
  loaders::remove_loras(*m);
  EXPECT_EQ(count_changed(*m, before), 0);
}

// A raw PEFT adapter (base_model.model.* keys) with adapter_config.json beside it: scaling = lora_alpha / r.
// The fixture's B halved with lora_alpha 8, r 4 (scaling 2) is the reference at 1.0.
TEST(LoRAMultiGolden, PeftAdapterConfigAlpha) {
  DMX_REQUIRE_FIXTURES();
  RefCase ref = load_ref("sd15", "lora");
  auto m = load_model("sd15");
  const std::string dir = temp_dir() + "/peft_adapter";
  ASSERT_EQ(std::system(("mkdir -p '" + dir + "'").c_str()), 0);
  io::TensorMap raw;
  for (const auto& [k, v] : io::load_safetensors(lora_file("sd15", "peft"))) {
    std::string key = k;
    for (const std::string pre : {"unet.", "text_encoder."})
      if (key.rfind(pre, 0) == 0) key = "base_model.model." + key.substr(pre.size());
    raw[key] = k.find(".lora_B.") != std::string::npos ? v * 0.5 : v;  // B / 2: alpha/r = 2 restores it
  }
  io::save_safetensors(dir + "/adapter_model.safetensors", raw);
  {
    FILE* f = std::fopen((dir + "/adapter_config.json").c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs("{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8}", f);
    std::fclose(f);
  }
  loaders::LoRAApplyOptions o;
  auto reps = loaders::apply_loras(*m, {{dir + "/adapter_model.safetensors", 1.0, 1.0}}, o);
  EXPECT_EQ(reps[0].format, "peft");
  EXPECT_EQ(reps[0].unet_tensors, 384);
  EXPECT_EQ(reps[0].text_encoder_tensors, 48);
  Outputs out = run_components(*m, ref, "scale1.0");
  loaders::remove_loras(*m);
  DMX_EXPECT_CLOSE("sd15 raw peft + adapter_config merged text_encoder_out", out.te, ref["scale1.0.text_encoder_out"],
                   1e-5);
  DMX_EXPECT_CLOSE("sd15 raw peft + adapter_config merged unet_out", out.unet, ref["scale1.0.unet_out"], 1e-5);
}

// ------------------------------------------------------------------------------------ errors and names

TEST(LoRAErrorsTiny, UnmatchedKeysNameTheFirstFewOrWarnWhenAllowed) {
  auto m = load_tiny_model("test");
  const io::TensorMap before = snapshot(*m);
  io::TensorMap t = io::load_safetensors(tiny_lora_file("test", "kohya"));
  t["lora_unet_no_such_layer.lora_down.weight"] = at::zeros({4, 4});
  t["something.else"] = at::zeros({1});
  try {
    loaders::apply_lora_tensors(*m, t, {"bad.safetensors", 1.0, 1.0}, false);
    ADD_FAILURE() << "expected FormatError";
  } catch (const FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("2 of"), std::string::npos) << msg;
    EXPECT_NE(msg.find("lora_unet_no_such_layer.lora_down.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("something.else"), std::string::npos) << msg;
    EXPECT_NE(msg.find("--lora-allow-unmatched"), std::string::npos) << msg;
  }
  EXPECT_EQ(loaders::count_lora_layers(*m), 0) << "nothing attached after an error";
  auto rep = loaders::apply_lora_tensors(*m, t, {"bad.safetensors", 1.0, 1.0}, true);
  EXPECT_EQ(rep.unmatched.size(), 2u);
  EXPECT_EQ(rep.unet_tensors + rep.text_encoder_tensors, static_cast<int>(t.size()) - 2);
  EXPECT_NE(rep.summary().find("2 unmatched"), std::string::npos) << rep.summary();
  loaders::remove_loras(*m);
  EXPECT_EQ(count_changed(*m, before), 0);
}

TEST(LoRAErrorsTiny, IncompleteAndMisShapedAdaptersAreFormatErrors) {
  auto m = load_tiny_model("test");
  const std::string k = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
  EXPECT_THROW(loaders::apply_lora_tensors(*m, {{k + ".lora_down.weight", at::zeros({4, 32})}}, {"x", 1, 1}, false),
               FormatError);
  try {
    loaders::apply_lora_tensors(
        *m, {{k + ".lora_down.weight", at::zeros({4, 31})}, {k + ".lora_up.weight", at::zeros({32, 4})}}, {"x", 1, 1},
        false);
    ADD_FAILURE() << "expected FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("lora_down.weight' has shape"), std::string::npos) << e.what();
  }
  EXPECT_THROW(
      loaders::apply_lora_tensors(*m, {{"lora_te1_text_model_x.lora_down.weight", at::zeros({1})}}, {"x", 1, 1}, false),
      Unsupported);
  EXPECT_EQ(loaders::count_lora_layers(*m), 0);
}

TEST(LoRANamesUnit, TableParsesEveryLayout) {
  using loaders::LoRARole;
  auto k = loaders::parse_lora_key("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight");
  ASSERT_TRUE(k);
  EXPECT_TRUE(k->flat);
  EXPECT_EQ(k->module, "down_blocks_0_attentions_0_proj_in");
  EXPECT_EQ(k->role, LoRARole::Down);
  EXPECT_EQ(k->format, loaders::LoRAKeyFormat::Kohya);
  k = loaders::parse_lora_key("unet.mid_block.attentions.0.proj_in.lora.up.weight");
  ASSERT_TRUE(k);
  EXPECT_EQ(k->module, "mid_block.attentions.0.proj_in");
  EXPECT_EQ(k->role, LoRARole::Up);
  EXPECT_EQ(k->format, loaders::LoRAKeyFormat::Diffusers);
  k = loaders::parse_lora_key("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight");
  ASSERT_TRUE(k);
  EXPECT_EQ(k->component, loaders::LoRAComponent::TextEncoder);
  EXPECT_EQ(k->module, "text_model.encoder.layers.0.mlp.fc1");
  k = loaders::parse_lora_key("base_model.model.text_model.encoder.layers.1.self_attn.k_proj.lora_B.weight");
  ASSERT_TRUE(k);
  EXPECT_EQ(k->component, loaders::LoRAComponent::TextEncoder);
  EXPECT_EQ(k->format, loaders::LoRAKeyFormat::PEFT);
  k = loaders::parse_lora_key(
      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight");
  ASSERT_TRUE(k);
  EXPECT_EQ(k->module, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0");
  k = loaders::parse_lora_key("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight");
  ASSERT_TRUE(k);
  EXPECT_EQ(k->module, "text_model.encoder.layers.0.self_attn.k_proj");
  k = loaders::parse_lora_key("lora_unet_x.lokr_w1_a");
  ASSERT_TRUE(k);
  EXPECT_EQ(k->role, LoRARole::LokrW1A);
  k = loaders::parse_lora_key("lora_unet_x.hada_t2");
  ASSERT_TRUE(k);
  EXPECT_EQ(k->role, LoRARole::HadaT2);
  EXPECT_FALSE(loaders::parse_lora_key("model.diffusion_model.input_blocks.0.0.weight"));
  EXPECT_THROW(loaders::parse_lora_key("lora_unet_x.diff_b"), Unsupported);
  EXPECT_EQ(loaders::unflatten_ldm_unet_name("input_blocks_4_1_transformer_blocks_0_attn2_to_out_0"),
            "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0");
  EXPECT_EQ(loaders::unflatten_ldm_unet_name("output_blocks_2_0_skip_connection"), "output_blocks.2.0.skip_connection");
  EXPECT_EQ(loaders::unflatten_ldm_unet_name("down_blocks_0_resnets_0_conv1"), "");
}

// One row per layout: every supported row's keys are recognised, every refused row's keys are an Unsupported
// error naming the key.
TEST(LoRANamesUnit, EveryRowOfTheLayoutTableIsRecognised) {
  const std::map<std::string, std::string> sample = {
      {"diffusers LoRA", "unet.mid_block.attentions.0.proj_in.lora.down.weight"},
      {"PEFT LoRA", "base_model.model.mid_block.attentions.0.proj_in.lora_A.weight"},
      {"kohya/A1111 LoRA and LoCon", "lora_unet_mid_block_attentions_0_proj_in.lora_mid.weight"},
      {"LyCORIS LoHa", "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"},
      {"LyCORIS LoKr", "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2"},
      {"LyCORIS full", "lora_unet_mid_block_attentions_0_proj_in.diff"},
      {"DoRA (PEFT)", "base_model.model.mid_block.attentions.0.proj_in.lora_magnitude_vector"},
      {"DoRA (LyCORIS / kohya)", "lora_unet_mid_block_attentions_0_proj_in.dora_scale"},
      {"SDXL text encoders", "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"},
      {"bias, norm, OFT and embedding adapters", "lora_unet_mid_block_attentions_0_proj_in.oft_blocks"},
  };
  const auto rows = loaders::lora_layouts();
  EXPECT_EQ(rows.size(), sample.size());
  for (const auto& row : rows) {
    SCOPED_TRACE(row.name);
    ASSERT_TRUE(sample.count(row.name)) << "a new row needs a sample key here";
    EXPECT_FALSE(row.reference.empty());
    const std::string& key = sample.at(row.name);
    if (row.supported) {
      EXPECT_TRUE(loaders::parse_lora_key(key).has_value()) << key;
    } else {
      try {
        loaders::parse_lora_key(key);
        ADD_FAILURE() << key << ": expected Unsupported";
      } catch (const Unsupported& e) {
        EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
      }
    }
  }
}

TEST(LoRAPromptUnit, A1111TagsAreParsedAndStripped) {
  std::vector<LoRASpec> v;
  EXPECT_EQ(loaders::extract_prompt_loras("a <lora:foo:0.7> cat <lora:bar>, <hypernet:x:1> <lyco:baz:0.5:0.25>", v),
            "a  cat , <hypernet:x:1> ");
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v[0].path, "foo");
  EXPECT_DOUBLE_EQ(v[0].unet_scale, 0.7);
  EXPECT_DOUBLE_EQ(v[0].text_encoder_scale, 0.7);
  EXPECT_EQ(v[1].path, "bar");
  EXPECT_DOUBLE_EQ(v[1].unet_scale, 1.0);
  EXPECT_DOUBLE_EQ(v[2].text_encoder_scale, 0.5);
  EXPECT_DOUBLE_EQ(v[2].unet_scale, 0.25);
  v.clear();
  loaders::extract_prompt_loras("<lora:n:unet=0.2:te=0.4>", v);
  ASSERT_EQ(v.size(), 1u);
  EXPECT_DOUBLE_EQ(v[0].unet_scale, 0.2);
  EXPECT_DOUBLE_EQ(v[0].text_encoder_scale, 0.4);
  EXPECT_THROW(loaders::extract_prompt_loras("x <lora:foo:abc>", v), InvalidArgument);
  EXPECT_THROW(loaders::extract_prompt_loras("x <lora:>", v), InvalidArgument);
  try {
    loaders::resolve_lora_name(temp_dir(), "missing_one");
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("missing_one"), std::string::npos) << e.what();
  }
  EXPECT_THROW(loaders::resolve_lora_name("", "x"), InvalidArgument);

  auto s = loaders::parse_lora_arg("dir/file.safetensors:0.7");
  EXPECT_EQ(s.path, "dir/file.safetensors");
  EXPECT_DOUBLE_EQ(s.unet_scale, 0.7);
  s = loaders::parse_lora_arg("dir/file.safetensors");
  EXPECT_EQ(s.path, "dir/file.safetensors");
  EXPECT_DOUBLE_EQ(s.unet_scale, 1.0);
  s = loaders::parse_lora_arg("C:/x.safetensors");
  EXPECT_EQ(s.path, "C:/x.safetensors");
  s = loaders::parse_lora_arg("a:b/x.safetensors:-1.5");
  EXPECT_EQ(s.path, "a:b/x.safetensors");
  EXPECT_DOUBLE_EQ(s.text_encoder_scale, -1.5);
  EXPECT_THROW(loaders::parse_lora_arg(":0.5"), InvalidArgument);
  EXPECT_EQ(loaders::parse_lora_mode("runtime"), LoRAMode::Runtime);
  EXPECT_THROW(loaders::parse_lora_mode("fused"), InvalidArgument);
}

// ------------------------------------------------------------------ dmx::generate with LoRAs (what the CLI runs)

// A kohya file at 0.7 through GenerateOptions::loras and through the prompt syntax, checked independently: the
// same run on a model whose weights the test patched itself, W + 0.7 * B @ A from the diffusers file of the same
// adapter.
TEST(LoRAGenerateTiny, KohyaAtScale07MatchesIndependentManualMerge) {
  const std::string variant = "sd15";
  const std::string dir = temp_dir() + "/lora-generate";
  ASSERT_EQ(std::system(("mkdir -p '" + dir + "'").c_str()), 0);
  const at::Tensor noise = at::randn({1, 4, 16, 16}, at::make_generator<at::CPUGeneratorImpl>(21));
  io::save_safetensors(dir + "/noise.safetensors", {{"latents", noise}});
  const std::string prompt = "a photograph of an astronaut riding a horse", neg = "blurry";
  const std::string kohya = tiny_lora_file(variant, "kohya");
  GenerateOptions common;
  common.model = tiny_model_dir(variant);
  common.negative_prompt = neg;
  common.steps = 8;
  common.scheduler = "ddim";
  common.guidance_scale = 7.5;
  common.seed = 1;
  common.init_latents = dir + "/noise.safetensors";
  GenerateOptions a = common;
  a.prompt = prompt;
  a.loras = {kohya + ":0.7"};
  a.output = dir + "/a.png";
  a.save_latents = dir + "/a.safetensors";
  a.lora_mode = "runtime";
  const std::string log = capture_stderr([&] { generate(a); });
  int unet_tensors = 0, te_tensors = 0;
  for (const auto& [k, v] : io::load_safetensors(kohya)) {
    unet_tensors += k.rfind("lora_unet_", 0) == 0;
    te_tensors += k.rfind("lora_te_", 0) == 0;
  }
  ASSERT_GT(unet_tensors, 0);
  ASSERT_GT(te_tensors, 0);
  EXPECT_NE(log.find("lora: applied " + std::to_string(unet_tensors) + " tensors to UNet, " +
                     std::to_string(te_tensors) + " to text encoder"),
            std::string::npos)
      << log;

  // The same through the prompt syntax and lora_dir, merged mode.
  GenerateOptions b = common;
  b.prompt = prompt + " <lora:lora_kohya:0.7>";
  b.lora_dir = kohya.substr(0, kohya.rfind('/'));
  b.output = dir + "/b.png";
  b.save_latents = dir + "/b.safetensors";
  b.progress = false;
  generate(b);

  // Independent: a fresh model patched by hand from the diffusers file.
  pipelines::StableDiffusionParams p;
  p.prompt = prompt;
  p.negative_prompt = neg;
  p.num_inference_steps = 8;
  p.guidance_scale = 7.5;
  p.scheduler = "ddim";
  p.show_progress = false;
  p.latents = noise;
  auto fresh = load_tiny_model(variant);
  const at::Tensor unpatched = pipelines::StableDiffusionPipeline(fresh).run(p).latents;
  {
    at::NoGradGuard ng;
    const io::TensorMap d = io::load_safetensors(tiny_lora_file(variant, "diffusers"));
    int patched = 0;
    for (const auto& [key, down] : d) {
      for (const auto& [prefix, mid, comp] : std::vector<std::tuple<std::string, std::string, int>>{
               {"unet.", ".lora.down.weight", 0}, {"text_encoder.", ".lora_linear_layer.down.weight", 1}}) {
        if (key.rfind(prefix, 0) != 0 || key.size() < mid.size() ||
            key.compare(key.size() - mid.size(), mid.size(), mid) != 0)
          continue;
        const std::string path = key.substr(prefix.size(), key.size() - prefix.size() - mid.size());
        const std::string up_key =
            key.substr(0, key.size() - mid.size()) + (comp == 0 ? ".lora.up.weight" : ".lora_linear_layer.up.weight");
        at::Tensor w =
            param(comp == 0 ? static_cast<torch::nn::Module&>(*fresh->unet) : *fresh->text_encoder, path + ".weight");
        const at::Tensor up = d.at(up_key);
        w.add_((0.7 * at::matmul(up.reshape({up.size(0), -1}), down.reshape({down.size(0), -1}))).reshape(w.sizes()));
        ++patched;
      }
    }
    EXPECT_EQ(2 * static_cast<size_t>(patched), d.size()) << "every pair of the file patched";
    EXPECT_EQ(3 * patched, unet_tensors + te_tensors) << "the kohya file holds the same layers";
  }
  auto expected = pipelines::StableDiffusionPipeline(fresh).run(p);
  const at::Tensor la = io::load_safetensors(dir + "/a.safetensors").at("latents");
  const at::Tensor lb = io::load_safetensors(dir + "/b.safetensors").at("latents");
  DMX_EXPECT_CLOSE("kohya@0.7 runtime latents vs manual merge", la, expected.latents, 1e-4);
  DMX_EXPECT_CLOSE("<lora:lora_kohya:0.7> merged latents vs manual merge", lb, expected.latents, 1e-4);
  // And the LoRA changes the result (the comparison is not between two unpatched runs).
  EXPECT_GT(at::abs(la - unpatched).max().item<double>(), 1e-4);
}

TEST(LoRAGenerateTiny, BadLoRAInputsNameTheFileOrKeyAndWriteNothing) {
  const std::string dir = temp_dir() + "/lora-bad";
  ASSERT_EQ(std::system(("mkdir -p '" + dir + "'").c_str()), 0);
  io::TensorMap t = io::load_safetensors(tiny_lora_file("test", "kohya"));
  t["lora_unet_not_a_layer.lora_up.weight"] = at::zeros({4, 4});
  io::save_safetensors(dir + "/extra.safetensors", t);
  GenerateOptions base;
  base.model = tiny_model_dir("test");
  base.steps = 1;
  base.output = dir + "/o.png";
  base.progress = false;
  base.prompt = "x";
  auto run = [&](const std::function<void(GenerateOptions&)>& edit, const std::string& needle, bool format_error) {
    GenerateOptions o = base;
    edit(o);
    try {
      generate(o);
      ADD_FAILURE() << "expected an error mentioning '" << needle << "'";
    } catch (const FormatError& e) {
      EXPECT_TRUE(format_error) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    } catch (const InvalidArgument& e) {
      EXPECT_FALSE(format_error) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_FALSE(path_exists(dir + "/o.png"));
  };
  run([&](GenerateOptions& o) { o.loras = {dir + "/extra.safetensors"}; }, "lora_unet_not_a_layer.lora_up.weight",
      true);
  run([&](GenerateOptions& o) { o.loras = {dir + "/nope.safetensors:0.5"}; }, "nope.safetensors", false);
  run([&](GenerateOptions& o) { o.prompt = "x <lora:ghost:1>", o.lora_dir = dir; }, "ghost", false);
  run([&](GenerateOptions& o) { o.lora_mode = "fused"; }, "--lora-mode", false);
  GenerateOptions a = base;
  a.loras = {dir + "/extra.safetensors"};
  a.lora_allow_unmatched = true;
  a.progress = true;
  const std::string log = capture_stderr([&] { generate(a); });
  EXPECT_TRUE(path_exists(dir + "/o.png"));
  EXPECT_NE(log.find("1 key(s) match no layer"), std::string::npos) << log;
}

}  // namespace
}  // namespace dmx::test
