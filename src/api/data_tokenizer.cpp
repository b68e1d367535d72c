// `dmx data tokenizer` (include/dmx/data.h): captions -> a CLIP BPE tokenizer folder.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "api/options_util.h"
#include "core/atomic_dir.h"
#include "core/fs.h"
#include "dmx/data.h"
#include "dmx/error.h"
#include "models/clip_bpe_trainer.h"
#include "models/clip_tokenizer.h"

namespace dmx {
namespace fs = std::filesystem;
namespace {
void read_captions(const std::string& dir, const std::string& column, std::vector<std::string>* out) {
  DMX_CHECK_ARG(is_directory(dir), "--data: not a folder: '", dir, "'");
  const std::string meta = join_path(dir, "metadata.jsonl");
  if (path_exists(meta)) {
    std::istringstream in(read_text_file(meta, "--data metadata.jsonl", kMaxMetadataFileBytes));
    std::string line;
    int n = 0;
    while (std::getline(in, line)) {
      ++n;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        throw FormatError(meta + ":" + std::to_string(n) + ": not a JSON object (" + e.what() + ")");
      }
      DMX_CHECK_FORMAT(j.is_object() && j.contains(column) && j[column].is_string(), meta, ":", n,
                       ": needs a string field '", column, "' (--caption-column)");
      out->push_back(j[column].get<std::string>());
    }
    return;
  }
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".txt") files.push_back(e.path().string());
  DMX_CHECK_ARG(!files.empty(), "--data: '", dir, "' has neither metadata.jsonl nor *.txt captions");
  std::sort(files.begin(), files.end());
  for (const auto& f : files) out->push_back(read_text_file(f, "caption", kMaxTextFileBytes));
}
}  // namespace

TokenizerTrainReport train_tokenizer(const TokenizerTrainOptions& o) {
  DMX_CHECK_ARG(!o.data.empty(), "--data is required (a folder with captions; repeatable)");
  DMX_CHECK_ARG(!o.output.empty(), "--output is required (the tokenizer folder to write)");
  DMX_CHECK_ARG(o.model_max_length >= 2 && o.model_max_length <= 4096, "--model-max-length must be in [2, 4096], got ",
                o.model_max_length);
  {
    api::OutputPlan plan(o.overwrite);
    for (const auto& d : o.data) plan.input(d, "--data");
    std::string out = o.output;
    while (out.size() > 1 && out.back() == '/') out.pop_back();
    plan.folder(out, "--output", {"vocab.json", "merges.txt"}, "tokenizer folder");
    plan.prepare();
  }
  std::vector<std::string> texts;
  for (const auto& d : o.data) read_captions(d, o.caption_column, &texts);
  models::BPETrainOptions bo;
  bo.vocab_size = o.vocab_size;
  bo.min_frequency = o.min_frequency;
  bo.model_max_length = o.model_max_length;
  const models::BPEVocabulary v = models::learn_clip_bpe(texts, bo);
  write_directory_atomic(o.output, "the tokenizer folder",
                         [&](const std::string& tmp) { models::save_clip_tokenizer(v, tmp, o.model_max_length); });

  TokenizerTrainReport r;
  r.texts = texts.size();
  r.vocab_size = v.tokens.size();
  r.merges = v.merges.size();
  const auto tok = models::CLIPTokenizer::from_folder(o.output);  // what was written loads back
  for (const auto& t : texts) {
    const size_t n = tok.encode(t).size();
    if (n > r.longest_tokens) r.longest_tokens = n, r.longest = t;
    if (n > static_cast<size_t>(o.model_max_length)) ++r.truncated;
  }
  return r;
}
}  // namespace dmx
