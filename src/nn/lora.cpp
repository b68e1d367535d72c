// LoRA / LoCon / LoHa / LoKr / DoRA layer math (see lora.h): peft 0.10 tuners/lora/layer.py and
// LyCORIS modules/{locon,loha,lokr}.py, weight-difference form and runtime form.
#include "nn/lora.h"

#include <limits>

#include "dmx/error.h"

namespace dmx::nn {

namespace {

at::Tensor as_matrix(const at::Tensor& t) { return t.reshape({t.size(0), -1}); }

// LyCORIS make_weight_tucker: rebuild = einsum("i j k l, j r, i p -> p r k l", t, wb, wa).
at::Tensor tucker(const at::Tensor& t, const at::Tensor& wa, const at::Tensor& wb) {
  return at::einsum("ijkl,jr,ip->prkl", {t.to(at::kFloat), as_matrix(wb.to(at::kFloat)), as_matrix(wa.to(at::kFloat))});
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat); }

// Norm of w over every dim but `axis` (0: per output row, 1: per input column), keeping dims.
at::Tensor axis_norm(const at::Tensor& w, int axis) {
  if (axis == 0) {
    std::vector<int64_t> shape(static_cast<size_t>(w.dim()), 1);
    shape[0] = w.size(0);
    return as_matrix(w).norm(2, {1}).reshape(shape);
  }
  std::vector<int64_t> shape(static_cast<size_t>(w.dim()), 1);
  shape[1] = w.size(1);
  return w.transpose(0, 1).reshape({w.size(1), -1}).norm(2, {1}).reshape(shape);
}

}  // namespace

at::Tensor lora_delta_weight(const LoRAAdapter& a, at::IntArrayRef weight_shape) {
  at::Tensor d;
  switch (a.kind) {
    case LoRAKind::LoRA:
      if (a.mid.defined()) {  // Tucker LoCon: down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1]
        d = at::einsum("or,rqhw,qi->oihw", {as_matrix(f32(a.up)), f32(a.mid), as_matrix(f32(a.down))});
      } else {  // [out, r] @ [r, in * kh * kw]
        d = at::matmul(as_matrix(f32(a.up)), as_matrix(f32(a.down)));
      }
      break;
    case LoRAKind::LoHa: {
      at::Tensor w1 =
          a.t1.defined() ? tucker(a.t1, a.w1a, a.w1b) : at::matmul(as_matrix(f32(a.w1a)), as_matrix(f32(a.w1b)));
      at::Tensor w2 =
          a.t2.defined() ? tucker(a.t2, a.w2a, a.w2b) : at::matmul(as_matrix(f32(a.w2a)), as_matrix(f32(a.w2b)));
      d = w1.reshape(weight_shape) * w2.reshape(weight_shape);
      break;
    }
    case LoRAKind::LoKr: {
      at::Tensor w1 = a.w1b.defined() ? at::matmul(f32(a.w1a), f32(a.w1b)) : f32(a.w1a);
      at::Tensor w2;
      if (!a.w2b.defined()) {
        w2 = f32(a.w2a);
      } else if (a.t2.defined()) {
        w2 = tucker(a.t2, a.w2a, a.w2b);
      } else {
        w2 = at::matmul(as_matrix(f32(a.w2a)), as_matrix(f32(a.w2b)));
      }
      if (w2.dim() == 4 && w1.dim() == 2) w1 = w1.unsqueeze(2).unsqueeze(2);
      d = at::kron(w1, w2);
      break;
    }
    case LoRAKind::Full:
      d = f32(a.diff);
      break;
  }
  DMX_CHECK_FORMAT(d.numel() == c10::multiply_integers(weight_shape), "LoRA (", a.source,
                   "): the adapter's weight difference has shape ", d.sizes(), ", the layer's weight ", weight_shape);
  d = d.reshape(weight_shape);
  if (a.alpha_scale != 1.0) d = d * a.alpha_scale;
  return d;
}

at::Tensor lora_contribution(const LoRAAdapter& a, const at::Tensor& w0) {
  const at::Tensor dw = lora_delta_weight(a, w0.sizes());
  switch (a.dora) {
    case DoRAStyle::None:
      return a.scale == 1.0 ? dw : dw * a.scale;
    case DoRAStyle::PEFT: {  // peft: weight_norm = ||W + scaling * BA|| over dim 1, m / norm per output row
      const at::Tensor wc = w0 + dw * a.scale;
      const at::Tensor n = axis_norm(wc, 0);
      return f32(a.magnitude).reshape(n.sizes()) / n * wc - w0;
    }
    case DoRAStyle::LyCORIS: {  // LyCORIS apply_weight_decompose on W + dW, eps = finfo(float32).eps
      const at::Tensor wc = w0 + dw;
      const bool on_out = a.magnitude.size(0) == w0.size(0) && a.magnitude.numel() == w0.size(0);
      const at::Tensor n = axis_norm(wc, on_out ? 0 : 1) + std::numeric_limits<float>::epsilon();
      const at::Tensor merged = wc * (f32(a.magnitude).reshape(n.sizes()) / n);
      return a.scale == 1.0 ? merged - w0 : (merged - w0) * a.scale;
    }
  }
  return dw;
}

