// Outputs never destroy data (README "Outputs and overwriting", issue 13 items 1, 2, 3, 10, 11): the output plan
// every command runs before any work (outputs against inputs and each other, existing outputs, writable folders,
// name lengths), all-or-nothing multi-file writes, a full disk (exit 1, nothing left), signals and SIGKILL while
// a training checkpoint is written, resuming at the end, the training log after a resume, and captions checked
// when a dataset is opened.
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "api/options_util.h"
#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/image.h"
#include "dmx/dmx.h"
#include "dmx/train.h"
#include "loaders/model_bundle.h"
#include "test_util.h"
#include "tiny_models.h"
#include "training/dataset.h"
#include "training/lora_train.h"
#include "training/trainer.h"

namespace fs = std::filesystem;
namespace tr = dmx::training;

namespace dmx::test {
namespace {

// ---------------------------------------------------------------- helpers

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

// Every path below dir (relative, sorted), folders with a trailing '/'.
std::vector<std::string> tree(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    std::string rel = fs::relative(it->path(), dir).string();
    if (it->is_directory() && !it->is_symlink()) rel += "/";
    out.push_back(rel);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool has_temporary(const std::vector<std::string>& names) {
  for (const auto& n : names)
    if (n.find(".tmp.") != std::string::npos) return true;
  return false;
}

std::string fresh(const std::string& name) {
  const std::string d = temp_dir() + "/outputs-" + name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

struct CliResult {
  int code = -1;
  std::string err;
};

// The dmx binary under test: this build's, or $DMX_TEST_CLI (to show what another build does with these cases).
std::string cli() {
  const std::string built = cli_path();
  const char* env = std::getenv("DMX_TEST_CLI");
  return env && *env ? env : built;
}

// Runs dmx (or `prefix` + dmx, for a shell around it) with stderr captured.
CliResult dmx_cmd(const std::vector<std::string>& args, const std::string& wrap = "") {
  static int counter = 0;
  const std::string err = temp_dir() + "/outputs-run" + std::to_string(counter++) + ".err";
  std::string cmd = quote(cli());
  for (const auto& a : args) cmd += " " + quote(a);
  cmd += " >/dev/null 2>" + quote(err) + " </dev/null";
  if (!wrap.empty()) cmd = wrap + " " + quote(cmd);
  const int status = std::system(cmd.c_str());
  CliResult r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.err = read_file(err);
  return r;
}

void expect_refused(const CliResult& r, const std::vector<std::string>& needles) {
  EXPECT_EQ(r.code, 2) << r.err;
  for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "expected '" << n << "' in: " << r.err;
}

// A real copy of a tiny model (the tests may try to write into it: it must never be the shared one).
std::string model_copy(const std::string& variant) {
  const std::string dst = temp_dir() + "/outputs-model-" + variant;
  if (!is_directory(dst)) fs::copy(tiny_model_dir(variant), dst, fs::copy_options::recursive);
  for (auto& e : fs::recursive_directory_iterator(dst))
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  return dst;
}

// A model folder without UNet weights: any run that gets as far as loading fails. An error about an output
// instead proves the output was checked first.
std::string broken_model() {
  const std::string dst = temp_dir() + "/outputs-broken-model";
  if (!is_directory(dst)) {
    fs::copy(tiny_model_dir("test"), dst, fs::copy_options::recursive);
    for (auto& e : fs::recursive_directory_iterator(dst))
      fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
    fs::remove(dst + "/unet/diffusion_pytorch_model.safetensors");
  }
  return dst;
}

// Two 32x32 images with captions.
std::string image_folder(const std::string& name) {
  const std::string d = fresh(name);
  for (int i = 0; i < 2; ++i) {
    Image img;
    img.width = img.height = 32;
    img.channels = 3;
    img.data.resize(32 * 32 * 3);
    for (size_t k = 0; k < img.data.size(); ++k) img.data[k] = static_cast<uint8_t>((k * (7 + i)) % 251);
    save_png(d + "/img" + std::to_string(i) + ".png", img);
    write_file(d + "/img" + std::to_string(i) + ".txt", i ? "a red square" : "a blue circle");
  }
  return d;
}

std::vector<std::string> gen_args(const std::string& model, const std::string& out,
                                  std::vector<std::string> extra = {}) {
  std::vector<std::string> v = {"generate", "--model", model, "--output", out,  "--prompt", "x", "--steps",
                                "2",        "--width", "32",  "--height", "32", "--seed",   "1", "--quiet"};
  v.insert(v.end(), extra.begin(), extra.end());
  return v;
}

// A private tmpfs for one command (a user + mount namespace: nothing outside sees it), so that a full disk or a
// read-only folder can be made without privileges. The listing of the tmpfs after the command is returned in
// `listing` (the mount goes away with the namespace).
bool tmpfs_available() {
  static const int ok = std::system(
                            "unshare -rm sh -c 'd=$(mktemp -d) && mount -t tmpfs -o size=64k none \"$d\" "
                            "&& umount \"$d\" && rmdir \"$d\"' >/dev/null 2>&1") == 0;
  return ok;
}

CliResult dmx_on_tmpfs(const std::string& mount_dir, const std::string& options, const std::vector<std::string>& args,
                       std::vector<std::string>* listing) {
  const std::string list = mount_dir + ".list";
  std::string inner = "mount -t tmpfs -o " + options + " none " + quote(mount_dir) + " || exit 99; ";
  std::string cmd = quote(cli());
  for (const auto& a : args) cmd += " " + quote(a);
  inner += cmd + " >/dev/null 2>" + quote(mount_dir + ".err") + " </dev/null; rc=$?; ls -A " + quote(mount_dir) +
           " > " + quote(list) + "; exit $rc";
  const int status = std::system(("unshare -rm sh -c " + quote(inner)).c_str());
  CliResult r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.err = read_file(mount_dir + ".err");
  listing->clear();
  std::istringstream in(read_file(list));
  for (std::string line; std::getline(in, line);) listing->push_back(line);
  return r;
}

// ---------------------------------------------------------------- the output plan (unit)

TEST(OutputPlanUnit, OutputsThatAreOrTouchInputsAreRefused) {
  const std::string d = fresh("plan");
  fs::create_directories(d + "/model/unet");
  write_file(d + "/model/unet/w.safetensors", "weights");
  write_file(d + "/model/model_index.json", "{}");
  fs::create_symlink(d + "/model", d + "/link");
  fs::create_directories(d + "/cache");
  write_file(d + "/cache/blob", "weights in a cache");
  fs::create_directories(d + "/hub/unet");
  fs::create_symlink(d + "/cache/blob", d + "/hub/unet/w.safetensors");  // a model folder of symlinks
  ASSERT_EQ(::link((d + "/model/unet/w.safetensors").c_str(), (d + "/hardlink.safetensors").c_str()), 0);
  auto refused = [&](auto add, const std::string& needle) {
    api::OutputPlan plan(true);  // even with --overwrite
    plan.input(d + "/model", "--model");
    plan.input(d + "/hub", "--config");
    add(plan);
    try {
      plan.check();
      ADD_FAILURE() << "expected a refusal with '" << needle << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  refused([&](api::OutputPlan& p) { p.file(d + "/model/unet/w.safetensors", "--save-latents"); }, "--save-latents");
  refused([&](api::OutputPlan& p) { p.file(d + "/link/unet/w.safetensors", "--save-latents"); },
          "lies inside the input --model");
  refused([&](api::OutputPlan& p) { p.file(d + "/model/x.png", "--output", ".png"); }, "lies inside the input --model");
  refused([&](api::OutputPlan& p) { p.folder(d + "/model", "--output", {"model_index.json"}, "diffusers folder"); },
          "is the input --model");
  refused([&](api::OutputPlan& p) { p.folder(d, "--output", {"model_index.json"}, "diffusers folder"); },
          "contains the input");
  refused([&](api::OutputPlan& p) { p.work_folder(d + "/link", "--output-dir", nullptr); }, "is the input --model");
  refused([&](api::OutputPlan& p) { p.file(d + "/cache/blob", "--save-latents"); }, "through its symlink");
  // Outputs against each other (derived names included).
  refused(
      [&](api::OutputPlan& p) {
        p.file(d + "/a.png", "--output", ".png");
        p.file(d + "/./a.png", "--save-control-image", ".png");
      },
      "are the same path");
  refused(
      [&](api::OutputPlan& p) {
        p.folder(d + "/out", "--output", {"model_index.json"}, "diffusers folder");
        p.work_folder(d + "/out/train", "--output-dir", nullptr);
      },
      "lies inside");
  // A hard-linked name of an input is only another name: writes rename over the name and never write through it.
  write_bytes_atomic(d + "/hardlink.safetensors", "latents", 7);
  EXPECT_EQ(read_file(d + "/model/unet/w.safetensors"), "weights");
  // A fine plan passes and removes only stale temporaries of its own outputs.
  api::OutputPlan ok(false);
  ok.input(d + "/model", "--model");
  ok.file(d + "/new.png", "--output", ".png");
  const pid_t dead = [] {
    const pid_t pid = fork();
    if (pid == 0) _exit(0);
    waitpid(pid, nullptr, 0);
    return pid;
  }();
  write_file(d + "/new.png.tmp." + std::to_string(dead), "left by a killed run");
  write_file(d + "/new.png.tmp.1", "pid 1 runs: not stale");
  write_file(d + "/other.png.tmp." + std::to_string(dead), "not one of this run's outputs");
  ok.prepare();
  EXPECT_FALSE(path_exists(d + "/new.png.tmp." + std::to_string(dead)));
  EXPECT_TRUE(path_exists(d + "/new.png.tmp.1"));
  EXPECT_TRUE(path_exists(d + "/other.png.tmp." + std::to_string(dead)));
}

TEST(OutputPlanUnit, ExistingOutputsNeedOverwriteAndFoldersOfTheirKind) {
  const std::string d = fresh("plan-existing");
  write_file(d + "/old.png", "an image the user keeps");
  fs::create_directories(d + "/docs/sub");
  write_file(d + "/docs/sub/t.txt", "x");
  fs::create_directories(d + "/model");
  write_file(d + "/model/model_index.json", "{}");
  auto message = [&](bool overwrite, auto add) -> std::string {
    api::OutputPlan plan(overwrite);
    add(plan);
    try {
      plan.check();
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message(false, [&](api::OutputPlan& p) { p.file(d + "/old.png", "--output", ".png"); }).find("--overwrite"),
            std::string::npos);
  EXPECT_EQ(message(true, [&](api::OutputPlan& p) { p.file(d + "/old.png", "--output", ".png"); }), "");
  EXPECT_NE(message(true, [&](api::OutputPlan& p) { p.file(d + "/docs", "--output", ""); }).find("is a folder"),
            std::string::npos);
  const auto folder = [&](const std::string& path) {
    return [=](api::OutputPlan& p) { p.folder(path, "--output", {"model_index.json"}, "diffusers folder"); };
  };
  EXPECT_NE(message(false, folder(d + "/model")).find("already exists"), std::string::npos);
  EXPECT_EQ(message(true, folder(d + "/model")), "");
  EXPECT_NE(message(true, folder(d + "/docs")).find("is not a diffusers folder"), std::string::npos);
  EXPECT_NE(message(false, folder(d + "/missing/out")).find("does not exist"), std::string::npos);
  EXPECT_NE(message(false, [&](api::OutputPlan& p) { p.file(d + "/" + std::string(250, 'a') + ".png", "--output"); })
                .find("temporary suffix"),
            std::string::npos);
  EXPECT_EQ(tree(d), (std::vector<std::string>{"docs/", "docs/sub/", "docs/sub/t.txt", "model/",
                                               "model/model_index.json", "old.png"}));
}

// ---------------------------------------------------------------- atomic writes, signals, full disk (unit)

// The folder counterpart of HardeningFsUnit.SignalDuringWriteRemovesTemporary: the temporary folder is registered
// as a whole (before, only the file being written was, and the folder stayed behind: issue 13 item 10).
TEST(OutputsFsUnit, SignalDuringFolderWriteRemovesTheFolder) {
  for (int sig : {SIGINT, SIGTERM}) {
    const std::string d = fresh("sigdir" + std::to_string(sig));
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      install_temp_file_cleanup();
      write_directory_atomic(d + "/out", "a folder", [&](const std::string& tmp) {
        fs::create_directories(tmp + "/unet");
        write_bytes_atomic(tmp + "/unet/w.safetensors", "complete", 8);
        write_file_atomic(tmp + "/config.json", [&](const std::string& t) {
          write_file(t, "half");
          ::raise(sig);
        });
      });
      _exit(0);  // not reached
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status)) << status;
    EXPECT_EQ(WTERMSIG(status), sig);
    EXPECT_EQ(tree(d), std::vector<std::string>{}) << "signal " << sig;
  }
}

// Several files are all written or none: a write that fails at the third file (the file size limit, as a full
// disk would) removes the first two, and the error is a SystemError (exit 1: not invalid input).
TEST(OutputsFsUnit, MultiFileWriteIsAllOrNothing) {
  const std::string d = fresh("allornothing");
  write_file(d + "/c.png", "an older c, replaced only when all are written");
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    install_temp_file_cleanup();  // SIGXFSZ ignored: the write fails with EFBIG
    struct rlimit rl = {4096, 4096};
    setrlimit(RLIMIT_FSIZE, &rl);
    try {
      write_files_atomic({{d + "/a.png", std::vector<uint8_t>(1000, 1)},
                          {d + "/b.png", std::vector<uint8_t>(1000, 2)},
                          {d + "/c.png", std::vector<uint8_t>(9000, 3)}});
    } catch (const SystemError&) {
      _exit(7);
    } catch (...) {
      _exit(8);
    }
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 7) << "expected a SystemError";
  EXPECT_EQ(tree(d), std::vector<std::string>{"c.png"});
  EXPECT_EQ(read_file(d + "/c.png"), "an older c, replaced only when all are written");
  write_files_atomic({{d + "/a.png", {1}}, {d + "/b.png", {2}}});
  EXPECT_EQ(tree(d), (std::vector<std::string>{"a.png", "b.png", "c.png"}));
}

// ---------------------------------------------------------------- training: checkpoints, signals, resume (unit)

struct MemorySource : tr::BatchSource {
  at::Tensor pixels;
  std::vector<std::string> captions = {"a red square", "a blue circle"};
  MemorySource() {
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(7);
    pixels = at::rand({2, 3, 32, 32}, g, at::TensorOptions().dtype(at::kFloat)) * 2 - 1;
  }
  tr::Batch get(int64_t step) override {
    tr::Batch b;
    b.pixel_values = pixels.narrow(0, step % 2, 1);
    b.captions = {captions[static_cast<size_t>(step % 2)]};
    b.indices = {step % 2};
    return b;
  }
  size_t size() const override { return 2; }
};

// A LoRA recipe that raises a signal while its n-th checkpoint is being written (extra_state is asked for after
// trainable.safetensors is in the temporary folder).
struct SignalInCheckpoint : tr::LoRARecipe {
  int sig, at, calls = 0;
  SignalInCheckpoint(std::shared_ptr<loaders::StableDiffusionModels> m, int sig_, int at_)
      : tr::LoRARecipe(std::move(m), tr::LoRATrainOptions{}, tr::LoRASaveFormat::Diffusers), sig(sig_), at(at_) {}
  io::TensorMap extra_state() override {
    if (++calls == at) ::raise(sig);
    return tr::LoRARecipe::extra_state();
  }
};

tr::TrainConfig small_config(const std::string& dir, int64_t steps) {
  tr::TrainConfig c;
  c.output_dir = dir;
  c.max_train_steps = steps;
  c.learning_rate = 1e-3;
  c.quiet = true;
  c.seed = 3;
  c.checkpointing_steps = 1;
  return c;
}

// The child half of OutputsTrainTiny.SignalDuringCheckpoint (run in a fresh process: forking a process whose OpenMP
// pool is up is not safe). Trains 3 steps, raising $DMX_TEST_SIGNAL during the 2nd checkpoint.
TEST(OutputsTrainChildTiny, RaiseDuringCheckpoint) {
  const char* dir = std::getenv("DMX_TEST_CHILD_DIR");
  if (!dir) GTEST_SKIP() << "run by OutputsTrainTiny.SignalDuringCheckpoint";
  install_temp_file_cleanup();
  const int sig = std::atoi(std::getenv("DMX_TEST_SIGNAL"));
  auto recipe = std::make_shared<SignalInCheckpoint>(loaders::load_stable_diffusion(tiny_model_dir("test")), sig, 2);
  tr::Trainer t(small_config(dir, 3), recipe, std::make_shared<MemorySource>());
  t.run();
}

int run_child(const std::string& dir, int sig) {
  const std::string cmd = "DMX_TEST_CHILD_DIR=" + quote(dir) + " DMX_TEST_SIGNAL=" + std::to_string(sig) + " " +
                          quote(fs::read_symlink("/proc/self/exe").string()) +
                          " --gtest_filter=OutputsTrainChildTiny.RaiseDuringCheckpoint >/dev/null 2>&1";
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Issue 13 item 10: SIGTERM/SIGINT while a checkpoint is written left checkpoint-N.tmp.<pid>/ behind (the handler
// knew only the file being written, not its folder); after a SIGKILL nothing removed it. Now the folder goes with
// the signal, and what a SIGKILL leaves is removed when training starts again (only our names, only dead pids).
TEST(OutputsTrainTiny, SignalDuringCheckpoint) {
  for (int sig : {SIGTERM, SIGINT}) {
    const std::string d = fresh("ckpt-signal" + std::to_string(sig));
    const int code = run_child(d, sig);
    EXPECT_EQ(code, 128 + sig) << "the child should end by the signal";
    const auto names = tree(d);
    EXPECT_FALSE(has_temporary(names)) << ::testing::PrintToString(names);
    EXPECT_TRUE(path_exists(d + "/checkpoint-1/trainer_state.json"));
    EXPECT_FALSE(path_exists(d + "/checkpoint-2"));
  }
  const std::string d = fresh("ckpt-kill");
  EXPECT_EQ(run_child(d, SIGKILL), 128 + SIGKILL);
  std::string left;
  for (const auto& n : tree(d))
    if (n.find("checkpoint-2.tmp.") == 0 && n.back() == '/') left = n;
  ASSERT_FALSE(left.empty()) << "a SIGKILL cannot be caught: the temporary stays until the next start";
  write_file(d + "/notes.tmp.999999", "not a name the trainer writes");
  fs::create_directories(d + "/checkpoint-7.tmp.1");  // pid 1 runs: not stale
  // Resuming removes the dead run's temporary, keeps the rest, and goes on from checkpoint-1.
  auto recipe = std::make_shared<tr::LoRARecipe>(loaders::load_stable_diffusion(tiny_model_dir("test")),
                                                 tr::LoRATrainOptions{}, tr::LoRASaveFormat::Diffusers);
  tr::TrainConfig c = small_config(d, 2);
  c.resume_from_checkpoint = d;
  tr::Trainer t(c, recipe, std::make_shared<MemorySource>());
  const tr::TrainResult r = t.run();
  EXPECT_EQ(r.first_step, 1);
  EXPECT_FALSE(path_exists(d + "/" + left));
  EXPECT_TRUE(path_exists(d + "/notes.tmp.999999"));
  EXPECT_TRUE(path_exists(d + "/checkpoint-7.tmp.1"));
  EXPECT_TRUE(path_exists(d + "/checkpoint-2/trainer_state.json"));
}

std::vector<int64_t> logged_steps(const std::string& dir) {
  std::vector<int64_t> steps;
  std::istringstream in(read_file(dir + "/train_log.jsonl"));
  for (std::string line; std::getline(in, line);)
    steps.push_back(nlohmann::json::parse(line).at("step").get<int64_t>());
  return steps;
}

// Issue 13 item 10: after a resume, train_log.jsonl held the steps after the checkpoint twice.
TEST(OutputsTrainTiny, ResumeCutsTheLogBackToTheCheckpoint) {
  const std::string d = fresh("log");
  auto run = [&](int64_t steps, const std::string& resume) {
    auto recipe = std::make_shared<tr::LoRARecipe>(loaders::load_stable_diffusion(tiny_model_dir("test")),
                                                   tr::LoRATrainOptions{}, tr::LoRASaveFormat::Diffusers);
    tr::TrainConfig c = small_config(d, steps);
    c.resume_from_checkpoint = resume;
    tr::Trainer t(c, recipe, std::make_shared<MemorySource>());
    return t.run();
  };
  run(4, "");
  EXPECT_EQ(logged_steps(d), (std::vector<int64_t>{1, 2, 3, 4}));
  // A torn last line (a kill in the middle of a write) goes too.
  std::ofstream(d + "/train_log.jsonl", std::ios::app) << "{\"step\": 5, \"lo";
  run(4, d + "/checkpoint-2");
  EXPECT_EQ(logged_steps(d), (std::vector<int64_t>{1, 2, 3, 4}));
  // Resumed at the last step: nothing to train, the checkpoint is not rewritten, the log is unchanged.
  const auto before = fs::last_write_time(d + "/checkpoint-4/trainable.safetensors");
  const tr::TrainResult r = run(4, d);
  EXPECT_EQ(r.steps, 4);
  EXPECT_EQ(r.last_checkpoint, d + "/checkpoint-4");
  EXPECT_EQ(fs::last_write_time(d + "/checkpoint-4/trainable.safetensors"), before);
  EXPECT_EQ(logged_steps(d), (std::vector<int64_t>{1, 2, 3, 4}));
}

// Issue 13 item 11: a caption with invalid UTF-8 (or a NUL byte) was found by the tokenizer in the middle of
// training; the dataset now reports it when it is opened, with the other bad rows.
TEST(OutputsDataUnit, InvalidCaptionsAreFoundWhenTheDatasetOpens) {
  const std::string d = image_folder("bad-captions");
  write_file(d + "/img1.txt", std::string("a red \xff square"));
  tr::DatasetOptions o;
  o.dir = d;
  o.resolution = 32;
  try {
    tr::ImageCaptionDataset ds(o);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("img1.txt"), std::string::npos) << m;
    EXPECT_NE(m.find("UTF-8"), std::string::npos) << m;
  }
  o.bad_rows = tr::BadRows::Skip;
  tr::ImageCaptionDataset ds(o);
  EXPECT_EQ(ds.size(), 1u);
  write_file(d + "/metadata.jsonl", "{\"file_name\": \"img0.png\", \"text\": \"nul \\u0000 byte\"}\n");
  o.bad_rows = tr::BadRows::Reject;
  EXPECT_THROW(tr::ImageCaptionDataset{o}, InvalidArgument);
}

// ---------------------------------------------------------------- the commands (CLI)

// Issue 13 item 1: training replaced an existing --output folder and everything in it (exit 0), and with
// --output equal to --data the training set was gone.
TEST(OutputsCli, TrainingNeverReplacesWhatItDidNotWrite) {
  const std::string model = tiny_model_dir("test");
  const std::string data = image_folder("train-data");
  const auto data_before = tree(data);
  const std::string h = fresh("train-h");
  fs::create_directories(h + "/docs");
  write_file(h + "/docs/t.txt", "x");
  const std::vector<std::string> base = {"--model", model,     "--data", data,     "--resolution",
                                         "32",      "--steps", "1",      "--quiet"};
  auto train = [&](const std::string& recipe, const std::string& out, std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"train", recipe};
    a.insert(a.end(), base.begin(), base.end());
    a.insert(a.end(), {"--output", out});
    a.insert(a.end(), extra.begin(), extra.end());
    return dmx_cmd(a);
  };
  for (const char* recipe : {"finetune", "vae"}) {
    expect_refused(train(recipe, h), {"--output", "already exists", "--overwrite"});
    expect_refused(train(recipe, h, {"--overwrite"}), {"is not a diffusers folder"});
    expect_refused(train(recipe, data), {"--output", "is the input --data"});
    expect_refused(train(recipe, data + "/sub"), {"lies inside the input --data"});
  }
  expect_refused(dmx_cmd({"train", "dreambooth", "--model", model, "--instance-data", data, "--instance-prompt", "sks",
                          "--resolution", "32", "--steps", "1", "--output", h}),
                 {"already exists"});
  EXPECT_EQ(read_file(h + "/docs/t.txt"), "x");
  EXPECT_EQ(tree(h), (std::vector<std::string>{"docs/", "docs/t.txt"}));
  EXPECT_EQ(tree(data), data_before);
  // What it wrote itself it replaces with --overwrite, and only then.
  const std::string out = fresh("train-out") + "/ft";
  ASSERT_EQ(train("finetune", out).code, 0);
  EXPECT_TRUE(path_exists(out + "/model_index.json"));
  expect_refused(train("finetune", out), {"already exists"});
  const CliResult again = train("finetune", out, {"--overwrite"});
  EXPECT_EQ(again.code, 0) << again.err;
  EXPECT_FALSE(has_temporary(tree(fs::path(out).parent_path().string())));
}

// Issue 13 item 2: outputs overwrote inputs (--save-latents over a checkpoint, a LoRA over its base model, a PNG
// given as a LoRA output) and each other (--save-control-image / --save-attention-maps / --mask-output equal to
// --output). Every such case is refused before anything is loaded.
TEST(OutputsCli, OutputsThatAreInputsOrEachOtherAreRefused) {
  const std::string m = model_copy("test");
  const std::string weights = m + "/unet/diffusion_pytorch_model.safetensors";
  const std::string weights_before = read_file(weights);
  const std::string d = fresh("inputs");
  const std::string data = image_folder("inputs-data");
  fs::create_directory_symlink(m + "/unet", d + "/unet-link");
  expect_refused(dmx_cmd(gen_args(m, d + "/o.png", {"--save-latents", weights})),
                 {"--save-latents", "lies inside the input --model"});
  expect_refused(
      dmx_cmd(gen_args(m, d + "/o.png", {"--save-latents", d + "/unet-link/diffusion_pytorch_model.safetensors"})),
      {"--save-latents", "--model"});
  expect_refused(dmx_cmd(gen_args(m, m + "/o.png")), {"--output", "lies inside the input --model"});
  const std::string cn = m + "/controlnet", edge = d + "/edge.png";
  Image img;
  img.width = img.height = 32;
  img.channels = 3;
  img.data.assign(32 * 32 * 3, 128);
  save_png(edge, img);
  expect_refused(dmx_cmd(gen_args(m, d + "/o.png",
                                  {"--controlnet", cn, "--control-image", edge, "--save-control-image", d + "/o.png"})),
                 {"--save-control-image", "are the same path"});
  expect_refused(dmx_cmd(gen_args(m, d + "/o.png",
                                  {"--num-images", "2", "--controlnet", cn, "--control-image", edge,
                                   "--save-control-image", d + "/o-1.png"})),
                 {"are the same path"});
  expect_refused(
      dmx_cmd(gen_args(m, d + "/o.png", {"--controlnet", cn, "--control-image", edge, "--save-control-image", edge})),
      {"is the input --control-image"});
  expect_refused(
      dmx_cmd({"p2p", "--model", m, "--prompt", "a cat", "--edit-prompt", "a dog", "--steps", "2", "--width", "32",
               "--height", "32", "--output", d + "/p.png", "--save-attention-maps", d + "/p-edit.png"}),
      {"--save-attention-maps", "same path"});
  expect_refused(dmx_cmd({"diffedit", "--model", m, "--image", edge, "--source-prompt", "a", "--target-prompt", "b",
                          "--steps", "2", "--output", d + "/e.png", "--mask-output", d + "/e.png"}),
                 {"--mask-output", "same path"});
  expect_refused(dmx_cmd({"diffedit", "--model", m, "--image", edge, "--source-prompt", "a", "--target-prompt", "b",
                          "--steps", "2", "--output", edge}),
                 {"is the input --image"});
  // train lora: over its base model, inside it, or a PNG.
  const std::vector<std::string> lora = {"train",        "lora", "--model", m,   "--data",  data,
                                         "--resolution", "32",   "--steps", "1", "--output"};
  auto with = [&](std::vector<std::string> a, std::vector<std::string> more) {
    a.insert(a.end(), more.begin(), more.end());
    return a;
  };
  expect_refused(dmx_cmd(with(lora, {m})), {"--output", "must end in .safetensors"});
  expect_refused(dmx_cmd(with(lora, {weights, "--overwrite"})), {"--output", "lies inside the input --model"});
  expect_refused(dmx_cmd(with(lora, {edge, "--overwrite"})), {"must end in .safetensors"});
  expect_refused(dmx_cmd(with(lora, {d + "/l.safetensors", "--output-dir", data})),
                 {"--output-dir", "is the input --data"});
  EXPECT_EQ(read_file(weights), weights_before);
  EXPECT_TRUE(path_exists(edge));
  // An existing output that the user made: refused without --overwrite, replaced with it.
  write_file(d + "/mine.png", "mine");
  expect_refused(dmx_cmd(gen_args(m, d + "/mine.png")), {"--output", "already exists"});
  EXPECT_EQ(read_file(d + "/mine.png"), "mine");
  const CliResult r = dmx_cmd(gen_args(m, d + "/mine.png", {"--overwrite"}));
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(read_file(d + "/mine.png"), "mine");
}

// Issue 13 item 3: resuming a checkpoint at or past --steps printed "wrote X" and exited 0 without writing X.
TEST(OutputsCli, ResumeAtOrPastTheLastStep) {
  const std::string data = image_folder("resume-data");
  const std::string d = fresh("resume");
  const std::string out = d + "/l.safetensors";
  const std::vector<std::string> base = {
      "train", "lora",     "--model", tiny_model_dir("test"), "--data", data, "--resolution",
      "32",    "--output", out,       "--checkpoint-every",   "1"};
  auto train = [&](std::vector<std::string> more) {
    std::vector<std::string> a = base;
    a.insert(a.end(), more.begin(), more.end());
    return dmx_cmd(a);
  };
  ASSERT_EQ(train({"--steps", "2"}).code, 0);
  const std::string first = read_file(out);
  fs::remove(out);
  expect_refused(train({"--steps", "1", "--resume", out + ".train"}), {"--resume", "past --steps 1"});
  EXPECT_FALSE(path_exists(out));
  const CliResult r = train({"--steps", "2", "--resume", out + ".train"});
  EXPECT_EQ(r.code, 0) << r.err;
  ASSERT_TRUE(path_exists(out)) << "resumed at the last step: the result is written from the checkpoint";
  EXPECT_EQ(read_file(out), first);
  // A fresh run into the same training folder: refused (it holds the earlier run), unless resumed or overwritten.
  fs::remove(out);
  expect_refused(train({"--steps", "2"}), {"--output-dir", "holds the checkpoints", "--resume"});
  expect_refused(train({"--steps", "2", "--resume", out + ".train/checkpoint-1"}), {"newer than the resumed step 1"});
  const CliResult o = train({"--steps", "1", "--overwrite"});
  EXPECT_EQ(o.code, 0) << o.err;
  EXPECT_EQ(tr::checkpoint_steps(out + ".train"), std::vector<int64_t>{1});
}

// Issue 13 item 11: failures that could be known up front came after the work. With a model that cannot load,
// the error about the output proves it is found first.
TEST(OutputsCli, ImpossibleOutputsAreFoundBeforeLoading) {
  const std::string bad = broken_model();
  const std::string d = fresh("upfront");
  const std::string data = image_folder("upfront-data");
  expect_refused(dmx_cmd(gen_args(bad, d + "/" + std::string(245, 'n') + ".png")), {"--output", "temporary suffix"});
  expect_refused(dmx_cmd(gen_args(bad, d + "/missing/o.png")), {"--output", "does not exist"});
  fs::create_directories(d + "/dir.safetensors");
  expect_refused(dmx_cmd({"train", "lora", "--model", bad, "--data", data, "--resolution", "32", "--steps", "1",
                          "--output", d + "/dir.safetensors"}),
                 {"--output", "is a folder"});
  expect_refused(dmx_cmd({"train", "finetune", "--model", bad, "--data", data, "--resolution", "32", "--steps", "1",
                          "--output", d + "/" + std::string(250, 'f')}),
                 {"--output", "temporary suffix"});
  EXPECT_EQ(tree(d), std::vector<std::string>{"dir.safetensors/"});
  if (!tmpfs_available()) GTEST_SKIP() << "no user namespaces (unshare -rm): the read-only folder case is skipped";
  std::vector<std::string> listing;
  const std::string ro = fresh("readonly");
  const CliResult r = dmx_on_tmpfs(ro, "ro,size=64k", gen_args(bad, ro + "/o.png"), &listing);
  expect_refused(r, {"--output", "cannot write into the folder", "Read-only"});
  EXPECT_TRUE(listing.empty());
}

// Issue 13 item 11: --num-images 3 on a full disk left 2 of the images (exit 2); p2p left -source.png when
// -edit.png failed. A full disk is not invalid input: exit 1, nothing partial. Tested on a private tmpfs sized
// to hold less than all the files.
TEST(OutputsCli, FullDiskLeavesNothingAndExits1) {
  if (!tmpfs_available()) GTEST_SKIP() << "no user namespaces (unshare -rm): cannot make a small tmpfs";
  const std::string m = tiny_model_dir("test");
  // The sizes of the three images, from a run on the real disk.
  const std::string d = fresh("fulldisk-ref");
  ASSERT_EQ(dmx_cmd(gen_args(m, d + "/o.png", {"--num-images", "3"})).code, 0);
  size_t pages = 0;
  for (int i = 0; i < 2; ++i) pages += (fs::file_size(d + "/o-" + std::to_string(i) + ".png") + 4095) / 4096;
  const std::string size = "size=" + std::to_string(pages * 4096);
  std::vector<std::string> listing;
  const std::string full = fresh("fulldisk");
  CliResult r = dmx_on_tmpfs(full, size, gen_args(m, full + "/o.png", {"--num-images", "3"}), &listing);
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("No space left on device"), std::string::npos) << r.err;
  EXPECT_EQ(listing, std::vector<std::string>{}) << "nothing partial may be left";
  // p2p: three pictures, room for one.
  const std::string p = fresh("fulldisk-p2p");
  r = dmx_on_tmpfs(p, "size=4k",
                   {"p2p", "--model", m, "--prompt", "a cat", "--edit-prompt", "a dog", "--steps", "2", "--width", "32",
                    "--height", "32", "--seed", "1", "--output", p + "/e.png", "--quiet"},
                   &listing);
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_EQ(listing, std::vector<std::string>{});
}

}  // namespace
}  // namespace dmx::test
