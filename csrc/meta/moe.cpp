// MoE routing shape-only kernels for FakeTensor / torch.compile: the same checks as the real
// kernels; every output size follows from input shapes (permuted rows = tokens·k), which is also
// why the CUDA path never needs a host sync.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "common/moe_args.h"

namespace attnkit {
namespace moe {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_topk_softmax_meta(const at::Tensor& logits, int64_t k,
                                                         bool) {
  check_topk_softmax(logits, k);
  const c10::SymInt T = logits.sym_size(0);
  return {at::empty_symint({T, c10::SymInt(k)}, logits.options().dtype(at::kFloat)),
          at::empty_symint({T, c10::SymInt(k)}, logits.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_meta(
    const at::Tensor& logits, int64_t k, c10::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group, double scale,
    bool return_losses) {
  check_route(logits, k, std::string(scoring), renormalize, bias, n_group, topk_group, scale);
  const auto acc =
      logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const c10::SymInt T = logits.sym_size(0);
  auto loss = [&] { return return_losses ? at::empty({}, acc) : at::empty({0}, acc); };
  return {at::empty_symint({T, c10::SymInt(k)}, acc),
          at::empty_symint({T, c10::SymInt(k)}, acc.dtype(at::kInt)), loss(), loss()};
}

at::Tensor moe_route_bwd_meta(const std::optional<at::Tensor>& grad_w,
                              const std::optional<at::Tensor>& grad_aux,
                              const std::optional<at::Tensor>& grad_z, const at::Tensor& logits,
                              const at::Tensor& ids, c10::string_view scoring, bool renormalize,
                              double scale) {
  check_route_bwd(grad_w, grad_aux, grad_z, logits, ids, std::string(scoring), renormalize, scale);
  return at::empty_symint(logits.sym_sizes(), logits.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_meta(const at::Tensor& x,
                                                                const at::Tensor& ids,
                                                                int64_t num_experts) {
  check_permute(x, ids, num_experts);
  return {at::empty_symint({ids.sym_numel(), x.sym_size(1)}, x.options()),
          at::empty({num_experts + 1}, ids.options().dtype(at::kInt)),
          at::empty_symint(ids.sym_sizes(), ids.options().dtype(at::kInt))};
}

at::Tensor moe_unpermute_meta(const at::Tensor& perm, const at::Tensor& row_map,
                              const at::Tensor& w) {
  check_unpermute(perm, row_map, w);
  return at::empty_symint({row_map.sym_size(0), perm.sym_size(1)}, perm.options());
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd_meta(const at::Tensor& grad,
                                                          const at::Tensor& perm,
                                                          const at::Tensor& row_map,
                                                          const at::Tensor& w) {
  check_unpermute_bwd(grad, perm, row_map, w);
  return {at::empty_symint(perm.sym_sizes(), perm.options()),
          at::empty_symint(w.sym_sizes(), w.options())};
}

at::Tensor grouped_gemm_meta(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off) {
  check_grouped_gemm(a, w, off);
  return at::empty_symint({a.sym_size(0), w.sym_size(2)}, a.options());
}

at::Tensor grouped_gemm_wgrad_meta(const at::Tensor& a, const at::Tensor& g,
                                   const at::Tensor& off) {
  check_grouped_gemm_wgrad(a, g, off);
  return at::empty_symint({off.sym_size(0) - 1, a.sym_size(1), g.sym_size(1)}, a.options());
}

at::Tensor silu_and_mul_meta(const at::Tensor& x) {
  check_silu_and_mul(x);
  auto sizes = x.sym_sizes().vec();
  sizes.back() = sizes.back() / 2;
  return at::empty_symint(sizes, x.options());
}

at::Tensor grouped_gemm_swiglu_meta(const at::Tensor& a, const at::Tensor& w,
                                    const at::Tensor& off) {
  check_grouped_gemm_swiglu(a, w, off);
  return at::empty_symint({a.sym_size(0), w.sym_size(2) / 2}, a.options());
}

at::Tensor expert_load_balance_meta(const at::Tensor& loads, int64_t world_size) {
  check_load_balance(loads, world_size);
  return at::empty_symint(loads.sym_sizes(), loads.options().dtype(at::kLong));
}

// The private ops: the kernel name checked as on CUDA (which kernel can take the call depends on
// the device, unknown here), then the public ops' checks and shapes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_with_meta(const at::Tensor& x,
                                                                     const at::Tensor& ids,
                                                                     int64_t num_experts,
                                                                     bool rank_hist, bool pdl,
                                                                     std::optional<bool> lean_prologue) {
  make_permute_launch_options(rank_hist, pdl, lean_prologue);
  return moe_permute_meta(x, ids, num_experts);
}

at::Tensor grouped_gemm_with_meta(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off,
                                  c10::string_view kernel) {
  check_moe_kernel_request(kernel, "kernel");
  return grouped_gemm_meta(a, w, off);
}

at::Tensor grouped_gemm_swiglu_with_meta(const at::Tensor& a, const at::Tensor& w,
                                         const at::Tensor& off, c10::string_view kernel) {
  check_moe_kernel_request(kernel, "kernel");
  return grouped_gemm_swiglu_meta(a, w, off);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, Meta, m) {
  m.impl("moe_topk_softmax", &moe_topk_softmax_meta);
  m.impl("moe_route", &moe_route_meta);
  m.impl("_moe_route_bwd", &moe_route_bwd_meta);
  m.impl("moe_permute", &moe_permute_meta);
  m.impl("moe_unpermute", &moe_unpermute_meta);
  m.impl("_moe_unpermute_bwd", &moe_unpermute_bwd_meta);
  m.impl("grouped_gemm", &grouped_gemm_meta);
  m.impl("_grouped_gemm_wgrad", &grouped_gemm_wgrad_meta);
  m.impl("silu_and_mul", &silu_and_mul_meta);
  m.impl("grouped_gemm_swiglu", &grouped_gemm_swiglu_meta);
  m.impl("expert_load_balance", &expert_load_balance_meta);
  m.impl("_moe_permute_with", &moe_permute_with_meta);
  m.impl("_grouped_gemm_with", &grouped_gemm_with_meta);
  m.impl("_grouped_gemm_swiglu_with", &grouped_gemm_swiglu_with_meta);
}

}  // namespace moe
}  // namespace attnkit
