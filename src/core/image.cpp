#include "core/image.h"

#include <ATen/ATen.h>
#include <jerror.h>
#include <jpeglib.h>
#include <png.h>

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "core/fs.h"
#include "dmx/error.h"

namespace dmx {
namespace {

void check_dims(int w, int h, const std::string& param) {
  DMX_CHECK_ARG(w > 0 && h > 0, param, ": image has an empty size ", w, "x", h);
  DMX_CHECK_ARG(w <= kMaxImageSide && h <= kMaxImageSide, param, ": image is ", w, "x", h, ", larger than the ",
                kMaxImageSide, "x", kMaxImageSide, " maximum");
}

uint32_t read_be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

// Deflate cannot compress better than 1032:1, so a header that declares more raw pixel data than
// 1032 x the file size is lying (or the file is truncated). Checked before the output buffer is
// allocated, so that a 100-byte file cannot make us allocate a gigabyte. libpng has already checked
// that IHDR is the first chunk.
void check_png_data_size(const uint8_t* bytes, size_t size, const std::string& param) {
  if (size < 33) return;
  const uint64_t w = read_be32(bytes + 16), h = read_be32(bytes + 20);
  const int depth = bytes[24], color_type = bytes[25];
  const int channels = color_type == 2 ? 3 : color_type == 4 ? 2 : color_type == 6 ? 4 : 1;
  const uint64_t raw = h * (1 + (w * depth * channels + 7) / 8);
  DMX_CHECK_ARG(raw <= 1032ull * size, param, ": corrupt PNG: the header declares ", w, "x", h, " pixels (", raw,
                " bytes of image data) but the file has only ", size,
                " bytes, more than deflate can compress into it (truncated or lying header)");
}

// Every chunk must fit in the file. libpng allocates a chunk's declared length before reading it,
// so a 100-byte file declaring a 700 MB tEXt chunk made it allocate 700 MB (found by fuzz_image).
void check_png_chunks(const uint8_t* bytes, size_t size, const std::string& param) {
  size_t pos = 8;
  bool end = false;
  while (pos < size && !end) {
    DMX_CHECK_ARG(size - pos >= 12, param, ": corrupt PNG: truncated chunk header at byte ", pos);
    const uint64_t len = read_be32(bytes + pos);
    std::string type;
    for (int i = 4; i < 8; ++i) {
      const char c = static_cast<char>(bytes[pos + i]);
      type += (c >= 0x20 && c < 0x7f) ? c : '?';
    }
    DMX_CHECK_ARG(len <= size - pos - 12, param, ": corrupt PNG: chunk '", type, "' at byte ", pos, " declares ", len,
                  " bytes but only ", size - pos - 12, " remain (truncated or lying file)");
    pos += 12 + len;
    end = type == "IEND";
  }
  DMX_CHECK_ARG(end, param, ": corrupt PNG: the file ends without an IEND chunk (truncated)");
}

Image decode_png(const uint8_t* bytes, size_t size, const std::string& param) {
  check_png_chunks(bytes, size, param);
  png_image img;
  std::memset(&img, 0, sizeof(img));
  img.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&img, bytes, size))
    throw InvalidArgument(detail::concat(param, ": cannot decode PNG: ", img.message));
  const int w = static_cast<int>(img.width), h = static_cast<int>(img.height);
  try {
    check_dims(w, h, param);
    check_png_data_size(bytes, size, param);
  } catch (...) {
    png_image_free(&img);
    throw;
  }
  const bool has_alpha = img.format & PNG_FORMAT_FLAG_ALPHA;
  const bool color = img.format & PNG_FORMAT_FLAG_COLOR;
  Image out;
  out.width = w;
  out.height = h;
  if (color) {
    img.format = has_alpha ? PNG_FORMAT_RGBA : PNG_FORMAT_RGB;
    out.channels = has_alpha ? 4 : 3;
  } else {
    img.format = has_alpha ? PNG_FORMAT_GA : PNG_FORMAT_GRAY;
    out.channels = has_alpha ? 2 : 1;
  }
  out.data.resize(static_cast<size_t>(w) * h * out.channels);
  if (!png_image_finish_read(&img, nullptr, out.data.data(), 0, nullptr)) {
    std::string msg = img.message;
    png_image_free(&img);
    throw InvalidArgument(detail::concat(param, ": corrupt PNG: ", msg));
  }
  if (out.channels == 2) {  // gray + alpha: keep gray
    Image g;
    g.width = w;
    g.height = h;
    g.channels = 1;
    g.data.resize(static_cast<size_t>(w) * h);
    for (size_t i = 0; i < g.data.size(); ++i) g.data[i] = out.data[2 * i];
    return g;
  }
  return out;
}

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_error_exit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// libjpeg only warns about truncated or corrupt entropy data and fills the rest of the image with
// gray; PIL (what diffusers reads images with) refuses truncated files, and so do we.
void jpeg_emit_message(j_common_ptr cinfo, int level) {
  if (level != -1) return;
  const int code = cinfo->err->msg_code;
  if (code == JWRN_JPEG_EOF || code == JWRN_HIT_MARKER || code == JWRN_HUFF_BAD_CODE || code == JWRN_MUST_RESYNC ||
      code == JWRN_NOT_SEQUENTIAL || code == JWRN_BOGUS_PROGRESSION)
    jpeg_error_exit(cinfo);
}

