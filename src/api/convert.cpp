// `dmx convert` (include/dmx/convert.h).
#include "dmx/convert.h"

#include <unistd.h>

#include <filesystem>

#include "api/options_util.h"
#include "core/atomic_dir.h"
#include "core/fs.h"
#include "dmx/error.h"
#include "io/safetensors.h"

namespace dmx {
namespace fs = std::filesystem;
namespace {
bool is_safetensors(const fs::path& p) { return p.extension() == ".safetensors"; }

void convert_file(const std::string& in, const std::string& out, at::ScalarType dt, ConvertReport* r) {
  auto f = io::SafeTensorsFile::open(in);
  io::TensorMap t = f->load_all();
  for (auto& [k, v] : t)
    if (at::isFloatingType(v.scalar_type()) && v.scalar_type() != dt) {
      v = v.to(dt);
      ++r->tensors;
    }
  io::save_safetensors(out, t, f->metadata());
  ++r->files;
  r->bytes_in += fs::file_size(in);
  r->bytes_out += fs::file_size(out);
}
}  // namespace

ConvertReport convert_weights(const ConvertOptions& o) {
  DMX_CHECK_ARG(!o.input.empty(), "--input is required (a model folder or a .safetensors file)");
  DMX_CHECK_ARG(!o.output.empty(), "--output is required");
  DMX_CHECK_ARG(path_exists(o.input), "--input: path not found: '", o.input, "'");
  at::ScalarType dt;
  if (o.dtype == "fp16")
    dt = at::kHalf;
  else if (o.dtype == "bf16")
    dt = at::kBFloat16;
  else if (o.dtype == "fp32")
    dt = at::kFloat;
  else
    throw InvalidArgument("--dtype must be fp16, bf16 or fp32, got '" + o.dtype + "'");
  {
    // A file becomes a file, a folder a folder of the same kind; never over or inside the input.
    api::OutputPlan plan(o.overwrite);
    plan.input(o.input, "--input");
    std::string out = o.output;
    while (out.size() > 1 && out.back() == '/') out.pop_back();
    if (is_directory(o.input))
      plan.folder(out, "--output", {"model_index.json", "config.json"}, "model folder");
    else
      plan.file(out, "--output", ".safetensors");
    plan.prepare();
  }
  ConvertReport r;
  if (!is_directory(o.input)) {
    DMX_CHECK_ARG(is_safetensors(o.input), "--input must be a folder or a .safetensors file, got '", o.input, "'");
    convert_file(o.input, o.output, dt, &r);  // save_safetensors writes atomically
    return r;
  }
  write_directory_atomic(o.output, "the converted model", [&](const std::string& tmp) {
    const fs::path src(o.input);
    for (auto it = fs::recursive_directory_iterator(src); it != fs::recursive_directory_iterator(); ++it) {
      const fs::path rel = fs::relative(it->path(), src);
      const fs::path dst = fs::path(tmp) / rel;
      if (it->is_directory())
        fs::create_directories(dst);
      else if (is_safetensors(it->path()))
        convert_file(it->path().string(), dst.string(), dt, &r);
      else
        fs::copy_file(it->path(), dst, fs::copy_options::overwrite_existing);
    }
  });
  return r;
}
}  // namespace dmx
