// dmx::restore: Palette restoration (include/dmx/restore.h, docs/palette.md).
#include "dmx/restore.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <sstream>

#include "api/options_util.h"
#include "core/degradations.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/runtime.h"
#include "dmx/dmx.h"
#include "loaders/palette.h"

namespace dmx {

namespace {
constexpr int kMaxRestoreSide = 512;

void check_options(const RestoreOptions& o) {
  DMX_CHECK_ARG(!o.model.empty(), "--model is required (a Palette folder made by dmx train palette)");
  DMX_CHECK_ARG(is_directory(o.model), "--model: no such folder: ", o.model);
  DMX_CHECK_ARG(path_exists(join_path(o.model, "palette.json")), "--model: ", o.model,
                " is not a Palette model folder (no palette.json; make one with dmx train palette)");
  if (!o.task.empty()) (void)degrade::parse_task(o.task);
  DMX_CHECK_ARG(!o.image.empty(), "--image is required (the picture to restore)");
  DMX_CHECK_ARG(!o.output.empty(), "--output is required (a .png path)");
  DMX_CHECK_ARG(o.steps >= 1 && o.steps <= 100000, "--steps must be in [1, 100000], got ", o.steps);
  DMX_CHECK_ARG(o.num_images >= 1 && o.num_images <= 64, "--num-images must be in [1, 64], got ", o.num_images);
  DMX_CHECK_ARG(o.jpeg_quality >= 0 && o.jpeg_quality <= 100,
                "--jpeg-quality must be in [1, 100] (0 = the picture is already compressed), got ", o.jpeg_quality);
  api::OutputPlan plan(o.overwrite);
  plan.input(o.model, "--model");
  plan.input(o.image, "--image");
  plan.input(o.mask, "--mask");
  for (const auto& path : api::numbered_paths(o.output, o.num_images)) plan.file(path, "--output", ".png");
  if (!o.save_input.empty()) plan.file(o.save_input, "--save-input", ".png");
  plan.prepare();
}

at::Tensor to_cond_image(const Image& rgb) { return image_to_tensor(rgb); }  // [1, 3, H, W] in [-1, 1]
}  // namespace

RestoreResult restore(const RestoreOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.verbose ? LogLevel::kVerbose : o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  check_options(o);
  // What the model folder says, before the pictures: the task and the rules that follow from it.
  loaders::PaletteModel m = loaders::load_palette(o.model);
  const degrade::Task task = degrade::parse_task(m.config.task, o.model + "/palette.json task");
  if (!o.task.empty())
    DMX_CHECK_ARG(degrade::parse_task(o.task) == task, "--task ", o.task, " does not match the model: ", o.model,
                  " was trained for ", m.config.task);
  DMX_CHECK_ARG(o.mask.empty() || degrade::task_has_mask(task),
                "--mask is for inpaint and uncrop, the model's task is ", m.config.task);
  DMX_CHECK_ARG(o.jpeg_quality == 0 || task == degrade::Task::Jpeg,
                "--jpeg-quality is for the jpeg task, the model's "
                "task is ",
                m.config.task);
  const Image rgb = to_rgb(load_image(o.image, "--image"));
  DMX_CHECK_ARG(
      rgb.width % 8 == 0 && rgb.height % 8 == 0 && rgb.width <= kMaxRestoreSide && rgb.height <= kMaxRestoreSide,
      "--image: width and height must be multiples of 8 up to ", kMaxRestoreSide, " (the model was trained at ",
      m.config.resolution, "x", m.config.resolution, "), got ", rgb.width, "x", rgb.height);
  const int64_t h = rgb.height, w = rgb.width, n = o.num_images;
  at::Tensor mask;  // [1, 1, H, W]
  if (degrade::task_has_mask(task)) {
    if (!o.mask.empty()) {
      const Image mi = load_image(o.mask, "--mask");
      DMX_CHECK_ARG(mi.width == rgb.width && mi.height == rgb.height, "--mask must be ", rgb.width, "x", rgb.height,
                    ", the size of --image, got ", mi.width, "x", mi.height);
      const Image g = to_gray(mi);
      mask = at::from_blob(const_cast<uint8_t*>(g.data.data()), {1, 1, h, w}, at::kByte).ge(128).to(at::kFloat);
      DMX_CHECK_ARG(mask.sum().item<double>() > 0, "--mask: no white pixel (white = the region to fill), ", o.mask);
    } else {
      mask = (task == degrade::Task::Inpaint ? degrade::center_mask(h, w) : degrade::uncrop_mask(h, w, 3)).unsqueeze(0);
    }
  }
  configure_threads(o.threads);
  const uint64_t seed = api::resolve_seed(o.seed);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);

  // The condition, as training made it (core/degradations.h).
  at::Tensor known = to_cond_image(rgb).expand({n, 3, h, w}).contiguous();
  at::Tensor cond;
  switch (task) {
    case degrade::Task::Colorize:
      cond = to_cond_image(to_rgb(to_gray(rgb))).expand({n, 3, h, w}).contiguous();
      break;
    case degrade::Task::Jpeg:
      cond =
          (o.jpeg_quality > 0 ? degrade::jpeg_roundtrip(known[0], o.jpeg_quality).unsqueeze(0) : known.narrow(0, 0, 1))
              .expand({n, 3, h, w})
              .contiguous();
      break;
    case degrade::Task::Inpaint:
    case degrade::Task::Uncrop:
      cond = known * (1 - mask) + mask * at::randn({n, 3, h, w}, gen, at::TensorOptions().dtype(at::kFloat));
      break;
  }
  const schedulers::PaletteSampler sampler(
      schedulers::palette_respaced_betas(schedulers::palette_betas(m.config.test_schedule), o.steps));
  ProgressBar bar("restore", static_cast<int>(sampler.num_steps()));
  const at::Tensor y = loaders::palette_restore(*m.unet, m.config, sampler, cond, known, mask, gen,
                                                [&](int64_t, int64_t) { bar.tick(); });
  bar.finish();

  std::ostringstream params;
  params << "Palette " << m.config.task << ", Steps: " << sampler.num_steps() << ", Seed: " << seed << ", Size: " << w
         << "x" << h << ", Model: " << o.model << ", Version: dmx " << version();
  const TextChunks text = {{"parameters", params.str()}};
  std::vector<PendingFile> files;
  const std::vector<std::string> paths = api::numbered_paths(o.output, o.num_images);
  auto hwc01 = [](const at::Tensor& chw) { return ((chw.clamp(-1, 1) + 1) * 0.5).permute({1, 2, 0}).contiguous(); };
  for (int64_t i = 0; i < n; ++i)
    files.push_back({paths[static_cast<size_t>(i)], encode_png(tensor_to_image(hwc01(y[i])), text)});
  if (!o.save_input.empty()) {
    at::Tensor shown = cond[0];
    if (mask.defined()) shown = known[0] * (1 - mask[0]) + mask[0] * 1.0;  // the hole in white, as the code shows it
    files.push_back({o.save_input, encode_png(tensor_to_image(hwc01(shown)))});
  }
  write_files_atomic(files);
  RestoreResult r;
  r.images = paths;
  r.task = m.config.task;
  r.seed = seed;
  r.width = static_cast<int>(w);
  r.height = static_cast<int>(h);
  r.steps = static_cast<int>(sampler.num_steps());
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace dmx
