// Tensor-core paged decode for grouped-query attention (sm_80+, torch-free).
//
// With G = Hq / Hkv >= 2 query heads per kv head, the CUDA-core kernel (decode.cuh) spends G fp32
// FMAs per K and V element and becomes issue bound. Here the G query rows of a kv head are padded
// to one m16 tile (rows >= G hold zeros and are never stored) and both products run on mma.sync:
//   S[16 x 16 tokens] = Q·Kᵀ      A = Q fragments (registers), B = K tile [16 tok][D] (ldmatrix)
//   O[16 x D]        += P·V       A = P (the S accumulators, packed), B = V tile [D][16 tok]
// Served: 16-bit query with the cache in the query dtype, head size 64 or 128, block size 16 or
// 32, one query token per sequence (paged_attention_v1, pa_fwd with max_qlen = 1), both value
// layouts, any cache strides (block stride 0 included).
//
// Work split: CTA = (sequence, kv head, split) with 4 warps. A split owns the partitions
// split, split + splits, ... of kPartition tokens (the same split-K grid and workspace as
// decode.cuh, so paged_combine_kernel finishes); each partition is 16 tiles of 16 tokens and the
// warps take the split's tiles round-robin. Each warp streams its tiles through its own
// kStages-deep cp.async ring (warp-local: only __syncwarp between stages), keeps a running
// (max, sum, O) in registers, and the 4 warps merge through shared memory at the end.
//
// Masking: a tile's token is visible when its block id is in [0, num_blocks) and it lies in the
// row window [lo, hi). K rows of invisible tokens and V token chunks past hi (or wholly before lo,
// or of an invalid block) are zero-filled by cp.async without being read: tokens past the length
// may hold anything (even NaN) and must never be multiplied in.
//
// Global reads: every cp.async instruction of a warp moves 512 bytes, and each group of 8 lanes
// (what the memory pipeline serves together for 16-byte accesses) covers one whole 128-byte line
// whenever the layout allows it. Keys [D/x, bs, x]: lanes walk tokens. vLLM values [D, bs]: lane
// pairs take the two 8-token chunks of one dim (32 contiguous bytes at bs = 16). ASM values
// [bs/x, D, x]: lanes walk dims inside one 8-token chunk, 16 bytes each, so 8 lanes read 128
// contiguous bytes (with lane pairs per dim, as for vLLM, they would touch two lines half each and
// double the requests for the same bytes).
//
// Bulk loads (kBulk, sm_90 with the cache laid out contiguously per block and head; see
// bulk_eligible() in the launcher): lane 0 moves each tile with cp.async.bulk ("1-D TMA"): K as
// one 4 KB copy (block size 16) or D/8 copies of 256 bytes (block size 32), V as one 4 KB copy,
// completed on the stage's mbarrier. Shared memory then holds the global layout unswizzled, which
// ldmatrix reads without bank conflicts for K [D/8][16 tok][8] and ASM V [2][D][8 tok] (2-way for
// vLLM V [D][16 tok]). Per-lane cp.async spends one load-unit request per 16 bytes and kept the
// memory pipeline ~80-90% busy at ~45-60% of DRAM bandwidth (ncu, H200); bulk copies do not.
// Whole tiles are copied, tokens outside [lo, hi) included (in bounds: the block id is valid), so
// a partial tile's invisible V rows are zeroed in shared memory after it lands, and a tile of an
// invalid block id is not copied and not computed.
//
// NHD caches on sm_90 (paged_decode_mma_nhd_tma_kernel): a tile's 16 token rows of one kv head are
// D·2 bytes each at a token stride of Hkv·D·2, so neither one bulk copy nor per-lane cp.async
// suits them (one 256-byte bulk copy per row kept the copy engine, and per-lane cp.async the load
// unit, as busy as above, both at 46-68% of DRAM bandwidth on the H200). A 4-D tensor map of the
// cache ({D, Hkv, block_size, num_blocks}, boxes of 64 columns x 16 rows) moves a K or V tile in
// D/64 copies, landed with the 128-byte swizzle ([D/64][16][64], 16-byte chunk ^ row % 8, which
// keeps the ldmatrix rows on distinct bank groups).
//
// Start-up: the block ids of a warp's first tiles do not depend on the sequence length (without
// a sliding window), so they are read together with seq_lens, and the first tiles are in flight
// before the query is staged in shared memory.
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/mma.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/paged/decode.cuh"
#include "kernels/paged/params.h"

