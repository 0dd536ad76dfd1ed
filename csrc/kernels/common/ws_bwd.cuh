// The skeleton the warp-specialised attention backwards share (flash/bwd_ws.cuh,
// gdpa/bwd_ws.cuh): one producer warpgroup that loads K and V once per 128-key tile and the
// (Q, dO) tile of every query step into a ring, two consumer warpgroups that own 64 keys each
// with dK / dV in registers. Torch-free, sm_90a device code.
//
// Barriers (mbarriers of kernels/common/bulk_copy.cuh; completion k has parity k & 1):
//   full_kv: the producer's arrival + the K and V bytes;  empty_kv: the 8 consumer warps, after a
//     tile's last reader of K (its last dQ product);
//   full[s]: `full_arrivals` arrivals (the kernel says who arrives, and who announces the bytes);
//   empty[s]: the 8 consumer warps, once the step's last products that read the stage are done.
// Every role walks the same (tile, step) sequence, so no work units are handed over: `kv_n`
// counts the key tiles with at least one step that a role has seen, `slot` the steps. Both are
// TmaRings (kernels/common/tma_ring.cuh, its phase arithmetic): (full_kv, empty_kv) a ring of one
// stage filled per kv_n, (full, empty) one of kStages filled per slot, laid out back to back.
#pragma once

#include <cstdint>

#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/cluster.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/common/tma_ring.cuh"
#include "kernels/common/wgmma.cuh"

namespace attnkit {
namespace wsbwd {

#if defined(__CUDACC__) && !defined(__HIPCC__)

template <int kStages, int kConsumerWarps = 8>
struct Ring {
  uint64_t* bars;  // [2 + 2 * kStages]: full_kv, empty_kv, full[kStages], empty[kStages]

  static constexpr int kBars = TmaRing<1>::kBars + TmaRing<kStages>::kBars;
  ATTNKIT_DEVICE ATTNKIT_INLINE TmaRing<1> kv() const { return {bars}; }
  ATTNKIT_DEVICE ATTNKIT_INLINE TmaRing<kStages> steps() const {
    return {bars + TmaRing<1>::kBars};
  }
  ATTNKIT_DEVICE ATTNKIT_INLINE uint64_t* full_kv() const { return kv().full(0); }
  ATTNKIT_DEVICE ATTNKIT_INLINE uint64_t* full(uint32_t slot) const { return steps().full(slot); }

  // One thread, then a CTA-wide barrier (the last one: the roles never meet all together again).
  ATTNKIT_DEVICE ATTNKIT_INLINE void init(uint32_t full_arrivals) const {
    kv().init(1, kConsumerWarps);
    steps().init(full_arrivals, kConsumerWarps);
    bulk::fence_init();
  }

  // Producer: K / V of tile kv_n may overwrite tile kv_n - 1's; step `slot` may refill its stage.
  ATTNKIT_DEVICE ATTNKIT_INLINE void producer_kv_acquire(uint32_t kv_n) const {
    kv().producer_acquire(kv_n);
  }
  ATTNKIT_DEVICE ATTNKIT_INLINE void producer_step_acquire(uint32_t slot) const {
    steps().producer_acquire(slot);
  }

