// Warp-level tensor-core building blocks (sm_80+: mma.sync m16n8k16, ldmatrix, cp.async), shared by
// the attention kernels. Torch-free. On HIP or pre-sm_80 targets these are not compiled; kernels
// that include this header sit behind ATTNKIT_HAS_MMA_SM80 with a portable fallback.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/portability.h"

#if defined(__CUDACC__) && !defined(__HIPCC__) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define ATTNKIT_HAS_MMA_SM80 1
#else
#define ATTNKIT_HAS_MMA_SM80 0
#endif

namespace attnkit {
namespace mma {

// Host side: whether this build has the sm80 tensor-core kernels at all. Under HIP they compile to
// empty bodies (and an AMD device's "major" version says nothing about mma.sync), so launchers
// that pick them by compute capability must check this first and take the portable kernels.
#if defined(__HIPCC__)
constexpr bool kTensorCoreKernels = false;
#else
constexpr bool kTensorCoreKernels = true;
#endif

#if ATTNKIT_HAS_MMA_SM80

// Fragment registers of m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16"):
//   A (16x16, row): 4 x b32; B (16x8, col): 2 x b32; C/D (16x8, fp32): 4 floats where, with
//   g = lane / 4 and t = lane % 4, c[0..1] sit at row g, cols 2t..2t+1 and c[2..3] at row g + 8.
// Two adjacent n8 C tiles, packed to 16 bits, are exactly one A fragment of the next mma: this is
// how scores computed in registers feed P·V without a round trip through shared memory.

template <typename T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  static constexpr const char* name = "bf16";
};
template <>
struct MmaType<__half> {
  static constexpr const char* name = "f16";
};

template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

ATTNKIT_DEVICE ATTNKIT_INLINE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane i supplies the row address of matrix i / 8, row i % 8.
ATTNKIT_DEVICE ATTNKIT_INLINE void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

ATTNKIT_DEVICE ATTNKIT_INLINE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Transposes one 8x8 b16 matrix held as a fragment (lane l: row l / 4, cols 2(l % 4)..+1) into the
// same fragment of its transpose. It turns the C tile of one mma (scores) into the B operand of
// the next when the two products disagree on which side the tokens are.
ATTNKIT_DEVICE ATTNKIT_INLINE uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// 16-byte global -> shared copy that bypasses registers; src_bytes < 16 zero-fills the rest
// (src_bytes = 0 reads nothing, so out-of-range rows can pass any valid address).
ATTNKIT_DEVICE ATTNKIT_INLINE void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}
ATTNKIT_DEVICE ATTNKIT_INLINE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// 4-byte global -> shared copy (cp.async.ca: .cg only takes 16 bytes); src_bytes 0 zero-fills.
ATTNKIT_DEVICE ATTNKIT_INLINE void cp_async_4(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}

// dst[0] += x, dst[1] += y in global memory without a return value (a reduction, not a
// read-modify-write round trip); dst 8-byte aligned. sm90 has a paired form: half the requests.
ATTNKIT_DEVICE ATTNKIT_INLINE void atomic_add2(float* dst, float x, float y) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// Two floats -> one b32 of two 16-bit values (low half = first).
template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// Hardware tanh (sm_75+), max relative error about 2^-11: allowed where DESIGN says "fast".
ATTNKIT_DEVICE ATTNKIT_INLINE float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

#endif  // ATTNKIT_HAS_MMA_SM80

}  // namespace mma
}  // namespace attnkit
