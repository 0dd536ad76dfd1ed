// Flash attention forward on Hopper warpgroup tensor cores (sm_90a, fp16 / bf16, head dim 64 or
// 128). Same pipeline as the GDPA forward (kernels/gdpa/fwd_wgmma.cuh), with the online softmax:
//
// CTA = (head, sequence, 128-row query tile), two warpgroups of 64 rows. Key tiles of 128 rows
// start at the first key any row of the tile sees and stop at the last one (a sliding window costs
// its width, not the sequence), streaming through a three-stage cp.async ring in the sw128 layout.
// Per key tile j each warpgroup issues S_j = Q·K_jᵀ and then O += P_{j-1}·V_{j-1} (wgmma, P from
// registers), waits for S_j only and runs the softmax of S_j (log2 domain, quad-reduced row
// statistics) while the tensor cores finish P_{j-1}·V_{j-1}; then rescales O by the running-max
// correction and packs P_j. Element masks only on tiles that cross a window edge or the end.
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/common/wgmma.cuh"
#include "kernels/flash/fast_math.cuh"
#include "kernels/flash/params.h"

namespace attnkit {
namespace flash {
namespace wg {

template <int kD>
struct FwdTraits {
  static_assert(kD == 64 || kD == 128, "wgmma forward: head dim 64 or 128");
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kBM = 128, kBN = 128, kStages = 3;
  static constexpr int kQBytes = kBM * kD * 2, kKVBytes = kBN * kD * 2;
  static constexpr int kSmemBytes = 1024 + kQBytes + 2 * kStages * kKVBytes;
};

// Rows left to load, as an int (a tile never needs more than its own rows).
ATTNKIT_DEVICE ATTNKIT_INLINE int clamp_rows(int64_t n) { return n > 4096 ? 4096 : int(n); }

#if ATTNKIT_HAS_WGMMA
// Epilogue: quad-reduce the row sums, normalise, store the thread's two rows (inside the sequence).
template <typename T, int kD>
ATTNKIT_DEVICE ATTNKIT_INLINE void store_rows_of_tile(const Params& p, T* o, float* lse, int64_t b,
                                                      int64_t h, const SeqRange& s,
                                                      const int64_t (&r_row)[2], int t4,
                                                      const float (&acc)[kD / 8][4], float (&l)[2],
                                                      const float (&m)[2]) {
  constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 1);
    l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 2);
    const int64_t i = r_row[rh];
    if (i >= s.lq) continue;
    // A row that sees no key has l = 0: output 0, lse -inf (DESIGN §3.3).
    const float inv = l[rh] > 0.f ? 1.f / l[rh] : 0.f;
    T* orow = o + b * p.o.batch + (s.q0 + i) * p.o.row + h * p.o.head;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t4) =
          ::attnkit::mma::pack2<T>(acc[dt][rh * 2] * inv, acc[dt][rh * 2 + 1] * inv);
    }
    if (t4 == 0) {
      lse[b * p.lse.batch + h * p.lse.head + (s.q0 + i) * p.lse.row] =
          l[rh] > 0.f ? m[rh] * kLn2 + logf(l[rh]) : -INFINITY;
    }
  }
}

#endif  // ATTNKIT_HAS_WGMMA

