// Flash attention CPU kernels (DESIGN §3.3): tiled online softmax with O(N) memory, every product
// a tile GEMM (tile_gemm.h). Forward is parallel over (sequence, head, query tile). Backward is
// parallel over (sequence, kv head): a task owns dK/dV of its kv head and dQ of the query heads
// that read it, so there are no atomics and the result is deterministic; it recomputes P from the
// saved lse tile by tile. Only the key tiles a query tile can see are visited, so a sliding window
// costs O(window), not O(sequence).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/flash_args.h"
#include "common/flash_serving.h"
#include "cpu/tile_gemm.h"

namespace attnkit {
namespace flash {
namespace {

using cpu::gemm_nn;
using cpu::gemm_nt;
using cpu::gemm_tn;
using cpu::acc_type_t;
using cpu::wrap;

// Scores of one tile, s = scale · Q Kᵀ (soft-capped), with every key outside a query's window set
// to -inf. With `tcap` non-null it also keeps tanh(s / cap) for the backward's chain rule. Row i
// of the tile is query position i0 + i / group (the backward stacks `group` heads per position).
template <typename acc_t>
void scores_tile(const Params& p, acc_t* st, acc_t* tcap, const acc_t* qt, const acc_t* kt,
                 int64_t bm, int64_t bn, int64_t D, int64_t i0, int64_t j0, int64_t lq,
                 int64_t lk, int64_t group = 1) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t cap = static_cast<acc_t>(p.softcap);
  gemm_nt(st, bn, qt, D, kt, D, bm, bn, D);
  auto S = wrap(st, bm, bn, bn);
  S.mul_(static_cast<acc_t>(p.scale));
  if (cap > 0) {
    S.div_(cap).tanh_();
    if (tcap) wrap(tcap, bm, bn, bn).copy_(S);
    S.mul_(cap);
  }
  for (int64_t i = 0; i < bm; ++i) {
    const KeyRange kr = key_range(p, i0 + i / group, lq, lk);
    for (int64_t j = 0; j < bn; ++j) {
      if (j0 + j < kr.lo || j0 + j > kr.hi) st[i * bn + j] = neg_inf;
    }
  }
}

template <typename scalar_t, typename acc_t>
inline void load_rows(acc_t* dst, const scalar_t* base, int64_t row_stride, int64_t rows,
                      int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = base + r * row_stride;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(dst + r * D, s, D * sizeof(acc_t));  // libc's copy is wider than -O3's SSE
    } else {
      for (int64_t c = 0; c < D; ++c) dst[r * D + c] = static_cast<acc_t>(s[c]);
    }
  }
}

// Tiles stack the G query heads of a kv head: row r of a tile is query position i0 + r / G of
// head hk·G + r % G. The heads share K, V and the mask, so one product serves all G.
// Stacked query rows per forward tile (G positions at least). Without a mask, larger tiles mean
// fewer calls; under a mask, smaller ones leave less of the edge tiles masked out, and a band
// (both window ends bounded) has two edges per row. Measured at D = 64, S = 80 to 1024.
constexpr int64_t kFwdRowsFull = 256;
constexpr int64_t kFwdRowsOneEdge = 96;
constexpr int64_t kFwdRowsBand = 64;
constexpr int64_t kFwdBlockN = 256;  // key rows per forward tile
constexpr int64_t kBwdRows = 128;    // stacked query rows per backward tile
constexpr int64_t kBwdBlockN = 128;  // key rows per backward tile

// Rows of `pos` query positions × `heads` consecutive heads, position-major, converted to acc_t.
template <typename scalar_t, typename acc_t>
inline void load_head_rows(acc_t* dst, const scalar_t* base, int64_t row_stride,
                           int64_t head_stride, int64_t pos, int64_t heads, int64_t D) {
  for (int64_t i = 0; i < pos; ++i) {
    load_rows(dst + i * heads * D, base + i * row_stride, head_stride, heads, D);
  }
}

