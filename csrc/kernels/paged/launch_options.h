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
};

}  // namespace paged
}  // namespace attnkit
