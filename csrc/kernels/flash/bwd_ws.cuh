// Flash attention backward on Hopper, warp-specialised (sm_90a, bf16 / fp16, head dim 64 or 128).
// The sm90 kernel of choose.h: the backward on a 9.0 device of an sm_90a build (the launcher
// copies an input its tensor maps cannot address; the sm80 pair in deterministic mode). The
// atomic-dQ organisation of mma_bwd.cuh (FlashAttention-2 / -3: its step order, window bounds
// and masks) with wgmma products, the data moved by a producer warpgroup as in the
// warp-specialised forwards (flash/fwd_ws.cuh, gdpa/fwd_ws.cuh):
//
// CTA = (128-key tile, kv head, sequence; cta_start's order, the tiles stride over the grid's),
// 384 threads:
//   warpgroup 0, producer: gives its registers back (setmaxnreg.dec to 24).
//     Thread 0 loads K and V of each key tile (once per tile, counted off full_kv) and the Q tile
//     of every step into the step ring; warp 1 (all 32 lanes) writes the step's lse and delta
//     rows into the ring with plain loads / stores (64 fp32 each: the rows are not 16-byte aligned
//     in general, so no bulk copy) and its lane 0 loads the dO tile. Every tile is a tensor-map
//     copy of 64-row x 64-column sw128 boxes of a 4-D map {D, H, S, B} (kernels/common/tma.cuh):
//     batched boxes never read across a batch (rows >= S land as zeros); varlen maps have B = 1
//     and rows past a sequence's end are the next sequence's (or zeros past the total).
//   warpgroups 1-2, consumers: take the registers (setmaxnreg.inc to 240) and run the step:
//     warpgroup w owns keys w*64 .. +63 with dK / dV (64 x D fp32 each) in registers; a step is
//     BM queries (64 at D = 128, 128 at D = 64: BwdWsTraits::kBM says why):
//       S^T  = K_w Q^T,  dP^T = V_w dO^T   ss, M = 64 keys, N = BM queries, K = head dim
//       P^T, dS^T elementwise               (bwd_scores.cuh: masks, scale and softcap's
//                                           derivative folded in; at D = 128 without softcap
//                                           P^T is computed while dP^T runs and dS^T while dV
//                                           runs, else both before dV: kLateDv)
//       dV += P^T dO                        rs: P^T packed from the accumulators into A
//                                           fragments, B = dO read N-major
//       dS^T -> shared [128 keys][BM queries] (double-buffered, named barrier 1 over the 256
//                                           consumer threads)
//       dQ[64 q, 64 cols] = dS K            ss over all 128 keys, A = dS^T read M-major
//                                           (transposed A), B = K N-major; warpgroup w takes
//                                           columns w*64 .. +63 (D = 128) or query rows
//                                           w*64 .. +63 (D = 64)
//       dK += dS^T Q                        rs, issued after dQ (FlashAttention-3's order)
//     then, while dK runs, dQ goes into the warpgroup's staging buffer and one of its threads adds
//     it into the zero-filled fp32 workspace with tensor reductions (ws_bwd.cuh's DqStage; the
//     copy engine carries it, the consumers go on). The order of the additions varies run to
//     run, like mma_bwd's atomic dQ; deterministic mode keeps the sm80 pair.
//
// Barriers (kernels/common/ws_bwd.cuh's Ring, the skeleton shared with gdpa/bwd_ws.cuh; mbarriers
// of kernels/common/bulk_copy.cuh, completion k has parity k & 1):
//   full_kv: 1 arrival (thread 0) + the K and V bytes;  empty_kv: the 8 consumer warps, after a
//     tile's last dQ (its last reader of K);
//   full[s]: 33 arrivals (thread 0 with the Q bytes, the 32 lanes of warp 1 after their lse /
//     delta stores; its lane 0 announced the dO bytes with expect_tx before issuing them);  empty[s]: the 8 consumer warps, once dV and dK of
//     the step are complete (the last readers of Q, dO, lse, delta).
// Every role walks the same (tile, step) sequence from the kernel's arguments, so no work units
// are handed over; a tile whose keys no query sees (no steps) loads nothing and stores dK = dV = 0.
//
// Rows of another sequence (varlen only: batched boxes read zeros there) must not reach the
// products: Q / dO rows past the sequence's end and K / V rows past it may be inf / NaN, and the
// elementwise masks select P^T = 0 but dS^T = P^T (dP^T - delta) and the products P^T dO,
// dS^T Q, dS K multiply them. So the consumers zero those rows in shared memory before use (each
// warpgroup all of them, whole 128-byte rows, as the flash forward zeroes V tails: the other
// warpgroup writes the same zeros), and lse / delta of rows past the step's last query are 0.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/portability.h"
#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/fast_math.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/common/wgmma.cuh"
#include "kernels/common/ws_bwd.cuh"
#include "kernels/flash/launch_options.h"
#include "kernels/flash/mma_bwd.cuh"
#include "kernels/flash/params.h"
#include "kernels/flash/bwd_scores.cuh"

