// Hopper (sm_90) bulk global -> shared copies ("1-D TMA": cp.async.bulk) completed on an mbarrier,
// shared by the kernels that stream contiguous chunks of a few KB. Torch-free.
//
// One thread issues a copy of any multiple of 16 bytes (16-byte aligned on both sides); the copy
// engine moves it without occupying the warp's load/store unit per 16 bytes, so a warp keeps many
// KB in flight for two instructions, and the bytes land in shared memory exactly as laid out in
// global memory (no swizzle). Completion: the issuing warp's barrier is armed with the number of
// bytes it expects (arrive_expect_tx), each copy counts its bytes off, and the barrier's phase
// completes when all have landed.
//
// Ordering with ordinary (generic-proxy) accesses of the same shared memory: after a wait the
// bytes are visible to the waiting threads; before a copy overwrites bytes that threads wrote
// with st.shared, the writers execute fence_proxy_async() and then synchronise with the issuer.
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/common/mma.cuh"

#if defined(__CUDACC__) && !defined(__HIPCC__) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900)
#define ATTNKIT_HAS_BULK_COPY 1
#else
#define ATTNKIT_HAS_BULK_COPY 0
#endif

namespace attnkit {
namespace bulk {

// Declared for every CUDA pass so kernels can name them under `if constexpr`; device passes
// below sm_90 get trapping bodies (launchers never pick bulk loads there).
#if defined(__CUDACC__) && !defined(__HIPCC__)
#if ATTNKIT_HAS_BULK_COPY
#define ATTNKIT_BULK_ASM(...) asm volatile(__VA_ARGS__)
#else
#define ATTNKIT_BULK_ASM(...) __trap()
#endif

// A barrier that completes once per phase after `count` arrivals (and the expected bytes).
ATTNKIT_DEVICE ATTNKIT_INLINE void init(uint64_t* bar, uint32_t count) {
  ATTNKIT_BULK_ASM("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(mma::smem_addr(bar)), "r"(count));
}

// Makes barrier initialisations visible to the copy engine (then synchronise the users).
ATTNKIT_DEVICE ATTNKIT_INLINE void fence_init() {
  ATTNKIT_BULK_ASM("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

ATTNKIT_DEVICE ATTNKIT_INLINE void fence_proxy_async() {
  ATTNKIT_BULK_ASM("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// This thread's arrival, announcing `bytes` more to land in the current phase (0: a plain arrival).
ATTNKIT_DEVICE ATTNKIT_INLINE void arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  ATTNKIT_BULK_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(mma::smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

// Announces `bytes` more to land in the current phase without arriving (the thread arrives later,
// e.g. after ordinary stores into the same stage that its arrival releases).
ATTNKIT_DEVICE ATTNKIT_INLINE void expect_tx(uint64_t* bar, uint32_t bytes) {
  ATTNKIT_BULK_ASM("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(mma::smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

// A plain arrival (e.g. a consumer warp releasing a stage it has finished reading).
ATTNKIT_DEVICE ATTNKIT_INLINE void arrive(uint64_t* bar) {
  ATTNKIT_BULK_ASM("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(mma::smem_addr(bar)) : "memory");
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) into shared memory, counted
// off `bar`.
ATTNKIT_DEVICE ATTNKIT_INLINE void copy(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
  ATTNKIT_BULK_ASM(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          mma::smem_addr(smem)),
      "l"(gmem), "r"(bytes), "r"(mma::smem_addr(bar))
      : "memory");
}

// Blocks until the barrier's phase with this parity (completion k has parity k & 1) is complete.
ATTNKIT_DEVICE ATTNKIT_INLINE void wait(uint64_t* bar, uint32_t parity) {
  ATTNKIT_BULK_ASM(
      "{\n.reg .pred done;\nBULK_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra BULK_WAIT;\n}\n" ::"r"(mma::smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Bulk groups: the copies and reductions from shared to global memory (cp.reduce.async.bulk
// .tensor of kernels/common/tma.cuh) a thread issued since its last commit form one group. The
// issuing thread waits for them itself (bulk groups are per thread).
ATTNKIT_DEVICE ATTNKIT_INLINE void commit_group() {
  ATTNKIT_BULK_ASM("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Until at most kPending of this thread's groups still read their shared memory (the source may
// then be overwritten; the global writes may still be in flight).
template <int kPending>
ATTNKIT_DEVICE ATTNKIT_INLINE void wait_group_read() {
  ATTNKIT_BULK_ASM("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
// Until at most kPending of this thread's groups are incomplete, their global writes included.
template <int kPending>
ATTNKIT_DEVICE ATTNKIT_INLINE void wait_group() {
  ATTNKIT_BULK_ASM("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}
#undef ATTNKIT_BULK_ASM
#endif  // __CUDACC__ && !__HIPCC__

}  // namespace bulk
}  // namespace attnkit