// Coefficient buffers of multi-scan (progressive) JPEGs are bounded by this; libjpeg fails cleanly
// ("Backing store not supported") instead of allocating more.
constexpr long kJpegMaxMemory = 1l << 30;

// All libjpeg calls live here, in a frame that holds no C++ object with a destructor, so that the
// longjmp from the error handler skips nothing. Returns false with err->message set on failure.
// Rows are appended to `data` as they are decoded: a lying header costs no more memory than the
// data that is really there.
bool jpeg_decode_raw(jpeg_decompress_struct* cinfo, JpegError* err, const uint8_t* bytes, size_t size, int* width,
                     int* height, int* channels, std::vector<uint8_t>* data, bool* too_large) {
  if (setjmp(err->jump)) {
    jpeg_destroy_decompress(cinfo);
    return false;
  }
  jpeg_create_decompress(cinfo);
  cinfo->mem->max_memory_to_use = kJpegMaxMemory;
  jpeg_mem_src(cinfo, bytes, static_cast<unsigned long>(size));
  jpeg_read_header(cinfo, TRUE);
  *width = static_cast<int>(cinfo->image_width);
  *height = static_cast<int>(cinfo->image_height);
  if (*width <= 0 || *height <= 0 || *width > kMaxImageSide || *height > kMaxImageSide) {
    *too_large = true;
    jpeg_destroy_decompress(cinfo);
    return false;
  }
  cinfo->out_color_space = cinfo->num_components == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(cinfo);
  *width = static_cast<int>(cinfo->output_width);
  *height = static_cast<int>(cinfo->output_height);
  *channels = cinfo->output_components;
  const size_t row_bytes = static_cast<size_t>(*width) * *channels;
  while (cinfo->output_scanline < cinfo->output_height) {
    data->resize(data->size() + row_bytes);
    JSAMPROW row = data->data() + data->size() - row_bytes;
    if (jpeg_read_scanlines(cinfo, &row, 1) != 1) {
      std::snprintf(err->message, sizeof(err->message), "decoder returned no data at row %u", cinfo->output_scanline);
      jpeg_destroy_decompress(cinfo);
      return false;
    }
  }
  jpeg_finish_decompress(cinfo);
  jpeg_destroy_decompress(cinfo);
  return true;
}

// Compression, in the same kind of frame as jpeg_decode_raw: *out is malloc'd by libjpeg (jpeg_mem_dest).
bool jpeg_encode_raw(jpeg_compress_struct* cinfo, JpegError* err, const uint8_t* data, int width, int height,
                     int channels, int quality, unsigned char** out, unsigned long* out_size) {
  if (setjmp(err->jump)) {
    jpeg_destroy_compress(cinfo);
    return false;
  }
  jpeg_create_compress(cinfo);
  jpeg_mem_dest(cinfo, out, out_size);
  cinfo->image_width = static_cast<JDIMENSION>(width);
  cinfo->image_height = static_cast<JDIMENSION>(height);
  cinfo->input_components = channels;
  cinfo->in_color_space = channels == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(cinfo);
  jpeg_set_quality(cinfo, quality, TRUE);
  jpeg_start_compress(cinfo, TRUE);
  const size_t row_bytes = static_cast<size_t>(width) * channels;
  while (cinfo->next_scanline < cinfo->image_height) {
    JSAMPROW row = const_cast<uint8_t*>(data) + static_cast<size_t>(cinfo->next_scanline) * row_bytes;
    jpeg_write_scanlines(cinfo, &row, 1);
  }
  jpeg_finish_compress(cinfo);
  jpeg_destroy_compress(cinfo);
  return true;
}

