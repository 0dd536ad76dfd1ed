// GDPA forward on Hopper, warp-specialised (sm_90a, bf16 / fp16, padded head dim 128). Opt-in
// (ATTNKIT_GDPA_FWD_WS, csrc/cuda/gdpa.cu) until validated on a GPU; fwd_wgmma.cuh stays the
// default. Same math as fwd_wgmma.cuh; what changes is who moves the data.
//
// CTA = (sequence, 128-row query tile, head), 384 threads = 3 warpgroups:
//   warpgroup 0, producer: gives its registers back (setmaxnreg.dec to 24) and one thread issues
//     every load as a tensor-map copy (kernels/common/tma.cuh): Q once per query tile, then K_j
//     and V_j per key tile into a kStages ring. Each 128 x 128 tile is two boxes of
//     [128 rows][1 head][64 cols] that land in the two 64-column blocks of the sw128 layout
//     (the 128-byte hardware swizzle), so no thread computes a load address or spins per copy.
//   warpgroups 1-2, consumers: take the registers (setmaxnreg.inc to 240), 64 query rows each,
//     and per key tile j issue S_j = Q·K_jᵀ (ss) and then O += P_{j-1}·V_{j-1} (rs), wait for S_j
//     only, compute P_j = φ(pre·S_j) while the tensor cores run P_{j-1}·V_{j-1}, and pack P_j.
//     kPingPong = false: the two consumer warpgroups are not scheduled; they only meet once per
//     query tile (below), so they drift apart and their activations overlap the other's products
//     on their own. kPingPong = true (ATTNKIT_GDPA_FWD_WS_PINGPONG=1): FA3's scheme, two named
//     barriers (kTurnBar + warpgroup) pass a turn: a warpgroup issues its products for a key tile
//     only after the other one has issued its own (bar.sync on its barrier, then bar.arrive on
//     the other's), so the tensor cores alternate between the warpgroups while the one that just
//     issued computes its activation. Warpgroup 1 starts by arriving on warpgroup 0's barrier; both
//     take exactly one turn per key tile and one for the last P·V of a query tile, so the counts
//     always match; warpgroup 0 takes one more turn at the end to consume the last hand-over.
//     Which schedule is faster is for the GPU to say; both are tested.
//
// Barriers (mbarriers, kernels/common/bulk_copy.cuh): full_q / full_k[s] / full_v[s] complete
// when the producer's expect_tx bytes landed (K and V apart, so S_j can start before V_j lands);
// empty_q / empty_kv[s] complete when all 8 consumer warps released the tile (lane 0 of each
// warp arrives after its wgmma reads are done). Completion k of a barrier has parity k & 1:
// the consumers wait full[slot % kStages] with parity (slot / kStages) & 1; the producer waits
// empty for slot g >= kStages with parity (g / kStages - 1) & 1. Q counts query tiles the same way.
//
// Jagged sequences: a box starts at the sequence's first row of the tile, so rows past the end
// belong to the next sequence (or are zero-filled past T by the copy engine). Query rows past the
// end are computed and never stored (store_rows clamps). Keys past the end may be inf / NaN: on
// the last key tile P is zeroed for those columns after the activation, and the V rows are
// zeroed in shared memory (both consumer warpgroups, then fence.proxy.async and a named barrier
// before the last P·V), since 0 · NaN would still be NaN. Padded head dims (D < 128) are the
// map's extent: columns past D land as zeros. Causal masking as fwd_wgmma.cuh.
//
// Work items are fwd_wgmma.cuh's, in its order (cta_item: query tiles fastest, then heads, then
// sequences; an item strides over the tiles of a sequence longer than the hint), so the CTAs that
// read one sequence's K/V run together. The grid is persistent by default (one CTA per SM, each
// striding over the items with step gridDim.x; ATTNKIT_GDPA_FWD_WS_PERSISTENT=0 launches one CTA
// per item instead): the producer then loads the next item's Q, K and V while the consumers
// finish the current one, instead of every short CTA paying its start-up latency (L = 256 is two
// key tiles per item). Both roles walk the same items and tiles, so the barrier counts match.
#pragma once

#include <algorithm>

#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/common/wgmma.cuh"
#include "kernels/gdpa/activation_gpu.cuh"
#include "kernels/gdpa/params.h"
#include "kernels/gdpa/tile.cuh"

#if defined(__CUDACC__) && !defined(__HIPCC__) && !defined(USE_ROCM)
#include <cuda.h>
#if CUDA_VERSION >= 12000
#define ATTNKIT_HAS_FWD_WS 1  // CUtensorMap exists: the kernel and its launcher are declared
#endif
#endif
#ifndef ATTNKIT_HAS_FWD_WS
#define ATTNKIT_HAS_FWD_WS 0
#endif

