// MoE routing CPU kernels (DESIGN §3.4). Index values are validated here with clear errors (the
// CPU can afford it); the permutation is built by a counting sort, which is stable by
// (expert, token, slot) by construction.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <numeric>
#include <vector>

#include "common/dispatch.h"
#include "common/moe_args.h"

namespace attnkit {
namespace moe {
namespace {

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- moe_route ---------------------------------------------------------------------------------
// One token row at a time, in A (fp32, fp64 for fp64 logits). The selection key of expert e is
// its logit without a bias (the scores are monotone in it) and score + bias with one; NaN keys
// rank as -inf so the order stays total and ids stay in [0, E). Ties go to the lower id (and the
// lower group id among groups), as in the CUDA kernel.
template <typename A>
bool ranks_before(A v, int64_t i, A bv, int64_t bi) {
  return v > bv || (v == bv && i < bi);
}

template <typename A>
A nan_to_neg_inf(A v) {
  return std::isnan(v) ? -std::numeric_limits<A>::infinity() : v;
}

// Scores of one row and its log-sum-exp (the z-loss's; the softmax's normaliser).
template <typename A>
A route_scores(const A* x, int64_t E, bool sigmoid, A* s) {
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t e = 0; e < E; ++e) mx = x[e] > mx ? x[e] : mx;
  A sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += std::exp(x[e] - mx);
  for (int64_t e = 0; e < E; ++e) {
    s[e] = sigmoid ? A(1) / (A(1) + std::exp(-x[e])) : std::exp(x[e] - mx) / sum;
  }
  // A +inf logit, or a row of -inf ones: the log-sum-exp is that infinity (torch.logsumexp),
  // where mx + log(sum) would be inf - inf = NaN inside the sum.
  return std::isinf(mx) ? mx : mx + std::log(sum);
}

// Per-thread scratch of route_row.
template <typename A>
struct RouteScratch {
  std::vector<A> x, s, key, gscore;
  std::vector<int64_t> cand, gorder;
  RouteScratch(int64_t E, int64_t G) : x(E), s(E), key(E), gscore(G), cand(E), gorder(G) {}
};

// Selects the k experts of one row (x and s filled); writes ids and weights.
template <typename A>
void route_select(const A* bias, int64_t E, int64_t k, const RouteOptions& o, RouteScratch<A>& r,
                  A* w, int32_t* ids) {
  for (int64_t e = 0; e < E; ++e) r.key[e] = nan_to_neg_inf(bias ? r.s[e] + bias[e] : r.x[e]);
  int64_t n = 0;
  if (o.n_group > 1) {
    // Groups by score: with a bias the sum of its two best keys (DeepSeek-V3), without one its
    // best key (DeepSeek-V2); keep the topk_group best groups.
    const int64_t G = o.n_group, gs = E / G;
    for (int64_t g = 0; g < G; ++g) {
      A b1 = -std::numeric_limits<A>::infinity(), b2 = b1;
      for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
        const A v = r.key[e];
        if (v > b1) {
          b2 = b1;
          b1 = v;
        } else if (v > b2) {
          b2 = v;
        }
      }
      r.gscore[g] = nan_to_neg_inf(bias && gs >= 2 ? b1 + b2 : b1);
    }
    std::iota(r.gorder.begin(), r.gorder.end(), 0);
    std::partial_sort(
        r.gorder.begin(), r.gorder.begin() + o.topk_group, r.gorder.end(),
        [&](int64_t a, int64_t b) { return ranks_before(r.gscore[a], a, r.gscore[b], b); });
    std::sort(r.gorder.begin(), r.gorder.begin() + o.topk_group);
    for (int64_t j = 0; j < o.topk_group; ++j) {
      for (int64_t e = r.gorder[j] * gs; e < (r.gorder[j] + 1) * gs; ++e) r.cand[n++] = e;
    }
  } else {
    std::iota(r.cand.begin(), r.cand.end(), 0);
    n = E;
  }
  std::partial_sort(r.cand.begin(), r.cand.begin() + k, r.cand.begin() + n,
                    [&](int64_t a, int64_t b) { return ranks_before(r.key[a], a, r.key[b], b); });
  A sel = 0;
  for (int64_t j = 0; j < k; ++j) sel += r.s[r.cand[j]];
  const A mul = o.renormalize ? A(o.scale) / sel : A(o.scale);
  for (int64_t j = 0; j < k; ++j) {
    ids[j] = int32_t(r.cand[j]);
    w[j] = r.s[r.cand[j]] * mul;
  }
}

constexpr int64_t kRouteChunk = 64;  // tokens per loss partial: a fixed order, any thread count

template <typename A>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& logits_in, int64_t k, const std::optional<at::Tensor>& bias_in,
    const RouteOptions& o, bool losses) {
  constexpr auto kAcc = c10::CppTypeToScalarType<A>::value;
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const at::TensorOptions opts = logits.options().dtype(kAcc);
  at::Tensor weights = at::empty({T, k}, opts);
  at::Tensor ids = at::empty({T, k}, opts.dtype(at::kInt));
  at::Tensor aux = losses ? at::zeros({}, opts) : at::empty({0}, opts);
  at::Tensor z = losses ? at::zeros({}, opts) : at::empty({0}, opts);
  if (T == 0) return {weights, ids, aux, z};
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(kAcc).contiguous();
  const A* bp = bias.defined() ? bias.data_ptr<A>() : nullptr;
  const int64_t chunks = (T + kRouteChunk - 1) / kRouteChunk;
  at::Tensor p_part = losses ? at::zeros({chunks, E}, opts) : at::Tensor();
  at::Tensor z_part = losses ? at::zeros({chunks}, opts) : at::Tensor();
  A* wp = weights.data_ptr<A>();
  int32_t* ip = ids.data_ptr<int32_t>();
  ATTNKIT_DISPATCH_CPU_FLOAT(logits.scalar_type(), "moe_route_cpu", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      RouteScratch<A> r(E, o.n_group);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t t = c * kRouteChunk; t < std::min(T, (c + 1) * kRouteChunk); ++t) {
          for (int64_t e = 0; e < E; ++e) r.x[e] = A(lp[t * E + e]);
          const A lse = route_scores(r.x.data(), E, o.sigmoid, r.s.data());
          route_select(bp, E, k, o, r, wp + t * k, ip + t * k);
          if (!losses) continue;
          // The router probability of the aux loss: the softmax, or the sigmoid scores
          // normalised over the experts (DeepSeek-V3's sequence-wise balance loss).
          A* pp = p_part.data_ptr<A>() + c * E;
          A norm = 1;
          if (o.sigmoid) {
            A ssum = 0;
            for (int64_t e = 0; e < E; ++e) ssum += r.s[e];
            norm = A(1) / ssum;
          }
          for (int64_t e = 0; e < E; ++e) pp[e] += r.s[e] * norm;
          z_part.data_ptr<A>()[c] += lse * lse;
        }
      }
    });
  });
  if (losses) {
    std::vector<int64_t> counts(E, 0);
    for (int64_t i = 0; i < T * k; ++i) ++counts[ip[i]];
    const A* pp = p_part.data_ptr<A>();
    A sum_fp = 0, zs = 0;
    for (int64_t e = 0; e < E; ++e) {
      A pe = 0;
      for (int64_t c = 0; c < chunks; ++c) pe += pp[c * E + e];
      sum_fp += A(counts[e]) / A(T * k) * (pe / A(T));
    }
    for (int64_t c = 0; c < chunks; ++c) zs += z_part.data_ptr<A>()[c];
    aux.fill_(A(E) * sum_fp);
    z.fill_(zs / A(T));
  }
  return {weights, ids, aux, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(
    const at::Tensor& logits, int64_t k, c10::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group, double scale,
    bool return_losses) {
  const auto o =
      check_route(logits, k, std::string(scoring), renormalize, bias, n_group, topk_group, scale);
  if (logits.scalar_type() == at::kDouble)
    return route_cpu<double>(logits, k, bias, o, return_losses);
  return route_cpu<float>(logits, k, bias, o, return_losses);
}

// vLLM's topk_softmax: moe_route with softmax scoring and no bias or groups, in fp32.
std::tuple<at::Tensor, at::Tensor> moe_topk_softmax_cpu(const at::Tensor& logits, int64_t k,
                                                        bool renormalize) {
  check_topk_softmax(logits, k);
  RouteOptions o;
  o.renormalize = renormalize;
  auto r = route_cpu<float>(logits.scalar_type() == at::kDouble ? logits.to(at::kFloat) : logits, k,
                            std::nullopt, o, false);
  return {std::get<0>(r), std::get<1>(r)};
}

// The gradient in logits of one row: ds (the gradient in the scores, from the weights and the
// aux loss) through the scoring function, plus the z-loss's term.
template <typename A>
at::Tensor route_bwd_cpu(const std::optional<at::Tensor>& gw_in,
                         const std::optional<at::Tensor>& ga_in,
                         const std::optional<at::Tensor>& gz_in, const at::Tensor& logits_in,
                         const at::Tensor& ids_in, const RouteOptions& o) {
  constexpr auto kAcc = c10::CppTypeToScalarType<A>::value;
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return grad;
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i) {
    ATTNKIT_CHECK(idp[i] >= 0 && idp[i] < E, "ids: expected expert ids in [0, ", E, "), got ",
                  idp[i], " at token ", i / k, " slot ", i % k);
  }
  const bool has_w = gw_in.has_value() && gw_in->defined();
  const at::Tensor gw = has_w ? gw_in->to(kAcc).contiguous() : at::Tensor();
  const A g_aux = ga_in.has_value() && ga_in->defined() ? ga_in->item<double>() : 0.0;
  const A g_z = gz_in.has_value() && gz_in->defined() ? gz_in->item<double>() : 0.0;
  // d aux / d p[t, e] = E * f_e / T with f_e = count_e / (T k): the fraction routed to e.
  std::vector<A> a_coef(E, A(0));
  if (g_aux != A(0)) {
    std::vector<int64_t> counts(E, 0);
    for (int64_t i = 0; i < T * k; ++i) ++counts[idp[i]];
    for (int64_t e = 0; e < E; ++e) a_coef[e] = g_aux * A(E) * A(counts[e]) / A(T * k) / A(T);
  }
  ATTNKIT_DISPATCH_CPU_FLOAT(logits.scalar_type(), "moe_route_bwd_cpu", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    const A* gwp = has_w ? gw.data_ptr<A>() : nullptr;
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      std::vector<A> x(E), s(E), ds(E);
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t e = 0; e < E; ++e) x[e] = A(lp[t * E + e]);
        const A lse = route_scores(x.data(), E, o.sigmoid, s.data());
        std::fill(ds.begin(), ds.end(), A(0));
        if (gwp) {
          const int64_t* id = idp + t * k;
          const A* g = gwp + t * k;
          if (o.renormalize) {
            // w_j = c s_j / S: dS_j = c / S (g_j - sum_m g_m s_m / S).
            A S = 0, gs = 0;
            for (int64_t j = 0; j < k; ++j) S += s[id[j]];
            for (int64_t j = 0; j < k; ++j) gs += g[j] * s[id[j]];
            for (int64_t j = 0; j < k; ++j) ds[id[j]] += A(o.scale) / S * (g[j] - gs / S);
          } else {
            for (int64_t j = 0; j < k; ++j) ds[id[j]] += A(o.scale) * g[j];
          }
        }
        if (g_aux != A(0)) {
          if (o.sigmoid) {  // p = s / sum(s): dp_e/ds_m = (delta_em - p_e) / sum(s)
            A ssum = 0, ap = 0;
            for (int64_t e = 0; e < E; ++e) ssum += s[e];
            for (int64_t e = 0; e < E; ++e) ap += a_coef[e] * s[e];
            ap /= ssum;
            for (int64_t e = 0; e < E; ++e) ds[e] += (a_coef[e] - ap) / ssum;
          } else {
            for (int64_t e = 0; e < E; ++e) ds[e] += a_coef[e];
          }
        }
        A dot = 0;
        if (!o.sigmoid) {
          for (int64_t e = 0; e < E; ++e) dot += ds[e] * s[e];
        }
        const A zc = g_z * A(2) * lse / A(T);
        for (int64_t e = 0; e < E; ++e) {
          A d = o.sigmoid ? ds[e] * s[e] * (A(1) - s[e]) : s[e] * (ds[e] - dot);
          if (g_z != A(0)) d += zc * std::exp(x[e] - lse);
          gp[t * E + e] = scalar_t(d);
        }
      }
    });
  });
  return grad;
}

