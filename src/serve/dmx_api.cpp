// dmx's own endpoints (serve/dmx_api.h): request fields -> the options of `dmx <command>`, run, answer.
#include "serve/dmx_api.h"

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <type_traits>

#include "cli/command_rules.h"
#include "dmx/diffedit.h"
#include "dmx/dmx.h"
#include "dmx/p2p.h"
#include "dmx/unclip.h"
#include "dmx/upscale.h"

namespace dmx::serve {
using json = nlohmann::json;

const std::vector<DmxEndpoint>& dmx_endpoints() {
  static const std::vector<DmxEndpoint> e = {
      {"generate", cli::kGenerate,
       "dmx generate on the loaded model: text to image, img2img, blended editing (mask + background), ControlNet, "
       "T2I-Adapter, regional layouts; on a Stable unCLIP folder: text -> prior -> picture",
       "sd unclip"},
      {"diffedit", cli::kDiffEdit, "DiffEdit: edit a picture by text; answers the edited picture and the mask", "sd"},
      {"p2p", cli::kP2P,
       "Prompt-to-Prompt (replace, refine, reweight), on a generated picture or a real one (image; "
       "null_text_inversion); answers the source, the edit and the attention-map grid",
       "sd"},
      {"upscale", cli::kUpscale, "x4 super-resolution with a StableDiffusionUpscalePipeline folder", "upscaler"},
      {"variations", cli::kVariations, "variations of a picture with a StableUnCLIPImg2ImgPipeline folder",
       "unclip-img2img"},
  };
  return e;
}

namespace {
// Options that name files on the server or steer the process: never taken from a request.
const std::set<std::string>& refused_options() {
  static const std::set<std::string> s = {"output",
                                          "mask-output",
                                          "save-latents",
                                          "save-attention-maps",
                                          "save-control-image",
                                          "init-latents",
                                          "from",
                                          "lora-dir",
                                          "hypernetwork-dir",
                                          "lora",
                                          "hypernetwork",
                                          "config",
                                          "tokenizer",
                                          "device",
                                          "threads",
                                          "overwrite",
                                          "quiet",
                                          "verbose",
                                          "json",
                                          "help",
                                          "upscale-model",
                                          "rank"};
  return s;
}
const std::set<std::string>& picture_options() {
  static const std::set<std::string> s = {"image", "init-image", "mask", "control-image", "adapter-image", "layout"};
  return s;
}

std::string field_name(const std::string& option) {
  std::string f = option;
  for (auto& c : f)
    if (c == '-') c = '_';
  return f;
}

std::string number_text(const json& v) {
  if (v.is_number_integer() || v.is_number_unsigned()) return v.dump();
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v.get<double>());
  return buf;
}

// A value option's text: strings as they are, numbers in full precision.
std::string value_text(const json& v, const std::string& field) {
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    if (s.find('\0') != std::string::npos) throw RequestError(400, field, "must not contain NUL characters", v);
    return s;
  }
  if (v.is_number()) {
    if (v.is_number_float() && !std::isfinite(v.get<double>())) throw RequestError(400, field, "must be finite", v);
    return number_text(v);
  }
  throw RequestError(400, field, "must be a string or a number", v);
}

std::string list_names(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out.empty() ? "none" : out;
}

// The required options of each command, as its CLI entry point checks them (model and output are the server's).
std::vector<cli::Required> required_of(cli::Command c) {
  switch (c) {
    case cli::kDiffEdit:
      return {{"image", "the picture to edit"},
              {"source-prompt", "what the picture shows"},
              {"target-prompt", "what it should show"}};
    case cli::kP2P:
      return {{"prompt", "the source prompt"}, {"edit-prompt", "the edited prompt"}};
    case cli::kVariations:
      return {{"image", "the picture to vary"}};
    default:
      return {};
  }
}

