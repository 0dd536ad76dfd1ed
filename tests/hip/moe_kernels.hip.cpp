// HIP compile check of the moe kernel layer (scripts/hip_check.sh): the launchers csrc/cuda/moe.cu
// calls, for a bounded set of dtypes, index types and vector widths. The tensor-core grouped GEMM
// (ATTNKIT_HAS_MMA_SM80) compiles to an empty kernel under HIP.
#include "kernels/moe/choose.h"  // host-only kernel choice: the HIP launcher asks it too
#include "kernels/moe/grouped_gemm.cuh"
#include "kernels/moe/grouped_gemm_mma.cuh"
#include "kernels/moe/grouped_gemm_swiglu.cuh"  // sm_90a only: compiles to nothing here
#include "kernels/moe/launch_options.h"
#include "kernels/moe/route.cuh"
#include "kernels/moe/routing.cuh"

namespace attnkit {
namespace moe {

template void launch_route<bf16_t, float>(const bf16_t*, const float*, int64_t, int, int, bool, bool, int, int,
                                          float, float*, int32_t*, float*, int, cudaStream_t);
template void launch_route<double, double>(const double*, const double*, int64_t, int, int, bool, bool, int, int,
                                           double, double*, int32_t*, double*, int, cudaStream_t);
template void launch_route_losses<fp16_t, float>(const fp16_t*, const float*, const int32_t*, int64_t, int, int,
                                                 bool, int32_t*, float*, float*, float*, float*, cudaStream_t);
template void launch_route_bwd<bf16_t, float, int64_t>(const bf16_t*, const int64_t*, const float*, const float*,
                                                       const float*, int32_t*, int64_t, int, int, bool, bool, float,
                                                       bf16_t*, int, cudaStream_t);
template void launch_route_bwd<float, float, int32_t>(const float*, const int32_t*, const float*, const float*,
                                                      const float*, int32_t*, int64_t, int, int, bool, bool, float,
                                                      float*, int, cudaStream_t);
template cudaError_t launch_permute<uint4, int64_t>(const uint4*, const int64_t*, int64_t, int, int, int64_t, uint4*,
                                                    int32_t*, int32_t*, int32_t*, int32_t*, int32_t*, int32_t*,
                                                    bool, bool, bool, cudaStream_t);
template cudaError_t launch_permute<uint16_t, int32_t>(const uint16_t*, const int32_t*, int64_t, int, int, int64_t,
                                                       uint16_t*, int32_t*, int32_t*, int32_t*, int32_t*,
                                                       int32_t*, int32_t*, bool, bool, bool, cudaStream_t);
template void launch_unpermute<bf16_t, 8>(const bf16_t*, const int32_t*, const acc_t<bf16_t>*, int64_t, int64_t,
                                          int, int64_t, bf16_t*, cudaStream_t);
template void launch_unpermute<float, 1>(const float*, const int32_t*, const acc_t<float>*, int64_t, int64_t,
                                         int, int64_t, float*, cudaStream_t);
template void launch_unpermute_bwd<fp16_t, 8>(const fp16_t*, const fp16_t*, const int32_t*, const acc_t<fp16_t>*,
                                              int64_t, int64_t, int, int64_t, fp16_t*, acc_t<fp16_t>*,
                                              cudaStream_t);
template void launch_silu_and_mul<bf16_t, 8>(const bf16_t*, int64_t, int64_t, bf16_t*, cudaStream_t);
template void launch_silu_and_mul<double, 1>(const double*, int64_t, int64_t, double*, cudaStream_t);
template void launch_grouped_gemm<float, int64_t>(const float*, const float*, int64_t, int64_t, int64_t,
                                                  const int64_t*, int, int64_t, int64_t, int64_t, float*,
                                                  cudaStream_t);
template void launch_grouped_gemm<bf16_t, int32_t>(const bf16_t*, const bf16_t*, int64_t, int64_t, int64_t,
                                                   const int32_t*, int, int64_t, int64_t, int64_t, bf16_t*,
                                                   cudaStream_t);
template void launch_grouped_gemm_mma<bf16_t, int64_t>(const bf16_t*, const bf16_t*, const int64_t*, int, int64_t,
                                                       int64_t, int64_t, bf16_t*, cudaStream_t);
template void launch_grouped_gemm_wgrad<fp16_t, int32_t>(const fp16_t*, const fp16_t*, const int32_t*, int,
                                                         int64_t, int64_t, int64_t, fp16_t*, cudaStream_t);
template void launch_zero_rows_outside<bf16_t>(const int32_t*, int, int64_t, int64_t, bf16_t*, cudaStream_t);

// The choice as the HIP build sees it (sm80_built and sm90a_built false): the FMA kernel, or
// at::_grouped_mm where a gfx9 device reports major 9 and torch takes the call; moe_permute's rank
// kernel from its launch options.
MoeKernel hip_check_choice(const MoeFacts& f) {
  const PermuteLaunchOptions lo;
  const MoeChoice c = choose_swiglu(f, MoeRequest::kAuto);
  if (permute_rank_hist(f.experts, lo.rank_hist) && c.ok()) return c.kernel;
  return choose_gemm(f, MoeRequest::kSm90).kernel;
}

}  // namespace moe
}  // namespace attnkit

// Non-template launcher: referenced so the kernel is emitted.
void (*attnkit_hip_check_load_balance)(const double*, int, int, int32_t*, int64_t*, cudaStream_t) =
    &attnkit::moe::launch_load_balance;
