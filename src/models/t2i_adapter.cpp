// T2IAdapter / MultiAdapter (diffusers 0.27.2 models/adapter.py: FullAdapter, FullAdapterXL, AdapterBlock,
// AdapterResnetBlock, LightAdapter, LightAdapterBlock, LightAdapterResnetBlock, MultiAdapter.forward).
#include "models/t2i_adapter.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/conv.h>

#include <cmath>

#include "core/tensor_util.h"
#include "dmx/error.h"
#include "models/config_json.h"
#include "models/unet_2d_condition.h"
#include "nn/layers.h"

namespace dmx::models {

namespace {
const char* kWhat = "T2IAdapter config";
namespace tnn = torch::nn;

tnn::Conv2d conv(int64_t in, int64_t out, int64_t k) {
  return tnn::Conv2d(tnn::Conv2dOptions(in, out, k).padding(k / 2));
}

// nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)
at::Tensor avg_pool_down(const at::Tensor& x) { return at::avg_pool2d(x, {2, 2}, {2, 2}, {0, 0}, true, true); }

// AdapterResnetBlock (block2 1x1) and LightAdapterResnetBlock (block2 3x3): x + block2(relu(block1(x))).
class ResBlockImpl : public tnn::Module {
 public:
  ResBlockImpl(int64_t channels, int64_t k2) {
    block1 = register_module("block1", conv(channels, channels, 3));
    block2 = register_module("block2", conv(channels, channels, k2));
  }
  at::Tensor forward(const at::Tensor& x) { return block2->forward(at::relu(block1->forward(x))) + x; }
  tnn::Conv2d block1{nullptr}, block2{nullptr};
};
TORCH_MODULE(ResBlock);

// AdapterBlock (light = false) and LightAdapterBlock (light = true).
class AdapterBlockImpl : public tnn::Module {
 public:
  AdapterBlockImpl(int64_t in, int64_t out, int64_t num_res_blocks, bool down, bool light) : down_(down) {
    const int64_t mid = light ? out / 4 : out;
    if (light || in != out) in_conv = register_module("in_conv", conv(in, mid, 1));
    auto rs = nn::make_container(*this, "resnets");
    for (int64_t j = 0; j < num_res_blocks; ++j)
      resnets.push_back(rs->register_module(std::to_string(j), ResBlock(mid, light ? 3 : 1)));
    if (light) out_conv = register_module("out_conv", conv(mid, out, 1));
  }
  at::Tensor forward(at::Tensor x) {
    if (down_) x = avg_pool_down(x);
    if (in_conv) x = in_conv->forward(x);
    for (auto& r : resnets) x = r->forward(x);
    if (out_conv) x = out_conv->forward(x);
    return x;
  }
  tnn::Conv2d in_conv{nullptr}, out_conv{nullptr};
  std::vector<ResBlock> resnets;

 private:
  bool down_;
};
TORCH_MODULE(AdapterBlock);
}  // namespace

// ---------------------------------------------------------------------------------------------------
T2IAdapterConfig T2IAdapterConfig::from_json(const nlohmann::json& j) {
  using cfgjson::get;
  DMX_CHECK_FORMAT(j.is_object(), kWhat, ": expected a JSON object, got ", j.type_name());
  T2IAdapterConfig c;
  get(j, kWhat, "in_channels", c.in_channels);
  get(j, kWhat, "channels", c.channels);
  get(j, kWhat, "num_res_blocks", c.num_res_blocks);
  get(j, kWhat, "downscale_factor", c.downscale_factor);
  get(j, kWhat, "adapter_type", c.adapter_type);
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(std::string(kWhat) + ": " + e.what());
  }
  return c;
}

nlohmann::json T2IAdapterConfig::to_json() const {
  return {{"_class_name", "T2IAdapter"},          {"adapter_type", adapter_type}, {"channels", channels},
          {"downscale_factor", downscale_factor}, {"in_channels", in_channels},   {"num_res_blocks", num_res_blocks}};
}

T2IAdapterConfig T2IAdapterConfig::sd15_full(int in_channels) {
  // TencentARC/t2iadapter_sketch_sd15v2 config.json (in_channels 1; depth, openpose, ...: 3).
  T2IAdapterConfig c;
  c.in_channels = in_channels;
  return c;
}

