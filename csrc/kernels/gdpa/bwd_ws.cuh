// GDPA backward on Hopper, warp-specialised (sm_90a, bf16 / fp16, padded head dim 128): kernel
// sm90_ws of kernels/gdpa/choose.h, the backward's one sm90 kernel and auto's choice for head dims
// up to 128 on a 9.0 device (smaller ones are the maps' extent: zero columns, never stored). Inputs its tensor maps cannot address as given are copied once by the
// launcher (csrc/cuda/gdpa.cu bwd_ws_maps), so no second sm90 backward serves them (issue #16
// removed the cp.async one, bwd_wgmma.cuh). P and dS are rounded to the value type as in
// bwd_mma.cuh. The skeleton (barriers, zero fills, dQ reductions) is kernels/common/ws_bwd.cuh,
// shared with flash/bwd_ws.cuh.
//
// CTA = (sequence, 128-key tile, kv head) work items (cta_item: a sequence longer than the
// grid's hint is covered by striding over its key tiles); for a batch that is not dense
// (kList), one CTA per SM walking the jagged schedule's list (ws_schedule.cuh: longest first,
// the key tiles of each (sequence, kv head) with keys, a long one's split into a few strided
// items), so no CTA is launched for an empty tile and a CTA's next K / V load overlaps its last
// tile's dK / dV stores. 384 threads:
//   warpgroup 0, producer: gives its registers back (setmaxnreg.dec to 24); thread 0 issues every
//     load as a tensor-map copy (kernels/common/tma.cuh): K and V once per key tile (two
//     [128 rows][1 head][64 cols] boxes each), then per step the [64][1][64] boxes of Q and dO
//     into a 3-stage ring. No consumer thread computes a load address.
//   warpgroups 1-2, consumers: take the registers (setmaxnreg.inc to 240); warpgroup w owns keys
//     w*64 .. +63 with dK / dV in registers. Per step (query head of the GQA group, 64-query tile):
//       Sᵀ = K_w·Qᵀ, dPᵀ = V_w·dOᵀ             ss, two commit groups
//       wait for Sᵀ only: Pᵀ = φ(pre·Sᵀ) packed, F = qk·pre·φ′(pre·Sᵀ)   (under dPᵀ's product)
//       dV += Pᵀ·dO                             rs, issued at once
//       wait for dPᵀ only: dSᵀ = F ⊙ dPᵀ packed    (under dV's product)
//       dS -> shared (stmatrix .trans, double-buffered), one barrier of the 256 consumer threads,
//       dQ[64 q][w*64 .. +63] = dS·K[:, w*64 ..]   ss
//       dK += dSᵀ·Q                             rs, after dQ (FlashAttention-3's order)
//     while dK runs, dQ goes into the warpgroup's staging buffer and one of its threads adds it
//     into the zero-filled fp32 workspace with tensor reductions (ws_bwd.cuh's DqStage, as
//     flash/bwd_ws.cuh); then the stage is released. kFusedDq = false (deterministic mode) skips
//     dS and dQ; the launcher runs the mma.sync dQ kernel (bwd_mma.cuh) instead. kDqDirect
//     (below): no workspace, dQ summed over a cluster of the sequence's two key tiles by
//     finalizer warps of the producer warpgroup.
//
// Jagged rows: a box starts at the sequence's row, so rows past its end are the next sequence's
// (maybe inf / NaN; past T the copy engine writes zeros). φ(0) = 0 and the masks zero P and dS
// entries, but the products still multiply those rows (0 · NaN = NaN), so the consumers zero Q /
// dO rows past the sequence's end and K / V rows past it in shared memory before use (each
// warpgroup all of them, whole 128-byte rows, synchronising only itself: the other writes the
// same zeros). Padded head dims (D < 128) are the maps' extent: columns past D land as zeros.
// Garbage offsets: seq_range clamps them into [0, T]; copies are bounded by the maps, gradient
// rows by the clamped lengths.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/common/wgmma.cuh"
#include "kernels/common/ws_bwd.cuh"
#include "kernels/gdpa/activation_gpu.cuh"
#include "kernels/gdpa/bwd_mma.cuh"
#include "kernels/gdpa/params.h"
#include "kernels/gdpa/tile.cuh"
#include "kernels/gdpa/ws_schedule.cuh"
#include "kernels/gdpa/zero_rows.cuh"

#define ATTNKIT_HAS_GDPA_BWD_WS ATTNKIT_HAS_TENSOR_MAPS  // the kernel and its launcher are declared

#if ATTNKIT_HAS_GDPA_BWD_WS

