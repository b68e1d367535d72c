#include "core/memory.h"

#include <cstdlib>
#include <fstream>
#include <string>

namespace dmx {
namespace {
int64_t status_kib(const std::string& key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.compare(0, key.size(), key) == 0) return std::strtoll(line.c_str() + key.size(), nullptr, 10);
  return 0;
}
}  // namespace

int64_t process_rss_bytes() { return status_kib("VmRSS:") * 1024; }
int64_t process_peak_rss_bytes() { return status_kib("VmHWM:") * 1024; }
}  // namespace dmx
