// Portable flash attention kernels (CUDA and HIP, any dtype, head dim <= kWarpSize * kChunks):
// plain FMA, fp32 math. They serve fp32, head dims without a tensor-core path, pre-sm80 targets
// and HIP, and are the correctness baseline of the tensor-core kernels.
//
// One shape for all four kernels: a CTA owns kRows rows (kWarps warps x kRowsPerWarp rows, one
// row per warp at a time, lane l holding elements l, l + kWarpSize, ... of the head dim in
// registers) and streams the rows of the other side through shared memory in tiles of kTile rows,
// converted to fp32 once. Only the tiles the window lets a row see are visited. Torch-free.
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/flash/params.h"

namespace attnkit {
namespace flash {
namespace simt {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // owned rows per CTA
constexpr int kTile = 16;                     // streamed rows per shared-memory tile
constexpr int kThreads = kWarps * kWarpSize;

#if defined(__CUDACC__) || defined(__HIPCC__)

ATTNKIT_DEVICE ATTNKIT_INLINE float warp_sum(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) x += shfl_xor(x, o);
  return x;
}

// Scores after scale and soft-cap; dx = d(score)/d(q.k) for the backward.
struct Score {
  float s, dx;
};
ATTNKIT_DEVICE ATTNKIT_INLINE Score make_score(float qk, float scale, float softcap) {
  const float x = qk * scale;
  if (softcap > 0.f) {
    const float t = tanhf(x / softcap);
    return {softcap * t, scale * (1.f - t * t)};
  }
  return {x, scale};
}

template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE const T* row_ptr(const T* base, const Strides& s, int64_t b,
                                               int64_t row, int64_t head) {
  return base + b * s.batch + row * s.row + head * s.head;
}

// Loads rows [0, n) of a tile (row r at base + r * row_stride) into dst[kTile][kChunks * kWarpSize]
// as fp32; rows >= n and columns >= D are zero so they contribute nothing.
template <typename T, int kChunks>
ATTNKIT_DEVICE ATTNKIT_INLINE void load_tile(float* dst, const T* base, int64_t row_stride,
                                             int64_t n, int64_t D) {
  constexpr int kCols = kChunks * kWarpSize;
  for (int e = threadIdx.x; e < kTile * kCols; e += kThreads) {
    const int r = e / kCols, c = e % kCols;
    dst[e] = (r < n && c < D) ? to_float(base[r * row_stride + c]) : 0.f;
  }
}

// Lane's slice of one head-dim row into registers (zero past D), times `mul`.
template <typename T, int kChunks>
ATTNKIT_DEVICE ATTNKIT_INLINE void load_row(float (&r)[kChunks], const T* src, int64_t D,
                                            float mul = 1.f) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int d = c * kWarpSize + lane;
    r[c] = d < D ? to_float(src[d]) * mul : 0.f;
  }
}

template <int kChunks>
ATTNKIT_DEVICE ATTNKIT_INLINE float dot_row(const float (&r)[kChunks], const float* tile_row) {
  const int lane = threadIdx.x % kWarpSize;
  float x = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) x += r[c] * tile_row[c * kWarpSize + lane];
  return warp_sum(x);
}

template <typename T, int kChunks>
ATTNKIT_DEVICE ATTNKIT_INLINE void store_row(T* dst, const float (&r)[kChunks], int64_t D,
                                             float mul = 1.f) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int d = c * kWarpSize + lane;
    if (d < D) dst[d] = from_float<T>(r[c] * mul);
  }
}

