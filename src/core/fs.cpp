#include "core/fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
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
    throw InvalidArgument(
        detail::concat(what, ": ", err == ENOENT ? "file not found" : std::strerror(err), ": ", path));
  }
  auto kind = [](mode_t m) {
    return S_ISDIR(m)    ? "a directory"
           : S_ISFIFO(m) ? "a FIFO"
           : S_ISCHR(m)  ? "a character device"
           : S_ISBLK(m)  ? "a block device"
           : S_ISSOCK(m) ? "a socket"
                         : "not a regular file";
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
  DMX_CHECK_ARG(size <= max_bytes, what, ": ", path, " is ", size, " bytes, more than the ",
                format_byte_limit(max_bytes), " limit for this file");
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

std::string temp_path_for(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p + ".tmp." + std::to_string(::getpid());
}

void throw_write_error(const std::string& what, int err) {
  const std::string msg = what + ": " + std::strerror(err ? err : EIO);
  if (err == ENOSPC || err == EDQUOT || err == EFBIG || err == EIO || err == 0) throw SystemError(msg);
  throw IoError(msg);
}

namespace {
// Temporaries being written, visible to the signal handler: fixed slots of plain chars, claimed
// and released with atomics (no allocation, no locks: async-signal-safe).
constexpr int kTempSlots = 256;
constexpr size_t kTempPathMax = 4096;
char g_temp_paths[kTempSlots][kTempPathMax];
bool g_temp_is_dir[kTempSlots];
std::atomic<int> g_temp_state[kTempSlots];  // 0 free, 1 claimed (being filled), 2 live

int register_temp(const std::string& tmp, bool directory) {
  if (tmp.size() >= kTempPathMax) return -1;
  for (int i = 0; i < kTempSlots; ++i) {
    int expected = 0;
    if (g_temp_state[i].compare_exchange_strong(expected, 1)) {
      std::memcpy(g_temp_paths[i], tmp.c_str(), tmp.size() + 1);
      g_temp_is_dir[i] = directory;
      g_temp_state[i].store(2);
      return i;
    }
  }
  return -1;
}

void unregister_temp(int slot) {
  if (slot >= 0) g_temp_state[slot].store(0);
}

// Removes a file or a folder tree with async-signal-safe calls only (openat, getdents64, unlinkat, close).
// Entries are deleted while the folder is read, and another thread may still add one: the folder is
// re-read until it can be removed (a few rounds at most).
void remove_tree_signal_safe(int dirfd, const char* name, int depth) {
  if (::unlinkat(dirfd, name, 0) == 0 || errno == ENOENT) return;
  if (depth > 16) return;
  for (int round = 0; round < 8; ++round) {
    const int fd = ::openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return;
    alignas(8) char buf[2048];
    for (;;) {
      const long n = ::syscall(SYS_getdents64, fd, buf, sizeof buf);
      if (n <= 0) break;
      for (long off = 0; off < n;) {
        const auto* d = reinterpret_cast<const struct dirent64*>(buf + off);
        off += d->d_reclen;
        const char* child = d->d_name;
        if (child[0] == '.' && (child[1] == '\0' || (child[1] == '.' && child[2] == '\0'))) continue;
        remove_tree_signal_safe(fd, child, depth + 1);
      }
    }
    ::close(fd);
    if (::unlinkat(dirfd, name, AT_REMOVEDIR) == 0 || errno == ENOENT) return;
    if (errno != ENOTEMPTY && errno != EEXIST) return;
  }
}

extern "C" void dmx_temp_cleanup_handler(int sig) {
  const int saved = errno;
  for (int i = 0; i < kTempSlots; ++i) {
    if (g_temp_state[i].load() != 2) continue;
    if (g_temp_is_dir[i])
      remove_tree_signal_safe(AT_FDCWD, g_temp_paths[i], 0);
    else
      ::unlink(g_temp_paths[i]);
  }
  errno = saved;
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

// Writes bytes to a new file `tmp` (for the final `path`), flushed to the disk.
void write_new_file(const std::string& tmp, const std::string& path, const void* data, size_t size) {
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) throw_write_error("cannot create " + tmp + " (for " + path + ")", errno);
  int err = 0;
  if (size && std::fwrite(data, 1, size, f) != size) err = errno ? errno : EIO;
  if (!err && std::fflush(f) != 0) err = errno ? errno : EIO;
  if (!err && ::fsync(fileno(f)) != 0) err = errno ? errno : EIO;
  if (std::fclose(f) != 0 && !err) err = errno ? errno : EIO;
  if (err) throw_write_error("cannot write " + path, err);
}

std::string parent_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}
}  // namespace

ScopedTemporary::ScopedTemporary(const std::string& path, bool directory) : slot_(register_temp(path, directory)) {}
ScopedTemporary::~ScopedTemporary() { unregister_temp(slot_); }

void install_temp_file_cleanup() {
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_handler = dmx_temp_cleanup_handler;
    sigemptyset(&sa.sa_mask);  // one cleanup at a time: the other signals wait until the process ends
    for (int other : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&sa.sa_mask, other);
    sa.sa_flags = SA_RESETHAND;
    ::sigaction(sig, &sa, nullptr);
  }
  ::signal(SIGXFSZ, SIG_IGN);  // past `ulimit -f` a write fails with EFBIG and is cleaned up like a full disk
}

