// Hardened inputs: every bad input is rejected (InvalidArgument, FormatError, ...: exit 2 in the CLI) with a
// message naming the parameter, the rule and the value, and writes nothing; fuzz regressions; SHA-256 (NIST
// vectors) and the model hash; UTF-8 prompts; progress and timing output; interrupted runs leave no file behind.
// dmx::generate is called in-process on a tiny random model (tests/tiny_models.h); the binary is started only
// for what needs a process: argument parsing, a terminal, signals.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/fs.h"
#include "core/image.h"
#include "core/sha256.h"
#include "core/utf8.h"
#include "dmx/dmx.h"
#include "io/safetensors.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {

// ---------------------------------------------------------------- helpers

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      std::string n = e->d_name;
      if (n != "." && n != "..") out.push_back(n);
    }
    closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string fresh_dir(const std::string& name) {
  const std::string d = temp_dir() + "/" + name;
  ::mkdir(d.c_str(), 0755);
  return d;
}

struct CliResult {
  int code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs the dmx binary with stdout and stderr captured separately (neither is a terminal).
CliResult dmx(const std::vector<std::string>& args) {
  static int counter = 0;
  const std::string base = temp_dir() + "/run" + std::to_string(counter++);
  std::string cmd;
  auto quote = [](const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
  };
  cmd = quote(cli_path());
  for (const auto& a : args) cmd += " " + quote(a);
  cmd += " >" + base + ".out 2>" + base + ".err </dev/null";
  const int status = std::system(cmd.c_str());
  CliResult r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = read_file(base + ".out");
  r.err = read_file(base + ".err");
  return r;
}

// The tiny sd15-architecture model (seeded random weights), as a diffusers folder.
std::string model() { return tiny_model_dir("sd15"); }

// Exit 2, "error: " + every needle on stderr, and nothing written into out_dir.
void expect_rejected(const std::vector<std::string>& args, const std::vector<std::string>& needles,
                     const std::string& out_dir) {
  const auto before = list_dir(out_dir);
  CliResult r = dmx(args);
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
  for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "expected '" << n << "' in: " << r.err;
  EXPECT_EQ(list_dir(out_dir), before) << "a rejected run must write nothing";
}

// `dmx generate` on the tiny model with small defaults; options in `extra` replace the defaults.
std::vector<std::string> gen(const std::string& out, std::vector<std::string> extra = {},
                             const std::string& model_path = "") {
  std::vector<std::string> v = {"generate", "--model", model_path.empty() ? model() : model_path, "--output", out};
  const std::vector<std::pair<std::string, std::string>> defaults = {
      {"--prompt", "x"}, {"--steps", "2"}, {"--width", "32"}, {"--height", "32"}, {"--seed", "1"}};
  for (const auto& [flag, value] : defaults) {
    if (std::find(extra.begin(), extra.end(), flag) != extra.end()) continue;
    if (flag == "--width" || flag == "--height") {
      if (std::find(extra.begin(), extra.end(), "--init-image") != extra.end()) continue;
    }
    v.push_back(flag);
    v.push_back(value);
  }
  v.insert(v.end(), extra.begin(), extra.end());
  return v;
}

// A copy of the model's diffusers folder made of symlinks, with `replace` (relative paths) left out
// so that the caller can put a broken file there.
std::string model_copy(const std::string& name, const std::vector<std::string>& replace) {
  const std::string src = model();
  const std::string dst = fresh_dir(name);
  auto replaced = [&](const std::string& rel) {
    return std::find(replace.begin(), replace.end(), rel) != replace.end();
  };
  for (const auto& entry : list_dir(src)) {
    const std::string s = src + "/" + entry, d = dst + "/" + entry;
    if (replaced(entry)) continue;
    if (is_directory(s)) {
      ::mkdir(d.c_str(), 0755);
      for (const auto& f : list_dir(s)) {
        if (replaced(entry + "/" + f)) continue;
        EXPECT_EQ(::symlink((s + "/" + f).c_str(), (d + "/" + f).c_str()), 0);
      }
    } else {
      EXPECT_EQ(::symlink(s.c_str(), d.c_str()), 0);
    }
  }
  return dst;
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(n >> (8 * i));
  return s;
}

std::string safetensors_bytes(const std::string& header, size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\x01');
}

// ---------------------------------------------------------------- SHA-256

TEST(HardeningSha256Unit, NistVectors) {
  // FIPS 180-2 appendix B / NIST CSRC examples.
  EXPECT_EQ(sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(sha256_hex(two_blocks.data(), two_blocks.size()),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  const std::string long_msg =
      "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrst"
      "u";
  EXPECT_EQ(sha256_hex(long_msg.data(), long_msg.size()),
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
  const std::string million(1000000, 'a');
  EXPECT_EQ(sha256_hex(million.data(), million.size()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // Streaming in odd pieces (crossing block boundaries everywhere) gives the same digest.
  Sha256 h;
  size_t pos = 0, step = 1;
  while (pos < million.size()) {
    const size_t n = std::min(step, million.size() - pos);
    h.update(million.data() + pos, n);
    pos += n;
    step = step * 7 % 131 + 1;
  }
  EXPECT_EQ(h.hex_digest(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // 55, 56 and 64 bytes: the padding edge cases.
  for (size_t n : {55u, 56u, 63u, 64u, 65u}) {
    const std::string s(n, 'q');
    Sha256 a;
    a.update(s.data(), s.size());
    Sha256 b;
    for (char c : s) b.update(&c, 1);
    EXPECT_EQ(a.hex_digest(), b.hex_digest()) << n;
  }
}

TEST(HardeningSha256Unit, FileStreamsAndModelHash) {
  const std::string path = temp_dir() + "/hash-me.bin";
  std::string bytes(3 * (1 << 20) + 12345, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 131 + (i >> 11));
  write_file(path, bytes);
  EXPECT_EQ(sha256_file(path), sha256_hex(bytes.data(), bytes.size()));
  EXPECT_EQ(model_hash(path), sha256_hex(bytes.data(), bytes.size()).substr(0, 10));
  EXPECT_THROW(sha256_file(temp_dir() + "/missing.bin"), InvalidArgument);
  std::atomic<bool> cancel{true};
  EXPECT_EQ(sha256_file(path, &cancel), "");
}

// ---------------------------------------------------------------- UTF-8

TEST(HardeningTextUnit, Utf8Validation) {
  for (const std::string ok : {"", "plain ascii", "caf\xc3\xa9", "\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\xab",  // CJK
                               "\xf0\x9f\x90\x88\xe2\x80\x8d\xe2\xac\x9b",                                // emoji ZWJ
                               "\xd7\xa9\xd7\x9c\xd7\x95\xd7\x9d \xd8\xb3\xd9\x84\xd8\xa7\xd9\x85",  // Hebrew, Arabic
                               "e\xcc\x81\xcc\xa7", "\xf4\x8f\xbf\xbf"}) {  // combining, U+10FFFF
    EXPECT_EQ(find_invalid_utf8(ok), std::string::npos) << ok;
    EXPECT_NO_THROW(check_text(ok, "--prompt"));
  }
  const std::vector<std::pair<std::string, size_t>> bad = {
      {"ab\xff", 2},           {"\xc0\x80", 0},         // overlong NUL
      {"x\xed\xa0\x80", 1},    {"\xe2\x82", 0},         // surrogate, truncated
      {"\xf4\x90\x80\x80", 0}, {"ok\x80", 2},           // > U+10FFFF, lone continuation
      {"\xe0\x9f\xbf", 0},     {"\xf0\x8f\xbf\xbf", 0}  // overlong 3- and 4-byte
  };
  for (const auto& [s, off] : bad) EXPECT_EQ(find_invalid_utf8(s), off);
  try {
    check_text("ab\xff", "--prompt");
    ADD_FAILURE() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_STREQ(e.what(), "--prompt must be valid UTF-8 text; invalid byte 0xff at offset 2");
  }
  try {
    check_text(std::string("a\0b", 3), "--negative-prompt");
    ADD_FAILURE() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--negative-prompt must not contain NUL bytes"), std::string::npos);
  }
}

// Parameters come from any PNG given to --from: numbers that do not fit are errors, never casts
// with undefined behaviour.
TEST(HardeningTextUnit, ParametersWithAbsurdNumbers) {
  const std::string head = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, ";
  for (const std::string tail :
       {"Seed: 1, Size: 1e300x64", "Seed: 1, Size: 64x-1e10", "Seed: 1, Size: 64.5x64", "Seed: 1, Size: nanx64",
        "Seed: 99999999999999999999999, Size: 64x64", "Seed: -1, Size: 64x64", "Seed: 1, Size: 64x64, Clip skip: 1e40",
        "Seed: 1, Size: 64x64, Batch size: inf", "Seed: 1, Size: 64x64, Clip skip: -2147483648",
        "Seed: 1, Size: 64x64, Clip skip: 0"}) {
    EXPECT_THROW(parse_parameters(head + tail), InvalidArgument) << tail;
  }
  EXPECT_THROW(parse_parameters("p\nSteps: 1e300, Seed: 1"), InvalidArgument);
  GenerateOptions o = parse_parameters(head + "Seed: 18446744073709551615, Size: 64x48");
  EXPECT_EQ(*o.seed, 18446744073709551615ull);
  EXPECT_EQ(o.width, 64);
  EXPECT_EQ(o.height, 48);
}

// ---------------------------------------------------------------- images

TEST(HardeningImageUnit, CheckImageSize) {
  Image img;
  img.width = 640;
  img.height = 480;
  img.channels = 1;
  EXPECT_NO_THROW(check_image_size("--mask-image", img, 640, 480));
  try {
    check_image_size("--mask-image", img, 512, 512);
    ADD_FAILURE() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--mask-image must be 512x512 to match the output size, got 640x480"),
              std::string::npos)
        << e.what();
  }
}

std::string corpus(const std::string& kind, const std::string& name) {
  return std::string(DMX_SOURCE_DIR) + "/fuzz/corpus/" + kind + "/" + name;
}

TEST(HardeningImageUnit, SeedCorpusDecodes) {
  const std::string dir = std::string(DMX_SOURCE_DIR) + "/fuzz/corpus/image";
  int good = 0;
  for (const auto& name : list_dir(dir)) {
    const std::string bytes = read_file(dir + "/" + name);
    const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
    if (name.rfind("bad_", 0) == 0 || name.rfind("regress_", 0) == 0) {
      EXPECT_THROW(decode_image(p, bytes.size(), "--init-image"), InvalidArgument) << name;
    } else {
      Image img = decode_image(p, bytes.size(), "--init-image");
      EXPECT_EQ(img.data.size(), static_cast<size_t>(img.width) * img.height * img.channels) << name;
      ++good;
    }
  }
  EXPECT_GE(good, 15);
  // Text chunks survive (parameters in tEXt, a UTF-8 comment in compressed iTXt).
  const std::string png = read_file(dir + "/rgb8.png");
  TextChunks text = read_png_text(reinterpret_cast<const uint8_t*>(png.data()), png.size(), "rgb8.png");
  ASSERT_EQ(text.size(), 2u);
  EXPECT_EQ(text[0].first, "parameters");
  EXPECT_EQ(text[1].second, "caf\xc3\xa9 \xe2\x98\x95");
}

// Regression: libjpeg only warns about a truncated file and fills the rest with gray; it used to
// decode "successfully". PIL refuses it, and so must we.
TEST(HardeningImageUnit, TruncatedJpegIsAnError) {
  const std::string bytes = read_file(corpus("image", "baseline_420.jpg"));
  for (size_t keep : {bytes.size() - 2, bytes.size() * 3 / 4, bytes.size() / 2, size_t(200), size_t(20), size_t(3)}) {
    try {
      decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), keep, "--init-image");
      ADD_FAILURE() << "truncated to " << keep << " bytes decoded";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("--init-image: corrupt JPEG"), std::string::npos) << e.what();
    }
  }
  const std::string prog = read_file(corpus("image", "progressive_420.jpg"));
  EXPECT_THROW(decode_image(reinterpret_cast<const uint8_t*>(prog.data()), prog.size() * 2 / 3, "x"), InvalidArgument);
}

TEST(HardeningImageUnit, TruncatedPngIsAnError) {
  const std::string bytes = read_file(corpus("image", "rgb8.png"));
  for (size_t keep : {bytes.size() - 1, bytes.size() - 12, bytes.size() / 2, size_t(40), size_t(9)}) {
    EXPECT_THROW(decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), keep, "--init-image"), InvalidArgument)
        << keep;
  }
}

// Regression: a 100-byte PNG claiming 16384x16384 pixels made the decoder allocate 1 GiB before it
// found out that the data was missing. Now the declared size is checked against the file size.
TEST(HardeningImageUnit, LyingPngHeaderIsRejectedBeforeAllocating) {
  std::string bytes = read_file(corpus("image", "rgb8.png"));
  // Width and height 16000 with a correct IHDR CRC, so that libpng accepts the header.
  const uint8_t dims[8] = {0, 0, 0x3e, 0x80, 0, 0, 0x3e, 0x80};
  std::memcpy(&bytes[16], dims, 8);
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 12; i < 29; ++i) {
    crc ^= static_cast<uint8_t>(bytes[i]);
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1)));
  }
  crc ^= 0xFFFFFFFFu;
  for (int i = 0; i < 4; ++i) bytes[29 + i] = static_cast<char>(crc >> (24 - 8 * i));
  try {
    // Under a pixel limit that lets 16000 x 16000 through, the lie is caught by the data size check.
    decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "--init-image", 16384ll * 16384);
    ADD_FAILURE() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("declares 16000x16000 pixels"), std::string::npos) << e.what();
  }
  // Under the default limit the header alone refuses it.
  EXPECT_THROW(decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "--init-image"),
               InvalidArgument);
}

