// Hopper (sm_90a) warpgroup tensor-core building blocks shared by the attention kernels: the
// shared-memory tile layout wgmma reads, its matrix descriptors, and the fence / commit / wait
// protocol. Torch-free. Compiled only for sm_90a device code (ATTNKIT_HAS_WGMMA); launchers pick
// these kernels only when the build targets sm_90a (ATTNKIT_SM90A_TARGET) and the device is 9.0.
//
// Tile layout ("sw128"): a [ROWS][C] tile of 16-bit elements is stored as C / 64 column blocks,
// each [ROWS][64] with 128-byte rows; inside every 8-row, 1024-byte atom the 16-byte chunk index
// is XOR-ed with (row % 8) (the hardware's 128-byte swizzle). One layout serves every operand:
//   - K-major (rows = M or N, columns = the reduction dim): Q and K in S = Q·Kᵀ;
//   - N-major (rows = the reduction dim, columns = N): V in O = P·V.
// Every tile must start 1024-byte aligned (the swizzle is applied to absolute address bits).
#pragma once

#include <cstdint>

#include "kernels/common/mma.cuh"

#if defined(__CUDACC__) && !defined(__HIPCC__) && \
    (!defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define ATTNKIT_HAS_WGMMA 1
#else
#define ATTNKIT_HAS_WGMMA 0
#endif

namespace attnkit {
namespace wgmma {

// Host side: whether this build carries sm_90a code at all (setup.py defines
// ATTNKIT_SM90A_TARGET when ATTNKIT_CUDA_ARCHS names 9.0a).
#if defined(ATTNKIT_SM90A_TARGET) && !defined(__HIPCC__)
constexpr bool kBuilt = true;
#else
constexpr bool kBuilt = false;
#endif

// Byte offset of element (row, col) in a sw128 tile of ROWS rows; col a multiple of 8.
template <int ROWS>
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE uint32_t sw128_offset(int row, int col) {
  return uint32_t((col >> 6) * ROWS * 128 + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4));
}

#if ATTNKIT_HAS_WGMMA

template <typename T, int N>
struct Wgmma;
#include "kernels/common/wgmma_ops.inc"

// Matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address, leading and stride byte
// offsets (all >> 4) and the swizzle mode (1 = 128-byte).
ATTNKIT_DEVICE ATTNKIT_INLINE uint64_t descriptor(uint32_t smem_addr, uint32_t lead_bytes,
                                                  uint32_t stride_bytes) {
  return uint64_t((smem_addr & 0x3FFFF) >> 4) | (uint64_t((lead_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((stride_bytes >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// `desc` with its start address moved `bytes` (a multiple of 16) further. The address field holds
// address >> 4 in 14 bits and shared addresses stay below 2^18, so adding to the low word cannot
// carry out of the field: the same descriptor as encoding the moved address, but with the
// encoding (mask, shift, the other fields) done once for a tile and only a constant added per
// k-step (the main loops' descriptors are then one integer add each).
ATTNKIT_DEVICE ATTNKIT_INLINE uint64_t desc_plus(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | lo;
}

// K-major operand, k-step kk (16 elements of the reduction dim) of a sw128 tile with ROWS rows,
// starting at row `row0` (a multiple of 8): 8-row groups are 1024 bytes apart; within a column
// block, stepping 16 elements moves the start 32 bytes (the hardware swizzles the rest).
template <int ROWS>
ATTNKIT_DEVICE ATTNKIT_INLINE uint64_t desc_k_major(uint32_t tile, int row0, int kk) {
  return desc_plus(descriptor(tile + row0 * 128, 16, 1024), (kk >> 2) * ROWS * 128 + (kk & 3) * 32);
}

// N-major operand (B = tile rows kk*16 .. +16 as the reduction dim, all columns as N): column
// blocks of 64 are ROWS * 128 bytes apart (leading offset), 8-row groups 1024 (stride offset).
template <int ROWS>
ATTNKIT_DEVICE ATTNKIT_INLINE uint64_t desc_n_major(uint32_t tile, int kk) {
  return desc_plus(descriptor(tile, ROWS * 128, 1024), kk * 16 * 128);
}

ATTNKIT_DEVICE ATTNKIT_INLINE void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
ATTNKIT_DEVICE ATTNKIT_INLINE void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses of accumulator registers across the async window.
template <int R>
ATTNKIT_DEVICE ATTNKIT_INLINE void fence_regs(float (&d)[R][4]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads of the CTA (a multiple of 32),
// e.g. the consumer warpgroups without a producer warp.
ATTNKIT_DEVICE ATTNKIT_INLINE void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Warp-specialised kernels: a warpgroup gives registers back (a producer that only issues copies)
// or takes them (the math warpgroups), so that the CTA's launch-time share is redistributed.
// Every thread of the warpgroup executes it; kRegs is a multiple of 8 in [24, 256].
template <int kRegs>
ATTNKIT_DEVICE ATTNKIT_INLINE void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
ATTNKIT_DEVICE ATTNKIT_INLINE void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// This thread's arrival at barrier `id` without waiting: with named_barrier_sync on the same id
// by other warps it hands a turn from one warpgroup to another (producer / consumer ordering).
ATTNKIT_DEVICE ATTNKIT_INLINE void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Shared memory written by the generic proxy (st.shared, cp.async) must be fenced before the
// tensor cores (async proxy) read it; each writing thread fences, then the CTA synchronises.
ATTNKIT_DEVICE ATTNKIT_INLINE void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// stmatrix: four 8x8 16-bit matrices from registers in the m16n8k16 fragment layout (lane holds
// row lane/4, columns 2*(lane%4) + {0,1} of each matrix) to shared memory; lane 8i + r gives the
// address of stored row r of matrix i. Plain: stored row r receives fragment row r (a 16-byte
// row of 8 elements, e.g. an output row of the accumulator). Transposed: stored row r receives
// fragment column r (dS to shared for dQ = dS·K in the GDPA backward).
ATTNKIT_DEVICE ATTNKIT_INLINE void stmatrix_x4(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
               ::"r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}
ATTNKIT_DEVICE ATTNKIT_INLINE void stmatrix_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n"
               ::"r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

#endif  // ATTNKIT_HAS_WGMMA

}  // namespace wgmma
}  // namespace attnkit
