// Flash attention problem description shared by the CPU and CUDA kernels (torch-free).
// Batched and varlen inputs are one shape here: a sequence b starts at element
// b * batch_stride + row0 * row_stride, where row0 comes from cu_seqlens (varlen, batch_stride 0)
// or is 0 (batched). Strides are in elements; the head dim is contiguous.
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/common/seq_list.h"

namespace attnkit {
namespace flash {

struct Strides {
  int64_t batch = 0, row = 0, head = 0;
};

struct Params {
  int64_t B = 0, H = 0, Hkv = 0, D = 0;
  int64_t seqlen_q = 0, seqlen_k = 0;  // batched: Sq / Sk; varlen: total rows Tq / Tk
  // Varlen offsets ([B+1], int32 or int64) or null for batched inputs.
  const void* cu_q = nullptr;
  const void* cu_k = nullptr;
  bool cu_int64 = false;
  // [B] int32 or null: sequence b uses only its first seqused_k[b] keys (FlashAttention 3 /
  // vLLM V1); clamped to [0, the length cu_seqlens_k or Sk gives], so any value is safe.
  const int32_t* seqused_k = nullptr;
  Strides q, k, v, o, dout, dq, dk, dv;
  Strides lse;  // batched lse [B, H, Sq]; varlen [H, Tq] (batch stride 0)
  // Double so the CPU's fp64 path (gradcheck) is exact; the GPU kernels convert once to float.
  double scale = 1.0;    // softmax scale
  double softcap = 0.0;  // > 0: s = softcap * tanh(scale * q.k / softcap)
  int64_t window_left = -1, window_right = -1;  // < 0: unbounded; causal is folded into right
  // The sequences a kernel must compute, or null for all B: ids seq_list[0 .. *seq_count), built
  // on the device (the mixed serving call, csrc/cuda/flash.cu: the decode kernel computes the
  // others after the forward, into the same rows). The sm90 forward walks only these; the other
  // kernels compute every sequence, which is as correct (the rows left out are overwritten).
  const int32_t* seq_list = nullptr;
  const int32_t* seq_count = nullptr;
  // How many of the sm90 forward's CTAs walk, or null for all (a device word, read clamped into
  // [1, gridDim.x]): in the mixed serving call the others leave at once, so that their SMs run the
  // decode kernel beside the forward (kernels/paged/mixed_split.cuh sets it).
  const int32_t* walk_ctas = nullptr;
  // Paged K / V read in place (the sm90 forward of a paged serving call; null: k and v are
  // addressed as above). The sequences' key ranges stay those of the padded layout the gather
  // would build (k0 = b * capacity), but key j of sequence b is row j % page_size of cache block
  // block_table[b * table_stride + j / page_size], loaded in boxes of page_box_rows rows (a
  // power of two dividing page_size); ids are clamped to [0, num_blocks).
  const int32_t* block_table = nullptr;
  int64_t table_stride = 0;
  int32_t page_size = 0, num_blocks = 0, page_box_rows = 0;
};

// How many sequences a walk visits, and the id of the i-th (both clamped: no value read from
// seq_list / seq_count makes a kernel leave [0, B)).
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t walked_seqs(const Params& p) {
  return listed_count(p.seq_count, p.B);
}
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t walked_seq(const Params& p, int64_t i) {
  return listed_seq(p.seq_list, i, p.B);
}

struct SeqRange {
  int64_t q0, lq, k0, lk;  // first row and length of the sequence in q and in k
};

template <typename index_t>
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t clamp_offset(const index_t* cu, int64_t i,
                                                        int64_t total) {
  const int64_t x = static_cast<int64_t>(cu[i]);
  return x < 0 ? 0 : (x > total ? total : x);
}

// Offsets are clamped into [0, total] and made non-decreasing, so whatever cu_seqlens holds a
// CUDA kernel never reads or writes outside its tensors (the CPU validates them first).
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE SeqRange clamp_used_k(const Params& p, int64_t b, SeqRange s) {
  if (p.seqused_k != nullptr) {
    const int64_t used = static_cast<int64_t>(p.seqused_k[b]);
    s.lk = used < 0 ? 0 : (used < s.lk ? used : s.lk);
  }
  return s;
}

ATTNKIT_HOST_DEVICE ATTNKIT_INLINE SeqRange seq_range(const Params& p, int64_t b) {
  if (p.cu_q == nullptr) return clamp_used_k(p, b, {0, p.seqlen_q, 0, p.seqlen_k});
  int64_t q0, q1, k0, k1;
  if (p.cu_int64) {
    const auto* cq = static_cast<const int64_t*>(p.cu_q);
    const auto* ck = static_cast<const int64_t*>(p.cu_k);
    q0 = clamp_offset(cq, b, p.seqlen_q), q1 = clamp_offset(cq, b + 1, p.seqlen_q);
    k0 = clamp_offset(ck, b, p.seqlen_k), k1 = clamp_offset(ck, b + 1, p.seqlen_k);
  } else {
    const auto* cq = static_cast<const int32_t*>(p.cu_q);
    const auto* ck = static_cast<const int32_t*>(p.cu_k);
    q0 = clamp_offset(cq, b, p.seqlen_q), q1 = clamp_offset(cq, b + 1, p.seqlen_q);
    k0 = clamp_offset(ck, b, p.seqlen_k), k1 = clamp_offset(ck, b + 1, p.seqlen_k);
  }
  return clamp_used_k(p, b, {q0, q1 > q0 ? q1 - q0 : 0, k0, k1 > k0 ? k1 - k0 : 0});
}

// FlashAttention-2 window, local indices: query i sees keys j with
// i + lk - lq - left <= j <= i + lk - lq + right. Returns the inclusive key range clipped to
// [0, lk); lo > hi means the row sees no key.
struct KeyRange {
  int64_t lo, hi;
};
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE KeyRange key_range(const Params& p, int64_t i, int64_t lq,
                                                      int64_t lk) {
  const int64_t diag = i + lk - lq;
  int64_t lo = p.window_left < 0 ? 0 : diag - p.window_left;
  int64_t hi = p.window_right < 0 ? lk - 1 : diag + p.window_right;
  lo = lo < 0 ? 0 : lo;
  hi = hi > lk - 1 ? lk - 1 : hi;
  return {lo, hi};
}

// The inverse: the inclusive query range that sees key j (for the dK/dV pass).
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE KeyRange query_range(const Params& p, int64_t j, int64_t lq,
                                                        int64_t lk) {
  const int64_t off = lk - lq;
  int64_t lo = p.window_right < 0 ? 0 : j - off - p.window_right;
  int64_t hi = p.window_left < 0 ? lq - 1 : j - off + p.window_left;
  lo = lo < 0 ? 0 : lo;
  hi = hi > lq - 1 ? lq - 1 : hi;
  return {lo, hi};
}

}  // namespace flash
}  // namespace attnkit
