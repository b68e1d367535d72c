// Helpers of the seed-driven end-to-end goldens: references stored anywhere (the small ones in tests/ref,
// made by the harness scripts beside them), the command lines they record, and picture comparisons.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "core/image.h"
#include "test_util.h"

namespace dmx::test {

std::string repo_ref_dir();  // <source>/tests/ref
// A case stored as <base>.json + <base>.safetensors.
RefCase load_ref_file(const std::string& base);
// Splits a POSIX-shell-like command line: spaces separate words, '...' quotes (no escapes, no expansion).
std::vector<std::string> split_command_line(const std::string& line);
// Runs the dmx command line recorded with a case (JSON "dmx", starting "dmx <command>") as a user runs it: the
// value of each flag in `paths` (model, inputs, outputs) replaced, --quiet added. Every flag of `paths` must be in
// the line (FormatError otherwise), so a test cannot silently run something else.
CliRun run_recorded_command(const std::string& line, const std::string& command,
                            const std::map<std::string, std::string>& paths);
// Largest |a - b| over the uint8 samples of a picture and a [H, W, C] uint8 tensor (255 on a shape mismatch).
int max_u8_diff(const Image& img, const at::Tensor& hwc_u8);

}  // namespace dmx::test
