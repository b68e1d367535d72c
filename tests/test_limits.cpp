// Bounded inputs and loud failures (issue 13, items 4-9, 12, 13; docs/limits.md): every input's size is known
// and checked against a stated limit before memory is spent, non-regular files are refused without blocking,
// NaN/Inf never becomes a silent black picture, errors name the input and exit 2 (1 for I/O failures), and
// text from files never reaches the terminal raw.
#include <ATen/ATen.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "core/fs.h"
#include "core/image.h"
#include "core/text.h"
#include "dmx/convert.h"
#include "dmx/dmx.h"
#include "dmx/train.h"
#include "io/safetensors.h"
#include "loaders/lora_loader.h"
#include "loaders/model_bundle.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text_model.h"
#include "models/clip_tokenizer.h"
#include "models/controlnet.h"
#include "models/unet_2d_condition.h"
#include "pipelines/controlnet.h"
#include "pipelines/stable_diffusion.h"
#include "schedulers/scheduler.h"
#include "test_util.h"
#include "tiny_models.h"
#include "training/dataset.h"
#include "training/lora_train.h"
#include "training/trainer.h"

namespace fs = std::filesystem;
using namespace dmx;
using namespace dmx::test;

namespace {

std::string fresh(const std::string& name) {
  const std::string d = temp_dir() + "/limits-" + name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct CliOut {
  int code = -1;
  std::string out, err;
};

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The dmx binary with stdout and stderr apart, under a time limit (a run that would block on a FIFO or read
// /dev/urandom forever ends as exit 124 instead of hanging the suite). `prefix` runs first in the same shell
// (ulimit, trap).
CliOut run(const std::vector<std::string>& args, const std::string& prefix = "") {
  static int counter = 0;
  const std::string base = temp_dir() + "/limits-run" + std::to_string(counter++);
  std::string cmd = "timeout 300 " + quote(cli_path());
  for (const auto& a : args) cmd += " " + quote(a);
  cmd += " >" + base + ".out 2>" + base + ".err </dev/null";
  if (!prefix.empty()) cmd = prefix + "; " + cmd;
  const int status = std::system(("sh -c " + quote(cmd)).c_str());
  CliOut r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(base + ".out");
  r.err = slurp(base + ".err");
  return r;
}

void expect_exit(const CliOut& r, int code, const std::vector<std::string>& needles) {
  EXPECT_EQ(r.code, code) << r.err;
  for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "expected '" << n << "' in: " << r.err;
}

template <typename E, typename F>
void expect_throw(F f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "expected an exception naming " << (needles.empty() ? "" : needles[0]);
  } catch (const E& e) {
    for (const auto& n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "expected '" << n << "' in: " << e.what();
  }
}

// The tiny random sd15 model (tests/tiny_models.h): every case here needs a model, not the reference numbers.
std::string model() { return tiny_model_dir("sd15"); }

// A copy of a tiny model made of symlinks, leaving out `replace` (relative paths) for the caller to fill.
std::string model_copy(const std::string& name, const std::vector<std::string>& replace,
                       const std::string& variant = "sd15") {
  const std::string src = tiny_model_dir(variant), dst = fresh(name);
  auto replaced = [&](const std::string& rel) {
    return std::find(replace.begin(), replace.end(), rel) != replace.end();
  };
  for (const auto& e : fs::directory_iterator(src)) {
    const std::string entry = e.path().filename().string();
    if (replaced(entry)) continue;
    if (e.is_directory()) {
      fs::create_directories(dst + "/" + entry);
      for (const auto& f : fs::directory_iterator(e.path()))
        if (!replaced(entry + "/" + f.path().filename().string()))
          fs::create_symlink(f.path(), dst + "/" + entry + "/" + f.path().filename().string());
    } else {
      fs::create_symlink(e.path(), dst + "/" + entry);
    }
  }
  return dst;
}

// `dmx generate` on the tiny model with small defaults; an option given in `extra` replaces its default.
std::vector<std::string> gen(const std::string& out, std::vector<std::string> extra = {}, const std::string& m = "") {
  auto given = [&](const char* flag) { return std::find(extra.begin(), extra.end(), flag) != extra.end(); };
  std::vector<std::string> v = {"generate", "--model", m.empty() ? model() : m, "--prompt", "x", "--output", out};
  if (!given("--steps")) v.insert(v.end(), {"--steps", "2"});
  if (!given("--seed")) v.insert(v.end(), {"--seed", "1"});
  if (!given("--width") && !given("--init-image")) v.insert(v.end(), {"--width", "32", "--height", "32"});
  v.insert(v.end(), extra.begin(), extra.end());
  return v;
}

// ---- PNG / JPEG bytes with any header

std::string be32(uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8), static_cast<char>(v)};
}
std::string chunk(const std::string& type, const std::string& data) {
  const std::string td = type + data;
  return be32(static_cast<uint32_t>(data.size())) + td +
         be32(static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(td.data()), static_cast<uInt>(td.size()))));
}
// An RGB PNG of w x h declared pixels; `idat` is the compressed stream (a real one, or garbage).
std::string png_bytes(uint32_t w, uint32_t h, const std::string& idat) {
  std::string ihdr = be32(w) + be32(h) + std::string("\x08\x02\x00\x00\x00", 5);
  return std::string("\x89PNG\r\n\x1a\n", 8) + chunk("IHDR", ihdr) + chunk("IDAT", idat) + chunk("IEND", "");
}
// A real PNG of w x h gray (128) RGB pixels, compressed row by row (a 5000 x 5000 picture is 75 MB raw, ~100 KB).
std::string real_png(uint32_t w, uint32_t h) {
  z_stream z{};
  deflateInit(&z, 9);
  std::string row(1 + 3 * static_cast<size_t>(w), '\x80'), out;
  row[0] = 0;
  std::vector<unsigned char> buf(1 << 16);
  for (uint32_t y = 0; y < h; ++y) {
    z.next_in = reinterpret_cast<Bytef*>(row.data());
    z.avail_in = static_cast<uInt>(row.size());
    const int flush = y + 1 == h ? Z_FINISH : Z_NO_FLUSH;
    do {
      z.next_out = buf.data();
      z.avail_out = static_cast<uInt>(buf.size());
      deflate(&z, flush);
      out.append(reinterpret_cast<char*>(buf.data()), buf.size() - z.avail_out);
    } while (z.avail_out == 0);
  }
  deflateEnd(&z);
  return png_bytes(w, h, out);
}
// A JPEG that declares w x h (3 components) in its frame header, followed by garbage instead of scan data.
std::string jpeg_bytes(uint16_t w, uint16_t h) {
  std::string s = "\xFF\xD8";
  s += std::string("\xFF\xE0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00", 18);
  s += std::string("\xFF\xC0\x00\x11\x08", 5) + static_cast<char>(h >> 8) + static_cast<char>(h & 0xFF) +
       static_cast<char>(w >> 8) + static_cast<char>(w & 0xFF) +
       std::string("\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01", 10);
  s += std::string(64, '\x55') + "\xFF\xD9";
  return s;
}

