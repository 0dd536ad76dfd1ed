// Fast scalar math of the tensor-core kernels (sm_80+; the flash kernels and the paged decode),
// torch-free. Compiled out with them under HIP, where nothing calls it.
#pragma once

#include "common/portability.h"
#include "kernels/common/mma.cuh"

namespace attnkit {

#if ATTNKIT_HAS_MMA_SM80
// 2^x in one instruction (results below 2^-126 flush to 0, irrelevant for probabilities): exp2f
// adds a denormal-range fix-up around it, three instructions per score element. 2^-inf = 0.
ATTNKIT_DEVICE ATTNKIT_INLINE float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh from one exp2 and one fast division: tanhf's accurate path costs the main kernel its last
// free registers (it spilled). |y| is clamped at 15, where tanh is 1 in fp32, so exp2 stays
// finite; the absolute error is a few 1e-8, far below what rounding P and dS to 16 bits loses.
ATTNKIT_DEVICE ATTNKIT_INLINE float tanh_fast(float y) {
  constexpr float k2Log2e = 2.8853900817779268f;
  const float e = ex2_approx(fminf(fmaxf(y, -15.f), 15.f) * k2Log2e);
  return 1.f - __fdividef(2.f, e + 1.f);
}
#endif

}  // namespace attnkit
