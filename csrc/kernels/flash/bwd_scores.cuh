// The elementwise half of the sm90 flash backward's step (bwd_ws.cuh), in the wgmma accumulator
// layout: a consumer warpgroup holds S^T and dP^T of its 64 keys x BM queries as m64nBM fp32
// accumulators (a warp: 16 keys x 8 query columns per n-tile, mma.sync's m16n8 layout), turns
// them into P^T and dS^T in place, and packs them into the A fragments of the rs products
// dV += P^T dO and dK += dS^T Q. With softcap the step uses mma_bwd.cuh's probs_and_grads<true>
// (the tanh's derivative) instead of probs_t / grads_t.
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/common/fast_math.cuh"
#include "kernels/common/mma.cuh"
#include "kernels/common/wgmma.cuh"

namespace attnkit {
namespace flash {
namespace ws {

#if ATTNKIT_HAS_WGMMA
// P^T in place of S^T (a warp's 16 keys x kNT * 8 queries, the m16n8 accumulator layout), no
// softcap: mma::probs_and_grads<false>'s first half. kMasked: the element mask, in its own
// instantiation (mma_bwd.cuh's probs_and_grads says why).
template <int kNT, bool kMasked>
ATTNKIT_DEVICE ATTNKIT_INLINE void probs_t_tile(float (&sc)[kNT][4], const float* lse_t,
                                                const int (&col_lo)[2], const int (&col_hi)[2],
                                                float scale) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const float2 lse2 = *reinterpret_cast<const float2*>(lse_t + nt * 8 + 2 * t4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qc = nt * 8 + (e % 2);  // the query column, less 2 * t4
      float pv = ex2_approx(sc[nt][e] * (scale * kLog2e) - (e % 2 ? lse2.y : lse2.x) * kLog2e);
      // A select, not a product: a row that sees nothing has lse -inf (pv would be +inf).
      if (kMasked && (qc < col_lo[e / 2] || qc > col_hi[e / 2])) pv = 0.f;
      sc[nt][e] = pv;
    }
  }
}

template <int kNT>
ATTNKIT_DEVICE ATTNKIT_INLINE void probs_t(float (&sc)[kNT][4], const float* lse_t, const int (&col_lo)[2],
                                           const int (&col_hi)[2], bool full, float scale) {
  if (full) {
    probs_t_tile<kNT, false>(sc, lse_t, col_lo, col_hi, scale);
  } else {
    probs_t_tile<kNT, true>(sc, lse_t, col_lo, col_hi, scale);
  }
}

// dS^T = P^T (dP^T - delta) scale in place of dP^T (masked elements have P = 0).
template <int kNT>
ATTNKIT_DEVICE ATTNKIT_INLINE void grads_t(float (&dp)[kNT][4], const float (&pt)[kNT][4],
                                           const float* delta_t, float scale) {
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const float2 dlt = *reinterpret_cast<const float2*>(delta_t + nt * 8 + 2 * t4);
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[nt][e] = pt[nt][e] * (dp[nt][e] - (e % 2 ? dlt.y : dlt.x)) * scale;
  }
}

// fp32 accumulators (M = 64, N = 8 * K) -> the A fragments of K / 16 k-steps.
template <typename T, int K>
ATTNKIT_DEVICE ATTNKIT_INLINE void pack_frags(uint32_t (&a)[K][4], const float (&c)[2 * K][4]) {
#pragma unroll
  for (int kk = 0; kk < K; ++kk) {
    a[kk][0] = ::attnkit::mma::pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = ::attnkit::mma::pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = ::attnkit::mma::pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = ::attnkit::mma::pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}
#endif  // ATTNKIT_HAS_WGMMA

}  // namespace ws
}  // namespace flash
}  // namespace attnkit
