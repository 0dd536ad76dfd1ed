// merge_attn_states on the GPU (torch-free): one warp per (token, head) row, lanes over the head
// dim; a memory-bound pass (two rows read, one written).
#pragma once

#include "common/portability.h"
#include "kernels/paged/merge_states.h"

namespace attnkit {
namespace paged {

constexpr int kMergeThreads = 128;

// grid: ceil(T * H / warps per block).
template <typename scalar_t>
__global__ void __launch_bounds__(kMergeThreads) merge_attn_states_kernel(const MergeParams p) {
  constexpr int kWarps = kMergeThreads / kWarpSize;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (row >= int64_t(p.T) * p.H) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t t = row / p.H, h = row % p.H;
  const MergeWeights w =
      merge_weights(p.prefix_lse[h * p.pl_sh + t * p.pl_st], p.suffix_lse[h * p.sl_sh + t * p.sl_st]);
  const scalar_t* pr = static_cast<const scalar_t*>(p.prefix) + t * p.p_st + h * p.p_sh;
  const scalar_t* sr = static_cast<const scalar_t*>(p.suffix) + t * p.s_st + h * p.s_sh;
  scalar_t* o = static_cast<scalar_t*>(p.out) + t * p.o_st + h * p.o_sh;
  for (int d = lane; d < p.D; d += kWarpSize) {
    float acc = 0.0f;
    if (w.use_prefix) acc += w.prefix * to_float(pr[d]);
    if (w.use_suffix) acc += w.suffix * to_float(sr[d]);
    o[d] = from_float<scalar_t>(acc);
  }
  if (p.out_lse != nullptr && lane == 0) p.out_lse[h * p.ol_sh + t * p.ol_st] = w.lse;
}

}  // namespace paged
}  // namespace attnkit
