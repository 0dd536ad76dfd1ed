// Tensor-core flash attention backward (mma.sync m16n8k16), fp16 / bf16, head dims 64 and 128.
// Torch-free; sm80+ only. After delta = rowsum(dO * O) (simt::bwd_delta_kernel), P is recomputed
// from lse; dK and dV come from bwd_kernel, one CTA per key tile that keeps them in registers
// (FlashAttention-2's organisation). dQ comes either
//   - from the same kernel (kAtomicDq): each (key tile, query tile) adds its dS K into a zero-
//     filled fp32 workspace with atomics. Five products per tile pair, but the sum order over key
//     tiles, and so the last bits of dQ, vary run to run; the default. Or
//   - from bwd_dq_kernel (grid H x B x query tiles, 4 warps x 16 query rows, no atomics), which
//     recomputes S = Q K^T and dP = dO V^T for dQ += dS K: seven products per tile pair, bitwise
//     reproducible; taken under torch.use_deterministic_algorithms(True).
// Operands sit in XOR-swizzled shared memory (see mma_fwd.cuh) and are read with ldmatrix (the
// .trans form for the products that contract over tile rows); P and dS are packed from the
// accumulators into A fragments.
#pragma once

#include <cstdint>

#include "kernels/common/fast_math.cuh"
#include "kernels/flash/mma_fwd.cuh"
#include "kernels/gdpa/tile.cuh"

namespace attnkit {
namespace flash {
namespace mma {

template <int kD>
constexpr int bwd_dq_smem_bytes() {
  return 4 * 64 * kD * 2;  // Q, dO, K, V tiles of 64 rows
}

ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

#if ATTNKIT_HAS_MMA_SM80
// A fragment: 16 tile rows from r0, head-dim columns kk*16 .. +15.
template <typename T, int kD>
ATTNKIT_DEVICE ATTNKIT_INLINE void ld_a(uint32_t (&a)[4], const T* tile, int r0, int kk, int lane) {
  ldmatrix_x4(a, tile + swz<kD>(r0 + (lane % 8) + ((lane / 8) % 2) * 8, kk * 16 + (lane / 16) * 8));
}
// B fragments of two n8 tiles whose n runs over tile rows n0 .. n0+15, k over head-dim columns.
template <typename T, int kD>
ATTNKIT_DEVICE ATTNKIT_INLINE void ld_b_rows(uint32_t (&r)[4], const T* tile, int n0, int kk, int lane) {
  const int mi = lane / 8;
  ldmatrix_x4(r, tile + swz<kD>(n0 + (lane % 8) + (mi / 2) * 8, kk * 16 + (mi % 2) * 8));
}
// B fragments of two n8 tiles whose k runs over tile rows k0 .. k0+15, n over head-dim d0 .. +15.
template <typename T, int kD>
ATTNKIT_DEVICE ATTNKIT_INLINE void ld_b_trans(uint32_t (&r)[4], const T* tile, int k0, int d0, int lane) {
  const int mi = lane / 8;
  ldmatrix_x4_trans(r, tile + swz<kD>(k0 + (lane % 8) + (mi % 2) * 8, d0 + (mi / 2) * 8));
}

// acc[16 x 64] += A_tile(16 rows from r0) * B_tile(64 rows)^T over the head dim.
template <typename T, int kD>
ATTNKIT_DEVICE ATTNKIT_INLINE void gemm_rows(float (&acc)[8][4], const T* a_tile, int r0,
                                             const T* b_tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    uint32_t a[4];
    ld_a<T, kD>(a, a_tile, r0, kk, lane);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t r[4];
      ld_b_rows<T, kD>(r, b_tile, np * 16, kk, lane);
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      mma_16816<T>(acc[2 * np], a, b0);
      mma_16816<T>(acc[2 * np + 1], a, b1);
    }
  }
}

// out[16 x kD] += X[16 x 64] (fp32 accumulators, packed to 16 bits) * tile(64 rows x kD).
template <typename T, int kD>
ATTNKIT_DEVICE ATTNKIT_INLINE void gemm_acc_tile(float (&out)[kD / 8][4], const float (&x)[8][4],
                                                 const T* tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t a[4] = {pack2<T>(x[2 * kk][0], x[2 * kk][1]), pack2<T>(x[2 * kk][2], x[2 * kk][3]),
                           pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                           pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < kD / 16; ++dp) {
      uint32_t r[4];
      ld_b_trans<T, kD>(r, tile, kk * 16, dp * 16, lane);
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      mma_16816<T>(out[2 * dp], a, b0);
      mma_16816<T>(out[2 * dp + 1], a, b1);
    }
  }
}

