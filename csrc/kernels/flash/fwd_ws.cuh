// Flash attention forward on Hopper, warp-specialised (sm_90a, bf16 / fp16, head dim 64 or 128).
// The sm90 kernel of choose.h: the forward on a 9.0 device of an sm_90a build (the launcher
// copies an input its tensor maps cannot address). Online softmax in the log2 domain, the
// delayed P·V (S_j = Q·K_jᵀ issued before O += P_{j-1}·V_{j-1}, the softmax of S_j run while
// the tensor cores finish the product), element masks only on tiles that cross a window edge or
// the end (online_softmax.cuh); key tiles start at the first key any row of the query tile sees
// and stop at the last one (a sliding window costs its width). The data is moved by a producer
// warpgroup, modeled on the GDPA forward (kernels/gdpa/fwd_ws.cuh).
//
// A unit is (sequence b, head h, 128-row query tile); the CTA strides over units. 384 threads =
// 3 warpgroups (launch_options.h's three_wg at head dim 64: 512 threads, 3 consumer warpgroups at
// 160 registers, 192-row query tiles, the turn passed round a ring of 3):
//   warpgroup 0, producer: gives its registers back (setmaxnreg.dec to 24); thread 0 loads Q (one
//     box per 64 head-dim columns, into a 2-stage ring) and K_j per key tile, thread 32 loads V_j,
//     each into rings of their own (D = 128: 2 K / 3 V stages, 32 KB tiles; D = 64: 4 / 4, 16 KB
//     tiles; kPaged: warps 0 and 1 whole, a page box per lane, load_paged_tile), every load a
//     tensor-map copy (kernels/common/tma.cuh) of a 4-D map {D, H, S, B}:
//     batched boxes never read across a batch (rows >= S land as zeros); varlen maps have B = 1
//     and the rows past a sequence's end are the next sequence's (or zeros past the total).
//     kPaged (a paged serving call): the K / V maps are the NHD caches' own, {D, Hkv, page,
//     blocks}, and a key tile is assembled from boxes of R rows, one per page slice
//     (load_paged_tile).
//   warpgroups 1-2, consumers: take the registers (setmaxnreg.inc to 240), 64 query rows each,
//     and per key tile g issue S_g = Q·K_gᵀ and then O += P_{g-1}·V_{g-1}, wait for S_g only, run
//     the softmax of S_g while P_{g-1}·V_{g-1} runs, rescale O, pack P_g. g counts the CTA's key
//     tiles across units: a unit's last P·V is issued with the next unit's first S; the finished
//     unit (its normalisation 1/l and lse kept in 4 registers per thread, `Done`) is stored right
//     after that product completes, and O cleared.
//     Ping-pong (launch option ping_pong, default on, a kernel argument, not a template):
//     two named barriers pass a turn so the warpgroups alternate issuing products (FA3's scheme,
//     as in the GDPA kernel: warpgroup 1 starts by arriving on warpgroup 0's barrier; each takes
//     one turn per key tile and one for the very last P·V; warpgroup 0 takes one more at the end).
//
// Units whose rows see no key (n_tiles == 0) are handed to the consumers like the others but
// with no loads (a plain arrive on the Q stage): the consumers store output 0 / lse -inf for
// their rows and release the Q stage. The walk's end is a unit with n_tiles = -1.
//
// Barriers as the GDPA kernel: three rings (kernels/common/tma_ring.cuh, which owns the phase
// arithmetic: fill n of a ring is unit qn of Q, key tile g of K and V); a stage's full barrier
// completes when the expected bytes landed, its empty barrier when all the consumer warps
// released it (lane 0 of each warp arrives: K after S_g, V after the delayed P·V, Q after the
// unit's last S). Each unit goes to the consumers through `units[qs]`, written before the Q
// stage's arrive.
//
// Keys past `hi` (the tile's last visible key) in the last key tile are either the next
// sequence's (varlen: maybe inf / NaN), zeros past the map's extent, real keys no row of the
// tile sees, or (kPaged) cache slots past the sequence's end in its last page (anything) and
// shared memory left by an earlier fill (boxes not loaded): their scores are masked to -inf,
// and the V rows past `hi` are zeroed in shared memory before that tile's P·V (0 · NaN is NaN),
// by each consumer warpgroup for itself (whole 128-byte rows, so the swizzle does not matter; the
// other warpgroup writes the same zeros).
// Query rows past the sequence's end are computed and never stored.
//
// Units in order: query tiles of an item fastest (the last tile of a sequence first: under a
// causal mask it sees the most keys), then heads, then sequences; an item strides over the tiles
// of a sequence longer than the grid hint; with Params::seq_list the sequences are the listed
// ones, in list order (the mixed serving call's long sequences: the walk then never visits the
// decode kernel's). The grid is persistent by default (one CTA per SM; launch option
// persistent = false launches one CTA per item; max_ctas = n caps it at n CTAs, for tests).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/portability.h"
#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/pdl.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/common/tma_ring.cuh"
#include "kernels/common/wgmma.cuh"
#include "kernels/common/ws_fwd.cuh"
#include "kernels/flash/launch_options.h"
#include "kernels/flash/online_softmax.cuh"
#include "kernels/flash/params.h"

