// Option helpers shared by the public API entry points (generate, p2p, diffedit, train, ...): seed resolution,
// the output plan every command runs before any work, --dtype parsing and quoting for the PNG "parameters" text.
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/fs.h"

namespace dmx::api {

// The given seed, else a random A1111-style 32-bit one (reported back to the user, so a run can be repeated).
uint64_t resolve_seed(const std::optional<uint64_t>& seed);

// An output path: not empty, ends in ext (".png", ".safetensors"), its directory exists, it is not a directory.
// Messages name param.
void check_output_path(const std::string& path, const std::string& param, const std::string& ext);

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

// OUT.png -> OUT<suffix>.png (the last extension kept).
std::string with_suffix(const std::string& path, const std::string& suffix);
// OUT.png with n > 1: OUT-0.png ... OUT-(n-1).png; n == 1: OUT.png.
std::vector<std::string> numbered_paths(const std::string& out, int n);

// --dtype: fp32/float32, bf16/bfloat16, fp16/float16.
at::ScalarType parse_dtype(const std::string& s);
// --dtype for --device: as parse_dtype, and fp16 only on CUDA (pipelines::check_dtype_device says why).
at::ScalarType parse_dtype(const std::string& s, const std::string& device);

// A value for the "parameters" text: in double quotes, '"' and '\' escaped, newlines as spaces (one line).
std::string quoted(const std::string& s);
}  // namespace dmx::api