// Scratch whose alignment (ATen's 64 bytes) does not change from run to run, so the BLAS takes
// the same code path, and sums in the same order, every time.
template <typename T>
inline T* scratch(std::vector<at::Tensor>& keep, int64_t n) {
  keep.push_back(at::empty({std::max<int64_t>(n, 1)},
                           at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value)));
  return keep.back().template data_ptr<T>();
}

// Query positions per tile of a sequence of `lq`: equal tiles of at most `most` positions
// (80 = 40 + 40, not 64 + 16), which under a causal mask leaves less of the diagonal masked out.
inline int64_t tile_step(int64_t lq, int64_t most) {
  const int64_t ntiles = (lq + most - 1) / most;
  return ntiles > 0 ? (lq + ntiles - 1) / ntiles : 1;
}

// Query positions [first, last] of the tile of `bm` positions at i0 that see some key of
// [j0, j0 + bn); first > last when none does. Both window ends grow with the position, so the
// span is contiguous; along a causal diagonal it halves the work of a tile.
struct PositionSpan {
  int64_t first, last;
};
inline PositionSpan positions_seeing(const Params& p, int64_t i0, int64_t bm, int64_t j0,
                                     int64_t bn, int64_t lq, int64_t lk) {
  int64_t first = 0, last = bm - 1;
  while (first <= last && key_range(p, i0 + first, lq, lk).hi < j0) ++first;
  while (last >= first && key_range(p, i0 + last, lq, lk).lo > j0 + bn - 1) --last;
  return {first, last};
}

// Row maximum with eight independent lanes, so the compiler vectorises it.
template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t s[8] = {neg_inf, neg_inf, neg_inf, neg_inf, neg_inf, neg_inf, neg_inf, neg_inf};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int u = 0; u < 8; ++u) s[u] = std::max(s[u], x[j + u]);
  }
  for (; j < n; ++j) s[0] = std::max(s[0], x[j]);
  for (int u = 1; u < 8; ++u) s[0] = std::max(s[0], s[u]);
  return s[0];
}

// Row sum with eight independent lanes (vectorised, in a fixed order).
template <typename acc_t>
inline acc_t row_sum(const acc_t* x, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int u = 0; u < 8; ++u) s[u] += x[j + u];
  }
  for (; j < n; ++j) s[0] += x[j];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename scalar_t>