T2IAdapterConfig T2IAdapterConfig::sd14_color() {
  // TencentARC/t2iadapter_color_sd14v1 config.json.
  T2IAdapterConfig c;
  c.channels = {320, 640, 1280};
  c.num_res_blocks = 4;
  c.adapter_type = "light_adapter";
  return c;
}

void T2IAdapterConfig::validate() const {
  DMX_CHECK_SUPPORTED(
      adapter_type == "full_adapter" || adapter_type == "light_adapter" || adapter_type == "full_adapter_xl",
      "adapter_type '", adapter_type, "' is not supported (full_adapter, light_adapter, full_adapter_xl)");
  DMX_CHECK_ARG(in_channels > 0 && in_channels <= 64, "in_channels must be in [1, 64], got ", in_channels);
  DMX_CHECK_ARG(downscale_factor > 0 && downscale_factor <= 64, "downscale_factor must be in [1, 64], got ",
                downscale_factor);
  DMX_CHECK_ARG(num_res_blocks > 0 && num_res_blocks <= 64, "num_res_blocks must be in [1, 64], got ", num_res_blocks);
  DMX_CHECK_ARG(!channels.empty() && channels.size() <= 16, "channels must have 1 to 16 entries, got ",
                channels.size());
  if (adapter_type == "full_adapter_xl") {
    DMX_CHECK_ARG(channels.size() >= 3, "channels must have at least 3 entries for full_adapter_xl, got ",
                  channels.size());
    // FullAdapterXL's blocks after the third keep their width (AdapterBlock(channels[i], channels[i]) reads
    // the block before it).
    for (size_t i = 3; i < channels.size(); ++i)
      DMX_CHECK_ARG(channels[i] == channels[i - 1], "channels[", i, "] must equal channels[", i - 1,
                    "] for full_adapter_xl (its blocks after the third keep the width), got ", channels[i], " and ",
                    channels[i - 1]);
  }
  for (size_t i = 0; i < channels.size(); ++i) {
    DMX_CHECK_ARG(channels[i] > 0 && channels[i] <= 16384, "channels[", i, "] must be in [1, 16384], got ",
                  channels[i]);
    if (adapter_type == "light_adapter")
      DMX_CHECK_ARG(channels[i] >= 4, "channels[", i,
                    "] must be >= 4 for light_adapter (it works at a quarter "
                    "of the width), got ",
                    channels[i]);
  }
}

int T2IAdapterConfig::total_downscale_factor() const {
  const int n = static_cast<int>(channels.size());
  if (adapter_type == "light_adapter") return downscale_factor * (1 << n);
  if (adapter_type == "full_adapter_xl") return downscale_factor * 2;
  return downscale_factor * (1 << (n - 1));
}

size_t T2IAdapterConfig::num_features() const { return channels.size() + (adapter_type == "light_adapter" ? 1 : 0); }

std::vector<int> T2IAdapterConfig::feature_widths() const {
  std::vector<int> w = channels;
  if (adapter_type == "light_adapter" && !w.empty()) w.push_back(w.back());
  return w;
}

