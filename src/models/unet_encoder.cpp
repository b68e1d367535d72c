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

bool IntrablockResiduals::next_fits(at::IntArrayRef hidden) const {
  if (!pending()) return false;
  const at::Tensor& r = (*features)[next];
  return r.defined() && r.dim() == static_cast<int64_t>(hidden.size()) && hidden.size() >= 2 &&
         (r.size(0) == hidden[0] || r.size(0) == 1) && r.sizes().slice(1).equals(hidden.slice(1));
}

at::Tensor IntrablockResiduals::take(at::IntArrayRef hidden, at::ScalarType dtype) {
  DMX_CHECK_ARG(pending(), "down_intrablock_additional_residuals: no feature left");
  DMX_CHECK_ARG(next_fits(hidden), "down_intrablock_additional_residuals[", next,
                "] must match the hidden states it is added to, ", hidden, " (batch 1 is broadcast), got ",
                shape_string((*features)[next]));
  return (*features)[next++].to(dtype);
}

at::Tensor run_down_blocks(std::vector<nn::DownBlock2D>& blocks, at::Tensor h, const at::Tensor& emb,
                           const at::Tensor& ctx, bool checkpoint, std::vector<at::Tensor>& res,
                           TensorRecorder* recorder, IntrablockResiduals* intrablock) {
  for (size_t i = 0; i < blocks.size(); ++i) {
    nn::DownBlock2D& block = blocks[i];
    // diffusers: a block with cross-attention takes the feature inside (after its last resnet + attention
    // pair, before the downsampler); any other block gets it added to its output afterwards.
    const bool inside = block->has_cross_attention() && intrablock && intrablock->pending();
    at::Tensor extra;
    if (inside) extra = intrablock->take({h.size(0), block->out_channels(), h.size(2), h.size(3)}, h.scalar_type());
    nn::DownBlockOutput o;
    if (checkpoint) {  // inputs: h, emb, ctx[, extra]; outputs: hidden_states, res_samples...
      std::vector<at::Tensor> args{h, emb, ctx};
      if (extra.defined()) args.push_back(extra);
      auto out = nn::checkpoint(
          [blk = block.ptr()](const std::vector<at::Tensor>& x) {
            nn::DownBlockOutput r = blk->forward(x[0], x[1], x[2], x.size() > 3 ? x[3] : at::Tensor());
            std::vector<at::Tensor> v{r.hidden_states};
            v.insert(v.end(), r.res_samples.begin(), r.res_samples.end());
            return v;
          },
          args);
      o.hidden_states = out[0];
      o.res_samples.assign(out.begin() + 1, out.end());
    } else {
      o = block->forward(h, emb, ctx, extra);
    }
    if (!block->has_cross_attention() && intrablock && intrablock->pending()) {
      // diffusers adds in place to the block's output, which is the same tensor as its last skip.
      o.hidden_states = o.hidden_states + intrablock->take(o.hidden_states.sizes(), o.hidden_states.scalar_type());
      o.res_samples.back() = o.hidden_states;
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