void fwd_impl(const Params& p, const scalar_t* q, const scalar_t* k, const scalar_t* v,
              scalar_t* o, acc_type_t<scalar_t>* lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = p.D, G = p.H / p.Hkv;
  const int edges = (p.window_left >= 0) + (p.window_right >= 0);
  const int64_t most = edges == 0 ? kFwdRowsFull : edges == 1 ? kFwdRowsOneEdge : kFwdRowsBand;
  const int64_t npos = std::max<int64_t>(1, most / G);
  const int64_t R = npos * G;  // positions, rows of a tile
  const acc_t scale = static_cast<acc_t>(p.scale), cap = static_cast<acc_t>(p.softcap);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  // Scores are kept in base 2, s · log2(e), so that P = 2^(s2 - m2): ATen's exp2 is ~3x faster
  // than its exp on the CPU (vectorised, not the high-accuracy MKL VML), and the rounding is
  // the same relative size.
  const acc_t log2e = static_cast<acc_t>(1.4426950408889634);
  const acc_t ln2 = static_cast<acc_t>(0.6931471805599453);
  // Work items (sequence, kv head, query tile), numbered sequence-major.
  std::vector<int64_t> start(p.B + 1, 0);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t lq = seq_range(p, b).lq;
    const int64_t step = tile_step(lq, npos);
    start[b + 1] = start[b] + p.Hkv * ((lq + step - 1) / step);
  }

  at::parallel_for(0, start[p.B], 1, [&](int64_t begin, int64_t end) {
    std::vector<at::Tensor> keep;
    acc_t* qt = scratch<acc_t>(keep, R * D);
    acc_t* kt = scratch<acc_t>(keep, kFwdBlockN * D);
    acc_t* vt = scratch<acc_t>(keep, kFwdBlockN * D);
    acc_t* acc = scratch<acc_t>(keep, R * D);  // O, unnormalised
    acc_t* l = scratch<acc_t>(keep, R);        // softmax denominators
    acc_t* st = scratch<acc_t>(keep, R * kFwdBlockN);
    acc_t* m = scratch<acc_t>(keep, R);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = std::upper_bound(start.begin(), start.end(), w) - start.begin() - 1;
      const SeqRange s = seq_range(p, b);
      const int64_t step = tile_step(s.lq, npos), hk = (w - start[b]) % p.Hkv, h0 = hk * G;
      const int64_t i0 = (w - start[b]) / p.Hkv * step, bm = std::min(step, s.lq - i0);
      const int64_t rows = bm * G, row0 = s.q0 + i0;
      load_head_rows(qt, q + b * p.q.batch + row0 * p.q.row + h0 * p.q.head, p.q.row, p.q.head,
                     bm, G, D);
      std::fill(acc, acc + rows * D, acc_t(0));
      std::fill(l, l + rows, acc_t(0));
      std::fill(m, m + rows, neg_inf);
      // Key rows any query of the tile can see (both window ends grow with the query index),
      // cut into equal key tiles.
      const int64_t lo = key_range(p, i0, s.lq, s.lk).lo;
      const int64_t hi = key_range(p, i0 + bm - 1, s.lq, s.lk).hi;
      const int64_t bn_step = hi >= lo ? tile_step(hi - lo + 1, kFwdBlockN) : 1;
      for (int64_t j0 = lo; j0 <= hi; j0 += bn_step) {
        const int64_t bn = std::min(bn_step, hi - j0 + 1);
        // Only the positions that see a key of this tile take part.
        const auto [first, last] = positions_seeing(p, i0, bm, j0, bn, s.lq, s.lk);
        if (first > last) continue;
        const int64_t r0 = first * G, nr = (last - first + 1) * G;
        load_rows(kt, k + b * p.k.batch + (s.k0 + j0) * p.k.row + hk * p.k.head, p.k.row, bn, D);
        load_rows(vt, v + b * p.v.batch + (s.k0 + j0) * p.v.row + hk * p.v.head, p.v.row, bn, D);
        // s2 = log2(e) · scale · Q Kᵀ in one product (the factors as its alpha); soft-capped,
        // s2 = log2(e) · cap · tanh(scale · Q Kᵀ / cap), with the 1 / cap in the alpha.
        auto S = wrap(st, nr, bn, bn);
        at::addmm_out(S, S, wrap(qt + r0 * D, nr, D, D), wrap(kt, bn, D, D).t(), 0,
                      cap > 0 ? scale / cap : scale * log2e);
        if (cap > 0) S.tanh_().mul_(cap * log2e);
        // Online softmax. Keys outside a row's window are set to -inf; only rows whose window
        // edge falls inside the tile have any.
        for (int64_t i = first; i <= last; ++i) {
          const KeyRange kr = key_range(p, i0 + i, s.lq, s.lk);
          const int64_t a = std::clamp<int64_t>(kr.lo - j0, 0, bn);
          const int64_t z = std::clamp<int64_t>(kr.hi - j0 + 1, a, bn);
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = (i - first) * G + g;  // row of the tile S
            acc_t* sr = st + r * bn;
            if (a > 0 || z < bn) {
              std::fill(sr, sr + a, neg_inf);
              std::fill(sr + z, sr + bn, neg_inf);
            }
            acc_t* mr = m + r0 + r;
            const acc_t m_new = std::max(*mr, row_max(sr + a, z - a));
            // A row with nothing visible yet keeps m = -inf and subtracts nothing, so its masked
            // scores stay 2^-inf = 0 (never NaN); before its first visible tile O and l are 0.
            if (m_new != *mr && *mr != neg_inf) {
              const acc_t corr = std::exp2(*mr - m_new);
              acc_t* ar = acc + (r0 + r) * D;
              for (int64_t c = 0; c < D; ++c) ar[c] *= corr;
              l[r0 + r] *= corr;
            }
            *mr = m_new;
            // s2 - m2 on the visible span while the row is in cache (masked keys stay -inf).
            if (m_new != neg_inf) {
              for (int64_t j = a; j < z; ++j) sr[j] -= m_new;
            }
          }
        }
        S.exp2_();
        for (int64_t r = 0; r < nr; ++r) l[r0 + r] += row_sum(st + r * bn, bn);
        gemm_nn(acc + r0 * D, D, st, bn, vt, D, nr, D, bn);  // O += P V
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r / G, h = h0 + r % G;
        scalar_t* oi = o + b * p.o.batch + (row0 + i) * p.o.row + h * p.o.head;
        // A row that sees no key has l = 0: output 0 and lse = -inf (DESIGN §3.3).
        const acc_t inv = l[r] > 0 ? acc_t(1) / l[r] : acc_t(0);
        for (int64_t c = 0; c < D; ++c) oi[c] = static_cast<scalar_t>(acc[r * D + c] * inv);
        lse[b * p.lse.batch + h * p.lse.head + (row0 + i) * p.lse.row] =
            l[r] > 0 ? (m[r] + std::log2(l[r])) * ln2 : neg_inf;
      }
    }
  });
}

