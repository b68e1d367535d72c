// Fused CPU kernels (nn/kernels_avx512 via nn::attention and nn::group_norm_act) against the composite
// libtorch ops they replace: values (float32 within 1e-5 relative, bf16 within stated tolerances), odd
// sizes, strided inputs, and the autograd fallback. DISABLED_KernelBench.* are interleaved A/B timings
// (run with --gtest_also_run_disabled_tests --gtest_filter='*KernelBench*').
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

#include "core/runtime.h"
#include "dmx/error.h"
#include "nn/attention.h"
#include "nn/fused_ops.h"
#include "test_util.h"

namespace dmx::test {
namespace {

// Restores dmx::fused_kernels() on scope exit.
struct FusedGuard {
  bool prev = dmx::fused_kernels();
  explicit FusedGuard(bool on) { dmx::set_fused_kernels(on); }
  ~FusedGuard() { dmx::set_fused_kernels(prev); }
};

#define DMX_REQUIRE_FUSED()                                                                                \
  do {                                                                                                     \
    if (!::dmx::nn::fused_kernels_available()) GTEST_SKIP() << "no AVX512-BF16 kernels on this CPU/build"; \
  } while (0)

// q, k, v as AttentionImpl makes them: [B, N, heads, d] projections permuted to [B, heads, N, d].
at::Tensor heads_view(int64_t B, int64_t N, int64_t H, int64_t d, at::ScalarType dt) {
  return at::randn({B, N, H, d}).to(dt).permute({0, 2, 1, 3});
}

at::Tensor attention_ref(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  // float32 math on the same (possibly bf16-rounded) inputs
  const at::Tensor s = at::matmul(q.to(at::kFloat), k.to(at::kFloat).transpose(-1, -2)) * scale;
  return at::matmul(at::softmax(s, -1), v.to(at::kFloat));
}

class KernelsAttentionUnit : public ::testing::TestWithParam<bool> {};  // param: AMX tiles allowed

TEST_P(KernelsAttentionUnit, FusedBf16MatchesFloat32) {
  DMX_REQUIRE_FUSED();
  nn::set_attention_amx(GetParam());
  struct AmxReset {
    ~AmxReset() { nn::set_attention_amx(true); }
  } reset;
  at::manual_seed(0);
  struct Case {
    int64_t B, H, Nq, Nk, d, dv;
  };
  // sd15 cross-attention-like, odd head widths and lengths, single wide head (VAE), Nq not a multiple of 8
  for (const Case c : {Case{2, 3, 64, 77, 40, 40}, Case{1, 2, 37, 131, 17, 17}, Case{2, 1, 50, 50, 96, 96},
                       Case{1, 2, 9, 5, 33, 21}, Case{1, 1, 1, 1, 8, 8}, Case{2, 2, 100, 300, 80, 80}}) {
    const at::Tensor q = heads_view(c.B, c.Nq, c.H, c.d, at::kBFloat16);
    const at::Tensor k = heads_view(c.B, c.Nk, c.H, c.d, at::kBFloat16);
    const at::Tensor v = heads_view(c.B, c.Nk, c.H, c.dv, at::kBFloat16);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
    const at::Tensor ref = attention_ref(q, k, v, scale);
    for (bool upcast : {false, true}) {
      at::Tensor fused, composite;
      {
        FusedGuard g(true);
        fused = nn::attention(q, k, v, scale, false, upcast);
      }
      {
        FusedGuard g(false);
        composite = nn::attention(q, k, v, scale, false, upcast);
      }
      ASSERT_EQ(fused.sizes(), composite.sizes());
      ASSERT_EQ(fused.scalar_type(), at::kBFloat16);
      const std::string what = "attention bf16 " + std::to_string(c.Nq) + "x" + std::to_string(c.Nk) + "x" +
                               std::to_string(c.d) + (upcast ? " upcast" : "");
      // float32 scores/softmax/accumulation: only the bf16 probabilities and output are rounded (2^-8 rel.)
      const double e_fused = check_close(what + " fused vs fp32", fused, ref, 1e-2);
      const double e_comp = check_close(what + " composite vs fp32", composite, ref, 5e-2);
      EXPECT_LE(e_fused, 1e-2) << what;
      EXPECT_LE(e_fused, std::max(e_comp, 4e-3)) << what << ": the fused kernel must not be less accurate";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, KernelsAttentionUnit, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& i) { return i.param ? "Amx" : "Avx512Bf16"; });

TEST(KernelsUnit, AttentionFloat32AndCausalKeepTheComposite) {
  at::manual_seed(1);
  const at::Tensor q = heads_view(1, 12, 2, 16, at::kFloat), k = heads_view(1, 12, 2, 16, at::kFloat),
                   v = heads_view(1, 12, 2, 16, at::kFloat);
  at::Tensor a, b;
  {
    FusedGuard g(true);
    a = nn::attention(q, k, v, 0.25, true);
  }
  {
    FusedGuard g(false);
    b = nn::attention(q, k, v, 0.25, true);
  }
  EXPECT_TRUE(at::equal(a, b));
  const at::Tensor qb = q.to(at::kBFloat16), kb = k.to(at::kBFloat16), vb = v.to(at::kBFloat16);
  {
    FusedGuard g(true);
    a = nn::attention(qb, kb, vb, 0.25, true);
  }
  {
    FusedGuard g(false);
    b = nn::attention(qb, kb, vb, 0.25, true);
  }
  EXPECT_TRUE(at::equal(a, b)) << "causal attention has no fused kernel";
}

// Gradients flow through attention() whatever the dtype: with inputs requiring grad the composite runs.
TEST(KernelsUnit, AttentionGradientsMatchComposite) {
  at::manual_seed(2);
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    std::vector<at::Tensor> grads[2];
    at::Tensor outs[2];
    for (int fused = 0; fused < 2; ++fused) {
      at::manual_seed(3);
      at::Tensor q = at::randn({2, 2, 20, 8}).to(dt).requires_grad_(true);
      at::Tensor k = at::randn({2, 2, 11, 8}).to(dt).requires_grad_(true);
      at::Tensor v = at::randn({2, 2, 11, 8}).to(dt).requires_grad_(true);
      FusedGuard g(fused == 1);
      outs[fused] = nn::attention(q, k, v, 0.3);
      ASSERT_TRUE(outs[fused].requires_grad());
      outs[fused].to(at::kFloat).square().sum().backward();
      grads[fused] = {q.grad(), k.grad(), v.grad()};
    }
    EXPECT_TRUE(at::equal(outs[0], outs[1]));
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(at::equal(grads[0][i], grads[1][i])) << "grad " << i;
    // and against autograd through the plain formula in float32
    if (dt == at::kFloat) {
      at::manual_seed(3);
      at::Tensor q = at::randn({2, 2, 20, 8}).requires_grad_(true);
      at::Tensor k = at::randn({2, 2, 11, 8}).requires_grad_(true);
      at::Tensor v = at::randn({2, 2, 11, 8}).requires_grad_(true);
      at::matmul(at::softmax(at::matmul(q, k.transpose(-1, -2)) * 0.3, -1), v).square().sum().backward();
      DMX_EXPECT_CLOSE("attention grad q", grads[1][0], q.grad(), 1e-5);
      DMX_EXPECT_CLOSE("attention grad k", grads[1][1], k.grad(), 1e-5);
      DMX_EXPECT_CLOSE("attention grad v", grads[1][2], v.grad(), 1e-5);
    }
  }
}

struct GnCase {
  std::vector<int64_t> shape;
  int64_t groups;
  bool channels_last;
};

at::Tensor make_input(const GnCase& c, at::ScalarType dt) {
  at::Tensor x = (at::randn(c.shape) * 3 + 1.5).to(dt);  // offset mean: exercises the variance formula
  if (c.channels_last) {
    if (x.dim() == 4)
      x = x.contiguous(at::MemoryFormat::ChannelsLast);
    else  // [N, C, L] as the transposed view of [N, L, C] (Attention's group_norm input)
      x = x.transpose(1, 2).contiguous().transpose(1, 2);
  }
  return x;
}

TEST(KernelsUnit, FusedGroupNormSiluMatchesComposite) {
  DMX_REQUIRE_FUSED();
  at::manual_seed(4);
  const std::vector<GnCase> cases = {
      {{2, 64, 13, 7}, 32, false}, {{2, 64, 13, 7}, 32, true},  {{1, 96, 5, 3}, 32, true}, {{3, 6, 17}, 3, false},
      {{2, 40, 33}, 8, true},      {{1, 512, 9, 9}, 32, false}, {{1, 20, 1, 1}, 4, true}};
  for (const GnCase& c : cases) {
    const int64_t C = c.shape[1];
    const at::Tensor w = at::randn({C}), b = at::randn({C});
    for (bool silu : {false, true}) {
      std::string what = "group_norm" + std::string(silu ? "+silu" : "") + " C=" + std::to_string(C) +
                         (c.channels_last ? " NHWC" : " NCHW") + " " + std::to_string(c.shape.size()) + "-d";
      // float32: within the golden tolerance of the composite
      const at::Tensor x = make_input(c, at::kFloat);
      at::Tensor fused, composite;
      {
        FusedGuard g(true);
        fused = nn::group_norm_act(x, c.groups, w, b, 1e-6, silu);
      }
      composite = nn::group_norm_act_composite(x, c.groups, w, b, 1e-6, silu);
      EXPECT_EQ(fused.strides(), x.strides()) << what << ": keeps the memory format";
      DMX_EXPECT_CLOSE(what + " fp32", fused, composite, 1e-5);
      // bf16 (weights bf16 too, as in a bf16 model): against the float32 composite on the same inputs
      const at::Tensor xb = x.to(at::kBFloat16), wb = w.to(at::kBFloat16), bb = b.to(at::kBFloat16);
      {
        FusedGuard g(true);
        fused = nn::group_norm_act(xb, c.groups, wb, bb, 1e-6, silu);
      }
      ASSERT_EQ(fused.scalar_type(), at::kBFloat16);
      const at::Tensor ref =
          nn::group_norm_act_composite(xb.to(at::kFloat), c.groups, wb.to(at::kFloat), bb.to(at::kFloat), 1e-6, silu);
      DMX_EXPECT_CLOSE(what + " bf16 vs fp32", fused.to(at::kFloat), ref, 8e-3);  // one bf16 rounding: 2^-8
    }
  }
}

TEST(KernelsUnit, GroupNormGradientsFallBackToComposite) {
  at::manual_seed(5);
  at::Tensor x = at::randn({2, 8, 5, 5}).requires_grad_(true);
  at::Tensor w = at::randn({8}).requires_grad_(true), b = at::randn({8}).requires_grad_(true);
  at::Tensor y;
  {
    FusedGuard g(true);
    y = nn::group_norm_act(x, 4, w, b, 1e-5, true);
  }
  ASSERT_TRUE(y.requires_grad());
  y.square().sum().backward();
  at::Tensor x2 = x.detach().clone().requires_grad_(true);
  at::Tensor w2 = w.detach().clone().requires_grad_(true), b2 = b.detach().clone().requires_grad_(true);
  at::silu(at::group_norm(x2, 4, w2, b2, 1e-5)).square().sum().backward();
  DMX_EXPECT_CLOSE("group_norm+silu grad x", x.grad(), x2.grad(), 1e-5);
  DMX_EXPECT_CLOSE("group_norm+silu grad w", w.grad(), w2.grad(), 1e-5);
  DMX_EXPECT_CLOSE("group_norm+silu grad b", b.grad(), b2.grad(), 1e-5);
  // Under NoGrad the fused kernel may run on the same tensors; the values still agree.
  at::NoGradGuard ng;
  FusedGuard g(true);
  DMX_EXPECT_CLOSE("group_norm+silu no-grad", nn::group_norm_act(x, 4, w, b, 1e-5, true),
                   at::silu(at::group_norm(x, 4, w, b, 1e-5)), 1e-5);
}

TEST(KernelsUnit, FusedGegluBf16MatchesFloat32) {
  DMX_REQUIRE_FUSED();
  at::manual_seed(6);
  for (const auto& shape :
       {std::vector<int64_t>{2, 7, 2 * 40}, std::vector<int64_t>{3, 2 * 17}, std::vector<int64_t>{1, 5, 2 * 640}}) {
    const at::Tensor p = (at::randn(shape) * 3).to(at::kBFloat16);
    at::Tensor fused;
    {
      FusedGuard g(true);
      fused = nn::geglu(p);
    }
    ASSERT_EQ(fused.scalar_type(), at::kBFloat16);
    const at::Tensor ref = nn::geglu_composite(p.to(at::kFloat));
    ASSERT_EQ(fused.sizes(), ref.sizes());
    DMX_EXPECT_CLOSE("geglu bf16 vs fp32 n=" + std::to_string(shape.back() / 2), fused.to(at::kFloat), ref, 8e-3);
  }
  // float32 keeps the composite exactly
  const at::Tensor p = at::randn({2, 3, 16});
  FusedGuard g(true);
  EXPECT_TRUE(at::equal(nn::geglu(p), nn::geglu_composite(p)));
}

TEST(KernelsUnit, GegluGradientsFallBackToComposite) {
  at::manual_seed(7);
  at::Tensor p = at::randn({4, 12}).to(at::kBFloat16).requires_grad_(true);
  at::Tensor y;
  {
    FusedGuard g(true);
    y = nn::geglu(p);
  }
  ASSERT_TRUE(y.requires_grad());
  y.to(at::kFloat).sum().backward();
  at::Tensor p2 = p.detach().clone().requires_grad_(true);
  nn::geglu_composite(p2).to(at::kFloat).sum().backward();
  EXPECT_TRUE(at::equal(p.grad(), p2.grad()));
}

TEST(KernelsUnit, GroupNormRejectsBadGroups) {
  const at::Tensor x = at::randn({1, 6, 4, 4});
  try {
    nn::group_norm_act(x, 4, at::ones({6}), at::zeros({6}), 1e-5, false);
    FAIL() << "expected InvalidArgument";
  } catch (const dmx::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("divisible"), std::string::npos) << e.what();
  }
}

// ---- interleaved A/B timings (not run by default) ----------------------------------------------------
double time_min(const std::function<void()>& f, int reps) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

void ab(const std::string& what, const std::function<void()>& f, int rounds = 3, int reps = 2) {
  double on = 1e30, off = 1e30;
  for (int r = 0; r < rounds; ++r) {
    {
      FusedGuard g(false);
      off = std::min(off, time_min(f, reps));
    }
    {
      FusedGuard g(true);
      on = std::min(on, time_min(f, reps));
    }
  }
  std::printf("[ab] %-44s composite %8.4f s  fused %8.4f s  x%.2f\n", what.c_str(), off, on, off / on);
}

TEST(DISABLED_KernelBenchSlow, AttentionSd15) {
  DMX_REQUIRE_FUSED();
  c10::InferenceMode im;
  struct Case {
    const char* name;
    int64_t Nq, Nk, H, d;
    bool upcast;
  };
  // sd15 512x512, batch 2: self / cross attention per resolution, and the VAE mid block (1 head of 512).
  for (const Case c :
       {Case{"self 64^2 (8x40)", 4096, 4096, 8, 40, false}, Case{"cross 64^2", 4096, 77, 8, 40, false},
        Case{"self 32^2 (8x80)", 1024, 1024, 8, 80, false}, Case{"self 16^2 (8x160)", 256, 256, 8, 160, false},
        Case{"vae mid (1x512, upcast, B=1)", 4096, 4096, 1, 512, true}}) {
    const int64_t B = c.upcast ? 1 : 2;
    const at::Tensor q = heads_view(B, c.Nq, c.H, c.d, at::kBFloat16), k = heads_view(B, c.Nk, c.H, c.d, at::kBFloat16),
                     v = heads_view(B, c.Nk, c.H, c.d, at::kBFloat16);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
    ab(std::string("attention bf16 ") + c.name, [&] { nn::attention(q, k, v, scale, false, c.upcast); });
  }
}

TEST(DISABLED_KernelBenchSlow, GegluSd15) {
  DMX_REQUIRE_FUSED();
  c10::InferenceMode im;
  const at::Tensor p = at::randn({2, 4096, 2 * 1280}).to(at::kBFloat16);  // sd15 64^2 feed-forward projection
  ab("geglu bf16 [2, 4096, 2x1280]", [&] { nn::geglu(p); });
}

TEST(DISABLED_KernelBenchSlow, GroupNormSiluVae) {
  DMX_REQUIRE_FUSED();
  c10::InferenceMode im;
  // sd15 VAE decoder's largest activations: 128 and 256 channels at 512^2 and 256^2, 32 groups.
  for (const auto& shape : {std::vector<int64_t>{1, 128, 512, 512}, std::vector<int64_t>{1, 256, 256, 256},
                            std::vector<int64_t>{1, 512, 128, 128}}) {
    const int64_t C = shape[1];
    const at::Tensor w = at::randn({C}), b = at::randn({C});
    const at::Tensor x = at::randn(shape);
    const std::string s = std::to_string(C) + "x" + std::to_string(shape[2]) + "^2";
    ab("group_norm+silu fp32 NCHW " + s, [&] { nn::group_norm_act(x, 32, w, b, 1e-6, true); });
    const at::Tensor xb = x.to(at::kBFloat16).contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor wb = w.to(at::kBFloat16), bb = b.to(at::kBFloat16);
    ab("group_norm+silu bf16 NHWC " + s, [&] { nn::group_norm_act(xb, 32, wb, bb, 1e-6, true); });
  }
}

}  // namespace
}  // namespace dmx::test
