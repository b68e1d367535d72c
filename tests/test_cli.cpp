// End-to-end tests of the dmx binary: exit codes, error messages, no partial outputs, seeds.
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>

#include "core/fs.h"
#include "core/image.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace dmx::test {
namespace {


std::string model() { return fixture_model("sd15"); }

void expect_error(const std::vector<std::string>& args, const std::string& needle, const std::string& out_path) {
  CliRun r = dmx_run(args);
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("error: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.output;
  EXPECT_FALSE(path_exists(out_path)) << out_path << " must not be written";
}

TEST(Cli, HelpAndUsage) {
  CliRun r = dmx_run({"generate", "--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.output.find("--guidance-scale"), std::string::npos);
  EXPECT_EQ(dmx_run({}).code, 2);
  CliRun bad = dmx_run({"frobnicate"});
  EXPECT_EQ(bad.code, 2);
  EXPECT_NE(bad.output.find("unknown command 'frobnicate'"), std::string::npos);
}

TEST(Cli, BadArgumentsExit2WithNoOutput) {
  const std::string out = temp_dir() + "/cli-bad.png";
  const std::vector<std::string> base = {"generate", "--model", model(), "--prompt", "x", "--output", out};
  auto with = [&](std::vector<std::string> extra) {
    auto v = base;
    v.insert(v.end(), extra.begin(), extra.end());
    return v;
  };
  expect_error(with({"--width", "100"}), "width must be a multiple of 8, got 100", out);
  expect_error(with({"--width", "abc"}), "--width must be an integer, got 'abc'", out);
  expect_error(with({"--steps", "0"}), "--steps must be in [1, 1000], got 0", out);
  expect_error(with({"--guidance-scale", "-1"}), "--guidance-scale must be in [0, 100], got -1", out);
  expect_error(with({"--scheduler", "magic"}), "--scheduler must be one of", out);
  expect_error(with({"--seed", "-5"}), "--seed must be an integer in [0, 2^64-1]", out);
  expect_error(with({"--strength", "0.5"}), "--strength needs --init-image", out);
  expect_error(with({"--frobnicate"}), "unknown option --frobnicate", out);
  expect_error(with({"--width", "8192", "--height", "8192"}), "at most 4096", out);
  expect_error({"generate", "--model", "/nonexistent/model", "--prompt", "x", "--output", out}, "path not found", out);
  expect_error({"generate", "--model", model(), "--prompt", "x", "--output", "/nonexistent-dir/o.png"},
               "output directory does not exist", "/nonexistent-dir/o.png");
  expect_error({"generate", "--model", model(), "--prompt", "x", "--output", temp_dir() + "/o.jpg"}, "must end in .png",
               temp_dir() + "/o.jpg");
  expect_error({"generate", "--model", model(), "--output", out}, "--prompt is required", out);
}

TEST(Cli, BadFilesExit2WithNoOutput) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = temp_subdir("Cli-BadFilesExit2WithNoOutput");
  const std::string out = dir + "/cli-badfile.png";
  std::ofstream(dir + "/notimage.png") << "garbage";
  expect_error({"generate", "--model", model(), "--prompt", "x", "--output", out, "--init-image", dir + "/notimage.png"},
               "--init-image", out);
  std::ofstream(dir + "/bad.safetensors") << "\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ";
  expect_error({"generate", "--model", dir + "/bad.safetensors", "--prompt", "x", "--output", out}, "safetensors", out);
  expect_error({"generate", "--model", model(), "--prompt", "x", "--output", out, "--init-latents",
                dir + "/bad.safetensors"},
               "safetensors", out);
  io::save_safetensors(dir + "/wrong.safetensors", {{"latents", at::zeros({1, 4, 3, 3})}});
  expect_error({"generate", "--model", model(), "--prompt", "x", "--output", out, "--init-latents",
                dir + "/wrong.safetensors", "--steps", "2"},
               "init latents must have shape", out);
}

TEST(Cli, SeededRunReproducesAndWritesMetadata) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = temp_subdir("Cli-SeededRunReproducesAndWritesMetadata");
  const std::vector<std::string> args = {"generate", "--model", model(), "--prompt", "a café ☕ at night",
                                         "--steps", "3", "--seed", "2718281828", "--width", "48", "--height", "32",
                                         "--scheduler", "euler_a", "--quiet"};
  auto a = args;
  a.insert(a.end(), {"--output", dir + "/a.png", "--save-latents", dir + "/a.safetensors"});
  auto b = args;
  b.insert(b.end(), {"--output", dir + "/b.png", "--save-latents", dir + "/b.safetensors"});
  CliRun ra = dmx_run(a);
  ASSERT_EQ(ra.code, 0) << ra.output;
  ASSERT_EQ(dmx_run(b).code, 0);
  Image ia = load_image(dir + "/a.png", "a"), ib = load_image(dir + "/b.png", "b");
  EXPECT_EQ(ia.width, 48);
  EXPECT_EQ(ia.height, 32);
  EXPECT_EQ(ia.data, ib.data);
  auto la = io::load_safetensors(dir + "/a.safetensors");
  ASSERT_EQ(la.count("latents"), 1u);
  EXPECT_EQ(la["latents"].sizes(), (std::vector<int64_t>{1, 4, 4, 6}));
  auto text = read_png_text(dir + "/a.png");
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(text[0].first, "parameters");
  EXPECT_NE(text[0].second.find("Seed: 2718281828"), std::string::npos) << text[0].second;
  EXPECT_NE(text[0].second.find("Sampler: Euler a"), std::string::npos) << text[0].second;
}

TEST(Cli, InitLatentsRoundTripAndNumImages) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = temp_subdir("Cli-InitLatentsRoundTripAndNumImages");
  io::save_safetensors(dir + "/noise.safetensors", {{"latents", at::randn({2, 4, 8, 8})}});
  CliRun r = dmx_run({"generate", "--model", model(), "--prompt", "x", "--steps", "2", "--num-images", "2", "--width", "64",
                   "--height", "64", "--init-latents", dir + "/noise.safetensors", "--output", dir + "/multi.png",
                   "--quiet"});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(path_exists(dir + "/multi-0.png"));
  EXPECT_TRUE(path_exists(dir + "/multi-1.png"));
}
}  // namespace
}  // namespace dmx::test

