// moe_route kernels (torch-free): scoring, grouped top-k selection and the weights; the
// load-balancing and z losses; the backward. Launch helpers take raw pointers, sizes and a
// stream; the caller checks the launch.
//
// Forward: one warp per token row. The warp computes the row's scores into shared memory, the
// selection keys (the logit without a bias, score + bias with one; NaN keys rank as -inf), the
// group scores, then takes the kept groups and the k experts one at a time: selection j is the
// best (key, id) that ranks after selection j-1 in the strict order "larger key first, lower id
// first on ties", so nothing is marked and every lane agrees after a butterfly reduction. A group
// is kept when it ranks at or before the topk_group-th kept group.
// Losses (deterministic, no float atomics): expert counts by integer atomics (exact in any
// order); per-(expert, 256-token chunk) partial sums of the router probabilities and of lse^2,
// each over its tokens in a fixed order; one block adds the partials in chunk order.
// Backward: one warp per token row; lane 0 scatters the weights' gradient into a shared-memory
// row (serially, so repeated ids add in slot order), then two passes over the experts.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "kernels/moe/common.cuh"

namespace attnkit {
namespace moe {

constexpr int kRouteMaxWarps = 4;          // token rows per block (one warp each)
constexpr int kRouteSmemBytes = 48 << 10;  // default dynamic shared memory per block
constexpr int kLossTokens = 256;           // tokens per loss partial
constexpr int kLossThreads = 256;

template <typename A>
ATTNKIT_DEVICE ATTNKIT_INLINE bool route_before(A v, int i, A bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

template <typename A>
ATTNKIT_DEVICE ATTNKIT_INLINE A warp_sum(A v) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}

template <typename A>
ATTNKIT_DEVICE ATTNKIT_INLINE A warp_max(A v) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const A other = shfl_xor(v, o);
    v = other > v ? other : v;
  }
  return v;
}

