#include "core/log.h"

#include <atomic>
#include <cstdio>

#include "dmx/error.h"

namespace dmx {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
}
void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }
// Messages carry names and text from files (paths, captions, LoRA keys): printed through terminal_safe, so
// that no escape sequence from a file reaches the terminal.
void log_info(const std::string& msg) {
  if (g_level >= static_cast<int>(LogLevel::kInfo)) std::fprintf(stderr, "%s\n", terminal_safe(msg).c_str());
}
void log_verbose(const std::string& msg) {
  if (g_level >= static_cast<int>(LogLevel::kVerbose)) std::fprintf(stderr, "%s\n", terminal_safe(msg).c_str());
}
void log_warn(const std::string& msg) { std::fprintf(stderr, "warning: %s\n", terminal_safe(msg).c_str()); }
}  // namespace dmx
