// MoE routing kernels (torch-free): the deterministic permutation, unpermute and its backward,
// silu_and_mul and the expert load balance (top-k routing is route.cuh). Launch helpers take raw
// pointers, sizes and a stream; the caller checks the launch.
//
// The permutation is a stable counting sort of the N = T·k (token, slot) pairs by bucket, where
// bucket e < E is expert e and bucket E collects ids outside [0, E) (dropped pairs, which take
// the last rows and are zero-filled). Three launches, no host sync:
//   1. rank:    per chunk c of kChunk pairs, each pair's rank among the earlier pairs of its bucket
//               in the chunk, and the chunk's count per bucket, counts[bucket][c] (bucket-major,
//               so the scan reads each bucket's counts contiguously). Up to kRankMaxBuckets
//               buckets: warp-level ranks (match_any) and a per-chunk histogram in shared memory,
//               every count written (zeros too: no memset). More buckets: the per-pair walk over
//               the chunk, after a memset of `counts`;
//   2. scan:    per bucket, an exclusive scan of its counts over the chunks; the last block to
//               finish (one atomic ticket: a sync point, not a sum, so the result is fixed) then
//               scans the bucket totals -> bucket starts (expert_offsets). With the lean prologue
//               (launch_options.h) and up to kAtomicStartsMaxBuckets buckets, each block instead
//               adds its total into the starts of every later bucket with atomic adds (integer
//               sums: the same result in any order), zeroed by the rank kernel, so the chain
//               ends when the last block's adds land instead of after a second, serial stage;
//   3. scatter: per token, row = start[bucket] + chunk prefix + rank for each of its k pairs;
//               the token row is read once and written to its k rows (zeros for a dropped pair).
// The whole op is bandwidth-bound (T rows read, T·k written): every launch on its critical path
// before the scatter is pure latency, hence the fused offsets, the token-major scatter, and, on
// sm_90+, programmatic dependent launch (kernels/common/pdl.cuh): the scan is scheduled while the
// rank kernel runs and the scatter while the scan runs (with the lean prologue, the rank kernel
// while the kernel before the op ends); the scatter loads its token row's first words (an input
// no kernel of the op writes) before it waits for the prologue's results.
#pragma once

#include <cfloat>
#include <cstdint>

#include "kernels/common/pdl.cuh"
#include "kernels/moe/choose.h"  // kRankMaxBuckets, permute_rank_hist
#include "kernels/moe/common.cuh"

namespace attnkit {
namespace moe {

constexpr int kChunk = 256;  // pairs per rank block (= its threads)
constexpr int kScanThreads = 256;
constexpr int kRowThreads = 128;

// ---- permutation -------------------------------------------------------------------------------
template <typename index_t>
ATTNKIT_DEVICE ATTNKIT_INLINE int bucket_of(index_t id, int E) {
  return (id >= 0 && id < index_t(E)) ? int(id) : E;
}

ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t permute_chunks(int64_t n) {
  return (n + kChunk - 1) / kChunk;
}

// Rank of chunk c (block c), E + 1 <= kRankMaxBuckets. Pair i's rank is the number of pairs
// j < i of the chunk in its bucket: the pairs of its own warp below it (popc of the match_any
// mask under its lane) plus those of the warps before it, which a shared-memory histogram of the
// chunk holds when the warps add their counts one after another (one leader per bucket and warp:
// the lowest lane of its mask; warp order, so the result is fixed). The final histogram is the
// chunk's count per bucket: every bucket's count is written, zeros included, so `counts` needs no
// memset. Block 0 also zeroes the scan's ticket. Lanes past n take bucket -1 (no histogram entry).
template <typename index_t>
__global__ void __launch_bounds__(kChunk)
    permute_rank_kernel(const index_t* __restrict__ ids, int64_t n, int E,
                        int32_t* __restrict__ rank, int32_t* __restrict__ counts,
                        int32_t* __restrict__ ticket, int32_t* __restrict__ zero_starts) {
  extern __shared__ int32_t hist[];  // [E + 1]
  // Launched with PDL (the lean prologue), this grid may start before the kernel that wrote ids
  // ends: it waits first. Only then may the scan and the scatter be scheduled: the scatter reads
  // x before its own wait, and x too may come from that kernel. (A no-op without PDL.)
  pdl_wait();
  pdl_launch_dependents();  // the scan may be scheduled; it waits for this grid's end
  constexpr int kWarps = kChunk / kWarpSize;
  const int B = E + 1, tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t chunks = permute_chunks(n), c = blockIdx.x, i = c * kChunk + tid;
  const int b = i < n ? bucket_of(ids[i], E) : -1;
  for (int e = tid; e < B; e += kChunk) hist[e] = 0;
  if (c == 0 && tid == 0) *ticket = 0;
  if (c == 0 && zero_starts != nullptr) {  // the scan's atomic starts add into zeros
    for (int e = tid; e < B; e += kChunk) zero_starts[e] = 0;
  }
  const lane_mask_t peers = match_any(b);  // the whole warp: blocks are kChunk = full warps
  const lane_mask_t below = peers & lanes_below(lane);
  int32_t base = 0;  // set in the bucket's leader lane: its pairs in the warps before this one
  __syncthreads();   // the histogram is zeroed
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w && b >= 0 && below == 0) {
      base = hist[b];
      hist[b] = base + popc(peers);
    }
    __syncthreads();
  }
  base = shfl(base, lowest_lane(peers));
  if (i < n) rank[i] = base + popc(below);
  for (int e = tid; e < B; e += kChunk) counts[int64_t(e) * chunks + c] = hist[e];
}