double module_parameters(const torch::nn::Module& m) {
  double n = 0;
  for (const auto& p : m.parameters()) n += static_cast<double>(p.numel());
  return n;
}

// A config of the tiny models (tests/data/tiny-sd: the fixtures' architectures); the ControlNet's is the one
// tiny_controlnet_dir wrote.
nlohmann::json tiny_json(const std::string& variant, const std::string& rel) {
  const std::string path = rel == "controlnet/config.json" ? tiny_controlnet_dir(variant) + "/config.json"
                                                           : tiny_config_dir(variant) + "/" + rel;
  return nlohmann::json::parse(read_text_file(path, "config", kMaxJsonFileBytes));
}

}  // namespace

// ================================================================= item 6: non-regular files

TEST(LimitsFsUnit, OnlyRegularFilesAreReadAndWithinTheirCap) {
  const std::string d = fresh("fs");
  expect_throw<InvalidArgument>([] { read_text_file("/dev/urandom", "--from", kMaxJsonFileBytes); },
                                {"--from", "character device", "/dev/urandom"});
  fs::create_symlink("/dev/zero", d + "/config.json");
  expect_throw<InvalidArgument>([&] { read_text_file(d + "/config.json", "unet config", kMaxJsonFileBytes); },
                                {"unet config", "character device"});
  ASSERT_EQ(::mkfifo((d + "/fifo").c_str(), 0644), 0);
  expect_throw<InvalidArgument>([&] { read_text_file(d + "/fifo", "--prompts", kMaxJsonFileBytes); }, {"a FIFO"});
  expect_throw<InvalidArgument>([&] { read_text_file(d, "x", kMaxJsonFileBytes); }, {"a directory"});
  expect_throw<InvalidArgument>([&] { read_text_file(d + "/none", "x", kMaxJsonFileBytes); }, {"file not found"});
  write(d + "/big.txt", std::string(100, 'a'));
  expect_throw<InvalidArgument>([&] { read_text_file(d + "/big.txt", "caption", 64); },
                                {"caption", "100 bytes", "more than the 64 bytes limit"});
  EXPECT_EQ(read_text_file(d + "/big.txt", "caption", 100), std::string(100, 'a'));
  // Image headers and safetensors go through the same open.
  expect_throw<InvalidArgument>([&] { read_image_header(d + "/fifo", "--init-image"); }, {"--init-image", "a FIFO"});
  expect_throw<InvalidArgument>([&] { io::SafeTensorsFile::open(d + "/fifo"); }, {"a FIFO"});
}

TEST(LimitsCli, DevicesFifosAndLinksToThemExit2WithoutBlocking) {
  const std::string d = fresh("cli-fs");
  ASSERT_EQ(::mkfifo((d + "/fifo.png").c_str(), 0644), 0);
  expect_exit(run({"info", "/dev/urandom"}), 2, {"/dev/urandom", "character device"});
  expect_exit(run({"info", d + "/fifo.png"}), 2, {"a FIFO"});
  expect_exit(run(gen(d + "/o.png", {"--from", "/dev/zero"})), 2, {"/dev/zero", "character device"});
  expect_exit(run(gen(d + "/o.png", {"--init-image", d + "/fifo.png"})), 2, {"--init-image", "a FIFO"});
  expect_exit(run(gen(d + "/o.png", {"--init-latents", "/dev/zero"})), 2, {"character device"});
  // A model folder whose unet/config.json (then vocab.json) is a symlink to a device.
  const std::string m = model_copy("dev-config", {"unet/config.json"});
  fs::create_symlink("/dev/urandom", m + "/unet/config.json");
  expect_exit(run(gen(d + "/o.png", {}, m)), 2, {"unet config", "character device"});
  const std::string t = model_copy("dev-vocab", {"tokenizer/vocab.json"});
  fs::create_symlink("/dev/zero", t + "/tokenizer/vocab.json");
  expect_exit(run(gen(d + "/o.png", {}, t)), 2, {"vocab", "character device"});
  EXPECT_FALSE(fs::exists(d + "/o.png"));
}

// ================================================================= item 5: image headers first

