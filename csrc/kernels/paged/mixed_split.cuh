// The mixed serving call's split of its sequences between the flash forward and the decode kernel
// (docs/serving.md, "Mixed batches split by sequence on the device"), on the GPU (torch-free).
//
// The decode kernel takes the short sequences (1 .. short_rows query rows) and the forward the
// long ones (more rows). The host cannot tell them apart without a sync, so this kernel lists the
// long ones on the device, in batch order, with their count: the forward's persistent walk and
// the page gather then visit only those (flash::Params::seq_list, PageGatherParams::seq_list).
// Before, both walked every sequence: a batch of 4 prefill rows beside 128 decode rows had each
// forward CTA walk ~250 work items of decode rows after its real work (their key length is 0 for
// the forward) and the gather launch ~80k blocks that returned at once.
//
// A sequence's query length is taken as the decode kernel (seq_query) and the forward
// (flash::seq_range) take it: offsets clamped into [0, Tq], a decreasing pair giving 0; so
// whatever cu_seqlens_q holds, every sequence is computed by exactly one of the two kernels or,
// with no query row, by neither.
//
// The same block also sizes the two halves for running side by side (docs/serving.md, "The
// decode half beside the forward"): the forward, compute bound, and the decode kernel, bound by
// memory, take the same time on fewer SMs only for the forward, so the forward's persistent grid
// leaves k SMs to the decode kernel (flash::Params::walk_ctas): the short sequences' pages are
// read while the forward computes instead of after it. k comes from the two halves' costs, summed
// here over the sequences (mixed_decode_sms), or is pinned by the caller.
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/common/block_scan.cuh"