namespace attnkit {
namespace gdpa {

struct BwdWsTraits {
  static constexpr int kD = 128;
  static constexpr int kThreads = 384;  // producer + 2 consumer warpgroups
  static constexpr int kConsumerThreads = 256;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kBlockN = 128;  // keys per CTA (64 per consumer warpgroup)
  static constexpr int kBlockM = 64;   // queries per step
  static constexpr int kStages = 3;    // Q / dO ring
  static constexpr int kBoxCols = 64;  // 128 bytes: one sw128 column block
  static constexpr int kKVBoxRows = kBlockN, kQBoxRows = kBlockM;
  static constexpr int kKVBytes = kBlockN * kD * 2;  // K or V
  static constexpr int kQBytes = kBlockM * kD * 2;   // Q or dO, one stage
  static constexpr int kDsBytes = kBlockM * kBlockN * 2;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;  // 128·24 + 256·240 <= 64K registers
  static constexpr int kDsBar = 1;    // named barrier over the consumers (0 is __syncthreads)
  static constexpr int kZeroBar = 2;  // + warpgroup: one per consumer warpgroup's zero fills
  static constexpr int kDqBar = 4;    // + warpgroup: its dQ staging buffer is written
  static constexpr int kDqBytes = 2 * wsbwd::DqStage::kBytes;  // one buffer per warpgroup
  // + 1 KB so the tiles can start 1024-byte aligned whatever the dynamic base is.
  static constexpr int kSmemBytes =
      1024 + 2 * kKVBytes + kStages * 2 * kQBytes + 2 * kDsBytes + kDqBytes;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

// Tensor maps of q, dout ([T][H][D], boxes {64, 1, 64}) and k, v ([T][Hkv][D], boxes
// {64, 1, 128}), innermost first, 128-byte swizzle; built by csrc/cuda/gdpa.cu (tma_map.h). With
// the fused dQ also the zero-filled fp32 workspace dQ is added into ([T][H][D] as {D, H, T, 1},
// boxes {32, 1, 64, 1}: wsbwd::DqStage).
struct BwdWsMaps {
  CUtensorMap q, k, v, dout, dq_accum;
};

// A CTA's work items. In order (kList = false): item blockIdx.x of cta_item's enumeration, one
// per CTA. From the jagged list (kList = true, gdpa_ws_schedule_kernel<true>): entries in
// ws_snake's order over the persistent CTAs. Each item's key tiles are it.tile, + it.tiles, ...
// (cta_item: the hint's tiles, for a sequence longer than the hint; the list: the entry's stride
// n). Every role runs its own copy of the walk, in the same order.
template <bool kList>
struct BwdWsWalk {
  const int4* list;
  int items, round = 0;
  bool done = false;

#if defined(__CUDACC__)
  ATTNKIT_DEVICE ATTNKIT_INLINE BwdWsWalk(const int32_t* sched, int64_t capacity)
      : list(kList ? reinterpret_cast<const int4*>(sched + WsSchedTraits::kHeader) : nullptr),
        items(kList ? ws_list_items(sched, capacity) : 0) {}