// Forward: grid (query tiles, H, B); a CTA loops over query tiles with stride gridDim.x so a
// sequence longer than the grid's sizing hint is still computed in full.
template <typename T, int kChunks>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(Params p, const T* __restrict__ q, const T* __restrict__ k,
               const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse) {
  __shared__ float ks[kTile * kChunks * kWarpSize];
  __shared__ float vs[kTile * kChunks * kWarpSize];
  constexpr int kCols = kChunks * kWarpSize;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x / kWarpSize;
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  const SeqRange s = seq_range(p, b);
  for (int64_t i0 = int64_t(blockIdx.x) * kRows; i0 < s.lq; i0 += int64_t(gridDim.x) * kRows) {
    const int64_t rows = s.lq - i0 < kRows ? s.lq - i0 : kRows;
    float qr[kRowsPerWarp][kChunks], acc[kRowsPerWarp][kChunks], m[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t i = i0 + warp * kRowsPerWarp + rr;
      m[rr] = -INFINITY;
      l[rr] = 0.f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) acc[rr][c] = 0.f, qr[rr][c] = 0.f;
      if (i < s.lq) load_row<T, kChunks>(qr[rr], row_ptr(q, p.q, b, s.q0 + i, h), p.D);
    }
    const int64_t lo = key_range(p, i0, s.lq, s.lk).lo;
    const int64_t hi = key_range(p, i0 + rows - 1, s.lq, s.lk).hi;
    for (int64_t j0 = lo; j0 <= hi; j0 += kTile) {
      __syncthreads();  // the previous tile is consumed
      load_tile<T, kChunks>(ks, row_ptr(k, p.k, b, s.k0 + j0, hk), p.k.row, hi - j0 + 1, p.D);
      load_tile<T, kChunks>(vs, row_ptr(v, p.v, b, s.k0 + j0, hk), p.v.row, hi - j0 + 1, p.D);
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int64_t i = i0 + warp * kRowsPerWarp + rr;
        if (i >= s.lq) continue;  // warp-uniform
        const KeyRange kr = key_range(p, i, s.lq, s.lk);
        float sc[kTile], tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < kTile; ++j) {
          const float x = make_score(dot_row<kChunks>(qr[rr], ks + j * kCols), scale, cap).s;
          const bool visible = j0 + j >= kr.lo && j0 + j <= kr.hi;
          sc[j] = visible ? x : -INFINITY;
          tile_max = fmaxf(tile_max, sc[j]);
        }
        if (tile_max == -INFINITY) continue;
        const float m_new = fmaxf(m[rr], tile_max);
        const float corr = expf(m[rr] - m_new);  // 0 on the first visible tile
        l[rr] *= corr;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) acc[rr][c] *= corr;
#pragma unroll
        for (int j = 0; j < kTile; ++j) {
          const float pj = sc[j] == -INFINITY ? 0.f : expf(sc[j] - m_new);
          l[rr] += pj;
          const int lane = threadIdx.x % kWarpSize;
#pragma unroll
          for (int c = 0; c < kChunks; ++c) acc[rr][c] += pj * vs[j * kCols + c * kWarpSize + lane];
        }
        m[rr] = m_new;
      }
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t i = i0 + warp * kRowsPerWarp + rr;
      if (i >= s.lq) continue;
      // A row that sees no key has l = 0: output 0, lse -inf (DESIGN §3.3).
      store_row<T, kChunks>(o + b * p.o.batch + (s.q0 + i) * p.o.row + h * p.o.head, acc[rr], p.D,
                            l[rr] > 0.f ? 1.f / l[rr] : 0.f);
      if (threadIdx.x % kWarpSize == 0) {
        lse[b * p.lse.batch + h * p.lse.head + (s.q0 + i) * p.lse.row] =
            l[rr] > 0.f ? m[rr] + logf(l[rr]) : -INFINITY;
      }
    }
  }
}

// Backward preprocessing: delta_i = rowsum(dO_i * O_i), stored in lse's layout.
template <typename T, int kChunks>
__global__ void __launch_bounds__(kThreads)
    bwd_delta_kernel(Params p, const T* __restrict__ dout, const T* __restrict__ o,
                     float* __restrict__ delta) {
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int warp = threadIdx.x / kWarpSize;
  const SeqRange s = seq_range(p, b);
  for (int64_t i0 = int64_t(blockIdx.x) * kRows; i0 < s.lq; i0 += int64_t(gridDim.x) * kRows) {
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t i = i0 + warp * kRowsPerWarp + rr;
      if (i >= s.lq) break;
      float dr[kChunks], orow[kChunks];
      load_row<T, kChunks>(dr, row_ptr(dout, p.dout, b, s.q0 + i, h), p.D);
      load_row<T, kChunks>(orow, row_ptr(o, p.o, b, s.q0 + i, h), p.D);
      float x = 0.f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) x += dr[c] * orow[c];
      x = warp_sum(x);
      if (threadIdx.x % kWarpSize == 0) delta[b * p.lse.batch + h * p.lse.head + (s.q0 + i) * p.lse.row] = x;
    }
  }
}