// The best (value, id) of the warp; every lane gets the same pair.
template <typename A>
ATTNKIT_DEVICE ATTNKIT_INLINE void warp_best(A& bv, int& bi) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const A ov = shfl_xor(bv, o);
    const int oi = shfl_xor(bi, o);
    if (route_before(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
}

// Row max and sum of exp(x - max) (NaN logits are skipped by the max, not by the sum).
template <typename T, typename A>
ATTNKIT_DEVICE ATTNKIT_INLINE void row_softmax_stats(const T* x, int E, int lane, A& mx, A& sum) {
  mx = A(-INFINITY);
  for (int e = lane; e < E; e += kWarpSize) {
    const A v = to_acc<A>(x[e]);
    mx = v > mx ? v : mx;
  }
  mx = warp_max(mx);
  sum = A(0);
  for (int e = lane; e < E; e += kWarpSize) sum += exp(to_acc<A>(x[e]) - mx);
  sum = warp_sum(sum);
}

template <typename A>
ATTNKIT_DEVICE ATTNKIT_INLINE A route_score(A v, bool sigmoid, A mx, A sum) {
  return sigmoid ? A(1) / (A(1) + exp(-v)) : exp(v - mx) / sum;
}

// Shared memory per warp of the forward: scores [E], keys [E], group scores [n_group].
template <typename A>
inline int64_t route_smem_per_warp(int E, int n_group) {
  return (2 * int64_t(E) + n_group) * int64_t(sizeof(A));
}

// stats (optional, [tokens, 2]): lse of the logits and the sum of the scores, for the losses.
template <typename T, typename A>
__global__ void route_kernel(const T* __restrict__ logits, const A* __restrict__ bias,
                             int64_t tokens, int E, int k, bool sigmoid, bool renormalize,
                             int n_group, int topk_group, A scale, A* __restrict__ weights,
                             int32_t* __restrict__ ids, A* __restrict__ stats) {
  extern __shared__ unsigned char route_smem[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (t >= tokens) return;  // no block-wide barrier below
  A* s = reinterpret_cast<A*>(route_smem) + int64_t(warp) * (2 * E + n_group);
  A* key = s + E;
  A* gscore = key + E;
  const T* x = logits + t * E;
  A mx, sum;
  row_softmax_stats(x, E, lane, mx, sum);
  A ssum = A(0);
  for (int e = lane; e < E; e += kWarpSize) {
    const A v = to_acc<A>(x[e]);
    const A se = route_score(v, sigmoid, mx, sum);
    s[e] = se;
    ssum += se;
    const A kv = bias != nullptr ? se + bias[e] : v;
    key[e] = isnan(kv) ? A(-INFINITY) : kv;
  }
  if (stats != nullptr) {
    ssum = warp_sum(ssum);
    if (lane == 0) {
      stats[2 * t] = isinf(mx) ? mx : mx + log(sum);  // +-inf rows: torch.logsumexp's value
      stats[2 * t + 1] = ssum;
    }
  }
  warp_sync();
  // Kept groups: everything ranking at or before (gv, gi), the topk_group-th best group.
  const bool grouped = n_group > 1;
  const int gs = E / n_group;
  A gv = A(INFINITY);
  int gi = -1;
  if (grouped) {
    for (int g = lane; g < n_group; g += kWarpSize) {
      A b1 = A(-INFINITY), b2 = A(-INFINITY);
      for (int e = g * gs; e < (g + 1) * gs; ++e) {
        const A v = key[e];
        if (v > b1) {
          b2 = b1;
          b1 = v;
        } else if (v > b2) {
          b2 = v;
        }
      }
      const A sc = bias != nullptr && gs >= 2 ? b1 + b2 : b1;
      gscore[g] = isnan(sc) ? A(-INFINITY) : sc;
    }
    warp_sync();
    for (int j = 0; j < topk_group; ++j) {
      A bv = A(-INFINITY);
      int bi = INT32_MAX;
      for (int g = lane; g < n_group; g += kWarpSize) {
        const A v = gscore[g];
        if ((j == 0 || route_before(gv, gi, v, g)) && route_before(v, g, bv, bi)) {
          bv = v;
          bi = g;
        }
      }
      warp_best(bv, bi);
      gv = bv;
      gi = bi;
    }
  }
  A pv = A(INFINITY), selected = A(0);
  int pi = -1;
  for (int j = 0; j < k; ++j) {
    A bv = A(-INFINITY);
    int bi = INT32_MAX;
    for (int e = lane; e < E; e += kWarpSize) {
      if (grouped && route_before(gv, gi, gscore[e / gs], e / gs)) continue;  // group not kept
      const A v = key[e];
      if ((j == 0 || route_before(pv, pi, v, e)) && route_before(v, e, bv, bi)) {
        bv = v;
        bi = e;
      }
    }
    warp_best(bv, bi);
    // The host checks k <= topk_group * E / n_group and keys are never NaN, so there always is a
    // candidate; the guard only keeps a broken invariant from reading out of bounds.
    const bool found = bi >= 0 && bi < E;
    const A w = found ? s[bi] : A(0);
    if (lane == 0) {
      ids[t * k + j] = found ? bi : 0;
      weights[t * k + j] = w;
    }
    selected += w;
    pv = bv;
    pi = bi;
  }
  if (lane == 0) {
    const A mul = renormalize ? scale / selected : scale;
    for (int j = 0; j < k; ++j) weights[t * k + j] *= mul;
  }
}

template <typename T, typename A>
void launch_route(const T* logits, const A* bias, int64_t tokens, int E, int k, bool sigmoid,
                  bool renormalize, int n_group, int topk_group, A scale, A* weights, int32_t* ids,
                  A* stats, int warps, cudaStream_t stream) {
  const int64_t blocks = (tokens + warps - 1) / warps;
  const size_t smem = size_t(warps) * size_t(route_smem_per_warp<A>(E, n_group));
  route_kernel<T, A><<<blocks, warps * kWarpSize, smem, stream>>>(
      logits, bias, tokens, E, k, sigmoid, renormalize, n_group, topk_group, scale, weights, ids,
      stats);
}

// counts [E] must be zero on entry; ids outside [0, E) are not counted.
template <typename index_t>
__global__ void route_count_kernel(const index_t* __restrict__ ids, int64_t n, int E,
                                   int32_t* __restrict__ counts) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const index_t id = ids[i];
    if (id >= 0 && id < index_t(E)) atomicAdd(counts + id, 1);
  }
}

template <typename index_t>
void launch_route_count(const index_t* ids, int64_t n, int E, int32_t* counts,
                        cudaStream_t stream) {
  if (n == 0) return;
  const int64_t blocks = (n + 255) / 256 < 1024 ? (n + 255) / 256 : 1024;
  route_count_kernel<index_t><<<blocks, 256, 0, stream>>>(ids, n, E, counts);
}

