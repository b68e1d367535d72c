// `dmx info IMAGE.png`: the generation parameters stored in a PNG.
#include <cstdio>

#include "cli/commands.h"
#include "dmx/dmx.h"

namespace dmx::cli {

int cmd_info(int argc, char** argv) {
  DMX_CHECK_ARG(argc == 3, "usage: dmx info IMAGE.png");
  // The text comes from a file: control characters are escaped, never sent to the terminal.
  std::printf("%s\n", terminal_safe(read_image_parameters(argv[2])).c_str());
  return 0;
}
}  // namespace dmx::cli
