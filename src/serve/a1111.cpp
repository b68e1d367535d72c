// A1111 request and response bodies <-> dmx generate options (serve/a1111.h).
#include "serve/a1111.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <optional>
#include <random>

#include "cli/options.h"

namespace dmx::serve {
using json = nlohmann::json;

RequestError::RequestError(int s, std::string f, std::string r, json v)
    : InvalidArgument((f.empty() ? "" : f + ": ") + r),
      status(s),
      field(std::move(f)),
      rule(std::move(r)),
      value(std::move(v)) {}

json RequestError::body() const {
  return {{"error", status == 413 ? "PayloadTooLarge" : "InvalidArgument"},
          {"field", field},
          {"rule", rule},
          {"value", value},
          {"detail", what()}};
}

namespace {
// A1111 field -> the `dmx generate` flag that carries it (the CLI's option table checks the value).
struct FlagRow {
  const char* field;
  const char* flag;
};
const FlagRow kFlags[] = {
    {"prompt", "prompt"},
    {"negative_prompt", "negative-prompt"},
    {"steps", "steps"},
    {"cfg_scale", "guidance-scale"},
    {"width", "width"},
    {"height", "height"},
    {"seed", "seed"},
    {"sampler_name", "scheduler"},
    {"eta", "eta"},
    {"denoising_strength", "strength"},
    {"init_images", "init-image"},
    {"mask", "mask"},
    {"override_settings.CLIP_stop_at_last_layers", "clip-skip"},
    {"alwayson_scripts.controlnet.args.model", "controlnet"},
    {"alwayson_scripts.controlnet.args.image", "control-image"},
    {"alwayson_scripts.controlnet.args.weight", "control-scale"},
    {"alwayson_scripts.controlnet.args.guidance_start", "control-start"},
    {"alwayson_scripts.controlnet.args.guidance_end", "control-end"},
    {"alwayson_scripts.controlnet.args.module", "control-preprocess"},
    {"alwayson_scripts.controlnet.args.threshold_a", "canny-low"},
    {"alwayson_scripts.controlnet.args.threshold_b", "canny-high"},
};

// Fields A1111 defines that dmx does not honour, with A1111's default: a request giving another value has them listed
// in info.ignored_fields (never silently dropped).
struct IgnoredRow {
  const char* field;
  json def;
};
const std::vector<IgnoredRow>& ignored_rows() {
  static const std::vector<IgnoredRow> rows = {
      {"styles", json::array()},
      {"subseed", -1},
      {"subseed_strength", 0},
      {"seed_resize_from_h", -1},
      {"seed_resize_from_w", -1},
      {"restore_faces", false},
      {"tiling", false},
      {"s_min_uncond", 0},
      {"s_churn", 0},
      {"s_tmax", 0},
      {"s_tmin", 0},
      {"s_noise", 1},
      {"enable_hr", false},
      {"hr_scale", 2},
      {"hr_upscaler", ""},
      {"hr_second_pass_steps", 0},
      {"hr_resize_x", 0},
      {"hr_resize_y", 0},
      {"hr_checkpoint_name", ""},
      {"hr_sampler_name", ""},
      {"hr_prompt", ""},
      {"hr_negative_prompt", ""},
      {"firstphase_width", 0},
      {"firstphase_height", 0},
      {"refiner_checkpoint", ""},
      {"refiner_switch_at", 0},
      {"script_name", ""},
      {"script_args", json::array()},
      {"save_images", false},
      {"scheduler", "Automatic"},
      {"resize_mode", 0},
      {"image_cfg_scale", 0},
      {"mask_blur", 0},
      {"mask_blur_x", 4},
      {"mask_blur_y", 4},
      {"inpainting_fill", 0},
      {"inpaint_full_res", false},
      {"inpaint_full_res_padding", 0},
      {"initial_noise_multiplier", 1},
      {"latent_mask", ""},
      {"include_init_images", false},
  };
  return rows;
}

bool is_default(const json& v, const json& def) {
  if (v.is_null()) return true;
  if (v.is_number() && def.is_number()) return v.get<double>() == def.get<double>();
  if (v.is_boolean() && !v.get<bool>()) return true;
  if ((v.is_array() || v.is_object() || v.is_string()) && v.empty()) return true;
  if (v.is_number() && v.get<double>() == 0) return true;
  return v == def;
}

std::string number_text(const json& v) {
  if (v.is_number_integer()) return v.dump();
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v.get<double>());
  return buf;
}

const json* field(const json& obj, const char* name) {
  const auto it = obj.find(name);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

// The value of an integer field (an integral JSON number); RequestError naming it otherwise.
int64_t integer_field(const json& v, const std::string& name) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float() && std::isfinite(v.get<double>()) && v.get<double>() == std::floor(v.get<double>()) &&
      std::fabs(v.get<double>()) < 9e15)
    return static_cast<int64_t>(v.get<double>());
  throw RequestError(400, name, "must be an integer", v);
}
std::string number_field(const json& v, const std::string& name) {
  if (!v.is_number()) throw RequestError(400, name, "must be a number", v);
  return number_text(v);
}
std::string string_field(const json& v, const std::string& name) {
  if (!v.is_string()) throw RequestError(400, name, "must be a string", v);
  const std::string s = v.get<std::string>();
  if (s.find('\0') != std::string::npos) throw RequestError(400, name, "must not contain NUL characters", v);
  return s;
}

