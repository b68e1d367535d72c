// Loading AUTOMATIC1111 hypernetworks (see hypernetwork_loader.h).
#include "loaders/hypernetwork_loader.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "core/fs.h"
#include "core/text.h"
#include "dmx/error.h"
#include "io/torch_pickle.h"
#include "io/torch_save.h"

namespace dmx::loaders {

namespace {
std::string a_kind(const io::PickleValue& v) {
  const std::string k = v.kind_name();
  return (k == "int" || k == "OrderedDict" ? "an " : "a ") + k;
}

// The fields (A1111's dict minus the modules) and the tensors: the config, then the modules.
models::Hypernetwork from_fields(const io::TensorMap& tensors, const nlohmann::json& fields, const std::string& what,
                                 const std::string& default_name) {
  models::HypernetworkConfig cfg;
  try {
    cfg = models::HypernetworkConfig::from_json(fields);
  } catch (const FormatError& e) {
    throw FormatError(what + ": " + e.what());
  }
  if (cfg.name.empty()) cfg.name = default_name;
  return models::hypernetwork_from_state_dict(tensors, cfg, what);
}
}  // namespace

models::Hypernetwork hypernetwork_from_flat(const io::TensorMap& tensors,
                                            const std::map<std::string, std::string>& fields, const std::string& what,
                                            const std::string& default_name) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [key, text] : fields) {
    if (key == "format") continue;
    try {
      j[key] = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception&) {
      throw FormatError(what + ": field '" + key + "' is not JSON: " + text.substr(0, 80));
    }
  }
  return from_fields(tensors, j, what, default_name);
}

models::Hypernetwork hypernetwork_from_torch_file(const io::TorchFile& file, const std::string& default_name) {
  // Hypernetwork.load: every int key is a width holding (k state dict, v state dict); the str keys are the fields.
  using Kind = io::PickleValue::Kind;
  const io::PickleValue root = file.root();
  DMX_CHECK_FORMAT(root.is_dict(), root.where(),
                   " must be an A1111 hypernetwork dict ({width: (k_state_dict, v_state_dict), 'layer_structure': "
                   "..., ...}), got ",
                   a_kind(root));
  io::TensorMap tensors;
  nlohmann::json fields = nlohmann::json::object();
  for (const auto& [key, value] : root.items()) {
    if (key.kind() == Kind::Int) {  // type(size) == int (a bool is not)
      const int64_t width = key.as_int();
      DMX_CHECK_FORMAT(width > 0, value.where(), ": a module width must be > 0, got ", width);
      DMX_CHECK_FORMAT(value.is_sequence() && value.size() == 2, value.where(),
                       " must be a pair (k state dict, v state dict), got ", a_kind(value),
                       value.is_sequence() ? " of " + std::to_string(value.size()) : std::string());
      for (size_t i = 0; i < 2; ++i) {
        const io::PickleValue sd = value[i];
        DMX_CHECK_FORMAT(sd.is_dict(), sd.where(), " must be a state dict, got ", a_kind(sd));
        for (const auto& [name, t] : sd.items()) {
          DMX_CHECK_FORMAT(name.is_string(), sd.where(), ": state dict keys must be strings, got ", a_kind(name));
          const std::string full = std::to_string(width) + (i == 0 ? ".k." : ".v.") + name.as_string();
          DMX_CHECK_FORMAT(tensors.emplace(full, t.as_tensor()).second, t.where(), ": given twice");
        }
      }
    } else if (key.is_string()) {
      fields[key.as_string()] = value.to_json();
    }
    // Keys of other kinds: Hypernetwork.load reads none of them.
  }
  return from_fields(tensors, fields, file.what(), default_name);
}

models::Hypernetwork load_hypernetwork(const std::string& path) {
  DMX_CHECK_ARG(!path.empty(), "--hypernetwork: no path given");
  DMX_CHECK_ARG(path_exists(path) && !is_directory(path), "--hypernetwork: file not found: ", path);
  if (ends_with(to_lower_ascii(path), ".safetensors")) {
    auto f = io::SafeTensorsFile::open(path);
    return hypernetwork_from_flat(f->load_all(), f->metadata(), path, file_stem(path));
  }
  // A1111's own .pt: a torch.save pickle, read by the weights-only reader (nothing in it runs).
  const std::string lower = to_lower_ascii(path);
  const bool pickle_name =
      ends_with(lower, ".pt") || ends_with(lower, ".pth") || ends_with(lower, ".bin") || ends_with(lower, ".ckpt");
  DMX_CHECK_ARG(pickle_name || io::looks_like_torch_file(path), "--hypernetwork ", path,
                ": neither a .safetensors file nor a torch.save file (A1111's .pt)");
  return hypernetwork_from_torch_file(*io::load_torch_file(path), file_stem(path));
}

