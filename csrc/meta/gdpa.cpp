// GDPA shape-only kernels for FakeTensor / torch.compile: the same checks as the real kernels,
// outputs with the real kernels' (contiguous) layout.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/gdpa_args.h"

namespace attnkit {
namespace gdpa {
namespace {

at::Tensor gdpa_fwd_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                         c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv,
                         c10::string_view activation, double qk_scale, double pre_scale, bool,
                         int64_t window_size, bool broadcast_q) {
  check_window(window_size);
  check_scales(qk_scale, pre_scale);
  parse_activation(activation);
  if (broadcast_q) {
    check_broadcast_q_inputs(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
    return at::empty_symint({(kv_offsets.sym_size(0) - 1) * q.sym_size(0), q.sym_size(1), q.sym_size(2)},
                            q.options());
  }
  check_inputs(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
  return at::empty_symint(q.sym_sizes(), q.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_offsets, const at::Tensor& kv_offsets, c10::SymInt max_seq_len_q,
    c10::SymInt max_seq_len_kv, c10::string_view activation, double qk_scale, double pre_scale,
    bool, int64_t window_size, bool broadcast_q) {
  check_window(window_size);
  check_scales(qk_scale, pre_scale);
  parse_activation(activation);
  if (broadcast_q) {
    check_broadcast_q_inputs(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
    check_broadcast_grad_out(grad_out, q, kv_offsets);
  } else {
    check_inputs(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
    check_grad_out(grad_out, q);
  }
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

// The private ops: the kernel name checked as on CUDA (which kernel can take the call depends on
// the device, unknown here), then the public ops' shapes.
at::Tensor gdpa_fwd_with_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                              c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv,
                              c10::string_view activation, double qk_scale, double pre_scale,
                              bool causal, int64_t window_size, bool broadcast_q,
                              c10::string_view kernel, bool, bool, bool, bool, bool) {
  check_kernel_request(kernel, "kernel");
  return gdpa_fwd_meta(q, k, v, q_offsets, kv_offsets, std::move(max_seq_len_q),
                       std::move(max_seq_len_kv), activation, qk_scale, pre_scale, causal,
                       window_size, broadcast_q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd_with_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_offsets, const at::Tensor& kv_offsets, c10::SymInt max_seq_len_q,
    c10::SymInt max_seq_len_kv, c10::string_view activation, double qk_scale, double pre_scale,
    bool causal, int64_t window_size, bool broadcast_q, c10::string_view kernel, bool,
    std::optional<bool>) {
  check_kernel_request(kernel, "kernel");
  return gdpa_bwd_meta(grad_out, q, k, v, q_offsets, kv_offsets, std::move(max_seq_len_q),
                       std::move(max_seq_len_kv), activation, qk_scale, pre_scale, causal,
                       window_size, broadcast_q);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, Meta, m) {
  m.impl("gdpa_fwd", &gdpa_fwd_meta);
  m.impl("gdpa_bwd", &gdpa_bwd_meta);
  m.impl("_gdpa_fwd_with", &gdpa_fwd_with_meta);
  m.impl("_gdpa_bwd_with", &gdpa_bwd_with_meta);
}

}  // namespace gdpa
}  // namespace attnkit
