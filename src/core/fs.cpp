#include "core/fs.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "dmx/error.h"

namespace dmx {

bool path_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string read_text_file(const std::string& path, const std::string& what) {
  DMX_CHECK_IO(path_exists(path), what, ": file not found: ", path);
  DMX_CHECK_IO(!is_directory(path), what, ": expected a file, got a directory: ", path);
  std::ifstream in(path, std::ios::binary);
  DMX_CHECK_IO(in.good(), what, ": cannot open ", path, ": ", std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string join_path(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (a.back() == '/') return a + b;
  return a + "/" + b;
}

std::string file_stem(const std::string& path) {
  size_t slash = path.find_last_of('/');
  std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  size_t dot = name.find_last_of('.');
  return dot == std::string::npos ? name : name.substr(0, dot);
}

void write_file_atomic(const std::string& path, const std::function<void(const std::string&)>& write) {
  std::string dir = ".";
  size_t slash = path.find_last_of('/');
  if (slash != std::string::npos) dir = slash == 0 ? "/" : path.substr(0, slash);
  DMX_CHECK_IO(is_directory(dir), "output directory does not exist: ", dir, " (for ", path, ")");
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  try {
    write(tmp);
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    std::remove(tmp.c_str());
    throw IoError(detail::concat("cannot write ", path, ": ", std::strerror(err)));
  }
}

void write_bytes_atomic(const std::string& path, const void* data, size_t size) {
  write_file_atomic(path, [&](const std::string& tmp) {
    FILE* f = std::fopen(tmp.c_str(), "wb");
    DMX_CHECK_IO(f != nullptr, "cannot open ", tmp, " for writing: ", std::strerror(errno));
    size_t n = size ? std::fwrite(data, 1, size, f) : 0;
    bool ok = n == size && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
    ok = (std::fclose(f) == 0) && ok;
    DMX_CHECK_IO(ok, "cannot write ", tmp, ": ", std::strerror(errno));
  });
}
}  // namespace dmx