#if ATTNKIT_HAS_FWD_WS

namespace attnkit {
namespace gdpa {

struct FwdWsTraits {
  static constexpr int kD = 128;
  static constexpr int kConsumerWarpGroups = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpGroups);
  static constexpr int kConsumerWarps = 4 * kConsumerWarpGroups;
  static constexpr int kBlockM = 64 * kConsumerWarpGroups;
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 3;  // P·V of tile j-1 reads its stage while tile j+1 loads
  static constexpr int kBoxRows = 128;
  static constexpr int kBoxCols = 64;                        // 128 bytes: one sw128 column block
  static constexpr int kBoxBytes = kBoxRows * kBoxCols * 2;  // what one copy counts off its barrier
  static constexpr int kTileBytes = 2 * kBoxBytes;           // a 128 x 128 Q, K or V tile
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;  // 128·24 + 256·240 <= 64K registers
  // Named barriers (0 is __syncthreads): the last V tile's zero fill, then one turn per consumer.
  static constexpr int kZeroBar = 1;
  static constexpr int kTurnBar = 2;
  // + 1 KB so the tiles can start 1024-byte aligned whatever the dynamic base is.
  static constexpr int kSmemBytes = 1024 + kTileBytes * (1 + 2 * kStages);
  static_assert(kBlockM == kBoxRows && kBlockN == kBoxRows && kD == 2 * kBoxCols, "one box shape");
};

// The tensor maps of q, k, v viewed as [T rows][heads][D] (innermost first {D, heads, T}), boxes
// {64, 1, 128} with the 128-byte swizzle; built by the launcher's caller (csrc/cuda/tma_map.h).
struct FwdWsMaps {
  CUtensorMap q, k, v;
};

template <typename T, bool kPingPong>
__global__ void __launch_bounds__(FwdWsTraits::kThreads, 1)
    gdpa_fwd_ws_kernel(const FwdParams p, const int q_tiles,
                       const __grid_constant__ CUtensorMap map_q,
                       const __grid_constant__ CUtensorMap map_k,
                       const __grid_constant__ CUtensorMap map_v) {
#if ATTNKIT_HAS_WGMMA
  using Tr = FwdWsTraits;
  using Mma = wgmma::Wgmma<T, Tr::kBlockN>;  // S = Q·Kᵀ: N = key tile
  using MmaO = wgmma::Wgmma<T, Tr::kD>;      // O += P·V: N = head dim
  constexpr int D = Tr::kD, BM = Tr::kBlockM, BN = Tr::kBlockN, S = Tr::kStages;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* sq = smem;
  unsigned char* sk = sq + Tr::kTileBytes;      // [kStages] K tiles
  unsigned char* sv = sk + S * Tr::kTileBytes;  // [kStages] V tiles

  __shared__ uint64_t bars[2 + 3 * S];
  uint64_t* full_q = bars;
  uint64_t* empty_q = bars + 1;
  uint64_t* full_k = bars + 2;
  uint64_t* full_v = full_k + S;
  uint64_t* empty_kv = full_v + S;

  const int tid = threadIdx.x;
  if (tid == 0) {
    bulk::init(full_q, 1);
    bulk::init(empty_q, Tr::kConsumerWarps);
    for (int s = 0; s < S; ++s) {
      bulk::init(full_k + s, 1);
      bulk::init(full_v + s, 1);
      bulk::init(empty_kv + s, Tr::kConsumerWarps);
    }
    bulk::fence_init();
  }
  __syncthreads();  // the last CTA-wide barrier: the roles below never meet all together again

  const int64_t items = int64_t(q_tiles) * p.H * p.B;
  const int group = p.H / p.Hkv;

  if (tid < 128) {  // producer warpgroup
    wgmma::setmaxnreg_dec<Tr::kProducerRegs>();
    if (tid != 0) return;
    tma::prefetch_map(&map_q);
    tma::prefetch_map(&map_k);
    tma::prefetch_map(&map_v);
    uint32_t g = 0, qn = 0;  // key tiles / query tiles this CTA has loaded so far
    for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
      const CtaItem it = cta_item_at(item, q_tiles, p.H);
      const int h = it.z, hk = h / group;
      const SeqRange qs = seq_range(p.q_offsets, it.b, p.Tq);
      const SeqRange ks = seq_range(p.kv_offsets, it.b, p.Tk);
      for (int tile = it.tile; tile * BM < qs.len; tile += it.tiles) {
        const int i0 = tile * BM;
        const int kv_end = p.causal ? min(ks.len, i0 + BM) : ks.len;
        const int n_tiles = (kv_end + BN - 1) / BN;
        if (n_tiles == 0) continue;  // the consumers skip it too
        if (qn > 0) bulk::wait(empty_q, (qn - 1) & 1);
        bulk::arrive_expect_tx(full_q, Tr::kTileBytes);
        tma::load_3d(sq, &map_q, 0, h, qs.begin + i0, full_q);
        tma::load_3d(sq + Tr::kBoxBytes, &map_q, Tr::kBoxCols, h, qs.begin + i0, full_q);
        ++qn;
        for (int t = 0; t < n_tiles; ++t) {
          const uint32_t slot = g + t, stage = slot % S;
          if (slot >= S) bulk::wait(empty_kv + stage, (slot / S - 1) & 1);
          const int row = ks.begin + t * BN;
          unsigned char* k_dst = sk + stage * Tr::kTileBytes;
          unsigned char* v_dst = sv + stage * Tr::kTileBytes;
          bulk::arrive_expect_tx(full_k + stage, Tr::kTileBytes);
          tma::load_3d(k_dst, &map_k, 0, hk, row, full_k + stage);
          tma::load_3d(k_dst + Tr::kBoxBytes, &map_k, Tr::kBoxCols, hk, row, full_k + stage);
          bulk::arrive_expect_tx(full_v + stage, Tr::kTileBytes);
          tma::load_3d(v_dst, &map_v, 0, hk, row, full_v + stage);
          tma::load_3d(v_dst + Tr::kBoxBytes, &map_v, Tr::kBoxCols, hk, row, full_v + stage);
        }
        g += n_tiles;
      }
    }
    return;
  }

