// LCMScheduler's own timestep settings (diffusers 0.27.2 scheduling_lcm.py, set_timesteps' keyword arguments),
// beyond the common set_timesteps(num_inference_steps). Private to src/schedulers, the pipelines and the tests.
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "schedulers/scheduler.h"

namespace dmx::schedulers {

struct LCMTimestepOptions {
  int num_inference_steps = 0;                  // 0 with custom_timesteps
  std::optional<int> original_inference_steps;  // unset: the config's (50)
  std::vector<int64_t> custom_timesteps;        // descending training timesteps; exclusive with num_inference_steps
  double strength = 1.0;                        // (0, 1]: LatentConsistencyModelImg2ImgPipeline's schedule
};

// set_timesteps(num_inference_steps=, original_inference_steps=, timesteps=, strength=) of diffusers'
// LCMScheduler on a scheduler made by create_scheduler("lcm" / "LCMScheduler", ...). InvalidArgument, naming
// the rule, for what diffusers raises on (and for an `sched` of another class).
void set_lcm_timesteps(Scheduler& sched, const LCMTimestepOptions& options);

}  // namespace dmx::schedulers
