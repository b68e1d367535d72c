// Per-phase wall-clock timings and resident memory, printed with --verbose ("time: denoise 1.234 s (RSS ...)").
#pragma once
#include <chrono>
#include <string>

namespace dmx {
class PhaseTimer {
 public:
  explicit PhaseTimer(std::string phase);
  ~PhaseTimer();  // reports if stop() was not called (an exception still shows where time went)
  double stop();  // reports once; returns seconds
 private:
  std::string phase_;
  std::chrono::steady_clock::time_point start_;
  bool stopped_ = false;
};
}  // namespace dmx