// Rank of chunk c for any number of buckets (E + 1 > kRankMaxBuckets): each pair walks the
// chunk's buckets in shared memory (O(kChunk) per pair), and the last pair of each bucket in the
// chunk writes its count. counts must be zero on entry (absent buckets are not written).
template <typename index_t>
__global__ void __launch_bounds__(kChunk)
    permute_rank_walk_kernel(const index_t* __restrict__ ids, int64_t n, int E,
                             int32_t* __restrict__ rank, int32_t* __restrict__ counts,
                             int32_t* __restrict__ ticket, int32_t* __restrict__ zero_starts) {
  __shared__ int32_t bucket_s[kChunk];
  pdl_wait();  // as in permute_rank_kernel (this one is always an ordinary launch: a no-op)
  pdl_launch_dependents();
  const int tid = threadIdx.x;
  const int64_t chunks = permute_chunks(n), c = blockIdx.x, i = c * kChunk + tid;
  const int b = i < n ? bucket_of(ids[i], E) : -1;
  bucket_s[tid] = b;
  if (c == 0 && tid == 0) *ticket = 0;
  if (c == 0 && zero_starts != nullptr) {
    for (int e = tid; e <= E; e += kChunk) zero_starts[e] = 0;
  }
  __syncthreads();
  if (i >= n) return;
  int32_t r = 0;
  for (int j = 0; j < tid; ++j) r += bucket_s[j] == b;
  bool last = true;
  for (int j = tid + 1; j < kChunk && last; ++j) last = bucket_s[j] != b;
  rank[i] = r;
  if (last) counts[int64_t(b) * chunks + c] = r + 1;
}

// The exclusive scan of the E + 1 bucket totals by one block: starts (and expert_offsets, whose
// entry E is the number of kept rows). `totals` is read with ld.global.cg: other blocks wrote it.
ATTNKIT_DEVICE ATTNKIT_INLINE void scan_bucket_totals(const int32_t* totals, int E, int32_t* smem,
                                                      int32_t* __restrict__ starts,
                                                      int32_t* __restrict__ expert_offsets) {
  const int B = E + 1;
  const int per = (B + kScanThreads - 1) / kScanThreads;
  const int b0 = threadIdx.x * per, b1 = b0 + per < B ? b0 + per : B;
  int32_t local = 0;
  for (int b = b0; b < b1; ++b) local += load_cg(totals + b);
  int32_t total;
  int32_t run = block_exclusive_scan(local, smem, &total);
  for (int b = b0; b < b1; ++b) {
    starts[b] = run;
    expert_offsets[b] = run;  // bucket E's start is expert_offsets[E]: the kept rows
    run += load_cg(totals + b);
  }
}

