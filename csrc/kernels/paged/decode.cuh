// Paged decode attention on the GPU (torch-free): one kernel serves paged_attention_v1 and
// pa_fwd. Decode is memory-bound, so the design is about reading every K/V byte once:
//  - one thread block per (sequence, kv head, row chunk, split): the block holds up to ROWS
//    query rows (the G query heads of the kv head x the new tokens) and reads the kv head once
//    for all of them;
//  - keys: one thread per token, 16-byte loads along the head dim (a warp reads 2-4 contiguous
//    256-byte runs per load instruction), four loads in flight before they are used;
//  - values: one thread per head-dim element, 16-byte loads of consecutive tokens (8-byte for
//    8-bit caches), four in flight;
//  - split-K: splits walk partitions of kPartition tokens (grid-stride, so a context longer than
//    the host's estimate is still computed in full), each keeping a running (max, sum, partial
//    out); with more than one split a combine kernel merges them.
// Block ids outside [0, num_blocks) are never dereferenced: their tokens are masked out (they
// contribute nothing, as if absent). Lengths are clamped to the block table's capacity and query
// offsets to Q's rows, so no tensor value can make the kernels read or write out of bounds.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/portability.h"
#include "kernels/common/pdl.cuh"
#include "kernels/paged/params.h"

namespace attnkit {
namespace paged {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxDimPerThread = kMaxHeadDim / kThreads;  // value dims one thread accumulates
constexpr int kLoadsInFlight = 4;
// The group reduction reuses the logits buffer: groups * ROWS * D <= kThreads * ROWS floats.
static_assert(kThreads * kMaxDimPerThread <= kPartition, "reduction buffer too small");
static_assert(kPartition % 32 == 0 && kPartition / 8 >= kPartition / 32, "partition vs block sizes");

template <typename scalar_t, CacheKind K>
struct CacheTraits {
  using storage = std::conditional_t<K == CacheKind::kSame, scalar_t,
                                     std::conditional_t<K == CacheKind::kInt8, int8_t, uint8_t>>;
  static constexpr int kX = 16 / int(sizeof(storage));  // key elements per 16-byte load
  // Value tokens per load: must divide both x (ASM layout) and every block size (vLLM layout).
  static constexpr int kVC = kX < 8 ? kX : 8;
  static constexpr int kVBytes = kVC * int(sizeof(storage));

  ATTNKIT_DEVICE ATTNKIT_INLINE static float to_f(storage v) {
    if constexpr (K == CacheKind::kSame) {
      return to_float(v);
    } else if constexpr (K == CacheKind::kFp8E4M3) {
      return fp8_to_float<4, 3>(v);
    } else if constexpr (K == CacheKind::kFp8E5M2) {
      return fp8_to_float<5, 2>(v);
    } else {
      return float(v);
    }
  }
};

template <int BYTES>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};

template <int BYTES>
ATTNKIT_DEVICE ATTNKIT_INLINE typename RawVec<BYTES>::type load_raw(const void* p) {
  return *reinterpret_cast<const typename RawVec<BYTES>::type*>(p);
}

ATTNKIT_DEVICE ATTNKIT_INLINE float warp_max(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fmaxf(v, shfl_xor(v, o));
  return v;
}

ATTNKIT_DEVICE ATTNKIT_INLINE float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}

// Query rows of sequence b: tokens [q0, q0 + qlen) of Q, clamped into Q.
struct SeqQuery {
  int64_t q0, qlen, L;
};

ATTNKIT_DEVICE ATTNKIT_INLINE SeqQuery seq_query(const DecodeParams& p, int64_t b) {
  SeqQuery s;
  if (p.qo_indptr) {
    int64_t a = p.qo_indptr[b], e = p.qo_indptr[b + 1];
    a = a < 0 ? 0 : (a > p.Tq ? p.Tq : a);
    e = e < a ? a : (e > p.Tq ? p.Tq : e);
    s.q0 = a;
    s.qlen = e - a < p.max_qlen ? e - a : p.max_qlen;
  } else {
    s.q0 = b;
    s.qlen = 1;
  }
  int64_t L = p.seq_lens[b];
  const int64_t cap = int64_t(p.max_blocks) * p.block_size;
  s.L = L < 0 ? 0 : (L > cap ? cap : L);
  return s;
}

