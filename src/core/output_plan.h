// The output plan of every writing command (api, emoji): in core, beside the file helpers it uses, so that all
// the layers that write share one set of rules.
#pragma once
#include <functional>
#include <string>
#include <vector>

namespace dmx {

// The output plan (README "Outputs and overwriting"). Every command that writes lists its inputs and every path it
// will write, derived ones included (OUT-0.png ..., OUT-source.png, masks, latents, maps, checkpoint folders),
// and checks them all before any work, so that no rule is found broken after minutes of computing:
//   1. no output is an input, lies inside an input folder or contains an input (same path, symlinks and
//      bind mounts included: identities are compared, not spellings; symlinks inside input folders count too);
//   2. outputs are distinct and none lies inside another;
//   3. an existing output is replaced only with --overwrite; a folder only when it is empty or of the kind the
//      command writes (one of its marker files), so --overwrite never deletes a folder of something else; a
//      work folder (training's --output-dir, eval --out) by its own rule;
//   4. the output's folder exists and is writable, and its name with the temporary suffix (".tmp.<pid>", up to
//      kTempSuffixMax bytes) fits the filesystem's NAME_MAX and its path PATH_MAX.
// check() throws one InvalidArgument listing every broken rule; prepare() also removes what killed runs left
// of these outputs ("<output>.tmp.<pid>" of processes that no longer run).
class OutputPlan {
 public:
  // Why an existing work folder may not be used ("" = it may).
  using ExistingRule = std::function<std::string(const std::string& dir)>;

  explicit OutputPlan(bool overwrite) : overwrite_(overwrite) {}
  // An input file or folder ("" is ignored). may_be_in_work_folder: it may lie in a work folder (--resume).
  void input(const std::string& path, const std::string& param, bool may_be_in_work_folder = false);
  // A file written whole (temporary, then rename). ext: the required ending ("" = any).
  void file(const std::string& path, const std::string& param, const std::string& ext = "");
  // A folder written whole and renamed into place. markers: files that make an existing folder one of the kind
  // this command writes (kind names it in messages, e.g. "diffusers folder").
  void folder(const std::string& path, const std::string& param, const std::vector<std::string>& markers,
              const std::string& kind);
  // A folder the command adds its own entries to (created when missing); `rule` decides about an existing one.
  void work_folder(const std::string& path, const std::string& param, ExistingRule rule);
  bool overwrite() const { return overwrite_; }

  void check() const;
  void prepare() const;

 private:
  enum class Kind { File, Folder, Work };
  struct Input {
    std::string path, param;
    bool may_be_in_work_folder;
  };
  struct Output {
    std::string path, param, ext, kind_name;
    Kind kind;
    std::vector<std::string> markers;
    ExistingRule rule;
  };
  bool overwrite_;
  std::vector<Input> inputs_;
  std::vector<Output> outputs_;
};
}  // namespace dmx