Image decode_jpeg(const uint8_t* bytes, size_t size, const std::string& param) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_error_exit;
  err.mgr.emit_message = jpeg_emit_message;
  err.message[0] = 0;
  Image out;
  bool too_large = false;
  if (!jpeg_decode_raw(&cinfo, &err, bytes, size, &out.width, &out.height, &out.channels, &out.data, &too_large)) {
    if (too_large) check_dims(out.width, out.height, param);
    throw InvalidArgument(detail::concat(param, ": corrupt JPEG: ", err.message));
  }
  return out;
}

}  // namespace

namespace {
// Reads n bytes at offset into out; false when the source ends first.
using ByteReader = std::function<bool(uint64_t offset, size_t n, uint8_t* out)>;

const uint8_t kPngSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

ImageHeader parse_image_header(const ByteReader& read, const std::string& param) {
  uint8_t b[32];
  ImageHeader h;
  if (read(0, 8, b) && std::memcmp(b, kPngSignature, 8) == 0) {
    // The IHDR chunk comes first: length 13, "IHDR", width, height, depth, color type.
    DMX_CHECK_ARG(read(8, 18, b) && read_be32(b) == 13 && std::memcmp(b + 4, "IHDR", 4) == 0, param,
                  ": corrupt PNG: no IHDR chunk first (truncated or not a PNG)");
    h.format = "PNG";
    const uint32_t w = read_be32(b + 8), hh = read_be32(b + 12);
    const int color_type = b[17];
    DMX_CHECK_ARG(w <= 0x7fffffffu && hh <= 0x7fffffffu, param, ": corrupt PNG: the header declares ", w, "x", hh,
                  " pixels");
    h.width = static_cast<int>(w);
    h.height = static_cast<int>(hh);
    // What decode_png asks libpng for: gray, gray + alpha, RGB or RGBA (palettes may carry alpha).
    h.channels = color_type == 0 ? 1 : color_type == 4 ? 2 : color_type == 2 ? 3 : 4;
    return h;
  }
  if (read(0, 3, b) && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF) {
    h.format = "JPEG";
    uint64_t pos = 2;
    // Markers up to the frame header (SOFn); real files have a few dozen segments before it.
    for (int segments = 0; segments < 4096; ++segments) {
      DMX_CHECK_ARG(read(pos, 2, b), param, ": corrupt JPEG: the file ends before the frame header (truncated)");
      if (b[0] != 0xFF) throw InvalidArgument(detail::concat(param, ": corrupt JPEG: no marker at byte ", pos));
      uint8_t m = b[1];
      ++pos;
      while (m == 0xFF) {  // fill bytes
        DMX_CHECK_ARG(read(pos, 2, b), param, ": corrupt JPEG: the file ends before the frame header (truncated)");
        m = b[1];
        ++pos;
      }
      ++pos;                                                // past the marker code
      if (m == 0x01 || (m >= 0xD0 && m <= 0xD8)) continue;  // markers without a length
      DMX_CHECK_ARG(m != 0xD9 && m != 0xDA, param, ": corrupt JPEG: no frame header (SOF) before ",
                    m == 0xD9 ? "the end of the image" : "the scan data");
      DMX_CHECK_ARG(read(pos, 2, b), param, ": corrupt JPEG: the file ends inside a segment header (truncated)");
      const unsigned len = (unsigned(b[0]) << 8) | b[1];
      DMX_CHECK_ARG(len >= 2, param, ": corrupt JPEG: segment length ", len, " at byte ", pos);
      const bool sof = m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC;
      if (sof) {
        DMX_CHECK_ARG(len >= 8 && read(pos + 2, 6, b), param, ": corrupt JPEG: truncated frame header");
        h.height = (int(b[1]) << 8) | b[2];
        h.width = (int(b[3]) << 8) | b[4];
        h.channels = b[5] == 1 ? 1 : 3;  // gray stays gray, everything else is decoded to RGB
        // A height of 0 (defined later by a DNL marker) is refused below like any empty size.
        return h;
      }
      pos += len;
    }
    throw InvalidArgument(detail::concat(param, ": corrupt JPEG: no frame header in the first 4096 segments"));
  }
  if (read(0, 12, b) && std::memcmp(b, "RIFF", 4) == 0 && std::memcmp(b + 8, "WEBP", 4) == 0)
    throw InvalidArgument(detail::concat(param, ": WebP images are not supported (PNG and JPEG are)"));
  throw InvalidArgument(detail::concat(param, ": unsupported or unreadable image format (expected PNG or JPEG)"));
}

std::string megapixels(double px) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f", px / 1e6);
  return buf;
}
}  // namespace