namespace attnkit {
namespace paged {

constexpr int kSplitThreads = 256;

struct MixedSplitParams {
  const int32_t* cu_q;  // [B + 1] query offsets
  int32_t B;
  int64_t Tq;           // query rows (the offsets' clamp)
  int32_t short_rows;   // the most query rows of a sequence the decode kernel takes
  int32_t* list;        // [B] out: the long sequences' ids, ascending, then unwritten entries
  int32_t* count;       // [2] out: how many; then the forward's CTAs that walk (sms - k)
  const int32_t* used;  // [B] the key lengths
  int32_t* fwd_used;    // [B] out: the forward's key lengths, used[b] for a long sequence, else 0
  // The SMs left to the decode kernel while the forward runs (count[1] = sms - k: the forward's
  // CTAs that walk). decode_sms >= 0 pins k; -1 takes mixed_decode_sms' rule from the costs:
  // key_weight = the decode's time per key of a short sequence's row chunk over the forward's per
  // visible (query, key) pair of a long one, each on the whole device (the host's estimate from
  // the shapes and the device: flash.cu mixed_key_weight); chunk_rows = the decode's rows per
  // chunk (each chunk reads the pages); window_left as the call's (< 0: none), which caps both
  // halves' costs: a forward row's visible keys, a decode chunk's keys read.
  int32_t sms;
  int32_t decode_sms;
  float key_weight;
  float sm_bandwidth;  // mixed_decode_sms' c
  int32_t chunk_rows;
  int64_t window_left;
};

// Visible (query, key) pairs of a causal sequence of lq query rows over lk keys (query row i sees
// keys up to lk - lq + i, bottom-right), at most window_left + 1 keys a row when window_left >= 0
// (a bound there, not exact: a heuristic's input). Float: the sums reach 1e12 and more.
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE float causal_pairs(int64_t lq, int64_t lk, int64_t window_left) {
  if (lq <= 0 || lk <= 0) return 0.0f;
  const float q = float(lq), k = float(lk);
  // lk >= lq: every row sees lk - lq keys and its own triangle; else only the last lk rows see any.
  float pairs = lk >= lq ? q * (k - q) + q * (q + 1.0f) * 0.5f : k * (k + 1.0f) * 0.5f;
  if (window_left >= 0) {
    const float band = q * (float(window_left) + 1.0f);
    pairs = pairs < band ? pairs : band;
  }
  return pairs;
}

// The decode kernel's SMs beside the forward, from x = t_dec / t_fwd (each half's time alone on
// the whole device) and c = how many times its even share of the memory bandwidth (1 / sms) one
// SM of decode CTAs draws. On sms - k SMs the forward takes t_fwd * sms / (sms - k); in that time
// k SMs read k * c * t_fwd / (sms - k) of the decode's t_dec (in whole-device time), so the total
// falls while k grows (each SM given away costs the forward 1 / sms and gains the decode c / sms)
// until the decode is hidden: k = sms * x / (c + x); past sms / c the k SMs would draw the whole
// bandwidth (the decode is then bound by memory either way). 0 when either half is empty.
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int32_t mixed_decode_sms(int32_t sms, float x, float c) {
  if (sms < 2 || !(x > 0.0f) || !(c > 0.0f)) return 0;
  float k = x < 1e30f ? float(sms) * x / (c + x) : float(sms);
  const float cap = float(sms) / c;
  k = k < cap ? k : cap;
  const int32_t n = int32_t(k + 0.5f);
  return n < 0 ? 0 : (n > sms - 1 ? sms - 1 : n);
}

// grid: 1 block of kSplitThreads. A chunk of kSplitThreads sequences at a time: each thread flags
// its sequence (and writes its forward key length: this one launch replaces the six elementwise
// ATen kernels that computed it), and a block scan (kernels/common/block_scan.cuh) gives each
// long sequence its slot.
// Each thread also sums its sequences' costs (the forward's visible pairs, the decode's keys
// times row chunks), reduced at the end in a fixed order (the same k for the same batch).
__global__ void __launch_bounds__(kSplitThreads) mixed_split_kernel(const MixedSplitParams p) {
  __shared__ int32_t scan[kSplitThreads];
  __shared__ float cost[2][kSplitThreads];
  int32_t base = 0;  // long sequences in the chunks before (the same value in every thread)
  float fwd_pairs = 0.0f, dec_keys = 0.0f;
  for (int32_t b0 = 0; b0 < p.B; b0 += kSplitThreads) {
    const int32_t b = b0 + int32_t(threadIdx.x);
    int32_t is_long = 0;
    if (b < p.B) {
      int64_t a = p.cu_q[b], e = p.cu_q[b + 1];
      a = a < 0 ? 0 : (a > p.Tq ? p.Tq : a);
      e = e < a ? a : (e > p.Tq ? p.Tq : e);
      is_long = e - a > p.short_rows ? 1 : 0;
      const int32_t lk = p.used[b];
      p.fwd_used[b] = is_long ? lk : 0;
      const int64_t keys = lk > 0 ? lk : 0;  // any value: a cost only
      if (is_long) {
        fwd_pairs += causal_pairs(e - a, keys, p.window_left);
      } else if (e > a) {
        const int64_t rows = p.chunk_rows > 0 ? p.chunk_rows : 1;
        const int64_t chunks = (e - a + rows - 1) / rows;
        // With a window a chunk reads only its rows' window: at most window_left + its rows keys.
        int64_t read = keys;
        if (p.window_left >= 0) {
          const int64_t span = p.window_left + (e - a < rows ? e - a : rows);
          read = read < span ? read : span;
        }
        dec_keys += float(read) * float(chunks);
      }
    }
    int32_t total = 0;
    const int32_t slot = block_exclusive_scan(is_long, scan, &total);
    if (is_long) p.list[base + slot] = b;
    base += total;
  }
  cost[0][threadIdx.x] = fwd_pairs;
  cost[1][threadIdx.x] = dec_keys;
  __syncthreads();
  for (int n = kSplitThreads / 2; n > 0; n >>= 1) {
    if (int(threadIdx.x) < n) {
      cost[0][threadIdx.x] += cost[0][threadIdx.x + n];
      cost[1][threadIdx.x] += cost[1][threadIdx.x + n];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    p.count[0] = base;
    int32_t k = p.decode_sms;
    if (k < 0) {
      const float f = cost[0][0], d = cost[1][0];
      k = f > 0.0f ? mixed_decode_sms(p.sms, p.key_weight * d / f, p.sm_bandwidth) : 0;
    }
    k = k < p.sms - 1 ? k : p.sms - 1;
    p.count[1] = p.sms - (k > 0 ? k : 0);
  }
}

}  // namespace paged
}  // namespace attnkit
