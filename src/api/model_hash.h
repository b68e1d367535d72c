// Internal: the cancellable form of dmx::model_hash (see include/dmx/dmx.h).
#pragma once
#include <atomic>
#include <string>

namespace dmx {
// Returns "" when cancelled (*cancel set) before the end of the file.
std::string model_hash(const std::string& model, const std::atomic<bool>* cancel);
}  // namespace dmx