ATTNKIT_DEVICE ATTNKIT_INLINE bool visible(const Params& p, int64_t i, int64_t j, int64_t lq, int64_t lk) {
  const int64_t diag = i + lk - lq;
  return i < lq && j < lk && (p.window_left < 0 || j >= diag - p.window_left) &&
         (p.window_right < 0 || j <= diag + p.window_right);
}

// P and dS of one element from the raw score q.k, the row's lse (log2 units) and delta.
ATTNKIT_DEVICE ATTNKIT_INLINE void p_and_ds(float qk, float dp, float lse2, float delta, bool vis,
                                            float scale, float cap, float& p_out, float& ds_out) {
  constexpr float kLog2e = 1.4426950408889634f;
  float x = qk * scale, dx = scale;
  if (cap > 0.f) {
    const float t = tanhf(x / cap);
    x = cap * t;
    dx = scale * (1.f - t * t);
  }
  // A select, not a product: lse is -inf on rows that see nothing (then x - lse would be +inf).
  const float pv = vis ? exp2f(x * kLog2e - lse2) : 0.f;
  p_out = pv;
  ds_out = pv * (dp - delta) * dx;
}
#endif  // ATTNKIT_HAS_MMA_SM80

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads)
    bwd_dq_kernel(Params p, const T* __restrict__ dout, const T* __restrict__ q,
                  const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ lse,
                  const float* __restrict__ delta, T* __restrict__ dq) {
#if ATTNKIT_HAS_MMA_SM80
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* dos = qs + 64 * kD;
  T* ks = dos + 64 * kD;
  T* vs = ks + 64 * kD;
  constexpr int kDT = kD / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t h = blockIdx.x, b = blockIdx.y, hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  const SeqRange s = seq_range(p, b);
  const int64_t ntiles = (s.lq + 63) / 64;
  const T* kbase = k + b * p.k.batch + s.k0 * p.k.row + hk * p.k.head;
  const T* vbase = v + b * p.v.batch + s.k0 * p.v.row + hk * p.v.head;

  for (int64_t tt = blockIdx.z; tt < ntiles; tt += gridDim.z) {
    const int64_t i0 = (ntiles - 1 - tt) * 64;
    const int64_t rows = s.lq - i0 < 64 ? s.lq - i0 : 64;
    const int64_t lo = key_range(p, i0, s.lq, s.lk).lo;
    const int64_t hi = key_range(p, i0 + rows - 1, s.lq, s.lk).hi;
    int64_t r_row[2];
    float lse2[2], dlt[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      r_row[rh] = i0 + warp * 16 + g + rh * 8;
      const int64_t li = b * p.lse.batch + h * p.lse.head + (s.q0 + r_row[rh]) * p.lse.row;
      lse2[rh] = r_row[rh] < s.lq ? lse[li] * kLog2e : INFINITY;
      dlt[rh] = r_row[rh] < s.lq ? delta[li] : 0.f;
    }
    float acc[kDT][4];
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;

    __syncthreads();  // the previous tile's warps are done with shared memory
    if (lo <= hi) {
      const int64_t qoff = b * p.q.batch + (s.q0 + i0) * p.q.row + h * p.q.head;
      load_tile_async<T, kD>(qs, q + qoff, p.q.row, rows);
      load_tile_async<T, kD>(dos, dout + b * p.dout.batch + (s.q0 + i0) * p.dout.row + h * p.dout.head,
                             p.dout.row, rows);
      load_tile_async<T, kD>(ks, kbase + lo * p.k.row, p.k.row, hi - lo + 1);
      load_tile_async<T, kD>(vs, vbase + lo * p.v.row, p.v.row, hi - lo + 1);
      cp_async_commit();
    }
    for (int64_t j0 = lo; j0 <= hi; j0 += 64) {
      cp_async_wait<0>();
      __syncthreads();
      float sc[8][4], dpv[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nt][e] = dpv[nt][e] = 0.f;
      gemm_rows<T, kD>(sc, qs, warp * 16, ks, lane);
      gemm_rows<T, kD>(dpv, dos, warp * 16, vs, lane);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rh = e / 2;
          const int64_t j = j0 + nt * 8 + 2 * t4 + (e % 2);
          float pv, ds;
          p_and_ds(sc[nt][e], dpv[nt][e], lse2[rh], dlt[rh], visible(p, r_row[rh], j, s.lq, s.lk),
                   scale, cap, pv, ds);
          sc[nt][e] = ds;
        }
      }
      gemm_acc_tile<T, kD>(acc, sc, ks, lane);  // dQ += dS K
      __syncthreads();  // every warp is done with ks / vs
      if (j0 + 64 <= hi) {
        load_tile_async<T, kD>(ks, kbase + (j0 + 64) * p.k.row, p.k.row, hi - j0 - 63);
        load_tile_async<T, kD>(vs, vbase + (j0 + 64) * p.v.row, p.v.row, hi - j0 - 63);
        cp_async_commit();
      }
    }
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      if (r_row[rh] >= s.lq) continue;
      T* row = dq + b * p.dq.batch + (s.q0 + r_row[rh]) * p.dq.row + h * p.dq.head;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        *reinterpret_cast<uint32_t*>(row + dt * 8 + 2 * t4) = pack2<T>(acc[dt][rh * 2], acc[dt][rh * 2 + 1]);
      }
    }
  }
