// Reentrant activation checkpointing (see checkpoint.h): torch 1.13 utils/checkpoint.py CheckpointFunction.
#include "nn/checkpoint.h"

#include <torch/autograd.h>

#include <unordered_set>

namespace dmx::nn {

namespace {

struct FnHolder : torch::CustomClassHolder {
  CheckpointFn fn;
  std::vector<bool> defined;  // which inputs were defined
};

struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  // inputs: the real inputs (undefined ones replaced by empty placeholders) + a dummy that requires grad,
  // so that the outputs require grad even when no input does (parameters inside fn still need theirs).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                c10::intrusive_ptr<FnHolder> holder, at::TensorList inputs) {
    std::vector<at::Tensor> real(inputs.begin(), inputs.end() - 1);
    for (size_t i = 0; i < real.size(); ++i)
      if (!holder->defined[i]) real[i] = at::Tensor();
    std::vector<at::Tensor> out = holder->fn(real);  // grad mode is off inside Function::forward
    std::unordered_set<const void*> seen;
    for (const auto& x : inputs) seen.insert(x.unsafeGetTensorImpl());
    for (auto& o : out) {
      if (!seen.insert(o.unsafeGetTensorImpl()).second) o = o.clone();  // each output its own tensor
    }
    ctx->saved_data["fn"] = c10::IValue::make_capsule(holder);
    ctx->save_for_backward(inputs.vec());
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto holder = c10::static_intrusive_pointer_cast<FnHolder>(ctx->saved_data["fn"].toCapsule());
    const auto saved = ctx->get_saved_variables();
    std::vector<at::Tensor> inputs;
    for (size_t i = 0; i + 1 < saved.size(); ++i) {
      if (!holder->defined[i]) {
        inputs.emplace_back();
        continue;
      }
      at::Tensor d = saved[i].detach();
      d.set_requires_grad(saved[i].requires_grad());
      inputs.push_back(d);
    }
    std::vector<at::Tensor> outs;
    {
      at::AutoGradMode grad(true);
      outs = holder->fn(inputs);
    }
    std::vector<at::Tensor> roots, grads;
    for (size_t i = 0; i < outs.size() && i < grad_outputs.size(); ++i) {
      if (!outs[i].requires_grad() || !grad_outputs[i].defined()) continue;
      roots.push_back(outs[i]);
      grads.push_back(grad_outputs[i]);
    }
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    // One entry per forward argument: the holder (not a tensor), then each tensor of the list.
    torch::autograd::variable_list in_grads;
    in_grads.emplace_back();
    for (auto& x : inputs) in_grads.push_back(x.defined() && x.requires_grad() ? x.grad() : at::Tensor());
    in_grads.emplace_back();  // dummy
    return in_grads;
  }
};

}  // namespace

std::vector<at::Tensor> checkpoint(CheckpointFn fn, const std::vector<at::Tensor>& inputs) {
  if (!at::GradMode::is_enabled()) return fn(inputs);
  auto holder = c10::make_intrusive<FnHolder>();
  holder->fn = std::move(fn);
  torch::autograd::variable_list args;
  for (const auto& x : inputs) {
    holder->defined.push_back(x.defined());
    args.push_back(x.defined() ? x : at::empty({0}));
  }
  args.push_back(at::empty({0}).set_requires_grad(true));
  return CheckpointFunction::apply(holder, at::TensorList(args));
}
}  // namespace dmx::nn
