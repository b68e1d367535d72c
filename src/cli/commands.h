// Sub-commands defined in their own files (cmd_<name>.cpp).
#pragma once

namespace dmx::cli {
int cmd_train(int argc, char** argv);  // dmx train <lora|finetune|dreambooth|bench> [options]
// dmx train controlnet [options]: argv[1] == "train", argv[2] == "controlnet", options from argv[3].
int cmd_train_controlnet(int argc, char** argv);
}  // namespace dmx::cli
