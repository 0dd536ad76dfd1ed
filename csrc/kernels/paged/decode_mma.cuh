// Tensor-core paged decode for grouped-query attention (sm_80+, torch-free).
//
// With G = Hq / Hkv >= 2 query heads per kv head, the CUDA-core kernel (decode.cuh) spends G fp32
// FMAs per K and V element and becomes issue bound. Here both products run on mma.sync with the
// tokens on the 16-row side and the G query heads in n8 column blocks (NB = ceil(G / 8); columns
// >= G hold zero queries and are never stored):
//   Sᵀ[16 tok x 8 heads]  = K·Qᵀ     A = K tile [16 tok][D] (ldmatrix), B = Qᵀ (registers)
//   Oᵀ[D x 8 heads]      += Vᵀ·Pᵀ    A = Vᵀ (ldmatrix, .trans for token-major V), B = Pᵀ
// Pᵀ comes from Sᵀ's accumulators by one movmatrix per 8x8 (the C tile has tokens as rows, the B
// operand wants them as k). With heads on the n side a 16-token tile costs D/16 mma per product
// and 4 scores per thread, half of what the heads-as-rows orientation (an m16 tile of which G
// rows are real) spends: decode is bound by each warp's instruction stream, not by the tensor
// cores, so fewer instructions per tile is the speed. Likewise the running max is moved (and O
// rescaled, the column max shuffled) only when a tile's scores exceed it by more than 2^8, and
// tiles wholly inside the window without soft-cap or ALiBi keep raw scores, the scale folded into
// the one FFMA before each exp2.
// Served: 16-bit query with the cache in the query dtype, head size 64 or 128, block size 16 or
// 32, one query token per sequence (paged_attention_v1, pa_fwd with max_qlen = 1), both value
// layouts, any cache strides (block stride 0 included); and several query tokens per sequence in
// row chunks (kRows below: pa_fwd with max_qlen > 1 at its head size 128 / block size 16 on the
// ASM layouts, and the serving call's short sequences on NHD pages).
//
// Work split: CTA = (sequence, kv head, split) with 4 warps. A split owns the partitions
// split, split + splits, ... of kPartition tokens (the same split-K grid and workspace as
// decode.cuh, so paged_combine_kernel finishes); each partition is 16 tiles of 16 tokens and the
// warps take the split's tiles round-robin. Each warp streams its tiles through its own
// kStages-deep cp.async ring (warp-local: only __syncwarp between stages), keeps a running
// (max, sum, O) in registers, and the 4 warps merge through shared memory at the end.
//
// Masking: a tile's token is visible when its block id is in [0, num_blocks) and it lies in the
// row window [lo, hi). K rows of invisible tokens and V token chunks past hi (or wholly before lo,
// or of an invalid block) are zero-filled by cp.async without being read: tokens past the length
// may hold anything (even NaN) and must never be multiplied in.
//
// Global reads: every cp.async instruction of a warp moves 512 bytes, and each group of 8 lanes
// (what the memory pipeline serves together for 16-byte accesses) covers one whole 128-byte line
// whenever the layout allows it. Keys [D/x, bs, x]: lanes walk tokens. vLLM values [D, bs]: lane
// pairs take the two 8-token chunks of one dim (32 contiguous bytes at bs = 16). ASM values
// [bs/x, D, x]: lanes walk dims inside one 8-token chunk, 16 bytes each, so 8 lanes read 128
// contiguous bytes (with lane pairs per dim, as for vLLM, they would touch two lines half each and
// double the requests for the same bytes).
//
// Bulk loads (kBulk: kernel sm90 of kernels/paged/choose.h, sm_90 with the cache laid out
// contiguously per block and head; see bulk_layout() in the launcher): lane 0 moves each tile
// with cp.async.bulk ("1-D TMA"): K as one 4 KB copy (block size 16) or D/8 copies of 256 bytes
// (block size 32), V as one 4 KB copy, completed on the stage's mbarrier. Shared memory then
// holds the global layout unswizzled, which ldmatrix reads without bank conflicts for K [D/8][16 tok][8] and ASM V [2][D][8 tok] (2-way for
// vLLM V [D][16 tok]). Per-lane cp.async spends one load-unit request per 16 bytes and kept the
// memory pipeline ~80-90% busy at ~45-60% of DRAM bandwidth (ncu, H200); bulk copies do not.
// Whole tiles are copied, tokens outside [lo, hi) included (in bounds: the block id is valid), so
// a partial tile's invisible V rows are zeroed in shared memory after it lands, and a tile of an
// invalid block id is not copied and not computed.
//
// NHD caches on sm_90 (paged_decode_mma_nhd_tma_kernel): a tile's 16 token rows of one kv head are
// D·2 bytes each at a token stride of Hkv·D·2, so neither one bulk copy nor per-lane cp.async
// suits them (one 256-byte bulk copy per row kept the copy engine, and per-lane cp.async the load
// unit, as busy as above, both at 46-68% of DRAM bandwidth on the H200). A 4-D tensor map of the
// cache ({D, Hkv, block_size, num_blocks}, boxes of 64 columns x 16 rows) moves a K or V tile in
// D/64 copies, landed with the 128-byte swizzle ([D/64][16][64], 16-byte chunk ^ row % 8, which
// keeps the ldmatrix rows on distinct bank groups).
//
// Start-up: the block ids of a warp's first tiles do not depend on the sequence length (without
// a sliding window), so they are read together with seq_lens, and the first tiles are in flight
// before the query is staged in shared memory.
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/fast_math.cuh"
#include "kernels/common/mma.cuh"
#include "kernels/common/tma.cuh"
#include "kernels/paged/decode.cuh"
#include "kernels/paged/params.h"

