// `dmx convert`: a model's weights stored in another dtype (include/dmx/convert.h).
#include <cstdio>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/convert.h"
#include "dmx/error.h"

namespace dmx::cli {
int cmd_convert(int argc, char** argv) {
  ConvertOptions o;
  const std::optional<Args> a = parse_options(kConvert, argc, argv, o);
  if (!a) return 0;  // --help
  const ConvertReport r = convert_weights(o);
  if (!a->has("quiet")) {
    if (!r.source_format.empty())
      std::printf(
          "wrote %s from a torch.save %s file: %lld tensors (%lld cast to %s), %d metadata entries, "
          "%.1f MB -> %.1f MB\n",
          o.output.c_str(), r.source_format.c_str(), static_cast<long long>(r.tensors_written),
          static_cast<long long>(r.tensors), o.dtype.c_str(), r.metadata_entries, r.bytes_in / 1e6, r.bytes_out / 1e6);
    else
      std::printf("wrote %s: %d files, %lld tensors cast to %s, %.1f MB -> %.1f MB\n", o.output.c_str(), r.files,
                  static_cast<long long>(r.tensors), o.dtype.c_str(), r.bytes_in / 1e6, r.bytes_out / 1e6);
  }
  return 0;
}
}  // namespace dmx::cli