// The CLI's parser and option table on the flags a request became: the same checks as `dmx generate`.
GenerateOptions parse_flags(const std::vector<std::pair<std::string, std::string>>& flags, const json& body) {
  std::vector<std::string> args = {"dmx", "generate"};
  for (const auto& [flag, value] : flags) {
    args.push_back("--" + flag);
    args.push_back(value);
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  GenerateOptions defaults, o;
  try {
    auto a = cli::parse_args(cli::kGenerate, static_cast<int>(argv.size()), argv.data(),
                             cli::target(cli::kGenerate, defaults));
    if (a) cli::apply_options(*a, cli::target(cli::kGenerate, o));
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    const std::string f = field_of_message(msg);
    json value;
    if (!f.empty() && f.find('.') == std::string::npos && body.contains(f)) value = body[f];
    std::string rule = msg;
    const size_t sp = msg.find(' ');
    if (msg.rfind("--", 0) == 0 && sp != std::string::npos) rule = msg.substr(sp + 1);
    throw RequestError(400, f, rule, value);
  }
  return o;
}
}  // namespace

size_t find_flag(const std::string& message, const std::string& name) {
  const std::string flag = "--" + name;
  for (size_t pos = message.find(flag); pos != std::string::npos; pos = message.find(flag, pos + 1)) {
    const size_t end = pos + flag.size();
    if (end == message.size() || !(std::isalnum(static_cast<unsigned char>(message[end])) || message[end] == '-'))
      return pos;
  }
  return std::string::npos;
}

std::string field_of_message(const std::string& message) {
  size_t best = std::string::npos;
  std::string field;
  for (const auto& row : kFlags) {
    const size_t pos = find_flag(message, row.flag);
    if (pos < best) {
      best = pos;
      field = row.field;
    }
  }
  if (!field.empty()) return field;
  // Rules of the pipelines and loaders name their parameter first, without dashes ("width must be a multiple of 8",
  // "prompt: LoRA name ..."): the A1111 field or the flag it maps from.
  for (const auto& row : kFlags)
    for (const std::string& name : {std::string(row.field), std::string(row.flag)}) {
      if (message.size() > name.size() && message.compare(0, name.size(), name) == 0 &&
          (message[name.size()] == ':' || message[name.size()] == ' '))
        return row.field;
    }
  return "";
}

json error_body(const std::string& kind, const std::string& message) {
  return {{"error", kind}, {"field", field_of_message(message)}, {"detail", message}};
}

const ServedModel& find_model(const std::vector<ServedModel>& models, const std::string& name,
                              const std::string& field_name) {
  for (const auto& m : models)
    if (name == m.name || name == m.title) return m;
  std::string list;
  for (const auto& m : models) list += (list.empty() ? "" : ", ") + m.name;
  throw RequestError(400, field_name, "must name a model of GET /sdapi/v1/sd-models (" + list + ")", name);
}

