// A ring of kStages shared-memory stages filled by copies that complete on mbarriers
// (kernels/common/bulk_copy.cuh: cp.async.bulk or tensor-map copies), the data path of the
// warp-specialised kernels (flash/fwd_ws.cuh, gdpa/fwd_ws.cuh, and the backwards through
// common/ws_bwd.cuh). Torch-free, sm_90 device code.
//
// The ring owns a full / empty barrier pair per stage and all of their phase arithmetic, so a
// kernel counts fills (n = 0, 1, 2, ...: every role walks the same sequence) and never writes a
// parity: fill n goes to stage n % kStages; it is that stage's use n / kStages, so the consumers
// wait for completion n / kStages of its full barrier, and the producer, before it overwrites the
// stage, waits for completion n / kStages - 1 of its empty barrier (the release of fill
// n - kStages; the first kStages fills wait for nothing). Completion k has parity k & 1, so a
// waiter may lag by at most one phase, which the full / empty hand-shake guarantees.
//
// Layout: `bars` points at kBars barriers, full[kStages] then empty[kStages] (then ready[kStages]
// with kFixup, below); a kernel with several rings carves them out of one array (kBars each),
// which keeps its shared-memory layout one block of barriers.
//
// Who arrives is the kernel's: init takes the arrival counts (typically full: 1, the producer
// thread's arrive_expect_tx, with the bytes counted off by the copies; empty: one per consumer
// warp, lane 0 arriving once the warp's reads of the stage are done). Stage addresses of the data
// are the kernel's too (stage(n) * bytes): the ring moves no data.
//
// kFixup: one warp mends each fill between its copies and the consumers (gdpa/fwd_ws.cuh zeroes
// the V rows past a sequence's end there, off the consumers' path). A third barrier per stage,
// ready, completes on that warp's arrival (fixup_done_warp) after fixup_wait saw the bytes land;
// consumer_wait then waits for ready instead of full. The fix-up warp never arrives on a barrier
// it waits on, and fill n + kStages cannot land before the consumers released fill n, which they
// do only after ready: each of the three barriers is waited on at most one phase behind, as above.
#pragma once

#include <cstdint>

#include "kernels/common/bulk_copy.cuh"

namespace attnkit {

#if defined(__CUDACC__) && !defined(__HIPCC__)

template <int kStages, bool kFixup = false>
struct TmaRing {
  static_assert(kStages >= 1, "a ring has at least one stage");
  uint64_t* bars;  // [kBars]: full[kStages], empty[kStages] (, ready[kStages] with kFixup)

  static constexpr int kBars = (kFixup ? 3 : 2) * kStages;
  // Fill n's stage. Unsigned, as every caller counts: n % kStages and n / kStages stay shifts /
  // a multiply for any kStages, and the kernels' stage addresses share them.
  ATTNKIT_DEVICE ATTNKIT_INLINE static uint32_t stage(uint32_t n) { return n % kStages; }
  ATTNKIT_DEVICE ATTNKIT_INLINE uint64_t* full(uint32_t n) const { return bars + n % kStages; }
  ATTNKIT_DEVICE ATTNKIT_INLINE uint64_t* empty(uint32_t n) const {
    return bars + kStages + n % kStages;
  }
  ATTNKIT_DEVICE ATTNKIT_INLINE uint64_t* ready(uint32_t n) const {
    static_assert(kFixup, "only a ring with a fix-up warp has ready barriers");
    return bars + 2 * kStages + n % kStages;
  }

  // One thread. The caller then runs bulk::fence_init() once for all of its rings and
  // synchronises the roles (__syncthreads).
  // With kFixup, ready completes on one arrival (lane 0 of the fix-up warp).
  ATTNKIT_DEVICE ATTNKIT_INLINE void init(uint32_t full_arrivals, uint32_t empty_arrivals) const {
    for (int s = 0; s < kStages; ++s) {
      bulk::init(full(s), full_arrivals);
      bulk::init(empty(s), empty_arrivals);
      if constexpr (kFixup) bulk::init(ready(s), 1);
    }
  }

  // Producer: before fill n overwrites its stage, wait until fill n - kStages was released. The
  // test is on the use, not `n >= kStages` (the same): the form the forwards' K / V loaders were
  // written in, which keeps their code; ptxas schedules the two forms differently (docs/
  // architecture.md has the SASS comparison).
  ATTNKIT_DEVICE ATTNKIT_INLINE void producer_acquire(uint32_t n) const {
    const uint32_t use = n / kStages;  // > 0: the stage held fill n - kStages
    if (use > 0) bulk::wait(empty(n), (use - 1) & 1);
  }
  // Producer: its arrival on fill n, announcing the bytes its copies (on full(n)) will count off.
  ATTNKIT_DEVICE ATTNKIT_INLINE void producer_arrive_expect_tx(uint32_t n, uint32_t bytes) const {
    bulk::arrive_expect_tx(full(n), bytes);
  }
  // Producer: fill n with no bytes (e.g. a hand-over written with ordinary stores, which the
  // arrival releases).
  ATTNKIT_DEVICE ATTNKIT_INLINE void producer_arrive(uint32_t n) const { bulk::arrive(full(n)); }