// The sequence holding query token t (token_grid), or -1 when none does (offsets that leave t
// uncovered). Pure decode (token t is sequence t) costs two loads; otherwise a binary search for
// the last sequence starting at or before t, then a check that t lies inside it.
ATTNKIT_DEVICE ATTNKIT_INLINE int64_t seq_of_token(const DecodeParams& p, int64_t t) {
  const int32_t* c = p.qo_indptr;
  if (t < p.S && c[t] == t && c[t + 1] == t + 1) return t;
  int64_t lo = 0, hi = int64_t(p.S) - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (c[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  if (p.S <= 0) return -1;
  const SeqQuery sq = seq_query(p, lo);
  return (t >= sq.q0 && t < sq.q0 + sq.qlen) ? lo : -1;
}

// grid: x = S * Hkv * row_chunks, y = splits. ROWS = query rows per block (<= kMaxRows).
template <typename scalar_t, CacheKind K, int ROWS>
__global__ void __launch_bounds__(kThreads)
    paged_decode_kernel(const DecodeParams p, const int32_t row_chunks) {
  using CT = CacheTraits<scalar_t, K>;
  using storage = typename CT::storage;
  constexpr int X = CT::kX, VC = CT::kVC;
  static_assert(X % 4 == 0 && VC % 4 == 0, "float4 reads of q_s / logit_s need multiples of 4");

  __shared__ __align__(16) float q_s[ROWS][kMaxHeadDim];
  __shared__ __align__(16) float logit_s[ROWS][kPartition];
  __shared__ float vs_s[kPartition];
  __shared__ int32_t blk_s[kPartition / 8];
  __shared__ float m_s[ROWS], l_s[ROWS], f_s[ROWS];
  __shared__ int64_t lo_s[ROWS], hi_s[ROWS], qpos_s[ROWS];

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t G = p.Hq / p.Hkv;
  const int64_t z = blockIdx.x % row_chunks;
  const int64_t hk = (blockIdx.x / row_chunks) % p.Hkv;
  const int64_t b = blockIdx.x / (int64_t(row_chunks) * p.Hkv);
  const int split = blockIdx.y, splits = gridDim.y;
  const SeqQuery sq = seq_query(p, b);
  const int D = p.D, bs = p.block_size;

  if (tid < ROWS) {
    const int64_t rho = z * ROWS + tid, i = rho / G;
    if (rho < G * sq.qlen) {
      const RowWindow w = row_window(sq.L, sq.qlen, i, p.window);
      lo_s[tid] = w.lo, hi_s[tid] = w.hi, qpos_s[tid] = w.qpos;
    } else {
      lo_s[tid] = 0, hi_s[tid] = 0, qpos_s[tid] = 0;
    }
    m_s[tid] = -INFINITY, l_s[tid] = 0.0f, f_s[tid] = 1.0f;
  }
  const scalar_t* q = static_cast<const scalar_t*>(p.q);
  for (int idx = tid; idx < ROWS * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const int64_t rho = z * ROWS + r, i = rho / G, h = hk * G + rho % G;
    q_s[r][d] = rho < G * sq.qlen ? to_float(q[(sq.q0 + i) * p.q_st + h * p.q_sh + d * p.q_sd]) : 0.0f;
  }
  __syncthreads();

  // Keys any row of this block can see: [kmin, kmax).
  int64_t kmin = INT64_MAX, kmax = 0;
  float slope[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (hi_s[r] > lo_s[r]) {
      kmin = lo_s[r] < kmin ? lo_s[r] : kmin;
      kmax = hi_s[r] > kmax ? hi_s[r] : kmax;
    }
    const int64_t rho = z * ROWS + r;
    slope[r] = (p.alibi && rho < G * sq.qlen) ? p.alibi[hk * G + rho % G] : 0.0f;
  }
  const float kscale_t = (!p.per_token_scale && p.k_scale) ? p.k_scale[0] : 1.0f;
  const float vscale_t = (!p.per_token_scale && p.v_scale) ? p.v_scale[0] : 1.0f;

  // Value-phase roles: a thread owns head dims d0 (+ kThreads) and walks token chunks grp,
  // grp + groups, ... (several groups when D is small, so every thread has work).
  const int groups = D <= kThreads ? kThreads / D : 1;
  const int grp = D <= kThreads ? tid / D : 0;
  const bool active = grp < groups;
  const int d0 = D <= kThreads ? tid % D : tid;
  float acc[ROWS][kMaxDimPerThread];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int k = 0; k < kMaxDimPerThread; ++k) acc[r][k] = 0.0f;

  const storage* kc = static_cast<const storage*>(p.k_cache);
  const storage* vc = static_cast<const storage*>(p.v_cache);
  const int32_t* bt = p.block_tables + b * p.bt_stride;
  const int nc = D / X;

  for (int64_t part = (kmax > kmin ? kmin / kPartition : 0) + split;
       kmax > kmin && part * kPartition < kmax; part += splits) {
    const int64_t t0 = part * kPartition;
    const int tn = int(kmax - t0 < kPartition ? kmax - t0 : kPartition);
    const int nblk = (tn + bs - 1) / bs;
    for (int i = tid; i < nblk; i += kThreads) {
      const int32_t id = bt[t0 / bs + i];
      blk_s[i] = (id >= 0 && id < p.num_blocks) ? id : -1;
    }
    __syncthreads();

    // Scores: one token per thread.
    for (int tl = tid; tl < kPartition; tl += kThreads) {
      const int blk = tl < tn ? blk_s[tl / bs] : -1;
      float dots[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) dots[r] = 0.0f;
      float ks = 0.0f, vs = 0.0f;
      if (blk >= 0) {
        const int tin = tl % bs;
        const storage* kp = kc + blk * p.cs.k_sb + hk * p.cs.k_sh + tin * p.cs.k_st;
        for (int c0 = 0; c0 < nc; c0 += kLoadsInFlight) {
          uint4 raw[kLoadsInFlight];
#pragma unroll
          for (int u = 0; u < kLoadsInFlight; ++u)
            if (c0 + u < nc) raw[u] = load_raw<16>(kp + int64_t(c0 + u) * p.cs.k_sdc);
#pragma unroll
          for (int u = 0; u < kLoadsInFlight; ++u) {
            if (c0 + u >= nc) break;
            const storage* e = reinterpret_cast<const storage*>(&raw[u]);
            float kf[X];
#pragma unroll
            for (int j = 0; j < X; ++j) kf[j] = CT::to_f(e[j]);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
              const float4* qv = reinterpret_cast<const float4*>(&q_s[r][(c0 + u) * X]);
#pragma unroll
              for (int j = 0; j < X / 4; ++j) {
                const float4 qq = qv[j];
                dots[r] += qq.x * kf[4 * j] + qq.y * kf[4 * j + 1] + qq.z * kf[4 * j + 2] +
                           qq.w * kf[4 * j + 3];
              }
            }
          }
        }
        if (p.per_token_scale) {
          ks = p.k_scale[blk * p.ks_sb + hk * p.ks_sh + tin];
          vs = p.v_scale[blk * p.vs_sb + hk * p.vs_sh + tin];
        } else {
          ks = kscale_t;
          vs = 1.0f;
        }
      }
      const int64_t t = t0 + tl;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const bool vis = blk >= 0 && t >= lo_s[r] && t < hi_s[r];
        logit_s[r][tl] =
            vis ? finish_logit(dots[r] * ks, p.scale, p.softcap, slope[r], t, qpos_s[r]) : -INFINITY;
      }
      vs_s[tl] = vs;
    }
    __syncthreads();

    // Running softmax per row: p = exp(s - m_new); earlier partitions rescaled by f.
    for (int r = warp; r < ROWS; r += kWarps) {
      float mx = -INFINITY;
      for (int tl = lane; tl < kPartition; tl += kWarpSize) mx = fmaxf(mx, logit_s[r][tl]);
      mx = warp_max(mx);
      const float m_old = m_s[r], m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
      for (int tl = lane; tl < kPartition; tl += kWarpSize) {
        const float e = m_new == -INFINITY ? 0.0f : expf(logit_s[r][tl] - m_new);
        logit_s[r][tl] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float f = m_new == -INFINITY ? 1.0f : expf(m_old - m_new);
        m_s[r] = m_new;
        l_s[r] = l_s[r] * f + sum;
        f_s[r] = f;
      }
    }
    __syncthreads();

    // P·V: each thread its head dims, token chunks of VC.
    if (active) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float f = f_s[r];
#pragma unroll
        for (int k = 0; k < kMaxDimPerThread; ++k) acc[r][k] *= f;
      }
      const int nch = (tn + VC - 1) / VC;