// Regression (fuzz_image timeout): a chunk declaring more bytes than the file holds (here a tEXt
// chunk of 738 MB in a 247-byte file) made libpng allocate the declared size before reading.
TEST(HardeningImageUnit, PngChunkLongerThanTheFileIsRejected) {
  const std::string bytes = read_file(corpus("image", "regress_huge_text_chunk.png"));
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  try {
    decode_image(p, bytes.size(), "--init-image");
    ADD_FAILURE() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--init-image: corrupt PNG: chunk 'tEXt' at byte 33 declares 738197602 bytes"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(read_png_text(p, bytes.size(), "x.png"), InvalidArgument);
  std::string good = read_file(corpus("image", "rgb8.png"));
  good.resize(good.size() - 6);  // IEND cut short
  EXPECT_THROW(decode_image(reinterpret_cast<const uint8_t*>(good.data()), good.size(), "x"), InvalidArgument);
}

TEST(HardeningImageUnit, HugeJpegHeaderIsRejected) {
  std::string bytes = read_file(corpus("image", "baseline_444.jpg"));
  const size_t sof = bytes.find("\xff\xc0");
  ASSERT_NE(sof, std::string::npos);
  bytes[sof + 5] = '\x50', bytes[sof + 6] = '\x00';  // height 20480
  try {
    decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "--init-image");
    ADD_FAILURE() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("larger than the 16384x16384 maximum"), std::string::npos) << e.what();
  }
}

