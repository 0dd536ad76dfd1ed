// Host side of the tensor-map copies (kernels/common/tma.cuh): encodes a CUtensorMap for a strided
// 3-D or 4-D tensor of 16-bit elements. cuTensorMapEncodeTiled is a driver API call; it is looked
// up at run time through the runtime's driver entry point, so the extension does not link libcuda.
// CUDA only (ATTNKIT_HAS_TMA_MAP): under HIP there is no tensor map and the callers keep the
// cp.async kernels.
#pragma once

#if defined(__CUDACC__) && !defined(__HIPCC__) && !defined(USE_ROCM)
#include <cuda.h>
#include <cuda_runtime.h>
#if CUDA_VERSION >= 12000
#define ATTNKIT_HAS_TMA_MAP 1
#endif
#endif
#ifndef ATTNKIT_HAS_TMA_MAP
#define ATTNKIT_HAS_TMA_MAP 0
#endif

#if ATTNKIT_HAS_TMA_MAP
#include <atomic>
#include <cstdint>

namespace attnkit {
namespace tma {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled, or nullptr when the driver does not provide it. Only a
// found entry point is cached: a failed lookup is tried again at the next call, so one failure
// (say, an error state left by an earlier call in the process) cannot turn every later call of
// the process away from the tensor-map kernels, which auto would do silently.
inline EncodeTiledFn encode_tiled_fn() {
  static std::atomic<EncodeTiledFn> cached{nullptr};
  if (const EncodeTiledFn fn = cached.load(std::memory_order_acquire)) return fn;
  void* f = nullptr;
  cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &status);
#else
  const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &status);
#endif
  if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || f == nullptr) {
    (void)cudaGetLastError();  // a failed lookup must not surface as a later launch's error
    return nullptr;
  }
  const auto fn = reinterpret_cast<EncodeTiledFn>(f);
  cached.store(fn, std::memory_order_release);
  return fn;
}

// A map of the tensor at `base` (elements of `dtype`, `elem_bytes` each) with kRank extents `dims`
// (innermost first, the innermost contiguous) and byte strides `strides` of dims 1 .. kRank - 1,
// read in boxes of `box` elements with the 128-byte swizzle (box[0] * elem_bytes must be 128).
// Returns false, leaving the choice of another
// kernel to the caller, when the hardware's conditions do not hold (16-byte aligned base, strides
// positive multiples of 16 below 2^40, extents in [1, 2^32], boxes in [1, 256]) or the driver
// refuses.
template <int kRank>
inline bool encode_sw128(CUtensorMap* map, CUtensorMapDataType dtype, uint32_t elem_bytes,
                         const void* base, const uint64_t (&dims)[kRank],
                         const uint64_t (&strides)[kRank - 1], const uint32_t (&box)[kRank]) {
  static_assert(kRank >= 2 && kRank <= 5, "tiled tensor maps have rank 2..5 here");
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || box[0] * elem_bytes != 128) return false;
  for (const uint64_t s : strides) {
    if (s == 0 || s % 16 != 0 || s >= (uint64_t(1) << 40)) return false;
  }
  for (int i = 0; i < kRank; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32) || box[i] == 0 || box[i] > 256) return false;
  }
  const EncodeTiledFn encode = encode_tiled_fn();
  if (encode == nullptr) return false;
  cuuint64_t gdim[kRank], gstride[kRank - 1];
  cuuint32_t gbox[kRank], estride[kRank];
  for (int i = 0; i < kRank; ++i) {
    gdim[i] = dims[i];
    gbox[i] = box[i];
    estride[i] = 1;
    if (i + 1 < kRank) gstride[i] = strides[i];
  }
  auto call = [&] {
    return encode(map, dtype, kRank, const_cast<void*>(base), gdim, gstride, gbox, estride,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  };
  if (call() == CUDA_SUCCESS) return true;
  // The driver call needs a context current on this thread. A thread whose first CUDA work this
  // is has none: autograd's backward thread, say, where c10's device guard binds nothing when the
  // device index already matches (seen on the H200, 2026-12-04: the first sm90_ws backward of a
  // process refused with valid maps). cudaFree(nullptr) binds the device's primary context; then
  // once more.
  if (cudaFree(nullptr) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return call() == CUDA_SUCCESS;
}

inline CUtensorMapDataType half_type(bool bf16) {
  return bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// The 3-D case (GDPA's [T][heads][D] maps), bf16 / fp16.
inline bool encode_3d_sw128(CUtensorMap* map, bool bf16, const void* base, const uint64_t (&dims)[3],
                            const uint64_t (&strides)[2], const uint32_t (&box)[3]) {
  return encode_sw128<3>(map, half_type(bf16), 2, base, dims, strides, box);
}

// The 4-D case (flash's [B][S][H][D] maps, {D, H, S, B} innermost first), bf16 / fp16.
inline bool encode_4d_sw128(CUtensorMap* map, bool bf16, const void* base,
                            const uint64_t (&dims)[4], const uint64_t (&strides)[3],
                            const uint32_t (&box)[4]) {
  return encode_sw128<4>(map, half_type(bf16), 2, base, dims, strides, box);
}

// The fp32 dQ workspace of the warp-specialised backwards (flash and GDPA), contiguous
// [batches][rows][heads][D], as {D, heads, rows, batches} in boxes of 32 columns x 64 rows: the
// box wsbwd::DqStage stages and adds with tensor reductions.
inline bool encode_dq_stage_map(CUtensorMap* map, const float* base, uint64_t D, uint64_t heads,
                                uint64_t rows, uint64_t batches) {
  const uint64_t dims[4] = {D, heads, rows, batches};
  const uint64_t strides[3] = {D * 4, heads * D * 4, rows * heads * D * 4};
  const uint32_t box[4] = {32, 1, 64, 1};
  return encode_sw128<4>(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, base, dims, strides, box);
}

}  // namespace tma
}  // namespace attnkit
#endif  // ATTNKIT_HAS_TMA_MAP