TEST(LimitsImageUnit, HeaderIsReadAndCheckedBeforeDecoding) {
  const Image small{40, 30, 3, std::vector<uint8_t>(40 * 30 * 3, 9)};
  const std::vector<uint8_t> png = encode_png(small);
  const ImageHeader h = read_image_header(png.data(), png.size(), "x");
  EXPECT_EQ(h.format, "PNG");
  EXPECT_EQ(h.width, 40);
  EXPECT_EQ(h.height, 30);
  EXPECT_EQ(h.channels, 3);
  const std::string jpg = jpeg_bytes(5000, 4000);
  const ImageHeader j = read_image_header(reinterpret_cast<const uint8_t*>(jpg.data()), jpg.size(), "x");
  EXPECT_EQ(j.format, "JPEG");
  EXPECT_EQ(j.width, 5000);
  EXPECT_EQ(j.height, 4000);
  // Over the limit: refused from the header with the limit and the memory decoding would take (garbage pixel
  // data: a decoder that ran first would fail differently).
  const std::string big = png_bytes(5000, 5000, std::string(200, '\x33'));
  expect_throw<InvalidArgument>(
      [&] { decode_image(reinterpret_cast<const uint8_t*>(big.data()), big.size(), "--init-image"); },
      {"--init-image", "5000x5000", "25.0 megapixels", "75.0 MB", "limit of 16.8 megapixels (4096x4096)"});
  expect_throw<InvalidArgument>(
      [&] { decode_image(reinterpret_cast<const uint8_t*>(jpg.data()), jpg.size(), "--control-image"); },
      {"--control-image", "JPEG image is 5000x4000", "megapixels"});
  // Within a caller's own limit the same header passes on to the decoder.
  expect_throw<InvalidArgument>(
      [&] { decode_image(reinterpret_cast<const uint8_t*>(big.data()), big.size(), "--data", kMaxDatasetImagePixels); },
      {"corrupt PNG"});
}

TEST(LimitsCli, OversizedControlAndTrainingImagesAreRefused) {
  const std::string d = fresh("big-images");
  write(d + "/big.png", real_png(5000, 5000));  // 25 megapixels, a real picture of ~100 KB
  // Resized to the output size it used to be accepted (decoded in full first).
  expect_exit(run(gen(d + "/o.png", {"--controlnet", tiny_controlnet_dir("sd15"), "--control-image", d + "/big.png"})),
              2, {"--control-image", "5000x5000", "limit of 16.8 megapixels"});
  EXPECT_FALSE(fs::exists(d + "/o.png"));
  // Training images have their own, larger limit (8192 x 8192), also read from the header: a 9000 x 9000 row is
  // a bad row.
  const std::string data = fresh("big-data");
  save_png(data + "/a.png", Image{32, 32, 3, std::vector<uint8_t>(32 * 32 * 3, 50)});
  write(data + "/b.png", png_bytes(9000, 9000, std::string(100, '\x01')));
  write(data + "/a.txt", "a");
  write(data + "/b.txt", "b");
  training::DatasetOptions o;
  o.dir = data;
  o.resolution = 32;
  expect_throw<InvalidArgument>([&] { training::ImageCaptionDataset ds(o); }, {"b.png", "9000x9000", "megapixels"});
}

// ================================================================= item 7: model configs

TEST(LimitsConfigTiny, IntegersAreExactAndEveryFieldIsBounded) {
  const auto unet = tiny_json("sd15", "unet/config.json");
  auto with = [](nlohmann::json j, const char* k, const nlohmann::json& v) {
    j[k] = v;
    return j;
  };
  using models::UNet2DConditionConfig;
  expect_throw<FormatError>([&] { UNet2DConditionConfig::from_json(with(unet, "layers_per_block", 1000)); },
                            {"layers_per_block must be in [1, 16], got 1000"});
  expect_throw<FormatError>([&] { UNet2DConditionConfig::from_json(with(unet, "cross_attention_dim", 1e9)); },
                            {"cross_attention_dim", "must be an integer"});
  // 2^32 + 32 used to be truncated to 32 (a valid value) without a word.
  expect_throw<FormatError>([&] { UNet2DConditionConfig::from_json(with(unet, "cross_attention_dim", 4294967328ll)); },
                            {"cross_attention_dim", "must be an integer in"});
  expect_throw<FormatError>(
      [&] {
        UNet2DConditionConfig::from_json(with(unet, "block_out_channels", {32, 64, 64, 4294967360ll}));
      },
      {"block_out_channels[3]", "must be an integer in"});
  expect_throw<FormatError>([&] { UNet2DConditionConfig::from_json(with(unet, "attention_head_dim", 8.5)); },
                            {"attention_head_dim", "must be an integer"});
  const auto vae = tiny_json("sd15", "vae/config.json");
  expect_throw<FormatError>([&] { models::AutoencoderKLConfig::from_json(with(vae, "latent_channels", 100000)); },
                            {"latent_channels must be in [1, 64]"});
  const auto te = tiny_json("sd15", "text_encoder/config.json");
  expect_throw<FormatError>([&] { models::CLIPTextConfig::from_json(with(te, "vocab_size", 4294967297ll)); },
                            {"vocab_size", "must be an integer in"});
  expect_throw<FormatError>([&] { models::CLIPTextConfig::from_json(with(te, "num_hidden_layers", 100000)); },
                            {"num_hidden_layers must be in [1, 128]"});
  const auto cn = tiny_json("sd15", "controlnet/config.json");
  expect_throw<FormatError>(
      [&] {
        models::ControlNetConfig::from_json(with(cn, "conditioning_embedding_out_channels", {16, 1 << 20}));
      },
      {"conditioning_embedding_out_channels[1] must be in [1, 8192]"});
  // Every field within its range, but together more parameters than the limit: refused from the numbers alone.
  nlohmann::json huge = unet;
  huge["block_out_channels"] = {8192, 8192, 8192, 8192};
  huge["layers_per_block"] = 16;
  huge["norm_num_groups"] = 32;
  expect_throw<FormatError>([&] { UNet2DConditionConfig::from_json(huge); },
                            {"the UNet config describes", "billion parameters", "more than the limit of 2 billion"});
}

