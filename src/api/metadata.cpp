// A1111-compatible generation metadata ("parameters" PNG text chunk), so other tools read dmx's
// images and dmx re-runs theirs.
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <map>
#include <sstream>

#include "api/options_util.h"
#include "core/fs.h"
#include "core/image.h"
#include "dmx/dmx.h"
#include "schedulers/registry.h"

namespace dmx {
namespace {

using api::fmt_number;

// "Steps: 20, Sampler: Euler a, Size: 512x512, Lora hashes: \"a: 1, b: 2\"" -> pairs (values may be quoted).
std::map<std::string, std::string> split_fields(const std::string& line) {
  std::map<std::string, std::string> out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (line[i] == ' ' || line[i] == ',')) ++i;
    const size_t colon = line.find(':', i);
    if (colon == std::string::npos) break;
    std::string key = line.substr(i, colon - i);
    i = colon + 1;
    while (i < line.size() && line[i] == ' ') ++i;
    std::string value;
    if (i < line.size() && line[i] == '"') {
      ++i;
      while (i < line.size() && line[i] != '"') {
        if (line[i] == '\\' && i + 1 < line.size()) ++i;
        value += line[i++];
      }
      ++i;
    } else {
      const size_t comma = line.find(", ", i);
      value = line.substr(i, comma == std::string::npos ? std::string::npos : comma - i);
      i = comma == std::string::npos ? line.size() : comma;
    }
    out[key] = value;
  }
  return out;
}

// The numbers of the metadata follow the command line's syntax (dmx/error.h parse_integer / parse_number):
// "Steps: 1e3" is refused like `--steps 1e3`, and a value outside int is an error, not a cast with undefined
// behaviour ("Steps: 1e300" comes from whatever PNG --from is given).
double to_double(const std::string& key, const std::string& v) {
  return parse_number(v, "parameters: field '" + key + "'");
}

int to_int(const std::string& key, const std::string& v) {
  return static_cast<int>(parse_integer(v, "parameters: field '" + key + "'", -2147483648ll, 2147483647ll));
}

// A value inside a quoted field: '"' and '\\' escaped as split_fields reads them back.
std::string quoted_safe(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += (c == '\n' || c == '\r') ? ' ' : c;
  }
  return out;
}

// The name a model file or folder is known by: its stem ("models/t2i_adapter/sketch/" -> "sketch").
std::string display_name(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return file_stem(path);
}

// "FILE[:MULT]" as written on the command line -> "stem: mult" (the number as given; 1 when absent).
std::string hypernetwork_label(const std::string& arg) {
  const size_t colon = arg.find_last_of(':');
  if (colon == std::string::npos || path_exists(arg)) return display_name(arg) + ": 1";
  return display_name(arg.substr(0, colon)) + ": " + arg.substr(colon + 1);
}

}  // namespace

std::string format_parameters(const GenerateOptions& o, uint64_t seed, int width, int height,
                              const std::string& model_name, const std::string& model_hash) {
  std::ostringstream os;
  os << o.prompt << "\n";
  if (!o.negative_prompt.empty()) os << "Negative prompt: " << o.negative_prompt << "\n";
  std::string sampler = schedulers::sampler_label(o.scheduler);  // the registry's A1111 label
  if (sampler.empty()) sampler = o.scheduler;
  os << "Steps: " << o.steps;
  if (!sampler.empty()) os << ", Sampler: " << sampler;
  os << ", CFG scale: " << fmt_number(o.guidance_scale) << ", Seed: " << seed << ", Size: " << width << "x" << height;
  if (!model_hash.empty()) os << ", Model hash: " << model_hash;
  if (!model_name.empty()) os << ", Model: " << model_name;
  if (!o.init_image.empty()) os << ", Denoising strength: " << fmt_number(o.strength);
  if (o.eta != 0) os << ", Eta: " << fmt_number(o.eta);
  if (o.clip_skip) os << ", Clip skip: " << o.clip_skip + 1;
  if (o.num_images > 1) os << ", Batch size: " << o.num_images;
  if (!o.mask.empty()) {  // blended latent diffusion (docs/editing-blended.md)
    os << ", Mask blend: " << o.background;
    if (o.blend_start != 0) os << ", Blend start: " << fmt_number(o.blend_start);
    if (o.mask_dilation) os << ", Mask dilation: " << o.mask_dilation;
    if (o.blend_variant != "inpaint") os << ", Blend variant: " << o.blend_variant;
    if (o.rank) os << ", Rank: diffusion-classifier";
  }
  // Stable unCLIP (docs/unclip.md)
  if (o.prior_steps) os << ", Prior steps: " << *o.prior_steps;
  if (o.prior_guidance_scale) os << ", Prior CFG scale: " << fmt_number(*o.prior_guidance_scale);
  if (o.noise_level) os << ", Noise level: " << *o.noise_level;
  if (!o.upscale_model.empty()) {  // the cascade's upscaler (docs/upscale.md); Size stays the base size
    std::string name = o.upscale_model;
    while (name.size() > 1 && name.back() == '/') name.pop_back();
    name = name.substr(name.find_last_of('/') + 1);
    os << ", Upscale model: " << name << ", Upscale noise level: " << o.upscale_noise_level
       << ", Upscale steps: " << o.upscale_steps << ", Upscale CFG scale: " << fmt_number(o.upscale_guidance_scale);
  }
  // T2I-Adapters (docs/t2i-adapter.md) and hypernetworks given as files (docs/hypernetworks.md): names and
  // settings, for the record; the pictures and files themselves are not stored (tags stay in the prompt).
  for (size_t i = 0; i < o.adapters.size(); ++i) {
    auto pick = [&](const auto& v, size_t k, auto fallback) {
      return v.empty() ? fallback : v.size() == 1 ? v[0] : v[k];
    };
    os << ", T2I-Adapter " << i << ": \"Model: " << quoted_safe(display_name(o.adapters[i]))
       << ", Weight: " << fmt_number(o.adapter_scales.empty() ? 1.0 : o.adapter_scales[i]);
    const std::string pre = pick(o.adapter_preprocess, i, std::string("none"));
    if (pre != "none") os << ", Preprocess: " << quoted_safe(pre);
    const double end = pick(o.adapter_ends, i, 1.0);
    if (end != 1.0) os << ", End: " << fmt_number(end);
    os << "\"";
  }
  if (!o.hypernetworks.empty()) {
    os << ", Hypernet: \"";
    for (size_t i = 0; i < o.hypernetworks.size(); ++i)
      os << (i ? ", " : "") << quoted_safe(hypernetwork_label(o.hypernetworks[i]));
    os << "\"";
  }
  os << ", Version: dmx " << version();
  return os.str();
}

