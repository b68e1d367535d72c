// libFuzzer target for the safetensors reader (src/io/safetensors.cpp): the header parser on a
// buffer, then, for headers it accepts, SafeTensorsFile on the same bytes written to a file, with
// every tensor materialised. Contract: malformed input throws dmx::FormatError (or Unsupported for
// a dtype libtorch cannot hold); anything else (another exception, a crash, a leak, UB, an accepted
// header whose tensors fall outside the file) is a bug.
#include <unistd.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "dmx/error.h"
#include "io/safetensors.h"

namespace {
std::string temp_path() {
  static const std::string p = "/dev/shm/dmx-fuzz-safetensors-" + std::to_string(::getpid()) + ".safetensors";
  return p;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::map<std::string, dmx::io::TensorInfo> infos;
  std::map<std::string, std::string> metadata;
  uint64_t offset = 0;
  try {
    dmx::io::parse_safetensors(data, size, &infos, &metadata, &offset);
  } catch (const dmx::FormatError&) {
    return 0;
  }
  if (offset > size) std::abort();
  for (const auto& kv : infos)
    if (kv.second.begin > kv.second.end || kv.second.end > size - offset) std::abort();

  // The same bytes through the mmap path.
  FILE* f = std::fopen(temp_path().c_str(), "wb");
  if (!f) return 0;
  if (size) std::fwrite(data, 1, size, f);
  std::fclose(f);
  try {
    auto file = dmx::io::SafeTensorsFile::open(temp_path());
    for (const auto& name : file->names()) {
      try {
        at::Tensor t = file->get(name);
        const auto* p = static_cast<const volatile uint8_t*>(t.data_ptr());
        const size_t n = t.numel() * t.element_size();
        uint8_t acc = 0;
        for (size_t i = 0; i < n; ++i) acc ^= p[i];  // touch every byte (ASan checks the mapping)
        (void)acc;
      } catch (const dmx::Unsupported&) {
      }
    }
  } catch (const dmx::FormatError&) {
    std::abort();  // the buffer parser accepted these bytes: the file reader must too
  }
  std::remove(temp_path().c_str());
  return 0;
}
