// Strict loading of a Stable unCLIP folder's unCLIP components (unclip.h).
#include "loaders/unclip.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <sstream>
#include <utility>
#include <vector>

#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/state_dict.h"
#include "schedulers/scheduler.h"

namespace dmx::loaders {

namespace {

struct Component {
  const char* name;
  std::vector<std::string> classes;  // accepted model_index.json classes ({} = any: schedulers, checked when built)
};

const std::vector<Component>& components_of(const std::string& pipeline_class) {
  static const std::vector<Component> decoder = {
      {"tokenizer", {}}, {"text_encoder", {}}, {"unet", {}}, {"vae", {}}, {"scheduler", {}}};
  static const std::vector<Component> txt2img = [] {
    std::vector<Component> c = {{"prior_tokenizer", {"CLIPTokenizer", "CLIPTokenizerFast"}},
                                {"prior_text_encoder", {"CLIPTextModelWithProjection"}},
                                {"prior", {"PriorTransformer"}},
                                {"prior_scheduler", {}},
                                {"image_normalizer", {"StableUnCLIPImageNormalizer"}},
                                {"image_noising_scheduler", {}}};
    c.insert(c.end(), decoder.begin(), decoder.end());
    return c;
  }();
  static const std::vector<Component> img2img = [] {
    std::vector<Component> c = {{"feature_extractor", {"CLIPImageProcessor", "CLIPFeatureExtractor"}},
                                {"image_encoder", {"CLIPVisionModelWithProjection"}},
                                {"image_normalizer", {"StableUnCLIPImageNormalizer"}},
                                {"image_noising_scheduler", {}}};
    c.insert(c.end(), decoder.begin(), decoder.end());
    return c;
  }();
  if (pipeline_class == "StableUnCLIPPipeline") return txt2img;
  if (pipeline_class == "StableUnCLIPImg2ImgPipeline") return img2img;
  throw Unsupported(
      "load_unclip_components: model_index.json names " +
      (pipeline_class.empty() ? std::string("no _class_name") : "_class_name \"" + pipeline_class + "\"") +
      "; unCLIP folders are StableUnCLIPPipeline or StableUnCLIPImg2ImgPipeline");
}

// Every component the pipeline needs is listed in model_index.json with an accepted class and has its folder;
// all problems are reported at once.
void check_components(const std::string& path, const nlohmann::json& index, const std::string& pipeline_class) {
  std::vector<std::string> missing, wrong;
  for (const auto& c : components_of(pipeline_class)) {
    const std::string folder = join_path(path, c.name);
    auto it = index.find(c.name);
    const bool listed = it != index.end() && it->is_array() && it->size() == 2 && (*it)[1].is_string();
    if (!listed || !is_directory(folder)) {
      missing.push_back(std::string(c.name) + "/" + (!listed ? " (not in model_index.json)" : ""));
      continue;
    }
    const std::string cls = (*it)[1].get<std::string>();
    if (!c.classes.empty() && std::find(c.classes.begin(), c.classes.end(), cls) == c.classes.end())
      wrong.push_back(std::string(c.name) + " is " + cls + " (expected " + join(c.classes, " or ") + ")");
  }
  if (!missing.empty()) throw FormatError(path + " is a " + pipeline_class + " folder missing " + join(missing, ", "));
  if (!wrong.empty()) throw Unsupported(path + ": " + join(wrong, "; "));
}

nlohmann::json scheduler_config(const std::string& path, const std::string& component) {
  const std::string file = join_path(join_path(path, component), "scheduler_config.json");
  return schedulers::parse_scheduler_config(read_text_file(file, component + " config", kMaxJsonFileBytes));
}

// Builds the scheduler once so a config no class accepts fails at load time, naming the folder.
std::unique_ptr<schedulers::Scheduler> check_scheduler(const std::string& path, const std::string& component,
                                                       const nlohmann::json& cfg) {
  const std::string cls = cfg.is_object() ? cfg.value("_class_name", std::string()) : std::string();
  DMX_CHECK_FORMAT(!cls.empty(), path, "/", component, "/scheduler_config.json has no _class_name");
  try {
    return schedulers::create_scheduler(cls, cfg);
  } catch (const InvalidArgument& e) {
    throw FormatError(path + "/" + component + "/scheduler_config.json: " + e.what());
  }
}

template <typename M>
void to_device(M& module, const LoadOptions& opts) {
  module->eval();
  module->to(at::Device(opts.device), opts.dtype);
}

void check_size(bool ok, const std::string& path, const std::string& what) {
  if (!ok) throw FormatError(path + ": the components do not fit together: " + what);
}

// A config that describes more parameters than its weight file holds cannot load strictly; refusing it before the
// model is built keeps a hostile config from allocating what it likes.
void check_fits_weights(const std::string& path, const std::string& component, double config_parameters,
                        const io::TensorMap& weights) {
  double held = 0;
  for (const auto& kv : weights) held += static_cast<double>(kv.second.numel());
  if (config_parameters > held) {
    std::ostringstream os;
    os.precision(15);
    os << path << "/" << component << "/config.json describes a model of " << config_parameters
       << " parameters but its weights hold " << held << " values: the config does not match the weights";
    throw FormatError(os.str());
  }
}

// The decoder UNet takes the noised image embedding and its noise-level sinusoids as class labels: class_embed_type
// "projection" with projection_class_embeddings_input_dim = 2 x the embedding width.
void check_decoder_class_embedding(const std::string& path, int embedding_dim) {
  const nlohmann::json unet = io::load_json_file(join_path(path, "unet/config.json"), "unet config");
  DMX_CHECK_FORMAT(unet.is_object(), path, "/unet/config.json must be a JSON object");
  const auto type = unet.find("class_embed_type");
  const auto dim = unet.find("projection_class_embeddings_input_dim");
  const bool projection = type != unet.end() && type->is_string() && type->get<std::string>() == "projection";
  check_size(
      projection && dim != unet.end() && dim->is_number_integer() && dim->get<int64_t>() == 2 * embedding_dim, path,
      "unet/config.json must have class_embed_type \"projection\" and projection_class_embeddings_input_dim " +
          std::to_string(2 * embedding_dim) + " (2 x the image_normalizer's embedding_dim " +
          std::to_string(embedding_dim) + "), got class_embed_type " +
          (type == unet.end() ? std::string("(none)") : type->dump()) + " and projection_class_embeddings_input_dim " +
          (dim == unet.end() ? std::string("(none)") : dim->dump()));
}
}  // namespace

std::shared_ptr<UnCLIPComponents> load_unclip_prior(const std::string& path, const LoadOptions& opts, int E) {
  DMX_CHECK_ARG(is_directory(path), "load_unclip_prior: no such folder: ", path);
  std::vector<std::string> missing;
  for (const char* c : {"prior_tokenizer", "prior_text_encoder", "prior", "prior_scheduler"})
    if (!is_directory(join_path(path, c))) missing.push_back(std::string(c) + "/");
  if (!missing.empty()) throw FormatError(path + " is not a prior folder: it has no " + join(missing, ", "));
  auto m = std::make_shared<UnCLIPComponents>();
  m->prior_tokenizer =
      std::make_shared<models::CLIPTokenizer>(models::CLIPTokenizer::from_folder(join_path(path, "prior_tokenizer")));
  const auto text_cfg = models::CLIPTextConfig::from_json(
      io::load_json_file(join_path(path, "prior_text_encoder/config.json"), "prior_text_encoder config"));
  auto te = io::load_diffusers_component(path, "prior_text_encoder");
  models::clean_clip_state_dict(te);
  check_fits_weights(path, "prior_text_encoder", text_cfg.parameter_count(/*with_projection=*/true), te);
  m->prior_text_encoder = models::CLIPTextModel(text_cfg, /*with_projection=*/true);
  io::load_state_dict(*m->prior_text_encoder, te, path + "/prior_text_encoder");
  const auto prior_cfg = models::PriorTransformerConfig::from_json(
      io::load_json_file(join_path(path, "prior/config.json"), "prior config"));
  const auto prior_weights = io::load_diffusers_component(path, "prior");
  check_fits_weights(path, "prior", prior_cfg.parameter_count(), prior_weights);
  m->prior = models::PriorTransformer(prior_cfg);
  io::load_state_dict(*m->prior, prior_weights, path + "/prior");
  m->prior_scheduler_config = scheduler_config(path, "prior_scheduler");
  const auto prior_scheduler = check_scheduler(path, "prior_scheduler", m->prior_scheduler_config);
  DMX_CHECK_SUPPORTED(prior_scheduler->class_name() != "UnCLIPScheduler", path,
                      "/prior_scheduler: UnCLIPScheduler is not supported as a StableUnCLIPPipeline prior_scheduler ",
                      "(the pipeline steps it without prev_timestep, i.e. to t - 1 whatever the step count; dmx's "
                      "UnCLIPScheduler steps to the run's next timestep, as Karlo's pipeline drives it). Stable "
                      "unCLIP folders ship a DDPMScheduler here");
  check_size(text_cfg.hidden_size == prior_cfg.embedding_dim, path,
             "prior_text_encoder hidden_size " + std::to_string(text_cfg.hidden_size) + " != prior embedding_dim " +
                 std::to_string(prior_cfg.embedding_dim));
  check_size(text_cfg.projection_dim == prior_cfg.resolved_embedding_proj_dim(), path,
             "prior_text_encoder projection_dim " + std::to_string(text_cfg.projection_dim) +
                 " != prior embedding_proj_dim " + std::to_string(prior_cfg.resolved_embedding_proj_dim()));
  check_size(m->prior_tokenizer->model_max_length() == prior_cfg.num_embeddings &&
                 prior_cfg.num_embeddings <= text_cfg.max_position_embeddings,
             path,
             "prior_tokenizer model_max_length " + std::to_string(m->prior_tokenizer->model_max_length()) +
                 " != prior num_embeddings " + std::to_string(prior_cfg.num_embeddings));
  check_size(E <= 0 || (prior_cfg.resolved_clip_embed_dim() == E && prior_cfg.embedding_dim == E), path,
             "prior embedding_dim / clip_embed_dim " + std::to_string(prior_cfg.resolved_clip_embed_dim()) +
                 " != image_normalizer embedding_dim " + std::to_string(E));
  to_device(m->prior_text_encoder, opts);
  to_device(m->prior, opts);
  return m;
}

std::shared_ptr<UnCLIPComponents> load_unclip_components(const std::string& path, const LoadOptions& opts) {
  DMX_CHECK_ARG(!path.empty(), "--model: no model path given");
  DMX_CHECK_ARG(path_exists(path), "--model: path not found: ", path);
  DMX_CHECK_ARG(is_directory(path), "--model: an unCLIP model is a diffusers folder, got a file: ", path);
  const std::string index_path = join_path(path, "model_index.json");
  DMX_CHECK_FORMAT(path_exists(index_path), "--model: ", path,
                   " is not a diffusers pipeline folder (no model_index.json)");
  const nlohmann::json index = io::load_json_file(index_path, "model_index.json");
  DMX_CHECK_FORMAT(index.is_object(), index_path, " must be a JSON object");
  auto m = std::make_shared<UnCLIPComponents>();
  m->pipeline_class = index.value("_class_name", std::string());
  check_components(path, index, m->pipeline_class);

  // Noise augmentation (both pipelines).
  m->image_normalizer = models::StableUnCLIPImageNormalizer(models::StableUnCLIPImageNormalizerConfig::from_json(
      io::load_json_file(join_path(path, "image_normalizer/config.json"), "image_normalizer config")));
  io::load_state_dict(*m->image_normalizer, io::load_diffusers_component(path, "image_normalizer"),
                      path + "/image_normalizer");
  m->image_noising_scheduler_config = scheduler_config(path, "image_noising_scheduler");
  {
    auto noising = check_scheduler(path, "image_noising_scheduler", m->image_noising_scheduler_config);
    try {
      (void)noising->add_noise_at_timestep(at::zeros({1}), at::zeros({1}), 0);
    } catch (const Unsupported& e) {
      throw Unsupported(path + "/image_noising_scheduler: " + e.what());
    }
  }
  const int E = m->image_normalizer->config().embedding_dim;
  check_decoder_class_embedding(path, E);

  if (m->pipeline_class == "StableUnCLIPPipeline") {
    const auto prior = load_unclip_prior(path, opts, E);
    m->prior_tokenizer = prior->prior_tokenizer;
    m->prior_text_encoder = prior->prior_text_encoder;
    m->prior = prior->prior;
    m->prior_scheduler_config = prior->prior_scheduler_config;
  } else {
    m->feature_extractor = models::CLIPImageProcessorConfig::from_json(
        io::load_json_file(join_path(path, "feature_extractor/preprocessor_config.json"), "feature_extractor config"));
    const auto vision_cfg = models::CLIPVisionConfig::from_json(
        io::load_json_file(join_path(path, "image_encoder/config.json"), "image_encoder config"));
    auto ie = io::load_diffusers_component(path, "image_encoder");
    models::clean_clip_vision_state_dict(ie);
    check_fits_weights(path, "image_encoder", vision_cfg.parameter_count(), ie);
    m->image_encoder = models::CLIPVisionModelWithProjection(vision_cfg);
    io::load_state_dict(*m->image_encoder, ie, path + "/image_encoder");
    check_size(vision_cfg.projection_dim == E, path,
               "image_encoder projection_dim " + std::to_string(vision_cfg.projection_dim) +
                   " != image_normalizer embedding_dim " + std::to_string(E));
    const auto& fe = m->feature_extractor;
    const int out_h = fe.do_center_crop ? fe.crop_height : fe.shortest_edge > 0 ? 0 : fe.size_height;
    const int out_w = fe.do_center_crop ? fe.crop_width : fe.shortest_edge > 0 ? 0 : fe.size_width;
    check_size((out_h == 0 || out_h == vision_cfg.image_size) && (out_w == 0 || out_w == vision_cfg.image_size), path,
               "feature_extractor makes " + std::to_string(out_h) + "x" + std::to_string(out_w) +
                   " pictures, the image_encoder takes " + std::to_string(vision_cfg.image_size) + "x" +
                   std::to_string(vision_cfg.image_size));
    to_device(m->image_encoder, opts);
  }
  to_device(m->image_normalizer, opts);
  return m;
}
}  // namespace dmx::loaders
