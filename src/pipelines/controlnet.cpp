#include "pipelines/controlnet.h"

#include <ATen/ATen.h>

#include <cctype>
#include <cmath>

#include "core/fs.h"
#include "core/resize.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/ldm_names.h"
#include "io/state_dict.h"

namespace dmx::pipelines {

namespace {
std::string parent_of(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const size_t slash = p.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : p.substr(0, slash);
}
std::string base_of(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const size_t slash = p.find_last_of('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

// diffusers' configs may omit conditioning_embedding_out_channels (older saves): read the widths from
// the hint encoder's tensors instead of assuming the default.
void fill_hint_channels_from_shapes(nlohmann::json& cfg, const io::TensorMap& w) {
  if (cfg.contains("conditioning_embedding_out_channels") && !cfg["conditioning_embedding_out_channels"].is_null())
    return;
  auto it = w.find("controlnet_cond_embedding.conv_in.weight");
  if (it == w.end()) return;
  nlohmann::json ch = nlohmann::json::array({it->second.size(0)});
  for (int k = 1;; k += 2) {
    auto b = w.find("controlnet_cond_embedding.blocks." + std::to_string(k) + ".weight");
    if (b == w.end()) break;
    ch.push_back(b->second.size(0));
  }
  cfg["conditioning_embedding_out_channels"] = ch;
}
}  // namespace

models::ControlNetModel load_controlnet(const std::string& path, const loaders::LoadOptions& opts,
                                        const std::string& param) {
  DMX_CHECK_ARG(!path.empty(), param, ": no path given");
  DMX_CHECK_ARG(path_exists(path), param, ": path not found: ", path);
  nlohmann::json cfg;
  io::TensorMap weights;
  if (is_directory(path)) {
    std::string dir = path;
    if (!path_exists(join_path(dir, "config.json")) && path_exists(join_path(dir, "controlnet/config.json")))
      dir = join_path(dir, "controlnet");
    DMX_CHECK_ARG(path_exists(join_path(dir, "config.json")), param, ": ", path,
                  " is not a diffusers ControlNet folder (no config.json, no controlnet/config.json)");
    cfg = io::load_json_file(join_path(dir, "config.json"), "ControlNet config");
    DMX_CHECK_FORMAT(cfg.is_object(), param, ": ", dir, "/config.json must be a JSON object");
    const nlohmann::json cls = cfg.value("_class_name", nlohmann::json("ControlNetModel"));
    DMX_CHECK_FORMAT(cls == "ControlNetModel", param, ": ", dir, "/config.json describes a ", cls.dump(),
                     ", not a ControlNetModel");
    weights = io::load_diffusers_component(parent_of(dir), base_of(dir));
    fill_hint_channels_from_shapes(cfg, weights);
  } else {
    std::string ext = path.substr(std::min(path.size(), path.find_last_of('.')));
    for (char& ch : ext) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    DMX_CHECK_SUPPORTED(ext != ".pth" && ext != ".ckpt" && ext != ".pt" && ext != ".bin", param, ": ", path,
                        " is a pickle file, which dmx does not load (unpickling can execute code); convert it to "
                        ".safetensors first (safetensors.torch.save_file(torch.load(path), \"control.safetensors\"))");
    io::TensorMap ckpt;
    try {
      ckpt = io::load_safetensors(path);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(param + ": " + e.what());
    }
    nlohmann::json yaml;
    const std::string stem_yaml = join_path(parent_of(path), file_stem(path)) + ".yaml";
    if (path_exists(stem_yaml) && !is_directory(stem_yaml))
      yaml = io::parse_ldm_yaml(read_text_file(stem_yaml, "ControlNet .yaml", kMaxJsonFileBytes), stem_yaml);
    cfg = io::detect_ldm_controlnet_config(ckpt, yaml);
    weights = io::convert_ldm_controlnet(ckpt, cfg);
  }
  const auto config = models::ControlNetConfig::from_json(cfg);
  io::check_weights_cover_config(config.parameter_count(), weights, path);  // before anything is built
  models::ControlNetModel net(config);
  io::load_state_dict(*net, weights, path);
  net->eval();
  net->to(at::Device(opts.device), opts.dtype);
  return net;
}

int control_size_multiple(int vae_scale_factor) { return std::max(8, vae_scale_factor); }

std::pair<int, int> default_control_size(const Image& img, int vae_scale_factor) {
  const int m = control_size_multiple(vae_scale_factor);
  return {img.width - img.width % m, img.height - img.height % m};
}

at::Tensor prepare_control_image(const Image& img, int width, int height) {
  DMX_CHECK_ARG(width >= 1 && height >= 1, "control image size must be positive, got ", width, "x", height);
  Image rgb = to_rgb(img);
  if (rgb.width != width || rgb.height != height) rgb = resize_lanczos(rgb, width, height);
  at::Tensor t = at::from_blob(rgb.data.data(), {rgb.height, rgb.width, 3}, at::kByte).clone();
  return (t.to(at::kFloat) / 255.0).permute({2, 0, 1}).unsqueeze(0).contiguous();  // [1, 3, H, W]
}

double controlnet_keep(int i, int n, double start, double end) {
  const double a = static_cast<double>(i) / n, b = static_cast<double>(i + 1) / n;
  return 1.0 - static_cast<double>(a < start || b > end);
}

void add_residuals(models::ControlNetOutput& acc, const models::ControlNetOutput& add) {
  if (acc.down_block_res_samples.empty()) {
    acc = add;
    return;
  }
  DMX_CHECK_ARG(acc.down_block_res_samples.size() == add.down_block_res_samples.size(),
                "ControlNets return different numbers of residuals (", acc.down_block_res_samples.size(), " vs ",
                add.down_block_res_samples.size(), ")");
  for (size_t k = 0; k < acc.down_block_res_samples.size(); ++k)
    acc.down_block_res_samples[k] = acc.down_block_res_samples[k] + add.down_block_res_samples[k];
  acc.mid_block_res_sample = acc.mid_block_res_sample + add.mid_block_res_sample;
}

ControlNetProvider::ControlNetProvider(ControlNetUnit unit, int index, bool guess_mode)
    : unit_(std::move(unit)),
      name_("controlnet[" + std::to_string(index) + "]" + (unit_.name.empty() ? "" : " (" + unit_.name + ")")),
      guess_(guess_mode) {}

void ControlNetProvider::check(const ResidualRun& run) const {
  const ControlNetUnit& u = unit_;
  const std::string& what = name_;
  DMX_CHECK_SUPPORTED(!run.img2img, "ControlNet with an init image (img2img) is not supported yet");
  DMX_CHECK_ARG(static_cast<bool>(u.model), what, ": no model loaded");
  models::check_controlnet_matches_unet(u.model->config(), run.models.unet->config(), what);
  DMX_CHECK_ARG(std::isfinite(u.scale), what, ": control scale must be finite, got ", u.scale);
  DMX_CHECK_ARG(u.start >= 0 && u.start <= 1, what, ": control start must be in [0, 1], got ", u.start);
  DMX_CHECK_ARG(u.end >= 0 && u.end <= 1, what, ": control end must be in [0, 1], got ", u.end);
  DMX_CHECK_ARG(u.start < u.end, what, ": control start (", u.start, ") must be smaller than control end (", u.end,
                ")");
  DMX_CHECK_ARG(u.image.defined() && u.image.dim() == 4 && u.image.size(0) == 1 &&
                    u.image.size(1) == u.model->config().conditioning_channels,
                what, ": control image must be [1, ", u.model->config().conditioning_channels, ", H, W], got ",
                u.image.defined() ? u.image.sizes() : at::IntArrayRef{});
  DMX_CHECK_ARG(u.image.size(2) == run.height && u.image.size(3) == run.width, what, ": control image is ",
                u.image.size(3), "x", u.image.size(2), " but the output is ", run.width, "x", run.height,
                " (prepare it with prepare_control_image at the output size)");
}

void ControlNetProvider::prepare(const ResidualRun& run) {
  // Repeated per image, doubled for guidance unless in guess mode (the net then sees the conditional half).
  at::Tensor img = unit_.image.repeat_interleave(run.batch, 0);
  image_ = (run.guided && !guess_ ? at::cat({img, img}, 0) : img).to(run.models.device, run.models.dtype);
}

void ControlNetProvider::apply(const ResidualStep& step, models::UNetInputs& in) {
  DMX_CHECK_ARG(image_.defined(), name_, ": prepare() was not called for this run");
  const double cond_scale = unit_.scale * controlnet_keep(step.index, step.num_timesteps, unit_.start, unit_.end);
  if (cond_scale == 0.0) return;  // its residuals would be exact zeros
  const bool cond_half = guess_ && step.guided;
  models::ControlNetInputs ci;
  ci.sample =
      cond_half
          ? step.scheduler.scale_model_input(step.latents, step.index).to(in.sample.device(), in.sample.scalar_type())
          : in.sample;
  ci.timestep = in.timestep;
  ci.encoder_hidden_states = cond_half ? in.encoder_hidden_states.chunk(2, 0)[1] : in.encoder_hidden_states;
  ci.controlnet_cond = image_;
  ci.conditioning_scale = cond_scale;
  ci.guess_mode = guess_;
  models::ControlNetModel net = unit_.model;  // shared handle (forward is non-const)
  models::ControlNetOutput res = net->forward(ci);
  if (cond_half) {  // the unconditional rows get no residuals
    for (auto& d : res.down_block_res_samples) d = at::cat({at::zeros_like(d), d}, 0);
    res.mid_block_res_sample = at::cat({at::zeros_like(res.mid_block_res_sample), res.mid_block_res_sample}, 0);
  }
  add_unet_residuals(in, res.down_block_res_samples, res.mid_block_res_sample);
}

std::optional<std::pair<int, int>> ControlNetProvider::default_size() const {
  if (!unit_.image.defined() || unit_.image.dim() != 4) return std::nullopt;
  return std::make_pair(static_cast<int>(unit_.image.size(3)), static_cast<int>(unit_.image.size(2)));
}

ResidualProviders controlnet_providers(const std::vector<ControlNetUnit>& units, bool guess_mode) {
  const bool guess =
      guess_mode || (!units.empty() && units[0].model && units[0].model->config().global_pool_conditions);
  ResidualProviders out;
  for (size_t i = 0; i < units.size(); ++i)
    out.push_back(std::make_shared<ControlNetProvider>(units[i], static_cast<int>(i), guess));
  return out;
}
}  // namespace dmx::pipelines