namespace attnkit {
namespace paged {

#define ATTNKIT_HAS_NHD_TMA ATTNKIT_HAS_TENSOR_MAPS  // the kernel and its launcher are declared

// kSw128: NHD tiles landed by tensor-map copies in the 128-byte swizzle, whose pattern needs
// 1024-byte aligned stages (the extra 1 KB lets the kernel align the ring whatever the base).
template <int D, bool kSw128 = false>
struct MmaDecodeTraits {
  static_assert(D == 64 || D == 128, "tensor-core decode: head size 64 or 128");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTile = 16;                              // tokens per tile
  static constexpr int kTilesPerPart = kPartition / kTile;      // 16
  static constexpr int kStages = D == 64 ? 4 : 3;               // per-warp cp.async ring depth
  static constexpr int kTileElems = kTile * D;                 // K tile = V tile elements
  static constexpr int kStageElems = 2 * kTileElems;            // K + V
  static constexpr int kQElems = 16 * D;
  static constexpr int kPipeBytes = kWarps * kStages * kStageElems * 2;
  // The final merge reuses the pipeline buffers: O [4][16][kRedStride] floats + (m, l) [4][16][2].
  // The 4-float pad puts the 4 head rows one store instruction writes on distinct banks.
  static constexpr int kRedStride = D + 4;
  static constexpr int kMergeBytes = (kWarps * 16 * kRedStride + kWarps * 16 * 2) * 4;
  static constexpr int kSmemBytes =
      kQElems * 2 + (kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes) + (kSw128 ? 1024 : 0);
};

#if ATTNKIT_HAS_MMA_SM80
namespace mmadec {

// [16 rows][D] 16-bit tile, 16-byte chunks XOR-swizzled by row % 8 (gdpa/tile.cuh's layout).
template <int D>
ATTNKIT_DEVICE ATTNKIT_INLINE int kswz(int row, int col) {  // col: a multiple of 8
  return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8;
}

// [D rows][16 tokens] 16-bit tile: 2 chunks per row, chunk index XOR (row / 4) % 2, so the 8 row
// addresses of one ldmatrix (8 consecutive rows, one logical chunk) hit 8 distinct 16-byte bank
// groups; so do 8 lanes of the ASM-order cp.async writes (same rows and chunk).
ATTNKIT_DEVICE ATTNKIT_INLINE int vswz(int row, int chunk) {
  return row * 16 + ((chunk ^ (row >> 2)) & 1) * 8;
}

// Element offsets of the bulk-copied (global-layout) tiles: K [D/8 chunks][16 tokens][8 dims],
// V [2 token chunks][D][8 tokens] (ASM) or [D][16 tokens] (vLLM); col and chunk as above.
ATTNKIT_DEVICE ATTNKIT_INLINE int kbulk(int row, int col) { return (col >> 3) * 128 + row * 8; }
template <int D>
ATTNKIT_DEVICE ATTNKIT_INLINE int vbulk(bool chunk_major, int row, int chunk) {
  return chunk_major ? chunk * D * 8 + row * 8 : row * 16 + chunk * 8;
}
// Element offset of (row, col) in a tensor-map tile [D/64 boxes][16 rows][64 cols] with the 128-byte
// swizzle: the 16-byte chunk index (col / 8) % 8 is XORed with row % 8 (the box base is
// 1024-byte aligned, so the hardware's address bits give exactly that).
ATTNKIT_DEVICE ATTNKIT_INLINE int sw128(int row, int col) {
  return (col >> 6) * (16 * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

}  // namespace mmadec
#endif

// grid: x = S * Hkv (token_grid: Tq * Hkv; kRows: S * Hkv * row chunks, the chunk fastest),
// y = splits; block: 128 threads; dynamic smem MmaDecodeTraits<D>::kSmemBytes. NB = ceil(G / 8):
// column blocks of 8 query heads. BS = 0: the block size is read at run time (any multiple of 16).
// kRows (p.short_seq_rows > 1: the serving call's short sequences on NHD pages, or pa_fwd's
// max_qlen > 1 rows on its ASM-layout caches): a CTA computes the row chunk c of its sequence,
// rows [r0, r0 + nrows) with r0 = c * R0, R0 = decode_chunk_rows(p) (as many rows as 16 columns
// hold) and nrows = min(R0, qlen - r0), the products' columns being the (row, head) pairs
// r = i * G + g of rows r0 + i (NB = ceil(R0 * G / 8)), each column masked by its own row's
// causal limit and window (those of row r0 + i of a qlen-row sequence). Each chunk reads the
// sequence's pages once for its rows: ceil(qlen / R0) reads, against G for the flash forward
// (one per query head), so the serving call's sequences of up to short_seq_rows = max(8, 16 / G)
// rows come here; and pa_fwd's, against ceil(G * max_qlen / 16) for the CUDA-core kernel (the
// same count where G divides 16, but both products there on FMAs). Nothing in the row chunks
// depends on the cache layout: tiles are loaded for the union of the chunk's rows' windows
// ([lo, hi) below) and each column is masked in the logits. A chunk past the sequence's rows
// returns (after pdl_wait, as every CTA with nothing to do).
// kNhd: NHD caches [num_blocks, block_size, Hkv, D] (vLLM V1, FlashAttention): V tiles are staged
// token-major like K and fed to the P·V product with ldmatrix.trans. With kBulk (sm_90) lane 0
// copies each tile through the tensor maps map_k / map_v (the header's NHD paragraph); the
// kernels below are this body with and without maps.
template <typename T, int D, int BS, bool kBulk, bool kNhd, int NB, bool kRows = false>
ATTNKIT_DEVICE ATTNKIT_INLINE void decode_mma_body(const DecodeParams& p, const void* map_k,
                                                   const void* map_v) {
#if ATTNKIT_HAS_MMA_SM80
  // The split combine (launched with PDL) may be scheduled now: it waits for this grid's writes
  // before reading them, and its launch then overlaps this kernel instead of following it.
  pdl_launch_dependents();
  constexpr bool kSw128 = kNhd && kBulk;
  using Tr = MmaDecodeTraits<D, kSw128>;
  constexpr int NST = Tr::kStages, TILE = Tr::kTile, TPP = Tr::kTilesPerPart;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kRescaleSlack = 8.0f;  // log2 units; see the running max below
  static_assert(NB == 1 || NB == 2, "tensor-core decode: up to 16 query heads per kv head");
  static_assert(BS == 0 || BS == 16 || BS == 32, "tensor-core decode: block size 16 or 32");
  const int bsz = BS > 0 ? BS : p.block_size;  // a multiple of 16 (TILE) when run-time
  // Block sizes are powers of two in practice: a mask and a shift instead of 64-bit divisions.
  const int bs_shift = (bsz & (bsz - 1)) == 0 ? __ffs(bsz) - 1 : -1;
  auto block_of = [&](int64_t tok) -> int64_t { return bs_shift >= 0 ? tok >> bs_shift : tok / bsz; };
  auto offset_in_block = [&](int64_t tok) -> int {
    return bs_shift >= 0 ? int(tok & (bsz - 1)) : int(tok % bsz);
  };
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  unsigned char* pipe_raw = smem_raw + Tr::kQElems * sizeof(T);
  if constexpr (kSw128) pipe_raw += (1024u - (mma::smem_addr(pipe_raw) & 1023u)) & 1023u;
  T* pipe = reinterpret_cast<T*>(pipe_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = p.Hq / p.Hkv;
  // kRows: x = (sequence, kv head, row chunk), the chunk fastest: the chunks of one (sequence, kv
  // head) stream the same pages, and launched side by side they stream them at about the same
  // time, so all but the first read mostly hit L2 (grid z would put a whole grid of (sequence, kv
  // head) pairs between two reads of one page, each then from DRAM).
  const unsigned chunks = kRows ? unsigned(decode_row_chunks(p)) : 1u;
  const int chunk = int(blockIdx.x % chunks);
  const unsigned pair = blockIdx.x / chunks;  // 32-bit divisions, as x is
  const int64_t hk = pair % unsigned(p.Hkv);
  const int64_t row = pair / unsigned(p.Hkv);  // the sequence, or with token_grid the query token
  const int64_t b = p.token_grid ? seq_of_token(p, row) : row;  // -1: no sequence holds the token
  const int split = blockIdx.y, splits = gridDim.y;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const T* kh = kc + hk * p.cs.k_sh;
  const T* vh = vc + hk * p.cs.v_sh;
  const int32_t* bt = p.block_tables + (b < 0 ? 0 : b) * p.bt_stride;
  T* my_pipe = pipe + warp * NST * Tr::kStageElems;

  // The warp's n-th tile starts at token tile_start(part0, n); tiles are increasing in n.
  auto tile_start = [&](int64_t part0, int n) -> int64_t {
    const int g = n * Tr::kWarps + warp;
    return (part0 + int64_t(g / TPP) * splits) * kPartition + int64_t(g % TPP) * TILE;
  };
  // Block ids of the warp's tiles come 32 at a time (lane i holds tile n0 + i's), one batch ahead
  // (ids: tiles n0.., ids_next: n0 + 32..), so only the first batch is ever waited for;
  // -1 = invisible. Entries past the table's row are never read; those past the length are read
  // (they are in the row) but their tokens are masked.
  auto fetch_ids = [&](int64_t part0, int n0) -> int32_t {
    const int64_t blk = block_of(tile_start(part0, n0 + lane));
    if (blk >= p.max_blocks) return -1;
    const int32_t id = bt[blk];
    return (id >= 0 && id < p.num_blocks) ? id : -1;
  };
  // Without a window lo = 0, so the first partition is `split` whatever the length: read the
  // first ids in parallel with seq_lens instead of after it.
  int32_t ids = p.window > 0 ? -1 : fetch_ids(split, 0);
  int32_t ids_next = p.window > 0 ? -1 : fetch_ids(split, 32);

  const SeqQuery sq = b >= 0 ? seq_query(p, b) : SeqQuery{0, 0, 0};
  // The mixed call's decode half computes short sequences only (short_seq_min .. short_seq_rows
  // rows; the flash forward, before it in the stream, wrote the long ones' rows, and the other
  // decode launch those of the other short ones; the combine skips them too). It is launched with
  // PDL after the kernel before it, whose tail it may share: it writes its out / lse rows (which
  // a forward that computes every sequence also wrote, with zeros) only after pdl_wait(), and
  // every CTA of chunk 0 waits, even one with nothing to do, so the grid never completes before
  // the forward does. pa_fwd's multi-row launch (short_seq_min 1: every sequence with a row) is
  // an ordinary stream-ordered launch, where pdl_wait() returns at once. beside_forward (the
  // forward computes only the long sequences, so these rows are this grid's alone): no CTA waits
  // before writing, so the grid runs beside the forward on the SMs it leaves, except the grid's
  // last CTA, which waits after its work (one CTA slot, the last one taken), so the grid never
  // ends before the forward does.
  // kRows: this CTA's first row of the sequence. A chunk starting at or past qlen (the grid
  // covers decode_row_chunks x decode_chunk_rows rows) computes nothing, like another launch's
  // sequence. Idle CTAs of the other chunks leave without waiting: chunk 0 of the same (sequence,
  // kv head, split) always exists and waits, and an idle CTA parked in pdl_wait would hold one of
  // the SM's few decode slots through the forward's tail (4x as many of them at G = 8).
  const int64_t r0 = kRows ? int64_t(chunk) * decode_chunk_rows(p) : 0;
  const bool short_seqs = p.short_seq_rows > 0;
  const bool wait_to_write = short_seqs && !p.beside_forward;
  const bool wait_at_end = short_seqs && p.beside_forward && blockIdx.x == gridDim.x - 1 &&
                           blockIdx.y == gridDim.y - 1;
  if (short_seqs && (!decode_takes_rows(p, sq.qlen) || r0 >= sq.qlen)) {
    if ((wait_to_write && r0 == 0) || wait_at_end) pdl_wait();
    return;
  }
  if (sq.qlen <= 0) {
    // No query row (pa_fwd with an empty qo_indptr range: nothing to write), or a token no
    // sequence holds (token_grid): its row is 0 with lse -inf, written here with one split (so
    // the serving call's decode-only path allocates out / lse without a fill kernel each), by
    // the combine from split rows that say "empty" with several.
    if (p.token_grid && splits == 1) {
      T* out = static_cast<T*>(p.out);
      for (int idx = threadIdx.x; idx < G * D; idx += Tr::kThreads) {
        const int64_t h = hk * G + idx / D;
        const int d = idx % D;
        out[row * p.o_st + h * p.o_sh + d * p.o_sd] = from_float<T>(0.0f);
        if (d == 0 && p.lse) p.lse[h * p.lse_sh + row * p.lse_st] = -INFINITY;
      }
    }
    if (p.token_grid && p.splits > 1 && threadIdx.x < G) {
      p.ws_ml[((row * p.Hq + hk * G + threadIdx.x) * p.splits + blockIdx.y) * 2] = -INFINITY;
      p.ws_ml[((row * p.Hq + hk * G + threadIdx.x) * p.splits + blockIdx.y) * 2 + 1] = 0.0f;
    }
    return;
  }
  // The query token and its row window: token_grid rows may be any row i of their sequence.
  // kRows: the chunk's first row's token (row r0), its nrows rows (>= 1: r0 < qlen), and the keys
  // any of them sees (row r0's window start to row r0 + nrows - 1's limit, rows of a qlen-row
  // sequence); each column's own limits come below.
  const int64_t qtok = p.token_grid ? row : sq.q0 + r0;
  const int64_t chunk_rows = decode_chunk_rows(p);
  const int64_t nrows = kRows ? (sq.qlen - r0 < chunk_rows ? sq.qlen - r0 : chunk_rows) : 1;
  const RowWindow w = row_window(sq.L, p.token_grid || kRows ? sq.qlen : 1,
                                 p.token_grid ? row - sq.q0 : (kRows ? r0 + nrows - 1 : 0),
                                 p.window);
  const int64_t lo = kRows ? row_window(sq.L, sq.qlen, r0, p.window).lo : w.lo;
  const int64_t hi = w.hi, qpos = w.qpos;
  const int64_t part0 = hi > lo ? lo / kPartition + split : 0;
  if (p.window > 0) ids = fetch_ids(part0, 0), ids_next = fetch_ids(part0, 32);

  // The validity of each staged tile, read back by the compute step (per-warp ring), and with
  // bulk loads each stage's barrier (one arrival: lane 0's, plus the tile's bytes).
  __shared__ int32_t ok_ring[Tr::kWarps][NST];
  __shared__ __align__(8) uint64_t full[Tr::kWarps][NST];
  if constexpr (kBulk) {
    if (lane == 0) {
      for (int s = 0; s < NST; ++s) bulk::init(&full[warp][s], 1);
      bulk::fence_init();
    }
    __syncwarp();
  }
  // V lane roles (see the header): chunk-major (ASM) layouts walk dims, row-major (vLLM) ones
  // take lane pairs per dim.
  const bool v_chunk_major = p.cs.v_tx < TILE;
  // Per-lane cp.async loads of tile ts (block id, or -1) into the swizzled stage (ks, vs).
  auto issue_cp_async = [&](int64_t ts, int32_t id, int in_off, const T* kb, const T* vb, T* ks, T* vs) {
    // K: chunk c (dims 8c..8c+7) of token t; lanes walk tokens first (16-byte runs per chunk).
#pragma unroll
    for (int i = 0; i < TILE * D / 8 / 32; ++i) {
      const int idx = i * 32 + lane, t = idx % TILE, c = idx / TILE;
      const int64_t tok = ts + t;
      const bool ok = id >= 0 && tok >= lo && tok < hi;
      const T* src = ok ? kb + c * p.cs.k_sdc + (in_off + t) * p.cs.k_st : kc;
      mma::cp_async_16(ks + mmadec::kswz<D>(t, c * 8), src, ok ? 16 : 0);
    }
    if constexpr (kNhd) {
      // V like K: token t's dims 8c..8c+7 (16 contiguous bytes); invisible tokens zero-filled.
#pragma unroll
      for (int i = 0; i < TILE * D / 8 / 32; ++i) {
        const int idx = i * 32 + lane, t = idx % TILE, c = idx / TILE;
        const int64_t tok = ts + t;
        const bool ok = id >= 0 && tok >= lo && tok < hi;
        const T* src = ok ? vb + (in_off + t) * p.cs.v_stc + c * 8 : vc;
        mma::cp_async_16(vs + mmadec::kswz<D>(t, c * 8), src, ok ? 16 : 0);
      }
      return;
    }
    // V token chunk c (tile tokens 8c..8c+7): its offset inside the block and how many of its
    // tokens may be read (only tokens < hi; none for an invalid block or a chunk before lo).
    int64_t v_off[2];
    int v_bytes[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int tin = in_off + 8 * c;
      v_off[c] = int64_t(tin / p.cs.v_tx) * p.cs.v_stc + tin % p.cs.v_tx;
      const int64_t tok0 = ts + 8 * c;
      int64_t nv = hi - tok0;
      nv = nv < 0 ? 0 : (nv > 8 ? 8 : nv);
      if (id < 0 || tok0 + 8 <= lo) nv = 0;
      v_bytes[c] = int(nv) * int(sizeof(T));
    }
#pragma unroll
    for (int i = 0; i < 2 * D / 32; ++i) {
      const int d = v_chunk_major ? (i * 32) % D + lane : i * 16 + (lane >> 1);
      const int c = v_chunk_major ? (i * 32) / D : lane & 1;
      const int nbytes = c ? v_bytes[1] : v_bytes[0];
      const T* src = nbytes > 0 ? vb + (c ? v_off[1] : v_off[0]) + d * p.cs.v_sd : vc;
      mma::cp_async_16(vs + mmadec::vswz(d, c), src, nbytes);
    }
  };
  auto issue = [&](int n) {  // n = 0, 1, 2, ... in order
    const int64_t ts = tile_start(part0, n);
    if (hi <= lo || ts >= hi) return;
    if ((n & 31) == 0 && n > 0) ids = ids_next, ids_next = fetch_ids(part0, n + 32);
    const int32_t id = __shfl_sync(0xffffffffu, ids, n & 31);
    if (lane == 0) ok_ring[warp][n % NST] = id >= 0;
    const int in_off = offset_in_block(ts);
    T* ks = my_pipe + (n % NST) * Tr::kStageElems;
    T* vs = ks + Tr::kTileElems;
    const T* kb = kh + int64_t(id < 0 ? 0 : id) * p.cs.k_sb;
    const T* vb = vh + int64_t(id < 0 ? 0 : id) * p.cs.v_sb;
    if constexpr (kSw128) {
#if ATTNKIT_HAS_NHD_TMA
      // The whole tile (its 16 rows lie in one valid block: block sizes are multiples of 16);
      // rows outside [lo, hi) are zeroed after landing, as below.
      if (lane == 0) {
        uint64_t* bar = &full[warp][n % NST];
        bulk::arrive_expect_tx(bar, id >= 0 ? 2u * TILE * D * sizeof(T) : 0u);
        if (id >= 0) {
#pragma unroll
          for (int c = 0; c < D / 64; ++c) {
            tma::load_4d(ks + c * TILE * 64, map_k, c * 64, int(hk), in_off, id, bar);
            tma::load_4d(vs + c * TILE * 64, map_v, c * 64, int(hk), in_off, id, bar);
          }
        }
      }
#endif
    } else if constexpr (kBulk) {
      if (lane == 0) {
        uint64_t* bar = &full[warp][n % NST];
        bulk::arrive_expect_tx(bar, id >= 0 ? 2u * Tr::kTileElems * sizeof(T) : 0u);
        if (id >= 0) {
          const T* k0 = kb + int64_t(in_off) * 8;  // token stride 8 (bulk_layout)
          if (p.cs.k_sdc == TILE * 8) {
            bulk::copy(ks, k0, Tr::kTileElems * sizeof(T), bar);
          } else {
            for (int c = 0; c < D / 8; ++c) {
              bulk::copy(ks + c * TILE * 8, k0 + c * p.cs.k_sdc, TILE * 16, bar);
            }
          }
          // ASM: token chunks in_off / 8 and the next are adjacent; vLLM (block size 16): the block.
          bulk::copy(vs, vb + int64_t(in_off / p.cs.v_tx) * p.cs.v_stc, Tr::kTileElems * sizeof(T), bar);
        }
      }
    } else {
      issue_cp_async(ts, id, in_off, kb, vb, ks, vs);
    }
  };

  // Put the first tiles in flight, then stage Q while they travel.
#pragma unroll
  for (int s = 0; s < NST - 1; ++s) {
    issue(s);
    if constexpr (!kBulk) mma::cp_async_commit();
  }

  // Q rows hk*G .. hk*G + G - 1 of token qtok -> q_s (zeros below), any strides; kRows: those of
  // the chunk's tokens qtok + i, i < nrows.
  {
    const T* q = static_cast<const T*>(p.q) + qtok * p.q_st + hk * G * p.q_sh;
    for (int idx = tid; idx < 16 * D; idx += Tr::kThreads) {
      const int r = idx / D, d = idx % D;
      if constexpr (kRows) {  // column r = (row r / G, head r % G)
        const int i = r / G, h = r % G;
        q_s[mmadec::kswz<D>(r, d & ~7) + (d & 7)] =
            i < nrows ? q[i * p.q_st + h * p.q_sh + d * p.q_sd] : from_float<T>(0.0f);
      } else {
        q_s[mmadec::kswz<D>(r, d & ~7) + (d & 7)] = r < G ? q[r * p.q_sh + d * p.q_sd] : from_float<T>(0.0f);
      }
    }
  }
  __syncthreads();
  // Qᵀ as the B operand of Sᵀ = K·Qᵀ: head block nb (heads 8nb..8nb+7) and k step kk hold
  // Q[head 8nb + g][dims 16kk + 2t, +1] and [.. + 8, + 9]. One ldmatrix_x4 covers two k steps.
  const int g = lane >> 2, t4 = lane & 3;
  uint32_t qf[NB][D / 16][2];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int kk = 0; kk < D / 16; kk += 2) {
      uint32_t r[4];
      mma::ldmatrix_x4(r, q_s + mmadec::kswz<D>(nb * 8 + (lane & 7), kk * 16 + (lane >> 3) * 8));
      qf[nb][kk][0] = r[0], qf[nb][kk][1] = r[1], qf[nb][kk + 1][0] = r[2], qf[nb][kk + 1][1] = r[3];
    }

  // This thread's heads (the C columns): 8nb + 2·t4 + j, j = 0, 1.
  float slope[NB][2];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = nb * 8 + 2 * t4 + j;
      const bool col = kRows ? r / G < nrows : r < G;
      slope[nb][j] = (p.alibi && col) ? p.alibi[hk * G + (kRows ? r % G : r)] : 0.0f;
    }
  // kRows: the keys [clo, chi) each of this thread's columns sees and its query position (a
  // column past the chunk's rows sees none), and the keys every column sees, [all_lo, all_hi)
  // (the chunk's last row's window start, its first row's limit): tiles inside it take the plain
  // path. Column row i is the sequence's row r0 + i.
  int64_t clo[NB][2], chi[NB][2], cpos[NB][2];
  int64_t all_lo = lo, all_hi = hi;
  if constexpr (kRows) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int i = (nb * 8 + 2 * t4 + j) / G;
        const RowWindow wc = row_window(sq.L, sq.qlen, r0 + i, p.window);
        clo[nb][j] = i < nrows ? wc.lo : 0;
        chi[nb][j] = i < nrows ? wc.hi : 0;
        cpos[nb][j] = wc.qpos;
      }
    all_lo = row_window(sq.L, sq.qlen, r0 + nrows - 1, p.window).lo;
    all_hi = row_window(sq.L, sq.qlen, r0, p.window).hi;
  }
  // Tiles wholly inside the window with neither soft-cap nor ALiBi take the short logit path:
  // their raw scores s stay as they are, the log2-domain logit s·scale_log2 being formed by the
  // FFMA in front of exp2. That needs scale > 0 (the max of s·scale_log2 is then the max of s
  // times scale_log2, rounding included); paged_attention_v1 passes the caller's scale unchecked,
  // so with a zero, negative or NaN one every tile takes the general path (finish_logit, whose
  // (s·scale)·log2e may round an ulp away from the s·scale_log2 such a scale got before).
  const bool plain_logits = !(p.softcap > 0.0f) && p.alibi == nullptr && p.scale > 0.0f;
  const float scale_log2 = p.scale * kLog2e;

