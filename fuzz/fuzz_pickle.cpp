// libFuzzer target for the weights-only torch.save loader (src/io/torch_pickle.cpp, src/io/zip_archive.cpp):
// the bytes as a file (zip archive or legacy stream, parse_torch_bytes), and the same bytes as one bare
// pickle stream (parse_bare_pickle, so that mutations reach the pickle machine without a zip around them,
// whose CRC would catch them). For inputs that load: the state dict, the flattened file and the JSON of the
// tree are built and every byte of every tensor is read; a file the buffer reader accepts is loaded again
// through the mmap path. Contract: malformed, refused or over-limit input throws dmx::FormatError
// (Unsupported for a big-endian file); anything else (another exception, a crash, a leak, UB, a hang, a
// tensor outside its storage) is a bug.
#include <unistd.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "dmx/error.h"
#include "io/torch_pickle.h"

namespace {
std::string temp_path() {
  static const std::string p = "/dev/shm/dmx-fuzz-pickle-" + std::to_string(::getpid()) + ".pt";
  return p;
}

void touch(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const auto* p = static_cast<const volatile uint8_t*>(c.data_ptr());
  const size_t n = c.numel() * c.element_size();
  uint8_t acc = 0;
  for (size_t i = 0; i < n; ++i) acc ^= p[i];  // ASan checks every byte lies in its allocation or mapping
  (void)acc;
}

// Everything a caller may do with a loaded file; FormatError is the only allowed failure.
void use(const dmx::io::TorchFile& f) {
  try {
    const dmx::io::FlatTorchFile flat = dmx::io::flatten_torch_file(f);
    for (const auto& kv : flat.tensors) touch(kv.second);
    (void)f.root().to_json().dump();
    if (f.root().is_dict()) (void)dmx::io::torch_state_dict(f);
  } catch (const dmx::FormatError&) {
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  bool file_ok = false;
  try {
    use(*dmx::io::parse_torch_bytes(data, size, "fuzz", nullptr));
    file_ok = true;
  } catch (const dmx::FormatError&) {
  } catch (const dmx::Unsupported&) {
  }
  try {
    use(*dmx::io::parse_bare_pickle(data, size, "fuzz"));
  } catch (const dmx::FormatError&) {
  }
  if (file_ok) {  // the mmap path (zero-copy storages) must accept what the buffer path accepted
    FILE* fp = std::fopen(temp_path().c_str(), "wb");
    if (!fp) return 0;
    if (size) std::fwrite(data, 1, size, fp);
    std::fclose(fp);
    try {
      use(*dmx::io::load_torch_file(temp_path()));
    } catch (const dmx::Error&) {
      std::abort();
    }
    std::remove(temp_path().c_str());
  }
  return 0;
}
