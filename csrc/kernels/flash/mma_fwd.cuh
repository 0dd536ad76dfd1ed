// Tensor-core flash attention forward (FlashAttention-2 structure on mma.sync m16n8k16), fp16 /
// bf16, head dims 64 and 128. Torch-free; sm80+ only (ATTNKIT_HAS_MMA_SM80), the portable kernels
// in simt.cuh serve everything else.
//
// A CTA of 4 warps owns 64 query rows (16 per warp) of one (sequence, head). K and V tiles of 64
// rows stream through shared memory with cp.async: V of tile n loads while S = Q K^T of tile n is
// computed, K of tile n+1 while O += P V of tile n runs. Rows of 16-byte chunks are XOR-swizzled
// (chunk ^ row % 8) so that ldmatrix reads of 8 rows hit 8 different bank groups. S stays in
// registers; the online softmax (online_softmax.cuh, the warp-specialised forward's too) works in
// the log2 domain, row statistics are reduced over the 4 lanes of a quad, and P is packed from
// the S accumulators straight into A fragments. Only key tiles inside the window are visited, and only tiles that
// cross a window edge (or the sequence end) are masked element by element.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/portability.h"
#include "kernels/common/mma.cuh"
#include "kernels/flash/online_softmax.cuh"
#include "kernels/flash/params.h"

namespace attnkit {
namespace flash {
namespace mma {

constexpr int kBM = 64, kBN = 64, kWarps = 4, kThreads = kWarps * 32;

template <int kD>
constexpr int fwd_smem_bytes() {
  return (kBM + 2 * kBN) * kD * 2;  // Q, K, V tiles of 16-bit elements
}

// Element offset of (row, col) in a swizzled [rows][kD] tile; col is a multiple of 8 for ldmatrix.
template <int kD>
ATTNKIT_DEVICE ATTNKIT_INLINE int swz(int row, int col) {
  return row * kD + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

#if ATTNKIT_HAS_MMA_SM80
using namespace ::attnkit::mma;  // mma.sync / ldmatrix / cp.async helpers

// Rows [0, n) of a 64-row tile (row r at src + r * row_stride) -> swizzled shared memory; rows
// past n are zero-filled (cp.async with 0 source bytes reads nothing).
template <typename T, int kD>
ATTNKIT_DEVICE ATTNKIT_INLINE void load_tile_async(T* dst, const T* src, int64_t row_stride,
                                                   int64_t n) {
  constexpr int kChunks = kD / 8;
  for (int e = threadIdx.x; e < 64 * kChunks; e += kThreads) {
    const int r = e / kChunks, c = e % kChunks;
    const bool valid = r < n;
    cp_async_16(dst + swz<kD>(r, c * 8), valid ? src + r * row_stride + c * 8 : src, valid ? 16 : 0);
  }
}
#endif

template <typename T, int kD, bool kSoftcap>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(Params p, const T* __restrict__ q, const T* __restrict__ k,
               const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse) {
#if ATTNKIT_HAS_MMA_SM80
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ks = qs + kBM * kD;
  T* vs = ks + kBN * kD;
  constexpr int kDT = kD / 8;   // n8 tiles of the output
  constexpr int kDK = kD / 16;  // k16 steps over the head dim
  constexpr int kNT = kBN / 8;  // n8 tiles of S
  constexpr float kLog2e = 1.4426950408889634f;

  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  // The scores in "max units" (online_softmax.cuh): raw (scaled by factor later) or the capped
  // log2 value.
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  const float factor = kSoftcap ? 1.f : scale * kLog2e;
  const float scale_over_cap = kSoftcap ? scale / cap : 0.f, cap_log2 = cap * kLog2e;
  const SeqRange s = seq_range(p, b);
  const int64_t ntiles = (s.lq + kBM - 1) / kBM;

  // Last tiles first: under a causal mask they see the most keys, so the longest CTAs start first.
  for (int64_t tt = blockIdx.x; tt < ntiles; tt += gridDim.x) {
    const int64_t i0 = (ntiles - 1 - tt) * kBM;
    const int64_t rows = s.lq - i0 < kBM ? s.lq - i0 : kBM;
    const int64_t lo = key_range(p, i0, s.lq, s.lk).lo;
    const int64_t hi = key_range(p, i0 + rows - 1, s.lq, s.lk).hi;
    const int64_t lo_last = key_range(p, i0 + rows - 1, s.lq, s.lk).lo;
    const int64_t hi_first = key_range(p, i0, s.lq, s.lk).hi;
    const int64_t r_row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
    const KeyRange kr[2] = {key_range(p, r_row[0], s.lq, s.lk), key_range(p, r_row[1], s.lq, s.lk)};
    const T* kbase = k + b * p.k.batch + s.k0 * p.k.row + hk * p.k.head;
    const T* vbase = v + b * p.v.batch + s.k0 * p.v.row + hk * p.v.head;

    float acc[kDT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
    uint32_t qf[kDK][4];

    __syncthreads();  // the previous tile's warps are done with qs / ks / vs
    if (lo <= hi) {
      load_tile_async<T, kD>(qs, q + b * p.q.batch + (s.q0 + i0) * p.q.row + h * p.q.head, p.q.row, rows);
      load_tile_async<T, kD>(ks, kbase + lo * p.k.row, p.k.row, hi - lo + 1);
      cp_async_commit();
    }
    for (int64_t j0 = lo; j0 <= hi; j0 += kBN) {
      cp_async_wait<0>();
      __syncthreads();  // K tile (and Q) landed; every warp finished P V of the previous tile
      load_tile_async<T, kD>(vs, vbase + j0 * p.v.row, p.v.row, hi - j0 + 1);
      cp_async_commit();
      if (j0 == lo) {
#pragma unroll
        for (int kk = 0; kk < kDK; ++kk) {
          const int row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
          ldmatrix_x4(qf[kk], qs + swz<kD>(row, kk * 16 + (lane / 16) * 8));
        }
      }
      // S = Q K^T for this warp's 16 rows x 64 keys.
      float sc[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
#pragma unroll
        for (int kk = 0; kk < kDK; ++kk) {
          const int mi = lane / 8;
          uint32_t r[4];
          ldmatrix_x4(r, ks + swz<kD>(np * 16 + (lane % 8) + (mi / 2) * 8, kk * 16 + (mi % 2) * 8));
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          mma_16816<T>(sc[2 * np], qf[kk], b0);
          mma_16816<T>(sc[2 * np + 1], qf[kk], b1);
        }
      }
      // The online softmax (online_softmax.cuh, shared with fwd_ws.cuh), element masks only
      // where the tile crosses a window edge or the sequence end. Key coordinates relative to lo
      // (the tile's keys and the rows' ranges lie in [0, lk), so they fit an int).
      float corr[2];
      const SoftmaxArgs sa{factor, scale_over_cap, cap_log2, static_cast<int>(j0 - lo),
                           {static_cast<int>(kr[0].lo - lo), static_cast<int>(kr[1].lo - lo)},
                           {static_cast<int>(kr[0].hi - lo), static_cast<int>(kr[1].hi - lo)}};
      online_softmax<kSoftcap>(sc, m, l, corr, sa, !(j0 >= lo_last && j0 + kBN - 1 <= hi_first));
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        acc[dt][0] *= corr[0], acc[dt][1] *= corr[0];
        acc[dt][2] *= corr[1], acc[dt][3] *= corr[1];
      }
      cp_async_wait<0>();
      __syncthreads();  // V landed; every warp finished reading K
      if (j0 + kBN <= hi) {
        load_tile_async<T, kD>(ks, kbase + (j0 + kBN) * p.k.row, p.k.row, hi - j0 - kBN + 1);
        cp_async_commit();
      }
      // O += P V: two n8 tiles of S are one A fragment of P.
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        const uint32_t pf[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]),
                                pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                                pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < kD / 16; ++dp) {
          const int mi = lane / 8;
          uint32_t r[4];
          ldmatrix_x4_trans(r, vs + swz<kD>(kk * 16 + (lane % 8) + (mi % 2) * 8, dp * 16 + (mi / 2) * 8));
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          mma_16816<T>(acc[2 * dp], pf, b0);
          mma_16816<T>(acc[2 * dp + 1], pf, b1);
        }
      }
    }
    // Epilogue: the rows' 1/l and lse (online_softmax.cuh), store rows inside the sequence.
    float inv[2], row_lse[2];
    finish_rows(m, l, inv, row_lse);
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int64_t i = r_row[rh];
      if (i >= s.lq) continue;
      T* orow = o + b * p.o.batch + (s.q0 + i) * p.o.row + h * p.o.head;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t4) =
            pack2<T>(acc[dt][rh * 2] * inv[rh], acc[dt][rh * 2 + 1] * inv[rh]);
      }
      if (t4 == 0) lse[b * p.lse.batch + h * p.lse.head + (s.q0 + i) * p.lse.row] = row_lse[rh];
    }
  }