  // Consumers: wait for the data; release it (every lane of the warp calls, lane 0 arrives).
  ATTNKIT_DEVICE ATTNKIT_INLINE void consumer_kv_wait(uint32_t kv_n) const {
    kv().consumer_wait(kv_n);
  }
  ATTNKIT_DEVICE ATTNKIT_INLINE void consumer_step_wait(uint32_t slot) const {
    steps().consumer_wait(slot);
  }
  ATTNKIT_DEVICE ATTNKIT_INLINE void consumer_step_release(uint32_t slot, int lane) const {
    steps().consumer_release_warp(slot, lane);
  }
  ATTNKIT_DEVICE ATTNKIT_INLINE void consumer_kv_release(int lane) const {
    kv().consumer_release_warp(0, lane);
  }
};

// Rows [from, rows_total) of a sw128 tile of rows_total rows and kBoxes 64-column blocks -> 0, by
// the 128 threads of one warpgroup (wtid = thread index in it): whole 128-byte rows, so the
// swizzle does not matter. The caller then fences (bulk::fence_proxy_async) and syncs the
// warpgroup before its tensor cores read the tile.
template <int kBoxes>
ATTNKIT_DEVICE ATTNKIT_INLINE void zero_rows(unsigned char* tile, int rows_total, int from,
                                             int wtid) {
  const int chunks = (rows_total - from) * kBoxes * 8;  // 16-byte chunks
  for (int c = wtid; c < chunks; c += 128) {
    const int row = from + c / (8 * kBoxes), blk = (c / 8) % kBoxes, chunk = c & 7;
    *reinterpret_cast<uint4*>(tile + blk * rows_total * 128 + row * 128 + chunk * 16) =
        make_uint4(0, 0, 0, 0);
  }
}

// dQ through shared memory (FlashAttention-3's organisation): a warpgroup's 64 x 64 fp32 dQ
// accumulator goes into a staging buffer of two sw128 boxes (columns 0-31, 32-63; 64 rows x 128
// bytes each, 1024-byte aligned) and one thread adds both boxes into the fp32 workspace with
// tensor reductions (tma::reduce_add_4d over a map of boxes {32, 1, 64, 1}: tma_map.h's
// encode_dq_stage_map). Against paired fp32 atomics from every thread (the kernels' earlier form)
// the copy engine carries the 32 KB of a step, and the consumers go on to the next step's
// products instead of waiting for their reductions to drain.
//
// Rows >= rows get zeros: the box still covers them, and in a varlen batch they are the next
// sequence's rows (adding +0 leaves them unchanged); rows past the map's extent are dropped.
struct DqStage {
  static constexpr int kBoxBytes = 64 * 128;  // 64 rows x 32 fp32
  static constexpr int kBytes = 2 * kBoxBytes;

  // Before the warpgroup writes the buffer again: its issuer's previous reduction has read it
  // (the issuer calls this, then the warpgroup synchronises).
  ATTNKIT_DEVICE ATTNKIT_INLINE static void issuer_wait_free() { bulk::wait_group_read<0>(); }

  // Each thread's fragments (m64n64 layout: rows warp4 * 16 + lane / 4 (+ 8), columns 8i +
  // 2 (lane % 4)) -> the buffer, both boxes (store_box, below). Stores of a warp land
  // conflict-free (two 128-byte wavefronts).
  ATTNKIT_DEVICE ATTNKIT_INLINE static void store(unsigned char* buf, const float (&dqa)[8][4],
                                                  int warp4, int lane, int rows) {
    store_box<0>(buf, dqa, warp4, lane, rows);
    store_box<1>(buf + kBoxBytes, dqa, warp4, lane, rows);
  }

  // One thread, after the warpgroup's stores, fence_proxy_async and a warpgroup barrier: both
  // boxes added at columns c0 and c0 + 32 of rows row0 .. row0 + 63 of (head, batch).
  ATTNKIT_DEVICE ATTNKIT_INLINE static void issue(const unsigned char* buf, const void* map, int c0,
                                                  int head, int row0, int batch) {
    tma::reduce_add_4d(map, buf, c0, head, row0, batch);
    tma::reduce_add_4d(map, buf + kBoxBytes, c0 + 32, head, row0, batch);
    bulk::commit_group();
  }

  // At the issuer's exit: shared memory must outlive the reductions' reads of it.
  ATTNKIT_DEVICE ATTNKIT_INLINE static void issuer_drain() { bulk::wait_group<0>(); }