// Four interleaved partial sums (not one serial chain); a fixed order, so equal inputs give
// bitwise equal results wherever it is called.
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t D) {
  acc_t s[4] = {0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 4 <= D; c += 4) {
    for (int u = 0; u < 4; ++u) s[u] += a[c + u] * b[c + u];
  }
  for (; c < D; ++c) s[0] += a[c] * b[c];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

template <typename scalar_t>
void bwd_impl(const Params& p, const scalar_t* dout, const scalar_t* q, const scalar_t* k,
              const scalar_t* v, const scalar_t* o, const acc_type_t<scalar_t>* lse,
              const acc_type_t<scalar_t>* dlse, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = p.D, G = p.H / p.Hkv, BN = kBwdBlockN;
  const int64_t npos = std::max<int64_t>(1, kBwdRows / G), R = npos * G;  // positions, rows
  const acc_t scale = static_cast<acc_t>(p.scale), cap = static_cast<acc_t>(p.softcap);
  const acc_t inf = std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::Tensor> keep;
    acc_t* qt = scratch<acc_t>(keep, R * D);
    acc_t* dot_t = scratch<acc_t>(keep, R * D);
    acc_t* ot = scratch<acc_t>(keep, R * D);
    acc_t* dqa = scratch<acc_t>(keep, R * D);
    acc_t* kt = scratch<acc_t>(keep, BN * D);
    acc_t* vt = scratch<acc_t>(keep, BN * D);
    acc_t* st = scratch<acc_t>(keep, R * BN);  // S, then P, then dS
    acc_t* dpt = scratch<acc_t>(keep, R * BN);
    acc_t* tcap = cap > 0 ? scratch<acc_t>(keep, R * BN) : nullptr;
    acc_t* di = scratch<acc_t>(keep, R);
    acc_t* neg_lse = scratch<acc_t>(keep, R);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / p.Hkv, hk = w % p.Hkv, h0 = hk * G;
      const SeqRange s = seq_range(p, b);
      std::vector<at::Tensor> keep_seq;  // dK, dV of the whole sequence: O(Lk·D)
      acc_t* dka = scratch<acc_t>(keep_seq, s.lk * D);
      acc_t* dva = scratch<acc_t>(keep_seq, s.lk * D);
      std::fill(dka, dka + s.lk * D, acc_t(0));
      std::fill(dva, dva + s.lk * D, acc_t(0));
      const scalar_t* kb = k + b * p.k.batch + s.k0 * p.k.row + hk * p.k.head;
      const scalar_t* vb = v + b * p.v.batch + s.k0 * p.v.row + hk * p.v.head;
      // Query tiles of equal size (80 rows: 40 + 40, not 64 + 16), which under a causal mask
      // leaves less of the diagonal tile masked out.
      const int64_t ntiles = (s.lq + npos - 1) / npos;
      const int64_t step = ntiles > 0 ? (s.lq + ntiles - 1) / ntiles : 1;  // <= npos
      for (int64_t i0 = 0; i0 < s.lq; i0 += step) {
        const int64_t bm = std::min(step, s.lq - i0), rows = bm * G, row0 = s.q0 + i0;
        const int64_t lo = key_range(p, i0, s.lq, s.lk).lo;
        const int64_t hi = key_range(p, i0 + bm - 1, s.lq, s.lk).hi;
        if (lo > hi) continue;  // no row of the tile sees a key: dQ stays 0
        load_head_rows(qt, q + b * p.q.batch + row0 * p.q.row + h0 * p.q.head, p.q.row, p.q.head,
                       bm, G, D);
        load_head_rows(dot_t, dout + b * p.dout.batch + row0 * p.dout.row + h0 * p.dout.head,
                       p.dout.row, p.dout.head, bm, G, D);
        load_head_rows(ot, o + b * p.o.batch + row0 * p.o.row + h0 * p.o.head, p.o.row, p.o.head,
                       bm, G, D);
        for (int64_t r = 0; r < rows; ++r) {
          // D_i = rowsum(dO ⊙ O): the softmax Jacobian's correction term, less lse's gradient
          // where one is given (d lse_i / d s_ij = P_ij).
          const int64_t li =
              b * p.lse.batch + (h0 + r % G) * p.lse.head + (row0 + r / G) * p.lse.row;
          di[r] = dot(dot_t + r * D, ot + r * D, D) - (dlse != nullptr ? dlse[li] : acc_t(0));
          // A row that sees no key has lse = -inf; -lse = +inf would give exp(+inf), so it gets
          // -inf, and P = exp(-inf) = 0.
          const acc_t l = lse[li];
          neg_lse[r] = l == -inf ? -inf : -l;
        }
        std::fill(dqa, dqa + rows * D, acc_t(0));
        for (int64_t j0 = lo; j0 <= hi; j0 += BN) {
          const int64_t bn = std::min(BN, hi - j0 + 1);
          // Only the positions that see a key of this tile take part.
          const auto [first, last] = positions_seeing(p, i0, bm, j0, bn, s.lq, s.lk);
          if (first > last) continue;
          const int64_t r0 = first * G, nr = (last - first + 1) * G;
          const acc_t* qr = qt + r0 * D;
          const acc_t* dor = dot_t + r0 * D;
          load_rows(kt, kb + j0 * p.k.row, p.k.row, bn, D);
          load_rows(vt, vb + j0 * p.v.row, p.v.row, bn, D);
          // P = exp(s - lse), masked entries 0, at most 1: s and lse round apart (|s| ~ 1e11 at
          // softmax_scale 1e10 is exact only to ~1e4), and exp of that residue would be +inf, a
          // NaN in dS; a probability is <= 1 whatever the rounding.
          auto P = wrap(st, nr, bn, bn);
          if (tcap) {
            scores_tile(p, st, tcap, qr, kt, nr, bn, D, i0 + first, j0, s.lq, s.lk, G);
            P.add_(wrap(neg_lse + r0, nr, 1, 1)).exp_().clamp_max_(1);
          } else {
            // -lse + scale · Q Kᵀ in one product; masked entries are zeroed after the exp (they
            // may exceed 1 there, never NaN, and are overwritten).
            for (int64_t r = 0; r < nr; ++r) {
              std::fill(st + r * bn, st + (r + 1) * bn, neg_lse[r0 + r]);
            }
            P.addmm_(wrap(qr, nr, D, D), wrap(kt, bn, D, D).t(), 1, scale).exp_().clamp_max_(1);
            for (int64_t r = 0; r < nr; ++r) {
              const KeyRange kr = key_range(p, i0 + first + r / G, s.lq, s.lk);
              acc_t* pr = st + r * bn;
              const int64_t a = std::clamp<int64_t>(kr.lo - j0, 0, bn);
              const int64_t z = std::clamp<int64_t>(kr.hi - j0 + 1, a, bn);
              std::fill(pr, pr + a, acc_t(0));
              std::fill(pr + z, pr + bn, acc_t(0));
            }
          }
          gemm_tn(dva + j0 * D, D, st, bn, dor, D, bn, D, nr);  // dV += Pᵀ dO
          gemm_nt(dpt, bn, dor, D, vt, D, nr, bn, D);           // dP = dO Vᵀ
          // dS = P ⊙ (dP − D_i) ⊙ ∂s/∂(q·k), in place of P. Where one key holds most of a row's
          // weight (P > 1/2: at most one per row), dP − D_i cancels: exactly so for a row that
          // sees one key (P = 1, O_i = V_j, true gradient 0). The GEMM's dP and the dot's D_i sum
          // in different orders, and the rounding residue, ~1e-7·|dP| times K, alone would break
          // the fp32 tolerance on such rows, so that dP is recomputed by the same dot as D_i.
          for (int64_t r = 0; r < nr; ++r) {
            const acc_t* sr = st + r * bn;
            acc_t* dpr = dpt + r * bn;
            for (int64_t j = 0; j < bn; ++j) {
              if (sr[j] > acc_t(0.5)) dpr[j] = dot(dor + r * D, vt + j * D, D);
            }
          }
          for (int64_t r = 0; r < nr; ++r) {
            acc_t* sr = st + r * bn;
            const acc_t* dpr = dpt + r * bn;
            const acc_t dr = di[r0 + r];
            if (tcap) {
              const acc_t* tr = tcap + r * bn;
              for (int64_t j = 0; j < bn; ++j) {
                sr[j] = sr[j] * (dpr[j] - dr) * (scale * (acc_t(1) - tr[j] * tr[j]));
              }
            } else {
              for (int64_t j = 0; j < bn; ++j) sr[j] = sr[j] * (dpr[j] - dr) * scale;
            }
          }
          gemm_nn(dqa + r0 * D, D, st, bn, kt, D, nr, D, bn);  // dQ += dS K
          gemm_tn(dka + j0 * D, D, st, bn, qr, D, bn, D, nr);  // dK += dSᵀ Q
        }
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* d = dq + b * p.dq.batch + (row0 + r / G) * p.dq.row + (h0 + r % G) * p.dq.head;
          for (int64_t c = 0; c < D; ++c) d[c] = static_cast<scalar_t>(dqa[r * D + c]);
        }
      }
      for (int64_t j = 0; j < s.lk; ++j) {
        scalar_t* dkj = dk + b * p.dk.batch + (s.k0 + j) * p.dk.row + hk * p.dk.head;
        scalar_t* dvj = dv + b * p.dv.batch + (s.k0 + j) * p.dv.row + hk * p.dv.head;
        for (int64_t c = 0; c < D; ++c) {
          dkj[c] = static_cast<scalar_t>(dka[j * D + c]);
          dvj[c] = static_cast<scalar_t>(dva[j * D + c]);
        }
      }
    }
  });
}

