// The encoder UNet2DConditionModel and ControlNetModel share (see unet_encoder.h).
#include "models/unet_encoder.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "dmx/error.h"
#include "nn/checkpoint.h"

namespace dmx::models {

at::Tensor batch_timesteps(const at::Tensor& timestep, int64_t batch) {
  DMX_CHECK_ARG(timestep.defined(), "timestep must be given (0-d or [B])");
  const at::Tensor t = timestep.dim() == 0 ? timestep.unsqueeze(0) : timestep;
  DMX_CHECK_ARG(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == batch), "timestep must be 0-d, [1] or [", batch,
                "], got ", shape_string(timestep));
  return t.expand({batch});
}

at::Tensor run_down_blocks(std::vector<nn::DownBlock2D>& blocks, at::Tensor h, const at::Tensor& emb,
                           const at::Tensor& ctx, bool checkpoint, std::vector<at::Tensor>& res,
                           TensorRecorder* recorder) {
  for (size_t i = 0; i < blocks.size(); ++i) {
    nn::DownBlockOutput o;
    if (checkpoint) {  // outputs: hidden_states, res_samples...
      auto out = nn::checkpoint(
          [blk = blocks[i].ptr()](const std::vector<at::Tensor>& x) {
            nn::DownBlockOutput r = blk->forward(x[0], x[1], x[2]);
            std::vector<at::Tensor> v{r.hidden_states};
            v.insert(v.end(), r.res_samples.begin(), r.res_samples.end());
            return v;
          },
          {h, emb, ctx});
      o.hidden_states = out[0];
      o.res_samples.assign(out.begin() + 1, out.end());
    } else {
      o = blocks[i]->forward(h, emb, ctx);
    }
    h = o.hidden_states;
    res.insert(res.end(), o.res_samples.begin(), o.res_samples.end());
    record(recorder, "down_blocks." + std::to_string(i), h);
  }
  return h;
}

at::Tensor run_mid_block(nn::UNetMidBlock2DCrossAttn& mid, const at::Tensor& h, const at::Tensor& emb,
                         const at::Tensor& ctx, bool checkpoint) {
  if (!checkpoint) return mid->forward(h, emb, ctx);
  return nn::checkpoint(
      [blk = mid.ptr()](const std::vector<at::Tensor>& x) {
        return std::vector<at::Tensor>{blk->forward(x[0], x[1], x[2])};
      },
      {h, emb, ctx})[0];
}

void get_uniform_int(const nlohmann::json& j, const char* what, const char* key, size_t n, int& out) {
  std::vector<int> v;
  if (!cfgjson::get_int_or_list(j, what, key, n, v)) return;
  if (v.empty()) throw FormatError(std::string(what) + ": field '" + key + "' is an empty list");
  if (!std::all_of(v.begin(), v.end(), [&](int x) { return x == v.front(); }))
    throw Unsupported(std::string(what) + ": per-block " + key + " " + j.at(key).dump() +
                      " is not supported (one value for all blocks only)");
  out = v.front();
}
}  // namespace dmx::models