TEST(HardeningImageUnit, CorruptPngTextIsAnError) {
  const std::string bytes = read_file(corpus("image", "rgb8.png"));
  EXPECT_THROW(read_png_text(reinterpret_cast<const uint8_t*>(bytes.data()), 30, "x"), InvalidArgument);
  EXPECT_THROW(read_png_text(reinterpret_cast<const uint8_t*>(bytes.data()), 4, "x"), InvalidArgument);
  std::string bad_crc = bytes;
  bad_crc[20] ^= 1;  // IHDR CRC mismatch
  EXPECT_THROW(read_png_text(reinterpret_cast<const uint8_t*>(bad_crc.data()), bad_crc.size(), "x"), InvalidArgument);
}

// ---------------------------------------------------------------- safetensors

TEST(HardeningSafetensorsUnit, SeedCorpus) {
  const std::string dir = std::string(DMX_SOURCE_DIR) + "/fuzz/corpus/safetensors";
  int valid = 0;
  for (const auto& name : list_dir(dir)) {
    const std::string bytes = read_file(dir + "/" + name);
    std::map<std::string, io::TensorInfo> infos;
    auto parse = [&] {
      io::parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), &infos, nullptr, nullptr);
    };
    if (name.rfind("bad_", 0) == 0) {
      EXPECT_THROW(parse(), FormatError) << name;
      EXPECT_THROW(io::SafeTensorsFile::open(dir + "/" + name), FormatError) << name;
    } else {
      EXPECT_NO_THROW(parse()) << name;
      ++valid;
    }
  }
  EXPECT_GE(valid, 15);
}

