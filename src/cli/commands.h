// The CLI's commands, each in its own file (src/cli/cmd_<name>.cpp; the emoji module's in
// src/emoji/cli/). Each returns the exit code and lets dmx errors propagate to main(), which maps them to exit
// codes.
#pragma once

namespace dmx::cli {
int cmd_generate(int argc, char** argv);    // text-to-image, img2img, blended editing, LoRA, ControlNet
int cmd_bench(int argc, char** argv);       // dmx bench: timings on random weights
int cmd_info(int argc, char** argv);        // dmx info IMAGE.png: the stored generation parameters
int cmd_data(int argc, char** argv);        // dmx data <emoji|tokenizer>
int cmd_p2p(int argc, char** argv);         // Prompt-to-Prompt editing
int cmd_diffedit(int argc, char** argv);    // DiffEdit
int cmd_variations(int argc, char** argv);  // Stable unCLIP image variations
int cmd_embed(int argc, char** argv);       // CLIP embeddings and cosine similarities
int cmd_upscale(int argc, char** argv);     // the x4 upscaler
int cmd_restore(int argc, char** argv);     // Palette restoration (colorize, inpaint, uncrop, jpeg)
int cmd_train(int argc, char** argv);       // dmx train <lora|finetune|dreambooth|controlnet|vae|palette|bench>
int cmd_init(int argc, char** argv);        // dmx init: fresh weights from configs
int cmd_convert(int argc, char** argv);     // dmx convert: weights stored in another dtype
int cmd_serve(int argc, char** argv);       // dmx serve: the A1111-compatible HTTP server (src/serve/)
// The emoji module's commands (src/emoji/cli/).
int cmd_data_emoji(int argc, char** argv);        // dmx data emoji
int cmd_data_scenes(int argc, char** argv);       // dmx data scenes
int cmd_train_classifier(int argc, char** argv);  // dmx train classifier (the emoji classifier)
int cmd_eval(int argc, char** argv);              // dmx eval
}  // namespace dmx::cli