#pragma unroll
      for (int k = 0; k < kMaxDimPerThread; ++k) {
        const int d = d0 + k * kThreads;
        if ((D <= kThreads && k > 0) || d >= D) break;
        const storage* vd = vc + hk * p.cs.v_sh + int64_t(d) * p.cs.v_sd;
        for (int c0 = grp; c0 < nch; c0 += groups * kLoadsInFlight) {
          typename RawVec<CT::kVBytes>::type raw[kLoadsInFlight];
          int blks[kLoadsInFlight];
#pragma unroll
          for (int u = 0; u < kLoadsInFlight; ++u) {
            const int tl = (c0 + u * groups) * VC;
            blks[u] = (c0 + u * groups) < nch ? blk_s[tl / bs] : -1;
            if (blks[u] >= 0) {
              const int tin = tl % bs;
              raw[u] = load_raw<CT::kVBytes>(vd + blks[u] * p.cs.v_sb + (tin / p.cs.v_tx) * p.cs.v_stc +
                                             tin % p.cs.v_tx);
            }
          }
#pragma unroll
          for (int u = 0; u < kLoadsInFlight; ++u) {
            if (blks[u] < 0) continue;
            const int tl = (c0 + u * groups) * VC;
            const storage* e = reinterpret_cast<const storage*>(&raw[u]);
            float vf[VC];
#pragma unroll
            for (int j = 0; j < VC; ++j) {
              // Tokens past the length, and tokens before every row's window (the first chunk
              // may start there), may hold anything (even NaN): never multiply them in.
              vf[j] = tl + j < tn && t0 + tl + j >= kmin ? CT::to_f(e[j]) : 0.0f;
              if (p.per_token_scale) vf[j] *= vs_s[tl + j];
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
              // tl is a multiple of VC (4 or 8): 16-byte shared loads of the probabilities.
              const float4* pv = reinterpret_cast<const float4*>(&logit_s[r][tl]);
              float s = 0.0f;
#pragma unroll
              for (int j = 0; j < VC / 4; ++j) {
                const float4 pp = pv[j];
                s += pp.x * vf[4 * j] + pp.y * vf[4 * j + 1] + pp.z * vf[4 * j + 2] + pp.w * vf[4 * j + 3];
              }
              acc[r][k] += s;
            }
          }
        }
      }
    }
    __syncthreads();
  }

  // Sum the groups' partial outputs (logit_s is free now: groups * ROWS * D <= ROWS * kPartition).
  float* red = &logit_s[0][0];
  if (groups > 1) {
    if (active && grp > 0) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) red[(grp * ROWS + r) * D + d0] = acc[r][0];
    }
    __syncthreads();
    if (grp == 0) {
      for (int g2 = 1; g2 < groups; ++g2)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r][0] += red[(g2 * ROWS + r) * D + d0];
    }
  }
  if (grp != 0) return;

  scalar_t* out = static_cast<scalar_t*>(p.out);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t rho = z * ROWS + r;
    if (rho >= G * sq.qlen) continue;
    const int64_t tok = sq.q0 + rho / G, h = hk * G + rho % G;
    const float l = l_s[r];
    const int64_t ws_row = (tok * p.Hq + h) * splits + split;