// ---------------------------------------------------------------- interrupted writes

// A signal that arrives while an output is being written removes the temporary and still ends the
// process the way the signal would have.
TEST(HardeningFsUnit, SignalDuringWriteRemovesTemporary) {
  const std::string dir = fresh_dir("sigwrite");
  const std::string out = dir + "/out.png";
  for (int sig : {SIGINT, SIGTERM}) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      install_temp_file_cleanup();
      write_file_atomic(out, [&](const std::string& tmp) {
        write_file(tmp, "half an image");
        ::raise(sig);
      });
      _exit(0);  // not reached
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFSIGNALED(status)) << status;
    if (WIFSIGNALED(status)) {
      EXPECT_EQ(WTERMSIG(status), sig);
    }
    EXPECT_EQ(list_dir(dir), std::vector<std::string>{}) << "signal " << sig;
  }
}

// ---------------------------------------------------------------- dmx::generate, bad input by input

// gen()'s options for dmx::generate (what the CLI passes it), on the tiny model unless model_path is given.
GenerateOptions opts(const std::string& out, const std::string& model_path = "") {
  GenerateOptions o;
  o.model = model_path.empty() ? model() : model_path;
  o.output = out;
  o.prompt = "x";
  o.steps = 2;
  o.width = 32;
  o.height = 32;
  o.seed = 1;
  o.progress = false;
  return o;
}