ImageHeader read_image_header(const uint8_t* bytes, size_t size, const std::string& param) {
  return parse_image_header(
      [&](uint64_t off, size_t n, uint8_t* out) {
        if (off > size || n > size - off) return false;
        std::memcpy(out, bytes + off, n);
        return true;
      },
      param);
}

ImageHeader read_image_header(const std::string& path, const std::string& param) {
  uint64_t size = 0;
  const int fd = open_regular_file(path, param, &size);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  DMX_CHECK_ARG(size <= kMaxImageFileBytes, param, ": ", path, " is ", size, " bytes, more than the ",
                format_byte_limit(kMaxImageFileBytes), " limit for image files");
  try {
    return parse_image_header(
        [&](uint64_t off, size_t n, uint8_t* out) {
          size_t got = 0;
          while (got < n) {
            const ssize_t r = ::pread(fd, out + got, n - got, static_cast<off_t>(off + got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return false;
            got += static_cast<size_t>(r);
          }
          return true;
        },
        param);
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(detail::concat(e.what(), " (", path, ")"));
  }
}

void check_image_header(const ImageHeader& h, const std::string& param, int64_t max_pixels) {
  check_dims(h.width, h.height, param);
  const double px = static_cast<double>(h.width) * h.height;
  if (px <= static_cast<double>(max_pixels)) return;
  const int side = static_cast<int>(std::sqrt(static_cast<double>(max_pixels)));
  const bool square = static_cast<int64_t>(side) * side == max_pixels;
  throw InvalidArgument(
      detail::concat(param, ": ", h.format, " image is ", h.width, "x", h.height, " (", megapixels(px),
                     " megapixels; decoding it would take ", format_size(static_cast<double>(h.decoded_bytes())),
                     "), more than the limit of ", megapixels(static_cast<double>(max_pixels)), " megapixels",
                     square ? detail::concat(" (", side, "x", side, ")") : std::string(), ": resize it first"));
}

Image decode_image(const uint8_t* bytes, size_t size, const std::string& param, int64_t max_pixels) {
  check_image_header(read_image_header(bytes, size, param), param, max_pixels);
  if (bytes[0] == 0x89) return decode_png(bytes, size, param);
  return decode_jpeg(bytes, size, param);
}

Image load_image(const std::string& path, const std::string& param, int64_t max_pixels) {
  // The header first: an oversized picture is refused before its file is even read whole.
  const ImageHeader header = read_image_header(path, param);
  try {
    check_image_header(header, param, max_pixels);
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(detail::concat(e.what(), " (", path, ")"));
  }
  const std::string bytes = read_text_file(path, param, kMaxImageFileBytes);
  DMX_CHECK_ARG(!bytes.empty(), param, ": image file is empty: ", path);
  try {
    return decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), param, max_pixels);
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(detail::concat(e.what(), " (", path, ")"));
  }
}

void check_image_size(const std::string& param, const Image& img, int expected_width, int expected_height) {
  DMX_CHECK_ARG(img.width == expected_width && img.height == expected_height, param, " must be ", expected_width, "x",
                expected_height, " to match the output size, got ", img.width, "x", img.height,
                " (resize it, or set --width/--height to its size)");
}

Image to_rgb(const Image& img) {
  if (img.channels == 3) return img;
  DMX_CHECK_ARG(img.channels >= 1 && img.channels <= 4, "to_rgb: 1 to 4 channels, got ", img.channels);
  Image out;
  out.width = img.width;
  out.height = img.height;
  out.channels = 3;
  const size_t n = static_cast<size_t>(img.width) * img.height;
  out.data.resize(n * 3);
  for (size_t i = 0; i < n; ++i)
    for (int c = 0; c < 3; ++c)  // gray (+ alpha): the gray repeated; RGB (+ alpha): the colour
      out.data[3 * i + c] = img.data[img.channels * i + (img.channels >= 3 ? c : 0)];
  return out;
}

