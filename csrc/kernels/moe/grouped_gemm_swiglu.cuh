// Grouped GEMM with the SwiGLU in its epilogue on Hopper (sm_90a, bf16 / fp16), torch-free:
// out[r] = silu(h[r, :I]) * h[r, I:] with h[r] = a[r] · W[e] for the rows r of expert e, so the
// [M, 2I] product never reaches memory. a [M, H] row-major, W [E, H, 2I] row-major (the B operand
// is N-major: wgmma's transpose flag), out [M, I] row-major. Columns [0, I) of W are the gate,
// [I, 2I) the up projection (silu_and_mul's halves).
//
// CTA = 384 threads, persistent (one per SM), walking output tiles of 128 rows x 128 columns:
//   warpgroup 0, producer: gives its registers back (setmaxnreg.dec) and one thread issues every
//     load as a tensor-map copy (kernels/common/tma.cuh) into a kStages ring; a stage holds one
//     64-wide K block: the A box [128 rows][64] and four W boxes [64][64]: gate columns n0,
//     n0 + 64 and up columns I + n0, I + n0 + 64, i.e. a 128 x 256 GEMM tile per stage.
//   warpgroups 1-2, consumers: take the registers (setmaxnreg.inc), 64 rows each, and per K block
//     issue 4 wgmma m64n256k16, one per 16-deep k step: the four W boxes are consecutive 8 KB
//     column blocks of one N-major operand (the descriptor's leading offset steps from box to
//     box), so one instruction covers gate and up (accumulator columns [0, 128) gate, [128, 256)
//     up; 128 fp32 registers) and reads the warpgroup's A rows from shared memory once per k step
//     instead of twice. They keep one K block in flight and release the previous stage. The
//     epilogue computes silu(g) * u in fp32 straight from the accumulators (no non-wgmma write of
//     them: ptxas would serialise the wgmmas, C7514), rounds once, and stores 16 bytes per lane
//     after a quad transpose.
//
// Work: tiles ordered (expert, column band, row tile) with row tiles fastest, so the CTAs running
// together share a band of W and the expert's rows in L2. The order is found on the device: at
// the start every CTA sanitises the offsets (S(e) = max(S(e-1), clamp(off[e], 0, M)), as the
// portable kernel does) and takes the prefix sum of tiles per expert into shared memory; no host
// sync, and no offset value can make a copy or store leave the tensors (A boxes start inside
// [0, M), rows past M land as zeros, rows past an expert's end are computed and not stored).
// Columns: a band past I reads up columns (or zeros past 2I), computed and not stored; K past H
// lands as zeros. Rows outside [S(0), S(E)) are zeroed by the consumers after their tiles.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/common/block_scan.cuh"
#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/common/wgmma.cuh"
#include "kernels/gdpa/tile.cuh"  // quad_transpose
#include "kernels/moe/grouped_gemm.cuh"  // clamp_offset

#define ATTNKIT_HAS_SWIGLU_GEMM ATTNKIT_HAS_TENSOR_MAPS  // the kernel and its launcher are declared

#if ATTNKIT_HAS_SWIGLU_GEMM