// kSoftcap: scores go through cap·tanh(·/cap) (a compile-time switch: the per-element softmax is
// the kernel's critical path, so the plain path must not carry the tanh even as a select).
// Requires scale > 0 (the launcher checks): the row maximum is then taken on raw scores and the
// scale folded into one FFMA per element, p = 2^(s·scale·log2e − m).
template <typename T, int kD, bool kSoftcap>
__global__ void __launch_bounds__(256, 1)
    fwd_kernel(Params p, const T* __restrict__ q, const T* __restrict__ k,
               const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse) {
#if ATTNKIT_HAS_WGMMA
  using Tr = FwdTraits<kD>;
  using MmaS = wgmma::Wgmma<T, Tr::kBN>;
  using MmaO = wgmma::Wgmma<T, kD>;
  constexpr int BM = Tr::kBM, BN = Tr::kBN, NT = Tr::kThreads, kNT = BN / 8, kDT = kD / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (::attnkit::mma::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* sq = smem;
  unsigned char* sk = sq + Tr::kQBytes;
  unsigned char* sv = sk + Tr::kStages * Tr::kKVBytes;
  const uint32_t sq_addr = ::attnkit::mma::smem_addr(sq), sk_addr = ::attnkit::mma::smem_addr(sk),
                 sv_addr = ::attnkit::mma::smem_addr(sv);

  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int warp_row0 = wg * 64 + ((tid / 32) & 3) * 16;
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / (p.H / p.Hkv);
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  // y = the score in "max units": raw (scaled by factor later) or the capped log2 value.
  const float factor = kSoftcap ? 1.f : scale * kLog2e;
  const float scale_over_cap = kSoftcap ? scale / cap : 0.f, cap_log2 = cap * kLog2e;
  const SeqRange s = seq_range(p, b);
  const int64_t ntiles = (s.lq + BM - 1) / BM;
  const T* kbase = k + b * p.k.batch + s.k0 * p.k.row + hk * p.k.head;
  const T* vbase = v + b * p.v.batch + s.k0 * p.v.row + hk * p.v.head;

  __shared__ uint64_t bars[2 * Tr::kStages];
  const wgmma::CpAsyncRing<Tr::kStages> ring{bars, bars + Tr::kStages};
  if (tid == 0) ring.init(NT);
  __syncthreads();
  uint32_t ring_base = 0;  // key tiles this CTA has streamed through the ring so far

  // Last tiles first: under a causal mask they see the most keys, so the longest CTAs start first.
  for (int64_t tt = blockIdx.x; tt < ntiles; tt += gridDim.x) {
    const int64_t i0 = (ntiles - 1 - tt) * BM;
    const int64_t rows = s.lq - i0 < BM ? s.lq - i0 : BM;
    const int64_t lo = key_range(p, i0, s.lq, s.lk).lo;
    const int64_t hi = key_range(p, i0 + rows - 1, s.lq, s.lk).hi;
    const int64_t lo_last = key_range(p, i0 + rows - 1, s.lq, s.lk).lo;
    const int64_t hi_first = key_range(p, i0, s.lq, s.lk).hi;
    const int64_t r_row[2] = {i0 + warp_row0 + g, i0 + warp_row0 + g + 8};
    const int n_tiles = lo <= hi ? static_cast<int>((hi - lo + BN) / BN) : 0;
    // Each row's visible keys relative to lo, as int32 (registers are the scarce resource here).
    int kr_lo[2], kr_hi[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const KeyRange kr = key_range(p, r_row[rh], s.lq, s.lk);
      kr_lo[rh] = kr.lo > hi ? n_tiles * BN : int(kr.lo - lo);  // lo > hi: an empty range
      kr_hi[rh] = kr.hi < lo ? -1 : int(kr.hi - lo);
    }

    float acc[kDT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;

    if (n_tiles == 0) {  // no visible key: output 0, lse -inf
      store_rows_of_tile<T, kD>(p, o, lse, b, h, s, r_row, t4, acc, l, m);
      continue;
    }
    // Key tile t -> ring slot ring_base + t (K and V; Q rides with t = 0).
    const T* qt = q + b * p.q.batch + (s.q0 + i0) * p.q.row + h * p.q.head;
    auto produce = [&](int t) {
      const uint32_t slot = ring_base + t;
      const int stage = slot % Tr::kStages;
      const int64_t first = lo + int64_t(t) * BN;
      ring.producer_acquire(slot);
      if (t == 0) wgmma::load_tile_sw128<BM, kD, NT>(sq, qt, p.q.row, int(rows), kD, qt, tid);
      wgmma::load_tile_sw128<BN, kD, NT>(sk + stage * Tr::kKVBytes, kbase + first * p.k.row, p.k.row,
                                         clamp_rows(hi - first + 1), kD, kbase, tid);
      wgmma::load_tile_sw128<BN, kD, NT>(sv + stage * Tr::kKVBytes, vbase + first * p.v.row, p.v.row,
                                         clamp_rows(hi - first + 1), kD, vbase, tid);
      ring.producer_commit(slot);
    };
    produce(0);

    uint32_t pa[BN / 16][4];  // P_{j-1}, the A operand of the delayed P·V
    for (int j = 0; j < n_tiles; ++j) {
      const int64_t j0 = lo + int64_t(j) * BN;
      const uint32_t slot = ring_base + j;
      const int stage = slot % Tr::kStages;
      // Tile j + 1 goes into the stage tile j - 2 used, once both warpgroups released it.
      if (j + 1 < n_tiles) produce(j + 1);
      ring.consumer_wait(slot);

      float sc[kNT][4];
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        MmaS::template ss<0>(sc, wgmma::desc_k_major<BM>(sq_addr, wg * 64, kk),
                             wgmma::desc_k_major<BN>(sk_addr + stage * Tr::kKVBytes, 0, kk), kk > 0);
      }
      wgmma::commit();
      if (j > 0) {
        const uint32_t sv_prev = sv_addr + ((slot - 1) % Tr::kStages) * Tr::kKVBytes;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          MmaO::template rs<1>(acc, pa[kk], wgmma::desc_n_major<BN>(sv_prev, kk), 1);
        }
        wgmma::commit();
        wgmma::wait<1>();  // S_j done; P_{j-1}·V_{j-1} may still run
      } else {
        wgmma::wait<0>();
      }
      wgmma::fence_regs(sc);

      const bool full = j0 >= lo_last && j0 + BN - 1 <= hi_first;
      float corr[2];
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = sc[nt][rh * 2 + e];
            if constexpr (kSoftcap) x = cap_log2 * tanh_fast(x * scale_over_cap);
            if (!full) {
              const int jj = j * BN + nt * 8 + 2 * t4 + e;
              if (jj < kr_lo[rh] || jj > kr_hi[rh]) x = -INFINITY;
            }
            sc[nt][rh * 2 + e] = x;
            mx = fmaxf(mx, x);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // m is kept in the log2 domain; a row with nothing visible so far keeps base 0:
        // 2^(-inf - 0) = 0, never NaN.
        const float m_new = fmaxf(m[rh], mx == -INFINITY ? -INFINITY : mx * factor);
        const float base = m_new == -INFINITY ? 0.f : m_new;
        corr[rh] = ex2_approx(m[rh] - base);
        m[rh] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = ex2_approx(fmaf(sc[nt][rh * 2 + e], factor, -base));
            sc[nt][rh * 2 + e] = pv;
            sum += pv;
          }
        }
        l[rh] = l[rh] * corr[rh] + sum;
      }
      wgmma::wait<0>();  // P_{j-1}·V_{j-1} done: O may be rescaled, pa overwritten
      wgmma::fence_regs(acc);
      if (j > 0) ring.consumer_release(slot - 1);
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        acc[dt][0] *= corr[0], acc[dt][1] *= corr[0];
        acc[dt][2] *= corr[1], acc[dt][3] *= corr[1];
      }
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = ::attnkit::mma::pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
        pa[kk][1] = ::attnkit::mma::pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
        pa[kk][2] = ::attnkit::mma::pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
        pa[kk][3] = ::attnkit::mma::pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
      }
    }
    const uint32_t last = ring_base + n_tiles - 1;
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      MmaO::template rs<1>(acc, pa[kk],
                           wgmma::desc_n_major<BN>(sv_addr + (last % Tr::kStages) * Tr::kKVBytes, kk), 1);
    }
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_regs(acc);
    ring.consumer_release(last);
    ring_base += n_tiles;
    store_rows_of_tile<T, kD>(p, o, lse, b, h, s, r_row, t4, acc, l, m);
    __syncthreads();  // the next query tile overwrites Q
  }
