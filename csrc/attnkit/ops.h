// C++ API for LibTorch users: each function calls the op through the dispatcher, so the same
// CPU/CUDA kernels and autograd run as from Python. Link the attnkit op library and include this.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace attnkit {

at::Tensor gdpa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                    int64_t max_seq_len_q, int64_t max_seq_len_kv,
                    const std::string& activation = "fast_gelu", double qk_scale = 1.0,
                    double pre_scale = 1.0, bool causal = false);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_offsets, const at::Tensor& kv_offsets, int64_t max_seq_len_q,
    int64_t max_seq_len_kv, const std::string& activation, double qk_scale,
    double pre_scale = 1.0, bool causal = false);

}  // namespace attnkit