#define ATTNKIT_HAS_BWD_WS ATTNKIT_HAS_TENSOR_MAPS  // the kernel and its launcher are declared

#if ATTNKIT_HAS_BWD_WS

namespace attnkit {
namespace flash {
namespace ws {

template <int kD>
struct BwdWsTraits {
  static_assert(kD == 64 || kD == 128, "warp-specialised backward: head dim 64 or 128");
  static constexpr int kThreads = 384;         // producer + 2 consumer warpgroups
  static constexpr int kConsumerThreads = 256;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kBN = 128;  // keys per CTA (64 per consumer warpgroup)
  // Query rows per step. D = 64: 128 (FlashAttention-3's tile). At 64 queries the ss products
  // S^T, dP^T and dQ read shared memory as fast as it delivers (one m64n64k16 reads 4 KB in the
  // 32 clocks of its math); at N = 128, S^T and dP^T read 6 KB per 64 clocks (performance.md,
  // fifteenth session). D = 128 keeps 64: 128 would not fit the registers beside dK / dV.
  static constexpr int kBM = kD == 64 ? 128 : 64;
  static constexpr int kStages = kD == 64 ? 2 : 3;  // Q / dO / lse / delta ring
  static constexpr int kBoxRows = 64;  // rows of a map box (64 columns: one sw128 block)
  static constexpr int kKVBytes = kBN * kD * 2;              // K or V
  static constexpr int kQBytes = kBM * kD * 2;               // Q or dO, one stage
  static constexpr int kDsBytes = kBN * kBM * 2;             // dS^T, one buffer
  static constexpr int kQBoxes = kBM / kBoxRows;             // map boxes per column block
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;  // 128·24 + 256·240 <= 64K registers
  static constexpr int kDsBar = 1;    // named barrier over the consumers (0 is __syncthreads)
  // dQ of a step is 64 x 64 per warpgroup over all 128 keys: the CTA's sum over its keys is
  // added into the workspace once. (Sixteenth session: at D = 64 each warpgroup adding dQ over
  // its own 64 keys, which needs no barrier between them, doubled the reduce traffic and ran
  // 13-15% slower: the L2's reductions, not the products, bounded it.) Both warpgroups read all
  // of dS^T, so one may write step n + 1's rows while the other still reads step n's: two dS^T
  // buffers, and a barrier over both per step.
  static constexpr int kDsBuffers = 2;
  // P^T and dS^T both computed before dV is issued (P^T still under dP^T without softcap). With
  // 128-query steps P^T's A fragments beside S^T / dP^T's accumulators, dS^T's and dK / dV would
  // exceed the registers; so P^T is packed only once dS^T no longer needs it.
  static constexpr bool kLateDv = kBM == 128;
  static constexpr int kZeroBar = 2;  // + warpgroup: one per consumer warpgroup's zero fills
  static constexpr int kDqBar = 4;    // + warpgroup: its dQ staging buffer is written
  static constexpr int kDqBytes = 2 * wsbwd::DqStage::kBytes;  // one buffer per warpgroup
  static constexpr int kSmemBytes = 1024 + 2 * kKVBytes + kStages * 2 * kQBytes +
                                    kDsBuffers * kDsBytes + kDqBytes + kStages * 2 * kBM * 4;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

// Tensor maps of q, k, v, dout as {D, heads, rows, batches} (innermost first), boxes
// {64, 1, 64, 1} with the 128-byte swizzle, and of the zero-filled fp32 dQ workspace (the same
// layout as q, contiguous) in boxes {32, 1, 64, 1}, 128-byte swizzle (wsbwd::DqStage); built by
// csrc/cuda/flash.cu (tma_map.h).
struct BwdWsMaps {
  CUtensorMap q, k, v, dout, dq_accum;
};

// The (query head, query tile) of each step of a key tile: the nq query tiles [qlo, qhi] of every
// head of the GQA group. Each head's walk starts at tile `first` and wraps: the CTAs of one head
// run side by side (key tiles are the grid's fastest dimension), and starting them at different
// query tiles keeps them from adding into the same dQ rows at the same moment. Counters, no
// divisions per step; the producer and the consumers walk it identically.
template <int BM>
struct StepWalk {
  int qlo, qhi, first, h, i0;
  ATTNKIT_DEVICE ATTNKIT_INLINE StepWalk(int qlo_, int qhi_, int nq, int tile, int h0)
      : qlo(qlo_), qhi(qhi_), first(qlo_ + (nq > 0 ? tile % nq : 0) * BM), h(h0), i0(first) {}
  ATTNKIT_DEVICE ATTNKIT_INLINE void next() {
    i0 = i0 + BM > qhi ? qlo : i0 + BM;
    if (i0 == first) ++h;  // back where this head's walk began: all nq tiles done
  }
};

// The query steps of key tile tt, which the producer and the consumers walk alike: its keys
// j0 .. j0 + krows - 1 see the query rows [qlo, qhi] (rel_lo / rel_hi: the window's bounds on
// key - query), nq tiles of BM rows per query head, nsteps over the GQA group of G heads.
struct KeyTileSteps {
  int j0, krows, qlo, qhi, nq, nsteps;
};
template <int BN, int BM>
ATTNKIT_DEVICE ATTNKIT_INLINE KeyTileSteps key_tile_steps(int tt, int lq, int lk, int rel_lo,
                                                          int rel_hi, int G) {
  const int j0 = tt * BN;
  const int krows = min(lk - j0, BN);
  const int qlo = max(j0 - rel_hi, 0), qhi = min(j0 + krows - 1 - rel_lo, lq - 1);
  const int nq = qhi >= qlo ? (qhi - qlo) / BM + 1 : 0;
  return {j0, krows, qlo, qhi, nq, nq * G};
}

// Where a CTA of the 1-D grid (tiles x pairs CTAs, pairs = kv heads x sequences) starts: the
// pairs go in groups of `group`, and within a group the key tile is the slow index. The launcher
// sizes a group (bwd_ws_cta_group) to about one wave, so the CTAs resident together share a few heads' Q, dO and dQ
// rows in L2 (with the pair as the slow index, 16k non-causal ran 19% slower: every head at once
// spills L2), and with a causal mask or a window, whose first key tiles have the most steps,
// each group starts its longest tiles first (with the tile as the slowest index, 1k causal ran
// 19% slower: long tiles started in the last wave).
struct CtaStart {
  int tile, hk, b;
};
ATTNKIT_DEVICE ATTNKIT_INLINE CtaStart cta_start(int64_t cta, int tiles, int pairs, int group,
                                                 int hkv) {
  const int64_t per_group = int64_t(group) * tiles;
  const int64_t gi = cta / per_group;
  const int within = static_cast<int>(cta - gi * per_group);
  const int first = static_cast<int>(gi) * group;
  const int gsize = min(group, pairs - first);
  const int pair = first + within % gsize;
  return {within / gsize, pair % hkv, pair / hkv};
}

// kSoftcap: scores go through cap·tanh(·/cap), a separate instantiation (so that the plain one
// carries neither the tanh nor its registers). Row indices are int32: the caller takes
// this kernel only for q and k with fewer than 2^31 - 1024 rows (the maps' coordinates are int32).
template <typename T, int kD, bool kSoftcap>
__global__ void __launch_bounds__(BwdWsTraits<kD>::kThreads, 1)
    bwd_ws_kernel(const Params p, const float* __restrict__ lse, const float* __restrict__ delta,
                  T* __restrict__ dk, T* __restrict__ dv,
                  const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                  const __grid_constant__ CUtensorMap map_v,
                  const __grid_constant__ CUtensorMap map_do,
                  const __grid_constant__ CUtensorMap map_dq, int tiles, int group) {
#if ATTNKIT_HAS_WGMMA
  namespace cm = ::attnkit::mma;
  using Tr = BwdWsTraits<kD>;
  using MmaS = wgmma::Wgmma<T, BwdWsTraits<kD>::kBM>;  // S^T, dP^T (N = the step's queries)
  using Mma64 = wgmma::Wgmma<T, 64>;                    // dQ (N = 64 columns)
  using MmaD = wgmma::Wgmma<T, kD>;                     // dV, dK (N = head dim)
  constexpr int BM = Tr::kBM, BN = Tr::kBN, S = Tr::kStages, kNT = BM / 8, kDT = kD / 8;
  constexpr int kBoxes = kD / 64;  // column blocks of a tile
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (cm::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* sk = smem;                          // [BN][kD] sw128 (column blocks of BN rows)
  unsigned char* sv = sk + Tr::kKVBytes;             // [BN][kD]
  unsigned char* sq = sv + Tr::kKVBytes;             // [S][BM][kD]
  unsigned char* sdo = sq + S * Tr::kQBytes;         // [S][BM][kD]
  unsigned char* sds = sdo + S * Tr::kQBytes;        // [kDsBuffers][BN keys][BM queries]
  unsigned char* sdq = sds + Tr::kDsBuffers * Tr::kDsBytes;  // [2 warpgroups] DqStage buffers
  float* lse_s = reinterpret_cast<float*>(sdq + Tr::kDqBytes);  // [S][BM]
  float* delta_s = lse_s + S * BM;                                  // [S][BM]

  __shared__ uint64_t bars[wsbwd::Ring<S, Tr::kConsumerWarps>::kBars];
  const wsbwd::Ring<S, Tr::kConsumerWarps> ring{bars};
  uint64_t* full_kv = ring.full_kv();
  uint64_t* full = ring.full(0);

  const int tid = threadIdx.x;
  if (tid == 0) ring.init(1 + 32);
  __syncthreads();  // the last CTA-wide barrier

  // The walk every role takes (mma_bwd.cuh's): key tiles tt = start.tile, + tiles, ...; per
  // tile the query tiles [qlo, qhi] its keys see, for each query head of the GQA group
  // (StepWalk).
  const CtaStart start = cta_start(blockIdx.x, tiles, static_cast<int>(p.Hkv * p.B), group,
                                   static_cast<int>(p.Hkv));
  // The same, from the block index read again: the consumers need the head and sequence only per
  // key tile, and kept live across the step loop they were spilled (at 240 registers).
  auto start_now = [&] {
    uint32_t cta;
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(cta));
    return cta_start(cta, tiles, static_cast<int>(p.Hkv * p.B), group, static_cast<int>(p.Hkv));
  };
  const int hk = start.hk, b = start.b, G = static_cast<int>(p.H / p.Hkv);
  const SeqRange s = seq_range(p, b);
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  const int q0 = static_cast<int>(s.q0), k0 = static_cast<int>(s.k0);
  const int rel_lo = p.window_left < 0
                         ? -lq
                         : static_cast<int>(mma::max_i64(
                               lk - lq - mma::min_i64(p.window_left, lk + lq), -lq));
  const int rel_hi = p.window_right < 0
                         ? lk
                         : static_cast<int>(mma::min_i64(
                               lk - lq + mma::min_i64(p.window_right, lk + lq), lk));
  const int ntiles = (lk + BN - 1) / BN;
  const bool varlen = p.cu_q != nullptr;
  const int bc = varlen ? 0 : b;  // the maps' batch coordinate

  if (tid < 128) {  // producer warpgroup
    wgmma::setmaxnreg_dec<Tr::kProducerRegs>();
    const bool loads_q = tid == 0, loads_do = tid >= 32 && tid < 64;
    if (!loads_q && !loads_do) return;
    const int lane = tid & 31;
    if (loads_q) {
      tma::prefetch_map(&map_q);
      tma::prefetch_map(&map_k);
      tma::prefetch_map(&map_v);
    } else if (lane == 0) {
      tma::prefetch_map(&map_do);
    }
    const int64_t lse_seq = b * p.lse.batch + s.q0 * p.lse.row;  // delta shares lse's layout
    uint32_t slot = 0, kv_n = 0;  // steps / K-V tiles this CTA has loaded so far
    for (int tt = start.tile; tt < ntiles; tt += tiles) {
      const auto [j0, krows, qlo, qhi, nq, nsteps] =
          key_tile_steps<BN, BM>(tt, lq, lk, rel_lo, rel_hi, G);
      if (nsteps == 0) continue;
      if (loads_q) {
        ring.producer_kv_acquire(kv_n);
        bulk::arrive_expect_tx(full_kv, 2 * Tr::kKVBytes);
#pragma unroll
        for (int c = 0; c < kBoxes; ++c) {
#pragma unroll
          for (int r = 0; r < BN / 64; ++r) {
            const int off = c * BN * 128 + r * 64 * 128;
            tma::load_4d(sk + off, &map_k, c * 64, hk, k0 + j0 + r * 64, bc, full_kv);
            tma::load_4d(sv + off, &map_v, c * 64, hk, k0 + j0 + r * 64, bc, full_kv);
          }
        }
      }
      ++kv_n;
      StepWalk<BM> w(qlo, qhi, nq, tt, hk * G);
      for (int n = 0; n < nsteps; ++n, ++slot, w.next()) {
        const int st = slot % S, h = w.h, i0 = w.i0;
        ring.producer_step_acquire(slot);
        if (loads_q) {
          bulk::arrive_expect_tx(full + st, Tr::kQBytes);
#pragma unroll
          for (int c = 0; c < kBoxes; ++c) {
#pragma unroll
            for (int r = 0; r < Tr::kQBoxes; ++r) {
              tma::load_4d(sq + st * Tr::kQBytes + c * BM * 128 + r * 64 * 128, &map_q, c * 64, h,
                           q0 + i0 + r * 64, bc, full + st);
            }
          }
        } else {
          // dO first (lane 0 announces its bytes without arriving), then lse / delta of the step's
          // rows; rows past qhi (no key of the tile visible, or past the sequence) get 0, masked
          // by the consumers' selects. Each lane's arrival releases its own stores.
          if (lane == 0) {
            bulk::expect_tx(full + st, Tr::kQBytes);
#pragma unroll
            for (int c = 0; c < kBoxes; ++c) {
#pragma unroll
              for (int r = 0; r < Tr::kQBoxes; ++r) {
                tma::load_4d(sdo + st * Tr::kQBytes + c * BM * 128 + r * 64 * 128, &map_do, c * 64,
                             h, q0 + i0 + r * 64, bc, full + st);
              }
            }
          }
          const int rows = min(qhi - i0 + 1, BM);
          for (int r = lane; r < BM; r += 32) {
            float l = 0.f, d = 0.f;
            if (r < rows) {
              const int64_t li = lse_seq + h * p.lse.head + int64_t(i0 + r) * p.lse.row;
              l = lse[li];
              d = delta[li];
            }
            lse_s[st * BM + r] = l;
            delta_s[st * BM + r] = d;
          }
          bulk::arrive(full + st);
        }
      }
    }
    return;
  }

  // Consumer warpgroups.
  wgmma::setmaxnreg_inc<Tr::kConsumerRegs>();
  const int ctid = tid - 128, wg = ctid / 128, wtid = ctid & 127, warp4 = (ctid / 32) & 3,
            lane = tid & 31;
  const int g = lane / 4, t4 = lane % 4;
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  const uint32_t sk_addr = cm::smem_addr(sk), sv_addr = cm::smem_addr(sv),
                 sq_addr = cm::smem_addr(sq), sdo_addr = cm::smem_addr(sdo),
                 sds_addr = cm::smem_addr(sds);
  unsigned char* dq_buf = sdq + wg * wsbwd::DqStage::kBytes;
  if (wtid == 0) tma::prefetch_map(&map_dq);

  // Rows [from, ROWS) of a sw128 tile of ROWS rows (kBoxes column blocks) -> 0, then visible to
  // this warpgroup's tensor cores (and, after its next release, to the copy engine).
  auto zero_rows = [&](unsigned char* tile, int rows_total, int from) {
    wsbwd::zero_rows<kBoxes>(tile, rows_total, from, wtid);
  };

  uint32_t slot = 0, kv_n = 0;
  for (int tt = start.tile; tt < ntiles; tt += tiles) {
    const auto [j0, krows, qlo, qhi, nq, nsteps] =
        key_tile_steps<BN, BM>(tt, lq, lk, rel_lo, rel_hi, G);

    float dka[kDT][4], dva[kDT][4];
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dka[dt][e] = dva[dt][e] = 0.f;

    if (nsteps > 0) {
      ring.consumer_kv_wait(kv_n);
      if (varlen && krows < BN) {  // the next sequence's keys: zeros (see the header)
        zero_rows(sk, BN, krows);
        zero_rows(sv, BN, krows);
        bulk::fence_proxy_async();
        wgmma::named_barrier_sync(Tr::kZeroBar + wg, 128);
      }
    }

    StepWalk<BM> w(qlo, qhi, nq, tt, start_now().hk * G);  // the producer's walk
    for (int n = 0; n < nsteps; ++n, ++slot, w.next()) {
      const int st = slot % S, h = w.h, i0 = w.i0;
      const int rows = min(qhi - i0 + 1, BM);
      ring.consumer_step_wait(slot);
      if (varlen && lq - i0 < BM) {  // Q / dO rows of the next sequence: zeros
        zero_rows(sq + st * Tr::kQBytes, BM, lq - i0);
        zero_rows(sdo + st * Tr::kQBytes, BM, lq - i0);
        bulk::fence_proxy_async();
        wgmma::named_barrier_sync(Tr::kZeroBar + wg, 128);
      }
      const uint32_t q_addr = sq_addr + st * Tr::kQBytes, do_addr = sdo_addr + st * Tr::kQBytes;

      // Masks: the step's key and query rows against the window bounds (mma_bwd.cuh's).
      const int rlo = min(max(rel_lo - (j0 - i0), -BM), BN);
      const int rhi = min(max(rel_hi - (j0 - i0), -BM), BN);
      const bool is_full = rows == BM && krows == BN && rlo <= -(BM - 1) && rhi >= BN - 1;
      int col_lo[2], col_hi[2];
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        const int kj = wg * 64 + warp4 * 16 + g + rh * 8;
        col_lo[rh] = kj - rhi - 2 * t4;
        col_hi[rh] = (kj < krows ? min(rows - 1, kj - rlo) : -1) - 2 * t4;
      }
      const float* lse_t = lse_s + st * BM;
      const float* delta_t = delta_s + st * BM;

      float sc[kNT][4], dp[kNT][4];
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        MmaS::template ss<0>(sc, wgmma::desc_k_major<BN>(sk_addr, wg * 64, kk),
                             wgmma::desc_k_major<BM>(q_addr, 0, kk), kk > 0);
      }
      wgmma::commit();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        MmaS::template ss<0>(dp, wgmma::desc_k_major<BN>(sv_addr, wg * 64, kk),
                             wgmma::desc_k_major<BM>(do_addr, 0, kk), kk > 0);
      }
      wgmma::commit();

