// Grouped GEMM kernels (torch-free), the portable path of attnkit::grouped_gemm: every arch and
// dtype (fp32 / fp16 / bf16 / fp64), any strides of W (the backward passes W transposed).
// Shared-memory FMA tiles with fp32 (fp64) accumulation: correct everywhere, not tensor-core
// fast; sm90 bf16 goes to at::_grouped_mm in the launcher instead.
//
// Offsets come from a tensor and are never trusted: S(e) = max(S(e-1), clamp(off[e], 0, M)) makes
// them non-decreasing and in range, so expert row ranges are disjoint and inside [0, M).
#pragma once

#include <cstdint>

#include "kernels/moe/common.cuh"

namespace attnkit {
namespace moe {

constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 16, kGemmThreads = 256;
constexpr int kGemmMaxSegs = kGemmBM;  // non-empty experts meeting one 64-row tile

template <typename index_t>
ATTNKIT_DEVICE ATTNKIT_INLINE int64_t clamp_offset(index_t v, int64_t M) {
  const int64_t x = int64_t(v);
  return x < 0 ? 0 : (x > M ? M : x);
}

// Thread 0 of a tile: the experts whose (sanitised) rows meet [m0, m1) (at most 64 non-empty
// ones), clipped to the tile, and the rows [cover_lo, cover_hi) that belong to some expert.
template <typename index_t>
ATTNKIT_DEVICE ATTNKIT_INLINE void find_segments(const index_t* off, int E, int64_t M, int64_t m0,
                                                 int64_t m1, int64_t* seg_lo, int64_t* seg_hi,
                                                 int* seg_e, int* nseg, int64_t* cover_lo,
                                                 int64_t* cover_hi) {
  int cnt = 0;
  int64_t prev = clamp_offset(off[0], M);
  *cover_lo = prev;
  for (int e = 0; e < E; ++e) {
    int64_t hi = clamp_offset(off[e + 1], M);
    hi = hi < prev ? prev : hi;
    const int64_t lo = prev > m0 ? prev : m0, h = hi < m1 ? hi : m1;
    if (h > lo && cnt < kGemmMaxSegs) {
      seg_lo[cnt] = lo;
      seg_hi[cnt] = h;
      seg_e[cnt] = e;
      ++cnt;
    }
    prev = hi;
    if (prev >= m1) break;  // later experts start at or past the tile's end
  }
  *nseg = cnt;
  // `prev` is S(E), or an end at or past m1 when the loop stopped early: either way every row of
  // the tile in [cover_lo, prev) belongs to an expert.
  *cover_hi = prev;
}

// Each thread owns a 4x4 block of the 64x64 tile at rows ty + 16i, cols tx + 16j.
template <typename T, typename A>
ATTNKIT_DEVICE ATTNKIT_INLINE void fma_tile(A (*As)[kGemmBM], A (*Bs)[kGemmBN],
                                            A (&acc)[4][4], int tx, int ty) {
#pragma unroll
  for (int kk = 0; kk < kGemmBK; ++kk) {
    A av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// out[r] = a[r] · W[e] for r in [S(e), S(e+1)); rows outside [S(0), S(E)) are zero.
// Grid: (M tiles, N tiles): M (= tokens·k) may exceed gridDim.y's limit. a is row-major with
// leading dimension K; out row-major [M, N].
template <typename T, typename index_t>
__global__ void grouped_gemm_kernel(const T* __restrict__ a, const T* __restrict__ w,
                                    int64_t w_se, int64_t w_sk, int64_t w_sn,
                                    const index_t* __restrict__ off, int E, int64_t M, int64_t K,
                                    int64_t N, T* __restrict__ out) {
  using A = acc_t<T>;
  __shared__ A As[kGemmBK][kGemmBM];
  __shared__ A Bs[kGemmBK][kGemmBN];
  __shared__ int64_t seg_lo[kGemmMaxSegs], seg_hi[kGemmMaxSegs];
  __shared__ int seg_e[kGemmMaxSegs];
  __shared__ int nseg;
  __shared__ int64_t cover_lo, cover_hi;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = int64_t(blockIdx.x) * kGemmBM, n0 = int64_t(blockIdx.y) * kGemmBN;
  const int64_t m1 = m0 + kGemmBM < M ? m0 + kGemmBM : M;
  if (tid == 0)
    find_segments(off, E, M, m0, m1, seg_lo, seg_hi, seg_e, &nseg, &cover_lo, &cover_hi);
  __syncthreads();
  for (int s = 0; s < nseg; ++s) {
    const int64_t lo = seg_lo[s], hi = seg_hi[s];
    const T* we = w + int64_t(seg_e[s]) * w_se;
    A acc[4][4] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kGemmBK) {
      for (int idx = tid; idx < kGemmBM * kGemmBK; idx += kGemmThreads) {
        const int r = idx / kGemmBK, c = idx % kGemmBK;
        const int64_t gr = m0 + r, gc = k0 + c;
        As[c][r] = (gr >= lo && gr < hi && gc < K) ? to_acc<A>(a[gr * K + gc]) : A(0);
      }
      for (int idx = tid; idx < kGemmBK * kGemmBN; idx += kGemmThreads) {
        const int r = idx / kGemmBN, c = idx % kGemmBN;
        const int64_t gk = k0 + r, gn = n0 + c;
        Bs[r][c] = (gk < K && gn < N) ? to_acc<A>(we[gk * w_sk + gn * w_sn]) : A(0);
      }
      __syncthreads();
      fma_tile<T, A>(As, Bs, acc, tx, ty);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t gr = m0 + ty + 16 * i;
      if (gr < lo || gr >= hi) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t gn = n0 + tx + 16 * j;
        if (gn < N) out[gr * N + gn] = from_acc<T>(acc[i][j]);
      }
    }
  }
  // Rows of the tile that belong to no expert.
  for (int idx = tid; idx < kGemmBM * kGemmBN; idx += kGemmThreads) {
    const int64_t gr = m0 + idx / kGemmBN, gn = n0 + idx % kGemmBN;
    if (gr < m1 && gn < N && (gr < cover_lo || gr >= cover_hi))
      out[gr * N + gn] = from_acc<T>(A(0));
  }
}

template <typename T, typename index_t>
void launch_grouped_gemm(const T* a, const T* w, int64_t w_se, int64_t w_sk, int64_t w_sn,
                         const index_t* off, int E, int64_t M, int64_t K, int64_t N, T* out,
                         cudaStream_t stream) {
  const dim3 grid((M + kGemmBM - 1) / kGemmBM, (N + kGemmBN - 1) / kGemmBN);
  grouped_gemm_kernel<T, index_t><<<grid, kGemmThreads, 0, stream>>>(a, w, w_se, w_sk, w_sn, off,
                                                                     E, M, K, N, out);
}

// dW[e] = A[S(e):S(e+1)]ᵀ · G[S(e):S(e+1)]: a row-major [E, K, N] output, zero for empty experts.
// Grid: (N tiles, K tiles, E). The reduction over rows runs in a fixed order: deterministic.
template <typename T, typename index_t>
__global__ void grouped_gemm_wgrad_kernel(const T* __restrict__ a, const T* __restrict__ g,
                                          const index_t* __restrict__ off, int64_t M, int64_t K,
                                          int64_t N, T* __restrict__ dw) {
  using A = acc_t<T>;
  __shared__ A As[kGemmBK][kGemmBM];
  __shared__ A Bs[kGemmBK][kGemmBN];
  __shared__ int64_t range[2];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int e = blockIdx.z;
  const int64_t k0 = int64_t(blockIdx.y) * kGemmBM, n0 = int64_t(blockIdx.x) * kGemmBN;
  if (tid == 0) {
    int64_t prev = clamp_offset(off[0], M), lo = prev;
    for (int j = 0; j <= e; ++j) {
      int64_t hi = clamp_offset(off[j + 1], M);
      hi = hi < prev ? prev : hi;
      lo = prev;
      prev = hi;
    }
    range[0] = lo;
    range[1] = prev;
  }
  __syncthreads();
  const int64_t lo = range[0], hi = range[1];
  A acc[4][4] = {};
  for (int64_t r0 = lo; r0 < hi; r0 += kGemmBK) {
    for (int idx = tid; idx < kGemmBK * kGemmBM; idx += kGemmThreads) {
      const int r = idx / kGemmBM, c = idx % kGemmBM;
      const int64_t gr = r0 + r, gk = k0 + c;
      As[r][c] = (gr < hi && gk < K) ? to_acc<A>(a[gr * K + gk]) : A(0);
    }
    for (int idx = tid; idx < kGemmBK * kGemmBN; idx += kGemmThreads) {
      const int r = idx / kGemmBN, c = idx % kGemmBN;
      const int64_t gr = r0 + r, gn = n0 + c;
      Bs[r][c] = (gr < hi && gn < N) ? to_acc<A>(g[gr * N + gn]) : A(0);
    }
    __syncthreads();
    fma_tile<T, A>(As, Bs, acc, tx, ty);
    __syncthreads();
  }
  T* out = dw + int64_t(e) * K * N;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gk = k0 + ty + 16 * i;
    if (gk >= K) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gn = n0 + tx + 16 * j;
      if (gn < N) out[gk * N + gn] = from_acc<T>(acc[i][j]);
    }
  }
}