  // Consumer: wait for fill n (its bytes, and what was written before the producer's arrival;
  // with kFixup, also what the fix-up warp wrote before its arrival: the bytes reach the
  // consumers through that warp's wait and arrival, as a release / acquire chain).
  ATTNKIT_DEVICE ATTNKIT_INLINE void consumer_wait(uint32_t n) const {
    if constexpr (kFixup) {
      bulk::wait(ready(n), (n / kStages) & 1);
    } else {
      bulk::wait(full(n), (n / kStages) & 1);
    }
  }

  // Fix-up warp (kFixup), every lane: wait for fill n's bytes.
  ATTNKIT_DEVICE ATTNKIT_INLINE void fixup_wait(uint32_t n) const {
    static_assert(kFixup, "only a ring with a fix-up warp has a fix-up role");
    bulk::wait(full(n), (n / kStages) & 1);
  }
  // Fix-up warp, every lane, once per fill (whether or not it wrote): hands fill n to the
  // consumers. A lane that wrote the stage with ordinary stores must run bulk::fence_proxy_async()
  // first (the consumers' wgmma reads through the async proxy, and so does the next copy into the
  // stage); a lane that wrote nothing may run it too (gdpa/fwd_ws.cuh fences every lane of a fill
  // it mends: harmless). The __syncwarp orders every lane's stores and fence before lane 0's
  // arrival, whose release is cumulative.
  ATTNKIT_DEVICE ATTNKIT_INLINE void fixup_done_warp(uint32_t n, int lane) const {
    __syncwarp();
    if (lane == 0) bulk::arrive(ready(n));
  }
  // Consumer: this thread's release of fill n (the one thread of its group that arrives, e.g.
  // lane 0 of a warp whose reads are done: wgmma reads, once waited for).
  ATTNKIT_DEVICE ATTNKIT_INLINE void consumer_release(uint32_t n) const { bulk::arrive(empty(n)); }
  // Consumer: a warp's release after ordinary loads from the stage (every lane calls; the
  // __syncwarp orders all lanes' reads before lane 0's arrival).
  ATTNKIT_DEVICE ATTNKIT_INLINE void consumer_release_warp(uint32_t n, int lane) const {
    __syncwarp();
    if (lane == 0) bulk::arrive(empty(n));
  }
};

// The three rings of the warp-specialised forwards (flash/fwd_ws.cuh, gdpa/fwd_ws.cuh), back to
// back in one barrier array: q (fill n: the CTA's unit n, whose WsUnit the Q loader writes into
// the kernel's units[q.stage(n)] before its arrival), k and v (fill g: the CTA's key tile g).
// Every full barrier completes on the loading thread's arrival (with the bytes its copies count
// off), every empty barrier on the releases of the consumer warps (q's, in the jagged GDPA
// forward, also on its V loader's and fix-up warp's: init's q_readers).
// kFixupV: v passes a fix-up warp (TmaRing's kFixup) between its copies and the consumers.
template <int kQ, int kK, int kV, bool kFixupV = false>
struct QkvRings {
  static constexpr int kBars =
      TmaRing<kQ>::kBars + TmaRing<kK>::kBars + TmaRing<kV, kFixupV>::kBars;
  TmaRing<kQ> q;
  TmaRing<kK> k;
  TmaRing<kV, kFixupV> v;

  ATTNKIT_DEVICE ATTNKIT_INLINE explicit QkvRings(uint64_t* bars)
      : q{bars}, k{bars + TmaRing<kQ>::kBars}, v{bars + TmaRing<kQ>::kBars + TmaRing<kK>::kBars} {}

  // One thread, then a CTA-wide barrier (in the forwards the last one: the roles never meet all
  // together again). q_readers: arrivals on q's empty barriers besides the consumer warps' (the
  // jagged GDPA forward's V loader and fix-up warp, which read units[] too).
  ATTNKIT_DEVICE ATTNKIT_INLINE void init(uint32_t consumer_warps, uint32_t q_readers = 0) const {
    q.init(1, consumer_warps + q_readers);
    k.init(1, consumer_warps);
    v.init(1, consumer_warps);
    bulk::fence_init();
  }
};

#endif  // __CUDACC__ && !__HIPCC__

}  // namespace attnkit
