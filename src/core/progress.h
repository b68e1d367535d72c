// A progress bar on stderr with rate and ETA. Silent when not visible, when stderr is not a terminal or when
// logging is quiet, so logs and pipes stay clean. Every bar also reports to the step observer of its thread
// (include/dmx/session.h: dmx::StepObserver, what `dmx serve` shows as progress and how it interrupts a job),
// whether it is drawn or not; an observer that throws stops the loop that ticked.
#pragma once
#include <chrono>
#include <string>

namespace dmx {
class ProgressBar {
 public:
  // total: the loop's length (0 = unknown: nothing is drawn or reported); visible: draw it on stderr.
  ProgressBar(std::string label, int total, bool visible = true);
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
