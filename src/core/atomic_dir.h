// Writing a whole folder atomically: fill a temporary sibling ("<dir>.tmp.<pid>"), then replace `dir` by it,
// so an interrupted or failed write never leaves a half-written model folder (the folder counterpart of
// write_file_atomic in core/fs.h).
#pragma once
#include <functional>
#include <string>

namespace dmx {
// Calls fill(tmp) on an empty temporary folder and renames it to `dir`; an existing `dir` is swapped out
// atomically (renameat2 RENAME_EXCHANGE) and then removed: callers decide beforehand whether it may be
// replaced (api::OutputPlan). The temporary is registered for the signal cleanup; on any exception it is
// removed; filesystem errors become IoError / SystemError ("writing <what> <dir>: ...").
void write_directory_atomic(const std::string& dir, const std::string& what,
                            const std::function<void(const std::string& tmp)>& fill);
}  // namespace dmx
