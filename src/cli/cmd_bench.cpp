// `dmx bench`: time text encoding, a denoising step and VAE decoding on random weights (docs/performance.md).
#include <cstdio>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/dmx.h"

namespace dmx::cli {

int cmd_bench(int argc, char** argv) {
  BenchOptions o;
  const std::optional<Args> a = parse_options(kBench, argc, argv, o);
  if (!a) return 0;  // --help
  const BenchResult r = bench(o);
  if (a->has("json"))
    std::printf("%s\n", bench_json(r).c_str());
  else
    std::printf("%s", bench_table(r).c_str());
  return 0;
}
}  // namespace dmx::cli
