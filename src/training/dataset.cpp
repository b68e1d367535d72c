// Image-caption datasets (see dataset.h). Transforms mirror diffusers' train_text_to_image.py and
// train_controlnet.py (torchvision on PIL images):
//   transforms.Resize(resolution, BILINEAR)  -> shorter side to `resolution`, longer int(res * long / short),
//                                               Pillow's bilinear (antialiased) resampling: core/resize.h
//   CenterCrop(resolution) / RandomCrop       -> top = int(round((h - R) / 2)) (round half to even); random
//                                               offsets torch.randint(0, h - R + 1) then (0, w - R + 1)
//   RandomHorizontalFlip()                    -> torch.rand(1) < 0.5
//   ToTensor + Normalize([0.5], [0.5])        -> (x / 255 - 0.5) / 0.5 (the conditioning stops at x / 255)
// The random draws come from a torch CPU generator seeded per example, so each example is a pure function of
// (row, seed).
#include "training/dataset.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/resize.h"
#include "core/text.h"
#include "core/utf8.h"
#include "dmx/error.h"

namespace dmx::training {
namespace fs = std::filesystem;

namespace {

bool is_image_extension(const std::string& ext) {
  const std::string e = to_lower_ascii(ext);
  return e == ".png" || e == ".jpg" || e == ".jpeg" || e == ".webp";
}

// Reads the image header (core/image.h) to know it is a PNG or JPEG within the training image limit.
// Returns "" when fine, else why not. Pixel data is decoded later, in get().
std::string probe_image(const std::string& path) {
  try {
    check_image_header(read_image_header(path, "image"), "image", kMaxDatasetImagePixels);
    return "";
  } catch (const InvalidArgument& e) {
    std::string why = e.what();
    if (why.rfind("image: ", 0) == 0) why = why.substr(7);
    if (why.find(path) == std::string::npos) why += " (" + path + ")";
    return why;
  }
}

std::string resolve(const std::string& dir, const std::string& rel) {
  if (!rel.empty() && rel[0] == '/') return rel;
  return join_path(dir, rel);
}

// Resize the shorter side to `res` as torchvision's Resize(int) computes the size (long side truncated).
Image resize_shorter_side(const Image& img, int res) {
  int w = img.width, h = img.height;
  if (w <= h) {
    h = static_cast<int>(static_cast<double>(res) * img.height / img.width);
    w = res;
  } else {
    w = static_cast<int>(static_cast<double>(res) * img.width / img.height);
    h = res;
  }
  if (w == img.width && h == img.height) return img;
  return resize_bilinear(img, w, h);
}

// [3, R, R] float32 from the crop (top, left) of an RGB image, optionally mirrored; `normalize` maps to
// [-1, 1] as ToTensor + Normalize(0.5, 0.5) does, else [0, 1] as ToTensor alone.
at::Tensor crop_to_tensor(const Image& img, int top, int left, int res, bool flip, bool normalize) {
  at::Tensor hwc = at::from_blob(const_cast<uint8_t*>(img.data.data()), {img.height, img.width, 3}, at::kByte);
  at::Tensor t = hwc.narrow(0, top, res).narrow(1, left, res).permute({2, 0, 1});  // [3, R, R]
  if (flip) t = t.flip({2});
  t = t.to(at::kFloat).div(255);
  if (normalize) t = t.sub(0.5).div(0.5);
  return t.contiguous();
}

// Captions are checked when the dataset is opened, so that a bad one is found before training and not at the
// step that draws it: "" when the text is valid UTF-8 without NUL bytes, else what is wrong.
std::string caption_problem(const std::string& caption) {
  try {
    check_text(caption, "");
  } catch (const InvalidArgument& e) {
    std::string why = e.what();
    while (!why.empty() && why.front() == ' ') why.erase(0, 1);
    return why;
  }
  return "";
}

int center_offset(int size, int res) {
  return static_cast<int>(std::nearbyint((size - res) / 2.0));  // Python round: half to even (default FE mode)
}
}  // namespace

ImageCaptionDataset::ImageCaptionDataset(DatasetOptions o) : o_(std::move(o)) {
  DMX_CHECK_ARG(o_.resolution >= 8 && o_.resolution % 8 == 0 && o_.resolution <= kMaxImageSide,
                "--resolution must be a positive multiple of 8 (at most ", kMaxImageSide, "), got ", o_.resolution);
  DMX_CHECK_ARG(!o_.dir.empty(), "--data must name a folder of images, got an empty path");
  DMX_CHECK_ARG(is_directory(o_.dir), "--data must be a folder of images, got '", o_.dir, "' (",
                path_exists(o_.dir) ? "not a folder" : "does not exist", ")");
  std::vector<std::string> bad;
  const std::string meta = join_path(o_.dir, "metadata.jsonl");
  if (path_exists(meta)) {
    std::istringstream in(read_text_file(meta, "--data metadata.jsonl", kMaxMetadataFileBytes));
    std::string line;
    int line_no = 0;
    while (std::getline(in, line)) {
      ++line_no;
      if (trim(line).empty()) continue;
      const std::string origin = "metadata.jsonl:" + std::to_string(line_no);
      auto fail = [&](const std::string& why) { bad.push_back(origin + ": " + why); };
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail(std::string("not valid JSON (") + e.what() + ")");
        continue;
      }
      if (!j.is_object()) {
        fail("a row must be a JSON object");
        continue;
      }
      DatasetRow row;
      row.origin = origin;
      auto it = j.find(o_.image_column);
      if (it == j.end() || !it->is_string() || it->get<std::string>().empty()) {
        fail("column '" + o_.image_column + "' (the image file) is missing or not a string");
        continue;
      }
      row.image = resolve(o_.dir, it->get<std::string>());
      if (const std::string why = probe_image(row.image); !why.empty()) {
        fail("image " + why);
        continue;
      }
      it = j.find(o_.caption_column);
      if (it != j.end()) {
        if (it->is_string()) {
          row.caption = it->get<std::string>();
        } else if (it->is_array() && !it->empty() && (*it)[0].is_string()) {
          row.caption = (*it)[0].get<std::string>();  // diffusers takes caption[0] outside training's random pick
        } else if (!it->is_null()) {
          fail("column '" + o_.caption_column + "' must be a string or a list of strings");
          continue;
        }
      }
      if (row.caption.size() > kMaxTextFileBytes) {
        fail("caption is " + std::to_string(row.caption.size()) + " bytes, more than the " +
             format_byte_limit(kMaxTextFileBytes) + " limit for prompts and captions");
        continue;
      }
      if (o_.require_captions && trim(row.caption).empty()) {
        fail("empty or missing caption (column '" + o_.caption_column + "')");
        continue;
      }
      if (const std::string why = caption_problem(row.caption); o_.require_captions && !why.empty()) {
        fail("caption (column '" + o_.caption_column + "') " + why);
        continue;
      }
      it = j.find(o_.conditioning_column);
      if (it != j.end() && !it->is_null()) {
        if (!it->is_string() || it->get<std::string>().empty()) {
          fail("column '" + o_.conditioning_column + "' must be a non-empty string");
          continue;
        }
        row.conditioning = resolve(o_.dir, it->get<std::string>());
        if (const std::string why = probe_image(row.conditioning); !why.empty()) {
          fail("conditioning image " + why);
          continue;
        }
      } else if (o_.require_conditioning) {
        fail("column '" + o_.conditioning_column + "' (the conditioning image) is missing");
        continue;
      }
      rows_.push_back(std::move(row));
    }
  } else {
    DMX_CHECK_ARG(!o_.require_conditioning, "--data: a ControlNet dataset needs metadata.jsonl with a '",
                  o_.conditioning_column, "' column; none in '", o_.dir, "'");
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(o_.dir))
      if (e.is_regular_file() && is_image_extension(e.path().extension().string())) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& p : files) {
      const std::string origin = p.filename().string();
      DatasetRow row;
      row.origin = origin;
      row.image = p.string();
      if (const std::string why = probe_image(row.image); !why.empty()) {
        bad.push_back(origin + ": image " + why);
        continue;
      }
      fs::path txt = p;
      txt.replace_extension(".txt");
      if (path_exists(txt.string())) {
        try {
          row.caption = trim(read_text_file(txt.string(), "caption", kMaxTextFileBytes));
        } catch (const InvalidArgument& e) {
          bad.push_back(origin + ": " + e.what());
          continue;
        }
      }
      if (o_.require_captions && row.caption.empty()) {
        bad.push_back(origin + ": " + (fs::is_regular_file(txt) ? "empty caption in " : "no caption file ") +
                      txt.filename().string());
        continue;
      }
      if (const std::string why = caption_problem(row.caption); o_.require_captions && !why.empty()) {
        bad.push_back(origin + ": caption " + txt.filename().string() + " " + why);
        continue;
      }
      rows_.push_back(std::move(row));
    }
  }
  if (!bad.empty() && o_.bad_rows == BadRows::Reject) {
    std::ostringstream msg;
    msg << "--data: " << bad.size() << " bad row" << (bad.size() == 1 ? "" : "s") << " in '" << o_.dir
        << "' (fix them, or skip them with --skip-bad-rows):";
    const size_t shown = std::min<size_t>(bad.size(), 20);
    for (size_t i = 0; i < shown; ++i) msg << "\n  " << bad[i];
    if (shown < bad.size()) msg << "\n  ... and " << bad.size() - shown << " more";
    throw InvalidArgument(msg.str());
  }
  skipped_ = std::move(bad);
  if (!skipped_.empty()) {  // --skip-bad-rows: say how many and which (the first few)
    std::ostringstream msg;
    msg << "--data: skipped " << skipped_.size() << " bad row" << (skipped_.size() == 1 ? "" : "s") << " of "
        << skipped_.size() + rows_.size() << " in '" << o_.dir << "' (--skip-bad-rows):";
    const size_t shown = std::min<size_t>(skipped_.size(), 5);
    for (size_t i = 0; i < shown; ++i) msg << "\n  " << skipped_[i];
    if (shown < skipped_.size()) msg << "\n  ... and " << skipped_.size() - shown << " more";
    log_warn(msg.str());
  }
  DMX_CHECK_ARG(
      !rows_.empty(), "--data: no usable image in '", o_.dir, "'",
      skipped_.empty() ? " (expected name.png + name.txt pairs or metadata.jsonl)" : " (every row was skipped as bad)");
}