namespace attnkit {
namespace moe {

struct SwigluGemmTraits {
  static constexpr int kConsumerWarpGroups = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpGroups);
  static constexpr int kConsumerThreads = 128 * kConsumerWarpGroups;
  static constexpr int kConsumerWarps = 4 * kConsumerWarpGroups;
  static constexpr int kBlockM = 64 * kConsumerWarpGroups;  // output rows per tile
  static constexpr int kBlockN = 128;                       // output columns (x2 GEMM columns)
  static constexpr int kBlockK = 64;                        // one sw128 column block
  static constexpr int kStages = 4;
  static constexpr int kABytes = kBlockM * kBlockK * 2;     // one A box
  static constexpr int kWBoxBytes = kBlockK * 64 * 2;       // one W box [64 K][64 columns]
  static constexpr int kHalfBytes = 2 * kWBoxBytes;         // gate (or up) [64 K][128 columns]
  static constexpr int kStageBytes = kABytes + 2 * kHalfBytes;  // 48 KB
  static constexpr int kProducerRegs = 40;   // the tile walk's binary search and int64 sums
  static constexpr int kConsumerRegs = 232;  // 128·40 + 256·232 <= 64K registers
  static constexpr int kMaxExperts = 1024;   // the tile prefix lives in shared memory
  // + 1 KB so the stages can start 1024-byte aligned whatever the dynamic base is.
  static constexpr int kSmemBytes = 1024 + kStages * kStageBytes;
};

struct SwigluGemmParams {
  const void* offsets;  // [E + 1] int32 or int64, unsanitised
  void* out;            // [M, I]
  int64_t M;
  int H, I, E;
  int n_tiles;  // column bands: ceil(I / kBlockN)
};

// One output tile: expert e, its rows [row0, row0 + rows) (rows <= kBlockM), columns from n0.
struct SwigluTile {
  int e, row0, rows, n0;
};

#if defined(__CUDACC__)
// Tile t of the walk (see the file comment): the expert by binary search in the prefix.
ATTNKIT_DEVICE ATTNKIT_INLINE SwigluTile swiglu_tile_at(int64_t t, const int64_t* tile_start,
                                                        const int* row_start, int E, int n_tiles) {
  constexpr int BM = SwigluGemmTraits::kBlockM;
  int lo = 0, hi = E;  // the last e with tile_start[e] <= t (t < tile_start[E])
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_start[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int e = lo;
  const int rows = row_start[e + 1] - row_start[e];
  const int m_tiles = (rows + BM - 1) / BM;
  const int64_t local = t - tile_start[e];
  const int nt = int(local / m_tiles), mt = int(local % m_tiles);
  const int row0 = row_start[e] + mt * BM;
  return {e, row0, min(BM, row_start[e + 1] - row0), nt * SwigluGemmTraits::kBlockN};
}

// Warp 0: row_start[e] = S(e) for e in [0, E], tile_start[e] = the tiles of experts < e.
template <typename index_t>
ATTNKIT_DEVICE ATTNKIT_INLINE void swiglu_schedule(const index_t* off, int E, int64_t M,
                                                   int n_tiles, int* row_start,
                                                   int64_t* tile_start) {
  constexpr int BM = SwigluGemmTraits::kBlockM;
  const int lane = threadIdx.x & 31;
  const int per = (E + 1 + 31) / 32, begin = lane * per, end = min(E + 1, begin + per);
  // Running max of the clamped offsets over the lane's chunk, then across lanes.
  int run = 0;
  for (int j = begin; j < end; ++j) {
    run = max(run, int(clamp_offset(off[j], M)));
    row_start[j] = run;
  }
  const int incl = warp_inclusive_scan(run, lane, [](int a, int b) { return max(a, b); });
  int excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0;
  for (int j = begin; j < end; ++j) row_start[j] = max(row_start[j], excl);
  __syncwarp();
  // Tiles of expert j - 1 summed into tile_start[j] (tile_start[0] = 0), the same chunks.
  int64_t sum = 0;
  for (int j = begin; j < end; ++j) {
    if (j > 0) sum += int64_t((row_start[j] - row_start[j - 1] + BM - 1) / BM) * n_tiles;
    tile_start[j] = sum;
  }
  const int64_t isum = warp_inclusive_sum(sum, lane);
  int64_t esum = __shfl_up_sync(0xffffffffu, isum, 1);
  if (lane == 0) esum = 0;
  for (int j = begin; j < end; ++j) tile_start[j] += esum;
}
#endif  // __CUDACC__

// silu(g) * u in fp32. fp16 output: g / (1 + e^-g), two MUFU ops (ex2, rcp); g -> -inf: 0 (the
// quotient flushes), not NaN. bf16 output: silu(g) = h + h tanh(h) with h = g / 2, one MUFU op
// (tanh.approx, max relative error about 2^-11, a quarter of bf16's rounding step): the epilogue
// is MUFU-bound (64 elements a thread per tile, while the tensor cores wait) and this halves it.
// Large negative g: tanh = -1 exactly and the fma gives 0; +inf: inf; NaN stays NaN.
template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE float swiglu(float g, float u) {
#if ATTNKIT_HAS_MMA_SM80
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const float h = 0.5f * g;
    return fmaf(h, mma::tanh_approx(h), h) * u;
  }
#endif
  return __fdividef(g, 1.f + __expf(-g)) * u;
}

template <typename T, typename index_t>
__global__ void __launch_bounds__(SwigluGemmTraits::kThreads, 1)
    grouped_gemm_swiglu_kernel(const SwigluGemmParams p, const __grid_constant__ CUtensorMap map_a,
                               const __grid_constant__ CUtensorMap map_w) {
#if ATTNKIT_HAS_WGMMA
  using Tr = SwigluGemmTraits;
  using Mma = wgmma::Wgmma<T, 2 * Tr::kBlockN>;  // gate and up columns in one instruction
  constexpr int BM = Tr::kBlockM, BK = Tr::kBlockK, S = Tr::kStages;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  __shared__ uint64_t full[S], empty[S];
  __shared__ int row_start[Tr::kMaxExperts + 1];
  __shared__ int64_t tile_start[Tr::kMaxExperts + 1];

  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      bulk::init(full + s, 1);
      bulk::init(empty + s, Tr::kConsumerWarps);
    }
    bulk::fence_init();
  }
  if (tid < 32) {
    swiglu_schedule(static_cast<const index_t*>(p.offsets), p.E, p.M, p.n_tiles, row_start,
                    tile_start);
  }
  __syncthreads();  // the last CTA-wide barrier: the roles below never meet all together again

  const int64_t tiles = tile_start[p.E];
  const int k_blocks = (p.H + BK - 1) / BK;

  if (tid < 128) {  // producer warpgroup: one thread issues every copy
    wgmma::setmaxnreg_dec<Tr::kProducerRegs>();
    if (tid != 0) return;
    tma::prefetch_map(&map_a);
    tma::prefetch_map(&map_w);
    uint32_t g = 0;  // K blocks this CTA has loaded so far
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
      const SwigluTile u = swiglu_tile_at(t, tile_start, row_start, p.E, p.n_tiles);
      for (int kb = 0; kb < k_blocks; ++kb, ++g) {
        const uint32_t stage = g % S, reuse = g / S;  // reuse > 0: the stage held K block g - S
        if (reuse > 0) bulk::wait(empty + stage, (reuse - 1) & 1);
        unsigned char* dst = smem + stage * Tr::kStageBytes;
        uint64_t* bar = full + stage;
        const int k0 = kb * BK;
        bulk::arrive_expect_tx(bar, Tr::kStageBytes);
        tma::load_3d(dst, &map_a, k0, u.row0, 0, bar);
        unsigned char* w_dst = dst + Tr::kABytes;
        tma::load_3d(w_dst, &map_w, u.n0, k0, u.e, bar);
        tma::load_3d(w_dst + Tr::kWBoxBytes, &map_w, u.n0 + 64, k0, u.e, bar);
        tma::load_3d(w_dst + Tr::kHalfBytes, &map_w, p.I + u.n0, k0, u.e, bar);
        tma::load_3d(w_dst + Tr::kHalfBytes + Tr::kWBoxBytes, &map_w, p.I + u.n0 + 64, k0, u.e,
                     bar);
      }
    }
    return;
  }

  wgmma::setmaxnreg_inc<Tr::kConsumerRegs>();
  const int ctid = tid - 128, wg = ctid / 128, lane = tid & 31, q = lane & 3;
  const int warp_row0 = wg * 64 + ((ctid / 32) & 3) * 16;  // the warp's first row in the tile
  const uint32_t smem_base = mma::smem_addr(smem);
  T* out = static_cast<T*>(p.out);
  uint32_t g = 0;  // K blocks consumed so far

  // acc[i] holds GEMM columns 8i .. 8i + 7 of the tile: i < kGroups the gate, from kGroups the up.
  constexpr int kGroups = Tr::kBlockN / 8;
  float acc[2 * kGroups][4];
