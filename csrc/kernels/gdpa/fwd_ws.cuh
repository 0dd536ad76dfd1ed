// GDPA forward on Hopper, warp-specialised (sm_90a, bf16 / fp16, padded head dim 128): kernel
// sm90_ws of kernels/gdpa/choose.h, the forward's one sm90 kernel and auto's choice for head dims
// up to 128 (inputs its tensor maps cannot address are copied once by the launcher,
// csrc/cuda/gdpa.cu ws_map_or_copy). Same math as fwd_mma.cuh (sm80).
//
// CTA = (sequence, 128-row query tile, head) units, 384 threads = 3 warpgroups:
//   warpgroup 0, producer: gives its registers back (setmaxnreg.dec to 24); one thread issues the
//     Q and K loads and another the V loads (one thread all of them without kSplitLoads; in the
//     kResident instance a third thread loads Q), as
//     tensor-map copies (kernels/common/tma.cuh): Q once per unit into a 2-stage ring (3 in the
//     kResident instance), then K_j
//     and V_j per key tile into rings of their own (2 stages for K, 3 for V when split). Each
//     128 x 128 tile is two boxes of [128 rows][1 head][64 cols] that land in the two 64-column
//     blocks of the sw128 layout (the 128-byte hardware swizzle), so no consumer thread computes a
//     load address.
//     Warp 2 (kFixupWarp) mends each V tile between its copy and the consumers (below).
//   warpgroups 1-2, consumers: take the registers (setmaxnreg.inc to 240), 64 query rows each,
//     and per key tile g issue S_g = Q·K_gᵀ (ss) and then O += P_{g-1}·V_{g-1} (rs), wait for
//     S_g only, compute P_g = φ(pre·S_g) while the tensor cores run P_{g-1}·V_{g-1}, and pack
//     P_g. g counts the CTA's key tiles across units: a unit's last P·V is issued with the next
//     unit's first S, and the finished output is stored after it, so short units do not drain
//     the tensor cores between them.
//     kPingPong = false: the two consumer warpgroups are never synchronised with each other; they
//     drift apart and their activations overlap the other's products on their own.
//     kPingPong = true (the default; launch option ping_pong): FA3's scheme, two named barriers
//     (kTurnBar + warpgroup) pass a turn: a warpgroup issues its products for a key tile only
//     after the other one has issued its own (bar.sync on its barrier, then bar.arrive on the
//     other's), so the tensor cores alternate between the warpgroups while the one that just
//     issued computes its activation. Warpgroup 1 starts by arriving on warpgroup 0's barrier;
//     both take one turn per key tile and one for the very last P·V, so the counts always
//     match; warpgroup 0 takes one more turn at the end to consume the last hand-over.
//
// Barriers: three rings (kernels/common/tma_ring.cuh, which owns the phase arithmetic; fill n of
// ring_q is unit qn, of ring_k / ring_v key tile g). A stage's full barrier completes when the
// producer's expect_tx bytes landed (K and V apart, so S_g can start before V_g lands), its empty
// barrier when all 8 consumer warps released the tile (lane 0 of each warp arrives after its
// wgmma reads are done: K after S_g, V after the delayed P·V; Q after the unit's last S, once
// every lane's read of units[] is behind a __syncwarp; in the in-order walk a unit stored
// through its Q stage releases it after the store's read, one thread a warpgroup: store_unit).
// V has a third barrier per stage, ready: the fix-up warp's hand-over, which the consumers wait
// for instead of V's full barrier.
//
// Jagged sequences: a box starts at the sequence's first row of the tile, so rows past the end
// belong to the next sequence (or are zero-filled past T by the copy engine). Query rows past the
// end are computed and never stored (store_rows clamps). Keys past the end may be inf / NaN: on
// the last key tile P is zeroed for those columns after the activation, and the V rows are
// zeroed in shared memory before the last P·V, since 0 · NaN would still be NaN (by the V fix-up
// warp, off the consumers' path: every V tile goes full -> fix-up warp -> ready -> consumers; the
// protocol is the comment above the producer's code). Padded head dims (D < 128) are the map's
// extent: columns past D land as zeros. Causal: a unit visits the key tiles up to its last row's
// diagonal; with a window its key tiles start at the first key its rows see (a box can start at
// any row). Only the tiles the diagonal or the window cut are masked element by element
// (tile_fully_visible).
//
// Work items are cta_item's (params.h), in its order (query tiles fastest, then heads, then
// sequences; an item strides over the tiles of a sequence longer than the hint), so the CTAs that
// read one sequence's K/V run together. The grid is persistent by default (one CTA per SM, each
// striding over the items with step gridDim.x; the launch option persistent = false launches one
// CTA per item instead: kernels/gdpa/launch_options.h).
//
// Jagged batches (issue #19; the host calls a batch dense when T == B · max for q and k, and dense
// batches keep everything above unchanged): the kJagged instance takes its items from a list built
// on the device by gdpa_ws_schedule_kernel<false> (non-empty items only, longest first, taken in
// list order from a counter by the persistent CTAs (WsCursor); an item there is several query tiles
// of one (sequence, head), run back to back by one CTA), runs key tiles holding <= 64 keys narrow
// (64-row boxes, P·V with K = 64; S stays one N = 128 product, whose stale columns 64..127 no
// activation or product reads), and lets
// warpgroup 1 issue no product for a unit whose <= 64 query rows all lie in warpgroup 0's half
// (docs/performance.md has the tile-waste count). Each choice depends on the sequence's own lengths
// only and changes no element's operations, so a sequence's output is bitwise the same in any
// batch.
#pragma once

#include <algorithm>
#include <type_traits>

#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/common/tma_ring.cuh"
#include "kernels/common/wgmma.cuh"
#include "kernels/common/ws_fwd.cuh"
#include "kernels/gdpa/activation_gpu.cuh"
#include "kernels/gdpa/choose.h"
#include "kernels/gdpa/params.h"
#include "kernels/gdpa/tile.cuh"
#include "kernels/gdpa/ws_schedule.cuh"

#define ATTNKIT_HAS_FWD_WS ATTNKIT_HAS_TENSOR_MAPS  // the kernel and its launcher are declared

#if ATTNKIT_HAS_FWD_WS