// The parameter count computed from a config equals the constructed module's, for every family and option
// that changes the layout (the check before building relies on it).
TEST(LimitsConfigTiny, ParameterCountsFromConfigsEqualTheModules) {
  for (const std::string variant : {"sd15", "test"}) {
    auto u = models::UNet2DConditionConfig::from_json(tiny_json(variant, "unet/config.json"));
    std::vector<models::UNet2DConditionConfig> unets{u};
    auto v1 = u;
    v1.use_linear_projection = true;
    v1.transformer_layers_per_block = 2;
    v1.layers_per_block = 1;
    unets.push_back(v1);
    auto v2 = u;
    v2.only_cross_attention.assign(u.down_block_types.size(), true);
    v2.layers_per_block = 3;
    v2.in_channels = 9;
    v2.out_channels = 8;
    unets.push_back(v2);
    // models-a's options: per-block only_cross_attention and every class embedding (with and without concat).
    for (const std::string kind : {"", "timestep", "identity", "projection", "simple_projection"}) {
      auto v = u;
      v.only_cross_attention.assign(u.down_block_types.size(), false);
      v.only_cross_attention[0] = true;
      v.class_embed_type = kind;
      if (kind.empty()) v.num_class_embeds = 7;
      if (kind == "projection" || kind == "simple_projection") v.projection_class_embeddings_input_dim = 12;
      unets.push_back(v);
      v.class_embeddings_concat = true;
      unets.push_back(v);
    }
    for (const auto& c : unets) {
      models::UNet2DConditionModel m(c);
      EXPECT_EQ(c.parameter_count(), module_parameters(*m)) << variant;
    }
    auto a = models::AutoencoderKLConfig::from_json(tiny_json(variant, "vae/config.json"));
    auto a2 = a;
    a2.mid_block_add_attention = false;
    a2.layers_per_block = 1;
    a2.latent_channels = 8;
    for (const auto& c : {a, a2}) {
      models::AutoencoderKL m(c);
      EXPECT_EQ(c.parameter_count(), module_parameters(*m)) << variant;
    }
    auto t = models::CLIPTextConfig::from_json(tiny_json(variant, "text_encoder/config.json"));
    models::CLIPTextModel tm(t);
    EXPECT_EQ(t.parameter_count(), module_parameters(*tm)) << variant;
  }
  auto cn = models::ControlNetConfig::from_json(tiny_json("sd15", "controlnet/config.json"));
  auto cn2 = cn;
  cn2.layers_per_block = 1;
  cn2.use_linear_projection = true;
  cn2.conditioning_embedding_out_channels = {8, 16};
  for (const auto& c : {cn, cn2}) {
    models::ControlNetModel m(c);
    EXPECT_EQ(c.parameter_count(), module_parameters(*m));
  }
  // The real architectures too (counts only: building SD 1.5's UNet would take 3.4 GB): 859.52 M, 83.65 M, 123.06 M.
  EXPECT_EQ(models::UNet2DConditionConfig::sd15().parameter_count(), 859520964.0);
  EXPECT_EQ(models::AutoencoderKLConfig::sd15().parameter_count(), 83653863.0);
  EXPECT_EQ(models::CLIPTextConfig::sd15().parameter_count(), 123060480.0);
}

TEST(LimitsCli, ConfigsAreCheckedAgainstTheWeightsBeforeBuilding) {
  const std::string d = fresh("cfg-cli");
  auto unet = tiny_json("sd15", "unet/config.json");
  unet["layers_per_block"] = 16;  // in range, but 8x the layers the weights hold
  const std::string m = model_copy("cfg-mismatch", {"unet/config.json"});
  write(m + "/unet/config.json", unet.dump());
  expect_exit(run(gen(d + "/o.png", {}, m)), 2, {"the config describes a model of", "the weights hold only"});
  unet["layers_per_block"] = 1000;
  write(m + "/unet/config.json", unet.dump());
  expect_exit(run(gen(d + "/o.png", {}, m)), 2, {"layers_per_block must be in [1, 16], got 1000"});
  // dmx init builds from configs alone: bounded by the parameter limit.
  const std::string cfg = model_copy("init-huge", {"unet/config.json"});
  unet["layers_per_block"] = 16;
  unet["block_out_channels"] = {8192, 8192, 8192, 8192};
  write(cfg + "/unet/config.json", unet.dump());
  expect_exit(run({"init", "--config", cfg, "--output", d + "/init-out"}), 2, {"billion parameters", "limit"});
  EXPECT_FALSE(fs::exists(d + "/init-out"));
  EXPECT_FALSE(fs::exists(d + "/o.png"));
}

// ================================================================= item 8: the tokenizer