      uint32_t pa[BM / 16][4], da[BM / 16][4];
      if constexpr (kSoftcap || Tr::kLateDv) {
        if constexpr (kSoftcap) {
          wgmma::wait<0>();
          wgmma::fence_regs(sc);
          wgmma::fence_regs(dp);
          mma::probs_and_grads<true>(sc, dp, lse_t, delta_t, col_lo, col_hi, is_full, scale, cap);
        } else {
          wgmma::wait<1>();
          wgmma::fence_regs(sc);
          probs_t(sc, lse_t, col_lo, col_hi, is_full, scale);  // the exp runs under dP^T
          wgmma::wait<0>();
          wgmma::fence_regs(dp);
          grads_t(dp, sc, delta_t, scale);
        }
        pack_frags<T>(pa, sc);
        pack_frags<T>(da, dp);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          MmaD::template rs<1>(dva, pa[kk], wgmma::desc_n_major<BM>(do_addr, kk), 1);
        }
      } else {
        wgmma::wait<1>();
        wgmma::fence_regs(sc);
        probs_t(sc, lse_t, col_lo, col_hi, is_full, scale);
        pack_frags<T>(pa, sc);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          MmaD::template rs<1>(dva, pa[kk], wgmma::desc_n_major<BM>(do_addr, kk), 1);
        }
        wgmma::commit();
        wgmma::wait<1>();
        wgmma::fence_regs(dp);
        grads_t(dp, sc, delta_t, scale);
        pack_frags<T>(da, dp);
        wgmma::fence();
      }

