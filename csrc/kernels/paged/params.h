// Arguments and element helpers of the paged decode kernels (torch-free, host and device), shared
// by the CPU kernels and the CUDA kernels so both read the caches and decode fp8 the same way.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/portability.h"

namespace attnkit {
namespace paged {

// How cache elements turn into floats. kSame: the query dtype. Fp8 kinds are stored as bytes
// (uint8 or torch's float8 dtypes); kInt8 only with per-token scales (pa_fwd).
enum class CacheKind : int { kSame = 0, kFp8E4M3 = 1, kFp8E5M2 = 2, kInt8 = 3 };

// Tokens per split-K partition. A multiple of every block size (8, 16, 32); 256 keeps the
// per-block logits in 16 KB of shared memory for 16 query rows.
constexpr int kPartition = 256;
// Query rows (query heads x new tokens) one thread block serves while reading a KV head once.
constexpr int kMaxRows = 16;
constexpr int kMaxHeadDim = 256;
constexpr int kMaxSplits = 256;

// ---- fp8 (OCP e4m3fn and e5m2) <-> float, bit-exact with torch's conversions ----------------
// Decoding builds the float's bits directly; encoding rounds to nearest even and saturates to the
// largest finite value (what vLLM's scaled fp8 conversion does), NaN stays NaN.
template <int E, int M>
struct Fp8Format {
  static constexpr int kBias = (1 << (E - 1)) - 1;
};

template <int E, int M>
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE float fp8_to_float(uint8_t v) {
  constexpr int B = Fp8Format<E, M>::kBias;
  const uint32_t sign = uint32_t(v & 0x80) << 24;
  const int e = (v >> M) & ((1 << E) - 1);
  const uint32_t m = v & ((1 << M) - 1);
  uint32_t bits;
  if (E == 4 && e == 15 && m == 7) {
    bits = 0x7fc00000u;  // e4m3fn has no infinities, only this NaN
  } else if (E == 5 && e == 31) {
    bits = m ? 0x7fc00000u : (sign | 0x7f800000u);
  } else if (e == 0) {
    // Subnormal: m * 2^(1 - B - M), exact in float.
    float f = float(m) * (1.0f / float(1 << (B + M - 1)));
    return (v & 0x80) ? -f : f;
  } else {
    bits = sign | (uint32_t(e - B + 127) << 23) | (m << (23 - M));
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

template <int E, int M>
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE uint8_t float_to_fp8(float x) {
  constexpr int B = Fp8Format<E, M>::kBias;
  // Largest finite: e4m3fn 448 (exponent 15, mantissa 6), e5m2 57344 (exponent 30, mantissa 3).
  constexpr float kMax = (E == 4) ? 448.0f : 57344.0f;
  if (x != x) return 0x7f;
  uint32_t xbits;  // the sign bit itself: -0.0 stores as 0x80, as torch's conversion does
  memcpy(&xbits, &x, 4);
  const uint8_t sign = (xbits >> 31) ? 0x80 : 0;
  float a = fabsf(x);
  if (a > kMax) a = kMax;
  const float min_normal = 1.0f / float(1 << (B - 1));
  if (a < min_normal) {
    const float q = rintf(a * float(1 << (B + M - 1)));  // subnormal steps of 2^(1-B-M)
    return uint8_t(sign | uint8_t(q));                   // q = 2^M is the smallest normal: same code
  }
  int e;
  const float fr = frexpf(a, &e);        // a = fr * 2^e, fr in [0.5, 1)
  float q = rintf((fr * 2.0f - 1.0f) * float(1 << M));
  int ex = e - 1 + B;
  if (q >= float(1 << M)) {
    q = 0.0f;
    ++ex;
  }
  return uint8_t(sign | uint8_t(ex << M) | uint8_t(q));
}

// Per-token quantisation ranges of the pa_fwd caches.
constexpr float kInt8Max = 127.0f;
constexpr float kFp8E4M3Max = 448.0f;

// ---- layouts -------------------------------------------------------------------------------
// Element offsets inside one (block, kv head) of the caches, in elements.
//   key:   [D/x, block_size, x]                    -> (d / x) * k_sdc + t * k_st + d % x
//   value: vLLM [D, block_size] or ASM [bs/x, D, x] -> (t / v_tx) * v_stc + d * v_sd + t % v_tx
// The vLLM value layout is the ASM one with v_tx = block_size (a single token chunk).
struct CacheStrides {
  int64_t k_sb, k_sh, k_sdc, k_st;  // block, head, d-chunk, token
  int64_t v_sb, v_sh, v_stc, v_sd;  // block, head, token-chunk, d
  int32_t x;     // key elements per 16 bytes
  int32_t v_tx;  // value tokens per token chunk (x for ASM, block_size for vLLM)
};

ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t key_offset(const CacheStrides& s, int64_t blk, int64_t h,
                                                      int64_t t, int64_t d) {
  return blk * s.k_sb + h * s.k_sh + (d / s.x) * s.k_sdc + t * s.k_st + d % s.x;
}

ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t value_offset(const CacheStrides& s, int64_t blk,
                                                        int64_t h, int64_t t, int64_t d) {
  return blk * s.v_sb + h * s.v_sh + (t / s.v_tx) * s.v_stc + d * s.v_sd + t % s.v_tx;
}

// ---- the decode problem, shared by paged_attention_v1 and pa_fwd ----------------------------
// Sequence b has L = seq_lens[b] keys and qlen query tokens (1 for paged_attention_v1). Query
// token i sits at position L - qlen + i and sees keys [lo, hi) with hi = L - qlen + i + 1 and
// lo = max(0, hi - sliding_window) when the window is positive, else 0.
struct DecodeParams {
  const void* q;  // [Tq, Hq, D] any strides
  int64_t q_st, q_sh, q_sd;
  void* out;  // [Tq, Hq, D] any strides
  int64_t o_st, o_sh, o_sd;
  const void* k_cache;
  const void* v_cache;
  CacheStrides cs;
  const int32_t* block_tables;  // [S, max_blocks], row stride bt_stride
  int64_t bt_stride;
  const int32_t* seq_lens;   // [S]
  const int32_t* qo_indptr;  // [S+1] or null (then query token of sequence b is b)
  const float* alibi;        // [Hq] or null
  // Per-tensor scales ([1], read on the device) or per-token scales [num_blocks, Hkv, bs].
  const float* k_scale;
  const float* v_scale;
  bool per_token_scale;
  int64_t ks_sb, ks_sh, vs_sb, vs_sh;  // strides of the per-token scales (token stride 1)
  float scale, softcap;
  int32_t window;  // <= 0: none
  int32_t S, Hq, Hkv, D, block_size, num_blocks, max_blocks, max_qlen, Tq;
  // Split-K workspace: partial outputs [Tq, Hq, splits, D] and (max, sum) [Tq, Hq, splits, 2].
  float* ws_out;
  float* ws_ml;
  int32_t splits;
  // The serving call's decode path (flash_attn_varlen_func over NHD caches, docs/serving.md):
  // grid rows are query tokens (x = Tq * Hkv), each token's sequence found in qo_indptr, and the
  // natural-log lse [Hq, Tq] is written (lse_sh, lse_st: its strides) when lse is not null.
  bool token_grid;
  float* lse;
  int64_t lse_sh, lse_st;
  // When short_seq_rows > 0 (token_grid false): grid rows are sequences, and only a sequence
  // with short_seq_min .. short_seq_rows query rows is computed; the others' CTAs (and combine
  // blocks) return without a write. Two callers: the decode half of a mixed serving call
  // (max_qlen = Tq so qlen is not clamped; the other sequences' rows are the flash forward's or
  // another launch's), and pa_fwd with max_qlen > 1 on the tensor-core kernels (short_seq_min 1,
  // short_seq_rows = max_qlen: every sequence with a row). With short_seq_rows > 1 (the kernel's
  // kRows instance) a sequence's rows are cut in row chunks of decode_chunk_rows (the products'
  // columns are a chunk's (row, head) pairs: at most 16), one CTA each (decode_row_chunks per
  // sequence and kv head, adjacent in the grid's x), every chunk reading the sequence's pages.
  // Split rows are indexed by (sequence, row): [S * short_seq_rows, Hq, splits]. Tensor-core
  // kernels only.
  int32_t short_seq_min, short_seq_rows;
  // The mixed call's decode half when the forward before it computes only the long sequences
  // (the sm90 forward's list): this grid's rows are its own, so its CTAs write without waiting
  // for the forward and run beside it; only the grid's last CTA waits (programmatic dependent
  // launch), so the grid still ends after the forward. False: every write waits (a forward that
  // computes every sequence writes these rows too, with zeros).
  bool beside_forward;
};

// Whether the mixed call's decode half computes a sequence of qlen query rows.
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE bool decode_takes_rows(const DecodeParams& p, int64_t qlen) {
  return qlen >= p.short_seq_min && qlen <= p.short_seq_rows;
}

// Query rows one CTA computes: a row chunk of a multi-row launch (as many rows as 16 (row, head)
// columns hold, at most short_seq_rows), else 1 (one token; the launcher and the kernel both
// read it here, so the grid and the kernel's row offsets agree).
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int32_t decode_chunk_rows(const DecodeParams& p) {
  if (p.short_seq_rows <= 1) return 1;
  const int32_t fit = 16 / (p.Hq / p.Hkv);
  const int32_t rows = fit < p.short_seq_rows ? fit : p.short_seq_rows;
  return rows > 1 ? rows : 1;
}

// Row chunks of a sequence (adjacent in the decode grid's x): in the multi-row launch
// ceil(short_seq_rows / decode_chunk_rows), else 1.
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int32_t decode_row_chunks(const DecodeParams& p) {
  if (p.short_seq_rows <= 1) return 1;
  const int32_t r0 = decode_chunk_rows(p);
  return (p.short_seq_rows + r0 - 1) / r0;
}

// Rows of the split workspace and of the combine grid: query tokens, or (sequence, row) pairs in
// the mixed call's decode half.
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t decode_split_rows(const DecodeParams& p) {
  return p.short_seq_rows > 0 ? int64_t(p.S) * p.short_seq_rows : p.Tq;
}

struct RowWindow {
  int64_t lo, hi, qpos;
};

ATTNKIT_HOST_DEVICE ATTNKIT_INLINE RowWindow row_window(int64_t L, int64_t qlen, int64_t i,
                                                        int32_t window) {
  RowWindow w;
  w.qpos = L - qlen + i;
  w.hi = w.qpos + 1;
  if (w.hi > L) w.hi = L;
  if (w.hi < 0) w.hi = 0;
  w.lo = (window > 0 && w.hi - window > 0) ? w.hi - window : 0;
  return w;
}

// Logit of one key after scale, soft-cap and ALiBi (DESIGN §3.2 order).
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE float finish_logit(float dot, float scale, float softcap,
                                                      float slope, int64_t pos, int64_t qpos) {
  float s = dot * scale;
  if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
  return s + slope * float(pos - qpos);
}

// ---- cache writers --------------------------------------------------------------------------
struct CacheWriteParams {
  const void* key;    // [T, Hkv, D]
  const void* value;  // [T, Hkv, D]
  int64_t k_st, k_sh, v_st, v_sh;  // last dim contiguous
  void* k_cache;
  void* v_cache;
  CacheStrides cs;
  const void* slots;  // [T] int32 or int64
  bool slots_int64;
  const float* k_scale;  // per-tensor scale [1] (fp8) or null
  const float* v_scale;
  float* k_tok_scale;  // per-token scales [num_blocks, Hkv, bs] (per-token writer) or null
  float* v_tok_scale;
  int64_t ks_sb, ks_sh, vs_sb, vs_sh;
  int32_t T, Hkv, D, block_size, num_blocks;
};

}  // namespace paged
}  // namespace attnkit
