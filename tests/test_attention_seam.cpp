// The attention seam (nn/attention_seam.h): sites known from the module paths, per-call context, controllers,
// processors and key/value input hooks installed by RAII guards that restore the model, the fast path untouched
// when nothing is installed, and autograd through the seam.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <stdexcept>

#include "dmx/error.h"
#include "models/unet_2d_condition.h"
#include "nn/attention_seam.h"
#include "nn/layers.h"
#include "test_util.h"

namespace dmx::test {
namespace {

models::UNet2DConditionConfig tiny_config() {
  models::UNet2DConditionConfig c;
  c.sample_size = 8;
  c.block_out_channels = {32, 64};
  c.down_block_types = {"CrossAttnDownBlock2D", "DownBlock2D"};
  c.up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D"};
  c.layers_per_block = 1;
  c.cross_attention_dim = 16;
  c.attention_head_dim = {2, 4};
  c.norm_num_groups = 32;
  return c;
}

models::UNet2DConditionModel tiny_unet() {
  at::manual_seed(0);
  models::UNet2DConditionModel unet(tiny_config());
  unet->eval();
  return unet;
}

models::UNetInputs tiny_inputs() {
  at::manual_seed(1);
  models::UNetInputs in;
  in.sample = at::randn({2, 4, 8, 8});
  in.timestep = at::scalar_tensor(500.0);
  in.encoder_hidden_states = at::randn({2, 7, 16});
  return in;
}

nn::AttentionContext two_rows(int step) {
  nn::AttentionContext ctx;
  ctx.step = step;
  ctx.num_steps = 10;
  ctx.timestep = 500;
  ctx.rows = {{false, 0}, {true, 0}};
  return ctx;
}

struct Seen {
  std::string path;
  int step;
  size_t rows;
  std::vector<int64_t> shape;
};

class RecordingController : public nn::AttentionController {
 public:
  explicit RecordingController(bool cross_only = false) : cross_only_(cross_only) {}
  bool wants(const nn::AttentionSite& s) const override { return !cross_only_ || s.is_cross; }
  at::Tensor on_probs(const nn::AttentionSite& s, const nn::AttentionContext& ctx, const at::Tensor& probs) override {
    seen.push_back({s.path, ctx.step, ctx.rows.size(), probs.sizes().vec()});
    max_row_sum_err = std::max(max_row_sum_err, (probs.sum(-1) - 1).abs().max().item<double>());
    return probs;
  }
  std::vector<Seen> seen;
  double max_row_sum_err = 0;

