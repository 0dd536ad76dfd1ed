// Tensor-core flash attention backward (mma.sync m16n8k16), fp16 / bf16, head dims 64 and 128.
// Torch-free; sm80+ only. Two kernels after the shared delta = rowsum(dO * O) preprocessing
// (simt::bwd_delta_kernel), both recomputing P from lse and without atomics, so the result is
// deterministic:
//   dQ kernel   (grid H x B x query tiles): 4 warps x 16 query rows; per key tile S = Q K^T and
//               dP = dO V^T, dS = P * (dP - delta) * d(score), dQ += dS K.
//   dK/dV kernel (grid Hkv x B x key tiles): 4 warps x 16 key rows; for every query head of the
//               GQA group and every query tile the window allows, S^T = K Q^T, dP^T = V dO^T,
//               dV += P^T dO, dK += dS^T Q, so dK/dV stay in registers.
// Operands sit in XOR-swizzled shared memory (see mma_fwd.cuh) and are read with ldmatrix (the
// .trans form for the products that contract over tile rows); P and dS are packed from the
// accumulators into A fragments. Tiles are loaded with cp.async, one tile set at a time.
#pragma once

#include <cstdint>

#include "kernels/flash/mma_fwd.cuh"

namespace attnkit {
namespace flash {
namespace mma {

template <int kD>
constexpr int bwd_smem_bytes() {
  return 4 * 64 * kD * 2 + 2 * 64 * 4;  // four 64-row tiles + per-row lse / delta
}

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

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads)
    bwd_dkdv_kernel(Params p, const T* __restrict__ dout, const T* __restrict__ q,
                    const T* __restrict__ k, const T* __restrict__ v,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    T* __restrict__ dk, T* __restrict__ dv) {
#if ATTNKIT_HAS_MMA_SM80
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + 64 * kD;
  T* qs = vs + 64 * kD;
  T* dos = qs + 64 * kD;
  float* lse_s = reinterpret_cast<float*>(dos + 64 * kD);
  float* delta_s = lse_s + 64;
  constexpr int kDT = kD / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t hk = blockIdx.x, b = blockIdx.y, G = p.H / p.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  const SeqRange s = seq_range(p, b);
  const int64_t ntiles = (s.lk + 63) / 64;

  // Key tiles in order: under a causal mask the first ones see the most queries.
  for (int64_t tt = blockIdx.z; tt < ntiles; tt += gridDim.z) {
    const int64_t j0 = tt * 64;
    const int64_t krows = s.lk - j0 < 64 ? s.lk - j0 : 64;
    const int64_t qlo = query_range(p, j0, s.lq, s.lk).lo;
    const int64_t qhi = query_range(p, j0 + krows - 1, s.lq, s.lk).hi;
    const int64_t c_row[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
    float dka[kDT][4], dva[kDT][4];
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dka[dt][e] = dva[dt][e] = 0.f;

    __syncthreads();
    load_tile_async<T, kD>(ks, k + b * p.k.batch + (s.k0 + j0) * p.k.row + hk * p.k.head, p.k.row, krows);
    load_tile_async<T, kD>(vs, v + b * p.v.batch + (s.k0 + j0) * p.v.row + hk * p.v.head, p.v.row, krows);
    cp_async_commit();
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      for (int64_t i0 = qlo; i0 <= qhi; i0 += 64) {
        const int64_t n = qhi - i0 + 1;
        __syncthreads();  // every warp is done with the previous qs / dos / lse_s / delta_s
        load_tile_async<T, kD>(qs, q + b * p.q.batch + (s.q0 + i0) * p.q.row + h * p.q.head, p.q.row, n);
        load_tile_async<T, kD>(dos, dout + b * p.dout.batch + (s.q0 + i0) * p.dout.row + h * p.dout.head,
                               p.dout.row, n);
        cp_async_commit();
        if (threadIdx.x < 64) {
          const int64_t i = i0 + threadIdx.x;
          const int64_t li = b * p.lse.batch + h * p.lse.head + (s.q0 + i) * p.lse.row;
          lse_s[threadIdx.x] = i <= qhi ? lse[li] * kLog2e : INFINITY;
          delta_s[threadIdx.x] = i <= qhi ? delta[li] : 0.f;
        }
        cp_async_wait<0>();
        __syncthreads();
        float sc[8][4], dpv[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) sc[nt][e] = dpv[nt][e] = 0.f;
        gemm_rows<T, kD>(sc, ks, warp * 16, qs, lane);    // S^T = K Q^T
        gemm_rows<T, kD>(dpv, vs, warp * 16, dos, lane);  // dP^T = V dO^T
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + 2 * t4 + (e % 2);
            const int64_t i = i0 + col, j = c_row[e / 2];
            float pv, ds;
            p_and_ds(sc[nt][e], dpv[nt][e], lse_s[col], delta_s[col],
                     i <= qhi && visible(p, i, j, s.lq, s.lk), scale, cap, pv, ds);
            sc[nt][e] = pv;
            dpv[nt][e] = ds;
          }
        }
        gemm_acc_tile<T, kD>(dva, sc, dos, lane);  // dV += P^T dO
        gemm_acc_tile<T, kD>(dka, dpv, qs, lane);  // dK += dS^T Q
      }
    }
    cp_async_wait<0>();  // a tile no query sees still drained its K / V loads
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      if (c_row[rh] >= s.lk) continue;
      T* krow = dk + b * p.dk.batch + (s.k0 + c_row[rh]) * p.dk.row + hk * p.dk.head;
      T* vrow = dv + b * p.dv.batch + (s.k0 + c_row[rh]) * p.dv.row + hk * p.dv.head;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        *reinterpret_cast<uint32_t*>(krow + dt * 8 + 2 * t4) = pack2<T>(dka[dt][rh * 2], dka[dt][rh * 2 + 1]);
        *reinterpret_cast<uint32_t*>(vrow + dt * 8 + 2 * t4) = pack2<T>(dva[dt][rh * 2], dva[dt][rh * 2 + 1]);
      }
    }
  }