  // Oᵀ [D][heads]: o[mt][nb] is the C tile of dims 16mt..16mt+15 x heads 8nb..8nb+7.
  float o[D / 16][NB][4];
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) o[mt][nb][0] = o[mt][nb][1] = o[mt][nb][2] = o[mt][nb][3] = 0.0f;
  // Running max (log2 domain) and this thread's partial sum per head; m is the same on the 8
  // lanes sharing a head, so the partial sums are summed across lanes only at the end.
  float m[NB][2], l[NB][2];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) m[nb][0] = m[nb][1] = -INFINITY, l[nb][0] = l[nb][1] = 0.0f;

  for (int n = 0; hi > lo; ++n) {
    const int64_t ts = tile_start(part0, n);
    if (ts >= hi) break;
    issue(n + NST - 1);
    if constexpr (kBulk) {
      bulk::wait(&full[warp][n % NST], uint32_t(n / NST) & 1u);
    } else {
      mma::cp_async_commit();
      mma::cp_async_wait<NST - 1>();
      __syncwarp();
    }

    const bool blk_ok = ok_ring[warp][n % NST] != 0;
    T* ks = my_pipe + (n % NST) * Tr::kStageElems;
    T* vs = ks + Tr::kTileElems;
    if constexpr (!kBulk && !kNhd) {
      if (blk_ok && ts < lo) {
        // A V chunk of 8 tokens is read whole once it reaches the window, so the tokens before
        // lo in the window's first chunk came in too (they may hold anything, NaN included):
        // zero them, since their zero probabilities must not meet them.
        for (int i = lane; i < 8 * D; i += 32) {
          const int tk = i % 8 + int((lo - ts) / 8) * 8, d = i / 8;
          if (tk < TILE && ts + tk < lo) vs[mmadec::vswz(d, tk >> 3) + (tk & 7)] = from_float<T>(0.0f);
        }
        __syncwarp();
      }
    }
    if constexpr (kBulk) {
      if (!blk_ok) continue;  // nothing was copied; every score would be masked
      if (ts < lo || ts + TILE > hi) {
        // Whole tiles were copied: zero the V rows of tokens outside [lo, hi) (they may hold
        // anything, NaN included, and their zero probabilities must not meet them).
        for (int i = lane; i < TILE * D; i += 32) {
          const int tk = i % TILE, d = i / TILE;
          if (ts + tk < lo || ts + tk >= hi) {
            if constexpr (kNhd) {
              vs[mmadec::sw128(tk, d)] = from_float<T>(0.0f);
            } else {
              vs[mmadec::vbulk<D>(v_chunk_major, d, tk >> 3) + (tk & 7)] = from_float<T>(0.0f);
            }
          }
        }
        bulk::fence_proxy_async();  // these writes precede the copy engine's next refill
        __syncwarp();
      }
    }

    // Sᵀ [16 tokens][heads] = K·Qᵀ: A = the K tile (tokens are the rows), B = Qᵀ. With G <= 8
    // query heads one n8 column block holds them all, so a 16-token tile costs D/16 mma.
    float sacc[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) sacc[nb][0] = sacc[nb][1] = sacc[nb][2] = sacc[nb][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t af[4];
      const int krow = (lane & 7) + ((lane >> 3) & 1) * 8, kcol = kk * 16 + (lane >> 4) * 8;
      mma::ldmatrix_x4(af, ks + (kBulk ? (kNhd ? mmadec::sw128(krow, kcol) : mmadec::kbulk(krow, kcol))
                                       : mmadec::kswz<D>(krow, kcol)));
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) mma::mma_16816<T>(sacc[nb], af, qf[nb][kk]);
    }

    // Logits: sacc[nb][e] (token g + 8(e / 2), head 8nb + 2·t4 + e % 2) times c is the logit in
    // the log2 domain: c = scale_log2 on the plain path (raw scores), else 1 (finished logits,
    // -inf where masked).
    float c = 1.0f;
    if (plain_logits && blk_ok && ts >= all_lo && ts + TILE <= all_hi) {
      c = scale_log2;
    } else {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t tok = ts + g + 8 * (e >> 1);
          const bool vis = kRows ? blk_ok && tok >= clo[nb][e & 1] && tok < chi[nb][e & 1]
                                 : blk_ok && tok >= lo && tok < hi;
          const int64_t qp = kRows ? cpos[nb][e & 1] : qpos;
          sacc[nb][e] = vis ? finish_logit(sacc[nb][e], p.scale, p.softcap, slope[nb][e & 1], tok, qp) * kLog2e
                            : -INFINITY;
        }
    }
    // The running max moves (and O, l are rescaled) only when some head's new scores exceed it by
    // more than kRescaleSlack (log2 units): otherwise probabilities stay below 2^kRescaleSlack,
    // harmless in fp32 sums and 16-bit P. Decided per warp, so the branch never diverges. m is the
    // same on the 8 lanes of a column, so "some column's max exceeds m + slack" is "some lane's
    // own 2-score max does": the shuffles for the column max run only when m moves. With c > 0,
    // max(s)·c rounds to max(s·c), so m is what the max of the scaled scores gives.
    float mx[NB][2];
    bool grow = false;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        mx[nb][j] = fmaxf(sacc[nb][j], sacc[nb][j + 2]);
        grow |= mx[nb][j] * c > m[nb][j] + kRescaleSlack;
      }
    if (__any_sync(0xffffffffu, grow)) {
      float f[NB][2];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float v = mx[nb][j];
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
          const float mn = fmaxf(m[nb][j], v * c);
          f[nb][j] = ex2_approx(m[nb][j] - (mn == -INFINITY ? 0.0f : mn));  // m = -inf -> 0
          m[nb][j] = mn;
          l[nb][j] *= f[nb][j];
        }
