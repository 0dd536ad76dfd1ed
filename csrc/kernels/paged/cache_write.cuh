// Cache writers on the GPU (torch-free): reshape_and_cache (plain or per-tensor fp8) and the
// per-token-per-head quantising writer that pa_fwd's int8 / fp8 caches come from. One thread
// block per new token. Slots outside [0, num_blocks * block_size) are skipped (negative ones
// everywhere, as vLLM skips them; the CPU raises for a slot past the cache, which a check here
// could only do with a host sync).
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/paged/params.h"

namespace attnkit {
namespace paged {

constexpr int kWriteThreads = 128;

// `y`: the element already scaled for a quantised kind (x / scale per tensor, x * (1 / scale)
// per token), x itself for kSame.
template <typename scalar_t, CacheKind K>
ATTNKIT_DEVICE ATTNKIT_INLINE void store_cache_elem(void* base, int64_t off, float y) {
  if constexpr (K == CacheKind::kSame) {
    static_cast<scalar_t*>(base)[off] = from_float<scalar_t>(y);
  } else if constexpr (K == CacheKind::kFp8E4M3) {
    static_cast<uint8_t*>(base)[off] = float_to_fp8<4, 3>(y);
  } else if constexpr (K == CacheKind::kFp8E5M2) {
    static_cast<uint8_t*>(base)[off] = float_to_fp8<5, 2>(y);
  } else {
    // NaN stores 0, as the reference's cast (a NaN token's scale is NaN: dequantised it stays NaN)
    const float r = y != y ? 0.0f : fminf(kInt8Max, fmaxf(-kInt8Max, rintf(y)));
    static_cast<int8_t*>(base)[off] = static_cast<int8_t>(r);
  }
}

// max(a, b) that keeps a NaN (fmaxf drops it): the per-token amax of a row holding a NaN is NaN,
// so its scale is NaN and the row dequantises to NaN, as the reference's torch.amax gives.
ATTNKIT_DEVICE ATTNKIT_INLINE float nan_max(float a, float b) {
  return a != a ? a : (b != b ? b : fmaxf(a, b));
}

ATTNKIT_DEVICE ATTNKIT_INLINE int64_t checked_slot(const CacheWriteParams& p, int64_t t) {
  const int64_t s = p.slots_int64 ? static_cast<const int64_t*>(p.slots)[t]
                                  : static_cast<const int32_t*>(p.slots)[t];
  return (s >= 0 && s < int64_t(p.num_blocks) * p.block_size) ? s : -1;
}

// grid: T. Per-tensor scales (fp8) divide, as vLLM does: x / scale, the IEEE quotient (nvcc
// divides exactly without --use_fast_math); x * (1 / scale) differs in the last fp8 bit for ~1%
// of e5m2 inputs. kSame copies.
template <typename scalar_t, CacheKind K>
__global__ void __launch_bounds__(kWriteThreads) reshape_and_cache_kernel(const CacheWriteParams p) {
  const int64_t t = blockIdx.x;
  const int64_t s = checked_slot(p, t);
  if (s < 0) return;
  const int64_t blk = s / p.block_size, tin = s % p.block_size;
  const float ks = p.k_scale ? p.k_scale[0] : 1.0f;
  const float vs = p.v_scale ? p.v_scale[0] : 1.0f;
  const scalar_t* key = static_cast<const scalar_t*>(p.key);
  const scalar_t* value = static_cast<const scalar_t*>(p.value);
  for (int64_t idx = threadIdx.x; idx < int64_t(p.Hkv) * p.D; idx += kWriteThreads) {
    const int64_t h = idx / p.D, d = idx % p.D;
    const float kx = to_float(key[t * p.k_st + h * p.k_sh + d]);
    const float vx = to_float(value[t * p.v_st + h * p.v_sh + d]);
    store_cache_elem<scalar_t, K>(p.k_cache, key_offset(p.cs, blk, h, tin, d),
                                  K == CacheKind::kSame ? kx : kx / ks);
    store_cache_elem<scalar_t, K>(p.v_cache, value_offset(p.cs, blk, h, tin, d),
                                  K == CacheKind::kSame ? vx : vx / vs);
  }
}

// grid: T; one warp per (token, head): amax over the head dim -> scale = amax / range.
template <typename scalar_t, CacheKind K>
__global__ void __launch_bounds__(kWriteThreads) pertoken_quant_kernel(const CacheWriteParams p) {
  constexpr float kRange = K == CacheKind::kInt8 ? kInt8Max : kFp8E4M3Max;
  const int64_t t = blockIdx.x;
  const int64_t s = checked_slot(p, t);
  if (s < 0) return;
  const int64_t blk = s / p.block_size, tin = s % p.block_size;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const scalar_t* key = static_cast<const scalar_t*>(p.key);
  const scalar_t* value = static_cast<const scalar_t*>(p.value);
  for (int64_t h = warp; h < p.Hkv; h += kWriteThreads / kWarpSize) {
    const scalar_t* kr = key + t * p.k_st + h * p.k_sh;
    const scalar_t* vr = value + t * p.v_st + h * p.v_sh;
    float ka = 0.0f, va = 0.0f;
    for (int d = lane; d < p.D; d += kWarpSize) {
      ka = nan_max(ka, fabsf(to_float(kr[d])));
      va = nan_max(va, fabsf(to_float(vr[d])));
    }
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o >>= 1) {
      ka = nan_max(ka, shfl_xor(ka, o));
      va = nan_max(va, shfl_xor(va, o));
    }
    const float ks = ka / kRange, vs = va / kRange;
    const float kinv = ks > 0.0f ? 1.0f / ks : 0.0f, vinv = vs > 0.0f ? 1.0f / vs : 0.0f;
    if (lane == 0) {
      p.k_tok_scale[blk * p.ks_sb + h * p.ks_sh + tin] = ks;
      p.v_tok_scale[blk * p.vs_sb + h * p.vs_sh + tin] = vs;
    }
    for (int d = lane; d < p.D; d += kWarpSize) {
      store_cache_elem<scalar_t, K>(p.k_cache, key_offset(p.cs, blk, h, tin, d), to_float(kr[d]) * kinv);
      store_cache_elem<scalar_t, K>(p.v_cache, value_offset(p.cs, blk, h, tin, d), to_float(vr[d]) * vinv);
    }
  }
}

}  // namespace paged
}  // namespace attnkit
