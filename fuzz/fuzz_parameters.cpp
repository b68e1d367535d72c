// libFuzzer target for the A1111 "parameters" parser (src/api/metadata.cpp) behind `dmx generate
// --from IMAGE`: the text comes from any PNG. Contract: unparsable text throws dmx::InvalidArgument;
// text that parses formats and parses again. Anything else (another exception, a crash, UB such as
// an out-of-range float-to-int cast) is a finding.
#include <cstdint>
#include <string>

#include "dmx/dmx.h"

// metadata.cpp takes the version string from generate.cpp, which would pull the whole engine into
// this target; the harness supplies it instead.
namespace dmx {
std::string version() { return "fuzz"; }
}  // namespace dmx

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    dmx::GenerateOptions o = dmx::parse_parameters(text);
    const std::string again = dmx::format_parameters(o, o.seed.value_or(0), o.width, o.height, "m", "0123456789");
    dmx::parse_parameters(again);
  } catch (const dmx::InvalidArgument&) {
  }
  return 0;
}