#pragma unroll
      for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          o[mt][nb][0] *= f[nb][0], o[mt][nb][1] *= f[nb][1];
          o[mt][nb][2] *= f[nb][0], o[mt][nb][3] *= f[nb][1];
        }
    }
    // Pᵀ = 2^(s·c - m): one FFMA and one ex2.approx.ftz per score (exp2's input is now rounded
    // once, not after the product and again after the difference: it may differ from the
    // unfused form by an ulp; results below 2^-126 flush to 0). A column with nothing visible
    // yet keeps base 0: 2^(-inf) = 0, never NaN. Packed to 16 bits; movmatrix turns the C tile
    // (tokens as rows) into the B operand of Oᵀ += Vᵀ·Pᵀ (tokens as k).
    uint32_t pb[NB][2];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const float b0 = m[nb][0] == -INFINITY ? 0.0f : m[nb][0];
      const float b1 = m[nb][1] == -INFINITY ? 0.0f : m[nb][1];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sacc[nb][e] = ex2_approx(fmaf(sacc[nb][e], c, -((e & 1) ? b1 : b0)));
      }
      l[nb][0] += sacc[nb][0] + sacc[nb][2];
      l[nb][1] += sacc[nb][1] + sacc[nb][3];
      pb[nb][0] = mma::movmatrix_trans(mma::pack2<T>(sacc[nb][0], sacc[nb][1]));
      pb[nb][1] = mma::movmatrix_trans(mma::pack2<T>(sacc[nb][2], sacc[nb][3]));
    }
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      // Vᵀ [16 dims][16 tokens] as the A operand: matrices (dims 0-7 | 8-15) x (tokens 0-7 | 8-15).
      uint32_t af[4];
      if constexpr (kNhd) {
        // V [16 tokens][D] token-major: transposed 8x8 loads.
        const int vtok = (lane & 7) + (lane >> 4) * 8, vcol = mt * 16 + ((lane >> 3) & 1) * 8;
        mma::ldmatrix_x4_trans(af, vs + (kBulk ? mmadec::sw128(vtok, vcol) : mmadec::kswz<D>(vtok, vcol)));
      } else {
        const int vrow = mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, vchunk = lane >> 4;
        mma::ldmatrix_x4(af, vs + (kBulk ? mmadec::vbulk<D>(v_chunk_major, vrow, vchunk)
                                         : mmadec::vswz(vrow, vchunk)));
      }
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) mma::mma_16816<T>(o[mt][nb], af, pb[nb]);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  if constexpr (!kBulk) mma::cp_async_wait<0>();
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      l[nb][j] += __shfl_xor_sync(0xffffffffu, l[nb][j], 4);
      l[nb][j] += __shfl_xor_sync(0xffffffffu, l[nb][j], 8);
      l[nb][j] += __shfl_xor_sync(0xffffffffu, l[nb][j], 16);
    }
  __syncthreads();  // every warp is out of its ring: the buffers become the merge area

  constexpr int RS = Tr::kRedStride;
  float* red_o = reinterpret_cast<float*>(pipe);        // [4][16][RS]
  float* red_ml = red_o + Tr::kWarps * 16 * RS;         // [4][16][2]
  {
    float* ow = red_o + warp * 16 * RS;
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const int h0 = nb * 8 + 2 * t4, d0 = mt * 16 + g;
        ow[h0 * RS + d0] = o[mt][nb][0];
        ow[(h0 + 1) * RS + d0] = o[mt][nb][1];
        ow[h0 * RS + d0 + 8] = o[mt][nb][2];
        ow[(h0 + 1) * RS + d0 + 8] = o[mt][nb][3];
      }
    if (g == 0) {
      float* mlw = red_ml + warp * 32;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int h = nb * 8 + 2 * t4 + j;
          mlw[h * 2] = m[nb][j], mlw[h * 2 + 1] = l[nb][j];
        }
    }
  }
  __syncthreads();

  if (wait_to_write) pdl_wait();  // a forward that runs every sequence wrote zeros to these rows
  T* out = static_cast<T*>(p.out);
  // The columns stored: the G heads of the token, or kRows the (row, head) pairs of the chunk.
  const int ncols = kRows ? int(nrows) * G : G;
  for (int idx = tid; idx < ncols * D; idx += Tr::kThreads) {
    const int r = idx / D, d = idx % D;
    const int i = kRows ? r / G : 0;  // the column's row of the chunk (the sequence's r0 + i)
    const int64_t tok = qtok + i;
    float M = -INFINITY;
#pragma unroll
    for (int wi = 0; wi < Tr::kWarps; ++wi) M = fmaxf(M, red_ml[wi * 32 + r * 2]);
    float lsum = 0.0f, acc = 0.0f;
#pragma unroll
    for (int wi = 0; wi < Tr::kWarps; ++wi) {
      const float mw = red_ml[wi * 32 + r * 2];
      const float f = mw == -INFINITY ? 0.0f : exp2f(mw - M);
      lsum += f * red_ml[wi * 32 + r * 2 + 1];
      acc += f * red_o[(wi * 16 + r) * RS + d];
    }
    const int64_t h = hk * G + (kRows ? r % G : r);
    if (splits == 1) {
      out[tok * p.o_st + h * p.o_sh + d * p.o_sd] = from_float<T>(lsum > 0.0f ? acc / lsum : 0.0f);
      if (d == 0 && p.lse) {  // natural log: M is in the log2 domain
        p.lse[h * p.lse_sh + tok * p.lse_st] = lsum > 0.0f ? M * (1.0f / kLog2e) + logf(lsum) : -INFINITY;
      }
    } else {
      // Short sequences: split row (sequence, row of the sequence), short_seq_rows per sequence.
      const int64_t srow = short_seqs ? b * p.short_seq_rows + r0 + i : tok;
      const int64_t ws_row = (srow * p.Hq + h) * splits + split;
      p.ws_out[ws_row * D + d] = acc;
      if (d == 0) {
        p.ws_ml[ws_row * 2] = M == -INFINITY ? -INFINITY : M * (1.0f / kLog2e);  // natural log
        p.ws_ml[ws_row * 2 + 1] = lsum;
      }
    }
  }
  if (wait_at_end) pdl_wait();  // beside_forward: this grid ends after the forward
