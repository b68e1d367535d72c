// Peak memory (docs/performance.md, "Peak memory"): a model is loaded in its run dtype tensor by tensor without
// a float32 copy and without keeping its file resident, and a one-shot generation frees the text encoder and the
// UNet once done with them.
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <sstream>

#include "core/memory.h"
#include "dmx/convert.h"
#include "dmx/error.h"
#include "io/releasing_load.h"
#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "pipelines/stable_diffusion.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {

// Counts the bytes of every live CPU tensor allocation while installed: the peak is what a piece of code needed
// at once, independent of the allocator's caching and of the process's other memory.
class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) const override {
    c10::DataPtr inner = base_->allocate(n);
    void* p = inner.get();
    auto* ctx = new Ctx{const_cast<TrackingAllocator*>(this), std::move(inner), n};
    const int64_t now = live_.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n);
    int64_t prev = peak_.load();
    while (now > prev && !peak_.compare_exchange_weak(prev, now)) {
    }
    return {p, ctx, &TrackingAllocator::free_ctx, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void reset_peak() { peak_ = live_.load(); }
  int64_t peak() const { return peak_.load(); }
  int64_t live() const { return live_.load(); }

 private:
  struct Ctx {
    TrackingAllocator* self;
    c10::DataPtr inner;
    size_t n;
  };
  static void free_ctx(void* c) {
    auto* ctx = static_cast<Ctx*>(c);
    ctx->self->live_.fetch_sub(static_cast<int64_t>(ctx->n));
    delete ctx;  // frees through the base allocator's own deleter
  }
  c10::Allocator* base_;
  mutable std::atomic<int64_t> live_{0}, peak_{0};
};

// Installs a TrackingAllocator for its lifetime (never deleted: tensors it allocated may outlive the scope).
struct TrackAllocations {
  c10::Allocator* prev = c10::GetCPUAllocator();
  TrackingAllocator* tracker = new TrackingAllocator(prev);
  TrackAllocations() { c10::SetCPUAllocator(tracker, /*priority=*/255); }
  ~TrackAllocations() { c10::SetCPUAllocator(prev, /*priority=*/255); }
};

int64_t model_bytes(const loaders::StableDiffusionModels& m) {
  int64_t n = 0;
  for (const torch::nn::Module* mod :
       {static_cast<const torch::nn::Module*>(m.unet.get()), static_cast<const torch::nn::Module*>(m.vae.get()),
        static_cast<const torch::nn::Module*>(m.text_encoder.get())})
    for (const auto& p : mod->parameters()) n += p.numel() * p.element_size();
  return n;
}

// The tiny model's folder in float16 (dmx convert), made once per process.
std::string tiny_fp16_dir() {
  static const std::string dir = [] {
    ConvertOptions o;
    o.input = tiny_model_dir("test");
    o.output = temp_subdir("memory-fp16") + "/tiny-test-fp16";
    o.dtype = "fp16";
    convert_weights(o);
    return o.output;
  }();
  return dir;
}

// Resident bytes of this process's mapping that contains `p` (/proc/self/smaps), -1 when not found.
int64_t mapping_rss_bytes(const void* p) {
  std::ifstream f("/proc/self/smaps");
  std::string line;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  bool in = false;
  while (std::getline(f, line)) {
    unsigned long lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (line.find('-') != std::string::npos && (head >> std::hex >> lo >> dash >> hi) && dash == '-' &&
        line.find(':') > line.find(' ')) {
      in = addr >= lo && addr < hi;
      continue;
    }
    if (in && line.rfind("Rss:", 0) == 0) return std::strtoll(line.c_str() + 4, nullptr, 10) * 1024;
  }
  return -1;
}

}  // namespace

