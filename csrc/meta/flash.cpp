// Flash attention shape-only kernels for FakeTensor / torch.compile: the same checks as the real
// kernels, outputs with the real kernels' (contiguous) layout and dtypes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/flash_args.h"

namespace attnkit {
namespace flash {
namespace {

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt>, std::optional<c10::SymInt>) {
  const Options opt{softmax_scale, causal, window_left, window_right, softcap};
  const bool varlen = check_inputs(q, k, v, opt, cu_q, cu_k);
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint(lse_shape(q, varlen), q.options().dtype(lse_dtype(q)))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> softmax_scale,
    bool causal, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt>, std::optional<c10::SymInt>) {
  const Options opt{softmax_scale, causal, window_left, window_right, softcap};
  const bool varlen = check_inputs(q, k, v, opt, cu_q, cu_k);
  check_bwd_inputs(grad_out, q, out, lse, varlen);
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, Meta, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_meta);
  m.impl("flash_attn_bwd", &flash_attn_bwd_meta);
}

}  // namespace flash
}  // namespace attnkit
