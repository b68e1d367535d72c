// Test helpers: fixture discovery, reference cases, tensor comparison that prints the worst error.
#pragma once
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace dmx::test {

// ../shared next to the checkout (or $DMX_SHARED_DIR). Every function below that looks at the fixtures marks
// the running test as a fixture user: only suites named *Golden (or *Slow) may call them (docs/testing.md).
std::string shared_dir();
bool fixtures_available();
std::string fixtures_dir();                             // <shared>/fixtures/sd-tiny
std::string fixture_model(const std::string& variant);  // <fixtures>/models/<variant>
// A fresh folder under $TMPDIR (or /tmp), removed with everything in it when the process that made it exits
// normally (set DMX_KEEP_TEST_TMP=1 to keep it for a look).
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int owner_;
};
std::string temp_dir();  // this process's ScratchDir
// temp_dir()/name, created: a test's own folder, so that outputs of different tests never meet (an existing
// output is an error without --overwrite).
std::string temp_subdir(const std::string& name);

// What the running test used, checked against its label after it ends (tests/test_labels.cpp).
enum Use : unsigned { kUsedFixtures = 1, kAskedFixtures = 2, kUsedCli = 4, kUsedTinyModel = 8 };
void note_use(Use u);
unsigned uses_of_current_test();
void reset_uses();

struct RefCase {
  nlohmann::json meta;
  io::TensorMap tensors;
  const at::Tensor& operator[](const std::string& name) const;
  bool has(const std::string& name) const { return tensors.count(name) != 0; }
};
RefCase load_ref(const std::string& variant, const std::string& name);

// The built dmx binary. Tests that start it (here or with fork/exec) are `cli` tests: their suites end in Cli.
std::string cli_path();

// Runs the built dmx binary with args (no shell expansion); output = stdout + stderr.
struct CliRun {
  int code = -1;
  std::string output;
};
CliRun dmx_run(const std::vector<std::string>& args);
// The same, started in the folder `dir` (relative paths and the models/ defaults resolve there).
CliRun dmx_run_in(const std::string& dir, const std::vector<std::string>& args);

// Runs f with this process's stderr (file descriptor 2) sent to a file, and returns what f wrote there (what
// the CLI would print for a call of the API it makes); an exception from f is rethrown after stderr is restored.
std::string capture_stderr(const std::function<void()>& f);

// Relative error = max|a - e| / max(max|e|, 1e-12). Prints "[check] what: rel=... max_abs=..." always,
// and the first values on failure. Returns the relative error.
double check_close(const std::string& what, const at::Tensor& actual, const at::Tensor& expected, double rel_tol);
}  // namespace dmx::test

#define DMX_REQUIRE_FIXTURES()                                                                               \
  do {                                                                                                       \
    if (!::dmx::test::fixtures_available())                                                                  \
      GTEST_SKIP() << "reference fixtures not found at " << ::dmx::test::shared_dir() << "/fixtures/sd-tiny" \
                   << " (golden tests need ../shared beside the checkout, or DMX_SHARED_DIR)";               \
  } while (0)

// EXPECT-style wrapper.
#define DMX_EXPECT_CLOSE(what, actual, expected, tol) \
  EXPECT_LE(::dmx::test::check_close((what), (actual), (expected), (tol)), (tol)) << (what)