Example ImageCaptionDataset::get(size_t i, uint64_t augment_seed) const {
  DMX_CHECK_ARG(i < rows_.size(), "dataset index must be < ", rows_.size(), ", got ", i);
  const DatasetRow& row = rows_[i];
  const int R = o_.resolution;
  auto load = [&](const std::string& path) {
    try {
      return resize_shorter_side(to_rgb(load_image(path, "--data", kMaxDatasetImagePixels)), R);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(row.origin + ": " + e.what());
    }
  };
  const Image img = load(row.image);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(augment_seed);
  int top = center_offset(img.height, R), left = center_offset(img.width, R);
  if (!o_.center_crop) {
    top = static_cast<int>(at::randint(img.height - R + 1, {1}, gen, at::kLong).item<int64_t>());
    left = static_cast<int>(at::randint(img.width - R + 1, {1}, gen, at::kLong).item<int64_t>());
  }
  bool flip = false;
  if (o_.random_flip) flip = at::rand({1}, gen).item<float>() < 0.5f;
  Example ex;
  ex.pixel_values = crop_to_tensor(img, top, left, R, flip, true);
  ex.caption = row.caption;
  ex.index = static_cast<int64_t>(i);
  if (!row.conditioning.empty()) {
    const Image cond = load(row.conditioning);
    int ct = center_offset(cond.height, R), cl = center_offset(cond.width, R);
    if (!o_.center_crop) {  // the same region, scaled if the conditioning image has another aspect
      ct = img.height == R ? 0 : static_cast<int>(std::lround(double(top) * (cond.height - R) / (img.height - R)));
      cl = img.width == R ? 0 : static_cast<int>(std::lround(double(left) * (cond.width - R) / (img.width - R)));
    }
    ex.conditioning = crop_to_tensor(cond, ct, cl, R, flip, false);
  }
  return ex;
}