// One block per bucket: its row of counts (bucket-major, `chunks` contiguous ints, each thread a
// contiguous run of them) becomes its exclusive prefix over chunks and totals[bucket] its sum.
// `ticket` (zeroed by the rank kernel) counts finished blocks; the last one scans the totals into
// starts / expert_offsets, so the scatter needs no launch in between. Under PDL this grid may
// start while the rank kernel runs: nothing is read or written before pdl_wait().
__global__ void __launch_bounds__(kScanThreads)
    permute_scan_kernel(int32_t* __restrict__ counts, int64_t chunks, int E,
                        int32_t* __restrict__ totals, int32_t* __restrict__ ticket,
                        int32_t* __restrict__ starts, int32_t* __restrict__ expert_offsets,
                        bool atomic_starts) {
  __shared__ int32_t smem[kScanThreads];
  __shared__ bool last;
  pdl_launch_dependents();  // the scatter may be scheduled and load its token rows
  pdl_wait();               // the rank kernel's counts and ticket
  const int64_t b = blockIdx.x;
  int32_t* col = counts + b * chunks;
  const int64_t per = (chunks + kScanThreads - 1) / kScanThreads;
  const int64_t c0 = threadIdx.x * per, c1 = c0 + per < chunks ? c0 + per : chunks;
  int32_t local = 0;
  for (int64_t c = c0; c < c1; ++c) local += col[c];
  int32_t total;
  int32_t run = block_exclusive_scan(local, smem, &total);
  for (int64_t c = c0; c < c1; ++c) {
    const int32_t v = col[c];
    col[c] = run;
    run += v;
  }
  if (atomic_starts) {  // expert_offsets (zeroed by the rank kernel) is the starts array here
    for (int64_t j = b + 1 + threadIdx.x; j <= E; j += kScanThreads) {
      atomicAdd(expert_offsets + j, total);
    }
    return;
  }
  if (threadIdx.x == 0) {
    totals[b] = total;
    __threadfence();  // totals[b] is visible before the ticket says this block is done
    last = atomicAdd(ticket, 1) == int(gridDim.x) - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  scan_bucket_totals(totals, E, smem, starts, expert_offsets);
}

// Words v0 + u·kRowThreads (u < U) of a row, zeros past its end. kCoherent: through ld.global.ca
// instead of the read-only path the compiler picks for a const __restrict__ row: ptxas may sink
// read-only (.nc) loads below griddepcontrol.wait (it did for sm_90a, CUDA 13.0), which would
// undo the scatter's prefetch, and keeps coherent ones ahead of it. HIP: plain loads.
template <bool kCoherent, int U, typename Word>
ATTNKIT_DEVICE ATTNKIT_INLINE void load_row_words(const Word* src, int64_t words, int64_t v0,
                                                  Word (&w)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t v = v0 + int64_t(u) * kRowThreads;
#if defined(__CUDA_ARCH__) && !defined(__HIPCC__)
    if (kCoherent) {
      w[u] = v < words ? __ldca(src + v) : Word{};
      continue;
    }
#endif
    w[u] = v < words ? src[v] : Word{};
  }
}

