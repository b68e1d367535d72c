// The CLI's subcommands, one file each (src/cli/cmd_<name>.cpp). Each returns the exit code and lets
// dmx errors propagate to main(), which maps them to exit codes.
#pragma once

namespace dmx::cli {
int cmd_data(int argc, char** argv);
}  // namespace dmx::cli
