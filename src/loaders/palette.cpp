// Palette model folders (see palette.h).
#include "loaders/palette.h"

#include <ATen/ATen.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"

namespace dmx::loaders {

namespace {
nlohmann::json schedule_json(const schedulers::PaletteBetaSchedule& s) {
  return {{"schedule", s.schedule},
          {"n_timestep", s.n_timestep},
          {"linear_start", s.linear_start},
          {"linear_end", s.linear_end},
          {"cosine_s", s.cosine_s}};
}

schedulers::PaletteBetaSchedule schedule_from(const nlohmann::json& j, const std::string& what) {
  DMX_CHECK_FORMAT(j.is_object(), what, " must be an object");
  schedulers::PaletteBetaSchedule s;
  try {
    s.schedule = j.at("schedule").get<std::string>();
    s.n_timestep = j.at("n_timestep").get<int64_t>();
    s.linear_start = j.at("linear_start").get<double>();
    s.linear_end = j.at("linear_end").get<double>();
    if (j.contains("cosine_s")) s.cosine_s = j.at("cosine_s").get<double>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(detail::concat(what, ": ", e.what()));
  }
  try {
    s.validate(what);
  } catch (const InvalidArgument& e) {
    throw FormatError(e.what());
  }
  return s;
}

nlohmann::json unet_json(const models::UNet2DConditionConfig& c) {
  return {{"_class_name", "UNet2DConditionModel"},
          {"_dmx_purpose", "Palette denoiser (palette.json)"},
          {"sample_size", c.sample_size},
          {"in_channels", c.in_channels},
          {"out_channels", c.out_channels},
          {"flip_sin_to_cos", c.flip_sin_to_cos},
          {"freq_shift", c.freq_shift},
          {"down_block_types", c.down_block_types},
          {"mid_block_type", c.mid_block_type},
          {"up_block_types", c.up_block_types},
          {"block_out_channels", c.block_out_channels},
          {"layers_per_block", c.layers_per_block},
          {"downsample_padding", c.downsample_padding},
          {"mid_block_scale_factor", c.mid_block_scale_factor},
          {"act_fn", c.act_fn},
          {"norm_num_groups", c.norm_num_groups},
          {"norm_eps", c.norm_eps},
          {"cross_attention_dim", c.cross_attention_dim},
          {"attention_head_dim", c.attention_head_dim}};
}
}  // namespace

void PaletteConfig::validate() const {
  DMX_CHECK_ARG(task == "colorize" || task == "inpaint" || task == "uncrop" || task == "jpeg",
                "palette task must be colorize, inpaint, uncrop or jpeg, got '", task, "'");
  DMX_CHECK_ARG(loss == "l1" || loss == "l2", "palette loss must be l1 or l2, got '", loss, "'");
  DMX_CHECK_ARG(resolution >= 8 && resolution <= 256 && resolution % 8 == 0,
                "palette resolution must be a multiple of 8 in [8, 256], got ", resolution);
  DMX_CHECK_ARG(std::isfinite(noise_level_scale) && noise_level_scale > 0 && noise_level_scale <= 1e6,
                "palette noise_level_scale must be in (0, 1e6], got ", noise_level_scale);
  train_schedule.validate("palette train_schedule");
  test_schedule.validate("palette test_schedule");
}

models::UNet2DConditionConfig palette_unet_config(int resolution, int base_channels) {
  DMX_CHECK_ARG(resolution >= 8 && resolution <= 256 && resolution % 8 == 0,
                "--resolution must be a multiple of 8 in [8, 256] for Palette, got ", resolution);
  DMX_CHECK_ARG(base_channels >= 32 && base_channels % 32 == 0 && base_channels <= 512,
                "Palette base channels must be a multiple of 32 in [32, 512], got ", base_channels);
  models::UNet2DConditionConfig c;
  c.sample_size = resolution;
  c.in_channels = 6;
  c.out_channels = 3;
  c.flip_sin_to_cos = true;
  c.freq_shift = 0;
  c.block_out_channels = {base_channels, 2 * base_channels, 2 * base_channels, 2 * base_channels};
  c.down_block_types = {"DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"};
  c.up_block_types = {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"};
  c.layers_per_block = 2;
  c.cross_attention_dim = 8;
  c.attention_head_dim = {4, 4, 4, 4};
  c.norm_num_groups = 32;
  c.validate();
  return c;
}

PaletteModel load_palette(const std::string& dir, const std::string& param) {
  DMX_CHECK_ARG(!dir.empty(), param, " must be given (a Palette model folder)");
  DMX_CHECK_ARG(is_directory(dir), param, ": no such folder: ", dir);
  const std::string pj = join_path(dir, "palette.json");
  DMX_CHECK_ARG(path_exists(pj), param, ": ", dir,
                " is not a Palette model folder (no palette.json; make one with "
                "dmx train palette)");
  PaletteModel m;
  m.path = dir;
  const nlohmann::json j = io::load_json_file(pj, "palette.json");
  DMX_CHECK_FORMAT(j.is_object(), pj, " must be a JSON object");
  try {
    m.config.task = j.at("task").get<std::string>();
    m.config.loss = j.at("loss").get<std::string>();
    m.config.resolution = j.at("resolution").get<int>();
    m.config.noise_level_scale = j.value("noise_level_scale", 1.0);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(detail::concat(pj, ": ", e.what()));
  }
  m.config.train_schedule = schedule_from(j.value("train_schedule", nlohmann::json()), pj + " train_schedule");
  m.config.test_schedule = schedule_from(j.value("test_schedule", nlohmann::json()), pj + " test_schedule");
  try {
    m.config.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(detail::concat(pj, ": ", e.what()));
  }
  const models::UNet2DConditionConfig uc = models::UNet2DConditionConfig::from_json(
      io::load_json_file(join_path(dir, "config.json"), "Palette UNet config"));
  DMX_CHECK_FORMAT(uc.in_channels == 6 && uc.out_channels == 3, dir,
                   "/config.json: a Palette denoiser takes 6 channels and predicts 3, got in_channels ", uc.in_channels,
                   ", out_channels ", uc.out_channels);
  const std::string weights = join_path(dir, "diffusion_pytorch_model.safetensors");
  DMX_CHECK_ARG(path_exists(weights), param, ": ", dir, " has no diffusion_pytorch_model.safetensors");
  const io::TensorMap sd = io::load_safetensors(weights);
  io::check_weights_cover_config(uc.parameter_count(), sd, weights);
  double file_params = 0;
  for (const auto& [k, v] : sd) file_params += static_cast<double>(v.numel());
  DMX_CHECK_FORMAT(uc.parameter_count() <= file_params + io::kLoadSlackParameters, weights, " holds ", file_params,
                   " values, far fewer than its config describes (", uc.parameter_count(), ")");
  m.unet = models::UNet2DConditionModel(uc);
  io::load_state_dict(*m.unet, sd, weights);
  m.unet->eval();
  return m;
}

void save_palette(const std::string& dir, const PaletteConfig& cfg, models::UNet2DConditionModelImpl& unet) {
  cfg.validate();
  nlohmann::ordered_json pj;
  pj["_class_name"] = "dmx Palette";
  pj["task"] = cfg.task;
  pj["loss"] = cfg.loss;
  pj["resolution"] = cfg.resolution;
  pj["noise_level_scale"] = cfg.noise_level_scale;
  pj["train_schedule"] = schedule_json(cfg.train_schedule);
  pj["test_schedule"] = schedule_json(cfg.test_schedule);
  const std::string ptext = pj.dump(2) + "\n", utext = unet_json(unet.config()).dump(2) + "\n";
  io::TensorMap sd = io::module_state(unet);
  for (auto& [k, v] : sd) v = v.detach().to(at::kCPU, at::kFloat).contiguous();
  write_directory_atomic(dir, "Palette model folder", [&](const std::string& tmp) {
    io::save_safetensors(join_path(tmp, "diffusion_pytorch_model.safetensors"), sd);
    write_bytes_atomic(join_path(tmp, "config.json"), utext.data(), utext.size());
    write_bytes_atomic(join_path(tmp, "palette.json"), ptext.data(), ptext.size());
  });
}

at::Tensor palette_denoise(models::UNet2DConditionModelImpl& unet, const PaletteConfig& cfg, const at::Tensor& cond,
                           const at::Tensor& y, const at::Tensor& gammas) {
  const int64_t b = y.size(0);
  models::UNetInputs in;
  const at::ScalarType dt = y.scalar_type();
  in.sample = at::cat({cond.to(dt), y}, 1);
  in.timestep = (gammas.to(at::kFloat).reshape({-1}) * cfg.noise_level_scale).expand({b}).contiguous();
  in.encoder_hidden_states = at::zeros({b, 1, unet.config().cross_attention_dim}, y.options());
  return unet.forward(in);
}
}  // namespace dmx::loaders

namespace dmx::loaders {
at::Tensor palette_restore(models::UNet2DConditionModelImpl& unet, const PaletteConfig& cfg,
                           const schedulers::PaletteSampler& sampler, const at::Tensor& cond, const at::Tensor& known,
                           const at::Tensor& mask, at::Generator& gen,
                           const std::function<void(int64_t, int64_t)>& on_step) {
  at::NoGradGuard no_grad;
  return schedulers::palette_sample(
      sampler, cond, known, mask, gen,
      [&](const at::Tensor& c, const at::Tensor& y, const at::Tensor& g) {
        return palette_denoise(unet, cfg, c, y, g);
      },
      on_step);
}
}  // namespace dmx::loaders
