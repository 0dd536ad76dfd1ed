// The jagged schedule of the warp-specialised GDPA kernels (issue #19), shared by the forward
// (fwd_ws.cuh: items of 128-row query tiles) and the backward (bwd_ws.cuh: items of 128-key
// tiles): a list of the work items, longest first, built on the device from the offsets by one
// small kernel launched before the attention kernel (no host sync, so the call stays CUDA-graph
// capturable). The forward's persistent CTAs take its entries in order from a counter in the
// header (fwd_ws.cuh WsCursor), the backward's walk it in a snake (ws_snake).
//
// An item is tile `tile` of head h of sequence b (the forward's tiles run over the sequence's
// queries, its heads are the query heads; the backward's over its keys, its heads the kv heads),
// and, where a hint below the real lengths leaves a (sequence, head) more tiles than the hint has,
// its tiles tile + n, tile + 2n, ... (n, the item's stride: the hint's tile count; every other item
// is one tile). One item per tile keeps a (sequence, head)'s tiles adjacent in the list, so they
// start together (the forward's counter, or the same round of the backward's snake) and share the
// other side's tiles in L2, as the in-order grid's CTAs do. (Items of several tiles, one CTA
// walking a whole (sequence, head), lost on the H100 in the twenty-ninth session: forward 0.79 /
// 0.71 of one item per tile at max length 1024 / 2048, the DRAM read at 512 1.33 -> 1.64 GB, the
// backward 0.63-0.82: a CTA re-read the other side per tile while 131 others streamed other
// sequences through L2.)
//
// Listed: the forward's items whose sequence has queries and keys (its rows without keys are
// zero-filled by the launcher); every backward item whose sequence has keys, queries or not (the
// backward writes every key row of every sequence, zeros where no query sees it). Ranges are
// clamped by seq_range: garbage offsets give empty or clamped sequences, never an index outside
// the tensors; a window may still leave an item's tiles without work, which the walks skip.
//
// Counting sort by the item's cost (its tiles x the other side's 64-row steps; exact up to
// kBuckets / 2, in steps of 8 above, saturating at ~4.6k): bucket 0 holds the longest, so the
// persistent CTAs start with the long items and the short ones fill the tail. Within a bucket, a
// sequence's items are contiguous (tile fastest, then head); the order of the sequences in a
// bucket follows shared-memory atomics and may vary run to run, which changes which CTA computes
// an item but never what it computes (each row's math is the same anywhere).
//
// ws: [kHeader] header (ws[0] = the item count, ws[1] = the forward's counter of entries taken past
// its first round, zeroed here: fwd_ws.cuh WsCursor::start) then `capacity` entries of two int4:
// the clamped {q begin, q len, kv begin, kv len} of the sequence, then {h, tile, b, n}. A walker
// reads an item with two independent 16-byte loads (one round trip; no offsets read after).
#pragma once

#include <cstdint>

#include "kernels/common/block_scan.cuh"
#include "kernels/gdpa/params.h"

