// Flash attention backward on Hopper warpgroup tensor cores (sm_90a, fp16 / bf16, head dim 64 or
// 128), the atomic-dQ organisation of mma_bwd.cuh (FlashAttention-2 / -3) with wgmma products:
//
// CTA = (sequence, kv head, 128-key tile), two warpgroups; warpgroup w owns keys w*64 .. +63 and
// keeps their dK and dV (64 x D fp32 each) in registers. K and V sit in shared memory (sw128) for
// the whole CTA. The CTA walks every 64-row query tile its keys can see, for every query head of
// the GQA group (mma_bwd.cuh's step order and window bounds); Q, dO, lse and delta of a step
// stream through a two-stage cp.async ring (CpAsyncRing). Per step, per warpgroup:
//   S^T  = K_w Q^T,  dP^T = V_w dO^T     ss, M = 64 keys, N = 64 queries, K = head dim
//   P^T, dS^T elementwise                 (masks, scale and softcap's derivative folded in)
//   dV += P^T dO,  dK += dS^T Q           rs: P^T / dS^T packed from the accumulators into A
//                                          fragments, B = dO / Q read N-major
//   (without softcap P^T is computed while dP^T runs and dS^T while dV runs)
//   dS^T -> shared [128 keys][64 queries] (double-buffered), named barrier over both warpgroups
//   dQ[64 q, cols] = dS K                 ss, A = dS^T read M-major (transposed A), B = K N-major;
//                                          D = 128: warpgroup w takes columns w*64 .. +63;
//                                          D = 64: one warpgroup per step, alternating
//   dQ added to the zero-filled fp32 workspace with paired fp32 reductions (order varies run to
//   run, like mma_bwd's atomic dQ; deterministic mode keeps the mma.sync pair).
// Epilogue: dK, dV of the tile's keys (rows past the sequence end are never written).
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/common/wgmma.cuh"
#include "kernels/flash/fast_math.cuh"
#include "kernels/flash/mma_bwd.cuh"
#include "kernels/flash/params.h"

namespace attnkit {
namespace flash {
namespace wg {

// Debugging switch: -DATTNKIT_FLASH_WGMMA_BWD_DS_KMAJOR stores dS K-major ([queries][keys], 16-bit
// stores) and reads it as a plain K-major A operand, instead of dS^T read as a transposed A.
#ifdef ATTNKIT_FLASH_WGMMA_BWD_DS_KMAJOR
constexpr bool kDsKMajor = true;
#else
constexpr bool kDsKMajor = false;
#endif

template <int kD>
struct BwdTraits {
  static_assert(kD == 64 || kD == 128, "wgmma backward: head dim 64 or 128");
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kBN = 128;       // keys per CTA (64 per warpgroup)
  static constexpr int kBM = 64;        // query rows per step
  static constexpr int kStages = 2;     // Q / dO / lse / delta ring
  static constexpr int kKVBytes = kBN * kD * 2;   // K or V
  static constexpr int kQBytes = kBM * kD * 2;    // Q or dO, one stage
  static constexpr int kDsBytes = kBN * kBM * 2;  // dS^T, one buffer
  static constexpr int kSmemBytes =
      1024 + 2 * kKVBytes + kStages * 2 * kQBytes + 2 * kDsBytes + kStages * 2 * kBM * 4;
};

#if ATTNKIT_HAS_WGMMA
// load_tile_sw128 without unrolling: the copies run while dK / dV hold half the registers, and
// an unrolled loop computes every 64-bit source address at once (as in mma_bwd.cuh's load_rows).
template <int ROWS, int kD, int THREADS, typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE void load_rows_sw128(unsigned char* tile, const T* gmem, int64_t row_stride,
                                                   int rows_valid, int tid) {
  constexpr int kChunksPerRow = kD / 8;
  static_assert(ROWS * kChunksPerRow % THREADS == 0, "whole chunks per thread");
#pragma unroll 1
  for (int c = tid; c < ROWS * kChunksPerRow; c += THREADS) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool ok = row < rows_valid;
    ::attnkit::mma::cp_async_16(tile + wgmma::sw128_offset<ROWS>(row, col),
                                ok ? gmem + row * row_stride + col : gmem, ok ? 16 : 0);
  }
}

// P^T in place of S^T (a warp's 16 keys x kNT * 8 queries, the m16n8 accumulator layout), no
// softcap: mma::probs_and_grads<false>'s first half. kMasked: the element mask, in its own
// instantiation (mma_bwd.cuh's probs_and_grads says why).
template <int kNT, bool kMasked>
ATTNKIT_DEVICE ATTNKIT_INLINE void probs_t_tile(float (&sc)[kNT][4], const float* lse_t,
                                                const int (&col_lo)[2], const int (&col_hi)[2],
                                                float scale) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const float2 lse2 = *reinterpret_cast<const float2*>(lse_t + nt * 8 + 2 * t4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qc = nt * 8 + (e % 2);  // the query column, less 2 * t4
      float pv = ex2_approx(sc[nt][e] * (scale * kLog2e) - (e % 2 ? lse2.y : lse2.x) * kLog2e);
      // A select, not a product: a row that sees nothing has lse -inf (pv would be +inf).
      if (kMasked && (qc < col_lo[e / 2] || qc > col_hi[e / 2])) pv = 0.f;
      sc[nt][e] = pv;
    }
  }
}

