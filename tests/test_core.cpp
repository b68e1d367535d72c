// Unit tests of core: images (PNG/JPEG decode, PNG text chunks), atomic writes, errors.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "core/fs.h"
#include "core/image.h"
#include "core/text.h"
#include "core/utf8.h"
#include "dmx/error.h"
#include "test_util.h"

namespace dmx::test {
namespace {

Image gradient(int w, int h, int c) {
  Image img;
  img.width = w;
  img.height = h;
  img.channels = c;
  img.data.resize(static_cast<size_t>(w) * h * c);
  for (size_t i = 0; i < img.data.size(); ++i) img.data[i] = static_cast<uint8_t>((i * 37) & 0xFF);
  return img;
}

void write_raw(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

TEST(CoreImageUnit, PngRoundTripWithText) {
  const std::string path = temp_dir() + "/rt.png";
  Image img = gradient(13, 7, 3);
  save_png(path, img, {{"parameters", "a cat\nSteps: 5"}, {"unicode", "caf\xC3\xA9 \xF0\x9F\x90\xB1"}});
  Image back = load_image(path, "--init-image");
  EXPECT_EQ(back.width, 13);
  EXPECT_EQ(back.height, 7);
  EXPECT_EQ(back.channels, 3);
  EXPECT_EQ(back.data, img.data);
  auto text = read_png_text(path);
  ASSERT_EQ(text.size(), 2u);
  EXPECT_EQ(text[0].second, "a cat\nSteps: 5");
  EXPECT_EQ(text[1].second, "caf\xC3\xA9 \xF0\x9F\x90\xB1");
}

TEST(CoreImageUnit, RgbaAndGrayConvertLikePil) {
  const std::string path = temp_dir() + "/rgba.png";
  Image rgba = gradient(4, 3, 4);
  save_png(path, rgba);
  Image rgb = to_rgb(load_image(path, "--init-image"));
  ASSERT_EQ(rgb.channels, 3);
  for (int i = 0; i < 12; ++i)
    for (int c = 0; c < 3; ++c) EXPECT_EQ(rgb.data[3 * i + c], rgba.data[4 * i + c]);
  Image g = to_gray(rgb);
  EXPECT_EQ(g.channels, 1);
  Image white = gradient(1, 1, 3);
  white.data = {255, 255, 255};
  EXPECT_EQ(to_gray(white).data[0], 255);
}

// An in-memory gray + alpha image (the PNG loader itself keeps the gray only): the gray is the picture, the alpha
// is never read as a colour (it used to be, and the last pixel read one byte past the data).
TEST(CoreImageUnit, GrayAlphaConvertsFromItsGray) {
  Image ga;
  ga.width = 3;
  ga.height = 1;
  ga.channels = 2;
  ga.data = {10, 200, 20, 0, 30, 255};
  const Image rgb = to_rgb(ga);
  ASSERT_EQ(rgb.channels, 3);
  EXPECT_EQ(rgb.data, (std::vector<uint8_t>{10, 10, 10, 20, 20, 20, 30, 30, 30}));
  const Image g = to_gray(ga);
  ASSERT_EQ(g.channels, 1);
  EXPECT_EQ(g.data, (std::vector<uint8_t>{10, 20, 30}));
  Image bad = ga;
  bad.channels = 5;
  EXPECT_THROW(to_rgb(bad), InvalidArgument);
  EXPECT_THROW(to_gray(bad), InvalidArgument);
}

TEST(CoreImageUnit, CorruptAndUnsupportedImagesAreInvalidArgument) {
  const std::string dir = temp_dir();
  write_raw(dir + "/garbage.png", "this is not an image");
  write_raw(dir + "/empty.png", "");
  std::vector<uint8_t> png = encode_png(gradient(16, 16, 3));
  write_raw(dir + "/trunc.png", std::string(png.begin(), png.begin() + png.size() / 2));
  write_raw(dir + "/trunc.jpg", std::string("\xFF\xD8\xFF\xE0\x00\x10JFIF\x00", 11));
  for (const char* f : {"garbage.png", "empty.png", "trunc.png", "trunc.jpg", "missing.png"}) {
    try {
      load_image(dir + "/" + f, "--init-image");
      FAIL() << f << " should not load";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("--init-image"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(load_image(dir, "--mask"), InvalidArgument);
}

TEST(CoreImageUnit, TensorConversionsMatchDiffusers) {
  Image img = gradient(8, 8, 3);
  at::Tensor t = image_to_tensor(img);
  EXPECT_EQ(t.sizes(), (std::vector<int64_t>{1, 3, 8, 8}));
  EXPECT_FLOAT_EQ(t[0][0][0][0].item<float>(), img.data[0] / 255.0f * 2.0f - 1.0f);
  // round half to even, as numpy: 0.5/255 * 255 = 0.5 -> 0; 1.5/255 -> 2.
  at::Tensor hwc = at::zeros({1, 2, 3});
  hwc[0][0][0] = 0.5f / 255.0f;
  hwc[0][1][0] = 1.5f / 255.0f;
  Image back = tensor_to_image(hwc);
  EXPECT_EQ(back.data[0], 0);
  EXPECT_EQ(back.data[3], 2);
}

TEST(CoreFsUnit, AtomicWriteLeavesNothingOnFailure) {
  const std::string path = temp_dir() + "/atomic.bin";
  EXPECT_THROW(write_file_atomic(path,
                                 [](const std::string& tmp) {
                                   std::ofstream(tmp) << "partial";
                                   throw IoError("interrupted");
                                 }),
               IoError);
  EXPECT_FALSE(path_exists(path));
  EXPECT_FALSE(path_exists(path + ".tmp." + std::to_string(::getpid())));
  write_bytes_atomic(path, "abc", 3);
  EXPECT_EQ(read_text_file(path, "test", dmx::kMaxJsonFileBytes), "abc");
  EXPECT_THROW(write_bytes_atomic("/nonexistent-dir/x.bin", "a", 1), InvalidArgument);  // a bad output path
}

TEST(CoreErrorsUnit, CheckMacrosNameTheValue) {
  try {
    const double strength = 1.3;
    DMX_CHECK_ARG(strength <= 1, "strength must be in [0, 1], got ", strength);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_STREQ(e.what(), "strength must be in [0, 1], got 1.3");
  }
}

TEST(CoreTextUnit, SplitKeepsEmptyFieldsLikePython) {
  using V = std::vector<std::string>;
  EXPECT_EQ(split("a cat  face", ' '), (V{"a", "cat", "", "face"}));
  EXPECT_EQ(split("down_blocks.1.attentions", '.'), (V{"down_blocks", "1", "attentions"}));
  EXPECT_EQ(split("", '_'), (V{""}));
  EXPECT_EQ(split("_x_", '_'), (V{"", "x", ""}));
}

TEST(CoreTextUnit, TheSharedHelpers) {
  EXPECT_EQ(join({"a", "b", "c"}, ", "), "a, b, c");
  EXPECT_EQ(join({}, "|"), "");
  EXPECT_EQ(join_abbreviated({"a", "b", "c"}, 2), "a, b, ... (3 in all)");
  EXPECT_EQ(join_abbreviated({"a", "b"}), "a, b");
  EXPECT_TRUE(starts_with("lora_unet_x", "lora_unet_"));
  EXPECT_FALSE(starts_with("lora", "lora_unet_"));
  EXPECT_TRUE(ends_with("x.lora_down.weight", ".weight"));
  EXPECT_FALSE(ends_with("t", ".weight"));
  EXPECT_EQ(to_lower_ascii("Smileys & Emotion .PNG \xc3\x89"), "smileys & emotion .png \xc3\x89");  // ASCII only
  EXPECT_EQ(trim(" \t a b \r\n\v\f"), "a b");
  EXPECT_EQ(trim(" \n "), "");
}

// Python's bytes.decode("utf-8", errors="replace"): one U+FFFD per maximal ill-formed subpart (values from
// CPython 3.11).
TEST(CoreUtf8Unit, LossyDecodingMatchesPython) {
  const std::vector<std::pair<std::string, std::u32string>> cases = {
      {"\xf0\x9f\x98", U"\uFFFD"},  // a truncated 4-byte sequence: one
      {"\xf0\x9f", U"\uFFFD"},
      {"\x9f\x98\x80", U"\uFFFD\uFFFD\uFFFD"},  // continuation bytes alone: one each
      {"\xf0"
       "A",
       U"\uFFFDA"},
      {"a\xe2\x82", U"a\uFFFD"},
      {"\xed\xa0\x80", U"\uFFFD\uFFFD\uFFFD"},            // a surrogate
      {"\xc0\xaf", U"\uFFFD\uFFFD"},                      // overlong
      {"\xf4\x90\x80\x80", U"\uFFFD\uFFFD\uFFFD\uFFFD"},  // above U+10FFFF
      {"caf\xc3\xa9 \xf0\x9f\x98\x80", U"caf\u00e9 \U0001F600"},
  };
  for (const auto& [in, want] : cases) EXPECT_TRUE(decode_utf8_replace(in) == want) << in;
  std::u32string out;
  size_t bad = 0;
  EXPECT_FALSE(decode_utf8("ab\xed\xa0\x80", &out, &bad));
  EXPECT_EQ(bad, 2u);
  EXPECT_EQ(find_invalid_utf8("ab\xed\xa0\x80"), 2u);
  ASSERT_TRUE(decode_utf8("caf\xc3\xa9 \xf0\x9f\x98\x80", &out, &bad));
  EXPECT_EQ(encode_utf8(out), "caf\xc3\xa9 \xf0\x9f\x98\x80");
  EXPECT_EQ(utf8_length("caf\xc3\xa9 \xf0\x9f\x98\x80"), 6u);
}
}  // namespace
}  // namespace dmx::test

// The tests' scratch folder goes away when the process that made it exits, and only then: every gtest case is
// its own process, and thousands of left-behind folders once filled the disk and broke CI.
TEST(TestScratchUnit, RemovedWhenItsOwnProcessExits) {
  const std::string parent_dir = dmx::test::temp_dir();
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    static dmx::test::ScratchDir own;  // destroyed by exit(), like temp_dir()'s
    std::ofstream(own.path() + "/file.txt") << "x";
    ::mkdir((own.path() + "/sub").c_str(), 0755);
    std::ofstream(own.path() + "/sub/inner.txt") << "y";
    const std::string p = own.path();
    if (::write(fds[1], p.data(), p.size()) != static_cast<ssize_t>(p.size())) std::_Exit(3);
    ::close(fds[1]);
    std::exit(0);
  }
  ::close(fds[1]);
  std::string child_dir;
  char buf[256];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) child_dir.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ASSERT_FALSE(child_dir.empty());
  EXPECT_NE(child_dir, parent_dir);
  EXPECT_FALSE(dmx::is_directory(child_dir)) << child_dir << " was left behind";
  // The child inherited the parent's temp_dir() object too; its exit must not have removed the parent's folder.
  EXPECT_TRUE(dmx::is_directory(parent_dir));
}