// One block per token: the rows of its k pairs (threads 0..k-1, kRowThreads pairs at a time),
// then the token row read once, in batches of kUnroll words per thread so several loads are in
// flight, and stored to each pair's row (zeros for a dropped pair). Rows are a bijection onto
// [0, n), so every output row is written exactly once. A permutation moves bits: rows are copied
// as `words` words of type Word (uint4 = 16-byte accesses when the row size and pointers allow),
// one instantiation per word size, not per dtype.
// Under PDL this grid may start while the scan (and the rank kernel) still run: before pdl_wait()
// it reads only x and ids (inputs the op never writes): the first batch of row words and the first
// pairs' buckets. rank / chunk_prefix / starts are read after it with coherent loads (load_cg, not
// the read-only path: they are written while this grid is resident).
template <typename Word, typename index_t>
__global__ void __launch_bounds__(kRowThreads)
    permute_scatter_kernel(const Word* __restrict__ x, const index_t* __restrict__ ids,
                           const int32_t* rank, const int32_t* chunk_prefix,
                           const int32_t* starts, int64_t n, int k, int E, int64_t words,
                           Word* __restrict__ permuted, int32_t* __restrict__ row_map) {
  constexpr int kUnroll = 4;
  constexpr int64_t kStep = int64_t(kUnroll) * kRowThreads;
  // Each pair's destination: row + 1 for a kept pair, -(row + 1) for a dropped one (zero-filled),
  // 0 for none (cannot happen by construction; never write outside `permuted`).
  __shared__ int64_t dest_s[kRowThreads];
  const int64_t t = blockIdx.x, chunks = permute_chunks(n);
  const Word* src = x + t * words;
  Word w[kUnroll];
  load_row_words<true>(src, words, threadIdx.x, w);  // the words at v0 = threadIdx.x
  // The bucket of pair s = threadIdx.x (the first batch of pairs).
  int b = int(threadIdx.x) < k ? bucket_of(ids[t * k + threadIdx.x], E) : E;
  pdl_wait();  // the prologue's rank, chunk prefixes and starts
  bool loaded = true;  // w holds the first batch
  for (int s0 = 0; s0 < k; s0 += kRowThreads) {
    const int m = k - s0 < kRowThreads ? k - s0 : kRowThreads;
    if (int(threadIdx.x) < m) {
      const int64_t i = t * k + s0 + threadIdx.x;
      if (s0 > 0) b = bucket_of(ids[i], E);
      const int64_t row = int64_t(load_cg(starts + b)) +
                          load_cg(chunk_prefix + int64_t(b) * chunks + i / kChunk) +
                          load_cg(rank + i);
      const bool inside = row >= 0 && row < n;
      dest_s[threadIdx.x] = !inside ? 0 : b < E ? row + 1 : -(row + 1);
      row_map[i] = inside && b < E ? int32_t(row) : -1;
    }
    __syncthreads();
    for (int64_t v0 = threadIdx.x; v0 < words; v0 += kStep) {
      if (!loaded) load_row_words<false>(src, words, v0, w);
      loaded = false;
      for (int j = 0; j < m; ++j) {
        const int64_t d = dest_s[j];
        if (d == 0) continue;
        Word* dst = permuted + ((d > 0 ? d : -d) - 1) * words;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = v0 + int64_t(u) * kRowThreads;
          if (v < words) dst[v] = d > 0 ? w[u] : Word{};
        }
      }
    }
    __syncthreads();  // dest_s is rewritten by the next batch of pairs
  }
}