  // The direct dQ (no workspace: gdpa/bwd_ws.cuh's kDqDirect), between the two CTAs of a cluster
  // (cluster.cuh): CTA c keeps box c of its partial dQ in its own slot c (store_box) and pushes box
  // 1 - c into the peer's slot c (push_box: st.async, the bytes completing on the peer's barrier
  // `peer_bar`); each then sums its slots (finalize_warp) for box c. Slot and box layouts are
  // store's.
  // Row r, column pair 8j + 2 t4 of a 64 x 32 fp32 slot (j < 4: the box's fragment index).
  ATTNKIT_DEVICE ATTNKIT_INLINE static uint32_t slot_offset(int r, int t4, int j) {
    const int chunk = (j * 2 + (t4 >> 1)) ^ (r & 7);
    return r * 128 + chunk * 16 + (t4 & 1) * 8;
  }

  // put(offset in a slot, value) for the thread's 8 float2 of box kBox (rows >= rows: zeros).
  // kBox is a template argument: a runtime one indexes the fragments dynamically, which puts them
  // in local memory.
  template <int kBox, typename Put>
  ATTNKIT_DEVICE ATTNKIT_INLINE static void each_pair(const float (&dqa)[8][4], int warp4, int lane,
                                                      int rows, Put&& put) {
    const int t4 = lane & 3;
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int r = warp4 * 16 + lane / 4 + rh * 8;
      const bool keep = r < rows;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int i = kBox * 4 + j;
        put(slot_offset(r, t4, j),
            make_float2(keep ? dqa[i][rh * 2] : 0.f, keep ? dqa[i][rh * 2 + 1] : 0.f));
      }
    }
  }

  template <int kBox>
  ATTNKIT_DEVICE ATTNKIT_INLINE static void store_box(unsigned char* slot, const float (&dqa)[8][4],
                                                      int warp4, int lane, int rows) {
    each_pair<kBox>(dqa, warp4, lane, rows, [&](uint32_t off, float2 v) {
      *reinterpret_cast<float2*>(slot + off) = v;
    });
  }

  template <int kBox>
  ATTNKIT_DEVICE ATTNKIT_INLINE static void push_box(uint32_t peer_slot, const float (&dqa)[8][4],
                                                     int warp4, int lane, int rows,
                                                     uint32_t peer_bar) {
    each_pair<kBox>(dqa, warp4, lane, rows, [&](uint32_t off, float2 v) {
      cluster::store_remote(peer_slot + off, v, peer_bar);
    });
  }

  // By one warp (the finalizer, gdpa/bwd_ws.cuh kDqDirect): slot a (plus slot b, with `sum`)
  // rounded to T and stored into rows < rows and columns < cols of dq (its row 0 at the slot's
  // first column; row_stride in elements; cols a multiple of 4: the next head's columns follow).
  // Per pass four rows, eight lanes a row, 16 bytes of each slot per lane: a quarter warp reads a
  // whole 128-byte row (every bank once), a row's bf16 are 64 contiguous bytes.
  template <typename T>
  ATTNKIT_DEVICE ATTNKIT_INLINE static void finalize_warp(const unsigned char* a,
                                                          const unsigned char* b, bool sum,
                                                          int lane, T* dq, int64_t row_stride,
                                                          int rows, int cols) {
    const int k = lane & 7;
    if (k * 4 >= cols) return;
    const int r_end = rows < 64 ? rows : 64;
#pragma unroll 2
    for (int r = lane >> 3; r < r_end; r += 4) {
      const uint32_t off = r * 128 + ((k ^ (r & 7)) * 16);
      float4 x = *reinterpret_cast<const float4*>(a + off);
      if (sum) {
        const float4 y = *reinterpret_cast<const float4*>(b + off);
        x.x += y.x, x.y += y.y, x.z += y.z, x.w += y.w;
      }
      *reinterpret_cast<uint2*>(dq + r * row_stride + k * 4) =
          make_uint2(mma::pack2<T>(x.x, x.y), mma::pack2<T>(x.z, x.w));
    }
  }
};

#endif  // __CUDACC__ && !__HIPCC__

}  // namespace wsbwd
}  // namespace attnkit
