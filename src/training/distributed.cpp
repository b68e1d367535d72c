// Data-parallel training over c10d (see distributed.h). Mirrors torch.distributed.init_process_group
// ("env://" rendezvous: a TCPStore hosted by rank 0 at MASTER_ADDR:MASTER_PORT) and the gradient averaging of
// DistributedDataParallel (flat buckets, all-reduce SUM, then divide by the world size).
// Under torchrun's static rendezvous (TORCHELASTIC_USE_AGENT_STORE=True) the launcher's agent already hosts the
// store at MASTER_ADDR:MASTER_PORT: every rank connects as a client, under the key prefix
// "/worker/attempt_<TORCHELASTIC_RESTART_COUNT>", as torch.distributed.rendezvous._create_c10d_store does.
// Gloo picks its network device as torch does: GLOO_SOCKET_IFNAME when set, the loopback address when
// MASTER_ADDR is a loopback address (single machine), else the address this host's name resolves to.
// CUDA: ProcessGroupNCCL (one GPU per rank, LOCAL_RANK's), compiled only when CMake found NCCL in libtorch
// (USE_C10D_NCCL); otherwise a CUDA device with more than one rank is Unsupported.
#include "training/distributed.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if defined(USE_C10D_NCCL)  // set by CMake when this libtorch has NCCL (see CMakeLists.txt)
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <map>

#include "dmx/error.h"

namespace dmx::training {

namespace {

const char* env_or_null(const char* name) {
  const char* v = std::getenv(name);
  return (v && *v) ? v : nullptr;
}

int parse_env_int(const char* name, const char* value, long lo, long hi, const char* rule) {
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  DMX_CHECK_ARG(end != value && *end == '\0' && errno == 0, name, " must be an integer, got '", value, "'");
  DMX_CHECK_ARG(v >= lo && v <= hi, name, " must be ", rule, ", got ", v);
  return static_cast<int>(v);
}

bool is_loopback(const std::string& addr) { return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1"; }
}  // namespace

DistributedEnv DistributedEnv::from_environment() {
  DistributedEnv env;
  const char* ws = env_or_null("WORLD_SIZE");
  if (ws) env.world_size = parse_env_int("WORLD_SIZE", ws, 1, 1 << 20, ">= 1");
  const char* rank = env_or_null("RANK");
  if (rank) {
    env.rank = parse_env_int("RANK", rank, 0, INT_MAX, ">= 0");
    DMX_CHECK_ARG(env.rank < env.world_size, "RANK must be < WORLD_SIZE (", env.world_size, "), got ", env.rank);
  } else {
    DMX_CHECK_ARG(env.world_size == 1, "RANK must be set when WORLD_SIZE is ", env.world_size,
                  " (launch with torchrun or set RANK=0..", env.world_size - 1, " on each process)");
  }
  const char* lr = env_or_null("LOCAL_RANK");
  env.local_rank = lr ? parse_env_int("LOCAL_RANK", lr, 0, INT_MAX, ">= 0") : env.rank;
  if (lr)
    DMX_CHECK_ARG(env.local_rank <= env.rank, "LOCAL_RANK must be <= RANK (", env.rank, "), got ", env.local_rank);
  if (const char* a = env_or_null("MASTER_ADDR")) env.master_addr = a;
  if (const char* p = env_or_null("MASTER_PORT"))
    env.master_port = parse_env_int("MASTER_PORT", p, 1, 65535, "in [1, 65535]");
  return env;
}

struct Distributed::Impl {
  DistributedEnv env;
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;  // CPU
#if defined(USE_C10D_NCCL)
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl;  // CUDA
#endif
  at::Device device = at::kCPU;  // where the collectives' tensors live
  bool active() const { return env.world_size > 1; }
  // Runs f on the process group in use (Gloo or NCCL: the same collective calls, no common base class across
  // libtorch versions).
  template <class F>
  c10::intrusive_ptr<c10d::Work> call(F&& f) {
#if defined(USE_C10D_NCCL)
    if (nccl) return f(*nccl);
#endif
    return f(*pg);
  }
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) {
    try {
      work->wait();
    } catch (const std::exception& e) {
      throw IoError(std::string("distributed ") + what + " failed on rank " + std::to_string(env.rank) +
                    " (another rank may have stopped): " + e.what());
    }
  }
};

Distributed::Distributed() : impl_(std::make_unique<Impl>()) {}
Distributed::~Distributed() = default;
int Distributed::rank() const { return impl_->env.rank; }
int Distributed::world_size() const { return impl_->env.world_size; }
int Distributed::local_rank() const { return impl_->env.local_rank; }

std::shared_ptr<Distributed> Distributed::create(const DistributedEnv& env, const std::string& device,
                                                 double timeout_s) {
  DMX_CHECK_ARG(env.world_size >= 1 && env.rank >= 0 && env.rank < env.world_size,
                "RANK must be in [0, WORLD_SIZE) = [0, ", env.world_size, "), got ", env.rank);
  DMX_CHECK_ARG(env.master_port >= 1 && env.master_port <= 65535, "MASTER_PORT must be in [1, 65535], got ",
                env.master_port);
  DMX_CHECK_ARG(timeout_s > 0, "distributed timeout must be > 0 seconds, got ", timeout_s);
  DMX_CHECK_ARG(device == "cpu" || device == "cuda" || device.rfind("cuda:", 0) == 0,
                "--device must be cpu or cuda[:N] for distributed training, got '", device, "'");
  std::shared_ptr<Distributed> d(new Distributed());
  d->impl_->env = env;
  if (env.world_size == 1) return d;
#if !defined(USE_C10D_NCCL)
  DMX_CHECK_SUPPORTED(device == "cpu", "distributed training on ", device,
                      " needs NCCL, and this libtorch was built without it (Debian's libtorch is CPU-only); "
                      "train with --device cpu (Gloo) or build dmx against a CUDA libtorch with NCCL");
#endif
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);
  const char* agent = env_or_null("TORCHELASTIC_USE_AGENT_STORE");
  const bool agent_store = agent && std::string(agent) == "True";
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(env.master_port);
    so.isServer = !agent_store && env.rank == 0;
    // Every rank (clients included) must announce itself: the server otherwise waits out the whole timeout.
    so.numWorkers = static_cast<size_t>(env.world_size);
    so.waitWorkers = true;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    if (agent_store) {
      const char* attempt = env_or_null("TORCHELASTIC_RESTART_COUNT");
      d->impl_->store =
          c10::make_intrusive<c10d::PrefixStore>(std::string("/worker/attempt_") + (attempt ? attempt : "0"), tcp);
    } else {
      d->impl_->store = tcp;
    }
  } catch (const std::exception& e) {
    throw IoError("distributed rendezvous at MASTER_ADDR:MASTER_PORT = " + where + " failed on rank " +
                  std::to_string(env.rank) + " of " + std::to_string(env.world_size) +
                  " (is the port free on rank 0, reachable from the others, and did all ranks start?): " + e.what());
  }
