// Portable GDPA kernels on CUDA cores (fp32 math): the fp32 path and the fallback wherever the
// tensor-core kernels do not apply (pre-sm_80, HIP). Same tiling idea, all in shared memory:
// a CTA of 128 threads owns 32 rows (queries for fwd/dq, keys for dkdv) and streams 32-row tiles
// of the other side. Exact activations, fp32 accumulation, no atomics.
#pragma once

#include "kernels/gdpa/activation_gpu.cuh"
#include "kernels/gdpa/params.h"

namespace attnkit {
namespace gdpa {

constexpr int kSimpleRows = 32;
constexpr int kSimpleThreads = 128;
constexpr int kSimpleMaxD = 256;

// Shared memory: `tiles` [32][D+1] fp32 tiles (+1 column: rows on different banks) and a 32x33
// score tile, plus a second score tile for the backward.
ATTNKIT_HOST_DEVICE inline int simple_smem_bytes(int D, int tiles) {
  return (tiles * kSimpleRows * (D + 1) + 2 * kSimpleRows * (kSimpleRows + 1)) * 4;
}

template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE void simple_load(float* dst, const T* src, int64_t row_stride,
                                               int rows_valid, int D) {
  for (int i = threadIdx.x; i < kSimpleRows * D; i += kSimpleThreads) {
    const int r = i / D, c = i % D;
    dst[r * (D + 1) + c] = r < rows_valid ? to_float(src[r * row_stride + c]) : 0.f;
  }
}

// 32x32 products of row tiles a (rows = "i") and b (rows = "j") over D: thread t computes
// (i = t / 4, j = t % 4 + 4m) for m < 8.
ATTNKIT_DEVICE ATTNKIT_INLINE void simple_dots(float (&out)[8], const float* a, const float* b, int D) {
  const int i = threadIdx.x / 4, j0 = threadIdx.x % 4;
#pragma unroll
  for (int m = 0; m < 8; ++m) out[m] = 0.f;
  for (int c = 0; c < D; ++c) {
    const float x = a[i * (D + 1) + c];
#pragma unroll
    for (int m = 0; m < 8; ++m) out[m] += x * b[(j0 + 4 * m) * (D + 1) + c];
  }
}

// acc[m] (row i = t / 4, col c = t % 4 + 4m) += sum_j w[i][j] · rows[j][c], w a 32x33 tile.
ATTNKIT_DEVICE ATTNKIT_INLINE void simple_accumulate(float (&acc)[kSimpleMaxD / 4], const float* w,
                                                     const float* rows, int D) {
  const int i = threadIdx.x / 4, c0 = threadIdx.x % 4;
  for (int j = 0; j < kSimpleRows; ++j) {
    const float wij = w[i * (kSimpleRows + 1) + j];
    if (wij == 0.f) continue;
#pragma unroll
    for (int m = 0; m < kSimpleMaxD / 4; ++m) {
      const int c = c0 + 4 * m;
      if (c < D) acc[m] += wij * rows[j * (D + 1) + c];
    }
  }
}

template <typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE void simple_store(T* out, int64_t row_stride, int rows_valid, int D,
                                                const float (&acc)[kSimpleMaxD / 4], float scale) {
  const int i = threadIdx.x / 4, c0 = threadIdx.x % 4;
  if (i >= rows_valid) return;
#pragma unroll
  for (int m = 0; m < kSimpleMaxD / 4; ++m) {
    const int c = c0 + 4 * m;
    if (c < D) out[i * row_stride + c] = from_float<T>(acc[m] * scale);
  }
}

// Forward (kDq = false) or dQ (kDq = true): rows are queries, streamed tiles are keys.
template <typename T, bool kDq>
__global__ void __launch_bounds__(kSimpleThreads) gdpa_simple_q_kernel(const BwdParams p) {
  extern __shared__ float smem[];
  const int D = p.D;
  float* sq = smem;
  float* sk = sq + kSimpleRows * (D + 1);
  float* sv = sk + kSimpleRows * (D + 1);
  float* sdo = sv + kSimpleRows * (D + 1);  // dq only
  float* sw = sdo + (kDq ? kSimpleRows * (D + 1) : 0);
  const int b = blockIdx.x, h = blockIdx.z, hk = h / (p.H / p.Hkv);
  const SeqRange qs = seq_range(p.q_offsets, b, p.Tq), ks = seq_range(p.kv_offsets, b, p.Tk);
  const T* q = static_cast<const T*>(p.q) + qs.begin * p.q_row_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + ks.begin * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + ks.begin * p.v_row_stride + hk * p.v_head_stride;
  const int i = threadIdx.x / 4, j0t = threadIdx.x % 4;

  for (int tile = blockIdx.y; tile * kSimpleRows < qs.len; tile += gridDim.y) {
    const int i0 = tile * kSimpleRows, rows = min(kSimpleRows, qs.len - i0);
    float acc[kSimpleMaxD / 4];
#pragma unroll
    for (int m = 0; m < kSimpleMaxD / 4; ++m) acc[m] = 0.f;
    simple_load(sq, q + i0 * p.q_row_stride, p.q_row_stride, rows, D);
    if (kDq) {
      const T* dout = static_cast<const T*>(p.dout) + qs.begin * p.do_row_stride + h * p.do_head_stride;
      simple_load(sdo, dout + i0 * p.do_row_stride, p.do_row_stride, rows, D);
    }
    const Span kv = key_span(p.causal, p.window, i0, i0 + rows - 1, ks.len);
    for (int j0 = static_cast<int>(kv.lo); j0 < kv.hi; j0 += kSimpleRows) {
      const int cols = min(kSimpleRows, static_cast<int>(kv.hi) - j0);
      __syncthreads();
      simple_load(sk, k + j0 * p.k_row_stride, p.k_row_stride, cols, D);
      simple_load(sv, v + j0 * p.v_row_stride, p.v_row_stride, cols, D);
      __syncthreads();
      float s[8], dp[8];
      simple_dots(s, sq, sk, D);
      if (kDq) simple_dots(dp, sdo, sv, D);
#pragma unroll
      for (int m = 0; m < 8; ++m) {
        const int j = j0t + 4 * m;
        const bool vis = j < cols && visible(p.causal, p.window, i0 + i, j0 + j);
        const float x = s[m] * p.pre_scale;
        float w;
        if (kDq) {
          w = vis ? p.qk_scale * p.pre_scale * act_bwd_exact(p.act, x) * dp[m] : 0.f;
        } else {  // P rounded to the value type before P·V (DESIGN §3.1)
          w = vis ? to_float(from_float<T>(act_fwd_exact(p.act, x))) : 0.f;
        }
        sw[i * (kSimpleRows + 1) + j] = w;
      }
      __syncthreads();
      simple_accumulate(acc, sw, kDq ? sk : sv, D);
    }
    if (kDq) {
      T* dq = static_cast<T*>(p.dq) + qs.begin * p.dq_row_stride + h * p.dq_head_stride;
      simple_store(dq + i0 * p.dq_row_stride, p.dq_row_stride, rows, D, acc, 1.f);
    } else {
      T* out = static_cast<T*>(p.out) + qs.begin * p.o_row_stride + h * p.o_head_stride;
      simple_store(out + i0 * p.o_row_stride, p.o_row_stride, rows, D, acc, p.qk_scale);
    }
    __syncthreads();
  }
}

// dK and dV: rows are keys of kv head hk; streamed tiles are queries of its G heads.
template <typename T>
__global__ void __launch_bounds__(kSimpleThreads) gdpa_simple_dkdv_kernel(const BwdParams p) {
  extern __shared__ float smem[];
  const int D = p.D;
  float* sk = smem;
  float* sv = sk + kSimpleRows * (D + 1);
  float* sq = sv + kSimpleRows * (D + 1);
  float* sdo = sq + kSimpleRows * (D + 1);
  float* sp = sdo + kSimpleRows * (D + 1);
  float* sds = sp + kSimpleRows * (kSimpleRows + 1);
  const int b = blockIdx.x, hk = blockIdx.z, G = p.H / p.Hkv;
  const SeqRange qs = seq_range(p.q_offsets, b, p.Tq), ks = seq_range(p.kv_offsets, b, p.Tk);
  const T* k = static_cast<const T*>(p.k) + ks.begin * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + ks.begin * p.v_row_stride + hk * p.v_head_stride;
  const int jr = threadIdx.x / 4, i0t = threadIdx.x % 4;  // thread's key row, first query col

  for (int tile = blockIdx.y; tile * kSimpleRows < ks.len; tile += gridDim.y) {
    const int j0 = tile * kSimpleRows, rows = min(kSimpleRows, ks.len - j0);
    float adk[kSimpleMaxD / 4], adv[kSimpleMaxD / 4];
#pragma unroll
    for (int m = 0; m < kSimpleMaxD / 4; ++m) adk[m] = adv[m] = 0.f;
    __syncthreads();
    simple_load(sk, k + j0 * p.k_row_stride, p.k_row_stride, rows, D);
    simple_load(sv, v + j0 * p.v_row_stride, p.v_row_stride, rows, D);
    for (int h = hk * G; h < (hk + 1) * G; ++h) {
      const T* q = static_cast<const T*>(p.q) + qs.begin * p.q_row_stride + h * p.q_head_stride;
      const T* dout = static_cast<const T*>(p.dout) + qs.begin * p.do_row_stride + h * p.do_head_stride;
      const Span qr = query_span(p.causal, p.window, j0, j0 + rows - 1, qs.len);
      for (int i0 = static_cast<int>(qr.lo); i0 < qr.hi; i0 += kSimpleRows) {
        const int cols = min(kSimpleRows, static_cast<int>(qr.hi) - i0);
        __syncthreads();
        simple_load(sq, q + i0 * p.q_row_stride, p.q_row_stride, cols, D);
        simple_load(sdo, dout + i0 * p.do_row_stride, p.do_row_stride, cols, D);
        __syncthreads();
        float s[8], dp[8];
        simple_dots(s, sk, sq, D);   // Sᵀ[key][query]
        simple_dots(dp, sv, sdo, D);  // dPᵀ
#pragma unroll
        for (int m = 0; m < 8; ++m) {
          const int i = i0t + 4 * m;
          const bool vis = i < cols && jr < rows && visible(p.causal, p.window, i0 + i, j0 + jr);
          const float x = s[m] * p.pre_scale;
          sp[jr * (kSimpleRows + 1) + i] =
              vis ? p.qk_scale * to_float(from_float<T>(act_fwd_exact(p.act, x))) : 0.f;
          sds[jr * (kSimpleRows + 1) + i] =
              vis ? p.qk_scale * p.pre_scale * act_bwd_exact(p.act, x) * dp[m] : 0.f;
        }
        __syncthreads();
        simple_accumulate(adv, sp, sdo, D);
        simple_accumulate(adk, sds, sq, D);
      }
    }
    T* dk = static_cast<T*>(p.dk) + ks.begin * p.dkv_row_stride + hk * p.dkv_head_stride;
    T* dv = static_cast<T*>(p.dv) + ks.begin * p.dkv_row_stride + hk * p.dkv_head_stride;
    simple_store(dk + j0 * p.dkv_row_stride, p.dkv_row_stride, rows, D, adk, 1.f);
    simple_store(dv + j0 * p.dkv_row_stride, p.dkv_row_stride, rows, D, adv, 1.f);
  }
}

inline int simple_tiles(int max_seq_len) {  // in int64: a hint near INT32_MAX must not wrap
  const int64_t tiles = (int64_t(max_seq_len) + kSimpleRows - 1) / kSimpleRows;
  return static_cast<int>(tiles < 1 ? 1 : (tiles > 65535 ? 65535 : tiles));
}

template <typename T>
cudaError_t launch_gdpa_fwd_simple(const FwdParams& fp, int max_seq_len_q, cudaStream_t stream) {
  BwdParams p{};
  static_cast<FwdParams&>(p) = fp;
  const int smem = simple_smem_bytes(p.D, 3);
  auto kernel = gdpa_simple_q_kernel<T, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(p.B, simple_tiles(max_seq_len_q), p.H), kSimpleThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gdpa_bwd_simple(const BwdParams& p, int max_seq_len_q, int max_seq_len_kv,
                                   cudaStream_t stream) {
  const int smem = simple_smem_bytes(p.D, 4);
  auto dq_kernel = gdpa_simple_q_kernel<T, true>;
  auto dkdv_kernel = gdpa_simple_dkdv_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  dq_kernel<<<dim3(p.B, simple_tiles(max_seq_len_q), p.H), kSimpleThreads, smem, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  dkdv_kernel<<<dim3(p.B, simple_tiles(max_seq_len_kv), p.Hkv), kSimpleThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace gdpa
}  // namespace attnkit
