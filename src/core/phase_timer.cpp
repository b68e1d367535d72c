#include "core/phase_timer.h"

#include <cstdio>

#include "core/log.h"
#include "core/memory.h"

namespace dmx {

PhaseTimer::PhaseTimer(std::string phase) : phase_(std::move(phase)), start_(std::chrono::steady_clock::now()) {}

PhaseTimer::~PhaseTimer() {
  if (!stopped_) stop();
}

double PhaseTimer::stop() {
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (!stopped_) {
    stopped_ = true;
    // Resident memory with each phase: where the peak of a run is reached (docs/performance.md).
    char buf[128];
    std::snprintf(buf, sizeof(buf), "%.3f s (RSS %.0f MiB, peak so far %.0f MiB)", s,
                  static_cast<double>(process_rss_bytes()) / 1048576.0,
                  static_cast<double>(process_peak_rss_bytes()) / 1048576.0);
    log_verbose("time: " + phase_ + " " + buf);
  }
  return s;
}
}  // namespace dmx