void check_t2i_adapter_matches_unet(const T2IAdapterConfig& c, const UNet2DConditionConfig& unet, int vae_f,
                                    const std::string& w) {
  if (c.adapter_type == "full_adapter_xl") return;
  DMX_CHECK_ARG(c.downscale_factor == vae_f, w, ": the adapter's downscale_factor is ", c.downscale_factor,
                " but the model's VAE downscales by ", vae_f, " (features would not fit the latents)");
  const std::vector<int> fw = c.feature_widths();
  DMX_CHECK_ARG(fw.size() <= unet.block_out_channels.size(), w, ": the adapter has ", fw.size(),
                " features but the UNet has ", unet.block_out_channels.size(), " down blocks");
  for (size_t k = 0; k < fw.size(); ++k)
    DMX_CHECK_ARG(fw[k] == unet.block_out_channels[k], w, ": feature ", k, " is ", fw[k],
                  " channels wide but UNet down block ", k, " is ", unet.block_out_channels[k],
                  " (an adapter made for another model)");
  // Where feature k is added: inside a cross-attention block, before its downsampler; after a plain block, so after
  // its downsampler when it has one (every block but the last). Feature k is at 1/2^k of the latents, so a plain
  // block with a downsampler would get it at twice its size.
  const size_t nb = unet.down_block_types.size();
  for (size_t k = 0; k < fw.size() && k < nb; ++k) {
    const bool cross = unet.down_block_types[k].find("CrossAttn") != std::string::npos;
    DMX_CHECK_ARG(cross || k + 1 == nb, w, ": feature ", k, " would be added after UNet down block ", k, " (",
                  unet.down_block_types[k],
                  ") and its downsampler, at half the feature's size; T2I-Adapters fit UNets whose down blocks "
                  "before the last have cross-attention (as Stable Diffusion's)");
  }
}

double T2IAdapterConfig::num_parameters() const {
  auto conv = [](double in, double out, double k) { return in * out * k * k + out; };
  const double f = downscale_factor, in = static_cast<double>(in_channels) * f * f, nrb = num_res_blocks;
  const size_t n = channels.size();
  double total = 0;
  if (adapter_type == "light_adapter") {  // blocks: in_conv to out/4, res blocks 3x3 + 3x3, out_conv
    for (size_t k = 0; k <= n; ++k) {
      const double c_in = k == 0 ? in : channels[k - 1], c_out = k == n ? channels[n - 1] : channels[k];
      const double mid = std::floor(c_out / 4);
      total += conv(c_in, mid, 1) + nrb * (conv(mid, mid, 3) + conv(mid, mid, 3)) + conv(mid, c_out, 1);
    }
    return total;
  }
  total = conv(in, channels[0], 3);  // conv_in
  for (size_t k = 0; k < n; ++k) {   // blocks: in_conv when the width changes, res blocks 3x3 + 1x1
    const double c = channels[k], prev = k == 0 ? channels[0] : channels[k - 1];
    if (prev != c) total += conv(prev, c, 1);
    total += nrb * (conv(c, c, 3) + conv(c, c, 1));
  }
  return total;
}

// ---------------------------------------------------------------------------------------------------
struct T2IAdapterImpl::Parts {
  tnn::Conv2d conv_in{nullptr};  // full adapters only
  std::vector<AdapterBlock> body;
};

T2IAdapterImpl::T2IAdapterImpl(const T2IAdapterConfig& cfg) : cfg_(cfg), parts_(std::make_shared<Parts>()) {
  cfg_.validate();
  Parts& p = *parts_;
  auto adapter = nn::make_container(*this, "adapter");  // diffusers' T2IAdapter.adapter (unshuffle: no params)
  const auto& ch = cfg_.channels;
  const int64_t n = static_cast<int64_t>(ch.size());
  const int64_t in = static_cast<int64_t>(cfg_.in_channels) * cfg_.downscale_factor * cfg_.downscale_factor;
  const int64_t nrb = cfg_.num_res_blocks;
  std::shared_ptr<tnn::Module> body;
  auto add = [&](int64_t i, int64_t c_in, int64_t c_out, bool down, bool light) {
    p.body.push_back(body->register_module(std::to_string(i), AdapterBlock(c_in, c_out, nrb, down, light)));
  };
  if (cfg_.adapter_type == "light_adapter") {
    body = nn::make_container(*adapter, "body");
    add(0, in, ch[0], false, true);
    for (int64_t i = 0; i + 1 < n; ++i) add(i + 1, ch[i], ch[i + 1], true, true);
    add(n, ch[n - 1], ch[n - 1], true, true);
  } else {
    p.conv_in = adapter->register_module("conv_in", conv(in, ch[0], 3));
    body = nn::make_container(*adapter, "body");
    if (cfg_.adapter_type == "full_adapter") {
      add(0, ch[0], ch[0], false, false);
      for (int64_t i = 1; i < n; ++i) add(i, ch[i - 1], ch[i], true, false);
    } else {  // full_adapter_xl: one downsampling block (the third)
      for (int64_t i = 0; i < n; ++i) {
        if (i == 1)
          add(i, ch[0], ch[1], false, false);
        else if (i == 2)
          add(i, ch[1], ch[2], true, false);
        else
          add(i, ch[i], ch[i], false, false);
      }
    }
  }
}

