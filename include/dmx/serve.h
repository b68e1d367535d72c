// dmx public API: the settings of `dmx serve` (docs/serve.md), an HTTP server speaking AUTOMATIC1111's API on a
// model kept in memory. The server itself is a tool above the API (src/serve/), like the CLI. Torch-free.
#pragma once
#include <cstdint>
#include <string>

namespace dmx {

struct ServeOptions {
  std::string host = "127.0.0.1";       // another address requires token
  int port = 7860;                      // A1111's port; 0 = any free port (printed at start-up)
  std::string models_dir;               // "" = the bundled models/ folder (beside the binary's build folder)
  std::string model;                    // a model name of models_dir to load at start-up; "" = the first one
  int threads = 0;                      // CPU threads of a generation; 0 = all cores
  std::string token;                    // required as "Authorization: Bearer <token>" when set
  int max_queue = 16;                   // generations waiting behind the running one; more: 503 at once
  int64_t max_body_bytes = 32ll << 20;  // request bodies (base64 pictures included); larger: 413
  bool quiet = false;                   // no log line per job on stderr
  std::string web_dir;                  // serve the page's files from here (web/) instead of the embedded copy
};
}  // namespace dmx
