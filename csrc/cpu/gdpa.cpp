// GDPA CPU kernels (DESIGN §3.1). Parallel over sequence × head × query tile (forward) and over
// sequence × kv head (backward, so every task owns its dK/dV rows and no atomics are needed).
// Scores are formed one BM×BN tile at a time in fp32 (fp64 for double): no T×T buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/dispatch.h"
#include "common/gdpa_args.h"

namespace attnkit {
namespace gdpa {
namespace {

constexpr int64_t kBlockM = 32;  // query rows per tile
constexpr int64_t kBlockN = 64;  // key rows per tile

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// P is rounded to the value dtype before P·V (DESIGN §3.1); a no-op for fp32 / fp64.
template <typename scalar_t, typename acc_t>
inline acc_t round_to(acc_t x) {
  return static_cast<acc_t>(static_cast<scalar_t>(x));
}

template <typename index_t>
struct Seq {
  int64_t q0, lq, k0, lk;
};

template <typename index_t>
inline Seq<index_t> seq_of(const index_t* qo, const index_t* ko, int64_t b) {
  return {int64_t(qo[b]), int64_t(qo[b + 1] - qo[b]), int64_t(ko[b]), int64_t(ko[b + 1] - ko[b])};
}

// Loads `rows` rows of head `h` starting at `row0` of a [T, H, D] contiguous tensor into a
// row-major acc_t buffer [rows][D] (times `scale`), zero-filling rows past `valid`.
template <typename scalar_t, typename acc_t>
inline void load_rows(acc_t* dst, const scalar_t* src, int64_t row0, int64_t rows, int64_t valid,
                      int64_t H, int64_t h, int64_t D, acc_t scale = acc_t(1)) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* d = dst + r * D;
    if (r < valid) {
      const scalar_t* s = src + ((row0 + r) * H + h) * D;
      for (int64_t c = 0; c < D; ++c) d[c] = static_cast<acc_t>(s[c]) * scale;
    } else {
      std::fill(d, d + D, acc_t(0));
    }
  }
}

// Scores of one tile: s[i][j] = pre_scale · q_i·k_j, then φ and the causal mask. Also returns
// φ′ in `dphi` when it is non-null (backward).
template <Activation A, typename acc_t>
inline void scores_tile(acc_t* p, acc_t* dphi, const acc_t* q, const acc_t* k, int64_t bm,
                        int64_t bn, int64_t D, acc_t pre_scale, bool causal, int64_t i0,
                        int64_t j0) {
  for (int64_t i = 0; i < bm; ++i) {
    const acc_t* qi = q + i * D;
    for (int64_t j = 0; j < bn; ++j) {
      const acc_t* kj = k + j * D;
      acc_t s = 0;
      for (int64_t c = 0; c < D; ++c) s += qi[c] * kj[c];
      s *= pre_scale;
      const bool masked = causal && (j0 + j > i0 + i);
      p[i * bn + j] = masked ? acc_t(0) : act_fwd<A>(s);
      if (dphi) dphi[i * bn + j] = masked ? acc_t(0) : act_bwd<A>(s);
    }
  }
}

template <Activation A, typename scalar_t, typename index_t>
void fwd_impl(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const index_t* qo, const index_t* ko, int64_t B, double qk_scale, double pre_scale,
              bool causal) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t H = q.size(1), Hkv = k.size(1), D = q.size(2), G = H / Hkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();

