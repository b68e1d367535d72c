// `dmx convert` (include/dmx/convert.h).
#include "dmx/convert.h"

#include <unistd.h>

#include <filesystem>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "dmx/error.h"
#include "io/safetensors.h"

namespace dmx {
namespace fs = std::filesystem;
namespace {
bool is_safetensors(const fs::path& p) { return p.extension() == ".safetensors"; }

void convert_file(const std::string& in, const std::string& out, at::ScalarType dt, const std::string& dtype_name,
                  ConvertReport* r) {
  auto f = io::SafeTensorsFile::open(in);
  io::TensorMap t = f->load_all();
  for (auto& [k, v] : t)
    if (at::isFloatingType(v.scalar_type()) && v.scalar_type() != dt) {
      at::Tensor cast = v.to(dt);
      // A finite value the target type cannot hold would become Inf (fp16 tops out at 65504): refused,
      // naming the tensor, instead of a file that draws black pictures.
      const at::Tensor lost = at::logical_and(at::isfinite(v), at::logical_not(at::isfinite(cast)));
      if (lost.any().item<bool>()) {
        const double worst = v.masked_select(lost).abs().max().item<double>();
        throw InvalidArgument(detail::concat("--dtype ", dtype_name, ": tensor '", k, "' of ", in, " holds ",
                                             lost.sum().item<int64_t>(), " value(s) beyond ", dtype_name,
                                             "'s range (largest magnitude ", worst, ", the most ", dtype_name,
                                             " can hold is ", at::isFloatingType(dt) && dt == at::kHalf ? "65504" : "about 3.4e38",
                                             "); they would become Inf: keep fp32 or use bf16"));
      }
      v = cast;
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
  DMX_CHECK_ARG(o.overwrite || !path_exists(o.output), "--output '", o.output,
                "' already exists (choose a new path or pass --overwrite)");
  at::ScalarType dt;
  if (o.dtype == "fp16")
    dt = at::kHalf;
  else if (o.dtype == "bf16")
    dt = at::kBFloat16;
  else if (o.dtype == "fp32")
    dt = at::kFloat;
  else
    throw InvalidArgument("--dtype must be fp16, bf16 or fp32, got '" + o.dtype + "'");
  ConvertReport r;
  if (!is_directory(o.input)) {
    DMX_CHECK_ARG(is_safetensors(o.input), "--input must be a folder or a .safetensors file, got '", o.input, "'");
    convert_file(o.input, o.output, dt, o.dtype, &r);  // save_safetensors writes atomically
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
        convert_file(it->path().string(), dst.string(), dt, o.dtype, &r);
      else if (it->is_regular_file())  // follows symlinks: a link to a regular file is copied as that file
        fs::copy_file(it->path(), dst, fs::copy_options::overwrite_existing);
      else  // a device, FIFO or socket (or a link to one) would be read forever or block
        throw InvalidArgument(detail::concat("--input: ", it->path().string(),
                                             " is not a regular file or folder (a device, FIFO, socket or broken link)"));
    }
  });
  return r;
}
}  // namespace dmx
