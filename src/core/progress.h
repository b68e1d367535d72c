// A progress bar on stderr with rate and ETA. Silent when stderr is not a terminal or when
// logging is quiet, so logs and pipes stay clean.
#pragma once
#include <chrono>
#include <string>

namespace dmx {
class ProgressBar {
 public:
  ProgressBar(std::string label, int total);
  ~ProgressBar();
  void tick(int n = 1);
  void finish();

 private:
  void draw(bool final_line);
  std::string label_;
  int total_;
  int done_ = 0;
  bool enabled_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
};
}  // namespace dmx