// The command's parser on args: the CLI's checks. Returns the options struct.
template <class T>
T parse_into(cli::Command c, const std::vector<std::string>& args) {
  std::vector<std::string> argv_s = {"dmx"};
  const std::string name = cli::command_info(c).name;  // "generate" or "train lora": one word each
  std::istringstream words(name);
  for (std::string w; words >> w;) argv_s.push_back(w);
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  T defaults;
  auto a = cli::parse_args(c, static_cast<int>(argv.size()), argv.data(), cli::target(c, defaults));
  if (!a) throw InvalidArgument("--help is not a request");
  // The rules between options, as the command line applies them (no --output here: the server chooses it).
  if constexpr (std::is_same_v<T, GenerateOptions>) {
    return cli::generate_options(*a, false);
  } else if constexpr (std::is_same_v<T, UpscaleOptions>) {
    return cli::upscale_options(*a, false);
  } else {
    T o;
    cli::check_required(*a, required_of(c));
    cli::apply_options(*a, cli::target(c, o));
    return o;
  }
}

std::string read_file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw IoError("cannot read " + path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}
std::string b64_file(const std::string& path) { return base64_encode(read_file_bytes(path)); }

template <class T>
void common_run_settings(T& o, int threads) {
  o.threads = threads;
  o.progress = false;
  o.verbose = false;
  o.overwrite = false;
}
}  // namespace

namespace {
std::vector<DmxField> make_fields(const DmxEndpoint& e) {
  std::vector<DmxField> out;
  cli::with_default_target(e.command, [&](const cli::Target& defaults) {
    for (const auto& opt : cli::option_table()) {
      const cli::Use* u = cli::use_for(opt, e.command);
      if (!u || refused_options().count(opt.name)) continue;
      DmxField f{field_name(opt.name), opt.name, "", cli::help_line(*u, defaults)};
      if (picture_options().count(opt.name))
        f.kind = u->repeatable ? "pictures" : "picture";
      else if (opt.name == "model")
        f.kind = "model";
      else if (opt.name == "controlnet")
        f.kind = "controlnets";
      else if (opt.name == "adapter")
        f.kind = "adapters";
      else if (u->value_name.empty())
        f.kind = "flag";
      else
        f.kind = u->repeatable ? "values" : "value";
      out.push_back(std::move(f));
    }
    // The model of the sampling commands is an option of ModelOptions; the image commands have their own.
    bool has_model = false;
    for (const auto& f : out) has_model |= f.kind == "model";
    if (!has_model) out.insert(out.begin(), DmxField{"model", "model", "model", "a model name of GET /dmx/v1/models"});
  });
  for (auto& f : out)
    if (f.kind == "model")
      f.help = std::string("a model name of GET /dmx/v1/models, of kind ") + e.model_kinds +
               " (default: the loaded model, else the first of that kind)";
  return out;
}
}  // namespace

// Made once per endpoint (the option table and its help defaults do not change while the process runs).
const std::vector<DmxField>& dmx_fields(const DmxEndpoint& e) {
  static const std::vector<std::vector<DmxField>> fields = [] {
    std::vector<std::vector<DmxField>> f;
    for (const auto& x : dmx_endpoints()) f.push_back(make_fields(x));
    return f;
  }();
  return fields.at(static_cast<size_t>(&e - dmx_endpoints().data()));
}

std::string dmx_field_of_message(const DmxEndpoint& e, const std::string& message) {
  const std::vector<DmxField>& fields = dmx_fields(e);
  size_t best = std::string::npos;
  std::string field;
  for (const auto& f : fields) {
    const size_t pos = find_flag(message, f.flag);
    if (pos < best) {
      best = pos;
      field = f.field;
    }
  }
  if (!field.empty()) return field;
  for (const auto& f : fields)
    for (const std::string& name : {f.field, f.flag})
      if (message.size() > name.size() && message.compare(0, name.size(), name) == 0 &&
          (message[name.size()] == ':' || message[name.size()] == ' '))
        return f.field;
  return "";
}