Image to_gray(const Image& img) {
  if (img.channels == 1) return img;
  DMX_CHECK_ARG(img.channels >= 2 && img.channels <= 4, "to_gray: 1 to 4 channels, got ", img.channels);
  Image out;
  out.width = img.width;
  out.height = img.height;
  out.channels = 1;
  const size_t n = static_cast<size_t>(img.width) * img.height;
  out.data.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = &img.data[img.channels * i];
    if (img.channels == 2) {  // gray + alpha: the gray
      out.data[i] = p[0];
      continue;
    }
    // PIL's convert("L"): L = R * 299/1000 + G * 587/1000 + B * 114/1000 (rounded).
    out.data[i] = static_cast<uint8_t>((p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >> 16);
  }
  return out;
}

namespace {
void png_write_to_vector(png_structp png, png_bytep data, png_size_t len) {
  auto* v = static_cast<std::vector<uint8_t>*>(png_get_io_ptr(png));
  v->insert(v->end(), data, data + len);
}
void png_flush_noop(png_structp) {}
void png_error_throw(png_structp, png_const_charp msg) { throw IoError(detail::concat("PNG encoder: ", msg)); }
void png_warning_silent(png_structp, png_const_charp) {}
}  // namespace

std::vector<uint8_t> encode_jpeg(const Image& img, int quality) {
  DMX_CHECK_ARG(img.width > 0 && img.height > 0 && (img.channels == 1 || img.channels == 3),
                "encode_jpeg: the image must be gray or RGB, got ", img.width, "x", img.height, "x", img.channels);
  DMX_CHECK_ARG(quality >= 1 && quality <= 100, "JPEG quality must be in [1, 100], got ", quality);
  DMX_CHECK_ARG(img.data.size() == static_cast<size_t>(img.width) * img.height * img.channels,
                "encode_jpeg: pixel data does not match the size");
  jpeg_compress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_error_exit;
  err.message[0] = 0;
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  const bool ok =
      jpeg_encode_raw(&cinfo, &err, img.data.data(), img.width, img.height, img.channels, quality, &buf, &size);
  std::vector<uint8_t> out;
  if (ok && buf) out.assign(buf, buf + size);
  std::free(buf);
  DMX_CHECK_IO(ok, "JPEG encoder: ", err.message);
  return out;
}

std::vector<uint8_t> encode_png(const Image& img, const TextChunks& text) {
  DMX_CHECK_ARG(img.width > 0 && img.height > 0 && (img.channels == 1 || img.channels == 3 || img.channels == 4),
                "encode_png: bad image ", img.width, "x", img.height, "x", img.channels);
  std::vector<uint8_t> out;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, png_error_throw, png_warning_silent);
  DMX_CHECK_IO(png != nullptr, "PNG encoder: out of memory");
  png_infop info = png_create_info_struct(png);
  try {
    png_set_write_fn(png, &out, png_write_to_vector, png_flush_noop);
    const int type = img.channels == 1   ? PNG_COLOR_TYPE_GRAY
                     : img.channels == 3 ? PNG_COLOR_TYPE_RGB
                                         : PNG_COLOR_TYPE_RGBA;
    png_set_IHDR(png, info, img.width, img.height, 8, type, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    std::vector<png_text> chunks(text.size());
    for (size_t i = 0; i < text.size(); ++i) {
      bool ascii = true;
      for (unsigned char c : text[i].second) ascii = ascii && c < 0x80;
      std::memset(&chunks[i], 0, sizeof(png_text));
      chunks[i].compression = ascii ? PNG_TEXT_COMPRESSION_NONE : PNG_ITXT_COMPRESSION_NONE;
      chunks[i].key = const_cast<char*>(text[i].first.c_str());
      chunks[i].text = const_cast<char*>(text[i].second.c_str());
      if (ascii)
        chunks[i].text_length = text[i].second.size();
      else
        chunks[i].itxt_length = text[i].second.size();
    }
    if (!chunks.empty()) png_set_text(png, info, chunks.data(), static_cast<int>(chunks.size()));
    png_write_info(png, info);
    for (int y = 0; y < img.height; ++y)
      png_write_row(png, const_cast<png_bytep>(img.data.data() + static_cast<size_t>(y) * img.width * img.channels));
    png_write_end(png, nullptr);
  } catch (...) {
    png_destroy_write_struct(&png, &info);
    throw;
  }
  png_destroy_write_struct(&png, &info);
  return out;
}