// dQ: grid (query tiles, H, B). dQ_i = sum_j dS_ij K_j, recomputing P from lse; each CTA owns
// its rows, so no atomics and the result is deterministic.
template <typename T, int kChunks>
__global__ void __launch_bounds__(kThreads)
    bwd_dq_kernel(Params p, const T* __restrict__ dout, const T* __restrict__ q,
                  const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ lse,
                  const float* __restrict__ delta, T* __restrict__ dq) {
  __shared__ float ks[kTile * kChunks * kWarpSize];
  __shared__ float vs[kTile * kChunks * kWarpSize];
  constexpr int kCols = kChunks * kWarpSize;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  const SeqRange s = seq_range(p, b);
  for (int64_t i0 = int64_t(blockIdx.x) * kRows; i0 < s.lq; i0 += int64_t(gridDim.x) * kRows) {
    const int64_t rows = s.lq - i0 < kRows ? s.lq - i0 : kRows;
    float qr[kRowsPerWarp][kChunks], dr[kRowsPerWarp][kChunks], acc[kRowsPerWarp][kChunks];
    float lse_r[kRowsPerWarp], delta_r[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t i = i0 + warp * kRowsPerWarp + rr;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) acc[rr][c] = 0.f, qr[rr][c] = 0.f, dr[rr][c] = 0.f;
      lse_r[rr] = -INFINITY, delta_r[rr] = 0.f;
      if (i < s.lq) {
        load_row<T, kChunks>(qr[rr], row_ptr(q, p.q, b, s.q0 + i, h), p.D);
        load_row<T, kChunks>(dr[rr], row_ptr(dout, p.dout, b, s.q0 + i, h), p.D);
        const int64_t li = b * p.lse.batch + h * p.lse.head + (s.q0 + i) * p.lse.row;
        lse_r[rr] = lse[li];
        delta_r[rr] = delta[li];
      }
    }
    const int64_t lo = key_range(p, i0, s.lq, s.lk).lo;
    const int64_t hi = key_range(p, i0 + rows - 1, s.lq, s.lk).hi;
    for (int64_t j0 = lo; j0 <= hi; j0 += kTile) {
      __syncthreads();
      load_tile<T, kChunks>(ks, row_ptr(k, p.k, b, s.k0 + j0, hk), p.k.row, hi - j0 + 1, p.D);
      load_tile<T, kChunks>(vs, row_ptr(v, p.v, b, s.k0 + j0, hk), p.v.row, hi - j0 + 1, p.D);
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int64_t i = i0 + warp * kRowsPerWarp + rr;
        if (i >= s.lq || lse_r[rr] == -INFINITY) continue;  // warp-uniform
        const KeyRange kr = key_range(p, i, s.lq, s.lk);
        for (int j = 0; j < kTile; ++j) {
          if (j0 + j < kr.lo || j0 + j > kr.hi) continue;
          const Score sc = make_score(dot_row<kChunks>(qr[rr], ks + j * kCols), scale, cap);
          const float pij = expf(sc.s - lse_r[rr]);
          const float ds = pij * (dot_row<kChunks>(dr[rr], vs + j * kCols) - delta_r[rr]) * sc.dx;
#pragma unroll
          for (int c = 0; c < kChunks; ++c) acc[rr][c] += ds * ks[j * kCols + c * kWarpSize + lane];
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t i = i0 + warp * kRowsPerWarp + rr;
      if (i < s.lq) store_row<T, kChunks>(dq + b * p.dq.batch + (s.q0 + i) * p.dq.row + h * p.dq.head, acc[rr], p.D);
    }
  }
}