  // Consumer warpgroups.
  wgmma::setmaxnreg_inc<Tr::kConsumerRegs>();
  const int ctid = tid - 128, wg = ctid / 128, lane = tid & 31;
  const int warp_row0 = wg * 64 + ((ctid / 32) & 3) * 16;  // the warp's first row in the tile
  const uint32_t sq_addr = mma::smem_addr(sq), sk_addr = mma::smem_addr(sk),
                 sv_addr = mma::smem_addr(sv);
  uint32_t g = 0, qn = 0;
  constexpr int kConsumerThreads = 128 * Tr::kConsumerWarpGroups;
  // Ping-pong: wait for this warpgroup's turn to issue products / hand the turn to the other.
  auto take_turn = [&] {
    if constexpr (kPingPong) wgmma::named_barrier_sync(Tr::kTurnBar + wg, kConsumerThreads);
  };
  auto pass_turn = [&] {
    if constexpr (kPingPong) wgmma::named_barrier_arrive(Tr::kTurnBar + (wg ^ 1), kConsumerThreads);
  };
  if (kPingPong && wg == 1) wgmma::named_barrier_arrive(Tr::kTurnBar, kConsumerThreads);  // 0 first

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const CtaItem it = cta_item_at(item, q_tiles, p.H);
    const int h = it.z;
    const SeqRange qs = seq_range(p.q_offsets, it.b, p.Tq);
    const SeqRange ks = seq_range(p.kv_offsets, it.b, p.Tk);
    T* out = static_cast<T*>(p.out) + qs.begin * p.o_row_stride + h * p.o_head_stride;
    for (int tile = it.tile; tile * BM < qs.len; tile += it.tiles) {
      const int i0 = tile * BM;
      const int kv_end = p.causal ? min(ks.len, i0 + BM) : ks.len;
      const int n_tiles = (kv_end + BN - 1) / BN;
      if (n_tiles == 0) continue;  // no keys: the launcher zero-filled the output
      float acc_o[D / 8][4];
#pragma unroll
      for (int i = 0; i < D / 8; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;

      bulk::wait(full_q, qn & 1);
      uint32_t pa[BN / 16][4];  // P_{j-1}, the A operand of the delayed P·V
      for (int j = 0; j < n_tiles; ++j) {
        const int j0 = j * BN;
        const uint32_t slot = g + j, stage = slot % S;
        bulk::wait(full_k + stage, (slot / S) & 1);

        float s[BN / 8][4];
        take_turn();
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          Mma::template ss<0>(s, wgmma::desc_k_major<BM>(sq_addr, wg * 64, kk),
                              wgmma::desc_k_major<BN>(sk_addr + stage * Tr::kTileBytes, 0, kk),
                              kk > 0);
        }
        wgmma::commit();
        if (j > 0) {
          const uint32_t prev = (slot - 1) % S;
          bulk::wait(full_v + prev, ((slot - 1) / S) & 1);
          const uint32_t sv_prev = sv_addr + prev * Tr::kTileBytes;
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            MmaO::template rs<1>(acc_o, pa[kk], wgmma::desc_n_major<BN>(sv_prev, kk), 1);
          }
          wgmma::commit();
          pass_turn();
          wgmma::wait<1>();  // S_j done; P_{j-1}·V_{j-1} may still run
        } else {
          pass_turn();
          wgmma::wait<0>();
        }
        wgmma::fence_regs(s);

        act_fwd_tile<BN / 8>(s, p.act, p.pre_scale);
        const int r0 = i0 + warp_row0;
        if (p.causal && j0 + BN - 1 > r0) causal_mask<false>(s, r0, j0);
        if (j0 + BN > ks.len) mask_cols_from(s, ks.len - j0);  // keys of the next sequence
        wgmma::wait<0>();  // P_{j-1}·V_{j-1} done: pa may be overwritten, tile j - 1 released
        wgmma::fence_regs(acc_o);
        if (j > 0 && lane == 0) bulk::arrive(empty_kv + (slot - 1) % S);
        pack_a<T, BN>(pa, s);  // P rounded to the value type (DESIGN §3.1)
      }
      // Every S of this query tile is done (the wait<0> above): Q may be replaced.
      if (lane == 0) bulk::arrive(empty_q);