// ---- base64 ---------------------------------------------------------------------------------------------------
std::string base64_decode(const std::string& in_full, const std::string& name) {
  std::string in = in_full;
  if (in.rfind("data:", 0) == 0) {
    const size_t comma = in.find(',');
    if (comma == std::string::npos || in.substr(0, comma).find(";base64") == std::string::npos)
      throw RequestError(400, name, "a data: URL must be base64 (data:image/png;base64,...)", in.substr(0, 64));
    in = in.substr(comma + 1);
  }
  static int8_t table[256];
  static bool init = [] {
    std::fill(std::begin(table), std::end(table), int8_t(-1));
    const char* a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int i = 0; i < 64; ++i) table[static_cast<uint8_t>(a[i])] = static_cast<int8_t>(i);
    return true;
  }();
  (void)init;
  std::string out;
  out.reserve(in.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0, pad = 0;
  for (char c : in) {
    if (c == '\n' || c == '\r' || c == ' ') continue;
    if (c == '=') {
      ++pad;
      continue;
    }
    const int8_t v = table[static_cast<uint8_t>(c)];
    if (v < 0 || pad > 0) throw RequestError(400, name, "must be base64 (A-Z a-z 0-9 + / =)", in.substr(0, 64));
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xff));
    }
  }
  if (pad > 2 || out.empty()) throw RequestError(400, name, "must be a base64 picture", in.substr(0, 64));
  return out;
}

std::string base64_encode(const std::string& bytes) {
  const char* a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    out += {a[v >> 18], a[(v >> 12) & 63], a[(v >> 6) & 63], a[v & 63]};
  }
  if (i + 1 == bytes.size()) {
    const uint32_t v = uint8_t(bytes[i]) << 16;
    out += {a[v >> 18], a[(v >> 12) & 63], '=', '='};
  } else if (i + 2 == bytes.size()) {
    const uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8);
    out += {a[v >> 18], a[(v >> 12) & 63], a[(v >> 6) & 63], '='};
  }
  return out;
}

std::string Uploads::save(const std::string& b64, const std::string& name, int64_t max_bytes) {
  const std::string bytes = base64_decode(b64, name);
  if (max_bytes > 0 && static_cast<int64_t>(bytes.size()) > max_bytes)
    throw RequestError(413, name, "a picture may have at most " + std::to_string(max_bytes) + " bytes",
                       static_cast<int64_t>(bytes.size()));
  // The CLI's loaders decide what the bytes are (PNG or JPEG by content, bounded, hardened); the name is neutral.
  const std::string path = dir + "/upload-" + std::to_string(count++) + ".img";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) throw IoError("cannot create " + path);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) {
      ::close(fd);
      throw IoError("cannot write " + path);
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return path;
}

