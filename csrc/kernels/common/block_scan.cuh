// Block-wide scans shared by the kernel families (torch-free): the MoE routing kernels' counts,
// the mixed serving call's list of long sequences. CUDA and HIP device code.
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

}  // namespace attnkit
