#include "core/fs.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <algorithm>

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

std::string format_byte_limit(uint64_t bytes) {
  if (bytes >= (1ull << 30) && bytes % (1ull << 30) == 0) return std::to_string(bytes >> 30) + " GiB";
  if (bytes >= (1ull << 20) && bytes % (1ull << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  if (bytes >= (1ull << 10) && bytes % (1ull << 10) == 0) return std::to_string(bytes >> 10) + " KiB";
  return std::to_string(bytes) + " bytes";
}

std::string format_size(double bytes) {
  char buf[32];
  if (bytes >= 1e12)
    std::snprintf(buf, sizeof(buf), "%.1f TB", bytes / 1e12);
  else if (bytes >= 1e9)
    std::snprintf(buf, sizeof(buf), "%.1f GB", bytes / 1e9);
  else if (bytes >= 1e6)
    std::snprintf(buf, sizeof(buf), "%.1f MB", bytes / 1e6);
  else
    std::snprintf(buf, sizeof(buf), "%.0f kB", bytes / 1e3);
  return buf;
}

int open_regular_file(const std::string& path, const std::string& what, uint64_t* size) {
  DMX_CHECK_ARG(!path.empty(), what, ": no file given (empty path)");
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    throw InvalidArgument(detail::concat(what, ": ", err == ENOENT ? "file not found" : std::strerror(err), ": ", path));
  }
  auto kind = [](mode_t m) {
    return S_ISDIR(m) ? "a directory" : S_ISFIFO(m) ? "a FIFO" : S_ISCHR(m) ? "a character device"
           : S_ISBLK(m) ? "a block device" : S_ISSOCK(m) ? "a socket" : "not a regular file";
  };
  DMX_CHECK_ARG(S_ISREG(st.st_mode), what, ": expected a regular file, got ", kind(st.st_mode), ": ", path);
  // O_NONBLOCK: should the path be swapped for a FIFO after the stat, open must not wait for a writer.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    throw InvalidArgument(detail::concat(what, ": cannot open ", path, ": ", std::strerror(err)));
  }
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InvalidArgument(detail::concat(what, ": expected a regular file, got ", kind(st.st_mode), ": ", path));
  }
  if (size) *size = static_cast<uint64_t>(st.st_size);
  return fd;
}

std::string read_text_file(const std::string& path, const std::string& what, uint64_t max_bytes) {
  uint64_t size = 0;
  const int fd = open_regular_file(path, what, &size);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  DMX_CHECK_ARG(size <= max_bytes, what, ": ", path, " is ", size, " bytes, more than the ", format_byte_limit(max_bytes),
                " limit for this file");
  std::string out;
  out.resize(static_cast<size_t>(size));
  size_t got = 0;
  // The file may grow while it is read: never read past the limit (one byte more tells that it grew).
  while (true) {
    if (got == out.size()) {
      if (out.size() > max_bytes) break;
      out.resize(std::min<uint64_t>(max_bytes + 1, out.size() + 65536));
    }
    const ssize_t n = ::read(fd, &out[got], out.size() - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw IoError(detail::concat(what, ": cannot read ", path, ": ", std::strerror(errno)));
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  DMX_CHECK_ARG(got <= max_bytes, what, ": ", path, " grew past the ", format_byte_limit(max_bytes),
                " limit for this file while it was read");
  out.resize(got);
  return out;
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
  DMX_CHECK_ARG(is_directory(dir), "output directory does not exist: ", dir, " (for ", path, ")");
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
