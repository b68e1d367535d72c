// Data-parallel training over c10d/Gloo: environment validation, and real 2-process runs on loopback. The
// parent test re-executes this test binary twice (RANK 0 and 1) with a gtest filter selecting
// DistributedWorkerTiny.*, which does nothing unless DMX_DIST_WORKER is set.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "core/image.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "test_util.h"
#include "training/dataset.h"
#include "training/distributed.h"

extern char** environ;

namespace fs = std::filesystem;
using namespace dmx;
using namespace dmx::training;

namespace {

struct EnvGuard {
  std::vector<std::pair<std::string, std::string>> saved;
  std::vector<std::string> unset_after;
  void set(const std::string& k, const char* v) {
    if (const char* old = std::getenv(k.c_str()))
      saved.emplace_back(k, old);
    else
      unset_after.push_back(k);
    if (v)
      setenv(k.c_str(), v, 1);
    else
      unsetenv(k.c_str());
  }
  ~EnvGuard() {
    for (auto& [k, v] : saved) setenv(k.c_str(), v.c_str(), 1);
    for (auto& k : unset_after) unsetenv(k.c_str());
  }
};

void expect_env_error(const std::map<std::string, const char*>& vars, const std::string& needle) {
  EnvGuard g;
  for (const char* k : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) g.set(k, nullptr);
  for (const auto& [k, v] : vars) g.set(k, v);
  try {
    DistributedEnv::from_environment();
    ADD_FAILURE() << "expected InvalidArgument containing '" << needle << "'";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

int free_port() {
  const int s = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  close(s);
  return port;
}

// Runs `world` copies of this binary as ranks of one job; returns their exit codes (-1 on timeout).
std::vector<int> run_ranks(int world, const std::string& mode, const std::string& out_dir, const std::string& data = "",
                           double timeout_s = 90) {
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  const std::string port = std::to_string(free_port());
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    std::vector<std::string> env_s;
    for (char** e = environ; *e; ++e) {
      const std::string kv = *e;
      bool drop = false;
      for (const char* k : {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "MASTER_ADDR=", "MASTER_PORT=", "DMX_DIST_"})
        if (kv.rfind(k, 0) == 0) drop = true;
      if (!drop) env_s.push_back(kv);
    }
    env_s.push_back("RANK=" + std::to_string(r));
    env_s.push_back("LOCAL_RANK=" + std::to_string(r));
    env_s.push_back("WORLD_SIZE=" + std::to_string(world));
    env_s.push_back("MASTER_ADDR=127.0.0.1");
    env_s.push_back("MASTER_PORT=" + port);
    env_s.push_back("DMX_DIST_WORKER=" + mode);
    env_s.push_back("DMX_DIST_OUT=" + out_dir);
    if (!data.empty()) env_s.push_back("DMX_DIST_DATA=" + data);
    env_s.push_back("OMP_NUM_THREADS=1");
    std::vector<char*> envp;
    for (auto& s : env_s) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string filter = "--gtest_filter=DistributedWorkerTiny.Run";
    std::vector<char*> argv{const_cast<char*>(self.c_str()), filter.data(), nullptr};
    pid_t pid = 0;
    const int rc = posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv.data(), envp.data());
    EXPECT_EQ(rc, 0) << "posix_spawn failed";
    pids.push_back(rc == 0 ? pid : -1);
  }
  std::vector<int> codes(static_cast<size_t>(world), -1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  size_t done = 0;
  std::vector<bool> finished(pids.size(), false);
  while (done < pids.size()) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (finished[i] || pids[i] <= 0) {
        if (!finished[i]) finished[i] = true, ++done;
        continue;
      }
      int status = 0;
      if (waitpid(pids[i], &status, WNOHANG) == pids[i]) {
        codes[i] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        finished[i] = true;
        ++done;
      }
    }
    if (std::chrono::steady_clock::now() > deadline) {
      for (size_t i = 0; i < pids.size(); ++i)
        if (!finished[i]) {
          kill(pids[i], SIGKILL);
          waitpid(pids[i], nullptr, 0);
        }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return codes;
}

// A small data-parallel training run: a 2-layer conv net denoising the dataset's images, AdamW, per-example
// noise seeded by the example's place in the global batch (so any split over ranks draws the same noise),
// gradients averaged over ranks. Rank 1 starts from different weights: the broadcast from rank 0 must fix that.
struct TinyTrainResult {
  at::Tensor params, initial;
  double last_loss = 0;
};
TinyTrainResult tiny_train(const std::string& data, Distributed* dist, int batch_per_rank, int steps) {
  const int rank = dist->rank(), world = dist->world_size();
  torch::manual_seed(1234 + rank);
  torch::nn::Sequential net(torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 6, 3).padding(1)), torch::nn::SiLU(),
                            torch::nn::Conv2d(torch::nn::Conv2dOptions(6, 3, 3).padding(1)));
  std::vector<at::Tensor> params = net->parameters();
  dist->broadcast(params, 0);
  auto flat = [&] {
    std::vector<at::Tensor> v;
    for (auto& p : params) v.push_back(p.detach().reshape({-1}));
    return at::cat(v);
  };
  TinyTrainResult res;
  res.initial = flat();
  DatasetOptions o;
  o.dir = data;
  o.resolution = 8;
  o.center_crop = false;
  o.random_flip = true;
  ImageCaptionDataset ds(o);
  BatchSampler sampler(ds.size(), batch_per_rank, rank, world, 7);
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
  for (int step = 0; step < steps; ++step) {
    const uint64_t aug = sampler.augment_seed(step) + static_cast<uint64_t>(rank) * batch_per_rank;
    const Batch b = ds.collate(sampler.indices(step), aug);
    std::vector<at::Tensor> noise;
    for (int k = 0; k < batch_per_rank; ++k) {
      at::Generator g = at::make_generator<at::CPUGeneratorImpl>(aug + k + 1000);
      noise.push_back(at::randn({3, 8, 8}, g));
    }
    const at::Tensor eps = at::stack(noise);
    const at::Tensor pred = net->forward(b.pixel_values + 0.5 * eps);
    const at::Tensor loss = at::mse_loss(pred, eps);
    opt.zero_grad();
    loss.backward();
    dist->all_reduce_mean_gradients(params, 64);
    opt.step();
    res.last_loss = dist->all_reduce_mean(loss.item<double>());
  }
  res.params = flat();
  return res;
}