  // Work items: (b, h, q tile). Tiles per sequence come from the real lengths (never the hints).
  std::vector<int64_t> tile_start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lq = int64_t(qo[b + 1] - qo[b]);
    tile_start[b + 1] = tile_start[b] + (lq + kBlockM - 1) / kBlockM;
  }
  const int64_t tiles = tile_start[B];

  at::parallel_for(0, tiles * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(kBlockM * D), kt(kBlockN * D), vt(kBlockN * D), pt(kBlockM * kBlockN),
        acc(kBlockM * D);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t h = w % H, tile = w / H;
      const int64_t b = std::upper_bound(tile_start.begin(), tile_start.end(), tile) - tile_start.begin() - 1;
      const auto s = seq_of(qo, ko, b);
      const int64_t i0 = (tile - tile_start[b]) * kBlockM, bm = std::min(kBlockM, s.lq - i0);
      const int64_t hk = h / G;
      load_rows(qt.data(), qp, s.q0 + i0, bm, bm, H, h, D);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t kv_end = causal ? std::min(s.lk, i0 + bm) : s.lk;
      for (int64_t j0 = 0; j0 < kv_end; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, kv_end - j0);
        load_rows(kt.data(), kp, s.k0 + j0, bn, bn, Hkv, hk, D);
        load_rows(vt.data(), vp, s.k0 + j0, bn, bn, Hkv, hk, D);
        scores_tile<A>(pt.data(), static_cast<acc_t*>(nullptr), qt.data(), kt.data(), bm, bn, D,
                       acc_t(pre_scale), causal, i0, j0);
        for (int64_t i = 0; i < bm; ++i) {
          acc_t* ai = acc.data() + i * D;
          for (int64_t j = 0; j < bn; ++j) {
            const acc_t pij = round_to<scalar_t>(pt[i * bn + j]);
            if (pij == acc_t(0)) continue;
            const acc_t* vj = vt.data() + j * D;
            for (int64_t c = 0; c < D; ++c) ai[c] += pij * vj[c];
          }
        }
      }
      for (int64_t i = 0; i < bm; ++i) {
        scalar_t* o = op + ((s.q0 + i0 + i) * H + h) * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[i * D + c] * acc_t(qk_scale));
      }
    }
  });
}

template <Activation A, typename scalar_t, typename index_t>
void bwd_impl(at::Tensor& dq32, at::Tensor& dk32, at::Tensor& dv32, const at::Tensor& dout,
              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const index_t* qo,
              const index_t* ko, int64_t B, double qk_scale, double pre_scale, bool causal) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t H = q.size(1), Hkv = k.size(1), D = q.size(2), G = H / Hkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* dop = dout.data_ptr<scalar_t>();
  acc_t* dqp = dq32.data_ptr<acc_t>();
  acc_t* dkp = dk32.data_ptr<acc_t>();
  acc_t* dvp = dv32.data_ptr<acc_t>();
  const acc_t ds_scale = acc_t(qk_scale * pre_scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(kBlockM * D), dot(kBlockM * D), kt(kBlockN * D), vt(kBlockN * D),
        pt(kBlockM * kBlockN), dphi(kBlockM * kBlockN), ds(kBlockM * kBlockN);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / Hkv, hk = w % Hkv;
      const auto s = seq_of(qo, ko, b);
      for (int64_t j0 = 0; j0 < s.lk; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, s.lk - j0);
        load_rows(kt.data(), kp, s.k0 + j0, bn, bn, Hkv, hk, D);
        load_rows(vt.data(), vp, s.k0 + j0, bn, bn, Hkv, hk, D);
        acc_t* dk = dkp + ((s.k0 + j0) * Hkv + hk) * D;
        acc_t* dv = dvp + ((s.k0 + j0) * Hkv + hk) * D;
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
          // Causal: query i sees key j iff j <= i, so queries before j0 see nothing of this tile.
          for (int64_t i0 = causal ? (j0 / kBlockM) * kBlockM : 0; i0 < s.lq; i0 += kBlockM) {
            const int64_t bm = std::min(kBlockM, s.lq - i0);
            load_rows(qt.data(), qp, s.q0 + i0, bm, bm, H, h, D);
            load_rows(dot.data(), dop, s.q0 + i0, bm, bm, H, h, D);
            scores_tile<A>(pt.data(), dphi.data(), qt.data(), kt.data(), bm, bn, D,
                           acc_t(pre_scale), causal, i0, j0);
            // dS = qk_scale·pre_scale·φ′(S)⊙(dO·Vᵀ); dV += qk_scale·round(P)ᵀ·dO.
            for (int64_t i = 0; i < bm; ++i) {
              const acc_t* doi = dot.data() + i * D;
              for (int64_t j = 0; j < bn; ++j) {
                const acc_t* vj = vt.data() + j * D;
                acc_t dp = 0;
                for (int64_t c = 0; c < D; ++c) dp += doi[c] * vj[c];
                ds[i * bn + j] = ds_scale * dphi[i * bn + j] * dp;
                const acc_t p = round_to<scalar_t>(pt[i * bn + j]) * acc_t(qk_scale);
                if (p != acc_t(0)) {
                  acc_t* dvj = dv + j * Hkv * D;
                  for (int64_t c = 0; c < D; ++c) dvj[c] += p * doi[c];
                }
              }
            }
            // dQ += dS·K; dK += dSᵀ·Q.
            for (int64_t i = 0; i < bm; ++i) {
              acc_t* dqi = dqp + ((s.q0 + i0 + i) * H + h) * D;
              const acc_t* qi = qt.data() + i * D;
              for (int64_t j = 0; j < bn; ++j) {
                const acc_t d = ds[i * bn + j];
                if (d == acc_t(0)) continue;
                const acc_t* kj = kt.data() + j * D;
                acc_t* dkj = dk + j * Hkv * D;
                for (int64_t c = 0; c < D; ++c) {
                  dqi[c] += d * kj[c];
                  dkj[c] += d * qi[c];
                }
              }
            }
          }
        }
      }
    }
  });
}