#endif  // ATTNKIT_HAS_MMA_SM80
}

template <typename T, int D, int BS, bool kBulk, bool kNhd, int NB, bool kRows = false>
__global__ void __launch_bounds__(MmaDecodeTraits<D>::kThreads)
    paged_decode_mma_kernel(const DecodeParams p) {
  static_assert(!(kBulk && kNhd), "NHD bulk tiles take the tensor-map kernel");
  decode_mma_body<T, D, BS, kBulk, kNhd, NB, kRows>(p, nullptr, nullptr);
}

#if ATTNKIT_HAS_NHD_TMA
// NHD caches through tensor maps (sm_90): maps over {D, Hkv, block_size, num_blocks}, boxes
// {64, 1, 16, 1}, 128-byte swizzle (built by the launcher; csrc/cuda/tma_map.h).
template <typename T, int D, int NB, bool kRows = false>
__global__ void __launch_bounds__(MmaDecodeTraits<D, true>::kThreads)
    paged_decode_mma_nhd_tma_kernel(const DecodeParams p, const __grid_constant__ CUtensorMap map_k,
                                    const __grid_constant__ CUtensorMap map_v) {
  decode_mma_body<T, D, 0, true, true, NB, kRows>(p, &map_k, &map_v);
}
#endif

}  // namespace paged
}  // namespace attnkit
