#include "core/progress.h"

#include <unistd.h>

#include <cstdio>

#include "core/log.h"
#include "dmx/session.h"

namespace dmx {

ProgressBar::ProgressBar(std::string label, int total, bool visible)
    : label_(std::move(label)), total_(total), start_(std::chrono::steady_clock::now()) {
  enabled_ =
      visible && total_ > 0 && isatty(STDERR_FILENO) && log_level() != LogLevel::kQuiet && !StepObserver::active();
  if (enabled_) draw(false);
  if (total_ > 0) StepObserver::report(label_, 0, total_);
}

ProgressBar::~ProgressBar() {
  if (enabled_ && !finished_) std::fprintf(stderr, "\n");
}

void ProgressBar::tick(int n) {
  done_ += n;
  if (enabled_) draw(false);
  if (total_ > 0) StepObserver::report(label_, done_, total_);
}

void ProgressBar::finish() {
  if (finished_) return;
  if (enabled_) draw(true);
  finished_ = true;
}

void ProgressBar::draw(bool final_line) {
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const int width = 30;
  const int filled = total_ > 0 ? width * done_ / total_ : 0;
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(width, '.');
  char rate[64] = "";
  char eta[64] = "";
  if (done_ > 0 && elapsed > 0) {
    const double per = elapsed / done_;
    if (per >= 1.0)
      std::snprintf(rate, sizeof(rate), "%.2f s/it", per);
    else
      std::snprintf(rate, sizeof(rate), "%.2f it/s", 1.0 / per);
    std::snprintf(eta, sizeof(eta), final_line ? "%.1fs" : "ETA %.1fs", final_line ? elapsed : per * (total_ - done_));
  }
  std::fprintf(stderr, "\r%s [%s] %d/%d %s %s\033[K", label_.c_str(), bar.c_str(), done_, total_, rate, eta);
  if (final_line) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}
}  // namespace dmx
