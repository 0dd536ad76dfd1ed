// Programmatic dependent launch (PDL, sm_90+), torch-free. A kernel launched with PDL may be
// scheduled while the kernel before it in the stream is still running: as soon as every block of
// that one has called pdl_launch_dependents() (or exited). Until its own pdl_wait() returns it may
// only read what that earlier kernel (and the ones before it) do not write; pdl_wait() returns once
// the earlier kernel has completed and its memory operations are visible. A launch without PDL
// (other archs, HIP, ATTNKIT_*_PDL=0) is an ordinary stream-ordered launch, and both device calls
// are no-ops there (griddepcontrol.wait of a grid launched without PDL returns at once).
//
// Device code below sm_90 compiles both calls away, so a kernel may only be launched with PDL when
// the code that runs was compiled for sm_90 or newer: a "9.0a;8.0+PTX" build runs the compute_80
// PTX on a Blackwell GPU, without the wait. launch_kernel() checks that per kernel and device
// (cudaFuncAttributes::ptxVersion, the virtual architecture the running code came from).
#pragma once

#include <mutex>
#include <utility>
#include <vector>

#include "common/portability.h"

#if !defined(__HIPCC__) && defined(__CUDACC__) && defined(CUDART_VERSION) && CUDART_VERSION >= 12000
#define ATTNKIT_HAS_PDL 1
#else
#define ATTNKIT_HAS_PDL 0
#endif

namespace attnkit {

#if defined(__CUDACC__) || defined(__HIPCC__)
// Waits until the preceding kernel in the stream has completed and its writes are visible.
ATTNKIT_DEVICE ATTNKIT_INLINE void pdl_wait() {
#if ATTNKIT_HAS_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream (when launched with PDL) be scheduled before this one ends.
ATTNKIT_DEVICE ATTNKIT_INLINE void pdl_launch_dependents() {
#if ATTNKIT_HAS_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#endif  // __CUDACC__ || __HIPCC__

#if ATTNKIT_HAS_PDL
// Whether `kernel`, as it runs on the current device, was compiled from PTX for sm_90 or newer (so
// its pdl_wait() is real). Cached per (kernel, device); false when the runtime cannot tell.
inline bool pdl_compiled(const void* kernel) {
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();  // ours: not a launch error for the caller's check to report
    return false;
  }
  static std::mutex mutex;
  static std::vector<std::pair<std::pair<const void*, int>, bool>> seen;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& s : seen) {
    if (s.first.first == kernel && s.first.second == device) return s.second;
  }
  cudaFuncAttributes attr{};
  bool ok = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess;
  if (!ok) (void)cudaGetLastError();
  ok = ok && attr.ptxVersion >= 90;
  seen.push_back({{kernel, device}, ok});
  return ok;
}
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
// Launches kernel<<<grid, block, smem, stream>>>(args...), with PDL when `pdl` is asked for and the
// kernel's running code has the wait (see above); an ordinary launch otherwise. Errors are left for
// the caller's launch check (cudaGetLastError), as with <<<>>>.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), bool pdl, dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
#if ATTNKIT_HAS_PDL
  if (pdl && pdl_compiled(reinterpret_cast<const void*>(kernel))) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = 1;
    (void)cudaLaunchKernelEx(&config, kernel, Params(std::forward<Args>(args))...);
    return;
  }
#else
  (void)pdl;
#endif
  kernel<<<grid, block, smem, stream>>>(Params(std::forward<Args>(args))...);
}
#endif  // __CUDACC__ || __HIPCC__

}  // namespace attnkit
