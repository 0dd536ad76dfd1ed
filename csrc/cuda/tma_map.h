// Host side of the tensor-map copies (kernels/common/tma.cuh): encodes a CUtensorMap for a strided
// 3-D tensor of 16-bit elements. cuTensorMapEncodeTiled is a driver API call; it is looked up at
// run time through the runtime's driver entry point, so the extension does not link libcuda.
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
#include <cstdint>

namespace attnkit {
namespace tma {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled, or nullptr when the driver does not provide it.
inline EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &status);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &status);
#endif
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // a failed lookup must not surface as a later launch's error
      return EncodeTiledFn(nullptr);
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// A map of the 16-bit tensor at `base` with extents {dim0, dim1, dim2} (innermost first, the
// innermost contiguous) and byte strides {stride1, stride2} of dims 1 and 2, read in boxes of
// {box0, box1, box2} elements with the 128-byte swizzle (box0 * 2 must be 128). Returns false,
// leaving the choice of another kernel to the caller, when the hardware's conditions do not hold
// (16-byte aligned base, strides positive multiples of 16 below 2^40) or the driver refuses.
inline bool encode_3d_sw128(CUtensorMap* map, bool bf16, const void* base, const uint64_t (&dims)[3],
                            const uint64_t (&strides)[2], const uint32_t (&box)[3]) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || box[0] * 2 != 128) return false;
  for (const uint64_t s : strides) {
    if (s == 0 || s % 16 != 0 || s >= (uint64_t(1) << 40)) return false;
  }
  for (int i = 0; i < 3; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32) || box[i] == 0 || box[i] > 256) return false;
  }
  const EncodeTiledFn encode = encode_tiled_fn();
  if (encode == nullptr) return false;
  const cuuint64_t gdim[3] = {dims[0], dims[1], dims[2]};
  const cuuint64_t gstride[2] = {strides[0], strides[1]};
  const cuuint32_t gbox[3] = {box[0], box[1], box[2]};
  const cuuint32_t estride[3] = {1, 1, 1};
  const CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
                            const_cast<void*>(base), gdim, gstride, gbox, estride,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

}  // namespace tma
}  // namespace attnkit
#endif  // ATTNKIT_HAS_TMA_MAP
