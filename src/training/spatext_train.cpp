// The SpaText recipe (see spatext_train.h).
#include "training/spatext_train.h"

#include <ATen/ATen.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <sstream>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "loaders/spatext.h"
#include "training/finetune.h"
#include "training/folder_copy.h"

namespace dmx::training {

namespace fs = std::filesystem;

namespace {
std::string normal(const std::string& p) { return fs::path(p).lexically_normal().string(); }
}  // namespace

std::vector<SpaTextCanvas> read_spatext_canvases(const std::string& dir, const std::vector<DatasetRow>& rows) {
  const std::string meta = join_path(dir, "metadata.jsonl");
  DMX_CHECK_ARG(path_exists(join_path(dir, "scenes.json")), "--data: ", dir,
                " is not a scene folder (no scenes.json); make one with `dmx data scenes --out DIR`");
  std::istringstream in(read_text_file(meta, "--data metadata.jsonl", kMaxMetadataFileBytes));
  std::map<std::string, SpaTextCanvas> by_image;
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    SpaTextCanvas c;
    try {
      const nlohmann::json r = nlohmann::json::parse(line);
      const std::string file = r.at("file_name").get<std::string>(), inst = r.at("instance_map").get<std::string>();
      DMX_CHECK_FORMAT(file.find("..") == std::string::npos && inst.find("..") == std::string::npos, meta, ":", line_no,
                       ": a path leaves the folder");
      c.image = normal(join_path(dir, file));
      c.instances = join_path(dir, inst);
      for (const auto& ob : r.at("objects")) c.instance_ids.push_back(ob.at("instance").get<int>());
    } catch (const nlohmann::json::exception& e) {
      throw FormatError(meta + ":" + std::to_string(line_no) + ": " + e.what());
    }
    for (int id : c.instance_ids)
      DMX_CHECK_FORMAT(id >= 1 && id <= 255, meta, ":", line_no, ": instance ids must be in [1, 255], got ", id);
    by_image[c.image] = std::move(c);
  }
  std::vector<SpaTextCanvas> out;
  out.reserve(rows.size());
  for (const auto& row : rows) {
    const auto it = by_image.find(normal(row.image));
    DMX_CHECK_FORMAT(it != by_image.end(), "--data: ", row.image, " (", row.origin, ") is not a canvas of ", meta);
    out.push_back(it->second);
  }
  return out;
}

Image spatext_segment_crop(const Image& picture, const at::Tensor& mask) {
  DMX_CHECK_ARG(
      picture.channels == 3 && mask.dim() == 2 && mask.size(0) == picture.height && mask.size(1) == picture.width,
      "spatext_segment_crop: an RGB picture and a mask of its size expected");
  const at::Tensor nz = mask.nonzero();  // [P, 2] (y, x)
  DMX_CHECK_ARG(nz.size(0) > 0, "spatext_segment_crop: the segment is empty");
  const int64_t y0 = nz.select(1, 0).min().item<int64_t>(), y1 = nz.select(1, 0).max().item<int64_t>() + 1;
  const int64_t x0 = nz.select(1, 1).min().item<int64_t>(), x1 = nz.select(1, 1).max().item<int64_t>() + 1;
  const int64_t side = std::min<int64_t>(std::max(y1 - y0, x1 - x0), std::min(picture.width, picture.height));
  // The square centred on the box, moved inside the picture.
  int64_t sy = std::clamp<int64_t>((y0 + y1 - side) / 2, 0, picture.height - side);
  int64_t sx = std::clamp<int64_t>((x0 + x1 - side) / 2, 0, picture.width - side);
  const at::Tensor m = mask.to(at::kBool).contiguous();
  const bool* mp = m.data_ptr<bool>();
  Image out;
  out.width = out.height = static_cast<int>(side);
  out.channels = 3;
  out.data.assign(static_cast<size_t>(side * side * 3), 255);
  for (int64_t y = 0; y < side; ++y)
    for (int64_t x = 0; x < side; ++x) {
      const int64_t py = sy + y, px = sx + x;
      if (!mp[py * picture.width + px]) continue;
      for (int c = 0; c < 3; ++c)
        out.data[static_cast<size_t>((y * side + x) * 3 + c)] =
            picture.data[static_cast<size_t>((py * picture.width + px) * 3 + c)];
    }
  return out;
}

