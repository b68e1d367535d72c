// `dmx convert` (include/dmx/convert.h).
#include "dmx/convert.h"

#include <unistd.h>

#include <cctype>
#include <filesystem>

#include "api/options_util.h"
#include "core/atomic_dir.h"
#include "core/fs.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "io/torch_pickle.h"

namespace dmx {
namespace fs = std::filesystem;
namespace {
bool is_safetensors(const fs::path& p) { return p.extension() == ".safetensors"; }

bool is_pickle_name(const fs::path& p) {
  std::string e = p.extension().string();
  for (char& c : e) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return e == ".ckpt" || e == ".pt" || e == ".pth" || e == ".bin";
}

// dt == Undefined keeps every dtype. A finite value the target type cannot hold would become Inf (fp16 tops
// out at 65504): refused, naming the tensor, instead of a file that draws black pictures.
void cast_floats(io::TensorMap* t, at::ScalarType dt, const std::string& dtype_name, const std::string& in,
                 ConvertReport* r) {
  for (auto& [k, v] : *t)
    if (dt != at::ScalarType::Undefined && at::isFloatingType(v.scalar_type()) && v.scalar_type() != dt) {
      at::Tensor cast = v.to(dt);
      const at::Tensor lost = at::logical_and(at::isfinite(v), at::logical_not(at::isfinite(cast)));
      if (lost.any().item<bool>()) {
        const double worst = v.masked_select(lost).abs().max().item<double>();
        throw InvalidArgument(detail::concat("--dtype ", dtype_name, ": tensor '", k, "' of ", in, " holds ",
                                             lost.sum().item<int64_t>(), " value(s) beyond ", dtype_name,
                                             "'s range (largest magnitude ", worst, ", the most ", dtype_name,
                                             " can hold is ", dt == at::kHalf ? "65504" : "about 3.4e38",
                                             "); they would become Inf: keep fp32 or use bf16"));
      }
      v = cast;
      ++r->tensors;
    }
}

void convert_file(const std::string& in, const std::string& out, at::ScalarType dt, const std::string& dtype_name,
                  ConvertReport* r) {
  auto f = io::SafeTensorsFile::open(in);
  io::TensorMap t = f->load_all();
  cast_floats(&t, dt, dtype_name, in, r);
  io::save_safetensors(out, t, f->metadata());
  ++r->files;
  r->tensors_written += static_cast<int64_t>(t.size());
  r->bytes_in += fs::file_size(in);
  r->bytes_out += fs::file_size(out);
}

// A torch.save pickle through the weights-only loader: the state dict's tensors under their names, other
// tensors under their full path, every other value as JSON text in the metadata.
void convert_pickle(const std::string& in, const std::string& out, at::ScalarType dt, const std::string& dtype_name,
                    ConvertReport* r) {
  auto file = io::load_torch_file(in);
  io::FlatTorchFile flat = io::flatten_torch_file(*file);
  DMX_CHECK_FORMAT(!flat.tensors.empty(), in, ": the file holds no tensors (nothing to convert)");
  size_t meta_bytes = 0;
  for (const auto& [k, v] : flat.metadata) meta_bytes += k.size() + v.size();
  DMX_CHECK_FORMAT(meta_bytes <= (16u << 20), in, ": its non-tensor values take ", meta_bytes,
                   " bytes as JSON, more than the 16 MiB a safetensors header should carry");
  cast_floats(&flat.tensors, dt, dtype_name, in, r);
  io::save_safetensors(out, flat.tensors, flat.metadata);
  r->source_format = file->format();
  ++r->files;
  r->tensors_written += static_cast<int64_t>(flat.tensors.size());
  r->metadata_entries += static_cast<int>(flat.metadata.size());
  r->bytes_in += fs::file_size(in);
  r->bytes_out += fs::file_size(out);
}
}  // namespace

ConvertReport convert_weights(const ConvertOptions& o) {
  DMX_CHECK_ARG(!o.input.empty(),
                "--input is required (a model folder, a .safetensors file or a torch.save "
                "file: .ckpt, .pt, .pth, .bin)");
  DMX_CHECK_ARG(!o.output.empty(), "--output is required");
  DMX_CHECK_ARG(path_exists(o.input), "--input: path not found: '", o.input, "'");
  at::ScalarType dt;
  if (o.dtype == "fp16")
    dt = at::kHalf;
  else if (o.dtype == "bf16")
    dt = at::kBFloat16;
  else if (o.dtype == "fp32")
    dt = at::kFloat;
  else if (o.dtype == "keep")
    dt = at::ScalarType::Undefined;
  else
    throw InvalidArgument("--dtype must be fp16, bf16, fp32 or keep, got '" + o.dtype + "'");
  const bool folder_in = is_directory(o.input);
  const bool pickle_in =
      !folder_in && !is_safetensors(o.input) && (is_pickle_name(o.input) || io::looks_like_torch_file(o.input));
  if (!folder_in && !is_safetensors(o.input) && !pickle_in)
    throw InvalidArgument(
        detail::concat("--input must be a folder, a .safetensors file or a torch.save file "
                       "(.ckpt, .pt, .pth, .bin), got '",
                       o.input, "'"));
  if (pickle_in)
    DMX_CHECK_ARG(is_safetensors(o.output),
                  "--output must name a .safetensors file when --input is a torch.save "
                  "file, got '",
                  o.output, "'");
  {
    // A file becomes a file, a folder a folder of the same kind; never over or inside the input.
    api::OutputPlan plan(o.overwrite);
    plan.input(o.input, "--input");
    std::string out = o.output;
    while (out.size() > 1 && out.back() == '/') out.pop_back();
    if (folder_in)
      plan.folder(out, "--output", {"model_index.json", "config.json"}, "model folder");
    else
      plan.file(out, "--output", ".safetensors");
    plan.prepare();
  }
  ConvertReport r;
  if (!folder_in) {  // save_safetensors writes atomically
    if (pickle_in)
      convert_pickle(o.input, o.output, dt, o.dtype, &r);
    else
      convert_file(o.input, o.output, dt, o.dtype, &r);
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
        throw InvalidArgument(
            detail::concat("--input: ", it->path().string(),
                           " is not a regular file or folder (a device, FIFO, socket or broken link)"));
    }
  });
  return r;
}
}  // namespace dmx
