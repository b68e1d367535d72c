// `dmx serve` (docs/serve.md): an HTTP server (Debian's cpp-httplib) speaking AUTOMATIC1111's API on one model kept
// in memory (dmx::Session), one generation at a time, the others in a bounded queue, a small page at GET /.
#pragma once
#include <string>

#include "dmx/serve.h"

namespace dmx::serve {

// Whether `host` is a loopback address (127.0.0.0/8, ::1, localhost): others require a token.
bool is_loopback(const std::string& host);

// The bundled models/ folder: beside the binary's folder (build/dmx -> models/), else ./models; "" when none.
std::string default_models_dir();

// Runs the server until SIGINT/SIGTERM (blocked in every thread and waited for by one); returns the exit code.
// InvalidArgument (exit 2) for bad settings: no model in the folder, a non-loopback host without a token, ...
int run_server(const ServeOptions& o);
}  // namespace dmx::serve