// ---- requests -------------------------------------------------------------------------------------------------
GenerationRequest parse_generation_request(const json& body, bool img2img, const RequestContext& ctx) {
  if (!body.is_object()) throw RequestError(400, "", "the body must be a JSON object", body.type_name());
  GenerationRequest r;
  std::vector<std::pair<std::string, std::string>> flags;
  json params = json::object();
  // Text fields.
  for (const char* name : {"prompt", "negative_prompt"}) {
    const json* v = field(body, name);
    const std::string s = v ? string_field(*v, name) : "";
    params[name] = s;
    flags.push_back({name == std::string("prompt") ? "prompt" : "negative-prompt", s});
  }
  // Numbers, A1111's defaults when absent (steps 50, cfg_scale 7; width/height: the model's own size).
  auto integer = [&](const char* name, const char* flag, std::optional<int64_t> def) {
    const json* v = field(body, name);
    if (!v && !def) {
      params[name] = nullptr;
      return;
    }
    const int64_t x = v ? integer_field(*v, name) : *def;
    params[name] = x;
    flags.push_back({flag, std::to_string(x)});
  };
  integer("steps", "steps", 50);
  integer("width", "width", std::nullopt);
  integer("height", "height", std::nullopt);
  auto number = [&](const char* name, const char* flag, std::optional<double> def) {
    const json* v = field(body, name);
    if (!v && !def) return;
    const std::string text = v ? number_field(*v, name) : number_text(json(*def));
    params[name] = v ? *v : json(*def);
    flags.push_back({flag, text});
  };
  number("cfg_scale", "guidance-scale", 7.0);
  number("eta", "eta", std::nullopt);
  if (img2img) number("denoising_strength", "strength", 0.75);
  // The sampler: an A1111 label ("Euler a") or a dmx name; sampler_index is its older name.
  const json* sv = field(body, "sampler_name");
  if (!sv) sv = field(body, "sampler_index");
  if (sv) {
    const std::string label = string_field(*sv, "sampler_name");
    const std::string name = sampler_for_label(label);
    if (name.empty()) {
      std::string list;
      for (const auto& s : samplers()) list += (list.empty() ? "" : ", ") + s.label;
      throw RequestError(400, "sampler_name", "must be a sampler of GET /sdapi/v1/samplers (" + list + ")", *sv);
    }
    flags.push_back({"scheduler", name});
    params["sampler_name"] = label;
  }
  // Seed: -1 (or absent) = random, as A1111 draws it (below 2^32 - 1).
  uint64_t seed = 0;
  const json* seed_v = field(body, "seed");
  if (seed_v && !(seed_v->is_number_integer() && seed_v->get<int64_t>() == -1)) {
    if (seed_v->is_number_unsigned()) {
      seed = seed_v->get<uint64_t>();
    } else {
      const int64_t s = integer_field(*seed_v, "seed");
      if (s < 0) throw RequestError(400, "seed", "must be -1 (random) or in [0, 2^64 - 1]", *seed_v);
      seed = static_cast<uint64_t>(s);
    }
  } else {
    std::random_device rd;
    seed = std::uniform_int_distribution<uint64_t>(0, 4294967293ull)(rd);
  }
  params["seed"] = seed;
  flags.push_back({"seed", std::to_string(seed)});
  // Batches: each picture is a run of its own with seed + i, as A1111's all_seeds.
  auto count = [&](const char* name) {
    const json* v = field(body, name);
    const int64_t n = v ? integer_field(*v, name) : 1;
    if (n < 1 || n > 64) throw RequestError(400, name, "must be in [1, 64]", *v);
    params[name] = n;
    return static_cast<int>(n);
  };
  r.batch_size = count("batch_size");
  r.n_iter = count("n_iter");
  if (r.batch_size * r.n_iter > 64)
    throw RequestError(400, "batch_size", "batch_size * n_iter must be at most 64", r.batch_size * r.n_iter);
  if (const json* v = field(body, "send_images")) {
    if (!v->is_boolean()) throw RequestError(400, "send_images", "must be a boolean", *v);
    r.send_images = v->get<bool>();
  }
  // The model: override_settings.sd_model_checkpoint (this request only, as A1111's restore-afterwards default),
  // else the loaded one. Other override settings dmx knows: CLIP_stop_at_last_layers (A1111's 1 = dmx's 0).
  const ServedModel* model = ctx.current;
  if (const json* ov = field(body, "override_settings")) {
    if (!ov->is_object()) throw RequestError(400, "override_settings", "must be an object", *ov);
    for (auto it = ov->begin(); it != ov->end(); ++it) {
      const std::string key = "override_settings." + it.key();
      if (it.key() == "sd_model_checkpoint") {
        model = &find_model(*ctx.models, string_field(*it, key), key);
      } else if (it.key() == "CLIP_stop_at_last_layers") {
        const int64_t n = integer_field(*it, key);
        if (n < 1 || n > 65) throw RequestError(400, key, "must be in [1, 65]", *it);
        flags.push_back({"clip-skip", std::to_string(n - 1)});
      } else {
        r.ignored_fields.push_back(key);
      }
    }
    params["override_settings"] = *ov;
  }
  if (!model) throw RequestError(400, "override_settings.sd_model_checkpoint", "no model is loaded", nullptr);
  r.model_name = model->name;
  // img2img: the first init image (more: listed as ignored), the mask (white = repaint, as dmx's --mask).
  if (img2img) {
    const json* iv = field(body, "init_images");
    if (!iv || !iv->is_array() || iv->empty() || !(*iv)[0].is_string())
      throw RequestError(400, "init_images", "must be a non-empty array of base64 pictures",
                         iv ? json(iv->type_name()) : json(nullptr));
    if (iv->size() > 1) r.ignored_fields.push_back("init_images[1:]");
    flags.push_back({"init-image", ctx.uploads->save((*iv)[0].get<std::string>(), "init_images", ctx.max_image_bytes)});
    if (const json* mv = field(body, "mask")) {
      flags.push_back({"mask", ctx.uploads->save(string_field(*mv, "mask"), "mask", ctx.max_image_bytes)});
      if (const json* inv = field(body, "inpainting_mask_invert"); inv && !is_default(*inv, 0))
        throw RequestError(400, "inpainting_mask_invert",
                           "1 (inpaint the black part) is not supported yet; send the "
                           "mask inverted",
                           *inv);
    }
  }
  // ControlNet units (the sd-webui-controlnet extension's alwayson_scripts.controlnet.args).
  if (const json* as = field(body, "alwayson_scripts")) {
    if (!as->is_object()) throw RequestError(400, "alwayson_scripts", "must be an object", *as);
    for (auto it = as->begin(); it != as->end(); ++it) {
      if (it.key() != "controlnet") {
        r.ignored_fields.push_back("alwayson_scripts." + it.key());
        continue;
      }
      const std::string base = "alwayson_scripts.controlnet.args";
      const json* args = it->is_object() ? field(*it, "args") : nullptr;
      if (!args || !args->is_array()) throw RequestError(400, base, "must be an array of ControlNet units", *it);
      for (const json& u : *args) {
        if (!u.is_object()) throw RequestError(400, base, "each unit must be an object", u);
        if (const json* en = field(u, "enabled"); en && en->is_boolean() && !en->get<bool>()) continue;
        const json* mv = field(u, "model");
        const std::string name = mv ? string_field(*mv, base + ".model") : "";
        if (name.empty() || name == "None") throw RequestError(400, base + ".model", "must name a ControlNet", u);
        // Names only, from the server's own folder: "emoji-controlnet-canny" or "emoji-controlnet-canny [hash]".
        const std::string stem = name.substr(0, name.find(" ["));
        bool found = false;
        for (const auto& c : list_controlnets(ctx.models_dir))
          if (c.name == stem) {
            flags.push_back({"controlnet", c.path});
            found = true;
          }
        if (!found) {
          std::string list;
          for (const auto& c : list_controlnets(ctx.models_dir)) list += (list.empty() ? "" : ", ") + c.name;
          throw RequestError(400, base + ".model", "must name a ControlNet of the server (" + list + ")", name);
        }
        const json* img = field(u, "image");
        if (!img) img = field(u, "input_image");
        if (!img) throw RequestError(400, base + ".image", "is required (a base64 picture)", nullptr);
        flags.push_back({"control-image",
                         ctx.uploads->save(string_field(*img, base + ".image"), base + ".image", ctx.max_image_bytes)});
        const json* mod = field(u, "module");
        const std::string module = mod ? string_field(*mod, base + ".module") : "none";
        if (module != "none" && module != "canny")
          throw RequestError(400, base + ".module", "must be canny or none (other preprocessors: not yet)", module);
        flags.push_back({"control-preprocess", module});
        if (const json* w = field(u, "weight")) flags.push_back({"control-scale", number_field(*w, base + ".weight")});
        if (const json* s = field(u, "guidance_start"))
          flags.push_back({"control-start", number_field(*s, base + ".guidance_start")});
        if (const json* e = field(u, "guidance_end"))
          flags.push_back({"control-end", number_field(*e, base + ".guidance_end")});
        if (module == "canny") {
          if (const json* a = field(u, "threshold_a"))
            flags.push_back({"canny-low", number_field(*a, base + ".threshold_a")});
          if (const json* b = field(u, "threshold_b"))
            flags.push_back({"canny-high", number_field(*b, base + ".threshold_b")});
        }
        for (const char* k : {"resize_mode", "control_mode", "pixel_perfect", "processor_res", "lowvram", "guessmode"})
          if (const json* x = field(u, k); x && !is_default(*x, json())) r.ignored_fields.push_back(base + "." + k);
      }
    }
    params["alwayson_scripts"] = *as;
  }
  // Fields A1111 has and dmx does not honour, when given a value other than A1111's default.
  for (const auto& row : ignored_rows())
    if (const json* v = field(body, row.field); v && !is_default(*v, row.def)) r.ignored_fields.push_back(row.field);
  // One parse through the CLI's table (ranges, names): the same refusals as `dmx generate`.
  GenerateOptions o = parse_flags(flags, body);
  if (img2img && !field(body, "width")) o.width = 0;  // the init image's size
  if (img2img && !field(body, "height")) o.height = 0;
  o.model = model->path;
  o.lora_dir = ctx.models_dir;
  o.hypernetwork_dir = ctx.models_dir;
  o.threads = ctx.threads;
  o.progress = false;
  o.num_images = 1;
  for (int i = 0; i < r.batch_size * r.n_iter; ++i) {
    GenerateOptions run = o;
    run.seed = seed + static_cast<uint64_t>(i);
    r.runs.push_back(run);
  }
  params["sampler_name"] = params.value("sampler_name", json(nullptr));
  r.parameters = params;
  return r;
}

