// DreamBooth (see dreambooth.h): diffusers 0.27.2 examples/dreambooth/train_dreambooth.py.
#include "training/dreambooth.h"

#include <algorithm>
#include <cctype>
#include <filesystem>

#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "dmx/error.h"

namespace dmx::training {

namespace fs = std::filesystem;

std::vector<std::string> list_images(const std::string& dir) {
  std::vector<std::string> v;
  if (!is_directory(dir)) return v;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    std::string ext = e.path().extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
    if (ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".webp") v.push_back(e.path().string());
  }
  std::sort(v.begin(), v.end());
  return v;
}

int generate_class_images(std::shared_ptr<loaders::StableDiffusionModels> m, const ClassImageOptions& o,
                          const SampleImages& sample) {
  DMX_CHECK_ARG(!o.dir.empty(), "--class-data must be given with prior preservation");
  DMX_CHECK_ARG(!o.prompt.empty(), "--class-prompt must be given with --class-data");
  DMX_CHECK_ARG(o.num_class_images > 0, "--num-class-images must be > 0, got ", o.num_class_images);
  DMX_CHECK_ARG(sample != nullptr, "class images need a text-to-image callback");
  fs::create_directories(o.dir);
  const int have = static_cast<int>(list_images(o.dir).size());
  if (have >= o.num_class_images) return 0;
  log_info(detail::concat("dreambooth: generating ", o.num_class_images - have, " class images for '", o.prompt,
                          "' into ", o.dir));
  at::NoGradGuard no_grad;
  int made = 0;
  for (int k = have; k < o.num_class_images; ++k) {
    SampleRequest r;
    r.prompt = o.prompt;
    r.width = r.height = o.resolution;
    r.num_inference_steps = o.num_inference_steps;
    r.guidance_scale = o.guidance_scale;
    r.seed = o.seed + static_cast<uint64_t>(k);
    const at::Tensor images = sample(m, r);
    char name[64];
    std::snprintf(name, sizeof name, "class-%05d.png", k);
    std::string path = join_path(o.dir, name);
    for (int extra = 1; path_exists(path); ++extra) {
      std::snprintf(name, sizeof name, "class-%05d-%d.png", k, extra);
      path = join_path(o.dir, name);
    }
    save_png(path, tensor_to_image(images[0]), {{"parameters", o.prompt}});
    ++made;
  }
  return made;
}

DreamBoothBatchSource::DreamBoothBatchSource(std::shared_ptr<ImageCaptionDataset> instance, std::string instance_prompt,
                                             std::shared_ptr<ImageCaptionDataset> class_images,
                                             std::string class_prompt, int batch_size_per_rank, int rank,
                                             int world_size, uint64_t seed)
    : inst_(std::move(instance)),
      cls_(std::move(class_images)),
      inst_prompt_(std::move(instance_prompt)),
      cls_prompt_(std::move(class_prompt)),
      n_(std::max(inst_->size(), cls_ ? cls_->size() : size_t{0})),
      sampler_(n_, batch_size_per_rank, rank, world_size, seed, true),
      batch_size_(batch_size_per_rank),
      rank_(rank) {
  DMX_CHECK_ARG(!inst_prompt_.empty(), "--instance-prompt must not be empty");
  DMX_CHECK_ARG(!cls_ || !cls_prompt_.empty(), "--class-prompt must not be empty with --class-data");
}

Batch DreamBoothBatchSource::get(int64_t micro_step) {
  const uint64_t aug = sampler_.augment_seed(micro_step);
  if (!cls_) {
    std::vector<size_t> ii;
    for (size_t p : sampler_.indices(micro_step)) ii.push_back(p % inst_->size());
    Batch b = inst_->collate(ii, aug + static_cast<uint64_t>(rank_) * batch_size_);
    b.captions.assign(ii.size(), inst_prompt_);
    return b;
  }
  // The single-process batch: global row j < G is instance position j (augmentation seed aug + j), row G + j
  // class position j (seed aug + 2^32 + j). This rank takes rows [lo, hi).
  const std::vector<size_t> pos = sampler_.global_indices(micro_step);
  const size_t G = pos.size();
  const size_t lo = 2 * static_cast<size_t>(batch_size_) * static_cast<size_t>(rank_);
  const size_t hi = lo + 2 * static_cast<size_t>(batch_size_);
  std::vector<Batch> parts;
  std::vector<bool> prior;
  if (lo < G) {  // instance rows [lo, min(hi, G))
    std::vector<size_t> ii;
    for (size_t j = lo; j < std::min(hi, G); ++j) ii.push_back(pos[j] % inst_->size());
    parts.push_back(inst_->collate(ii, aug + lo));
    parts.back().captions.assign(ii.size(), inst_prompt_);
    prior.insert(prior.end(), ii.size(), false);
  }
  if (hi > G) {  // class rows [max(lo, G), hi) - G
    const size_t c0 = std::max(lo, G) - G;
    std::vector<size_t> ci;
    for (size_t j = c0; j < hi - G; ++j) ci.push_back(pos[j] % cls_->size());
    parts.push_back(cls_->collate(ci, aug + (uint64_t{1} << 32) + c0));
    parts.back().captions.assign(ci.size(), cls_prompt_);
    prior.insert(prior.end(), ci.size(), true);
  }
  Batch b = std::move(parts.front());
  if (parts.size() == 2) {
    const Batch& c = parts[1];
    b.pixel_values = at::cat({b.pixel_values, c.pixel_values}, 0);  // [2B, 3, R, R]
    b.captions.insert(b.captions.end(), c.captions.begin(), c.captions.end());
    b.indices.insert(b.indices.end(), c.indices.begin(), c.indices.end());
  }
  b.prior_rows = std::move(prior);
  return b;
}

DreamBoothRecipe::DreamBoothRecipe(std::shared_ptr<Recipe> inner, bool prior_preservation, double prior_loss_weight)
    : Recipe(inner->models_ptr()),
      inner_(std::move(inner)),
      prior_(prior_preservation),
      prior_loss_weight_(prior_loss_weight) {
  DMX_CHECK_ARG(std::isfinite(prior_loss_weight) && prior_loss_weight >= 0, "--prior-loss-weight must be >= 0, got ",
                prior_loss_weight);
}

at::Tensor DreamBoothRecipe::reduce_loss(const at::Tensor& per, const Batch& batch) {
  if (!prior_) return per.mean();
  const int64_t rows = per.size(0);
  DMX_CHECK_ARG(rows % 2 == 0,
                "dreambooth: a prior-preservation batch holds instance and class rows in equal numbers, got ", rows,
                " rows");
  std::vector<bool> prior = batch.prior_rows;
  if (prior.empty()) {  // a source that does not mark its rows: instance rows, then as many class rows
    prior.assign(static_cast<size_t>(rows), false);
    std::fill(prior.begin() + rows / 2, prior.end(), true);
  }
  DMX_CHECK_ARG(static_cast<int64_t>(prior.size()) == rows, "dreambooth: the batch marks ", prior.size(),
                " rows as instance or class rows, the loss has ", rows);
  std::vector<int64_t> inst, cls;
  for (int64_t i = 0; i < rows; ++i) (prior[static_cast<size_t>(i)] ? cls : inst).push_back(i);
  const auto sum_of = [&](const std::vector<int64_t>& idx) {
    return idx.empty() ? at::zeros({}, per.options()) : per.index_select(0, at::tensor(idx, at::kLong)).sum();
  };
  return (sum_of(inst) + prior_loss_weight_ * sum_of(cls)) / static_cast<double>(rows / 2);
}

}  // namespace dmx::training