void lora_attach(LoRAState& s, at::Tensor& weight, std::shared_ptr<const LoRAAdapter> a) {
  DMX_CHECK_ARG(a != nullptr, "lora_attach: adapter must not be null");
  lora_unmerge(s, weight);
  s.adapters.push_back(std::move(a));
  s.runtime_weights.clear();
}

void lora_clear(LoRAState& s, at::Tensor& weight) {
  lora_unmerge(s, weight);
  s.adapters.clear();
  s.runtime_weights.clear();
}

void lora_merge(LoRAState& s, at::Tensor& weight) {
  if (s.merged() || s.adapters.empty()) return;
  at::NoGradGuard no_grad;
  const at::Tensor w0 = weight.detach().to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor merged = w0.clone();
  for (const auto& a : s.adapters) merged += lora_contribution(*a, w0);
  s.original_weight = weight.detach().clone();
  weight.detach().copy_(merged.to(weight.scalar_type()));
}

void lora_unmerge(LoRAState& s, at::Tensor& weight) {
  if (!s.merged()) return;
  at::NoGradGuard no_grad;
  weight.detach().copy_(s.original_weight);
  s.original_weight = at::Tensor();
}

namespace {

// Full contributions of the adapters that have no low-rank runtime path (LoHa, LoKr, Full, DoRA), cached.
const at::Tensor& runtime_weight(LoRAState& s, size_t i, const at::Tensor& weight) {
  if (s.runtime_weights.size() != s.adapters.size()) s.runtime_weights.assign(s.adapters.size(), at::Tensor());
  if (!s.runtime_weights[i].defined()) {
    at::NoGradGuard no_grad;
    s.runtime_weights[i] = lora_contribution(*s.adapters[i], weight.detach().to(at::kFloat)).to(weight.scalar_type());
  }
  return s.runtime_weights[i];
}

bool low_rank(const LoRAAdapter& a) { return a.kind == LoRAKind::LoRA && a.dora == DoRAStyle::None; }

}  // namespace

at::Tensor lora_runtime_linear(LoRAState& s, const at::Tensor& weight, const at::Tensor& /*bias*/, const at::Tensor& x,
                               const at::Tensor& base_out) {
  at::Tensor y = base_out;
  for (size_t i = 0; i < s.adapters.size(); ++i) {
    const LoRAAdapter& a = *s.adapters[i];
    if (low_rank(a)) {
      // peft Linear: result + lora_B(lora_A(x)) * scaling, scaling = alpha / r * scale
      y = y + at::linear(at::linear(x, a.down), a.up) * (a.alpha_scale * a.scale);
    } else {
      y = y + at::linear(x, runtime_weight(s, i, weight));
    }
  }
  return y;
}

at::Tensor lora_runtime_conv2d(LoRAState& s, const at::Tensor& weight, const at::Tensor& /*bias*/,
                               const ConvGeometry& g, const at::Tensor& x, const at::Tensor& base_out) {
  at::Tensor y = base_out;
  for (size_t i = 0; i < s.adapters.size(); ++i) {
    const LoRAAdapter& a = *s.adapters[i];
    if (low_rank(a)) {
      // peft Conv2d: lora_A is a conv with the base kernel / stride / padding, lora_B a 1x1 conv.
      at::Tensor h;
      if (a.mid.defined()) {
        h = at::conv2d(x, a.down);
        h = at::conv2d(h, a.mid, {}, g.stride, g.padding, g.dilation, g.groups);
      } else {
        h = at::conv2d(x, a.down, {}, g.stride, g.padding, g.dilation, g.groups);
      }
      y = y + at::conv2d(h, a.up) * (a.alpha_scale * a.scale);
    } else {
      y = y + at::conv2d(x, runtime_weight(s, i, weight), {}, g.stride, g.padding, g.dilation, g.groups);
    }
  }
  return y;
}

at::Tensor LoRALinearImpl::forward(const at::Tensor& x) {
  at::Tensor y = torch::nn::LinearImpl::forward(x);
  if (lora.adapters.empty() || lora.merged()) return y;
  return lora_runtime_linear(lora, weight, bias, x, y);
}

ConvGeometry LoRAConv2dImpl::geometry() const {
  ConvGeometry g;
  g.stride = std::vector<int64_t>(options.stride()->begin(), options.stride()->end());
  g.dilation = std::vector<int64_t>(options.dilation()->begin(), options.dilation()->end());
  g.groups = options.groups();
  const auto* pad = c10::get_if<torch::ExpandingArray<2>>(&options.padding());
  DMX_CHECK_SUPPORTED(pad != nullptr, "LoRA on a convolution with 'same'/'valid' padding is not supported");
  g.padding = std::vector<int64_t>((*pad)->begin(), (*pad)->end());
  DMX_CHECK_SUPPORTED(c10::get_if<torch::enumtype::kZeros>(&options.padding_mode()) != nullptr,
                      "LoRA on a convolution with a padding mode other than zeros is not supported");
  return g;
}

at::Tensor LoRAConv2dImpl::forward(const at::Tensor& x) {
  at::Tensor y = torch::nn::Conv2dImpl::forward(x);
  if (lora.adapters.empty() || lora.merged()) return y;
  return lora_runtime_conv2d(lora, weight, bias, geometry(), x, y);
}

}  // namespace dmx::nn
