// Image-caption datasets in the layouts users already have (contract shared by the training recipes):
//   - `name.png|jpg|jpeg|webp` + `name.txt` (caption) side by side, or
//   - `metadata.jsonl`, one JSON object per line as diffusers' ImageFolder datasets use:
//     {"file_name": "a.png", "text": "a caption", "conditioning_image": "cond/a.png"} (paths relative to the folder;
//     `conditioning_image` for ControlNet).
// Transforms follow diffusers' train_text_to_image.py / train_controlnet.py: resize the shorter side to
// `resolution` (bilinear... see dataset.cpp), center or random crop to resolution x resolution, optional
// horizontal flip (image and conditioning together), pixels normalised to [-1, 1] (conditioning to [0, 1]).
// Internal header of the training layer.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dmx::training {

enum class BadRows {
  Reject,  // the constructor throws InvalidArgument listing every bad row (file and line)
  Skip,    // bad rows are left out; skipped() says which and why
};

struct DatasetOptions {
  std::string dir;
  int resolution = 512;               // output side; a multiple of 8
  bool center_crop = true;            // false: random crop
  bool random_flip = false;           // horizontal flip with probability 0.5
  bool require_captions = true;       // a missing or empty caption is a bad row
  bool require_conditioning = false;  // ControlNet: every row needs a readable conditioning_image
  std::string image_column = "file_name";
  std::string caption_column = "text";
  std::string conditioning_column = "conditioning_image";
  BadRows bad_rows = BadRows::Reject;
};

struct DatasetRow {
  std::string image;         // path of the image
  std::string caption;       // "" when none
  std::string conditioning;  // path of the conditioning image, "" when none
  std::string origin;        // for messages: "metadata.jsonl:12" or "cat.txt"
};

struct Example {
  at::Tensor pixel_values;  // [3, R, R] float32 in [-1, 1]
  at::Tensor conditioning;  // [3, R, R] float32 in [0, 1]; undefined without conditioning
  std::string caption;
  int64_t index = 0;  // row index
};

struct Batch {
  at::Tensor pixel_values;  // [B, 3, R, R]
  at::Tensor conditioning;  // [B, 3, R, R] or undefined
  std::vector<std::string> captions;
  std::vector<int64_t> indices;
  // DreamBooth with prior preservation: true for the class (prior) rows; empty when the batch has none.
  std::vector<bool> prior_rows;
};

class ImageCaptionDataset {
 public:
  // Scans and validates the folder (every image header is read; images are decoded lazily in get()).
  // Empty folder, missing dir: InvalidArgument naming `--data` and the path.
  explicit ImageCaptionDataset(DatasetOptions o);
  size_t size() const { return rows_.size(); }
  const std::vector<DatasetRow>& rows() const { return rows_; }
  const std::vector<std::string>& skipped() const { return skipped_; }  // one message per skipped row
  const DatasetOptions& options() const { return o_; }
  // Random crop offsets and flips are drawn from a CPU generator seeded with `augment_seed`, so an
  // example is a pure function of (row, augment_seed): resuming needs no data-loader state.
  Example get(size_t i, uint64_t augment_seed) const;
  // Stacks get(indices[k], augment_seed + k).
  Batch collate(const std::vector<size_t>& indices, uint64_t augment_seed) const;

 private:
  DatasetOptions o_;
  std::vector<DatasetRow> rows_;
  std::vector<std::string> skipped_;
};

// Which rows each micro-step sees. Epoch e is a permutation of [0, n) drawn from a generator seeded with
// seed + e (identity when !shuffle). The global batch of micro-step s is the next world_size * batch_size
// entries of that stream (wrapping into the next epoch); rank r takes entries [r * batch_size, (r+1) *
// batch_size) of it, so the union over ranks is the single-process batch of size world_size * batch_size.
// A pure function of its arguments (resume-friendly).
class BatchSampler {
 public:
  BatchSampler(size_t dataset_size, int batch_size_per_rank, int rank, int world_size, uint64_t seed,
               bool shuffle = true);
  std::vector<size_t> indices(int64_t micro_step) const;  // this rank's rows for this micro-step
  // The global batch of a micro-step (all ranks, in rank order).
  std::vector<size_t> global_indices(int64_t micro_step) const;
  // Augmentation seed of a micro-step, the same on every rank; rank r's examples use
  // augment_seed(step) + r * batch_size + k, so global and per-rank batches get the same crops and flips.
  uint64_t augment_seed(int64_t micro_step) const;

 private:
  size_t n_;
  int batch_size_, rank_, world_size_;
  uint64_t seed_;
  bool shuffle_;
};
}  // namespace dmx::training
