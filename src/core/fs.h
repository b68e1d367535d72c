// File helpers: whole-file reads and atomic writes (temporary file, then rename), so an
// interrupted run never leaves a half-written output; the temporaries' signal cleanup and the
// removal of temporaries left by killed processes; path identities for the output checks
// (api::OutputPlan).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace dmx {
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);

// Caps on whole-file reads (docs/limits.md). Every reader states the cap it applies in its error.
constexpr uint64_t kMaxJsonFileBytes = 16ull << 20;       // configs, weight indexes, tokenizer files, trainer_state
constexpr uint64_t kMaxImageFileBytes = 256ull << 20;     // PNG / JPEG files (images, --from, dmx info)
constexpr uint64_t kMaxMetadataFileBytes = 256ull << 20;  // metadata.jsonl / prompt lists of a dataset
constexpr uint64_t kMaxTextFileBytes = 256ull << 10;      // one caption file (= the prompt limit, core/text.h)

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
// SIGINT/SIGTERM/SIGHUP handlers that delete the temporary files and folders being written, then let
// the signal end the process as it would have, so that an interrupted run leaves neither a half-written
// output nor a stray temporary. SIGXFSZ is ignored, so a write past the file size limit (ulimit -f) fails
// like a full disk (SystemError, temporaries removed) instead of killing the process.
void install_temp_file_cleanup();
std::string file_stem(const std::string& path);

// ---- temporaries -------------------------------------------------------------------------------
// Every temporary dmx writes is "<final path>.tmp.<pid>", next to the final path. kTempSuffixMax is the
// longest suffix (".tmp." and a pid of up to 10 digits): a name must leave room for it.
constexpr size_t kTempSuffixMax = 15;
std::string temp_path_for(const std::string& path);

// Registers a temporary file or folder for the signal cleanup while it exists (folders are removed with
// everything in them). At most 256 are registered at once; beyond that a temporary is still removed on
// failure, only not on a signal.
class ScopedTemporary {
 public:
  ScopedTemporary(const std::string& path, bool directory);
  ~ScopedTemporary();
  ScopedTemporary(const ScopedTemporary&) = delete;
  ScopedTemporary& operator=(const ScopedTemporary&) = delete;

 private:
  int slot_;
};

// Removes the entries "<name>.tmp.<pid>" of `dir` (files or folders) for which ours(name) is true and whose
// pid is not a running process: what a process killed with SIGKILL (or a power loss) left behind. The
// entries of live processes, and names of any other pattern, are left alone. Returns the removed paths.
std::vector<std::string> remove_stale_temporaries(const std::string& dir,
                                                  const std::function<bool(const std::string& name)>& ours);

// Several files that appear together or not at all (the images of --num-images, p2p's three pictures):
// each is written to its temporary; when all are written they are renamed into place. If any write or
// rename fails, every temporary and every file already renamed is removed, and the error is thrown.
struct PendingFile {
  std::string path;
  std::vector<uint8_t> bytes;
};
void write_files_atomic(const std::vector<PendingFile>& files);

// The error for a failed write of `what` with errno `err`: SystemError when the system ran out of room or
// failed (ENOSPC, EDQUOT, EFBIG, EIO: not the input's fault), IoError otherwise.
[[noreturn]] void throw_write_error(const std::string& what, int err);

// ---- identities --------------------------------------------------------------------------------
// Where a path is on disk. `resolved`: absolute, with the symlinks of its folders resolved and, when
// follow_last is true, of the last component too (below the nearest existing folder, as written). `chain`: the
// (device, inode) of the path itself (when it exists) and of every folder above it up to "/", so that
// containment is decided by identity (bind mounts, symlinks, hard-linked names) and not by spelling.
struct PathIdentity {
  std::string resolved;
  bool exists = false;
  bool is_dir = false;
  std::vector<std::pair<uint64_t, uint64_t>> chain;  // [0] = the path itself when it exists
};
PathIdentity identify_path(const std::string& path, bool follow_last);
// True when `inner` is `outer` or lies somewhere inside the folder `outer`.
bool path_within(const PathIdentity& inner, const PathIdentity& outer);
}  // namespace dmx
