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

// Caps on whole-file reads (docs/limits.md). Every reader states the cap it applies in its error.
constexpr uint64_t kMaxJsonFileBytes = 16ull << 20;      // configs, weight indexes, tokenizer files, trainer_state
constexpr uint64_t kMaxImageFileBytes = 256ull << 20;    // PNG / JPEG files (images, --from, dmx info)
constexpr uint64_t kMaxMetadataFileBytes = 256ull << 20; // metadata.jsonl / prompt lists of a dataset
constexpr uint64_t kMaxTextFileBytes = 256ull << 10;     // one caption file (= the prompt limit, core/text.h)

// Opens `path` for reading after following symlinks, refusing anything that is not a regular file
// (directories, devices such as /dev/urandom, FIFOs, sockets) without blocking on it: InvalidArgument
// naming `what` and the path. A file that does not exist or cannot be opened is an InvalidArgument too
// (a bad input path). Returns the descriptor (O_CLOEXEC); *size receives the file's size.
int open_regular_file(const std::string& path, const std::string& what, uint64_t* size);
// Reads a whole regular file of at most max_bytes bytes (see open_regular_file). A larger file is an
// InvalidArgument stating the limit; a read error an IoError.
std::string read_text_file(const std::string& path, const std::string& what, uint64_t max_bytes);
// "64 MiB", "256 KiB", "17 bytes": for limits stated in errors.
std::string format_byte_limit(uint64_t bytes);
// "805.3 MB", "12.0 GB": an approximate size (decimal units), for what an input would cost.
std::string format_size(double bytes);
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
