// A1111's "Model hash": the first 10 hex digits of the SHA-256 of the checkpoint file (A1111's
// "sha256" short hash, as in its `Model hash:` field since 2023). A diffusers folder has no single
// checkpoint file: dmx hashes its UNet weights, unet/diffusion_pytorch_model.safetensors (or the
// fp16 variant when that is the only one), which is what tells two fine-tunes of a base apart.
#include "api/model_hash.h"
#include "core/fs.h"
#include "core/sha256.h"
#include "dmx/dmx.h"

namespace dmx {

std::string model_hash_file(const std::string& model) {
  if (!is_directory(model)) return model;
  for (const char* name : {"unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                           "unet/model.safetensors", "unet/model.fp16.safetensors"}) {
    const std::string p = join_path(model, name);
    if (path_exists(p)) return p;
  }
  return "";
}

std::string model_hash(const std::string& model, const std::atomic<bool>* cancel) {
  const std::string file = model_hash_file(model);
  if (file.empty()) return "";
  return sha256_file(file, cancel).substr(0, 10);
}

std::string model_hash(const std::string& model) { return model_hash(model, nullptr); }
BackgroundModelHash::BackgroundModelHash(std::string model) {
  result_ = std::async(std::launch::async, [path = std::move(model), this] {
    try {
      return model_hash(path, &cancel_);
    } catch (const Error&) {  // unreadable: the metadata goes without a hash
      return std::string();
    }
  });
}

BackgroundModelHash::~BackgroundModelHash() {
  cancel_ = true;
  if (result_.valid()) result_.wait();
}

std::string BackgroundModelHash::get() { return result_.valid() ? result_.get() : std::string(); }
}  // namespace dmx
