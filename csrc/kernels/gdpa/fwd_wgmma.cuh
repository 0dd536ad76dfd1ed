// GDPA forward on Hopper warpgroup tensor cores (sm_90a, bf16 / fp16, padded head dim 64 or 128).
//
// CTA = (sequence, 128-row query tile, head) with two warpgroups of 64 query rows each. Q stays in
// shared memory; K/V tiles of 128 keys stream through a three-stage cp.async ring in the sw128
// layout, ordered by mbarriers rather than CTA barriers (wgmma::CpAsyncRing), so the warpgroups
// drift apart instead of taking turns in lockstep. Per key tile j each warpgroup issues, back to back,
//   S_j[64 x 128] = Q·K_jᵀ               wgmma, A and B from shared memory (K-major)
//   O[64 x D]   += P_{j-1}·V_{j-1}       wgmma, A = P from registers, B = V read N-major
// then waits for S_j only and computes P_j = φ(pre·S_j) (causal-masked, rounded to the value type,
// DESIGN §3.1) while the tensor cores still work on P_{j-1}·V_{j-1}: the activation hides behind
// the second product, and the two warpgroups interleave besides. Scores never leave registers.
// Keys past the sequence are zero-filled (K and V), so they add nothing.
#pragma once

#include "kernels/common/wgmma.cuh"
#include "kernels/gdpa/activation_gpu.cuh"
#include "kernels/gdpa/params.h"
#include "kernels/gdpa/tile.cuh"