namespace attnkit {
namespace gdpa {

struct FwdWsTraits {
  static constexpr int kD = 128;
  static constexpr int kConsumerWarpGroups = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpGroups);
  static constexpr int kConsumerWarps = 4 * kConsumerWarpGroups;
  static constexpr int kBlockM = 64 * kConsumerWarpGroups;
  static constexpr int kBlockN = 128;
  // Two Q stages (three in kResident: stages_q), so the next unit's Q lands while the current
  // unit runs; two K stages and two or three V stages, released apart: K_g as soon as S_g is
  // done, V_g after the delayed P_g·V_g.
  // With one loading thread, K_{g+1} queues behind V_g, which waits for P_{g-2}·V_{g-2}: both
  // land about 1.5 key tiles after their stage frees. kSplitLoads (the default) gives V its own
  // thread and a third stage: K then has ~2 tiles of lead and V ~2.5, which the L = 256 shapes
  // (HBM-heavy: ~2 TB/s at 260 TFLOP/s) need to hide the load latency.
  static constexpr int kStages = 2;  // K
  // kResident (below) keeps a third Q stage, loaded by a thread of its own (kQThread): with the
  // output map a unit's Q stage is released only after its output was stored through it (in the
  // next unit's second key tile, or before the unit after that starts: store_unit), and its units
  // are one or two key tiles, so the third stage keeps Q ahead (alone it measured level: the
  // forty-second session). The other in-order instances keep two and store through the Q stage
  // only units of >= kMapMinTiles key tiles (map_unit): the next Q then waits on the store only
  // where the unit after such a unit has one key tile (causal or windowed rows).
  static constexpr int stages_q(bool resident = false) { return resident ? 3 : 2; }
  // kResident (below) keeps two V stages: a sequence's <= 2 key tiles then land in the same K and
  // V stages unit after unit.
  static constexpr int stages_v(bool split_loads, bool resident = false) {
    return split_loads && !resident ? 3 : 2;
  }
  // kResident: the key hint up to which every unit's key tiles fit the K ring (kStages tiles).
  static constexpr int kResidentMaxKeys = kStages * kBlockN;
  static constexpr int kBoxRows = 128;
  static constexpr int kBoxCols = 64;                        // 128 bytes: one sw128 column block
  static constexpr int kBoxBytes = kBoxRows * kBoxCols * 2;  // what one copy counts off its barrier
  static constexpr int kTileBytes = 2 * kBoxBytes;           // a 128 x 128 Q, K or V tile
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;  // 128·24 + 256·240 <= 64K registers
  // Named barriers (0 is __syncthreads): one turn per consumer warpgroup (ping-pong).
  static constexpr int kTurnBar = 1;
  // The in-order walk's output map: each warpgroup's barrier before its store (ids 3, 4).
  static constexpr int kStoreBar = kTurnBar + kConsumerWarpGroups;
  // With two Q stages, the fewest key tiles of a unit stored through its Q stage (map_unit).
  static constexpr int kMapMinTiles = 3;
  // The producer warp that zeroes the V rows past a sequence's end (warps 0 and 1 load; 2 and 3
  // were idle).
  static constexpr int kFixupWarp = 2;
  // + 1 KB so the tiles can start 1024-byte aligned whatever the dynamic base is (<= 227 KB).
  static constexpr int smem_bytes(bool split_loads, bool resident = false) {
    return 1024 + kTileBytes * (stages_q(resident) + kStages + stages_v(split_loads, resident));
  }
  static_assert(kBlockM == kBoxRows && kBlockN == kBoxRows && kD == 2 * kBoxCols, "one box shape");
  // Jagged batches (kJagged): a key tile that holds at most kNarrowN keys of its sequence is
  // loaded as two [64 rows][64 cols] boxes (half the bytes) into rows 0..63 of its stage; its
  // P·V runs with K = 64 (half a full tile's), its S as a full N = 128 product whose columns
  // 64..127 are left as they are, never read (two N = 64 products read Q from shared memory
  // twice: the ss product at N = 64 runs at the shared-memory limit).
  static constexpr int kNarrowN = 64;
  static constexpr int kNarrowBoxRows = 64;
  static constexpr int kNarrowTileBytes = 2 * kNarrowBoxRows * kBoxCols * 2;
};

static_assert(FwdWsTraits::kResidentMaxKeys == kFwdResidentMaxKeys,
              "choose.h's resident key bound is what the K ring holds");

// The tensor maps of q, k, v viewed as [T rows][heads][D] (innermost first {D, heads, T}), boxes
// {64, 1, 128} with the 128-byte swizzle; built by the launcher's caller (csrc/cuda/tma_map.h).
struct FwdWsMaps {
  CUtensorMap q, k, v;
  CUtensorMap k64, v64;  // the same k and v in boxes of 64 rows (narrow key tiles)
  CUtensorMap q64;       // q in boxes of 64 rows (narrow query tiles, narrow_q_tile)
  // The output in boxes of 64 rows (the in-order walk's stores through the Q stage);
  // o64_ok false: it could not be made without a copy, and the register store serves every unit.
  CUtensorMap o64;
  bool o64_ok = false;
};

// One unit of a CTA's work: a 128-row query tile of one (sequence, head) that sees >= 1 key tile:
// key tiles start at local key kv_lo (the first key any row of the tile sees: 0 unless a window
// cuts the front) and n_tiles of them cover the keys the tile sees (params.h key_span).
struct WsUnit {
  int h, i0, kv_lo, n_tiles;
  SeqRange qs, ks;
};

// The jagged schedule (issue #19): a list of the non-empty work items (query tiles of one
// (sequence, head), longest first) built on the device by gdpa_ws_schedule_kernel<false>
// (ws_schedule.cuh, shared with the backward) before the forward.
static_assert(FwdWsTraits::kBlockM == WsSchedTraits::kTileRows &&
                  FwdWsTraits::kNarrowN == WsSchedTraits::kStepRows,
              "the list's tiles are the forward's query tiles, its cost steps the narrow key tiles");

// Walks a CTA's units. In order (kList = false): items blockIdx.x, + gridDim.x, ... (cta_item_at
// order), or with kRuns a run of consecutive items: CTA c takes [c·per, (c + 1)·per) (the caller
// passes the run's first item and bounds `items` at its end), so its consecutive units are the
// query tiles, then the heads, of one sequence (kResident below). From the jagged list (kList =
// true): CTA c's first entry is c, the others come from a counter (start), in list order across the
// CTAs. In each item, its query tiles: strided by the item's `tiles` (cta_item: q_tiles, for a
// sequence longer than the hint; the list: the entry's stride n). In order, the loading threads run
// the walk (each its own copy, in the same order); from the list, the Q loader alone (the counter
// hands each entry out once) and the other walkers read its units from shared memory. The consumers
// get the units through shared memory, in the same order.
template <bool kList, bool kRuns = false>
struct WsCursor {
  static_assert(!(kList && kRuns), "runs are an order of the in-order walk");
  // The list holds at most 2^22 items (csrc/cuda/gdpa.cu), so its walk counts in int: the
  // producer runs on 24 registers.
  using Index = std::conditional_t<kList, int, int64_t>;
  Index item;
  Index ahead = 0;  // kList: the entry this CTA takes after `item`, taken one item early
  int tile = 0;
  bool in_item = false;
  CtaItem it{};
  SeqRange qs{}, ks{};

#if defined(__CUDACC__)
  ATTNKIT_DEVICE ATTNKIT_INLINE WsCursor() : item(kList ? 0 : Index(blockIdx.x)) {}
  ATTNKIT_DEVICE ATTNKIT_INLINE explicit WsCursor(Index first) : item(first) {}  // kRuns
  // kList: the dynamic walk. CTA c takes entry c first (the first G = gridDim.x entries, one
  // each, as a static round would: with the list longest first, no CTA starts with two of the
  // longest), then entries G + n in the order of one counter n (the schedule kernel zeroes it
  // before this launch), each CTA the next entry whenever it is done with one, so the entries
  // running at any moment are a window of the list, as in the in-order grid: a (sequence,
  // head)'s tiles, adjacent in the list, run side by side on neighbouring CTAs and share their
  // K / V in L2, and the longest-first list balances the CTAs greedily. The next entry's atomic
  // is issued one item early, so its latency is not on the walk's path. `taken`: the list's
  // counter (the ws_sched header's kTakenWord), passed to each call rather than held (the
  // producer runs on 24 registers). Never more than items + 2·G: no overflow below the list's
  // capacity bound.
  ATTNKIT_DEVICE ATTNKIT_INLINE void start(int32_t* taken) {
    item = Index(blockIdx.x);
    ahead = Index(gridDim.x) + atomicAdd(taken, 1);
  }

