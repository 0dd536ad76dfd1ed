// Shared-memory tiles and warp-level products for the GDPA tensor-core kernels (sm_80+).
//
// Every tile is [rows][D] 16-bit elements stored in 16-byte chunks whose index is XOR-swizzled by
// (row % 8): the 8 row addresses of one ldmatrix then fall in 8 different bank groups. A warp
// always owns 16 rows of the left operand; accumulators follow the m16n8k16 C layout
// (acc[n8 tile][4], see kernels/common/mma.cuh).
#pragma once

#include "kernels/common/mma.cuh"
#include "kernels/gdpa/params.h"

namespace attnkit {
namespace gdpa {

#if ATTNKIT_HAS_MMA_SM80

template <int D>
ATTNKIT_DEVICE ATTNKIT_INLINE int swizzled(int row, int col) {  // col: a multiple of 8
  static_assert(D % 64 == 0, "swizzle needs at least 8 chunks per row");
  return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8;
}

// Asynchronously copies rows [0, rows) x cols [0, d_valid) of a strided global tile into a
// swizzled shared tile; rows >= rows_valid and cols >= d_valid are zero-filled without reading.
// `fallback` is any readable address (cp.async with 0 source bytes still takes one).
template <int ROWS, int D, int THREADS, typename T>
ATTNKIT_DEVICE ATTNKIT_INLINE void load_tile(T* smem, const T* gmem, int64_t row_stride,
                                             int rows_valid, int d_valid, const T* fallback) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int c = threadIdx.x; c < kChunks; c += THREADS) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool ok = row < rows_valid && col < d_valid;
    mma::cp_async_16(smem + swizzled<D>(row, col), ok ? gmem + row * row_stride + col : fallback,
                     ok ? 16 : 0);
  }
}

// The keys a query tile [i_first, i_last] of a sequence sees (params.h key_span: causal / window),
// walked BN at a time from `lo` through double-buffered shared tiles ([2][BN][D] for K and for V,
// tile j in buffer j % 2): the kv walk of the sm80 kernels (fwd_mma, bwd_mma's dQ pass). k, v
// are the sequence's rows of the (kv) head, rebased here to `lo`. Strides, the head dim and the
// zero-fill address are read from the kernel's parameters where they are used (a copy in
// registers spilled the D = 64 forward).
template <typename T, int BN, int D, int NT, class Params>
struct KvTiles {
  const Params& p;
  const T* k;
  const T* v;
  int lo, len, n_tiles;

  ATTNKIT_DEVICE ATTNKIT_INLINE KvTiles(const Params& p_, const T* k_seq, const T* v_seq,
                                        int i_first, int i_last, int lk)
      : p(p_) {
    const Span kv = key_span(p.causal, p.window, i_first, i_last, lk);
    lo = static_cast<int>(kv.lo);
    len = kv.hi > kv.lo ? static_cast<int>(kv.hi - kv.lo) : 0;
    n_tiles = (len + BN - 1) / BN;
    k = k_seq + int64_t(lo) * p.k_row_stride;
    v = v_seq + int64_t(lo) * p.v_row_stride;
  }
  ATTNKIT_DEVICE ATTNKIT_INLINE static T* buf(T* tiles, int j) { return tiles + (j & 1) * BN * D; }
  // Tile j of K / V into its buffer (rows past the span zero-filled, cp.async: the caller commits).
  ATTNKIT_DEVICE ATTNKIT_INLINE void load_k(T* sk, int j) const {
    load_tile<BN, D, NT>(buf(sk, j), k + (j * BN) * p.k_row_stride, p.k_row_stride, len - j * BN,
                         p.D, static_cast<const T*>(p.q));
  }
  ATTNKIT_DEVICE ATTNKIT_INLINE void load_v(T* sv, int j) const {
    load_tile<BN, D, NT>(buf(sv, j), v + (j * BN) * p.v_row_stride, p.v_row_stride, len - j * BN,
                         p.D, static_cast<const T*>(p.q));
  }
  // Tile 0 of K, then of V: one cp.async group each (the walks wait for K before V).
  ATTNKIT_DEVICE ATTNKIT_INLINE void load_first(T* sk, T* sv) const {
    load_k(sk, 0);
    mma::cp_async_commit();
    load_v(sv, 0);
    mma::cp_async_commit();
  }
};

