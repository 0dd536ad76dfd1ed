// Block- and warp-wide scans shared by the kernel families (torch-free): the MoE routing kernels'
// counts, the mixed serving call's list of long sequences, the GDPA jagged schedule, the grouped
// GEMM's tile starts. The block scan is CUDA and HIP device code; the warp scan is CUDA's (32
// lanes).
#pragma once

#include <cstdint>

#include "common/portability.h"

namespace attnkit {

// Exclusive scan of one int32 per thread over the block (Hillis-Steele in shared memory, a fixed
// order: deterministic). `smem` holds blockDim.x ints. Returns the thread's exclusive prefix and
// the block total in `*total`. Every thread of the block must call it.
ATTNKIT_DEVICE ATTNKIT_INLINE int32_t block_exclusive_scan(int32_t v, int32_t* smem,
                                                           int32_t* total) {
  const int tid = threadIdx.x, n = blockDim.x;
  smem[tid] = v;
  __syncthreads();
  for (int d = 1; d < n; d <<= 1) {
    const int32_t add = tid >= d ? smem[tid - d] : 0;
    __syncthreads();
    smem[tid] += add;
    __syncthreads();
  }
  const int32_t inclusive = smem[tid];
  *total = smem[n - 1];
  __syncthreads();
  return inclusive - v;
}

#if defined(__CUDACC__) && !defined(__HIPCC__)
// Inclusive scan of one value per lane over the 32 lanes of a full warp (Kogge-Stone over
// shuffles: log2(32) steps). `op` combines the running value with an earlier lane's (a sum by
// default; max for running maxima). Every lane of the warp must call it.
template <typename T, typename Op>
ATTNKIT_DEVICE ATTNKIT_INLINE T warp_inclusive_scan(T v, int lane, Op op) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const T u = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v = op(v, u);
  }
  return v;
}

template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE T warp_inclusive_sum(T v, int lane) {
  return warp_inclusive_scan(v, lane, [](T a, T b) { return a + b; });
}
#endif

}  // namespace attnkit