at::Tensor moe_route_bwd_cpu(const std::optional<at::Tensor>& grad_w,
                             const std::optional<at::Tensor>& grad_aux,
                             const std::optional<at::Tensor>& grad_z, const at::Tensor& logits,
                             const at::Tensor& ids, c10::string_view scoring, bool renormalize,
                             double scale) {
  const auto o = check_route_bwd(grad_w, grad_aux, grad_z, logits, ids, std::string(scoring),
                                 renormalize, scale);
  if (logits.scalar_type() == at::kDouble) {
    return route_bwd_cpu<double>(grad_w, grad_aux, grad_z, logits, ids, o);
  }
  return route_bwd_cpu<float>(grad_w, grad_aux, grad_z, logits, ids, o);
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

// Per expert and per block of rows, in the accumulation dtype: the product's [rows, 2I] block
// lives only as long as its SwiGLU (one rounding at the end, as the fused CUDA kernel).
at::Tensor grouped_gemm_swiglu_cpu(const at::Tensor& a, const at::Tensor& w,
                                   const at::Tensor& off) {
  check_grouped_gemm_swiglu(a, w, off);
  // The product below is this op's, in fp32 (fp64 for fp64 inputs), whatever autocast region the
  // call is in: at::mm would otherwise be cast to the region's dtype (csrc/autocast/moe.cpp casts
  // the op's inputs instead, once, outside).
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t M = a.size(0), I = w.size(2) / 2;
  const auto o = offsets_on_host(off, M);
  const auto acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::zeros({M, I}, a.options());  // rows outside every expert stay 0
  if (I == 0) return out;
  constexpr int64_t kRows = 1024;
  for (int64_t e = 0; e + 1 < int64_t(o.size()); ++e) {
    if (o[e + 1] <= o[e]) continue;
    const auto we = w[e].to(acc);
    for (int64_t lo = o[e]; lo < o[e + 1]; lo += kRows) {
      const int64_t n = std::min(kRows, o[e + 1] - lo);
      const auto h = at::mm(a.narrow(0, lo, n).to(acc), we);
      out.narrow(0, lo, n).copy_(at::silu(h.narrow(1, 0, I)).mul_(h.narrow(1, I, I)));
    }
  }
  return out;
}

// Greedy longest-processing-time first: experts by load descending (lower expert id first on
// ties), each to the rank with the smallest load so far (lower rank first on ties).
at::Tensor expert_load_balance_cpu(const at::Tensor& loads_in, int64_t world_size) {
  check_load_balance(loads_in, world_size);
  const auto loads = loads_in.to(at::kDouble).contiguous();
  const int64_t E = loads.size(0);
  const double* lp = loads.data_ptr<double>();
  for (int64_t e = 0; e < E; ++e) {
    ATTNKIT_CHECK(lp[e] >= 0 && std::isfinite(lp[e]),
                  "expert_loads: expected non-negative finite loads, got ", lp[e],
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

// The private ops (docs/ops.md, MoE "Kernel choice"): the CPU has one kernel per op, which
// "auto" and "portable" name; a CUDA kernel's name is an error. moe_permute's launch options
// change nothing here.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_with_cpu(const at::Tensor& x,
                                                                    const at::Tensor& ids,
                                                                    int64_t num_experts,
                                                                    bool rank_hist, bool pdl,
                                                                    std::optional<bool> lean_prologue) {
  make_permute_launch_options(rank_hist, pdl, lean_prologue);
  return moe_permute_cpu(x, ids, num_experts);
}

at::Tensor grouped_gemm_with_cpu(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off,
                                 c10::string_view kernel) {
  check_cpu_moe_kernel(kernel);
  return grouped_gemm_cpu(a, w, off);
}

at::Tensor grouped_gemm_swiglu_with_cpu(const at::Tensor& a, const at::Tensor& w,
                                        const at::Tensor& off, c10::string_view kernel) {
  check_cpu_moe_kernel(kernel);
  return grouped_gemm_swiglu_cpu(a, w, off);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("moe_topk_softmax", &moe_topk_softmax_cpu);
  m.impl("moe_route", &moe_route_cpu);
  m.impl("_moe_route_bwd", &moe_route_bwd_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("_moe_unpermute_bwd", &moe_unpermute_bwd_cpu);
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("_grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("grouped_gemm_swiglu", &grouped_gemm_swiglu_cpu);
  m.impl("expert_load_balance", &expert_load_balance_cpu);
  m.impl("_moe_permute_with", &moe_permute_with_cpu);
  m.impl("_grouped_gemm_with", &grouped_gemm_with_cpu);
  m.impl("_grouped_gemm_swiglu_with", &grouped_gemm_swiglu_with_cpu);
}

}  // namespace moe
}  // namespace attnkit
