// Tiny models for tests that need *a* model rather than the reference numbers (label `tiny`, docs/testing.md).
// Everything here comes from the repository, so these tests run in a clone without ../shared:
//  - tests/data/tiny-tokenizer: the 1000-token CLIP BPE the fixtures use (../shared/ref/tiny_bpe.py), a copy;
//  - tests/data/tiny-sd/<variant>: the configs of the fixtures' two tiny models, "sd15" (SD-1.x topology, tiny
//    widths) and "test" (the layout diffusers uses in its own fast tests);
//  - weights: seeded random, made by dmx::init_model (PyTorch's default initialisation for the UNet and the
//    VAE, transformers' for the text encoder): the fixtures' architectures, not their weights.
// Building or loading a model here marks the running test as a tiny-model user (a *Unit suite may not); the
// tokenizer and the configs are data, which unit tests may use.
#pragma once
#include <memory>
#include <string>

#include "loaders/model_bundle.h"
#include "models/clip_tokenizer.h"

namespace dmx::test {

std::string tiny_tokenizer_dir();  // tests/data/tiny-tokenizer
const models::CLIPTokenizer& tiny_tokenizer();
std::string tiny_config_dir(const std::string& variant);  // tests/data/tiny-sd/<variant>

// A diffusers folder (model_index.json, unet, vae, text_encoder, tokenizer, scheduler) with seeded random
// weights, written once per process under temp_dir(). The same variant and seed give the same bytes.
std::string tiny_model_dir(const std::string& variant = "test", uint64_t seed = 0);

// That folder loaded: a fresh copy on every call (tests may modify it).
std::shared_ptr<loaders::StableDiffusionModels> load_tiny_model(const std::string& variant = "test");
// Loaded once per process and shared: for tests that leave the model as they found it.
std::shared_ptr<loaders::StableDiffusionModels> shared_tiny_model(const std::string& variant = "test");

// A ControlNet folder (config.json + diffusion_pytorch_model.safetensors) for tiny_model_dir(variant): the
// UNet's encoder copied as training starts (training::init_controlnet), then every zero convolution (the
// residual projections and the hint encoder's last layer) drawn from N(0, 0.02^2) with `seed`, so that
// its residuals are not zero and tests can see what a ControlNet adds.
std::string tiny_controlnet_dir(const std::string& variant = "test", uint64_t seed = 1);
// The same ControlNet in the original single-file layout (control_model.* keys; training::save_controlnet_original).
std::string tiny_controlnet_file(const std::string& variant = "test", uint64_t seed = 1);

// A rank-4 LoRA file for tiny_model_dir(variant) on the UNet's attention and the text encoder's q/k/v/out, in
// `format` (diffusers | peft | kohya: training::LoRANetwork's layouts), with both factors drawn from a seeded
// normal distribution (so that it changes the model).
std::string tiny_lora_file(const std::string& variant = "test", const std::string& format = "diffusers",
                           uint64_t seed = 2);
}  // namespace dmx::test