namespace dmx::test {
namespace {
TEST(Cli, SingleFileCheckpointMatchesDiffusersFolder) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = temp_subdir("Cli-SingleFileCheckpointMatchesDiffusersFolder");
  const std::string folder = fixture_model("sd15");
  const std::string single = folder + "/ldm/sd15.safetensors";
  const std::vector<std::string> common = {"--prompt", "a lighthouse", "--steps", "3", "--seed", "7", "--quiet"};
  auto a = std::vector<std::string>{"generate", "--model", folder, "--output", dir + "/folder.png"};
  a.insert(a.end(), common.begin(), common.end());
  auto b = std::vector<std::string>{"generate", "--model", single, "--config", folder, "--output", dir + "/single.png"};
  b.insert(b.end(), common.begin(), common.end());
  CliRun ra = dmx_run(a), rb = dmx_run(b);
  ASSERT_EQ(ra.code, 0) << ra.output;
  ASSERT_EQ(rb.code, 0) << rb.output;
  EXPECT_EQ(load_image(dir + "/folder.png", "a").data, load_image(dir + "/single.png", "b").data);
  // Without a tokenizer source the single file cannot run: a clear error, exit 2.
  auto c = std::vector<std::string>{"generate", "--model", single, "--output", dir + "/none.png"};
  c.insert(c.end(), common.begin(), common.end());
  CliRun rc = dmx_run(c);
  EXPECT_EQ(rc.code, 2) << rc.output;
  EXPECT_FALSE(path_exists(dir + "/none.png"));
}
}  // namespace
}  // namespace dmx::test

#include "dmx/dmx.h"

namespace dmx::test {
namespace {
TEST(Metadata, ParsesA1111Parameters) {
  const std::string text =
      "masterpiece, a cat\non a mat\nNegative prompt: blurry, low quality\n"
      "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 2718281828, Size: 192x128, "
      "Model hash: abcdef1234, Model: sd15, Lora hashes: \"x: 1, y: 2\", Clip skip: 2";
  GenerateOptions o = parse_parameters(text);
  EXPECT_EQ(o.prompt, "masterpiece, a cat\non a mat");
  EXPECT_EQ(o.negative_prompt, "blurry, low quality");
  EXPECT_EQ(o.steps, 28);
  EXPECT_EQ(o.scheduler, "dpmpp_2m_karras");
  EXPECT_DOUBLE_EQ(o.guidance_scale, 6.5);
  ASSERT_TRUE(o.seed.has_value());
  EXPECT_EQ(*o.seed, 2718281828ull);
  EXPECT_EQ(o.width, 192);
  EXPECT_EQ(o.height, 128);
  EXPECT_EQ(o.clip_skip, 1);
  GenerateOptions back = parse_parameters(format_parameters(o, *o.seed, o.width, o.height, "sd15"));
  EXPECT_EQ(back.prompt, o.prompt);
  EXPECT_EQ(back.negative_prompt, o.negative_prompt);
  EXPECT_EQ(back.scheduler, o.scheduler);
  EXPECT_EQ(back.clip_skip, o.clip_skip);
  EXPECT_THROW(parse_parameters("just a prompt"), InvalidArgument);
  EXPECT_THROW(parse_parameters("p\nSteps: 5, Sampler: Nonexistent"), InvalidArgument);
}

TEST(Cli, InfoAndFromReproduceTheImage) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = temp_subdir("Cli-InfoAndFromReproduceTheImage");
  CliRun r = dmx_run({"generate", "--model", model(), "--prompt", "a blue bird", "--negative-prompt", "fog", "--steps",
                   "3", "--seed", "99", "--scheduler", "dpmpp_2m_karras", "--width", "40", "--height", "56",
                   "--output", dir + "/orig.png", "--quiet"});
  ASSERT_EQ(r.code, 0) << r.output;
  CliRun info = dmx_run({"info", dir + "/orig.png"});
  ASSERT_EQ(info.code, 0) << info.output;
  EXPECT_NE(info.output.find("Negative prompt: fog"), std::string::npos) << info.output;
  EXPECT_NE(info.output.find("Sampler: DPM++ 2M Karras"), std::string::npos) << info.output;
  CliRun again = dmx_run({"generate", "--model", model(), "--from", dir + "/orig.png", "--output", dir + "/again.png", "--quiet"});
  ASSERT_EQ(again.code, 0) << again.output;
  EXPECT_EQ(load_image(dir + "/orig.png", "a").data, load_image(dir + "/again.png", "b").data);
  CliRun noinfo = dmx_run({"info", dir + "/nothing.png"});
  EXPECT_EQ(noinfo.code, 2);
}
}  // namespace
}  // namespace dmx::test