// ---------------------------------------------------------------------------------------------------
namespace {
// The module's state dict in Sequential order (weight, then bias), as torch's Module.state_dict() lists it.
std::vector<std::pair<std::string, at::Tensor>> module_state(models::HypernetworkModule m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& item : m->named_parameters(/*recurse=*/true)) out.emplace_back(item.key(), item.value().detach());
  return out;
}

// The fields Hypernetwork.save writes after the modules, in its order, as JSON (null = None).
std::vector<std::pair<std::string, nlohmann::json>> save_fields(const models::HypernetworkConfig& c) {
  const std::vector<double> dropout = c.effective_dropout_structure();
  const bool any_dropout = std::any_of(dropout.begin(), dropout.end(), [](double d) { return d != 0; });
  nlohmann::json dropout_json = nlohmann::json::array();
  for (double d : dropout) dropout_json.push_back(any_dropout ? nlohmann::json(d) : nlohmann::json(0));
  auto or_null = [](const std::string& s) { return s.empty() ? nlohmann::json(nullptr) : nlohmann::json(s); };
  return {
      {"step", c.step},
      {"name", or_null(c.name)},
      {"layer_structure", c.layer_structure},
      {"activation_func", or_null(c.activation_func)},
      {"is_layer_norm", c.is_layer_norm},
      {"weight_initialization", or_null(c.weight_initialization)},
      {"sd_checkpoint", or_null(c.sd_checkpoint)},
      {"sd_checkpoint_name", or_null(c.sd_checkpoint_name)},
      {"activate_output", c.activate_output},
      {"use_dropout", c.use_dropout || any_dropout},
      {"dropout_structure", dropout_json},
      {"last_layer_dropout", dropout.size() >= 2 && dropout[dropout.size() - 2] != 0},
      {"optional_info", nullptr},
  };
}

io::PyValue py(const nlohmann::json& j) {
  using io::PyValue;
  if (j.is_null()) return PyValue::none();
  if (j.is_boolean()) return PyValue::boolean(j.get<bool>());
  if (j.is_number_integer()) return PyValue::integer(j.get<int64_t>());
  if (j.is_number()) return PyValue::real(j.get<double>());
  if (j.is_string()) return PyValue::string(j.get<std::string>());
  if (j.is_array()) {
    PyValue l = PyValue::list();
    for (const auto& x : j) l.append(py(x));
    return l;
  }
  throw std::logic_error("hypernetwork fields: unexpected JSON " + j.dump());
}
}  // namespace

io::PyValue hypernetwork_torch_value(const models::Hypernetwork& hn) {
  using io::PyValue;
  PyValue root = PyValue::dict();
  auto& m = const_cast<models::HypernetworkImpl&>(*hn);
  for (int64_t w : m.width_order()) {
    PyValue pair = PyValue::tuple();
    for (auto* mod : {&m.k(w), &m.v(w)}) {
      PyValue sd = PyValue::ordered_dict();
      for (auto& [key, t] : module_state(*mod)) sd.set(key, PyValue::tensor(t));
      pair.append(std::move(sd));
    }
    root.set(PyValue::integer(w), std::move(pair));
  }
  for (const auto& [key, value] : save_fields(hn->config())) root.set(key, py(value));
  return root;
}

std::map<std::string, std::string> hypernetwork_metadata(const models::Hypernetwork& hn) {
  std::map<std::string, std::string> meta;
  for (const auto& [key, value] : save_fields(hn->config())) meta[key] = value.dump();
  meta["format"] = "a1111-hypernetwork";
  return meta;
}

bool hypernetwork_pickle_output(const std::string& path) {
  const std::string lower = to_lower_ascii(path);
  return ends_with(lower, ".pt") || ends_with(lower, ".pth");
}

void save_hypernetwork(const models::Hypernetwork& hn, const std::string& path) {
  const std::string lower = to_lower_ascii(path);
  DMX_CHECK_ARG(hypernetwork_pickle_output(path) || ends_with(lower, ".safetensors"),
                "--output: a hypernetwork is written as A1111's .pt (or .pth) or as .safetensors, got '", path, "'");
  if (hypernetwork_pickle_output(path)) {
    io::torch_save(hypernetwork_torch_value(hn), path);
    return;
  }
  io::TensorMap tensors;
  auto& m = const_cast<models::HypernetworkImpl&>(*hn);
  for (int64_t w : m.width_order())
    for (const char* kv : {"k", "v"})
      for (auto& [key, t] : module_state(std::string(kv) == "k" ? m.k(w) : m.v(w)))
        tensors[std::to_string(w) + "." + kv + "." + key] = t.contiguous();
  io::save_safetensors(path, tensors, hypernetwork_metadata(hn));
}

