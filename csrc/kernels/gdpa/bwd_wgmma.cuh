// GDPA backward on Hopper warpgroup tensor cores (sm_90a, bf16 / fp16, padded head dim 128).
//
// One kernel computes dK and dV and, fused, dQ:
// CTA = (sequence, 128-key tile, kv head) with two warpgroups; warpgroup w owns keys w*64 .. +64.
// K and V stay in shared memory (sw128); the 64-row query tiles of the G query heads of the kv head
// (causal / window: only those that see the key tile) stream through a two-stage cp.async ring
// (Q and dO per stage, wgmma::CpAsyncRing). Per query tile each warpgroup issues, back to back,
//   Sᵀ[64 keys x 64 q]  = K_w·Qᵀ            wgmma ss (A = K rows, B = Q, both K-major)
//   dPᵀ[64 keys x 64 q] = V_w·dOᵀ           wgmma ss
// then Pᵀ = φ(pre·Sᵀ) and dSᵀ = qk·pre·φ′(pre·Sᵀ) ⊙ dPᵀ in registers (causal / window entries zeroed,
// both rounded to the value type as in bwd_mma.cuh), and
//   dV_w[64 x D] += Pᵀ·dO                   wgmma rs (A = Pᵀ from registers, B = dO N-major)
//   dK_w[64 x D] += dSᵀ·Q                   wgmma rs (B = Q N-major)
// dSᵀ is also stored transposed (stmatrix .trans) as dS[64 q][128 keys] into a double-buffered
// sw128 tile; after one barrier of the two warpgroups, warpgroup w computes
//   dQ[64 q x 64] (columns w*64 .. +64) = dS·K[:, w*64 .. +64]   wgmma ss (B = K N-major)
// and adds it to a zero-filled fp32 workspace with vector reductions (red.global.add.v2.f32): the
// sum over key tiles is in arrival order, so dQ's last bits vary run to run. kFusedDq = false
// skips dS and dQ (the deterministic mode: the launcher runs the mma.sync dQ kernel instead).
// Queries and keys past the sequence are zero-filled (Q, dO, K, V), so they add nothing (φ(0) = 0);
// their gradient rows are never written.
#pragma once

#include "kernels/common/wgmma.cuh"
#include "kernels/gdpa/activation_gpu.cuh"
#include "kernels/gdpa/bwd_mma.cuh"
#include "kernels/gdpa/params.h"
#include "kernels/gdpa/tile.cuh"