TEST(MemoryUnit, ReleaseMappedPagesDropsTheResidentPagesOfAReadTensor) {
  const int64_t n = 4 * 1024 * 1024;  // 16 MiB of float32
  const at::Tensor values = at::arange(n, at::kFloat);
  const std::string path = temp_subdir("memory-release") + "/big.safetensors";
  io::save_safetensors(path, {{"w", values}});
  auto file = io::SafeTensorsFile::open(path);
  at::Tensor w = file->get("w");      // a view of the mapping (aligned data)
  ASSERT_TRUE(at::equal(w, values));  // every page read
  const int64_t before = mapping_rss_bytes(w.data_ptr());
  ASSERT_GE(before, n * 4 - 2 * ::sysconf(_SC_PAGESIZE)) << "the read pages are resident in the mapping";
  const size_t released = io::release_mapped_pages(w);
  EXPECT_GE(static_cast<int64_t>(released), n * 4 - 2 * ::sysconf(_SC_PAGESIZE));
  EXPECT_LE(mapping_rss_bytes(w.data_ptr()), 2 * ::sysconf(_SC_PAGESIZE)) << "before: " << before;
  EXPECT_TRUE(at::equal(w, values)) << "released pages come back from the file when read again";

  // Heap memory is never released (madvise would zero it): a copy, a slice of the heap, an undefined tensor.
  at::Tensor heap = values.clone();
  EXPECT_EQ(io::release_mapped_pages(heap), 0u);
  EXPECT_EQ(io::release_mapped_pages(heap.narrow(0, 1024, 1 << 20)), 0u);
  EXPECT_EQ(io::release_mapped_pages(at::Tensor()), 0u);
  EXPECT_TRUE(at::equal(heap, values));
  // Nor is a view of a file that was closed (its address range may be reused by anything).
  const void* old = w.data_ptr();
  w = at::Tensor();
  file.reset();
  at::Tensor fresh = at::empty({n}, at::kFloat).fill_(3.0f);
  EXPECT_EQ(io::release_mapped_pages(fresh), 0u) << old;
  EXPECT_EQ(fresh[n - 1].item<float>(), 3.0f);
}

// The releasing load: the module gets the file's values cast to its dtype (whole or in row slices, the same
// values), `state` is emptied, and the file's pages are no longer resident.
TEST(MemoryUnit, ReleasingLoadCopiesCastsAndReleasesTheFile) {
  for (const size_t chunk : {size_t{16} << 20, size_t{40000}}) {  // one copy; slices of 9 rows of 4 KiB
    const std::string path = temp_subdir("memory-load-" + std::to_string(chunk)) + "/linear.safetensors";
    at::manual_seed(3);
    torch::nn::Linear ref(1024, 1000);
    io::save_safetensors(path, io::module_state(*ref));
    auto file = io::SafeTensorsFile::open(path);
    io::TensorMap state = file->load_all();
    const at::Tensor view = state.at("weight");  // kept here to look at the mapping afterwards
    ASSERT_TRUE(at::equal(view, ref->weight));   // every page read
    DefaultDtypeGuard g(at::kBFloat16);
    torch::nn::Linear mod(1024, 1000);
    const auto report = io::load_state_dict_releasing(*mod, state, "linear", chunk);
    EXPECT_EQ(report.loaded, 2u);
    EXPECT_TRUE(state.empty());
    EXPECT_TRUE(at::equal(mod->weight, ref->weight.to(at::kBFloat16))) << chunk;
    EXPECT_TRUE(at::equal(mod->bias, ref->bias.to(at::kBFloat16)));
    EXPECT_LE(mapping_rss_bytes(view.data_ptr()), 4 * ::sysconf(_SC_PAGESIZE)) << chunk;
  }
  // Strict: a missing key is a FormatError naming it, and nothing is dropped.
  torch::nn::Linear mod(4, 3);
  io::TensorMap partial = {{"weight", at::zeros({3, 4})}};
  EXPECT_THROW(io::load_state_dict_releasing(*mod, partial, "linear"), FormatError);
  EXPECT_EQ(partial.size(), 1u);
}

TEST(MemoryUnit, DefaultDtypeGuardBuildsInItsDtypeAndRestores) {
  const auto prev = c10::get_default_dtype();
  {
    DefaultDtypeGuard g(at::kBFloat16);
    torch::nn::Linear l(4, 3);
    EXPECT_EQ(l->weight.scalar_type(), at::kBFloat16);
  }
  EXPECT_EQ(c10::get_default_dtype(), prev);
  EXPECT_GT(process_rss_bytes(), 0);
  EXPECT_GE(process_peak_rss_bytes(), process_rss_bytes());
}