SpaTextRecipe::SpaTextRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, SpaTextTrainOptions o,
                             models::CLIPImageProcessorConfig feature_extractor,
                             models::CLIPVisionModelWithProjection image_encoder, std::vector<SpaTextCanvas> canvases)
    : Recipe(std::move(m)),
      o_(std::move(o)),
      fe_(std::move(feature_extractor)),
      enc_(std::move(image_encoder)),
      canvases_(std::move(canvases)) {
  auto& md = models();
  DMX_CHECK_ARG(!enc_.is_empty(), "dmx train spatext needs a CLIP image tower (--clip)");
  DMX_CHECK_ARG(o_.map_dropout >= 0 && o_.map_dropout <= 1, "--layout-dropout must be in [0, 1], got ", o_.map_dropout);
  DMX_CHECK_ARG(!canvases_.empty(), "dmx train spatext: the data has no canvases");
  DMX_CHECK_SUPPORTED(is_directory(md.source_path) && path_exists(join_path(md.source_path, "unet/config.json")),
                      "dmx train spatext writes a SpaText folder beside the base model's parts and needs a diffusers "
                      "folder as --model, got ",
                      md.source_path);
  o_.lora.validate();
  dim_ = enc_->config().projection_dim;
  base_in_ = md.unet->config().in_channels;
  md.unet = loaders::widen_unet_input(md.unet, kSpaTextMapChannels);
  {  // PyTorch's Linear default: kaiming_uniform(a = sqrt(5)) = U(-1 / sqrt(D), 1 / sqrt(D))
    const double bound = 1.0 / std::sqrt(static_cast<double>(dim_));
    projection_ = (at::rand({kSpaTextMapChannels, dim_}) * 2 - 1) * bound;
    projection_.set_requires_grad(true);
  }
  for (auto& p : enc_->parameters()) p.set_requires_grad(false);
}

void SpaTextRecipe::setup(const TrainConfig& cfg) {
  auto& m = models();
  const int f = m.vae_scale_factor();
  {
    at::NoGradGuard no_grad;
    enc_->eval();
    const auto p0 = enc_->parameters().front();
    ProgressBar bar("segments", static_cast<int>(canvases_.size()), log_level() != LogLevel::kQuiet);
    for (const auto& c : canvases_) {
      const Image pic = to_rgb(load_image(c.image, "--data"));
      const Image inst_img = to_gray(load_image(c.instances, "--data instance map"));
      DMX_CHECK_FORMAT(inst_img.width == pic.width && inst_img.height == pic.height, c.instances, ": ", inst_img.width,
                       "x", inst_img.height, ", the picture is ", pic.width, "x", pic.height);
      DMX_CHECK_FORMAT(pic.width % f == 0 && pic.height % f == 0, c.image, ": the sides must be multiples of ", f);
      const at::Tensor inst =
          at::from_blob(const_cast<uint8_t*>(inst_img.data.data()), {pic.height, pic.width}, at::kByte).clone();
      std::vector<at::Tensor> e, s;
      for (int id : c.instance_ids) {
        const at::Tensor mask = inst.eq(id);
        if (!mask.any().item<bool>()) continue;  // fully covered: nothing to paint
        const at::Tensor px = models::clip_preprocess(fe_, spatext_segment_crop(pic, mask), "--data");
        at::Tensor v = enc_->forward(px.to(p0.device(), p0.scalar_type())).image_embeds.to(at::kFloat).cpu();
        e.push_back(v / v.norm(2, {1}, true).clamp_min(1e-12));
        s.push_back(at::avg_pool2d(mask.to(at::kFloat).unsqueeze(0), {f, f}).squeeze(0));
      }
      embeds_.push_back(e.empty() ? at::zeros({0, dim_}) : at::cat(e, 0));
      shares_.push_back(e.empty() ? at::zeros({0, pic.height / f, pic.width / f}) : at::stack(s, 0));
      bar.tick();
    }
  }
  net_ = frozen_base_with_lora(m, cfg, o_.lora, autocast_bf16_);
  for (auto& p : m.unet->named_parameters(true))
    if (starts_with(p.key(), "conv_in.")) p.value().set_requires_grad(true);
}

std::vector<NamedParameter> SpaTextRecipe::trainable_parameters() {
  std::vector<NamedParameter> v = net_->parameters();
  for (const auto& p : models().unet->named_parameters(true))
    if (starts_with(p.key(), "conv_in.")) v.push_back({"unet." + p.key(), p.value()});
  v.push_back({"spatext.projection.weight", projection_});
  return v;
}

void SpaTextRecipe::train_mode(bool on) { models().unet->train(on); }

