// The GDPA forward's output rows that no forward kernel writes, zeroed in one small launch before
// the forward (which then allocates its output uninitialised instead of zero-filling all of it:
// at max length 256 the fill was a sixth of the call's bytes).
//
// "Output is fully written" (DESIGN §3.1): rows outside every sequence and rows of a sequence that
// see no key are 0. Every forward kernel writes all rows of each query tile that sees at least
// one key, so what is left are (a) rows before the first clamped offset or from the last one on,
// and (b) in each sequence, the rows whose own key span is empty (params.h key_span): all of them
// when the sequence has no keys, else, with a window w >= 0, the rows i >= Lk + w (key_span's lo
// = max(0, i - w) only grows with i, its hi stays above it until i - w reaches Lk). Zeroing a row
// that the forward also writes is harmless (it runs first); with offsets that decrease (garbage:
// CUDA does not check them) every row still lies in (a) or in some clamped sequence, so the
// output stays finite.
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/gdpa/params.h"

namespace attnkit {
namespace gdpa {

#if defined(__CUDACC__) || defined(__HIPCC__)

// The first local row of a sequence whose key span is empty (the empty rows are a suffix).
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t first_keyless_row(int32_t window, int64_t lq,
                                                             int64_t lk) {
  if (lk <= 0) return 0;
  if (window < 0) return lq;
  const int64_t r = lk + window;
  return r < lq ? r : lq;
}

// Items b < B: sequence b's keyless rows; b == B: rows [0, first offset); b == B + 1: rows from
// the last offset to T. One block per item (grid-stride), rows of `row_elems` contiguous elements.
template <typename T>
__global__ void gdpa_zero_keyless_rows_kernel(T* __restrict__ out, int64_t row_elems,
                                              const int32_t* __restrict__ q_offsets,
                                              const int32_t* __restrict__ kv_offsets, int32_t B,
                                              int32_t Tq, int32_t Tk, int32_t window) {
  for (int64_t item = blockIdx.x; item < int64_t(B) + 2; item += gridDim.x) {
    int64_t r0, r1;
    if (item < B) {
      const int32_t b = static_cast<int32_t>(item);
      const SeqRange qs = seq_range(q_offsets, b, Tq), ks = seq_range(kv_offsets, b, Tk);
      r0 = qs.begin + first_keyless_row(window, qs.len, ks.len);
      r1 = int64_t(qs.begin) + qs.len;
    } else if (item == B) {
      const int32_t o = q_offsets[0];
      r0 = 0;
      r1 = o < 0 ? 0 : (o > Tq ? Tq : o);
    } else {
      const int32_t o = q_offsets[B];
      r0 = o < 0 ? 0 : (o > Tq ? Tq : o);
      r1 = Tq;
    }
    if (r0 >= r1) continue;
    const int64_t e0 = r0 * row_elems, e1 = r1 * row_elems;
    // 16-byte stores over the aligned middle, element stores at the two ends.
    constexpr int64_t kVec = 16 / sizeof(T);
    const int64_t v0 = (e0 + kVec - 1) / kVec * kVec, v1 = e1 / kVec * kVec;
    if (v0 < v1) {
      uint4* p = reinterpret_cast<uint4*>(out + v0);
      for (int64_t i = threadIdx.x; i < (v1 - v0) / kVec; i += blockDim.x) p[i] = make_uint4(0, 0, 0, 0);
      for (int64_t e = e0 + threadIdx.x; e < v0; e += blockDim.x) out[e] = T(0.f);
      for (int64_t e = v1 + threadIdx.x; e < e1; e += blockDim.x) out[e] = T(0.f);
    } else {
      for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) out[e] = T(0.f);
    }
  }
}

// out: a contiguous [Tq, H, D] tensor whose base is 16-byte aligned (the caching allocator's).
template <typename T>
cudaError_t launch_gdpa_zero_keyless_rows(T* out, int64_t row_elems, const int32_t* q_offsets,
                                          const int32_t* kv_offsets, int32_t B, int32_t Tq,
                                          int32_t Tk, int32_t window, cudaStream_t stream) {
  const int64_t items = int64_t(B) + 2;
  const unsigned grid = static_cast<unsigned>(items < 4096 ? items : 4096);
  gdpa_zero_keyless_rows_kernel<T><<<grid, 256, 0, stream>>>(out, row_elems, q_offsets, kv_offsets,
                                                             B, Tq, Tk, window);
  return cudaGetLastError();
}

#endif

}  // namespace gdpa
}  // namespace attnkit
