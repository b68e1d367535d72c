// dmx data <builder>: training folders from data users can install (the tokenizer here; the emoji set is the emoji
// module's, src/emoji/cli/cmd_data_emoji.cpp).
#include <cstdio>
#include <cstring>
#include <string>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/data.h"
#include "dmx/error.h"

namespace dmx::cli {
namespace {
int cmd_data_tokenizer(int argc, char** argv) {
  Args a("data tokenizer", {
                               {"data", "DIR", "caption folder (metadata.jsonl or *.txt); repeatable (required)", true},
                               {"output", "DIR", "tokenizer folder to write (required)"},
                               {"vocab-size", "N", "tokens in all, 514..49408 (default 4096)"},
                               {"min-frequency", "N", "merge only pairs seen at least N times (default 1)"},
                               {"model-max-length", "N", "tokens per prompt with BOS/EOS, 2..4096 (default 77)"},
                               {"caption-column", "NAME", "metadata.jsonl field holding the caption (default text)"},
                               {"overwrite", "", "replace --output if it exists"},
                               {"quiet", "", "print nothing on success"},
                               {"verbose", "", "stack traces"},
                               {"help", "", "show this help"},
                           });
  a.parse(argc, argv, 3);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  TokenizerTrainOptions o;
  DMX_CHECK_ARG(a.has("data"), "--data is required (a folder with captions)");
  DMX_CHECK_ARG(a.has("output"), "--output is required (the tokenizer folder to write)");
  o.data = a.all("data");
  o.output = a.str("output");
  o.overwrite = a.has("overwrite");
  o.vocab_size = static_cast<int>(a.integer("vocab-size", o.vocab_size, 514, 49408));
  o.min_frequency = static_cast<int>(a.integer("min-frequency", o.min_frequency, 1, 1 << 30));
  o.model_max_length = static_cast<int>(a.integer("model-max-length", o.model_max_length, 2, 4096));
  o.caption_column = a.str("caption-column", o.caption_column);
  const TokenizerTrainReport r = train_tokenizer(o);
  if (!a.has("quiet"))
    std::fprintf(stderr,
                 "wrote %s: %zu tokens (%zu merges) from %zu captions; longest caption %zu tokens (\"%s\"), "
                 "%zu longer than %d\n",
                 o.output.c_str(), r.vocab_size, r.merges, r.texts, r.longest_tokens, r.longest.c_str(), r.truncated,
                 o.model_max_length);
  return 0;
}
}  // namespace

int cmd_data(int argc, char** argv) {
  const char* usage =
      "usage: dmx data emoji --out DIR [options]        (dmx data emoji --help)\n"
      "       dmx data tokenizer --data DIR --output DIR (dmx data tokenizer --help)\n";
  if (argc < 3 || !std::strcmp(argv[2], "--help") || !std::strcmp(argv[2], "-h")) {
    std::printf("%s", usage);
    return argc < 3 ? 2 : 0;
  }
  const std::string what = argv[2];
  if (what == "emoji") return cmd_data_emoji(argc, argv);
  if (what == "tokenizer") return cmd_data_tokenizer(argc, argv);
  throw InvalidArgument("dmx data: unknown builder '" + what + "' (known: emoji, tokenizer)");
}
}  // namespace dmx::cli
