// `dmx train classifier`: the emoji classifier that `dmx eval` scores with (docs/evaluation.md).
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/eval.h"

namespace dmx::cli {

int cmd_train_classifier(int argc, char** argv) {
  ClassifierTrainOptions o;
  const std::optional<Args> a =
      parse_options(kTrainClassifier, argc, argv, o, {{"data", "a `dmx data emoji` folder"}, {"output", "a folder"}});
  if (!a) return 0;  // --help
  const ClassifierTrainResult r = train_classifier(o);
  std::string json = "{\"steps\": " + std::to_string(r.steps) + ", \"seconds\": " + std::to_string(r.seconds) +
                     ", \"images\": " + std::to_string(r.num_images) +
                     ", \"classes\": " + std::to_string(r.num_classes);
  for (size_t i = 0; i < r.styles.size(); ++i) {
    json += ", \"top1_" + r.styles[i] + "\": " + std::to_string(r.top1[i]) + ", \"top5_" + r.styles[i] +
            "\": " + std::to_string(r.top5[i]) + ", \"style_accuracy_" + r.styles[i] +
            "\": " + std::to_string(r.style_accuracy[i]);
    if (!a->has("json") && o.progress)
      std::fprintf(stderr, "%s: top-1 %.4f, top-5 %.4f, style %.4f (clean real images)\n", r.styles[i].c_str(),
                   r.top1[i], r.top5[i], r.style_accuracy[i]);
  }
  json += "}";
  if (a->has("json"))
    std::printf("%s\n", json.c_str());
  else if (o.progress)
    std::fprintf(stderr, "wrote %s: %lld steps in %.1f s, %d images, %d concepts\n", o.output.c_str(),
                 static_cast<long long>(r.steps), r.seconds, r.num_images, r.num_classes);
  return 0;
}
}  // namespace dmx::cli
