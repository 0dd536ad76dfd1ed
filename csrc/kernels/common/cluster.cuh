// Thread-block clusters (sm_90): a CTA's rank in its cluster, the cluster-wide barrier, and the
// distributed shared memory of a peer CTA (its mbarriers and its bytes) addressed through mapa.
// Torch-free, sm_90 device code; the launcher sets the cluster shape (cudaLaunchKernelEx).
//
// Data move by push: store_remote writes into the peer's shared memory and counts its bytes off
// the peer's mbarrier (st.async), so the peer's ordinary wait sees them; arrive_remote hands the
// peer's buffer back once this CTA has read it. Neither needs a fence at cluster scope.
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/common/mma.cuh"

namespace attnkit {
namespace cluster {

#if defined(__CUDACC__) && !defined(__HIPCC__)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define ATTNKIT_CLUSTER_ASM(...) asm volatile(__VA_ARGS__)
#else
#define ATTNKIT_CLUSTER_ASM(...) __trap()
#endif

ATTNKIT_DEVICE ATTNKIT_INLINE uint32_t rank() {
  uint32_t r = 0;
  ATTNKIT_CLUSTER_ASM("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}

// Every thread of every CTA of the cluster (none may have exited): a CTA-wide barrier that also
// waits for the peers, e.g. after their mbarriers are initialised and before the first remote use.
ATTNKIT_DEVICE ATTNKIT_INLINE void sync_all() {
  ATTNKIT_CLUSTER_ASM(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::
          : "memory");
}

// The address in CTA `peer`'s shared memory of the object at local shared address `addr`.
ATTNKIT_DEVICE ATTNKIT_INLINE uint32_t map_peer(uint32_t addr, uint32_t peer) {
  uint32_t r = 0;
  ATTNKIT_CLUSTER_ASM("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(peer));
  return r;
}

// An arrival on an mbarrier at a cluster address (a peer's, through map_peer), with release
// semantics at CTA scope only: enough to hand a buffer back (the arriving threads' reads of it are
// done; CUTLASS's multicast pipelines release their stages to a peer producer so), and no
// MEMBAR.GPU, which the .cluster-scope release costs (~1-2 µs under load, measured on the GDPA
// backward). Data go the other way through store_remote, whose bytes complete on the barrier.
ATTNKIT_DEVICE ATTNKIT_INLINE void arrive_remote(uint32_t bar_cluster_addr) {
  ATTNKIT_CLUSTER_ASM(
      "mbarrier.arrive.release.cta.shared::cluster.b64 _, [%0];\n" ::"r"(bar_cluster_addr)
      : "memory");
}

// 8 bytes into a peer's shared memory (cluster address), counted off the peer's barrier
// `bar_cluster_addr` as complete-tx bytes (the peer arms it with bulk::arrive_expect_tx and waits
// with bulk::wait, as for a tensor-map copy).
ATTNKIT_DEVICE ATTNKIT_INLINE void store_remote(uint32_t cluster_addr, float2 v,
                                                uint32_t bar_cluster_addr) {
  ATTNKIT_CLUSTER_ASM(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];\n" ::"r"(
          cluster_addr),
      "f"(v.x), "f"(v.y), "r"(bar_cluster_addr)
      : "memory");
}

#undef ATTNKIT_CLUSTER_ASM
#endif  // __CUDACC__ && !__HIPCC__

}  // namespace cluster
}  // namespace attnkit