#endif  // ATTNKIT_HAS_MMA_SM80
}


#if ATTNKIT_HAS_MMA_SM80
// P^T and dS^T in place of a warp's S^T (sc) and dP^T (dp) accumulators: 16 keys x kNT * 8
// queries whose lse (natural log) and delta sit in lse_t / delta_t. Elements outside
// [col_lo, col_hi] of their key row (columns less the lane's 2 * t4) are 0 when kMasked.
// kCap: soft-capped scores, a separate instantiation so that the plain one carries no tanh.
// kMasked is one too: a per-element `if (!full)` in one loop is if-converted by ptxas into
// predicated compares and selects on every tile.
template <bool kCap, bool kMasked, int kNT>
ATTNKIT_DEVICE ATTNKIT_INLINE void probs_and_grads_tile(float (&sc)[kNT][4], float (&dp)[kNT][4],
                                                        const float* lse_t, const float* delta_t,
                                                        const int (&col_lo)[2],
                                                        const int (&col_hi)[2], float scale,
                                                        float cap) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int t4 = threadIdx.x % 4;
  const float scale_over_cap = kCap ? scale / cap : 0.f;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int col = nt * 8 + 2 * t4;  // query of e = 0 and 2; e = 1 and 3 are col + 1
    const float2 lse2 = *reinterpret_cast<const float2*>(lse_t + col);
    const float2 dlt = *reinterpret_cast<const float2*>(delta_t + col);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qc = nt * 8 + (e % 2);  // the query column, less 2 * t4
      float lx, dx;
      if constexpr (kCap) {
        const float th = tanh_fast(sc[nt][e] * scale_over_cap);
        lx = cap * th * kLog2e;
        dx = scale * (1.f - th * th);
      } else {
        lx = sc[nt][e] * (scale * kLog2e);
        dx = scale;
      }
      float pv = ex2_approx(lx - (e % 2 ? lse2.y : lse2.x) * kLog2e);
      // A select, not a product: a row that sees nothing has lse -inf (pv would be +inf).
      if (kMasked && (qc < col_lo[e / 2] || qc > col_hi[e / 2])) pv = 0.f;
      sc[nt][e] = pv;
      dp[nt][e] = pv * (dp[nt][e] - (e % 2 ? dlt.y : dlt.x)) * dx;
    }
  }
}