// Rejected in-process: an error of type E (the CLI prints it after "error: " and exits 2) whose message holds
// every needle, and nothing written into out_dir.
template <typename E = InvalidArgument>
void expect_api_rejected(const GenerateOptions& o, const std::vector<std::string>& needles,
                         const std::string& out_dir) {
  const auto before = list_dir(out_dir);
  try {
    generate(o);
    ADD_FAILURE() << "accepted; expected an error mentioning '" << needles.front() << "'";
  } catch (const Error& e) {
    EXPECT_NE(dynamic_cast<const E*>(&e), nullptr) << "wrong error type for '" << needles.front() << "': " << e.what();
    for (const auto& n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "expected '" << n << "' in: " << e.what();
  }
  EXPECT_EQ(list_dir(out_dir), before) << "a rejected run must write nothing";
}

template <typename F>
GenerateOptions with(GenerateOptions o, F edit) {
  edit(o);
  return o;
}

TEST(HardeningTiny, BadNumbersAndNames) {
  const std::string dir = fresh_dir("numbers");
  const GenerateOptions o = opts(dir + "/o.png");
  expect_api_rejected(with(o, [](auto& x) { x.width = 36; }), {"width must be a multiple of 8, got 36"}, dir);
  expect_api_rejected(with(o, [](auto& x) { x.height = 44; }), {"height must be a multiple of 8, got 44"}, dir);
  expect_api_rejected(with(o, [](auto& x) { x.width = x.height = 8192; }),
                      {"width x height 8192x8192 exceeds the maximum of 4096x4096", "it would need about",
                       "GB of memory in fp32", "width and height must be at most 4096"},
                      dir);
  expect_api_rejected(with(o, [](auto& x) { x.width = 4104; }), {"exceeds the maximum of 4096x4096"}, dir);
  expect_api_rejected(with(o, [](auto& x) { x.steps = 0; }), {"steps must be in [1, 1000], got 0"}, dir);
  expect_api_rejected(with(o, [](auto& x) { x.steps = -3; }), {"steps must be in [1, 1000], got -3"}, dir);
  expect_api_rejected(with(o, [](auto& x) { x.guidance_scale = 101; }), {"guidance_scale must be in [0, 100], got 101"},
                      dir);
  expect_api_rejected(with(o, [](auto& x) { x.guidance_scale = std::nan(""); }),
                      {"guidance_scale must be in [0, 100], got nan"}, dir);
  expect_api_rejected(with(o, [](auto& x) { x.eta = 1.5; }), {"eta must be in [0, 1], got 1.5"}, dir);
  expect_api_rejected(with(o, [](auto& x) { x.num_images = 0; }), {"num_images must be in [1, 64], got 0"}, dir);
  expect_api_rejected(with(o, [](auto& x) { x.scheduler = "euler-ancestral"; }),
                      {"--scheduler must be one of", "got 'euler-ancestral'"}, dir);
  expect_api_rejected(with(o, [](auto& x) { x.dtype = "int8"; }),
                      {"--dtype must be one of fp32, bf16, fp16, got 'int8'"}, dir);
  expect_api_rejected(with(o, [](auto& x) { x.clip_skip = 40; }), {"clip_skip must be in [0, "}, dir);
}

// What only the command line checks: numbers that do not parse, out-of-range values its parser refuses, flags
// that exclude each other. Every one exits 2 with "error: " and the rule before the model is loaded.
TEST(HardeningCli, ArgumentParsing) {
  const std::string dir = fresh_dir("cli-args");
  const std::string out = dir + "/o.png";
  expect_rejected(gen(out, {"--width", "0"}), {"--width must be in [8, ", "got 0"}, dir);
  expect_rejected(gen(out, {"--steps", "0"}), {"--steps must be in [1, 1000], got 0"}, dir);
  expect_rejected(gen(out, {"--steps", "2.5"}), {"--steps must be an integer, got '2.5'"}, dir);
  expect_rejected(gen(out, {"--guidance-scale", "nan"}), {"--guidance-scale must be a number, got 'nan'"}, dir);
  expect_rejected(gen(out, {"--guidance-scale", "inf"}), {"--guidance-scale must be a number, got 'inf'"}, dir);
  expect_rejected(gen(out, {"--seed", "18446744073709551616"}), {"--seed must be an integer in [0, 2^64-1]"}, dir);
  expect_rejected(gen(out, {"--quiet", "--verbose"}), {"--quiet and --verbose cannot be used together"}, dir);
  expect_rejected(gen(out, {"--strength", "1.5", "--init-image", out}), {"--strength must be in [0, 1], got 1.5"}, dir);
}

TEST(HardeningTiny, StrengthNeedsRangeAndImage) {
  const std::string dir = fresh_dir("strength");
  const std::string init = temp_dir() + "/init32.png";
  Image img;
  img.width = img.height = 32;
  img.channels = 3;
  img.data.assign(32 * 32 * 3, 100);
  save_png(init, img);
  GenerateOptions i2i = opts(dir + "/o.png");
  i2i.init_image = init;
  i2i.width = i2i.height = 0;
  expect_api_rejected(with(i2i, [](auto& x) { x.strength = 1.5; }), {"strength must be in [0, 1], got 1.5"}, dir);
  expect_api_rejected(with(i2i, [](auto& x) { x.strength = -0.1; }), {"strength must be in [0, 1], got -0.1"}, dir);
  expect_api_rejected(with(i2i, [](auto& x) { x.strength = 0.1; }), {"leaves no denoising step"}, dir);
  expect_api_rejected(with(i2i, [](auto& x) { x.width = x.height = 64; }), {"must match the --init-image size (32x32)"},
                      dir);
}

TEST(HardeningTiny, ModelPaths) {
  const std::string dir = fresh_dir("paths");
  const std::string out = dir + "/o.png";
  const std::string single = model() + "/unet/diffusion_pytorch_model.safetensors";  // a .safetensors file
  expect_api_rejected(opts(out, "/nonexistent/model"), {"--model", "not found", "/nonexistent/model"}, dir);
  const std::string not_a_model = fresh_dir("paths-not-a-model");  // beside the output: outputs never go into inputs
  expect_api_rejected<Error>(opts(out, not_a_model), {"--model", "is not a diffusers folder"}, dir);
  expect_api_rejected(with(opts(out), [](auto& x) { x.config_dir = model(); }),
                      {"--config applies to a single-file checkpoint"}, dir);
  expect_api_rejected<Error>(with(opts(out, single), [](auto& x) { x.config_dir = "/nonexistent/cfg"; }),
                             {"--config", "/nonexistent/cfg"}, dir);
  expect_api_rejected<Error>(with(opts(out), [](auto& x) { x.tokenizer_dir = "/nonexistent/tok"; }),
                             {"--tokenizer", "not found", "/nonexistent/tok"}, dir);
  const std::string empty = temp_dir() + "/empty.safetensors";
  write_file(empty, "");
  expect_api_rejected<FormatError>(opts(out, empty), {"safetensors", "shorter than the 8-byte header"}, dir);
  const std::string text = temp_dir() + "/model.txt";
  write_file(text, "this is not a model at all, just text");
  expect_api_rejected<Error>(opts(out, text), {""}, dir);
  expect_api_rejected(opts(out, "/dev/null"), {"expected a regular file, got a character device", "/dev/null"}, dir);
  if (::geteuid() != 0) {  // root reads any file
    const std::string locked = temp_dir() + "/locked.safetensors";
    write_file(locked, read_file(single).substr(0, 4096));
    ::chmod(locked.c_str(), 0);
    expect_api_rejected<Error>(opts(out, locked), {"cannot open", locked}, dir);
  }
}

// Truncated or lying safetensors, as a single-file model and as a component of a diffusers folder.
TEST(HardeningTiny, BrokenSafetensors) {
  const std::string dir = fresh_dir("broken");
  const std::string out = dir + "/o.png";
  const std::string good = read_file(model() + "/unet/diffusion_pytorch_model.safetensors");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(good[i]);
  const std::string header = good.substr(8, n);

  struct Case {
    std::string name, bytes, needle;
  };
  std::vector<Case> cases = {
      {"truncated", good.substr(0, good.size() - 1000), "lies outside the data area"},
      {"header_past_end", le64(good.size()) + good.substr(8, 100), "runs past the end of the file"},
      {"header_only", good.substr(0, 8 + n), "lies outside the data area"},
      {"short", good.substr(0, 5), "shorter than the 8-byte header length"},
      {"offsets_outside", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,4096]}})", 16),
       "lies outside the data area"},
      {"shape_mismatch", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[3,3],"data_offsets":[0,16]}})", 16),
       "holds 16 bytes but shape x dtype F32 needs 36"},
      {"dtype_mismatch", safetensors_bytes(R"({"w":{"dtype":"F64","shape":[4],"data_offsets":[0,16]}})", 16),
       "holds 16 bytes but shape x dtype F64 needs 32"},
      {"unknown_dtype", safetensors_bytes(R"({"w":{"dtype":"Q4_K","shape":[4],"data_offsets":[0,2]}})", 2),
       "unknown dtype 'Q4_K'"},
      {"negative_dim", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
       "negative or non-integer dimension"},
      {"overlap",
       safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         12),
       "overlap"},
      {"not_json", safetensors_bytes("{\"w\": [1, 2", 0), "header is not valid JSON"},
      {"huge_header_len", le64(1ull << 62) + "{}", "exceeds the"},
  };
  // Lying shape in a real header: the first tensor's first dimension doubled.
  {
    std::string h = header;
    const size_t at = h.find("\"shape\":[");
    ASSERT_NE(at, std::string::npos);
    h.insert(at + 9, "2,");  // prepend a dimension of 2: twice the bytes the offsets give
    cases.push_back({"real_shape_lie", le64(h.size()) + h + good.substr(8 + n), "but shape x dtype"});
  }
  for (const auto& c : cases) {
    const std::string single = dir + "/../" + c.name + ".safetensors";
    write_file(single, c.bytes);
    SCOPED_TRACE(c.name);
    expect_api_rejected<FormatError>(with(opts(out, single), [](auto& x) { x.config_dir = model(); }),
                                     {"safetensors", c.needle, single}, dir);
  }
  // The same inside a diffusers folder: the UNet, the VAE and the text encoder weights.
  for (const std::string comp : {"unet", "vae", "text_encoder"}) {
    for (const auto& c : {cases[0], cases[1], cases[5]}) {
      const std::string folder =
          model_copy("folder_" + comp + "_" + c.name,
                     {comp + "/model.safetensors", comp + "/diffusion_pytorch_model.safetensors"});
      const std::string file = folder + "/" + comp +
                               (comp == "text_encoder" && path_exists(model() + "/text_encoder/model.safetensors")
                                    ? "/model.safetensors"
                                    : "/diffusion_pytorch_model.safetensors");
      write_file(file, c.bytes);
      SCOPED_TRACE(comp + " " + c.name);
      expect_api_rejected<FormatError>(opts(out, folder), {c.needle}, dir);
    }
  }
}