// dK, dV: grid (key tiles, Hkv, B). A CTA owns key rows of one kv head and visits the query rows
// of every query head that reads it (GQA), so dK/dV are summed in registers, without atomics.
template <typename T, int kChunks>
__global__ void __launch_bounds__(kThreads)
    bwd_dkdv_kernel(Params p, const T* __restrict__ dout, const T* __restrict__ q,
                    const T* __restrict__ k, const T* __restrict__ v,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    T* __restrict__ dk, T* __restrict__ dv) {
  __shared__ float qs[kTile * kChunks * kWarpSize];
  __shared__ float dos[kTile * kChunks * kWarpSize];
  __shared__ float lse_s[kTile], delta_s[kTile];
  constexpr int kCols = kChunks * kWarpSize;
  const int64_t b = blockIdx.z, hk = blockIdx.y, G = p.H / p.Hkv;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  const SeqRange s = seq_range(p, b);
  for (int64_t j0 = int64_t(blockIdx.x) * kRows; j0 < s.lk; j0 += int64_t(gridDim.x) * kRows) {
    const int64_t rows = s.lk - j0 < kRows ? s.lk - j0 : kRows;
    float kr_[kRowsPerWarp][kChunks], vr[kRowsPerWarp][kChunks];
    float dka[kRowsPerWarp][kChunks], dva[kRowsPerWarp][kChunks];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t j = j0 + warp * kRowsPerWarp + rr;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) kr_[rr][c] = vr[rr][c] = dka[rr][c] = dva[rr][c] = 0.f;
      if (j < s.lk) {
        load_row<T, kChunks>(kr_[rr], row_ptr(k, p.k, b, s.k0 + j, hk), p.D);
        load_row<T, kChunks>(vr[rr], row_ptr(v, p.v, b, s.k0 + j, hk), p.D);
      }
    }
    const int64_t lo = query_range(p, j0, s.lq, s.lk).lo;
    const int64_t hi = query_range(p, j0 + rows - 1, s.lq, s.lk).hi;
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      for (int64_t i0 = lo; i0 <= hi; i0 += kTile) {
        __syncthreads();
        load_tile<T, kChunks>(qs, row_ptr(q, p.q, b, s.q0 + i0, h), p.q.row, hi - i0 + 1, p.D);
        load_tile<T, kChunks>(dos, row_ptr(dout, p.dout, b, s.q0 + i0, h), p.dout.row, hi - i0 + 1, p.D);
        if (threadIdx.x < kTile) {
          const int64_t i = i0 + threadIdx.x;
          const int64_t li = b * p.lse.batch + h * p.lse.head + (s.q0 + i) * p.lse.row;
          lse_s[threadIdx.x] = i <= hi ? lse[li] : -INFINITY;
          delta_s[threadIdx.x] = i <= hi ? delta[li] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr) {
          const int64_t j = j0 + warp * kRowsPerWarp + rr;
          if (j >= s.lk) continue;  // warp-uniform
          const KeyRange qr = query_range(p, j, s.lq, s.lk);
          for (int t = 0; t < kTile; ++t) {
            if (i0 + t < qr.lo || i0 + t > qr.hi || lse_s[t] == -INFINITY) continue;
            const Score sc = make_score(dot_row<kChunks>(kr_[rr], qs + t * kCols), scale, cap);
            const float pij = expf(sc.s - lse_s[t]);
            const float ds = pij * (dot_row<kChunks>(vr[rr], dos + t * kCols) - delta_s[t]) * sc.dx;
#pragma unroll
            for (int c = 0; c < kChunks; ++c) {
              dva[rr][c] += pij * dos[t * kCols + c * kWarpSize + lane];
              dka[rr][c] += ds * qs[t * kCols + c * kWarpSize + lane];
            }
          }
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t j = j0 + warp * kRowsPerWarp + rr;
      if (j >= s.lk) continue;
      store_row<T, kChunks>(dk + b * p.dk.batch + (s.k0 + j) * p.dk.row + hk * p.dk.head, dka[rr], p.D);
      store_row<T, kChunks>(dv + b * p.dv.batch + (s.k0 + j) * p.dv.row + hk * p.dv.head, dva[rr], p.D);
    }
  }
}

#endif  // __CUDACC__ || __HIPCC__

}  // namespace simt
}  // namespace flash
}  // namespace attnkit
