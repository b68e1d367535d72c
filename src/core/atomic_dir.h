// Writing a whole folder atomically: fill a temporary sibling ("<dir>.tmp.<pid>"), then replace `dir` by it,
// so an interrupted or failed write never leaves a half-written model folder (the folder counterpart of
// write_file_atomic in core/fs.h).
#pragma once
#include <functional>
#include <string>

namespace dmx {
// Calls fill(tmp) on an empty temporary folder and renames it to `dir` (replacing an existing one). On any
// exception the temporary folder is removed; filesystem errors become IoError("writing <what> <dir>: ...").
void write_directory_atomic(const std::string& dir, const std::string& what,
                            const std::function<void(const std::string& tmp)>& fill);
}  // namespace dmx