// The branch between the masked and unmasked copies (`full` is uniform over the warp).
template <bool kCap, int kNT>
ATTNKIT_DEVICE ATTNKIT_INLINE void probs_and_grads(float (&sc)[kNT][4], float (&dp)[kNT][4],
                                                   const float* lse_t, const float* delta_t,
                                                   const int (&col_lo)[2], const int (&col_hi)[2],
                                                   bool full, float scale, float cap) {
  if (full) {
    probs_and_grads_tile<kCap, false>(sc, dp, lse_t, delta_t, col_lo, col_hi, scale, cap);
  } else {
    probs_and_grads_tile<kCap, true>(sc, dp, lse_t, delta_t, col_lo, col_hi, scale, cap);
  }
}
#endif

#if ATTNKIT_HAS_MMA_SM80
// Rows [0, rows) of a kRows x kD tile (row r at src + r * row_stride) -> swizzled shared memory
// (gdpa::swizzled, the same layout as the forward's swz); rows past `rows` are zero-filled
// without reading. Not unrolled: the copy runs while dK / dV hold half the registers, and an
// unrolled one computes every 64-bit source address at once (it spilled).
template <int kRows, int kD, int kThreadsN, typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE void load_rows(T* dst, const T* src, int64_t row_stride, int rows) {
  constexpr int kChunksPerRow = kD / 8;
  static_assert(kRows * kChunksPerRow % kThreadsN == 0, "whole chunks per thread");
#pragma unroll 1
  for (int it = 0; it < kRows * kChunksPerRow / kThreadsN; ++it) {
    const int c = it * kThreadsN + threadIdx.x;
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool valid = r < rows;
    cp_async_16(dst + gdpa::swizzled<kD>(r, col), valid ? src + r * row_stride + col : src,
                valid ? 16 : 0);
  }
}
#endif

// The main backward kernel: one CTA per (sequence, kv head, 16 * kWarps key rows). Each warp owns
// 16 key rows and keeps their dK and dV in registers while the CTA walks every query tile that
// the window lets its keys see, for every query head of the GQA group. Per query tile:
//   S^T = K Q^T, dP^T = V dO^T     (warp: 16 keys x kBM queries, contraction over the head dim)
//   P^T, dS^T elementwise          (lse and delta of the tile's queries sit in shared memory)
//   dV += P^T dO, dK += dS^T Q     (P^T / dS^T accumulators packed straight into A fragments)
// and, with kAtomicDq, dQ for the tile: dS^T goes through shared memory (the product contracts
// over keys, which are split across warps), every warp computes a 16 x kDqCols block of dS K and
// adds it to an fp32 workspace with atomics (a reduction over key tiles, so its order, and the
// last bits of dQ, vary run to run). Without kAtomicDq, bwd_dq_kernel computes dQ separately.
// Q, dO, lse and delta of the next query tile load with cp.async while the current one computes.
template <int kD>
struct BwdTraits {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBN = 16 * kWarps;         // key rows per CTA
  // Query rows per step. S^T and dP^T take kBM registers per lane next to the kD of dK and dV;
  // 128 would halve the barriers per product at D = 64 but spills (ptxas -v), so 64 for both.
  static constexpr int kBM = 64;
  static constexpr int kDqWarpsM = kBM / 16;      // dQ step: warps tile kBM rows x kD columns
  static constexpr int kDqCols = kD / (kWarps / kDqWarpsM);
  static_assert(kWarps % kDqWarpsM == 0 && kD % kDqCols == 0, "dQ warp tiling");
  static constexpr int kTileKV = kBN * kD, kTileQ = kBM * kD, kTileDs = kBN * kBM;  // elements
  template <bool kAtomicDq>
  static constexpr int smem_bytes() {  // K, V; Q, dO double-buffered; dS^T; lse, delta x 2
    return (2 * kTileKV + 4 * kTileQ + (kAtomicDq ? kTileDs : 0)) * 2 + 4 * kBM * 4;
  }
};