void save_png(const std::string& path, const Image& img, const TextChunks& text) {
  std::vector<uint8_t> bytes = encode_png(img, text);
  write_bytes_atomic(path, bytes.data(), bytes.size());
}

namespace {
struct PngReader {
  const uint8_t* data;
  size_t size;
  size_t pos;
  char message[256];
};
void png_read_from_memory(png_structp png, png_bytep out, png_size_t len) {
  auto* r = static_cast<PngReader*>(png_get_io_ptr(png));
  if (len > r->size - r->pos) png_error(png, "unexpected end of PNG data");
  std::memcpy(out, r->data + r->pos, len);
  r->pos += len;
}
// Records the message; libpng then longjmps to the png_jmpbuf set in png_read_info_raw.
void png_error_record(png_structp png, png_const_charp msg) {
  auto* r = static_cast<PngReader*>(png_get_error_ptr(png));
  std::snprintf(r->message, sizeof(r->message), "%s", msg ? msg : "unknown error");
  png_longjmp(png, 1);  // returning would make libpng print the message on stderr first
}
// The libpng calls that can fail, in a frame without C++ objects (longjmp skips no destructor).
bool png_read_info_raw(png_structp png, png_infop info, PngReader* reader) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_set_read_fn(png, reader, png_read_from_memory);
  png_read_info(png, info);
  return true;
}
}  // namespace

TextChunks read_png_text(const uint8_t* bytes, size_t size, const std::string& what) {
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  DMX_CHECK_ARG(size >= 8 && std::memcmp(bytes, kPng, 8) == 0, "not a PNG file: ", what);
  check_png_chunks(bytes, size, what);
  PngReader reader{bytes, size, 0, {0}};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &reader, png_error_record, png_warning_silent);
  DMX_CHECK_IO(png != nullptr, "PNG decoder: out of memory");
  png_infop info = png_create_info_struct(png);
  // Compressed text (zTXt, iTXt) may expand 1000-fold: bound what one chunk may take.
  png_set_chunk_malloc_max(png, 16u << 20);
  if (info == nullptr || !png_read_info_raw(png, info, &reader)) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw InvalidArgument(detail::concat("corrupt PNG ", what, ": ", reader.message));
  }
  TextChunks out;
  png_textp text = nullptr;
  const int n = png_get_text(png, info, &text, nullptr);
  for (int i = 0; i < n; ++i)
    out.emplace_back(text[i].key,
                     std::string(text[i].text, text[i].compression > 0 ? text[i].itxt_length : text[i].text_length));
  png_destroy_read_struct(&png, &info, nullptr);
  return out;
}

TextChunks read_png_text(const std::string& path) {
  std::string bytes = read_text_file(path, "PNG", kMaxImageFileBytes);
  return read_png_text(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path);
}

at::Tensor image_to_tensor(const Image& rgb) {
  DMX_CHECK_ARG(rgb.channels == 3, "image_to_tensor: expected an RGB image, got ", rgb.channels, " channels");
  at::Tensor t =
      at::from_blob(const_cast<uint8_t*>(rgb.data.data()), {rgb.height, rgb.width, 3}, at::kByte).to(at::kFloat);
  // diffusers: numpy uint8 / 255.0 (float32), then 2x - 1.
  t = t / 255.0f;
  t = t * 2.0f - 1.0f;
  return t.permute({2, 0, 1}).unsqueeze(0).contiguous();
}

Image tensor_to_image(const at::Tensor& hwc01) {
  DMX_CHECK_ARG(hwc01.dim() == 3 && hwc01.size(2) == 3, "tensor_to_image: expected [H, W, 3], got ", hwc01.sizes());
  at::Tensor u8 = at::round(hwc01.to(at::kFloat).contiguous() * 255.0f).clamp(0, 255).to(at::kByte).contiguous();
  Image img;
  img.height = static_cast<int>(hwc01.size(0));
  img.width = static_cast<int>(hwc01.size(1));
  img.channels = 3;
  img.data.assign(u8.data_ptr<uint8_t>(), u8.data_ptr<uint8_t>() + u8.numel());
  return img;
}
}  // namespace dmx