// Every entry of fragment accumulators -> 0.
template <int M, int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void zero_frags(float (&c)[M][N][4]) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int i = 0; i < N; ++i) c[m][i][0] = c[m][i][1] = c[m][i][2] = c[m][i][3] = 0.f;
}

// acc[m][N/8][4] += A[a_row0 + 16m + 0..16)[0..D) · B[0..N)[0..D)ᵀ for m < M, with A and B
// swizzled shared tiles; each B fragment feeds M products. Used for S = Q·Kᵀ, dP = dO·Vᵀ and
// their transposes.
template <typename T, int M, int N, int D>
ATTNKIT_DEVICE ATTNKIT_INLINE void warp_gemm_nt(float (&acc)[M][N / 8][4], const T* a, int a_row0,
                                                const T* b, int d_valid) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    if (kk * 16 >= d_valid) break;  // padded head dims: the rest is zeros
    uint32_t af[M][4];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      mma::ldmatrix_x4(af[m], a + swizzled<D>(a_row0 + m * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                              kk * 16 + (lane >> 4) * 8));
    }
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t bf[4];
      mma::ldmatrix_x4(bf, b + swizzled<D>(np * 16 + (lane & 7) + (lane >> 4) * 8,
                                           kk * 16 + ((lane >> 3) & 1) * 8));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
      for (int m = 0; m < M; ++m) {
        mma::mma_16816<T>(acc[m][2 * np], af[m], b0);
        mma::mma_16816<T>(acc[m][2 * np + 1], af[m], b1);
      }
    }
  }
}

// acc[m][DN/8][4] += A[m] · B[0..K)[d0 .. d0 + DN) for m < M: A[m] (16 x K) in registers as
// m16n8k16 A fragments, B a swizzled [K][D] shared tile read transposed; each B fragment feeds M
// products. Used for O = P·V, dV = Pᵀ·dO, dK = dSᵀ·Q, dQ = dS·K.
template <typename T, int M, int K, int DN, int D>
ATTNKIT_DEVICE ATTNKIT_INLINE void warp_gemm_rn(float (&acc)[M][DN / 8][4],
                                                const uint32_t (&a)[M][K / 16][4], const T* b,
                                                int d0, int d_valid) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int dp = 0; dp < DN / 16; ++dp) {
      if (d0 + dp * 16 >= d_valid) break;
      uint32_t bf[4];
      mma::ldmatrix_x4_trans(bf, b + swizzled<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                 d0 + dp * 16 + (lane >> 4) * 8));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
      for (int m = 0; m < M; ++m) {
        mma::mma_16816<T>(acc[m][2 * dp], a[m][kk], b0);
        mma::mma_16816<T>(acc[m][2 * dp + 1], a[m][kk], b1);
      }
    }
  }
}

// Two adjacent n8 accumulator tiles are one A fragment of the next product (k = their columns).
template <typename T, int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void pack_a(uint32_t (&a)[N / 16][4], const float (&c)[N / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    a[kk][0] = mma::pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = mma::pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = mma::pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = mma::pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// Zeroes the accumulator entries (m16n8 fragment layout, N column blocks of 8) at whose tile
// position (r0 + row, c0 + col) `masked(row_index, col_index)` holds: the one walk over the
// fragment that the masks below share.
// (Over the first kUsed column groups only when given.)
template <int N, typename Masked, int kUsed = N>
ATTNKIT_DEVICE ATTNKIT_INLINE void zero_masked(float (&c)[N][4], int r0, int c0, Masked masked) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int nt = 0; nt < kUsed; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = r0 + (lane >> 2) + (e >> 1) * 8;
      const int col = c0 + nt * 8 + (lane & 3) * 2 + (e & 1);
      if (masked(row, col)) c[nt][e] = 0.f;
    }
}