#pragma unroll
  for (int i = 0; i < 2 * kGroups; ++i) {  // once: every tile's first product overwrites
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const SwigluTile u = swiglu_tile_at(t, tile_start, row_start, p.E, p.n_tiles);
    for (int kb = 0; kb < k_blocks; ++kb, ++g) {
      const uint32_t stage = g % S;
      bulk::wait(full + stage, (g / S) & 1);
      const uint32_t sa = smem_base + stage * Tr::kStageBytes, sw = sa + Tr::kABytes;
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        const uint64_t da = wgmma::desc_k_major<BM>(sa, wg * 64, kk);
        const int accumulate = kb > 0 || kk > 0;  // a tile's first product overwrites
        Mma::template ss<1>(acc, da, wgmma::desc_n_major<BK>(sw, kk), accumulate);
      }
      wgmma::commit();
      wgmma::wait<1>();  // K block g - 1's products are done: its stage may be refilled
      if (kb > 0 && lane == 0) bulk::arrive(empty + (g - 1) % S);
    }
    wgmma::wait<0>();
    wgmma::fence_regs(acc);
    if (k_blocks > 0 && lane == 0) bulk::arrive(empty + (g - 1) % S);

    // Epilogue: lane q of a quad ends up with 8 consecutive columns of one row (quad_transpose).
    // Columns come in whole 8-column groups (the launcher requires I % 8 == 0).
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp_row0 + (lane >> 2) + half * 8;
      T* dst = out + (int64_t(u.row0) + r) * p.I + u.n0 + q * 8;