template <int kNT>
ATTNKIT_DEVICE ATTNKIT_INLINE void probs_t(float (&sc)[kNT][4], const float* lse_t, const int (&col_lo)[2],
                                           const int (&col_hi)[2], bool full, float scale) {
  if (full) {
    probs_t_tile<kNT, false>(sc, lse_t, col_lo, col_hi, scale);
  } else {
    probs_t_tile<kNT, true>(sc, lse_t, col_lo, col_hi, scale);
  }
}

// dS^T = P^T (dP^T - delta) scale in place of dP^T (masked elements have P = 0).
template <int kNT>
ATTNKIT_DEVICE ATTNKIT_INLINE void grads_t(float (&dp)[kNT][4], const float (&pt)[kNT][4],
                                           const float* delta_t, float scale) {
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const float2 dlt = *reinterpret_cast<const float2*>(delta_t + nt * 8 + 2 * t4);
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[nt][e] = pt[nt][e] * (dp[nt][e] - (e % 2 ? dlt.y : dlt.x)) * scale;
  }
}

// fp32 accumulators (M = 64, N = 8 * K) -> the A fragments of K / 16 k-steps (as wgmma_fwd.cuh).
template <typename T, int K>
ATTNKIT_DEVICE ATTNKIT_INLINE void pack_frags(uint32_t (&a)[K][4], const float (&c)[2 * K][4]) {
#pragma unroll
  for (int kk = 0; kk < K; ++kk) {
    a[kk][0] = ::attnkit::mma::pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = ::attnkit::mma::pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = ::attnkit::mma::pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = ::attnkit::mma::pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}
#endif

// kSoftcap: scores go through cap·tanh(·/cap), a separate instantiation (as in the forward) so
// that the plain one carries neither the tanh nor its registers.
template <typename T, int kD, bool kSoftcap>
__global__ void __launch_bounds__(256, 1)
    bwd_kernel(Params p, const T* __restrict__ dout, const T* __restrict__ q,
               const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ lse,
               const float* __restrict__ delta, float* __restrict__ dq_accum, T* __restrict__ dk,
               T* __restrict__ dv) {
#if ATTNKIT_HAS_WGMMA
  namespace cm = ::attnkit::mma;  // the sm80 building blocks (pack2, cp.async, atomics)
  using Tr = BwdTraits<kD>;
  using Mma64 = wgmma::Wgmma<T, 64>;   // S^T, dP^T (N = 64 queries); dQ (N = 64 columns)
  using MmaD = wgmma::Wgmma<T, kD>;    // dV, dK (N = head dim)
  constexpr int BM = Tr::kBM, BN = Tr::kBN, NT = Tr::kThreads, kStages = Tr::kStages;
  constexpr int kNT = BM / 8, kDT = kD / 8;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (cm::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* sk = smem;                                // [BN][kD] sw128
  unsigned char* sv = sk + Tr::kKVBytes;                   // [BN][kD]
  unsigned char* sq = sv + Tr::kKVBytes;                   // [kStages][BM][kD]
  unsigned char* sdo = sq + kStages * Tr::kQBytes;         // [kStages][BM][kD]
  unsigned char* sds = sdo + kStages * Tr::kQBytes;        // [2][BN keys][BM queries]
  float* lse_s = reinterpret_cast<float*>(sds + 2 * Tr::kDsBytes);  // [kStages][BM]
  float* delta_s = lse_s + kStages * BM;                            // [kStages][BM]
  const uint32_t sk_addr = cm::smem_addr(sk), sv_addr = cm::smem_addr(sv),
                 sq_addr = cm::smem_addr(sq), sdo_addr = cm::smem_addr(sdo),
                 sds_addr = cm::smem_addr(sds);

  const int tid = threadIdx.x, wg = tid / 128, warp4 = (tid / 32) & 3, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int hk = blockIdx.x, b = blockIdx.y, G = static_cast<int>(p.H / p.Hkv);
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  const SeqRange s = seq_range(p, b);
  // Row indices inside a sequence are ints, as in mma_bwd.cuh; pointer arithmetic stays int64.
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  const int64_t wl = mma::min_i64(p.window_left, lk + lq), wr = mma::min_i64(p.window_right, lk + lq);
  const int rel_lo = p.window_left < 0 ? -lq : static_cast<int>(mma::max_i64(lk - lq - wl, -lq));
  const int rel_hi = p.window_right < 0 ? lk : static_cast<int>(mma::min_i64(lk - lq + wr, lk));
  const T* q_seq = q + b * p.q.batch + s.q0 * p.q.row;
  const T* do_seq = dout + b * p.dout.batch + s.q0 * p.dout.row;
  const int64_t lse_seq = b * p.lse.batch + s.q0 * p.lse.row;  // delta shares lse's layout
  float* dq_seq = dq_accum + b * p.dq.batch + s.q0 * p.dq.row;
  const T* k_seq = k + b * p.k.batch + s.k0 * p.k.row + hk * p.k.head;
  const T* v_seq = v + b * p.v.batch + s.k0 * p.v.row + hk * p.v.head;
  const int ntiles = (lk + BN - 1) / BN;

  __shared__ uint64_t bars[2 * kStages];
  const wgmma::CpAsyncRing<kStages> ring{bars, bars + kStages};
  if (tid == 0) ring.init(NT);
  __syncthreads();
  uint32_t ring_base = 0;  // steps this CTA has streamed through the ring so far

  for (int tt = blockIdx.z; tt < ntiles; tt += gridDim.z) {
    const int j0 = tt * BN;
    const int krows = min(lk - j0, BN);
    const int qlo = max(j0 - rel_hi, 0), qhi = min(j0 + krows - 1 - rel_lo, lq - 1);
    const int nq = qhi >= qlo ? (qhi - qlo) / BM + 1 : 0;  // query tiles per head
    const int nsteps = nq * G;

    float dka[kDT][4], dva[kDT][4];
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dka[dt][e] = dva[dt][e] = 0.f;

    // Step n -> ring slot ring_base + n: query head hk * G + n / nq, rows from qlo + (n % nq) * BM.
    auto produce = [&](int n) {
      const uint32_t slot = ring_base + n;
      const int st = slot % kStages;
      ring.producer_acquire(slot);
      const int h = hk * G + n / nq;
      const int i0 = qlo + (n % nq) * BM, rows = min(qhi - i0 + 1, BM);
      load_rows_sw128<BM, kD, NT>(sq + st * Tr::kQBytes, q_seq + int64_t(i0) * p.q.row + h * p.q.head,
                                  p.q.row, rows, tid);
      load_rows_sw128<BM, kD, NT>(sdo + st * Tr::kQBytes,
                                  do_seq + int64_t(i0) * p.dout.row + h * p.dout.head, p.dout.row, rows,
                                  tid);
      if (tid < BM) {  // rows past the tile read nothing and land as 0 (masked)
        const int r = tid;
        const int64_t li = lse_seq + h * p.lse.head + int64_t(i0 + r) * p.lse.row;
        cm::cp_async_4(lse_s + st * BM + r, r < rows ? lse + li : lse, r < rows ? 4 : 0);
        cm::cp_async_4(delta_s + st * BM + r, r < rows ? delta + li : delta, r < rows ? 4 : 0);
      }
      ring.producer_commit(slot);
    };
    if (nsteps > 0) {
      // K and V ride with step 0: its commit covers this thread's earlier copies too. (The
      // previous key tile's readers are done: __syncthreads at the end of the loop.)
      load_rows_sw128<BN, kD, NT>(sk, k_seq + int64_t(j0) * p.k.row, p.k.row, krows, tid);
      load_rows_sw128<BN, kD, NT>(sv, v_seq + int64_t(j0) * p.v.row, p.v.row, krows, tid);
      produce(0);
    }

    for (int n = 0; n < nsteps; ++n) {
      const uint32_t slot = ring_base + n;
      const int st = slot % kStages;
      const int h = hk * G + n / nq;
      const int i0 = qlo + (n % nq) * BM, rows = min(qhi - i0 + 1, BM);
      if (n + 1 < nsteps) produce(n + 1);  // into the stage step n - 1 used, once released
      ring.consumer_wait(slot);
      const uint32_t q_addr = sq_addr + st * Tr::kQBytes, do_addr = sdo_addr + st * Tr::kQBytes;

      // Masks as in mma_bwd.cuh: key - query bounds relative to (key j0, query i0) -> the query
      // columns each of this lane's two key rows sees, shifted by the lane's column 2 * t4.
      const int rlo = min(max(rel_lo - (j0 - i0), -BM), BN);
      const int rhi = min(max(rel_hi - (j0 - i0), -BM), BN);
      const bool full = rows == BM && krows == BN && rlo <= -(BM - 1) && rhi >= BN - 1;
      int col_lo[2], col_hi[2];
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        const int kj = wg * 64 + warp4 * 16 + g + rh * 8;
        col_lo[rh] = kj - rhi - 2 * t4;
        col_hi[rh] = (kj < krows ? min(rows - 1, kj - rlo) : -1) - 2 * t4;
      }
      const float* lse_t = lse_s + st * BM;
      const float* delta_t = delta_s + st * BM;

      // S^T = K_w Q^T and dP^T = V_w dO^T (64 keys x 64 queries each), one commit group each.
      float sc[kNT][4], dp[kNT][4];
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        Mma64::template ss<0>(sc, wgmma::desc_k_major<BN>(sk_addr, wg * 64, kk),
                              wgmma::desc_k_major<BM>(q_addr, 0, kk), kk > 0);
      }
      wgmma::commit();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        Mma64::template ss<0>(dp, wgmma::desc_k_major<BN>(sv_addr, wg * 64, kk),
                              wgmma::desc_k_major<BM>(do_addr, 0, kk), kk > 0);
      }
      wgmma::commit();

      // P^T and dS^T (scale and softcap derivative included) as A fragments: k-step kk covers
      // queries kk*16 .. +15, the same packing as wgmma_fwd.cuh's P. Then dV += P^T dO and
      // dK += dS^T Q (B read N-major: the reduction runs over the tile's query rows).
      uint32_t pa[BM / 16][4], da[BM / 16][4];
      if constexpr (kSoftcap) {  // dS needs tanh' of each score: both passes at once
        wgmma::wait<0>();
        wgmma::fence_regs(sc);
        wgmma::fence_regs(dp);
        mma::probs_and_grads<true>(sc, dp, lse_t, delta_t, col_lo, col_hi, full, scale, cap);
        pack_frags<T>(pa, sc);
        pack_frags<T>(da, dp);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          MmaD::template rs<1>(dva, pa[kk], wgmma::desc_n_major<BM>(do_addr, kk), 1);
        }
      } else {  // P while dP^T runs, dS while dV runs
        wgmma::wait<1>();
        wgmma::fence_regs(sc);
        probs_t(sc, lse_t, col_lo, col_hi, full, scale);
        pack_frags<T>(pa, sc);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          MmaD::template rs<1>(dva, pa[kk], wgmma::desc_n_major<BM>(do_addr, kk), 1);
        }
        wgmma::commit();
        wgmma::wait<1>();  // dP^T done; dV may still run
        wgmma::fence_regs(dp);
        grads_t(dp, sc, delta_t, scale);
        pack_frags<T>(da, dp);
        wgmma::fence();
      }
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        MmaD::template rs<1>(dka, da[kk], wgmma::desc_n_major<BM>(q_addr, kk), 1);
      }
      wgmma::commit();

      // dS^T -> shared [key][query] (buffer slot % 2): da[kk][r] holds key row g + (r % 2) * 8
      // of the warp's 16, query columns kk*16 + (r / 2) * 8 + 2*t4 (+1). A quad writes one 16-byte
      // chunk, 8 quads 8 rows: the swizzle spreads them over all banks.
      unsigned char* ds_buf = sds + (slot & 1) * Tr::kDsBytes;
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = wg * 64 + warp4 * 16 + g + (r % 2) * 8, col = kk * 16 + (r / 2) * 8;
          if constexpr (kDsKMajor) {  // [BM queries][BN keys]: the pair is two rows, one column
            const int qc = col + 2 * t4;  // rows qc and qc + 1 swizzle differently
            unsigned char* at0 = ds_buf + wgmma::sw128_offset<BM>(qc, row & ~7) + (row & 7) * 2;
            unsigned char* at1 = ds_buf + wgmma::sw128_offset<BM>(qc + 1, row & ~7) + (row & 7) * 2;
            *reinterpret_cast<uint16_t*>(at0) = static_cast<uint16_t>(da[kk][r] & 0xFFFFu);
            *reinterpret_cast<uint16_t*>(at1) = static_cast<uint16_t>(da[kk][r] >> 16);
          } else {
            *reinterpret_cast<uint32_t*>(ds_buf + wgmma::sw128_offset<BN>(row, col) + 4 * t4) = da[kk][r];
          }
        }
      }
      wgmma::fence_async_smem();
      // dS^T complete (both warpgroups' keys). Also: both finished step n - 1's dQ, so buffer
      // (slot + 1) % 2, which step n + 1 writes, is free (double buffering: one barrier a step).
      wgmma::named_barrier_sync(1, NT);
      // dV / dK done (they had the dS store and the barrier to finish): P^T / dS^T fragments die
      // before the dQ accumulators are born, and the Q / dO stage goes back to the producer.
      wgmma::wait<0>();
      wgmma::fence_regs(dva);
      wgmma::fence_regs(dka);
      ring.consumer_release(slot);

      // dQ = dS K: A = dS [64 queries][128 keys] read M-major from dS^T, B = K [keys][cols] N-major.
      const bool dq_here = kD == 128 || wg == int(slot & 1);
      const uint32_t kcol_addr = sk_addr + (kD == 128 ? wg * BN * 128 : 0);  // column block
      const uint32_t ds_addr = sds_addr + (slot & 1) * Tr::kDsBytes;
      float dqa[8][4];
      if (dq_here) {
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          if constexpr (kDsKMajor) {
            Mma64::template ss<1, 0>(dqa, wgmma::desc_k_major<BM>(ds_addr, 0, kk),
                                     wgmma::desc_n_major<BN>(kcol_addr, kk), kk > 0);
          } else {
            Mma64::template ss<1, 1>(dqa, wgmma::desc_n_major<BN>(ds_addr, kk),
                                     wgmma::desc_n_major<BN>(kcol_addr, kk), kk > 0);
          }
        }
        wgmma::commit();
        wgmma::wait<0>();
        wgmma::fence_regs(dqa);
        const int c0 = (kD == 128 ? wg * 64 : 0) + 2 * t4;
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
          const int r = warp4 * 16 + g + rh * 8;
          if (r >= rows) continue;
          float* dst = dq_seq + int64_t(i0 + r) * p.dq.row + h * p.dq.head + c0;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            cm::atomic_add2(dst + i * 8, dqa[i][rh * 2], dqa[i][rh * 2 + 1]);
          }
        }
      }
    }

    // Epilogue: dK (scale folded into dS) and dV of the warpgroup's 64 keys.
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int r = wg * 64 + warp4 * 16 + g + rh * 8;
      if (r >= krows) continue;
      T* krow = dk + b * p.dk.batch + (s.k0 + j0 + r) * p.dk.row + hk * p.dk.head + 2 * t4;
      T* vrow = dv + b * p.dv.batch + (s.k0 + j0 + r) * p.dv.row + hk * p.dv.head + 2 * t4;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        *reinterpret_cast<uint32_t*>(krow + dt * 8) = cm::pack2<T>(dka[dt][rh * 2], dka[dt][rh * 2 + 1]);
        *reinterpret_cast<uint32_t*>(vrow + dt * 8) = cm::pack2<T>(dva[dt][rh * 2], dva[dt][rh * 2 + 1]);
      }
    }
    ring_base += nsteps;
    __syncthreads();  // the next key tile overwrites K, V (and reuses the dS buffers)
  }
