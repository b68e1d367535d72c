// Command entry points that live in their own files (src/cli/cmd_<name>.cpp). Each takes main's argc/argv.
#pragma once

namespace dmx::cli {
// `dmx train controlnet [options]`: argv[1] == "train", argv[2] == "controlnet", options from argv[3].
int cmd_train_controlnet(int argc, char** argv);
}  // namespace dmx::cli