  ATTNKIT_DEVICE ATTNKIT_INLINE bool next(const FwdParams& p, int q_tiles, Index items,
                                          const int4* list, WsUnit& u, int32_t* taken = nullptr) {
    constexpr int BM = FwdWsTraits::kBlockM, BN = FwdWsTraits::kBlockN;
    while (item < items) {
      if (!in_item) {
        if constexpr (kList) {
          const int4 r = list[2 * item], e = list[2 * item + 1];
          it = {e.y, e.x, e.z, e.w};  // e.w: the item's stride, >= 1
          qs = {r.x, r.y};
          ks = {r.z, r.w};
        } else {
          it = cta_item_at(item, q_tiles, p.H);
          qs = seq_range(p.q_offsets, it.b, p.Tq);
          ks = seq_range(p.kv_offsets, it.b, p.Tk);
        }
        tile = it.tile;
        in_item = true;
      } else {
        tile += it.tiles;
      }
      if (tile * BM >= qs.len) {
        in_item = false;
        if constexpr (kList) {
          item = ahead;
          ahead = Index(gridDim.x) + atomicAdd(taken, 1);  // taken: the kernel's, never null
        } else {
          item += kRuns ? 1 : gridDim.x;
        }
        continue;
      }
      const int i0 = tile * BM;
      const Span kv = key_span(p.causal, p.window, i0, min(i0 + BM, qs.len) - 1, ks.len);
      const int kv_lo = static_cast<int>(kv.lo);
      const int kv_len = kv.hi > kv.lo ? static_cast<int>(kv.hi - kv.lo) : 0;
      const int n_tiles = (kv_len + BN - 1) / BN;
      if (n_tiles == 0) continue;  // no keys: the launcher zero-filled these output rows
      u = {it.z, i0, kv_lo, n_tiles, qs, ks};
      return true;
    }
    return false;
  }
#endif
};

// Whether key tile j0 (its first key, local) of a unit of sequence keys ks is narrow: it holds at
// most kNarrowN of the sequence's keys. Only the jagged instance uses narrow tiles; the producer
// and the consumers decide alike from the unit.
template <bool kJagged>
ATTNKIT_DEVICE ATTNKIT_INLINE bool narrow_tile(const WsUnit& u, int j0) {
  return kJagged && u.ks.len - j0 <= FwdWsTraits::kNarrowN;
}

// Whether a unit's query tile is narrow: it holds at most 64 of the sequence's rows, so consumer
// warpgroup 1 (rows 64..127) idles on it, and the producer loads rows 0..63 only (two 64-row
// boxes, as a narrow key tile): the other half holds the next sequence's rows, read from memory
// for nothing (lengths uniform up to 512 / 256 over-read a quarter / a half of q's bytes in
// 128-row boxes, half that in 64-row ones). Rows 64..127 of the stage keep an older fill's
// bytes, which no product reads.
template <bool kJagged>
ATTNKIT_DEVICE ATTNKIT_INLINE bool narrow_q_tile(const WsUnit& u) {
  return kJagged && u.qs.len - u.i0 <= 64;
}

// A K or V stage's last fill, which the loader that fills it records (kResident): the tile's first
// key row in k / v and its kv head.
struct HeldTile {
  int row, hk;
};

// kResident: whether the stage already holds the tile (row, hk), so that its fill can skip the
// copies; if not, the caller copies it there and this records it. Each ring's loading thread
// keeps its own `held` (one entry per stage, in shared memory), so nobody else reads it.
ATTNKIT_DEVICE ATTNKIT_INLINE bool holds_tile(HeldTile* held, uint32_t stage, int row, int hk) {
  const HeldTile h = held[stage];
  if (h.row == row && h.hk == hk) return true;
  held[stage] = {row, hk};
  return false;
}

// kJagged: the units come from the device-built list `sched` (gdpa_ws_schedule_kernel, at
// most `capacity` entries) and key tiles with <= 64 keys are narrow (narrow_tile); otherwise
// (dense batches, the A/B variants) the in-order walk and full tiles only, and sched / the
// 64-row maps are unused.
//
// kResident (in-order walk; choose.h fwd_ws_resident_kv: key hints up to kResidentMaxKeys): each
// CTA walks a run of consecutive items (WsCursor kRuns) instead of striding, so its consecutive
// units are query tiles (then heads of one kv group) of one sequence, and a sequence's <= 2 key
// tiles stay in the K and V stages (two each) from unit to unit: a loader whose stage already
// holds the tile it is to fill (holds_tile) arrives on the full barrier without copying. The
// consumers and the fix-up warp see the same fills, barriers and bytes either way (a reused V
// tile's tail is zeroed again, to the zeros it holds: with valid offsets a tile's first row
// belongs to one sequence, so one (row, hk) always means the same bytes and the same tail). A
// short-KV unit (Q 2048 / KV 256: two key tiles) read 128 KB of K / V from L2 per 32 KB Q tile,
// about 4 TB/s at the rate it ran (docs/performance.md); now the K / V of a run's sequence are
// read once. Longer keys would go back to L2 for every unit, and runs keep fewer sequences' K / V
// in flight at a time than the strided walk (which shares them in L2 across CTAs): off there.
template <typename T, bool kPingPong, bool kSplitLoads, bool kJagged, bool kResident = false>
__global__ void __launch_bounds__(FwdWsTraits::kThreads, 1)
    gdpa_fwd_ws_kernel(const FwdParams p, const int q_tiles, int32_t* __restrict__ sched,
                       const int64_t capacity,
                       const __grid_constant__ CUtensorMap map_q,
                       const __grid_constant__ CUtensorMap map_k,
                       const __grid_constant__ CUtensorMap map_v,
                       const __grid_constant__ CUtensorMap map_k64,
                       const __grid_constant__ CUtensorMap map_v64,
                       const __grid_constant__ CUtensorMap map_q64,
                       const __grid_constant__ CUtensorMap map_o64, const bool store_map) {
#if ATTNKIT_HAS_WGMMA
  using Tr = FwdWsTraits;
  using Mma = wgmma::Wgmma<T, Tr::kBlockN>;  // S = Q·Kᵀ: N = key tile
  using MmaO = wgmma::Wgmma<T, Tr::kD>;      // O += P·V: N = head dim
  static_assert(!(kResident && kJagged), "resident key tiles are the in-order walk's");
  constexpr int D = Tr::kD, BM = Tr::kBlockM, BN = Tr::kBlockN, S = Tr::kStages,
                SV = Tr::stages_v(kSplitLoads, kResident), QS = Tr::stages_q(kResident);
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* sq = smem;                     // [QS] Q tiles
  unsigned char* sk = sq + QS * Tr::kTileBytes;  // [kStages] K tiles
  unsigned char* sv = sk + S * Tr::kTileBytes;   // [SV] V tiles

  __shared__ uint64_t bars[QkvRings<QS, S, SV, true>::kBars];
  // The unit each Q stage holds, written by the Q loader before the stage's expect_tx arrive
  // (release) and read by the consumers after their wait (acquire): the consumers never load the
  // offsets themselves, so no dependent global load sits between two units on their path. In the
  // jagged instance the V loader and the fix-up warp read it too (next_unit below).
  // n_tiles == 0 (with a plain arrive) means there are no more units.
  __shared__ WsUnit units[QS];
  // kResident: what each K / V stage holds (holds_tile), the K and V loaders' own.
  __shared__ HeldTile k_held[kResident ? S : 1], v_held[kResident ? SV : 1];
  const QkvRings<QS, S, SV, true> rings(bars);  // kernels/common/tma_ring.cuh
  const auto& ring_q = rings.q;  // fill qn: unit qn
  const auto& ring_k = rings.k;  // fill g: key tile g (K, and V below)
  const auto& ring_v = rings.v;

  const int tid = threadIdx.x;
  // The jagged instance's V loader and fix-up warp read units[] and release ring_q's fills too
  // (below: next_unit); that instance always splits its loaders (launch_gdpa_fwd_ws).
  static_assert(!kJagged || kSplitLoads, "the jagged walk hands units to a separate V loader");
  if (tid == 0) rings.init(Tr::kConsumerWarps, kJagged ? 2 : 0);
  __syncthreads();  // the last CTA-wide barrier: the roles below never meet all together again

  const int group = p.H / p.Hkv;

  // Producer warpgroup: lane 0 of warp 0 loads Q and K, V too unless split (then lane 0 of warp
  // 1); warp kFixupWarp mends V; warp 3 exits (in kResident its lane 0 loads Q).
  //
  // The V fix-up warp. Before a unit's last P·V, the rows of its last key tile past the sequence's
  // keys (v_rows on: the next sequence's values, maybe inf / NaN; zeros past T) must be zero, since
  // P's zero columns would still give 0 · NaN = NaN. The consumers once zeroed them themselves,
  // both warpgroups, on their path once per unit (a unit is 1-4 key tiles at max length 512, and
  // on a jagged batch nearly every unit's last tile is partial); this warp does it while the tile
  // waits in the ring (V lands ~2.5 key tiles ahead of its P·V with split loads). Whole 128-byte
  // rows of both column blocks, so the swizzle does not matter; a narrow tile's P·V reads rows
  // 0..63 only (rows_end = kNarrowN).
  //
  // Protocol (ring_v is TmaRing<SV, true>, kernels/common/tma_ring.cuh): for every V fill g of the
  // CTA, in order, the warp waits for full(g) (the V loader's expect_tx arrival and its copies'
  // bytes), writes the zeros if g is a unit's last tile and partial, fences (fence.proxy.async:
  // the consumers' wgmma and the next copy into the stage access it through the async proxy) and
  // arrives on ready(g) (lane 0, after __syncwarp). The consumers wait for ready(g) where they
  // waited for full(g), and release empty(g) as before, after their P·V. Every fill hops, those
  // with nothing to mend too: ready's phases then count fills as full's do, and the ring's parity
  // arithmetic holds for both (were only a unit's last tile to wait on ready, a consumer could
  // take a phase left from an earlier fill of the stage that the warp had not handed over yet for
  // the one it waits on, and read the tail unzeroed).
  // - No deadlock: the warp's only wait, full(g), needs the V loader alone (its arrival for fill
  //   g, after its acquire of empty(g - SV), which the consumers release after ready(g - SV),
  //   which the warp gave before it waits for full(g)). It arrives on ready(g) exactly once for
  //   each fill the loader makes, in the same order: its lanes run the walk in the loaders' loop
  //   (each thread its own WsCursor over the same items: the same units, key tiles and narrow
  //   choices; units with no keys skipped alike), and the consumers count the same fills from
  //   units[] (so the walk must read only what stays fixed during the kernel: the parameters,
  //   the offsets and the schedule kernel's list, which runs before this launch in stream order;
  //   were this launch ever made a programmatic dependent one, the Q loader would have to wait on
  //   the grid dependency before reading the list). In the jagged instance the Q loader alone
  //   walks the list; the V loader and this warp take each unit from units[] after its Q fill
  //   completes and release that fill themselves (ring_q counts their arrivals beside the
  //   consumer warps'), and stop at the end's unit as the consumers do. In the in-order walk no
  //   end-of-walk sentinel is needed for it: after the walk the warp exits, and the consumers
  //   wait for no fill past the walk's last (a CTA with no unit: none at all). With a single
  //   loader (kSplitLoads off: thread 0 loads V after K), or without ping-pong, the loaders' and
  //   the consumers' waits are the same as with them, but for the hop.
  // - Parity: fill g + SV cannot land before the consumers released fill g, which they do after
  //   ready(g), after the warp's wait for full(g): the warp waits on full at most one phase
  //   behind; the consumers on ready likewise (ready(g + SV) needs full(g + SV)).
  // - No race: the warp writes stage(g) only between full(g) (the copies are done) and its own
  //   arrival on ready(g); the consumers read the stage only after ready(g), and the loader
  //   refills it only after their release of fill g. The same rows are zeroed as before (rows
  //   [v_rows, BN) of a unit's last tile, [v_rows, kNarrowN) when narrow), so the products and
  //   the output are the same bit for bit.
  if (tid < 128) {
    wgmma::setmaxnreg_dec<Tr::kProducerRegs>();
    WsUnit u;
    // kQThread (the resident instance): Q from lane 0 of warp 3 (otherwise idle), so that its
    // third stage is filled as soon as it frees instead of after the unit's K acquires.
    constexpr bool kQThread = kResident;
    const bool loads_k = tid == 0, loads_q = kQThread ? tid == 96 : tid == 0;
    const bool loads_v = kSplitLoads ? tid == 32 : tid == 0;
    // The fix-up warp runs in the loaders' loop (the same walk in order; in the jagged instance
    // the units the Q loader hands over): a loop of its own made ptxas spill the loaders' walk
    // at 24 registers (60 -> 374 bytes of spill stores in the single-loader instances); its
    // block first in the tile loop spills least.
    const bool fixes_v = tid / 32 == Tr::kFixupWarp;
    if (!loads_q && !loads_k && !loads_v && !fixes_v) return;
    if (loads_q) tma::prefetch_map(&map_q);
    if (loads_k) tma::prefetch_map(&map_k);
    if (loads_v) tma::prefetch_map(&map_v);
    if constexpr (kJagged) {  // (one thread loads Q and K there)
      if (loads_k) tma::prefetch_map(&map_k64);
      if (loads_v) tma::prefetch_map(&map_v64);
      if (loads_q) tma::prefetch_map(&map_q64);
    }
    using Cursor = WsCursor<kJagged, kResident>;
    typename Cursor::Index items;
    const int4* list = nullptr;
    Cursor cursor;
    if constexpr (kJagged) {
      items = ws_list_items(sched, capacity);
      list = reinterpret_cast<const int4*>(sched + WsSchedTraits::kHeader);
      if (loads_q) cursor.start(sched + WsSchedTraits::kTakenWord);
    } else {
      items = int64_t(q_tiles) * p.H * p.B;
    }
    if constexpr (kResident) {  // this CTA's run: items [first, first + per)
      const int64_t per = (items + gridDim.x - 1) / gridDim.x, first = per * blockIdx.x;
      cursor = Cursor(first);
      items = std::min<int64_t>(items, first + per);
      if (loads_k) {
        for (int s = 0; s < S; ++s) k_held[s] = {-1, -1};
      }
      if (loads_v) {
        for (int s = 0; s < SV; ++s) v_held[s] = {-1, -1};
      }
    }
    uint32_t g = 0, qn = 0;  // key tiles / units this CTA has loaded so far
    // The next unit: the walk's, or (kJagged, the V loader and the fix-up warp) the one the Q
    // loader wrote for fill qn, once that fill completes (its wait orders the read after the
    // write, as the consumers'). These two walkers then release the fill too (the jagged
    // instance's ring_q counts their arrivals beside the consumer warps'): the consumers'
    // release alone does not wait for them (a one-tile unit's release needs only the previous
    // unit's V), and the Q loader would rewrite the slot two units on. So they never wait more
    // than one phase behind either. The end's unit (n_tiles 0, a plain arrive, never refilled)
    // ends their walk as the consumers'.
    auto next_unit = [&]() -> bool {
      if constexpr (kJagged) {
        if (!loads_q) {
          bulk::wait(ring_q.full(qn), (qn / QS) & 1);
          u = units[ring_q.stage(qn)];
          if (u.n_tiles == 0) return false;
          if (fixes_v) {
            ring_q.consumer_release_warp(qn, tid & 31);  // every lane's read, then lane 0
          } else {
            ring_q.consumer_release(qn);  // the V loader, a thread of its own
          }
          return true;
        }
      }
      return cursor.next(p, q_tiles, items, list, u,
                         kJagged ? sched + WsSchedTraits::kTakenWord : nullptr);
    };
    while (next_unit()) {
      const int hk = u.h / group;
      if (loads_q) {
        const uint32_t qs = ring_q.stage(qn);
        ring_q.producer_acquire(qn);
        units[qs] = u;
        unsigned char* q_dst = sq + qs * Tr::kTileBytes;
        const bool narrow_q = narrow_q_tile<kJagged>(u);
        const CUtensorMap* mq = narrow_q ? &map_q64 : &map_q;
        ring_q.producer_arrive_expect_tx(qn, narrow_q ? Tr::kNarrowTileBytes : Tr::kTileBytes);
        tma::load_3d(q_dst, mq, 0, u.h, u.qs.begin + u.i0, ring_q.full(qn));
        tma::load_3d(q_dst + Tr::kBoxBytes, mq, Tr::kBoxCols, u.h, u.qs.begin + u.i0,
                     ring_q.full(qn));
      }
      ++qn;
      for (int t = 0; t < u.n_tiles; ++t, ++g) {
        const int j0 = u.kv_lo + t * BN, row = u.ks.begin + j0;
        // A narrow tile: two 64-row boxes into rows 0..63 of both column blocks (the stage keeps
        // its 128-row layout, so the consumers' descriptors do not change).
        const bool narrow = narrow_tile<kJagged>(u, j0);
        const CUtensorMap* mk = narrow ? &map_k64 : &map_k;
        const CUtensorMap* mv = narrow ? &map_v64 : &map_v;
        const uint32_t bytes = narrow ? Tr::kNarrowTileBytes : Tr::kTileBytes;
        if (fixes_v) {
          const int lane = tid & 31, v_rows = u.ks.len - j0;
          const int rows_end = narrow ? Tr::kNarrowN : BN;
          ring_v.fixup_wait(g);
          if (t == u.n_tiles - 1 && v_rows < rows_end) {
            // Bytes [v_rows, rows_end) * 128 of both column blocks: a warp's store covers 512
            // contiguous bytes (no bank conflict). Not unrolled: fewer registers at 24.
            unsigned char* v = sv + ring_v.stage(g) * Tr::kTileBytes;
#pragma unroll 1
            for (int b = v_rows * 128 + lane * 16; b < rows_end * 128; b += 32 * 16) {
              *reinterpret_cast<uint4*>(v + b) = make_uint4(0, 0, 0, 0);
              *reinterpret_cast<uint4*>(v + Tr::kBoxBytes + b) = make_uint4(0, 0, 0, 0);
            }
            bulk::fence_proxy_async();
          }
          ring_v.fixup_done_warp(g, lane);
        }
        // K and V apart, though alike: one lambda for both made ptxas spill more in the default
        // split-loader instance (46 / 40 -> 54 / 56 bytes, scripts/sass_check.py).
        if (loads_k) {
          unsigned char* k_dst = sk + ring_k.stage(g) * Tr::kTileBytes;
          ring_k.producer_acquire(g);
          if (kResident && holds_tile(k_held, ring_k.stage(g), row, hk)) {
            ring_k.producer_arrive(g);  // the stage holds K_g already
          } else {
            ring_k.producer_arrive_expect_tx(g, bytes);
            tma::load_3d(k_dst, mk, 0, hk, row, ring_k.full(g));
            tma::load_3d(k_dst + Tr::kBoxBytes, mk, Tr::kBoxCols, hk, row, ring_k.full(g));
          }
        }
        if (loads_v) {
          unsigned char* v_dst = sv + ring_v.stage(g) * Tr::kTileBytes;
          ring_v.producer_acquire(g);
          if (kResident && holds_tile(v_held, ring_v.stage(g), row, hk)) {
            ring_v.producer_arrive(g);  // the stage holds V_g already
          } else {
            ring_v.producer_arrive_expect_tx(g, bytes);
            tma::load_3d(v_dst, mv, 0, hk, row, ring_v.full(g));
            tma::load_3d(v_dst + Tr::kBoxBytes, mv, Tr::kBoxCols, hk, row, ring_v.full(g));
          }
        }
      }
    }
    if (loads_q) {  // the end of the walk, in the next Q stage
      const uint32_t qs = ring_q.stage(qn);
      ring_q.producer_acquire(qn);
      units[qs].n_tiles = 0;
      ring_q.producer_arrive(qn);
    }
    return;
  }

  // Consumer warpgroups. The delayed product O += P_{g-1}·V_{g-1} of a CTA's key tile g - 1 is
  // issued with S_g whether or not tile g starts a new unit: a unit's last P·V runs under the next
  // unit's first S and activation, and its output is stored (and acc_o cleared) right after, so
  // the tensor cores do not drain between short units (L = 256 is two key tiles per unit).
  wgmma::setmaxnreg_inc<Tr::kConsumerRegs>();
  const int ctid = tid - 128, wg = ctid / 128, lane = tid & 31;
  // The warp's first row in the tile; through a shuffle, so ptxas knows it is warp-uniform (a
  // plain one was spilled once the V fix-up left the consumers, the jagged instance at 240).
  const int warp_row0 = __shfl_sync(0xffffffffu, wg * 64 + ((ctid / 32) & 3) * 16, 0);
  const uint32_t sq_addr = mma::smem_addr(sq), sk_addr = mma::smem_addr(sk),
                 sv_addr = mma::smem_addr(sv);
  // Ping-pong: wait for this warpgroup's turn to issue products / hand the turn to the other.
  const wsfwd::Turns turns{kPingPong, Tr::kTurnBar, wg, Tr::kConsumerWarpGroups};
  turns.start();

  // What is left of a unit once its products are issued: where its output goes. (The V rows of
  // its last key tile past the sequence's keys reach the consumers zeroed: the fix-up warp.)
  struct Done {
    int64_t out_off;
    int rows_valid;
    // The in-order walk, a unit of 128 valid rows with the output map: stored through its Q
    // stage.
    bool map;
    uint32_t qn;      // its Q fill
    int row0, h;      // its first row in the output and its head
  };
  // A unit stored through its Q stage (map_unit): each warpgroup writes its 64 rows of the output
  // with stmatrix into the rows of the Q stage only its own S products read (their last one is
  // waited for before any store), so the transpose is the instruction's, not 48 selects and 16
  // shuffles a thread (the register store's butterfly step, store_rows<T, D, 8>; docs/
  // performance.md, forty-second and forty-fourth sessions);
  // one thread of the warpgroup then stores the two 64 x 64 boxes with the output map and, after
  // their shared reads (flush_store), releases the Q stage for its warpgroup's four warps (the
  // consumers do not release it at the unit's last S then), so the loader refills it only after
  // the store. The jagged instance keeps the register store: its Q ring has no third stage and
  // its units are often one key tile, so the next unit's Q would wait on the store.
  // A second store before the first one's flush (a one-tile last unit: no key tile between them)
  // flushes the first one at once.
  // The store's shared reads, then the Q stage's release for the warpgroup's 4 warps: waited for
  // by the issuing thread once its warpgroup has issued the products of a later key tile (after
  // issue_owed_pv), not at once, so that its warp, and with it the warpgroup's next products, do
  // not wait on the copy engine. With two Q stages the unit after next has that Q stage, so a
  // store still pending at a unit's start (the unit before had one key tile) is flushed there.
  bool store_pending = false;  // only ever set in thread 0 of a warpgroup
  uint32_t store_qn = 0;
  auto flush_store = [&] {
    if (store_pending) {
      bulk::wait_group_read<0>();
#pragma unroll
      for (int i = 0; i < 4; ++i) ring_q.consumer_release(store_qn);
      store_pending = false;
    }
  };
  auto store_unit = [&](const Done& w, const float(&acc)[D / 8][4]) {
    if (!kJagged && w.map) {
      flush_store();
      const int m = lane >> 3, r = warp_row0 + (m & 1) * 8 + (lane & 7);
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        const float sc = p.qk_scale;
        const uint32_t v[4] = {mma::pack2<T>(acc[n][0] * sc, acc[n][1] * sc),
                               mma::pack2<T>(acc[n][2] * sc, acc[n][3] * sc),
                               mma::pack2<T>(acc[n + 1][0] * sc, acc[n + 1][1] * sc),
                               mma::pack2<T>(acc[n + 1][2] * sc, acc[n + 1][3] * sc)};
        // Lane l gives the row address of row l % 8 of matrix l / 8: matrices 0 / 1 are rows
        // 0-7 / 8-15 of column group n, 2 / 3 those of group n + 1 (the accumulator's order).
        const int ng = n + (m >> 1);
        wgmma::stmatrix_x4(
            sq_addr + ring_q.stage(w.qn) * Tr::kTileBytes + wgmma::sw128_offset<BM>(r, ng * 8), v);
      }
      bulk::fence_proxy_async();  // the stores, then the copy engine's reads
      wgmma::named_barrier_sync(Tr::kStoreBar + wg, 128);
      if ((ctid & 127) == 0) {
        // This warpgroup's 64 rows of both column blocks: 8 KB into each 16 KB block, a multiple
        // of the swizzle's 1024-byte period, so each half is laid out as a 64-row box lands.
        const unsigned char* half = sq + ring_q.stage(w.qn) * Tr::kTileBytes + wg * 64 * 128;
        tma::store_3d(&map_o64, half, 0, w.h, w.row0 + wg * 64);
        tma::store_3d(&map_o64, half + Tr::kBoxBytes, Tr::kBoxCols, w.h, w.row0 + wg * 64);
        bulk::commit_group();
        store_pending = true;  // its read is waited for later: flush_store
        store_qn = w.qn;
      }
    } else {
      store_rows<T, D, 8>(static_cast<T*>(p.out) + w.out_off, p.o_row_stride, warp_row0,
                          w.rows_valid, 0, p.D, acc, p.qk_scale);
    }
  };
  // O += P·V of a key tile whose V is at sv_tile: K = 128, or K = 64 for a narrow tile (P's
  // columns 64..127 hold raw scores there, maybe inf / NaN, and V's rows 64..127 were never
  // loaded: the narrow product must not read them). The accumulate flag is off for the first
  // k-step of a unit's first tile only. Per output element the narrow product adds the same
  // k-steps in the same order, minus exact zeros.
  auto issue_pv = [&](float(&acc)[D / 8][4], const uint32_t(&a)[BN / 16][4], uint32_t sv_tile,
                      bool narrow_pv, bool first) {
    if (narrow_pv) {
#pragma unroll
      for (int kk = 0; kk < Tr::kNarrowN / 16; ++kk) {
        MmaO::template rs<1>(acc, a[kk], wgmma::desc_n_major<BN>(sv_tile, kk), kk > 0 || !first);
      }
      wgmma::commit();
    } else {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        MmaO::template rs<1>(acc, a[kk], wgmma::desc_n_major<BN>(sv_tile, kk), kk > 0 || !first);
      }
      wgmma::commit();
    }
  };

  float acc_o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  uint32_t pa[BN / 16][4];  // P_{g-1}, the A operand of the delayed P·V
  Done prev{};              // the unit whose last P·V is still to be issued (when g > 0)
  // Whether key tile g - 1 is the first of its unit: its P·V then starts acc_o afresh (the
  // accumulate flag off) instead of adding to a cleared one. No instruction but a wgmma ever writes
  // acc_o inside the loop: a zero fill there made ptxas serialise every wgmma (C7514).
  bool pv_first = false;
  bool pv_narrow = false;   // whether key tile g - 1 is narrow (kJagged)
  bool pv_idle = false;     // whether this warpgroup skipped key tile g - 1 (idle below)
  // wg through a shuffle: ptxas then knows it is warp-uniform (branches on wg around a wgmma
  // serialised them otherwise, C7520).
  const int wg_u = __shfl_sync(0xffffffffu, wg, 0);
  uint32_t g = 0, qn = 0;   // key tiles / units consumed so far
  while (true) {
    const uint32_t qs = ring_q.stage(qn);
    const uint32_t sq_u = sq_addr + qs * Tr::kTileBytes;
    if (QS < 3) flush_store();  // (above)
    ring_q.consumer_wait(qn);
    const WsUnit u = units[qs];
    if (u.n_tiles == 0) break;
    // Jagged instance: a unit with <= 64 query rows (a short sequence, or the last half-tile of
    // a longer one) has none in warpgroup 1's half. That warpgroup then issues no product for it
    // (S and P·V) and computes no activation (it still takes its turns, releases the stages and
    // packs a P of zeros that no product reads: skipping that too made the consumers spill), so
    // the tensor cores spend on the unit what one 64-row query tile needs. With narrow key tiles
    // that is 64 x 64 granularity in both dims (docs/performance.md, the tile-waste count). Its
    // store writes no row (all of its rows are past the sequence), and its stale acc_o is
    // overwritten by the first P·V of its next unit (pv_first).
    const bool idle = wg_u == 1 && narrow_q_tile<kJagged>(u);
    // The in-order walk with the output map: a unit whose 128 rows are all the sequence's is stored
    // through its Q stage (store_unit); one that ends inside its tile keeps the register store (a
    // box would write the next sequence's rows).
    const bool map_unit = !kJagged && store_map && u.qs.len - u.i0 >= BM &&
                          (QS > 2 || u.n_tiles >= Tr::kMapMinTiles);
    for (int j = 0; j < u.n_tiles; ++j, ++g) {
      const int j0 = u.kv_lo + j * BN;  // the tile's first key, local to the sequence
      // Every instance computes S as one N = 128 product (the jagged instance once issued S in two
      // N = 64 halves, with a narrow tile issuing one: a jagged key tile then cost ~1.3x a dense
      // one, docs/performance.md). A narrow tile's K stage holds its <= 64 keys in rows 0..63;
      // rows 64..127 keep an older fill's bytes (maybe inf / NaN, never this sequence's keys), so
      // S's columns 64..127 are garbage there; the narrow P·V (K = 64) never reads them, so φ and
      // the end mask skip them (the causal / window masks are selects over all 128: harmless),
      // and mask_cols_from zeroes the columns in 0..63 past the sequence's end after the
      // activation (a select: NaN-safe). Per element the product adds the same k-steps as an
      // N = 64 one would.
      const bool narrow = narrow_tile<kJagged>(u, j0);
      const uint32_t stage = ring_k.stage(g), pstage = ring_v.stage(g - 1);  // K_g's, V_{g-1}'s
      ring_k.consumer_wait(g);
      if (g > 0) ring_v.consumer_wait(g - 1);  // after the fix-up warp (ready)

      // The owed P_{g-1}·V_{g-1} (none when tile g - 1 was skipped: pv_idle). An idle warpgroup
      // (kJagged) runs a body of its own: no S, no activation, P of zeros. Each body fences,
      // commits and waits for its own products, and no wgmma sits under a condition inside a
      // commit group (ptxas otherwise closes the group with a dummy wgmma, so that the wait for
      // S_g also waits for P_{g-1}·V_{g-1}, and selects s on every path: C7517 / C7519).
      const bool owed = g > 0 && !pv_idle;
      turns.take();
      if (!idle) {
        float s[BN / 8][4];
        wgmma::fence();
        wsfwd::issue_qk<Mma, D, BM, BN>(s, sq_u, wg, sk_addr + stage * Tr::kTileBytes);
        wgmma::commit();
        wsfwd::issue_owed_pv(owed, turns, [&] {  // P_{g-1}·V_{g-1}
          issue_pv(acc_o, pa, sv_addr + pstage * Tr::kTileBytes, pv_narrow, pv_first);
        });
        if constexpr (!kJagged) flush_store();  // the last unit's store (store_unit)
        wgmma::fence_regs(s);
        if (lane == 0) ring_k.consumer_release(g);  // K_g has been read
        // So has Q, by every S of the unit. The warp's release: every lane read units[qs], which
        // the Q loader rewrites after it (an arrival releases only its own thread's reads). A unit
        // stored through its Q stage releases it after the store instead (store_unit).
        if (j == u.n_tiles - 1 && !map_unit) ring_q.consumer_release_warp(qn, lane);
        // φ, then the masks. A narrow tile's P·V reads P's columns 0..63 alone (issue_pv): φ and
        // the end-of-sequence mask run on those (half the activation's instructions); columns
        // 64..127 keep their scores, packed into pa and never read.
        if (narrow) {
          act_fwd_tile<BN / 8, Tr::kNarrowN / 8>(s, p.act, p.pre_scale);
        } else {
          act_fwd_tile<BN / 8>(s, p.act, p.pre_scale);
        }
        const int r0 = u.i0 + warp_row0;
        if (p.window >= 0) {
          if (!tile_fully_visible(p.causal, p.window, r0, r0 + 15, j0, j0 + BN - 1)) {
            window_mask<false>(s, r0, j0, p.causal, p.window);
          }
        } else if (p.causal && j0 + BN - 1 > r0) {
          causal_mask<false>(s, r0, j0);
        }
        if (narrow) {  // (every narrow tile ends inside its 64 columns or at their end)
          mask_cols_from<BN / 8, Tr::kNarrowN / 8>(s, u.ks.len - j0);  // the next sequence's keys
        } else if (j0 + BN > u.ks.len) {
          mask_cols_from(s, u.ks.len - j0);
        }
        // P rounded to the value type (DESIGN §3.1). The output store comes after it (s is dead by
        // then), nested under the wait.
        if (g > 0) {
          wgmma::wait<0>();  // P_{g-1}·V_{g-1} done: pa may be overwritten, V_{g-1} released
          wgmma::fence_regs(acc_o);
          if (lane == 0) ring_v.consumer_release(g - 1);
          pack_a<T, BN>(pa, s);
          // That was the previous unit's last product: its output is complete. (The next unit's
          // first P·V overwrites acc_o: pv_first.)
          if (j == 0) store_unit(prev, acc_o);
        } else {
          pack_a<T, BN>(pa, s);
        }
      } else {
        // Idle: only the owed product; it still takes its turn, releases the stages and writes
        // a P of zeros that no product reads (leaving pa unwritten made the consumers spill).
        if (owed) {
          wgmma::fence();
          issue_pv(acc_o, pa, sv_addr + pstage * Tr::kTileBytes, pv_narrow, pv_first);
        }
        turns.pass();
        if (lane == 0) ring_k.consumer_release(g);
        if (j == u.n_tiles - 1) ring_q.consumer_release_warp(qn, lane);  // as above
        if (g > 0) {
          wgmma::wait<0>();  // the owed P·V done: pa may be overwritten, V_{g-1} released
          wgmma::fence_regs(acc_o);
          if (lane == 0) ring_v.consumer_release(g - 1);
#pragma unroll
          for (int i = 0; i < BN / 16; ++i) pa[i][0] = pa[i][1] = pa[i][2] = pa[i][3] = 0u;
          if (j == 0) store_unit(prev, acc_o);  // the previous unit's (this one has no row)
        } else {
#pragma unroll
          for (int i = 0; i < BN / 16; ++i) pa[i][0] = pa[i][1] = pa[i][2] = pa[i][3] = 0u;
        }
      }
      pv_first = j == 0;
      pv_narrow = narrow;
      pv_idle = idle;
    }
    prev = {(int64_t(u.qs.begin) + u.i0) * p.o_row_stride + int64_t(u.h) * p.o_head_stride,
            u.qs.len - u.i0, map_unit, qn, u.qs.begin + u.i0, u.h};
    ++qn;
  }
  wsfwd::drain_last_pv(
      ring_v, g, turns, acc_o, [](uint32_t) {},  // the fix-up warp zeroed V's tail
      [&](uint32_t pstage) {  // issue_pv commits in its branch: nothing issued when idle
        if (!pv_idle) issue_pv(acc_o, pa, sv_addr + pstage * Tr::kTileBytes, pv_narrow, pv_first);
      },
      [&] { store_unit(prev, acc_o); });
  flush_store();  // before the shared memory goes with the CTA
  turns.finish();