template <typename T, int kD, bool kAtomicDq>
__global__ void __launch_bounds__(BwdTraits<kD>::kThreads, 1)
    bwd_kernel(Params p, const T* __restrict__ dout, const T* __restrict__ q,
               const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ lse,
               const float* __restrict__ delta, float* __restrict__ dq_accum, T* __restrict__ dk,
               T* __restrict__ dv) {
#if ATTNKIT_HAS_MMA_SM80
  using Tr = BwdTraits<kD>;
  constexpr int BM = Tr::kBM, BN = Tr::kBN, NT = Tr::kThreads, kNT = BM / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + Tr::kTileKV;
  T* qs = vs + Tr::kTileKV;        // [2][BM][kD]
  T* dos = qs + 2 * Tr::kTileQ;    // [2][BM][kD]
  T* dss = dos + 2 * Tr::kTileQ;   // [BN][BM] dS^T (kAtomicDq only)
  float* lse_s = reinterpret_cast<float*>(dss + (kAtomicDq ? Tr::kTileDs : 0));  // [2][BM]
  float* delta_s = lse_s + 2 * BM;                                               // [2][BM]

  const int hk = blockIdx.x, b = blockIdx.y, G = static_cast<int>(p.H / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  const SeqRange s = seq_range(p, b);
  // Row indices inside a sequence are ints (fewer registers than int64): a sequence of 2^31 rows
  // of at least 64 16-bit elements would take 256 GiB. Pointer arithmetic stays int64.
  const int lq = static_cast<int>(s.lq), lk = static_cast<int>(s.lk);
  // The window as bounds on key - query (local indices), clamped to the span key - query takes.
  const int rel_lo = p.window_left < 0 ? -lq : static_cast<int>(max_i64(lk - lq - min_i64(p.window_left, lk + lq), -lq));
  const int rel_hi = p.window_right < 0 ? lk : static_cast<int>(min_i64(lk - lq + min_i64(p.window_right, lk + lq), lk));
  // Sequence starts; a step adds its head and first row.
  const T* q_seq = q + b * p.q.batch + s.q0 * p.q.row;
  const T* do_seq = dout + b * p.dout.batch + s.q0 * p.dout.row;
  const int64_t lse_seq = b * p.lse.batch + s.q0 * p.lse.row;  // delta shares lse's layout
  float* dq_seq = dq_accum + b * p.dq.batch + s.q0 * p.dq.row;
  const T* k_seq = k + b * p.k.batch + s.k0 * p.k.row + hk * p.k.head;
  const T* v_seq = v + b * p.v.batch + s.k0 * p.v.row + hk * p.v.head;
  const int ntiles = (lk + BN - 1) / BN;

  // Key tiles in order: under a causal mask the first ones see the most queries.
  for (int tt = blockIdx.z; tt < ntiles; tt += gridDim.z) {
    const int j0 = tt * BN;
    const int krows = min(lk - j0, BN);
    // Queries that see some key of the tile: rel_lo <= j - i <= rel_hi, clipped to [0, lq).
    const int qlo = max(j0 - rel_hi, 0), qhi = min(j0 + krows - 1 - rel_lo, lq - 1);
    const int nq = qhi >= qlo ? (qhi - qlo) / BM + 1 : 0;  // query tiles per head
    const int nsteps = nq * G;

    float dka[1][kD / 8][4], dva[1][kD / 8][4];
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dka[0][dt][e] = dva[0][dt][e] = 0.f;

    // Step n: query head hk * G + n / nq, query rows from qlo + (n % nq) * BM.
    auto load_step = [&](int n, int buf) {
      const int h = hk * G + n / nq;
      const int i0 = qlo + (n % nq) * BM, rows = min(qhi - i0 + 1, BM);
      load_rows<BM, kD, NT>(qs + buf * Tr::kTileQ, q_seq + i0 * p.q.row + h * p.q.head, p.q.row, rows);
      load_rows<BM, kD, NT>(dos + buf * Tr::kTileQ, do_seq + i0 * p.dout.row + h * p.dout.head,
                            p.dout.row, rows);
      if (threadIdx.x < BM) {  // rows past the tile read nothing and land as 0 (masked below)
        const int r = threadIdx.x;
        const int64_t li = lse_seq + h * p.lse.head + (i0 + r) * p.lse.row;
        cp_async_4(lse_s + buf * BM + r, r < rows ? lse + li : lse, r < rows ? 4 : 0);
        cp_async_4(delta_s + buf * BM + r, r < rows ? delta + li : delta, r < rows ? 4 : 0);
      }
    };

    __syncthreads();  // the previous key tile's warps are done with shared memory
    if (nsteps > 0) {
      load_rows<BN, kD, NT>(ks, k_seq + j0 * p.k.row, p.k.row, krows);
      load_rows<BN, kD, NT>(vs, v_seq + j0 * p.v.row, p.v.row, krows);
      load_step(0, 0);
      cp_async_commit();
    }
    for (int n = 0; n < nsteps; ++n) {
      const int buf = n & 1;
      const int h = hk * G + n / nq;
      const int i0 = qlo + (n % nq) * BM, rows = min(qhi - i0 + 1, BM);
      cp_async_wait<0>();
      // Step n landed for every thread, and every warp finished step n - 1, whose buffers (and
      // dS^T) the prefetch below and this step's writes reuse.
      __syncthreads();
      if (n + 1 < nsteps) {
        load_step(n + 1, buf ^ 1);
        cp_async_commit();
      }
      const T* qt = qs + buf * Tr::kTileQ;
      const T* dot = dos + buf * Tr::kTileQ;

      float sc[1][kNT][4], dpv[1][kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[0][nt][e] = dpv[0][nt][e] = 0.f;
      gdpa::warp_gemm_nt<T, 1, BM, kD>(sc, ks, warp * 16, qt, kD);    // S^T = K Q^T
      gdpa::warp_gemm_nt<T, 1, BM, kD>(dpv, vs, warp * 16, dot, kD);  // dP^T = V dO^T

      // Elements are masked only when the tile crosses a window edge or the end of the keys or
      // of the queries. Key - query bounds relative to the tile's (key 0, query 0), clamped to
      // the span key - query takes inside a tile, turn into the query columns each of this
      // lane's two key rows sees: [col_lo, col_hi], shifted by the lane's column 2 * t4.
      const int rlo = min(max(rel_lo - (j0 - i0), -BM), BN);
      const int rhi = min(max(rel_hi - (j0 - i0), -BM), BN);
      const bool full = rows == BM && krows == BN && rlo <= -(BM - 1) && rhi >= BN - 1;
      int col_lo[2], col_hi[2];
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        const int kj = warp * 16 + g + rh * 8;
        col_lo[rh] = kj - rhi - 2 * t4;
        col_hi[rh] = (kj < krows ? min(rows - 1, kj - rlo) : -1) - 2 * t4;
      }
      if (cap > 0.f) {
        probs_and_grads<true>(sc[0], dpv[0], lse_s + buf * BM, delta_s + buf * BM, col_lo, col_hi,
                              full, scale, cap);
      } else {
        probs_and_grads<false>(sc[0], dpv[0], lse_s + buf * BM, delta_s + buf * BM, col_lo, col_hi,
                               full, scale, cap);
      }
      uint32_t af[1][BM / 16][4];
      gdpa::pack_a<T, BM>(af[0], sc[0]);
      gdpa::warp_gemm_rn<T, 1, BM, kD, kD>(dva, af, dot, 0, kD);  // dV += P^T dO
      gdpa::pack_a<T, BM>(af[0], dpv[0]);
      gdpa::warp_gemm_rn<T, 1, BM, kD, kD>(dka, af, qt, 0, kD);   // dK += dS^T Q

      if constexpr (kAtomicDq) {
        // dS^T to shared memory, [key][query] swizzled: a quad's 4 lanes write one 16-byte chunk
        // and the 8 quads 8 rows, whose chunks the swizzle spreads over all banks.
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {  // af[0][kk][r]: row g + (r % 2) * 8, cols kk*16 + (r/2)*8 + 2*t4
            const int row = warp * 16 + g + (r % 2) * 8, col = kk * 16 + (r / 2) * 8;
            *reinterpret_cast<uint32_t*>(dss + gdpa::swizzled<BM>(row, col) + 2 * t4) = af[0][kk][r];
          }
        }
        __syncthreads();  // dS^T complete
        // dQ[16 rows x kDqCols] of this warp = dS K: A = dS read transposed from dS^T.
        const int wm = warp % Tr::kDqWarpsM, wd = warp / Tr::kDqWarpsM;
        float dqa[Tr::kDqCols / 8][4];
#pragma unroll
        for (int dt = 0; dt < Tr::kDqCols / 8; ++dt)
#pragma unroll
          for (int e = 0; e < 4; ++e) dqa[dt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {  // one A fragment at a time: registers are short
          const int mi = lane / 8;
          uint32_t a[4];
          ldmatrix_x4_trans(a, dss + gdpa::swizzled<BM>(kk * 16 + (mi / 2) * 8 + lane % 8,
                                                        wm * 16 + (mi % 2) * 8));
#pragma unroll
          for (int dp = 0; dp < Tr::kDqCols / 16; ++dp) {
            uint32_t r[4];
            ldmatrix_x4_trans(r, ks + gdpa::swizzled<kD>(kk * 16 + (mi % 2) * 8 + lane % 8,
                                                         wd * Tr::kDqCols + dp * 16 + (mi / 2) * 8));
            const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma_16816<T>(dqa[2 * dp], a, b0);
            mma_16816<T>(dqa[2 * dp + 1], a, b1);
          }
        }
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
          const int r = wm * 16 + g + rh * 8;
          if (r >= rows) continue;
          float* dst = dq_seq + (i0 + r) * p.dq.row + h * p.dq.head + (wd * Tr::kDqCols + 2 * t4);
#pragma unroll
          for (int dt = 0; dt < Tr::kDqCols / 8; ++dt) {
            atomic_add2(dst + dt * 8, dqa[dt][rh * 2], dqa[dt][rh * 2 + 1]);
          }
        }
      }
    }
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int r = warp * 16 + g + rh * 8;
      if (r >= krows) continue;
      T* krow = dk + b * p.dk.batch + (s.k0 + j0 + r) * p.dk.row + hk * p.dk.head + 2 * t4;
      T* vrow = dv + b * p.dv.batch + (s.k0 + j0 + r) * p.dv.row + hk * p.dv.head + 2 * t4;
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(krow + dt * 8) = pack2<T>(dka[0][dt][rh * 2], dka[0][dt][rh * 2 + 1]);
        *reinterpret_cast<uint32_t*>(vrow + dt * 8) = pack2<T>(dva[0][dt][rh * 2], dva[0][dt][rh * 2 + 1]);
      }
    }
  }
