#include "test_util.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <system_error>
#include <vector>

#include "core/fs.h"
#include "dmx/error.h"
#include "schedulers/scheduler.h"
#include "test_ref_cases.h"

namespace dmx::test {

std::string shared_dir() {
  if (const char* env = std::getenv("DMX_SHARED_DIR")) return env;
  return std::string(DMX_SOURCE_DIR) + "/../shared";
}

namespace {
unsigned g_uses = 0;
}  // namespace
void note_use(Use u) { g_uses |= u; }
unsigned uses_of_current_test() { return g_uses; }
void reset_uses() { g_uses = 0; }

std::string fixtures_dir() {
  note_use(kUsedFixtures);
  return shared_dir() + "/fixtures/sd-tiny";
}
bool fixtures_available() {
  note_use(kAskedFixtures);
  return is_directory(shared_dir() + "/fixtures/sd-tiny/ref");
}
std::string fixture_model(const std::string& variant) { return fixtures_dir() + "/models/" + variant; }

ScratchDir::ScratchDir() : owner_(::getpid()) {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/dmx-test-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) throw IoError("cannot create a temporary directory from " + tmpl);
  path_ = buf.data();
}

ScratchDir::~ScratchDir() {
  // Every gtest case runs as its own process (one ctest entry each): without this, each left a folder behind,
  // and a few thousand runs filled the disk. A forked child (death tests, CLI runs) leaves its parent's folder.
  if (::getpid() != owner_) return;
  if (const char* keep = std::getenv("DMX_KEEP_TEST_TMP"); keep && *keep && std::string(keep) != "0") return;
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string temp_dir() {
  static ScratchDir dir;
  return dir.path();
}

std::string temp_subdir(const std::string& name) {
  const std::string d = temp_dir() + "/" + name;
  ::mkdir(d.c_str(), 0755);
  return d;
}

const at::Tensor& RefCase::operator[](const std::string& name) const {
  auto it = tensors.find(name);
  if (it == tensors.end()) throw FormatError("reference case has no tensor '" + name + "'");
  return it->second;
}

RefCase load_ref(const std::string& variant, const std::string& name) {
  return load_ref_file(fixtures_dir() + "/ref/" + variant + "/" + name);
}

std::string repo_ref_dir() { return std::string(DMX_SOURCE_DIR) + "/tests/ref"; }

RefCase load_ref_file(const std::string& base) {
  RefCase r;
  // Python's json writes -Infinity (DPM-Solver configs): parse with the scheduler config reader.
  r.meta =
      schedulers::parse_scheduler_config(read_text_file(base + ".json", "reference metadata", dmx::kMaxJsonFileBytes));
  r.tensors = io::load_safetensors(base + ".safetensors");
  return r;
}

double check_close(const std::string& what, const at::Tensor& actual, const at::Tensor& expected, double rel_tol) {
  if (!actual.defined() || !expected.defined()) {
    std::printf("[check] %s: undefined tensor\n", what.c_str());
    return INFINITY;
  }
  if (!actual.sizes().equals(expected.sizes())) {
    std::ostringstream os;
    os << "[check] " << what << ": shape mismatch " << actual.sizes() << " vs expected " << expected.sizes();
    std::printf("%s\n", os.str().c_str());
    return INFINITY;
  }
  at::Tensor a = actual.detach().to(at::kCPU).to(at::kDouble);
  at::Tensor e = expected.detach().to(at::kCPU).to(at::kDouble);
  const double max_abs = (a - e).abs().max().item<double>();
  const double scale = std::max(e.abs().max().item<double>(), 1e-12);
  const double rel = max_abs / scale;
  const bool nan = a.isnan().any().item<bool>();
  std::printf("[check] %-48s rel=%.3e max_abs=%.3e (tol %.0e)%s\n", what.c_str(), rel, max_abs, rel_tol,
              nan ? " NaN!" : "");
  if (nan) return INFINITY;
  if (rel > rel_tol) {
    auto af = a.flatten(), ef = e.flatten();
    const int64_t idx = (af - ef).abs().argmax().item<int64_t>();
    std::printf("  worst at flat index %ld: got %.8g expected %.8g\n  first values:", static_cast<long>(idx),
                af[idx].item<double>(), ef[idx].item<double>());
    for (int64_t i = 0; i < std::min<int64_t>(6, af.numel()); ++i)
      std::printf(" (%.6g vs %.6g)", af[i].item<double>(), ef[i].item<double>());
    std::printf("\n");
  }
  std::fflush(stdout);
  return rel;
}
std::vector<std::string> split_command_line(const std::string& line) {
  std::vector<std::string> words;
  std::string cur;
  bool in_word = false, quoted = false;
  for (char c : line) {
    if (quoted) {
      if (c == '\'') {
        quoted = false;
      } else {
        cur += c;
      }
    } else if (c == '\'') {
      quoted = in_word = true;
    } else if (c == ' ') {
      if (in_word) words.push_back(cur);
      cur.clear();
      in_word = false;
    } else {
      cur += c;
      in_word = true;
    }
  }
  if (quoted) throw FormatError("unterminated quote in command line: " + line);
  if (in_word) words.push_back(cur);
  return words;
}

CliRun run_recorded_command(const std::string& line, const std::string& command,
                            const std::map<std::string, std::string>& paths) {
  const std::vector<std::string> words = split_command_line(line);
  if (words.size() < 2 || words[0] != "dmx" || words[1] != command)
    throw FormatError("recorded command line is not 'dmx " + command + " ...': " + line);
  std::vector<std::string> args(words.begin() + 1, words.end());
  size_t replaced = 0;
  for (size_t i = 0; i + 1 < args.size(); ++i)
    if (auto it = paths.find(args[i]); it != paths.end()) {
      args[i + 1] = it->second;
      ++replaced;
    }
  if (replaced != paths.size()) throw FormatError("recorded command line lacks a replaced flag: " + line);
  args.push_back("--quiet");
  return dmx_run(args);
}

int max_u8_diff(const Image& img, const at::Tensor& hwc_u8) {
  if (hwc_u8.dim() != 3 || hwc_u8.size(0) != img.height || hwc_u8.size(1) != img.width ||
      hwc_u8.size(2) != img.channels) {
    std::ostringstream os;
    os << hwc_u8.sizes();
    std::printf("[check] picture shape %dx%dx%d vs reference %s\n", img.height, img.width, img.channels,
                os.str().c_str());
    return 255;
  }
  const at::Tensor e = hwc_u8.contiguous().to(at::kInt);
  const at::Tensor a =
      at::from_blob(const_cast<uint8_t*>(img.data.data()), {img.height, img.width, img.channels}, at::kByte)
          .to(at::kInt);
  return (a - e).abs().max().item<int>();
}

namespace {
std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}
}  // namespace