      // dS^T -> shared [key][query] (buffer slot % 2).
      unsigned char* ds_buf = sds + (slot & 1) * Tr::kDsBytes;
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = wg * 64 + warp4 * 16 + g + (r % 2) * 8, col = kk * 16 + (r / 2) * 8;
          *reinterpret_cast<uint32_t*>(ds_buf + wgmma::sw128_offset<BN>(row, col) + 4 * t4) =
              da[kk][r];
        }
      }
      wgmma::fence_async_smem();
      // This warpgroup's dQ staging buffer is free once its issuer's last reduction has read it
      // (issued a step ago: normally long done); the barrier below hands that on.
      if (wtid == 0) wsbwd::DqStage::issuer_wait_free();
      // dS^T complete (both warpgroups' rows are read), and both finished step slot - 1's dQ
      // (buffer (slot + 1) % 2 free).
      wgmma::named_barrier_sync(Tr::kDsBar, Tr::kConsumerThreads);
      if constexpr (Tr::kLateDv) {  // dV done (it ran under the dS^T stores): P^T's registers
        wgmma::wait<0>();           // are free before dQ's accumulators need them
        wgmma::fence_regs(dva);
      }

      // dQ = dS K, issued before dK (FlashAttention-3's order): its write-out below overlaps dK.
      // Over all 128 keys, warpgroup w takes columns w*64 .. +63 of the step's 64 queries
      // (D = 128) or all 64 columns of queries w*64 .. +63 of its 128 (D = 64: dS^T's column
      // block w).
      const int dq_row0 = BM == 128 ? wg * 64 : 0, dq_col0 = kD == 128 ? wg * 64 : 0;
      const uint32_t kcol_addr = sk_addr + (kD == 128 ? wg * BN * 128 : 0);
      const uint32_t ds_addr = sds_addr + (slot & 1) * Tr::kDsBytes + (dq_row0 / 64) * BN * 128;
      float dqa[8][4];
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        Mma64::template ss<1, 1>(dqa, wgmma::desc_n_major<BN>(ds_addr, kk),
                                 wgmma::desc_n_major<BN>(kcol_addr, kk), kk > 0);
      }
      wgmma::commit();
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        MmaD::template rs<1>(dka, da[kk], wgmma::desc_n_major<BM>(q_addr, kk), 1);
      }
      wgmma::commit();
      wgmma::wait<1>();  // dV and dQ done; dK still running
      wgmma::fence_regs(dqa);
      wsbwd::DqStage::store(dq_buf, dqa, warp4, lane, rows - dq_row0);
      bulk::fence_proxy_async();
      wgmma::named_barrier_sync(Tr::kDqBar + wg, 128);
      if (wtid == 0 && rows > dq_row0) {  // rows past the step's last query add nothing
        wsbwd::DqStage::issue(dq_buf, &map_dq, dq_col0, h, q0 + i0 + dq_row0, bc);
      }
      wgmma::wait<0>();  // dV, dK (the stage's last readers) and dQ done
      wgmma::fence_regs(dva);
      wgmma::fence_regs(dka);
      ring.consumer_step_release(slot, lane);
    }
    if (nsteps > 0) {  // every dQ of the tile is complete: K (and V) go back to the producer
      ring.consumer_kv_release(lane);
      ++kv_n;
    }

    // Epilogue: dK (scale folded into dS) and dV of the warpgroup's 64 keys.
    const CtaStart o = start_now();
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int r = wg * 64 + warp4 * 16 + g + rh * 8;
      if (r >= krows) continue;
      T* krow = dk + o.b * p.dk.batch + (s.k0 + j0 + r) * p.dk.row + o.hk * p.dk.head + 2 * t4;
      T* vrow = dv + o.b * p.dv.batch + (s.k0 + j0 + r) * p.dv.row + o.hk * p.dv.head + 2 * t4;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        *reinterpret_cast<uint32_t*>(krow + dt * 8) = cm::pack2<T>(dka[dt][rh * 2], dka[dt][rh * 2 + 1]);
        *reinterpret_cast<uint32_t*>(vrow + dt * 8) = cm::pack2<T>(dva[dt][rh * 2], dva[dt][rh * 2 + 1]);
      }
    }
  }
  if (wtid == 0) wsbwd::DqStage::issuer_drain();