DmxRequest parse_dmx_request(const DmxEndpoint& e, const json& body, const ServedLists& lists,
                             const std::string& current_model, Uploads& uploads, int64_t max_image_bytes, int threads) {
  if (!body.is_object()) throw RequestError(400, "", "the body must be a JSON object", body.type_name());
  DmxRequest r;
  r.endpoint = &e;
  r.parameters = json::object();
  const std::vector<DmxField>& fields = dmx_fields(e);
  // The model first: a name of the server's lists, of a kind this endpoint takes.
  const std::string kinds = e.model_kinds;
  std::vector<std::string> offered;
  auto take_kind = [&](const std::string& k) { return (" " + kinds + " ").find(" " + k + " ") != std::string::npos; };
  if (take_kind("sd"))
    for (const auto& m : lists.models) offered.push_back(m.name);
  for (const auto& p : lists.pipelines)
    if (take_kind(p.kind)) offered.push_back(p.name);
  std::string model = current_model;
  if (!take_kind("sd")) model.clear();
  if (const auto it = body.find("model"); it != body.end() && !it->is_null()) {
    if (!it->is_string()) throw RequestError(400, "model", "must be a string (a model name)", *it);
    model = it->get<std::string>();
    model = model.substr(0, model.find(" ["));  // an A1111 title "name [hash]"
  }
  if (model.empty()) {
    if (offered.empty())
      throw RequestError(400, "model",
                         std::string("the server has no model of the kind this endpoint needs (") + kinds + ")",
                         nullptr);
    model = offered.front();
  }
  bool found = false;
  if (take_kind("sd"))
    for (const auto& m : lists.models)
      if (m.name == model) {
        r.model_path = m.path;
        r.model_kind = "sd";
        found = true;
      }
  for (const auto& p : lists.pipelines)
    if (!found && p.name == model && take_kind(p.kind)) {
      r.model_path = p.path;
      r.model_kind = p.kind;
      found = true;
    }
  if (!found)
    throw RequestError(
        400, "model",
        std::string("must name a model of GET /dmx/v1/models of kind ") + kinds + " (" + list_names(offered) + ")",
        model);
  r.model_name = model;
  r.parameters["model"] = model;
  // Every other field: the option it carries.
  bool seed_given = false;
  for (auto it = body.begin(); it != body.end(); ++it) {
    const std::string& key = it.key();
    if (key == "model" || it->is_null()) continue;
    const DmxField* f = nullptr;
    for (const auto& x : fields)
      if (x.field == key || x.flag == key) f = &x;
    if (!f) {
      const std::string opt = [&] {
        std::string o = key;
        for (auto& c : o)
          if (c == '_') c = '-';
        return o;
      }();
      if (refused_options().count(opt))
        throw RequestError(400, key,
                           "is not accepted over HTTP: it names a file or a setting of the server (the server "
                           "chooses its outputs; LoRAs and hypernetworks are named by <lora:NAME:W> / "
                           "<hypernet:NAME:M> tags in the prompt)",
                           *it);
      r.ignored_fields.push_back(key);
      continue;
    }
    const json& v = *it;
    const std::string flag = "--" + f->flag;
    auto as_array = [&]() -> std::vector<json> {
      if (v.is_array()) return std::vector<json>(v.begin(), v.end());
      return {v};
    };
    if (f->kind == "flag") {
      if (!v.is_boolean()) throw RequestError(400, key, "must be a boolean", v);
      if (v.get<bool>()) r.args.push_back(flag);
      r.parameters[f->field] = v;
    } else if (f->kind == "value") {
      r.args.push_back(flag);
      r.args.push_back(value_text(v, key));
      r.parameters[f->field] = v;
      if (f->flag == "seed") seed_given = true;
    } else if (f->kind == "values") {
      for (const json& x : as_array()) {
        r.args.push_back(flag);
        r.args.push_back(value_text(x, key));
      }
      r.parameters[f->field] = v;
    } else if (f->kind == "picture" || f->kind == "pictures") {
      const std::vector<json> pics = as_array();
      if (f->kind == "picture" && pics.size() != 1) throw RequestError(400, key, "must be one base64 picture", nullptr);
      for (const json& x : pics) {
        if (!x.is_string()) throw RequestError(400, key, "must be a base64 picture (a string)", x.type_name());
        r.args.push_back(flag);
        r.args.push_back(uploads.save(x.get<std::string>(), key, max_image_bytes));
      }
      r.parameters[f->field] = "(" + std::to_string(pics.size()) + " picture(s))";
    } else if (f->kind == "controlnets" || f->kind == "adapters") {
      const auto& list = f->kind == "controlnets" ? lists.controlnets : lists.adapters;
      for (const json& x : as_array()) {
        if (!x.is_string()) throw RequestError(400, key, "must be a name (a string) or an array of names", x);
        const std::string name = x.get<std::string>().substr(0, x.get<std::string>().find(" ["));
        std::string path;
        std::vector<std::string> names;
        for (const auto& m : list) {
          names.push_back(m.name);
          if (m.name == name) path = m.path;
        }
        if (path.empty())
          throw RequestError(400, key,
                             "must name a " + std::string(f->kind == "controlnets" ? "ControlNet" : "T2I-Adapter") +
                                 " of GET /dmx/v1/models (" + list_names(names) + ")",
                             x);
        r.args.push_back(flag);
        r.args.push_back(path);
      }
      r.parameters[f->field] = v;
    }
  }
  // A random seed is drawn here, as A1111 does, so that the answer can say which it was.
  if (!seed_given) {
    std::random_device rd;
    const uint64_t seed = std::uniform_int_distribution<uint64_t>(0, 4294967293ull)(rd);
    r.args.push_back("--seed");
    r.args.push_back(std::to_string(seed));
    r.parameters["seed"] = seed;
  }
  if (e.command == cli::kUpscale || e.command == cli::kVariations) {
    r.args.push_back("--model");
    r.args.push_back(r.model_path);
  } else if (r.model_kind == "sd" || r.model_kind == "unclip") {
    r.args.push_back("--model");
    r.args.push_back(r.model_path);
  }
  // One parse now: every range and rule of the command line is checked before the job waits in the queue.
  try {
    switch (e.command) {
      case cli::kGenerate:
        r.steps = parse_into<GenerateOptions>(e.command, r.args).steps;
        break;
      case cli::kDiffEdit:
        r.steps = parse_into<DiffEditOptions>(e.command, r.args).steps;
        break;
      case cli::kP2P:
        r.steps = parse_into<P2POptions>(e.command, r.args).steps;
        break;
      case cli::kUpscale:
        r.steps = parse_into<UpscaleOptions>(e.command, r.args).steps;
        break;
      case cli::kVariations:
        r.steps = parse_into<VariationsOptions>(e.command, r.args).steps;
        break;
      default:
        throw Unsupported(std::string("no endpoint for ") + e.name);
    }
  } catch (const InvalidArgument& err) {
    const std::string msg = err.what();
    const std::string f = dmx_field_of_message(e, msg);
    std::string rule = msg;
    const size_t sp = msg.find(' ');
    if (msg.rfind("--", 0) == 0 && sp != std::string::npos) rule = msg.substr(sp + 1);
    throw RequestError(400, f, rule, f.empty() || !body.contains(f) ? json(nullptr) : body[f]);
  }
  r.threads = threads;
  r.models_dir = lists.models_dir;
  return r;
}

