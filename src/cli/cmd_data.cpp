// dmx data <builder>: training folders from data users can install (the tokenizer here; the emoji set is the emoji
// module's, src/emoji/cli/cmd_data_emoji.cpp).
#include <cstdio>
#include <cstring>
#include <string>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/data.h"
#include "dmx/error.h"

namespace dmx::cli {
namespace {
int cmd_data_tokenizer(int argc, char** argv) {
  TokenizerTrainOptions o;
  const std::optional<Args> a = parse_options(
      kDataTokenizer, argc, argv, o, {{"data", "a folder with captions"}, {"output", "the tokenizer folder to write"}});
  if (!a) return 0;  // --help
  const TokenizerTrainReport r = train_tokenizer(o);
  if (!a->has("quiet"))
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
      "       dmx data scenes --out DIR [options]       (dmx data scenes --help)\n"
      "       dmx data tokenizer --data DIR --output DIR (dmx data tokenizer --help)\n";
  if (argc < 3 || !std::strcmp(argv[2], "--help") || !std::strcmp(argv[2], "-h")) {
    std::printf("%s", usage);
    return argc < 3 ? 2 : 0;
  }
  const std::string what = argv[2];
  if (what == "emoji") return cmd_data_emoji(argc, argv);
  if (what == "scenes") return cmd_data_scenes(argc, argv);
  if (what == "tokenizer") return cmd_data_tokenizer(argc, argv);
  throw InvalidArgument("dmx data: unknown builder '" + what + "' (known: emoji, scenes, tokenizer)");
}
}  // namespace dmx::cli
