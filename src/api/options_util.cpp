#include "api/options_util.h"

#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <sstream>

#include "core/fs.h"
#include "dmx/error.h"
#include "loaders/model_bundle.h"

namespace dmx::api {

namespace fs = std::filesystem;

uint64_t resolve_seed(const std::optional<uint64_t>& seed) {
  if (seed) return *seed;
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32 | rd()) & 0xFFFFFFFFull;
}

void check_output_path(const std::string& path, const std::string& param, const std::string& ext) {
  DMX_CHECK_ARG(!path.empty(), param, ": no output path given");
  DMX_CHECK_ARG(path.size() > ext.size() && path.compare(path.size() - ext.size(), ext.size(), ext) == 0, param,
                " must end in ", ext, ", got '", path, "'");
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  DMX_CHECK_ARG(is_directory(dir), param, ": output directory does not exist: ", dir);
  DMX_CHECK_ARG(!is_directory(path), param, ": is a directory: ", path);
}

void add_model_inputs(OutputPlan& plan, const ModelOptions& m) {
  plan.input(m.model, "--model");
  plan.input(m.config_dir, "--config");
  plan.input(m.tokenizer_dir, "--tokenizer");
}

std::string with_suffix(const std::string& path, const std::string& suffix) {
  const size_t slash = path.find_last_of('/');
  const size_t dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return path + suffix;
  return path.substr(0, dot) + suffix + path.substr(dot);
}

std::vector<std::string> numbered_paths(const std::string& out, int n) {
  if (n == 1) return {out};
  std::vector<std::string> paths;
  for (int i = 0; i < n; ++i) paths.push_back(with_suffix(out, "-" + std::to_string(i)));
  return paths;
}

void check_device(const std::string& device) {
  DMX_CHECK_ARG(device == "cpu" || device.rfind("cuda", 0) == 0, "--device must be cpu or cuda[:N], got '", device,
                "'");
}

at::ScalarType parse_dtype(const std::string& s) {
  if (s == "fp32" || s == "float32") return at::kFloat;
  if (s == "bf16" || s == "bfloat16") return at::kBFloat16;
  if (s == "fp16" || s == "float16") return at::kHalf;
  throw InvalidArgument("--dtype must be one of fp32, bf16, fp16, got '" + s + "'");
}

at::ScalarType parse_dtype(const std::string& s, const std::string& device) {
  const at::ScalarType t = parse_dtype(s);
  loaders::check_dtype_device(t, device);
  return t;
}

std::string fmt_number(double v) {
  std::ostringstream os;
  os.precision(10);
  os << v;
  return os.str();
}

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c == '\n' ? ' ' : c;
  }
  return out + "\"";
}
}  // namespace dmx::api