Batch ImageCaptionDataset::collate(const std::vector<size_t>& indices, uint64_t augment_seed) const {
  DMX_CHECK_ARG(!indices.empty(), "collate: a batch needs at least one row");
  Batch b;
  std::vector<at::Tensor> px, cond;
  for (size_t k = 0; k < indices.size(); ++k) {
    Example ex = get(indices[k], augment_seed + k);
    px.push_back(ex.pixel_values);
    if (ex.conditioning.defined()) cond.push_back(ex.conditioning);
    b.captions.push_back(std::move(ex.caption));
    b.indices.push_back(ex.index);
  }
  b.pixel_values = at::stack(px);  // [B, 3, R, R]
  if (!cond.empty()) {
    DMX_CHECK_ARG(cond.size() == px.size(), "collate: some rows of the batch have a conditioning image and some not");
    b.conditioning = at::stack(cond);
  }
  return b;
}

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

BatchSampler::BatchSampler(size_t dataset_size, int batch_size_per_rank, int rank, int world_size, uint64_t seed,
                           bool shuffle)
    : n_(dataset_size),
      batch_size_(batch_size_per_rank),
      rank_(rank),
      world_size_(world_size),
      seed_(seed),
      shuffle_(shuffle) {
  DMX_CHECK_ARG(n_ > 0, "BatchSampler: the dataset is empty");
  DMX_CHECK_ARG(batch_size_ >= 1, "--batch-size must be >= 1, got ", batch_size_);
  DMX_CHECK_ARG(world_size_ >= 1, "WORLD_SIZE must be >= 1, got ", world_size_);
  DMX_CHECK_ARG(rank_ >= 0 && rank_ < world_size_, "RANK must be in [0, WORLD_SIZE) = [0, ", world_size_, "), got ",
                rank_);
}