void SpaTextRecipe::draw_conditioning(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) {
  const int64_t rows = static_cast<int64_t>(batch.indices.size());
  DMX_CHECK_ARG(rows > 0 && rows == batch.pixel_values.size(0),
                "dmx train spatext: the batch source gives no row indices (the maps are per canvas)");
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor u = at::rand({global_rows}, gen, f32).narrow(0, r0, rows);     // map dropout
  const at::Tensor v = at::rand({global_rows, 8}, gen, f32).narrow(0, r0, rows);  // which objects are painted
  std::vector<at::Tensor> maps;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = batch.indices[static_cast<size_t>(r)];
    DMX_CHECK_ARG(i >= 0 && i < static_cast<int64_t>(canvases_.size()), "dmx train spatext: row index ", i,
                  " outside the ", canvases_.size(), " canvases");
    const at::Tensor& e = embeds_[static_cast<size_t>(i)];
    const at::Tensor& s = shares_[static_cast<size_t>(i)];
    const int64_t K = e.size(0);
    at::Tensor map = at::zeros({dim_, s.size(1), s.size(2)}, f32);
    if (K > 0 && u[r].item<float>() >= o_.map_dropout) {
      const at::Tensor vk = v[r].narrow(0, 0, std::min<int64_t>(K, 8));
      at::Tensor keep = vk.lt(kSpaTextKeep);
      if (!keep.any().item<bool>()) keep = vk.eq(vk.min());
      const at::Tensor idx = keep.nonzero().squeeze(1);
      map = at::einsum("shw,sd->dhw", {s.index_select(0, idx), e.index_select(0, idx)});
    }
    maps.push_back(map);
  }
  maps_ = at::stack(maps, 0);
}

at::Tensor SpaTextRecipe::predict(const at::Tensor& noisy, const at::Tensor& t, const at::Tensor& ehs, const Batch&) {
  DMX_CHECK_ARG(maps_.defined() && maps_.size(0) == noisy.size(0) && maps_.size(2) == noisy.size(2) &&
                    maps_.size(3) == noisy.size(3),
                "dmx train spatext: the maps drawn (", maps_.defined() ? maps_.sizes() : at::IntArrayRef{},
                ") do not fit the latents ", noisy.sizes(), " (train at the scene folder's size)");
  net_->refresh(at::kFloat, at::kFloat);
  models::UNetInputs in;
  const at::Tensor map = at::einsum("bdhw,md->bmhw", {maps_.to(noisy.device()), projection_});
  in.sample = at::cat({noisy, map.to(noisy.scalar_type())}, 1);
  in.timestep = t;
  in.encoder_hidden_states = ehs.to(at::kFloat);
  return unet_forward_autocast(models().unet, in, autocast_bf16_);
}

void SpaTextRecipe::save(const std::string& dir) {
  io::TensorMap weights = net_->state_dict(LoRASaveFormat::Diffusers);
  for (const auto& p : models().unet->named_parameters(true))
    if (starts_with(p.key(), "conv_in.")) weights["unet." + p.key()] = p.value().detach().to(at::kFloat).clone();
  weights["spatext.projection.weight"] = projection_.detach().clone();
  for (auto& [k, v] : weights) v = v.to(at::kFloat).contiguous();
  write_directory_atomic(dir, "the SpaText folder", [&](const std::string& tmp) {
    copy_text_to_image_parts(models().source_path, tmp);
    for (const char* part : {"prior_tokenizer", "prior_text_encoder", "prior", "prior_scheduler"}) {
      DMX_CHECK_FORMAT(fs::is_directory(fs::path(o_.prior_dir) / part), "--prior ", o_.prior_dir, " has no ", part,
                       "/");
      copy_folder(join_path(o_.prior_dir, part), join_path(tmp, part));
    }
    io::save_safetensors(join_path(tmp, loaders::kSpaTextWeightsFile), weights, {{"format", "pt"}});
    write_json_file(join_path(tmp, loaders::kSpaTextConfigFile),
                    {{"format", "dmx-spatext-1"},
                     {"_dmx_writer", "dmx train spatext"},
                     {"embedding_dim", dim_},
                     {"map_channels", kSpaTextMapChannels},
                     {"base_in_channels", base_in_},
                     {"resolution", shares_.empty() ? 0 : shares_.front().size(1) * models().vae_scale_factor()},
                     {"lora_rank", net_->rank()},
                     {"lora_alpha", net_->alpha()},
                     {"lora_targets", o_.lora.targets},
                     {"layout_dropout", o_.map_dropout},
                     {"object_keep", kSpaTextKeep},
                     {"image_tower", o_.image_tower_dir}});
  });
}
}  // namespace dmx::training