#if defined(USE_C10D_NCCL)
  if (device != "cpu") {
    // One GPU per rank: LOCAL_RANK's unless the device names one (torchrun's convention).
    int index = env.local_rank;
    if (device != "cuda") {
      const std::string n = device.substr(5);
      DMX_CHECK_ARG(!n.empty() && n.size() < 4 && n.find_first_not_of("0123456789") == std::string::npos,
                    "--device must be cpu or cuda[:N], got '", device, "'");
      index = std::stoi(n);
    }
    try {
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(index));
      d->impl_->device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      d->impl_->nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(d->impl_->store, env.rank, env.world_size, opts);
    } catch (const std::exception& e) {
      throw IoError("distributed: NCCL could not set up rank " + std::to_string(env.rank) + " of " +
                    std::to_string(env.world_size) + " on cuda:" + std::to_string(index) + " (rendezvous " + where +
                    "): " + e.what());
    }
    return d;
  }
#endif
  try {
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    if (const char* ifname = env_or_null("GLOO_SOCKET_IFNAME"))
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    else if (is_loopback(env.master_addr))
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    else
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    opts->threads = 2;
    d->impl_->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(d->impl_->store, env.rank, env.world_size, opts);
  } catch (const std::exception& e) {
    throw IoError("distributed: Gloo could not connect rank " + std::to_string(env.rank) + " of " +
                  std::to_string(env.world_size) + " (rendezvous " + where +
                  "; set GLOO_SOCKET_IFNAME to the network interface to use): " + e.what());
  }
  return d;
}

