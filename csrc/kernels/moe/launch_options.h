// How moe_permute's kernels are launched, beside which kernel runs (choose.h). The public op
// launches with these defaults; the private op attnkit::_moe_permute_with sets them, so tests and
// benchmarks reach both rank kernels and both launch modes without environment variables. Neither
// option changes a result. Torch-free plain struct (the HIP build and the CPU-only build see it
// too; the CPU kernel ignores it).
#pragma once

namespace attnkit {
namespace moe {

struct PermuteLaunchOptions {
  bool rank_hist = true;  // the histogram rank kernel where it fits (choose.h permute_rank_hist:
                          // E + 1 <= kRankMaxBuckets); false: the per-pair walk everywhere
  bool pdl = true;        // the scan and the scatter with programmatic dependent launch where the
                          // running code has it (sm_90+ PTX, kernels/common/pdl.cuh); false:
                          // ordinary stream-ordered launches
  bool lean_prologue = true;  // the rank kernel also with PDL (it waits before it reads ids), and
                              // the bucket starts summed by the scan's blocks with atomics where
                              // E + 1 <= kAtomicStartsMaxBuckets (choose.h) instead of scanned by
                              // its last block: a shorter chain before the scatter (1.3-2 us
                              // less on the H200, docs/performance.md); false: the rank kernel an
                              // ordinary launch, the last block's scan
};

}  // namespace moe
}  // namespace attnkit