TEST(HardeningTiny, BrokenModelFolders) {
  const std::string dir = fresh_dir("folders");
  const std::string out = dir + "/o.png";
  // A missing component.
  expect_api_rejected<Error>(opts(out, model_copy("no_vae", {"vae"})), {"vae"}, dir);
  expect_api_rejected<Error>(opts(out, model_copy("no_tokenizer", {"tokenizer"})), {"tokenizer"}, dir);
  expect_api_rejected<Error>(opts(out, model_copy("no_scheduler", {"scheduler"})), {"scheduler"}, dir);
  // Weights missing from a component folder.
  const std::string no_weights = model_copy("no_unet_weights", {"unet/diffusion_pytorch_model.safetensors"});
  expect_api_rejected<Error>(opts(out, no_weights), {"unet"}, dir);
  // A config.json that is not JSON, and one with a wrong field type.
  const std::string bad_cfg = model_copy("bad_config", {"unet/config.json"});
  write_file(bad_cfg + "/unet/config.json", "{ \"sample_size\": 8, oops");
  expect_api_rejected<FormatError>(opts(out, bad_cfg), {"unet config", "is not valid JSON"}, dir);
  const std::string typed_cfg = model_copy("typed_config", {"vae/config.json"});
  write_file(typed_cfg + "/vae/config.json", "[1, 2, 3]");
  expect_api_rejected<FormatError>(opts(out, typed_cfg), {"AutoencoderKL config: expected a JSON object"}, dir);
  // Wrong-shaped weights: one UNet tensor transposed; a weight missing; an unexpected one.
  auto unet = io::load_safetensors(model() + "/unet/diffusion_pytorch_model.safetensors");
  const std::string key = "conv_in.weight";
  ASSERT_EQ(unet.count(key), 1u);
  auto shaped = unet;
  shaped[key] = at::zeros({unet[key].size(1), unet[key].size(0), unet[key].size(2), unet[key].size(3)});
  const std::string wrong = model_copy("wrong_shape", {"unet/diffusion_pytorch_model.safetensors"});
  io::save_safetensors(wrong + "/unet/diffusion_pytorch_model.safetensors", shaped);
  expect_api_rejected<FormatError>(opts(out, wrong), {key, "shape"}, dir);
  auto missing = unet;
  missing.erase(key);
  missing["conv_in.weight_typo"] = unet[key];
  const std::string miss = model_copy("missing_key", {"unet/diffusion_pytorch_model.safetensors"});
  io::save_safetensors(miss + "/unet/diffusion_pytorch_model.safetensors", missing);
  expect_api_rejected<FormatError>(opts(out, miss), {key, "conv_in.weight_typo"}, dir);
}

