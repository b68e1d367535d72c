// Logging to stderr with a global verbosity.
#pragma once
#include <string>

namespace dmx {
enum class LogLevel { kQuiet = 0, kInfo = 1, kVerbose = 2 };
void set_log_level(LogLevel level);
LogLevel log_level();
void log_info(const std::string& msg);     // shown unless quiet
void log_verbose(const std::string& msg);  // shown with --verbose
void log_warn(const std::string& msg);     // always shown
}  // namespace dmx