void check_cu_values(const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                     const at::Tensor& q, const at::Tensor& k) {
  check_offsets_values_cpu(*cu_q, q.size(0), "cu_seqlens_q");
  check_offsets_values_cpu(*cu_k, k.size(0), "cu_seqlens_k");
}

// seqused_k of a call without block_table: each length within its sequence's keys (k's rows
// batched, cu_seqlens_k's differences varlen, checked first), as the paged call checks its
// lengths against its table; CUDA clamps them instead (no host sync).
void check_seqused_k_values(const at::Tensor& used, const at::Tensor& k,
                            const std::optional<at::Tensor>& cu_k) {
  const int32_t* len = used.data_ptr<int32_t>();
  const auto ck = given(cu_k) ? cu_k->to(at::kLong).contiguous() : at::Tensor();
  for (int64_t b = 0; b < used.size(0); ++b) {
    const int64_t keys =
        given(cu_k) ? ck.data_ptr<int64_t>()[b + 1] - ck.data_ptr<int64_t>()[b] : k.size(1);
    ATTNKIT_CHECK(len[b] >= 0 && len[b] <= keys, "seqused_k: expected lengths in [0, ", keys,
                  "] (sequence ", b, "'s keys), got seqused_k[", b, "]=", len[b]);
  }
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k_in,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, const OptTensor& block_table, const OptTensor& s_aux,
    const OptTensor& k_descale, const OptTensor& v_descale,
    bool /*deterministic: the CPU backward always is*/) {
  const Options opt{softmax_scale, causal, window_left, window_right, softcap};
  check_seqlen_hints(max_seqlen_q, max_seqlen_k);
  const ResolvedKV r = resolve_kv(q_in, k_cache, v_cache, cu_q, cu_k_in, seqused_k, block_table,
                                  k_descale, v_descale, max_seqlen_k, /*cpu=*/true);
  const auto& cu_k = r.cu_k;
  const bool varlen = check_inputs(q_in, r.k, r.v, opt, cu_q, cu_k);
  if (given(s_aux)) check_sinks(*s_aux, q_in, q_in.sym_size(-2));
  if (varlen) check_cu_values(cu_q, cu_k, q_in, r.k);
  if (given(seqused_k) && !given(block_table)) check_seqused_k_values(*r.seqused_k, r.k, cu_k);
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(r.k),
             v = last_dim_contiguous(r.v);
  // Batched, the kernel writes every row; varlen rows outside every sequence are never visited
  // and keep these fill values.
  const auto out_opt = q.options().memory_format(at::MemoryFormat::Contiguous);
  auto out = varlen ? at::zeros(q.sizes(), out_opt) : at::empty(q.sizes(), out_opt);
  auto lse = varlen ? at::full_symint(lse_shape(q, varlen), -std::numeric_limits<double>::infinity(),
                                      q.options().dtype(lse_dtype(q)))
                    : at::empty_symint(lse_shape(q, varlen), q.options().dtype(lse_dtype(q)));
  const auto cq = varlen ? std::optional<at::Tensor>(cu_q->contiguous()) : std::nullopt;
  const auto ck = varlen ? std::optional<at::Tensor>(cu_k->contiguous()) : std::nullopt;
  Params p = make_params(q, k, v, out, lse, opt, cq, ck, varlen);
  if (r.seqused_k) p.seqused_k = r.seqused_k->data_ptr<int32_t>();
  if (out.numel() == 0 || p.B == 0) return {out, lse};
  ATTNKIT_DISPATCH_CPU_FLOAT(q.scalar_type(), "flash_attn_fwd_cpu", [&] {
    fwd_impl<scalar_t>(p, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), lse.data_ptr<acc_type_t<scalar_t>>());
  });
  if (given(s_aux)) apply_sinks(out, lse, *s_aux, varlen, cq);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, bool /*deterministic: always*/, const OptTensor& grad_lse) {
  const Options opt{softmax_scale, causal, window_left, window_right, softcap};
  check_seqlen_hints(max_seqlen_q, max_seqlen_k);
  const bool varlen = check_inputs(q_in, k_in, v_in, opt, cu_q, cu_k);
  check_bwd_inputs(grad_out_in, q_in, out_in, lse, varlen);
  check_grad_lse(grad_lse, lse);
  if (varlen) check_cu_values(cu_q, cu_k, q_in, k_in);
  if (given(seqused_k)) check_seqused_k(*seqused_k, q_in, batch_of(q_in, cu_q));
  const auto used = given(seqused_k) ? OptTensor(seqused_k->contiguous()) : std::nullopt;
  if (used) check_seqused_k_values(*used, k_in, cu_k);  // as the forward: a direct call raises
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
             v = last_dim_contiguous(v_in), out = last_dim_contiguous(out_in),
             dout = last_dim_contiguous(grad_out_in);
  auto dq = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dk = at::zeros(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  auto dv = at::zeros(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  const auto cq = varlen ? std::optional<at::Tensor>(cu_q->contiguous()) : std::nullopt;
  const auto ck = varlen ? std::optional<at::Tensor>(cu_k->contiguous()) : std::nullopt;
  // make_params takes lse's rows as unit-stride (as the forward writes it); a caller's
  // transposed or sliced lse (context-parallel code keeps merged ones) is copied, as on CUDA.
  const auto lse_c = lse.contiguous();
  const auto dlse = given(grad_lse) ? grad_lse->contiguous() : at::Tensor();  // lse_c's layout
  Params p = make_params(q, k, v, out, lse_c, opt, cq, ck, varlen);
  if (used) p.seqused_k = used->data_ptr<int32_t>();
  p.dout = strides_of(dout, varlen);
  p.dq = strides_of(dq, varlen);
  p.dk = strides_of(dk, varlen);
  p.dv = strides_of(dv, varlen);
  if (q.numel() == 0 || k.numel() == 0 || p.B == 0) return {dq, dk, dv};
  ATTNKIT_DISPATCH_CPU_FLOAT(q.scalar_type(), "flash_attn_bwd_cpu", [&] {
    bwd_impl<scalar_t>(p, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                       v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                       lse_c.data_ptr<acc_type_t<scalar_t>>(),
                       dlse.defined() ? dlse.data_ptr<acc_type_t<scalar_t>>() : nullptr,
                       dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

// The private ops (docs/ops.md, "Kernel choice"): the CPU has one kernel, which "auto" and
// "portable" name; a CUDA kernel's name is an error. The launch options are checked as on CUDA
// and change nothing here.
void check_cpu_kernel(c10::string_view kernel) {
  const FlashRequest r = check_kernel_request(kernel, "kernel");
  ATTNKIT_CHECK(r == FlashRequest::kAuto || r == FlashRequest::kPortable,
                "kernel: expected 'auto' or 'portable' on the CPU (its one kernel), got '",
                std::string(kernel), "', a CUDA kernel");
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_with_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, const OptTensor& block_table, const OptTensor& s_aux,
    const OptTensor& k_descale, const OptTensor& v_descale, bool deterministic,
    c10::string_view kernel, int64_t max_ctas, bool ping_pong, bool persistent, bool three_wg,
    bool paired, c10::string_view decode_kernel, c10::string_view paged_read, int64_t decode_sms) {
  check_cpu_kernel(kernel);
  make_fwd_launch_options(max_ctas, ping_pong, persistent, three_wg, paired, decode_sms);
  // The CPU has no decode path (its one kernel reads the pages itself): "auto" and "none" only.
  ATTNKIT_CHECK(!check_decode_request(decode_kernel).named(),
                "decode_kernel: expected 'auto' or 'none' on the CPU, got '",
                std::string(decode_kernel), "', a CUDA kernel");
  // The CPU gathers the pages: "auto" and "gather" only.
  const PagedRead pr = check_paged_read(paged_read);
  ATTNKIT_CHECK(pr != PagedRead::kInPlace, "paged_read: 'in_place' is the sm90 forward's; the CPU "
                "gathers the pages ('auto' or 'gather')");
  check_paged_read_args(pr, given(block_table), /*decode_off=*/false);
  return flash_attn_fwd_cpu(q, k, v, softmax_scale, causal, window_left, window_right, softcap,
                            cu_q, cu_k, std::move(max_seqlen_q), std::move(max_seqlen_k),
                            seqused_k, block_table, s_aux, k_descale, v_descale, deterministic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_with_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, bool deterministic, const OptTensor& grad_lse,
    c10::string_view kernel, int64_t max_tiles, int64_t cta_group) {
  check_cpu_kernel(kernel);
  make_bwd_launch_options(max_tiles, cta_group);
  return flash_attn_bwd_cpu(grad_out, q, k, v, out, lse, softmax_scale, causal, window_left,
                            window_right, softcap, cu_q, cu_k, std::move(max_seqlen_q),
                            std::move(max_seqlen_k), seqused_k, deterministic, grad_lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cpu);
  m.impl("_flash_attn_fwd_with", &flash_attn_fwd_with_cpu);
  m.impl("_flash_attn_bwd_with", &flash_attn_bwd_with_cpu);
}

}  // namespace flash
}  // namespace attnkit
