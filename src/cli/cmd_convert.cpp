// `dmx convert`: a model's weights stored in another dtype (include/dmx/convert.h).
#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/convert.h"
#include "dmx/error.h"

namespace dmx::cli {
int cmd_convert(int argc, char** argv) {
  Args a("convert", {
                        {"input", "PATH",
                         "diffusers / ControlNet folder, .safetensors file, or torch.save file (.ckpt .pt .pth "
                         ".bin, read without executing anything) (required)"},
                        {"output", "PATH", "where to write the converted copy (required)"},
                        {"dtype", "T", "fp16|bf16|fp32|keep (default fp16)"},
                        {"overwrite", "", "replace --output if it exists"},
                        {"quiet", "", "print nothing on success"},
                        {"verbose", "", "stack traces"},
                        {"help", "", "show this help"},
                    });
  a.parse(argc, argv, 2);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  ConvertOptions o;
  o.input = a.str("input");
  o.output = a.str("output");
  o.dtype = a.str("dtype", o.dtype);
  o.overwrite = a.has("overwrite");
  const ConvertReport r = convert_weights(o);
  if (!a.has("quiet")) {
    if (!r.source_format.empty())
      std::printf("wrote %s from a torch.save %s file: %lld tensors (%lld cast to %s), %d metadata entries, "
                  "%.1f MB -> %.1f MB\n",
                  o.output.c_str(), r.source_format.c_str(), static_cast<long long>(r.tensors_written),
                  static_cast<long long>(r.tensors), o.dtype.c_str(), r.metadata_entries, r.bytes_in / 1e6,
                  r.bytes_out / 1e6);
    else
      std::printf("wrote %s: %d files, %lld tensors cast to %s, %.1f MB -> %.1f MB\n", o.output.c_str(), r.files,
                  static_cast<long long>(r.tensors), o.dtype.c_str(), r.bytes_in / 1e6, r.bytes_out / 1e6);
  }
  return 0;
}
}  // namespace dmx::cli
