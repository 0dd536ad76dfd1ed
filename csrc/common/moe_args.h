// MoE routing argument checks (DESIGN §3.4), shared by the CPU, CUDA and Meta kernels. Only
// shapes, dtypes and devices are checked here (as SymInts, so Meta works under torch.compile);
// index values (expert ids, row maps, offsets) are checked by the CPU kernels and made harmless
// on CUDA (dropped or clamped), because reading them on the host would need a sync.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "common/check.h"
#include "common/kernel_request.h"
#include "kernels/moe/choose.h"
#include "kernels/moe/launch_options.h"

namespace attnkit {
namespace moe {

inline void check_float(const at::Tensor& t, const char* name) {
  check_dtype(t, name, {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
}

inline void check_topk_softmax(const at::Tensor& logits, int64_t k) {
  check_dim(logits, "gating_logits", 2);
  check_float(logits, "gating_logits");
  ATTNKIT_CHECK(k >= 1 && logits.sym_size(1) >= k, "k: expected 1 <= k <= num_experts (",
                logits.sym_size(1), "), got ", k);
}

// moe_route's options, checked once and passed to the kernels as plain values.
struct RouteOptions {
  bool sigmoid = false;  // scoring: softmax (false) or sigmoid (true)
  bool renormalize = false;
  int64_t n_group = 1, topk_group = 1;
  double scale = 1.0;  // routed_scaling_factor
};

inline bool parse_scoring(const std::string& scoring) {
  ATTNKIT_CHECK(scoring == "softmax" || scoring == "sigmoid",
                "scoring: expected \"softmax\" or \"sigmoid\", got \"", scoring, "\"");
  return scoring == "sigmoid";
}

inline RouteOptions check_route(const at::Tensor& logits, int64_t k, const std::string& scoring,
                                bool renormalize, const std::optional<at::Tensor>& bias,
                                int64_t n_group, int64_t topk_group, double scale) {
  check_dim(logits, "logits", 2);
  check_float(logits, "logits");
  const c10::SymInt E = logits.sym_size(1);
  RouteOptions o;
  o.sigmoid = parse_scoring(scoring);
  ATTNKIT_CHECK(k >= 1 && E >= k, "k: expected 1 <= k <= num_experts (", E, "), got ", k);
  ATTNKIT_CHECK(n_group >= 1 && E % n_group == 0, "n_group: expected >= 1 and dividing ",
                "num_experts (", E, "), got ", n_group);
  ATTNKIT_CHECK(topk_group >= 1 && topk_group <= n_group,
                "topk_group: expected 1 <= topk_group <= n_group (", n_group, "), got ",
                topk_group);
  ATTNKIT_CHECK(k <= topk_group * (E / n_group), "k: expected k <= topk_group * num_experts / ",
                "n_group (", topk_group * (E / n_group), " experts in the kept groups), got ", k);
  ATTNKIT_CHECK(finite_f32(scale), "routed_scaling_factor: expected a finite value (as fp32), got ",
                scale);
  if (bias.has_value() && bias->defined()) {
    check_dim(*bias, "bias", 1);
    check_float(*bias, "bias");
    check_same_device(logits, "logits", *bias, "bias");
    ATTNKIT_CHECK(bias->sym_size(0) == E, "bias: expected shape [", E, "] (num_experts), got ",
                  bias->sym_sizes());
  }
  o.renormalize = renormalize;
  o.n_group = n_group;
  o.topk_group = topk_group;
  o.scale = scale;
  return o;
}

inline RouteOptions check_route_bwd(const std::optional<at::Tensor>& grad_w,
                                    const std::optional<at::Tensor>& grad_aux,
                                    const std::optional<at::Tensor>& grad_z,
                                    const at::Tensor& logits, const at::Tensor& ids,
                                    const std::string& scoring, bool renormalize, double scale) {
  check_dim(logits, "logits", 2);
  check_float(logits, "logits");
  check_dim(ids, "ids", 2);
  check_dtype(ids, "ids", {at::kInt, at::kLong});
  check_same_device(logits, "logits", ids, "ids");
  ATTNKIT_CHECK(ids.sym_size(0) == logits.sym_size(0) && ids.sym_size(1) >= 1,
                "ids: expected shape [", logits.sym_size(0), ", k >= 1], got ", ids.sym_sizes());
  if (grad_w.has_value() && grad_w->defined()) {
    check_float(*grad_w, "grad_weights");
    check_same_device(logits, "logits", *grad_w, "grad_weights");
    ATTNKIT_CHECK(grad_w->sym_sizes() == ids.sym_sizes(), "grad_weights: expected shape ",
                  ids.sym_sizes(), " (same as ids), got ", grad_w->sym_sizes());
  }
  for (const auto* g : {&grad_aux, &grad_z}) {
    const char* name = g == &grad_aux ? "grad_aux_loss" : "grad_z_loss";
    if (g->has_value() && (*g)->defined()) {
      check_float(**g, name);
      check_same_device(logits, "logits", **g, name);
      ATTNKIT_CHECK((*g)->sym_numel() == 1, name, ": expected one element, got shape ",
                    (*g)->sym_sizes());
    }
  }
  // (the forward refuses the same values: a NaN / inf factor would give NaN gradients silently)
  ATTNKIT_CHECK(finite_f32(scale), "routed_scaling_factor: expected a finite value (as fp32), got ",
                scale);
  RouteOptions o;
  o.sigmoid = parse_scoring(scoring);
  o.renormalize = renormalize;
  o.scale = scale;
  return o;
}

// row_map and expert_offsets are int32 (what at::_grouped_mm takes), so T·k must fit.
inline void check_permute(const at::Tensor& x, const at::Tensor& ids, int64_t num_experts) {
  check_dim(x, "x", 2);
  check_float(x, "x");
  check_dim(ids, "topk_ids", 2);
  check_dtype(ids, "topk_ids", {at::kInt, at::kLong});
  check_same_device(x, "x", ids, "topk_ids");
  ATTNKIT_CHECK(ids.sym_size(0) == x.sym_size(0), "topk_ids: expected ", x.sym_size(0),
                " rows (tokens of x), got shape ", ids.sym_sizes());
  ATTNKIT_CHECK(ids.sym_size(1) >= 1, "topk_ids: expected k >= 1 columns, got shape ",
                ids.sym_sizes());
  ATTNKIT_CHECK(num_experts >= 1 && num_experts < (int64_t(1) << 24),
                "num_experts: expected in [1, 2^24), got ", num_experts);
  ATTNKIT_CHECK(ids.sym_numel() <= std::numeric_limits<int32_t>::max(),
                "topk_ids: expected tokens*k <= 2^31-1 (int32 row_map), got ", ids.sym_numel());
}

inline void check_unpermute(const at::Tensor& permuted, const at::Tensor& row_map,
                            const at::Tensor& weights) {
  check_dim(permuted, "permuted_out", 2);
  check_float(permuted, "permuted_out");
  check_dim(row_map, "row_map", 2);
  check_dtype(row_map, "row_map", {at::kInt});
  check_dim(weights, "topk_weights", 2);
  check_float(weights, "topk_weights");
  check_same_device(permuted, "permuted_out", row_map, "row_map");
  check_same_device(permuted, "permuted_out", weights, "topk_weights");
  ATTNKIT_CHECK(weights.sym_sizes() == row_map.sym_sizes(), "topk_weights: expected shape ",
                row_map.sym_sizes(), " (same as row_map), got ", weights.sym_sizes());
}

inline void check_unpermute_bwd(const at::Tensor& grad_out, const at::Tensor& permuted,
                                const at::Tensor& row_map, const at::Tensor& weights) {
  check_unpermute(permuted, row_map, weights);
  check_dim(grad_out, "grad_out", 2);
  check_same_dtype(permuted, "permuted_out", grad_out, "grad_out");
  check_same_device(permuted, "permuted_out", grad_out, "grad_out");
  ATTNKIT_CHECK(grad_out.sym_size(0) == row_map.sym_size(0) &&
                    grad_out.sym_size(1) == permuted.sym_size(1),
                "grad_out: expected shape [", row_map.sym_size(0), ", ", permuted.sym_size(1),
                "], got ", grad_out.sym_sizes());
}

inline void check_expert_offsets(const at::Tensor& off, const at::Tensor& a) {
  check_dim(off, "expert_offsets", 1);
  check_dtype(off, "expert_offsets", {at::kInt, at::kLong});
  check_same_device(a, "a", off, "expert_offsets");
  ATTNKIT_CHECK(off.sym_size(0) >= 2, "expert_offsets: expected E+1 >= 2 entries, got ",
                off.sym_size(0));
}

inline void check_grouped_gemm(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off) {
  check_dim(a, "a", 2);
  check_float(a, "a");
  check_dim(w, "w", 3);
  check_same_dtype(a, "a", w, "w");
  check_same_device(a, "a", w, "w");
  ATTNKIT_CHECK(w.sym_size(1) == a.sym_size(1), "w: expected shape [E, ", a.sym_size(1),
                ", N] (K of a), got ", w.sym_sizes());
  check_expert_offsets(off, a);
  ATTNKIT_CHECK(off.sym_size(0) == w.sym_size(0) + 1, "expert_offsets: expected ",
                w.sym_size(0) + 1, " entries (E+1, E from w), got ", off.sym_size(0));
}

// grouped_gemm's checks, and W's columns must split into a gate half and an up half.
inline void check_grouped_gemm_swiglu(const at::Tensor& a, const at::Tensor& w,
                                      const at::Tensor& off) {
  check_grouped_gemm(a, w, off);
  ATTNKIT_CHECK(w.sym_size(2) % 2 == 0, "w: expected shape [E, ", a.sym_size(1),
                ", 2*I] (an even number of columns: gate, then up), got ", w.sym_sizes());
}

inline void check_grouped_gemm_wgrad(const at::Tensor& a, const at::Tensor& g,
                                     const at::Tensor& off) {
  check_dim(a, "a", 2);
  check_float(a, "a");
  check_dim(g, "grad_out", 2);
  check_same_dtype(a, "a", g, "grad_out");
  check_same_device(a, "a", g, "grad_out");
  ATTNKIT_CHECK(g.sym_size(0) == a.sym_size(0), "grad_out: expected ", a.sym_size(0),
                " rows (same as a), got shape ", g.sym_sizes());
  check_expert_offsets(off, a);
}

inline void check_silu_and_mul(const at::Tensor& x) {
  check_defined(x, "x");
  check_float(x, "x");
  ATTNKIT_CHECK(x.dim() >= 1 && x.sym_size(-1) % 2 == 0,
                "x: expected at least 1 dim with an even last dim [..., 2*I], got shape ",
                x.sym_sizes());
}

inline void check_load_balance(const at::Tensor& loads, int64_t world_size) {
  check_dim(loads, "expert_loads", 1);
  check_dtype(loads, "expert_loads", {at::kInt, at::kLong, at::kFloat, at::kDouble});
  // 4096: the CUDA kernel's bound, the same on every device (a process group is never larger).
  ATTNKIT_CHECK(world_size >= 1 && world_size <= 4096, "world_size: expected in [1, 4096], got ",
                world_size);
}

// ---- kernel choice (kernels/moe/choose.h, docs/ops.md MoE "Kernel choice") ----
// A kernel name of the private ops (`arg` = "kernel") or of ATTNKIT_MOE_KERNEL (`arg` = its name,
// classes_only: the architecture classes, not the single sm90 kernels); choose.h's names.
inline MoeRequest check_moe_kernel_request(c10::string_view name, const char* arg,
                                           bool classes_only = false) {
  return check_request(kMoeRequests, name, arg, classes_only);
}

// A named kernel that cannot take the call: a RuntimeError naming the op, the kernel, where the
// name came from (`source`: the kernel argument or ATTNKIT_MOE_KERNEL) and why; `context` adds
// the call's facts (dtype, sizes, device).
inline void check_moe_choice(const MoeChoice& c, const char* op, MoeRequest req, const char* source,
                             const std::string& context = "") {
  check_named_choice(c, op, moe_request_name(req), source, context);
}

// The CPU has one kernel per op, which "auto" and "portable" name; a CUDA kernel's name is an
// error.
inline void check_cpu_moe_kernel(c10::string_view kernel) {
  const MoeRequest r = check_moe_kernel_request(kernel, "kernel");
  ATTNKIT_CHECK(r == MoeRequest::kAuto || r == MoeRequest::kPortable,
                "kernel: expected 'auto' or 'portable' on the CPU (its one kernel), got '",
                std::string(kernel), "', a CUDA kernel");
}

// The private op's launch options (launch_options.h), the same on every backend.
inline PermuteLaunchOptions make_permute_launch_options(bool rank_hist, bool pdl,
                                                        std::optional<bool> lean_prologue) {
  PermuteLaunchOptions o;
  o.rank_hist = rank_hist;
  o.pdl = pdl;
  if (lean_prologue.has_value()) o.lean_prologue = *lean_prologue;
  return o;
}

}  // namespace moe
}  // namespace attnkit
