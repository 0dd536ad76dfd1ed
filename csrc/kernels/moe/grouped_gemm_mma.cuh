// Tensor-core grouped GEMM (sm80+, bf16 / fp16, mma.sync m16n8k16 with fp32 accumulation): the
// own-kernel path of attnkit::grouped_gemm where at::_grouped_mm does not apply. Torch-free.
// Preconditions (checked by the launcher): K % 8 == 0, N % 8 == 0, a / w / out 16-byte aligned,
// W row-major per expert ([E, K, N] contiguous). Other cases use the FMA kernel.
//
// A 64x64 output tile per block of 4 warps (each warp 32x32 = 2 m16 x 4 n8 mma tiles), K in steps
// of 32 through shared memory with 16-byte loads. Rows of the tile belonging to other experts
// (or to none) are loaded as zeros and not stored, exactly as in the FMA kernel; expert ranges
// come from find_segments (sanitised offsets).
#pragma once

#include <cstdint>

#include "kernels/common/mma.cuh"
#include "kernels/moe/grouped_gemm.cuh"

namespace attnkit {
namespace moe {

constexpr int kMmaBM = 64, kMmaBN = 64, kMmaBK = 32, kMmaThreads = 128;
constexpr int kMmaPadA = kMmaBK + 8;  // row stride 80 B: 16-byte aligned, spreads ldmatrix banks
constexpr int kMmaPadB = kMmaBN + 8;  // row stride 144 B
static_assert(kMmaBM == kGemmBM, "find_segments assumes 64-row tiles");

template <typename T, typename index_t>
__global__ void grouped_gemm_mma_kernel(const T* __restrict__ a, const T* __restrict__ w,
                                        const index_t* __restrict__ off, int E, int64_t M,
                                        int64_t K, int64_t N, T* __restrict__ out) {
#if ATTNKIT_HAS_MMA_SM80
  __shared__ __align__(16) T As[kMmaBM][kMmaPadA];
  __shared__ __align__(16) T Bs[kMmaBK][kMmaPadB];
  __shared__ int64_t seg_lo[kGemmMaxSegs], seg_hi[kGemmMaxSegs];
  __shared__ int seg_e[kGemmMaxSegs];
  __shared__ int nseg;
  __shared__ int64_t cover_lo, cover_hi;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;  // the warp's 32x32 quadrant
  const int g = lane / 4, t4 = lane % 4;
  const int64_t m0 = int64_t(blockIdx.x) * kMmaBM, n0 = int64_t(blockIdx.y) * kMmaBN;
  const int64_t m1 = m0 + kMmaBM < M ? m0 + kMmaBM : M;
  if (tid == 0)
    find_segments(off, E, M, m0, m1, seg_lo, seg_hi, seg_e, &nseg, &cover_lo, &cover_hi);
  __syncthreads();
  constexpr int kVec = 8;  // 16-bit elements per 16-byte chunk
  for (int s = 0; s < nseg; ++s) {
    const int64_t lo = seg_lo[s], hi = seg_hi[s];
    const T* we = w + int64_t(seg_e[s]) * K * N;
    float acc[2][4][4] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kMmaBK) {
      // A: 64 rows x 32 cols = 256 chunks of 8; B: 32 rows x 64 cols = 256 chunks.
      for (int c = tid; c < kMmaBM * kMmaBK / kVec; c += kMmaThreads) {
        const int r = c / (kMmaBK / kVec), col = (c % (kMmaBK / kVec)) * kVec;
        const int64_t gr = m0 + r, gk = k0 + col;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (gr >= lo && gr < hi && gk < K) v = *reinterpret_cast<const uint4*>(a + gr * K + gk);
        *reinterpret_cast<uint4*>(&As[r][col]) = v;
      }
      for (int c = tid; c < kMmaBK * kMmaBN / kVec; c += kMmaThreads) {
        const int r = c / (kMmaBN / kVec), col = (c % (kMmaBN / kVec)) * kVec;
        const int64_t gk = k0 + r, gn = n0 + col;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (gk < K && gn < N) v = *reinterpret_cast<const uint4*>(we + gk * N + gn);
        *reinterpret_cast<uint4*>(&Bs[r][col]) = v;
      }
      __syncthreads();
#pragma unroll
      for (int ks = 0; ks < kMmaBK; ks += 16) {
        uint32_t af[2][4], bf[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
          mma::ldmatrix_x4(af[mi], &As[wm * 32 + mi * 16 + lane % 16][ks + (lane / 16) * 8]);
#pragma unroll
        for (int nj2 = 0; nj2 < 2; ++nj2) {
          uint32_t r[4];
          mma::ldmatrix_x4_trans(r, &Bs[ks + lane % 16][wn * 32 + nj2 * 16 + (lane / 16) * 8]);
          bf[nj2 * 2][0] = r[0];
          bf[nj2 * 2][1] = r[1];
          bf[nj2 * 2 + 1][0] = r[2];
          bf[nj2 * 2 + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int nj = 0; nj < 4; ++nj) mma::mma_16816<T>(acc[mi][nj], af[mi], bf[nj]);
      }
      __syncthreads();
    }
    // c[0..1] at row g, cols 2t..2t+1; c[2..3] at row g + 8 (N % 8 == 0: both columns in range).
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t gr = m0 + wm * 32 + mi * 16 + g + half * 8;
        if (gr < lo || gr >= hi) continue;
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
          const int64_t gn = n0 + wn * 32 + nj * 8 + 2 * t4;
          if (gn >= N) continue;
          *reinterpret_cast<uint32_t*>(out + gr * N + gn) =
              mma::pack2<T>(acc[mi][nj][half * 2], acc[mi][nj][half * 2 + 1]);
        }
      }
    }
  }
  for (int idx = tid; idx < kMmaBM * kMmaBN; idx += kMmaThreads) {
    const int64_t gr = m0 + idx / kMmaBN, gn = n0 + idx % kMmaBN;
    if (gr < m1 && gn < N && (gr < cover_lo || gr >= cover_hi)) out[gr * N + gn] = from_float<T>(0.f);
  }
#endif  // ATTNKIT_HAS_MMA_SM80
}

template <typename T, typename index_t>
void launch_grouped_gemm_mma(const T* a, const T* w, const index_t* off, int E, int64_t M,
                             int64_t K, int64_t N, T* out, cudaStream_t stream) {
  const dim3 grid((M + kMmaBM - 1) / kMmaBM, (N + kMmaBN - 1) / kMmaBN);
  grouped_gemm_mma_kernel<T, index_t><<<grid, kMmaThreads, 0, stream>>>(a, w, off, E, M, K, N,
                                                                        out);
}

}  // namespace moe
}  // namespace attnkit
