// HIP compile check of the paged kernel layer (scripts/hip_check.sh): the decode, combine,
// cache-write and merge kernels csrc/cuda/paged.cu launches, for a bounded set of query dtypes,
// cache kinds and row counts, and the kernel choice with the launch options (host code the HIP
// build compiles too).
#include "kernels/common/mma.cuh"
#include "kernels/common/wgmma.cuh"
#include "kernels/paged/cache_write.cuh"
#include "kernels/paged/choose.h"
#include "kernels/paged/launch_options.h"
#include "kernels/paged/decode.cuh"
#include "kernels/paged/decode_mma.cuh"  // tensor-core GQA decode: compiled out under HIP (sm_80 guard)
#include "kernels/paged/merge_states.cuh"
#include "kernels/paged/mixed_split.cuh"  // mixed_split_kernel: not a template, compiled here
#include "kernels/paged/page_gather.cuh"

namespace attnkit {
namespace paged {

// What the HIP launcher asks: a bf16 GQA decode call on a device reporting 9.0 (gfx90a does)
// with the build's facts runs the portable kernel (sm80_built is false under HIP).
PagedKernel hip_choice() {
  PagedFacts f;
  f.half = f.cache_same = f.one_query = f.bulk_layout = true;
  f.group = 8;
  f.head_dim = 128;
  f.block_size = 16;
  f.sm_major = 9;
  f.sm80_built = ::attnkit::mma::kTensorCoreKernels;
  f.sm90a_built = wgmma::kBuilt;
  return choose_decode(f, PagedRequest::kAuto).kernel;
}
DecodeLaunchOptions hip_decode_options() { return {}; }

using C = CacheKind;
template __global__ void paged_decode_kernel<float, C::kSame, 1>(const DecodeParams, const int32_t);
template __global__ void paged_decode_kernel<fp16_t, C::kSame, 4>(const DecodeParams, const int32_t);
template __global__ void paged_decode_kernel<bf16_t, C::kFp8E4M3, kMaxRows>(const DecodeParams, const int32_t);
template __global__ void paged_decode_kernel<bf16_t, C::kInt8, 8>(const DecodeParams, const int32_t);
template __global__ void paged_decode_kernel<fp16_t, C::kFp8E5M2, 1>(const DecodeParams, const int32_t);
template __global__ void paged_combine_kernel<float>(const DecodeParams);
template __global__ void paged_combine_kernel<bf16_t>(const DecodeParams);
template __global__ void reshape_and_cache_kernel<bf16_t, C::kSame>(const CacheWriteParams);
template __global__ void reshape_and_cache_kernel<fp16_t, C::kFp8E4M3>(const CacheWriteParams);
template __global__ void pertoken_quant_kernel<bf16_t, C::kInt8>(const CacheWriteParams);
template __global__ void merge_attn_states_kernel<bf16_t>(const MergeParams);
template __global__ void merge_attn_states_kernel<float>(const MergeParams);
template __global__ void pertoken_quant_kernel<fp16_t, C::kFp8E4M3>(const CacheWriteParams);
template __global__ void paged_decode_mma_kernel<fp16_t, 128, 16, false, false, 1>(const DecodeParams);  // empty under HIP
template __global__ void paged_decode_mma_kernel<fp16_t, 128, 16, true, false, 2>(const DecodeParams);   // bulk loads: too
template __global__ void paged_decode_mma_kernel<bf16_t, 128, 16, true, false, 2, true>(const DecodeParams);  // pa_fwd's row chunks

// The serving call's gather of used pages (flash.cu launches it for 16-byte and 2-byte words) and
// the mixed call's split of its sequences (mixed_split_kernel, from the include above).
template __global__ void gather_used_pages_kernel<uint4>(const PageGatherParams);
template __global__ void gather_used_pages_kernel<uint16_t>(const PageGatherParams);

}  // namespace paged
}  // namespace attnkit
