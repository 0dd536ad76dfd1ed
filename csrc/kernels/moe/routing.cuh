// MoE routing kernels (torch-free): the deterministic permutation, unpermute and its backward,
// silu_and_mul and the expert load balance (top-k routing is route.cuh). Launch helpers take raw
// pointers, sizes and a stream; the caller checks the launch.
//
// The permutation is a stable counting sort of the N = T·k (token, slot) pairs by bucket, where
// bucket e < E is expert e and bucket E collects ids outside [0, E) (dropped pairs, which take
// the last rows and are zero-filled). Four launches, no atomics, no host sync:
//   1. rank:    per chunk of kChunk pairs, each pair's rank among the earlier pairs of its bucket
//               in the chunk, and the chunk's count per bucket;
//   2. scan:    per bucket, an exclusive scan of its counts over the chunks;
//   3. offsets: an exclusive scan of the bucket totals -> bucket starts (expert_offsets);
//   4. scatter: row = start[bucket] + chunk prefix + rank; copy (or zero) the row.
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

// One block per bucket: counts[:, bucket] becomes its exclusive prefix over chunks.
__global__ void permute_scan_kernel(int32_t* __restrict__ counts, int64_t chunks, int E,
                                    int32_t* __restrict__ totals) {
  __shared__ int32_t smem[kScanThreads];
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
  if (threadIdx.x == 0) totals[b] = total;
}

// One block: starts[b] = sum of totals before bucket b; expert_offsets = starts[0..E].
__global__ void permute_offsets_kernel(const int32_t* __restrict__ totals, int E,
                                       int32_t* __restrict__ starts,
                                       int32_t* __restrict__ expert_offsets) {
  __shared__ int32_t smem[kScanThreads];
  const int B = E + 1;
  const int per = (B + kScanThreads - 1) / kScanThreads;
  const int b0 = threadIdx.x * per, b1 = b0 + per < B ? b0 + per : B;
  int32_t local = 0;
  for (int b = b0; b < b1; ++b) local += totals[b];
  int32_t total;
  int32_t run = block_exclusive_scan(local, smem, &total);
  for (int b = b0; b < b1; ++b) {
    starts[b] = run;
    expert_offsets[b] = run;  // bucket E's start is expert_offsets[E]: the kept rows
    run += totals[b];
  }
}

// One block per pair: its row in `permuted`, then a copy of the token row (or zeros for a
// dropped pair). Rows are a bijection onto [0, n), so every output row is written exactly once.
// A permutation moves bits, so rows are copied as `words` words of type Word (uint4 = 16-byte
// loads/stores when the row size and pointers allow it): one instantiation per word size, not
// per dtype.
template <typename Word, typename index_t>
__global__ void permute_scatter_kernel(const Word* __restrict__ x, const index_t* __restrict__ ids,
                                       const int32_t* __restrict__ rank,
                                       const int32_t* __restrict__ chunk_prefix,
                                       const int32_t* __restrict__ starts, int64_t n, int k,
                                       int E, int64_t words, Word* __restrict__ permuted,
                                       int32_t* __restrict__ row_map) {
  const int64_t i = blockIdx.x;
  const int b = bucket_of(ids[i], E);
  const int64_t row = int64_t(starts[b]) + chunk_prefix[(i / kChunk) * (E + 1) + b] + rank[i];
  if (row < 0 || row >= n) return;  // cannot happen by construction; never write outside
  if (threadIdx.x == 0) row_map[i] = b < E ? int32_t(row) : -1;
  Word* dst = permuted + row * words;
  if (b < E) {
    const Word* src = x + (i / k) * words;
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < words; v += blockDim.x) dst[v] = src[v];
  } else {
    for (int64_t v = threadIdx.x; v < words; v += blockDim.x) dst[v] = Word{};
  }
}

inline int64_t permute_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Workspaces: rank [n], counts [chunks*(E+1)] zeroed, totals [E+1], starts [E+1].
template <typename Word, typename index_t>
void launch_permute(const Word* x, const index_t* ids, int64_t tokens, int k, int E,
                    int64_t words, Word* permuted, int32_t* expert_offsets, int32_t* row_map,
                    int32_t* rank, int32_t* counts, int32_t* totals, int32_t* starts,
                    cudaStream_t stream) {
  const int64_t n = tokens * k, chunks = permute_chunks(n);
  permute_rank_kernel<index_t><<<chunks, kChunk, 0, stream>>>(ids, n, E, rank, counts);
  permute_scan_kernel<<<E + 1, kScanThreads, 0, stream>>>(counts, chunks, E, totals);
  permute_offsets_kernel<<<1, kScanThreads, 0, stream>>>(totals, E, starts, expert_offsets);
  permute_scatter_kernel<Word, index_t><<<n, kRowThreads, 0, stream>>>(
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