GenerateOptions parse_parameters(const std::string& text) { return parse_parameters(text, GenerateOptions()); }

GenerateOptions parse_parameters(const std::string& text, const GenerateOptions& base) {
  GenerateOptions o = base;
  std::vector<std::string> lines;
  std::istringstream is(text);
  for (std::string l; std::getline(is, l);) lines.push_back(l);
  DMX_CHECK_ARG(!lines.empty(), "parameters: empty text");
  // The last line holds "Key: value" fields; everything before it is prompt / negative prompt.
  std::string fields_line = lines.back();
  DMX_CHECK_ARG(lines.size() >= 2 && fields_line.find("Steps: ") != std::string::npos,
                "parameters: no 'Steps: ...' line found (not A1111-style metadata)");
  lines.pop_back();
  std::string prompt, negative;
  bool in_negative = false;
  int prompt_lines = 0;
  for (const auto& l : lines) {
    if (!in_negative && l.rfind("Negative prompt: ", 0) == 0) {
      in_negative = true;
      negative = l.substr(17);
    } else if (in_negative) {
      negative += "\n" + l;
    } else {
      prompt += (prompt_lines++ ? "\n" : "") + l;
    }
  }
  o.prompt = prompt;
  o.negative_prompt = negative;
  const auto f = split_fields(fields_line);
  auto get = [&](const std::string& k) -> const std::string* {
    auto it = f.find(k);
    return it == f.end() ? nullptr : &it->second;
  };
  if (auto v = get("Steps")) o.steps = to_int("Steps", *v);
  if (auto v = get("CFG scale")) o.guidance_scale = to_double("CFG scale", *v);
  if (auto v = get("Seed")) o.seed = parse_unsigned(*v, "parameters: Seed");
  if (auto v = get("Size")) {
    const size_t x = v->find('x');
    DMX_CHECK_ARG(x != std::string::npos, "parameters: Size must be WxH, got '", *v, "'");
    o.width = to_int("Size", v->substr(0, x));
    o.height = to_int("Size", v->substr(x + 1));
  }
  if (auto v = get("Sampler")) {
    const std::string name = schedulers::sampler_for_label(*v);
    DMX_CHECK_ARG(!name.empty(), "parameters: Sampler '", *v, "' is not one dmx implements");
    o.scheduler = name;
  }
  if (auto v = get("Denoising strength")) o.strength = to_double("Denoising strength", *v);
  if (auto v = get("Eta")) o.eta = to_double("Eta", *v);
  if (auto v = get("Clip skip")) {
    const int c = to_int("Clip skip", *v);
    DMX_CHECK_ARG(c >= 1, "parameters: Clip skip must be >= 1 (1 = no skip), got ", c);
    o.clip_skip = c - 1;
  }
  if (auto v = get("Batch size")) o.num_images = to_int("Batch size", *v);
  // Blended latent diffusion settings; the mask and image files themselves are not stored.
  if (auto v = get("Mask blend")) o.background = *v;
  if (auto v = get("Blend start")) o.blend_start = to_double("Blend start", *v);
  if (auto v = get("Mask dilation")) o.mask_dilation = to_int("Mask dilation", *v);
  if (auto v = get("Blend variant")) o.blend_variant = *v;
  if (get("Rank")) o.rank = true;
  if (auto v = get("Prior steps")) o.prior_steps = to_int("Prior steps", *v);
  if (auto v = get("Prior CFG scale")) o.prior_guidance_scale = to_double("Prior CFG scale", *v);
  if (auto v = get("Noise level")) o.noise_level = to_int("Noise level", *v);
  // The cascade's settings; the upscaler itself is given again with --upscale-model.
  if (auto v = get("Upscale noise level")) o.upscale_noise_level = to_int("Upscale noise level", *v);
  if (auto v = get("Upscale steps")) o.upscale_steps = to_int("Upscale steps", *v);
  if (auto v = get("Upscale CFG scale")) o.upscale_guidance_scale = to_double("Upscale CFG scale", *v);
  return o;
}

std::string read_image_parameters(const std::string& png_path) {
  for (const auto& kv : read_png_text(png_path))
    if (kv.first == "parameters") return kv.second;
  throw InvalidArgument("--from: " + png_path + " has no 'parameters' text chunk (not made by dmx or A1111?)");
}
}  // namespace dmx