json run_dmx_request(const DmxRequest& r, Session& session, const std::string& out_dir, const SessionHooks& hooks) {
  const DmxEndpoint& e = *r.endpoint;
  const int threads = r.threads;
  const auto t0 = std::chrono::steady_clock::now();
  json images = json::array();
  json extra = json::object();
  json info = {{"endpoint", std::string("/dmx/v1/") + e.name},
               {"model", r.model_name},
               {"ignored_fields", r.ignored_fields},
               {"interrupted", false}};
  const std::string out = out_dir + "/out.png";
  switch (e.command) {
    case cli::kGenerate: {
      GenerateOptions o = parse_into<GenerateOptions>(e.command, r.args);
      common_run_settings(o, threads);
      if (r.model_kind == "sd") {
        o.lora_dir = r.models_dir;  // <lora:NAME:W> and <hypernet:NAME:M> tags name files of --models
        o.hypernetwork_dir = r.models_dir;
        const SessionResult s = session.generate(o, hooks);
        for (const auto& png : s.pngs) images.push_back(base64_encode(png));
        info["seed"] = s.seed;
        info["parameters"] = s.parameters;
        info["width"] = s.width;
        info["height"] = s.height;
        info["load_seconds"] = s.load_seconds;
      } else {  // Stable unCLIP: the file-writing run (its models are loaded for this request)
        o.output = out;
        const GenerateResult g = generate(o);
        for (const auto& p : g.images) images.push_back(b64_file(p));
        info["seed"] = g.seed;
        if (!g.images.empty()) info["parameters"] = read_image_parameters(g.images.front());
      }
      break;
    }
    case cli::kDiffEdit: {
      DiffEditOptions o = parse_into<DiffEditOptions>(e.command, r.args);
      common_run_settings(o, threads);
      o.output = out;
      o.mask_output = out_dir + "/mask.png";
      const DiffEditResult d = diffedit(o);
      images.push_back(b64_file(d.image));
      extra["mask"] = b64_file(d.mask);
      info["seed"] = d.seed;
      info["mask_fraction"] = d.mask_fraction;
      info["parameters"] = read_image_parameters(d.image);
      break;
    }
    case cli::kP2P: {
      P2POptions o = parse_into<P2POptions>(e.command, r.args);
      common_run_settings(o, threads);
      o.output = out;
      o.save_attention_maps = out_dir + "/maps.png";
      const P2PResult p = p2p(o);
      images.push_back(b64_file(p.source));
      images.push_back(b64_file(p.edit));
      extra["side_by_side"] = b64_file(p.output);
      if (!p.attention_maps.empty()) extra["attention_maps"] = b64_file(p.attention_maps);
      info["seed"] = p.seed;
      if (!o.image.empty()) info["reconstruction_psnr"] = p.reconstruction_psnr;
      info["parameters"] = read_image_parameters(p.edit);
      break;
    }
    case cli::kUpscale: {
      UpscaleOptions o = parse_into<UpscaleOptions>(e.command, r.args);
      common_run_settings(o, threads);
      o.output = out;
      const UpscaleResult u = upscale(o);
      for (const auto& p : u.images) images.push_back(b64_file(p));
      info["seed"] = u.seed;
      info["width"] = u.width;
      info["height"] = u.height;
      info["tiled"] = u.tiled;
      if (!u.images.empty()) info["parameters"] = read_image_parameters(u.images.front());
      break;
    }
    case cli::kVariations: {
      VariationsOptions o = parse_into<VariationsOptions>(e.command, r.args);
      common_run_settings(o, threads);
      o.output = out;
      const VariationsResult v = variations(o);
      for (const auto& p : v.images) images.push_back(b64_file(p));
      info["seed"] = v.seed;
      if (!v.images.empty()) info["parameters"] = read_image_parameters(v.images.front());
      break;
    }
    default:
      throw Unsupported(std::string("no endpoint for ") + e.name);
  }
  info["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json body = {{"images", images}, {"parameters", r.parameters}, {"info", info.dump()}};
  for (auto it = extra.begin(); it != extra.end(); ++it) body[it.key()] = *it;
  return body;
}
}  // namespace dmx::serve