TEST(LimitsTokenizerUnit, TruncationStopsEarlyAndMatchesTheFullTokenization) {
  const auto tok = models::CLIPTokenizer::from_folder(tiny_tokenizer_dir());
  std::mt19937 rng(7);
  const std::string alphabet = "aeiourstlnmkdhxyz";
  // The heap-based BPE of long words equals transformers' loop.
  for (int trial = 0; trial < 40; ++trial) {
    std::string w;
    const int len = 65 + static_cast<int>(rng() % 600);
    for (int i = 0; i < len; ++i) w += alphabet[rng() % alphabet.size()];
    EXPECT_EQ(tok.bpe_merge(w, false), tok.bpe_merge(w, true)) << w;
  }
  // encode_padded (which stops after the tokens it keeps) equals the full encoding truncated.
  for (int trial = 0; trial < 20; ++trial) {
    std::string text;
    const int words = 1 + static_cast<int>(rng() % 200);
    for (int i = 0; i < words; ++i) {
      const int len = 1 + static_cast<int>(rng() % (trial % 4 == 0 ? 300 : 9));
      for (int k = 0; k < len; ++k) text += alphabet[rng() % alphabet.size()];
      text += (rng() % 7 == 0) ? ", " : (rng() % 11 == 0 ? " <|endoftext|> " : " ");
    }
    std::vector<int64_t> full = tok.encode(text);
    if (full.size() > 77) {
      full.resize(77);
      full.back() = tok.eos_id();
    }
    full.resize(77, tok.pad_id());
    EXPECT_EQ(tok.encode_padded(text, 77), full) << text.substr(0, 200);
  }
  // A text over the limit is refused, stating it.
  expect_throw<InvalidArgument>([&] { tok.encode_padded(std::string(kMaxPromptBytes + 1, 'a'), 77); },
                                {"prompt is 262145 bytes", "256 KiB limit"});
  EXPECT_EQ(tok.encode_padded(std::string(kMaxPromptBytes, 'a'), 77).size(), 77u);  // one 256 KiB word, in O(n log n)
}

TEST(LimitsCli, HugePromptsFromMetadataAreRefused) {
  const std::string d = fresh("prompt");
  const std::string params =
      std::string(3 << 20, 'a') + "\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 32x32";
  save_png(d + "/src.png", Image{8, 8, 3, std::vector<uint8_t>(192, 1)}, {{"parameters", params}});
  expect_exit(run({"generate", "--model", model(), "--from", d + "/src.png", "--output", d + "/o.png"}), 2,
              {"--prompt is 3145728 bytes", "256 KiB limit"});
  EXPECT_FALSE(fs::exists(d + "/o.png"));
}

// ================================================================= item 4: training sizes

TEST(LimitsTrainingCli, RankAndBatchAreBoundedBeforeLoading) {
  const std::string data = fresh("train-sizes");
  const std::string out = data + "/o.safetensors";
  auto args = [&](std::vector<std::string> extra) {
    std::vector<std::string> v{"train", "lora", "--model", tiny_model_dir("test"), "--data", data, "--output", out};
    v.insert(v.end(), extra.begin(), extra.end());
    return v;
  };
  expect_exit(run(args({"--rank", "1000000"})), 2, {"--rank must be in [1, 1024], got 1000000"});
  expect_exit(run(args({"--batch-size", "100000"})), 2, {"--batch-size must be in [1, 1024], got 100000"});
  expect_exit(run(args({"--batch-size", "64", "--resolution", "512"})), 2,
              {"--batch-size x --resolution^2 must be at most 4194304 pixels", "64 x 512^2"});
  expect_exit(run({"train", "dreambooth", "--model", tiny_model_dir("test"), "--instance-data", data,
                   "--instance-prompt", "sks", "--output", out, "--lora-rank", "5000"}),
              2, {"--lora-rank must be in [0, 1024]"});
  EXPECT_FALSE(fs::exists(out));
  EXPECT_NO_THROW(training::check_batch_size(16, 512));
  EXPECT_NO_THROW(training::check_batch_size(1024, 64));
}

TEST(LimitsCli, NetAndLoRACountsAreBounded) {
  const std::string d = fresh("counts");
  std::vector<std::string> nets;
  for (int i = 0; i < 9; ++i)
    nets.insert(nets.end(), {"--controlnet", tiny_controlnet_dir("sd15"), "--control-image", d + "/none.png"});
  expect_exit(run(gen(d + "/o.png", nets)), 2, {"--controlnet may be given at most 8 times, got 9"});
  std::vector<std::string> loras;
  for (int i = 0; i < 65; ++i) loras.insert(loras.end(), {"--lora", tiny_lora_file("sd15", "kohya")});
  expect_exit(run(gen(d + "/o.png", loras)), 2, {"at most 64 LoRAs", "got 65"});
}

// ================================================================= item 9: NaN / Inf

TEST(LimitsFiniteCli, NonFiniteWeightsLatentsAndScalesFailLoudly) {
  const std::string d = fresh("finite");
  // A NaN in one UNet weight: the run fails naming it, and writes nothing.
  io::TensorMap unet = io::load_safetensors(model() + "/unet/diffusion_pytorch_model.safetensors");
  for (auto& [k, v] : unet) v = v.clone();
  unet["conv_out.weight"].view(-1)[0] = std::nanf("");
  const std::string m = model_copy("nan-weights", {"unet/diffusion_pytorch_model.safetensors"});
  io::save_safetensors(m + "/unet/diffusion_pytorch_model.safetensors", unet);
  expect_exit(run(gen(d + "/o.png", {}, m)), 2, {"non-finite", "black", "unet.conv_out.weight"});
  // Inf in --init-latents.
  at::Tensor lat = at::randn({1, 4, 4, 4});
  lat[0][0][0][0] = std::numeric_limits<float>::infinity();
  io::save_safetensors(d + "/lat.safetensors", {{"latents", lat}});
  expect_exit(run(gen(d + "/o.png", {"--init-latents", d + "/lat.safetensors"})), 2, {"--init-latents", "non-finite"});
  // A LoRA scale of 1e30 overflows the merged weights; in runtime mode the latents.
  const std::string lora = tiny_lora_file("sd15", "kohya");
  expect_exit(run(gen(d + "/o.png", {"--lora", lora + ":1e30"})), 2, {"LoRA", "non-finite", "scale"});
  expect_exit(run(gen(d + "/o.png", {"--lora", lora + ":1e30", "--lora-mode", "runtime"})), 2, {"non-finite", "LoRA"});
  EXPECT_FALSE(fs::exists(d + "/o.png"));
  // The check itself: finite output passes, NaN output with clean weights is a plain failure (exit 1).
  auto models = loaders::load_stable_diffusion(model());
  EXPECT_NO_THROW(pipelines::check_finite_output(*models, at::zeros({1, 4, 4, 4}), "latents"));
  at::Tensor bad = at::zeros({1, 4, 4, 4});
  bad[0][1][2][3] = std::nanf("");
  expect_throw<Error>([&] { pipelines::check_finite_output(*models, bad, "the latents"); },
                      {"the latents hold 1 non-finite value(s)", "weights are finite"});
}