namespace attnkit {
namespace gdpa {

// BwdParams plus the fp32 dQ workspace ([Tq, H, D] with these strides; null without fused dQ).
struct BwdWgmmaParams : BwdParams {
  float* dq_accum;
  int64_t dqa_row_stride, dqa_head_stride;
};

struct BwdWgmmaTraits {
  static constexpr int D = 128;
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBlockN = 64 * kWarpGroups;  // keys per CTA
  static constexpr int kBlockM = 64;                // queries per step
  static constexpr int kStages = 2;
  static constexpr int kKVBytes = kBlockN * D * 2;  // K or V
  static constexpr int kQBytes = kBlockM * D * 2;   // one Q or dO stage
  static constexpr int kDsBytes = kBlockM * kBlockN * 2;
  // + 1 KB so the tiles can start 1024-byte aligned whatever the dynamic base is.
  static constexpr int kSmemBytes = 1024 + 2 * kKVBytes + 2 * kStages * kQBytes + 2 * kDsBytes;
};

#if ATTNKIT_HAS_WGMMA
// Four 8x8 16-bit matrices (registers in the m16n8k16 fragment layout: lane holds row lane/4,
// columns 2*(lane%4) + {0,1}) stored transposed: lane 8i + r gives the address of stored row r of
// matrix i, which receives column r of the fragment (its 8 rows, contiguous).
ATTNKIT_DEVICE ATTNKIT_INLINE void stmatrix_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n"
               ::"r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}
#endif

template <typename T, bool kFusedDq>
__global__ void __launch_bounds__(BwdWgmmaTraits::kThreads, 1)
    gdpa_bwd_wgmma_kernel(const BwdWgmmaParams p) {
#if ATTNKIT_HAS_WGMMA
  using Tr = BwdWgmmaTraits;
  using MmaS = wgmma::Wgmma<T, Tr::kBlockM>;  // Sᵀ, dPᵀ: N = queries of the step
  using MmaD = wgmma::Wgmma<T, Tr::D>;        // dK, dV: N = head dim
  using MmaQ = wgmma::Wgmma<T, 64>;           // dQ: N = the warpgroup's 64 head-dim columns
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::D, NT = Tr::kThreads;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* sk = smem;
  unsigned char* sv = sk + Tr::kKVBytes;
  unsigned char* sq = sv + Tr::kKVBytes;                 // [kStages] Q tiles
  unsigned char* sdo = sq + Tr::kStages * Tr::kQBytes;   // [kStages] dO tiles
  unsigned char* sds = sdo + Tr::kStages * Tr::kQBytes;  // [2] dS tiles [BM][BN]
  const uint32_t sk_addr = mma::smem_addr(sk), sv_addr = mma::smem_addr(sv),
                 sq_addr = mma::smem_addr(sq), sdo_addr = mma::smem_addr(sdo),
                 sds_addr = mma::smem_addr(sds);

  const int tid = threadIdx.x, wg = tid / 128, lane = tid & 31;
  const int warp_row0 = wg * 64 + ((tid / 32) & 3) * 16;  // the warp's first key row in the tile
  const CtaItem it = cta_item(p.Hkv, p.B);
  const int b = it.b, hk = it.z, G = p.H / p.Hkv;
  const SeqRange qs = seq_range(p.q_offsets, b, p.Tq);
  const SeqRange ks = seq_range(p.kv_offsets, b, p.Tk);
  // Pointers are formed where they are used (from p and the two ranges), so that they do not
  // hold registers through the activation phase, where the kernel is closest to 255.
  const T* fallback = static_cast<const T*>(p.q);

  __shared__ uint64_t bars[2 * Tr::kStages];
  const wgmma::CpAsyncRing<Tr::kStages> ring{bars, bars + Tr::kStages};
  if (tid == 0) ring.init(NT);
  __syncthreads();
  uint32_t g = 0;  // query steps this CTA has streamed through the ring so far

  // Hints only size the grid: a longer sequence is covered by striding over its key tiles.
  for (int tile = it.tile; tile * BN < ks.len; tile += it.tiles) {
    const int j0 = tile * BN;
    // The queries that see some key of this tile (causal: none before j0; window: |i - j| <= w);
    // query tiles start at the first of them, any row.
    const Span qr = query_span(p.causal, p.window, j0, min(j0 + BN, ks.len) - 1, qs.len);
    const int q_start = static_cast<int>(qr.lo);
    const int nq = qr.hi > qr.lo ? (static_cast<int>(qr.hi) - q_start + BM - 1) / BM : 0;
    const int steps = G * nq;

    // Step st (head hk*G + st / nq, query tile st % nq) -> ring slot g + st; K and V ride with
    // step 0.
    auto produce = [&](int st) {
      const uint32_t slot = g + st;
      ring.producer_acquire(slot);
      const int stage = slot % Tr::kStages;
      const int h = hk * G + st / nq, i0 = q_start + (st % nq) * BM;
      if (st == 0) {
        const T* k = static_cast<const T*>(p.k) + (int64_t(ks.begin) + j0) * p.k_row_stride +
                     hk * p.k_head_stride;
        const T* v = static_cast<const T*>(p.v) + (int64_t(ks.begin) + j0) * p.v_row_stride +
                     hk * p.v_head_stride;
        wgmma::load_tile_sw128<BN, D, NT>(sk, k, p.k_row_stride, ks.len - j0, p.D, fallback, tid);
        wgmma::load_tile_sw128<BN, D, NT>(sv, v, p.v_row_stride, ks.len - j0, p.D, fallback, tid);
      }
      const T* q = static_cast<const T*>(p.q) + (int64_t(qs.begin) + i0) * p.q_row_stride +
                   h * p.q_head_stride;
      const T* dout = static_cast<const T*>(p.dout) + (int64_t(qs.begin) + i0) * p.do_row_stride +
                      h * p.do_head_stride;
      wgmma::load_tile_sw128<BM, D, NT>(sq + stage * Tr::kQBytes, q, p.q_row_stride, qs.len - i0,
                                        p.D, fallback, tid);
      wgmma::load_tile_sw128<BM, D, NT>(sdo + stage * Tr::kQBytes, dout, p.do_row_stride,
                                        qs.len - i0, p.D, fallback, tid);
      ring.producer_commit(slot);
    };

    float acc_dk[D / 8][4], acc_dv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

    if (steps > 0) produce(0);
    for (int st = 0; st < steps; ++st) {
      const uint32_t slot = g + st;
      const int h = hk * G + st / nq, i0 = q_start + (st % nq) * BM;
      // Step st + 1 goes into the stage step st - 1 used, once every thread released it.
      if (st + 1 < steps) produce(st + 1);
      ring.consumer_wait(slot);
      const uint32_t sq_s = sq_addr + (slot % Tr::kStages) * Tr::kQBytes;
      const uint32_t sdo_s = sdo_addr + (slot % Tr::kStages) * Tr::kQBytes;

      float s[BM / 8][4], dp[BM / 8][4];
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        MmaS::template ss<0>(s, wgmma::desc_k_major<BN>(sk_addr, wg * 64, kk),
                             wgmma::desc_k_major<BM>(sq_s, 0, kk), kk > 0);
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        MmaS::template ss<0>(dp, wgmma::desc_k_major<BN>(sv_addr, wg * 64, kk),
                             wgmma::desc_k_major<BM>(sdo_s, 0, kk), kk > 0);
      }
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_regs(s);
      wgmma::fence_regs(dp);

      // s <- Pᵀ, dp <- dSᵀ
      act_bwd_tile<BM / 8>(s, dp, p.act, p.pre_scale, p.qk_scale * p.pre_scale);
      const int key0 = j0 + warp_row0;
      if (!tile_fully_visible(p.causal, p.window, i0, i0 + BM - 1, key0, key0 + 15)) {
        window_mask<true>(s, key0, i0, p.causal, p.window);  // causal and / or window
        window_mask<true>(dp, key0, i0, p.causal, p.window);
      }
      uint32_t pa[BM / 16][4], dsa[BM / 16][4];
      pack_a<T, BM>(pa, s);  // P rounded to the value type, as in the forward
      pack_a<T, BM>(dsa, dp);

      const uint32_t sds_s = sds_addr + (slot & 1) * Tr::kDsBytes;
      if constexpr (kFusedDq) {
        // dsa[kk] holds keys warp_row0 + {0..7, 8..15} x queries 16kk + {0..7, 8..15} as the
        // four 8x8 matrices (k0,q0), (k8,q0), (k0,q8), (k8,q8); lane 8i + r addresses query row
        // r of matrix i in dS[q][key].
        const int mi = lane >> 3, r = lane & 7;
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          stmatrix_x4_trans(sds_s + wgmma::sw128_offset<BM>(16 * kk + (mi >> 1) * 8 + r,
                                                            warp_row0 + (mi & 1) * 8),
                            dsa[kk]);
        }
        wgmma::fence_async_smem();  // generic-proxy stores, read next by wgmma
      }

      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        MmaD::template rs<1>(acc_dv, pa[kk], wgmma::desc_n_major<BM>(sdo_s, kk), 1);
      }
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        MmaD::template rs<1>(acc_dk, dsa[kk], wgmma::desc_n_major<BM>(sq_s, kk), 1);
      }
      wgmma::commit();

