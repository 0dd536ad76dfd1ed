// How the paged decode kernels are launched, beside which kernel runs (choose.h). The public ops
// launch with these defaults; the private ops attnkit::_paged_attention_v1_with / _pa_fwd_with
// (and the serving decode path through _flash_attn_fwd_with) set them, so tests and benchmarks
// reach every split count without environment variables. Torch-free plain struct (the HIP build
// and the CPU-only build see it too).
#pragma once

namespace attnkit {
namespace paged {

struct DecodeLaunchOptions {
  int splits = 0;  // > 0: this split-K count (capped at the partitions of the longest sequence),
                   // for every kernel; 0: the launcher's count (the tensor-core kernels' wave
                   // heuristic, one split per partition for the portable kernel)
  // The tensor-core kernels' wave heuristic keeps each split within kMaxSplitTokens tokens (the
  // floor: paged.cu mma_splits); false prices the waves alone. The mixed serving call's decode
  // half turns it off: its grid rows and length bound are the whole batch's (the host cannot tell
  // the short sequences apart), so the floor's long partitions are mostly the forward's
  // sequences', and the splits it adds are CTAs that find no work (docs/serving.md).
  bool split_floor = true;
};

}  // namespace paged
}  // namespace attnkit
