// Sub-commands defined in their own files (cmd_<name>.cpp).
#pragma once

namespace dmx::cli {
int cmd_train(int argc, char** argv);  // dmx train <lora|finetune|dreambooth|bench> [options]
}  // namespace dmx::cli