// A float16 folder loaded as bf16: every parameter is bf16, equal bit for bit to the float32 path (float16 ->
// float32 -> bf16), and the load never allocates a float32 model: its peak of live tensor bytes stays near the
// bf16 model's size. The old loader (float32 modules, then .to(bf16)) peaked at 2x it (8.68 MB vs 4.31 MB).
TEST(MemoryTiny, Fp16FolderLoadsAsBf16WithoutAFloat32Copy) {
  const std::string fp16 = tiny_fp16_dir();
  loaders::LoadOptions bf;
  bf.dtype = at::kBFloat16;
  std::shared_ptr<loaders::StableDiffusionModels> m;
  int64_t peak = 0;
  {
    TrackAllocations track;
    const at::Tensor probe = at::empty({1000}, at::kFloat);
    ASSERT_GE(track.tracker->live(), 4000) << "the tracking allocator sees tensor allocations";
    track.tracker->reset_peak();
    const int64_t base = track.tracker->live();
    m = loaders::load_stable_diffusion(fp16, bf);
    peak = track.tracker->peak() - base;
  }
  const int64_t bytes = model_bytes(*m);
  int64_t largest = 0;
  for (const torch::nn::Module* mod :
       {static_cast<const torch::nn::Module*>(m->unet.get()), static_cast<const torch::nn::Module*>(m->vae.get()),
        static_cast<const torch::nn::Module*>(m->text_encoder.get())})
    for (const auto& p : mod->named_parameters()) {
      EXPECT_EQ(p.value().scalar_type(), at::kBFloat16) << p.key();
      largest = std::max<int64_t>(largest, p.value().numel() * 4);
    }
  EXPECT_LE(peak, bytes + largest) << "bf16 model " << bytes << " bytes; a float32 copy would be " << 2 * bytes;

  // The same values as the float32 path.
  auto ref = loaders::load_stable_diffusion(fp16);  // float32 parameters
  const auto a = io::module_state(*m->unet), b = io::module_state(*ref->unet);
  for (const auto& kv : a) EXPECT_TRUE(at::equal(kv.second, b.at(kv.first).to(at::kBFloat16))) << kv.first;
  const auto c = io::module_state(*m->text_encoder), d = io::module_state(*ref->text_encoder);
  for (const auto& kv : c) EXPECT_TRUE(at::equal(kv.second, d.at(kv.first).to(at::kBFloat16))) << kv.first;
}

// The same for a float32 folder loaded as bf16, and a float32 load stays float32 and equal to the file.
TEST(MemoryTiny, Fp32FolderLoadsAsBf16WithoutAFloat32Copy) {
  // Made (on first use in this process) before tracking starts: building the tiny model is not the load measured.
  const std::string dir = tiny_model_dir("test");
  loaders::LoadOptions bf;
  bf.dtype = at::kBFloat16;
  std::shared_ptr<loaders::StableDiffusionModels> m;
  int64_t peak = 0;
  {
    TrackAllocations track;
    track.tracker->reset_peak();
    const int64_t base = track.tracker->live();
    m = loaders::load_stable_diffusion(dir, bf);
    peak = track.tracker->peak() - base;
  }
  const int64_t bytes = model_bytes(*m);
  EXPECT_LE(peak, bytes * 5 / 4) << "bf16 model " << bytes << " bytes";
  const io::TensorMap file = io::load_safetensors(dir + "/unet/diffusion_pytorch_model.safetensors");
  for (const auto& kv : io::module_state(*m->unet))
    EXPECT_TRUE(at::equal(kv.second, file.at(kv.first).to(at::kBFloat16))) << kv.first;
  auto f32 = loaders::load_stable_diffusion(dir);
  for (const auto& kv : io::module_state(*f32->unet)) {
    EXPECT_EQ(kv.second.scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(kv.second, file.at(kv.first))) << kv.first;
  }
}

// release_models: the same latents and pictures, the text encoder and UNet freed, and a second run refused.
TEST(MemoryTiny, ReleaseModelsFreesTheTextEncoderAndUNetAndChangesNoOutput) {
  auto run = [](const std::shared_ptr<loaders::StableDiffusionModels>& m, bool release) {
    pipelines::StableDiffusionParams p;
    p.prompt = "a red fox";
    p.negative_prompt = "blurry";
    p.num_inference_steps = 3;
    p.guidance_scale = 5.0;
    p.show_progress = false;
    p.release_models = release;
    at::Generator g = pipelines::make_generator(7);
    p.generator = &g;
    return pipelines::StableDiffusionPipeline(m).run(p);
  };
  auto kept = load_tiny_model("test");
  auto released = load_tiny_model("test");
  const auto a = run(kept, false);
  EXPECT_FALSE(kept->text_encoder.is_empty());
  EXPECT_FALSE(kept->unet.is_empty());
  // Nothing else holds the released modules: their last reference goes with the pipeline's.
  std::weak_ptr<models::CLIPTextModelImpl> text = released->text_encoder.ptr();
  std::weak_ptr<models::UNet2DConditionModelImpl> unet = released->unet.ptr();
  const auto b = run(released, true);
  EXPECT_TRUE(released->text_encoder.is_empty());
  EXPECT_TRUE(released->unet.is_empty());
  EXPECT_TRUE(text.expired());
  EXPECT_TRUE(unet.expired());
  EXPECT_FALSE(released->vae.is_empty());
  EXPECT_TRUE(at::equal(a.latents, b.latents));
  EXPECT_TRUE(at::equal(a.images, b.images));
  try {
    run(released, false);
    ADD_FAILURE() << "a second run of released models was not refused";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("released"), std::string::npos) << e.what();
  }
}

}  // namespace dmx::test
