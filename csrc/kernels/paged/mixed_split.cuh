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
  int32_t* count;       // [1] out: how many
  const int32_t* used;  // [B] the key lengths
  int32_t* fwd_used;    // [B] out: the forward's key lengths, used[b] for a long sequence, else 0
};

// grid: 1 block of kSplitThreads. A chunk of kSplitThreads sequences at a time: each thread flags
// its sequence (and writes its forward key length: this one launch replaces the six elementwise
// ATen kernels that computed it), and a block scan (kernels/common/block_scan.cuh) gives each
// long sequence its slot.
__global__ void __launch_bounds__(kSplitThreads) mixed_split_kernel(const MixedSplitParams p) {
  __shared__ int32_t scan[kSplitThreads];
  int32_t base = 0;  // long sequences in the chunks before (the same value in every thread)
  for (int32_t b0 = 0; b0 < p.B; b0 += kSplitThreads) {
    const int32_t b = b0 + int32_t(threadIdx.x);
    int32_t is_long = 0;
    if (b < p.B) {
      int64_t a = p.cu_q[b], e = p.cu_q[b + 1];
      a = a < 0 ? 0 : (a > p.Tq ? p.Tq : a);
      e = e < a ? a : (e > p.Tq ? p.Tq : e);
      is_long = e - a > p.short_rows ? 1 : 0;
      p.fwd_used[b] = is_long ? p.used[b] : 0;
    }
    int32_t total = 0;
    const int32_t slot = block_exclusive_scan(is_long, scan, &total);
    if (is_long) p.list[base + slot] = b;
    base += total;
  }
  if (threadIdx.x == 0) p.count[0] = base;
}

}  // namespace paged
}  // namespace attnkit