#define ATTNKIT_HAS_FWD_WS ATTNKIT_HAS_TENSOR_MAPS  // the kernel and its launcher are declared

#if ATTNKIT_HAS_FWD_WS

namespace attnkit {
namespace flash {
namespace ws {

template <int kD, int kWG = 2>
struct FwdWsTraits {
  static_assert(kD == 64 || kD == 128, "warp-specialised forward: head dim 64 or 128");
  static_assert(kWG == 2 || (kWG == 3 && kD == 64), "2 consumer warpgroups, or 3 at head dim 64");
  static constexpr int kConsumerWarpGroups = kWG;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpGroups);
  static constexpr int kConsumerWarps = 4 * kConsumerWarpGroups;
  static constexpr int kBM = 64 * kConsumerWarpGroups, kBN = 128;
  static constexpr int kBoxRows = 128, kBoxCols = 64;        // 128 bytes: one sw128 column block
  static constexpr int kBoxes = kD / kBoxCols;               // boxes per tile
  static constexpr int kBoxBytes = kBoxRows * kBoxCols * 2;  // one K / V copy
  static constexpr int kTileBytes = kBoxes * kBoxBytes;      // a 128 x D K or V tile
  static constexpr int kQBoxBytes = kBM * kBoxCols * 2;      // one Q copy: kBM rows
  static constexpr int kQTileBytes = kBoxes * kQBoxBytes;    // a kBM x D Q tile
  // Q: 2 stages (the next unit's Q lands while the current one runs). D = 128 as GDPA (K 2, V 3,
  // 225 KB); D = 64 tiles are half the size, so 4 + 4 (161 KB; 177 KB with 3 warpgroups' 192-row
  // Q tiles) give more lead to the loads.
  static constexpr int kQStages = 2;
  static constexpr int kKStages = kD == 64 ? 4 : 2;
  static constexpr int kVStages = kD == 64 ? 4 : 3;
  // 128·24 + 256·240 and 128·24 + 384·160 both fit the 64K registers of an SM.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = kWG == 3 ? 160 : 240;
  // Named barriers (0 is __syncthreads): one turn per consumer warpgroup, then one per consumer
  // warpgroup for its zero fill of a V tail.
  static constexpr int kTurnBar = 1;
  static constexpr int kZeroBar = 1 + kWG;
  // + 1 KB so the tiles can start 1024-byte aligned whatever the dynamic base is (<= 227 KB).
  static constexpr int kSmemBytes =
      1024 + kQTileBytes * kQStages + kTileBytes * (kKStages + kVStages);
  static_assert(kBN == kBoxRows, "one K / V box per column block");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

// Tensor maps of q, k, v as {D, heads, rows, batches} (innermost first), boxes {64, 1, rows, 1}
// with the 128-byte swizzle (q: the traits' kBM rows, k and v: 128); built by the launcher's caller (csrc/cuda/flash.cu, tma_map.h).
struct FwdWsMaps {
  CUtensorMap q, k, v;
};

// One unit of a CTA's work, as the Q loader hands it to the consumers. Row counts and offsets
// are int32: the launcher's caller takes this kernel only for q and k with fewer than 2^31 - 1024
// rows (the tensor map's coordinates are int32 as well), which keeps the producer's 24 registers
// enough (its walk spills a little; the consumers spill nothing).
struct WsUnit {
  int n_tiles;  // key tiles (>= 1); 0: no row of the tile sees a key (no loads); -1: the end
  int b, h;
  int i0;              // the tile's first query row, in the sequence
  int q0, lq, k0, lk;  // the sequence (seq_range)
  int lo, hi;          // the keys the tile's rows see, lo of its first row to hi of its last
};

// Work items per head and sequence: one per query tile, or (paired) one per pair of tiles.
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t fwd_ws_items_per_head(int64_t q_tiles, bool paired) {
  return paired ? (q_tiles + 1) / 2 : q_tiles;
}

#if defined(__CUDACC__)
// The CTAs of the grid that walk its items (Params::walk_ctas, clamped; all without it).
ATTNKIT_DEVICE ATTNKIT_INLINE int fwd_ws_walkers(const Params& p) {
  if (p.walk_ctas == nullptr) return static_cast<int>(gridDim.x);
  const int n = *p.walk_ctas;
  return n < 1 ? 1 : (n > static_cast<int>(gridDim.x) ? static_cast<int>(gridDim.x) : n);
}

// Walks a CTA's units: items blockIdx.x, + walkers, ... (item = (tile, head, sequence), tiles
// fastest), and in each item the sequence's query tiles k, k + q_tiles, ... counted from its last
// tile. Paired (the default; launch option paired = false turns it off): an item is a pair of
// tiles, k and q_tiles - 1 - k (then q_tiles + k, 2 q_tiles - 1 - k, ...), so that under a causal
// mask every item of an equal-length batch costs about the same: with one tile per item a CTA's
// tiles are k, k + grid, ... mod q_tiles, all alike when the grid is a multiple of q_tiles (132 SMs
// and 22 or 6 tiles of 192 rows), and the CTAs of the longest tiles set the time. Both loading
// threads (kPaged: every lane of both loading warps) run the walk, alike; the consumers get its
// units through shared memory.
template <int BM, int BN>
struct WsCursor {
  int64_t item;
  int r = 0, k0 = 0, seq_tiles = 0;  // the tile's ordinal in the item, the item's first tile
  bool in_item = false;
  WsUnit u{};  // the item's (b, h, sequence); the rest is filled per tile