 private:
  bool cross_only_;
};

class UniformCross : public nn::AttentionController {
 public:
  bool wants(const nn::AttentionSite& s) const override { return s.is_cross; }
  at::Tensor on_probs(const nn::AttentionSite&, const nn::AttentionContext&, const at::Tensor& probs) override {
    return at::full_like(probs, 1.0 / static_cast<double>(probs.size(-1)));
  }
};

class ZeroProcessor : public nn::AttentionProcessor {
 public:
  at::Tensor forward(const nn::AttentionSite&, const nn::AttentionContext&, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, double, bool) override {
    ++calls;
    return at::zeros({q.size(0), q.size(1), q.size(2), v.size(3)}, v.options());
  }
  int calls = 0;
};

class ExplicitProcessor : public nn::AttentionProcessor {
 public:
  at::Tensor forward(const nn::AttentionSite& s, const nn::AttentionContext&, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, double scale, bool upcast) override {
    return nn::attention_with_probs(s, nullptr, q, k, v, scale, upcast);
  }
};

TEST(AttentionSeamTiny, SitesComeFromModulePaths) {
  auto unet = tiny_unet();
  const auto sites = nn::attention_sites(*unet);
  // down_blocks.0 (1 transformer) + mid (1) + up_blocks.1 (2 layers: layers_per_block + 1): 4 transformers x 2.
  ASSERT_EQ(sites.size(), 8u);
  EXPECT_EQ(sites[0].path, "down_blocks.0.attentions.0.transformer_blocks.0.attn1");
  EXPECT_EQ(sites[0].place, nn::AttentionPlace::Down);
  EXPECT_EQ(sites[0].block, 0);
  EXPECT_EQ(sites[0].layer, 0);
  EXPECT_EQ(sites[0].transformer_block, 0);
  EXPECT_FALSE(sites[0].is_cross);
  EXPECT_EQ(sites[0].heads, 2);
  EXPECT_EQ(sites[1].path, "down_blocks.0.attentions.0.transformer_blocks.0.attn2");
  EXPECT_TRUE(sites[1].is_cross);
  EXPECT_EQ(sites[2].path, "mid_block.attentions.0.transformer_blocks.0.attn1");
  EXPECT_EQ(sites[2].place, nn::AttentionPlace::Mid);
  EXPECT_EQ(sites[2].heads, 4);
  EXPECT_EQ(sites[7].path, "up_blocks.1.attentions.1.transformer_blocks.0.attn2");
  EXPECT_EQ(sites[7].place, nn::AttentionPlace::Up);
  EXPECT_EQ(sites[7].block, 1);
  EXPECT_EQ(sites[7].layer, 1);
  EXPECT_TRUE(sites[7].is_cross);
  for (size_t i = 0; i < sites.size(); ++i) EXPECT_EQ(sites[i].index, static_cast<int>(i));
  EXPECT_STREQ(nn::place_name(sites[7].place), "up");
  // Idempotent: a second walk keeps the same seam and sites.
  auto seam = nn::assign_attention_sites(*unet);
  EXPECT_EQ(seam, nn::assign_attention_sites(*unet));
}

TEST(AttentionSeamTiny, ObservingControllerKeepsTheOutputAndSeesEveryCallOnce) {
  auto unet = tiny_unet();
  const auto in = tiny_inputs();
  at::NoGradGuard no_grad;
  const at::Tensor plain = unet->forward(in);
  auto rec = std::make_shared<RecordingController>();
  at::Tensor observed;
  {
    nn::ScopedAttentionController guard(*unet, rec);
    nn::ScopedAttentionContext ctx(*unet, two_rows(3));
    observed = unet->forward(in);
  }
  check_close("seam observed vs fast path", observed, plain, 1e-5);
  EXPECT_LE((observed - plain).abs().max().item<double>() / plain.abs().max().item<double>(), 1e-5);
  ASSERT_EQ(rec->seen.size(), 8u);  // one call per site per forward, no counting needed
  EXPECT_EQ(rec->seen[1].path, "down_blocks.0.attentions.0.transformer_blocks.0.attn2");
  EXPECT_EQ(rec->seen[1].step, 3);
  EXPECT_EQ(rec->seen[1].rows, 2u);
  EXPECT_EQ(rec->seen[1].shape, (std::vector<int64_t>{2, 2, 64, 7}));  // [B, heads, Nq, Nk]
  EXPECT_LT(rec->max_row_sum_err, 1e-5);
  // The guards restored the seam: nothing installed, no context.
  auto seam = nn::assign_attention_sites(*unet);
  EXPECT_FALSE(seam->active());
  EXPECT_EQ(seam->context.step, -1);
  EXPECT_TRUE(unet->forward(in).equal(plain));
}

TEST(AttentionSeamTiny, EditingControllerAndProcessorChangeTheOutputOnlyWhileInstalled) {
  auto unet = tiny_unet();
  const auto in = tiny_inputs();
  at::NoGradGuard no_grad;
  const at::Tensor plain = unet->forward(in);
  {
    nn::ScopedAttentionController guard(*unet, std::make_shared<UniformCross>());
    EXPECT_GT((unet->forward(in) - plain).abs().max().item<double>(), 1e-4);
  }
  EXPECT_TRUE(unet->forward(in).equal(plain));
  auto zero = std::make_shared<ZeroProcessor>();
  {
    nn::ScopedAttentionProcessor guard(*unet, zero);
    EXPECT_GT((unet->forward(in) - plain).abs().max().item<double>(), 1e-4);
    {
      // Nested: the inner processor wins, then the outer one comes back.
      nn::ScopedAttentionProcessor inner(*unet, std::make_shared<ExplicitProcessor>());
      check_close("explicit processor vs fast path", unet->forward(in), plain, 1e-5);
    }
    const int before = zero->calls;
    unet->forward(in);
    EXPECT_EQ(zero->calls - before, 8);
  }
  EXPECT_TRUE(unet->forward(in).equal(plain));
}

TEST(AttentionSeamTiny, GuardsRestoreOnExceptionsAndNestInAnyOrder) {
  auto unet = tiny_unet();
  auto seam = nn::assign_attention_sites(*unet);
  auto a = std::make_shared<RecordingController>();
  auto b = std::make_shared<RecordingController>(true);
  try {
    nn::ScopedAttentionController ga(*unet, a);
    nn::ScopedAttentionContext ctx(*unet, two_rows(1));
    nn::ScopedAttentionProcessor gp(*unet, std::make_shared<ZeroProcessor>());
    EXPECT_EQ(seam->controllers.size(), 1u);
    EXPECT_EQ(seam->context.step, 1);
    throw std::runtime_error("boom");
  } catch (const std::runtime_error&) {
  }
  EXPECT_FALSE(seam->active());
  EXPECT_EQ(seam->context.step, -1);
  // Two controllers run in installation order; removing the first keeps the second.
  auto ga = std::make_unique<nn::ScopedAttentionController>(*unet, a);
  {
    nn::ScopedAttentionController gb(*unet, b);
    ASSERT_EQ(seam->controllers.size(), 2u);
    EXPECT_EQ(seam->controllers[0], a);
    EXPECT_EQ(seam->controllers[1], b);
    at::NoGradGuard no_grad;
    unet->forward(tiny_inputs());
    EXPECT_EQ(a->seen.size(), 8u);
    EXPECT_EQ(b->seen.size(), 4u);  // cross sites only
  }
  EXPECT_EQ(seam->controllers.size(), 1u);
  ga.reset();
  EXPECT_FALSE(seam->active());
}

TEST(AttentionSeamTiny, AutogradFlowsThroughTheSeam) {
  auto unet = tiny_unet();
  for (auto& p : unet->parameters()) p.set_requires_grad(false);
  auto in = tiny_inputs();
  in.encoder_hidden_states = in.encoder_hidden_states.clone().set_requires_grad(true);
  // Without anything installed (the differentiable fallback) and with an observing controller.
  for (int with_controller = 0; with_controller < 2; ++with_controller) {
    auto rec = std::make_shared<RecordingController>();
    std::optional<nn::ScopedAttentionController> guard;
    if (with_controller) guard.emplace(*unet, rec);
    in.encoder_hidden_states.mutable_grad() = at::Tensor();
    unet->forward(in).pow(2).mean().backward();
    const at::Tensor g = in.encoder_hidden_states.grad();
    ASSERT_TRUE(g.defined());
    EXPECT_GT(g.abs().max().item<double>(), 0.0);
    EXPECT_TRUE(at::isfinite(g).all().item<bool>());
  }
}

// Input hooks see what each layer's key and value projections read (the text for cross-attention, the layer's
// own normalised input for self-attention), chain in installation order, change only what they return, and are
// gone with their guard; a hook returning another shape is an error naming the site.
class KeyValueHook : public nn::AttentionInputHook {
 public:
  KeyValueHook(bool cross_only, double value_scale) : cross_only_(cross_only), value_scale_(value_scale) {}
  bool wants(const nn::AttentionSite& s) const override { return !cross_only_ || s.is_cross; }
  nn::KeyValueInputs on_key_value_inputs(const nn::AttentionSite& s, const nn::AttentionContext&,
                                         nn::KeyValueInputs in) override {
    seen.emplace_back(s.path, in.key.size(-1));
    if (wrong_shape) return {in.key.narrow(-1, 0, 1), in.value};
    return {in.key, in.value * value_scale_};
  }
  std::vector<std::pair<std::string, int64_t>> seen;
  bool wrong_shape = false;

