// Placeholder compiled only while src/training/dataset.cpp (dist branch) is absent from this tree: every
// entry point throws dmx::Unsupported, so the trainer links and its tests (which use in-memory batches) run.
#include "dmx/error.h"
#include "training/dataset.h"

namespace dmx::training {
namespace {
[[noreturn]] void pending() {
  throw Unsupported("image-caption datasets are not built into this dmx (src/training/dataset.cpp is missing)");
}
}  // namespace
ImageCaptionDataset::ImageCaptionDataset(DatasetOptions o) : o_(std::move(o)) { pending(); }
Example ImageCaptionDataset::get(size_t, uint64_t) const { pending(); }
Batch ImageCaptionDataset::collate(const std::vector<size_t>&, uint64_t) const { pending(); }
BatchSampler::BatchSampler(size_t, int, int, int, uint64_t, bool) { pending(); }
std::vector<size_t> BatchSampler::indices(int64_t) const { pending(); }
std::vector<size_t> BatchSampler::global_indices(int64_t) const { pending(); }
uint64_t BatchSampler::augment_seed(int64_t) const { pending(); }
}  // namespace dmx::training