TEST(LimitsFiniteTiny, LoRAFilesWithNaNOrRankZeroOrBadPeftConfigAreFormatErrors) {
  auto m = loaders::load_stable_diffusion(tiny_model_dir("test"));
  const std::string k = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
  const at::Tensor down = at::randn({4, 32}) * 0.1, up = at::randn({32, 4}) * 0.1;
  auto apply = [&](io::TensorMap t, const nlohmann::json& peft = nullptr, double scale = 1.0) {
    loaders::apply_lora_tensors(*m, t, {"x.safetensors", scale, scale}, false, peft);
  };
  expect_throw<FormatError>(
      [&] {
        apply({{k + ".lora_down.weight", down}, {k + ".lora_up.weight", up}, {k + ".alpha", at::scalar_tensor(NAN)}});
      },
      {"alpha", "must be finite"});
  at::Tensor nan_up = up.clone();
  nan_up[3][1] = std::numeric_limits<float>::infinity();
  expect_throw<FormatError>(
      [&] {
        apply({{k + ".lora_down.weight", down}, {k + ".lora_up.weight", nan_up}});
      },
      {"lora_up.weight", "non-finite"});
  expect_throw<FormatError>(
      [&] {
        apply({{k + ".lora_down.weight", at::zeros({0, 32})}, {k + ".lora_up.weight", at::zeros({32, 0})}});
      },
      {"rank", "at least 1"});
  const std::string pk = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
  expect_throw<FormatError>(
      [&] {
        apply({{pk + ".lora_A.weight", down}, {pk + ".lora_B.weight", up}}, {{"lora_alpha", "eight"}, {"r", 4}});
      },
      {"lora_alpha", "must be a finite number", "\"eight\""});
  EXPECT_EQ(loaders::count_lora_layers(*m), 0);  // nothing was attached by the refused files
}

TEST(LimitsFiniteUnit, ConvertRefusesValuesTheTargetTypeCannotHold) {
  const std::string d = fresh("convert");
  io::save_safetensors(d + "/ok.safetensors", {{"w", at::full({3}, 60000.0f)}});
  io::save_safetensors(d + "/big.safetensors", {{"w", at::ones({4})}, {"v", at::full({2, 2}, 1e6f)}});
  ConvertOptions o;
  o.input = d + "/ok.safetensors";
  o.output = d + "/ok16.safetensors";
  EXPECT_NO_THROW(convert_weights(o));
  o.input = d + "/big.safetensors";
  o.output = d + "/big16.safetensors";
  expect_throw<InvalidArgument>([&] { convert_weights(o); },
                                {"tensor 'v'", "4 value(s) beyond fp16", "1e+06", "65504"});
  EXPECT_FALSE(fs::exists(o.output));
  o.dtype = "bf16";
  EXPECT_NO_THROW(convert_weights(o));  // bf16 holds 1e6
}

// ================================================================= item 12: errors and exit codes

TEST(LimitsCli, ExitCodesNameTheCause) {
  const std::string d = fresh("exit");
  // fp16 on the CPU: refused up front (libtorch 1.13 has no fp16 CPU kernels), not a LayerNorm error.
  expect_exit(run(gen(d + "/o.png", {"--dtype", "fp16"})), 2, {"--dtype fp16 needs --device cuda", "bf16"});
  // A full disk (here: a file-size limit, SIGXFSZ ignored so that the write fails with EFBIG) is not invalid
  // input: exit 1, for generate as for training.
  const CliOut full = run(gen(d + "/full.png"), "ulimit -f 1; trap '' XFSZ");
  expect_exit(full, 1, {"cannot write"});
  EXPECT_FALSE(fs::exists(d + "/full.png"));
  for (const auto& e : fs::directory_iterator(d)) EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos);
}

TEST(LimitsCli, ResumeChecksItsStateAndSeed) {
  const std::string data = fresh("resume-data");
  for (int i = 0; i < 2; ++i) {
    std::vector<uint8_t> px(32 * 32 * 3);
    for (size_t k = 0; k < px.size(); ++k) px[k] = static_cast<uint8_t>((k * (i + 3)) % 251);
    save_png(data + "/" + std::to_string(i) + ".png", Image{32, 32, 3, px});
    write(data + "/" + std::to_string(i) + ".txt", "a red square");
  }
  const std::string out = fresh("resume") + "/lora.safetensors";
  auto train = [&](std::vector<std::string> extra) {
    std::vector<std::string> v{
        "train", "lora",         "--model", tiny_model_dir("test"), "--data", data,     "--output", out, "--resolution",
        "32",    "--batch-size", "1",       "--checkpoint-every",   "1",      "--quiet"};
    v.insert(v.end(), extra.begin(), extra.end());
    return run(v);
  };
  ASSERT_EQ(train({"--steps", "1", "--seed", "7"}).code, 0);
  const std::string ck = out + ".train/checkpoint-1";
  ASSERT_TRUE(fs::exists(ck + "/trainer_state.json"));
  fs::remove(out);  // the resumed runs write it again (an existing --output would need --overwrite)
  expect_exit(train({"--steps", "2", "--seed", "8", "--resume", ck}), 2,
              {"--resume", "was trained with --seed 7", "this run has --seed 8"});
  const std::string state = slurp(ck + "/trainer_state.json");
  write(ck + "/trainer_state.json", "{\"recipe\": \"lora\", \"global_step\": ");
  expect_exit(train({"--steps", "2", "--seed", "7", "--resume", ck}), 2, {"trainer_state.json", "not valid JSON"});
  auto js = nlohmann::json::parse(state);
  js["global_step"] = "one";
  write(ck + "/trainer_state.json", js.dump());
  expect_exit(train({"--steps", "2", "--seed", "7", "--resume", ck}), 2, {"'global_step' must be an integer"});
  write(ck + "/trainer_state.json", state);
  EXPECT_EQ(train({"--steps", "2", "--seed", "7", "--resume", ck}).code, 0);
}

