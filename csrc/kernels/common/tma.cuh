// Hopper (sm_90) tensor-map copies ("TMA": cp.async.bulk.tensor) into shared memory, completed on
// an mbarrier of kernels/common/bulk_copy.cuh (arm it with bulk::arrive_expect_tx, wait with
// bulk::wait). Torch-free; the CUtensorMap objects are built on the host (csrc/cuda/tma_map.h)
// and passed as `const __grid_constant__ CUtensorMap` kernel parameters, whose generic address is
// what these helpers take.
//
// A tiled 3-D map describes a strided tensor {dim0 (innermost), dim1, dim2} (4-D: and dim3); one
// copy moves the box starting at the coordinates {c0, c1, c2} (innermost first, in elements).
// Elements outside the map's extents are not read and land as zeros; the barrier still counts the
// whole box's bytes.
// With CU_TENSOR_MAP_SWIZZLE_128B and a 128-byte inner box row, the box lands in exactly the
// sw128 layout of kernels/common/wgmma.cuh (1024-byte aligned destination).
#pragma once

#include <cstdint>

#include "kernels/common/bulk_copy.cuh"

// Whether this compile has CUtensorMap (a CUDA 12+ toolkit, not HIP): the tensor-map kernels
// (every *_ws.cuh, the NHD decode, the fused SwiGLU GEMM) and their launchers are declared only
// then. The one test of it; each kernel header names it for its own launcher.
#if defined(__CUDACC__) && !defined(__HIPCC__) && !defined(USE_ROCM)
#include <cuda.h>
#if CUDA_VERSION >= 12000
#define ATTNKIT_HAS_TENSOR_MAPS 1
#endif
#endif
#ifndef ATTNKIT_HAS_TENSOR_MAPS
#define ATTNKIT_HAS_TENSOR_MAPS 0
#endif

namespace attnkit {
namespace tma {

// Declared for every CUDA pass (kernels name them in bodies the host pass parses); device passes
// below sm_90 get trapping bodies (launchers never pick tensor-map kernels there).
#if defined(__CUDACC__) && !defined(__HIPCC__)
#if ATTNKIT_HAS_BULK_COPY
#define ATTNKIT_TMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define ATTNKIT_TMA_ASM(...) __trap()
#endif

// Loads the map into the constant cache ahead of the first copy (one thread, before the loop).
ATTNKIT_DEVICE ATTNKIT_INLINE void prefetch_map(const void* map) {
  ATTNKIT_TMA_ASM("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// One box of a 3-D tiled map -> shared memory at `smem`, its bytes counted off `bar`.
ATTNKIT_DEVICE ATTNKIT_INLINE void load_3d(void* smem, const void* map, int c0, int c1, int c2,
                                           uint64_t* bar) {
  ATTNKIT_TMA_ASM(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(mma::smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(mma::smem_addr(bar))
      : "memory");
}

// The box at `smem` (laid out as a load of the same box would land) -> global memory at the
// coordinates {c0, c1, c2}; elements outside the map's extents are dropped. Asynchronous: part of
// this thread's next bulk group (bulk::commit_group; bulk::wait_group_read before `smem` is
// written again). Writers of `smem` execute bulk::fence_proxy_async() and synchronise with the
// issuer first.
ATTNKIT_DEVICE ATTNKIT_INLINE void store_3d(const void* map, const void* smem, int c0, int c1,
                                            int c2) {
  ATTNKIT_TMA_ASM(
      "cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group"
      " [%0, {%1, %2, %3}], [%4];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(c2), "r"(mma::smem_addr(smem))
      : "memory");
}

// One box of a 4-D tiled map (e.g. batched [B][S][H][D]: {D, H, S, B}), as load_3d.
ATTNKIT_DEVICE ATTNKIT_INLINE void load_4d(void* smem, const void* map, int c0, int c1, int c2,
                                           int c3, uint64_t* bar) {
  ATTNKIT_TMA_ASM(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(mma::smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(mma::smem_addr(bar))
      : "memory");
}

// Adds the box at `smem` (the map's box, laid out as a load of it would land) into global memory
// at the coordinates {c0, c1, c2, c3}, element-wise and atomically per element (the map's type:
// fp32 here); elements outside the map's extents are dropped. Asynchronous: part of this thread's
// next bulk group (bulk::commit_group; bulk::wait_group_read before `smem` is written again).
// Writers of `smem` execute bulk::fence_proxy_async() and synchronise with the issuer first.
ATTNKIT_DEVICE ATTNKIT_INLINE void reduce_add_4d(const void* map, const void* smem, int c0, int c1,
                                                 int c2, int c3) {
  ATTNKIT_TMA_ASM(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(mma::smem_addr(smem))
      : "memory");
}
#undef ATTNKIT_TMA_ASM
#endif  // __CUDACC__ && !__HIPCC__

}  // namespace tma
}  // namespace attnkit