#endif  // ATTNKIT_HAS_WGMMA
}

template <typename T>
void launch_fwd(const Params& p, const T* q, const T* k, const T* v, T* o, float* lse,
                int64_t grid_rows, cudaStream_t stream) {
  int64_t tiles = (grid_rows + 127) / 128;
  tiles = tiles < 1 ? 1 : (tiles > 65535 ? 65535 : tiles);  // the kernel loops over the rest
  // Tiles fastest: the CTAs reading one (sequence, head)'s K/V run together and share it in L2.
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.H), static_cast<unsigned>(p.B));
  auto run = [&](auto kernel, int smem) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<grid, 256, smem, stream>>>(p, q, k, v, o, lse);
  };
  const bool cap = p.softcap > 0.0;
  if (p.D == 64) {
    constexpr int kSmem = FwdTraits<64>::kSmemBytes;
    cap ? run(fwd_kernel<T, 64, true>, kSmem) : run(fwd_kernel<T, 64, false>, kSmem);
  } else {
    constexpr int kSmem = FwdTraits<128>::kSmemBytes;
    cap ? run(fwd_kernel<T, 128, true>, kSmem) : run(fwd_kernel<T, 128, false>, kSmem);
  }
}

}  // namespace wg
}  // namespace flash
}  // namespace attnkit
