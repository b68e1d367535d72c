// Data-parallel training over torch.distributed (c10d): Gloo on CPU, NCCL on CUDA (when libtorch has it).
// Rendezvous from the variables torchrun sets (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK)
// through a c10d TCPStore (rank 0 hosts it). With WORLD_SIZE unset or 1 every operation is a local no-op.
// Mirrors what torch.nn.parallel.DistributedDataParallel does for the trainer: parameters broadcast from
// rank 0 at the start, gradients averaged over ranks in buckets (default 25 MiB) after backward.
// Internal header of the training layer: no c10d/gloo types leak out of distributed.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace dmx::training {

struct DistributedEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  // Reads the torchrun variables. Malformed values (non-numbers, rank >= world_size, port out of range):
  // InvalidArgument naming the variable, the rule and the value.
  static DistributedEnv from_environment();
};

class Distributed {
 public:
  // device "cpu" -> Gloo, "cuda" -> NCCL (Unsupported when this libtorch lacks it). Connects to the store
  // and waits for all ranks (timeout_s: IoError naming MASTER_ADDR:MASTER_PORT when ranks do not arrive).
  static std::shared_ptr<Distributed> create(const DistributedEnv& env, const std::string& device = "cpu",
                                             double timeout_s = 300);
  ~Distributed();
  int rank() const;
  int world_size() const;
  int local_rank() const;
  bool is_main() const { return rank() == 0; }
  // In place: every rank ends with rank `root`'s values.
  void broadcast(const std::vector<at::Tensor>& tensors, int root = 0);
  // Averages the .grad() of every parameter over the ranks, in flat buckets of at most bucket_bytes.
  // Parameters without a gradient are treated as zero gradients (every rank must pass the same list).
  void all_reduce_mean_gradients(const std::vector<at::Tensor>& params, size_t bucket_bytes = 25u << 20);
  // Mean of one number over the ranks (loss for logging).
  double all_reduce_mean(double v);
  void barrier();

 private:
  Distributed();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};
}  // namespace dmx::training