#pragma unroll
      for (int c0 = 0; c0 < kGroups; c0 += 4) {
        uint32_t v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float(&gate)[4] = acc[c0 + i];
          const float(&up)[4] = acc[kGroups + c0 + i];
          v[i] = mma::pack2<T>(swiglu<T>(gate[2 * half], up[2 * half]),
                               swiglu<T>(gate[2 * half + 1], up[2 * half + 1]));
        }
        gdpa::quad_transpose(v, q);
        if (r < u.rows && u.n0 + (c0 + q) * 8 < p.I) {
          *reinterpret_cast<uint4*>(dst + c0 * 8) = make_uint4(v[0], v[1], v[2], v[3]);
        }
      }
    }
  }

  // Rows before S(0) and from S(E) on belong to no expert: zeros, spread over the grid.
  const int64_t lo = row_start[0], hi = row_start[p.E];
  const int64_t chunks_per_row = p.I / 8;
  const int64_t outside = (lo + (p.M - hi)) * chunks_per_row;
  for (int64_t c = int64_t(blockIdx.x) * Tr::kConsumerThreads + ctid; c < outside;
       c += int64_t(gridDim.x) * Tr::kConsumerThreads) {
    const int64_t rr = c / chunks_per_row, row = rr < lo ? rr : hi + (rr - lo);
    *reinterpret_cast<uint4*>(out + row * p.I + (c % chunks_per_row) * 8) = make_uint4(0, 0, 0, 0);
  }
#endif
}

// Launches the persistent grid: one CTA per SM (the shared memory allows no second), at most one
// per tile of the upper bound ceil(M / kBlockM) + E row tiles. `map_a`: a as {H, M, 1} with boxes
// {64, 128, 1}; `map_w`: W as {2I, H, E} with boxes {64, 64, 1}; both sw128 (tma_map.h).
template <typename T, typename index_t>
cudaError_t launch_grouped_gemm_swiglu(const SwigluGemmParams& p, const CUtensorMap& map_a,
                                       const CUtensorMap& map_w, int sms, cudaStream_t stream) {
  using Tr = SwigluGemmTraits;
  auto kernel = grouped_gemm_swiglu_kernel<T, index_t>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t bound = ((p.M + Tr::kBlockM - 1) / Tr::kBlockM + p.E) * int64_t(p.n_tiles);
  const int64_t grid = bound < sms ? bound : sms;
  kernel<<<unsigned(grid > 0 ? grid : 1), Tr::kThreads, Tr::kSmemBytes, stream>>>(p, map_a, map_w);
  return cudaGetLastError();
}

}  // namespace moe
}  // namespace attnkit

#endif  // ATTNKIT_HAS_SWIGLU_GEMM