// Grid (ceil(E / warp), chunks): lane <-> expert, warp w takes the chunk's tokens w, w + warps, ...
// p_part [chunks, E]: the sum over the chunk of the router probability (the softmax, or the
// sigmoid scores normalised per token); z_part [chunks]: the sum of lse^2 (written by column 0).
template <typename T, typename A>
__global__ void route_loss_partial_kernel(const T* __restrict__ logits, const A* __restrict__ stats,
                                          int64_t tokens, int E, bool sigmoid,
                                          A* __restrict__ p_part, A* __restrict__ z_part) {
  __shared__ A red[kLossThreads];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int e = blockIdx.x * kWarpSize + lane;
  const int64_t c = blockIdx.y,
                t1 = (c + 1) * kLossTokens < tokens ? (c + 1) * kLossTokens : tokens;
  A acc = A(0), zacc = A(0);
  for (int64_t t = c * kLossTokens + warp; t < t1; t += warps) {
    const A lse = stats[2 * t], ssum = stats[2 * t + 1];
    if (e < E) {
      const A v = to_acc<A>(logits[t * E + e]);
      acc += sigmoid ? A(1) / (A(1) + exp(-v)) / ssum : exp(v - lse);
    }
    zacc += lse * lse;
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  if (warp == 0 && e < E) {
    A sum = A(0);
    for (int w = 0; w < warps; ++w) sum += red[w * kWarpSize + lane];
    p_part[c * E + e] = sum;
  }
  if (blockIdx.x != 0) return;
  __syncthreads();
  if (lane == 0) red[warp] = zacc;
  __syncthreads();
  if (threadIdx.x == 0) {
    A sum = A(0);
    for (int w = 0; w < warps; ++w) sum += red[w];
    z_part[c] = sum;
  }
}

// One block: aux = E * sum_e f_e P_e with f_e = counts[e] / (tokens k) and P_e the mean router
// probability; z = mean lse^2.
template <typename A>
__global__ void route_loss_final_kernel(const A* __restrict__ p_part, const A* __restrict__ z_part,
                                        const int32_t* __restrict__ counts, int64_t chunks,
                                        int64_t tokens, int E, int k, A* __restrict__ aux,
                                        A* __restrict__ z) {
  __shared__ A red[kLossThreads / kWarpSize];
  A local = A(0);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    A pe = A(0);
    for (int64_t c = 0; c < chunks; ++c) pe += p_part[c * E + e];
    local += A(counts[e]) / A(tokens * k) * (pe / A(tokens));
  }
  const A total = block_sum(local, red);
  A zl = A(0);
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) zl += z_part[c];
  const A ztotal = block_sum(zl, red);
  if (threadIdx.x == 0) {
    *aux = A(E) * total;
    *z = ztotal / A(tokens);
  }
}

inline int64_t route_loss_chunks(int64_t tokens) {
  return (tokens + kLossTokens - 1) / kLossTokens;
}

// Workspaces: counts [E] zeroed, p_part [chunks, E], z_part [chunks]; tokens >= 1.
template <typename T, typename A>
void launch_route_losses(const T* logits, const A* stats, const int32_t* ids, int64_t tokens, int E,
                         int k, bool sigmoid, int32_t* counts, A* p_part, A* z_part, A* aux, A* z,
                         cudaStream_t stream) {
  const int64_t chunks = route_loss_chunks(tokens);
  launch_route_count<int32_t>(ids, tokens * k, E, counts, stream);
  const dim3 grid((E + kWarpSize - 1) / kWarpSize, unsigned(chunks));
  route_loss_partial_kernel<T, A>
      <<<grid, kLossThreads, 0, stream>>>(logits, stats, tokens, E, sigmoid, p_part, z_part);
  route_loss_final_kernel<A>
      <<<1, kLossThreads, 0, stream>>>(p_part, z_part, counts, chunks, tokens, E, k, aux, z);
}

