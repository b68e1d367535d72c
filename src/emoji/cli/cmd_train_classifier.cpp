// `dmx train classifier`: the emoji classifier that `dmx eval` scores with (docs/evaluation.md).
#include <cstdio>
#include <string>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/eval.h"

namespace dmx::cli {

int cmd_train_classifier(int argc, char** argv) {
  Args a("train classifier",
         {
             {"data", "DIR", "`dmx data emoji` folder: every real image of every style is used (required)"},
             {"output", "DIR", "folder for config.json + model.safetensors (required)"},
             {"steps", "N", "optimizer steps (default 2000)"},
             {"batch-size", "B", "images per step (default 64)"},
             {"learning-rate", "LR", "AdamW peak learning rate, cosine decay (default 2e-3)"},
             {"seed", "N", "seed of every random draw (default 0)"},
             {"threads", "N", "CPU threads (default: all cores)"},
             {"json", "", "print the result as one JSON line"},
             {"overwrite", "", "replace an existing classifier folder"},
             {"quiet", "", "no progress output"},
             {"verbose", "", "stack traces"},
             {"help", "", "show this help"},
         });
  a.parse(argc, argv, 3);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  DMX_CHECK_ARG(a.has("data"), "--data is required (a `dmx data emoji` folder)");
  DMX_CHECK_ARG(a.has("output"), "--output is required (a folder)");
  ClassifierTrainOptions o;
  o.data = a.str("data");
  o.output = a.str("output");
  o.overwrite = a.has("overwrite");
  o.steps = a.integer("steps", o.steps, 1, 10000000);
  o.batch_size = static_cast<int>(a.integer("batch-size", o.batch_size, 1, 4096));
  o.learning_rate = a.real("learning-rate", o.learning_rate, 1e-8, 1.0);
  if (a.has("seed")) o.seed = a.u64("seed");
  o.threads = static_cast<int>(a.integer("threads", 0, 1, 1024));
  o.progress = !a.has("quiet");
  const ClassifierTrainResult r = train_classifier(o);
  std::string json = "{\"steps\": " + std::to_string(r.steps) + ", \"seconds\": " + std::to_string(r.seconds) +
                     ", \"images\": " + std::to_string(r.num_images) + ", \"classes\": " + std::to_string(r.num_classes);
  for (size_t i = 0; i < r.styles.size(); ++i) {
    json += ", \"top1_" + r.styles[i] + "\": " + std::to_string(r.top1[i]) + ", \"top5_" + r.styles[i] +
            "\": " + std::to_string(r.top5[i]) + ", \"style_accuracy_" + r.styles[i] + "\": " +
            std::to_string(r.style_accuracy[i]);
    if (!a.has("json") && o.progress)
      std::fprintf(stderr, "%s: top-1 %.4f, top-5 %.4f, style %.4f (clean real images)\n", r.styles[i].c_str(),
                   r.top1[i], r.top5[i], r.style_accuracy[i]);
  }
  json += "}";
  if (a.has("json"))
    std::printf("%s\n", json.c_str());
  else if (o.progress)
    std::fprintf(stderr, "wrote %s: %lld steps in %.1f s, %d images, %d concepts\n", o.output.c_str(),
                 static_cast<long long>(r.steps), r.seconds, r.num_images, r.num_classes);
  return 0;
}
}  // namespace dmx::cli
