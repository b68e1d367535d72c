// Placeholder compiled only while src/training/distributed.cpp (dist branch) is absent from this tree:
// single-process environments work; a multi-process run throws dmx::Unsupported.
#include <cstdlib>

#include "dmx/error.h"
#include "training/distributed.h"

namespace dmx::training {
namespace {
[[noreturn]] void pending() {
  throw Unsupported("distributed training is not built into this dmx (src/training/distributed.cpp is missing)");
}
}  // namespace
DistributedEnv DistributedEnv::from_environment() {
  DistributedEnv e;
  const char* ws = std::getenv("WORLD_SIZE");
  if (ws && std::atoi(ws) > 1) pending();
  return e;
}
struct Distributed::Impl {};
Distributed::Distributed() = default;
Distributed::~Distributed() = default;
std::shared_ptr<Distributed> Distributed::create(const DistributedEnv&, const std::string&, double) { pending(); }
int Distributed::rank() const { pending(); }
int Distributed::world_size() const { pending(); }
int Distributed::local_rank() const { pending(); }
void Distributed::broadcast(const std::vector<at::Tensor>&, int) { pending(); }
void Distributed::all_reduce_mean_gradients(const std::vector<at::Tensor>&, size_t) { pending(); }
double Distributed::all_reduce_mean(double) { pending(); }
void Distributed::barrier() { pending(); }
}  // namespace dmx::training