  ATTNKIT_DEVICE ATTNKIT_INLINE bool next(const BwdWgmmaParams& p, CtaItem& it, SeqRange& qs,
                                          SeqRange& ks) {
    if constexpr (kList) {
      const int item = ws_snake(round++);
      if (item >= items) return false;
      const int4 r = list[2 * item], e = list[2 * item + 1];
      it = {e.y, e.x, e.z, e.w};  // e.w: the item's stride, >= 1
      qs = {r.x, r.y};
      ks = {r.z, r.w};
      return true;
    } else {
      if (done) return false;
      done = true;
      it = cta_item(p.Hkv, p.B);
      qs = seq_range(p.q_offsets, it.b, p.Tq);
      ks = seq_range(p.kv_offsets, it.b, p.Tk);
      return true;
    }
  }
#endif
};

// kDqDirect (with kFusedDq, in order): no workspace. The launcher makes clusters of the grid's
// `tiles` CTAs (1 or 2: the hint's key tiles per (kv head, sequence); cta_item puts them side by
// side, rank = key tile). A sequence with at most `tiles` key tiles has its dQ finished here; the
// two tiles walk the same query steps (no causal mask, no window). Per step each consumer
// warpgroup stages its dQ in its buffer: one tile, both 32-column halves; two, CTA c keeps half c
// (slot c) and pushes half 1 - c into the peer's slot c (ws_bwd.cuh DqStage::push_box: st.async,
// the bytes counted on the peer's barrier; no cluster-scope fence: a pull through
// ld.shared::cluster with release / acquire at cluster scope cost MEMBAR.GPU a step and ran 1.4x
// slower than this). A finalizer warp of the producer warpgroup (warps 1 and 2, one per consumer
// warpgroup) sums the slots, rounds and stores dq: off the consumers, whose own sum cost ~25 % of
// the kernel (docs/performance.md, thirty-second session). A longer sequence (the hint was short)
// gets dK and dV here and its dQ from the mma.sync dQ kernel (BwdParams dq_kv_len_above); a
// keyless one zeros from gdpa_zero_keyless_rows. Per consumer warpgroup three mbarriers: staged
// (its 128 threads' arrivals, one announcing the peer's bytes), slot_free (its finalizer's 32
// lanes have read the slots) and peer_free (the peer's finalizer lanes have read what this
// warpgroup pushed: remote arrivals, CTA-scope release, as CUTLASS's multicast pipelines hand
// stages back). Every thread that touched a slot arrives (with one lane's arrival after
// __syncwarp racecheck reported 18 hazards: docs/performance.md, thirty-fourth session).
template <typename T, bool kFusedDq, bool kList, bool kDqDirect = false>
__global__ void __launch_bounds__(BwdWsTraits::kThreads, 1)
    gdpa_bwd_ws_kernel(const BwdWgmmaParams p, const int32_t* __restrict__ sched,
                       const int64_t capacity, const __grid_constant__ CUtensorMap map_q,
                       const __grid_constant__ CUtensorMap map_k,
                       const __grid_constant__ CUtensorMap map_v,
                       const __grid_constant__ CUtensorMap map_do,
                       const __grid_constant__ CUtensorMap map_dq) {
#if ATTNKIT_HAS_WGMMA
  using Tr = BwdWsTraits;
  using MmaS = wgmma::Wgmma<T, Tr::kBlockM>;  // Sᵀ, dPᵀ: N = queries of the step
  using MmaD = wgmma::Wgmma<T, Tr::kD>;       // dK, dV: N = head dim
  using MmaQ = wgmma::Wgmma<T, 64>;           // dQ: N = the warpgroup's 64 head-dim columns
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kD, S = Tr::kStages;
  constexpr int kBoxes = D / Tr::kBoxCols;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* sk = smem;                   // [BN][D] sw128 (column blocks of BN rows)
  unsigned char* sv = sk + Tr::kKVBytes;      // [BN][D]
  unsigned char* sq = sv + Tr::kKVBytes;      // [S][BM][D]
  unsigned char* sdo = sq + S * Tr::kQBytes;  // [S][BM][D]
  unsigned char* sds = sdo + S * Tr::kQBytes;  // [2] dS tiles [BM queries][BN keys]
  unsigned char* sdq = sds + 2 * Tr::kDsBytes;  // [2 warpgroups] DqStage buffers

  static_assert(!kDqDirect || (kFusedDq && !kList), "the direct dQ is the in-order fused kernel's");
  __shared__ uint64_t bars[wsbwd::Ring<S>::kBars];
  // kDqDirect, per consumer warpgroup w: staged[w] (its 128 threads' arrivals, one announcing the
  // peer's pushed bytes), slot_free[w] (the 32 lanes of its finalizer warp have read both slots),
  // peer_free[w] (the peer's finalizer lanes have read what w pushed: remote arrivals). Every
  // thread that wrote or read a slot arrives itself, so each arrival releases its own accesses:
  // the order then rests on the mbarrier alone (one lane's arrival after __syncwarp leaned on the
  // warp barrier's ordering too, which racecheck does not follow), at no measured cost.
  __shared__ uint64_t dq_bars[6];
  uint64_t* staged = dq_bars;
  uint64_t* slot_free = dq_bars + 2;
  uint64_t* peer_free = dq_bars + 4;
  const wsbwd::Ring<S> ring{bars};
  const int tid = threadIdx.x;
  if (tid == 0) {
    ring.init(1);  // full[s]: thread 0's arrival with the Q and dO bytes
    if constexpr (kDqDirect) {
      for (int w = 0; w < 2; ++w) {
        bulk::init(&staged[w], 128);
        bulk::init(&slot_free[w], 32);
        bulk::init(&peer_free[w], 32);
      }
      bulk::fence_init();
    }
  }
  // The last CTA-wide barrier; with the direct dQ also the peer's barriers are initialised after
  // it.
  if constexpr (kDqDirect) {
    cluster::sync_all();
  } else {
    __syncthreads();
  }

  // The walk every role takes: its items (BwdWsWalk), in each the key tiles it.tile, + it.tiles,
  // ... of the item's sequence; per tile the query tiles its keys are seen by, for each head of
  // the group.
  const int G = p.H / p.Hkv;
  CtaItem it{};
  SeqRange qs{}, ks{};
  struct Tile {
    int q_start, nq, steps;
  };
  auto tile_steps = [&](int j0) {
    const Span qr = query_span(p.causal, p.window, j0, min(j0 + BN, ks.len) - 1, qs.len);
    const int q_start = static_cast<int>(qr.lo);
    const int nq = qr.hi > qr.lo ? (static_cast<int>(qr.hi) - q_start + BM - 1) / BM : 0;
    return Tile{q_start, nq, G * nq};
  };
  // kDqDirect: 0 no dQ here (no keys: the keyless rows' zeros; or a sequence longer than the
  // cluster's tiles), 1 this CTA's alone, 2 summed with the peer's. The same for both CTAs (one
  // sequence, the same offsets), and the same for the consumers and the finalizers, which must
  // agree on every staged step.
  auto dq_mode_of = [&]() {
    return !kDqDirect || ks.len == 0 ? 0 : ks.len <= BN ? 1 : ks.len <= BN * it.tiles ? 2 : 0;
  };

  if (tid < 128) {  // producer warpgroup: thread 0 loads everything
    wgmma::setmaxnreg_dec<Tr::kProducerRegs>();
    if constexpr (kDqDirect) {
      // Warps 1 and 2: the finalizers of consumer warpgroups 0 and 1's dQ (off the consumers'
      // path: summing and storing in the consumer threads cost ~25 % of the kernel's time).
      const int wgc = tid / 32 - 1;
      if (wgc == 0 || wgc == 1) {
        // The in-order walk's one item, its one key tile (the direct dQ runs without causal
        // mask or window: every query step of the sequence, heads outer, as the consumers).
        // Written for the producer's 24 registers: the general walk spilled there.
        it = cta_item(p.Hkv, p.B);
        qs = seq_range(p.q_offsets, it.b, p.Tq);
        ks = seq_range(p.kv_offsets, it.b, p.Tk);
        const int mode = dq_mode_of();
        if (wgc * 64 >= p.D || mode == 0 || (mode == 1 && it.tile != 0)) return;
        const int c = static_cast<int>(cluster::rank()), lane_f = tid & 31;
        const unsigned char* buf = sdq + wgc * wsbwd::DqStage::kBytes;
        const int cols = ((p.D + 7) / 8) * 8 - wgc * 64;  // dq's width: gdpa.cu kernel_layout
        T* dq_seq = static_cast<T*>(p.dq) + int64_t(qs.begin) * p.dq_row_stride + wgc * 64;
        uint32_t n = 0;
        for (int h = it.z * G; h < (it.z + 1) * G; ++h) {
          for (int i0 = 0; i0 < qs.len; i0 += BM, ++n) {
            T* dq_rows = dq_seq + int64_t(i0) * p.dq_row_stride + int64_t(h) * p.dq_head_stride;
            bulk::wait(&staged[wgc], n & 1);
            if (mode == 2) {
              wsbwd::DqStage::finalize_warp<T>(buf + c * wsbwd::DqStage::kBoxBytes,
                                               buf + (c ^ 1) * wsbwd::DqStage::kBoxBytes, true,
                                               lane_f, dq_rows + c * 32, p.dq_row_stride,
                                               qs.len - i0, cols - c * 32);
            } else {
              wsbwd::DqStage::finalize_warp<T>(buf, buf, false, lane_f, dq_rows, p.dq_row_stride,
                                               qs.len - i0, cols);
              wsbwd::DqStage::finalize_warp<T>(buf + wsbwd::DqStage::kBoxBytes, buf, false,
                                               lane_f, dq_rows + 32, p.dq_row_stride, qs.len - i0,
                                               cols - 32);
            }
            bulk::arrive(&slot_free[wgc]);  // every lane: its own reads
            if (mode == 2) {
              cluster::arrive_remote(cluster::map_peer(mma::smem_addr(&peer_free[wgc]), c ^ 1));
            }
          }
        }
        // The peer finalizer's last arrival on this CTA's barrier: shared memory must outlive it.
        if (mode == 2 && n > 0) bulk::wait(&peer_free[wgc], (n - 1) & 1);
        return;
      }
    }
    if (tid != 0) return;
    tma::prefetch_map(&map_q);
    tma::prefetch_map(&map_k);
    tma::prefetch_map(&map_v);
    tma::prefetch_map(&map_do);
    uint32_t slot = 0, kv_n = 0;  // steps / K-V tiles this CTA has loaded so far
    BwdWsWalk<kList> walk(sched, capacity);
    while (walk.next(p, it, qs, ks)) {
      const int hk = it.z;
      for (int tile = it.tile; tile * BN < ks.len; tile += it.tiles) {
        const int j0 = tile * BN;
        const Tile t = tile_steps(j0);
        if (t.steps == 0) continue;
        ring.producer_kv_acquire(kv_n);
        bulk::arrive_expect_tx(ring.full_kv(), 2 * Tr::kKVBytes);
#pragma unroll
        for (int c = 0; c < kBoxes; ++c) {
          const int off = c * BN * 128;
          tma::load_3d(sk + off, &map_k, c * Tr::kBoxCols, hk, ks.begin + j0, ring.full_kv());
          tma::load_3d(sv + off, &map_v, c * Tr::kBoxCols, hk, ks.begin + j0, ring.full_kv());
        }
        ++kv_n;
        for (int st = 0; st < t.steps; ++st, ++slot) {
          const int h = hk * G + st / t.nq, i0 = t.q_start + (st % t.nq) * BM;
          const uint32_t stage = slot % S;
          ring.producer_step_acquire(slot);
          bulk::arrive_expect_tx(ring.full(slot), 2 * Tr::kQBytes);
#pragma unroll
          for (int c = 0; c < kBoxes; ++c) {
            const int off = stage * Tr::kQBytes + c * BM * 128;
            tma::load_3d(sq + off, &map_q, c * Tr::kBoxCols, h, qs.begin + i0, ring.full(slot));
            tma::load_3d(sdo + off, &map_do, c * Tr::kBoxCols, h, qs.begin + i0, ring.full(slot));
          }
        }
      }
    }
    return;
  }

  // Consumer warpgroups.
  wgmma::setmaxnreg_inc<Tr::kConsumerRegs>();
  const int ctid = tid - 128, wg = ctid / 128,
            lane = tid & 31;
  const uint32_t sk_addr = mma::smem_addr(sk), sv_addr = mma::smem_addr(sv),
                 sq_addr = mma::smem_addr(sq), sdo_addr = mma::smem_addr(sdo),
                 sds_addr = mma::smem_addr(sds);
  const float ds_scale = p.qk_scale * p.pre_scale;
  // The shared-memory base of a product's operands, made opaque where it is used: otherwise ptxas
  // hoists the 24 loop-invariant K / V descriptors out of the step loop and, at the 240-register
  // cap of the activation phase, keeps them in local memory (a first build spilled 136 bytes).
  auto here = [](uint32_t a) {
    asm volatile("" : "+r"(a));
    return a;
  };
  // The thread's index read again where a per-thread offset is needed after the activation phase
  // (the dQ columns, the epilogue's rows): kept live across it, such offsets were spilled.
  auto thread_now = [] {
    uint32_t t;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
    return static_cast<int>(t);
  };
  // Zeroes rows [from, rows) of two tiles in shared memory for this warpgroup's tensor cores
  // (the thread's index read again: a rare branch, whose offsets were otherwise spilled).
  auto zero_tail = [&](unsigned char* a, unsigned char* b2, int rows, int from) {
    const int t_now = thread_now() - 128;
    wsbwd::zero_rows<kBoxes>(a, rows, from, t_now & 127);
    wsbwd::zero_rows<kBoxes>(b2, rows, from, t_now & 127);
    bulk::fence_proxy_async();
    wgmma::named_barrier_sync(Tr::kZeroBar + t_now / 128, 128);
  };

  uint32_t slot = 0, kv_n = 0;
  // kDqDirect: steps this warpgroup staged (and, of them, pushed to the peer).
  uint32_t dq_steps = 0, dq_pairs = 0;
  BwdWsWalk<kList> walk(sched, capacity);
  while (walk.next(p, it, qs, ks)) {
    const int hk = it.z;
    const int dq_mode = dq_mode_of();
    for (int tile = it.tile; tile * BN < ks.len; tile += it.tiles) {
      const int j0 = tile * BN;
      const Tile t = tile_steps(j0);
      const int krows = min(ks.len - j0, BN);

      float acc_dk[D / 8][4], acc_dv[D / 8][4];
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

      if (t.steps > 0) {
        ring.consumer_kv_wait(kv_n);
        if (krows < BN) zero_tail(sk, sv, BN, krows);  // the next sequence's keys
      }

      for (int st = 0; st < t.steps; ++st, ++slot) {
        const int h = hk * G + st / t.nq, i0 = t.q_start + (st % t.nq) * BM;
        const uint32_t stage = slot % S;
        ring.consumer_step_wait(slot);
        if (qs.len - i0 < BM) {  // the next sequence's queries
          zero_tail(sq + stage * Tr::kQBytes, sdo + stage * Tr::kQBytes, BM, qs.len - i0);
        }
        const uint32_t sq_s = sq_addr + stage * Tr::kQBytes, sdo_s = sdo_addr + stage * Tr::kQBytes;

        float s[BM / 8][4], dp[BM / 8][4];
        const uint32_t k_now = here(sk_addr), v_now = here(sv_addr);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          MmaS::template ss<0>(s, wgmma::desc_k_major<BN>(k_now, wg * 64, kk),
                               wgmma::desc_k_major<BM>(sq_s, 0, kk), kk > 0);
        }
        wgmma::commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          MmaS::template ss<0>(dp, wgmma::desc_k_major<BN>(v_now, wg * 64, kk),
                               wgmma::desc_k_major<BM>(sdo_s, 0, kk), kk > 0);
        }
        wgmma::commit();

        // Sᵀ done (dPᵀ may still run): Pᵀ packed, s <- the dS factor (masked entries 0 in both).
        wgmma::wait<1>();
        wgmma::fence_regs(s);
        uint32_t pa[BM / 16][4], dsa[BM / 16][4];
        // The warp's first key row, from the thread's index read again (kept live, it was
        // spilled).
        const int t_row = thread_now() - 128, row0 = (t_row / 128) * 64 + ((t_row / 32) & 3) * 16;
        const int key0 = j0 + row0;
        // Causal / window: scores zeroed first give P = φ(0) = 0, the dS factor is zeroed after.
        const bool cut = !tile_fully_visible(p.causal, p.window, i0, i0 + BM - 1, key0, key0 + 15);
        const uint32_t cut_bits =
            cut ? window_mask_bits<true, BM / 8>(key0, i0, p.causal, p.window) : 0u;
        if (cut) zero_bits(s, cut_bits);
        act_bwd_p_tile<T, BM / 8>(s, pa, p.act, p.pre_scale, ds_scale);
        if (cut) zero_bits(s, cut_bits);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          MmaD::template rs<1>(acc_dv, pa[kk], wgmma::desc_n_major<BM>(sdo_s, kk), 1);
        }
        wgmma::commit();

        // dPᵀ done (dV may still run): dSᵀ = F ⊙ dPᵀ, rounded to the value type.
        wgmma::wait<1>();
        wgmma::fence_regs(dp);
#pragma unroll
        for (int i = 0; i < BM / 8; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[i][e] *= s[i][e];
        pack_a<T, BM>(dsa, dp);
        auto issue_dk = [&] {
          wgmma::fence();
#pragma unroll
          for (int kk = 0; kk < BM / 16; ++kk) {
            MmaD::template rs<1>(acc_dk, dsa[kk], wgmma::desc_n_major<BM>(sq_s, kk), 1);
          }
          wgmma::commit();
        };

        float dq[8][4];
        const uint32_t sds_s = sds_addr + (slot & 1) * Tr::kDsBytes;
        if (kFusedDq && (!kDqDirect || dq_mode != 0)) {
          // dS[q][key] from dsa: lane 8i + r addresses query row r of matrix i.
          const int t_ds = thread_now() - 128, l_ds = t_ds & 31, mi = l_ds >> 3, r = l_ds & 7;
          const int row0_ds = (t_ds / 128) * 64 + ((t_ds / 32) & 3) * 16;
#pragma unroll
          for (int kk = 0; kk < BM / 16; ++kk) {
            const uint32_t at =
                wgmma::sw128_offset<BM>(16 * kk + (mi >> 1) * 8 + r, row0_ds + (mi & 1) * 8);
            wgmma::stmatrix_x4_trans(sds_s + at, dsa[kk]);
          }
          wgmma::fence_async_smem();
          // This warpgroup's dQ staging buffer is free once its issuer's last reduction has read
          // it (a step ago: normally long done); the barrier below hands that on. (Direct dQ: the
          // finalizers' reads are waited for below, slot_free / peer_free.)
          if (!kDqDirect && (thread_now() & 127) == 0) wsbwd::DqStage::issuer_wait_free();
          // Both halves of dS are written; both warpgroups finished step slot - 1's dQ (they waited
          // for it before arriving here), so buffer (slot + 1) % 2 is free for the next step.
          wgmma::named_barrier_sync(Tr::kDsBar, Tr::kConsumerThreads);
          const uint32_t kcol = here(sk_addr) + wg * (BN * 128);
          wgmma::fence();
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            MmaQ::template ss<1>(dq, wgmma::desc_k_major<BM>(sds_s, 0, kk),
                                 wgmma::desc_n_major<BN>(kcol, kk), kk > 0);
          }
          wgmma::commit();
          issue_dk();  // after dQ (FlashAttention-3's order): dQ's write-out below overlaps dK
          wgmma::wait<1>();  // dV and dQ done; dK still running
          wgmma::fence_regs(dq);
          const int t_now = thread_now() - 128, wg_now = t_now / 128, w_now = t_now & 127;
          const int c0 = wg_now * 64;
          if (kDqDirect && c0 < p.D) {
            // Stage this step's dQ for the finalizer warp (its sum: finalize_warp): alone, both
            // halves here; with the peer, half c here (slot c) and half 1 - c into the peer's
            // slot c (st.async, counted on the peer's staged barrier). Slots are reused once the
            // finalizers (this CTA's; the peer's, for the pushed half) have read the last step's.
            unsigned char* buf = sdq + wg_now * wsbwd::DqStage::kBytes;
            const int warp4 = (w_now / 32) & 3, rows = qs.len - i0, l_now = t_now & 31;
            if (dq_steps > 0) bulk::wait(&slot_free[wg_now], (dq_steps - 1) & 1);
            if (dq_mode == 1) {
              wsbwd::DqStage::store(buf, dq, warp4, l_now, rows);
            } else {
              const int c = static_cast<int>(cluster::rank());
              if (dq_pairs > 0) bulk::wait(&peer_free[wg_now], (dq_pairs - 1) & 1);
              const uint32_t peer = c ^ 1;
              const uint32_t to = cluster::map_peer(mma::smem_addr(buf), peer) +
                                  c * wsbwd::DqStage::kBoxBytes,
                             to_bar = cluster::map_peer(mma::smem_addr(&staged[wg_now]), peer);
              if (c == 0) {
                wsbwd::DqStage::push_box<1>(to, dq, warp4, l_now, rows, to_bar);
                wsbwd::DqStage::store_box<0>(buf, dq, warp4, l_now, rows);
              } else {
                wsbwd::DqStage::push_box<0>(to, dq, warp4, l_now, rows, to_bar);
                wsbwd::DqStage::store_box<1>(buf + wsbwd::DqStage::kBoxBytes, dq, warp4, l_now,
                                             rows);
              }
              ++dq_pairs;
            }
            if (dq_mode == 2 && warp4 == 0 && l_now == 0) {  // every thread: its own stores
              bulk::arrive_expect_tx(&staged[wg_now], wsbwd::DqStage::kBoxBytes);
            } else {
              bulk::arrive(&staged[wg_now]);
            }
            ++dq_steps;
          } else if (!kDqDirect && c0 < p.D) {  // columns past D (the workspace's width): none
            unsigned char* buf = sdq + wg_now * wsbwd::DqStage::kBytes;
            wsbwd::DqStage::store(buf, dq, (w_now / 32) & 3, t_now & 31, qs.len - i0);
            bulk::fence_proxy_async();
            wgmma::named_barrier_sync(Tr::kDqBar + wg_now, 128);
            if (w_now == 0) wsbwd::DqStage::issue(buf, &map_dq, c0, h, qs.begin + i0, 0);
          }
        } else {
          issue_dk();
        }
        wgmma::wait<0>();  // dV, dK (the stage's last readers) and dQ done
        wgmma::fence_regs(acc_dv);
        wgmma::fence_regs(acc_dk);
        ring.consumer_step_release(slot, lane);
      }
      if (t.steps > 0) {  // every dQ of the tile is complete: K and V go back to the producer
        ring.consumer_kv_release(lane);
        ++kv_n;
      }