std::vector<at::Tensor> T2IAdapterImpl::forward(const at::Tensor& x) {
  const int64_t f = cfg_.downscale_factor;
  DMX_CHECK_ARG(x.defined() && x.dim() == 4 && x.size(1) == cfg_.in_channels, "T2I-Adapter input must be [B, ",
                cfg_.in_channels, ", H, W] (", cfg_.in_channels == 1 ? "a grayscale" : "an RGB",
                " control picture in [0, 1]), got ", x.defined() ? shape_string(x) : std::string("nothing"));
  DMX_CHECK_ARG(x.size(2) > 0 && x.size(3) > 0 && x.size(2) % f == 0 && x.size(3) % f == 0,
                "T2I-Adapter input height and width must be positive multiples of downscale_factor ", f, ", got ",
                x.size(2), "x", x.size(3));
  Parts& p = *parts_;
  const at::Tensor& w = p.body.front()->resnets.front()->block1->weight;
  at::Tensor h = at::pixel_unshuffle(x.to(w.scalar_type()), f);  // [B, C f^2, H/f, W/f], channel c f^2 + f dy + dx
  if (p.conv_in) h = p.conv_in->forward(h);
  std::vector<at::Tensor> features;
  for (auto& block : p.body) {
    h = block->forward(h);
    features.push_back(h);  // [B, channels[k], H / f_k, W / f_k]
  }
  return features;
}

// ---------------------------------------------------------------------------------------------------
std::vector<at::Tensor> multi_adapter_features(std::vector<T2IAdapter>& adapters, const std::vector<at::Tensor>& xs,
                                               const std::optional<std::vector<double>>& weights) {
  const size_t n = adapters.size();
  DMX_CHECK_ARG(n >= 1, "MultiAdapter: at least one adapter is needed");
  DMX_CHECK_ARG(xs.size() == n, "MultiAdapter: one control picture per adapter (", n, "), got ", xs.size());
  if (weights)
    DMX_CHECK_ARG(weights->size() == n, "MultiAdapter: one weight per adapter (", n, "), got ", weights->size());
  for (size_t i = 1; i < n; ++i) {
    const T2IAdapterConfig &a = adapters[0]->config(), &b = adapters[i]->config();
    DMX_CHECK_ARG(a.total_downscale_factor() == b.total_downscale_factor() && a.downscale_factor == b.downscale_factor,
                  "MultiAdapter: every adapter must downscale alike; adapter 0 has downscale_factor ",
                  a.downscale_factor, " (total ", a.total_downscale_factor(), "), adapter ", i, " has ",
                  b.downscale_factor, " (total ", b.total_downscale_factor(), ")");
  }
  std::vector<at::Tensor> acc;
  for (size_t i = 0; i < n; ++i) {
    // torch.tensor(adapter_weights): float32 scalars (1 / N when no weights are given).
    const at::Tensor w = at::scalar_tensor(weights ? (*weights)[i] : 1.0 / static_cast<double>(n), at::kFloat);
    std::vector<at::Tensor> f = adapters[i]->forward(xs[i]);
    if (i == 0) {
      for (auto& t : f) acc.push_back(w.to(t.scalar_type()) * t);
      continue;
    }
    DMX_CHECK_ARG(f.size() == acc.size(), "MultiAdapter: adapter ", i, " returns ", f.size(),
                  " features, adapter 0 returns ", acc.size());
    for (size_t k = 0; k < f.size(); ++k) {
      DMX_CHECK_ARG(f[k].sizes().equals(acc[k].sizes()), "MultiAdapter: feature ", k, " of adapter ", i, " is ",
                    shape_string(f[k]), ", adapter 0's is ", shape_string(acc[k]));
      acc[k] = acc[k] + w.to(f[k].scalar_type()) * f[k];
    }
  }
  return acc;
}
}  // namespace dmx::models