namespace {
// Groups tensors by (dtype, device) and cuts each group into buckets of at most `bucket_bytes` (a tensor larger
// than a bucket gets its own).
std::vector<std::vector<size_t>> make_buckets(const std::vector<at::Tensor>& ts, size_t bucket_bytes) {
  std::map<std::pair<int, std::string>, std::vector<size_t>> groups;
  std::vector<std::pair<int, std::string>> order;
  for (size_t i = 0; i < ts.size(); ++i) {
    auto key = std::make_pair(static_cast<int>(ts[i].scalar_type()), ts[i].device().str());
    if (!groups.count(key)) order.push_back(key);
    groups[key].push_back(i);
  }
  std::vector<std::vector<size_t>> buckets;
  for (const auto& key : order) {
    std::vector<size_t> cur;
    size_t bytes = 0;
    for (size_t i : groups[key]) {
      const size_t b = static_cast<size_t>(ts[i].numel()) * ts[i].element_size();
      if (!cur.empty() && bytes + b > bucket_bytes) {
        buckets.push_back(std::move(cur));
        cur.clear();
        bytes = 0;
      }
      cur.push_back(i);
      bytes += b;
    }
    if (!cur.empty()) buckets.push_back(std::move(cur));
  }
  return buckets;
}

at::Tensor flatten(const std::vector<at::Tensor>& ts, const std::vector<size_t>& idx) {
  std::vector<at::Tensor> parts;
  parts.reserve(idx.size());
  for (size_t i : idx) parts.push_back(ts[i].reshape({-1}));
  return at::cat(parts);  // [sum numel]
}

void unflatten_into(const at::Tensor& flat, const std::vector<at::Tensor>& ts, const std::vector<size_t>& idx) {
  int64_t off = 0;
  for (size_t i : idx) {
    const int64_t n = ts[i].numel();
    ts[i].copy_(flat.narrow(0, off, n).view(ts[i].sizes()));
    off += n;
  }
}
}  // namespace

void Distributed::broadcast(const std::vector<at::Tensor>& tensors, int root) {
  DMX_CHECK_ARG(root >= 0 && root < world_size(), "broadcast root must be in [0, ", world_size(), "), got ", root);
  if (!impl_->active() || tensors.empty()) return;
  at::NoGradGuard no_grad;
  for (const auto& bucket : make_buckets(tensors, 25u << 20)) {
    std::vector<at::Tensor> flat{flatten(tensors, bucket)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    impl_->wait(impl_->call([&](auto& pg) { return pg.broadcast(flat, opts); }), "broadcast");
    if (rank() != root) unflatten_into(flat[0], tensors, bucket);
  }
}

void Distributed::all_reduce_mean_gradients(const std::vector<at::Tensor>& params, size_t bucket_bytes) {
  if (!impl_->active() || params.empty()) return;
  DMX_CHECK_ARG(bucket_bytes > 0, "gradient bucket size must be > 0 bytes");
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (const auto& p : params) {
    at::Tensor g = p.grad();
    if (!g.defined()) {
      g = at::zeros_like(p);
      p.mutable_grad() = g;
    }
    grads.push_back(g);
  }
  const double ws = static_cast<double>(world_size());
  for (const auto& bucket : make_buckets(grads, bucket_bytes)) {
    std::vector<at::Tensor> flat{flatten(grads, bucket)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    impl_->wait(impl_->call([&](auto& pg) { return pg.allreduce(flat, opts); }), "gradient all-reduce");
    flat[0].div_(ws);
    unflatten_into(flat[0], grads, bucket);
  }
}

double Distributed::all_reduce_mean(double v) {
  if (!impl_->active()) return v;
  std::vector<at::Tensor> t{at::full({1}, v, at::TensorOptions().dtype(at::kDouble).device(impl_->device))};
  impl_->wait(impl_->call([&](auto& pg) { return pg.allreduce(t); }), "all-reduce");
  return t[0].item<double>() / world_size();
}

void Distributed::barrier() {
  if (!impl_->active()) return;
  impl_->wait(impl_->call([&](auto& pg) { return pg.barrier(); }), "barrier");
}
}  // namespace dmx::training