  // kPaged: the first key of a unit is rounded down to a multiple of Params::page_box_rows, so
  // the paged loads' boxes never cross a page (the keys added are masked like any key outside a
  // row's range: the consumers' masks are relative to u.lo).
  template <bool kPaged = false>
  ATTNKIT_DEVICE ATTNKIT_INLINE bool next(const Params& p, int64_t q_tiles, bool paired,
                                          int64_t items) {
    const int64_t per = fwd_ws_items_per_head(q_tiles, paired);
    const int q = static_cast<int>(q_tiles);
    while (item < items) {
      if (!in_item) {
        const int64_t bh = item / per, i = bh / p.H;  // i: the walk's i-th sequence
        k0 = static_cast<int>(item - bh * per);
        u.b = static_cast<int>(walked_seq(p, i));
        u.h = static_cast<int>(bh - i * p.H);
        const SeqRange s = seq_range(p, u.b);
        u.q0 = static_cast<int>(s.q0), u.lq = static_cast<int>(s.lq);
        u.k0 = static_cast<int>(s.k0), u.lk = static_cast<int>(s.lk);
        seq_tiles = (u.lq + BM - 1) / BM;
        r = 0;
        in_item = true;
      } else {
        // A pair whose two tiles coincide (the middle one of an odd q_tiles) has no second.
        r += paired && (r & 1) == 0 && q - 1 - k0 == k0 ? 2 : 1;
      }
      // The tile counted from the sequence's last: k0, k0 + q, ... or, paired, k0, q - 1 - k0,
      // q + k0, 2q - 1 - k0, ...: increasing (k0 <= q - 1 - k0), so the first past the sequence
      // ends the item.
      const int k = paired ? (r >> 1) * q + ((r & 1) ? q - 1 - k0 : k0) : r * q + k0;
      if (k >= seq_tiles) {
        in_item = false;
        item += fwd_ws_walkers(p);  // re-read, not held: a register fewer for the loading warps
        continue;
      }
      u.i0 = (seq_tiles - 1 - k) * BM;
      const int rows = u.lq - u.i0 < BM ? u.lq - u.i0 : BM;
      const KeyRange first = key_range(p, u.i0, u.lq, u.lk);
      const KeyRange last = key_range(p, u.i0 + rows - 1, u.lq, u.lk);
      u.lo = static_cast<int>(first.lo);
      if constexpr (kPaged) u.lo -= u.lo % p.page_box_rows;
      u.hi = static_cast<int>(last.hi);
      u.n_tiles = first.lo <= last.hi ? (u.hi - u.lo + BN) / BN : 0;
      return true;
    }
    return false;
  }
};
#endif

#if defined(__CUDACC__)
// Paged K / V (Params::block_table): key tile t of unit u, keys j = u.lo + t * BN onwards, from
// the pages that hold them, in boxes of R = page_box_rows rows (R divides the page size and u.lo
// is a multiple of R, so no box crosses a page). Called by a whole producer warp: lane s loads box
// s (up to BN / 16 boxes, R >= 16), so the tile's block ids are read side by side, one per lane,
// before the stage is acquired (they do not depend on it), in one coalesced read; each lane issues
// its box's copies (a tensor-map copy takes warp-uniform operands, so ptxas issues them lane after
// lane: the copies themselves are not faster, the id reads and the producer's spills are - 152 B
// against 566 with one thread reading every id, whose block-16 tiles ran ~1.8x slower than the
// gathered copy in the twenty-third session). Each id is clamped
// into the cache, whatever the table holds. Boxes wholly past the unit's last key are not loaded
// and the bytes expected count only the others: their K columns are masked and their V rows
// zeroed (zero_v_tail), as rows past a sequence's end are in the other layouts. Every lane waits
// for fill g of `ring` to be free; lane 0 sets its expected bytes before any lane issues a copy.
template <class Tr, class Ring>
ATTNKIT_DEVICE ATTNKIT_INLINE void load_paged_tile(unsigned char* dst, const CUtensorMap* map,
                                                   const Params& p, const WsUnit& u, int t, int hk,
                                                   const Ring& ring, uint32_t g, int lane) {
  static_assert(Tr::kBN / 16 <= 32, "a box per lane");
  constexpr int kRowBytes = Tr::kBoxCols * 2;
  const int R = p.page_box_rows, j = u.lo + t * Tr::kBN;
  const int n = min(Tr::kBN / R, (u.hi - j) / R + 1);  // j <= u.hi: at least one box
  int key = 0, b = 0;  // lanes >= n load nothing
  if (lane < n) {
    key = j + lane * R;
    b = p.block_table[int64_t(u.b) * p.table_stride + key / p.page_size];
    b = min(max(b, 0), p.num_blocks - 1);
  }
  ring.producer_acquire(g);  // every lane sees the stage free (a wait, not an arrive)
  if (lane == 0) {
    ring.producer_arrive_expect_tx(g, static_cast<uint32_t>(n * R * kRowBytes * Tr::kBoxes));
  }
  __syncwarp();  // the bytes expected before any copy is issued
  if (lane < n) {
#pragma unroll
    for (int c = 0; c < Tr::kBoxes; ++c) {
      tma::load_4d(dst + c * Tr::kBoxBytes + lane * R * kRowBytes, map, c * Tr::kBoxCols, hk,
                   key % p.page_size, b, ring.full(g));
    }
  }
}
#endif

// kSoftcap: a compile-time switch (the plain path carries no tanh). Requires
// scale > 0 (the launcher checks). `ping_pong` is uniform over the CTA (a kernel argument, so
// the A/B variant costs no instantiation).
// kPaged: K and V come from paged caches (Params::block_table; the maps are the caches',
// load_paged_tile).
template <typename T, int kD, int kWG, bool kSoftcap, bool kPaged = false>
__global__ void __launch_bounds__(FwdWsTraits<kD, kWG>::kThreads, 1)
    fwd_ws_kernel(const Params p, T* __restrict__ o, float* __restrict__ lse, const int64_t q_tiles,
                  const bool ping_pong, const bool paired, const __grid_constant__ CUtensorMap map_q,
                  const __grid_constant__ CUtensorMap map_k,
                  const __grid_constant__ CUtensorMap map_v) {
#if ATTNKIT_HAS_WGMMA
  using Tr = FwdWsTraits<kD, kWG>;
  using MmaS = wgmma::Wgmma<T, Tr::kBN>;  // S = Q·Kᵀ: N = key tile
  using MmaO = wgmma::Wgmma<T, kD>;       // O += P·V: N = head dim
  constexpr int BM = Tr::kBM, BN = Tr::kBN, KS = Tr::kKStages, VS = Tr::kVStages,
                QS = Tr::kQStages, kNT = BN / 8, kDT = kD / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (::attnkit::mma::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* sq = smem;                       // [QS] Q tiles
  unsigned char* sk = sq + QS * Tr::kQTileBytes;  // [KS] K tiles
  unsigned char* sv = sk + KS * Tr::kTileBytes;   // [VS] V tiles

  // The Q, K and V rings (kernels/common/tma_ring.cuh): fill qn of ring_q is unit qn, fill g of
  // ring_k / ring_v key tile g.
  __shared__ uint64_t bars[QkvRings<QS, KS, VS>::kBars];
  // The unit each Q stage holds, written by the Q loader before the stage's arrive (release) and
  // read by the consumers after their wait (acquire).
  __shared__ WsUnit units[QS];
  const QkvRings<QS, KS, VS> rings(bars);
  const auto& ring_q = rings.q;
  const auto& ring_k = rings.k;
  const auto& ring_v = rings.v;

  const int tid = threadIdx.x;
  // A kernel launched after this one with programmatic dependent launch may be scheduled from now
  // on, on the SMs this persistent grid leaves: the decode half of a mixed serving call
  // (cuda/flash.cu run_nhd_decode), which computes the short sequences this grid does not walk.
  // Other launches are stream-ordered as ever.
  pdl_launch_dependents();
  // CTAs past the walkers leave before any barrier (a whole CTA at once), so the decode kernel
  // has their SMs from the start (Params::walk_ctas; the mixed call's split sizes the two).
  const int walkers = fwd_ws_walkers(p);
  if (static_cast<int>(blockIdx.x) >= walkers) return;
  if (tid == 0) rings.init(Tr::kConsumerWarps);
  __syncthreads();  // the last CTA-wide barrier: the roles below never meet all together again

  if (tid < 128) {  // producer warpgroup: thread 0 loads Q and K, thread 32 loads V (kPaged:
    // warps 0 and 1 whole, a page box per lane, load_paged_tile; Q and the rings' bookkeeping
    // stay with their lane 0)
    wgmma::setmaxnreg_dec<Tr::kProducerRegs>();
    // Only the listed sequences when the call lists them (Params::seq_list: a mixed serving
    // call's long ones), so a CTA does not walk the items of the sequences the decode kernel takes.
    const int64_t items = fwd_ws_items_per_head(q_tiles, paired) * p.H * walked_seqs(p);
    const int plane = tid & 31;
    const bool leader = !kPaged || plane == 0;  // non-paged: the one thread is its own leader
    const bool loads_qk = kPaged ? tid < 32 : tid == 0;
    const bool loads_v = kPaged ? tid / 32 == 1 : tid == 32;
    if (!loads_qk && !loads_v) return;
    if (leader) {
      tma::prefetch_map(loads_qk ? &map_q : &map_v);
      if (loads_qk) tma::prefetch_map(&map_k);
    }
    WsCursor<BM, BN> cursor{int64_t(blockIdx.x)};
    const WsUnit& u = cursor.u;
    uint32_t g = 0, qn = 0;  // key tiles / units this CTA has loaded so far
    while (cursor.template next<kPaged>(p, q_tiles, paired, items)) {
      const int hk = static_cast<int>(u.h / (p.H / p.Hkv));
      const int bc = p.cu_q != nullptr ? 0 : u.b;  // the map's batch coordinate (varlen: one)
      if (loads_qk && leader) {
        const uint32_t qs = ring_q.stage(qn);
        ring_q.producer_acquire(qn);
        units[qs] = u;
        if (u.n_tiles > 0) {
          unsigned char* q_dst = sq + qs * Tr::kQTileBytes;
          const int row = u.q0 + u.i0;
          ring_q.producer_arrive_expect_tx(qn, Tr::kQTileBytes);
#pragma unroll
          for (int c = 0; c < Tr::kBoxes; ++c) {
            tma::load_4d(q_dst + c * Tr::kQBoxBytes, &map_q, c * Tr::kBoxCols, u.h, row, bc,
                         ring_q.full(qn));
          }
        } else {
          ring_q.producer_arrive(qn);  // rows that see no key: nothing to load
        }
      }
      ++qn;
      for (int t = 0; t < u.n_tiles; ++t, ++g) {
        const int row = u.k0 + u.lo + t * BN;
        // Key tile t of the unit into stage g of `ring` (K's or V's, which differ in their stage
        // counts): through the pages (kPaged; load_paged_tile acquires the stage) or as kBoxes
        // box copies of the contiguous K / V.
        auto load_tile = [&](unsigned char* base, const CUtensorMap* map, const auto& ring) {
          unsigned char* dst = base + ring.stage(g) * Tr::kTileBytes;
          if constexpr (kPaged) {
            load_paged_tile<Tr>(dst, map, p, u, t, hk, ring, g, plane);
          } else {
            ring.producer_acquire(g);
            ring.producer_arrive_expect_tx(g, Tr::kTileBytes);
#pragma unroll
            for (int c = 0; c < Tr::kBoxes; ++c) {
              tma::load_4d(dst + c * Tr::kBoxBytes, map, c * Tr::kBoxCols, hk, row, bc,
                           ring.full(g));
            }
          }
        };
        if (loads_qk) load_tile(sk, &map_k, ring_k);
        if (loads_v) load_tile(sv, &map_v, ring_v);
      }
    }
    if (loads_qk && leader) {  // the end of the walk, in the next Q stage
      const uint32_t qs = ring_q.stage(qn);
      ring_q.producer_acquire(qn);
      units[qs].n_tiles = -1;
      ring_q.producer_arrive(qn);
    }
    return;
  }

  // Consumer warpgroups.
  wgmma::setmaxnreg_inc<Tr::kConsumerRegs>();
  const int ctid = tid - 128, wg = ctid / 128, wtid = ctid & 127, lane = tid & 31,
            gr = lane / 4, t4 = lane % 4;
  const int warp_row0 = wg * 64 + ((ctid / 32) & 3) * 16;  // the warp's first row in the tile
  const uint32_t sq_addr = ::attnkit::mma::smem_addr(sq), sk_addr = ::attnkit::mma::smem_addr(sk),
                 sv_addr = ::attnkit::mma::smem_addr(sv);
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  // y = the score in "max units": raw (scaled by factor later) or the capped log2 value.
  const float factor = kSoftcap ? 1.f : scale * kLog2e;
  const float scale_over_cap = kSoftcap ? scale / cap : 0.f, cap_log2 = cap * kLog2e;

  const wsfwd::Turns turns{ping_pong, Tr::kTurnBar, wg, kWG};
  turns.start();

  // A unit whose products are all issued but whose last P·V may not be: where its output goes,
  // how many of its rows are inside the sequence, how many V rows of its last key tile are
  // visible keys (fewer than BN: zero_v_tail), and per thread row 1/l and the lse.
  struct Done {
    int64_t o_off, l_off;
    int rows_valid, v_rows;
    float inv[2], lse[2];
  };
  auto zero_v_tail = [&](uint32_t stage, int v_rows) {
    if (v_rows >= BN) return;
    unsigned char* v = sv + stage * Tr::kTileBytes;
    const int chunks = (BN - v_rows) * Tr::kBoxes * 8;  // 16-byte chunks
    for (int c = wtid; c < chunks; c += 128) {
      const int row = v_rows + c / (8 * Tr::kBoxes), blk = (c / 8) % Tr::kBoxes, chunk = c & 7;
      *reinterpret_cast<uint4*>(v + blk * Tr::kBoxBytes + row * 128 + chunk * 16) =
          make_uint4(0, 0, 0, 0);
    }
    bulk::fence_proxy_async();
    wgmma::named_barrier_sync(Tr::kZeroBar + wg, 128);
  };
  auto store_unit = [&](const Done& w, const float(&acc)[kDT][4]) {
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int row = warp_row0 + gr + 8 * rh;
      if (row >= w.rows_valid) continue;
      T* orow = o + w.o_off + int64_t(row) * p.o.row;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t4) = ::attnkit::mma::pack2<T>(
            acc[dt][rh * 2] * w.inv[rh], acc[dt][rh * 2 + 1] * w.inv[rh]);
      }
      if (t4 == 0) lse[w.l_off + int64_t(row) * p.lse.row] = w.lse[rh];
    }
  };
  // Rows that see no key (a unit with n_tiles == 0): output 0, lse -inf (DESIGN §3.3).
  auto store_empty = [&](int64_t o_off, int64_t l_off, int rows_valid) {
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int row = warp_row0 + gr + 8 * rh;
      if (row >= rows_valid) continue;
      T* orow = o + o_off + int64_t(row) * p.o.row;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t4) = 0u;
      if (t4 == 0) lse[l_off + int64_t(row) * p.lse.row] = -INFINITY;
    }
  };

  float acc[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
  uint32_t pa[BN / 16][4];  // P_{g-1}, the A operand of the delayed P·V
  Done prev{};              // the unit whose last P·V is still to be issued (when g > 0)
  uint32_t g = 0, qn = 0;   // key tiles / units consumed so far
  while (true) {
    const uint32_t qs = ring_q.stage(qn);
    ring_q.consumer_wait(qn);
    const WsUnit u = units[qs];
    if (u.n_tiles < 0) break;
    const int64_t o_off = u.b * p.o.batch + int64_t(u.q0 + u.i0) * p.o.row + u.h * p.o.head;
    const int64_t l_off = u.b * p.lse.batch + u.h * p.lse.head + int64_t(u.q0 + u.i0) * p.lse.row;
    const int rows_valid = u.lq - u.i0 < BM ? u.lq - u.i0 : BM;
    if (u.n_tiles == 0) {
      store_empty(o_off, l_off, rows_valid);
      ring_q.consumer_release_warp(qn, lane);  // after every lane has read units[qs]
      ++qn;
      continue;
    }
    const uint32_t sq_u = sq_addr + qs * Tr::kQTileBytes;
    // Each row's visible keys relative to lo, as int32 (clipped to [lo, hi]; rows past the
    // sequence's end are never stored), and the tiles that need no element mask.
    int kr_lo[2], kr_hi[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const KeyRange kr = key_range(p, u.i0 + warp_row0 + gr + 8 * rh, u.lq, u.lk);
      kr_lo[rh] = kr.lo > u.hi ? u.n_tiles * BN : int(kr.lo < u.lo ? 0 : kr.lo - u.lo);
      kr_hi[rh] = kr.hi < u.lo ? -1 : int((kr.hi > u.hi ? int64_t(u.hi) : kr.hi) - u.lo);
    }
    // Key tile j (relative start j0) needs no element mask iff full_lo <= j0, j0 + BN - 1 <= full_hi.
    int full_lo, full_hi;
    {
      const int64_t lo_last = key_range(p, u.i0 + rows_valid - 1, u.lq, u.lk).lo;
      const int64_t hi_first = key_range(p, u.i0, u.lq, u.lk).hi;
      full_lo = lo_last > u.hi ? u.n_tiles * BN : int(lo_last - u.lo);
      full_hi = hi_first < u.lo ? -1 : int(hi_first - u.lo);
    }
    // V rows of the unit's last key tile that are visible keys (the rest: zero_v_tail).
    const int v_rows = u.hi - (u.lo + (u.n_tiles - 1) * BN) + 1;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    for (int j = 0; j < u.n_tiles; ++j, ++g) {
      const int j0 = j * BN;
      const uint32_t stage = ring_k.stage(g), pstage = ring_v.stage(g - 1);  // K_g's, V_{g-1}'s
      ring_k.consumer_wait(g);
      if (g > 0) {
        ring_v.consumer_wait(g - 1);
        if (j == 0) zero_v_tail(pstage, prev.v_rows);
      }

      float sc[kNT][4];
      turns.take();
      wgmma::fence();
      wsfwd::issue_qk<MmaS, kD, BM, BN>(sc, sq_u, wg, sk_addr + stage * Tr::kTileBytes);
      wgmma::commit();
      wsfwd::issue_owed_pv(g > 0, turns, [&] {  // P_{g-1}·V_{g-1}
        const uint32_t sv_prev = sv_addr + pstage * Tr::kTileBytes;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          MmaO::template rs<1>(acc, pa[kk], wgmma::desc_n_major<BN>(sv_prev, kk), 1);
        }
        wgmma::commit();
      });
      wgmma::fence_regs(sc);
      if (lane == 0) ring_k.consumer_release(g);  // K_g has been read
      // So has Q, by every S of the unit. The warp's release: every lane read units[qs], which the
      // Q loader rewrites after it (an arrival releases only its own thread's reads).
      if (j == u.n_tiles - 1) ring_q.consumer_release_warp(qn, lane);

      float corr[2];
      const SoftmaxArgs sa{factor, scale_over_cap, cap_log2, j0, {kr_lo[0], kr_lo[1]},
                           {kr_hi[0], kr_hi[1]}};
      online_softmax<kSoftcap>(sc, m, l, corr, sa, !(j0 >= full_lo && j0 + BN - 1 <= full_hi));
      if (g > 0) {
        wgmma::wait<0>();  // P_{g-1}·V_{g-1} done: O may be rescaled / stored, pa overwritten
        wgmma::fence_regs(acc);
        if (lane == 0) ring_v.consumer_release(g - 1);
        if (j == 0) {  // that was the previous unit's last product: its output is complete
          store_unit(prev, acc);
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
        } else {  // O of this unit: rescale by the running-max correction
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            acc[dt][0] *= corr[0], acc[dt][1] *= corr[0];
            acc[dt][2] *= corr[1], acc[dt][3] *= corr[1];
          }
        }
      }  // g == 0: O is still 0, nothing to rescale
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {  // P rounded to the value type (DESIGN §3.1)
        pa[kk][0] = ::attnkit::mma::pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
        pa[kk][1] = ::attnkit::mma::pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
        pa[kk][2] = ::attnkit::mma::pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
        pa[kk][3] = ::attnkit::mma::pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
      }
    }
    // The unit's statistics are final (its last P·V changes O only): quad-reduce l, keep 1/l and
    // the lse for the store after that product. A row that sees no key: output 0, lse -inf.
    prev.o_off = o_off;
    prev.l_off = l_off;
    prev.rows_valid = rows_valid;
    prev.v_rows = v_rows;
    finish_rows(m, l, prev.inv, prev.lse);
    ++qn;
  }
  wsfwd::drain_last_pv(
      ring_v, g, turns, acc, [&](uint32_t pstage) { zero_v_tail(pstage, prev.v_rows); },
      [&](uint32_t pstage) {
        const uint32_t sv_l = sv_addr + pstage * Tr::kTileBytes;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          MmaO::template rs<1>(acc, pa[kk], wgmma::desc_n_major<BN>(sv_l, kk), 1);
        }
        wgmma::commit();
      },
      [&] { store_unit(prev, acc); });
  turns.finish();
