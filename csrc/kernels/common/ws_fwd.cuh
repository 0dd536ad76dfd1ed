// The pieces the two warp-specialised forwards (flash/fwd_ws.cuh, gdpa/fwd_ws.cuh) share beside
// their TmaRing data path: the consumer warpgroups' ping-pong turns, the owed P·V and the drain of
// a CTA's last P·V. Torch-free, sm_90 device code.
//
// The P·V callbacks commit their own products: a wgmma under a condition (gdpa's narrow or idle
// tiles) inside a commit group closed after the branch makes ptxas end the group with a dummy
// wgmma on every path, so a wait meant to leave the P·V running waited for it (gdpa/fwd_ws.cuh).
//
// Both forwards issue a key tile's P·V one tile behind its scores (P_{g-1}·V_{g-1} beside S_g),
// so when a CTA runs out of work one product is still owed; and with ping-pong the consumer
// warpgroups take turns at the tensor cores (FlashAttention-3's inter-warpgroup overlap: one
// warpgroup's softmax / activation runs under the other's products).
#pragma once

#include <cstdint>

#include "kernels/common/wgmma.cuh"

namespace attnkit {
namespace wsfwd {

#if ATTNKIT_HAS_WGMMA

// Ping-pong turns over `count` consumer warpgroups, in ring order: named barrier bar0 + w is
// warpgroup w's turn; it counts w's threads (take: sync) and those of the warpgroup before it
// (pass: arrive), 256 in all. `on` false makes every call a no-op (no ping-pong).
struct Turns {
  static constexpr int kThreads = 256;
  bool on;
  int bar0, wg, count;

  // Before the first products: the last warpgroup hands warpgroup 0 its first turn.
  ATTNKIT_DEVICE ATTNKIT_INLINE void start() const {
    if (on && wg == count - 1) wgmma::named_barrier_arrive(bar0, kThreads);
  }
  ATTNKIT_DEVICE ATTNKIT_INLINE void take() const {
    if (on) wgmma::named_barrier_sync(bar0 + wg, kThreads);
  }
  ATTNKIT_DEVICE ATTNKIT_INLINE void pass() const {
    if (on) wgmma::named_barrier_arrive(bar0 + (wg + 1) % count, kThreads);
  }
  // At exit: the last warpgroup's last hand-over (or its first, when there was no work) is still
  // pending on warpgroup 0's barrier; take it so that no barrier is left half-arrived.
  ATTNKIT_DEVICE ATTNKIT_INLINE void finish() const {
    if (on && wg == 0) take();
  }
};

// S (+)= Q Kᵀ of the warpgroup's 64 query rows (rows wg * 64 .. of the BM-row Q tile at sq)
// against the keys k_row0 .. of the BN-row K stage at sk, kD / 16 k-steps; both tiles K-major
// sw128. The caller fences before and commits after.
template <class Mma, int kD, int BM, int BN, int R>
ATTNKIT_DEVICE ATTNKIT_INLINE void issue_qk(float (&s)[R][4], uint32_t sq, int wg, uint32_t sk,
                                            int k_row0 = 0) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    Mma::template ss<0>(s, wgmma::desc_k_major<BM>(sq, wg * 64, kk),
                        wgmma::desc_k_major<BN>(sk, k_row0, kk), kk > 0);
  }
}

// After a key tile's S = Q Kᵀ is issued and committed: the P·V owed for the tile before it
// (when `owed`: issue(), which issues and commits it, a group of its own), then the turn passes,
// and the wait is for S alone (the P·V may still run under the softmax / activation).
template <class Issue>
ATTNKIT_DEVICE ATTNKIT_INLINE void issue_owed_pv(bool owed, const Turns& turns, Issue&& issue) {
  if (owed) {
    issue();
    turns.pass();
    wgmma::wait<1>();
  } else {
    turns.pass();
    wgmma::wait<0>();
  }
}

// The last P·V of the CTA's last unit, the V of fill g - 1 of ring_v: wait for it, zero the rows
// past the sequence's keys (zero_tail(stage); a no-op where another warp zeroed them before the
// fill reached the consumers: gdpa/fwd_ws.cuh), issue the product in turn (issue(stage), into
// acc, committed by it; it may issue nothing), wait for it and store the unit (store()). Nothing
// when the CTA had no key tile (g = 0).
template <class RingV, int R, class ZeroTail, class Issue, class Store>
ATTNKIT_DEVICE ATTNKIT_INLINE void drain_last_pv(const RingV& ring_v, uint32_t g, const Turns& turns,
                                                 float (&acc)[R][4], ZeroTail&& zero_tail,
                                                 Issue&& issue, Store&& store) {
  if (g == 0) return;
  const uint32_t stage = ring_v.stage(g - 1);
  ring_v.consumer_wait(g - 1);
  zero_tail(stage);
  turns.take();
  wgmma::fence();
  issue(stage);
  turns.pass();
  wgmma::wait<0>();
  wgmma::fence_regs(acc);
  store();
}

#endif  // ATTNKIT_HAS_WGMMA

}  // namespace wsfwd
}  // namespace attnkit