void write_file_atomic(const std::string& path, const std::function<void(const std::string&)>& write) {
  const std::string dir = parent_of(path);
  DMX_CHECK_ARG(is_directory(dir), "output directory does not exist: ", dir, " (for ", path, ")");
  const std::string tmp = temp_path_for(path);
  ScopedTemporary registration(tmp, false);
  try {
    write(tmp);
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    std::remove(tmp.c_str());
    throw_write_error("cannot write " + path, err);
  }
}

void write_bytes_atomic(const std::string& path, const void* data, size_t size) {
  write_file_atomic(path, [&](const std::string& tmp) { write_new_file(tmp, path, data, size); });
}

void write_files_atomic(const std::vector<PendingFile>& files) {
  std::vector<std::unique_ptr<ScopedTemporary>> registrations;
  std::vector<std::string> temporaries;  // written, not yet renamed
  std::vector<std::string> renamed;      // final paths already in place
  try {
    for (const auto& f : files) {
      const std::string dir = parent_of(f.path);
      DMX_CHECK_ARG(is_directory(dir), "output directory does not exist: ", dir, " (for ", f.path, ")");
      const std::string tmp = temp_path_for(f.path);
      registrations.push_back(std::make_unique<ScopedTemporary>(tmp, false));
      temporaries.push_back(tmp);
      write_new_file(tmp, f.path, f.bytes.data(), f.bytes.size());
    }
    // Until the last rename, a signal removes the files already renamed as well: all or nothing.
    for (size_t i = 0; i < files.size(); ++i) {
      registrations.push_back(std::make_unique<ScopedTemporary>(files[i].path, false));
      if (std::rename(temporaries[i].c_str(), files[i].path.c_str()) != 0)
        throw_write_error("cannot write " + files[i].path, errno);
      renamed.push_back(files[i].path);
      temporaries[i].clear();
    }
  } catch (...) {
    for (const auto& t : temporaries)
      if (!t.empty()) std::remove(t.c_str());
    for (const auto& r : renamed) std::remove(r.c_str());
    throw;
  }
}

std::vector<std::string> remove_stale_temporaries(const std::string& dir,
                                                  const std::function<bool(const std::string& name)>& ours) {
  std::vector<std::string> removed;
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d)) names.emplace_back(e->d_name);
    ::closedir(d);
  }
  for (const auto& name : names) {
    const size_t pos = name.rfind(".tmp.");
    if (pos == std::string::npos || pos == 0) continue;
    const std::string digits = name.substr(pos + 5);
    if (digits.empty() || digits.size() > 10 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    const long long pid = std::stoll(digits);
    if (pid <= 0 || pid > INT_MAX || pid == ::getpid()) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive (or not ours to judge)
    if (!ours(name.substr(0, pos))) continue;
    std::error_code ec;
    const std::string path = join_path(dir, name);
    std::filesystem::remove_all(path, ec);
    if (!ec) removed.push_back(path);
  }
  return removed;
}

PathIdentity identify_path(const std::string& path, bool follow_last) {
  PathIdentity id;
  if (path.empty()) return id;
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const size_t slash = p.find_last_of('/');
  const std::string name = slash == std::string::npos ? p : p.substr(slash + 1);
  const bool special = name == "." || name == ".." || p == "/";
  char buf[PATH_MAX];
  if ((follow_last || special) && ::realpath(p.c_str(), buf) != nullptr) id.resolved = buf;
  if (id.resolved.empty()) {
    if (special) return id;
    // The nearest folder above that exists, resolved, and the rest of the path as written (a path two levels
    // below a missing folder still compares with the others).
    std::vector<std::string> rest = {name};
    std::string a = parent_of(p);
    while (::realpath(a.c_str(), buf) == nullptr) {
      const size_t slash = a.find_last_of('/');
      if (a == "/" || a == "." || slash == std::string::npos) {
        if (a == "/" || a == ".") return id;
        rest.push_back(a);
        a = ".";
        continue;
      }
      rest.push_back(a.substr(slash + 1));
      a = parent_of(a);
    }
    id.resolved = buf;
    for (auto it = rest.rbegin(); it != rest.rend(); ++it) {
      if (*it == "." || it->empty()) continue;
      id.resolved += (id.resolved == "/" ? "" : "/") + *it;
    }
  }
  struct stat st;
  const int rc = follow_last || special ? ::stat(id.resolved.c_str(), &st) : ::lstat(id.resolved.c_str(), &st);
  if (rc == 0) {
    id.exists = true;
    id.is_dir = S_ISDIR(st.st_mode);
    id.chain.emplace_back(static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino));
  }
  for (std::string a = id.resolved; a != "/";) {
    a = parent_of(a);
    if (::stat(a.c_str(), &st) == 0)  // folders that do not exist yet have no identity
      id.chain.emplace_back(static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino));
  }
  return id;
}

bool path_within(const PathIdentity& inner, const PathIdentity& outer) {
  if (inner.resolved.empty() || outer.resolved.empty()) return false;
  const std::string& o = outer.resolved;
  if (inner.resolved == o || (inner.resolved.size() > o.size() && inner.resolved.compare(0, o.size(), o) == 0 &&
                              (o == "/" || inner.resolved[o.size()] == '/')))
    return true;
  if (!outer.exists || outer.chain.empty()) return false;
  for (const auto& c : inner.chain)
    if (c == outer.chain[0]) return true;
  return false;
}
}  // namespace dmx