TEST(HardeningTiny, CorruptInitImages) {
  const std::string dir = fresh_dir("images");
  const std::string out = dir + "/o.png";
  const std::string src = temp_dir() + "/img";
  ::mkdir(src.c_str(), 0755);
  const std::string png = read_file(corpus("image", "rgb8.png"));
  const std::string jpg = read_file(corpus("image", "baseline_420.jpg"));
  std::vector<std::pair<std::string, std::string>> files = {
      {"truncated.png", png.substr(0, png.size() / 2)},
      {"truncated.jpg", jpg.substr(0, jpg.size() * 2 / 3)},
      {"empty.png", ""},
      {"text.png", "hello, not an image"},
      {"huge.png", read_file(corpus("image", "bad_huge_ihdr.png"))},
      {"gif.gif", "GIF89a\x01\x00\x01\x00\x00\x00\x00;"},
  };
  GenerateOptions i2i = opts(out);
  i2i.width = i2i.height = 0;
  for (const auto& [name, bytes] : files) {
    write_file(src + "/" + name, bytes);
    SCOPED_TRACE(name);
    expect_api_rejected(with(i2i, [&](auto& x) { x.init_image = src + "/" + name; }), {"--init-image"}, dir);
  }
  expect_api_rejected(with(i2i, [&](auto& x) { x.init_image = src; }), {"--init-image", "directory"}, dir);
  expect_api_rejected(with(i2i, [&](auto& x) { x.init_image = src + "/none.png"; }), {"--init-image", "not found"},
                      dir);
  // A valid image whose size breaks the rules.
  Image odd;
  odd.width = 36;
  odd.height = 32;
  odd.channels = 3;
  odd.data.assign(36 * 32 * 3, 7);
  save_png(src + "/odd.png", odd);
  expect_api_rejected(with(i2i, [&](auto& x) { x.init_image = src + "/odd.png"; }),
                      {"init image size must be a multiple of 8, got 36x32"}, dir);
}

// ---------------------------------------------------------------- prompts

TEST(HardeningTiny, UnicodePrompts) {
  const std::string dir = fresh_dir("unicode");
  // emoji with ZWJ and skin tone; CJK; RTL with a mark; combining marks and a ligature; escapes; a long word.
  // clang-format off
  const std::vector<std::string> prompts = {
      "\xf0\x9f\x90\x88\xe2\x80\x8d\xe2\xac\x9b on a \xf0\x9f\x9b\xb8, \xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd",
      "\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\xab\xe5\x9d\x90\xe5\x9c\xa8\xe5\xb1\x8b\xe9\xa1\xb6 \xe3\x81\xad\xe3\x81\x93",
      "\xd7\x97\xd7\xaa\xd7\x95\xd7\x9c \xd8\xb9\xd9\x84\xd9\x89 \xd8\xa7\xd9\x84\xd8\xb3\xd8\xb7\xd8\xad \xe2\x80\x8f",
      "Z\xcd\x91\xcd\x97"
      "a\xcc\x8a\xcd\x8el\xcd\x9fg\xcc\x9bo e\xcc\x81 \xef\xac\x81",  // combining marks, ligature
      "tab\tnew\nline \"quotes\" 'single' \\back, comma: colon",
      std::string(2000, 'a') + " long"};
  // clang-format on
  int i = 0;
  for (const auto& prompt : prompts) {
    GenerateOptions o = opts(dir + "/u" + std::to_string(i++) + ".png");
    o.prompt = o.negative_prompt = prompt;
    o.steps = 1;
    o.seed = 3;
    const GenerateResult r = generate(o);
    ASSERT_EQ(r.images.size(), 1u);
    const std::string params = read_image_parameters(r.images[0]);
    EXPECT_EQ(params.rfind(prompt + "\n", 0), 0u) << params;
    GenerateOptions back = parse_parameters(params);
    EXPECT_EQ(back.prompt, prompt);
    EXPECT_EQ(back.negative_prompt, prompt);
  }
  const std::string out = dir + "/bad.png";
  expect_api_rejected(with(opts(out), [](auto& x) { x.prompt = "ok \xff\xfe"; }),
                      {"--prompt must be valid UTF-8 text; invalid byte 0xff at offset 3"}, dir);
  expect_api_rejected(with(opts(out), [](auto& x) { x.negative_prompt = "\xed\xa0\x80"; }),
                      {"--negative-prompt must be valid UTF-8 text; invalid byte 0xed at offset 0"}, dir);
}

// ---------------------------------------------------------------- metadata, progress, timings

TEST(HardeningTiny, ParametersCarryModelHash) {
  const std::string dir = fresh_dir("hash");
  generate(opts(dir + "/folder.png"));
  const std::string folder_hash = sha256_file(model() + "/unet/diffusion_pytorch_model.safetensors").substr(0, 10);
  EXPECT_EQ(model_hash(model()), folder_hash);
  EXPECT_EQ(model_hash_file(model()), model() + "/unet/diffusion_pytorch_model.safetensors");
  const std::string name = model().substr(model().rfind('/') + 1);
  const std::string p = read_image_parameters(dir + "/folder.png");
  EXPECT_NE(p.find("Model hash: " + folder_hash + ", Model: " + name), std::string::npos) << p;
  EXPECT_NE(p.find("Steps: 2, "), std::string::npos) << p;
  EXPECT_NE(p.find("Size: 32x32"), std::string::npos) << p;
  // The model's own scheduler (PNDMScheduler) is written as A1111's name for it, which parse_parameters reads.
  EXPECT_NE(p.find("Sampler: PLMS, "), std::string::npos) << p;
  // The parameters re-run to the same pixels (what `dmx generate --from` does; GenerateCli runs the flag).
  GenerateOptions again = parse_parameters(p);
  again.model = model();
  again.output = dir + "/again.png";
  again.progress = false;
  generate(again);
  EXPECT_EQ(load_image(dir + "/folder.png", "a").data, load_image(dir + "/again.png", "b").data);
  // A file that is not a PNG has no parameters.
  write_file(dir + "/../plain.txt", "text");
  try {
    read_image_parameters(dir + "/../plain.txt");
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("not a PNG file"), std::string::npos) << e.what();
  }
}