#endif
}

// The work items the launcher enumerates for a max query length hint: q_tiles per (head,
// sequence), clamped like cta_grid.
inline int64_t fwd_ws_items(const FwdParams& p, int max_seq_len_q) {
  return cta_grid((int64_t(max_seq_len_q) + FwdWsTraits::kBlockM - 1) / FwdWsTraits::kBlockM, p.H,
                  p.B);
}

// sched: nullptr runs the in-order walk with full tiles (dense batches: every sequence as long as
// the hint, so no item is empty and no tile narrow); else a workspace of
// ws_sched_elems(fwd_ws_items(p, max_seq_len_q)) int32, and the jagged schedule is built into
// it first (one small kernel on the same stream) for the default variant (ping-pong, split
// loaders); the A/B variants keep the in-order walk. resident: the in-order walk of the default
// variant in runs, key tiles kept in their stages (kResident; choose.h fwd_ws_resident_kv).
template <typename T>
cudaError_t launch_gdpa_fwd_ws(const FwdParams& p, const FwdWsMaps& maps, int max_seq_len_q,
                               bool ping_pong, bool split_loads, bool persistent, bool resident,
                               int32_t* sched, cudaStream_t stream) {
  using Tr = FwdWsTraits;
  // Unscheduled consumers (an A/B variant) run with the single loader only.
  split_loads = split_loads && ping_pong;
  const bool jagged = sched != nullptr && ping_pong && split_loads;
  resident = resident && !jagged && split_loads;
  auto kernel = jagged        ? gdpa_fwd_ws_kernel<T, true, true, true>
                : resident    ? gdpa_fwd_ws_kernel<T, true, true, false, true>
                : !ping_pong  ? gdpa_fwd_ws_kernel<T, false, false, false>
                : split_loads ? gdpa_fwd_ws_kernel<T, true, true, false>
                              : gdpa_fwd_ws_kernel<T, true, false, false>;
  const int smem = Tr::smem_bytes(split_loads, resident);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const unsigned items = static_cast<unsigned>(fwd_ws_items(p, max_seq_len_q));
  const int q_tiles = static_cast<int>(items / (unsigned(p.H) * unsigned(p.B)));
  unsigned grid = items;
  if (persistent) {  // one CTA per SM (the shared memory allows no second one)
    int dev = 0, sms = 0;
    if ((err = cudaGetDevice(&dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
      return err;
    grid = std::min(items, static_cast<unsigned>(sms > 0 ? sms : 1));
  }
  if (jagged) {
    gdpa_ws_schedule_kernel<false><<<1, WsSchedTraits::kThreads, 0, stream>>>(p, q_tiles, sched);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p, q_tiles, jagged ? sched : nullptr,
                                               int64_t(items), maps.q, maps.k, maps.v, maps.k64,
                                               maps.v64, maps.q64, maps.o64,
                                               !jagged && maps.o64_ok);
  return cudaGetLastError();
}

}  // namespace gdpa
}  // namespace attnkit

#endif  // ATTNKIT_HAS_FWD_WS
