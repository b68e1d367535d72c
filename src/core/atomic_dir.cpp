#include "core/atomic_dir.h"

#include <unistd.h>

#include <filesystem>

#include "dmx/error.h"

namespace dmx {
namespace fs = std::filesystem;

void write_directory_atomic(const std::string& dir, const std::string& what,
                            const std::function<void(const std::string& tmp)>& fill) {
  std::string out = dir;
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  const std::string tmp = out + ".tmp." + std::to_string(getpid());
  std::error_code ec;
  fs::remove_all(tmp, ec);
  try {
    fs::create_directories(tmp);
    fill(tmp);
    fs::remove_all(out, ec);
    fs::rename(tmp, out);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw IoError("writing " + what + " " + out + ": " + e.what());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}
}  // namespace dmx