#endif  // ATTNKIT_HAS_MMA_SM80
}

// Host side: like fwd_layout_ok, plus dout and the gradient tensors (choose.h's mma_ok).
inline bool bwd_layout_ok(const Params& p, const void* dout, const void* q, const void* k,
                          const void* v, const void* o, const void* dq, const void* dk,
                          const void* dv) {
  return fwd_layout_ok(p, q, k, v, o) && aligned16(dout) && aligned16(dq) && aligned16(dk) &&
         aligned16(dv) && strides8(p.dout) && strides8(p.dq) && strides8(p.dk) && strides8(p.dv);
}

// The main kernel's shared memory; the launcher compares it with the device's opt-in limit
// (227 KiB on sm90, 163 KiB on sm80, 99 KiB on sm86 / sm89, where the portable kernels take over).
inline int64_t bwd_smem_bytes(int64_t d) {
  return d == 64 ? BwdTraits<64>::smem_bytes<true>() : BwdTraits<128>::smem_bytes<true>();
}

// dq_accum != null: dQ is added into that zero-filled fp32 workspace (strides p.dq) by the main
// kernel; the caller converts it. dq_accum == null: the deterministic pair, bwd_dq_kernel writes
// dq and the main kernel only dK / dV.
template <typename T, int kD>
void launch_bwd_d(const Params& p, const T* dout, const T* q, const T* k, const T* v,
                  const float* lse, const float* delta, T* dq, float* dq_accum, T* dk, T* dv,
                  int64_t rows_q, int64_t rows_k, cudaStream_t stream) {
  using Tr = BwdTraits<kD>;
  auto tiles = [](int64_t rows, int64_t per_cta) {
    const int64_t t = (rows + per_cta - 1) / per_cta;
    return static_cast<unsigned>(t < 1 ? 1 : (t > 65535 ? 65535 : t));  // kernels loop over the rest
  };
  const dim3 grid_k(static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B), tiles(rows_k, Tr::kBN));
  if (dq_accum != nullptr) {
    constexpr int smem = Tr::template smem_bytes<true>();
    cudaFuncSetAttribute(bwd_kernel<T, kD, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    bwd_kernel<T, kD, true><<<grid_k, Tr::kThreads, smem, stream>>>(p, dout, q, k, v, lse, delta,
                                                                     dq_accum, dk, dv);
    return;
  }
  constexpr int dq_smem = bwd_dq_smem_bytes<kD>();
  cudaFuncSetAttribute(bwd_dq_kernel<T, kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_smem);
  bwd_dq_kernel<T, kD><<<dim3(p.H, p.B, tiles(rows_q, 64)), kThreads, dq_smem, stream>>>(
      p, dout, q, k, v, lse, delta, dq);
  constexpr int smem = Tr::template smem_bytes<false>();
  cudaFuncSetAttribute(bwd_kernel<T, kD, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  bwd_kernel<T, kD, false><<<grid_k, Tr::kThreads, smem, stream>>>(p, dout, q, k, v, lse, delta,
                                                                    nullptr, dk, dv);
}

template <typename T>
void launch_bwd(const Params& p, const T* dout, const T* q, const T* k, const T* v,
                const float* lse, const float* delta, T* dq, float* dq_accum, T* dk, T* dv,
                int64_t rows_q, int64_t rows_k, cudaStream_t stream) {
  if (p.D == 64) {
    launch_bwd_d<T, 64>(p, dout, q, k, v, lse, delta, dq, dq_accum, dk, dv, rows_q, rows_k, stream);
  } else {
    launch_bwd_d<T, 128>(p, dout, q, k, v, lse, delta, dq, dq_accum, dk, dv, rows_q, rows_k, stream);
  }
}

}  // namespace mma
}  // namespace flash
}  // namespace attnkit