#endif  // ATTNKIT_HAS_WGMMA
}

// Host side: the shared memory of one instantiation (the launcher checks the device's opt-in).
inline int64_t bwd_smem_bytes(int64_t d) {
  return d == 64 ? BwdTraits<64>::kSmemBytes : BwdTraits<128>::kSmemBytes;
}

// dq_accum: zero-filled fp32 workspace with p.dq's strides; the caller converts it to dq.
template <typename T>
void launch_bwd(const Params& p, const T* dout, const T* q, const T* k, const T* v,
                const float* lse, const float* delta, float* dq_accum, T* dk, T* dv, int64_t rows_k,
                cudaStream_t stream) {
  int64_t tiles = (rows_k + 127) / 128;
  tiles = tiles < 1 ? 1 : (tiles > 65535 ? 65535 : tiles);  // the kernel loops over the rest
  const dim3 grid(static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B), static_cast<unsigned>(tiles));
  auto run = [&](auto kernel, int smem) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<grid, 256, smem, stream>>>(p, dout, q, k, v, lse, delta, dq_accum, dk, dv);
  };
  const bool cap = p.softcap > 0.0;
  if (p.D == 64) {
    constexpr int kSmem = BwdTraits<64>::kSmemBytes;
    cap ? run(bwd_kernel<T, 64, true>, kSmem) : run(bwd_kernel<T, 64, false>, kSmem);
  } else {
    constexpr int kSmem = BwdTraits<128>::kSmemBytes;
    cap ? run(bwd_kernel<T, 128, true>, kSmem) : run(bwd_kernel<T, 128, false>, kSmem);
  }
}

}  // namespace wg
}  // namespace flash
}  // namespace attnkit