namespace attnkit {
namespace gdpa {

template <int D>
struct FwdWgmmaTraits {
  static_assert(D == 64 || D == 128, "wgmma forward: padded head dim 64 or 128");
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBlockM = 64 * kWarpGroups;
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 3;  // P·V of tile j-1 reads its stage while tile j+1 loads
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kKVBytes = kBlockN * D * 2;  // one K or V tile
  // + 1 KB so the tiles can start 1024-byte aligned whatever the dynamic base is.
  static constexpr int kSmemBytes = 1024 + kQBytes + 2 * kStages * kKVBytes;
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdWgmmaTraits<D>::kThreads, 1)
    gdpa_fwd_wgmma_kernel(const FwdParams p) {
#if ATTNKIT_HAS_WGMMA
  using Tr = FwdWgmmaTraits<D>;
  using Mma = wgmma::Wgmma<T, Tr::kBlockN>;  // S = Q·Kᵀ: N = key tile
  using MmaO = wgmma::Wgmma<T, D>;           // O += P·V: N = head dim
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, NT = Tr::kThreads;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* sq = smem;
  unsigned char* sk = sq + Tr::kQBytes;                 // [kStages] K tiles
  unsigned char* sv = sk + Tr::kStages * Tr::kKVBytes;  // [kStages] V tiles
  const uint32_t sq_addr = mma::smem_addr(sq), sk_addr = mma::smem_addr(sk),
                 sv_addr = mma::smem_addr(sv);

  const int tid = threadIdx.x, wg = tid / 128;
  const int warp_row0 = wg * 64 + ((tid / 32) & 3) * 16;  // the warp's first row in the tile
  const CtaItem it = cta_item(p.H, p.B);
  const int b = it.b, h = it.z, hk = h / (p.H / p.Hkv);
  const SeqRange qs = seq_range(p.q_offsets, b, p.Tq);
  const SeqRange ks = seq_range(p.kv_offsets, b, p.Tk);
  const T* q = static_cast<const T*>(p.q) + qs.begin * p.q_row_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + ks.begin * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + ks.begin * p.v_row_stride + hk * p.v_head_stride;
  T* out = static_cast<T*>(p.out) + qs.begin * p.o_row_stride + h * p.o_head_stride;
  const T* fallback = static_cast<const T*>(p.q);

  __shared__ uint64_t bars[2 * Tr::kStages];
  const wgmma::CpAsyncRing<Tr::kStages> ring{bars, bars + Tr::kStages};
  if (tid == 0) ring.init(NT);
  __syncthreads();
  uint32_t g = 0;  // key tiles this CTA has streamed through the ring so far

  // Tile t of the current query tile's keys -> ring slot g + t (K and V; Q rides with t = 0).
  auto produce = [&](int i0, int kv_end, int t, uint32_t slot) {
    ring.producer_acquire(slot);
    const int stage = slot % Tr::kStages, rows = kv_end - t * BN;
    if (t == 0) {
      wgmma::load_tile_sw128<BM, D, NT>(sq, q + i0 * p.q_row_stride, p.q_row_stride, qs.len - i0,
                                        p.D, fallback, tid);
    }
    wgmma::load_tile_sw128<BN, D, NT>(sk + stage * Tr::kKVBytes, k + t * BN * p.k_row_stride,
                                      p.k_row_stride, rows, p.D, fallback, tid);
    wgmma::load_tile_sw128<BN, D, NT>(sv + stage * Tr::kKVBytes, v + t * BN * p.v_row_stride,
                                      p.v_row_stride, rows, p.D, fallback, tid);
    ring.producer_commit(slot);
  };

  // Hints only size the grid: a longer sequence is covered by striding over its tiles.
  for (int tile = it.tile; tile * BM < qs.len; tile += it.tiles) {
    const int i0 = tile * BM;
    const int kv_end = p.causal ? min(ks.len, i0 + BM) : ks.len;
    const int n_tiles = (kv_end + BN - 1) / BN;
    if (n_tiles == 0) continue;  // no keys: the launcher zero-filled the output
    float acc_o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;

    produce(i0, kv_end, 0, g);
    uint32_t pa[BN / 16][4];  // P_{j-1}, the A operand of the delayed P·V
    for (int j = 0; j < n_tiles; ++j) {
      const int j0 = j * BN;
      const uint32_t slot = g + j;
      // Tile j + 1 goes into the stage tile j - 2 used, once both warpgroups released it.
      if (j + 1 < n_tiles) produce(i0, kv_end, j + 1, slot + 1);
      ring.consumer_wait(slot);

      float s[BN / 8][4];
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        Mma::template ss<0>(s, wgmma::desc_k_major<BM>(sq_addr, wg * 64, kk),
                            wgmma::desc_k_major<BN>(sk_addr + (slot % Tr::kStages) * Tr::kKVBytes, 0, kk),
                            kk > 0);
      }
      wgmma::commit();
      if (j > 0) {
        const uint32_t sv_prev = sv_addr + ((slot - 1) % Tr::kStages) * Tr::kKVBytes;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          MmaO::template rs<1>(acc_o, pa[kk], wgmma::desc_n_major<BN>(sv_prev, kk), 1);
        }
        wgmma::commit();
        wgmma::wait<1>();  // S_j done; P_{j-1}·V_{j-1} may still run
      } else {
        wgmma::wait<0>();
      }
      wgmma::fence_regs(s);

      act_fwd_tile<BN / 8>(s, p.act, p.pre_scale);
      const int r0 = i0 + warp_row0;
      if (p.causal && j0 + BN - 1 > r0) causal_mask<false>(s, r0, j0);
      wgmma::wait<0>();  // P_{j-1}·V_{j-1} done: pa may be overwritten, tile j - 1 released
      wgmma::fence_regs(acc_o);
      if (j > 0) ring.consumer_release(slot - 1);
      pack_a<T, BN>(pa, s);  // P rounded to the value type (DESIGN §3.1)
    }
    const uint32_t last = g + n_tiles - 1;
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      MmaO::template rs<1>(acc_o, pa[kk],
                           wgmma::desc_n_major<BN>(sv_addr + (last % Tr::kStages) * Tr::kKVBytes, kk), 1);
    }
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_regs(acc_o);
    ring.consumer_release(last);
    g += n_tiles;
    store_rows<T, D>(out + i0 * p.o_row_stride, p.o_row_stride, warp_row0, qs.len - i0, 0, p.D,
                     acc_o, p.qk_scale);
    __syncthreads();  // the next query tile overwrites Q
  }
#endif
}

template <typename T, int D>
cudaError_t launch_gdpa_fwd_wgmma(const FwdParams& p, int max_seq_len_q, cudaStream_t stream) {
  using Tr = FwdWgmmaTraits<D>;
  auto kernel = gdpa_fwd_wgmma_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const unsigned grid = cta_grid((max_seq_len_q + Tr::kBlockM - 1) / Tr::kBlockM, p.H, p.B);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace gdpa
}  // namespace attnkit
