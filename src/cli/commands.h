// Sub-commands of the dmx tool, one file each (src/cli/cmd_<name>.cpp); main.cpp dispatches.
#pragma once

namespace dmx::cli {
int cmd_diffedit(int argc, char** argv);
}  // namespace dmx::cli