// Value checks the CPU can afford: offsets non-decreasing and within the data.
void check_offsets_values(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_offsets,
                          const at::Tensor& kv_offsets) {
  check_offsets_values_cpu(q_offsets, q.size(0), "q_offsets");
  check_offsets_values_cpu(kv_offsets, k.size(0), "kv_offsets");
}

at::Tensor gdpa_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                        c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv,
                        c10::string_view activation, double qk_scale, double pre_scale,
                        bool causal) {
  check_inputs(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
  const Activation act = parse_activation(activation);
  check_offsets_values(q_in, k_in, q_offsets, kv_offsets);
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  // Rows outside every sequence (past the last offset) are defined as 0: the output is fully written.
  auto out = at::zeros(q.sizes(), q.options());
  const auto qo = q_offsets.contiguous(), ko = kv_offsets.contiguous();
  const int64_t B = qo.size(0) - 1;
  if (B <= 0 || q.numel() == 0) return out;
  ATTNKIT_DISPATCH_CPU_FLOAT(q.scalar_type(), "gdpa_fwd_cpu", [&] {
    ATTNKIT_DISPATCH_INDEX(qo.scalar_type(), "q_offsets", [&] {
      visit_activation(act, [&](auto a) {
        fwd_impl<decltype(a)::value, scalar_t, index_t>(out, q, k, v, qo.data_ptr<index_t>(),
                                                        ko.data_ptr<index_t>(), B, qk_scale,
                                                        pre_scale, causal);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
    c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv, c10::string_view activation,
    double qk_scale, double pre_scale, bool causal) {
  check_inputs(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
  check_grad_out(grad_out, q_in);
  const Activation act = parse_activation(activation);
  check_offsets_values(q_in, k_in, q_offsets, kv_offsets);
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto dout = grad_out.contiguous();
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dq = at::zeros(q.sizes(), q.options().dtype(acc_dtype));
  auto dk = at::zeros(k.sizes(), k.options().dtype(acc_dtype));
  auto dv = at::zeros(v.sizes(), v.options().dtype(acc_dtype));
  const auto qo = q_offsets.contiguous(), ko = kv_offsets.contiguous();
  const int64_t B = qo.size(0) - 1;
  if (B > 0 && q.numel() > 0 && k.numel() > 0) {
    ATTNKIT_DISPATCH_CPU_FLOAT(q.scalar_type(), "gdpa_bwd_cpu", [&] {
      ATTNKIT_DISPATCH_INDEX(qo.scalar_type(), "q_offsets", [&] {
        visit_activation(act, [&](auto a) {
          bwd_impl<decltype(a)::value, scalar_t, index_t>(dq, dk, dv, dout, q, k, v,
                                                          qo.data_ptr<index_t>(),
                                                          ko.data_ptr<index_t>(), B, qk_scale,
                                                          pre_scale, causal);
        });
      });
    });
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("gdpa_fwd", &gdpa_fwd_cpu);
  m.impl("gdpa_bwd", &gdpa_bwd_cpu);
}

}  // namespace gdpa
}  // namespace attnkit