namespace attnkit {
namespace paged {

#if defined(__CUDACC__) && !defined(__HIPCC__) && !defined(USE_ROCM)
#include <cuda.h>
#if CUDA_VERSION >= 12000
#define ATTNKIT_HAS_NHD_TMA 1  // CUtensorMap exists: the NHD tensor-map kernel is declared
#endif
#endif
#ifndef ATTNKIT_HAS_NHD_TMA
#define ATTNKIT_HAS_NHD_TMA 0
#endif

// kSw128: NHD tiles landed by tensor-map copies in the 128-byte swizzle, whose pattern needs
// 1024-byte aligned stages (the extra 1 KB lets the kernel align the ring whatever the base).
template <int D, bool kSw128 = false>
struct MmaDecodeTraits {
  static_assert(D == 64 || D == 128, "tensor-core decode: head size 64 or 128");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTile = 16;                              // tokens per tile
  static constexpr int kTilesPerPart = kPartition / kTile;      // 16
  static constexpr int kStages = D == 64 ? 4 : 3;               // per-warp cp.async ring depth
  static constexpr int kTileElems = kTile * D;                 // K tile = V tile elements
  static constexpr int kStageElems = 2 * kTileElems;            // K + V
  static constexpr int kQElems = 16 * D;
  static constexpr int kPipeBytes = kWarps * kStages * kStageElems * 2;
  // The final merge reuses the pipeline buffers: O [4][16][D] floats + (m, l) [4][16][2].
  static constexpr int kMergeBytes = (kWarps * 16 * D + kWarps * 16 * 2) * 4;
  static constexpr int kSmemBytes =
      kQElems * 2 + (kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes) + (kSw128 ? 1024 : 0);
};

#if ATTNKIT_HAS_MMA_SM80
namespace mmadec {

// [16 rows][D] 16-bit tile, 16-byte chunks XOR-swizzled by row % 8 (gdpa/tile.cuh's layout).
template <int D>
ATTNKIT_DEVICE ATTNKIT_INLINE int kswz(int row, int col) {  // col: a multiple of 8
  return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8;
}

// [D rows][16 tokens] 16-bit tile: 2 chunks per row, chunk index XOR (row / 4) % 2, so the 8 row
// addresses of one ldmatrix (8 consecutive rows, one logical chunk) hit 8 distinct 16-byte bank
// groups; so do 8 lanes of the ASM-order cp.async writes (same rows and chunk).
ATTNKIT_DEVICE ATTNKIT_INLINE int vswz(int row, int chunk) {
  return row * 16 + ((chunk ^ (row >> 2)) & 1) * 8;
}

// Element offsets of the bulk-copied (global-layout) tiles: K [D/8 chunks][16 tokens][8 dims],
// V [2 token chunks][D][8 tokens] (ASM) or [D][16 tokens] (vLLM); col and chunk as above.
ATTNKIT_DEVICE ATTNKIT_INLINE int kbulk(int row, int col) { return (col >> 3) * 128 + row * 8; }
template <int D>
ATTNKIT_DEVICE ATTNKIT_INLINE int vbulk(bool chunk_major, int row, int chunk) {
  return chunk_major ? chunk * D * 8 + row * 8 : row * 16 + chunk * 8;
}
// Element offset of (row, col) in a tensor-map tile [D/64 boxes][16 rows][64 cols] with the 128-byte
// swizzle: the 16-byte chunk index (col / 8) % 8 is XORed with row % 8 (the box base is
// 1024-byte aligned, so the hardware's address bits give exactly that).
ATTNKIT_DEVICE ATTNKIT_INLINE int sw128(int row, int col) {
  return (col >> 6) * (16 * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

}  // namespace mmadec
#endif

// grid: x = S * Hkv (token_grid: Tq * Hkv), y = splits; block: 128 threads; dynamic smem
// MmaDecodeTraits<D>::kSmemBytes. BS = 0: the block size is read at run time (any multiple of 16).
// kNhd: NHD caches [num_blocks, block_size, Hkv, D] (vLLM V1, FlashAttention): V tiles are staged
// token-major like K and fed to the P·V product with ldmatrix.trans. With kBulk (sm_90) lane 0
// copies each tile through the tensor maps map_k / map_v (the header's NHD paragraph); the
// kernels below are this body with and without maps.
template <typename T, int D, int BS, bool kBulk, bool kNhd>
ATTNKIT_DEVICE ATTNKIT_INLINE void decode_mma_body(const DecodeParams& p, const void* map_k,
                                                   const void* map_v) {
#if ATTNKIT_HAS_MMA_SM80
  constexpr bool kSw128 = kNhd && kBulk;
  using Tr = MmaDecodeTraits<D, kSw128>;
  constexpr int NST = Tr::kStages, TILE = Tr::kTile, TPP = Tr::kTilesPerPart;
  constexpr float kLog2e = 1.4426950408889634f;
  static_assert(BS == 0 || BS == 16 || BS == 32, "tensor-core decode: block size 16 or 32");
  const int bsz = BS > 0 ? BS : p.block_size;  // a multiple of 16 (TILE) when run-time
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  unsigned char* pipe_raw = smem_raw + Tr::kQElems * sizeof(T);
  if constexpr (kSw128) pipe_raw += (1024u - (mma::smem_addr(pipe_raw) & 1023u)) & 1023u;
  T* pipe = reinterpret_cast<T*>(pipe_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = p.Hq / p.Hkv;
  const int64_t hk = blockIdx.x % p.Hkv;
  const int64_t row = blockIdx.x / p.Hkv;  // the sequence, or with token_grid the query token
  const int64_t b = p.token_grid ? seq_of_token(p, row) : row;  // -1: no sequence holds the token
  const int split = blockIdx.y, splits = gridDim.y;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const T* kh = kc + hk * p.cs.k_sh;
  const T* vh = vc + hk * p.cs.v_sh;
  const int32_t* bt = p.block_tables + (b < 0 ? 0 : b) * p.bt_stride;
  T* my_pipe = pipe + warp * NST * Tr::kStageElems;

  // The warp's n-th tile starts at token tile_start(part0, n); tiles are increasing in n.
  auto tile_start = [&](int64_t part0, int n) -> int64_t {
    const int g = n * Tr::kWarps + warp;
    return (part0 + int64_t(g / TPP) * splits) * kPartition + int64_t(g % TPP) * TILE;
  };
  // Block ids of the warp's tiles come 32 at a time (lane i holds tile n0 + i's), one batch ahead
  // (ids: tiles n0.., ids_next: n0 + 32..), so only the first batch is ever waited for;
  // -1 = invisible. Entries past the table's row are never read; those past the length are read
  // (they are in the row) but their tokens are masked.
  auto fetch_ids = [&](int64_t part0, int n0) -> int32_t {
    const int64_t blk = tile_start(part0, n0 + lane) / bsz;
    if (blk >= p.max_blocks) return -1;
    const int32_t id = bt[blk];
    return (id >= 0 && id < p.num_blocks) ? id : -1;
  };
  // Without a window lo = 0, so the first partition is `split` whatever the length: read the
  // first ids in parallel with seq_lens instead of after it.
  int32_t ids = p.window > 0 ? -1 : fetch_ids(split, 0);
  int32_t ids_next = p.window > 0 ? -1 : fetch_ids(split, 32);

  const SeqQuery sq = b >= 0 ? seq_query(p, b) : SeqQuery{0, 0, 0};
  if (sq.qlen <= 0) {
    // No query row (pa_fwd with an empty qo_indptr range), or a token no sequence holds: the
    // output row stays as the launcher filled it (0, lse -inf); its split rows say "empty".
    if (p.token_grid && p.splits > 1 && threadIdx.x < G) {
      p.ws_ml[((row * p.Hq + hk * G + threadIdx.x) * p.splits + blockIdx.y) * 2] = -INFINITY;
      p.ws_ml[((row * p.Hq + hk * G + threadIdx.x) * p.splits + blockIdx.y) * 2 + 1] = 0.0f;
    }
    return;
  }
  // The query token and its row window: token_grid rows may be any row i of their sequence.
  const int64_t qtok = p.token_grid ? row : sq.q0;
  const RowWindow w = row_window(sq.L, p.token_grid ? sq.qlen : 1, p.token_grid ? row - sq.q0 : 0,
                                 p.window);
  const int64_t lo = w.lo, hi = w.hi, qpos = w.qpos;
  const int64_t part0 = hi > lo ? lo / kPartition + split : 0;
  if (p.window > 0) ids = fetch_ids(part0, 0), ids_next = fetch_ids(part0, 32);

  // The validity of each staged tile, read back by the compute step (per-warp ring), and with
  // bulk loads each stage's barrier (one arrival: lane 0's, plus the tile's bytes).
  __shared__ int32_t ok_ring[Tr::kWarps][NST];
  __shared__ __align__(8) uint64_t full[Tr::kWarps][NST];
  if constexpr (kBulk) {
    if (lane == 0) {
      for (int s = 0; s < NST; ++s) bulk::init(&full[warp][s], 1);
      bulk::fence_init();
    }
    __syncwarp();
  }
  // V lane roles (see the header): chunk-major (ASM) layouts walk dims, row-major (vLLM) ones
  // take lane pairs per dim.
  const bool v_chunk_major = p.cs.v_tx < TILE;
  // Per-lane cp.async loads of tile ts (block id, or -1) into the swizzled stage (ks, vs).
  auto issue_cp_async = [&](int64_t ts, int32_t id, int in_off, const T* kb, const T* vb, T* ks, T* vs) {
    // K: chunk c (dims 8c..8c+7) of token t; lanes walk tokens first (16-byte runs per chunk).
#pragma unroll
    for (int i = 0; i < TILE * D / 8 / 32; ++i) {
      const int idx = i * 32 + lane, t = idx % TILE, c = idx / TILE;
      const int64_t tok = ts + t;
      const bool ok = id >= 0 && tok >= lo && tok < hi;
      const T* src = ok ? kb + c * p.cs.k_sdc + (in_off + t) * p.cs.k_st : kc;
      mma::cp_async_16(ks + mmadec::kswz<D>(t, c * 8), src, ok ? 16 : 0);
    }
    if constexpr (kNhd) {
      // V like K: token t's dims 8c..8c+7 (16 contiguous bytes); invisible tokens zero-filled.
#pragma unroll
      for (int i = 0; i < TILE * D / 8 / 32; ++i) {
        const int idx = i * 32 + lane, t = idx % TILE, c = idx / TILE;
        const int64_t tok = ts + t;
        const bool ok = id >= 0 && tok >= lo && tok < hi;
        const T* src = ok ? vb + (in_off + t) * p.cs.v_stc + c * 8 : vc;
        mma::cp_async_16(vs + mmadec::kswz<D>(t, c * 8), src, ok ? 16 : 0);
      }
      return;
    }
    // V token chunk c (tile tokens 8c..8c+7): its offset inside the block and how many of its
    // tokens may be read (only tokens < hi; none for an invalid block or a chunk before lo).
    int64_t v_off[2];
    int v_bytes[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int tin = in_off + 8 * c;
      v_off[c] = int64_t(tin / p.cs.v_tx) * p.cs.v_stc + tin % p.cs.v_tx;
      const int64_t tok0 = ts + 8 * c;
      int64_t nv = hi - tok0;
      nv = nv < 0 ? 0 : (nv > 8 ? 8 : nv);
      if (id < 0 || tok0 + 8 <= lo) nv = 0;
      v_bytes[c] = int(nv) * int(sizeof(T));
    }
#pragma unroll
    for (int i = 0; i < 2 * D / 32; ++i) {
      const int d = v_chunk_major ? (i * 32) % D + lane : i * 16 + (lane >> 1);
      const int c = v_chunk_major ? (i * 32) / D : lane & 1;
      const int nbytes = c ? v_bytes[1] : v_bytes[0];
      const T* src = nbytes > 0 ? vb + (c ? v_off[1] : v_off[0]) + d * p.cs.v_sd : vc;
      mma::cp_async_16(vs + mmadec::vswz(d, c), src, nbytes);
    }
  };
  auto issue = [&](int n) {  // n = 0, 1, 2, ... in order
    const int64_t ts = tile_start(part0, n);
    if (hi <= lo || ts >= hi) return;
    if ((n & 31) == 0 && n > 0) ids = ids_next, ids_next = fetch_ids(part0, n + 32);
    const int32_t id = __shfl_sync(0xffffffffu, ids, n & 31);
    if (lane == 0) ok_ring[warp][n % NST] = id >= 0;
    const int in_off = int(ts % bsz);
    T* ks = my_pipe + (n % NST) * Tr::kStageElems;
    T* vs = ks + Tr::kTileElems;
    const T* kb = kh + int64_t(id < 0 ? 0 : id) * p.cs.k_sb;
    const T* vb = vh + int64_t(id < 0 ? 0 : id) * p.cs.v_sb;
    if constexpr (kSw128) {
#if ATTNKIT_HAS_NHD_TMA
      // The whole tile (its 16 rows lie in one valid block: block sizes are multiples of 16);
      // rows outside [lo, hi) are zeroed after landing, as below.
      if (lane == 0) {
        uint64_t* bar = &full[warp][n % NST];
        bulk::arrive_expect_tx(bar, id >= 0 ? 2u * TILE * D * sizeof(T) : 0u);
        if (id >= 0) {
#pragma unroll
          for (int c = 0; c < D / 64; ++c) {
            tma::load_4d(ks + c * TILE * 64, map_k, c * 64, int(hk), in_off, id, bar);
            tma::load_4d(vs + c * TILE * 64, map_v, c * 64, int(hk), in_off, id, bar);
          }
        }
      }
#endif
    } else if constexpr (kBulk) {
      if (lane == 0) {
        uint64_t* bar = &full[warp][n % NST];
        bulk::arrive_expect_tx(bar, id >= 0 ? 2u * Tr::kTileElems * sizeof(T) : 0u);
        if (id >= 0) {
          const T* k0 = kb + int64_t(in_off) * 8;  // token stride 8 (bulk_eligible)
          if (p.cs.k_sdc == TILE * 8) {
            bulk::copy(ks, k0, Tr::kTileElems * sizeof(T), bar);
          } else {
            for (int c = 0; c < D / 8; ++c) {
              bulk::copy(ks + c * TILE * 8, k0 + c * p.cs.k_sdc, TILE * 16, bar);
            }
          }
          // ASM: token chunks in_off / 8 and the next are adjacent; vLLM (block size 16): the block.
          bulk::copy(vs, vb + int64_t(in_off / p.cs.v_tx) * p.cs.v_stc, Tr::kTileElems * sizeof(T), bar);
        }
      }
    } else {
      issue_cp_async(ts, id, in_off, kb, vb, ks, vs);
    }
  };

  // Put the first tiles in flight, then stage Q while they travel.
#pragma unroll
  for (int s = 0; s < NST - 1; ++s) {
    issue(s);
    if constexpr (!kBulk) mma::cp_async_commit();
  }

  // Q rows hk*G .. hk*G + G - 1 of token q0 -> q_s (zeros below), any strides.
  {
    const T* q = static_cast<const T*>(p.q) + qtok * p.q_st + hk * G * p.q_sh;
    for (int idx = tid; idx < 16 * D; idx += Tr::kThreads) {
      const int r = idx / D, d = idx % D;
      q_s[mmadec::kswz<D>(r, d & ~7) + (d & 7)] = r < G ? q[r * p.q_sh + d * p.q_sd] : from_float<T>(0.0f);
    }
  }
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    mma::ldmatrix_x4(qf[kk], q_s + mmadec::kswz<D>((lane & 7) + ((lane >> 3) & 1) * 8,
                                                  kk * 16 + (lane >> 4) * 8));

  // The two rows this thread's accumulators sit on: g and g + 8.
  const int r0 = lane >> 2, r1 = r0 + 8;
  const float slope0 = (p.alibi && r0 < G) ? p.alibi[hk * G + r0] : 0.0f;
  const float slope1 = (p.alibi && r1 < G) ? p.alibi[hk * G + r1] : 0.0f;

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // log2 domain

  for (int n = 0; hi > lo && tile_start(part0, n) < hi; ++n) {
    issue(n + NST - 1);
    if constexpr (kBulk) {
      bulk::wait(&full[warp][n % NST], uint32_t(n / NST) & 1u);
    } else {
      mma::cp_async_commit();
      mma::cp_async_wait<NST - 1>();
      __syncwarp();
    }

    const int64_t ts = tile_start(part0, n);
    const bool blk_ok = ok_ring[warp][n % NST] != 0;
    T* ks = my_pipe + (n % NST) * Tr::kStageElems;
    T* vs = ks + Tr::kTileElems;
    if constexpr (!kBulk && !kNhd) {
      if (blk_ok && ts < lo) {
        // A V chunk of 8 tokens is read whole once it reaches the window, so the tokens before
        // lo in the window's first chunk came in too (they may hold anything, NaN included):
        // zero them, since their zero probabilities must not meet them.
        for (int i = lane; i < 8 * D; i += 32) {
          const int t = i % 8 + int((lo - ts) / 8) * 8, d = i / 8;
          if (t < TILE && ts + t < lo) vs[mmadec::vswz(d, t >> 3) + (t & 7)] = from_float<T>(0.0f);
        }
        __syncwarp();
      }
    }
    if constexpr (kBulk) {
      if (!blk_ok) continue;  // nothing was copied; every score would be masked
      if (ts < lo || ts + TILE > hi) {
        // Whole tiles were copied: zero the V rows of tokens outside [lo, hi) (they may hold
        // anything, NaN included, and their zero probabilities must not meet them).
        for (int i = lane; i < TILE * D; i += 32) {
          const int t = i % TILE, d = i / TILE;
          if (ts + t < lo || ts + t >= hi) {
            if constexpr (kNhd) {
              vs[mmadec::sw128(t, d)] = from_float<T>(0.0f);
            } else {
              vs[mmadec::vbulk<D>(v_chunk_major, d, t >> 3) + (t & 7)] = from_float<T>(0.0f);
            }
          }
        }
        bulk::fence_proxy_async();  // these writes precede the copy engine's next refill
        __syncwarp();
      }
    }

    float sacc[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t bf[4];
      const int krow = (lane & 7) + (lane >> 4) * 8, kcol = kk * 16 + ((lane >> 3) & 1) * 8;
      mma::ldmatrix_x4(bf, ks + (kBulk ? (kNhd ? mmadec::sw128(krow, kcol) : mmadec::kbulk(krow, kcol))
                                       : mmadec::kswz<D>(krow, kcol)));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma::mma_16816<T>(sacc[0], qf[kk], b0);
      mma::mma_16816<T>(sacc[1], qf[kk], b1);
    }

    // Logits (scale, soft-cap, ALiBi, masks) in the C layout, then the running softmax.
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t tok = ts + nt * 8 + (lane & 3) * 2 + (e & 1);
        const bool vis = blk_ok && tok >= lo && tok < hi;
        const float sl = e < 2 ? slope0 : slope1;
        const float s = vis ? finish_logit(sacc[nt][e], p.scale, p.softcap, sl, tok, qpos) * kLog2e
                            : -INFINITY;
        sacc[nt][e] = s;
        if (e < 2) mx0 = fmaxf(mx0, s);
        else mx1 = fmaxf(mx1, s);
      }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
    const float f0 = exp2f(m0 - base0), f1 = exp2f(m1 - base1);  // m = -inf -> 0
    m0 = mn0, m1 = mn1;
    float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      sacc[nt][0] = exp2f(sacc[nt][0] - base0);
      sacc[nt][1] = exp2f(sacc[nt][1] - base0);
      sacc[nt][2] = exp2f(sacc[nt][2] - base1);
      sacc[nt][3] = exp2f(sacc[nt][3] - base1);
      ps0 += sacc[nt][0] + sacc[nt][1];
      ps1 += sacc[nt][2] + sacc[nt][3];
    }
    l0 = l0 * f0 + ps0;
    l1 = l1 * f1 + ps1;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] *= f0, o[i][1] *= f0, o[i][2] *= f1, o[i][3] *= f1;

    uint32_t pa[4];
    pa[0] = mma::pack2<T>(sacc[0][0], sacc[0][1]);
    pa[1] = mma::pack2<T>(sacc[0][2], sacc[0][3]);
    pa[2] = mma::pack2<T>(sacc[1][0], sacc[1][1]);
    pa[3] = mma::pack2<T>(sacc[1][2], sacc[1][3]);
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t bf[4];
      if constexpr (kNhd) {
        // V [16 tokens][D] token-major: the transposed 8x8 loads are the B fragments
        // (matrices: tokens 0-7 / 8-15 of dims np*16 + 0..7, then of dims + 8..15).
        const int vtok = (lane & 7) + ((lane >> 3) & 1) * 8, vcol = np * 16 + (lane >> 4) * 8;
        mma::ldmatrix_x4_trans(bf, vs + (kBulk ? mmadec::sw128(vtok, vcol) : mmadec::kswz<D>(vtok, vcol)));
      } else {
        const int vrow = np * 16 + (lane & 7) + (lane >> 4) * 8, vchunk = (lane >> 3) & 1;
        mma::ldmatrix_x4(bf, vs + (kBulk ? mmadec::vbulk<D>(v_chunk_major, vrow, vchunk)
                                         : mmadec::vswz(vrow, vchunk)));
      }
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma::mma_16816<T>(o[2 * np], pa, b0);
      mma::mma_16816<T>(o[2 * np + 1], pa, b1);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  if constexpr (!kBulk) mma::cp_async_wait<0>();
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  __syncthreads();  // every warp is out of its ring: the buffers become the merge area

  float* red_o = reinterpret_cast<float*>(pipe);        // [4][16][D]
  float* red_ml = red_o + Tr::kWarps * 16 * D;          // [4][16][2]
  {
    float* ow = red_o + warp * 16 * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int col = i * 8 + (lane & 3) * 2;
      *reinterpret_cast<float2*>(ow + r0 * D + col) = make_float2(o[i][0], o[i][1]);
      *reinterpret_cast<float2*>(ow + r1 * D + col) = make_float2(o[i][2], o[i][3]);
    }
    if ((lane & 3) == 0) {
      float* mlw = red_ml + warp * 32;
      mlw[r0 * 2] = m0, mlw[r0 * 2 + 1] = l0;
      mlw[r1 * 2] = m1, mlw[r1 * 2 + 1] = l1;
    }
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out);
  const int64_t tok = qtok;
  for (int idx = tid; idx < G * D; idx += Tr::kThreads) {
    const int r = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int wi = 0; wi < Tr::kWarps; ++wi) M = fmaxf(M, red_ml[wi * 32 + r * 2]);
    float l = 0.0f, acc = 0.0f;
#pragma unroll
    for (int wi = 0; wi < Tr::kWarps; ++wi) {
      const float mw = red_ml[wi * 32 + r * 2];
      const float f = mw == -INFINITY ? 0.0f : exp2f(mw - M);
      l += f * red_ml[wi * 32 + r * 2 + 1];
      acc += f * red_o[(wi * 16 + r) * D + d];
    }
    const int64_t h = hk * G + r;
    if (splits == 1) {
      out[tok * p.o_st + h * p.o_sh + d * p.o_sd] = from_float<T>(l > 0.0f ? acc / l : 0.0f);
      if (d == 0 && p.lse) {  // natural log: M is in the log2 domain
        p.lse[h * p.lse_sh + tok * p.lse_st] = l > 0.0f ? M * (1.0f / kLog2e) + logf(l) : -INFINITY;
      }
    } else {
      const int64_t ws_row = (tok * p.Hq + h) * splits + split;
      p.ws_out[ws_row * D + d] = acc;
      if (d == 0) {
        p.ws_ml[ws_row * 2] = M == -INFINITY ? -INFINITY : M * (1.0f / kLog2e);  // natural log
        p.ws_ml[ws_row * 2 + 1] = l;
      }
    }
  }
#endif  // ATTNKIT_HAS_MMA_SM80
}

template <typename T, int D, int BS, bool kBulk, bool kNhd = false>
__global__ void __launch_bounds__(MmaDecodeTraits<D>::kThreads)
    paged_decode_mma_kernel(const DecodeParams p) {
  static_assert(!(kBulk && kNhd), "NHD bulk tiles take the tensor-map kernel");
  decode_mma_body<T, D, BS, kBulk, kNhd>(p, nullptr, nullptr);
}

#if ATTNKIT_HAS_NHD_TMA
// NHD caches through tensor maps (sm_90): maps over {D, Hkv, block_size, num_blocks}, boxes
// {64, 1, 16, 1}, 128-byte swizzle (built by the launcher; csrc/cuda/tma_map.h).
template <typename T, int D>
__global__ void __launch_bounds__(MmaDecodeTraits<D, true>::kThreads)
    paged_decode_mma_nhd_tma_kernel(const DecodeParams p, const __grid_constant__ CUtensorMap map_k,
                                    const __grid_constant__ CUtensorMap map_v) {
  decode_mma_body<T, D, 0, true, true>(p, &map_k, &map_v);
}
#endif

}  // namespace paged
}  // namespace attnkit