// ================================================================= item 13

TEST(LimitsTextUnit, TerminalSafeEscapesControlsAndKeepsText) {
  EXPECT_EQ(terminal_safe("plain, \xc3\xa9t\xc3\xa9 \xf0\x9f\x90\x88\nnext\tcol"),
            "plain, \xc3\xa9t\xc3\xa9 \xf0\x9f\x90\x88\nnext\tcol");
  EXPECT_EQ(terminal_safe("a\x1b[31mred\x1b]0;title\x07"), "a\\x1B[31mred\\x1B]0;title\\x07");
  EXPECT_EQ(terminal_safe("cr\rdel\x7f c1:\xc2\x9b bidi:\xe2\x80\xae bad:\xff"),
            "cr\\x0Ddel\\x7F c1:\\x9B bidi:\\u202E bad:\\xFF");
}

TEST(LimitsCli, FileTextNeverReachesTheTerminalRaw) {
  const std::string d = fresh("escapes");
  save_png(d + "/e.png", Image{8, 8, 3, std::vector<uint8_t>(192, 1)},
           {{"parameters", "a \x1b[2J\x1b]0;owned\x07 cat\nSteps: 2, Seed: 1, Size: 8x8"}});
  const CliOut info = run({"info", d + "/e.png"});
  EXPECT_EQ(info.code, 0) << info.err;
  EXPECT_EQ(info.out.find('\x1b'), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("\\x1B[2J"), std::string::npos) << info.out;
  const CliOut err = run(gen(d + "/o.png", {"--init-image", d + "/\x1b[2Jmissing.png"}));
  EXPECT_EQ(err.code, 2);
  EXPECT_EQ(err.err.find('\x1b'), std::string::npos) << err.err;
  EXPECT_NE(err.err.find("\\x1B[2Jmissing.png"), std::string::npos) << err.err;
}

TEST(LimitsLoRAUnit, TagNamesStayInsideTheLoraDir) {
  const std::string root = fresh("lora-dir"), dir = root + "/loras";
  fs::create_directories(dir + "/sub");
  write(root + "/outside.safetensors", "x");
  write(dir + "/in.safetensors", "x");
  write(dir + "/sub/deep.safetensors", "x");
  fs::create_symlink(root + "/outside.safetensors", dir + "/link.safetensors");
  EXPECT_EQ(loaders::resolve_lora_name(dir, "in"), dir + "/in.safetensors");
  EXPECT_EQ(loaders::resolve_lora_name(dir, "sub/deep"), dir + "/sub/deep.safetensors");
  expect_throw<InvalidArgument>([&] { loaders::resolve_lora_name(dir, "../outside"); }, {"inside --lora-dir"});
  expect_throw<InvalidArgument>([&] { loaders::resolve_lora_name(dir, "sub/../../outside"); }, {"'..'"});
  expect_throw<InvalidArgument>([&] { loaders::resolve_lora_name(dir, root + "/outside"); }, {"no absolute path"});
  expect_throw<InvalidArgument>([&] { loaders::resolve_lora_name(dir, "link"); }, {"outside --lora-dir"});
}

TEST(LimitsCli, LoraTagsFromMetadataStayInsideTheLoraDir) {
  const std::string d = fresh("lora-from");
  fs::create_directories(d + "/loras");
  fs::copy_file(tiny_lora_file("sd15", "kohya"), d + "/secret.safetensors");
  save_png(d + "/src.png", Image{8, 8, 3, std::vector<uint8_t>(192, 1)},
           {{"parameters", "a cat <lora:../secret:1>\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 32x32"}});
  expect_exit(run({"generate", "--model", model(), "--from", d + "/src.png", "--lora-dir", d + "/loras", "--output",
                   d + "/o.png"}),
              2, {"../secret", "inside --lora-dir"});
  EXPECT_FALSE(fs::exists(d + "/o.png"));
}

TEST(LimitsDataUnit, SkippedRowsAreReported) {
  const std::string data = fresh("skip");
  save_png(data + "/a.png", Image{32, 32, 3, std::vector<uint8_t>(32 * 32 * 3, 50)});
  write(data + "/metadata.jsonl",
        "{\"file_name\": \"a.png\", \"text\": \"ok\"}\n"
        "{\"file_name\": \"missing.png\", \"text\": \"gone\"}\n"
        "not json\n");
  training::DatasetOptions o;
  o.dir = data;
  o.resolution = 32;
  o.bad_rows = training::BadRows::Skip;
  testing::internal::CaptureStderr();
  training::ImageCaptionDataset ds(o);
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(ds.size(), 1u);
  EXPECT_NE(err.find("skipped 2 bad rows of 3"), std::string::npos) << err;
  EXPECT_NE(err.find("metadata.jsonl:2"), std::string::npos) << err;
  EXPECT_NE(err.find("metadata.jsonl:3"), std::string::npos) << err;
}

