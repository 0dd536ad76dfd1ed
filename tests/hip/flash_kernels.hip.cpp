// HIP compile check of the flash kernel layer (scripts/hip_check.sh): the portable (SIMT) kernels
// csrc/cuda/flash.cu launches, the tensor-core launchers (empty kernel bodies under HIP; the
// launcher's facts say sm80_built = false there, so choose.h never picks them), and the kernel
// choice with the launch options (host code the HIP build compiles too).
#include "kernels/common/mma.cuh"
#include "kernels/flash/bwd_ws.cuh"  // CUDA-only (tensor maps): declares nothing under HIP
#include "kernels/flash/choose.h"
#include "kernels/flash/fwd_ws.cuh"  // CUDA-only (tensor maps): declares nothing under HIP
#include "kernels/flash/launch_options.h"
#include "kernels/flash/mma_bwd.cuh"
#include "kernels/flash/mma_fwd.cuh"
#include "kernels/flash/simt.cuh"

namespace attnkit {
namespace flash {

// What the HIP launcher asks: a half-precision call on a device reporting 9.0 (gfx90a does) with
// the build's facts runs the portable kernels, forward and backward.
FlashKernel hip_choice(bool backward) {
  FlashFacts f;
  f.half = true;
  f.head_dim = 128;
  f.sm_major = 9;
  f.sm80_built = ::attnkit::mma::kTensorCoreKernels;
  f.sm90a_built = wgmma::kBuilt;
  f.scale_positive = f.mma_ok = f.maps_ok = f.k_has_rows = true;
  f.smem_sm80 = f.smem_sm90 = true;
  const FlashRequest a = FlashRequest::kAuto;
  return (backward ? choose_bwd(f, a) : choose_fwd(f, a)).kernel;
}
FwdLaunchOptions hip_fwd_options() { return {}; }
BwdLaunchOptions hip_bwd_options() { return {}; }

namespace simt {

#define ATTNKIT_INSTANTIATE_FLASH_SIMT(T, C)                                                       \
  template __global__ void fwd_kernel<T, C>(Params, const T*, const T*, const T*, T*, float*);     \
  template __global__ void bwd_delta_kernel<T, C>(Params, const T*, const T*, float*);             \
  template __global__ void bwd_dq_kernel<T, C>(Params, const T*, const T*, const T*, const T*,     \
                                               const float*, const float*, T*);                    \
  template __global__ void bwd_dkdv_kernel<T, C>(Params, const T*, const T*, const T*, const T*,   \
                                                 const float*, const float*, T*, T*);
// kChunks as csrc/cuda/flash.cu picks it: head dims <= 64, <= 128, <= 256.
ATTNKIT_INSTANTIATE_FLASH_SIMT(float, 64 / kWarpSize)
ATTNKIT_INSTANTIATE_FLASH_SIMT(fp16_t, 128 / kWarpSize)
ATTNKIT_INSTANTIATE_FLASH_SIMT(bf16_t, 256 / kWarpSize)
#undef ATTNKIT_INSTANTIATE_FLASH_SIMT

}  // namespace simt

namespace mma {
template void launch_fwd<bf16_t>(const Params&, const bf16_t*, const bf16_t*, const bf16_t*, bf16_t*,
                                 float*, int64_t, cudaStream_t);
template void launch_bwd<fp16_t>(const Params&, const fp16_t*, const fp16_t*, const fp16_t*,
                                 const fp16_t*, const float*, const float*, fp16_t*, float*, fp16_t*,
                                 fp16_t*, int64_t, int64_t, cudaStream_t);
}  // namespace mma

}  // namespace flash
}  // namespace attnkit
