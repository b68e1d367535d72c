// CLIP model folders (clip.h).
#include "loaders/clip.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <vector>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"

namespace dmx::loaders {

namespace {

const char* const kComponents[] = {"text_encoder", "image_encoder", "tokenizer", "feature_extractor"};

io::TensorMap float_state(const torch::nn::Module& m) {
  io::TensorMap t;
  for (const auto& p : m.named_parameters(true)) t[p.key()] = p.value().detach().to(at::kFloat).to(at::kCPU);
  return t;
}

void write_json(const std::string& path, const nlohmann::json& j) {
  const std::string text = j.dump(2) + "\n";
  write_bytes_atomic(path, text.data(), text.size());
}

void check_size(bool ok, const std::string& path, const std::string& what) {
  if (!ok) throw FormatError(path + ": the components do not fit together: " + what);
}
}  // namespace

nlohmann::json clip_text_config_json(const models::CLIPTextConfig& c) {
  nlohmann::json j;
  j["architectures"] = {"CLIPTextModelWithProjection"};
  j["model_type"] = "clip_text_model";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["projection_dim"] = c.projection_dim;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["hidden_act"] = c.hidden_act;
  j["layer_norm_eps"] = c.layer_norm_eps;
  j["attention_dropout"] = 0.0;
  j["initializer_range"] = 0.02;
  j["initializer_factor"] = 1.0;
  j["pad_token_id"] = c.pad_token_id;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  return j;
}

nlohmann::json clip_vision_config_json(const models::CLIPVisionConfig& c) {
  nlohmann::json j;
  j["architectures"] = {"CLIPVisionModelWithProjection"};
  j["model_type"] = "clip_vision_model";
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["projection_dim"] = c.projection_dim;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_channels"] = c.num_channels;
  j["image_size"] = c.image_size;
  j["patch_size"] = c.patch_size;
  j["hidden_act"] = c.hidden_act;
  j["layer_norm_eps"] = c.layer_norm_eps;
  j["attention_dropout"] = 0.0;
  j["initializer_range"] = 0.02;
  j["initializer_factor"] = 1.0;
  return j;
}

nlohmann::json clip_image_processor_json(const models::CLIPImageProcessorConfig& c) {
  nlohmann::json j;
  j["image_processor_type"] = "CLIPImageProcessor";
  j["do_resize"] = c.do_resize;
  if (c.shortest_edge > 0)
    j["size"] = {{"shortest_edge", c.shortest_edge}};
  else
    j["size"] = {{"height", c.size_height}, {"width", c.size_width}};
  j["resample"] = c.resample;
  j["do_center_crop"] = c.do_center_crop;
  j["crop_size"] = {{"height", c.crop_height}, {"width", c.crop_width}};
  j["do_rescale"] = c.do_rescale;
  j["rescale_factor"] = c.rescale_factor;
  j["do_normalize"] = c.do_normalize;
  j["image_mean"] = c.image_mean;
  j["image_std"] = c.image_std;
  j["do_convert_rgb"] = c.do_convert_rgb;
  return j;
}

bool is_clip_folder(const std::string& path) {
  const std::string index = join_path(path, "model_index.json");
  if (!is_directory(path) || !path_exists(index)) return false;
  try {
    const nlohmann::json j = io::load_json_file(index, "model_index.json");
    return j.is_object() && j.value("_class_name", std::string()) == "CLIPModel";
  } catch (const Error&) {
    return false;
  }
}

std::shared_ptr<CLIPComponents> load_clip(const std::string& path, const LoadOptions& opts) {
  DMX_CHECK_ARG(!path.empty(), "--model: no model path given");
  DMX_CHECK_ARG(path_exists(path), "--model: path not found: ", path);
  DMX_CHECK_ARG(is_directory(path), "--model: a CLIP model is a folder, got a file: ", path);
  const std::string index_path = join_path(path, "model_index.json");
  DMX_CHECK_FORMAT(path_exists(index_path), "--model: ", path, " is not a CLIP folder (no model_index.json)");
  const nlohmann::json index = io::load_json_file(index_path, "model_index.json");
  DMX_CHECK_FORMAT(index.is_object() && index.value("_class_name", std::string()) == "CLIPModel", index_path,
                   " must name _class_name \"CLIPModel\"");
  std::vector<std::string> missing;
  for (const char* c : kComponents)
    if (!is_directory(join_path(path, c))) missing.push_back(std::string(c) + "/");
  if (!missing.empty()) throw FormatError(path + " is a CLIP folder missing " + join(missing, ", "));

  auto m = std::make_shared<CLIPComponents>();
  if (auto it = index.find("logit_scale"); it != index.end()) {
    DMX_CHECK_FORMAT(it->is_number() && std::isfinite(it->get<double>()), index_path,
                     ": logit_scale must be a finite number, got ", it->dump());
    m->logit_scale = it->get<double>();
  }
  m->tokenizer_dir = join_path(path, "tokenizer");
  m->tokenizer = std::make_shared<models::CLIPTokenizer>(models::CLIPTokenizer::from_folder(m->tokenizer_dir));
  m->feature_extractor = models::CLIPImageProcessorConfig::from_json(
      io::load_json_file(join_path(path, "feature_extractor/preprocessor_config.json"), "feature_extractor config"));

  const auto text_cfg = models::CLIPTextConfig::from_json(
      io::load_json_file(join_path(path, "text_encoder/config.json"), "text_encoder config"));
  auto te = io::load_diffusers_component(path, "text_encoder");
  models::clean_clip_state_dict(te);
  io::check_weights_cover_config(text_cfg.parameter_count(/*with_projection=*/true), te, path + "/text_encoder");
  m->text_encoder = models::CLIPTextModel(text_cfg, /*with_projection=*/true);
  io::load_state_dict(*m->text_encoder, te, path + "/text_encoder");

  const auto vision_cfg = models::CLIPVisionConfig::from_json(
      io::load_json_file(join_path(path, "image_encoder/config.json"), "image_encoder config"));
  auto ie = io::load_diffusers_component(path, "image_encoder");
  models::clean_clip_vision_state_dict(ie);
  io::check_weights_cover_config(vision_cfg.parameter_count(), ie, path + "/image_encoder");
  m->image_encoder = models::CLIPVisionModelWithProjection(vision_cfg);
  io::load_state_dict(*m->image_encoder, ie, path + "/image_encoder");

  check_size(text_cfg.projection_dim == vision_cfg.projection_dim, path,
             "text_encoder projection_dim " + std::to_string(text_cfg.projection_dim) +
                 " != image_encoder projection_dim " + std::to_string(vision_cfg.projection_dim));
  check_size(m->tokenizer->model_max_length() <= text_cfg.max_position_embeddings, path,
             "tokenizer model_max_length " + std::to_string(m->tokenizer->model_max_length()) +
                 " > text_encoder max_position_embeddings " + std::to_string(text_cfg.max_position_embeddings));
  const auto& fe = m->feature_extractor;
  const int out_h = fe.do_center_crop ? fe.crop_height : fe.shortest_edge > 0 ? 0 : fe.size_height;
  const int out_w = fe.do_center_crop ? fe.crop_width : fe.shortest_edge > 0 ? 0 : fe.size_width;
  check_size((out_h == 0 || out_h == vision_cfg.image_size) && (out_w == 0 || out_w == vision_cfg.image_size), path,
             "feature_extractor makes " + std::to_string(out_h) + "x" + std::to_string(out_w) +
                 " pictures, the image_encoder takes " + std::to_string(vision_cfg.image_size) + "x" +
                 std::to_string(vision_cfg.image_size));
  for (torch::nn::Module* mod : {static_cast<torch::nn::Module*>(m->text_encoder.get()),
                                 static_cast<torch::nn::Module*>(m->image_encoder.get())}) {
    mod->eval();
    mod->to(at::Device(opts.device), opts.dtype);
  }
  return m;
}

void save_clip(const std::string& dir, const CLIPComponents& m) {
  DMX_CHECK_ARG(!m.text_encoder.is_empty() && !m.image_encoder.is_empty() && m.tokenizer,
                "save_clip: the model needs a text encoder, an image encoder and a tokenizer");
  DMX_CHECK_ARG(m.text_encoder->has_projection(), "save_clip: the text encoder needs its text_projection");
  write_directory_atomic(dir, "the CLIP folder", [&](const std::string& tmp) {
    namespace fs = std::filesystem;
    nlohmann::ordered_json index;
    index["_class_name"] = "CLIPModel";
    index["_dmx_writer"] = "dmx train clip";
    index["logit_scale"] = m.logit_scale;
    index["text_encoder"] = {"transformers", "CLIPTextModelWithProjection"};
    index["image_encoder"] = {"transformers", "CLIPVisionModelWithProjection"};
    index["tokenizer"] = {"transformers", "CLIPTokenizer"};
    index["feature_extractor"] = {"transformers", "CLIPImageProcessor"};
    write_json(join_path(tmp, "model_index.json"), nlohmann::json::parse(index.dump()));
    for (const char* c : kComponents) fs::create_directories(fs::path(tmp) / c);
    write_json(join_path(tmp, "text_encoder/config.json"), clip_text_config_json(m.text_encoder->config()));
    io::save_safetensors(join_path(tmp, "text_encoder/model.safetensors"), float_state(*m.text_encoder),
                         {{"format", "pt"}});
    write_json(join_path(tmp, "image_encoder/config.json"), clip_vision_config_json(m.image_encoder->config()));
    io::save_safetensors(join_path(tmp, "image_encoder/model.safetensors"), float_state(*m.image_encoder),
                         {{"format", "pt"}});
    write_json(join_path(tmp, "feature_extractor/preprocessor_config.json"),
               clip_image_processor_json(m.feature_extractor));
    for (const char* f : {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}) {
      const fs::path src = fs::path(m.tokenizer_dir) / f;
      if (fs::is_regular_file(src)) fs::copy_file(src, fs::path(tmp) / "tokenizer" / f);
    }
  });
}
}  // namespace dmx::loaders
