// MoE routing CPU kernels (DESIGN §3.4). Index values are validated here with clear errors (the
// CPU can afford it); the permutation is built by a counting sort, which is stable by
// (expert, token, slot) by construction.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/dispatch.h"
#include "common/moe_args.h"

namespace attnkit {
namespace moe {
namespace {

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Experts ordered by logit (descending), lower expert id first on ties; the softmax is monotone
// so this is the order of the probabilities, and the CUDA kernel uses the same rule.
std::tuple<at::Tensor, at::Tensor> moe_topk_softmax_cpu(const at::Tensor& logits_in, int64_t k,
                                                        bool renormalize) {
  check_topk_softmax(logits_in, k);
  const auto logits = logits_in.contiguous().to(at::kFloat);
  const int64_t T = logits.size(0), E = logits.size(1);
  auto weights = at::empty({T, k}, logits.options());
  auto ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  const float* lp = logits.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  int32_t* ip = ids.data_ptr<int32_t>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order(E);
    for (int64_t t = begin; t < end; ++t) {
      const float* x = lp + t * E;
      const float mx = *std::max_element(x, x + E);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(x[e] - mx);
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
        return x[a] > x[b] || (x[a] == x[b] && a < b);
      });
      float sel = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const float p = std::exp(x[order[j]] - mx) / sum;
        wp[t * k + j] = p;
        ip[t * k + j] = order[j];
        sel += p;
      }
      if (renormalize) {
        for (int64_t j = 0; j < k; ++j) wp[t * k + j] /= sel;
      }
    }
  });
  return {weights, ids};
}

template <typename index_t>
std::vector<int64_t> build_row_map(const index_t* ids, int64_t T, int64_t k, int64_t E,
                                   int32_t* row_map, int32_t* offsets) {
  std::vector<int64_t> cursor(E + 1, 0);
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t e = int64_t(ids[i]);
    ATTNKIT_CHECK(e >= 0 && e < E, "topk_ids: expected expert ids in [0, num_experts=", E,
                  "), got ", e, " at token ", i / k, " slot ", i % k);
    ++cursor[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) cursor[e + 1] += cursor[e];
  for (int64_t e = 0; e <= E; ++e) offsets[e] = int32_t(cursor[e]);
  // Visiting (token, slot) in order and taking the next free row of the expert gives the stable
  // order (expert, token, slot).
  for (int64_t i = 0; i < T * k; ++i) row_map[i] = int32_t(cursor[int64_t(ids[i])]++);
  return cursor;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& x_in,
                                                               const at::Tensor& ids_in,
                                                               int64_t num_experts) {
  check_permute(x_in, ids_in, num_experts);
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1);
  auto permuted = at::empty({T * k, H}, x.options());
  auto offsets = at::empty({num_experts + 1}, ids.options().dtype(at::kInt));
  auto row_map = at::empty({T, k}, ids.options().dtype(at::kInt));
  int32_t* rm = row_map.data_ptr<int32_t>();
  ATTNKIT_DISPATCH_INDEX(ids.scalar_type(), "topk_ids", [&] {
    build_row_map(ids.data_ptr<index_t>(), T, k, num_experts, rm, offsets.data_ptr<int32_t>());
  });
  if (permuted.numel() == 0) return {permuted, offsets, row_map};
  const int64_t row_bytes = H * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(permuted.data_ptr());
  at::parallel_for(0, T * k, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      std::memcpy(dst + int64_t(rm[i]) * row_bytes, src + (i / k) * row_bytes, row_bytes);
  });
  return {permuted, offsets, row_map};
}

// row_map entries must be -1 (no contribution) or a row of permuted_out; `injective` also
// requires each row at most once (the backward writes rows without accumulation).
void check_row_map_values(const at::Tensor& row_map, int64_t M, bool injective) {
  const int32_t* rm = row_map.data_ptr<int32_t>();
  std::vector<bool> seen(injective ? M : 0, false);
  for (int64_t i = 0; i < row_map.numel(); ++i) {
    ATTNKIT_CHECK(rm[i] >= -1 && rm[i] < M, "row_map: expected entries in [-1, ", M,
                  ") (rows of permuted_out, -1 = dropped), got ", rm[i], " at flat index ", i);
    if (injective && rm[i] >= 0) {
      ATTNKIT_CHECK(!seen[rm[i]], "row_map: expected each permuted row at most once, row ",
                    rm[i], " appears twice");
      seen[rm[i]] = true;
    }
  }
}