template <typename T, typename index_t>
void launch_grouped_gemm_wgrad(const T* a, const T* g, const index_t* off, int E, int64_t M,
                               int64_t K, int64_t N, T* dw, cudaStream_t stream) {
  const dim3 grid((N + kGemmBN - 1) / kGemmBN, (K + kGemmBM - 1) / kGemmBM, E);
  grouped_gemm_wgrad_kernel<T, index_t><<<grid, kGemmThreads, 0, stream>>>(a, g, off, M, K, N, dw);
}

// After at::_grouped_mm (whose first group starts at row 0 and which leaves rows past the last
// offset unspecified): zero rows outside [S(0), S(E)). `sanitized` holds S(0..E) on the device.
template <typename T>
__global__ void zero_rows_outside_kernel(const int32_t* __restrict__ sanitized, int E, int64_t M,
                                         int64_t N, T* __restrict__ out) {
  const int64_t lo = sanitized[0], hi = sanitized[E];
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {  // a grid-stride loop: few idle blocks
    if (r >= lo && r < hi) continue;
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) out[r * N + c] = from_acc<T>(acc_t<T>(0));
  }
}

template <typename T>
void launch_zero_rows_outside(const int32_t* sanitized, int E, int64_t M, int64_t N, T* out,
                              cudaStream_t stream) {
  const int64_t blocks = M < 1024 ? M : 1024;
  zero_rows_outside_kernel<T><<<blocks, 128, 0, stream>>>(sanitized, E, M, N, out);
}

}  // namespace moe
}  // namespace attnkit
