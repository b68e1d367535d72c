// Emoji classifier (see the header): ResNet basic blocks with GroupNorm, two linear heads.
#include "emoji/emoji_classifier.h"

#include <algorithm>
#include <filesystem>

#include "core/fs.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/config_json.h"

namespace dmx::emoji {

nlohmann::json EmojiClassifierConfig::to_json() const {
  return {{"_class_name", "EmojiClassifier"},
          {"image_size", image_size},
          {"stem_channels", stem_channels},
          {"stem_stride", stem_stride},
          {"block_out_channels", block_out_channels},
          {"norm_num_groups", norm_num_groups},
          {"feature_dim", feature_dim()},
          {"styles", styles},
          {"class_names", class_names},
          {"class_categories", class_categories},
          {"class_splits", class_splits}};
}

EmojiClassifierConfig EmojiClassifierConfig::from_json(const nlohmann::json& j) {
  const std::string what = "emoji classifier config.json";
  DMX_CHECK_FORMAT(j.is_object(), what, ": must be a JSON object");
  DMX_CHECK_FORMAT(j.is_object() && j.value("_class_name", nlohmann::json()) == "EmojiClassifier", what,
                   ": _class_name must be EmojiClassifier, got ", j.value("_class_name", nlohmann::json()).dump());
  EmojiClassifierConfig c;
  models::cfgjson::get(j, what, "image_size", c.image_size);
  models::cfgjson::get(j, what, "stem_channels", c.stem_channels);
  models::cfgjson::get(j, what, "stem_stride", c.stem_stride);
  DMX_CHECK_FORMAT(c.stem_stride == 1 || c.stem_stride == 2, what, ": stem_stride must be 1 or 2, got ", c.stem_stride);
  models::cfgjson::get(j, what, "block_out_channels", c.block_out_channels);
  models::cfgjson::get(j, what, "norm_num_groups", c.norm_num_groups);
  models::cfgjson::get(j, what, "styles", c.styles);
  models::cfgjson::get(j, what, "class_names", c.class_names);
  models::cfgjson::get(j, what, "class_categories", c.class_categories);
  models::cfgjson::get(j, what, "class_splits", c.class_splits);
  DMX_CHECK_FORMAT(c.image_size >= 16 && c.image_size <= 1024, what, ": image_size must be in [16, 1024], got ",
                   c.image_size);
  DMX_CHECK_FORMAT(!c.block_out_channels.empty(), what, ": block_out_channels must not be empty");
  DMX_CHECK_FORMAT(c.norm_num_groups > 0, what, ": norm_num_groups must be positive, got ", c.norm_num_groups);
  for (int ch : c.block_out_channels)
    DMX_CHECK_FORMAT(ch > 0 && ch % c.norm_num_groups == 0, what,
                     ": block_out_channels must be positive multiples of norm_num_groups (", c.norm_num_groups,
                     "), got ", ch);
  DMX_CHECK_FORMAT(c.stem_channels > 0 && c.stem_channels % c.norm_num_groups == 0, what,
                   ": stem_channels must be a positive multiple of norm_num_groups, got ", c.stem_channels);
  DMX_CHECK_FORMAT(!c.class_names.empty(), what, ": class_names must not be empty");
  DMX_CHECK_FORMAT(c.class_categories.size() == c.class_names.size(), what, ": class_categories has ",
                   c.class_categories.size(), " entries, class_names ", c.class_names.size());
  DMX_CHECK_FORMAT(c.class_splits.empty() || c.class_splits.size() == c.class_names.size(), what, ": class_splits has ",
                   c.class_splits.size(), " entries, class_names ", c.class_names.size());
  DMX_CHECK_FORMAT(c.styles.size() >= 2, what, ": styles must name at least 2 styles, got ", c.styles.size());
  if (j.contains("feature_dim"))
    DMX_CHECK_FORMAT(j["feature_dim"] == c.feature_dim(), what, ": feature_dim ", j["feature_dim"].dump(),
                     " does not match block_out_channels (", c.feature_dim(), ")");
  return c;
}

BasicBlockImpl::BasicBlockImpl(int in_channels, int out_channels, int stride, int groups) {
  using namespace torch::nn;
  conv1 = register_module("conv1", Conv2d(Conv2dOptions(in_channels, out_channels, 3).stride(stride).padding(1)));
  norm1 = register_module("norm1", GroupNorm(GroupNormOptions(groups, out_channels)));
  conv2 = register_module("conv2", Conv2d(Conv2dOptions(out_channels, out_channels, 3).padding(1)));
  norm2 = register_module("norm2", GroupNorm(GroupNormOptions(groups, out_channels)));
  shortcut = register_module("shortcut", Conv2d(Conv2dOptions(in_channels, out_channels, 1).stride(stride)));
  norm_shortcut = register_module("norm_shortcut", GroupNorm(GroupNormOptions(groups, out_channels)));
}

at::Tensor BasicBlockImpl::forward(const at::Tensor& x) {
  at::Tensor h = at::silu(norm1->forward(conv1->forward(x)));  // [B, out, H / s, W / s]
  h = norm2->forward(conv2->forward(h));
  return at::silu(h + norm_shortcut->forward(shortcut->forward(x)));
}

EmojiClassifierImpl::EmojiClassifierImpl(EmojiClassifierConfig cfg) : cfg_(std::move(cfg)) {
  using namespace torch::nn;
  const int g = cfg_.norm_num_groups;
  conv_in =
      register_module("conv_in", Conv2d(Conv2dOptions(3, cfg_.stem_channels, 3).stride(cfg_.stem_stride).padding(1)));
  norm_in = register_module("norm_in", GroupNorm(GroupNormOptions(g, cfg_.stem_channels)));
  stages = register_module("stages", ModuleList());
  int in = cfg_.stem_channels;
  for (int out : cfg_.block_out_channels) {
    stages->push_back(BasicBlock(in, out, 2, g));
    in = out;
  }
  concept_head = register_module("concept_head", Linear(in, static_cast<int64_t>(cfg_.class_names.size())));
  style_head = register_module("style_head", Linear(in, static_cast<int64_t>(cfg_.styles.size())));
}

EmojiClassifierOutput EmojiClassifierImpl::forward(const at::Tensor& x_in) {
  DMX_CHECK_ARG(x_in.dim() == 4 && x_in.size(1) == 3, "emoji classifier input must be [B, 3, H, W], got ",
                x_in.sizes());
  at::Tensor x = x_in.to(at::kFloat);
  if (x.size(2) != cfg_.image_size || x.size(3) != cfg_.image_size)
    x = at::upsample_bilinear2d(x, {cfg_.image_size, cfg_.image_size}, false);  // [B, 3, S, S]
  at::Tensor h = at::silu(norm_in->forward(conv_in->forward(x)));               // [B, c0, S / stem_stride, ...]
  for (const auto& m : *stages) h = m->as<BasicBlock>()->forward(h);  // [B, c_last, S / (stem_stride 2^n), ...]
  EmojiClassifierOutput o;
  o.features = h.mean({2, 3});  // [B, feature_dim]
  o.concept_logits = concept_head->forward(o.features);
  o.style_logits = style_head->forward(o.features);
  return o;
}

EmojiClassifierOutput classify(EmojiClassifier& model, const at::Tensor& images, int batch_size) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> f, c, s;
  for (int64_t i = 0; i < images.size(0); i += batch_size) {
    EmojiClassifierOutput o = model->forward(images.slice(0, i, std::min<int64_t>(i + batch_size, images.size(0))));
    f.push_back(o.features);
    c.push_back(o.concept_logits);
    s.push_back(o.style_logits);
  }
  DMX_CHECK_ARG(!f.empty(), "classify: no images");
  return {at::cat(f), at::cat(c), at::cat(s)};
}