json info_json(const GenerationRequest& r, const std::vector<SessionResult>& results, bool interrupted,
               double load_seconds) {
  const GenerateOptions& o = r.runs.front();
  json seeds = json::array(), prompts = json::array(), negatives = json::array(), infotexts = json::array();
  for (const auto& res : results) {
    seeds.push_back(res.seed);
    prompts.push_back(o.prompt);
    negatives.push_back(o.negative_prompt);
    infotexts.push_back(res.parameters);
  }
  const SessionResult* first = results.empty() ? nullptr : &results.front();
  char stamp[32];
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  std::strftime(stamp, sizeof stamp, "%Y%m%d%H%M%S", &tm);
  std::string sampler_label;
  if (first)
    for (const auto& s : samplers())
      if (s.name == first->scheduler) sampler_label = s.label;
  return {{"prompt", o.prompt},
          {"all_prompts", prompts},
          {"negative_prompt", o.negative_prompt},
          {"all_negative_prompts", negatives},
          {"seed", first ? json(first->seed) : json(*o.seed)},
          {"all_seeds", seeds},
          {"subseed", -1},
          {"all_subseeds", json::array()},
          {"subseed_strength", 0},
          {"width", first ? first->width : o.width},
          {"height", first ? first->height : o.height},
          {"sampler_name", first ? json(sampler_label.empty() ? first->scheduler : sampler_label) : json(nullptr)},
          {"cfg_scale", o.guidance_scale},
          {"steps", o.steps},
          {"batch_size", r.batch_size},
          {"restore_faces", false},
          {"face_restoration_model", nullptr},
          {"sd_model_name", first ? first->model_name : r.model_name},
          {"sd_model_hash", first ? first->model_hash : ""},
          {"sd_vae_name", nullptr},
          {"sd_vae_hash", nullptr},
          {"seed_resize_from_w", -1},
          {"seed_resize_from_h", -1},
          {"denoising_strength", o.init_image.empty() ? json(nullptr) : json(o.strength)},
          {"extra_generation_params", json::object()},
          {"index_of_first_image", 0},
          {"infotexts", infotexts},
          {"styles", json::array()},
          {"job_timestamp", stamp},
          {"clip_skip", o.clip_skip + 1},
          {"is_using_inpainting_conditioning", false},
          {"version", "dmx " + version()},
          // dmx's additions.
          {"ignored_fields", r.ignored_fields},
          {"interrupted", interrupted},
          {"load_seconds", load_seconds}};
}

