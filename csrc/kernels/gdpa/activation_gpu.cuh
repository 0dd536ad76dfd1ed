// GPU forms of the GDPA activations, applied to whole register tiles with one switch per tile
// (the activation is uniform across the launch, so the branch never diverges).
#pragma once

#include "kernels/common/mma.cuh"
#include "kernels/gdpa/activation.h"

namespace attnkit {
namespace gdpa {

// kApprox: use the hardware tanh / fast exp for the "fast_" activations (tensor-core path, whose
// 16-bit tolerance absorbs their error). The fp32 path keeps the exact forms so it meets 1e-5.
template <Activation A, bool kApprox = true>
ATTNKIT_DEVICE ATTNKIT_INLINE float act_fwd_gpu(float x) {
#if ATTNKIT_HAS_MMA_SM80
  if constexpr (kApprox && A == Activation::kFastGelu) {
    // DESIGN §3.1 allows the hardware tanh for fast_gelu.
    const float t = mma::tanh_approx(kSqrt2OverPi * x * (1.f + kGeluCubic * x * x));
    return 0.5f * x * (1.f + t);
  }
#endif
  if constexpr (kApprox && A == Activation::kFastSilu) {
    return x / (1.f + __expf(-x));
  } else {
    return act_fwd<A, float>(x);
  }
}

template <Activation A, bool kApprox = true>
ATTNKIT_DEVICE ATTNKIT_INLINE float act_bwd_gpu(float x) {
#if ATTNKIT_HAS_MMA_SM80
  if constexpr (kApprox && A == Activation::kFastGelu) {
    const float x2 = x * x;
    const float t = mma::tanh_approx(kSqrt2OverPi * x * (1.f + kGeluCubic * x2));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * (kSqrt2OverPi + kGeluCubicD * x2);
  }
#endif
  if constexpr (kApprox && A == Activation::kFastSilu) {
    const float s = 1.f / (1.f + __expf(-x));
    return s * (1.f + x * (1.f - s));
  } else {
    return act_bwd<A, float>(x);
  }
}

// s <- φ(pre · s) over an [N][4] accumulator tile, or over its first kUsed column groups (8
// columns each) only, the rest left as they are (a caller whose product reads those alone).
template <Activation A, int N, int kUsed = N>
ATTNKIT_DEVICE ATTNKIT_INLINE void act_fwd_tile(float (&s)[N][4], float pre) {
  static_assert(kUsed <= N, "the groups used are the tile's");
#if ATTNKIT_HAS_MMA_SM80
  if (A == Activation::kFastGelu && fabsf(pre) < 1e9f) {  // (pre³ must stay finite)
    // pre folded into the polynomial's constants: with x = pre·s, tanh's argument
    // √(2/π)·x·(1 + k·x²) is s·(a + b·s²), and 0.5·x·(1 + t) is h + h·t with h = (0.5·pre)·s:
    // 5 FP32 instructions and one MUFU per score instead of 8 (the forward is issue-bound).
    const float a = kSqrt2OverPi * pre, b = kSqrt2OverPi * kGeluCubic * pre * pre * pre,
                half_pre = 0.5f * pre;
#pragma unroll
    for (int i = 0; i < kUsed; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = s[i][e];
        const float t = mma::tanh_approx(x * fmaf(b, x * x, a));
        const float h = half_pre * x;
        s[i][e] = fmaf(h, t, h);
      }
    return;
  }
#endif
#pragma unroll
  for (int i = 0; i < kUsed; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[i][e] = act_fwd_gpu<A>(s[i][e] * pre);
}

// p <- φ(pre · s), ds <- ds_scale · φ′(pre · s) · dp (in place over s and dp).
template <Activation A, int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void act_bwd_tile(float (&s)[N][4], float (&dp)[N][4], float pre,
                                                float ds_scale) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float x = s[i][e] * pre;
      s[i][e] = act_fwd_gpu<A>(x);
      dp[i][e] *= ds_scale * act_bwd_gpu<A>(x);
    }
}

// The backward's two activation outputs from S alone, so that P·dO can be issued before dP is
// complete (gdpa/bwd_ws.cuh): pa <- φ(pre · s) rounded to T and packed as the A operand of the
// next product (tile.cuh pack_a's layout), s <- ds_scale · φ′(pre · s), the factor dS = s ⊙ dP
// takes once dP is there. Masks are the caller's: every activation has φ(0) = 0, so scores zeroed
// before give P = 0, and the factor is zeroed after (φ′(0) need not be 0).
template <typename T, Activation A, int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void act_bwd_p_tile(float (&s)[N][4], uint32_t (&pa)[N / 2][4],
                                                  float pre, float ds_scale) {
#if ATTNKIT_HAS_MMA_SM80
#pragma unroll
  for (int kk = 0; kk < N / 2; ++kk) {
    float p[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 2 * kk + h;
        const float x = s[i][e] * pre;
        float pv, dv;
        if constexpr (A == Activation::kFastGelu) {
          // One hardware tanh per score for both (act_fwd_gpu / act_bwd_gpu each took one, and
          // the compiler did not merge them): t = tanh(√(2/π)·x·(1 + c·x²)), h = x / 2,
          // φ = h + h·t, φ′ = (1 + t) / 2 + h·(1 − t²)·(√(2/π) + c′·x²).
          const float x2 = x * x;
          const float t = mma::tanh_approx(kSqrt2OverPi * x * fmaf(kGeluCubic, x2, 1.f));
          const float hx = 0.5f * x;
          pv = fmaf(hx, t, hx);
          dv = fmaf(hx * fmaf(-t, t, 1.f), fmaf(kGeluCubicD, x2, kSqrt2OverPi), fmaf(0.5f, t, 0.5f));
        } else {
          pv = act_fwd_gpu<A>(x);
          dv = act_bwd_gpu<A>(x);
        }
        p[h][e] = pv;
        s[i][e] = ds_scale * dv;
      }
    pa[kk][0] = mma::pack2<T>(p[0][0], p[0][1]);
    pa[kk][1] = mma::pack2<T>(p[0][2], p[0][3]);
    pa[kk][2] = mma::pack2<T>(p[1][0], p[1][1]);
    pa[kk][3] = mma::pack2<T>(p[1][2], p[1][3]);
    // The next 8 scores start after these are packed: the caller runs this at the register cap
    // (dP's accumulators in flight), and interleaving all 32 chains made ptxas spill.
    if (kk + 1 < N / 2) {
      asm volatile(""
                   : "+r"(pa[kk][0]), "+r"(pa[kk][1]), "+r"(pa[kk][2]), "+r"(pa[kk][3]),
                     "+f"(s[2 * kk + 2][0]), "+f"(s[2 * kk + 2][1]), "+f"(s[2 * kk + 2][2]),
                     "+f"(s[2 * kk + 2][3]), "+f"(s[2 * kk + 3][0]), "+f"(s[2 * kk + 3][1]),
                     "+f"(s[2 * kk + 3][2]), "+f"(s[2 * kk + 3][3]));
    }
  }
#endif
}

#define ATTNKIT_GDPA_ACT_CASES(CALL)        \
  switch (a) {                              \
    case Activation::kRaw:                  \
      CALL(Activation::kRaw);               \
      break;                                \
    case Activation::kGelu:                 \
      CALL(Activation::kGelu);              \
      break;                                \
    case Activation::kGeluApprox:           \
      CALL(Activation::kGeluApprox);        \
      break;                                \
    case Activation::kFastGelu:             \
      CALL(Activation::kFastGelu);          \
      break;                                \
    case Activation::kLeakyRelu:            \
      CALL(Activation::kLeakyRelu);         \
      break;                                \
    case Activation::kRelu:                 \
      CALL(Activation::kRelu);              \
      break;                                \
    case Activation::kSilu:                 \
      CALL(Activation::kSilu);              \
      break;                                \
    case Activation::kFastSilu:             \
      CALL(Activation::kFastSilu);          \
      break;                                \
    case Activation::kHardswish:            \
      CALL(Activation::kHardswish);         \
      break;                                \
    default:                                \
      CALL(Activation::kReluSquare);        \
      break;                                \
  }

template <int N, int kUsed = N>
ATTNKIT_DEVICE ATTNKIT_INLINE void act_fwd_tile(float (&s)[N][4], Activation a, float pre) {
#define ATTNKIT_CALL(A) act_fwd_tile<A, N, kUsed>(s, pre)
  ATTNKIT_GDPA_ACT_CASES(ATTNKIT_CALL)
#undef ATTNKIT_CALL
}

template <int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void act_bwd_tile(float (&s)[N][4], float (&dp)[N][4], Activation a,
                                                float pre, float ds_scale) {
#define ATTNKIT_CALL(A) act_bwd_tile<A, N>(s, dp, pre, ds_scale)
  ATTNKIT_GDPA_ACT_CASES(ATTNKIT_CALL)
#undef ATTNKIT_CALL
}

template <typename T, int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void act_bwd_p_tile(float (&s)[N][4], uint32_t (&pa)[N / 2][4],
                                                  Activation a, float pre, float ds_scale) {
#define ATTNKIT_CALL(A) act_bwd_p_tile<T, A, N>(s, pa, pre, ds_scale)
  ATTNKIT_GDPA_ACT_CASES(ATTNKIT_CALL)
#undef ATTNKIT_CALL
}

// Scalar dispatch with the exact forms, for the portable (fp32) kernels.
ATTNKIT_DEVICE ATTNKIT_INLINE float act_fwd_exact(Activation a, float x) {
  float r = 0.f;
#define ATTNKIT_CALL(A) r = act_fwd_gpu<A, false>(x)
  ATTNKIT_GDPA_ACT_CASES(ATTNKIT_CALL)
#undef ATTNKIT_CALL
  return r;
}

ATTNKIT_DEVICE ATTNKIT_INLINE float act_bwd_exact(Activation a, float x) {
  float r = 0.f;
#define ATTNKIT_CALL(A) r = act_bwd_gpu<A, false>(x)
  ATTNKIT_GDPA_ACT_CASES(ATTNKIT_CALL)
#undef ATTNKIT_CALL
  return r;
}

}  // namespace gdpa
}  // namespace attnkit