#endif  // ATTNKIT_HAS_MMA_SM80
}

// Host side: like fwd_supported, plus the gradient tensors' alignment.
inline bool bwd_supported(const Params& p, const void* dout, const void* q, const void* k,
                          const void* v, const void* o, const void* dq, const void* dk,
                          const void* dv, int sm_major) {
  return fwd_supported(p, q, k, v, o, sm_major) && aligned16(dout) && aligned16(dq) &&
         aligned16(dk) && aligned16(dv) && strides8(p.dout) && strides8(p.dq) &&
         strides8(p.dk) && strides8(p.dv);
}

template <typename T, int kD>
void launch_bwd_d(const Params& p, const T* dout, const T* q, const T* k, const T* v,
                  const float* lse, const float* delta, T* dq, T* dk, T* dv, int64_t rows_q,
                  int64_t rows_k, cudaStream_t stream) {
  auto tiles = [](int64_t rows) {
    const int64_t t = (rows + 63) / 64;
    return static_cast<unsigned>(t < 1 ? 1 : (t > 65535 ? 65535 : t));  // kernels loop over the rest
  };
  constexpr int smem = bwd_smem_bytes<kD>();
  cudaFuncSetAttribute(bwd_dq_kernel<T, kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaFuncSetAttribute(bwd_dkdv_kernel<T, kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  bwd_dq_kernel<T, kD><<<dim3(p.H, p.B, tiles(rows_q)), kThreads, smem, stream>>>(
      p, dout, q, k, v, lse, delta, dq);
  bwd_dkdv_kernel<T, kD><<<dim3(p.Hkv, p.B, tiles(rows_k)), kThreads, smem, stream>>>(
      p, dout, q, k, v, lse, delta, dk, dv);
}

template <typename T>
void launch_bwd(const Params& p, const T* dout, const T* q, const T* k, const T* v,
                const float* lse, const float* delta, T* dq, T* dk, T* dv, int64_t rows_q,
                int64_t rows_k, cudaStream_t stream) {
  if (p.D == 64) {
    launch_bwd_d<T, 64>(p, dout, q, k, v, lse, delta, dq, dk, dv, rows_q, rows_k, stream);
  } else {
    launch_bwd_d<T, 128>(p, dout, q, k, v, lse, delta, dq, dk, dv, rows_q, rows_k, stream);
  }
}

}  // namespace mma
}  // namespace flash
}  // namespace attnkit
