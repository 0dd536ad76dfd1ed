// Arguments of the GDPA GPU kernels: raw pointers, sizes and element strides (torch-free).
#pragma once

#include <cstdint>

#include "kernels/gdpa/activation.h"

namespace attnkit {
namespace gdpa {

struct FwdParams {
  const void* q;  // [Tq, H, D], last dim contiguous
  const void* k;  // [Tk, Hkv, D]
  const void* v;  // [Tk, Hkv, D]
  void* out;      // [Tq, H, D]
  const int32_t* q_offsets;   // [B+1]; values clamped into [0, Tq] by the kernels
  const int32_t* kv_offsets;  // [B+1]; values clamped into [0, Tk]
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t o_row_stride, o_head_stride;
  int32_t B, H, Hkv, D;  // D: the real head dim (the kernel's template dim may be larger)
  int32_t Tq, Tk;
  float pre_scale, qk_scale;
  Activation act;
  bool causal;
  int32_t window;  // < 0: none; else query i sees key j only when |i - j| <= window (local)
};

struct BwdParams : FwdParams {
  const void* dout;  // [Tq, H, D], strides of out
  void* dq;          // [Tq, H, D], strides of out
  void* dk;          // [Tk, Hkv, D], contiguous
  void* dv;          // [Tk, Hkv, D], contiguous
  int64_t do_row_stride, do_head_stride;
  int64_t dq_row_stride, dq_head_stride;
  int64_t dkv_row_stride, dkv_head_stride;
  // The mma.sync dQ kernel (bwd_mma.cuh) skips sequences with at most this many keys: the Hopper
  // backward's direct dQ (bwd_ws.cuh kDqDirect) finished theirs. -1: it skips none.
  int32_t dq_kv_len_above = -1;
};

// The Hopper backward's (bwd_ws.cuh): BwdParams plus the fused dQ's zero-filled fp32 workspace
// ([Tq, H, D] contiguous, written through its tensor map BwdWsMaps::dq_accum; null when dQ runs
// as a separate pass, the deterministic mode, or directly, dq_direct).
struct BwdWgmmaParams : BwdParams {
  float* dq_accum;
  // No workspace: dQ summed over a cluster of the two key tiles' CTAs and stored into dq (which
  // is [Tq][H][Dk] contiguous, Dk = D rounded up to a multiple of 8), bwd_ws.cuh kDqDirect;
  // choose.h bwd_ws_direct_dq says where.
  bool dq_direct = false;
};

// Rows [begin, begin + len) of sequence b, with the offsets clamped so that no value can make a
// kernel read or write outside [0, total).
struct SeqRange {
  int32_t begin, len;
};

ATTNKIT_HOST_DEVICE ATTNKIT_INLINE SeqRange seq_range(const int32_t* off, int32_t b, int32_t total) {
  int32_t lo = off[b], hi = off[b + 1];
  lo = lo < 0 ? 0 : (lo > total ? total : lo);
  hi = hi < lo ? lo : (hi > total ? total : hi);
  return {lo, hi - lo};
}

// ---- the mask: causal (key j visible to query i iff j <= i, local indices) and window
// (|i - j| <= window), shared by the CPU and GPU kernels ----
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE bool visible(bool causal, int32_t window, int64_t i, int64_t j) {
  if (causal && j > i) return false;
  return window < 0 || (j >= i - window && j <= i + window);
}

// Whether every (query, key) of queries [q_lo, q_hi] x keys [k_lo, k_hi] is visible: a tile
// that is needs no mask.
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE bool tile_fully_visible(bool causal, int32_t window, int64_t q_lo,
                                                           int64_t q_hi, int64_t k_lo, int64_t k_hi) {
  if (causal && k_hi > q_lo) return false;
  return window < 0 || (k_lo >= q_hi - window && k_hi <= q_lo + window);
}

// A half-open index range [lo, hi) (empty when hi <= lo).
struct Span {
  int64_t lo, hi;
};

// The keys that queries [i_first, i_last] may see, within [0, lk).
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE Span key_span(bool causal, int32_t window, int64_t i_first,
                                                 int64_t i_last, int64_t lk) {
  int64_t lo = window < 0 ? 0 : i_first - window;
  int64_t hi = causal ? i_last + 1 : (window < 0 ? lk : i_last + window + 1);
  lo = lo < 0 ? 0 : lo;
  hi = hi > lk ? lk : hi;
  return {lo, hi};
}

// The queries that see any of keys [j_first, j_last], within [0, lq).
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE Span query_span(bool causal, int32_t window, int64_t j_first,
                                                   int64_t j_last, int64_t lq) {
  int64_t lo = causal ? j_first : (window < 0 ? 0 : j_first - window);
  int64_t hi = window < 0 ? lq : j_last + window + 1;
  lo = lo < 0 ? 0 : lo;
  hi = hi > lq ? lq : hi;
  return {lo, hi};
}

// A CTA's work item. The 1-D grid enumerates (tile, z, sequence) with the tile fastest, then z
// (head or kv-head slice), so the CTAs that read one sequence's K/V (or Q/dO) run together and
// share it through L2. (With the sequence fastest, each K/V tile came back from HBM once per
// query tile: measured ~1.5x slower on H200 for B=1152, L=1024.) `tiles` may be smaller than a
// sequence needs: the kernels stride over the rest with step `tiles`.
struct CtaItem {
  int tile, z, b, tiles;
};

#if defined(__CUDACC__) || defined(__HIPCC__)
ATTNKIT_DEVICE ATTNKIT_INLINE CtaItem cta_item(int zs, int B) {
  const int tiles = int(gridDim.x / (unsigned(zs) * unsigned(B)));
  const int x = int(blockIdx.x);
  return {x % tiles, (x / tiles) % zs, x / tiles / zs, tiles};
}
#endif

// Work item x of the same enumeration, for kernels that stride over the items themselves
// (persistent grids): `tiles` query tiles per (z, sequence).
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE CtaItem cta_item_at(int64_t x, int tiles, int zs) {
  return {int(x % tiles), int((x / tiles) % zs), int(x / tiles / zs), tiles};
}

// Grid size for cta_item: tiles x zs x B CTAs, the tile count clamped so the grid fits in x.
inline unsigned cta_grid(int64_t tiles, int64_t zs, int64_t B) {
  const int64_t cap = (int64_t(1) << 31) - 1;
  tiles = tiles < 1 ? 1 : tiles;
  if (tiles * zs * B > cap) tiles = cap / (zs * B) > 0 ? cap / (zs * B) : 1;
  return static_cast<unsigned>(tiles * zs * B);
}

}  // namespace gdpa
}  // namespace attnkit
