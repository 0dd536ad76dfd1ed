// The one portability header of the kernel layer (torch-free). Everything that differs between
// CUDA and HIP goes through here: qualifiers, warp size, shuffles, 16-bit float types.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ATTNKIT_HOST_DEVICE __host__ __device__
#define ATTNKIT_DEVICE __device__
#define ATTNKIT_INLINE __forceinline__
#else
#define ATTNKIT_HOST_DEVICE
#define ATTNKIT_DEVICE
#define ATTNKIT_INLINE inline
#endif

#if defined(__HIPCC__)
#include <hip/hip_runtime.h>
#include <hip/hip_bf16.h>
#include <hip/hip_fp16.h>
#elif defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace attnkit {

#if defined(__HIPCC__) && (defined(__gfx90a__) || defined(__gfx940__) || defined(__gfx941__) || \
                           defined(__gfx942__) || defined(__GFX9__))
constexpr int kWarpSize = 64;  // AMD CDNA wavefronts
#else
constexpr int kWarpSize = 32;
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#if defined(__HIPCC__)
using bf16_t = __hip_bfloat16;
#else
using bf16_t = __nv_bfloat16;
#endif
using fp16_t = __half;

template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE T shfl_xor(T v, int lane_mask) {
#if defined(__HIPCC__)
  return __shfl_xor(v, lane_mask);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#endif
}

template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE T shfl(T v, int src_lane) {
#if defined(__HIPCC__)
  return __shfl(v, src_lane);
#else
  return __shfl_sync(0xffffffffu, v, src_lane);
#endif
}

// Float conversions of the 16-bit types, spelled once.
ATTNKIT_DEVICE ATTNKIT_INLINE float to_float(float x) { return x; }
ATTNKIT_DEVICE ATTNKIT_INLINE float to_float(fp16_t x) { return __half2float(x); }
ATTNKIT_DEVICE ATTNKIT_INLINE float to_float(bf16_t x) { return __bfloat162float(x); }

template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE T from_float(float x);
template <>
ATTNKIT_DEVICE ATTNKIT_INLINE float from_float<float>(float x) { return x; }
template <>
ATTNKIT_DEVICE ATTNKIT_INLINE fp16_t from_float<fp16_t>(float x) { return __float2half_rn(x); }
template <>
ATTNKIT_DEVICE ATTNKIT_INLINE bf16_t from_float<bf16_t>(float x) { return __float2bfloat16_rn(x); }
#endif  // __CUDACC__ || __HIPCC__

}  // namespace attnkit