// A single-file checkpoint: the hash of the file itself, as A1111 computes it (the fixture's single file).
TEST(HardeningGolden, SingleFileParametersCarryItsHash) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = fresh_dir("hash-single");
  const std::string folder = fixture_model("sd15"), single = folder + "/ldm/sd15.safetensors";
  GenerateOptions o = opts(dir + "/single.png", single);
  o.config_dir = folder;
  generate(o);
  const std::string single_hash = sha256_file(single).substr(0, 10);
  EXPECT_NE(read_image_parameters(dir + "/single.png").find("Model hash: " + single_hash), std::string::npos);
}

// What the library prints on stderr: nothing when quiet; progress without escape codes when stderr is not a
// terminal; per-phase timings with verbose. (What the command adds, "wrote FILE", and its stdout: GenerateCli.)
TEST(HardeningTiny, QuietVerboseAndNoEscapesWhenPiped) {
  const std::string dir = fresh_dir("progress");
  GenerateOptions quiet = opts(dir + "/q.png");
  quiet.num_images = 2;
  EXPECT_EQ(capture_stderr([&] { generate(quiet); }), "") << "quiet must print nothing on stderr";
  GenerateOptions plain = opts(dir + "/p.png");
  plain.num_images = 2;
  plain.progress = true;
  const std::string err = capture_stderr([&] { generate(plain); });
  EXPECT_EQ(err.find('\033'), std::string::npos) << "no escape codes when stderr is not a terminal: " << err;
  EXPECT_EQ(err.find('\r'), std::string::npos);
  GenerateOptions verbose = opts(dir + "/v.png");
  verbose.verbose = true;
  verbose.progress = true;
  const std::string v = capture_stderr([&] { generate(verbose); });
  for (const char* phase : {"time: load ", "time: text encode ", "time: denoise ", "time: decode ", "time: write "})
    EXPECT_NE(v.find(phase), std::string::npos) << phase << " missing in: " << v;
  EXPECT_EQ(v.find('\033'), std::string::npos);
}

// Progress bars draw on a terminal: run the CLI on a pseudo-terminal and look for the bars.
TEST(HardeningCli, ProgressBarsOnATerminal) {
  const std::string dir = fresh_dir("tty");
  const std::string cli = cli_path();
  auto args = gen(dir + "/t.png", {"--num-images", "2"});  // (builds the tiny model before the fork)
  int master = posix_openpt(O_RDWR | O_NOCTTY);
  ASSERT_GE(master, 0);
  ASSERT_EQ(grantpt(master), 0);
  ASSERT_EQ(unlockpt(master), 0);
  const std::string slave_name = ptsname(master);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    setsid();
    const int slave = ::open(slave_name.c_str(), O_RDWR);
    dup2(slave, 2);
    const int devnull = ::open("/dev/null", O_RDWR);
    dup2(devnull, 0);
    dup2(devnull, 1);
    std::vector<char*> argv = {const_cast<char*>(cli.c_str())};
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(cli.c_str(), argv.data());
    _exit(127);
  }
  std::string tty;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(master, buf, sizeof(buf));
    if (n <= 0) break;  // EIO once the child has closed the terminal
    tty.append(buf, static_cast<size_t>(n));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ::close(master);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << tty;
  EXPECT_NE(tty.find("steps ["), std::string::npos) << tty;
  EXPECT_NE(tty.find("2/2"), std::string::npos) << tty;
  EXPECT_NE(tty.find("decode ["), std::string::npos) << tty;
  EXPECT_NE(tty.find("it/s"), std::string::npos) << tty;
}

// ---------------------------------------------------------------- interrupted runs

TEST(HardeningCli, KilledRunLeavesNoFile) {
  const std::string cli = cli_path();
  for (int sig : {SIGINT, SIGTERM}) {
    const std::string dir = fresh_dir("killed" + std::to_string(sig));
    auto args =
        gen(dir + "/k.png", {"--steps", "999", "--scheduler", "euler", "--save-latents", dir + "/k.safetensors"});
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      const int devnull = ::open("/dev/null", O_RDWR);
      dup2(devnull, 0);
      dup2(devnull, 1);
      dup2(devnull, 2);
      std::vector<char*> argv = {const_cast<char*>(cli.c_str())};
      for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execv(cli.c_str(), argv.data());
      _exit(127);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    ASSERT_EQ(::kill(pid, sig), 0);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFSIGNALED(status)) << "status " << status << " (did the run finish before the signal?)";
    if (WIFSIGNALED(status)) {
      EXPECT_EQ(WTERMSIG(status), sig);
    }
    EXPECT_EQ(list_dir(dir), std::vector<std::string>{}) << "signal " << sig;
  }
}

}  // namespace
}  // namespace dmx::test