      if constexpr (kFusedDq) {
        // Both halves of dS are written (and the other warpgroup finished reading this buffer two
        // steps ago: it waited for its dQ product before arriving here last step).
        wgmma::named_barrier_sync(1, NT);
      }
      // dV and dK first (the barrier wait overlaps them): pa and dsa die before dQ's accumulator
      // is live, which keeps the kernel within 255 registers.
      wgmma::wait<0>();
      wgmma::fence_regs(acc_dv);
      wgmma::fence_regs(acc_dk);
      ring.consumer_release(slot);
      if constexpr (kFusedDq) {
        float dq[8][4];
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          MmaQ::template ss<1>(dq, wgmma::desc_k_major<BM>(sds_s, 0, kk),
                               wgmma::desc_n_major<BN>(sk_addr + wg * (BN * 128), kk), kk > 0);
        }
        wgmma::commit();
        wgmma::wait<0>();
        wgmma::fence_regs(dq);
        // dq: rows = queries i0 + (tid/32 & 3)*16 + lane/4 (+8), columns wg*64 + 8n + 2(lane%4).
        const int row0 = ((tid / 32) & 3) * 16 + (lane >> 2);
        float* dst = p.dq_accum + (int64_t(qs.begin) + i0) * p.dqa_row_stride +
                     int64_t(h) * p.dqa_head_stride;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = row0 + half * 8;
          if (row >= qs.len - i0) continue;
#pragma unroll
          for (int n = 0; n < 8; ++n) {
            const int col = wg * 64 + n * 8 + (lane & 3) * 2;
            if (col < p.D) {
              mma::atomic_add2(dst + row * p.dqa_row_stride + col, dq[n][2 * half],
                               dq[n][2 * half + 1]);
            }
          }
        }
      }
    }
    g += steps;
    const int64_t kv_row = int64_t(ks.begin) + j0;
    T* dk = static_cast<T*>(p.dk) + kv_row * p.dkv_row_stride + hk * p.dkv_head_stride;
    T* dv = static_cast<T*>(p.dv) + kv_row * p.dkv_row_stride + hk * p.dkv_head_stride;
    store_rows<T, D>(dk, p.dkv_row_stride, warp_row0, ks.len - j0, 0, p.D, acc_dk, 1.f);
    store_rows<T, D>(dv, p.dkv_row_stride, warp_row0, ks.len - j0, 0, p.D, acc_dv, p.qk_scale);
    __syncthreads();  // the next key tile overwrites K and V
  }
#endif
}

// p.dq_accum != null: dK, dV and (added into that zero-filled fp32 workspace) dQ by the fused
// kernel; the caller converts the workspace. Null: dK and dV by this kernel, dQ by the mma.sync
// dQ kernel of bwd_mma.cuh (no atomics: bit-identical run to run).
template <typename T>
cudaError_t launch_gdpa_bwd_wgmma(const BwdWgmmaParams& p, int max_seq_len_q, int max_seq_len_kv,
                                  cudaStream_t stream) {
  using Tr = BwdWgmmaTraits;
  const bool fused = p.dq_accum != nullptr;
  if (!fused) {
    const cudaError_t err = launch_gdpa_bwd_dq_mma<T, Tr::D>(p, max_seq_len_q, stream);
    if (err != cudaSuccess) return err;
  }
  auto kernel = fused ? gdpa_bwd_wgmma_kernel<T, true> : gdpa_bwd_wgmma_kernel<T, false>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const unsigned grid = cta_grid((max_seq_len_kv + Tr::kBlockN - 1) / Tr::kBlockN, p.Hkv, p.B);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace gdpa
}  // namespace attnkit