// Zeroes accumulator entries whose (row, col) is masked: row index `r0 + row`, column `c0 + col`,
// masked when col_index > row_index ("key after query"), or the transpose when kRowIsKey.
template <bool kRowIsKey, int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void causal_mask(float (&c)[N][4], int r0, int c0) {
  zero_masked(c, r0, c0, [](int row, int col) { return kRowIsKey ? row > col : col > row; });
}

// Zeroes accumulator entries whose (query, key) the causal / window mask rejects (params.h
// `visible`): rows are queries r0 + row and columns keys c0 + col, or the transpose when
// kRowIsKey.
template <bool kRowIsKey, int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void window_mask(float (&c)[N][4], int r0, int c0, bool causal,
                                               int window) {
  zero_masked(c, r0, c0, [=](int row, int col) {
    return !visible(causal, window, kRowIsKey ? col : row, kRowIsKey ? row : col);
  });
}

// window_mask's choice for an [N <= 8][4] tile as one bit per entry (bit 4·nt + e: masked), for a
// caller that zeroes the same entries twice (bwd_ws.cuh: the scores, then the dS factor) without
// keeping 32 predicates live through the work between.
template <bool kRowIsKey, int N>
ATTNKIT_DEVICE ATTNKIT_INLINE uint32_t window_mask_bits(int r0, int c0, bool causal, int window) {
  static_assert(N * 4 <= 32, "one bit per entry");
  const int lane = threadIdx.x & 31;
  uint32_t bits = 0;
#pragma unroll
  for (int nt = 0; nt < N; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = r0 + (lane >> 2) + (e >> 1) * 8;
      const int col = c0 + nt * 8 + (lane & 3) * 2 + (e & 1);
      if (!visible(causal, window, kRowIsKey ? col : row, kRowIsKey ? row : col)) {
        bits |= 1u << (4 * nt + e);
      }
    }
  return bits;
}

template <int N>
ATTNKIT_DEVICE ATTNKIT_INLINE void zero_bits(float (&c)[N][4], uint32_t bits) {
#pragma unroll
  for (int nt = 0; nt < N; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (bits & (1u << (4 * nt + e))) c[nt][e] = 0.f;
    }
}

// Zeroes accumulator entries of columns >= col_end (local column index of the tile), e.g. keys
// past the sequence that a tensor-map copy brought in from the next one (possibly inf / NaN).
template <int N, int kUsed = N>
ATTNKIT_DEVICE ATTNKIT_INLINE void mask_cols_from(float (&c)[N][4], int col_end) {
  const auto past_end = [=](int, int col) { return col >= col_end; };
  zero_masked<N, decltype(past_end), kUsed>(c, 0, 0, past_end);
}

// One butterfly step of quad_transpose (m = 1 or 2): for each pair of entries (i, i + m), a lane
// keeps the one whose bit m agrees with its own and swaps the other with lane q ^ m. After the
// step m = 1 alone, with c = q & ~1 and k = i + (q & 1), lane q holds v[i] = M[c][k] and
// v[i + 1] = M[c + 1][k] for i = 0, 2: entries c and c + 1 of column k, in order.
ATTNKIT_DEVICE ATTNKIT_INLINE void quad_butterfly(uint32_t (&v)[4], int q, int m) {
  const bool hi = (q & m) != 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (i & m) continue;  // the pair (i, i + m)
    const uint32_t recv = shfl_xor(hi ? v[i] : v[i + m], m);
    if (hi) {
      v[i] = recv;
    } else {
      v[i + m] = recv;
    }
  }
}