#endif  // ATTNKIT_HAS_WGMMA
}

// Host side: the shared memory of one instantiation (the caller checks the device's opt-in).
inline int64_t bwd_ws_smem_bytes(int64_t d) {
  return d == 64 ? BwdWsTraits<64>::kSmemBytes : BwdWsTraits<128>::kSmemBytes;
}

// cta_start's group size. Without a mask every key tile has the same steps, and a group of about
// one wave (ceil(SMs / tiles) pairs) keeps the resident CTAs on a few heads' rows in L2. With a
// causal mask or a window the tiles differ in length; over a grid of few waves one group of all
// pairs (the pair fastest: the whole grid's longest tiles first) balances the SMs better than L2
// locality pays back (fifteenth session: groups of 5 lost 6% at 4k causal, D=128; a
// list-scheduling model gives 0.99 of the SMs busy for one group against 0.88 for groups of 5).
// `requested` > 0 (the launch option cta_group) overrides, clamped to the pair count.
inline int64_t bwd_ws_cta_group(int64_t pairs, int64_t tiles, int64_t sms, bool masked,
                                int64_t requested) {
  if (requested > 0) return std::min(pairs, requested);
  constexpr int64_t kFewWaves = 16;
  if (masked && tiles * pairs <= kFewWaves * sms) return pairs;
  return std::max<int64_t>(1, std::min(pairs, (sms + tiles - 1) / tiles));
}

