// MoE routing kernels (torch-free): the deterministic permutation, unpermute and its backward,
// silu_and_mul and the expert load balance (top-k routing is route.cuh). Launch helpers take raw
// pointers, sizes and a stream; the caller checks the launch.
//
// The permutation is a stable counting sort of the N = T·k (token, slot) pairs by bucket, where
// bucket e < E is expert e and bucket E collects ids outside [0, E) (dropped pairs, which take
// the last rows and are zero-filled). Three launches after the workspace memset, no host sync:
//   1. rank:    per chunk of kChunk pairs, each pair's rank among the earlier pairs of its bucket
//               in the chunk, and the chunk's count per bucket;
//   2. scan:    per bucket, an exclusive scan of its counts over the chunks; the last block to
//               finish (one atomic ticket: a sync point, not a sum, so the result is fixed) then
//               scans the bucket totals -> bucket starts (expert_offsets);
//   3. scatter: per token, row = start[bucket] + chunk prefix + rank for each of its k pairs;
//               the token row is read once and written to its k rows (zeros for a dropped pair).
// The whole op is bandwidth-bound (T rows read, T·k written): every launch on its critical path
// before the scatter is pure latency, hence the fused offsets and the token-major scatter.
#pragma once

#include <cfloat>
#include <cstdint>

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

// counts [chunks, E+1] must be zero on entry.
template <typename index_t>
__global__ void permute_rank_kernel(const index_t* __restrict__ ids, int64_t n, int E,
                                    int32_t* __restrict__ rank, int32_t* __restrict__ counts) {
  __shared__ int32_t bucket_s[kChunk];
  const int tid = threadIdx.x;
  const int64_t i = int64_t(blockIdx.x) * kChunk + tid;
  const int b = i < n ? bucket_of(ids[i], E) : -1;
  bucket_s[tid] = b;
  __syncthreads();
  if (i >= n) return;
  int32_t r = 0;
  for (int j = 0; j < tid; ++j) r += bucket_s[j] == b;
  bool last = true;
  for (int j = tid + 1; j < kChunk && last; ++j) last = bucket_s[j] != b;
  rank[i] = r;
  if (last) counts[int64_t(blockIdx.x) * (E + 1) + b] = r + 1;
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

// One block per bucket: counts[:, bucket] becomes its exclusive prefix over chunks and
// totals[bucket] its sum. `ticket` (zero on entry) counts finished blocks; the last one scans the
// totals into starts / expert_offsets, so the scatter needs no launch in between.
__global__ void permute_scan_kernel(int32_t* __restrict__ counts, int64_t chunks, int E,
                                    int32_t* __restrict__ totals, int32_t* __restrict__ ticket,
                                    int32_t* __restrict__ starts,
                                    int32_t* __restrict__ expert_offsets) {
  __shared__ int32_t smem[kScanThreads];
  __shared__ bool last;
  const int64_t B = E + 1, b = blockIdx.x;
  const int64_t per = (chunks + kScanThreads - 1) / kScanThreads;
  const int64_t c0 = threadIdx.x * per, c1 = c0 + per < chunks ? c0 + per : chunks;
  int32_t local = 0;
  for (int64_t c = c0; c < c1; ++c) local += counts[c * B + b];
  int32_t total;
  int32_t run = block_exclusive_scan(local, smem, &total);
  for (int64_t c = c0; c < c1; ++c) {
    const int32_t v = counts[c * B + b];
    counts[c * B + b] = run;
    run += v;
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

// One block per token: the rows of its k pairs (threads 0..k-1, kRowThreads pairs at a time),
// then the token row read once, in batches of kUnroll words per thread so several loads are in
// flight, and stored to each pair's row (zeros for a dropped pair). Rows are a bijection onto
// [0, n), so every output row is written exactly once. A permutation moves bits: rows are copied
// as `words` words of type Word (uint4 = 16-byte accesses when the row size and pointers allow),
// one instantiation per word size, not per dtype.
template <typename Word, typename index_t>
__global__ void __launch_bounds__(kRowThreads)
    permute_scatter_kernel(const Word* __restrict__ x, const index_t* __restrict__ ids,
                           const int32_t* __restrict__ rank,
                           const int32_t* __restrict__ chunk_prefix,
                           const int32_t* __restrict__ starts, int64_t n, int k, int E,
                           int64_t words, Word* __restrict__ permuted,
                           int32_t* __restrict__ row_map) {
  constexpr int kUnroll = 4;
  // Each pair's destination: row + 1 for a kept pair, -(row + 1) for a dropped one (zero-filled),
  // 0 for none (cannot happen by construction; never write outside `permuted`).
  __shared__ int64_t dest_s[kRowThreads];
  const int64_t t = blockIdx.x;
  const Word* src = x + t * words;
  for (int s0 = 0; s0 < k; s0 += kRowThreads) {
    const int m = k - s0 < kRowThreads ? k - s0 : kRowThreads;
    if (int(threadIdx.x) < m) {
      const int64_t i = t * k + s0 + threadIdx.x;
      const int b = bucket_of(ids[i], E);
      const int64_t row = int64_t(starts[b]) + chunk_prefix[(i / kChunk) * (E + 1) + b] + rank[i];
      const bool inside = row >= 0 && row < n;
      dest_s[threadIdx.x] = !inside ? 0 : b < E ? row + 1 : -(row + 1);
      row_map[i] = inside && b < E ? int32_t(row) : -1;
    }
    __syncthreads();
    for (int64_t v0 = threadIdx.x; v0 < words; v0 += int64_t(kUnroll) * kRowThreads) {
      Word w[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * kRowThreads;
        w[u] = v < words ? src[v] : Word{};
      }
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

inline int64_t permute_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Workspaces: rank [n], counts [chunks*(E+1) + 1] zeroed (the last entry is the scan's ticket),
// totals [E+1], starts [E+1].
template <typename Word, typename index_t>
void launch_permute(const Word* x, const index_t* ids, int64_t tokens, int k, int E,
                    int64_t words, Word* permuted, int32_t* expert_offsets, int32_t* row_map,
                    int32_t* rank, int32_t* counts, int32_t* totals, int32_t* starts,
                    cudaStream_t stream) {
  const int64_t n = tokens * k, chunks = permute_chunks(n);
  int32_t* ticket = counts + chunks * (E + 1);
  permute_rank_kernel<index_t><<<chunks, kChunk, 0, stream>>>(ids, n, E, rank, counts);
  permute_scan_kernel<<<E + 1, kScanThreads, 0, stream>>>(counts, chunks, E, totals, ticket,
                                                           starts, expert_offsets);
  permute_scatter_kernel<Word, index_t><<<tokens, kRowThreads, 0, stream>>>(
      x, ids, rank, counts, starts, n, k, E, words, permuted, row_map);
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
