// GDPA forward on tensor cores (bf16 / fp16, sm_80+): one CTA per (sequence, query tile, head).
// Each warp owns 16 query rows. K/V tiles stream through double-buffered shared memory with
// cp.async; S = Q·Kᵀ stays in registers, becomes P = φ(pre·S) (masked, rounded to the value type)
// and feeds O += P·V straight from the accumulators. Scores never reach global memory.
#pragma once

#include "kernels/gdpa/activation_gpu.cuh"
#include "kernels/gdpa/params.h"
#include "kernels/gdpa/tile.cuh"

namespace attnkit {
namespace gdpa {

// Tile shapes per padded head dim. A warp owns kMTiles m16 tiles (32 query rows for D <= 128): each
// K/V fragment read from shared memory then feeds two products, halving shared-memory traffic per
// FLOP; D = 256 keeps one tile per warp to stay within 255 registers.
// (Measured on H100, bench_gdpa D=128: one m16 tile per warp with 4 CTAs/SM under a 128-register
// cap was 5-10% slower than this layout.)
template <int D>
struct FwdTraits {
  static constexpr int kWarps = 4;
  static constexpr int kMTiles = D <= 128 ? 2 : 1;
  static constexpr int kBlockN = 32;
  static constexpr int kBlockM = 16 * kMTiles * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSmemBytes = (kBlockM * D + 4 * kBlockN * D) * 2;
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdTraits<D>::kThreads) gdpa_fwd_mma_kernel(const FwdParams p) {
#if ATTNKIT_HAS_MMA_SM80
  using Tr = FwdTraits<D>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, NT = Tr::kThreads, MT = Tr::kMTiles;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + BM * D;      // [2][BN][D]
  T* sv = sk + 2 * BN * D;  // [2][BN][D]

  const CtaItem it = cta_item(p.H, p.B);
  const int b = it.b, h = it.z, hk = h / (p.H / p.Hkv);
  const int warp_row0 = (threadIdx.x / 32) * 16 * MT;  // the warp's first query row in the tile
  const SeqRange qs = seq_range(p.q_offsets, b, p.Tq);
  const SeqRange ks = seq_range(p.kv_offsets, b, p.Tk);
  const T* q = static_cast<const T*>(p.q) + qs.begin * p.q_row_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + ks.begin * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + ks.begin * p.v_row_stride + hk * p.v_head_stride;
  T* out = static_cast<T*>(p.out) + qs.begin * p.o_row_stride + h * p.o_head_stride;
  const T* fallback = static_cast<const T*>(p.q);

  // Hints only size the grid: a longer sequence is covered by striding over its tiles.
  for (int tile = it.tile; tile * BM < qs.len; tile += it.tiles) {
    const int i0 = tile * BM;
    // The keys some row of the tile sees (causal / window), from kv.lo.
    const KvTiles<T, BN, D, NT, FwdParams> kv(p, k, v, i0, min(i0 + BM, qs.len) - 1, ks.len);
    float acc_o[MT][D / 8][4];
    zero_frags(acc_o);

    load_tile<BM, D, NT>(sq, q + i0 * p.q_row_stride, p.q_row_stride, qs.len - i0, p.D, fallback);
    kv.load_first(sk, sv);

    for (int j = 0; j < kv.n_tiles; ++j) {
      const int j0 = j * BN;
      const T* skj = kv.buf(sk, j);
      const T* svj = kv.buf(sv, j);
      mma::cp_async_wait<1>();  // K[j] (and Q) landed; V[j] may still be in flight
      __syncthreads();
      float s[MT][BN / 8][4];
      zero_frags(s);
      warp_gemm_nt<T, MT, BN, D>(s, sq, warp_row0, skj, p.D);
      // Buffer (j+1)&1 held K[j-1], which every warp finished before the barrier above.
      if (j + 1 < kv.n_tiles) kv.load_k(sk, j + 1);
      mma::cp_async_commit();  // possibly empty: keeps the group count uniform for the waits

      uint32_t pa[MT][BN / 16][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        act_fwd_tile<BN / 8>(s[m], p.act, p.pre_scale);
        const int r0 = i0 + warp_row0 + m * 16;
        const int c0 = kv.lo + j0;
        if (!tile_fully_visible(p.causal, p.window, r0, r0 + 15, c0, c0 + BN - 1)) {
          window_mask<false>(s[m], r0, c0, p.causal, p.window);
        }
        pack_a<T, BN>(pa[m], s[m]);  // P rounded to the value type (DESIGN §3.1)
      }

      mma::cp_async_wait<1>();  // V[j] landed
      __syncthreads();
      warp_gemm_rn<T, MT, BN, D, D>(acc_o, pa, svj, 0, p.D);
      if (j + 1 < kv.n_tiles) kv.load_v(sv, j + 1);
      mma::cp_async_commit();
    }
    mma::cp_async_wait<0>();
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      store_rows<T, D>(out + i0 * p.o_row_stride, p.o_row_stride, warp_row0 + m * 16, qs.len - i0,
                       0, p.D, acc_o[m], p.qk_scale);
    }
    __syncthreads();  // the next tile reuses every shared buffer
  }
#endif
}

template <typename T, int D>
cudaError_t launch_gdpa_fwd_mma(const FwdParams& p, int max_seq_len_q, cudaStream_t stream) {
  using Tr = FwdTraits<D>;
  auto kernel = gdpa_fwd_mma_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const unsigned grid = cta_grid((int64_t(max_seq_len_q) + Tr::kBlockM - 1) / Tr::kBlockM, p.H, p.B);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace gdpa
}  // namespace attnkit
