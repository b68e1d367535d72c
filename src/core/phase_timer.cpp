#include "core/phase_timer.h"

#include <cstdio>

#include "core/log.h"

namespace dmx {

PhaseTimer::PhaseTimer(std::string phase) : phase_(std::move(phase)), start_(std::chrono::steady_clock::now()) {}

PhaseTimer::~PhaseTimer() {
  if (!stopped_) stop();
}

double PhaseTimer::stop() {
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (!stopped_) {
    stopped_ = true;
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.3f s", s);
    log_verbose("time: " + phase_ + " " + buf);
  }
  return s;
}
}  // namespace dmx
