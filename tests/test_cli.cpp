// dmx::generate, the API `dmx generate` runs, in-process on a tiny random model: errors (type and message, nothing
// written), seeds, metadata, initial latents, several images; and the commands themselves where only a process
// shows it: usage, argument parsing, exit codes, what they print, `dmx info` and `--from`.
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <functional>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/dmx.h"
#include "io/safetensors.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {

std::string model() { return tiny_model_dir("sd15"); }

GenerateOptions options(const std::string& out) {
  GenerateOptions o;
  o.model = model();
  o.prompt = "x";
  o.output = out;
  o.progress = false;
  return o;
}

// generate(o) throws E holding needle, and out is not written.
template <typename E = InvalidArgument>
void expect_error(const GenerateOptions& o, const std::string& needle, const std::string& out_path) {
  try {
    generate(o);
    ADD_FAILURE() << "accepted; expected an error mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(dynamic_cast<const E*>(&e), nullptr) << "wrong error type for '" << needle << "': " << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "expected '" << needle << "' in: " << e.what();
  }
  EXPECT_FALSE(path_exists(out_path)) << out_path << " must not be written";
}

template <typename F>
GenerateOptions with(GenerateOptions o, F edit) {
  edit(o);
  return o;
}

TEST(GenerateTiny, BadArgumentsNameTheRuleAndWriteNothing) {
  const std::string out = temp_dir() + "/cli-bad.png";
  const GenerateOptions base = options(out);
  expect_error(with(base, [](auto& o) { o.width = 100; }), "width must be a multiple of 8, got 100", out);
  expect_error(with(base, [](auto& o) { o.steps = 0; }), "steps must be in [1, 1000], got 0", out);
  expect_error(with(base, [](auto& o) { o.guidance_scale = -1; }), "guidance_scale must be in [0, 100], got -1", out);
  expect_error(with(base, [](auto& o) { o.scheduler = "magic"; }), "--scheduler must be one of", out);
  expect_error(with(base, [](auto& o) { o.width = o.height = 8192; }), "at most 4096", out);
  expect_error(with(base, [](auto& o) { o.model = "/nonexistent/model"; }), "path not found", out);
  expect_error(with(base, [](auto& o) { o.output = "/nonexistent-dir/o.png"; }), "output directory does not exist",
               "/nonexistent-dir/o.png");
  expect_error(with(base, [](auto& o) { o.output = temp_dir() + "/o.jpg"; }), "must end in .png",
               temp_dir() + "/o.jpg");
}

TEST(GenerateTiny, BadFilesNameTheFileAndWriteNothing) {
  const std::string dir = temp_subdir("GenerateTiny-BadFilesNameTheFileAndWriteNothing");
  const std::string out = dir + "/cli-badfile.png";
  std::ofstream(dir + "/notimage.png") << "garbage";
  expect_error(with(options(out), [&](auto& o) { o.init_image = dir + "/notimage.png"; }), "--init-image", out);
  std::ofstream(dir + "/bad.safetensors") << "\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ";
  expect_error<FormatError>(with(options(out), [&](auto& o) { o.model = dir + "/bad.safetensors"; }), "safetensors",
                            out);
  expect_error<FormatError>(with(options(out), [&](auto& o) { o.init_latents = dir + "/bad.safetensors"; }),
                            "safetensors", out);
  io::save_safetensors(dir + "/wrong.safetensors", {{"latents", at::zeros({1, 4, 3, 3})}});
  expect_error(with(options(out),
                    [&](auto& o) {
                      o.init_latents = dir + "/wrong.safetensors";
                      o.steps = 2;
                    }),
               "init latents must have shape", out);
}

TEST(GenerateTiny, SeededRunReproducesAndWritesMetadata) {
  const std::string dir = temp_subdir("GenerateTiny-SeededRunReproducesAndWritesMetadata");
  GenerateOptions a = options(dir + "/a.png");
  a.prompt = "a café ☕ at night";
  a.steps = 3;
  a.seed = 2718281828ull;
  a.width = 48;
  a.height = 32;
  a.scheduler = "euler_a";
  a.save_latents = dir + "/a.safetensors";
  GenerateOptions b = a;
  b.output = dir + "/b.png";
  b.save_latents = dir + "/b.safetensors";
  const GenerateResult ra = generate(a);
  EXPECT_EQ(ra.seed, 2718281828ull);
  EXPECT_EQ(ra.images, std::vector<std::string>{dir + "/a.png"});
  generate(b);
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

TEST(GenerateTiny, InitLatentsRoundTripAndNumImages) {
  const std::string dir = temp_subdir("GenerateTiny-InitLatentsRoundTripAndNumImages");
  io::save_safetensors(dir + "/noise.safetensors", {{"latents", at::randn({2, 4, 8, 8})}});
  GenerateOptions o = options(dir + "/multi.png");
  o.steps = 2;
  o.num_images = 2;
  o.width = o.height = 64;
  o.init_latents = dir + "/noise.safetensors";
  const GenerateResult r = generate(o);
  EXPECT_EQ(r.images, (std::vector<std::string>{dir + "/multi-0.png", dir + "/multi-1.png"}));
  EXPECT_TRUE(path_exists(dir + "/multi-0.png"));
  EXPECT_TRUE(path_exists(dir + "/multi-1.png"));
}

// A single-file checkpoint with --config gives what its diffusers folder gives (the fixture's pair of files).
TEST(GenerateGolden, SingleFileCheckpointMatchesDiffusersFolder) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = temp_subdir("GenerateGolden-SingleFileCheckpointMatchesDiffusersFolder");
  const std::string folder = fixture_model("sd15");
  const std::string single = folder + "/ldm/sd15.safetensors";
  GenerateOptions a = options(dir + "/folder.png");
  a.model = folder;
  a.prompt = "a lighthouse";
  a.steps = 3;
  a.seed = 7;
  GenerateOptions b = a;
  b.model = single;
  b.config_dir = folder;
  b.output = dir + "/single.png";
  generate(a);
  generate(b);
  EXPECT_EQ(load_image(dir + "/folder.png", "a").data, load_image(dir + "/single.png", "b").data);
  // Without a tokenizer source the single file cannot run: a clear error.
  GenerateOptions c = a;
  c.model = single;
  c.output = dir + "/none.png";
  EXPECT_THROW(generate(c), Error);
  EXPECT_FALSE(path_exists(dir + "/none.png"));
}
}  // namespace
}  // namespace dmx::test