 private:
  bool cross_only_;
  double value_scale_;
};

TEST(AttentionSeamTiny, InputHooksSeeKeyValueInputsAndRestore) {
  auto unet = tiny_unet();
  const auto in = tiny_inputs();
  at::NoGradGuard no_grad;
  const at::Tensor plain = unet->forward(in);
  auto seam = nn::assign_attention_sites(*unet);
  auto identity = std::make_shared<KeyValueHook>(false, 1.0);
  auto zero_cross = std::make_shared<KeyValueHook>(true, 0.0);
  {
    nn::ScopedAttentionInputHook g(*unet, identity);
    EXPECT_FALSE(seam->active());  // input hooks keep the fast score computation
    EXPECT_TRUE(unet->forward(in).equal(plain));
    ASSERT_EQ(identity->seen.size(), 8u);
    EXPECT_EQ(identity->seen[0], std::make_pair(std::string("down_blocks.0.attentions.0.transformer_blocks.0.attn1"),
                                                int64_t{32}));  // self-attention reads the block's own width
    EXPECT_EQ(identity->seen[1].second, 16);                    // cross-attention reads the text
    EXPECT_EQ(identity->seen[2].second, 64);                    // mid block self-attention
    {
      nn::ScopedAttentionInputHook z(*unet, zero_cross);
      ASSERT_EQ(seam->input_hooks.size(), 2u);
      EXPECT_EQ(seam->input_hooks[0], identity);  // installation order
      EXPECT_GT((unet->forward(in) - plain).abs().max().item<double>(), 1e-4);
      EXPECT_EQ(zero_cross->seen.size(), 4u);  // cross sites only
    }
    EXPECT_TRUE(unet->forward(in).equal(plain));
    identity->wrong_shape = true;
    try {
      unet->forward(in);
      ADD_FAILURE() << "expected InvalidArgument";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("attention input hook at down_blocks.0.attentions.0.transformer_blocks.0."
                                           "attn1: must return key and value inputs of the shapes it got"),
                std::string::npos)
          << e.what();
    }
  }
  EXPECT_TRUE(seam->input_hooks.empty());
  EXPECT_TRUE(unet->forward(in).equal(plain));
  EXPECT_THROW(nn::ScopedAttentionInputHook(*unet, nullptr), InvalidArgument);
}

// attn1 of an only_cross_attention block attends to the text: a cross-attention site even when the text has the
// block's width.
TEST(AttentionSeamTiny, OnlyCrossAttentionAttn1IsACrossSite) {
  models::UNet2DConditionConfig c = tiny_config();
  c.cross_attention_dim = 32;  // the first block's width
  c.only_cross_attention = {true, false};
  at::manual_seed(0);
  models::UNet2DConditionModel unet(c);
  const auto sites = nn::attention_sites(*unet);
  ASSERT_EQ(sites[0].path, "down_blocks.0.attentions.0.transformer_blocks.0.attn1");
  EXPECT_TRUE(sites[0].is_cross);
  EXPECT_EQ(sites[2].path, "mid_block.attentions.0.transformer_blocks.0.attn1");
  EXPECT_FALSE(sites[2].is_cross);
  EXPECT_EQ(sites[6].path, "up_blocks.1.attentions.1.transformer_blocks.0.attn1");
  EXPECT_TRUE(sites[6].is_cross);  // up block 1 mirrors down block 0
}

TEST(AttentionSeamTiny, ContextRowsAndErrors) {
  auto ctx = two_rows(0);
  EXPECT_EQ(ctx.rows_where(true), (std::vector<int64_t>{1}));
  EXPECT_EQ(ctx.rows_where(false), (std::vector<int64_t>{0}));
  torch::nn::Module empty;
  EXPECT_THROW(nn::ScopedAttentionController(empty, std::make_shared<RecordingController>()), InvalidArgument);
  auto unet = tiny_unet();
  EXPECT_THROW(nn::ScopedAttentionController(*unet, nullptr), InvalidArgument);
}
}  // namespace
}  // namespace dmx::test
