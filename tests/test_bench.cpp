// Functional tests of `dmx bench` (no timing assertions: the machine is shared and timings are noise here).
#include <sys/wait.h>

#include <array>
#include <cstdio>

#include <chrono>
#include <cmath>

#include "dmx/dmx.h"
#include "nn/attention.h"
#include "test_util.h"

namespace dmx::test {
namespace {

std::string run_cli(const std::string& args, int& code) {
  std::string out;
  FILE* f = popen((cli_path() + " " + args + " 2>&1").c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), f)) > 0) out.append(buf.data(), n);
  const int status = pclose(f);
  code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return out;
}

TEST(BenchUnit, FlopModelMatchesSd15UNet) {
  // One SD 1.5 UNet pass at 64x64 latents is ~803 GFLOP (one guided step at batch 2: ~1.61 TFLOP).
  const BenchFlops f = bench_flops("sd15", 512, 512);
  EXPECT_NEAR(f.unet_pass / 1e9, 803, 8);
  EXPECT_DOUBLE_EQ(f.unet_step, 2 * f.unet_pass);
  EXPECT_NEAR(f.vae_decode / 1e12, 2.5, 0.2);
  EXPECT_GT(f.text_encode, 0);
  // Scaling with the image area (convs and linears; attention grows faster).
  EXPECT_GT(bench_flops("sd15", 768, 768).unet_pass, 2.25 * f.unet_pass);
}

TEST(BenchTiny, TinyPresetRunsAndReports) {
  BenchOptions o;
  o.preset = "tiny";
  o.runs = 1;
  o.measure_peak = false;
  const BenchResult r = bench(o);
  EXPECT_EQ(r.width, 64);
  EXPECT_EQ(r.height, 64);
  EXPECT_GT(r.unet_step_s, 0);
  EXPECT_GT(r.vae_decode_s, 0);
  EXPECT_GT(r.text_encode_s, 0);
  EXPECT_GT(r.peak_rss_mb, 0);
  const nlohmann::json j = nlohmann::json::parse(bench_json(r));
  for (const char* key : {"text_encode_s", "unet_step_s", "vae_decode_s", "peak_rss_mb"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_NE(bench_table(r).find("unet guided step"), std::string::npos);
}

TEST(BenchTiny, TinyPresetBf16) {
  BenchOptions o;
  o.preset = "tiny";
  o.dtype = "bf16";
  o.runs = 1;
  o.warmup = 0;
  o.measure_peak = false;
  const BenchResult r = bench(o);
  EXPECT_GT(r.unet_step_s, 0);
}

TEST(BenchUnit, BadOptions) {
  BenchOptions o;
  o.preset = "sd3";
  EXPECT_THROW(bench(o), InvalidArgument);
  o.preset = "tiny";
  o.width = 63;
  try {
    bench(o);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("63"), std::string::npos) << e.what();
  }
  o.width = 0;
  o.dtype = "fp8";
  EXPECT_THROW(bench(o), InvalidArgument);
  o.dtype = "fp16";
  EXPECT_THROW(bench(o), Unsupported);  // CPU
  o.dtype = "fp32";
  o.runs = 0;
  EXPECT_THROW(bench(o), InvalidArgument);
}

// The command's exit codes and its two output formats (what they hold is checked in-process by BenchTiny).
TEST(BenchCli, JsonOneLineTableAndExitCodes) {
  int code = -1;
  std::string out = run_cli("bench --preset tiny --runs 1 --threads 1 --json", code);
  ASSERT_EQ(code, 0) << out;
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(out.find('\n'), out.size() - 1) << out;  // exactly one line
  const nlohmann::json j = nlohmann::json::parse(out);
  for (const char* key : {"text_encode_s", "unet_step_s", "vae_decode_s", "peak_rss_mb"}) {
    ASSERT_TRUE(j.contains(key)) << key;
    EXPECT_TRUE(j[key].is_number()) << key;
  }
  EXPECT_EQ(j["threads"], 1);
  EXPECT_EQ(j["preset"], "tiny");
  out = run_cli("bench --preset tiny --runs 1", code);
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("vae decode"), std::string::npos) << out;
  EXPECT_NE(out.find("GFLOP/s"), std::string::npos) << out;
  out = run_cli("bench --preset nope", code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("--preset"), std::string::npos) << out;
}

}  // namespace
}  // namespace dmx::test

namespace dmx::test {
namespace {
// Timing probe for the attention shapes of SD 1.5 at 512x512 (batch 2, 8 heads): prints, never asserts
// on time. Run with --gtest_also_run_disabled_tests --gtest_filter='*AttentionProbe*'.
TEST(BenchSlow, DISABLED_AttentionProbe) {
  struct Shape {
    int64_t n, m, d;
  };
  for (Shape sh : {Shape{4096, 4096, 40}, Shape{4096, 77, 40}, Shape{1024, 1024, 80}}) {
    at::Tensor q = at::randn({2, sh.n, 8, sh.d}).permute({0, 2, 1, 3});
    at::Tensor k = at::randn({2, sh.m, 8, sh.d}).permute({0, 2, 1, 3});
    at::Tensor v = at::randn({2, sh.m, 8, sh.d}).permute({0, 2, 1, 3});
    for (int64_t budget : {int64_t{1} << 16, int64_t{1} << 18, int64_t{1} << 20, int64_t{1} << 22, int64_t{1} << 24}) {
      dmx::nn::set_max_score_elements(budget);
      (void)dmx::nn::attention(q, k, v, 0.15);
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < 3; ++i) (void)dmx::nn::attention(q, k, v, 0.15);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 3;
      std::printf("attention N=%lld M=%lld d=%lld budget=2^%d: %.4f s, %.1f GFLOP/s\n", (long long)sh.n,
                  (long long)sh.m, (long long)sh.d, (int)std::log2((double)budget), s,
                  4.0 * 16 * sh.n * sh.m * sh.d / s / 1e9);
    }
  }
  dmx::nn::set_max_score_elements(int64_t{1} << 20);
}
}  // namespace
}  // namespace dmx::test
