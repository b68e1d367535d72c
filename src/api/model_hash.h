// Internal: the cancellable form of dmx::model_hash (see include/dmx/dmx.h).
#pragma once
#include <atomic>
#include <future>
#include <string>

namespace dmx {
// Returns "" when cancelled (*cancel set) before the end of the file.
std::string model_hash(const std::string& model, const std::atomic<bool>* cancel);

// The model hash streams a file of up to a few GB: it is computed on a thread while the pipeline runs.
// get() waits for it ("" when the file cannot be read); the destructor cancels the hashing first, so a
// failed run does not wait for the end of the file.
class BackgroundModelHash {
 public:
  explicit BackgroundModelHash(std::string model);
  ~BackgroundModelHash();
  BackgroundModelHash(const BackgroundModelHash&) = delete;
  BackgroundModelHash& operator=(const BackgroundModelHash&) = delete;
  std::string get();

 private:
  std::atomic<bool> cancel_{false};
  std::future<std::string> result_;
};
}  // namespace dmx