// ---- backward: one warp per token row ----------------------------------------------------------
// grad_w [tokens, k], grad_aux / grad_z (one element each) are optional (nullptr); counts [E]
// (the experts' token counts, only read with grad_aux). Shared memory per warp: ds [E].
template <typename T, typename A, typename index_t>
__global__ void route_bwd_kernel(const T* __restrict__ logits, const index_t* __restrict__ ids,
                                 const A* __restrict__ grad_w, const A* __restrict__ grad_aux,
                                 const A* __restrict__ grad_z, const int32_t* __restrict__ counts,
                                 int64_t tokens, int E, int k, bool sigmoid, bool renormalize,
                                 A scale, T* __restrict__ grad_logits) {
  extern __shared__ unsigned char route_smem[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (t >= tokens) return;
  A* ds = reinterpret_cast<A*>(route_smem) + int64_t(warp) * E;
  const T* x = logits + t * E;
  A mx, sum;
  row_softmax_stats(x, E, lane, mx, sum);
  const A lse = mx + log(sum);
  for (int e = lane; e < E; e += kWarpSize) ds[e] = A(0);
  warp_sync();
  if (grad_w != nullptr && lane == 0) {
    // w_j = c s_j / S (renormalised) or c s_j: the gradient in the selected scores.
    const index_t* id = ids + t * k;
    const A* g = grad_w + t * k;
    A S = A(0), G = A(0);
    for (int j = 0; j < k; ++j) {
      if (id[j] < 0 || id[j] >= index_t(E)) continue;  // dropped: contributes nothing
      const A sj = route_score(to_acc<A>(x[id[j]]), sigmoid, mx, sum);
      S += sj;
      G += g[j] * sj;
    }
    for (int j = 0; j < k; ++j) {
      if (id[j] < 0 || id[j] >= index_t(E)) continue;
      ds[id[j]] += renormalize ? scale / S * (g[j] - G / S) : scale * g[j];
    }
  }
  warp_sync();
  const A ga = grad_aux != nullptr ? *grad_aux : A(0);
  const A gz = grad_z != nullptr ? *grad_z : A(0);
  // d aux / d p[t, e] = E f_e / T, f_e = counts[e] / (T k).
  const A acoef = ga * A(E) / (A(tokens) * A(k) * A(tokens));
  A ssum = A(1), ap = A(0);
  if (ga != A(0) && sigmoid) {  // p = s / sum(s)
    A s1 = A(0), s2 = A(0);
    for (int e = lane; e < E; e += kWarpSize) {
      const A se = route_score(to_acc<A>(x[e]), true, mx, sum);
      s1 += se;
      s2 += acoef * A(counts[e]) * se;
    }
    ssum = warp_sum(s1);
    ap = warp_sum(s2) / ssum;
  }
  A dot = A(0);
  for (int e = lane; e < E; e += kWarpSize) {
    const A se = route_score(to_acc<A>(x[e]), sigmoid, mx, sum);
    A d = ds[e];
    if (ga != A(0)) {
      const A a = acoef * A(counts[e]);
      d += sigmoid ? (a - ap) / ssum : a;
    }
    ds[e] = d;
    dot += d * se;
  }
  dot = sigmoid ? A(0) : warp_sum(dot);
  const A zc = gz * A(2) * lse / A(tokens);
  for (int e = lane; e < E; e += kWarpSize) {
    const A v = to_acc<A>(x[e]);
    const A se = route_score(v, sigmoid, mx, sum);
    const A d = ds[e];
    A g = sigmoid ? d * se * (A(1) - se) : se * (d - dot);
    if (gz != A(0)) g += zc * exp(v - lse);
    grad_logits[t * E + e] = from_acc<T>(g);
  }
}

// counts [E] must be zero on entry (filled here when grad_aux is given).
template <typename T, typename A, typename index_t>
void launch_route_bwd(const T* logits, const index_t* ids, const A* grad_w, const A* grad_aux,
                      const A* grad_z, int32_t* counts, int64_t tokens, int E, int k, bool sigmoid,
                      bool renormalize, A scale, T* grad_logits, int warps, cudaStream_t stream) {
  if (grad_aux != nullptr) launch_route_count<index_t>(ids, tokens * k, E, counts, stream);
  const int64_t blocks = (tokens + warps - 1) / warps;
  const size_t smem = size_t(warps) * size_t(E) * sizeof(A);
  route_bwd_kernel<T, A, index_t><<<blocks, warps * kWarpSize, smem, stream>>>(
      logits, ids, grad_w, grad_aux, grad_z, counts, tokens, E, k, sigmoid, renormalize, scale,
      grad_logits);
}

}  // namespace moe
}  // namespace attnkit