// Workspaces: rank [n], counts [chunks*(E+1) + 1] (the last entry is the scan's ticket; nothing
// needs zeroing: the rank kernel writes every count on the histogram path and is preceded by a
// memset of the counts on the walk path), totals [E+1], starts [E+1]. `hist`: the histogram rank
// kernel, where E + 1 <= kRankMaxBuckets (choose.h permute_rank_hist; the walk for more buckets
// whatever `hist` says, since the histogram would not fit); `pdl`: the scan and scatter with
// programmatic dependent launch where the running code has it (launch_options.h); `lean`: the
// lean prologue (launch_options.h): the histogram rank kernel with PDL too (it waits before it
// reads ids, which an earlier kernel may write; the walk, after its memset, stays an ordinary
// launch), and the starts summed with atomics where E + 1 <= kAtomicStartsMaxBuckets (choose.h
// permute_atomic_starts): then expert_offsets, zeroed by the rank kernel, is the starts array the
// scatter reads, and totals / starts are unused.
// Returns the walk path's memset error (nothing launched after it), else cudaGetLastError() after
// the launches, for the caller's C10_CUDA_CHECK.
template <typename Word, typename index_t>
cudaError_t launch_permute(const Word* x, const index_t* ids, int64_t tokens, int k, int E,
                    int64_t words, Word* permuted, int32_t* expert_offsets, int32_t* row_map,
                    int32_t* rank, int32_t* counts, int32_t* totals, int32_t* starts, bool hist,
                    bool pdl, bool lean, cudaStream_t stream) {
  const int64_t n = tokens * k, chunks = permute_chunks(n);
  int32_t* ticket = counts + chunks * (E + 1);
  const bool atomic = permute_atomic_starts(E, lean);
  int32_t* zero_starts = atomic ? expert_offsets : nullptr;
  if (permute_rank_hist(E, hist)) {
    launch_kernel(permute_rank_kernel<index_t>, pdl && lean, dim3(chunks), dim3(kChunk),
                  size_t(E + 1) * sizeof(int32_t), stream, ids, n, E, rank, counts, ticket,
                  zero_starts);
  } else {
    const cudaError_t err =
        cudaMemsetAsync(counts, 0, size_t(chunks) * (E + 1) * sizeof(int32_t), stream);
    if (err != cudaSuccess) return err;
    permute_rank_walk_kernel<index_t><<<chunks, kChunk, 0, stream>>>(ids, n, E, rank, counts,
                                                                     ticket, zero_starts);
  }
  launch_kernel(permute_scan_kernel, pdl, dim3(E + 1), dim3(kScanThreads), 0, stream, counts,
                chunks, E, totals, ticket, starts, expert_offsets, atomic);
  launch_kernel(permute_scatter_kernel<Word, index_t>, pdl, dim3(tokens), dim3(kRowThreads), 0,
                stream, x, ids, rank, counts, atomic ? expert_offsets : starts, n, k, E, words,
                permuted, row_map);
  return cudaGetLastError();
}

// ---- unpermute and its backward: one block per token ------------------------------------------
template <typename T, int VEC>
__global__ void unpermute_kernel(const T* __restrict__ perm, const int32_t* __restrict__ row_map,
                                 const acc_t<T>* __restrict__ w, int64_t M, int k, int64_t H,
                                 T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t t = blockIdx.x;
  for (int64_t v = threadIdx.x; v < H / VEC; v += blockDim.x) {
    A acc[VEC];
    for (int j = 0; j < VEC; ++j) acc[j] = A(0);
    for (int s = 0; s < k; ++s) {  // slot order: a fixed summation order
      const int64_t r = row_map[t * k + s];
      if (r < 0 || r >= M) continue;  // dropped (or out of range): contributes nothing
      const A ws = w[t * k + s];
      const Vec<T, VEC> p = load_vec<T, VEC>(perm + r * H + v * VEC);
      for (int j = 0; j < VEC; ++j) acc[j] += ws * to_acc<A>(p.v[j]);
    }
    Vec<T, VEC> o;
    for (int j = 0; j < VEC; ++j) o.v[j] = from_acc<T>(acc[j]);
    store_vec<T, VEC>(out + t * H + v * VEC, o);
  }
}

template <typename T, int VEC>
void launch_unpermute(const T* perm, const int32_t* row_map, const acc_t<T>* w, int64_t tokens,
                      int64_t M, int k, int64_t H, T* out, cudaStream_t stream) {
  unpermute_kernel<T, VEC><<<tokens, kRowThreads, 0, stream>>>(perm, row_map, w, M, k, H, out);
}