std::string make_data(const std::string& name) {
  const std::string d = test::temp_dir() + "/" + name;
  fs::remove_all(d);
  fs::create_directories(d);
  for (int i = 0; i < 5; ++i) {
    Image img;
    img.width = 12 + 4 * i;
    img.height = 12;
    img.channels = 3;
    img.data.resize(static_cast<size_t>(img.width) * img.height * 3);
    for (size_t k = 0; k < img.data.size(); ++k) img.data[k] = static_cast<uint8_t>((k * 37 + i * 101) % 251);
    save_png(d + "/im" + std::to_string(i) + ".png", img);
    std::ofstream(d + "/im" + std::to_string(i) + ".txt") << "image " << i;
  }
  return d;
}
}  // namespace

TEST(DistributedUnit, EnvironmentDefaultsAndValidation) {
  {
    EnvGuard g;
    for (const char* k : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) g.set(k, nullptr);
    const DistributedEnv env = DistributedEnv::from_environment();
    EXPECT_EQ(env.rank, 0);
    EXPECT_EQ(env.world_size, 1);
    EXPECT_EQ(env.master_addr, "127.0.0.1");
    EXPECT_EQ(env.master_port, 29500);
    g.set("WORLD_SIZE", "4");
    g.set("RANK", "3");
    g.set("LOCAL_RANK", "1");
    g.set("MASTER_ADDR", "10.0.0.2");
    g.set("MASTER_PORT", "1234");
    const DistributedEnv e2 = DistributedEnv::from_environment();
    EXPECT_EQ(e2.rank, 3);
    EXPECT_EQ(e2.world_size, 4);
    EXPECT_EQ(e2.local_rank, 1);
    EXPECT_EQ(e2.master_addr, "10.0.0.2");
    EXPECT_EQ(e2.master_port, 1234);
  }
  expect_env_error({{"WORLD_SIZE", "two"}}, "WORLD_SIZE must be an integer, got 'two'");
  expect_env_error({{"WORLD_SIZE", "0"}}, "WORLD_SIZE must be >= 1, got 0");
  expect_env_error({{"WORLD_SIZE", "2"}, {"RANK", "2"}}, "RANK must be < WORLD_SIZE (2), got 2");
  expect_env_error({{"WORLD_SIZE", "2"}, {"RANK", "-1"}}, "RANK must be >= 0, got -1");
  expect_env_error({{"WORLD_SIZE", "2"}}, "RANK must be set when WORLD_SIZE is 2");
  expect_env_error({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_PORT", "70000"}},
                   "MASTER_PORT must be in [1, 65535], got 70000");
  expect_env_error({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_PORT", "12x"}}, "MASTER_PORT must be an integer");
  expect_env_error({{"WORLD_SIZE", "2"}, {"RANK", "0"}, {"LOCAL_RANK", "1"}}, "LOCAL_RANK must be <= RANK");
}

TEST(DistributedUnit, SingleProcessIsLocalNoOp) {
  auto d = Distributed::create(DistributedEnv{});
  EXPECT_EQ(d->world_size(), 1);
  EXPECT_TRUE(d->is_main());
  at::Tensor p = at::ones({3}).requires_grad_(true);
  p.mutable_grad() = at::full({3}, 2.0);
  d->all_reduce_mean_gradients({p});
  EXPECT_TRUE(at::equal(p.grad(), at::full({3}, 2.0)));
  EXPECT_EQ(d->all_reduce_mean(1.5), 1.5);
  d->barrier();
  DistributedEnv bad;
  bad.world_size = 2;
  bad.rank = 0;
  EXPECT_THROW(Distributed::create(bad, "cuda"), Unsupported);
  EXPECT_THROW(Distributed::create(bad, "tpu"), InvalidArgument);
}

TEST(DistributedUnit, RendezvousTimeoutNamesTheAddress) {
  DistributedEnv env;  // rank 1 of 2 with nobody hosting the store
  env.world_size = 2;
  env.rank = 1;
  env.master_port = free_port();
  try {
    Distributed::create(env, "cpu", 1.0);
    FAIL() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("127.0.0.1:" + std::to_string(env.master_port)), std::string::npos)
        << e.what();
  }
}

// The worker half of the tests below (skipped unless launched by them).
TEST(DistributedWorkerTiny, Run) {
  const char* mode = std::getenv("DMX_DIST_WORKER");
  if (!mode) GTEST_SKIP() << "only runs as a rank launched by the DistributedTiny.* tests";
  const std::string out = std::getenv("DMX_DIST_OUT");
  auto d = Distributed::create(DistributedEnv::from_environment(), "cpu", 60);
  const int r = d->rank();
  io::TensorMap result;
  if (std::string(mode) == "collectives") {
    // broadcast from rank 0 and from rank 1, in buckets.
    std::vector<at::Tensor> ts{at::full({5}, r + 1.0), at::full({2, 3}, 10.0 * (r + 1)).to(at::kDouble)};
    d->broadcast(ts, 0);
    result["bcast0_a"] = ts[0];
    result["bcast0_b"] = ts[1];
    at::Tensor t1 = at::arange(4, at::kFloat) * (r + 1);
    d->broadcast({t1}, 1);
    result["bcast1"] = t1;
    // Gradients: rank r has (r + 1) * arange; one parameter has no gradient on rank 0; tiny buckets.
    at::Tensor p0 = at::zeros({3, 4}).requires_grad_(true), p1 = at::zeros({7}).requires_grad_(true),
               p2 = at::zeros({2}).requires_grad_(true);
    p0.mutable_grad() = at::arange(12, at::kFloat).view({3, 4}) * (r + 1);
    p1.mutable_grad() = at::arange(7, at::kFloat) * (r + 1);
    if (r == 1) p2.mutable_grad() = at::full({2}, 4.0);
    d->all_reduce_mean_gradients({p0, p1, p2}, 24);
    result["g0"] = p0.grad();
    result["g1"] = p1.grad();
    result["g2"] = p2.grad();
    result["mean"] = at::full({1}, d->all_reduce_mean(r * 2.0 + 1.0), at::kDouble);
    d->barrier();
  } else {
    TinyTrainResult res = tiny_train(std::getenv("DMX_DIST_DATA"), d.get(), 2, 3);
    result["params"] = res.params;
    result["loss"] = at::full({1}, res.last_loss, at::kDouble);
  }
  io::save_safetensors(out + "/rank" + std::to_string(r) + ".safetensors", result);
}

TEST(DistributedTiny, TwoProcessCollectivesOnLoopback) {
  const std::string out = test::temp_dir() + "/dist_collectives";
  fs::remove_all(out);
  fs::create_directories(out);
  const std::vector<int> codes = run_ranks(2, "collectives", out);
  ASSERT_EQ(codes, (std::vector<int>{0, 0})) << "a rank failed or timed out (-1)";
  for (int r = 0; r < 2; ++r) {
    const io::TensorMap m = io::load_safetensors(out + "/rank" + std::to_string(r) + ".safetensors");
    EXPECT_TRUE(at::equal(m.at("bcast0_a"), at::full({5}, 1.0))) << "rank " << r;
    EXPECT_TRUE(at::equal(m.at("bcast0_b"), at::full({2, 3}, 10.0).to(at::kDouble))) << "rank " << r;
    EXPECT_TRUE(at::equal(m.at("bcast1"), at::arange(4, at::kFloat) * 2)) << "rank " << r;
    EXPECT_TRUE(at::equal(m.at("g0"), at::arange(12, at::kFloat).view({3, 4}) * 1.5)) << "rank " << r;
    EXPECT_TRUE(at::equal(m.at("g1"), at::arange(7, at::kFloat) * 1.5)) << "rank " << r;
    EXPECT_TRUE(at::equal(m.at("g2"), at::full({2}, 2.0))) << "rank " << r;
    EXPECT_EQ(m.at("mean").item<double>(), 2.0) << "rank " << r;
  }
}

TEST(DistributedTiny, TwoProcessTrainingEqualsOneProcess) {
  const std::string data = make_data("dist_train_data");
  const std::string out = test::temp_dir() + "/dist_train";
  fs::remove_all(out);
  fs::create_directories(out);
  const std::vector<int> codes = run_ranks(2, "train", out, data);
  ASSERT_EQ(codes, (std::vector<int>{0, 0})) << "a rank failed or timed out (-1)";
  // One process with the same global batch (2 ranks x 2 = 4).
  auto single = Distributed::create(DistributedEnv{});
  const TinyTrainResult ref = tiny_train(data, single.get(), 4, 3);
  const io::TensorMap r0 = io::load_safetensors(out + "/rank0.safetensors");
  const io::TensorMap r1 = io::load_safetensors(out + "/rank1.safetensors");
  EXPECT_TRUE(at::equal(r0.at("params"), r1.at("params"))) << "ranks ended with different weights";
  DMX_EXPECT_CLOSE("2-process vs 1-process weights after 3 steps", r0.at("params"), ref.params, 1e-5);
  EXPECT_NEAR(r0.at("loss").item<double>(), ref.last_loss, 1e-5 * std::abs(ref.last_loss));
  // Training moved the weights (the comparison is not trivially between initial values).
  EXPECT_GT((ref.params - ref.initial).abs().max().item<double>(), 1e-4);
}
