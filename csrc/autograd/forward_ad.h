// Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad dual tensors) is not implemented by
// any attnkit op. A dual tensor need not require grad, so the Autograd kernels' shortcut for
// inputs that do not (straight to the backend, no node) dropped its tangent: jvp through
// flash_attn_fwd or moe_route returned zeros (a helper's audit, thirtieth session). The
// shortcuts ask this first and raise, naming the op and the argument.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <utility>

#include "common/check.h"

namespace attnkit {

inline bool has_forward_grad(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

inline bool has_forward_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && has_forward_grad(*t);
}

// Raises naming the first input (name, has_forward_grad(input)) that carries a tangent.
inline void check_no_forward_ad(const char* op,
                                std::initializer_list<std::pair<const char*, bool>> inputs) {
  for (const auto& [name, dual] : inputs) {
    ATTNKIT_CHECK(!dual, op, ": ", name,
                  " carries a forward-mode AD tangent (torch.func.jvp / a forward_ad dual "
                  "tensor); forward-mode AD is not supported (reverse mode is: .backward() / "
                  "torch.autograd.grad; torch.func's transforms do not run C++ autograd "
                  "functions)");
  }
}

}  // namespace attnkit