EmojiClassifier load_emoji_classifier(const std::string& dir) {
  DMX_CHECK_ARG(is_directory(dir), "--classifier: not a folder: ", dir,
                " (train one with `dmx train classifier --data DIR --output DIR`)");
  const std::string cfg_path = join_path(dir, "config.json");
  const std::string w_path = join_path(dir, "model.safetensors");
  DMX_CHECK_ARG(path_exists(cfg_path), "--classifier: ", cfg_path, " not found");
  DMX_CHECK_ARG(path_exists(w_path), "--classifier: ", w_path, " not found");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(cfg_path, "--classifier config", kMaxJsonFileBytes));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(cfg_path + ": invalid JSON: " + e.what());
  }
  EmojiClassifier m(EmojiClassifierConfig::from_json(j));
  io::TensorMap state = io::load_safetensors(w_path);
  io::load_state_dict(*m, state, w_path);
  m->eval();
  return m;
}

void save_emoji_classifier(EmojiClassifier& model, const std::string& dir, bool fp16) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  DMX_CHECK_IO(is_directory(dir), "cannot create the folder ", dir, ": ", ec.message());
  io::TensorMap state;
  for (const auto& kv : io::module_state(*model)) {
    at::Tensor t = kv.second.detach().to(at::kCPU);
    state[kv.first] = (fp16 ? t.to(at::kHalf) : t.to(at::kFloat)).contiguous();
  }
  io::save_safetensors(join_path(dir, "model.safetensors"), state, {{"format", "pt"}});
  const std::string text = model->config().to_json().dump(2) + "\n";
  write_bytes_atomic(join_path(dir, "config.json"), text.data(), text.size());
}
}  // namespace dmx::emoji