std::vector<size_t> BatchSampler::global_indices(int64_t micro_step) const {
  DMX_CHECK_ARG(micro_step >= 0, "micro step must be >= 0, got ", micro_step);
  const uint64_t g = static_cast<uint64_t>(world_size_) * static_cast<uint64_t>(batch_size_);
  const uint64_t first = static_cast<uint64_t>(micro_step) * g;
  std::vector<size_t> out;
  out.reserve(g);
  int64_t cached_epoch = -1;
  std::vector<int64_t> perm;
  for (uint64_t e = first; e < first + g; ++e) {
    const auto epoch = static_cast<int64_t>(e / n_);
    const size_t pos = static_cast<size_t>(e % n_);
    if (!shuffle_) {
      out.push_back(pos);
      continue;
    }
    if (epoch != cached_epoch) {
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed_ + static_cast<uint64_t>(epoch));
      at::Tensor p = at::randperm(static_cast<int64_t>(n_), gen, at::kLong);
      perm.assign(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + n_);
      cached_epoch = epoch;
    }
    out.push_back(static_cast<size_t>(perm[pos]));
  }
  return out;
}

std::vector<size_t> BatchSampler::indices(int64_t micro_step) const {
  const std::vector<size_t> g = global_indices(micro_step);
  return {g.begin() + static_cast<ptrdiff_t>(rank_) * batch_size_,
          g.begin() + static_cast<ptrdiff_t>(rank_ + 1) * batch_size_};
}

uint64_t BatchSampler::augment_seed(int64_t micro_step) const {
  return splitmix64(seed_) +
         static_cast<uint64_t>(micro_step) * static_cast<uint64_t>(world_size_) * static_cast<uint64_t>(batch_size_);
}
}  // namespace dmx::training