      const int64_t kv_row = int64_t(ks.begin) + j0;
      T* dk = static_cast<T*>(p.dk) + kv_row * p.dkv_row_stride + hk * p.dkv_head_stride;
      T* dv = static_cast<T*>(p.dv) + kv_row * p.dkv_row_stride + hk * p.dkv_head_stride;
      const int t_now = thread_now() - 128, row0_now = (t_now / 128) * 64 + ((t_now / 32) & 3) * 16;
      store_rows<T, D>(dk, p.dkv_row_stride, row0_now, krows, 0, p.D, acc_dk, 1.f);
      store_rows<T, D>(dv, p.dkv_row_stride, row0_now, krows, 0, p.D, acc_dv, p.qk_scale);
    }
  }
  if constexpr (kFusedDq && !kDqDirect) {
    if ((thread_now() & 127) == 0) wsbwd::DqStage::issuer_drain();
  }
#endif  // ATTNKIT_HAS_WGMMA
}

// The work items the launcher enumerates for a max key length hint: the hint's key tiles per (kv
// head, sequence), clamped like cta_grid.
inline int64_t bwd_ws_items(int64_t Hkv, int64_t B, int max_seq_len_kv) {
  return cta_grid((int64_t(max_seq_len_kv) + BwdWsTraits::kBlockN - 1) / BwdWsTraits::kBlockN,
                  Hkv, B);
}
inline int64_t bwd_ws_items(const BwdWgmmaParams& p, int max_seq_len_kv) {
  return bwd_ws_items(p.Hkv, p.B, max_seq_len_kv);
}

