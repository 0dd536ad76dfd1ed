// GDPA backward on tensor cores (bf16 / fp16, sm_80+). Two kernels, no atomics, so gradients are
// bit-identical run to run:
//   dq kernel:   one CTA per (sequence, query tile, head); recomputes S = Q·Kᵀ and dP = dO·Vᵀ
//                tile by tile and accumulates dQ = dS·K in registers.
//   dkdv kernel: one CTA per (sequence, key tile, kv head, head-dim slice); loops over the G query
//                heads of its kv head and their query tiles, recomputes Sᵀ = K·Qᵀ and
//                dPᵀ = V·dOᵀ, and accumulates dV = qk·Pᵀ·dO and dK = dSᵀ·Q in registers.
// dS = qk_scale · pre_scale · φ′(pre·S) ⊙ dP, masked entries 0.
#pragma once

#include "kernels/gdpa/activation_gpu.cuh"
#include "kernels/gdpa/params.h"
#include "kernels/gdpa/tile.cuh"

namespace attnkit {
namespace gdpa {

template <int D>
struct BwdDqTraits {  // as FwdTraits: two m16 tiles per warp where registers allow
  static constexpr int kWarps = 4;
  static constexpr int kMTiles = D <= 128 ? 2 : 1;
  static constexpr int kBlockN = 32;
  static constexpr int kBlockM = 16 * kMTiles * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSmemBytes = (2 * kBlockM * D + 4 * kBlockN * D) * 2;
};

template <int D>
struct BwdDkdvTraits {
  static constexpr int kWarps = 4;
  static constexpr int kBlockN = 16 * kWarps;           // key rows per CTA
  static constexpr int kBlockM = D <= 64 ? 64 : (D <= 128 ? 32 : 16);  // query rows per step
  static constexpr int kSliceD = D <= 128 ? D : 128;    // dK/dV columns per CTA (register bound)
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSmemBytes = (2 * kBlockN * D + 4 * kBlockM * D) * 2;
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdDqTraits<D>::kThreads) gdpa_bwd_dq_mma_kernel(const BwdParams p) {
#if ATTNKIT_HAS_MMA_SM80
  using Tr = BwdDqTraits<D>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, NT = Tr::kThreads, MT = Tr::kMTiles;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sdo = sq + BM * D;
  T* sk = sdo + BM * D;     // [2][BN][D]
  T* sv = sk + 2 * BN * D;  // [2][BN][D]

  const CtaItem it = cta_item(p.H, p.B);
  const int b = it.b, h = it.z, hk = h / (p.H / p.Hkv);
  const int warp_row0 = (threadIdx.x / 32) * 16 * MT;
  const SeqRange qs = seq_range(p.q_offsets, b, p.Tq);
  const SeqRange ks = seq_range(p.kv_offsets, b, p.Tk);
  if (ks.len <= p.dq_kv_len_above) return;  // its dQ is the Hopper backward's (direct dQ)
  const T* q = static_cast<const T*>(p.q) + qs.begin * p.q_row_stride + h * p.q_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + qs.begin * p.do_row_stride + h * p.do_head_stride;
  const T* k = static_cast<const T*>(p.k) + ks.begin * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + ks.begin * p.v_row_stride + hk * p.v_head_stride;
  T* dq = static_cast<T*>(p.dq) + qs.begin * p.dq_row_stride + h * p.dq_head_stride;
  const T* fallback = static_cast<const T*>(p.q);
  const float ds_scale = p.qk_scale * p.pre_scale;

  for (int tile = it.tile; tile * BM < qs.len; tile += it.tiles) {
    const int i0 = tile * BM;
    const KvTiles<T, BN, D, NT, BwdParams> kv(p, k, v, i0, min(i0 + BM, qs.len) - 1, ks.len);
    float acc[MT][D / 8][4];
    zero_frags(acc);

    load_tile<BM, D, NT>(sq, q + i0 * p.q_row_stride, p.q_row_stride, qs.len - i0, p.D, fallback);
    load_tile<BM, D, NT>(sdo, dout + i0 * p.do_row_stride, p.do_row_stride, qs.len - i0, p.D, fallback);
    kv.load_first(sk, sv);

    for (int j = 0; j < kv.n_tiles; ++j) {
      const int j0 = j * BN;
      const T* skj = kv.buf(sk, j);
      const T* svj = kv.buf(sv, j);
      mma::cp_async_wait<1>();
      __syncthreads();
      float s[MT][BN / 8][4], dp[MT][BN / 8][4];
      zero_frags(s);
      zero_frags(dp);
      warp_gemm_nt<T, MT, BN, D>(s, sq, warp_row0, skj, p.D);
      if (j + 1 < kv.n_tiles) kv.load_k(sk, j + 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
      __syncthreads();
      warp_gemm_nt<T, MT, BN, D>(dp, sdo, warp_row0, svj, p.D);
      uint32_t dsa[MT][BN / 16][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        act_bwd_tile<BN / 8>(s[m], dp[m], p.act, p.pre_scale, ds_scale);  // dp <- dS
        const int r0 = i0 + warp_row0 + m * 16;
        const int c0 = kv.lo + j0;
        if (!tile_fully_visible(p.causal, p.window, r0, r0 + 15, c0, c0 + BN - 1)) {
          window_mask<false>(dp[m], r0, c0, p.causal, p.window);
        }
        pack_a<T, BN>(dsa[m], dp[m]);
      }
      warp_gemm_rn<T, MT, BN, D, D>(acc, dsa, skj, 0, p.D);
      if (j + 1 < kv.n_tiles) kv.load_v(sv, j + 1);
      mma::cp_async_commit();
    }
    mma::cp_async_wait<0>();
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      store_rows<T, D>(dq + i0 * p.dq_row_stride, p.dq_row_stride, warp_row0 + m * 16, qs.len - i0,
                       0, p.D, acc[m], 1.f);
    }
    __syncthreads();
  }
#endif
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdDkdvTraits<D>::kThreads)
    gdpa_bwd_dkdv_mma_kernel(const BwdParams p) {
#if ATTNKIT_HAS_MMA_SM80
  using Tr = BwdDkdvTraits<D>;
  constexpr int BN = Tr::kBlockN, BM = Tr::kBlockM, DS = Tr::kSliceD, NT = Tr::kThreads;
  constexpr int kSlices = D / DS;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + BN * D;
  T* sq = sv + BN * D;       // [2][BM][D]
  T* sdo = sq + 2 * BM * D;  // [2][BM][D]

  const CtaItem it = cta_item(p.Hkv * kSlices, p.B);
  const int b = it.b;
  const int hk = it.z / kSlices, d0 = (it.z % kSlices) * DS;
  const int G = p.H / p.Hkv;
  const int warp = threadIdx.x / 32;
  const SeqRange qs = seq_range(p.q_offsets, b, p.Tq);
  const SeqRange ks = seq_range(p.kv_offsets, b, p.Tk);
  const T* k = static_cast<const T*>(p.k) + ks.begin * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + ks.begin * p.v_row_stride + hk * p.v_head_stride;
  const T* q0 = static_cast<const T*>(p.q) + qs.begin * p.q_row_stride;
  const T* do0 = static_cast<const T*>(p.dout) + qs.begin * p.do_row_stride;
  T* dk = static_cast<T*>(p.dk) + ks.begin * p.dkv_row_stride + hk * p.dkv_head_stride;
  T* dv = static_cast<T*>(p.dv) + ks.begin * p.dkv_row_stride + hk * p.dkv_head_stride;
  const T* fallback = static_cast<const T*>(p.q);
  const float ds_scale = p.qk_scale * p.pre_scale;

  for (int tile = it.tile; tile * BN < ks.len; tile += it.tiles) {
    const int j0 = tile * BN;
    // The queries that see some key of this tile (causal: none before j0; window: |i - j| <= w).
    const Span qr = query_span(p.causal, p.window, j0, min(j0 + BN, ks.len) - 1, qs.len);
    const int q_start = static_cast<int>(qr.lo);
    const int nq = qr.hi > qr.lo ? (static_cast<int>(qr.hi) - q_start + BM - 1) / BM : 0;
    const int steps = G * nq;
    float acc_dk[1][DS / 8][4], acc_dv[1][DS / 8][4];
    zero_frags(acc_dk);
    zero_frags(acc_dv);

    auto load_step = [&](int st, int buf) {
      const int h = hk * G + st / nq, i0 = q_start + (st % nq) * BM;
      load_tile<BM, D, NT>(sq + buf * BM * D, q0 + h * p.q_head_stride + i0 * p.q_row_stride,
                           p.q_row_stride, qs.len - i0, p.D, fallback);
      load_tile<BM, D, NT>(sdo + buf * BM * D, do0 + h * p.do_head_stride + i0 * p.do_row_stride,
                           p.do_row_stride, qs.len - i0, p.D, fallback);
    };
    load_tile<BN, D, NT>(sk, k + j0 * p.k_row_stride, p.k_row_stride, ks.len - j0, p.D, fallback);
    load_tile<BN, D, NT>(sv, v + j0 * p.v_row_stride, p.v_row_stride, ks.len - j0, p.D, fallback);
    if (steps > 0) load_step(0, 0);
    mma::cp_async_commit();

    for (int st = 0; st < steps; ++st) {
      const int buf = st & 1;
      const int i0 = q_start + (st % nq) * BM;
      mma::cp_async_wait<0>();
      __syncthreads();
      // Buffer buf^1 was read in step st-1, which every warp finished before the barrier.
      if (st + 1 < steps) load_step(st + 1, buf ^ 1);
      mma::cp_async_commit();
      const T* sqs = sq + buf * BM * D;
      const T* sdos = sdo + buf * BM * D;
      float s[1][BM / 8][4], dp[1][BM / 8][4];
      zero_frags(s);
      zero_frags(dp);
      warp_gemm_nt<T, 1, BM, D>(s, sk, warp * 16, sqs, p.D);    // Sᵀ: rows keys, cols queries
      warp_gemm_nt<T, 1, BM, D>(dp, sv, warp * 16, sdos, p.D);  // dPᵀ
      act_bwd_tile<BM / 8>(s[0], dp[0], p.act, p.pre_scale, ds_scale);  // s <- Pᵀ, dp <- dSᵀ
      const int kr0 = j0 + warp * 16;
      if (!tile_fully_visible(p.causal, p.window, i0, i0 + BM - 1, kr0, kr0 + 15)) {
        window_mask<true>(s[0], kr0, i0, p.causal, p.window);
        window_mask<true>(dp[0], kr0, i0, p.causal, p.window);
      }
      uint32_t pa[1][BM / 16][4], dsa[1][BM / 16][4];
      pack_a<T, BM>(pa[0], s[0]);  // P rounded to the value type, as in the forward
      pack_a<T, BM>(dsa[0], dp[0]);
      warp_gemm_rn<T, 1, BM, DS, D>(acc_dv, pa, sdos, d0, p.D);
      warp_gemm_rn<T, 1, BM, DS, D>(acc_dk, dsa, sqs, d0, p.D);
    }
    mma::cp_async_wait<0>();
    store_rows<T, DS>(dk + j0 * p.dkv_row_stride, p.dkv_row_stride, warp * 16, ks.len - j0, d0,
                      p.D, acc_dk[0], 1.f);
    store_rows<T, DS>(dv + j0 * p.dkv_row_stride, p.dkv_row_stride, warp * 16, ks.len - j0, d0,
                      p.D, acc_dv[0], p.qk_scale);
    __syncthreads();
  }
#endif
}

template <typename T, int D>
cudaError_t launch_gdpa_bwd_dq_mma(const BwdParams& p, int max_seq_len_q, cudaStream_t stream) {
  using Dq = BwdDqTraits<D>;
  auto kernel = gdpa_bwd_dq_mma_kernel<T, D>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               Dq::kSmemBytes);
  if (err != cudaSuccess) return err;
  const unsigned grid = cta_grid((int64_t(max_seq_len_q) + Dq::kBlockM - 1) / Dq::kBlockM, p.H, p.B);
  kernel<<<grid, Dq::kThreads, Dq::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_gdpa_bwd_dkdv_mma(const BwdParams& p, int max_seq_len_kv, cudaStream_t stream) {
  using Dkv = BwdDkdvTraits<D>;
  auto kernel = gdpa_bwd_dkdv_mma_kernel<T, D>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               Dkv::kSmemBytes);
  if (err != cudaSuccess) return err;
  const unsigned grid =
      cta_grid((int64_t(max_seq_len_kv) + Dkv::kBlockN - 1) / Dkv::kBlockN, p.Hkv * (D / Dkv::kSliceD), p.B);
  kernel<<<grid, Dkv::kThreads, Dkv::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_gdpa_bwd_mma(const BwdParams& p, int max_seq_len_q, int max_seq_len_kv,
                                cudaStream_t stream) {
  const cudaError_t err = launch_gdpa_bwd_dq_mma<T, D>(p, max_seq_len_q, stream);
  if (err != cudaSuccess) return err;
  return launch_gdpa_bwd_dkdv_mma<T, D>(p, max_seq_len_kv, stream);
}

}  // namespace gdpa
}  // namespace attnkit
