// Original TencentARC T2I-Adapter names -> diffusers T2IAdapter names, as tables (see t2i_adapter_names.h and,
// for the table machinery, ldm_tables.h). Mirrors diffusers 0.27.2 scripts/convert_original_t2i_adapter.py
// (convert_adapter, convert_light_adapter), generalised from its fixed SD 1.x widths to any widths and depths.
#include <ATen/ATen.h>

#include <set>
#include <string>
#include <vector>

#include "core/text.h"
#include "dmx/error.h"
#include "io/ldm_tables.h"
#include "io/t2i_adapter_names.h"

namespace dmx::io {

using namespace ldm;

namespace {
const char* kWhat = "T2I-Adapter";
constexpr int kOriginalDownscale = 8;  // the original's nn.PixelUnshuffle(8)

// AdapterResnetBlock / LightAdapterResnetBlock: same names in both layouts.
const LeafTable kAdapterResnet = {{"block1", "block1"}, {"block2", "block2"}};

std::string s(int64_t v) { return std::to_string(v); }

bool any_key_with(const TensorMap& m, const std::string& part) {
  for (const auto& kv : m)
    if (kv.first.find(part) != std::string::npos) return true;
  return false;
}

// The full Adapter's blocks: body.<k * nrb + j>.
BlockTable full_table(int64_t levels, int64_t nrb) {
  BlockTable t;
  t["conv_in"] = {"adapter.conv_in", &kParamsOnly};
  for (int64_t k = 0; k < levels; ++k) {
    t["body." + s(k * nrb) + ".in_conv"] = {"adapter.body." + s(k) + ".in_conv", &kParamsOnly};
    for (int64_t j = 0; j < nrb; ++j)
      t["body." + s(k * nrb + j)] = {"adapter.body." + s(k) + ".resnets." + s(j), &kAdapterResnet};
  }
  return t;
}

// Adapter_light's blocks: body.<k>.{in_conv, body.<j>, out_conv}.
BlockTable light_table(int64_t blocks, int64_t nrb) {
  BlockTable t;
  for (int64_t k = 0; k < blocks; ++k) {
    t["body." + s(k) + ".in_conv"] = {"adapter.body." + s(k) + ".in_conv", &kParamsOnly};
    t["body." + s(k) + ".out_conv"] = {"adapter.body." + s(k) + ".out_conv", &kParamsOnly};
    for (int64_t j = 0; j < nrb; ++j)
      t["body." + s(k) + ".body." + s(j)] = {"adapter.body." + s(k) + ".resnets." + s(j), &kAdapterResnet};
  }
  return t;
}

int64_t conv_out(const TensorMap& m, const std::string& key) {
  const at::Tensor& w = need(m, key, kWhat);
  DMX_CHECK_FORMAT(w.dim() == 4, kWhat, ": '", key, "' must be a 4-D convolution weight, got ", w.sizes());
  return w.size(0);
}

int64_t in_channels_of(const at::Tensor& w, const std::string& key) {
  DMX_CHECK_FORMAT(w.dim() == 4 && w.size(1) % (kOriginalDownscale * kOriginalDownscale) == 0, kWhat, ": '", key,
                   "' must read in_channels x 64 unshuffled channels (a multiple of 64), got ", w.sizes());
  return w.size(1) / (kOriginalDownscale * kOriginalDownscale);
}
}  // namespace

T2IAdapterLayout t2i_adapter_layout(const TensorMap& state) {
  if (has(state, "adapter.body.0.resnets.0.block1.weight")) return T2IAdapterLayout::Diffusers;
  if (has(state, "conv_in.weight") && has(state, "body.0.block1.weight")) return T2IAdapterLayout::OriginalFull;
  if (has(state, "body.0.in_conv.weight") && has(state, "body.0.body.0.block1.weight"))
    return T2IAdapterLayout::OriginalLight;
  return T2IAdapterLayout::None;
}

nlohmann::json detect_original_t2i_adapter_config(const TensorMap& state, int num_res_blocks) {
  const T2IAdapterLayout layout = t2i_adapter_layout(state);
  DMX_CHECK_FORMAT(layout == T2IAdapterLayout::OriginalFull || layout == T2IAdapterLayout::OriginalLight, kWhat,
                   ": not an original TencentARC adapter (no conv_in + body.0.block1, nor body.0.in_conv + "
                   "body.0.body.0.block1)");
  DMX_CHECK_SUPPORTED(!any_key_with(state, ".skep."), kWhat,
                      ": this adapter has `skep` convolutions (TencentARC's sk=False variant), which diffusers' "
                      "T2IAdapter cannot express");
  DMX_CHECK_SUPPORTED(!any_key_with(state, ".down_opt."), kWhat,
                      ": this adapter downsamples with convolutions (`down_opt.op`, TencentARC's use_conv=True), "
                      "which diffusers' T2IAdapter cannot express");
  const std::set<int64_t> body = indices(state, "body.");
  DMX_CHECK_FORMAT(!body.empty() && contiguous_from(body, 0, static_cast<int64_t>(body.size())), kWhat,
                   ": body.<n> blocks must be numbered 0, 1, ... without gaps");
  const int64_t n = static_cast<int64_t>(body.size());
  nlohmann::json cfg{{"_class_name", "T2IAdapter"}, {"downscale_factor", kOriginalDownscale}};

  if (layout == T2IAdapterLayout::OriginalFull) {
    DMX_CHECK_ARG(num_res_blocks >= 1, kWhat, ": num_res_blocks must be >= 1, got ", num_res_blocks);
    const int64_t nrb = num_res_blocks;
    DMX_CHECK_FORMAT(n % nrb == 0, kWhat, ": ", n, " body blocks are not levels of ", nrb,
                     " res blocks (pass the adapter's num_res_blocks if it is not TencentARC's 2)");
    const int64_t levels = n / nrb;
    cfg["in_channels"] = in_channels_of(need(state, "conv_in.weight", kWhat), "conv_in.weight");
    std::vector<int64_t> channels;
    for (int64_t k = 0; k < levels; ++k) {
      const int64_t c = conv_out(state, "body." + s(k * nrb) + ".block1.weight");
      channels.push_back(c);
      const int64_t prev = k == 0 ? conv_out(state, "conv_in.weight") : channels[k - 1];
      const bool has_in_conv = has(state, "body." + s(k * nrb) + ".in_conv.weight");
      DMX_CHECK_FORMAT(has_in_conv == (prev != c), kWhat, ": level ", k, " goes from ", prev, " to ", c,
                       " channels but ", has_in_conv ? "has" : "lacks", " an in_conv (body.", k * nrb,
                       ".in_conv); with num_res_blocks ", nrb, " the levels do not line up");
      for (int64_t j = 1; j < nrb; ++j)
        DMX_CHECK_FORMAT(!has(state, "body." + s(k * nrb + j) + ".in_conv.weight"), kWhat, ": body.", k * nrb + j,
                         ".in_conv is not at the start of a level of ", nrb,
                         " res blocks (pass the adapter's num_res_blocks if it is not TencentARC's 2)");
      const at::Tensor& b2 = need(state, "body." + s(k * nrb) + ".block2.weight", kWhat);
      DMX_CHECK_SUPPORTED(b2.dim() == 4 && b2.size(2) == 1 && b2.size(3) == 1, kWhat, ": block2 is a ",
                          b2.dim() == 4 ? b2.size(2) : 0,
                          "x-kernel convolution (TencentARC's ksize 3 variant); diffusers' T2IAdapter has 1x1");
    }
    cfg["channels"] = channels;
    cfg["num_res_blocks"] = nrb;
    cfg["adapter_type"] = "full_adapter";
    return cfg;
  }

  // Adapter_light: n extractors; diffusers' LightAdapter has len(channels) + 1 blocks, the last keeping the
  // width of the one before.
  DMX_CHECK_FORMAT(n >= 2, kWhat, ": a light adapter needs at least 2 body blocks, got ", n);
  const int64_t nrb = static_cast<int64_t>(indices(state, "body.0.body.").size());
  DMX_CHECK_FORMAT(nrb >= 1, kWhat, ": body.0 has no res blocks (body.0.body.<j>)");
  cfg["in_channels"] = in_channels_of(need(state, "body.0.in_conv.weight", kWhat), "body.0.in_conv.weight");
  std::vector<int64_t> widths;
  for (int64_t k = 0; k < n; ++k) {
    DMX_CHECK_FORMAT(static_cast<int64_t>(indices(state, "body." + s(k) + ".body.").size()) == nrb, kWhat, ": body.", k,
                     " has another number of res blocks than body.0 (", nrb, ")");
    widths.push_back(conv_out(state, "body." + s(k) + ".out_conv.weight"));
  }
  DMX_CHECK_SUPPORTED(widths[n - 1] == widths[n - 2], kWhat, ": the last light block widens from ", widths[n - 2],
                      " to ", widths[n - 1], " channels; diffusers' LightAdapter keeps the width in its last block");
  cfg["channels"] = std::vector<int64_t>(widths.begin(), widths.end() - 1);
  cfg["num_res_blocks"] = nrb;
  cfg["adapter_type"] = "light_adapter";
  return cfg;
}

TensorMap convert_original_t2i_adapter(const TensorMap& state, const nlohmann::json& cfg) {
  const size_t nch = cfg_list_size(cfg, "channels", kWhat);
  const int64_t nrb = cfg_int(cfg, "num_res_blocks", kWhat);
  DMX_CHECK_FORMAT(nrb >= 1 && nrb <= 64, kWhat, " config: num_res_blocks must be in [1, 64], got ", nrb);
  DMX_CHECK_FORMAT(cfg.contains("adapter_type") && cfg["adapter_type"].is_string(), kWhat,
                   " config: 'adapter_type' must be a string");
  const std::string type = cfg["adapter_type"].get<std::string>();
  BlockTable t;
  if (type == "full_adapter")
    t = full_table(static_cast<int64_t>(nch), nrb);
  else if (type == "light_adapter")
    t = light_table(static_cast<int64_t>(nch) + 1, nrb);
  else
    throw Unsupported(std::string(kWhat) + ": original checkpoints come as full_adapter or light_adapter, not '" +
                      type + "'");
  Converted c = convert_with(
      state, "", t, [](const std::string&) { return false; }, [](std::string k) { return k; });
  DMX_CHECK_FORMAT(c.unmatched.empty(), kWhat, ": ", c.unmatched.size(),
                   " key(s) match no layer of an original TencentARC ", type, " with ", nch, " channel entries and ",
                   nrb, " res blocks: ", join_abbreviated(c.unmatched));
  return std::move(c.out);
}
}  // namespace dmx::io