TEST(LimitsSchedulerUnit, StepsAreCheckedPerScheduler) {
  const auto cfg = schedulers::parse_scheduler_config(
      read_text_file(tiny_config_dir("sd15") + "/scheduler/scheduler_config.json", "scheduler", kMaxJsonFileBytes));
  for (const auto& name : schedulers::scheduler_names()) {
    SCOPED_TRACE(name);
    auto own = cfg;  // the unCLIP prior's scheduler only takes its own beta schedule
    if (name == "unclip") own["beta_schedule"] = "squaredcos_cap_v2";
    auto s = schedulers::create_scheduler(name, own);
    // With "leading" spacing and steps_offset 1, 1000 steps reach timestep 1000 (or, for DPM-Solver's spacing,
    // repeat one): refused, stating the most steps that work, which must then run to the end.
    int most = 1000;
    try {
      s->set_timesteps(1000);
    } catch (const InvalidArgument& e) {
      const std::string m = e.what();
      const size_t at = m.find("steps must be at most ");
      ASSERT_NE(at, std::string::npos) << m;
      most = std::stoi(m.substr(at + 22));
      EXPECT_GE(most, name == "lcm" ? 50 : 998) << m;  // LCM: at most original_inference_steps
      EXPECT_THROW(s->set_timesteps(most + 1), InvalidArgument);
      s->set_timesteps(most);
    }
    // What set_timesteps accepts runs to the end.
    at::Tensor x = at::randn({1, 4, 2, 2});
    for (int i = 0; i < static_cast<int>(s->timesteps().size()); ++i) {
      const double t = s->timesteps()[static_cast<size_t>(i)];
      const at::Tensor in = s->scale_model_input(x, i);
      x = s->step(in * t / (t + 1), i, x, {}).prev_sample;  // diffusers' dummy model
    }
    EXPECT_TRUE(at::isfinite(x).all().item<bool>());
  }
}

// The command checks the steps before anything is loaded or denoised.
TEST(LimitsSchedulerCli, StepsAreCheckedBeforeDenoising) {
  const std::string d = fresh("steps");
  expect_exit(run(gen(d + "/o.png", {"--steps", "1000", "--scheduler", "pndm"})), 2, {"steps must be at most 999"});
  EXPECT_FALSE(fs::exists(d + "/o.png"));
}

TEST(LimitsNumbersUnit, OneIntegerSyntaxForOptionsAndMetadata) {
  EXPECT_EQ(parse_integer("20", "x", 1, 1000), 20);
  EXPECT_EQ(parse_integer("-3", "x", -5, 5), -3);
  for (const char* bad : {"1e3", "20.0", "+5", " 5", "5 ", "0x10", "", "-", "1_000"})
    expect_throw<InvalidArgument>([&] { parse_integer(bad, "--steps", 1, 1000); }, {"--steps must be an integer"});
  expect_throw<InvalidArgument>([] { parse_integer("1001", "--steps", 1, 1000); }, {"--steps must be in [1, 1000]"});
  EXPECT_EQ(parse_number("7.5", "x"), 7.5);
  EXPECT_EQ(parse_number("1e-3", "x"), 1e-3);
  for (const char* bad : {"nan", "inf", "0x1p3", " 1", "1e999", ""})
    expect_throw<InvalidArgument>([&] { parse_number(bad, "--guidance-scale"); }, {"must be a number"});
  // --from's "Steps: 1e3" follows the same rule as --steps 1e3: both refused.
  expect_throw<InvalidArgument>([] { parse_parameters("a cat\nSteps: 1e3, Seed: 1, Size: 64x64"); },
                                {"parameters: field 'Steps' must be an integer, got '1e3'"});
  EXPECT_EQ(parse_parameters("a cat\nSteps: 20, Seed: 1, Size: 64x64").steps, 20);
}

TEST(LimitsNumbersCli, StepsOfAnotherSyntaxExit2) {
  const CliOut r = run(gen(temp_dir() + "/limits-n.png", {"--steps", "1e3"}));
  expect_exit(r, 2, {"--steps must be an integer, got '1e3'"});
}

TEST(LimitsControlNetUnit, MapSizeRoundsDownToAMultipleOf8) {
  EXPECT_EQ(pipelines::control_size_multiple(4), 8);
  EXPECT_EQ(pipelines::control_size_multiple(8), 8);
  EXPECT_EQ(pipelines::control_size_multiple(16), 16);
  const Image map{100, 60, 3, std::vector<uint8_t>(100 * 60 * 3, 0)};
  EXPECT_EQ(pipelines::default_control_size(map, 4), std::make_pair(96, 56));
  EXPECT_EQ(pipelines::default_control_size(map, 8), std::make_pair(96, 56));
}

TEST(LimitsControlNetCli, MapSizeRoundsDownOnTheEmojiModel) {
  const Image map{100, 60, 3, std::vector<uint8_t>(100 * 60 * 3, 0)};
  // The emoji model's VAE has factor 4: a 100 x 60 map used to give a 100 x 60 size the size check refused.
  const std::string emoji = std::string(DMX_SOURCE_DIR) + "/models/emoji";
  const std::string net = std::string(DMX_SOURCE_DIR) + "/models/emoji-controlnet-canny";
  if (!fs::exists(emoji + "/unet/diffusion_pytorch_model.safetensors") || !fs::exists(net + "/config.json"))
    GTEST_SKIP() << "models/emoji is not in this checkout";
  const std::string d = fresh("cn-size");
  save_png(d + "/map.png", map);
  const CliOut r = run({"generate", "--model", emoji, "--prompt", "x", "--steps", "1", "--seed", "1", "--controlnet",
                        net, "--control-image", d + "/map.png", "--output", d + "/o.png", "--quiet"});
  ASSERT_EQ(r.code, 0) << r.err;
  const Image out = load_image(d + "/o.png", "o");
  EXPECT_EQ(out.width, 96);
  EXPECT_EQ(out.height, 56);
}
