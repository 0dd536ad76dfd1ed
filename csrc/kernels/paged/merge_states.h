// merge_attn_states (torch-free, host and device): two partial attention results over disjoint
// key sets, each with its log-sum-exp, combined into the result over their union (vLLM's
// merge_attn_states: cascade / prefix-shared attention, context parallelism, split-K).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/portability.h"

namespace attnkit {
namespace paged {

struct MergeParams {
  void* out;  // [T, H, D]
  const void* prefix;
  const void* suffix;
  int64_t o_st, o_sh, p_st, p_sh, s_st, s_sh;  // token / head strides, head dim contiguous
  const float* prefix_lse;                     // [H, T]
  const float* suffix_lse;
  int64_t pl_sh, pl_st, sl_sh, sl_st;
  float* out_lse;  // [H, T] or null
  int64_t ol_sh, ol_st;
  int32_t T, H, D;
};

// The weights of the two parts of one (token, head) row and the merged lse. A part whose lse is
// -inf (no key) or +inf (FlashAttention 2's empty rows) weighs 0 and is never multiplied in, so
// whatever its output holds (NaN included) cannot reach the result; both empty: 0 and -inf.
struct MergeWeights {
  float prefix, suffix, lse;
  bool use_prefix, use_suffix;
};

ATTNKIT_HOST_DEVICE ATTNKIT_INLINE MergeWeights merge_weights(float p_lse, float s_lse) {
  const float kNegInf = -INFINITY;
  if (fabsf(p_lse) == INFINITY) p_lse = kNegInf;
  if (fabsf(s_lse) == INFINITY) s_lse = kNegInf;
  MergeWeights w;
  const float m = fmaxf(p_lse, s_lse);
  if (m == kNegInf) {
    w.prefix = w.suffix = 0.0f;
    w.lse = kNegInf;
    w.use_prefix = w.use_suffix = false;
    return w;
  }
  const float pe = expf(p_lse - m), se = expf(s_lse - m);
  const float sum = pe + se;
  w.prefix = pe / sum;
  w.suffix = se / sum;
  w.lse = logf(sum) + m;
  w.use_prefix = p_lse != kNegInf;
  w.use_suffix = s_lse != kNegInf;
  return w;
}

}  // namespace paged
}  // namespace attnkit
