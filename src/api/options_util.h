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
#include "core/output_plan.h"
#include "dmx/options.h"

namespace dmx::api {

// The given seed, else a random A1111-style 32-bit one (reported back to the user, so a run can be repeated).
uint64_t resolve_seed(const std::optional<uint64_t>& seed);

// An output path: not empty, ends in ext (".png", ".safetensors"), its directory exists, it is not a directory.
// Messages name param.
void check_output_path(const std::string& path, const std::string& param, const std::string& ext);

// The output plan: core/output_plan.h (dmx::OutputPlan); the api names it here too.
using ::dmx::OutputPlan;

// The model's inputs of an output plan: --model, --config and --tokenizer (each "" is ignored), so no output may
// be, or lie inside, one of them.
void add_model_inputs(OutputPlan& plan, const ModelOptions& m);

// OUT.png -> OUT<suffix>.png (the last extension kept).
std::string with_suffix(const std::string& path, const std::string& suffix);
// OUT.png with n > 1: OUT-0.png ... OUT-(n-1).png; n == 1: OUT.png.
std::vector<std::string> numbered_paths(const std::string& out, int n);

// --device: cpu or cuda[:N] (InvalidArgument naming --device otherwise).
void check_device(const std::string& device);

// --dtype: fp32/float32, bf16/bfloat16, fp16/float16.
at::ScalarType parse_dtype(const std::string& s);
// --dtype for --device: as parse_dtype, and fp16 only on CUDA (loaders::check_dtype_device says why).
at::ScalarType parse_dtype(const std::string& s, const std::string& device);

// A number for the "parameters" text: up to 10 significant digits ("7.5", "0.8").
std::string fmt_number(double v);

// A value for the "parameters" text: in double quotes, '"' and '\' escaped, newlines as spaces (one line).
std::string quoted(const std::string& s);
}  // namespace dmx::api