// p.dq_accum != null: dK, dV and (added into that zero-filled fp32 workspace) dQ; the caller
// converts the workspace. Null: dK and dV here, dQ by the mma.sync dQ kernel of bwd_mma.cuh (no
// atomics: bit-identical run to run). p.dq_direct: dQ summed in the clusters and stored into dq
// (kDqDirect, above; also bit-identical run to run). The caller takes this kernel only for q and k
// with fewer than 2^31 - 1024 rows (the maps' coordinates are int32).
// sched: nullptr launches one CTA per work item in cta_item's order (dense batches: every item
// the same work); else a workspace of ws_sched_elems(bwd_ws_items(p, max_seq_len_kv)) int32,
// into which the jagged schedule is built first (one small kernel on the same stream), walked by
// one CTA per SM (the shared memory allows no second one): no CTA of an empty item is launched,
// the long items run first, and a CTA's next K / V load overlaps its previous tile's dK / dV
// stores.
template <typename T>
cudaError_t launch_gdpa_bwd_ws(const BwdWgmmaParams& p, const BwdWsMaps& maps, int max_seq_len_q,
                               int max_seq_len_kv, int32_t* sched, cudaStream_t stream) {
  using Tr = BwdWsTraits;
  static_assert(Tr::kBlockN == WsSchedTraits::kTileRows && Tr::kBlockM == WsSchedTraits::kStepRows,
                "the list's tiles are the backward's key tiles, its cost steps the query steps");
  const bool fused = p.dq_accum != nullptr;
  cudaError_t err = cudaSuccess;
  if (!fused && !p.dq_direct) {
    if ((err = launch_gdpa_bwd_dq_mma<T, Tr::kD>(p, max_seq_len_q, stream)) != cudaSuccess)
      return err;
  }
  const bool list = sched != nullptr;
  const int64_t items = bwd_ws_items(p, max_seq_len_kv);
  if (p.dq_direct) {
    // Clusters of a sequence's key tiles (at most two: choose.h bwd_ws_direct_dq). Rows of no
    // sequence and of keyless ones: zeros; sequences longer than the clusters' tiles: the mma.sync
    // dQ kernel, one CTA per (head, sequence), which the others leave at once.
    const int tiles = static_cast<int>(items / (int64_t(p.Hkv) * p.B));
    if (list || fused || tiles < 1 || tiles > 2) return cudaErrorInvalidValue;
    err = launch_gdpa_zero_keyless_rows<T>(static_cast<T*>(p.dq), p.dq_row_stride, p.q_offsets,
                                           p.kv_offsets, p.B, p.Tq, p.Tk, -1, stream);
    if (err != cudaSuccess) return err;
    BwdParams rest = p;
    rest.dq_kv_len_above = tiles * Tr::kBlockN;
    if ((err = launch_gdpa_bwd_dq_mma<T, Tr::kD>(rest, 1, stream)) != cudaSuccess) return err;
    auto kernel = gdpa_bwd_ws_kernel<T, true, false, true>;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
    if (err != cudaSuccess) return err;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>(items));
    cfg.blockDim = dim3(Tr::kThreads);
    cfg.dynamicSmemBytes = Tr::kSmemBytes;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(tiles);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, p, sched, items, maps.q, maps.k, maps.v, maps.dout,
                              maps.dq_accum);
  }
  auto kernel = fused  ? (list ? gdpa_bwd_ws_kernel<T, true, true>
                               : gdpa_bwd_ws_kernel<T, true, false>)
                : list ? gdpa_bwd_ws_kernel<T, false, true>
                       : gdpa_bwd_ws_kernel<T, false, false>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  unsigned grid = static_cast<unsigned>(items);
  if (list) {
    int dev = 0, sms = 0;
    if ((err = cudaGetDevice(&dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
      return err;
    grid = std::min(grid, static_cast<unsigned>(sms > 0 ? sms : 1));
    const int kv_tiles = static_cast<int>(items / (int64_t(p.Hkv) * p.B));
    gdpa_ws_schedule_kernel<true><<<1, WsSchedTraits::kThreads, 0, stream>>>(p, kv_tiles, sched);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, sched, items, maps.q, maps.k, maps.v,
                                                         maps.dout, maps.dq_accum);
  return cudaGetLastError();
}

}  // namespace gdpa
}  // namespace attnkit

#endif  // ATTNKIT_HAS_GDPA_BWD_WS