// Transposes a 4 x 4 block of 32-bit values across the four lanes of a quad (q = lane % 4):
// lane q holds v[i] = M[q][i] on entry and v[j] = M[j][q] on return. Two butterfly steps.
ATTNKIT_DEVICE ATTNKIT_INLINE void quad_transpose(uint32_t (&v)[4], int q) {
  quad_butterfly(v, q, 1);
  quad_butterfly(v, q, 2);
}

// Stores a warp's 16 x DN accumulator tile (times `scale`) to rows [row0, row0 + 16) of a
// strided global tensor, skipping rows >= rows_valid and cols >= d_valid.
//
// The accumulator layout gives a lane two adjacent columns of each 8-column group, so a plain
// store is 4 bytes per lane and every 32-byte sector is written by two instructions. When the
// whole 16 x DN slice is in range and rows are 16-byte aligned, each quad transposes four groups
// (quad_transpose) so that lane q holds the 8 columns of group q: one 16-byte store per lane, a
// row's 64 bytes from one quad, 4x fewer store instructions (on the H200 the 4-byte stores of the
// GDPA forward's epilogue took a quarter of its issue samples: per-element register reuse waited
// on each store). kStoreBytes = 8 stops after the first butterfly step: two 8-byte stores per
// lane and four groups (a quad's 32 contiguous bytes), 7 instructions fewer per group of four
// (the GDPA forward's per-unit epilogue is issue-bound: docs/performance.md, forty-fourth session).
template <typename T, int DN, int kStoreBytes = 16>
ATTNKIT_DEVICE ATTNKIT_INLINE void store_rows(T* out, int64_t row_stride, int row0, int rows_valid,
                                              int d0, int d_valid, const float (&c)[DN / 8][4],
                                              float scale) {
  const int lane = threadIdx.x & 31;
  if constexpr (DN % 32 == 0) {
    const bool vec = d0 % 8 == 0 && d0 + DN <= d_valid &&
                     ((reinterpret_cast<uintptr_t>(out) | uintptr_t(row_stride * sizeof(T))) & 15) == 0;
    if (vec) {  // warp-uniform: every lane takes part in the shuffles
      const int q = lane & 3;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row0 + (lane >> 2) + half * 8;
        T* dst = out + int64_t(row) * row_stride + d0 +
                 (kStoreBytes == 16 ? q * 8 : (q & 1) * 8 + (q & 2) * 2);
#pragma unroll
        for (int n0 = 0; n0 < DN / 8; n0 += 4) {
          uint32_t v[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            v[i] = mma::pack2<T>(c[n0 + i][2 * half] * scale, c[n0 + i][2 * half + 1] * scale);
          }
          if constexpr (kStoreBytes == 16) {
            quad_transpose(v, q);
            if (row < rows_valid) {
              *reinterpret_cast<uint4*>(dst + n0 * 8) = make_uint4(v[0], v[1], v[2], v[3]);
            }
          } else {
            static_assert(kStoreBytes == 8, "16- or 8-byte stores");
            // Lane q: columns 2 (q & 2) .. + 3 of groups n0 + (q & 1) and n0 + 2 + (q & 1).
            quad_butterfly(v, q, 1);
            if (row < rows_valid) {
              *reinterpret_cast<uint2*>(dst + n0 * 8) = make_uint2(v[0], v[1]);
              *reinterpret_cast<uint2*>(dst + n0 * 8 + 16) = make_uint2(v[2], v[3]);
            }
          }
        }
      }
      return;
    }
  }
#pragma unroll
  for (int nt = 0; nt < DN / 8; ++nt) {
    const int col = d0 + nt * 8 + (lane & 3) * 2;
    if (col >= d_valid) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + (lane >> 2) + half * 8;
      if (row < rows_valid) {
        *reinterpret_cast<uint32_t*>(out + row * row_stride + col) =
            mma::pack2<T>(c[nt][2 * half] * scale, c[nt][2 * half + 1] * scale);
      }
    }
  }
}

#endif  // ATTNKIT_HAS_MMA_SM80

}  // namespace gdpa
}  // namespace attnkit