      const uint32_t last = g + n_tiles - 1, ls = last % S;
      bulk::wait(full_v + ls, (last / S) & 1);
      unsigned char* sv_last = sv + ls * Tr::kTileBytes;
      const int v_rows = ks.len - (n_tiles - 1) * BN;  // V rows of this sequence in the last tile
      if (v_rows < BN) {
        // Rows [v_rows, BN) came from the next sequence: zero them (whole 128-byte rows of both
        // column blocks, so the swizzle does not matter), then make the writes visible to the
        // tensor cores of both consumer warpgroups.
        const int chunks = (BN - v_rows) * 2 * 8;  // 16-byte chunks
        for (int c = ctid; c < chunks; c += kConsumerThreads) {
          const int row = v_rows + c / 16, blk = (c / 8) & 1, chunk = c & 7;
          *reinterpret_cast<uint4*>(sv_last + blk * Tr::kBoxBytes + row * 128 + chunk * 16) =
              make_uint4(0, 0, 0, 0);
        }
        bulk::fence_proxy_async();
        wgmma::named_barrier_sync(Tr::kZeroBar, kConsumerThreads);
      }
      take_turn();
      wgmma::fence();
      const uint32_t sv_l = sv_addr + ls * Tr::kTileBytes;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        MmaO::template rs<1>(acc_o, pa[kk], wgmma::desc_n_major<BN>(sv_l, kk), 1);
      }
      wgmma::commit();
      pass_turn();
      wgmma::wait<0>();
      wgmma::fence_regs(acc_o);
      if (lane == 0) bulk::arrive(empty_kv + ls);
      g += n_tiles;
      ++qn;
      store_rows<T, D>(out + i0 * p.o_row_stride, p.o_row_stride, warp_row0, qs.len - i0, 0, p.D,
                       acc_o, p.qk_scale);
    }
  }
  // Ping-pong: warpgroup 1's last hand-over (or its first, when there was no work) is still
  // pending on warpgroup 0's barrier; take it so that no barrier is left half-arrived at exit.
  if (kPingPong && wg == 0) take_turn();
#endif
}

template <typename T>
cudaError_t launch_gdpa_fwd_ws(const FwdParams& p, const FwdWsMaps& maps, int max_seq_len_q,
                               bool ping_pong, bool persistent, cudaStream_t stream) {
  using Tr = FwdWsTraits;
  auto kernel = ping_pong ? gdpa_fwd_ws_kernel<T, true> : gdpa_fwd_ws_kernel<T, false>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const unsigned items = cta_grid((max_seq_len_q + Tr::kBlockM - 1) / Tr::kBlockM, p.H, p.B);
  const int q_tiles = static_cast<int>(items / (unsigned(p.H) * unsigned(p.B)));
  unsigned grid = items;
  if (persistent) {  // one CTA per SM (the shared memory allows no second one)
    int dev = 0, sms = 0;
    if ((err = cudaGetDevice(&dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
      return err;
    grid = std::min(items, static_cast<unsigned>(sms > 0 ? sms : 1));
  }
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, q_tiles, maps.q, maps.k, maps.v);
  return cudaGetLastError();
}

}  // namespace gdpa
}  // namespace attnkit

#endif  // ATTNKIT_HAS_FWD_WS
