#include "dmx/error.h"
// The hierarchy is header-only; this unit keeps one out-of-line anchor for the vtables.
namespace dmx {
namespace detail {
void error_anchor() {}
}  // namespace detail
}  // namespace dmx