// grad_perm must be zero on entry (rows no token reads get no gradient).
template <typename T, int VEC>
__global__ void unpermute_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ perm,
                                     const int32_t* __restrict__ row_map,
                                     const acc_t<T>* __restrict__ w, int64_t M, int k, int64_t H,
                                     T* __restrict__ grad_perm, acc_t<T>* __restrict__ grad_w) {
  using A = acc_t<T>;
  __shared__ A red[kRowThreads / kWarpSize];
  const int64_t t = blockIdx.x;
  const T* g = grad + t * H;
  for (int s = 0; s < k; ++s) {
    const int64_t r = row_map[t * k + s];
    const bool valid = r >= 0 && r < M;
    const A ws = w[t * k + s];
    A dot = A(0);
    if (valid) {
      for (int64_t v = threadIdx.x; v < H / VEC; v += blockDim.x) {
        const Vec<T, VEC> gv = load_vec<T, VEC>(g + v * VEC);
        const Vec<T, VEC> pv = load_vec<T, VEC>(perm + r * H + v * VEC);
        Vec<T, VEC> o;
        for (int j = 0; j < VEC; ++j) {
          const A gj = to_acc<A>(gv.v[j]);
          dot += gj * to_acc<A>(pv.v[j]);
          o.v[j] = from_acc<T>(ws * gj);
        }
        store_vec<T, VEC>(grad_perm + r * H + v * VEC, o);
      }
    }
    dot = block_sum(dot, red);
    if (threadIdx.x == 0) grad_w[t * k + s] = valid ? dot : A(0);
  }
}

template <typename T, int VEC>
void launch_unpermute_bwd(const T* grad, const T* perm, const int32_t* row_map, const acc_t<T>* w,
                          int64_t tokens, int64_t M, int k, int64_t H, T* grad_perm,
                          acc_t<T>* grad_w, cudaStream_t stream) {
  unpermute_bwd_kernel<T, VEC><<<tokens, kRowThreads, 0, stream>>>(grad, perm, row_map, w, M, k,
                                                                    H, grad_perm, grad_w);
}

// ---- silu_and_mul: one block per row -----------------------------------------------------------
template <typename T, int VEC>
__global__ void silu_and_mul_kernel(const T* __restrict__ x, int64_t I, T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const T* gate = x + row * 2 * I;
  const T* up = gate + I;
  for (int64_t v = threadIdx.x; v < I / VEC; v += blockDim.x) {
    const Vec<T, VEC> a = load_vec<T, VEC>(gate + v * VEC);
    const Vec<T, VEC> b = load_vec<T, VEC>(up + v * VEC);
    Vec<T, VEC> o;
    for (int j = 0; j < VEC; ++j) {
      const A av = to_acc<A>(a.v[j]);
      o.v[j] = from_acc<T>(av / (A(1) + exp(-av)) * to_acc<A>(b.v[j]));
    }
    store_vec<T, VEC>(out + row * I + v * VEC, o);
  }
}

template <typename T, int VEC>
void launch_silu_and_mul(const T* x, int64_t rows, int64_t I, T* out, cudaStream_t stream) {
  silu_and_mul_kernel<T, VEC><<<rows, kRowThreads, 0, stream>>>(x, I, out);
}

// ---- expert load balance: one block -------------------------------------------------------------
// order[p] = the expert at position p of (load descending, id ascending), a strict total order
// (the caller maps NaN loads to 0) so `order` is a permutation; then one thread runs the greedy
// LPT assignment (E·W steps; E and W are small) with the rank loads in shared memory.
__global__ void load_balance_kernel(const double* __restrict__ loads, int E, int W,
                                    int32_t* __restrict__ order, int64_t* __restrict__ assign) {
  extern __shared__ double rank_load[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const double le = loads[e];
    int pos = 0;
    for (int j = 0; j < E; ++j) pos += loads[j] > le || (loads[j] == le && j < e);
    order[pos] = e;
  }
  for (int r = threadIdx.x; r < W; r += blockDim.x) rank_load[r] = 0.0;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int p = 0; p < E; ++p) {
    const int e = order[p];
    if (e < 0 || e >= E) continue;  // defensive: never index outside the loads
    int best = 0;
    for (int r = 1; r < W; ++r) best = rank_load[r] < rank_load[best] ? r : best;
    assign[e] = best;
    rank_load[best] += loads[e];
  }
}

inline void launch_load_balance(const double* loads, int E, int W, int32_t* order,
                                int64_t* assign, cudaStream_t stream) {
  load_balance_kernel<<<1, 256, W * sizeof(double), stream>>>(loads, E, W, order, assign);
}

}  // namespace moe
}  // namespace attnkit