#pragma unroll
    for (int k = 0; k < kMaxDimPerThread; ++k) {
      const int d = d0 + k * kThreads;
      if ((D <= kThreads && k > 0) || d >= D) break;
      if (splits == 1) {
        out[tok * p.o_st + h * p.o_sh + d * p.o_sd] =
            from_float<scalar_t>(l > 0.0f ? acc[r][k] * vscale_t / l : 0.0f);
      } else {
        p.ws_out[ws_row * D + d] = acc[r][k] * vscale_t;
      }
    }
    if (splits > 1 && tid == 0) {
      p.ws_ml[ws_row * 2] = m_s[r];
      p.ws_ml[ws_row * 2 + 1] = l;
    }
  }
}

// Merges the splits of one (query token, head): out = sum_j w_j o_j / sum_j w_j l_j with
// w_j = exp(m_j - max m). grid: x = S * max_qlen, y = Hq.
// With few rows and many splits (one long sequence: a few dozen CTAs, up to kMaxSplits splits)
// this kernel is latency bound, so the threads split the work over (4 dims, split group) and read
// 16 bytes per load without a branch around it: the loads of one thread are independent and the
// compiler can keep several in flight instead of paying one L2 round trip per split.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) paged_combine_kernel(const DecodeParams p) {
  __shared__ float w_s[kMaxSplits];
  __shared__ float inv_s;
  __shared__ __align__(16) float part_s[4 * kThreads];  // [split group][D] partial sums
  // Launched with PDL after the decode kernel (which lets it be scheduled from its start): wait
  // for the splits' rows. A no-op when launched without PDL.
  pdl_wait();
  const int64_t h = blockIdx.y;
  int64_t tok, srow;  // the output row, and its rows of split partials (row srow)
  if (p.token_grid) {
    tok = srow = blockIdx.x;  // every token's splits were written (uncovered ones with m = -inf)
  } else if (p.short_seq_rows > 0) {
    const int64_t b = blockIdx.x / p.short_seq_rows, i = blockIdx.x % p.short_seq_rows;
    const SeqQuery sq = seq_query(p, b);
    // Not this kernel's sequence (its decode CTAs wrote nothing), or no such row.
    if (!decode_takes_rows(p, sq.qlen) || i >= sq.qlen) return;
    tok = sq.q0 + i, srow = blockIdx.x;
  } else {
    const int64_t b = blockIdx.x / p.max_qlen, i = blockIdx.x % p.max_qlen;
    const SeqQuery sq = seq_query(p, b);
    if (i >= sq.qlen) return;
    tok = srow = sq.q0 + i;
  }
  const int splits = p.splits;
  const int64_t row0 = (srow * p.Hq + h) * splits;
  if (threadIdx.x < kWarpSize) {
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < splits; j += kWarpSize) mx = fmaxf(mx, p.ws_ml[(row0 + j) * 2]);
    mx = warp_max(mx);
    float den = 0.0f;
    for (int j = threadIdx.x; j < splits; j += kWarpSize) {
      const float m = p.ws_ml[(row0 + j) * 2], l = p.ws_ml[(row0 + j) * 2 + 1];
      const float w = (m == -INFINITY || l == 0.0f) ? 0.0f : expf(m - mx);
      w_s[j] = w;
      den += w * l;
    }
    den = warp_sum(den);
    if (threadIdx.x == 0) {
      inv_s = den > 0.0f ? 1.0f / den : 0.0f;
      if (p.lse) p.lse[h * p.lse_sh + tok * p.lse_st] = den > 0.0f ? mx + logf(den) : -INFINITY;
    }
  }
  __syncthreads();

  // Thread = (vector v of dims 4v..4v+3, split group sg): splits sg, sg + groups, ... The D % 8
  // == 0 check and the workspace's allocator alignment keep the float4 loads aligned. Every
  // split's row was written by the decode kernel, but a weight of 0 still selects 0, never w * x
  // (a split without visible keys must not turn a stray value into NaN).
  const int nvec = p.D / 4;
  const int groups = kThreads / nvec;  // >= 2 for D <= 256
  const int v = threadIdx.x % nvec, sg = threadIdx.x / nvec;
  if (sg < groups) {
    const float4* src = reinterpret_cast<const float4*>(p.ws_out + row0 * p.D) + v;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
    for (int j = sg; j < splits; j += groups) {
      const float4 x = src[int64_t(j) * nvec];
      const float w = w_s[j];
      const bool use = w != 0.0f;
      acc.x += use ? w * x.x : 0.0f;
      acc.y += use ? w * x.y : 0.0f;
      acc.z += use ? w * x.z : 0.0f;
      acc.w += use ? w * x.w : 0.0f;
    }
    reinterpret_cast<float4*>(part_s + sg * p.D)[v] = acc;
  }
  __syncthreads();
  scalar_t* out = static_cast<scalar_t*>(p.out);
  for (int d = threadIdx.x; d < p.D; d += kThreads) {
    float o = 0.0f;
    for (int g = 0; g < groups; ++g) o += part_s[g * p.D + d];
    out[tok * p.o_st + h * p.o_sh + d * p.o_sd] = from_float<scalar_t>(o * inv_s);
  }
}

}  // namespace paged
}  // namespace attnkit
