// `dmx serve`: the A1111-compatible HTTP server (serve/server.h, docs/serve.md). Its options are rows of the option
// table (cli/options.cpp).
#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/serve.h"
#include "serve/server.h"

namespace dmx::cli {

int cmd_serve(int argc, char** argv) {
  ServeOptions o;
  if (!parse_options(kServe, argc, argv, o)) return 0;  // --help
  return serve::run_server(o);
}
}  // namespace dmx::cli
