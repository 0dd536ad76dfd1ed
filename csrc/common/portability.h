// The one portability header of the kernel layer (torch-free). Everything that differs between
// CUDA and HIP goes through here: qualifiers, warp size, shuffles, 16-bit float types, and the
// names of the runtime calls the launchers use (cudaStream_t, cudaFuncSetAttribute, ...), which
// are mapped to their HIP equivalents in ONE place below (docs/rocm.md).
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
#include <hip/hip_fp16.h>
#if __has_include(<hip/hip_bf16.h>)  // ROCm >= 5.7: __hip_bfloat16 with the CUDA-style intrinsics
#include <hip/hip_bf16.h>
#define ATTNKIT_HIP_BF16_NATIVE 1
#else  // ROCm 5.2 (Debian's hipcc): only the hip_bfloat16 struct
#include <hip/hip_bfloat16.h>
#define ATTNKIT_HIP_BF16_NATIVE 0
#endif
// CUDA runtime names used by the kernel launchers, spelled as HIP. Macros (not aliases) so that a
// header already rewritten by torch's hipify (cudaX -> hipX) still compiles: "#define hipX hipX"
// is harmless. Only the few names the kernel headers use; add one here when a launcher needs it.
#ifndef cudaStream_t
#define cudaStream_t hipStream_t
#endif
#ifndef cudaError_t
#define cudaError_t hipError_t
#endif
#ifndef cudaSuccess
#define cudaSuccess hipSuccess
#endif
#ifndef cudaGetLastError
#define cudaGetLastError hipGetLastError
#endif
#ifndef cudaMemsetAsync
#define cudaMemsetAsync hipMemsetAsync
#endif
#ifndef cudaFuncAttributeMaxDynamicSharedMemorySize
#define cudaFuncAttributeMaxDynamicSharedMemorySize hipFuncAttributeMaxDynamicSharedMemorySize
#endif
// HIP 5.2 only has hipFuncSetAttribute(const void*, ...): the kernel pointer is cast in a helper
// (variadic macro: template arguments carry commas; the parenthesised call inside the helper is
// never macro-expanded, so a hipified "#define hipFuncSetAttribute(...)" cannot recurse).
#ifndef cudaFuncSetAttribute
#define cudaFuncSetAttribute(...) ::attnkit::hip_func_set_attribute(__VA_ARGS__)
#endif
#elif defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace attnkit {

#if defined(__HIPCC__)
template <typename Kernel>
inline hipError_t hip_func_set_attribute(Kernel* kernel, hipFuncAttribute attr, int value) {
  return (hipFuncSetAttribute)(reinterpret_cast<const void*>(kernel), attr, value);
}
#endif

// Host and device passes must agree (launchers size blocks with it), so under HIP it is 64 in both:
// the supported AMD targets are CDNA (gfx90a, gfx94x), whose wavefronts are 64 wide. RDNA
// (wave32) is not a target of this library.
#if defined(__HIPCC__)
constexpr int kWarpSize = 64;  // AMD CDNA wavefronts
#else
constexpr int kWarpSize = 32;
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#if defined(__HIPCC__) && ATTNKIT_HIP_BF16_NATIVE
using bf16_t = __hip_bfloat16;
#elif defined(__HIPCC__)
using bf16_t = hip_bfloat16;
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
#if defined(__HIPCC__) && !ATTNKIT_HIP_BF16_NATIVE
ATTNKIT_DEVICE ATTNKIT_INLINE float to_float(bf16_t x) { return static_cast<float>(x); }
#else
ATTNKIT_DEVICE ATTNKIT_INLINE float to_float(bf16_t x) { return __bfloat162float(x); }
#endif

template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE T from_float(float x);
template <>
ATTNKIT_DEVICE ATTNKIT_INLINE float from_float<float>(float x) { return x; }
template <>
ATTNKIT_DEVICE ATTNKIT_INLINE fp16_t from_float<fp16_t>(float x) { return __float2half_rn(x); }
#if defined(__HIPCC__) && !ATTNKIT_HIP_BF16_NATIVE
template <>  // the struct's float constructor rounds to nearest even, like __float2bfloat16_rn
ATTNKIT_DEVICE ATTNKIT_INLINE bf16_t from_float<bf16_t>(float x) { return bf16_t(x); }
#else
template <>
ATTNKIT_DEVICE ATTNKIT_INLINE bf16_t from_float<bf16_t>(float x) { return __float2bfloat16_rn(x); }
#endif
#endif  // __CUDACC__ || __HIPCC__

}  // namespace attnkit