std::string cli_path() {
  note_use(kUsedCli);
  return DMX_CLI_PATH;
}

CliRun dmx_run(const std::vector<std::string>& args) { return dmx_run_in("", args); }

CliRun dmx_run_in(const std::string& dir, const std::vector<std::string>& args) {
  // As a user starts it: without the OpenMP policy ctest gives the test processes (tests/labels.cmake), so that
  // the binary sets it and re-executes itself (src/cli/main.cpp).
  std::string cmd = (dir.empty() ? std::string() : "cd " + shell_quote(dir) + " && ") +
                    "env -u OMP_WAIT_POLICY -u DMX_OMP_CONFIGURED " + shell_quote(cli_path());
  for (const auto& a : args) cmd += " " + shell_quote(a);
  cmd += " 2>&1";
  CliRun r;
  FILE* f = popen(cmd.c_str(), "r");
  if (!f) throw IoError("cannot run " + cmd);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) r.output.append(buf, n);
  const int status = pclose(f);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}
std::string capture_stderr(const std::function<void()>& f) {
  static int counter = 0;
  const std::string path = temp_dir() + "/stderr-" + std::to_string(counter++) + ".txt";
  std::fflush(stderr);
  const int saved = ::dup(2);
  FILE* file = std::fopen(path.c_str(), "w");
  if (saved < 0 || !file) throw IoError("capture_stderr: cannot redirect stderr to " + path);
  ::dup2(::fileno(file), 2);
  std::exception_ptr error;
  try {
    f();
  } catch (...) {
    error = std::current_exception();
  }
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  std::fclose(file);
  const std::string text = read_text_file(path, "captured stderr", kMaxMetadataFileBytes);
  if (error) std::rethrow_exception(error);
  return text;
}
}  // namespace dmx::test