namespace attnkit {
namespace gdpa {

struct WsSchedTraits {
  static constexpr int kThreads = 1024;
  static constexpr int kBuckets = 1024;
  static constexpr int kHeader = 4;
  static constexpr int kTakenWord = 1;  // ws[1]: the forward's dynamic walk's counter
  static constexpr int kTileRows = 128;  // an item's tiles, on its tiled side
  static constexpr int kStepRows = 64;   // the cost's unit, on the other side
  static_assert(kBuckets == kThreads, "one bucket per thread in the scan");
};

// The workspace for `items` work items (int32 elements): the header and one entry of two int4
// per item. The launcher's caller allocates it (stream-ordered, capturable) for a jagged batch.
inline int64_t ws_sched_elems(int64_t items) { return WsSchedTraits::kHeader + 8 * items; }

#if defined(__CUDACC__)
// kKeyTiles = false: the forward's list (tiles over queries, heads p.H); true: the backward's
// (tiles over keys, heads p.Hkv, cost x the group p.H / p.Hkv). spread: the hint's tiles per
// (sequence, head), the most items one of them gets (the list holds at most spread x heads x B
// entries).
template <bool kKeyTiles>
__global__ void __launch_bounds__(WsSchedTraits::kThreads, 1)
    gdpa_ws_schedule_kernel(const FwdParams p, const int spread, int32_t* __restrict__ ws) {
  using Tr = WsSchedTraits;
  constexpr int NB = Tr::kBuckets, NT = Tr::kThreads, kTile = Tr::kTileRows, kStep = Tr::kStepRows;
  __shared__ int cursor[NB];
  __shared__ int warp_total[NT / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int heads = kKeyTiles ? p.Hkv : p.H;
  const int group = kKeyTiles ? p.H / (p.Hkv > 0 ? p.Hkv : 1) : 1;
  cursor[tid] = 0;
  if (tid == 0) ws[Tr::kTakenWord] = 0;  // the forward's counter: none taken past its first round
  __syncthreads();  // every bucket zeroed before any thread counts into it
  // A (sequence, head)'s tiles (0: not listed) and the cost of one of them: the other side's
  // steps (>= 1: a backward tile without queries still stores its zero gradients).
  auto tiles_of = [&](const SeqRange& qs, const SeqRange& ks) -> int {
    const SeqRange& tiled = kKeyTiles ? ks : qs;
    if (tiled.len <= 0 || (!kKeyTiles && ks.len <= 0)) return 0;
    return static_cast<int>((int64_t(tiled.len) + kTile - 1) / kTile);
  };
  auto step_cost = [&](const SeqRange& qs, const SeqRange& ks) -> long long {
    const SeqRange& other = kKeyTiles ? qs : ks;
    const long long steps = (int64_t(other.len) + kStep - 1) / kStep;
    return (steps > 0 ? steps : 1) * group;
  };
  // The items of sequence b (0 when none; per head: n, the stride of each) and its bucket.
  auto items_of = [&](int b, int& bucket) {
    const SeqRange qs = seq_range(p.q_offsets, b, p.Tq), ks = seq_range(p.kv_offsets, b, p.Tk);
    const int tiles = tiles_of(qs, ks);
    if (tiles <= 0) return 0;
    const int n = tiles < spread ? tiles : (spread > 0 ? spread : 1);  // >= 1
    const int per_item = (tiles + n - 1) / n;
    const long long cost = step_cost(qs, ks) * per_item;
    // Costs below NB / 2 each get a bucket; above, 8 costs share one (up to cost ~4.6k: whole
    // items of sequences up to ~6.1k rows keep their order; one bucket per cost saturated at
    // 1024, so every sequence of >= ~2.9k rows shared bucket 0, in the atomics' order).
    constexpr long long kExact = NB / 2;
    const long long key = cost < kExact ? cost : kExact + ((cost - kExact) >> 3);  // >= 1
    bucket = NB - 1 - int(key < NB - 1 ? key : NB - 1);
    return n * heads;
  };
  for (int b = tid; b < p.B; b += NT) {
    int bucket = 0;
    const int n = items_of(b, bucket);
    if (n > 0) atomicAdd(&cursor[bucket], n);
  }
  __syncthreads();
  // Exclusive scan of the bucket counts (one bucket per thread): warp scans, then the warp totals.
  const int mine = cursor[tid];
  const int incl = warp_inclusive_sum(mine, lane);
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int t = warp_total[lane], ti = warp_inclusive_sum(t, lane);
    warp_total[lane] = ti - t;  // exclusive
    if (lane == 31) ws[0] = ti;   // the item count
  }
  __syncthreads();
  cursor[tid] = warp_total[warp] + incl - mine;
  __syncthreads();
  int4* list = reinterpret_cast<int4*>(ws + Tr::kHeader);
  // Written warp by warp, so that a store instruction's 32 lanes write neighbouring entries: a
  // thread writing its own sequences' entries one after the other (its slots unrelated to its
  // neighbours') made every warp store touch 32 cache lines. The warp lays its lanes' runs end to
  // end (a prefix sum of their counts) and walks the concatenation 32 entries at a time, lane k
  // taking the k-th entry of each step from the lane that owns it; the slots are the ones each
  // lane's atomicAdd gave, so the list is the same. Thread tid still takes sequences tid, + NT,
  // ...; the loop runs over the warp's first sequence, so every lane takes every step (lanes past
  // B count no items) and the full-mask shuffles see the whole warp.
  for (int b0 = tid - lane; b0 < p.B; b0 += NT) {
    const int b = b0 + lane;
    int bucket = 0;
    const int n = b < p.B ? items_of(b, bucket) : 0;
    const int base = n > 0 ? atomicAdd(&cursor[bucket], n) : 0;
    const int stride = n / heads;  // the items of each head of b: each one's stride
    const SeqRange qs = n > 0 ? seq_range(p.q_offsets, b, p.Tq) : SeqRange{},
                   ks = n > 0 ? seq_range(p.kv_offsets, b, p.Tk) : SeqRange{};
    // The end of this lane's run in the warp's concatenation.
    const int end = warp_inclusive_sum(n, lane);
    const int total_w = __shfl_sync(0xffffffffu, end, 31);
    for (int e0 = 0; e0 < total_w; e0 += 32) {
      const int e = e0 + lane;
      // The owner of entry e: the first lane whose run ends past e (ends never decrease), found by
      // binary lifting over the lanes (lanes with no items end where they start: never chosen).
      int o = 0;
#pragma unroll
      for (int step = 16; step >= 1; step >>= 1)
        if (__shfl_sync(0xffffffffu, end, o + step - 1) <= e) o += step;
      const int o_start = __shfl_sync(0xffffffffu, end - n, o);
      const int o_base = __shfl_sync(0xffffffffu, base, o);
      const int o_stride = __shfl_sync(0xffffffffu, stride, o);
      const int4 ranges =
          make_int4(__shfl_sync(0xffffffffu, qs.begin, o), __shfl_sync(0xffffffffu, qs.len, o),
                    __shfl_sync(0xffffffffu, ks.begin, o), __shfl_sync(0xffffffffu, ks.len, o));
      if (e < total_w) {  // the owner's entry e - o_start: head outer, tile inner
        const int local = e - o_start, h = local / o_stride, slot = o_base + local;
        list[2 * slot] = ranges;
        list[2 * slot + 1] = make_int4(h, local - h * o_stride, b0 + o, o_stride);
      }
    }
  }
}

// The backward's walk: the list entry a CTA takes in round r of the snake: round r covers entries
// [r·G, (r + 1)·G), CTA c the c-th of them in even rounds and the (G - 1 - c)-th in odd ones; with
// the list longest first, each CTA's total stays within about one item of the others'.
ATTNKIT_DEVICE ATTNKIT_INLINE int ws_snake(int r) {
  const int g = int(gridDim.x), c = int(blockIdx.x);
  return r * g + ((r & 1) ? g - 1 - c : c);
}

// The list's length, clamped to its capacity (the schedule kernel never writes more).
ATTNKIT_DEVICE ATTNKIT_INLINE int ws_list_items(const int32_t* sched, int64_t capacity) {
  const int64_t n = sched[0];
  return static_cast<int>(n < 0 ? 0 : (n > capacity ? capacity : n));
}
#endif  // __CUDACC__

}  // namespace gdpa
}  // namespace attnkit
