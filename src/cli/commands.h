// Commands of the dmx CLI that live in their own files (src/cli/cmd_<name>.cpp).
#pragma once

namespace dmx::cli {
int cmd_p2p(int argc, char** argv);  // Prompt-to-Prompt editing
}  // namespace dmx::cli