at::Tensor moe_unpermute_cpu(const at::Tensor& perm_in, const at::Tensor& row_map_in,
                             const at::Tensor& w_in) {
  check_unpermute(perm_in, row_map_in, w_in);
  const auto perm = perm_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const int64_t T = row_map.size(0), k = row_map.size(1), M = perm.size(0), H = perm.size(1);
  check_row_map_values(row_map, M, false);
  auto out = at::empty({T, H}, perm.options());
  if (out.numel() == 0) return out;
  ATTNKIT_DISPATCH_CPU_FLOAT(perm.scalar_type(), "moe_unpermute_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto w = w_in.contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
    const scalar_t* pp = perm.data_ptr<scalar_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const int32_t* rm = row_map.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(H);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t s = 0; s < k; ++s) {  // slot order: a fixed summation order
          const int64_t r = rm[t * k + s];
          if (r < 0) continue;
          const acc_t ws = wp[t * k + s];
          const scalar_t* row = pp + r * H;
          for (int64_t c = 0; c < H; ++c) acc[c] += ws * acc_t(row[c]);
        }
        for (int64_t c = 0; c < H; ++c) op[t * H + c] = scalar_t(acc[c]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd_cpu(const at::Tensor& grad_in,
                                                         const at::Tensor& perm_in,
                                                         const at::Tensor& row_map_in,
                                                         const at::Tensor& w_in) {
  check_unpermute_bwd(grad_in, perm_in, row_map_in, w_in);
  const auto grad = grad_in.contiguous();
  const auto perm = perm_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const int64_t T = row_map.size(0), k = row_map.size(1), M = perm.size(0), H = perm.size(1);
  check_row_map_values(row_map, M, true);
  auto grad_perm = at::zeros({M, H}, perm.options());  // rows no token reads get no gradient
  auto grad_w = at::empty({T, k}, w_in.options());
  if (grad_w.numel() == 0) return {grad_perm, grad_w};
  ATTNKIT_DISPATCH_CPU_FLOAT(perm.scalar_type(), "moe_unpermute_bwd_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto w = w_in.contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
    auto gw = at::empty({T, k}, w.options());
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* pp = perm.data_ptr<scalar_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const int32_t* rm = row_map.data_ptr<int32_t>();
    scalar_t* gpp = grad_perm.data_ptr<scalar_t>();
    acc_t* gwp = gw.data_ptr<acc_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g = gp + t * H;
        for (int64_t s = 0; s < k; ++s) {
          const int64_t r = rm[t * k + s];
          if (r < 0) {
            gwp[t * k + s] = acc_t(0);
            continue;
          }
          const acc_t ws = wp[t * k + s];
          const scalar_t* row = pp + r * H;
          scalar_t* dst = gpp + r * H;
          acc_t dot = 0;
          for (int64_t c = 0; c < H; ++c) {
            dot += acc_t(g[c]) * acc_t(row[c]);
            dst[c] = scalar_t(ws * acc_t(g[c]));
          }
          gwp[t * k + s] = dot;
        }
      }
    });
    grad_w.copy_(gw);
  });
  return {grad_perm, grad_w};
}

std::vector<int64_t> offsets_on_host(const at::Tensor& off, int64_t M) {
  check_offsets_values_cpu(off, M, "expert_offsets");
  const auto o = off.to(at::kLong).contiguous();
  return std::vector<int64_t>(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + o.numel());
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off) {
  check_grouped_gemm(a, w, off);
  const int64_t M = a.size(0);
  const auto o = offsets_on_host(off, M);
  auto out = at::zeros({M, w.size(2)}, a.options());  // rows outside every expert stay 0
  for (int64_t e = 0; e + 1 < int64_t(o.size()); ++e) {
    const int64_t lo = o[e], n = o[e + 1] - o[e];
    if (n > 0 && out.size(1) > 0) {
      auto dst = out.narrow(0, lo, n);
      at::mm_out(dst, a.narrow(0, lo, n), w[e]);
    }
  }
  return out;
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& a, const at::Tensor& g,
                                  const at::Tensor& off) {
  check_grouped_gemm_wgrad(a, g, off);
  const auto o = offsets_on_host(off, a.size(0));
  const int64_t E = int64_t(o.size()) - 1;
  auto dw = at::zeros({E, a.size(1), g.size(1)}, a.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t lo = o[e], n = o[e + 1] - o[e];
    if (n > 0 && dw[e].numel() > 0) {
      auto dst = dw[e];
      at::mm_out(dst, a.narrow(0, lo, n).t(), g.narrow(0, lo, n));
    }
  }
  return dw;
}

// ATen's vectorised CPU kernels in the accumulation dtype, one rounding at the end (as CUDA).
at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  check_silu_and_mul(x);
  const int64_t I = x.size(-1) / 2;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto xf = x.to(acc);
  return at::silu(xf.narrow(-1, 0, I)).mul_(xf.narrow(-1, I, I)).to(x.scalar_type()).contiguous();
}

// Greedy longest-processing-time first: experts by load descending (lower expert id first on
// ties), each to the rank with the smallest load so far (lower rank first on ties).
at::Tensor expert_load_balance_cpu(const at::Tensor& loads_in, int64_t world_size) {
  check_load_balance(loads_in, world_size);
  const auto loads = loads_in.to(at::kDouble).contiguous();
  const int64_t E = loads.size(0);
  const double* lp = loads.data_ptr<double>();
  for (int64_t e = 0; e < E; ++e) {
    ATTNKIT_CHECK(lp[e] >= 0, "expert_loads: expected non-negative finite loads, got ", lp[e],
                  " for expert ", e);
  }
  std::vector<int64_t> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lp[a] > lp[b]; });
  std::vector<double> rank_load(world_size, 0.0);
  auto assign = at::empty({E}, loads.options().dtype(at::kLong));
  int64_t* ap = assign.data_ptr<int64_t>();
  for (int64_t e : order) {
    const int64_t r = std::min_element(rank_load.begin(), rank_load.end()) - rank_load.begin();
    ap[e] = r;
    rank_load[r] += lp[e];
  }
  return assign;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("moe_topk_softmax", &moe_topk_softmax_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("_moe_unpermute_bwd", &moe_unpermute_bwd_cpu);
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("_grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("expert_load_balance", &expert_load_balance_cpu);
}

}  // namespace moe
}  // namespace attnkit