// maps.dq_accum: the zero-filled fp32 workspace dQ is added into; the caller converts it to dq.
// opt.max_tiles (launch_options.h) caps the grid's key-tile dimension; opt.cta_group sets the
// group size. Returns the launch's error (no sync).
template <typename T>
cudaError_t launch_bwd_ws(const Params& p, const BwdWsMaps& maps, const float* lse,
                          const float* delta, T* dk, T* dv, int64_t rows_k,
                          const BwdLaunchOptions& opt, cudaStream_t stream) {
  // A 1-D grid of tiles x pairs CTAs in cta_start's order, in groups of bwd_ws_cta_group pairs.
  const int64_t pairs = p.Hkv * p.B, max_grid = 0x7FFFFFFF;
  if (pairs > max_grid) return cudaErrorInvalidConfiguration;
  int64_t tiles = (rows_k + 127) / 128;
  tiles = std::max<int64_t>(1, std::min(tiles, max_grid / pairs));  // the kernel loops over the rest
  if (opt.max_tiles > 0 && tiles > opt.max_tiles) tiles = opt.max_tiles;
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  const bool masked = p.window_left >= 0 || p.window_right >= 0;
  const int64_t group = bwd_ws_cta_group(pairs, tiles, sms, masked, opt.cta_group);
  const dim3 grid(static_cast<unsigned>(tiles * pairs));
  auto run = [&](auto kernel, int smem) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    kernel<<<grid, 384, smem, stream>>>(p, lse, delta, dk, dv, maps.q, maps.k, maps.v, maps.dout,
                                        maps.dq_accum, static_cast<int>(tiles),
                                        static_cast<int>(group));
    return cudaGetLastError();
  };
  const bool cap = p.softcap > 0.0;
  if (p.D == 64) {
    constexpr int kSmem = BwdWsTraits<64>::kSmemBytes;
    return cap ? run(bwd_ws_kernel<T, 64, true>, kSmem) : run(bwd_ws_kernel<T, 64, false>, kSmem);
  }
  constexpr int kSmem = BwdWsTraits<128>::kSmemBytes;
  return cap ? run(bwd_ws_kernel<T, 128, true>, kSmem) : run(bwd_ws_kernel<T, 128, false>, kSmem);
}

}  // namespace ws
}  // namespace flash
}  // namespace attnkit

#endif  // ATTNKIT_HAS_BWD_WS