#endif  // ATTNKIT_HAS_MMA_SM80
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }
inline bool strides8(const Strides& s) { return s.batch % 8 == 0 && s.row % 8 == 0 && s.head % 8 == 0; }

// Host side: the layout every tensor-core kernel needs, 16-byte aligned rows (cp.async and the
// 4-byte paired stores); choose.h's mma_ok. The device, dtype and head dim are choose.h's too.
inline bool fwd_layout_ok(const Params& p, const void* q, const void* k, const void* v,
                          const void* o) {
  return aligned16(q) && aligned16(k) && aligned16(v) && aligned16(o) && strides8(p.q) &&
         strides8(p.k) && strides8(p.v) && strides8(p.o);
}

template <typename T>
void launch_fwd(const Params& p, const T* q, const T* k, const T* v, T* o, float* lse,
                int64_t grid_rows, cudaStream_t stream) {
  int64_t tiles = (grid_rows + kBM - 1) / kBM;
  tiles = tiles < 1 ? 1 : (tiles > 65535 ? 65535 : tiles);  // the kernel loops over the rest
  // Tiles fastest: the CTAs reading one (sequence, head)'s K/V run together and share it in L2.
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.H), static_cast<unsigned>(p.B));
  // 48 KiB (D = 128) is the default dynamic shared-memory limit; the attribute keeps it explicit.
  auto run = [&](auto kernel, int smem) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<grid, kThreads, smem, stream>>>(p, q, k, v, o, lse);
  };
  const bool softcap = p.softcap > 0;
  if (p.D == 64) {
    softcap ? run(fwd_kernel<T, 64, true>, fwd_smem_bytes<64>())
            : run(fwd_kernel<T, 64, false>, fwd_smem_bytes<64>());
  } else {
    softcap ? run(fwd_kernel<T, 128, true>, fwd_smem_bytes<128>())
            : run(fwd_kernel<T, 128, false>, fwd_smem_bytes<128>());
  }
}

}  // namespace mma
}  // namespace flash
}  // namespace attnkit
