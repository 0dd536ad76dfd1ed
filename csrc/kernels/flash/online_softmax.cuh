// One key tile of the forward's online softmax on a wgmma / mma.sync accumulator (a thread's two
// rows, gr and gr + 8 of its warp's 16, by kNT n-tiles of 8 keys), and the rows' final 1/l and
// lse: the flash forwards' one softmax (fwd_ws.cuh, mma_fwd.cuh). Torch-free.
// Two copies of the loop, masked and unmasked: the branch costs ~50 registers at head dim 64,
// which the ws consumers have to spare (it gained them 30-60%; the cp.async wgmma kernel that
// lacked the registers kept one masked loop, and lost 12% with two).
#pragma once

#include <type_traits>

#include "common/portability.h"
#include "kernels/common/fast_math.cuh"

namespace attnkit {
namespace flash {

#if ATTNKIT_HAS_MMA_SM80
// The scores' transform: y = the raw score (scaled by `factor` later), or with softcap the capped
// value in log2 units (factor 1), and the element mask of a tile that crosses a row's key range.
struct SoftmaxArgs {
  float factor;          // scale * log2(e), or 1 with softcap
  float scale_over_cap;  // softcap only
  float cap_log2;        // softcap only
  int j0;                // the tile's first key, in the coordinates of kr_lo / kr_hi
  int kr_lo[2], kr_hi[2];  // each row's visible keys (inclusive)
};

// sc: scores in, probabilities (unnormalised, 2^(y·factor - m)) out; m (log2 domain), l: the
// rows' running max and sum, updated; corr: 2^(m_old - m_new), what O must be scaled by.
// kMasked: apply the element mask (a separate instantiation: a per-element `if (!full)` in one
// loop is if-converted by ptxas into ~4 predicated instructions per score on every tile, as many
// as the rest of the softmax at head dim 64).
template <bool kMasked, bool kSoftcap, int kNT>
ATTNKIT_DEVICE ATTNKIT_INLINE void online_softmax_tile(float (&sc)[kNT][4], float (&m)[2],
                                                       float (&l)[2], float (&corr)[2],
                                                       const SoftmaxArgs& a) {
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = sc[nt][rh * 2 + e];
        if constexpr (kSoftcap) x = a.cap_log2 * tanh_fast(x * a.scale_over_cap);
        if constexpr (kMasked) {
          const int jj = a.j0 + nt * 8 + 2 * t4 + e;
          if (jj < a.kr_lo[rh] || jj > a.kr_hi[rh]) x = -INFINITY;
        }
        sc[nt][rh * 2 + e] = x;
        mx = fmaxf(mx, x);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // m in the log2 domain; a row with nothing visible so far keeps base 0: 2^(-inf - 0) = 0,
    // never NaN.
    const float m_new = fmaxf(m[rh], mx == -INFINITY ? -INFINITY : mx * a.factor);
    const float base = m_new == -INFINITY ? 0.f : m_new;
    corr[rh] = ex2_approx(m[rh] - base);
    m[rh] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pv = ex2_approx(fmaf(sc[nt][rh * 2 + e], a.factor, -base));
        sc[nt][rh * 2 + e] = pv;
        sum += pv;
      }
    }
    l[rh] = l[rh] * corr[rh] + sum;
  }
}

// The branch between the two copies (`masked` is uniform over the warpgroup).
template <bool kSoftcap, int kNT>
ATTNKIT_DEVICE ATTNKIT_INLINE void online_softmax(float (&sc)[kNT][4], float (&m)[2], float (&l)[2],
                                                  float (&corr)[2], const SoftmaxArgs& a,
                                                  bool masked) {
  if (masked) {
    online_softmax_tile<true, kSoftcap>(sc, m, l, corr, a);
  } else {
    online_softmax_tile<false, kSoftcap>(sc, m, l, corr, a);
  }
}

// The end of a row block: l summed over the quad that holds a row's columns, then per row 1/l
// (what O is scaled by) and the lse (natural log; m is in the log2 domain). A row that saw no key
// has l = 0: output 0, lse -inf (DESIGN §3.3).
ATTNKIT_DEVICE ATTNKIT_INLINE void finish_rows(const float (&m)[2], const float (&l)[2],
                                               float (&inv)[2], float (&lse)[2]) {
  constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    float lr = l[rh];
    lr += __shfl_xor_sync(0xffffffffu, lr, 1);
    lr += __shfl_xor_sync(0xffffffffu, lr, 2);
    inv[rh] = lr > 0.f ? 1.f / lr : 0.f;
    lse[rh] = lr > 0.f ? m[rh] * kLn2 + logf(lr) : -INFINITY;
  }
}
#endif

}  // namespace flash
}  // namespace attnkit