namespace dmx::test {
namespace {
TEST(MetadataUnit, ParsesA1111Parameters) {
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

// ---------------------------------------------------------------- the commands

void expect_exit2(const std::vector<std::string>& args, const std::string& needle, const std::string& out_path) {
  CliRun r = dmx_run(args);
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_EQ(r.output.rfind("error: ", 0), 0u) << r.output;
  EXPECT_NE(r.output.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.output;
  EXPECT_FALSE(path_exists(out_path)) << out_path << " must not be written";
}

// Usage, the parser's own rules (every one before the model is loaded), an error from the API (exit 2, as every
// dmx::Error), and a run: exit 0, "wrote FILE" and the seed on stderr, nothing at all with --quiet.
TEST(GenerateCli, UsageArgumentsAndExitCodes) {
  CliRun r = dmx_run({"generate", "--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.output.find("--guidance-scale"), std::string::npos);
  EXPECT_EQ(dmx_run({}).code, 2);
  CliRun bad = dmx_run({"frobnicate"});
  EXPECT_EQ(bad.code, 2);
  EXPECT_NE(bad.output.find("unknown command 'frobnicate'"), std::string::npos);
  const std::string out = temp_subdir("GenerateCli-UsageArgumentsAndExitCodes") + "/cli-gen.png";
  const std::vector<std::string> base = {"generate", "--model", model(),   "--prompt", "x",
                                         "--output", out,       "--steps", "2"};
  auto with_args = [&](std::vector<std::string> extra) {
    auto v = base;
    v.insert(v.end(), extra.begin(), extra.end());
    return v;
  };
  expect_exit2(with_args({"--width", "abc"}), "--width must be an integer, got 'abc'", out);
  expect_exit2(with_args({"--seed", "-5"}), "--seed must be an integer in [0, 2^64-1]", out);
  expect_exit2(with_args({"--strength", "0.5"}), "--strength needs --init-image", out);
  expect_exit2(with_args({"--background", "pixel"}), "--background needs --mask", out);
  expect_exit2(with_args({"--frobnicate"}), "unknown option --frobnicate", out);
  expect_exit2({"generate", "--model", model(), "--output", out}, "--prompt is required", out);
  expect_exit2(with_args({"--scheduler", "magic"}), "--scheduler must be one of", out);  // the API's check
  r = dmx_run(with_args({"--seed", "5", "--width", "32", "--height", "32"}));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("wrote " + out), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("seed 5, "), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find('\033'), std::string::npos) << "no escape codes when output is not a terminal";
  r = dmx_run(with_args({"--seed", "5", "--width", "32", "--height", "32", "--quiet"}));
  EXPECT_EQ(r.code, 2) << "an existing output needs --overwrite: " << r.output;
  EXPECT_NE(r.output.find("already exists; pass --overwrite"), std::string::npos) << r.output;
  r = dmx_run(with_args({"--seed", "5", "--width", "32", "--height", "32", "--quiet", "--overwrite"}));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(r.output, "") << "--quiet prints nothing";
}

// `dmx info` prints the parameters of a PNG dmx wrote, and `--from` re-runs them to the same pixels.
TEST(InfoCli, InfoAndFromReproduceTheImage) {
  const std::string dir = temp_subdir("InfoCli-InfoAndFromReproduceTheImage");
  CliRun r = dmx_run({"generate",
                      "--model",
                      model(),
                      "--prompt",
                      "a blue bird",
                      "--negative-prompt",
                      "fog",
                      "--steps",
                      "3",
                      "--seed",
                      "99",
                      "--scheduler",
                      "dpmpp_2m_karras",
                      "--width",
                      "40",
                      "--height",
                      "56",
                      "--output",
                      dir + "/orig.png",
                      "--quiet"});
  ASSERT_EQ(r.code, 0) << r.output;
  CliRun info = dmx_run({"info", dir + "/orig.png"});
  ASSERT_EQ(info.code, 0) << info.output;
  EXPECT_NE(info.output.find("Negative prompt: fog"), std::string::npos) << info.output;
  EXPECT_NE(info.output.find("Sampler: DPM++ 2M Karras"), std::string::npos) << info.output;
  EXPECT_NE(info.output.find("Model hash: " + model_hash(model())), std::string::npos) << info.output;
  CliRun again =
      dmx_run({"generate", "--model", model(), "--from", dir + "/orig.png", "--output", dir + "/again.png", "--quiet"});
  ASSERT_EQ(again.code, 0) << again.output;
  EXPECT_EQ(load_image(dir + "/orig.png", "a").data, load_image(dir + "/again.png", "b").data);
  CliRun noinfo = dmx_run({"info", dir + "/nothing.png"});
  EXPECT_EQ(noinfo.code, 2);
  std::ofstream(dir + "/plain.txt") << "text";
  CliRun notpng = dmx_run({"info", dir + "/plain.txt"});
  EXPECT_EQ(notpng.code, 2);
  EXPECT_NE(notpng.output.find("not a PNG file"), std::string::npos) << notpng.output;
}
}  // namespace
}  // namespace dmx::test
