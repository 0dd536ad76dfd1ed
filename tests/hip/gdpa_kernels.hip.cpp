// HIP compile check of the gdpa kernel layer (scripts/hip_check.sh): the launchers csrc/cuda/gdpa.cu
// uses, explicitly instantiated for a bounded set of dtypes and head dims. Compile only; the
// tensor-core kernels (ATTNKIT_HAS_MMA_SM80) compile to empty bodies under HIP, and the launcher
// in csrc/cuda/gdpa.cu takes the portable kernels there.
#include "kernels/gdpa/bwd_mma.cuh"
#include "kernels/gdpa/choose.h"  // host-only kernel choice: the HIP launcher asks it too
#include "kernels/gdpa/launch_options.h"
#include "kernels/gdpa/bwd_ws.cuh"  // CUDA-only (tensor maps), as fwd_ws.cuh: nothing under HIP
#include "kernels/gdpa/fwd_mma.cuh"
#include "kernels/gdpa/fwd_ws.cuh"
#include "kernels/gdpa/simple.cuh"
#include "kernels/gdpa/zero_rows.cuh"

#if ATTNKIT_HAS_FWD_WS || ATTNKIT_HAS_GDPA_BWD_WS
#error "fwd_ws.cuh and bwd_ws.cuh must compile to nothing under HIP"
#endif

namespace attnkit {
namespace gdpa {

template cudaError_t launch_gdpa_fwd_simple<float>(const FwdParams&, int, cudaStream_t);
template cudaError_t launch_gdpa_fwd_simple<fp16_t>(const FwdParams&, int, cudaStream_t);
template cudaError_t launch_gdpa_fwd_simple<bf16_t>(const FwdParams&, int, cudaStream_t);
template cudaError_t launch_gdpa_bwd_simple<float>(const BwdParams&, int, int, cudaStream_t);
template cudaError_t launch_gdpa_bwd_simple<bf16_t>(const BwdParams&, int, int, cudaStream_t);
template cudaError_t launch_gdpa_fwd_mma<bf16_t, 64>(const FwdParams&, int, cudaStream_t);
template cudaError_t launch_gdpa_fwd_mma<fp16_t, 128>(const FwdParams&, int, cudaStream_t);
template cudaError_t launch_gdpa_bwd_mma<bf16_t, 128>(const BwdParams&, int, int, cudaStream_t);
template cudaError_t launch_gdpa_zero_keyless_rows<float>(float*, int64_t, const int32_t*,
                                                          const int32_t*, int32_t, int32_t, int32_t,
                                                          int32_t, cudaStream_t);
template cudaError_t launch_gdpa_zero_keyless_rows<bf16_t>(bf16_t*, int64_t, const int32_t*,
                                                           const int32_t*, int32_t, int32_t, int32_t,
                                                           int32_t, cudaStream_t);

// The choice as the HIP build sees it: no tensor-core kernels, so auto is portable.
GdpaKernel hip_check_choice(const GdpaFacts& f) {
  const FwdLaunchOptions lo;
  const GdpaChoice c = choose_fwd(f, GdpaRequest::kAuto);
  if (ws_jagged(false, 1, lo.sorted) && bwd_ws_jagged(false, 1, BwdLaunchOptions{}.sorted, 512) &&
      c.ok())
    return c.kernel;
  return choose_bwd(f, GdpaRequest::kSm90).kernel;
}

}  // namespace gdpa
}  // namespace attnkit
