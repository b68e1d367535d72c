#include "core/atomic_dir.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include "core/fs.h"
#include "dmx/error.h"

namespace dmx {
namespace fs = std::filesystem;

void write_directory_atomic(const std::string& dir, const std::string& what,
                            const std::function<void(const std::string& tmp)>& fill) {
  std::string out = dir;
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  const std::string tmp = temp_path_for(out);
  ScopedTemporary registration(tmp, true);  // a signal removes it (and, after the swap, the old folder in it)
  std::error_code ec;
  fs::remove_all(tmp, ec);
  try {
    fs::create_directories(tmp);
    fill(tmp);
    // Swap the new folder in atomically, so that `out` is always either the old folder or the new one;
    // the old one is then at `tmp` and removed. Filesystems without RENAME_EXCHANGE: remove, then rename.
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, out.c_str(), RENAME_EXCHANGE) == 0) {
      fs::remove_all(tmp, ec);
      return;
    }
    if (errno != ENOENT) fs::remove_all(out);
    fs::rename(tmp, out);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw_write_error("writing " + what + " " + out, e.code().value());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}
}  // namespace dmx
