// Writes the seed corpus for fuzz_image: small PNGs of every color type and bit depth (plain,
// interlaced, with text chunks) and JPEGs (baseline, progressive, gray, 4:2:0, 4:4:4, restart
// markers), plus a few malformed files. Build and run: see fuzz/README.md.
#include <jpeglib.h>
#include <png.h>
#include <cstddef>
#include <cstdio>
#include <cstdlib>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {
std::string g_dir;

void write(const std::string& name, const std::vector<unsigned char>& bytes) {
  FILE* f = std::fopen((g_dir + "/" + name).c_str(), "wb");
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}

std::vector<unsigned char> read(const std::string& name) {
  FILE* f = std::fopen((g_dir + "/" + name).c_str(), "rb");
  std::vector<unsigned char> v;
  int c;
  while ((c = std::fgetc(f)) != EOF) v.push_back(static_cast<unsigned char>(c));
  std::fclose(f);
  return v;
}

void png(const std::string& name, int w, int h, int color_type, int depth, bool interlace, bool text) {
  FILE* f = std::fopen((g_dir + "/" + name).c_str(), "wb");
  png_structp p = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(p);
  png_init_io(p, f);
  png_set_IHDR(p, info, w, h, depth, color_type, interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (color_type == PNG_COLOR_TYPE_PALETTE) {
    png_color pal[4] = {{0, 0, 0}, {255, 0, 0}, {0, 255, 0}, {0, 0, 255}};
    png_set_PLTE(p, info, pal, 4);
    png_byte trns[2] = {0, 128};
    png_set_tRNS(p, info, trns, 2, nullptr);
  }
  png_text t[2];
  std::memset(t, 0, sizeof(t));
  if (text) {
    t[0].compression = PNG_TEXT_COMPRESSION_NONE;
    t[0].key = const_cast<char*>("parameters");
    t[0].text =
        const_cast<char*>("a cat\nNegative prompt: fog\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8");
    t[1].compression = PNG_ITXT_COMPRESSION_zTXt;
    t[1].key = const_cast<char*>("Comment");
    t[1].text = const_cast<char*>("caf\xc3\xa9 \xe2\x98\x95");
    png_set_text(p, info, t, 2);
  }
  png_write_info(p, info);
  const int channels = color_type == 2 ? 3 : color_type == 4 ? 2 : color_type == 6 ? 4 : 1;
  const size_t row = (static_cast<size_t>(w) * channels * depth + 7) / 8;
  std::vector<png_byte> data(row * h);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<png_byte>(i * 37 + (i >> 3));
  if (color_type == PNG_COLOR_TYPE_PALETTE)
    for (auto& b : data) b &= depth == 1 ? 0xFF : depth == 2 ? 0x55 : depth == 4 ? 0x33 : 0x03;
  std::vector<png_bytep> rows(h);
  for (int y = 0; y < h; ++y) rows[y] = data.data() + y * row;
  png_write_image(p, rows.data());
  png_write_end(p, info);
  png_destroy_write_struct(&p, &info);
  std::fclose(f);
}

void jpeg(const std::string& name, int w, int h, int components, bool progressive, int h_samp, int restart) {
  jpeg_compress_struct c;
  jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  unsigned char* buf = nullptr;
  unsigned long len = 0;
  jpeg_mem_dest(&c, &buf, &len);
  c.image_width = w;
  c.image_height = h;
  c.input_components = components;
  c.in_color_space = components == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 75, TRUE);
  if (components == 3) {
    c.comp_info[0].h_samp_factor = h_samp;
    c.comp_info[0].v_samp_factor = h_samp;
  }
  if (progressive) jpeg_simple_progression(&c);
  c.restart_interval = restart;
  jpeg_start_compress(&c, TRUE);
  std::vector<unsigned char> row(static_cast<size_t>(w) * components);
  while (c.next_scanline < c.image_height) {
    for (size_t i = 0; i < row.size(); ++i) row[i] = static_cast<unsigned char>(i * 5 + c.next_scanline * 11);
    JSAMPROW r = row.data();
    jpeg_write_scanlines(&c, &r, 1);
  }
  jpeg_finish_compress(&c);
  write(name, std::vector<unsigned char>(buf, buf + len));
  jpeg_destroy_compress(&c);
  free(buf);
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_image_corpus DIR\n");
    return 2;
  }
  g_dir = argv[1];
  png("gray1.png", 9, 5, PNG_COLOR_TYPE_GRAY, 1, false, false);
  png("gray4_interlaced.png", 11, 7, PNG_COLOR_TYPE_GRAY, 4, true, false);
  png("gray8.png", 8, 8, PNG_COLOR_TYPE_GRAY, 8, false, true);
  png("gray16.png", 5, 3, PNG_COLOR_TYPE_GRAY, 16, false, false);
  png("gray_alpha8.png", 6, 4, PNG_COLOR_TYPE_GRAY_ALPHA, 8, false, false);
  png("rgb8.png", 8, 8, PNG_COLOR_TYPE_RGB, 8, false, true);
  png("rgb8_interlaced.png", 13, 9, PNG_COLOR_TYPE_RGB, 8, true, false);
  png("rgb16.png", 4, 4, PNG_COLOR_TYPE_RGB, 16, false, false);
  png("rgba8.png", 7, 5, PNG_COLOR_TYPE_RGBA, 8, false, true);
  png("rgba16_interlaced.png", 5, 5, PNG_COLOR_TYPE_RGBA, 16, true, false);
  png("palette2.png", 10, 3, PNG_COLOR_TYPE_PALETTE, 2, false, false);
  png("palette8_trns.png", 6, 6, PNG_COLOR_TYPE_PALETTE, 8, false, false);
  jpeg("baseline_420.jpg", 24, 16, 3, false, 2, 0);
  jpeg("baseline_444.jpg", 9, 7, 3, false, 1, 0);
  jpeg("gray.jpg", 16, 9, 1, false, 1, 0);
  jpeg("progressive_420.jpg", 32, 24, 3, true, 2, 0);
  jpeg("progressive_gray.jpg", 17, 8, 1, true, 1, 0);
  jpeg("restart_420.jpg", 40, 16, 3, false, 2, 1);
  // Malformed seeds: truncated files and a lying header.
  auto p = read("rgb8.png");
  write("bad_truncated.png", std::vector<unsigned char>(p.begin(), p.begin() + p.size() / 2));
  auto j = read("baseline_420.jpg");
  write("bad_truncated.jpg", std::vector<unsigned char>(j.begin(), j.begin() + j.size() * 2 / 3));
  auto huge = p;
  huge[16] = 0x00, huge[17] = 0x00, huge[18] = 0x40, huge[19] = 0x00;  // width 16384 in IHDR (CRC now wrong)
  write("bad_huge_ihdr.png", huge);
  write("bad_empty.png", std::vector<unsigned char>(p.begin(), p.begin() + 8));
  return 0;
}
