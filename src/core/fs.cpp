#include "core/fs.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
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

namespace {
// Temporaries being written, visible to the signal handler: fixed slots of plain chars, claimed
// and released with atomics (no allocation, no locks: async-signal-safe).
constexpr int kTempSlots = 16;
constexpr size_t kTempPathMax = 4096;
char g_temp_paths[kTempSlots][kTempPathMax];
std::atomic<int> g_temp_state[kTempSlots];  // 0 free, 1 claimed (being filled), 2 live

int register_temp(const std::string& tmp) {
  if (tmp.size() >= kTempPathMax) return -1;
  for (int i = 0; i < kTempSlots; ++i) {
    int expected = 0;
    if (g_temp_state[i].compare_exchange_strong(expected, 1)) {
      std::memcpy(g_temp_paths[i], tmp.c_str(), tmp.size() + 1);
      g_temp_state[i].store(2);
      return i;
    }
  }
  return -1;
}

void unregister_temp(int slot) {
  if (slot >= 0) g_temp_state[slot].store(0);
}

extern "C" void dmx_temp_cleanup_handler(int sig) {
  for (int i = 0; i < kTempSlots; ++i)
    if (g_temp_state[i].load() == 2) ::unlink(g_temp_paths[i]);
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

struct TempRegistration {
  int slot;
  explicit TempRegistration(const std::string& tmp) : slot(register_temp(tmp)) {}
  ~TempRegistration() { unregister_temp(slot); }
};
}  // namespace

void install_temp_file_cleanup() {
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_handler = dmx_temp_cleanup_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    ::sigaction(sig, &sa, nullptr);
  }
}

void write_file_atomic(const std::string& path, const std::function<void(const std::string&)>& write) {
  std::string dir = ".";
  size_t slash = path.find_last_of('/');
  if (slash != std::string::npos) dir = slash == 0 ? "/" : path.substr(0, slash);
  DMX_CHECK_IO(is_directory(dir), "output directory does not exist: ", dir, " (for ", path, ")");
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  TempRegistration registration(tmp);
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
