// `dmx data scenes`: emoji scenes with their maps and layouts (include/dmx/scenes.h, docs/layouts.md). A command of
// the emoji module, built into the dmx command line.
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/error.h"
#include "dmx/scenes.h"

namespace dmx::cli {

int cmd_data_scenes(int argc, char** argv) {
  SceneDataOptions o;
  const std::optional<Args> a = parse_options(kDataScenes, argc, argv, o, {{"out", "the folder to create"}});
  if (!a) return 0;  // --help
  const SceneDataReport r = build_scene_dataset(o);
  if (o.progress)
    std::fprintf(stderr, "wrote %s: %d canvases, %d objects, drawn from %d %s concepts\n", r.out.c_str(), r.canvases,
                 r.objects, r.concepts, o.split.c_str());
  return 0;
}
}  // namespace dmx::cli