const std::vector<FieldDoc>& txt2img_fields() {
  static const std::vector<FieldDoc> f = {
      {"prompt", "string", "the prompt (<lora:NAME:W> tags name LoRAs of GET /sdapi/v1/loras)"},
      {"negative_prompt", "string", "the negative prompt"},
      {"steps", "integer", "denoising steps, [1, 1000] (default 50)"},
      {"cfg_scale", "number", "classifier-free guidance scale, [0, 100] (default 7)"},
      {"width", "integer", "picture width, a multiple of 8 (default: the model's size)"},
      {"height", "integer", "picture height, a multiple of 8 (default: the model's size)"},
      {"seed", "integer", "-1 = random; picture i of the batch uses seed + i"},
      {"sampler_name", "string", "a name of GET /sdapi/v1/samplers (default: the model's own scheduler)"},
      {"eta", "number", "DDIM eta in [0, 1]"},
      {"batch_size", "integer", "pictures per batch, [1, 64]"},
      {"n_iter", "integer", "batches, [1, 64]; batch_size * n_iter <= 64"},
      {"send_images", "boolean", "false: images is empty (info and parameters only)"},
      {"override_settings", "object",
       "sd_model_checkpoint (a model of GET /sdapi/v1/sd-models, this request only), CLIP_stop_at_last_layers"},
      {"alwayson_scripts", "object",
       "controlnet.args: units {model, image, module (canny|none), weight, guidance_start, guidance_end, "
       "threshold_a, threshold_b}"},
  };
  return f;
}
const std::vector<FieldDoc>& img2img_only_fields() {
  static const std::vector<FieldDoc> f = {
      {"init_images", "array", "base64 PNG/JPEG pictures; the first is used"},
      {"denoising_strength", "number", "how much to change the picture, [0, 1] (default 0.75)"},
      {"mask", "string", "base64 mask of the init image's size, white = repaint (dmx's blended latent inpainting)"},
  };
  return f;
}
}  // namespace dmx::serve