namespace {
// A number as the command line writes it: all of the text, finite.
bool parse_multiplier(const std::string& text, double& out) {
  if (text.empty()) return false;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size() || errno == ERANGE || !std::isfinite(v)) return false;
  out = v;
  return true;
}
}  // namespace

HypernetworkSpec parse_hypernetwork_arg(const std::string& arg) {
  HypernetworkSpec s;
  s.path = arg;
  const size_t colon = arg.find_last_of(':');
  if (colon != std::string::npos && !path_exists(arg)) {
    const std::string num = arg.substr(colon + 1);
    DMX_CHECK_ARG(parse_multiplier(num, s.multiplier),
                  "--hypernetwork needs FILE[:MULT] with MULT a finite number, got '", arg, "'");
    s.path = arg.substr(0, colon);
  }
  DMX_CHECK_ARG(!s.path.empty(), "--hypernetwork needs FILE[:MULT], got '", arg, "'");
  DMX_CHECK_ARG(std::fabs(s.multiplier) <= 100, "--hypernetwork multiplier must be in [-100, 100], got ", s.multiplier,
                " in '", arg, "'");
  s.name = file_stem(s.path);
  return s;
}

std::string extract_prompt_hypernetworks(const std::string& prompt, std::vector<HypernetworkSpec>& out) {
  static const std::string kOpen = "<hypernet:";
  std::string cleaned;
  size_t i = 0;
  while (i < prompt.size()) {
    const size_t lt = prompt.find(kOpen, i);
    const size_t gt = lt == std::string::npos ? std::string::npos : prompt.find('>', lt);
    if (gt == std::string::npos) break;
    cleaned += prompt.substr(i, lt - i);
    const std::string tag = prompt.substr(lt, gt - lt + 1);
    const std::vector<std::string> parts = split(prompt.substr(lt + kOpen.size(), gt - lt - kOpen.size()), ':');
    DMX_CHECK_ARG(!parts.empty() && !parts[0].empty(), "prompt: hypernetwork tag ", tag, " has no name");
    DMX_CHECK_ARG(parts.size() <= 2, "prompt: hypernetwork tag ", tag,
                  " must be <hypernet:NAME> or <hypernet:NAME:MULT>");
    HypernetworkSpec s;
    s.path = s.name = parts[0];
    if (parts.size() == 2)
      DMX_CHECK_ARG(parse_multiplier(parts[1], s.multiplier) && std::fabs(s.multiplier) <= 100,
                    "prompt: hypernetwork tag ", tag, ": multiplier '", parts[1], "' must be a number in [-100, 100]");
    out.push_back(s);
    i = gt + 1;
  }
  cleaned += prompt.substr(std::min(i, prompt.size()));
  return cleaned;
}

std::string resolve_hypernetwork_name(const std::string& dir, const std::string& name) {
  DMX_CHECK_ARG(!dir.empty(), "prompt: <hypernet:", name, ":...> needs --hypernetwork-dir (the folder holding ", name,
                ".pt)");
  DMX_CHECK_ARG(!name.empty() && name[0] != '/' && name.find('\\') == std::string::npos, "prompt: hypernetwork name '",
                name, "' must be a relative name inside --hypernetwork-dir (no absolute path)");
  for (const std::string& part : split(name, '/'))
    DMX_CHECK_ARG(part != ".." && part != ".", "prompt: hypernetwork name '", name,
                  "' must stay inside --hypernetwork-dir (no '.' or '..' components)");
  const std::string lower = to_lower_ascii(name);
  std::string path;
  if (ends_with(lower, ".pt") || ends_with(lower, ".safetensors")) {
    path = join_path(dir, name);
  } else {
    path = join_path(dir, name + ".pt");
    if (!path_exists(path)) path = join_path(dir, name + ".safetensors");
  }
  DMX_CHECK_ARG(path_exists(path) && !is_directory(path), "prompt: hypernetwork '", name, "' not found: no file ",
                join_path(dir, name), "(.pt|.safetensors)");
  char dir_real[PATH_MAX], file_real[PATH_MAX];
  DMX_CHECK_ARG(::realpath(dir.c_str(), dir_real) != nullptr, "--hypernetwork-dir: cannot resolve ", dir, ": ",
                std::strerror(errno));
  DMX_CHECK_ARG(::realpath(path.c_str(), file_real) != nullptr, "prompt: hypernetwork '", name, "': cannot resolve ",
                path, ": ", std::strerror(errno));
  const std::string d = dir_real, f = file_real;
  DMX_CHECK_ARG(f.size() > d.size() && f.compare(0, d.size(), d) == 0 && (d == "/" || f[d.size()] == '/'),
                "prompt: hypernetwork '", name, "' resolves to ", f, ", outside --hypernetwork-dir ", d,
                " (a symlink leads out)");
  return path;
}
}  // namespace dmx::loaders
