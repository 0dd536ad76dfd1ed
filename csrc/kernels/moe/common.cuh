// Small device helpers of the MoE kernels (torch-free): conversions that also cover fp64, a
// 16-byte vector of elements, and block-wide scans / reductions over int32 and float.
#pragma once

#include "common/portability.h"
#include "kernels/common/block_scan.cuh"

namespace attnkit {
namespace moe {

template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };
template <typename T>
using acc_t = typename AccType<T>::type;

template <typename A, typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE A to_acc(T x) { return static_cast<A>(to_float(x)); }
template <>
ATTNKIT_DEVICE ATTNKIT_INLINE double to_acc<double, double>(double x) { return x; }

template <typename T, typename A>
ATTNKIT_DEVICE ATTNKIT_INLINE T from_acc(A x) { return from_float<T>(static_cast<float>(x)); }
template <>
ATTNKIT_DEVICE ATTNKIT_INLINE double from_acc<double, double>(double x) { return x; }

// VEC elements moved as one load/store (16 bytes when VEC = 16 / sizeof(T)); callers only pick
// VEC > 1 when the row length and every row pointer are multiples of the vector size.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
ATTNKIT_DEVICE ATTNKIT_INLINE Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}
template <typename T, int VEC>
ATTNKIT_DEVICE ATTNKIT_INLINE void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// Orders shared-memory accesses among the lanes of one warp (an AMD wavefront runs in lockstep,
// so there only the compiler must not move accesses across it).
ATTNKIT_DEVICE ATTNKIT_INLINE void warp_sync() {
#if defined(__HIPCC__)
  __builtin_amdgcn_wave_barrier();
#else
  __syncwarp();
#endif
}

// ---- lane masks of one warp (32 lanes on NVIDIA, 64 under HIP) --------------------------------
#if defined(__HIPCC__)
using lane_mask_t = unsigned long long;
#else
using lane_mask_t = unsigned;
#endif

// The lanes below `lane` (lane < kWarpSize, so the shift stays inside the mask's width).
ATTNKIT_DEVICE ATTNKIT_INLINE lane_mask_t lanes_below(int lane) {
  return (lane_mask_t(1) << lane) - 1;
}

ATTNKIT_DEVICE ATTNKIT_INLINE int popc(lane_mask_t m) {
#if defined(__HIPCC__)
  return __popcll(m);
#else
  return __popc(m);
#endif
}

// The lowest lane of a non-empty mask.
ATTNKIT_DEVICE ATTNKIT_INLINE int lowest_lane(lane_mask_t m) {
#if defined(__HIPCC__)
  return __ffsll(static_cast<unsigned long long>(m)) - 1;
#else
  return __ffs(static_cast<int>(m)) - 1;
#endif
}

// The lanes of this warp whose `v` equals this lane's (this lane included). Every lane of the warp
// must call it (full warps only). CUDA: __match_any_sync (sm_70+); HIP has no match instruction:
// one broadcast per lane, the same mask.
ATTNKIT_DEVICE ATTNKIT_INLINE lane_mask_t match_any(int v) {
#if defined(__HIPCC__)
  lane_mask_t m = 0;
  for (int j = 0; j < kWarpSize; ++j) m |= lane_mask_t(shfl(v, j) == v) << j;
  return m;
#else
  return __match_any_sync(0xffffffffu, v);
#endif
}

// A load that bypasses this SM's L1 (volatile): for values other blocks wrote during this launch,
// after the fence / ticket that ordered them.
ATTNKIT_DEVICE ATTNKIT_INLINE int32_t load_cg(const int32_t* p) {
  return *static_cast<const volatile int32_t*>(p);
}

// Sum of one value per thread over the block, in a fixed tree order; every thread gets it.
// `smem` holds blockDim.x / kWarpSize values.
template <typename A>
ATTNKIT_DEVICE ATTNKIT_INLINE A block_sum(A v, A* smem) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  A s = 0;
  for (int i = 0; i < warps; ++i) s += smem[i];
  return s;
}

}  // namespace moe
}  // namespace attnkit