#endif  // ATTNKIT_HAS_WGMMA
}

// Whether the launch runs 3 consumer warpgroups: launch option three_wg at head dim 64, except
// with paged K / V (that instance is built with 2 only).
inline bool fwd_ws_three_wg(const Params& p, const FwdLaunchOptions& opt) {
  return opt.three_wg && p.D == 64 && p.block_table == nullptr;
}

// The query tile of the launch (the q map's box rows): the traits' kBM of the instantiation
// launch_fwd_ws picks.
inline int fwd_ws_block_rows(int D, bool three_wg) {
  return D == 64 && three_wg ? FwdWsTraits<64, 3>::kBM : FwdWsTraits<128, 2>::kBM;
}

// The launcher: grid_rows sizes the query tiles per item (the batched length or the varlen
// hint); the kernel's items stride over the rest. With three_wg the q map's boxes must have
// fwd_ws_block_rows rows. Returns the launch's error (no sync).
template <typename T>
cudaError_t launch_fwd_ws(const Params& p, const FwdWsMaps& maps, T* o, float* lse,
                          int64_t grid_rows, const FwdLaunchOptions& opt, cudaStream_t stream) {
  const bool three_wg = fwd_ws_three_wg(p, opt);
  const int bm = fwd_ws_block_rows(static_cast<int>(p.D), three_wg);
  int64_t q_tiles = (grid_rows + bm - 1) / bm;
  q_tiles = std::max<int64_t>(1, std::min<int64_t>(q_tiles, int64_t(1) << 30));
  const int64_t items = fwd_ws_items_per_head(q_tiles, opt.paired) * p.H * p.B;
  int64_t grid = std::min<int64_t>(items, (int64_t(1) << 31) - 1);
  cudaError_t err;
  if (opt.persistent) {  // one CTA per SM (the shared memory allows no second one)
    int dev = 0, sms = 0;
    if ((err = cudaGetDevice(&dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
      return err;
    grid = std::min<int64_t>(grid, sms > 0 ? sms : 1);
  }
  if (opt.max_ctas > 0) grid = std::min<int64_t>(grid, opt.max_ctas);
  auto run = [&](auto traits, auto plain, auto capped) {
    using Tr = decltype(traits);
    const auto kernel = p.softcap > 0.0 ? capped : plain;  // (kernels of one signature)
    cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
    if (e != cudaSuccess) return e;
    kernel<<<static_cast<unsigned>(grid), Tr::kThreads, Tr::kSmemBytes, stream>>>(
        p, o, lse, q_tiles, opt.ping_pong, opt.paired, maps.q, maps.k, maps.v);
    return cudaGetLastError();
  };
  if (p.block_table != nullptr) {  // paged K / V (load_paged_tile)
    if (p.D == 64) {
      return run(FwdWsTraits<64, 2>{}, fwd_ws_kernel<T, 64, 2, false, true>,
                 fwd_ws_kernel<T, 64, 2, true, true>);
    }
    return run(FwdWsTraits<128, 2>{}, fwd_ws_kernel<T, 128, 2, false, true>,
               fwd_ws_kernel<T, 128, 2, true, true>);
  }
  if (three_wg) {
    return run(FwdWsTraits<64, 3>{}, fwd_ws_kernel<T, 64, 3, false>, fwd_ws_kernel<T, 64, 3, true>);
  }
  if (p.D == 64) {
    return run(FwdWsTraits<64, 2>{}, fwd_ws_kernel<T, 64, 2, false>, fwd_ws_kernel<T, 64, 2, true>);
  }
  return run(FwdWsTraits<128, 2>{}, fwd_ws_kernel<T, 128, 2, false>,
             fwd_ws_kernel<T, 128, 2, true>);
}

}  // namespace ws
}  // namespace flash
}  // namespace attnkit

#endif  // ATTNKIT_HAS_FWD_WS
