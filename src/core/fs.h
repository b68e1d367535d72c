// File helpers: whole-file reads and atomic writes (temporary file, then rename), so an
// interrupted run never leaves a half-written output.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace dmx {
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
std::string read_text_file(const std::string& path, const std::string& what);
// Calls write(tmp_path) and renames tmp_path to path on success; removes it on failure.
void write_file_atomic(const std::string& path, const std::function<void(const std::string&)>& write);
void write_bytes_atomic(const std::string& path, const void* data, size_t size);
std::string join_path(const std::string& a, const std::string& b);
// Temporary files are named "<path>.tmp.<pid>". For programs (the CLI), not the library: installs
// SIGINT/SIGTERM/SIGHUP handlers that delete the temporary files being written, then let the signal
// end the process as it would have, so that an interrupted run leaves neither a half-written output
// nor a stray temporary.
void install_temp_file_cleanup();
std::string file_stem(const std::string& path);
}  // namespace dmx
